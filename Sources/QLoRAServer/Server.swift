// `qlora serve`'s HTTP side on Hummingbird 2: the OpenAI endpoints (chat completions, completions,
// models), health and Prometheus-format metrics, adapters loaded and unloaded while running, bearer-token
// auth, caps on body size, max_tokens and context, OpenAI-style error objects, and one structured log
// line per request.
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import NIOCore
import QLoRACore
import QLoRAGeneration
import QLoRAModel
import QLoRATokenizer

public struct ServerOptions: Sendable {
    public var host = "127.0.0.1"
    public var port = 8080
    /// Requests need "Authorization: Bearer KEY" when set (all but /health).
    public var apiKey: String?
    public var maxBodyBytes = 1 << 20
    public var maxTokensCap = 2048
    public var defaultMaxTokens = 512
    /// The most choices ("n") one request may ask for.
    public var maxChoices = 8
    public init() {}
}

/// An error as the OpenAI API returns it: status, and {"error": {"message", "type", "param", "code"}}.
struct APIError: Error, CustomStringConvertible {
    var description: String { "\(status.code) \(type): \(message)" }
    let status: HTTPResponse.Status
    let message: String
    let type: String
    let param: String?
    let code: String?
    var headers: HTTPFields = [:]

    static func invalid(_ message: String, param: String? = nil, code: String? = nil) -> APIError {
        APIError(status: .badRequest, message: message, type: "invalid_request_error", param: param, code: code)
    }

    var response: Response {
        var h: HTTPFields = [.contentType: "application/json"]
        h.append(contentsOf: headers)
        let body: JSONValue = .object([("error", .object([
            ("message", .string(message)), ("type", .string(type)), ("param", param.map(JSONValue.string) ?? .null), ("code", code.map(JSONValue.string) ?? .null),
        ]))])
        return Response(status: status, headers: h, body: ResponseBody(byteBuffer: ByteBuffer(string: JSON.serialize(body))))
    }
}

/// A chat or text completion request, checked.
public struct CompletionRequest: Sendable {
    public var model: String
    public var prompt: [Int]
    public var options: GenerationOptions
    public var stream: Bool
    public var includeUsage: Bool
    /// The client's end-user id ("user" or "safety_identifier"), for the request log.
    public var user: String?
    /// Choices to generate for the prompt ("n"): each its own sequence in the batch, seeded seed + index.
    public var choices = 1
    /// The tools in play (chat with tools and a tool_choice other than none), whose calls the reply is parsed for.
    public var tools: ToolRequest?
}

public final class Server: @unchecked Sendable {
    public let engine: Engine
    public let options: ServerOptions
    let template: ChatTemplate?
    let logger: Logger
    let created = Int(Clock.wallSeconds())
    private let lock = NSLock()
    private var requestCount: [String: Int] = [:]
    private var nextID = 0
    /// Loads an adapter folder onto the base (POST /v1/adapters).
    let loadAdapter: @Sendable (String) throws -> LlamaModel

    public init(engine: Engine, template: ChatTemplate?, options: ServerOptions, logger: Logger, loadAdapter: @escaping @Sendable (String) throws -> LlamaModel) {
        self.engine = engine
        self.template = template
        self.options = options
        self.logger = logger
        self.loadAdapter = loadAdapter
    }

    func count(_ key: String) { lock.withLock { requestCount[key, default: 0] += 1 } }
    func newID(_ prefix: String) -> String {
        let n = lock.withLock { () -> Int in nextID += 1; return nextID }
        return "\(prefix)-\(created)-\(n)"
    }

    /// Serves until the task is cancelled or SIGINT / SIGTERM; `onListening(port)` runs once bound.
    public func run(onListening: @escaping @Sendable (Int) -> Void) async throws {
        let router = Router()
        router.add(middleware: Gate(server: self))
        router.get("health") { _, _ in Self.json(.object([("status", .string("ok"))])) }
        router.get("metrics") { _, _ in
            Response(status: .ok, headers: [.contentType: "text/plain; version=0.0.4"], body: ResponseBody(byteBuffer: ByteBuffer(string: self.metrics())))
        }
        router.get("v1/models") { _, _ in
            Self.json(.object([("object", .string("list")), ("data", .array(self.engine.modelIDs.map { id in
                .object([("id", .string(id)), ("object", .string("model")), ("created", .int(self.created)), ("owned_by", .string(id == self.engine.baseID ? "swift-qlora" : "swift-qlora adapter"))])
            }))]))
        }
        router.post("v1/chat/completions") { request, context in try await self.completion(request, context: context, chat: true) }
        router.post("v1/completions") { request, context in try await self.completion(request, context: context, chat: false) }
        router.post("v1/adapters") { request, context in try await self.addAdapter(request, context: context) }
        router.delete("v1/adapters/:name") { _, context in
            let name = context.parameters.get("name") ?? ""
            guard self.engine.remove(id: name) else {
                throw APIError(status: .notFound, message: "no adapter named \"\(name)\" (the base cannot be unloaded)", type: "invalid_request_error", param: "name", code: "model_not_found")
            }
            self.logger.info("unloaded adapter", metadata: ["adapter": .string(name)])
            return Self.json(.object([("id", .string(name)), ("object", .string("model")), ("deleted", .bool(true))]))
        }
        var quiet = logger
        quiet.logLevel = .warning
        let app = Application(router: router, configuration: .init(address: .hostname(options.host, port: options.port), serverName: "swift-qlora"),
                              onServerRunning: { channel in onListening(channel.localAddress?.port ?? 0) }, logger: quiet)
        try await app.runService()
    }

    static func json(_ value: JSONValue, status: HTTPResponse.Status = .ok) -> Response {
        Response(status: status, headers: [.contentType: "application/json"], body: ResponseBody(byteBuffer: ByteBuffer(string: JSON.serialize(value))))
    }

    func metrics() -> String {
        let (waiting, running) = engine.load
        let c = engine.counters
        var out = ""
        func metric(_ name: String, _ type: String, _ help: String, _ value: Int, labels: String = "") {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n\(name)\(labels) \(value)\n"
        }
        metric("qlora_requests_waiting", "gauge", "Requests queued, not yet decoding.", waiting)
        metric("qlora_requests_running", "gauge", "Requests decoding now.", running)
        metric("qlora_completions_total", "counter", "Generations finished.", c.completed)
        metric("qlora_prompt_tokens_total", "counter", "Prompt tokens of finished generations.", c.promptTokens)
        if let p = engine.prefixCache {
            let stats = p.statistics
            metric("qlora_prefix_cache_lookups_total", "counter", "Prompts looked up in the prefix cache.", stats.lookups)
            metric("qlora_prefix_cache_hits_total", "counter", "Prompts that reused a cached prefix.", stats.hits)
            metric("qlora_prefix_cache_cached_tokens_total", "counter", "Prompt tokens taken from the prefix cache instead of run.", stats.cachedTokens)
            metric("qlora_prefix_cache_evictions_total", "counter", "Prefix cache entries evicted for space.", stats.evictions)
            metric("qlora_prefix_cache_bytes", "gauge", "Bytes of keys and values the prefix cache holds.", p.bytes)
        }
        metric("qlora_generated_tokens_total", "counter", "Tokens generated.", c.generatedTokens)
        metric("qlora_batch_size_max", "gauge", "The most requests one batched decoding step has run together.", c.largestBatch)
        let counts = lock.withLock { requestCount }
        out += "# HELP qlora_http_requests_total HTTP requests by path and status.\n# TYPE qlora_http_requests_total counter\n"
        for (k, v) in counts.sorted(by: { $0.key < $1.key }) {
            let parts = k.split(separator: " ", maxSplits: 1)
            out += "qlora_http_requests_total{path=\"\(parts[0])\",status=\"\(parts.count > 1 ? String(parts[1]) : "")\"} \(v)\n"
        }
        return out
    }

    // MARK: requests

    func body(_ request: Request) async throws -> JSONValue {
        let buffer: ByteBuffer
        do { buffer = try await request.body.collect(upTo: options.maxBodyBytes) } catch {
            throw APIError(status: .contentTooLarge, message: "the request body is larger than \(options.maxBodyBytes) bytes", type: "invalid_request_error", param: nil, code: nil)
        }
        return try Self.object(Array(buffer.readableBytesView))
    }

    /// A request body as a JSON object, or a 400.
    static func object(_ bytes: [UInt8]) throws -> JSONValue {
        let value: JSONValue
        do { value = try JSON.parse(bytes) } catch { throw APIError.invalid("the body is not valid JSON: \(error)") }
        guard case .object = value else { throw APIError.invalid("the body must be a JSON object") }
        return value
    }

    func parse(_ v: JSONValue, chat: Bool) throws -> CompletionRequest {
        try Self.parse(v, chat: chat, modelIDs: engine.modelIDs, template: template, tokenizer: engine.tokenizer,
                       contextLength: engine.contextLength, options: options)
    }

    /// Decodes and checks the body of a /v1/chat/completions (`chat`) or /v1/completions request against
    /// the models served, the chat template, the context and the server's caps: what the server runs for
    /// it, or the error it answers with (its `description` is the OpenAI error message).
    public static func decodeRequest(_ body: [UInt8], chat: Bool, modelIDs: [String], template: ChatTemplate?, tokenizer: Tokenizer,
                                     contextLength: Int, options: ServerOptions) throws -> CompletionRequest {
        try parse(try object(body), chat: chat, modelIDs: modelIDs, template: template, tokenizer: tokenizer,
                  contextLength: contextLength, options: options)
    }

    /// The request fields this server acts on, for /v1/chat/completions and /v1/completions. `top_k`, `min_p`
    /// and `repetition_penalty` are the extensions llama-server and vLLM take; `user` and `safety_identifier`
    /// go to the request log.
    static let implementedFields: Set<String> = [
        "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
        "logit_bias", "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty", "user", "safety_identifier", "n", "logprobs",
        "response_format",
    ]
    static let chatFields: Set<String> = implementedFields.union(["messages", "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"])
    static let completionFields: Set<String> = implementedFields.union(["prompt"])

    /// OpenAI's fields that this server does not implement, with the values that ask for nothing (what the
    /// field's absence means): those are accepted, any other value is a 400 naming the field. A field in
    /// neither list is a 400 too, so that no part of a request is dropped without a word.
    static func unimplemented(_ key: String, _ value: JSONValue, chat: Bool) -> String? {
        func empty(_ v: JSONValue) -> Bool {
            switch v {
            case let .array(a): return a.isEmpty
            case let .object(o): return o.isEmpty
            default: return false
            }
        }
        switch key {
        case "best_of" where !chat: return value.intValue == 1 ? nil : "best_of is not implemented; send 1 or leave it out"
        case "echo" where !chat: return value.boolValue == false ? nil : "echo is not implemented; send false or leave it out"
        case "suffix" where !chat: return value.stringValue == "" ? nil : "suffix (insertion) is not implemented; leave it out"
        case "functions" where chat, "function_call" where chat:
            return empty(value) || value.stringValue == "none" || value.stringValue == "auto" ? nil : "\(key) (deprecated by OpenAI) is not implemented; send tools and tool_choice"
        case "modalities" where chat: return value.arrayValue?.map(\.stringValue) == ["text"] ? nil : "only [\"text\"] is implemented"
        case "store" where chat: return value.boolValue == false ? nil : "this server stores no completions; send false or leave it out"
        case "metadata" where chat: return empty(value) ? nil : "metadata goes with store, which this server does not implement"
        case "service_tier": return ["auto", "default"].contains(value.stringValue ?? "") ? nil : "this server has one tier; send auto or default or leave it out"
        case "audio" where chat, "prediction" where chat, "reasoning_effort" where chat, "verbosity" where chat, "web_search_options" where chat,
             "prompt_cache_key" where chat:
            return "\(key) is not implemented; leave it out"
        default: return "this server does not know the field \"\(key)\""
        }
    }

    /// The grammar of response_format {"type": "json_schema", "json_schema": {"name", "schema", "strict", "description"}}
    /// (OpenAI's fields), or a 400 naming what is wrong or what the schema asks that cannot be enforced.
    static func jsonSchema(_ format: JSONValue) throws -> JSONSchemaGrammar {
        func bad(_ message: String) -> APIError { APIError.invalid("response_format: \(message)", param: "response_format") }
        guard let fields = format.objectValue, Set(fields.map(\.0)).isSubset(of: ["type", "json_schema"]) else {
            throw bad("json_schema takes the fields type and json_schema")
        }
        guard let spec = format["json_schema"], let specFields = spec.objectValue else { throw bad("\"json_schema\" must be an object with name and schema") }
        if let unknown = specFields.map(\.0).first(where: { !["name", "schema", "strict", "description"].contains($0) }) {
            throw bad("json_schema has no field \"\(unknown)\"")
        }
        guard let name = spec["name"]?.stringValue, !name.isEmpty, name.count <= 64,
              name.unicodeScalars.allSatisfy({ $0.isASCII && (CharacterSet.alphanumerics.contains($0) || $0 == "_" || $0 == "-") }) else {
            throw bad("json_schema.name must be 1 to 64 letters, digits, underscores or dashes")
        }
        if let strict = spec["strict"], strict != .null, strict.boolValue == nil { throw bad("json_schema.strict must be true or false") }
        guard let schema = spec["schema"] else { throw bad("json_schema.schema is required") }
        do {
            return try JSONSchemaGrammar(schema: schema)
        } catch {
            throw APIError.invalid("response_format: json_schema.schema \(error)", param: "response_format", code: "unsupported_value")
        }
    }

    static func parse(_ v: JSONValue, chat: Bool, modelIDs ids: [String], template: ChatTemplate?, tokenizer: Tokenizer,
                      contextLength: Int, options: ServerOptions) throws -> CompletionRequest {
        // Every field is either acted on or refused: a client that asks for n = 2, logprobs or JSON output gets
        // a 400 naming the field, not a 200 without what it asked for.
        for (key, value) in v.objectValue ?? [] where value != .null && !(chat ? chatFields : completionFields).contains(key) {
            if let why = unimplemented(key, value, chat: chat) {
                let known = !why.hasPrefix("this server does not know")
                throw APIError.invalid(known ? "Unsupported value for \"\(key)\": \(why)" : "Unrecognized request field \"\(key)\": \(why) (\(chat ? "/v1/chat/completions" : "/v1/completions") takes \((chat ? chatFields : completionFields).sorted().joined(separator: ", ")))",
                                       param: key, code: known ? "unsupported_value" : "unknown_parameter")
            }
        }
        let model: String
        switch v["model"] {
        case nil, .null?: model = ids[0]
        case let .string(m)?:
            guard ids.contains(m) else { throw APIError(status: .badRequest, message: "The model \"\(m)\" does not exist; this server has \(ids.joined(separator: ", "))", type: "invalid_request_error", param: "model", code: "model_not_found") }
            model = m
        default: throw APIError.invalid("\"model\" must be a string", param: "model")
        }
        func number(_ key: String, _ range: ClosedRange<Double>) throws -> Double? {
            guard let x = v[key], x != .null else { return nil }
            guard let d = x.doubleValue, range.contains(d) else { throw APIError.invalid("\"\(key)\" must be a number from \(range.lowerBound) to \(range.upperBound)", param: key) }
            return d
        }
        var o = GenerationOptions()
        o.maxTokens = options.defaultMaxTokens
        if let t = try number("temperature", 0...2) { o.sampling.temperature = Float(t) } else { o.sampling.temperature = 1 }
        if let p = try number("top_p", 0...1) { o.sampling.topP = Float(max(p, 1e-6)) } else { o.sampling.topP = 1 }
        o.sampling.topK = 0
        for key in ["max_tokens", "max_completion_tokens"] {
            guard let x = v[key], x != .null else { continue }
            guard let n = x.intValue, n >= 1 else { throw APIError.invalid("\"\(key)\" must be a positive integer", param: key) }
            guard n <= options.maxTokensCap else { throw APIError.invalid("\"\(key)\" is \(n); this server allows at most \(options.maxTokensCap)", param: key) }
            o.maxTokens = n
        }
        if let x = v["seed"], x != .null {
            guard let n = x.intValue else { throw APIError.invalid("\"seed\" must be an integer", param: "seed") }
            o.sampling.seed = UInt64(bitPattern: Int64(n))
        } else {
            o.sampling.seed = UInt64.random(in: 0...UInt64.max)
        }
        switch v["stop"] {
        case nil, .null?: break
        case let .string(s)?: o.stopStrings = s.isEmpty ? [] : [s]
        case let .array(items)?:
            guard items.count <= 4, items.allSatisfy({ $0.stringValue != nil }) else { throw APIError.invalid("\"stop\" must be a string or up to 4 strings", param: "stop") }
            o.stopStrings = items.compactMap(\.stringValue).filter { !$0.isEmpty }
        default: throw APIError.invalid("\"stop\" must be a string or up to 4 strings", param: "stop")
        }
        if let p = try number("presence_penalty", -2...2) { o.sampling.presencePenalty = Float(p) }
        if let p = try number("frequency_penalty", -2...2) { o.sampling.frequencyPenalty = Float(p) }
        if let p = try number("min_p", 0...1) { o.sampling.minP = Float(p) }
        if let p = try number("repetition_penalty", 0.01...100) { o.sampling.repetitionPenalty = Float(p) }
        if let x = v["top_k"], x != .null {
            guard let k = x.intValue, k >= 0 else { throw APIError.invalid("\"top_k\" must be a non-negative integer (0: off)", param: "top_k") }
            o.sampling.topK = k
        }
        if let x = v["logit_bias"], x != .null {
            guard let entries = x.objectValue, entries.count <= 1024 else { throw APIError.invalid("\"logit_bias\" must map up to 1024 token ids to numbers", param: "logit_bias") }
            for (key, bias) in entries {
                guard let id = Int(key), id >= 0, id < tokenizer.vocabularySize else {
                    throw APIError.invalid("\"logit_bias\": \"\(key)\" is not a token id of this model (0 to \(tokenizer.vocabularySize - 1))", param: "logit_bias")
                }
                guard let b = bias.doubleValue, (-100...100).contains(b) else { throw APIError.invalid("\"logit_bias\": the bias of token \(id) must be a number from -100 to 100", param: "logit_bias") }
                o.sampling.logitBias[id] = Float(b)
            }
        }
        // Log-probabilities: chat's logprobs (true) with top_logprobs (0-20), completions' logprobs (0-5 alternatives).
        if chat {
            let wanted = v["logprobs"].flatMap { $0 == .null ? nil : $0 }
            if let w = wanted, w.boolValue == nil { throw APIError.invalid("\"logprobs\" must be true or false", param: "logprobs") }
            let top = v["top_logprobs"].flatMap { $0 == .null ? nil : $0 }
            if let t = top {
                guard let k = t.intValue, (0...20).contains(k) else { throw APIError.invalid("\"top_logprobs\" must be an integer from 0 to 20", param: "top_logprobs") }
                guard wanted?.boolValue == true else { throw APIError.invalid("\"top_logprobs\" needs \"logprobs\": true", param: "top_logprobs") }
            }
            if wanted?.boolValue == true { o.logprobs = top?.intValue ?? 0 }
        } else if let x = v["logprobs"], x != .null {
            guard let k = x.intValue, (0...5).contains(k) else { throw APIError.invalid("\"logprobs\" must be an integer from 0 to 5", param: "logprobs") }
            o.logprobs = k
        }
        // JSON output by constrained decoding: any object, or a value of the request's JSON Schema.
        if let format = v["response_format"], format != .null {
            switch format["type"]?.stringValue {
            case "text"? where format.objectValue?.count == 1: break
            case "json_object"? where format.objectValue?.count == 1: o.responseFormat = .jsonObject
            case "json_schema"?: o.responseFormat = .jsonSchema(try jsonSchema(format))  // its own fields are checked there
            default:
                throw APIError.invalid("Unsupported value for \"response_format\": must be {\"type\": \"text\"}, {\"type\": \"json_object\"} or {\"type\": \"json_schema\", \"json_schema\": {\"name\": ..., \"schema\": ...}}",
                                       param: "response_format", code: "unsupported_value")
            }
        }
        var choices = 1
        if let x = v["n"], x != .null {
            guard let n = x.intValue, n >= 1 else { throw APIError.invalid("\"n\" must be a positive integer", param: "n") }
            guard n <= options.maxChoices else { throw APIError.invalid("\"n\" is \(n); this server generates at most \(options.maxChoices) choices a request", param: "n") }
            choices = n
        }
        var user: String?
        for key in ["user", "safety_identifier"] {
            guard let x = v[key], x != .null else { continue }
            guard let u = x.stringValue, u.utf8.count <= 256 else { throw APIError.invalid("\"\(key)\" must be a string of up to 256 bytes", param: key) }
            user = u
        }
        var stream = false
        if let s = v["stream"], s != .null {
            guard let b = s.boolValue else { throw APIError.invalid("\"stream\" must be true or false", param: "stream") }
            stream = b
        }
        var includeUsage = false
        if let so = v["stream_options"], so != .null {
            guard let fields = so.objectValue else { throw APIError.invalid("\"stream_options\" must be an object", param: "stream_options") }
            for (key, value) in fields where value != .null {
                switch key {
                case "include_usage":
                    guard let b = value.boolValue else { throw APIError.invalid("\"stream_options.include_usage\" must be true or false", param: "stream_options") }
                    includeUsage = b
                case "include_obfuscation":
                    // Padding against side channels over the network; this server sends none, which is what false asks for.
                    guard value.boolValue != nil else { throw APIError.invalid("\"stream_options.include_obfuscation\" must be true or false", param: "stream_options") }
                default: throw APIError.invalid("Unrecognized field \"stream_options.\(key)\" (this server takes include_usage)", param: "stream_options", code: "unknown_parameter")
                }
            }
        }
        var text: String
        var toolRequest: ToolRequest?
        if chat {
            guard let list = v["messages"]?.arrayValue, !list.isEmpty else { throw APIError.invalid("\"messages\" must be a non-empty list", param: "messages") }
            toolRequest = try ToolRequest.read(v, template: template)
            var messages: [JSONValue] = []
            for (i, m) in list.enumerated() {
                guard let role = m["role"]?.stringValue, ["system", "user", "assistant", "developer", "tool"].contains(role) else {
                    throw APIError.invalid("messages[\(i)].role must be system, user, assistant or tool", param: "messages")
                }
                // What a message may carry besides its text: a client that sends back the message it was given
                // sends these, empty. An assistant's tool calls and a tool's result go to the template; audio is
                // refused by name.
                var extra: [(String, JSONValue)] = []
                for (key, value) in m.objectValue ?? [] where !["role", "content", "name"].contains(key) && value != .null {
                    if key == "tool_calls", role == "assistant", let calls = value.arrayValue, !calls.isEmpty {
                        extra.append(("tool_calls", .array(try calls.enumerated().map { j, c in try Self.toolCallMessage(c, at: "messages[\(i)].tool_calls[\(j)]") })))
                        continue
                    }
                    if key == "tool_call_id", role == "tool", let id = value.stringValue { extra.append(("tool_call_id", .string(id))); continue }
                    let emptyList = value.arrayValue?.isEmpty == true
                    guard ["refusal", "annotations", "tool_calls", "function_call", "audio"].contains(key), emptyList else {
                        throw APIError.invalid("messages[\(i)].\(key) is not implemented (messages carry role, content and name; an assistant's tool_calls; a tool's tool_call_id)",
                                               param: "messages", code: "unsupported_value")
                    }
                }
                if role == "tool", !extra.contains(where: { $0.0 == "tool_call_id" }) {
                    throw APIError.invalid("messages[\(i)]: a tool message needs tool_call_id (the id of the call it answers)", param: "messages")
                }
                let content: String
                switch m["content"] {
                case nil where !extra.isEmpty && role == "assistant", .null? where !extra.isEmpty && role == "assistant": content = ""  // a message of tool calls only
                case let .string(s)?: content = s
                case let .array(parts)?:
                    // The list form: text parts only.
                    content = try parts.map { p -> String in
                        guard p["type"]?.stringValue == "text", let t = p["text"]?.stringValue else { throw APIError.invalid("messages[\(i)].content: only text parts are supported", param: "messages") }
                        return t
                    }.joined()
                default: throw APIError.invalid("messages[\(i)].content must be a string", param: "messages")
                }
                var message = ChatTemplate.message(role == "developer" ? "system" : role, content)
                if let name = m["name"], name != .null {
                    // As transformers passes it: to the template, which may use it or not.
                    guard let n = name.stringValue, case var .object(fields) = message else { throw APIError.invalid("messages[\(i)].name must be a string", param: "messages") }
                    fields.append(("name", .string(n)))
                    message = .object(fields)
                }
                if !extra.isEmpty, case let .object(fields) = message { message = .object(fields + extra) }
                messages.append(message)
            }
            guard let template else { throw APIError.invalid("this model has no chat template; use /v1/completions") }
            do {
                text = try template.render(messages: messages, addGenerationPrompt: true, specialTokens: tokenizer.templateSpecialTokens,
                                           tools: toolRequest?.tools)
            } catch {
                throw APIError.invalid("the chat template refused these messages: \(error)", param: "messages")
            }
            if toolRequest != nil, o.responseFormat != .text {
                // A reply held to a JSON value cannot also write a call in the template's format.
                throw APIError.invalid("response_format cannot be combined with tools (unless tool_choice is none)", param: "response_format")
            }
            if toolRequest?.forced == true || o.responseFormat != .text, !o.stopStrings.isEmpty {
                // Stop strings would cut a constrained value (a "}" or a newline inside it) and leave it unparsable.
                throw APIError.invalid("stop cannot be combined with a JSON response_format or a forced tool call (the value ends by itself)", param: "stop")
            }
            if let t = toolRequest, t.forced {
                // The reply must be a call: the prompt ends with the model's own opening of one, and the reply is held to
                // a call of the tools' parameter schemas.
                do { o.responseFormat = .jsonSchema(try JSONSchemaGrammar(schema: t.callSchema())) } catch {
                    throw APIError.invalid("tool_choice \(t.choice == .required ? "required" : "with a named function") holds the reply to the tools' parameter schemas, and one cannot be enforced: \(error)",
                                           param: "tools", code: "unsupported_value")
                }
                text += t.format.opening
            }
        } else {
            switch v["prompt"] {
            case let .string(s)?: text = s
            case let .array(items)? where items.count == 1 && items[0].stringValue != nil: text = items[0].stringValue!
            default: throw APIError.invalid("\"prompt\" must be a string", param: "prompt")
            }
        }
        let prompt = tokenizer.encode(text)
        guard !prompt.isEmpty else { throw APIError.invalid("the prompt is empty", param: chat ? "messages" : "prompt") }
        let context = contextLength
        guard prompt.count + 1 <= context else {
            throw APIError(status: .badRequest, message: "The prompt has \(prompt.count) tokens; the model's context holds \(context)", type: "invalid_request_error", param: chat ? "messages" : "prompt", code: "context_length_exceeded")
        }
        o.maxTokens = min(o.maxTokens, context - prompt.count)
        var request = CompletionRequest(model: model, prompt: prompt, options: o, stream: stream, includeUsage: includeUsage, user: user)
        request.choices = choices
        request.tools = toolRequest
        return request
    }

    /// An assistant message's tool call as the template reads it: arguments as a JSON object (clients send them as
    /// the JSON text they were given; the templates write them with tojson, so text would be quoted twice).
    static func toolCallMessage(_ c: JSONValue, at path: String) throws -> JSONValue {
        guard let f = c["function"], let name = f["name"]?.stringValue else { throw APIError.invalid("\(path) must have function.name", param: "messages") }
        var arguments = f["arguments"] ?? .object([])
        if let s = arguments.stringValue {
            guard let parsed = try? JSON.parse(s), parsed.objectValue != nil else {
                throw APIError.invalid("\(path).function.arguments must be a JSON object (or its text)", param: "messages")
            }
            arguments = parsed
        }
        var fields: [(String, JSONValue)] = []
        if let id = c["id"]?.stringValue { fields.append(("id", .string(id))) }
        fields += [("type", .string("function")), ("function", .object([("name", .string(name)), ("arguments", arguments)]))]
        return .object(fields)
    }

    /// A tool call's id: "call_" and 24 letters and digits, as OpenAI's.
    static func toolCallID() -> String {
        let alphabet = Array("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")
        return "call_" + String((0..<24).map { _ in alphabet[Int.random(in: 0..<alphabet.count)] })
    }

    static func finishReason(_ r: String) -> String {
        switch r {
        case "length": return "length"
        default: return "stop"
        }
    }

    func completion(_ request: Request, context: some RequestContext, chat: Bool) async throws -> Response {
        let start = Clock.seconds()
        let req = try parse(try await body(request), chat: chat)
        let id = newID(chat ? "chatcmpl" : "cmpl")
        let object = chat ? "chat.completion" : "text_completion"
        @Sendable func choice(_ text: String?, delta: Bool, finish: String?, index: Int = 0) -> JSONValue {
            var fields: [(String, JSONValue)] = [("index", .int(index))]
            if chat {
                if delta { fields.append(("delta", text.map { .object([("content", .string($0))]) } ?? .object([]))) } else {
                    fields.append(("message", .object([("role", .string("assistant")), ("content", .string(text ?? ""))])))
                }
            } else {
                fields.append(("text", .string(text ?? "")))
            }
            fields.append(("finish_reason", finish.map(JSONValue.string) ?? .null))
            return .object(fields)
        }
        @Sendable func usage(_ results: [GenerationResult]) -> JSONValue {
            // The prompt is counted once, the completions of every choice together (as OpenAI counts n > 1).
            let prompt = results.first?.promptTokens ?? 0, completion = results.reduce(0) { $0 + $1.tokenIDs.count }
            // OpenAI's prompt_tokens_details.cached_tokens: the prompt positions the prefix cache held (the fewest of the choices).
            let cached = results.map(\.cachedPromptTokens).min() ?? 0
            return .object([("prompt_tokens", .int(prompt)), ("completion_tokens", .int(completion)), ("total_tokens", .int(prompt + completion)),
                            ("prompt_tokens_details", .object([("cached_tokens", .int(cached))]))])
        }
        /// Choice i's request: the same prompt and options, seeded seed + i.
        func choiceRequest(_ i: Int) -> GenerationRequest {
            var o = req.options
            o.sampling.seed = o.sampling.seed &+ UInt64(i)
            return GenerationRequest(prompt: req.prompt, options: o)
        }
        let created = Int(Clock.wallSeconds())
        let log = { (r: GenerationResult, firstToken: Double?) in
            var meta: Logger.Metadata = ["id": .string(id), "model": .string(req.model), "prompt_tokens": .stringConvertible(r.promptTokens),
                                         "cached_tokens": .stringConvertible(r.cachedPromptTokens),
                                         "completion_tokens": .stringConvertible(r.tokenIDs.count), "finish": .string(r.finishReason),
                                         "seconds": .string(Chart.fixed(Clock.seconds() - start, 3)), "stream": .stringConvertible(req.stream)]
            if let firstToken { meta["first_token_seconds"] = .string(Chart.fixed(firstToken, 3)) }
            if let user = req.user { meta["user"] = .string(user) }
            self.logger.info("completion", metadata: meta)
        }
        // The n choices are queued together (the engine decodes them in one batch); their pieces (streaming) and
        // results come back through one AsyncStream. When a write fails (the client hung up) the flag stops the
        // generation at its next token.
        let (events, continuation) = AsyncStream<StreamEvent>.makeStream()
        let gone = ManagedFlag()
        let remaining = Countdown(req.choices)
        let streaming = req.stream
        for i in 0..<req.choices {
            // Streamed log-probabilities arrive as each token is taken and go out with the next piece of text (a token
            // that completes no character yet waits for the one that does; what is left goes with the finish).
            let pending = LogprobBuffer()
            var request = choiceRequest(i)
            if streaming && request.options.logprobs != nil { request.options.onLogprob = { pending.append($0) } }
            let job = EngineJob(model: req.model, request: request, onText: { piece in
                if gone.value { return false }
                if streaming { continuation.yield(.piece(i, piece, pending.take())) }
                return true
            }, onDone: { result in
                continuation.yield(.done(i, result, pending.take()))
                if remaining.decrement() == 0 { continuation.finish() }
            })
            guard engine.submit(job) else {
                // Choices already queued stop at their first token; the client gets the 429.
                gone.value = true
                throw Self.busy
            }
        }
        if !streaming {
            var results = [GenerationResult?](repeating: nil, count: req.choices)
            for await event in events {
                guard case let .done(i, result, _) = event else { continue }
                do { results[i] = try result.get() } catch {
                    gone.value = true  // the other choices stop at their next token
                    throw error
                }
            }
            let finished = results.compactMap { $0 }
            for r in finished { log(r, nil) }
            return Self.json(.object([
                ("id", .string(id)), ("object", .string(object)), ("created", .int(created)), ("model", .string(req.model)),
                ("choices", .array(finished.enumerated().map { i, r in
                    var c = choice(r.text, delta: false, finish: Self.finishReason(r.finishReason), index: i)
                    if let t = req.tools, let parsed = t.parse(r.text, truncated: r.finishReason == "length") {
                        // The calls the reply made: content is the text before them (null when none), as OpenAI answers.
                        let message: JSONValue = .object([("role", .string("assistant")), ("content", parsed.content.map(JSONValue.string) ?? .null),
                                                          ("tool_calls", .array(parsed.calls.map { $0.json(id: Self.toolCallID()) }))])
                        c = .object([("index", .int(i)), ("message", message), ("finish_reason", .string(t.finishReason(parsed.calls)))])
                    }
                    var offset = 0
                    return r.logprobs.map { self.withLogprobs(c, $0, chat: chat, offset: &offset) } ?? c
                })),
                ("usage", usage(finished)),
            ]))
        }
        let chunkObject = chat ? "chat.completion.chunk" : "text_completion"
        let model = req.model, includeUsage = req.includeUsage
        @Sendable func chunk(_ choices: [JSONValue], usage: JSONValue? = nil) -> ByteBuffer {
            var fields: [(String, JSONValue)] = [("id", .string(id)), ("object", .string(chunkObject)), ("created", .int(created)), ("model", .string(model)), ("choices", .array(choices))]
            if let usage { fields.append(("usage", usage)) }
            return ByteBuffer(string: "data: " + JSON.serialize(.object(fields)) + "\n\n")
        }
        let choices = req.choices
        let wantsLogprobs = req.options.logprobs != nil
        // With tools: each choice's text held back where a call may begin, its calls sent whole at its end.
        let toolStreams = (0..<choices).map { _ in req.tools.map(ToolStream.init) }
        let body = ResponseBody { writer in
            var first: Double?
            var finished: [GenerationResult] = []
            var offsets = [Int](repeating: 0, count: choices)
            do {
                if chat {
                    for i in 0..<choices {
                        try await writer.write(chunk([.object([("index", .int(i)), ("delta", .object([("role", .string("assistant")), ("content", .string(""))])), ("finish_reason", .null)])]))
                    }
                }
                for await event in events {
                    switch event {
                    case let .piece(i, p, tokens):
                        if first == nil { first = Clock.seconds() - start }
                        let text = toolStreams[i]?.add(p) ?? p
                        if text.isEmpty && tokens.isEmpty && toolStreams[i] != nil { continue }
                        let c = choice(text, delta: true, finish: nil, index: i)
                        try await writer.write(chunk([wantsLogprobs ? self.withLogprobs(c, tokens, chat: chat, offset: &offsets[i]) : c]))
                    case let .done(i, .success(r), tokens):
                        log(r, first)
                        finished.append(r)
                        var reason = Self.finishReason(r.finishReason)
                        if let stream = toolStreams[i] {
                            let (rest, calls) = stream.finish(truncated: r.finishReason == "length")
                            if !rest.isEmpty { try await writer.write(chunk([choice(rest, delta: true, finish: nil, index: i)])) }
                            if let calls {
                                // Each call whole in one delta (id, type, name and arguments), as clients join them by index.
                                let delta: JSONValue = .object([("tool_calls", .array(calls.enumerated().map { k, c in c.json(id: Self.toolCallID(), index: k) }))])
                                try await writer.write(chunk([.object([("index", .int(i)), ("delta", delta), ("finish_reason", .null)])]))
                                reason = stream.request.finishReason(calls)
                            }
                        }
                        let end = choice(chat ? nil : "", delta: true, finish: reason, index: i)
                        try await writer.write(chunk([tokens.isEmpty ? end : self.withLogprobs(end, tokens, chat: chat, offset: &offsets[i])]))
                    case let .done(_, .failure(e), _):
                        try await writer.write(ByteBuffer(string: "data: " + JSON.serialize(.object([("error", .object([("message", .string("\(e)")), ("type", .string("server_error"))]))])) + "\n\n"))
                    }
                }
                if includeUsage { try await writer.write(chunk([], usage: usage(finished))) }
                try await writer.write(ByteBuffer(string: "data: [DONE]\n\n"))
                try await writer.finish(nil)
            } catch {
                gone.value = true
                // Drain until the engine lets go of the request (at its next token), then say where it stopped.
                var tokens = -1, reason = "?"
                for await e in events {
                    if case let .done(_, .success(r), _) = e { (tokens, reason) = (r.tokenIDs.count, r.finishReason) }
                }
                self.logger.info("client went away mid-stream; generation stopped", metadata: [
                    "id": .string(id), "completion_tokens": .stringConvertible(tokens), "finish": .string(reason),
                ])
                throw error
            }
        }
        return Response(status: .ok, headers: [.contentType: "text/event-stream", .cacheControl: "no-cache"], body: body)
    }

    /// A token's text and bytes as the logprobs objects carry them (a byte-level token may hold part of a character:
    /// its text then has U+FFFD, its bytes are exact).
    func tokenText(_ id: Int) -> (String, JSONValue) {
        let bytes = engine.tokenizer.decodedBytes([id])
        return (String(decoding: bytes, as: UTF8.self), .array(bytes.map { .int(Int($0)) }))
    }

    /// Chat's logprobs object: {"content": [{token, logprob, bytes, top_logprobs: [...]}], "refusal": null}.
    func chatLogprobs(_ tokens: [TokenLogprob]) -> JSONValue {
        func entry(_ id: Int, _ logprob: Double) -> [(String, JSONValue)] {
            let (text, bytes) = tokenText(id)
            return [("token", .string(text)), ("logprob", .double(logprob)), ("bytes", bytes)]
        }
        let content: [JSONValue] = tokens.map { t in
            .object(entry(t.id, t.logprob) + [("top_logprobs", .array(t.top.map { .object(entry($0.id, $0.logprob)) }))])
        }
        return .object([("content", .array(content)), ("refusal", .null)])
    }

    /// The completions API's logprobs object: tokens, token_logprobs, top_logprobs (token to log-probability),
    /// text_offset (characters from the start of the completion).
    func completionLogprobs(_ tokens: [TokenLogprob], offset: inout Int) -> JSONValue {
        var offsets: [JSONValue] = []
        var texts: [JSONValue] = []
        for t in tokens {
            let (text, _) = tokenText(t.id)
            texts.append(.string(text))
            offsets.append(.int(offset))
            offset += text.unicodeScalars.count
        }
        let top: [JSONValue] = tokens.map { t in .object(t.top.map { (tokenText($0.id).0, JSONValue.double($0.logprob)) }) }
        return .object([("tokens", .array(texts)), ("token_logprobs", .array(tokens.map { .double($0.logprob) })), ("top_logprobs", .array(top)),
                        ("text_offset", .array(offsets))])
    }

    /// A choice (whole, or a chunk's) with the logprobs object of its tokens before its finish_reason; `offset`: the
    /// completions API's text_offset of the first token, moved past these tokens.
    func withLogprobs(_ choice: JSONValue, _ tokens: [TokenLogprob], chat: Bool, offset: inout Int) -> JSONValue {
        guard case var .object(fields) = choice else { return choice }
        fields.insert(("logprobs", chat ? chatLogprobs(tokens) : completionLogprobs(tokens, offset: &offset)), at: fields.count - 1)
        return .object(fields)
    }

    static let busy = APIError(status: .tooManyRequests, message: "The server is busy: its queue is full. Retry after a second.", type: "rate_limit_exceeded", param: nil, code: "rate_limit_exceeded",
                               headers: [HTTPField.Name("Retry-After")!: "1"])

    func addAdapter(_ request: Request, context: some RequestContext) async throws -> Response {
        let v = try await body(request)
        guard let name = v["name"]?.stringValue, !name.isEmpty, !name.contains("/") else { throw APIError.invalid("\"name\" must be a non-empty string without /", param: "name") }
        guard let path = v["path"]?.stringValue, !path.isEmpty else { throw APIError.invalid("\"path\" must name an adapter folder on the server", param: "path") }
        guard name != engine.baseID else { throw APIError.invalid("\"\(name)\" is the base model's id", param: "name") }
        let model: LlamaModel
        do { model = try loadAdapter(path) } catch { throw APIError.invalid("cannot load the adapter at \(path): \(error)", param: "path") }
        engine.add(id: name, model: model)
        logger.info("loaded adapter", metadata: ["adapter": .string(name), "path": .string(path)])
        return Self.json(.object([("id", .string(name)), ("object", .string("model")), ("created", .int(Int(Clock.wallSeconds()))), ("owned_by", .string("swift-qlora adapter"))]))
    }
}

/// A streamed request's events, by choice index.
enum StreamEvent: Sendable { case piece(Int, String, [TokenLogprob]), done(Int, Result<GenerationResult, Error>, [TokenLogprob]) }

/// The log-probabilities of tokens taken but not yet sent.
final class LogprobBuffer: @unchecked Sendable {
    private let lock = NSLock()
    private var entries: [TokenLogprob] = []
    func append(_ e: TokenLogprob) { lock.withLock { entries.append(e) } }
    func take() -> [TokenLogprob] { lock.withLock { defer { entries = [] }; return entries } }
}

/// Counts down the choices of a request still generating.
final class Countdown: @unchecked Sendable {
    private let lock = NSLock()
    private var left: Int
    init(_ n: Int) { left = n }
    func decrement() -> Int { lock.withLock { left -= 1; return left } }
}

final class ManagedFlag: @unchecked Sendable {
    private let lock = NSLock()
    private var _value = false
    var value: Bool {
        get { lock.withLock { _value } }
        set { lock.withLock { _value = newValue } }
    }
}

/// Auth, errors as OpenAI error objects, and the request counters.
struct Gate<Context: RequestContext>: RouterMiddleware {
    let server: Server

    func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let path = request.uri.path
        var response: Response
        if let key = server.options.apiKey, path != "/health", request.headers[.authorization] != "Bearer \(key)" {
            response = APIError(status: .unauthorized, message: "Missing or wrong API key: send \"Authorization: Bearer <key>\"", type: "invalid_request_error", param: nil, code: "invalid_api_key").response
        } else {
            do { response = try await next(request, context) } catch let e as APIError { response = e.response } catch let e as HTTPError {
                response = APIError(status: e.status, message: e.body ?? "\(e.status)", type: "invalid_request_error", param: nil, code: nil).response
            }
        }
        server.count("\(path) \(response.status.code)")
        return response
    }
}
