import ArgumentParser
import QLoRA

struct Chat: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Talk with a model in the terminal (multi-turn, through its chat template).",
        discussion: "Type a message and press Enter. /reset starts a new conversation, /exit (or Ctrl-D) quits. Ctrl-C stops the reply being written, not the program. The conversation stays in the KV cache, so each turn only processes its new tokens."
    )

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var inference: InferenceOptions
    @OptionGroup var sampling: SamplingFlags

    @Option(help: "A system message for every conversation.")
    var system: String?

    @Option(help: "Context length in tokens (default: the model's, at most 4096).")
    var contextLength: Int?

    func run() throws {
        let (model, tokenizer) = try modelOptions.load(progress: true)
        inference.apply(to: model)
        guard let source = tokenizer.chatTemplate else { throw ValidationError("this model has no chat template") }
        let template = try ChatTemplate(source)
        let generator = Generator(model: model, tokenizer: tokenizer, contextLength: contextLength ?? min(model.config.maxPositions, 4096))
        Interrupt.install()
        var messages: [JSONValue] = system.map { [ChatTemplate.message("system", $0)] } ?? []
        var cached: [Int] = []  // tokens whose keys and values are in the cache
        Log.info("Chat with \(FileSystem.baseName(model.source)). /reset for a new conversation, /exit or Ctrl-D to quit.")
        while true {
            Log.write("> ")
            guard let line = readLine() else {
                if Interrupt.requested { Interrupt.requested = false; Log.info("(Ctrl-D or /exit quits)"); continue }
                Log.info("")
                return
            }
            let input = line.trimmingCharacters(in: .whitespaces)
            if input.isEmpty { continue }
            if input == "/exit" || input == "/quit" { return }
            if input == "/reset" {
                messages = system.map { [ChatTemplate.message("system", $0)] } ?? []
                generator.cache.reset()
                cached = []
                Log.info("(new conversation)")
                continue
            }
            messages.append(ChatTemplate.message("user", input))
            let ids = tokenizer.encode(try template.render(messages: messages, addGenerationPrompt: true, specialTokens: tokenizer.templateSpecialTokens))
            // Reuse the cached prefix; process only what is new.
            var common = 0
            while common < min(ids.count, cached.count) && ids[common] == cached[common] { common += 1 }
            generator.cache.truncate(to: common)
            if ids.count + sampling.maxTokens > generator.cache.capacity {
                Log.info("(the conversation is longer than the context of \(generator.cache.capacity) tokens; starting a new one)")
                messages = (system.map { [ChatTemplate.message("system", $0)] } ?? []) + [ChatTemplate.message("user", input)]
                generator.cache.reset()
                cached = []
                continue
            }
            Interrupt.requested = false
            let result = try generator.generate(prompt: Array(ids[common...]), options: sampling.generationOptions) { piece in
                print(piece, terminator: "")
                fflush(stdout)
                return !Interrupt.requested
            }
            print("")
            if result.finishReason == "interrupted" { Log.info("(stopped)") }
            Interrupt.requested = false
            messages.append(ChatTemplate.message("assistant", result.text))
            cached = Array(ids) + result.tokenIDs
            // The cache holds the prompt and every generated token but the last (never fed back).
            cached = Array(cached.prefix(generator.cache.length))
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif
import Foundation
