// A model's answers to a chat benchmark (Vicuna, MT-bench, OpenAssistant or any JSON lines of prompts), as
// the QLoRA paper generated them for its tournaments: each question through the chat template, MT-bench's
// turns one after another (a question's next turn queued when its previous one ends), decoded in batches,
// one whole line per question appended to the answers file, which an interrupted run resumes from. The
// line is FastChat's answer layout plus the QLoRA repository's fields; BenchmarkQuestions.answered reads it.
import QLoRACore
import QLoRAGeneration
import QLoRAModel
import QLoRATokenizer

public struct AnswerRunOptions: Sendable {
    /// The system's name in the answers.
    public var modelID: String
    /// A system message before every question.
    public var system: String?
    /// Questions decoded together.
    public var batch = 1
    /// Sampling and limits; each question's seed is derived from `seed` and its id (`AnswerRun.seed`).
    public var generation = GenerationOptions()
    public var seed: UInt64 = 0

    public init(modelID: String) { self.modelID = modelID }
}

public struct AnswerRunResult: Sendable {
    public var written = 0
    public var generatedTokens = 0
    /// Stopped by `shouldStop`: the questions in flight are not written.
    public var interrupted = false
    public var seconds = 0.0
    public var largestBatch = 0
}

public enum AnswerRun {
    /// The questions of `questions` that `output` does not answer yet (all of them when it does not exist);
    /// throws when it holds another system's answers.
    public static func pending(_ questions: [BenchmarkQuestion], output: String, modelID: String) throws -> [BenchmarkQuestion] {
        var done = Set<String>()
        if FileSystem.exists(output) {
            for (key, model) in try BenchmarkQuestions.answered(try FileSystem.readFile(output), file: output) {
                if let model, model != modelID {
                    throw EvaluationError.empty(file: output, what: "holds answers of \"\(model)\", not \"\(modelID)\": give another --output (or --model-id \(model) to continue that run)")
                }
                done.insert(key)
            }
        }
        return questions.filter { !done.contains($0.key) }
    }

    /// Each question's sampling seed: the run's seed mixed with the question's id and the turn, so that an
    /// answer does not depend on which others run beside it.
    public static func seed(_ base: UInt64, key: String, turn: Int) -> UInt64 {
        var h: UInt64 = 0xCBF2_9CE4_8422_2325  // FNV-1a of the id's JSON text
        for b in key.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01B3 }
        var g = SeededGenerator(seed: base ^ h ^ (UInt64(turn) &* 0x9E37_79B9_7F4A_7C15))
        return g.next()
    }

    /// Answers `pending` (from `pending(_:output:modelID:)`), appending to `writer` (the answers file).
    /// `progress(key)` runs as each turn ends; `shouldStop` is checked every decoding step.
    public static func run(_ pending: [BenchmarkQuestion], model: LlamaModel, tokenizer: Tokenizer, template: ChatTemplate, writer: LineAppender,
                           options: AnswerRunOptions, shouldStop: () -> Bool = { false }, progress: (String) -> Void = { _ in }) throws -> AnswerRunResult {
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
        let base = options.generation
        func messages(_ s: State) -> [JSONValue] {
            var m: [JSONValue] = []
            if let system = options.system { m.append(ChatTemplate.message("system", system)) }
            for t in s.question.context { m.append(ChatTemplate.message(t.role, t.content)) }
            for (i, turn) in s.question.turns.prefix(s.answers.count + 1).enumerated() {
                m.append(ChatTemplate.message("user", turn))
                if i < s.answers.count { m.append(ChatTemplate.message("assistant", s.answers[i])) }
            }
            return m
        }
        var result = AnswerRunResult()
        let start = Clock.seconds()
        let generator = BatchGenerator(model: model, tokenizer: tokenizer, maxBatch: options.batch)
        try generator.run(next: {
            guard let i = queue.popLast() else { return nil }
            let s = states[i]
            s.prompt = try template.render(messages: messages(s), addGenerationPrompt: true, specialTokens: tokenizer.templateSpecialTokens)
            var generation = base
            generation.sampling.seed = seed(options.seed, key: s.question.key, turn: s.answers.count)
            return (i, GenerationRequest(prompt: tokenizer.encode(s.prompt), options: generation))
        }, finished: { i, reply in
            let s = states[i]
            if reply.finishReason == "interrupted" { result.interrupted = true; return }
            s.answers.append(reply.text)
            s.reasons.append(reply.finishReason)
            s.tokens.append(reply.tokenIDs.count)
            result.generatedTokens += reply.tokenIDs.count
            progress(s.question.key)
            if s.answers.count < s.question.turns.count { queue.append(i); return }
            try writer.append(JSON.serialize(answerLine(s.question, answers: s.answers, reasons: s.reasons, tokens: s.tokens, prompt: s.prompt,
                                                        options: options)))
            result.written += 1
        }, shouldStop: shouldStop)
        result.seconds = Clock.seconds() - start
        result.largestBatch = generator.largestBatch
        return result
    }

    /// One question's line in the answers file.
    static func answerLine(_ q: BenchmarkQuestion, answers: [String], reasons: [String], tokens: [Int], prompt: String,
                           options: AnswerRunOptions) -> JSONValue {
        let g = options.generation
        var fields: [(String, JSONValue)] = [("question_id", q.id)]
        if let c = q.category { fields.append(("category", .string(c))) }
        fields += [
            ("model_id", .string(options.modelID)),
            ("text", .string(q.turns[0])),
            ("turns", .array(q.turns.map { .string($0) })),
            ("choices", .array([.object([("index", .int(0)), ("turns", .array(answers.map { .string($0) }))])])),
            ("generation", .string(answers.last!)),
            ("prompt", .string(prompt)),
            ("finish_reasons", .array(reasons.map { .string($0) })),
            ("generated_tokens", .array(tokens.map { .int($0) })),
            ("sampling", .object([("temperature", .double(Double(g.sampling.temperature))), ("top_p", .double(Double(g.sampling.topP))),
                                  ("top_k", .int(g.sampling.topK)), ("seed", .number(String(options.seed))), ("max_tokens", .int(g.maxTokens))])),
            ("tstamp", .double(Clock.wallSeconds())),
        ]
        return .object(fields)
    }
}
