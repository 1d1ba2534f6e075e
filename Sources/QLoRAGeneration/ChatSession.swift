// A conversation with a model through its chat template. The conversation's tokens stay in the
// generator's KV cache between turns: each turn renders the whole conversation, keeps the cached prefix
// it shares with what the cache holds, and runs only the tokens after it.
import QLoRACore
import QLoRAModel
import QLoRATokenizer

public enum ChatError: Error, CustomStringConvertible, Equatable {
    /// The message alone (with the system message and the reply's room) does not fit the context.
    case messageTooLong(tokens: Int, context: Int)

    public var description: String {
        switch self {
        case let .messageTooLong(tokens, context):
            return "the message needs \(tokens) tokens with room for the reply; the context holds \(context)"
        }
    }
}

public final class ChatSession {
    public let generator: Generator
    public let template: ChatTemplate
    /// The system message every conversation starts with, if any.
    public let system: String?
    /// The conversation so far (role and content objects, as the template takes them).
    public private(set) var messages: [JSONValue] = []
    /// Tokens whose keys and values are in the cache, from position 0.
    private var cached: [Int] = []

    public init(generator: Generator, template: ChatTemplate, system: String? = nil) {
        self.generator = generator
        self.template = template
        self.system = system
        reset()
    }

    /// Starts a new conversation.
    public func reset() {
        messages = system.map { [ChatTemplate.message("system", $0)] } ?? []
        generator.cache.reset()
        cached = []
    }

    /// What `send` did.
    public struct Turn: Sendable {
        public let result: GenerationResult
        /// The conversation no longer fit the context: it was restarted with this message alone.
        public let restarted: Bool
        /// Prompt tokens the cache already held (not run again).
        public let reusedTokens: Int
    }

    /// Adds a user message and generates the reply (streamed to `onText`, which returns false to stop it),
    /// which joins the conversation. When the conversation with room for `options.maxTokens` no longer fits
    /// the context, a new one starts with this message.
    public func send(_ text: String, options: GenerationOptions, onText: (String) -> Bool = { _ in true }) throws -> Turn {
        let tokenizer = generator.tokenizer, capacity = generator.cache.capacity
        func render(_ messages: [JSONValue]) throws -> [Int] {
            tokenizer.encode(try template.render(messages: messages, addGenerationPrompt: true, specialTokens: tokenizer.templateSpecialTokens))
        }
        var restarted = false
        var ids = try render(messages + [ChatTemplate.message("user", text)])
        if ids.count + options.maxTokens > capacity {
            reset()
            restarted = true
            ids = try render(messages + [ChatTemplate.message("user", text)])
            guard ids.count + options.maxTokens <= capacity else { throw ChatError.messageTooLong(tokens: ids.count + options.maxTokens, context: capacity) }
        }
        messages.append(ChatTemplate.message("user", text))
        // Reuse the cached prefix; run only what is new.
        var common = 0
        while common < min(ids.count, cached.count) && ids[common] == cached[common] { common += 1 }
        if common == ids.count { common -= 1 }  // at least one token runs, for the next token's logits
        generator.cache.truncate(to: common)
        let result = try generator.generate(prompt: Array(ids[common...]), options: options, onText: onText)
        messages.append(ChatTemplate.message("assistant", result.text))
        // The cache holds the prompt and every generated token but the last (never fed back).
        cached = Array((ids + result.tokenIDs).prefix(generator.cache.length))
        return Turn(result: result, restarted: restarted, reusedTokens: common)
    }
}
