// Chat templates: a model's Jinja template rendered the way transformers' apply_chat_template does
// (the messages, add_generation_prompt, tools, the tokenizer's special tokens, and extra variables).
import QLoRACore

public final class ChatTemplate: @unchecked Sendable {
    public let source: String
    let template: JinjaTemplate

    /// - Throws: `TemplateError` naming the unsupported construct.
    public init(_ source: String) throws {
        self.source = source
        template = try JinjaTemplate(source)
    }

    /// Renders a conversation. `messages` are objects with at least "role" and "content".
    public func render(messages: [JSONValue], addGenerationPrompt: Bool, specialTokens: [String: String] = [:],
                       tools: JSONValue? = nil, variables: [String: JSONValue] = [:]) throws -> String {
        var context: [String: JinjaValue] = [:]
        for (k, v) in specialTokens { context[k] = .string(v) }
        for (k, v) in variables { context[k] = JinjaValue(json: v) }
        context["messages"] = .array(messages.map(JinjaValue.init(json:)))
        context["add_generation_prompt"] = .bool(addGenerationPrompt)
        if let tools { context["tools"] = JinjaValue(json: tools) }
        return try template.render(context)
    }

    /// A plain message object.
    public static func message(_ role: String, _ content: String) -> JSONValue {
        .object([("role", .string(role)), ("content", .string(content))])
    }
}

extension Tokenizer {
    /// The special tokens a chat template sees (bos_token, eos_token).
    public var templateSpecialTokens: [String: String] {
        var t: [String: String] = [:]
        if let bosToken { t["bos_token"] = bosToken }
        if let eosToken { t["eos_token"] = eosToken }
        return t
    }
}

/// One message of a conversation: its role ("system", "user", "assistant") and text.
public struct ChatMessage: Sendable, Equatable {
    public var role: String
    public var content: String

    public init(role: String, content: String) {
        self.role = role
        self.content = content
    }
}
