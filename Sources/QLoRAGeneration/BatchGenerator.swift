// Several generations decoded together (continuous batching): each request has its own KV cache and
// sampler; every step runs one batched forward over the requests in flight (LlamaModel.forward(batch:)),
// which reads each weight once for all of them; a request that ends frees its slot for the next one,
// prefilled on its own and then joining the batch.
import QLoRACore
import QLoRAModel
import QLoRATokenizer

public struct GenerationRequest: Sendable {
    public var prompt: [Int]
    public var options: GenerationOptions

    public init(prompt: [Int], options: GenerationOptions) {
        self.prompt = prompt
        self.options = options
    }
}

public enum BatchGenerationError: Error, CustomStringConvertible, Equatable {
    case promptTooLong(request: Int, tokens: Int, context: Int)

    public var description: String {
        switch self {
        case let .promptTooLong(request, tokens, context):
            return "request \(request): the prompt has \(tokens) tokens and the model's context holds \(context)"
        }
    }
}

public final class BatchGenerator {
    public let model: LlamaModel
    public let tokenizer: Tokenizer
    /// Requests decoded together at most.
    public let maxBatch: Int
    /// The most requests one step of the last `run` decoded together.
    public private(set) var largestBatch = 0

    public init(model: LlamaModel, tokenizer: Tokenizer, maxBatch: Int) {
        precondition(maxBatch >= 1)
        self.model = model
        self.tokenizer = tokenizer
        self.maxBatch = maxBatch
    }

    private final class Slot {
        let id: Int
        let request: GenerationRequest
        let cache: KVCache
        var sampler: Sampler
        let eos: Set<Int>
        var reply: ReplyText
        var context: [Int]
        var generated: [Int] = []
        var logits: [Float] = []
        let prefillSeconds: Double
        let decodeStart: Double

        init(id: Int, request: GenerationRequest, cache: KVCache, eos: Set<Int>, tokenizer: Tokenizer, prefillSeconds: Double) {
            self.id = id
            self.request = request
            self.cache = cache
            sampler = Sampler(options: request.options.sampling)
            self.eos = eos
            reply = ReplyText(tokenizer: tokenizer, stopStrings: request.options.stopStrings)
            context = request.prompt
            self.prefillSeconds = prefillSeconds
            decodeStart = Clock.seconds()
        }

        func result(_ reason: String) -> GenerationResult {
            GenerationResult(text: reply.text, tokenIDs: generated, promptTokens: request.prompt.count, finishReason: reason,
                             prefillSeconds: prefillSeconds, decodeSeconds: Clock.seconds() - decodeStart)
        }
    }

    /// Generates until `next` has no more requests and every one taken has finished. `next()` is asked
    /// for a request whenever a slot is free (it may return requests that depend on earlier results:
    /// `finished` has run for every request that ended before). `finished(id, result)` receives each
    /// result as it ends, in the order they end; `shouldStop()` is checked every step (true: the
    /// requests in flight end as "interrupted"). `onText(id, piece)` receives each request's reply as it
    /// grows (whole characters, stop strings cut); false ends that request as "cancelled" and frees its
    /// cache. A prompt longer than the context throws before it runs.
    public func run(next: () throws -> (id: Int, request: GenerationRequest)?, finished: (Int, GenerationResult) throws -> Void,
                    shouldStop: () -> Bool = { false }, onText: (Int, String) -> Bool = { _, _ in true }) throws {
        var slots: [Slot] = []
        largestBatch = 0
        let limit = model.config.maxPositions
        while true {
            // Fill the free slots; each new request's prompt runs alone. `next` is asked again on every
            // step (a finished request may have queued a follow-up).
            while slots.count < maxBatch {
                guard let (id, request) = try next() else { break }
                guard request.prompt.count + 1 <= limit, !request.prompt.isEmpty else {
                    throw BatchGenerationError.promptTooLong(request: id, tokens: request.prompt.count, context: limit)
                }
                let cache = KVCache(config: model.config, capacity: min(limit, request.prompt.count + request.options.maxTokens + 1))
                let start = Clock.seconds()
                let logits = try model.forward(request.prompt, cache: cache, logits: .last)
                let eos = Generator.eosIDs(request.options, model: model, tokenizer: tokenizer)
                let slot = Slot(id: id, request: request, cache: cache, eos: eos, tokenizer: tokenizer, prefillSeconds: Clock.seconds() - start)
                slot.logits = logits
                slots.append(slot)
            }
            if slots.isEmpty { return }
            // Sample each slot's next token; the finished leave.
            let stop = shouldStop()
            var running: [Slot] = []
            var tokens: [Int] = []
            for slot in slots {
                if stop { try finished(slot.id, slot.result("interrupted")); continue }
                let token = slot.sampler.next(logits: slot.logits, context: slot.context)
                if slot.eos.contains(token) { try finished(slot.id, slot.result("eos")); continue }
                slot.generated.append(token)
                slot.context.append(token)
                let (piece, stopped) = slot.reply.add(token)
                if !piece.isEmpty && !onText(slot.id, piece) { try finished(slot.id, slot.result("cancelled")); continue }
                if stopped { try finished(slot.id, slot.result("stop")); continue }
                if slot.generated.count >= slot.request.options.maxTokens || slot.cache.length >= slot.cache.capacity {
                    try finished(slot.id, slot.result("length"))
                    continue
                }
                running.append(slot)
                tokens.append(token)
            }
            slots = running
            if slots.isEmpty { continue }
            largestBatch = max(largestBatch, slots.count)
            if slots.count == 1 {
                slots[0].logits = try model.forward(tokens, cache: slots[0].cache, logits: .last)
            } else {
                let logits = try model.forward(batch: tokens, caches: slots.map(\.cache))
                let V = model.config.vocabSize
                for (i, slot) in slots.enumerated() { slot.logits = Array(logits[(i * V)..<((i + 1) * V)]) }
            }
        }
    }
}
