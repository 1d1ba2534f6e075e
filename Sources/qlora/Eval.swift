// `qlora eval`: evaluating models and adapters (the paper's section 5). `eval mmlu` scores multiple
// choice as the paper does; `eval generate` (EvalGenerate.swift) answers a chat benchmark; `eval elo`
// turns pairwise judgments into Elo ratings.
import ArgumentParser
import QLoRA

struct Eval: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Evaluate models: MMLU multiple choice, answers to chat benchmarks, Elo ratings from pairwise judgments.",
        subcommands: [EvalMMLU.self, EvalGenerate.self, EvalJudge.self, EvalElo.self]
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

    @Option(parsing: .upToNextOption, help: "The judgments (JSON lines; several files are read as one tournament).", completion: .file())
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

    @Option(help: "Also write a self-contained HTML page: the ranking with its intervals and the win-rate matrix as a heat map.", completion: .file())
    var html: String?

    @Option(help: "Also write the same two charts as one SVG file.", completion: .file())
    var svg: String?

    func validate() throws {
        guard !judgments.isEmpty else { throw ValidationError("--judgments needs a file") }
        guard k > 0 && k.isFinite else { throw ValidationError("--k must be positive") }
        guard initial.isFinite else { throw ValidationError("--initial must be a number") }
        guard orderings >= 1 else { throw ValidationError("--orderings must be at least 1") }
    }

    func run() throws {
        var battles: [Battle] = []
        var unjudged = 0
        for file in judgments { battles += try Elo.parseBattles(try FileSystem.readFile(file), file: file, unjudged: &unjudged) }
        guard !battles.isEmpty else { throw EvaluationError.empty(file: judgments.joined(separator: ", "), what: "no battles") }
        var o = EloOptions()
        o.k = k
        o.initial = initial
        o.orderings = orderings
        o.seed = seed
        let start = Clock.seconds()
        let result = Elo.run(battles, options: o)
        let seconds = Clock.seconds() - start
        try writePictures(result, battles: battles.count, unjudged: unjudged)
        if json {
            printJSON(.object([
                ("battles", .int(battles.count)), ("skipped_without_verdict", .int(unjudged)), ("k", .double(k)), ("initial", .double(initial)), ("orderings", .int(orderings)),
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
        if unjudged > 0 { print("\(unjudged) judgments without a verdict (\"winner\": null) are skipped.") }
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

    func writePictures(_ result: EloResult, battles: Int, unjudged: Int) throws {
        guard html != nil || svg != nil else { return }
        let ranking = Chart.intervals(title: "Elo ratings with 95% intervals", axis: "Elo (mean over \(orderings) orderings; K \(formatFixed(k, 0)), start \(formatFixed(initial, 0)))",
                                      rows: result.ratings.map { ($0.model, $0.mean, $0.lower, $0.upper) })
        let heat = Chart.heatMap(title: "Win rate of the row against the column", labels: result.models, values: result.winRate, counts: result.battles,
                                 note: "Ties count as half a win; grey: the two never met.")
        if let svg {
            try FileSystem.writeFileAtomically(svg, bytes: Array(Chart.stack([ranking, heat]).utf8))
            Log.info("wrote \(svg)")
        }
        if let html {
            var table: [[String]] = [["rank", "model", "Elo", "95% interval", "battles", "wins", "ties", "losses"]]
            for (i, r) in result.ratings.enumerated() {
                table.append(["\(i + 1)", r.model, formatFixed(r.mean, 1), "[\(formatFixed(r.lower, 1)), \(formatFixed(r.upper, 1))]", "\(r.battles)", "\(r.wins)", "\(r.ties)", "\(r.losses)"])
            }
            var matrix: [[String]] = [["against"] + result.models]
            for (i, m) in result.models.enumerated() {
                matrix.append([m] + result.models.indices.map { j in result.winRate[i][j].map { "\(formatFixed(100 * $0, 1))% (\(result.battles[i][j]))" } ?? "-" })
            }
            let subtitle = "\(battles) battles from \(judgments.joined(separator: ", "))\(unjudged > 0 ? " (\(unjudged) without a verdict skipped)" : ""); \(orderings) random orderings, seed \(seed); a tie is half a win for each side."
            let page = Chart.page(title: "Tournament", subtitle: subtitle, sections: [("Ranking", ranking, table), ("Win rates", heat, matrix)])
            try FileSystem.writeFileAtomically(html, bytes: Array(page.utf8))
            Log.info("wrote \(html)")
        }
    }
}

struct EvalMMLU: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "mmlu",
        abstract: "MMLU accuracy, scored as the QLoRA paper scores it (5-shot by default).",
        discussion: """
            --data is a folder in the hendrycks/test layout (dev/<subject>_dev.csv, test/<subject>_test.csv: question,             A, B, C, D, answer letter; no header), or a JSON-lines file of the QLoRA repository's layout ({"subject",             "input": a whole prompt, "output": "A".."D"}). Prompts are built as hendrycks/test builds them: a header             naming the subject, --shots dev examples with their answers, then the question ending in "Answer:". The             prediction is the letter whose token (the one a letter gets right after "Answer:") has the largest logit at             the last position. A subject's few-shot prefix runs once; its questions continue from its keys and values.             A prompt longer than the model's context loses its oldest tokens.
            """
    )

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var inference: InferenceOptions

    @Option(help: "A folder in the hendrycks/test layout, or a JSON-lines file of prompts.", completion: .file())
    var data: String

    @Option(help: "Dev examples before each question (hendrycks/test layout).")
    var shots: Int = 5

    @Option(help: "The split to score (a folder of the --data folder): test, val or dev.")
    var split: String = "test"

    @Option(help: "Comma-separated subjects (default: all).")
    var subjects: String?

    @Option(help: "At most this many questions a subject.")
    var limit: Int?

    @Flag(help: "Print one JSON object on stdout (with each question's letter log-probabilities).")
    var json = false

    @Option(help: "Also write a self-contained HTML page of the accuracy by subject.", completion: .file())
    var html: String?

    @Option(help: "Also write the accuracy by subject as an SVG file.", completion: .file())
    var svg: String?

    func validate() throws {
        guard shots >= 0 else { throw ValidationError("--shots must be 0 or more") }
        if let limit { guard limit >= 1 else { throw ValidationError("--limit must be at least 1") } }
    }

    func run() throws {
        let items: [MMLUItem]
        if FileSystem.isDirectory(data) {
            let chosen = subjects.map { $0.split(separator: ",").map { String($0).trimmingWhitespace() }.filter { !$0.isEmpty } }
            let (dev, questions) = try MMLU.loadFolder(data, split: split, subjects: chosen)
            items = MMLU.items(dev: dev, questions: questions, shots: shots, limit: limit)
        } else {
            var all = try MMLU.parseJSONL(try FileSystem.readFile(data), file: data)
            if let s = subjects {
                let keep = Set(s.split(separator: ",").map { String($0).trimmingWhitespace() })
                all = all.filter { keep.contains($0.subject) }
            }
            if let limit {
                var seen: [String: Int] = [:]
                all = all.filter { seen[$0.subject, default: 0] += 1; return seen[$0.subject]! <= limit }
            }
            items = all
        }
        guard !items.isEmpty else { throw EvaluationError.empty(file: data, what: "no questions to score") }
        let (model, tokenizer) = try modelOptions.load(progress: !json)
        inference.apply(to: model)
        let evaluator = try MMLUEvaluator(model: model, tokenizer: tokenizer)
        let bar = ProgressBar("mmlu", total: items.count, enabled: !json)
        let result = try evaluator.evaluate(items) { done, _ in bar.advance(note: items[done - 1].subject) }
        if html != nil || svg != nil {
            let sorted = result.subjects.sorted { $0.accuracy > $1.accuracy }
            let name = modelOptions.adapter.map { "\(FileSystem.baseName(modelOptions.modelPath)) + \(FileSystem.baseName($0))" } ?? FileSystem.baseName(modelOptions.modelPath)
            let chart = Chart.bars(title: "MMLU accuracy by subject: \(name)", axis: "accuracy (%), micro \(formatFixed(100 * result.microAccuracy, 2))%, macro \(formatFixed(100 * result.macroAccuracy, 2))%",
                                   rows: sorted.map { ($0.subject, 100 * $0.accuracy) }, maximum: 100, reference: (25, "chance 25%"))
            if let svg {
                try FileSystem.writeFileAtomically(svg, bytes: Array(chart.utf8))
                Log.info("wrote \(svg)")
            }
            if let html {
                let table = [["subject", "accuracy", "correct", "questions"]] + sorted.map { [$0.subject, formatFixed(100 * $0.accuracy, 1) + "%", "\($0.correct)", "\($0.total)"] }
                let shown = FileSystem.isDirectory(data) ? "\(shots)-shot, split \(split)" : "prompts from the file"
                let subtitle = "\(result.total) questions from \(data) (\(shown)): micro accuracy \(formatFixed(100 * result.microAccuracy, 2))% (\(result.correct) of \(result.total)), macro \(formatFixed(100 * result.macroAccuracy, 2))% over \(result.subjects.count) subjects, in \(formatFixed(result.seconds, 1)) s."
                try FileSystem.writeFileAtomically(html, bytes: Array(Chart.page(title: "MMLU: \(name)", subtitle: subtitle, sections: [("Accuracy by subject", chart, table)]).utf8))
                Log.info("wrote \(html)")
            }
        }
        if json {
            printJSON(.object([
                ("data", .string(data)), ("shots", .int(FileSystem.isDirectory(data) ? shots : 0)), ("questions", .int(result.total)),
                ("correct", .int(result.correct)), ("micro_accuracy", .double(result.microAccuracy)), ("macro_accuracy", .double(result.macroAccuracy)),
                ("seconds", .double(result.seconds)), ("prompt_tokens", .int(result.promptTokens)), ("tokens_computed", .int(result.tokensComputed)),
                ("letter_tokens", .array(evaluator.letterTokens.map { .int($0) })),
                ("subjects", .array(result.subjects.map { .object([("subject", .string($0.subject)), ("correct", .int($0.correct)),
                                                                    ("total", .int($0.total)), ("accuracy", .double($0.accuracy))]) })),
                ("predictions", .array(zip(items, result.scores).map { item, s in
                    .object([("source", .string(item.source)), ("subject", .string(item.subject)), ("answer", .string(MMLU.letters[item.answer])),
                             ("prediction", .string(MMLU.letters[s.prediction])), ("logprobs", .array(s.logprobs.map { .double($0) }))])
                })),
            ]))
            return
        }
        let width = max(8, result.subjects.map(\.subject.count).max() ?? 8)
        func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
        print("\(pad("subject", width + 2))accuracy  correct / questions")
        for s in result.subjects {
            print("\(pad(s.subject, width + 2))\(pad(formatFixed(100 * s.accuracy, 1) + "%", 10))\(s.correct) / \(s.total)")
        }
        print()
        print("micro accuracy \(formatFixed(100 * result.microAccuracy, 2))% (\(result.correct) of \(result.total)), macro \(formatFixed(100 * result.macroAccuracy, 2))% over \(result.subjects.count) subjects")
        Log.info("scored \(result.total) questions in \(formatFixed(result.seconds, 1)) s: \(result.promptTokens) prompt tokens, \(result.tokensComputed) computed (prefixes shared)")
    }
}
