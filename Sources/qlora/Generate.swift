import ArgumentParser
import QLoRA

struct Generate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Generate text from a prompt, streaming tokens to stdout.",
        discussion: "With --chat the prompt (and --system) go through the model's chat template, as a user turn; without it the prompt is continued as raw text. Statistics go to stderr."
    )

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var inference: InferenceOptions
    @OptionGroup var sampling: SamplingFlags

    @Option(name: .shortAndLong, help: "The prompt (read from standard input when omitted).")
    var prompt: String?

    @Option(help: "A system message (with --chat).")
    var system: String?

    @Flag(help: "Format the prompt with the model's chat template.")
    var chat = false

    @Flag(help: "Print one JSON object with the reply and statistics instead of streaming.")
    var json = false

    func run() throws {
        let (model, tokenizer) = try modelOptions.load(progress: !json)
        inference.apply(to: model)
        let text = prompt ?? readAllStandardInput()
        let ids: [Int]
        if chat {
            guard let source = tokenizer.chatTemplate else {
                throw ValidationError("this model has no chat template (tokenizer_config.json, chat_template.jinja or GGUF metadata); drop --chat")
            }
            var messages: [JSONValue] = []
            if let system { messages.append(ChatTemplate.message("system", system)) }
            messages.append(ChatTemplate.message("user", text))
            let rendered = try ChatTemplate(source).render(messages: messages, addGenerationPrompt: true, specialTokens: tokenizer.templateSpecialTokens)
            ids = tokenizer.encode(rendered)
        } else {
            ids = tokenizer.encode(text, addSpecialTokens: true)
        }
        let generator = Generator(model: model, tokenizer: tokenizer, contextLength: min(model.config.maxPositions, ids.count + sampling.maxTokens + 1))
        Interrupt.install()
        let result = try generator.generate(prompt: ids, options: sampling.generationOptions) { piece in
            if !json {
                print(piece, terminator: "")
                fflush(stdout)
            }
            return !Interrupt.requested
        }
        if json {
            printJSON(.object([
                ("text", .string(result.text)), ("prompt_tokens", .int(result.promptTokens)),
                ("generated_tokens", .int(result.tokenIDs.count)), ("finish_reason", .string(result.finishReason)),
                ("prefill_seconds", .double(result.prefillSeconds)), ("tokens_per_second", .double(result.tokensPerSecond)),
                // What ran: the cache the generator made and the products' precision (bf16 only where the CPU has the kernels).
                ("kv_cache", .string(generator.cache.dtype.rawValue)),
                ("compute_dtype", .string(model.computeDType == .bf16 && BF16Gemm.isSupported ? "bf16" : "f32")),
            ]))
            return
        }
        print("")
        Log.info("[\(result.promptTokens) prompt tokens in \(formatFixed(result.prefillSeconds, 2)) s, \(result.tokenIDs.count) generated at \(formatFixed(result.tokensPerSecond, 1)) tokens/s, stop: \(result.finishReason)]")
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
