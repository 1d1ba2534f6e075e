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
        let session = ChatSession(generator: generator, template: template, system: system)
        Interrupt.install()
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
                session.reset()
                Log.info("(new conversation)")
                continue
            }
            Interrupt.requested = false
            let turn: ChatSession.Turn
            do {
                turn = try session.send(input, options: sampling.generationOptions) { piece in
                    print(piece, terminator: "")
                    fflush(stdout)
                    return !Interrupt.requested
                }
            } catch let e as ChatError {
                Log.info("(\(e))")
                continue
            }
            print("")
            if turn.restarted { Log.info("(the conversation outgrew the context of \(generator.cache.capacity) tokens; this reply started a new one)") }
            if turn.result.finishReason == "interrupted" { Log.info("(stopped)") }
            Interrupt.requested = false
        }
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Foundation
