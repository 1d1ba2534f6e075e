// Elo ratings from pairwise judgments, as the QLoRA paper turns its tournaments into a ranking
// (Dettmers et al. 2023, section 5): every model starts at the same rating, each battle moves the two
// ratings by K times (score - expected score), and because the result depends on the order of the
// battles, the ratings are computed over many random orderings of all battles and reported as their
// mean with a 95% interval (the 2.5th and 97.5th percentiles). A tie scores half a win for each side.
import QLoRACore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// One pairwise comparison: `first` against `second`.
public struct Battle: Sendable, Equatable {
    public enum Outcome: Sendable, Equatable { case first, second, tie }
    public var first: String
    public var second: String
    public var outcome: Outcome

    public init(_ first: String, _ second: String, _ outcome: Outcome) {
        self.first = first
        self.second = second
        self.outcome = outcome
    }

    /// The first model's score: 1, 0 or 1/2.
    public var firstScore: Double {
        switch outcome {
        case .first: return 1
        case .second: return 0
        case .tie: return 0.5
        }
    }
}

public enum EvaluationError: Error, CustomStringConvertible, Equatable {
    case malformedLine(file: String, line: Int, reason: String)
    case empty(file: String, what: String)

    public var description: String {
        switch self {
        case let .malformedLine(file, line, reason): return "\(file):\(line): \(reason)"
        case let .empty(file, what): return "\(file): \(what)"
        }
    }
}

public struct EloOptions: Sendable {
    /// Rating change of a full upset against an equal opponent is K / 2.
    public var k: Double = 32
    public var initial: Double = 1000
    /// Random orderings of the battles the ratings are averaged over (the paper: 10,000).
    public var orderings = 10_000
    public var seed: UInt64 = 0

    public init() {}
}

public struct EloResult: Sendable {
    public struct Rating: Sendable {
        public let model: String
        /// Mean over the orderings, and the 2.5th / 97.5th percentiles (linear interpolation, as numpy).
        public let mean: Double
        public let lower: Double
        public let upper: Double
        public let wins: Int
        public let losses: Int
        public let ties: Int

        public var battles: Int { wins + losses + ties }
    }

    /// Highest mean first.
    public let ratings: [Rating]
    /// Models in the order of `ratings`; `winRate[i][j]` is i's score against j (ties half) over
    /// `battles[i][j]` battles between them (nil where they never met).
    public let models: [String]
    public let winRate: [[Double?]]
    public let battles: [[Int]]
    public let options: EloOptions
}

public enum Elo {
    /// Reads battles from JSON lines in the Chatbot Arena layout, which `qlora eval judge` writes too:
    /// `{"model_a": ..., "model_b": ..., "winner": "model_a" | "model_b" | "tie" | "tie (bothbad)"}`, other
    /// keys ignored, blank lines skipped. A line that is not such an object is an error naming file:line.
    /// A judgment the judge gave no verdict for (`"winner": null` with an "error", as eval judge writes
    /// it) is skipped and counted in `unjudged`.
    public static func parseBattles(_ bytes: [UInt8], file: String) throws -> [Battle] {
        var unjudged = 0
        return try parseBattles(bytes, file: file, unjudged: &unjudged)
    }

    public static func parseBattles(_ bytes: [UInt8], file: String, unjudged: inout Int) throws -> [Battle] {
        var battles: [Battle] = []
        for (lineNumber, line) in JSON.lines(bytes) {
            func bad(_ reason: String) -> EvaluationError { .malformedLine(file: file, line: lineNumber, reason: reason) }
            let value: JSONValue
            do { value = try JSON.parse(Array(line)) } catch { throw bad("not JSON (\(error))") }
            guard case .object = value else { throw bad("not a JSON object") }
            guard let a = value["model_a"]?.stringValue, !a.isEmpty else { throw bad("no \"model_a\" string") }
            guard let b = value["model_b"]?.stringValue, !b.isEmpty else { throw bad("no \"model_b\" string") }
            guard a != b else { throw bad("model_a and model_b are both \"\(a)\"") }
            if value["winner"] == .null && value["error"] != nil {
                unjudged += 1
                continue
            }
            guard let w = value["winner"]?.stringValue else { throw bad("no \"winner\" string") }
            let outcome: Battle.Outcome
            switch w {
            case "model_a": outcome = .first
            case "model_b": outcome = .second
            case "tie", "tie (bothbad)": outcome = .tie
            default: throw bad("winner \"\(w)\" is not model_a, model_b, tie or tie (bothbad)")
            }
            battles.append(Battle(a, b, outcome))
        }
        return battles
    }

    /// The ratings after one pass over `battles` in `order` (indices into `battles`), models indexed by
    /// `index`: the sequential Elo update, both ratings moved by the same amount in opposite directions.
    public static func ratings(_ battles: [(Int, Int, Double)], order: [Int], models: Int, options: EloOptions) -> [Double] {
        var r = [Double](repeating: options.initial, count: models)
        for i in order {
            let (a, b, score) = battles[i]
            let expected = 1 / (1 + pow(10, (r[b] - r[a]) / 400))
            let delta = options.k * (score - expected)
            r[a] += delta
            r[b] -= delta
        }
        return r
    }

    /// The paper's Elo: mean and 95% interval over `options.orderings` random orderings of all battles
    /// (ordering i shuffled by a generator seeded from (seed, i): the same result on any thread count).
    public static func run(_ battles: [Battle], options: EloOptions = EloOptions()) -> EloResult {
        var index: [String: Int] = [:]
        var names: [String] = []
        for b in battles {
            for m in [b.first, b.second] where index[m] == nil {
                index[m] = names.count
                names.append(m)
            }
        }
        let M = names.count
        let encoded = battles.map { (index[$0.first]!, index[$0.second]!, $0.firstScore) }
        let N = max(options.orderings, 1)
        var all = [Double](repeating: 0, count: N * M)
        all.withUnsafeMutableBufferPointer { out in
            let base = out.baseAddress!
            Parallel.forChunks(count: N, minimumChunk: 16) { _, range in
                var order = Array(0..<encoded.count)
                for i in range {
                    var rng = SeededGenerator(seed: options.seed &+ UInt64(i) &* 0x9E37_79B9_7F4A_7C15)
                    for j in 0..<order.count { order[j] = j }
                    shuffle(&order, &rng)
                    let r = ratings(encoded, order: order, models: M, options: options)
                    for m in 0..<M { base[i * M + m] = r[m] }
                }
            }
        }
        var wins = [Int](repeating: 0, count: M), losses = wins, ties = wins
        var points = [[Double]](repeating: [Double](repeating: 0, count: M), count: M)
        var meetings = [[Int]](repeating: [Int](repeating: 0, count: M), count: M)
        for (a, b, s) in encoded {
            if s == 1 { wins[a] += 1; losses[b] += 1 } else if s == 0 { wins[b] += 1; losses[a] += 1 } else { ties[a] += 1; ties[b] += 1 }
            points[a][b] += s
            points[b][a] += 1 - s
            meetings[a][b] += 1
            meetings[b][a] += 1
        }
        var rated: [(Int, EloResult.Rating)] = []
        for m in 0..<M {
            var column = (0..<N).map { all[$0 * M + m] }
            column.sort()
            let mean = column.reduce(0, +) / Double(N)
            rated.append((m, EloResult.Rating(model: names[m], mean: mean, lower: quantile(column, 0.025), upper: quantile(column, 0.975),
                                              wins: wins[m], losses: losses[m], ties: ties[m])))
        }
        rated.sort { $0.1.mean != $1.1.mean ? $0.1.mean > $1.1.mean : $0.1.model < $1.1.model }
        let order = rated.map(\.0)
        let winRate = order.map { i in order.map { j in meetings[i][j] > 0 ? points[i][j] / Double(meetings[i][j]) : nil } }
        let battleCounts = order.map { i in order.map { j in meetings[i][j] } }
        return EloResult(ratings: rated.map(\.1), models: order.map { names[$0] }, winRate: winRate, battles: battleCounts, options: options)
    }

    /// The q-quantile of sorted values, interpolating linearly between the two nearest (numpy's default).
    public static func quantile(_ sorted: [Double], _ q: Double) -> Double {
        guard !sorted.isEmpty else { return .nan }
        let position = q * Double(sorted.count - 1)
        let lo = Int(position.rounded(.down)), hi = min(lo + 1, sorted.count - 1)
        let f = position - Double(lo)
        return sorted[lo] + (sorted[hi] - sorted[lo]) * f
    }

    /// Fisher-Yates with an unbiased bounded draw (Lemire's multiply-shift with rejection).
    static func shuffle(_ a: inout [Int], _ rng: inout SeededGenerator) {
        guard a.count > 1 else { return }
        for i in stride(from: a.count - 1, to: 0, by: -1) {
            let j = bounded(UInt64(i + 1), &rng)
            a.swapAt(i, Int(j))
        }
    }

    static func bounded(_ n: UInt64, _ rng: inout SeededGenerator) -> UInt64 {
        var m = rng.next().multipliedFullWidth(by: n)
        if m.low < n {
            let threshold = (0 &- n) % n
            while m.low < threshold { m = rng.next().multipliedFullWidth(by: n) }
        }
        return m.high
    }
}
