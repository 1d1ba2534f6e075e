// The forward pass against transformers 5.24 (eager attention, f32) on tiny random Llama, Mistral and
// Qwen2 models with GQA, tied embeddings, llama3 and linear RoPE scaling and an explicit head_dim, and on
// the real default model read from its GGUF (Resources/, from scripts/reference/make_model_fixtures.py).
import QLoRA
import QLoRATestSupport
import Testing

private let resources = Fixtures.resources()

/// Logits agree when |ours - theirs| <= 1e-4 * max|theirs| + 1e-4 * |theirs| (f32 reference runs).
private let logitTolerance: Float = 1e-4

private func load(_ model: String, _ quant: QuantType? = nil) throws -> LlamaModel {
    var o = LoadOptions()
    o.quantType = quant
    o.showProgress = false
    return try LlamaModel.load(model, options: o)
}

private func checkClose(_ ours: [Float], _ theirs: [Float], _ label: String, tolerance: Float = logitTolerance) -> String? {
    let scale = theirs.map(abs).max() ?? 1
    return Compare.close(ours, theirs, atol: tolerance * scale, rtol: tolerance, label)
}

@Suite("model forward")
struct ModelForwardTests {
    static let tinyModels = ["tiny-llama-gqa", "tiny-llama3-rope", "tiny-llama-linear-rope", "tiny-mistral", "tiny-qwen2", "tiny-llama-headdim"]

    @Test("f32 logits equal transformers' for every tiny architecture", arguments: tinyModels)
    func logits(_ name: String) throws {
        let folder = FileSystem.join(resources, name)
        let reference = try SafetensorsFile(path: FileSystem.join(folder, "logits.safetensors"))
        let model = try load(folder)
        let ids = reference.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let expected = reference.tensor("logits")!.values(as: Float.self)
        let T = ids.count / 2, V = model.config.vocabSize
        for b in 0..<2 {
            let seq = Array(ids[(b * T)..<((b + 1) * T)])
            let ours = try model.forward(seq, cache: KVCache(config: model.config, capacity: 64), logits: .all)
            #expect(checkClose(ours, Array(expected[(b * T * V)..<((b + 1) * T * V)]), "\(name) sequence \(b)") == nil)
            // Prefill 8, then one token at a time through the cache.
            let cache = KVCache(config: model.config, capacity: 64)
            var stepped = try model.forward(Array(seq[0..<8]), cache: cache, logits: .all)
            for t in 8..<T { stepped += try model.forward([seq[t]], cache: cache, logits: .last) }
            #expect(checkClose(stepped, Array(expected[(b * T * V)..<((b + 1) * T * V)]), "\(name) cached steps \(b)") == nil)
        }
    }

    @Test("rotary frequencies equal transformers' (default, llama3 and linear scaling)", arguments: tinyModels)
    func rope(_ name: String) throws {
        let folder = FileSystem.join(resources, name)
        let reference = try SafetensorsFile(path: FileSystem.join(folder, "logits.safetensors"))
        let config = try LlamaConfig(configFile: FileSystem.join(folder, "config.json"))
        let expected = reference.tensor("rope.inv_freq")!.values(as: Float.self)
        #expect(Compare.close(config.ropeInverseFrequencies(), expected, atol: 0, rtol: 2e-7, "\(name) inv_freq") == nil)
    }

    @Test("NF4 with double quantization equals transformers + bitsandbytes NF4, also from its saved checkpoint")
    func nf4() throws {
        let folder = FileSystem.join(resources, "tiny-llama-gqa")
        let reference = try SafetensorsFile(path: FileSystem.join(folder, "logits.safetensors"))
        let ids = Array(reference.tensor("input_ids")!.values(as: Int64.self).map(Int.init)[0..<12])
        let expected = Array(reference.tensor("logits_nf4")!.values(as: Float.self)[0..<(12 * 320)])
        let ours = try load(folder, .nf4)
        let r1 = checkClose(try ours.forward(ids, cache: KVCache(config: ours.config, capacity: 32), logits: .all), expected, "nf4")
        #expect(r1 == nil, "\(r1 ?? "")")
        let stored = try load(FileSystem.join(resources, "tiny-llama-gqa-bnb-nf4"), .fp4)  // used as stored: no requantization
        let r2 = checkClose(try stored.forward(ids, cache: KVCache(config: stored.config, capacity: 32), logits: .all), expected, "stored nf4")
        #expect(r2 == nil, "\(r2 ?? "")")
        // And the f32 model differs visibly from the 4-bit one (the test would notice quantization going missing).
        let f32 = reference.tensor("logits")!.values(as: Float.self)[0..<(12 * 320)]
        #expect(zip(expected, f32).map { abs($0 - $1) }.max()! > 0.1)
    }

    @Test("generation_config.json's list of EOS ids is read")
    func eosList() throws {
        let model = try load(FileSystem.join(resources, "tiny-llama-gqa"))
        #expect(model.config.eosTokenIDs == [2, 5])
    }

    @Test("a config of an unsupported architecture is a clear error")
    func unsupported() throws {
        let json = try JSON.parse(#"{"architectures": ["GPT2LMHeadModel"], "vocab_size": 10}"#)
        #expect(throws: ModelError.unsupportedArchitecture(file: "config.json", found: "GPT2LMHeadModel")) {
            _ = try LlamaConfig(json: json, file: "config.json")
        }
        #expect(ModelError.unsupportedArchitecture(file: "c", found: "X").description.contains("LlamaForCausalLM"))
    }

    @Test("`org/name` resolves in the Hugging Face cache layout; a missing one says where it looked")
    func hubCache() throws {
        let hub = try Fixtures.temporaryDirectory("hub")
        let snap = FileSystem.join(hub, "models--acme--tiny/snapshots/abc123")
        try FileSystem.makeDirectory(FileSystem.join(hub, "models--acme--tiny"))
        try FileSystem.makeDirectory(FileSystem.join(hub, "models--acme--tiny/snapshots"))
        try FileSystem.makeDirectory(snap)
        try FileSystem.makeDirectory(FileSystem.join(hub, "models--acme--tiny/refs"))
        try FileSystem.writeFileAtomically(FileSystem.join(hub, "models--acme--tiny/refs/main"), bytes: Array("abc123\n".utf8))
        setenv("HF_HUB_CACHE", hub, 1)
        defer { unsetenv("HF_HUB_CACHE") }
        #expect(try ModelLocator.resolve("acme/tiny") == snap)
        do {
            _ = try ModelLocator.resolve("acme/absent")
            Issue.record("resolved a missing model")
        } catch {
            #expect("\(error)".contains(hub))
        }
    }
}

@Suite("default model")
struct DefaultModelTests {
    static let gguf: String = {
        let cache = Environment.get("QLORA_CACHE") ?? FileSystem.join(Environment.get("HOME") ?? "/root", ".cache/swift-qlora")
        return FileSystem.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf")
    }()
    let reference = try! SafetensorsFile(path: FileSystem.join(resources, "smollm2-logits.safetensors"))

    func run(_ quant: QuantType?, logitsName: String, greedyName: String, stopAtEOS: Bool) throws {
        let model = try load(Self.gguf, quant)
        let ids = reference.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let cache = KVCache(config: model.config, capacity: 64)
        // Logits at the last four prompt positions, then greedy decoding.
        let all = try model.forward(ids, cache: cache, logits: .all)
        let V = model.config.vocabSize
        let ours = Array(all[((ids.count - 4) * V)...])
        let theirs = reference.tensor(logitsName)!.values(as: Float.self)
        #expect(checkClose(ours, theirs, "\(logitsName)") == nil)
        var next = (0..<V).max { all[(ids.count - 1) * V + $0] < all[(ids.count - 1) * V + $1] }!
        var generated: [Int] = []
        let expected = reference.tensor(greedyName)!.values(as: Int64.self).map(Int.init)
        while generated.count < expected.count {
            generated.append(next)
            if stopAtEOS && model.config.eosTokenIDs.contains(next) { break }
            let l = try model.forward([next], cache: cache, logits: .last)
            next = (0..<V).max { l[$0] < l[$1] }!
        }
        #expect(generated == expected)
    }

    @Test("q8_0: our quantizer gives the default GGUF's own token_embd bytes (llama.cpp's q8_0); the auto head holds that table as stored")
    func q8Head() throws {
        let g = try GGUFFile(path: Self.gguf)
        let t = try #require(g.tensor("token_embd.weight"))
        #expect(t.type == .q8_0)
        let values = try g.floats(t)
        let q = try Quantized8Bit(values, shape: t.shape, name: t.name)
        // ggml's block_q8_0: f16 d, then 32 int8 codes.
        let raw = g.bytes(of: t)
        var mismatches = 0
        for b in 0..<(values.count / 32) where mismatches < 3 {
            let base = b * 34
            let d = UInt16(raw[base]) | UInt16(raw[base + 1]) << 8
            if q.scales[b].bitPattern != float16BitsToFloat(d).bitPattern { mismatches += 1; Issue.record("block \(b): scale \(q.scales[b]) vs \(float16BitsToFloat(d))") }
            for j in 0..<32 where q.codes[b * 32 + j] != Int8(bitPattern: raw[base + 2 + j]) {
                mismatches += 1
                Issue.record("block \(b) code \(j): \(q.codes[b * 32 + j]) vs \(Int8(bitPattern: raw[base + 2 + j]))")
                break
            }
        }
        #expect(mismatches == 0)
        #expect(Compare.bitEqual(q.dequantize(), values, "requantized table") == nil)
        // Read as stored, the same codes and scales.
        let stored = try Quantized8Bit(ggmlBlocks: raw, shape: t.shape, name: t.name)
        #expect(stored == q)
        let model = try load(Self.gguf, .nf4)
        #expect(model.head.storageName == "q8_0")
        #expect(Compare.bitEqual(model.embeddings.denseWeight(), values, "embedding table") == nil)
        var o = LoadOptions()
        o.showProgress = false
        o.embeddingDType = .f32
        #expect(try LlamaModel.load(Self.gguf, options: o).head.storageName == "f32")
    }

    @Test("batched decoding: each sequence of a batch gets the logits of its own decoding step (NF4 and f32 weights)",
          arguments: [QuantType.nf4, nil])
    func batched(_ quant: QuantType?) throws {
        let model = try load(Self.gguf, quant)
        let prompts = [[1, 9690, 314, 253], [1, 504, 3458], [504, 1115, 1780, 28, 260, 3205, 314], [2]]
        let V = model.config.vocabSize
        // Two copies of each sequence: one decoded alone, one in the batch.
        let alone = prompts.map { _ in KVCache(config: model.config, capacity: 32) }
        let inBatch = prompts.map { _ in KVCache(config: model.config, capacity: 32) }
        var next: [Int] = []
        for (i, p) in prompts.enumerated() {
            let l = try model.forward(p, cache: alone[i], logits: .last)
            _ = try model.forward(p, cache: inBatch[i], logits: .last)
            next.append((0..<V).max { l[$0] < l[$1] }!)
        }
        for step in 0..<4 {
            let batch = try model.forward(batch: next, caches: inBatch)
            var following: [Int] = []
            for i in 0..<prompts.count {
                let own = try model.forward([next[i]], cache: alone[i], logits: .last)
                let row = Array(batch[(i * V)..<((i + 1) * V)])
                #expect(checkClose(row, own, "step \(step) sequence \(i)", tolerance: 1e-5) == nil)
                following.append((0..<V).max { own[$0] < own[$1] }!)
            }
            #expect(inBatch.map(\.length) == alone.map(\.length))
            next = following
        }
    }

    @Test("several continuations of one prefix in one pass (MMLU's batches): each gets the logits of running alone after the prefix",
          arguments: [QuantType.nf4, nil])
    func sequences(_ quant: QuantType?) throws {
        let model = try load(Self.gguf, quant)
        let V = model.config.vocabSize
        let prefix = [1, 9690, 314, 253, 504, 3458, 28, 260]
        let continuations = [[504, 1115, 1780], [2], [3205, 314, 9690, 253, 1115, 28, 260, 504, 3458, 1780], [314, 253]]
        let shared = KVCache(config: model.config, capacity: 64)
        _ = try model.forward(prefix, cache: shared, logits: .none)
        let caches = continuations.map { _ in KVCache(config: model.config, capacity: 32) }
        for c in caches { c.copyPrefix(of: shared, count: prefix.count) }
        let together = try model.forward(sequences: continuations, caches: caches)
        for (i, tail) in continuations.enumerated() {
            let alone = KVCache(config: model.config, capacity: 32)
            let own = try model.forward(prefix + tail, cache: alone, logits: .last)
            #expect(checkClose(Array(together[(i * V)..<((i + 1) * V)]), own, "continuation \(i)", tolerance: 1e-5) == nil)
            #expect(caches[i].length == prefix.count + tail.count)
        }
        #expect(shared.length == prefix.count)
        // The caches now hold prefix + continuation: decoding on from them matches too.
        let step = try model.forward(batch: [504, 504, 504, 504], caches: caches)
        let alone = KVCache(config: model.config, capacity: 32)
        let own = try model.forward(prefix + continuations[2] + [504], cache: alone, logits: .last)
        #expect(checkClose(Array(step[(2 * V)..<(3 * V)]), own, "decoding after the pass", tolerance: 1e-5) == nil)
    }

    /// `model` with random LoRA adapters (rank 8) on every projection: the same base weights, shared.
    static func withRandomLoRA(_ model: LlamaModel, seed: UInt64) -> LlamaModel {
        var rng = SeededRandom(seed: seed)
        let paths: [WritableKeyPath<LlamaLayer, Linear>] = [\.q, \.k, \.v, \.o, \.gate, \.up, \.down]
        let rank = 8
        let layers = model.layers.map { layer -> LlamaLayer in
            var layer = layer
            for path in paths {
                var linear = layer[keyPath: path]
                let a = (0..<(rank * linear.inFeatures)).map { _ in 0.05 * rng.normal() }
                let b = (0..<(linear.outFeatures * rank)).map { _ in 0.05 * rng.normal() }
                linear.lora = Linear.LoRA(a: a, b: b, rank: rank, scale: 2)
                layer[keyPath: path] = linear
            }
            return layer
        }
        return LlamaModel(config: model.config, embeddings: model.embeddings, layers: layers, finalNorm: model.finalNorm,
                          lmHead: model.lmHead, source: "random LoRA \(seed)")
    }

    @Test("mixed adapters in one batch: each row takes its own model's LoRA, in a decoding step and in a prefill of several prompts")
    func mixedAdapters() throws {
        let base = try load(Self.gguf, .nf4)
        let first = Self.withRandomLoRA(base, seed: 1), second = Self.withRandomLoRA(base, seed: 2)
        let V = base.config.vocabSize
        // Rows: base, first, second, first (one adapter's rows apart), second.
        let models: [LlamaModel] = [base, first, second, first, second]
        let prompts = [[1, 9690, 314, 253], [1, 504, 3458], [504, 1115, 1780, 28, 260, 3205, 314], [2, 504], [9690, 28]]
        let adapters: [LlamaModel?] = models.map { $0 === base ? nil : $0 }
        let together = prompts.map { _ in KVCache(config: base.config, capacity: 32) }
        let prefilled = try base.forward(sequences: prompts, caches: together, adapters: adapters)
        let alone = prompts.map { _ in KVCache(config: base.config, capacity: 32) }
        var next: [Int] = []
        for (i, p) in prompts.enumerated() {
            let own = try models[i].forward(p, cache: alone[i], logits: .last)
            #expect(checkClose(Array(prefilled[(i * V)..<((i + 1) * V)]), own, "prefill row \(i)", tolerance: 1e-5) == nil)
            next.append((0..<V).max { own[$0] < own[$1] }!)
        }
        // The adapters change the logits visibly, so a row that lost its adapter would fail above.
        let plain = try base.forward(prompts[1], cache: KVCache(config: base.config, capacity: 32), logits: .last)
        let adapted = try first.forward(prompts[1], cache: KVCache(config: base.config, capacity: 32), logits: .last)
        #expect(zip(plain, adapted).map { abs($0 - $1) }.max()! > 0.5)
        for step in 0..<3 {
            let batch = try base.forward(batch: next, caches: together, adapters: adapters)
            var following: [Int] = []
            for i in 0..<prompts.count {
                let own = try models[i].forward([next[i]], cache: alone[i], logits: .last)
                #expect(checkClose(Array(batch[(i * V)..<((i + 1) * V)]), own, "step \(step) row \(i)", tolerance: 1e-5) == nil)
                following.append((0..<V).max { own[$0] < own[$1] }!)
            }
            next = following
        }
        // A list of the wrong length, or a model of another shape, is an error.
        #expect(throws: ForwardError.self) { _ = try base.forward(batch: [504], caches: [KVCache(config: base.config, capacity: 4)], adapters: [nil, nil]) }
        let tiny = try load(FileSystem.join(resources, "tiny-llama-gqa"))
        #expect(throws: ForwardError.self) { _ = try base.forward(batch: [504], caches: [KVCache(config: base.config, capacity: 4)], adapters: [tiny]) }
    }

    @Test("decoding past 128 cached positions (attention split over the workers by ranges of positions) gives the logits of one forward over the whole sequence, with each cache type",
          arguments: KVCacheDType.allCases)
    func longDecode(dtype: KVCacheDType) throws {
        let model = try load(Self.gguf, .nf4)
        let ids = reference.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let sequence = Array((0..<20).flatMap { _ in ids }.prefix(LlamaModel.splitAttentionFrom + 12))
        let whole = try model.forward(sequence, cache: KVCache(config: model.config, capacity: sequence.count, dtype: dtype), logits: .all)
        let cache = KVCache(config: model.config, capacity: sequence.count, dtype: dtype)
        let start = LlamaModel.splitAttentionFrom - 2
        _ = try model.forward(Array(sequence.prefix(start)), cache: cache, logits: .none)
        let V = model.config.vocabSize
        // Steps below and above the split's threshold: each one token against the same row of the whole. A 16-bit cache
        // rounds keys the two paths computed with sums in another order: an element on a rounding boundary lands one
        // unit apart (2^-11 relative in f16, 2^-8 in bf16), and a large key times a large query moves a score by more
        // than f32's differences do (measured, largest |logit difference|: f32 4.7e-5, f16 5.7e-3, bf16 4.7e-2).
        let tolerance: Float = dtype == .f32 ? 1e-4 : dtype == .f16 ? 1e-3 : 8e-3
        var worst: Float = 0
        for t in start..<sequence.count {
            let step = try model.forward([sequence[t]], cache: cache, logits: .last)
            let row = Array(whole[(t * V)..<((t + 1) * V)])
            worst = max(worst, zip(step, row).map { abs($0 - $1) }.max()!)
            #expect(checkClose(step, row, "\(dtype) position \(t)", tolerance: tolerance) == nil)
        }
        print("\(dtype) cache: token by token against the whole sequence, largest |logit difference| \(worst)")
        // (With one worker the split does not run; these machines have two.)
    }

    @Test("a 16-bit KV cache keeps every logit within its rounding of the f32 cache's, and the argmax, over a long sequence")
    func sixteenBitCache() throws {
        let model = try load(Self.gguf, .nf4)
        let ids = reference.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let sequence = Array((0..<40).flatMap { _ in ids }.prefix(300))
        let V = model.config.vocabSize
        func logits(_ dtype: KVCacheDType) throws -> [Float] {
            try model.forward(sequence, cache: KVCache(config: model.config, capacity: sequence.count, dtype: dtype), logits: .all)
        }
        let f32 = try logits(.f32)
        for dtype in [KVCacheDType.f16, .bf16] {
            let other = try logits(dtype)
            var worst: Float = 0, sameArgmax = 0
            for t in 0..<sequence.count {
                let a = f32[(t * V)..<((t + 1) * V)], b = other[(t * V)..<((t + 1) * V)]
                worst = max(worst, zip(a, b).map { abs($0 - $1) }.max()! / (a.max()! - a.min()!))
                if a.indices.max(by: { a[$0] < a[$1] }) == b.indices.max(by: { b[$0] < b[$1] }) { sameArgmax += 1 }
            }
            print("\(dtype) cache against f32: largest |logit difference| / logit range \(worst); same argmax at \(sameArgmax) of \(sequence.count)")
            #expect(worst > 0, "\(dtype): the cache was rounded")
            #expect(worst < (dtype == .f16 ? 0.01 : 0.05), "\(dtype)")
            #expect(sameArgmax >= sequence.count - 3, "\(dtype)")
        }
    }

    @Test("bf16 compute (prefill over many rows) stays within bf16 rounding of f32 and keeps its argmax; f32 where the CPU lacks AVX512-BF16")
    func bf16Prefill() throws {
        let model = try load(Self.gguf, .nf4)
        let ids = reference.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let prompt = Array((0..<4).flatMap { _ in ids }.prefix(48))  // more rows than the matrix-vector kernels take
        #expect(prompt.count > Linear.batchedRowLimit)
        func logits(_ dtype: ComputeDType) throws -> [Float] {
            model.computeDType = dtype
            defer { model.computeDType = .f32 }
            return try model.forward(prompt, cache: KVCache(config: model.config, capacity: 64), logits: .all)
        }
        let f32 = try logits(.f32), bf16 = try logits(.bf16)
        if !BF16Gemm.isSupported {
            #expect(Compare.bitEqual(bf16, f32, "no AVX512-BF16: bf16 computes in f32") == nil)
            return
        }
        let V = model.config.vocabSize
        var worst: Float = 0, sameArgmax = 0
        for t in 0..<prompt.count {
            let a = f32[(t * V)..<((t + 1) * V)], b = bf16[(t * V)..<((t + 1) * V)]
            let spread = a.max()! - a.min()!
            worst = max(worst, zip(a, b).map { abs($0 - $1) }.max()! / spread)
            if a.indices.max(by: { a[$0] < a[$1] }) == b.indices.max(by: { b[$0] < b[$1] }) { sameArgmax += 1 }
        }
        print("bf16 prefill: largest |logit difference| / logit range \(worst); same argmax at \(sameArgmax) of \(prompt.count) positions")
        #expect(worst > 0, "the bf16 path ran")
        #expect(worst < 0.05)  // 0.016 measured (Zen 4); a wrong operand layout gives ~1
        #expect(sameArgmax >= prompt.count - 2)
    }

    @Test("bf16 compute when decoding (the 4-bit products of a few rows in bf16): each step gets the logits of the bf16 pass over the whole sequence, a batch those of each sequence alone, within bf16 rounding of f32")
    func bf16Decode() throws {
        let model = try load(Self.gguf, .nf4)
        // The AVX512-BF16 kernels, or the scalar references where the CPU lacks them (the same results, slowly).
        let kernels = KernelTable.current.withBF16(BF16Kernels.avx512bf16 ?? .reference)
        let ids = reference.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let sequence = Array((ids + ids).prefix(20)), start = 17  // the whole and the prefill: more rows than the matrix-vector kernels take
        #expect(start > Linear.batchedRowLimit)
        let V = model.config.vocabSize
        func run(_ dtype: ComputeDType, _ body: () throws -> [Float]) rethrows -> [Float] {
            model.computeDType = dtype
            defer { model.computeDType = .f32 }
            return try body()
        }
        let whole = try run(.bf16) { try model.forward(sequence, cache: KVCache(config: model.config, capacity: 32), logits: .all, kernels: kernels) }
        // Two caches prefilled alike in bf16, then decoded token by token: one in bf16, one in f32 (the first step's
        // difference is the step's own products).
        let caches = [KVCache(config: model.config, capacity: 32), KVCache(config: model.config, capacity: 32)]
        for cache in caches { _ = try run(.bf16) { try model.forward(Array(sequence.prefix(start)), cache: cache, logits: .none, kernels: kernels) } }
        var againstWhole: Float = 0, againstF32: [Float] = []
        for t in start..<sequence.count {
            let step = try run(.bf16) { try model.forward([sequence[t]], cache: caches[0], logits: .last, kernels: kernels) }
            let plain = try run(.f32) { try model.forward([sequence[t]], cache: caches[1], logits: .last, kernels: kernels) }
            let row = Array(whole[(t * V)..<((t + 1) * V)])
            let spread = row.max()! - row.min()!
            againstWhole = max(againstWhole, zip(step, row).map { abs($0 - $1) }.max()! / spread)
            againstF32.append(zip(step, plain).map { abs($0 - $1) }.max()! / spread)
            #expect(step.indices.max { step[$0] < step[$1] } == plain.indices.max { plain[$0] < plain[$1] }, "position \(t): argmax")
        }
        print("bf16 decoding: largest |logit difference| / logit range against the bf16 whole-sequence pass \(againstWhole), against f32 decoding \(againstF32)")
        // Both paths round the same weights and inputs to bf16; they sum in other orders, and a sum that lands on
        // the other side of a bf16 rounding boundary moves the next product's input by one bf16 unit.
        #expect(againstWhole < 0.01)
        #expect(againstF32[0] > 1e-4, "the first step's products ran in bf16 (f32 sums in another order differ by ~1e-6)")
        #expect(againstF32.max()! < 0.05)  // bf16 rounding; a wrong operand order gives ~1
        // A batch of sequences in bf16: each row the logits of its sequence decoded alone (the 4-bit products take each
        // input on its own; the q8_0 head sums in another order for several inputs).
        model.computeDType = .bf16
        defer { model.computeDType = .f32 }
        let prompts = [Array(ids.prefix(5)), Array(ids.suffix(3)), [504, 1115, 1780]]
        let alone = prompts.map { _ in KVCache(config: model.config, capacity: 16) }, together = prompts.map { _ in KVCache(config: model.config, capacity: 16) }
        for (i, p) in prompts.enumerated() {
            _ = try model.forward(p, cache: alone[i], logits: .none, kernels: kernels)
            _ = try model.forward(p, cache: together[i], logits: .none, kernels: kernels)
        }
        let next = [504, 28, 260]
        let batch = try model.forward(batch: next, caches: together, kernels: kernels)
        for i in 0..<prompts.count {
            let own = try model.forward([next[i]], cache: alone[i], logits: .last, kernels: kernels)
            #expect(checkClose(Array(batch[(i * V)..<((i + 1) * V)]), own, "bf16 batch, sequence \(i)", tolerance: 1e-5) == nil)
        }
    }

    @Test("SmolLM2 from GGUF, f32: logits and greedy tokens equal transformers'")
    func f32() throws {
        try run(nil, logitsName: "logits_last", greedyName: "greedy_ids", stopAtEOS: true)
    }

    @Test("SmolLM2 from GGUF in NF4 + DQ: logits and greedy tokens equal transformers + bitsandbytes'")
    func nf4() throws {
        try run(.nf4, logitsName: "logits_last_nf4", greedyName: "greedy_ids_nf4", stopAtEOS: false)
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

@Suite("model errors")
struct ModelErrorTests {
    @Test("a config without a required key names the key and the file")
    func missingKey() throws {
        let json = try JSON.parse(#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "num_attention_heads": 2, "intermediate_size": 8, "num_hidden_layers": 1}"#)
        do {
            _ = try LlamaConfig(json: json, file: "/m/config.json")
            Issue.record("accepted a config without hidden_size")
        } catch {
            #expect("\(error)".contains("/m/config.json") && "\(error)".contains("hidden_size"), "\(error)")
        }
    }

    @Test("a prompt longer than the context is a clear error, and the cache is unchanged")
    func contextFull() throws {
        var o = LoadOptions()
        o.showProgress = false
        let model = try LlamaModel.load(FileSystem.join(Fixtures.resources(), "tiny-llama-gqa"), options: o)
        let cache = KVCache(config: model.config, capacity: 8)
        _ = try model.forward([1, 2, 3], cache: cache)
        #expect(throws: ForwardError.contextFull(capacity: 8, needed: 10)) { _ = try model.forward(Array(repeating: 4, count: 7), cache: cache) }
        #expect(cache.length == 3)
        #expect(throws: ForwardError.tokenOutOfRange(token: 999, vocab: 320)) { _ = try model.forward([999], cache: cache) }
        #expect(ForwardError.contextFull(capacity: 8, needed: 10).description.contains("context"))
    }

    @Test("a model folder without tokenizer.json: the error says what is missing")
    func missingTokenizer() throws {
        let folder = FileSystem.join(Fixtures.resources(), "tiny-llama-gqa")
        do {
            _ = try Tokenizer.load(model: folder)
            Issue.record("loaded a tokenizer from a folder without one")
        } catch {
            #expect("\(error)".contains("tokenizer.json"), "\(error)")
        }
    }

    @Test("a checkpoint missing a tensor names it")
    func missingTensor() throws {
        let dir = try Fixtures.temporaryDirectory("partial")
        let source = FileSystem.join(Fixtures.resources(), "tiny-llama-gqa")
        try FileSystem.writeFileAtomically(FileSystem.join(dir, "config.json"), bytes: try FileSystem.readFile(FileSystem.join(source, "config.json")))
        let full = try SafetensorsFile(path: FileSystem.join(source, "model.safetensors"))
        let kept = full.names.filter { $0 != "model.layers.1.mlp.up_proj.weight" }.map { ($0, full.tensor($0)!) }
        try SafetensorsWriter.write(path: FileSystem.join(dir, "model.safetensors"), tensors: kept)
        #expect(throws: ModelError.missingTensor(file: dir, tensor: "model.layers.1.mlp.up_proj.weight")) {
            var o = LoadOptions()
            o.showProgress = false
            _ = try LlamaModel.load(dir, options: o)
        }
    }

    @Test("bf16 and f16 checkpoints load (converted exactly to f32) and give the same logits as their f32 values")
    func halfPrecision() throws {
        let source = FileSystem.join(Fixtures.resources(), "tiny-llama-gqa")
        let full = try SafetensorsFile(path: FileSystem.join(source, "model.safetensors"))
        var o = LoadOptions()
        o.quantType = nil
        o.showProgress = false
        for dtype in [DType.bf16, .f16] {
            let dir = try Fixtures.temporaryDirectory("half")
            try FileSystem.writeFileAtomically(FileSystem.join(dir, "config.json"), bytes: try FileSystem.readFile(FileSystem.join(source, "config.json")))
            var narrow: [(String, TensorView)] = []
            var rounded: [(String, TensorView)] = []
            for name in full.names {
                let f = full.tensor(name)!.floats()
                let bits = f.map { dtype == .bf16 ? floatToBFloat16Bits($0) : floatToFloat16Bits($0) }
                narrow.append((name, .make(bits, dtype: dtype, shape: full.entry(name)!.shape)))
                let back = bits.map { dtype == .bf16 ? bfloat16BitsToFloat($0) : float16BitsToFloat($0) }
                rounded.append((name, .make(back, dtype: .f32, shape: full.entry(name)!.shape)))
            }
            try SafetensorsWriter.write(path: FileSystem.join(dir, "model.safetensors"), tensors: narrow)
            let f32dir = try Fixtures.temporaryDirectory("halfref")
            try FileSystem.writeFileAtomically(FileSystem.join(f32dir, "config.json"), bytes: try FileSystem.readFile(FileSystem.join(source, "config.json")))
            try SafetensorsWriter.write(path: FileSystem.join(f32dir, "model.safetensors"), tensors: rounded)
            // An f32 head, so that both models run the same products: the values must be the same bits.
            var exact = o
            exact.embeddingDType = .f32
            let a = try LlamaModel.load(dir, options: exact), b = try LlamaModel.load(f32dir, options: exact)
            let ids = [1, 7, 42, 9, 100]
            let expected = try b.forward(ids, cache: KVCache(config: b.config, capacity: 8), logits: .all)
            #expect(try a.forward(ids, cache: KVCache(config: a.config, capacity: 8), logits: .all) == expected, "\(dtype)")
            // By default a bf16 table stays bf16 (the same values, half the memory); an f16 one becomes f32.
            let auto = try LlamaModel.load(dir, options: o)
            #expect(auto.head.storageName == (dtype == .bf16 ? "bf16" : "f32"))
            let logits = try auto.forward(ids, cache: KVCache(config: auto.config, capacity: 8), logits: .all)
            #expect(checkClose(logits, expected, "\(dtype) auto head", tolerance: 1e-5) == nil)
        }
    }
}

@Suite("PEFT adapters")
struct AdapterTests {
    @Test("a PEFT LoRA adapter (all projections, rsLoRA subset, Qwen2 with biases) gives PEFT's logits",
          arguments: [("tiny-llama-gqa", "tiny-llama-gqa-lora"), ("tiny-llama-gqa", "tiny-llama-gqa-lora-rs"), ("tiny-qwen2", "tiny-qwen2-lora")])
    func adapter(_ base: String, _ adapter: String) throws {
        var o = LoadOptions()
        o.quantType = nil
        o.showProgress = false
        let model = try LlamaModel.load(FileSystem.join(resources, base), options: o).withAdapter(FileSystem.join(resources, adapter))
        let reference = try SafetensorsFile(path: FileSystem.join(resources, adapter, "expected_logits.safetensors"))
        let ids = reference.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let expected = reference.tensor("logits")!.values(as: Float.self)
        let T = ids.count / 2, V = model.config.vocabSize
        for b in 0..<2 {
            let ours = try model.forward(Array(ids[(b * T)..<((b + 1) * T)]), cache: KVCache(config: model.config, capacity: 32), logits: .all)
            #expect(checkClose(ours, Array(expected[(b * T * V)..<((b + 1) * T * V)]), "\(adapter) sequence \(b)") == nil)
            // One token at a time (decoding's few-row LoRA path).
            let cache = KVCache(config: model.config, capacity: 32)
            var stepped: [Float] = []
            for t in 0..<T { stepped += try model.forward([ids[b * T + t]], cache: cache, logits: .last) }
            #expect(checkClose(stepped, Array(expected[(b * T * V)..<((b + 1) * T * V)]), "\(adapter) sequence \(b), stepped") == nil)
        }
    }

    @Test("the few-row LoRA product (decoding) equals the BLAS one (many rows), small and large adapters")
    func fewRowLoRA() throws {
        var rng = SeededRandom(seed: 3)
        for (inF, outF, rank) in [(24, 40, 4), (576, 1536, 64), (37, 19, 3)] {
            var linear = Linear(weight: .dense((0..<(inF * outF)).map { _ in 0.1 * rng.normal() }), outFeatures: outF, inFeatures: inF)
            linear.lora = Linear.LoRA(a: (0..<(rank * inF)).map { _ in rng.normal() }, b: (0..<(outF * rank)).map { _ in rng.normal() }, rank: rank, scale: 0.5)
            let rows = Linear.batchedRowLimit + 4
            let x = (0..<(rows * inF)).map { _ in rng.normal() }
            var many = [Float](repeating: 0, count: rows * outF)
            var few = [Float](repeating: 0, count: 3 * outF)
            var plain = [Float](repeating: 0, count: 3 * outF)
            var bare = linear
            bare.lora = nil
            let scratch = UnsafeMutablePointer<Float>.allocate(capacity: 1)  // dense weights use none
            defer { scratch.deallocate() }
            x.withUnsafeBufferPointer { xp in
                many.withUnsafeMutableBufferPointer { linear.forward(xp.baseAddress!, rows: rows, into: $0.baseAddress!, scratch: scratch) }
                few.withUnsafeMutableBufferPointer { linear.forward(xp.baseAddress!, rows: 3, into: $0.baseAddress!, scratch: scratch) }
                plain.withUnsafeMutableBufferPointer { bare.forward(xp.baseAddress!, rows: 3, into: $0.baseAddress!, scratch: scratch) }
            }
            #expect(Compare.close(few, Array(many[0..<(3 * outF)]), atol: 1e-4, rtol: 1e-5, "\(inF)x\(outF) r\(rank)") == nil)
            #expect(zip(few, plain).map { abs($0 - $1) }.max()! > 1)
        }
    }

    @Test("an adapter for another model shape is refused with the tensor named")
    func mismatch() throws {
        var o = LoadOptions()
        o.showProgress = false
        let model = try LlamaModel.load(FileSystem.join(resources, "tiny-llama-gqa"), options: o)
        do {
            _ = try model.withAdapter(FileSystem.join(resources, "tiny-qwen2-lora"))
            Issue.record("applied an adapter of another shape")
        } catch {
            #expect("\(error)".contains("lora_"), "\(error)")
        }
    }
}
