// Prefix caching for continuous batching: the keys and values of prompts already run are kept (bounded by bytes,
// least recently used evicted), and a new prompt that starts with one of them (a shared system prompt, the earlier
// turns of a conversation) copies that prefix into its cache and prefills only the rest, as llama-server's prompt
// cache and vLLM's automatic prefix caching do. Entries are per model (the base, or the base with an adapter: an
// adapter changes the keys and values), holding the model so that it is not confused with another at its address.
import Foundation
import QLoRACore
import QLoRAModel

public final class PrefixCache: @unchecked Sendable {
    private struct Entry {
        let model: LlamaModel
        let tokens: [Int]
        let cache: KVCache
        var lastUsed: UInt64
    }

    /// The most bytes of keys and values kept.
    public let byteBudget: Int
    /// A shared prefix shorter than this is run again rather than copied.
    public let minimumTokens: Int
    private var entries: [Entry] = []
    private var clock: UInt64 = 0
    private let lock = NSLock()
    private var counts = (lookups: 0, hits: 0, cachedTokens: 0, evictions: 0)

    public init(byteBudget: Int, minimumTokens: Int = 16) {
        self.byteBudget = byteBudget
        self.minimumTokens = max(1, minimumTokens)
    }

    /// Bytes of keys and values held now.
    public var bytes: Int { lock.withLock { entries.reduce(0) { $0 + $1.cache.byteCount } } }
    public var entryCount: Int { lock.withLock { entries.count } }
    /// Lookups, those that reused a prefix, the prompt tokens they did not run again, and entries evicted.
    public var statistics: (lookups: Int, hits: Int, cachedTokens: Int, evictions: Int) { lock.withLock { counts } }

    /// Copies into `cache` (empty) the longest kept prefix of `prompt` for `model`, leaving at least one token of the
    /// prompt to run (its logits start the reply); returns the positions copied (0: none).
    public func restore(_ prompt: [Int], model: LlamaModel, into cache: KVCache) -> Int {
        lock.withLock {
            counts.lookups += 1
            var best = -1, bestLength = 0
            for (i, e) in entries.enumerated() where e.model === model && e.cache.dtype == cache.dtype {
                let n = min(e.tokens.count, prompt.count - 1)
                var k = 0
                while k < n && e.tokens[k] == prompt[k] { k += 1 }
                if k > bestLength { best = i; bestLength = k }
            }
            guard best >= 0, bestLength >= minimumTokens, bestLength <= cache.capacity else { return 0 }
            clock += 1
            entries[best].lastUsed = clock
            cache.copyPrefix(of: entries[best].cache, count: bestLength)
            counts.hits += 1
            counts.cachedTokens += bestLength
            return bestLength
        }
    }

    /// Keeps the keys and values of `prompt`'s positions in `cache` (which has run at least that far) for `model`,
    /// unless a kept entry already starts with the whole prompt; entries that are prefixes of it are dropped, and the
    /// least recently used go while the budget is exceeded (a prompt larger than the budget is not kept).
    public func store(_ prompt: [Int], model: LlamaModel, from cache: KVCache) {
        guard prompt.count >= minimumTokens, cache.length >= prompt.count else { return }
        let copy = KVCache(config: model.config, capacity: prompt.count, dtype: cache.dtype)
        guard copy.byteCount <= byteBudget else { return }
        lock.withLock {
            clock += 1
            if let i = entries.firstIndex(where: { $0.model === model && $0.cache.dtype == cache.dtype && $0.tokens.count >= prompt.count && Array($0.tokens.prefix(prompt.count)) == prompt }) {
                entries[i].lastUsed = clock
                return
            }
            entries.removeAll { $0.model === model && $0.cache.dtype == cache.dtype && $0.tokens.count < prompt.count && Array(prompt.prefix($0.tokens.count)) == $0.tokens }
            copy.copyPrefix(of: cache, count: prompt.count)
            entries.append(Entry(model: model, tokens: prompt, cache: copy, lastUsed: clock))
            var total = entries.reduce(0) { $0 + $1.cache.byteCount }
            while total > byteBudget, let oldest = entries.indices.min(by: { entries[$0].lastUsed < entries[$1].lastUsed }) {
                total -= entries[oldest].cache.byteCount
                entries.remove(at: oldest)
                counts.evictions += 1
            }
        }
    }

    /// Forgets the entries of `model` (an adapter unloaded), or all.
    public func removeAll(model: LlamaModel? = nil) {
        lock.withLock { entries.removeAll { model == nil || $0.model === model } }
    }
}
