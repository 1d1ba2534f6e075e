// `qlora eval`: evaluating models and adapters (the paper's section 5). `eval elo` turns pairwise
// judgments into Elo ratings.
import ArgumentParser
import QLoRA

struct Eval: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Evaluate models: Elo ratings from pairwise judgments.",
        subcommands: [EvalElo.self]
    )
}

struct EvalElo: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "elo",
        abstract: "Elo ratings with 95% intervals from pairwise judgments, as the QLoRA paper ranks its chatbots.",
        discussion: """
            Reads JSON lines with "model_a", "model_b" and "winner" ("model_a", "model_b", "tie" or "tie (bothbad)"): \
            the Chatbot Arena battle layout. Every model starts at --initial; each battle moves both ratings by \
            K x (score - expected score), a tie scoring half a win for each side. The result depends on the order of \
            the battles, so the ratings are computed over --orderings random orderings and reported as their mean \
            and 95% interval (2.5th to 97.5th percentile), with the win rate of each pair and the battles between \
            them. The same --seed gives the same ratings on any number of threads.
            """
    )

    @Option(help: "The judgments (JSON lines; several files are read as one tournament).", completion: .file())
    var judgments: [String]

    @Option(help: "The Elo K factor.")
    var k: Double = 32

    @Option(help: "The rating every model starts from.")
    var initial: Double = 1000

    @Option(help: "Random orderings of the battles to average over.")
    var orderings: Int = 10_000

    @Option(help: "Seed of the orderings.")
    var seed: UInt64 = 0

    @Flag(help: "Print one JSON object on stdout.")
    var json = false

    func validate() throws {
        guard !judgments.isEmpty else { throw ValidationError("--judgments needs a file") }
        guard k > 0 && k.isFinite else { throw ValidationError("--k must be positive") }
        guard initial.isFinite else { throw ValidationError("--initial must be a number") }
        guard orderings >= 1 else { throw ValidationError("--orderings must be at least 1") }
    }

    func run() throws {
        var battles: [Battle] = []
        for file in judgments { battles += try Elo.parseBattles(try FileSystem.readFile(file), file: file) }
        guard !battles.isEmpty else { throw EvaluationError.empty(file: judgments.joined(separator: ", "), what: "no battles") }
        var o = EloOptions()
        o.k = k
        o.initial = initial
        o.orderings = orderings
        o.seed = seed
        let start = Clock.seconds()
        let result = Elo.run(battles, options: o)
        let seconds = Clock.seconds() - start
        if json {
            printJSON(.object([
                ("battles", .int(battles.count)), ("k", .double(k)), ("initial", .double(initial)), ("orderings", .int(orderings)),
                ("seed", .int(Int(seed))), ("ties", .string("half a win for each side")), ("seconds", .double(seconds)),
                ("ratings", .array(result.ratings.map { r in
                    .object([("model", .string(r.model)), ("elo", .double(r.mean)), ("lower", .double(r.lower)), ("upper", .double(r.upper)),
                             ("battles", .int(r.battles)), ("wins", .int(r.wins)), ("ties", .int(r.ties)), ("losses", .int(r.losses))])
                })),
                ("models", .array(result.models.map { .string($0) })),
                ("win_rate", .array(result.winRate.map { row in .array(row.map { $0.map(JSONValue.double) ?? .null }) })),
                ("pair_battles", .array(result.battles.map { row in .array(row.map { .int($0) }) })),
            ]))
            return
        }
        print("Elo over \(orderings) random orderings of \(battles.count) battles (K \(formatFixed(k, 0)), initial \(formatFixed(initial, 0)), seed \(seed));")
        print("a tie counts as half a win for each side.")
        print()
        let width = max(5, result.models.map(\.count).max() ?? 5)
        func pad(_ s: String, _ n: Int, right: Bool = false) -> String {
            s.count >= n ? s : (right ? String(repeating: " ", count: n - s.count) + s : s + String(repeating: " ", count: n - s.count))
        }
        print("\(pad("rank", 5))\(pad("model", width + 2))\(pad("Elo", 8, right: true))  \(pad("95% interval", 18))\(pad("battles", 8, right: true))\(pad("wins", 6, right: true))\(pad("ties", 6, right: true))\(pad("losses", 8, right: true))")
        for (i, r) in result.ratings.enumerated() {
            let interval = "[\(formatFixed(r.lower, 1)), \(formatFixed(r.upper, 1))]"
            print("\(pad("\(i + 1)", 5))\(pad(r.model, width + 2))\(pad(formatFixed(r.mean, 1), 8, right: true))  \(pad(interval, 18))\(pad("\(r.battles)", 8, right: true))\(pad("\(r.wins)", 6, right: true))\(pad("\(r.ties)", 6, right: true))\(pad("\(r.losses)", 8, right: true))")
        }
        print()
        print("Win rate of the row's model against the column's (ties half; battles in parentheses):")
        let cell = 14
        print(pad("", width + 2) + result.models.map { pad(String($0.prefix(cell - 1)), cell, right: true) }.joined())
        for (i, m) in result.models.enumerated() {
            let cells = result.models.indices.map { j -> String in
                guard let w = result.winRate[i][j] else { return pad("-", cell, right: true) }
                return pad("\(formatFixed(100 * w, 1))% (\(result.battles[i][j]))", cell, right: true)
            }
            print(pad(m, width + 2) + cells.joined())
        }
    }
}
