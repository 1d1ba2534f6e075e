// `qlora eval judge`: the paper's pairwise tournament. Every pair of systems on every question both
// answered goes to a judge (an OpenAI-compatible chat endpoint, or a person at the terminal) and the
// three-way verdicts go to a judgments file that `qlora eval elo` turns into ratings.
import ArgumentParser
import QLoRA
import QLoRAOpenAI

struct EvalJudge: AsyncParsableCommand {
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

    func run() async throws {
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
        // Resume: the matches the file already holds.
        let done = FileSystem.exists(output) ? try Tournament.judged(try FileSystem.readFile(output), file: output) : []
        let (matches, prepared) = try JudgeRun.plan(systems, questions: questionTable, prompts: prompts, bothOrders: !singleOrder, limit: limit,
                                                    judged: done, human: human)
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
        let tally: JudgeTally
        if human {
            tally = try JudgeRun.judgeByHand(prepared, seed: seed, writer: writer) { Self.ask($0, $1, $2, $3, of: prepared.count) }
        } else {
            tally = try await judgeByEndpoint(prepared, writer: writer)
        }
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

    func judgeByEndpoint(_ prepared: [PreparedMatch], writer: LineAppender) async throws -> JudgeTally {
        guard !prepared.isEmpty else { return JudgeTally() }
        let client = try OpenAIChatClient(base: judge, apiKey: Environment.get(apiKeyEnv), timeoutSeconds: timeout, retries: retries, backoffSeconds: backoff,
                                          connections: concurrency)
        let bar = ProgressBar("judge", total: prepared.count, enabled: !json)
        let model = judgeModel, temperature = self.temperature, maxTokens = self.maxTokens
        do {
            let tally = try await JudgeRun.judge(prepared, judge: client.url, judgeModel: model, concurrency: concurrency, writer: writer, review: { system, user in
                let request = ChatCompletionRequest(model: model, messages: [ChatMessage(role: "system", content: system), ChatMessage(role: "user", content: user)]
                    .filter { !$0.content.isEmpty }, temperature: temperature, maxTokens: maxTokens)
                return try await client.complete(request).content
            }, isFatal: { error in
                // Refused outright (400, 401, 404, a bad URL): every other request would be too.
                guard let e = error as? OpenAIError else { return true }
                if case .http = e, !e.isTransient { return true }
                if case .badURL = e { return true }
                return false
            }, progress: { bar.advance() })
            await client.shutdown()
            return tally
        } catch {
            await client.shutdown()
            throw error
        }
    }

    /// Shows a match at the terminal in the order given and reads the person's verdict.
    static func ask(_ i: Int, _ p: PreparedMatch, _ one: [String], _ two: [String], of count: Int) -> HumanJudgment {
        func show(_ turns: [String]) -> String {
            turns.count == 1 ? turns[0] : turns.enumerated().map { "[Turn \($0.offset + 1)] \($0.element)" }.joined(separator: "\n\n")
        }
        print("\n=== match \(i + 1) of \(count): question \(p.match.questionKey)\(p.category.map { " (\($0))" } ?? "")")
        print(show(p.question))
        print("\n--- Answer 1 ---\n\(show(one))\n\n--- Answer 2 ---\n\(show(two))\n")
        while true {
            print("Better: 1, 2, or 3 for a tie (s skips, q stops)> ", terminator: "")
            guard let line = readLine() else { print(); return .stop }
            let answer = line.trimmingWhitespace().lowercased()
            if answer == "q" { return .stop }
            if answer == "s" { return .skip }
            if let v = Int(answer).flatMap(Verdict.init(rawValue:)) { return .verdict(v) }
            print("type 1, 2, 3, s or q")
        }
    }
}

struct JudgeIncomplete: Error, CustomStringConvertible {
    let message: String
    var description: String { message }
}
