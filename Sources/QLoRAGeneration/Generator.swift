// The generation loop: prefill the prompt through the KV cache, then one token at a time until an end
// token, a stop string or the token limit; text is streamed as it becomes complete.
import QLoRACore
import QLoRAModel
import QLoRATokenizer

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public struct GenerationOptions: Sendable {
    public var maxTokens = 256
    public var sampling = SamplingOptions()
    /// Strings that end the reply (not included in it).
    public var stopStrings: [String] = []
    /// End-of-sequence ids; defaults to the model's (generation_config.json) and the tokenizer's EOS.
    public var eosTokenIDs: [Int]?
    /// Record each generated token's log-probability under the model (the log-softmax of its logits, before
    /// any sampling setting) and this many of the likeliest alternatives; nil: none.
    public var logprobs: Int?
    /// With `logprobs`: receives each token's entry as the token is taken, before its text is streamed (the
    /// server sends them with the pieces of a streamed reply).
    public var onLogprob: (@Sendable (TokenLogprob) -> Void)?
    /// `.jsonObject`: only tokens that continue a valid JSON object are sampled, and the reply ends when it closes
    /// (JSONConstraint; OpenAI's response_format json_object). `.jsonSchema`: the same for values of a JSON Schema
    /// (JSONSchemaMatcher; json_schema).
    public var responseFormat = ResponseFormat.text

    public enum ResponseFormat: Sendable, Equatable {
        case text, jsonObject, jsonSchema(JSONSchemaGrammar)

        public static func == (a: ResponseFormat, b: ResponseFormat) -> Bool {
            switch (a, b) {
            case (.text, .text), (.jsonObject, .jsonObject): return true
            case let (.jsonSchema(x), .jsonSchema(y)): return x === y
            default: return false
            }
        }
    }

    public init() {}
}

/// A generated token's log-probability and the likeliest tokens at its position (descending).
public struct TokenLogprob: Sendable, Equatable {
    public let id: Int
    public let logprob: Double
    public let top: [Alternative]

    public struct Alternative: Sendable, Equatable {
        public let id: Int
        public let logprob: Double
    }

    /// From the logits [V] of the position that chose `id`.
    init(id: Int, logits: [Float], top k: Int) {
        var maxLogit = -Float.infinity
        for l in logits where l > maxLogit { maxLogit = l }
        var sum = 0.0
        for l in logits { sum += exp(Double(l - maxLogit)) }
        let logZ = Double(maxLogit) + log(sum)
        self.id = id
        logprob = Double(logits[id]) - logZ
        var best: [(Int, Float)] = []
        if k > 0 {
            // A partial selection: the k largest, ties by id.
            for (i, l) in logits.enumerated() {
                if best.count < k { best.append((i, l)); best.sort { ($0.1, -$0.0) > ($1.1, -$1.0) }; continue }
                if l > best[k - 1].1 { best[k - 1] = (i, l); best.sort { ($0.1, -$0.0) > ($1.1, -$1.0) } }
            }
        }
        top = best.map { Alternative(id: $0.0, logprob: Double($0.1) - logZ) }
    }
}

public struct GenerationResult: Sendable {
    public let text: String
    public let tokenIDs: [Int]
    public let promptTokens: Int
    /// "eos", "stop", "length" or "interrupted".
    public let finishReason: String
    public let prefillSeconds: Double
    public let decodeSeconds: Double
    /// One entry a generated token when GenerationOptions.logprobs was set.
    public var logprobs: [TokenLogprob]? = nil
    /// Prompt tokens whose keys and values came from the prefix cache instead of being run (`qlora serve`).
    public var cachedPromptTokens = 0

    public var tokensPerSecond: Double { decodeSeconds > 0 ? Double(max(tokenIDs.count - 1, 0)) / decodeSeconds : 0 }
}

public final class Generator {
    public let model: LlamaModel
    public let tokenizer: Tokenizer
    public let cache: KVCache

    public init(model: LlamaModel, tokenizer: Tokenizer, contextLength: Int? = nil) {
        self.model = model
        self.tokenizer = tokenizer
        cache = model.makeCache(capacity: min(contextLength ?? model.config.maxPositions, model.config.maxPositions))
    }

    /// The end ids in force for `options`.
    public func eosIDs(_ options: GenerationOptions) -> Set<Int> { Self.eosIDs(options, model: model, tokenizer: tokenizer) }

    /// The end ids in force for `options`: its own, else the model's (generation_config.json) and the tokenizer's.
    public static func eosIDs(_ options: GenerationOptions, model: LlamaModel, tokenizer: Tokenizer) -> Set<Int> {
        if let ids = options.eosTokenIDs { return Set(ids) }
        var ids = Set(model.config.eosTokenIDs)
        if let e = tokenizer.eosTokenID { ids.insert(e) }
        return ids
    }

    /// Generates a continuation of `prompt` (token ids). `onText` receives streamed text and returns
    /// false to stop early (e.g. Ctrl-C). The cache keeps the conversation: call `cache.reset()` for a
    /// new one; a prompt continues from the cache's current length.
    public func generate(prompt: [Int], options: GenerationOptions, onText: (String) -> Bool = { _ in true }) throws -> GenerationResult {
        var reply = ReplyDecoder(prompt: prompt, options: options, eos: eosIDs(options), tokenizer: tokenizer)
        let start = Clock.seconds()
        var logits = try model.forward(prompt, cache: cache, logits: .last)
        let prefill = Clock.seconds() - start
        var reason = "length"
        let decodeStart = Clock.seconds()
        if options.maxTokens > 0 {
            while true {
                if let end = reply.step(logits: logits, cacheFull: cache.length >= cache.capacity, onText: onText, cancelled: "interrupted") {
                    reason = end
                    break
                }
                logits = try model.forward([reply.generated.last!], cache: cache, logits: .last)
            }
        }
        let rest = reply.finish()
        if !rest.isEmpty { _ = onText(rest) }
        return GenerationResult(text: reply.text, tokenIDs: reply.generated, promptTokens: prompt.count, finishReason: reason,
                                prefillSeconds: prefill, decodeSeconds: Clock.seconds() - decodeStart, logprobs: reply.logprobs)
    }
}

/// A reply's text as its tokens arrive: streamed pieces as they become whole characters, cut at the
/// first stop string (which is not kept).
struct ReplyText {
    let stream: StreamingDecoder
    let stopStrings: [String]
    private(set) var text = ""

    init(tokenizer: Tokenizer, stopStrings: [String]) {
        stream = StreamingDecoder(tokenizer: tokenizer, skipSpecialTokens: true)
        self.stopStrings = stopStrings
    }

    /// Adds a token: the new text to show, and whether a stop string ended the reply (the piece then
    /// holds only what came before it).
    mutating func add(_ token: Int) -> (piece: String, stopped: Bool) {
        append(stream.add(token))
    }

    /// The end of the reply: what the stream held back (an incomplete or replacement character at the end).
    mutating func finish() -> String {
        stopped ? "" : append(stream.finish()).piece
    }

    private var stopped = false

    private mutating func append(_ piece: String) -> (piece: String, stopped: Bool) {
        guard !piece.isEmpty, !stopped else { return ("", stopped) }
        let before = text.count
        text += piece
        if let stop = stopStrings.first(where: { text.contains($0) }) {
            text = String(text[..<text.range(of: stop)!.lowerBound])
            stopped = true
            return (text.count > before ? String(text.dropFirst(before)) : "", true)
        }
        return (piece, false)
    }
}

/// One reply's decoding, a token at a time, for the generation loop and the batched one alike: sampling,
/// the end checks (an end token, a stop string, the token limit, a full cache) and the streamed text.
struct ReplyDecoder {
    private var sampler: Sampler
    private let eos: Set<Int>
    private var reply: ReplyText
    private var context: [Int]
    private let maxTokens: Int
    private(set) var generated: [Int] = []
    private let topLogprobs: Int?
    private let onLogprob: (@Sendable (TokenLogprob) -> Void)?
    /// Each generated token's log-probability, when asked for.
    private(set) var logprobs: [TokenLogprob]?
    private let tokenizer: Tokenizer
    private let responseFormat: GenerationOptions.ResponseFormat
    /// JSON output's constraint, made at the first step (it needs the vocabulary's size).
    private var json: VocabularyMask?

    init(prompt: [Int], options: GenerationOptions, eos: Set<Int>, tokenizer: Tokenizer) {
        topLogprobs = options.logprobs
        onLogprob = options.onLogprob
        logprobs = options.logprobs == nil ? nil : []
        sampler = Sampler(options: options.sampling)
        self.eos = eos
        reply = ReplyText(tokenizer: tokenizer, stopStrings: options.stopStrings)
        context = prompt
        maxTokens = options.maxTokens
        self.tokenizer = tokenizer
        responseFormat = options.responseFormat
    }

    /// The reply's text so far.
    var text: String { reply.text }

    /// Ends the reply: the text the stream held back at its end (see StreamingDecoder.finish), now part of `text`.
    mutating func finish() -> String { reply.finish() }

    /// Samples the next token from `logits` and takes it: nil while the reply goes on (its token is
    /// `generated.last`, to run next), else why it ended: "eos" (not kept), "stop", "length" (the limit, or
    /// `cacheFull`), or `cancelled` when `onText` refused the new text.
    mutating func step(logits: [Float], cacheFull: Bool, onText: (String) -> Bool, cancelled: String) -> String? {
        var next: Int
        if responseFormat != .text {
            if json == nil {
                switch responseFormat {
                case let .jsonSchema(grammar):
                    json = TokenConstraint(tokenizer: tokenizer, vocabularySize: logits.count, start: JSONSchemaMatcher(grammar))
                default: json = JSONConstraint(tokenizer: tokenizer, vocabularySize: logits.count)
                }
            }
            var masked = logits
            guard json!.mask(&masked, eos: eos) else { return "stop" }
            next = sampler.next(logits: masked, context: context)
            json!.advance(next)
        } else {
            next = sampler.next(logits: logits, context: context)
        }
        if eos.contains(next) { return "eos" }
        generated.append(next)
        if let k = topLogprobs {
            let entry = TokenLogprob(id: next, logits: logits, top: k)
            logprobs?.append(entry)
            onLogprob?(entry)
        }
        context.append(next)
        let (piece, stopped) = reply.add(next)
        if !piece.isEmpty && !onText(piece) { return cancelled }
        if stopped { return "stop" }
        if generated.count >= maxTokens || cacheFull { return "length" }
        return nil
    }
}
