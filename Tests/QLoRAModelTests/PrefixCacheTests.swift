// Prefix caching in batched generation (what `qlora serve` runs): on the default model, a prompt that starts as an
// earlier one did copies that prefix's keys and values and runs only the rest, and generates exactly what it generates
// without the cache (greedy tokens, and each token's log-probability within 1e-3); an identical prompt reuses all but
// its last token; entries are per model (an adapter's are its own), bounded by bytes, least recently used evicted.
import QLoRA
import QLoRATestSupport
import Testing

@Suite("prefix cache")
struct PrefixCacheTests {
    static let cache = Environment.get("QLORA_CACHE") ?? FileSystem.join(Environment.get("HOME") ?? "/root", ".cache/swift-qlora")

    static func load() throws -> (LlamaModel, Tokenizer) {
        var o = LoadOptions()
        o.showProgress = false
        let path = FileSystem.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf")
        return (try LlamaModel.load(path, options: o), try Tokenizer.load(model: path))
    }

    /// Runs the prompts one after another through `generator` (greedy, 8 tokens, log-probabilities on).
    static func generate(_ generator: BatchGenerator, _ prompts: [[Int]], model: LlamaModel? = nil) throws -> [GenerationResult] {
        var results: [GenerationResult] = []
        for prompt in prompts {
            var o = GenerationOptions()
            o.maxTokens = 8
            o.sampling.temperature = 0
            o.logprobs = 0
            var pending = [GenerationRequest(prompt: prompt, options: o, model: model)]
            try generator.run(next: { pending.isEmpty ? nil : (results.count, pending.removeFirst()) }, finished: { results.append($1) })
        }
        return results
    }

    @Test("a shared prefix is copied, not run, and the generations equal those without the cache; an identical prompt reuses all but its last token")
    func reuse() throws {
        let (model, tokenizer) = try Self.load()
        let system = "You are a careful assistant who answers questions about the history of writing instruments, in two sentences at most. "
        let a = tokenizer.encode(system + "When were quills first used?"), b = tokenizer.encode(system + "What replaced the quill pen?")
        var shared = 0
        while a[shared] == b[shared] { shared += 1 }
        #expect(shared >= 20)
        let plain = try Self.generate(BatchGenerator(model: model, tokenizer: tokenizer, maxBatch: 4), [b])[0]

        let generator = BatchGenerator(model: model, tokenizer: tokenizer, maxBatch: 4)
        generator.prefixCache = PrefixCache(byteBudget: 64 << 20)
        let results = try Self.generate(generator, [a, b, b])
        #expect(results[0].cachedPromptTokens == 0 && results[1].cachedPromptTokens == shared && results[2].cachedPromptTokens == b.count - 1,
                "\(results.map(\.cachedPromptTokens)), shared \(shared)")
        for r in results[1...] {
            #expect(r.tokenIDs == plain.tokenIDs && r.text == plain.text)
            let ours = r.logprobs!.map(\.logprob), theirs = plain.logprobs!.map(\.logprob)
            #expect(zip(ours, theirs).allSatisfy { abs($0 - $1) < 1e-3 }, "\(ours) vs \(theirs)")
        }
        let stats = generator.prefixCache!.statistics
        #expect(stats.lookups == 3 && stats.hits == 2 && stats.cachedTokens == shared + b.count - 1)
        // a and b are kept (neither starts with the other).
        #expect(generator.prefixCache!.entryCount == 2)
    }

    @Test("entries are per cache type: an f16 prompt's keys are not copied into an f32 cache, and an f16 cache gets them back")
    func perCacheType() throws {
        let (model, tokenizer) = try Self.load()
        let prompt = tokenizer.encode("You are a careful assistant who answers questions about the history of writing instruments. When were quills first used?")
        let prefixes = PrefixCache(byteBudget: 64 << 20)
        let f16 = KVCache(config: model.config, capacity: prompt.count + 1, dtype: .f16)
        _ = try model.forward(prompt, cache: f16, logits: .none)
        prefixes.store(prompt, model: model, from: f16)
        #expect(prefixes.entryCount == 1 && prefixes.bytes == 2 * model.config.layerCount * prompt.count * model.config.kvHeadCount * model.config.headDim * 2)
        #expect(prefixes.restore(prompt, model: model, into: KVCache(config: model.config, capacity: prompt.count + 1, dtype: .f32)) == 0)
        let again = KVCache(config: model.config, capacity: prompt.count + 1, dtype: .f16)
        #expect(prefixes.restore(prompt, model: model, into: again) == prompt.count - 1 && again.length == prompt.count - 1)
    }

    @Test("entries are per model, bounded by bytes, least recently used evicted")
    func bounds() throws {
        let (model, tokenizer) = try Self.load()
        let a = tokenizer.encode("The first prompt, which is long enough to be kept in the prefix cache of the server."),
            b = tokenizer.encode("Another prompt that shares nothing with the first one and is also long enough to be kept.")
        let one = KVCache(config: model.config, capacity: max(a.count, b.count)).byteCount
        // Room for one entry: b's evicts a's.
        let generator = BatchGenerator(model: model, tokenizer: tokenizer, maxBatch: 2)
        generator.prefixCache = PrefixCache(byteBudget: one + one / 2)
        let results = try Self.generate(generator, [a, b, a])
        #expect(results.map(\.cachedPromptTokens) == [0, 0, 0])
        #expect(generator.prefixCache!.statistics.evictions == 2 && generator.prefixCache!.entryCount == 1)
        // Smaller than one entry: nothing kept.
        generator.prefixCache = PrefixCache(byteBudget: one / 4)
        _ = try Self.generate(generator, [a, a])
        #expect(generator.prefixCache!.entryCount == 0 && generator.prefixCache!.statistics.hits == 0)
        // An adapter's keys and values are its own: the base's entry is not used for it, nor the adapter's for the base.
        generator.prefixCache = PrefixCache(byteBudget: 64 << 20)
        var c = LoRAConfig()
        c.rank = 4
        let lora = LoRAWeights(model: model, config: c)
        var rng = SeededGenerator(seed: 3)
        for i in lora.parameters.indices { lora.parameters[i] = (rng.nextFloat() - 0.5) * 0.05 }
        let dir = try Fixtures.temporaryDirectory("prefix-adapter")
        try lora.writePEFTAdapter(to: dir, baseModel: "SmolLM2")
        let adapted = try model.withAdapter(dir)
        _ = try Self.generate(generator, [a])
        let tuned = try Self.generate(generator, [a, a], model: adapted)
        #expect(tuned.map(\.cachedPromptTokens) == [0, a.count - 1])
        generator.prefixCache!.removeAll(model: adapted)
        #expect(generator.prefixCache!.entryCount == 1)
    }
}
