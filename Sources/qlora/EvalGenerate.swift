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

    func run() throws {
        let questions = Array(try BenchmarkQuestions.parse(try FileSystem.readFile(prompts), file: prompts).prefix(limit ?? .max))
        guard !questions.isEmpty else { throw EvaluationError.empty(file: prompts, what: "no questions") }
        var options = AnswerRunOptions(modelID: modelID ?? FileSystem.baseName(modelOptions.adapter ?? modelOptions.modelPath))
        options.system = system
        options.batch = batch
        options.generation = sampling.generationOptions
        options.seed = sampling.seed
        // Resume: the questions already answered, by this model only.
        let pending: [BenchmarkQuestion]
        do { pending = try AnswerRun.pending(questions, output: output, modelID: options.modelID) } catch let e as EvaluationError {
            throw ValidationError(e.description)
        }
        let done = questions.count - pending.count
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
        if done > 0 { Log.info("resuming: \(done) questions already answered in \(output), \(pending.count) to go") }
        let bar = ProgressBar("generate", total: pending.reduce(0) { $0 + $1.turns.count }, enabled: !json)
        Interrupt.install()
        let result = try AnswerRun.run(pending, model: model, tokenizer: tokenizer, template: template, writer: writer, options: options,
                                       shouldStop: { Interrupt.requested }, progress: { bar.advance(note: "question \($0)") })
        if json {
            printJSON(.object([("output", .string(output)), ("model_id", .string(options.modelID)), ("answered", .int(result.written)),
                               ("skipped", .int(done)), ("interrupted", .bool(result.interrupted)), ("generated_tokens", .int(result.generatedTokens)),
                               ("seconds", .double(result.seconds)), ("batch", .int(batch)), ("largest_batch", .int(result.largestBatch))]))
        }
        let rate = result.seconds > 0 ? Double(result.generatedTokens) / result.seconds : 0
        Log.info("\(result.written) answers written to \(output) (\(result.generatedTokens) tokens in \(formatFixed(result.seconds, 1)) s, \(formatFixed(rate, 1)) tokens/s, batch \(batch))"
            + (result.interrupted ? "; stopped: run the same command again to answer the other \(pending.count - result.written)" : ""))
    }
}
