// OpenAI's tools and tool_choice through the chat template's own tool support: the tools go to the template as
// transformers' apply_chat_template passes them, and the calls the model writes in its family's format come back as
// the response's tool_calls. Two formats, told apart by the template as llama.cpp tells them: Hermes (Qwen 2.5, Qwen 3:
// `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block a call) and Llama 3.1/3.2 (a bare
// `{"name": ..., "parameters": {...}}` as the whole reply). tool_choice "required" or a named function constrains the
// reply to a call of the tools' own parameter schemas (JSONSchemaMatcher), so that it always parses.
import Foundation
import QLoRACore
import QLoRAGeneration
import QLoRATokenizer

public enum ToolFormat: String, Sendable {
    case hermes, llama3

    /// The format a chat template writes tool calls in, or nil when it has none.
    public static func of(_ template: ChatTemplate) -> ToolFormat? {
        if template.source.contains("<tool_call>") { return .hermes }
        if template.source.contains("<|start_header_id|>ipython<|end_header_id|>") || template.source.contains("ipython") && template.source.contains("\"parameters\"") {
            return .llama3
        }
        return nil
    }

    /// The key of a call's arguments in this format.
    var argumentsKey: String { self == .hermes ? "arguments" : "parameters" }

    /// What the prompt ends with when the reply must be a call (the model's own opening of one).
    var opening: String { self == .hermes ? "<tool_call>\n" : "" }
}

/// A call the model made: the function's name and its arguments (a JSON object).
public struct ToolCall: Sendable, Equatable {
    public var name: String
    public var arguments: JSONValue
    /// The arguments as written when the reply was cut short (max_tokens) inside them: not valid JSON, sent as they are
    /// (as OpenAI returns a call the length limit cut, with finish_reason "length"); nil for a whole call.
    public var truncatedArguments: String?

    public init(name: String, arguments: JSONValue, truncatedArguments: String? = nil) {
        self.name = name
        self.arguments = arguments
        self.truncatedArguments = truncatedArguments
    }

    /// The OpenAI object: {"id", "type": "function", "function": {"name", "arguments": "<JSON text>"}}.
    func json(id: String, index: Int? = nil) -> JSONValue {
        var fields: [(String, JSONValue)] = []
        if let index { fields.append(("index", .int(index))) }
        fields += [("id", .string(id)), ("type", .string("function")),
                   ("function", .object([("name", .string(name)), ("arguments", .string(truncatedArguments ?? JSON.serialize(arguments)))]))]
        return .object(fields)
    }
}

/// The tools of a request and what it asks of them.
public struct ToolRequest: Sendable {
    public enum Choice: Sendable, Equatable { case auto, required, named(String) }
    public var format: ToolFormat
    public var choice: Choice
    /// The tools as the request sent them (to the template).
    public var tools: JSONValue
    public var names: [String]
    /// parallel_tool_calls: false keeps the first call only.
    public var parallel = true

    public init(format: ToolFormat, choice: Choice, tools: JSONValue, names: [String], parallel: Bool = true) {
        self.format = format
        self.choice = choice
        self.tools = tools
        self.names = names
        self.parallel = parallel
    }

    /// The finish_reason of a reply that made these calls: "length" for a call cut short, else OpenAI's "stop" for a
    /// named function and "tool_calls" otherwise.
    func finishReason(_ calls: [ToolCall]) -> String {
        if calls.contains(where: { $0.truncatedArguments != nil }) { return "length" }
        if case .named = choice { return "stop" }
        return "tool_calls"
    }

    /// Whether the reply is constrained to be a call.
    var forced: Bool { choice != .auto }

    /// The schema of one call, any of the tools (or the named one): its name and its parameters' schema. Each tool's
    /// own definitions ($defs or definitions: pydantic's nested models) move to the top, renamed per tool, with the
    /// references into them.
    public func callSchema() -> JSONValue {
        var alternatives: [JSONValue] = []
        var definitions: [(String, JSONValue)] = []
        for (i, t) in (tools.arrayValue ?? []).enumerated() {
            guard let f = t["function"], let name = f["name"]?.stringValue else { continue }
            if case let .named(n) = choice, n != name { continue }
            var parameters = f["parameters"] ?? .object([("type", .string("object"))])
            if parameters.objectValue?.isEmpty == true { parameters = .object([("type", .string("object"))]) }
            if case let .object(fields) = parameters {
                let prefix = "tool\(i)_"
                for key in ["$defs", "definitions"] {
                    for (d, body) in fields.first(where: { $0.0 == key })?.1.objectValue ?? [] { definitions.append((prefix + d, Self.rebased(body, prefix))) }
                }
                parameters = Self.rebased(.object(fields.filter { $0.0 != "$defs" && $0.0 != "definitions" }), prefix)
            }
            alternatives.append(.object([
                ("type", .string("object")),
                ("properties", .object([("name", .object([("const", .string(name))])), (format.argumentsKey, parameters)])),
                ("required", .array([.string("name"), .string(format.argumentsKey)])),
                ("additionalProperties", .bool(false)),
            ]))
        }
        var schema: [(String, JSONValue)] = alternatives.count == 1 ? alternatives[0].objectValue ?? [] : [("anyOf", .array(alternatives))]
        if !definitions.isEmpty {
            // The definitions beside a one-tool schema's own keywords need an anyOf wrapper (a $defs beside type is fine too).
            schema.append(("$defs", .object(definitions)))
        }
        return .object(schema)
    }

    /// `schema` with its references into its own definitions ("#/$defs/X", "#/definitions/X") pointing at the top-level
    /// "#/$defs/PREFIX" + X, and "#" (the tool's parameters themselves) refused later as unresolvable.
    static func rebased(_ schema: JSONValue, _ prefix: String) -> JSONValue {
        switch schema {
        case let .object(fields):
            return .object(fields.map { key, value in
                if key == "$ref", let r = value.stringValue {
                    for base in ["#/$defs/", "#/definitions/"] where r.hasPrefix(base) { return (key, .string("#/$defs/" + prefix + r.dropFirst(base.count))) }
                    return (key, value)
                }
                return (key, rebased(value, prefix))
            })
        case let .array(items): return .array(items.map { rebased($0, prefix) })
        default: return schema
        }
    }

    /// The calls in a reply and the text before them, or nil when it made none (it is then plain content). A forced
    /// reply is the call's JSON itself (the prompt ended with the opening); `truncated` (the length limit ended the
    /// reply): a forced call cut short comes back as the call with its arguments as written (`truncatedCall`).
    public func parse(_ text: String, truncated: Bool = false) -> (content: String?, calls: [ToolCall])? {
        if forced {
            guard let call = call(text) ?? (truncated ? truncatedCall(text) : nil) else { return nil }
            return (nil, [call])
        }
        var found: (content: String?, calls: [ToolCall])?
        switch format {
        case .hermes:
            // <tool_call> blocks; the last may be left open at the end of the reply.
            let parts = text.components(separatedBy: "<tool_call>")
            guard parts.count > 1 else { return nil }
            var calls: [ToolCall] = []
            for part in parts.dropFirst() {
                let body = part.components(separatedBy: "</tool_call>")[0]
                guard let call = call(body) else { return nil }  // a malformed call: all of it is content
                calls.append(call)
            }
            let before = parts[0].trimmingCharacters(in: .whitespacesAndNewlines)
            found = (before.isEmpty ? nil : before, calls)
        case .llama3:
            // The whole reply is one call (after whitespace; <|python_tag|> is a special token the decoder dropped).
            guard text.trimmingCharacters(in: .whitespacesAndNewlines).hasPrefix("{"), let call = call(text) else { return nil }
            found = (nil, [call])
        }
        if var f = found, !parallel, f.calls.count > 1 { f.calls = [f.calls[0]]; found = f }
        return found
    }

    /// A forced call that the length limit cut (its JSON unfinished): the function's name, once written whole, and the
    /// arguments' text from their opening brace on ("" when the reply stopped before them). The constraint keeps the
    /// reply on the call's schema, so the text is {"name": "...", "arguments": {... with the name first when the model
    /// wrote it first; a reply that began with the arguments, or stopped inside the name, gives nil (plain content).
    public func truncatedCall(_ text: String) -> ToolCall? {
        guard forced else { return nil }
        let t = text.trimmingCharacters(in: .whitespacesAndNewlines)
        guard t.hasPrefix("{") else { return nil }
        var rest = t.dropFirst().drop { $0.isWhitespace }
        guard rest.hasPrefix("\"name\"") else { return nil }
        rest = rest.dropFirst(6).drop { $0.isWhitespace }
        guard rest.hasPrefix(":") else { return nil }
        rest = rest.dropFirst().drop { $0.isWhitespace }
        // The name is one of the tools' (the schema's const), so it holds no escapes: read it to its closing quote.
        guard rest.hasPrefix("\""), let close = rest.dropFirst().firstIndex(of: "\"") else { return nil }
        let name = String(rest[rest.index(after: rest.startIndex)..<close])
        guard names.contains(name) else { return nil }
        rest = rest[rest.index(after: close)...].drop { $0.isWhitespace }
        var arguments = ""
        if rest.hasPrefix(",") {
            rest = rest.dropFirst().drop { $0.isWhitespace }
            for key in [format.argumentsKey, format == .hermes ? "parameters" : "arguments"] where rest.hasPrefix("\"\(key)\"") {
                let value = rest.dropFirst(key.count + 2).drop { $0.isWhitespace }
                if value.hasPrefix(":") { arguments = String(value.dropFirst().drop { $0.isWhitespace }) }
            }
        }
        return ToolCall(name: name, arguments: .null, truncatedArguments: arguments)
    }

    /// One call's JSON: {"name": ..., "arguments" | "parameters": {...}} (either key taken in both formats, as vLLM does),
    /// of one of the request's tools (a reply that names another function, or a JSON object that merely has a "name",
    /// is text, not a call).
    func call(_ text: String) -> ToolCall? {
        guard let value = try? JSON.parse(text.trimmingCharacters(in: .whitespacesAndNewlines)), let name = value["name"]?.stringValue,
              names.contains(name), let fields = value.objectValue, fields.count == 2,
              let arguments = value[format.argumentsKey] ?? value[format == .hermes ? "parameters" : "arguments"], arguments.objectValue != nil
        else { return nil }
        return ToolCall(name: name, arguments: arguments)
    }

    /// Reads tools, tool_choice and parallel_tool_calls (nil: no tools in play, or tool_choice "none", whose tools are
    /// left out of the prompt so that no call can come).
    static func read(_ v: JSONValue, template: ChatTemplate?) throws -> ToolRequest? {
        func bad(_ param: String, _ message: String) -> APIError { APIError.invalid(message, param: param) }
        let parallel = v["parallel_tool_calls"].flatMap { $0 == .null ? nil : $0 }
        if let parallel, parallel.boolValue == nil { throw bad("parallel_tool_calls", "must be true or false") }
        let list = v["tools"].flatMap { $0 == .null ? nil : $0 }
        guard let list else {
            if let c = v["tool_choice"], c != .null, c.stringValue != "none", c.stringValue != "auto" {
                throw bad("tool_choice", "tool_choice needs tools")
            }
            return nil
        }
        guard let tools = list.arrayValue else { throw bad("tools", "\"tools\" must be a list") }
        var names: [String] = []
        for (i, t) in tools.enumerated() {
            guard t["type"]?.stringValue == "function", let f = t["function"], let name = f["name"]?.stringValue, !name.isEmpty else {
                throw bad("tools", "tools[\(i)] must be {\"type\": \"function\", \"function\": {\"name\": ..., \"parameters\": ...}}")
            }
            guard !names.contains(name) else { throw bad("tools", "two tools are named \"\(name)\"") }
            if let p = f["parameters"], p != .null, p.objectValue == nil { throw bad("tools", "tools[\(i)].function.parameters must be a JSON Schema object") }
            names.append(name)
        }
        var choice = Choice.auto
        switch v["tool_choice"] {
        case nil, .null?: break
        case let .string(s)?:
            switch s {
            case "none": return nil
            case "auto": break
            case "required": choice = .required
            default: throw bad("tool_choice", "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}")
            }
        case let c?:
            guard c["type"]?.stringValue == "function", let name = c["function"]?["name"]?.stringValue else {
                throw bad("tool_choice", "tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}")
            }
            guard names.contains(name) else { throw bad("tool_choice", "tool_choice names \"\(name)\", which is not among the tools") }
            choice = .named(name)
        }
        guard !tools.isEmpty else {
            if choice != .auto { throw bad("tool_choice", "tool_choice needs tools") }
            return nil
        }
        guard let template, let format = ToolFormat.of(template) else {
            throw APIError.invalid("this model's chat template defines no tool calls (tools work with templates that write Hermes <tool_call> blocks, such as Qwen 2.5 and 3, or Llama 3.1/3.2's JSON calls)",
                                   param: "tools", code: "unsupported_value")
        }
        var request = ToolRequest(format: format, choice: choice, tools: list, names: names)
        if let b = parallel?.boolValue { request.parallel = b }
        return request
    }
}

/// Streams a reply that may make calls: text goes out as it comes until it may be the start of a call, which is held
/// back until the reply ends and is then sent as tool_calls (or as text, if it was none).
public final class ToolStream: @unchecked Sendable {
    public let request: ToolRequest
    /// `text`'s scalars, appended piece by piece (a piece may be a combining mark that joins the character before it,
    /// so positions count scalars, not characters).
    private var scalars: [Unicode.Scalar] = []
    /// Scalars already sent as content.
    private var sent = 0
    /// Where the first call's marker begins (Hermes), once seen.
    private var marker: Int?
    static let opening = Array("<tool_call>".unicodeScalars)

    public init(_ request: ToolRequest) { self.request = request }

    /// The content to send now for a new piece.
    public func add(_ piece: String) -> String {
        let before = scalars.count
        scalars += piece.unicodeScalars
        guard !request.forced else { return "" }
        let safe: Int
        switch request.format {
        case .hermes:
            // Only the new scalars and the marker's length before them can complete the marker.
            if marker == nil { marker = Self.find(Self.opening, in: scalars, from: max(0, before - Self.opening.count + 1)) }
            if let at = marker {
                safe = at
            } else {
                // Hold back a tail that may be the marker's beginning.
                var keep = 0
                for k in stride(from: min(Self.opening.count - 1, scalars.count), through: 1, by: -1)
                    where scalars[(scalars.count - k)...].elementsEqual(Self.opening[..<k]) {
                    keep = k
                    break
                }
                safe = scalars.count - keep
            }
        case .llama3:
            // A call is the whole reply: hold it while it is blank or starts with '{'.
            let first = scalars.first { !$0.properties.isWhitespace }
            safe = first == nil || first == "{" ? 0 : scalars.count
        }
        guard safe > sent else { return "" }
        defer { sent = safe }
        return Self.string(scalars[sent..<safe])
    }

    static func find(_ needle: [Unicode.Scalar], in hay: [Unicode.Scalar], from start: Int = 0) -> Int? {
        guard hay.count >= needle.count, start <= hay.count - needle.count else { return nil }
        for i in start...(hay.count - needle.count) where hay[i..<(i + needle.count)].elementsEqual(needle) { return i }
        return nil
    }

    static func string(_ s: ArraySlice<Unicode.Scalar>) -> String {
        var v = String.UnicodeScalarView()
        v.append(contentsOf: s)
        return String(v)
    }

    /// At the end: the content not yet sent and the calls (nil: none, the rest is content). `truncated`: the length
    /// limit ended the reply (a forced call cut short comes back as a call with its arguments as written).
    public func finish(truncated: Bool = false) -> (content: String, calls: [ToolCall]?) {
        defer { sent = scalars.count }
        if let parsed = request.parse(Self.string(scalars[...]), truncated: truncated) {
            // What came before the first call and was not sent yet: a Hermes reply's text before its marker (`add` found
            // it); none for a forced call or Llama 3's, which are the whole reply (a forced call's arguments may even
            // hold the marker's text).
            let end = request.format == .hermes && !request.forced ? (marker ?? 0) : 0
            let rest = end > sent ? Self.string(scalars[sent..<end]) : ""
            return (rest.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty ? "" : rest, parsed.calls)
        }
        return (sent < scalars.count ? Self.string(scalars[sent...]) : "", nil)
    }
}
