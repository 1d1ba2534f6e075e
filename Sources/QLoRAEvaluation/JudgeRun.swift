// A pairwise tournament judged, as the QLoRA paper judged its chatbots: the matches planned from the answer
// files (every pair on every question, in both orders unless asked otherwise), those the judgments file
// already holds left out (resume), and the rest judged by a model behind any chat endpoint (`review`, many
// at a time) or by a person (`ask`), one whole line per match appended to the judgments file.
import QLoRACore

/// A match ready for its judge: the question, both answers, and the judge prompt rendered.
public struct PreparedMatch: Sendable {
    public let match: Match
    public let questionID: JSONValue
    public let category: String?
    /// The judge prompt's system message and user message.
    public let system: String
    public let user: String
    public let question: [String]
    public let first: [String]
    public let second: [String]
}

public struct JudgeTally: Sendable {
    public var judged = 0
    /// Judged, but the review ended without a verdict (written with "winner": null).
    public var noVerdict = 0
    /// Matches that got no answer from the judge (not written: the next run judges them).
    public var failed: [String] = []
    /// A person stopped the run.
    public var stopped = false

    public init() {}
}

/// What a person answers for one match.
public enum HumanJudgment: Sendable {
    case verdict(Verdict)
    case skip
    case stop
}

public enum JudgeRun {
    /// The tournament's matches (the first `limit` questions only, when given) and those still to judge:
    /// not in `judged` (the judgments file's `Tournament.judged`); a person (`human`) sees each pair once, so
    /// a pair judged in either order counts.
    public static func plan(_ systems: [SystemAnswers], questions: [String: BenchmarkQuestion], prompts: [JudgePrompt], bothOrders: Bool,
                            limit: Int?, judged done: Set<String>, human: Bool) throws -> (matches: [Match], pending: [PreparedMatch]) {
        var matches = try Tournament.matches(systems, bothOrders: bothOrders && !human)
        if let limit {
            var keys: [String] = []
            for m in matches where !keys.contains(m.questionKey) { keys.append(m.questionKey) }
            let kept = Set(keys.prefix(limit))
            matches = matches.filter { kept.contains($0.questionKey) }
        }
        guard !matches.isEmpty else {
            throw EvaluationError.empty(file: systems.map(\.file).joined(separator: ", "), what: "no question answered by two systems")
        }
        let byName = Dictionary(uniqueKeysWithValues: systems.map { ($0.name, $0) })
        var pending: [PreparedMatch] = []
        for m in matches where !done.contains(m.key) {
            if human && done.contains(Match(questionKey: m.questionKey, first: m.second, second: m.first).key) { continue }
            let a = byName[m.first]!.answer(m.questionKey)!, b = byName[m.second]!.answer(m.questionKey)!
            let q = questions[m.questionKey]
            guard let question = q?.turns ?? a.question ?? b.question else {
                throw EvaluationError.empty(file: byName[m.first]!.file, what: "no question text for question_id \(m.questionKey) in the answer files: give --questions")
            }
            let category = q?.category ?? a.category ?? b.category
            let p = JudgePrompt.choose(prompts, category: category)
            pending.append(PreparedMatch(match: m, questionID: a.questionID, category: category, system: p.system,
                                         user: p.render(question: question, first: a.turns, second: b.turns), question: question,
                                         first: a.turns, second: b.turns))
        }
        return (matches, pending)
    }

    /// Appends judgment lines from many tasks, one at a time.
    actor Sink {
        let writer: LineAppender
        let progress: @Sendable () -> Void
        var tally = JudgeTally()
        init(writer: LineAppender, progress: @escaping @Sendable () -> Void) {
            self.writer = writer
            self.progress = progress
        }
        func record(_ line: JSONValue, verdict: Verdict?) throws {
            try writer.append(JSON.serialize(line))
            if verdict == nil { tally.noVerdict += 1 } else { tally.judged += 1 }
            progress()
        }
        func fail(_ reason: String) {
            tally.failed.append(reason)
            progress()
        }
    }

    /// Judges `pending` by a model, `concurrency` matches in flight: `review(system, user)` returns the judge's
    /// review, whose last line holds the verdict. An error for which `isFatal` holds (a refused request, which
    /// every other would get too) ends the run and is thrown; any other is counted in `failed`.
    public static func judge(_ pending: [PreparedMatch], judge: String, judgeModel: String?, concurrency: Int, writer: LineAppender,
                             review: @escaping @Sendable (_ system: String, _ user: String) async throws -> String,
                             isFatal: @escaping @Sendable (Error) -> Bool, progress: @escaping @Sendable () -> Void = {}) async throws -> JudgeTally {
        guard !pending.isEmpty else { return JudgeTally() }
        let sink = Sink(writer: writer, progress: progress)
        try await withThrowingTaskGroup(of: Void.self) { group in
            var next = 0
            func add() {
                let p = pending[next]
                next += 1
                group.addTask {
                    let t0 = Clock.seconds()
                    do {
                        let text = try await review(p.system, p.user)
                        let verdict = Verdict.parse(text)
                        let line = Tournament.judgment(p.match, questionID: p.questionID, category: p.category, verdict: verdict, review: text,
                                                       judge: judge, judgeModel: judgeModel,
                                                       error: verdict == nil ? "no verdict (1, 2 or 3) on the review's last line" : nil,
                                                       seconds: Clock.seconds() - t0)
                        try await sink.record(line, verdict: verdict)
                    } catch {
                        if isFatal(error) { throw error }
                        await sink.fail("question \(p.match.questionKey), \(p.match.first) vs \(p.match.second): \(error)")
                    }
                }
            }
            while next < min(max(concurrency, 1), pending.count) { add() }
            while try await group.next() != nil {
                if next < pending.count { add() }
            }
        }
        return await sink.tally
    }

    /// Judges `pending` by a person: each match shown in a random order (seeded), `ask(i, match, first, second)`
    /// shows match i (of pending.count) with the answers in that order and returns the person's judgment.
    public static func judgeByHand(_ pending: [PreparedMatch], seed: UInt64, writer: LineAppender,
                                   ask: (_ index: Int, _ match: PreparedMatch, _ first: [String], _ second: [String]) -> HumanJudgment) throws -> JudgeTally {
        var tally = JudgeTally()
        var rng = SeededGenerator(seed: seed)
        for (i, p) in pending.enumerated() {
            // Random order: the match as planned, or the two swapped.
            let swap = rng.next() & 1 == 1
            let match = swap ? Match(questionKey: p.match.questionKey, first: p.match.second, second: p.match.first) : p.match
            let (one, two) = swap ? (p.second, p.first) : (p.first, p.second)
            switch ask(i, p, one, two) {
            case .stop:
                tally.stopped = true
                return tally
            case .skip:
                continue
            case let .verdict(verdict):
                try writer.append(JSON.serialize(Tournament.judgment(match, questionID: p.questionID, category: p.category, verdict: verdict,
                                                                     review: nil, judge: "human", judgeModel: nil)))
                tally.judged += 1
            }
        }
        return tally
    }
}
