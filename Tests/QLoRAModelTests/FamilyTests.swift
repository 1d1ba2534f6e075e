// The families beyond Llama through the one block, each against transformers 5.24 (f32, eager attention),
// bitsandbytes and PEFT on a tiny random model of its own (Resources/, from
// scripts/reference/make_family_fixtures.py): Qwen3 (per-head q/k norms, head_dim apart from hidden / heads),
// Gemma 3 text ((1 + w) norms, four a block, GELU-tanh, scaled embeddings, sliding-window layers with their
// own RoPE base, linear scaling on the global layer), Phi-3 (fused qkv_proj and gate_up_proj, partial rotary,
// a sliding window), and GGUF files of these and of Qwen2 as llama.cpp's own converter writes them.
import QLoRA
import QLoRATestSupport
import Testing

private let resources = Fixtures.resources()

private func load(_ path: String, _ quant: QuantType? = nil) throws -> LlamaModel {
    var o = LoadOptions()
    o.quantType = quant
    o.showProgress = false
    return try LlamaModel.load(path, options: o)
}

/// |ours - theirs| <= 1e-4 · max|theirs| + 1e-4 · |theirs|.
private func close(_ ours: [Float], _ theirs: [Float], _ label: String, tolerance: Float = 1e-4) -> String? {
    let scale = theirs.map(abs).max() ?? 1
    return Compare.close(ours, theirs, atol: tolerance * scale, rtol: tolerance, label)
}

private struct Reference {
    let file: SafetensorsFile
    init(_ family: String) throws { file = try SafetensorsFile(path: FileSystem.join(resources, family, "reference.safetensors")) }
    func floats(_ name: String) -> [Float] { file.tensor(name)!.values(as: Float.self) }
    func ints(_ name: String) -> [Int] { file.tensor(name)!.values(as: Int64.self).map(Int.init) }
}

/// Full-sequence logits of both sequences, and the same through the cache (prefill 8, then one at a time).
private func checkLogits(_ model: LlamaModel, _ ref: Reference, expected name: String, _ label: String, tolerance: Float = 1e-4) throws {
    let ids = ref.ints("input_ids"), expected = ref.floats(name)
    let T = ids.count / 2, V = model.config.vocabSize
    for b in 0..<2 {
        let seq = Array(ids[(b * T)..<((b + 1) * T)]), want = Array(expected[(b * T * V)..<((b + 1) * T * V)])
        let full = try model.forward(seq, cache: KVCache(config: model.config, capacity: 32), logits: .all)
        let r1 = close(full, want, "\(label) sequence \(b)", tolerance: tolerance)
        #expect(r1 == nil, "\(r1 ?? "")")
        let cache = KVCache(config: model.config, capacity: 32)
        var stepped = try model.forward(Array(seq[0..<8]), cache: cache, logits: .all)
        for t in 8..<T { stepped += try model.forward([seq[t]], cache: cache, logits: .last) }
        let r2 = close(stepped, want, "\(label) cached steps \(b)", tolerance: tolerance)
        #expect(r2 == nil, "\(r2 ?? "")")
    }
}

/// Greedy decoding of the reference's prompt through a KV cache, as many tokens as transformers generated.
private func greedyTokens(_ model: LlamaModel, _ ref: Reference) throws -> [Int] {
    let cache = KVCache(config: model.config, capacity: 32)
    var logits = try model.forward(ref.ints("greedy_prompt"), cache: cache)
    var tokens: [Int] = []
    for _ in 0..<ref.ints("greedy_ids").count {
        let next = logits.indices.max { logits[$0] < logits[$1] }!
        tokens.append(next)
        logits = try model.forward([next], cache: cache)
    }
    return tokens
}

@Suite("model families")
struct FamilyTests {
    static let families = ["tiny-qwen3", "tiny-gemma3", "tiny-phi3"]

    @Test("f32 logits equal transformers' (full sequence and through the cache)", arguments: families)
    func logits(_ family: String) throws {
        let model = try load(FileSystem.join(resources, family))
        try checkLogits(model, try Reference(family), expected: "logits", family)
    }

    @Test("greedy decoding gives transformers' tokens", arguments: families)
    func greedy(_ family: String) throws {
        let ref = try Reference(family)
        let model = try load(FileSystem.join(resources, family))
        #expect(try greedyTokens(model, ref) == ref.ints("greedy_ids"))
    }

    @Test("NF4 + double quantization equals transformers + bitsandbytes, quantized here and from its saved checkpoint", arguments: families)
    func nf4(_ family: String) throws {
        let ref = try Reference(family)
        try checkLogits(try load(FileSystem.join(resources, family), .nf4), ref, expected: "logits_nf4", "\(family) nf4")
        try checkLogits(try load(FileSystem.join(resources, family + "-bnb-nf4"), .nf4), ref, expected: "logits_nf4", "\(family) bnb folder")
        // The 4-bit logits differ visibly from f32 ones (quantization cannot go missing unnoticed).
        let a = ref.floats("logits"), b = ref.floats("logits_nf4")
        #expect(zip(a, b).map { abs($0 - $1) }.max()! > 0.1)
    }

    @Test("the GGUF that llama.cpp's converter writes gives transformers' logits", arguments: families)
    func gguf(_ family: String) throws {
        let model = try load(FileSystem.join(resources, family + ".gguf"))
        #expect(model.config.family.rawValue == family.dropFirst("tiny-".count).description)
        try checkLogits(model, try Reference(family), expected: "logits", "\(family).gguf")
    }

    @Test("a Qwen2 GGUF from llama.cpp's converter (q/k/v biases, no row permutation) gives transformers' logits")
    func qwen2GGUF() throws {
        let model = try load(FileSystem.join(resources, "tiny-qwen2.gguf"))
        #expect(model.config.family == .qwen2 && model.config.attentionBias)
        let reference = try SafetensorsFile(path: FileSystem.join(resources, "tiny-qwen2", "logits.safetensors"))
        let ids = reference.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let expected = reference.tensor("logits")!.values(as: Float.self)
        let T = ids.count / 2, V = model.config.vocabSize
        let ours = try model.forward(Array(ids[0..<T]), cache: KVCache(config: model.config, capacity: 32), logits: .all)
        let r = close(ours, Array(expected[0..<(T * V)]), "tiny-qwen2.gguf")
        #expect(r == nil, "\(r ?? "")")
    }

    @Test("a PEFT adapter of the family's modules gives PEFT's logits", arguments: families)
    func adapter(_ family: String) throws {
        let ref = try Reference(family)
        let model = try load(FileSystem.join(resources, family)).withAdapter(FileSystem.join(resources, family + "-lora"))
        let ids = ref.ints("train_ids"), expected = ref.floats("lora.logits")
        let T = ids.count / 2, V = model.config.vocabSize
        for b in 0..<2 {
            let ours = try model.forward(Array(ids[(b * T)..<((b + 1) * T)]), cache: KVCache(config: model.config, capacity: 32), logits: .all)
            let r = close(ours, Array(expected[(b * T * V)..<((b + 1) * T * V)]), "\(family) adapter \(b)")
            #expect(r == nil, "\(r ?? "")")
        }
    }

    @Test("the architecture description: what each family's config.json turns on")
    func description() throws {
        let q = try LlamaConfig(configFile: FileSystem.join(resources, "tiny-qwen3", "config.json"))
        #expect(q.family == .qwen3 && q.qkNorm && !q.outputNorms && q.headDim == 32 && q.qDim == 128 && q.slidingWindow == nil)
        let g = try LlamaConfig(configFile: FileSystem.join(resources, "tiny-gemma3", "config.json"))
        #expect(g.family == .gemma3 && g.qkNorm && g.outputNorms && g.activation == .geluTanh && g.normWeightOffset == 1)
        #expect(g.embeddingScale == 8 && g.slidingWindow == 4 && g.slidingLayers == [true, true, true, true, true, false])
        #expect(g.localRopeTheta == 10_000 && g.ropeTheta == 1_000_000 && g.ropeScaling == .linear(factor: 2) && g.tieWordEmbeddings)
        let p = try LlamaConfig(configFile: FileSystem.join(resources, "tiny-phi3", "config.json"))
        #expect(p.family == .phi3 && p.fusedProjections && p.rotaryDim == 12 && p.slidingWindow == 5 && p.isSliding(layer: 1))
        // Gemma 3 as the Hub's config.json files spell it (transformers 4.x keys).
        let hub = try JSON.parse(#"""
            {"architectures": ["Gemma3ForCausalLM"], "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
             "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
             "query_pre_attn_scalar": 256, "rope_theta": 1000000, "rope_local_base_freq": 10000, "rope_scaling": null,
             "sliding_window": 512, "sliding_window_pattern": 6, "final_logit_softcapping": null, "attn_logit_softcapping": null}
            """#)
        let h = try LlamaConfig(json: hub, file: "config.json")
        #expect(h.slidingLayers.filter { !$0 }.count == 3 && h.localRopeTheta == 10_000 && h.tieWordEmbeddings)
        // What is not supported says so.
        let capped = try JSON.parse(#"{"architectures": ["Gemma3ForCausalLM"], "vocab_size": 8, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 1, "final_logit_softcapping": 30.0}"#)
        #expect(throws: ModelError.self) { _ = try LlamaConfig(json: capped, file: "config.json") }
        let moe = try JSON.parse(#"{"architectures": ["Qwen3MoeForCausalLM"], "vocab_size": 8}"#)
        do {
            _ = try LlamaConfig(json: moe, file: "config.json")
            Issue.record("a MoE config loaded")
        } catch {
            #expect("\(error)".contains("Qwen3ForCausalLM") && "\(error)".contains("Gemma3ForCausalLM") && "\(error)".contains("Phi3ForCausalLM"))
        }
    }
}

extension FamilyTests {
    @Test("LongRoPE (Phi-3.5 / Phi-4-mini): short factors within the original length, long past it, through the cache and in generation")
    func longRope() throws {
        let family = "tiny-phi3-longrope"
        let ref = try Reference(family)
        let model = try load(FileSystem.join(resources, family))
        guard case .longrope = model.config.ropeScaling else { Issue.record("not read as LongRoPE"); return }
        let ids = ref.ints("input_ids"), full = ref.floats("logits"), first8 = ref.floats("logits_first8")
        let T = ids.count / 2, V = model.config.vocabSize
        for b in 0..<2 {
            let seq = Array(ids[(b * T)..<((b + 1) * T)])
            // 12 positions: past the original 8, the long factors for every row.
            let ours = try model.forward(seq, cache: KVCache(config: model.config, capacity: 32), logits: .all)
            let r1 = close(ours, Array(full[(b * T * V)..<((b + 1) * T * V)]), "\(family) long \(b)")
            #expect(r1 == nil, "\(r1 ?? "")")
            // The first 8 alone: the short factors.
            let cache = KVCache(config: model.config, capacity: 32)
            let short = try model.forward(Array(seq[0..<8]), cache: cache, logits: .all)
            let r2 = close(short, Array(first8[(b * 8 * V)..<((b + 1) * 8 * V)]), "\(family) short \(b)")
            #expect(r2 == nil, "\(r2 ?? "")")
            // Then one token at a time: the first step past the original length recomputes the cache with the long
            // factors, so every later row is the long full-sequence one.
            var stepped: [Float] = []
            for t in 8..<T { stepped += try model.forward([seq[t]], cache: cache, logits: .last) }
            let r3 = close(stepped, Array(full[((b * T + 8) * V)..<((b + 1) * T * V)]), "\(family) steps \(b)")
            #expect(r3 == nil, "\(r3 ?? "")")
        }
        // Greedy generation across the boundary gives transformers' generate tokens (it recomputes there too).
        #expect(try greedyTokens(model, ref) == ref.ints("greedy_ids"))
        // The same through batched decoding (two sequences, one crossing), and from the converter's GGUF and in NF4.
        let a = KVCache(config: model.config, capacity: 32), b = KVCache(config: model.config, capacity: 32)
        _ = try model.forward(Array(ids[0..<8]), cache: a)
        _ = try model.forward(Array(ids[T..<(T + 5)]), cache: b)
        let batched = try model.forward(batch: [ids[8], ids[T + 5]], caches: [a, b])
        let r4 = close(Array(batched[0..<V]), Array(full[(8 * V)..<(9 * V)]), "\(family) batched crossing")
        #expect(r4 == nil, "\(r4 ?? "")")
        try checkLongRopeFull(try load(FileSystem.join(resources, family + ".gguf")), ref, expected: "logits", "\(family).gguf")
        try checkLongRopeFull(try load(FileSystem.join(resources, family), .nf4), ref, expected: "logits_nf4", "\(family) nf4")
        try checkLongRopeFull(try load(FileSystem.join(resources, family + "-bnb-nf4"), .nf4), ref, expected: "logits_nf4", "\(family) bnb")
    }

    fileprivate func checkLongRopeFull(_ model: LlamaModel, _ ref: Reference, expected name: String, _ label: String) throws {
        let ids = ref.ints("input_ids"), want = ref.floats(name)
        let T = ids.count / 2, V = model.config.vocabSize
        let ours = try model.forward(Array(ids[0..<T]), cache: KVCache(config: model.config, capacity: 32), logits: .all)
        let r = close(ours, Array(want[0..<(T * V)]), label)
        #expect(r == nil, "\(r ?? "")")
    }
}
