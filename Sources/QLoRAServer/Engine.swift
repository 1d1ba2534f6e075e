// The generation side of `qlora serve`: one thread owns the models and decodes every request in flight
// together (continuous batching through BatchGenerator), fed from a bounded queue by the HTTP handlers,
// oldest first. Requests for the base and for each adapter share the 4-bit base weights and one batch:
// each batched step applies every request's own LoRA adapters to its own rows.
import Foundation
import QLoRACore
import QLoRAGeneration
import QLoRAModel
import QLoRATokenizer

/// One request as the engine runs it.
public final class EngineJob: @unchecked Sendable {
    public let model: String
    public let request: GenerationRequest
    /// Each new piece of the reply; false stops the generation (the client went away).
    let onText: @Sendable (String) -> Bool
    let onDone: @Sendable (Result<GenerationResult, Error>) -> Void
    let queued = Clock.seconds()

    public init(model: String, request: GenerationRequest, onText: @escaping @Sendable (String) -> Bool = { _ in true },
                onDone: @escaping @Sendable (Result<GenerationResult, Error>) -> Void) {
        self.model = model
        self.request = request
        self.onText = onText
        self.onDone = onDone
    }
}

public final class Engine: @unchecked Sendable {
    public let tokenizer: Tokenizer
    public let maxBatch: Int
    public let maxQueue: Int
    private var models: [String: LlamaModel]
    private var order: [String]
    private let condition = NSCondition()
    private var waiting: [EngineJob] = []
    private var running = 0
    private var stopped = false
    private var thread: Thread?
    // Counters for /metrics and the logs.
    private(set) var completed = 0
    private(set) var generatedTokens = 0
    private(set) var promptTokens = 0
    /// The most requests one batched step has decoded together.
    private(set) var largestBatch = 0
    /// Keys and values of earlier prompts, reused by later ones that start the same way (nil: off).
    public let prefixCache: PrefixCache?

    /// `models`: the base first, then each adapter, by the id clients name in "model".
    public init(models: [(id: String, model: LlamaModel)], tokenizer: Tokenizer, maxBatch: Int, maxQueue: Int, prefixCache: PrefixCache? = nil) {
        self.prefixCache = prefixCache
        precondition(!models.isEmpty && maxBatch >= 1 && maxQueue >= 1)
        self.models = Dictionary(uniqueKeysWithValues: models.map { ($0.id, $0.model) })
        order = models.map(\.id)
        self.tokenizer = tokenizer
        self.maxBatch = maxBatch
        self.maxQueue = maxQueue
    }

    public var modelIDs: [String] { condition.withLock { order } }
    public var baseID: String { condition.withLock { order[0] } }
    public func model(_ id: String) -> LlamaModel? { condition.withLock { models[id] } }
    public var contextLength: Int { condition.withLock { models[order[0]]!.config.maxPositions } }

    /// Adds (or replaces) an adapter's model while serving.
    public func add(id: String, model: LlamaModel) {
        let replaced: LlamaModel? = condition.withLock {
            if models[id] == nil { order.append(id) }
            defer { models[id] = model }
            return models[id]
        }
        if let replaced { prefixCache?.removeAll(model: replaced) }
    }

    /// Removes an adapter; requests already queued for it fail. False when there is no such adapter or
    /// it is the base.
    public func remove(id: String) -> Bool {
        let dropped: [EngineJob]? = condition.withLock {
            guard id != order[0], let model = models[id] else { return nil }
            prefixCache?.removeAll(model: model)
            models[id] = nil
            order.removeAll { $0 == id }
            let gone = waiting.filter { $0.model == id }
            waiting.removeAll { $0.model == id }
            return gone
        }
        guard let dropped else { return false }
        for job in dropped { job.onDone(.failure(EngineError.modelRemoved(id))) }
        return true
    }

    /// Queues a job; false when the queue is full (the caller answers 429).
    public func submit(_ job: EngineJob) -> Bool {
        condition.withLock {
            guard waiting.count < maxQueue else { return false }
            waiting.append(job)
            condition.signal()
            return true
        }
    }

    /// Requests waiting and decoding.
    public var load: (waiting: Int, running: Int) { condition.withLock { (waiting.count, running) } }
    public var counters: (completed: Int, promptTokens: Int, generatedTokens: Int, largestBatch: Int) {
        condition.withLock { (completed, promptTokens, generatedTokens, largestBatch) }
    }

    public func start() {
        let t = Thread { [self] in loop() }
        t.name = "qlora-engine"
        t.stackSize = 8 << 20
        thread = t
        t.start()
    }

    public func stop() {
        condition.withLock {
            stopped = true
            condition.broadcast()
        }
    }

    private func loop() {
        while true {
            let ready: Bool = condition.withLock {
                while waiting.isEmpty && !stopped { condition.wait() }
                return !stopped
            }
            guard ready else { return }
            // The base as it is now; adapters loaded while this batch runs join it.
            let base = condition.withLock { models[order[0]]! }
            var jobs: [Int: EngineJob] = [:]
            var nextID = 0
            let generator = BatchGenerator(model: base, tokenizer: tokenizer, maxBatch: maxBatch)
            generator.prefixCache = prefixCache
            do {
                try generator.run(next: { () -> (id: Int, request: GenerationRequest)? in
                    while true {
                        let taken: (EngineJob, LlamaModel?)? = condition.withLock {
                            guard !stopped, !waiting.isEmpty else { return nil }
                            let job = waiting.removeFirst()
                            let model = models[job.model]
                            if model != nil { running += 1 }
                            return (job, model)
                        }
                        guard let (job, model) = taken else { return nil }
                        guard let model else {
                            // The adapter went away between queueing and running.
                            job.onDone(.failure(EngineError.modelRemoved(job.model)))
                            continue
                        }
                        nextID += 1
                        jobs[nextID] = job
                        var request = job.request
                        request.model = model === base ? nil : model
                        return (nextID, request)
                    }
                }, finished: { id, result in
                    let job = jobs.removeValue(forKey: id)!
                    let widest = generator.largestBatch
                    condition.withLock {
                        // Before the reply goes out, so that /metrics read after it counts this batch.
                        largestBatch = max(largestBatch, widest)
                        running -= 1
                        completed += 1
                        promptTokens += result.promptTokens
                        generatedTokens += result.tokenIDs.count
                    }
                    job.onDone(.success(result))
                }, shouldStop: { self.condition.withLock { self.stopped } }, onText: { id, piece in
                    jobs[id]?.onText(piece) ?? false
                })
            } catch {
                // A request the batch could not take (checked before queueing, so rare): fail what it held.
                condition.withLock { running -= jobs.count }
                for (_, job) in jobs { job.onDone(.failure(error)) }
            }
        }
    }
}

public enum EngineError: Error, CustomStringConvertible {
    case modelRemoved(String)
    public var description: String {
        switch self {
        case let .modelRemoved(id): return "the model \"\(id)\" was unloaded before this request ran"
        }
    }
}
