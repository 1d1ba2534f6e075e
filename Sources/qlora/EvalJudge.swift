// `qlora eval judge`: the paper's pairwise tournament. Every pair of systems on every question both
// answered goes to a judge (an OpenAI-compatible chat endpoint, or a person at the terminal) and the
// three-way verdicts go to a judgments file that `qlora eval elo` turns into ratings.
import ArgumentParser
import Dispatch
import QLoRA

struct EvalJudge: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "judge",
        abstract: "Judge every pair of systems' answers, in both orders, through an OpenAI-compatible endpoint or by hand.",
        discussion: """
            --answers takes two or more answer files, each [NAME=]FILE: `qlora eval generate`'s output, the QLoRA \
            repository's generations ("generation" beside the question's "text"), FastChat's answers ("text" is the answer; \
            give --questions for the question text), or JSON lines with "answer", "output" or "response". A system is named \
            NAME, else by its lines' "model_id", else by its file name.

            Each match shows the judge a question and two answers as "Assistant 1" and "Assistant 2"; the judge explains and \
            ends with a line holding 1, 2 or 3 (a tie), as in the QLoRA paper. Every pair is judged in both orders (GPT-4 \
            favours whichever answer it reads first, the paper found; both orders cancel that). A reply whose last line \
            names no verdict is written with "winner": null and counted, and eval elo skips it.

            --judge URL is the endpoint's base ("http://127.0.0.1:8080/v1", as the openai clients take it, or a full \
            .../chat/completions URL). The API key comes from the environment variable --api-key-env names (default \
            OPENAI_API_KEY) and is never printed or written. Requests run --concurrency at a time, each with --timeout; \
            a refused connection, a timeout, 408, 429 and 5xx are retried --retries times with exponential backoff \
            (Retry-After honoured). A match still without an answer is not written, so running the same command again \
            judges only what is missing: judgments.jsonl is written line by line, each line synced, and read back to resume.

            --judge human shows each pair once, in random order, and reads 1, 2 or 3 (s skips, q stops) from standard input.
            """
    )

    @Option(name: .customLong("answers"), parsing: .upToNextOption, help: "Two or more answer files, each [NAME=]FILE.")
    var answers: [String]

    @Option(help: "The questions (JSON lines, any layout eval generate reads); needed when answer files do not carry them.", completion: .file())
    var questions: String?

    @Option(help: "The judge: an OpenAI-compatible endpoint's URL, or \"human\".")
    var judge: String

    @Option(help: "The \"model\" field of each judging request (for example gpt-4).")
    var judgeModel: String?

    @Option(help: "Judge prompts (JSON lines in the QLoRA / FastChat layout: prompt_template, system_prompt, defaults.prompt, category), for example ../shared/data/eval/judge_prompts/qlora_vicuna_prompt_threeclass.jsonl; default: built-in prompts in the same protocol.", completion: .file())
    var judgePrompts: String?

    @Option(help: "Where judgments go (JSON lines, appended; resumed when it exists).", completion: .file())
    var output = "judgments.jsonl"

    @Option(help: "The environment variable holding the API key (sent as a bearer token when set).")
    var apiKeyEnv = "OPENAI_API_KEY"

    @Option(help: "Requests in flight at once.")
    var concurrency = 4

    @Option(help: "Seconds to wait for one answer.")
    var timeout: Double = 120

    @Option(help: "Retries of a request that failed in a way that may pass.")
    var retries = 5

    @Option(help: "Seconds before the first retry; each later one waits twice as long (at most 60).")
    var backoff: Double = 1

    @Option(help: "The judge's sampling temperature (the paper's: 0.2).")
    var temperature: Double = 0.2

    @Option(help: "The most tokens the judge may write.")
    var maxTokens = 1024

    @Flag(help: "Judge each pair in one order only (the first system's answer shown first).")
    var singleOrder = false

    @Option(help: "Judge only the first N questions.")
    var limit: Int?

    @Option(help: "Seed of the order in which --judge human shows the answers.")
    var seed: UInt64 = 0

    @Flag(help: "Print one JSON summary object on stdout.")
    var json = false

    func validate() throws {
        guard answers.count >= 2 else { throw ValidationError("--answers needs two or more answer files") }
        guard concurrency >= 1 && concurrency <= 256 else { throw ValidationError("--concurrency must be from 1 to 256") }
        guard timeout > 0 else { throw ValidationError("--timeout must be positive") }
        guard retries >= 0 && backoff >= 0 else { throw ValidationError("--retries and --backoff cannot be negative") }
        guard maxTokens >= 1 else { throw ValidationError("--max-tokens must be positive") }
        if let limit, limit < 1 { throw ValidationError("--limit must be positive") }
    }

    /// A match ready to send: its question and the two answers in the order shown.
    struct Prepared: Sendable {
        let match: Match
        let questionID: JSONValue
        let category: String?
        let system: String
        let user: String
        let first: [String]
        let second: [String]
        let question: [String]
    }

    func run() throws {
        var systems: [SystemAnswers] = []
        for spec in answers {
            let (name, file) = Self.split(spec)
            systems.append(try SystemAnswers.parse(try FileSystem.readFile(file), file: file, name: name))
        }
        var questionTable: [String: BenchmarkQuestion] = [:]
        if let questions {
            for q in try BenchmarkQuestions.parse(try FileSystem.readFile(questions), file: questions) { questionTable[q.key] = q }
        }
        let prompts = try judgePrompts.map { try JudgePrompt.parse(try FileSystem.readFile($0), file: $0) } ?? JudgePrompt.builtIn
        let human = judge == "human"
        var matches = try Tournament.matches(systems, bothOrders: !singleOrder && !human)
        if let limit {
            var keys: [String] = []
            for m in matches where !keys.contains(m.questionKey) { keys.append(m.questionKey) }
            let kept = Set(keys.prefix(limit))
            matches = matches.filter { kept.contains($0.questionKey) }
        }
        guard !matches.isEmpty else { throw EvaluationError.empty(file: answers.joined(separator: ", "), what: "no question answered by two systems") }
        let byName = Dictionary(uniqueKeysWithValues: systems.map { ($0.name, $0) })

        // Resume: the matches the file already holds.
        let done = FileSystem.exists(output) ? try Tournament.judged(try FileSystem.readFile(output), file: output) : []
        var prepared: [Prepared] = []
        for m in matches where !done.contains(m.key) {
            // A person sees each pair once, in either order: judged in either order counts.
            if human && done.contains(Match(questionKey: m.questionKey, first: m.second, second: m.first).key) { continue }
            let a = byName[m.first]!.answer(m.questionKey)!, b = byName[m.second]!.answer(m.questionKey)!
            let q = questionTable[m.questionKey]
            guard let question = q?.turns ?? a.question ?? b.question else {
                throw EvaluationError.empty(file: byName[m.first]!.file, what: "no question text for question_id \(m.questionKey) in the answer files: give --questions")
            }
            let category = q?.category ?? a.category ?? b.category
            let p = JudgePrompt.choose(prompts, category: category)
            prepared.append(Prepared(match: m, questionID: a.questionID, category: category, system: p.system,
                                     user: p.render(question: question, first: a.turns, second: b.turns), first: a.turns, second: b.turns, question: question))
        }
        let names = systems.map(\.name).joined(separator: ", ")
        if prepared.isEmpty {
            Log.info("all \(matches.count) matches are already judged in \(output)")
        } else {
            if !done.isEmpty { Log.info("resuming: \(matches.count - prepared.count) of \(matches.count) matches already judged in \(output)") }
            Log.info("judging \(prepared.count) matches of \(systems.count) systems (\(names)) with \(human ? "a person" : judge)")
        }
        let writer = try LineAppender(path: output)
        if writer.droppedBytes > 0 { Log.info("\(output): removed a partial last line (\(writer.droppedBytes) bytes) left by an interrupted run") }
        let start = Clock.seconds()
        let tally = human ? try judgeByHand(prepared, writer: writer) : try judgeByEndpoint(prepared, writer: writer)
        let seconds = Clock.seconds() - start

        // The summary counts everything in the file for these systems, not only this run's matches.
        let all = try Tournament.summary(try FileSystem.readFile(output), file: output, systems: Set(systems.map(\.name)))
        if json {
            printJSON(.object([
                ("output", .string(output)), ("systems", .array(systems.map { .string($0.name) })), ("matches", .int(matches.count)),
                ("judged_now", .int(tally.judged)), ("no_verdict_now", .int(tally.noVerdict)), ("failed_now", .int(tally.failed.count)),
                ("already_judged", .int(matches.count - prepared.count)), ("stopped", .bool(tally.stopped)),
                ("verdicts", .int(all.verdicts)), ("no_verdict", .int(all.noVerdict)), ("ties", .int(all.ties)),
                ("first_shown_won", .int(all.firstShownWon)), ("second_shown_won", .int(all.secondShownWon)),
                ("seconds", .double(seconds)),
            ]))
        } else {
            print("\(output): \(all.verdicts + all.noVerdict) judgments of \(systems.count) systems; this run: \(tally.judged) judged, \(tally.noVerdict) without a verdict, \(tally.failed.count) failed, in \(formatFixed(seconds, 1)) s")
            let decided = all.firstShownWon + all.secondShownWon
            if decided > 0 {
                print("verdicts: \(all.verdicts) (\(all.ties) ties); the answer shown first won \(all.firstShownWon) of \(decided) decided (\(formatFixed(100 * Double(all.firstShownWon) / Double(decided), 1))%)")
            }
            if all.noVerdict > 0 { print("no verdict on the last line: \(all.noVerdict) (written with \"winner\": null; eval elo skips them)") }
            print("next: qlora eval elo --judgments \(output)")
        }
        if !tally.failed.isEmpty {
            throw JudgeIncomplete(message: "\(tally.failed.count) matches got no answer (the last: \(tally.failed.last!)); run the same command again to judge only those")
        }
    }

    static func split(_ spec: String) -> (String?, String) {
        if let eq = spec.firstIndex(of: "="), !FileSystem.exists(spec) {
            let name = String(spec[..<eq]), file = String(spec[spec.index(after: eq)...])
            if !name.isEmpty && !name.contains("/") { return (name, file) }
        }
        return (nil, spec)
    }

    struct Tally {
        var judged = 0
        var noVerdict = 0
        var failed: [String] = []
        var stopped = false
    }

    /// Writes judgment lines from many tasks, one at a time.
    actor Sink {
        let writer: LineAppender
        let bar: ProgressBar
        var tally = Tally()
        init(writer: LineAppender, bar: ProgressBar) {
            self.writer = writer
            self.bar = bar
        }
        func record(_ line: JSONValue, verdict: Verdict?) throws {
            try writer.append(JSON.serialize(line))
            if verdict == nil { tally.noVerdict += 1 } else { tally.judged += 1 }
            bar.advance()
        }
        func fail(_ reason: String) {
            tally.failed.append(reason)
            bar.advance()
        }
    }

    final class Box: @unchecked Sendable {
        var result: Result<Tally, Error> = .success(Tally())
    }

    func judgeByEndpoint(_ prepared: [Prepared], writer: LineAppender) throws -> Tally {
        guard !prepared.isEmpty else { return Tally() }
        let key = Environment.get(apiKeyEnv)
        let client = try OpenAIChatClient(base: judge, apiKey: key, timeoutSeconds: timeout, retries: retries, backoffSeconds: backoff, connections: concurrency)
        let sink = Sink(writer: writer, bar: ProgressBar("judge", total: prepared.count, enabled: !json))
        let judgeName = client.url, model = judgeModel, temperature = self.temperature, maxTokens = self.maxTokens, width = concurrency
        let box = Box()
        let semaphore = DispatchSemaphore(value: 0)
        Task {
            do {
                try await withThrowingTaskGroup(of: Void.self) { group in
                    var next = 0
                    func add() {
                        let p = prepared[next]
                        next += 1
                        group.addTask {
                            let request = ChatCompletionRequest(model: model, messages: [ChatMessage(role: "system", content: p.system), ChatMessage(role: "user", content: p.user)].filter { !$0.content.isEmpty },
                                                                temperature: temperature, maxTokens: maxTokens)
                            let t0 = Clock.seconds()
                            do {
                                let reply = try await client.complete(request)
                                let verdict = Verdict.parse(reply.content)
                                let line = Tournament.judgment(p.match, questionID: p.questionID, category: p.category, verdict: verdict, review: reply.content,
                                                               judge: judgeName, judgeModel: model, error: verdict == nil ? "no verdict (1, 2 or 3) on the review's last line" : nil,
                                                               seconds: Clock.seconds() - t0)
                                try await sink.record(line, verdict: verdict)
                            } catch let e as OpenAIError {
                                // Refused outright (400, 401, 404, a bad URL): every other request would be too.
                                if case .http = e, !e.isTransient { throw e }
                                if case .badURL = e { throw e }
                                await sink.fail("question \(p.match.questionKey), \(p.match.first) vs \(p.match.second): \(e)")
                            }
                        }
                    }
                    while next < min(width, prepared.count) { add() }
                    while try await group.next() != nil {
                        if next < prepared.count { add() }
                    }
                }
                box.result = .success(await sink.tally)
            } catch {
                box.result = .failure(error)
            }
            await client.shutdown()
            semaphore.signal()
        }
        semaphore.wait()
        return try box.result.get()
    }

    func judgeByHand(_ prepared: [Prepared], writer: LineAppender) throws -> Tally {
        var tally = Tally()
        var rng = SeededGenerator(seed: seed)
        for (i, p) in prepared.enumerated() {
            // Random order: the match as planned, or the two swapped.
            let swap = rng.next() & 1 == 1
            let match = swap ? Match(questionKey: p.match.questionKey, first: p.match.second, second: p.match.first) : p.match
            let (one, two) = swap ? (p.second, p.first) : (p.first, p.second)
            func show(_ turns: [String]) -> String {
                turns.count == 1 ? turns[0] : turns.enumerated().map { "[Turn \($0.offset + 1)] \($0.element)" }.joined(separator: "\n\n")
            }
            print("\n=== match \(i + 1) of \(prepared.count): question \(p.match.questionKey)\(p.category.map { " (\($0))" } ?? "")")
            print(show(p.question))
            print("\n--- Answer 1 ---\n\(show(one))\n\n--- Answer 2 ---\n\(show(two))\n")
            var verdict: Verdict?
            while true {
                print("Better: 1, 2, or 3 for a tie (s skips, q stops)> ", terminator: "")
                guard let line = readLine() else { print(); tally.stopped = true; return tally }
                let answer = line.trimmingWhitespace().lowercased()
                if answer == "q" { tally.stopped = true; return tally }
                if answer == "s" { break }
                if let v = Int(answer).flatMap(Verdict.init(rawValue:)) { verdict = v; break }
                print("type 1, 2, 3, s or q")
            }
            guard let verdict else { continue }
            try writer.append(JSON.serialize(Tournament.judgment(match, questionID: p.questionID, category: p.category, verdict: verdict, review: nil, judge: "human", judgeModel: nil)))
            tally.judged += 1
        }
        return tally
    }
}

struct JudgeIncomplete: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}
