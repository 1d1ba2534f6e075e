// A client of the OpenAI chat completions protocol (`POST .../v1/chat/completions`), which OpenAI, vLLM,
// llama-server, mlx_lm.server and `qlora serve` speak: one request at a time per call, safe to call from
// many tasks at once, with a timeout per attempt and retries with exponential backoff on the failures
// that pass (connection errors, timeouts, 408, 429, 5xx; Retry-After honoured). The API key goes only
// into the Authorization header: no error message, description or log line carries it.
import AsyncHTTPClient
import NIOCore
import NIOHTTP1
import QLoRACore
import QLoRATokenizer

/// The fields of a chat completion request that swift-qlora sends.
public struct ChatCompletionRequest: Sendable {
    public var model: String?
    public var messages: [ChatMessage]
    public var temperature: Double?
    public var topP: Double?
    public var maxTokens: Int?
    public var seed: UInt64?

    public init(model: String?, messages: [ChatMessage], temperature: Double? = nil, topP: Double? = nil, maxTokens: Int? = nil, seed: UInt64? = nil) {
        self.model = model
        self.messages = messages
        self.temperature = temperature
        self.topP = topP
        self.maxTokens = maxTokens
        self.seed = seed
    }

    public var json: JSONValue {
        var fields: [(String, JSONValue)] = []
        if let model { fields.append(("model", .string(model))) }
        fields.append(("messages", .array(messages.map { .object([("role", .string($0.role)), ("content", .string($0.content))]) })))
        if let temperature { fields.append(("temperature", .double(temperature))) }
        if let topP { fields.append(("top_p", .double(topP))) }
        if let maxTokens { fields.append(("max_tokens", .int(maxTokens))) }
        if let seed { fields.append(("seed", .number(String(seed)))) }
        fields.append(("stream", .bool(false)))
        return .object(fields)
    }
}

/// What came back: the first choice's text and the usage counts when given.
public struct ChatCompletion: Sendable, Equatable {
    public let content: String
    public let finishReason: String?
    public let model: String?
    public let promptTokens: Int?
    public let completionTokens: Int?
    /// Attempts it took (1 when the first succeeded).
    public let attempts: Int

    /// Reads a response body: {"choices": [{"message": {"content": ...}, "finish_reason": ...}], "usage": {...}}.
    public static func parse(_ body: [UInt8], attempts: Int) throws -> ChatCompletion {
        let value: JSONValue
        do { value = try JSON.parse(body) } catch { throw OpenAIError.badResponse(reason: "the body is not JSON (\(error))") }
        guard let choice = value["choices"]?.arrayValue?.first else { throw OpenAIError.badResponse(reason: "no \"choices\"") }
        guard let content = choice["message"]?["content"]?.stringValue ?? choice["text"]?.stringValue else {
            throw OpenAIError.badResponse(reason: "the first choice has no message content")
        }
        return ChatCompletion(content: content, finishReason: choice["finish_reason"]?.stringValue, model: value["model"]?.stringValue,
                              promptTokens: value["usage"]?["prompt_tokens"]?.intValue, completionTokens: value["usage"]?["completion_tokens"]?.intValue,
                              attempts: attempts)
    }
}

public enum OpenAIError: Error, CustomStringConvertible, Equatable {
    /// The server answered with an error status; `message` is its error object's message when it sent one.
    case http(url: String, status: Int, message: String)
    case badResponse(reason: String)
    case timeout(url: String, seconds: Double)
    case connection(url: String, message: String)
    /// Every attempt failed; the last failure.
    indirect case gaveUp(attempts: Int, last: OpenAIError)
    case badURL(String)

    public var description: String {
        switch self {
        case let .http(url, status, message):
            let hint = status == 401 || status == 403 ? " (check the API key's environment variable)" : ""
            return "\(url) answered HTTP \(status)\(message.isEmpty ? "" : ": \(message)")\(hint)"
        case let .badResponse(reason): return "the judge's response is not a chat completion: \(reason)"
        case let .timeout(url, seconds): return "\(url) gave no answer within \(Self.formatSeconds(seconds))"
        case let .connection(url, message): return "cannot reach \(url): \(message)"
        case let .gaveUp(attempts, last): return "gave up after \(attempts) attempts; the last: \(last)"
        case let .badURL(url): return "\"\(url)\" is not an http:// or https:// URL"
        }
    }

    /// Whether another attempt may succeed.
    public var isTransient: Bool {
        switch self {
        case let .http(_, status, _): return status == 408 || status == 409 || status == 429 || status >= 500
        case .timeout, .connection: return true
        case .badResponse, .gaveUp, .badURL: return false
        }
    }

    static func formatSeconds(_ s: Double) -> String { s == s.rounded() ? "\(Int(s)) s" : "\(s) s" }
}

public final class OpenAIChatClient: Sendable {
    /// The full URL requests go to.
    public let url: String
    public let timeoutSeconds: Double
    public let retries: Int
    public let backoffSeconds: Double
    private let apiKey: String?
    private let client: HTTPClient

    /// `base` is an endpoint's base URL ("http://host:port/v1", as the openai clients take it), a server's
    /// root ("http://host:port", to which /v1 is added), or a full ".../chat/completions" URL.
    /// `connections`: the most connections kept open to the server (set it to the requests sent at once).
    /// Call `shutdown()` when done.
    public init(base: String, apiKey: String?, timeoutSeconds: Double = 120, retries: Int = 5, backoffSeconds: Double = 1, connections: Int = 8) throws {
        url = try Self.endpoint(base)
        self.apiKey = apiKey.flatMap { $0.isEmpty ? nil : $0 }
        self.timeoutSeconds = timeoutSeconds
        self.retries = retries
        self.backoffSeconds = backoffSeconds
        var configuration = HTTPClient.Configuration()
        // A refused or unreachable server fails the attempt at once (within 10 s); our own retries wait between.
        configuration.connectionPool.retryConnectionEstablishment = false
        configuration.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit = max(1, connections)
        configuration.timeout = .init(connect: .nanoseconds(Int64(min(10, timeoutSeconds) * 1e9)))
        client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    }

    public func shutdown() async {
        try? await client.shutdown()
    }

    public static func endpoint(_ base: String) throws -> String {
        var s = base
        guard s.hasPrefix("http://") || s.hasPrefix("https://") else { throw OpenAIError.badURL(base) }
        while s.hasSuffix("/") { s.removeLast() }
        let afterScheme = s.split(separator: "/", maxSplits: 2, omittingEmptySubsequences: false)
        guard afterScheme.count >= 3, !afterScheme[2].isEmpty else { throw OpenAIError.badURL(base) }
        if s.hasSuffix("/chat/completions") { return s }
        let hasPath = afterScheme[2].contains("/")
        return s + (hasPath ? "/chat/completions" : "/v1/chat/completions")
    }

    /// Sends `request`; retries transient failures up to `retries` more times, waiting backoff·2^attempt
    /// (at most 60 s) or what Retry-After asks. Cancellation stops it between and during attempts.
    public func complete(_ request: ChatCompletionRequest) async throws -> ChatCompletion {
        let body = Array(JSON.serialize(request.json).utf8)
        var attempt = 0
        while true {
            attempt += 1
            do {
                return try await once(body, attempts: attempt)
            } catch let failure as Failure {
                guard failure.error.isTransient, attempt <= retries else {
                    throw attempt > 1 && failure.error.isTransient ? OpenAIError.gaveUp(attempts: attempt, last: failure.error) : failure.error
                }
                let wait = failure.retryAfter ?? min(60, backoffSeconds * Double(1 << min(attempt - 1, 16)))
                try await Task.sleep(nanoseconds: UInt64(max(0, wait) * 1e9))
            }
        }
    }

    private struct Failure: Error {
        let error: OpenAIError
        var retryAfter: Double?
    }

    private func once(_ body: [UInt8], attempts: Int) async throws -> ChatCompletion {
        var request = HTTPClientRequest(url: url)
        request.method = .POST
        request.headers.add(name: "Content-Type", value: "application/json")
        request.headers.add(name: "Accept", value: "application/json")
        if let apiKey { request.headers.add(name: "Authorization", value: "Bearer \(apiKey)") }
        request.body = .bytes(ByteBuffer(bytes: body))
        let url = self.url, timeout = timeoutSeconds, client = self.client
        let outcome: (status: Int, retryAfter: Double?, body: [UInt8])
        do {
            outcome = try await withThrowingTaskGroup(of: (Int, Double?, [UInt8])?.self) { group in
                group.addTask {
                    let response = try await client.execute(request, timeout: .nanoseconds(Int64(timeout * 1e9) + 1_000_000_000))
                    let buffer = try await response.body.collect(upTo: 64 << 20)
                    let retryAfter = response.headers.first(name: "Retry-After").flatMap(Double.init)
                    return (Int(response.status.code), retryAfter, Array(buffer.readableBytesView))
                }
                group.addTask {
                    try await Task.sleep(nanoseconds: UInt64(timeout * 1e9))
                    return nil
                }
                defer { group.cancelAll() }
                guard let first = try await group.next(), let result = first else { throw Failure(error: .timeout(url: url, seconds: timeout)) }
                return result
            }
        } catch let f as Failure {
            throw f
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            if Task.isCancelled { throw CancellationError() }
            throw Failure(error: .connection(url: url, message: redact("\(error)")))
        }
        guard (200..<300).contains(outcome.status) else {
            throw Failure(error: .http(url: url, status: outcome.status, message: redact(Self.errorMessage(outcome.body))), retryAfter: outcome.retryAfter)
        }
        do { return try ChatCompletion.parse(outcome.body, attempts: attempts) } catch let e as OpenAIError { throw Failure(error: e) }
    }

    /// The message of an OpenAI-style error body ({"error": {"message": ...}}), else its first 200 bytes.
    static func errorMessage(_ body: [UInt8]) -> String {
        if let v = try? JSON.parse(body), let m = v["error"]?["message"]?.stringValue ?? v["error"]?.stringValue ?? v["message"]?.stringValue { return m }
        let text = String(decoding: body.prefix(200), as: UTF8.self)
        return text.split(whereSeparator: \.isNewline).joined(separator: " ")
    }

    /// `text` with the API key, if it appears, replaced.
    func redact(_ text: String) -> String {
        guard let apiKey, text.contains(apiKey) else { return text }
        return text.split(separator: apiKey, omittingEmptySubsequences: false).joined(separator: "[API key]")
    }
}
