// `qlora eval generate`: a model's answers to a chat benchmark (Vicuna, MT-bench, OpenAssistant or any
// JSON lines of prompts), as the QLoRA paper generated them for its tournaments.
import ArgumentParser
import QLoRA

struct EvalGenerate: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "generate",
        abstract: "Answer a benchmark's questions with the model (and adapter), one JSON line per question.",
        discussion: """
            --prompts takes JSON lines in the Vicuna layout ({"question_id", "text", "category"}), MT-bench's \
            ({"question_id", "category", "turns": [...]}: each turn answered after the earlier ones and their replies), the \
            OpenAssistant layout ({"input": "### Human: ... ### Assistant:"}: the conversation is kept, its last human turn \
            answered), or any JSON lines with "prompt", "instruction", "question" or "text". Each question goes through the \
            model's chat template. Sampling is the paper's by default (top-p 0.9, temperature 0.7); each question's seed is \
            derived from --seed and its id, so an answer does not depend on which others run beside it.

            The output gets one line per question once all its turns are answered: FastChat's answer layout \
            ("question_id", "model_id", "choices": [{"index": 0, "turns": [...]}]) plus the QLoRA repository's "text" and \
            "generation" fields. Each line is written whole and synced before the next, so an interrupted run (Ctrl-C, a \
            crash) loses at most the questions in flight: run the same command again and the questions already in the \
            output are skipped. --batch decodes that many questions together (each weight read once per step for all).
            """
    )

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var inference: InferenceOptions
    @OptionGroup var sampling: SamplingFlags

    @Option(help: "The questions (JSON lines).", completion: .file())
    var prompts: String

    @Option(help: "The answers file (JSON lines; appended to, and resumed from, when it exists).", completion: .file())
    var output: String

    @Option(help: "Questions decoded together.")
    var batch: Int = 1

    @Option(help: "A system message before every question.")
    var system: String?

    @Option(help: "The name of the system in the answers (default: the adapter's folder name, else the model's file or folder name).")
    var modelID: String?

    @Option(help: "Answer only the first N questions of the file.")
    var limit: Int?

    @Flag(help: "Print one JSON summary object on stdout.")
    var json = false

    func validate() throws {
        guard batch >= 1 && batch <= Linear.batchedRowLimit else { throw ValidationError("--batch must be from 1 to \(Linear.batchedRowLimit)") }
        if let limit, limit < 1 { throw ValidationError("--limit must be positive") }
    }

    /// Each question's sampling seed: --seed mixed with the question's id and the turn.
    static func seed(_ base: UInt64, key: String, turn: Int) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325  // FNV-1a of the id's JSON text
        for b in key.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01B3 }
        var g = SeededGenerator(seed: base ^ h ^ (UInt64(turn) &* 0x9E37_79B9_7F4A_7C15))
        return g.next()
    }

    func run() throws {
        let questions = Array(try BenchmarkQuestions.parse(try FileSystem.readFile(prompts), file: prompts).prefix(limit ?? .max))
        guard !questions.isEmpty else { throw EvaluationError.empty(file: prompts, what: "no questions") }
        let id = modelID ?? FileSystem.baseName(modelOptions.adapter ?? modelOptions.modelPath)
        // Resume: the questions already answered, by this model only.
        var done = Set<String>()
        if FileSystem.exists(output) {
            for (key, model) in try BenchmarkQuestions.answered(try FileSystem.readFile(output), file: output) {
                if let model, model != id {
                    throw ValidationError("\(output) holds answers of \"\(model)\", not \"\(id)\": give another --output (or --model-id \(model) to continue that run)")
                }
                done.insert(key)
            }
        }
        let pending = questions.filter { !done.contains($0.key) }
        if pending.isEmpty {
            Log.info("all \(questions.count) questions are already answered in \(output)")
            if json { printJSON(.object([("output", .string(output)), ("answered", .int(0)), ("skipped", .int(questions.count))])) }
            return
        }
        let (model, tokenizer) = try modelOptions.load(progress: !json)
        inference.apply(to: model)
        guard let source = tokenizer.chatTemplate else {
            throw ValidationError("this model has no chat template (tokenizer_config.json, chat_template.jinja or GGUF metadata), which eval generate formats the questions with")
        }
        let template = try ChatTemplate(source)
        let writer = try LineAppender(path: output)
        if writer.droppedBytes > 0 { Log.info("\(output): removed a partial last line (\(writer.droppedBytes) bytes) left by an interrupted run") }
        if !done.isEmpty { Log.info("resuming: \(done.count) questions already answered in \(output), \(pending.count) to go") }

        // One state per pending question; a question's next turn is queued when its previous one ends.
        final class State {
            let question: BenchmarkQuestion
            var answers: [String] = []
            var reasons: [String] = []
            var tokens: [Int] = []
            var prompt = ""
            init(_ q: BenchmarkQuestion) { question = q }
        }
        let states = pending.map(State.init)
        var queue = Array(states.indices.reversed())  // a stack: popLast takes the next; a follow-up turn goes on top
        let base = sampling.generationOptions
        func messages(_ s: State) -> [JSONValue] {
            var m: [JSONValue] = []
            if let system { m.append(ChatTemplate.message("system", system)) }
            for t in s.question.context { m.append(ChatTemplate.message(t.role, t.content)) }
            for (i, turn) in s.question.turns.prefix(s.answers.count + 1).enumerated() {
                m.append(ChatTemplate.message("user", turn))
                if i < s.answers.count { m.append(ChatTemplate.message("assistant", s.answers[i])) }
            }
            return m
        }
        let totalTurns = states.reduce(0) { $0 + $1.question.turns.count }
        let bar = ProgressBar("generate", total: totalTurns, enabled: !json)
        var written = 0, generatedTokens = 0, interrupted = false
        let start = Clock.seconds()
        Interrupt.install()
        let generator = BatchGenerator(model: model, tokenizer: tokenizer, maxBatch: batch)
        try generator.run(next: {
            guard let i = queue.popLast() else { return nil }
            let s = states[i]
            s.prompt = try template.render(messages: messages(s), addGenerationPrompt: true, specialTokens: tokenizer.templateSpecialTokens)
            var options = base
            options.sampling.seed = Self.seed(sampling.seed, key: s.question.key, turn: s.answers.count)
            return (i, GenerationRequest(prompt: tokenizer.encode(s.prompt), options: options))
        }, finished: { i, result in
            let s = states[i]
            if result.finishReason == "interrupted" { interrupted = true; return }
            s.answers.append(result.text)
            s.reasons.append(result.finishReason)
            s.tokens.append(result.tokenIDs.count)
            generatedTokens += result.tokenIDs.count
            bar.advance(note: "question \(s.question.key)")
            if s.answers.count < s.question.turns.count { queue.append(i); return }
            var fields: [(String, JSONValue)] = [("question_id", s.question.id)]
            if let c = s.question.category { fields.append(("category", .string(c))) }
            fields += [
                ("model_id", .string(id)),
                ("text", .string(s.question.turns[0])),
                ("turns", .array(s.question.turns.map { .string($0) })),
                ("choices", .array([.object([("index", .int(0)), ("turns", .array(s.answers.map { .string($0) }))])])),
                ("generation", .string(s.answers.last!)),
                ("prompt", .string(s.prompt)),
                ("finish_reasons", .array(s.reasons.map { .string($0) })),
                ("generated_tokens", .array(s.tokens.map { .int($0) })),
                ("sampling", .object([("temperature", .double(Double(base.sampling.temperature))), ("top_p", .double(Double(base.sampling.topP))),
                                      ("top_k", .int(base.sampling.topK)), ("seed", .number(String(sampling.seed))),
                                      ("max_tokens", .int(base.maxTokens))])),
                ("tstamp", .double(Clock.wallSeconds())),
            ]
            try writer.append(JSON.serialize(.object(fields)))
            written += 1
        }, shouldStop: { Interrupt.requested })
        let seconds = Clock.seconds() - start
        if json {
            printJSON(.object([("output", .string(output)), ("model_id", .string(id)), ("answered", .int(written)), ("skipped", .int(done.count)),
                               ("interrupted", .bool(interrupted)), ("generated_tokens", .int(generatedTokens)), ("seconds", .double(seconds)),
                               ("batch", .int(batch)), ("largest_batch", .int(generator.largestBatch))]))
        }
        let rate = seconds > 0 ? Double(generatedTokens) / seconds : 0
        Log.info("\(written) answers written to \(output) (\(generatedTokens) tokens in \(formatFixed(seconds, 1)) s, \(formatFixed(rate, 1)) tokens/s, batch \(batch))"
            + (interrupted ? "; stopped: run the same command again to answer the other \(states.count - written)" : ""))
    }
}
