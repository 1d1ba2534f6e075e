// Several generations decoded together (continuous batching): each request has its own KV cache and
// sampler; every step runs one batched forward over the requests in flight (LlamaModel.forward(batch:)),
// which reads each weight once for all of them, each request with its own LoRA adapters if it names a
// model over the same base; a request that ends frees its slot for the next ones, whose prompts are
// prefilled together (forward(sequences:)) before they join the batch.
import QLoRACore
import QLoRAModel
import QLoRATokenizer

public struct GenerationRequest: Sendable {
    public var prompt: [Int]
    public var options: GenerationOptions
    /// The model this request runs on when it is not the generator's: the generator's base with LoRA
    /// adapters attached (`LlamaModel.withAdapter`); its rows take those adapters in every batched step.
    public var model: LlamaModel?

    public init(prompt: [Int], options: GenerationOptions, model: LlamaModel? = nil) {
        self.prompt = prompt
        self.options = options
        self.model = model
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
    /// Prompt tokens prefilled in one pass at most when several requests start together (a longer
    /// prompt runs alone); bounds the pass's activations and attention scores.
    public var prefillTokenBudget = 1024
    /// Keys and values of earlier prompts to reuse (nil: every prompt runs whole).
    public var prefixCache: PrefixCache?

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
        var reply: ReplyDecoder
        var logits: [Float] = []
        let prefillSeconds: Double
        let decodeStart: Double
        /// Prompt positions copied from the prefix cache instead of run.
        var cachedTokens = 0

        /// The request's own model (adapters over the base), or nil for the generator's model.
        var adapter: LlamaModel? { request.model }

        init(id: Int, request: GenerationRequest, cache: KVCache, eos: Set<Int>, tokenizer: Tokenizer, prefillSeconds: Double) {
            self.id = id
            self.request = request
            self.cache = cache
            reply = ReplyDecoder(prompt: request.prompt, options: request.options, eos: eos, tokenizer: tokenizer)
            self.prefillSeconds = prefillSeconds
            decodeStart = Clock.seconds()
        }

        /// The request's result; what its stream held back at the end goes to `onText` first.
        func end(_ reason: String, onText: (Int, String) -> Bool) -> GenerationResult {
            let rest = reply.finish()
            if !rest.isEmpty { _ = onText(id, rest) }
            var result = GenerationResult(text: reply.text, tokenIDs: reply.generated, promptTokens: request.prompt.count, finishReason: reason,
                                          prefillSeconds: prefillSeconds, decodeSeconds: Clock.seconds() - decodeStart, logprobs: reply.logprobs)
            result.cachedPromptTokens = cachedTokens
            return result
        }
    }

    /// Generates until `next` has no more requests and every one taken has finished. `next()` is asked
    /// for a request whenever a slot is free (it may return requests that depend on earlier results:
    /// `finished` has run for every request that ended before). `finished(id, result)` receives each
    /// result as it ends, in the order they end; `shouldStop()` is checked every step (true: the
    /// requests in flight end as "interrupted"). `onText(id, piece)` receives each request's reply as it
    /// grows (whole characters, stop strings cut); false ends that request as "cancelled" and frees its
    /// cache. A prompt longer than the context throws before it runs; a request whose model is not over
    /// this generator's base throws `ForwardError.adapterMismatch`.
    public func run(next: () throws -> (id: Int, request: GenerationRequest)?, finished: (Int, GenerationResult) throws -> Void,
                    shouldStop: () -> Bool = { false }, onText: (Int, String) -> Bool = { _, _ in true }) throws {
        var slots: [Slot] = []
        largestBatch = 0
        let limit = model.config.maxPositions
        while true {
            // Fill the free slots; the new requests' prompts are prefilled together. `next` is asked again
            // on every step (a finished request may have queued a follow-up).
            var fresh: [(id: Int, request: GenerationRequest)] = []
            while slots.count + fresh.count < maxBatch {
                guard let (id, request) = try next() else { break }
                guard request.prompt.count + 1 <= limit, !request.prompt.isEmpty else {
                    throw BatchGenerationError.promptTooLong(request: id, tokens: request.prompt.count, context: limit)
                }
                if let other = request.model, other !== model, other.config != model.config || other.layers.count != model.layers.count {
                    throw ForwardError.adapterMismatch("request \(id): its model (\(other.source)) is not over this generator's base")
                }
                fresh.append((id, request))
            }
            slots += try prefill(fresh, limit: limit)
            if slots.isEmpty { return }
            // Sample each slot's next token; the finished leave.
            let stop = shouldStop()
            var running: [Slot] = []
            for slot in slots {
                if stop { try finished(slot.id, slot.end("interrupted", onText: onText)); continue }
                if let end = slot.reply.step(logits: slot.logits, cacheFull: slot.cache.length >= slot.cache.capacity,
                                             onText: { onText(slot.id, $0) }, cancelled: "cancelled") {
                    try finished(slot.id, slot.end(end, onText: onText))
                    continue
                }
                running.append(slot)
            }
            // Requests for the same adapters sit next to each other, so that each adapter's update is one
            // product over its rows.
            slots = Self.groupedByModel(running)
            if slots.isEmpty { continue }
            largestBatch = max(largestBatch, slots.count)
            let tokens = slots.map { $0.reply.generated.last! }
            if slots.count == 1 {
                slots[0].logits = try (slots[0].adapter ?? model).forward(tokens, cache: slots[0].cache, logits: .last)
            } else {
                let adapters: [LlamaModel?]? = slots.contains { $0.adapter != nil } ? slots.map(\.adapter) : nil
                let logits = try model.forward(batch: tokens, caches: slots.map(\.cache), adapters: adapters)
                let V = model.config.vocabSize
                for (i, slot) in slots.enumerated() { slot.logits = Array(logits[(i * V)..<((i + 1) * V)]) }
            }
        }
    }

    /// The slots of new requests, their prompts run. A prompt that starts with a prefix the prefix cache holds copies
    /// it and runs the rest alone; the others run alone when one comes at a time (or its prompt is over the budget),
    /// else in passes of up to `prefillTokenBudget` tokens over several prompts at once. Every prompt run is offered
    /// to the prefix cache.
    private func prefill(_ fresh: [(id: Int, request: GenerationRequest)], limit: Int) throws -> [Slot] {
        var made: [Slot] = []
        var cold: [(id: Int, request: GenerationRequest, cache: KVCache)] = []
        let V = model.config.vocabSize
        func slot(_ id: Int, _ request: GenerationRequest, _ cache: KVCache, _ logits: ArraySlice<Float>, _ seconds: Double) -> Slot {
            let eos = Generator.eosIDs(request.options, model: model, tokenizer: tokenizer)
            let slot = Slot(id: id, request: request, cache: cache, eos: eos, tokenizer: tokenizer, prefillSeconds: seconds)
            slot.logits = Array(logits)
            prefixCache?.store(request.prompt, model: request.model ?? model, from: cache)
            return slot
        }
        for (id, request) in fresh {
            let cache = model.makeCache(capacity: min(limit, request.prompt.count + request.options.maxTokens + 1))
            let runner = request.model ?? model
            let reused = prefixCache?.restore(request.prompt, model: runner, into: cache) ?? 0
            guard reused > 0 else {
                cold.append((id, request, cache))
                continue
            }
            let start = Clock.seconds()
            let logits = try runner.forward(Array(request.prompt[reused...]), cache: cache, logits: .last)
            let made1 = slot(id, request, cache, logits[...], Clock.seconds() - start)
            made1.cachedTokens = reused
            made.append(made1)
        }
        var i = 0
        while i < cold.count {
            var group = [cold[i]]
            var tokens = cold[i].request.prompt.count
            i += 1
            while i < cold.count && tokens + cold[i].request.prompt.count <= prefillTokenBudget {
                tokens += cold[i].request.prompt.count
                group.append(cold[i])
                i += 1
            }
            let start = Clock.seconds()
            let logits: [Float]
            if group.count == 1 {
                logits = try (group[0].request.model ?? model).forward(group[0].request.prompt, cache: group[0].cache, logits: .last)
            } else {
                let adapters: [LlamaModel?]? = group.contains { $0.request.model != nil } ? group.map(\.request.model) : nil
                logits = try model.forward(sequences: group.map(\.request.prompt), caches: group.map(\.cache), adapters: adapters)
            }
            let seconds = Clock.seconds() - start
            for (j, entry) in group.enumerated() {
                made.append(slot(entry.id, entry.request, entry.cache, logits[(j * V)..<((j + 1) * V)], seconds))
            }
        }
        return made
    }

    /// `slots` with those of one model next to each other, in the order each model first appears.
    private static func groupedByModel(_ slots: [Slot]) -> [Slot] {
        var order: [ObjectIdentifier?] = []
        var groups: [ObjectIdentifier?: [Slot]] = [:]
        for slot in slots {
            let key = slot.adapter.map(ObjectIdentifier.init)
            if groups[key] == nil { order.append(key) }
            groups[key, default: []].append(slot)
        }
        return order.flatMap { groups[$0]! }
    }
}
