// `qlora merge`'s library side: merged weights read back by our own loader from every format we write
// (Hugging Face folder, sharded or not; GGUF in F32, F16 and Q8_0) and checked against the unmerged model
// and against PEFT's logits; tokenizers carried between tokenizer.json and GGUF metadata, checked against
// the files transformers and llama.cpp's converter wrote.
import QLoRA
import QLoRATestSupport
import Testing

private let resources = Fixtures.resources()
private let tokenizerResources = FileSystem.join(Fixtures.repositoryRoot(), "Tests/QLoRATokenizerTests/Resources")

/// A PEFT adapter folder with random A and B (normal, times `amplitude`) on all seven projections.
func writeRandomAdapter(_ dir: String, config c: LlamaConfig, rank: Int = 4, alpha: Double = 8, seed: UInt64, amplitude: Float = 0.05) throws {
    try FileSystem.makeDirectories(dir)
    let json = #"{"peft_type": "LORA", "r": \#(rank), "lora_alpha": \#(alpha), "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "bias": "none", "task_type": "CAUSAL_LM"}"#
    try FileSystem.writeFileAtomically(FileSystem.join(dir, "adapter_config.json"), bytes: Array(json.utf8))
    var rng = SeededRandom(seed: seed)
    let q = c.headCount * c.headDim, kv = c.kvHeadCount * c.headDim, h = c.hiddenSize, m = c.intermediateSize
    var tensors: [(String, TensorView)] = []
    for layer in 0..<c.layerCount {
        for (module, out, inFeatures) in [("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h), ("self_attn.o_proj", h, q),
                                          ("mlp.gate_proj", m, h), ("mlp.up_proj", m, h), ("mlp.down_proj", h, m)] {
            let prefix = "base_model.model.model.layers.\(layer).\(module)"
            tensors.append((prefix + ".lora_A.weight", .make((0..<(rank * inFeatures)).map { _ in amplitude * rng.normal() }, dtype: .f32, shape: [rank, inFeatures])))
            tensors.append((prefix + ".lora_B.weight", .make((0..<(out * rank)).map { _ in amplitude * rng.normal() }, dtype: .f32, shape: [out, rank])))
        }
    }
    try SafetensorsWriter.write(path: FileSystem.join(dir, "adapter_model.safetensors"), tensors: tensors)
}

private func dense(_ path: String, _ quant: QuantType? = nil) throws -> LlamaModel {
    var o = LoadOptions()
    o.quantType = quant
    o.showProgress = false
    return try LlamaModel.load(path, options: o)
}

private func logits(_ model: LlamaModel, _ ids: [Int]) throws -> [Float] {
    try model.forward(ids, cache: KVCache(config: model.config, capacity: ids.count + 1), logits: .all)
}

/// max |a - b| / max |b|.
private func relativeError(_ a: [Float], _ b: [Float]) -> Float {
    let scale = b.map(abs).max() ?? 1
    return zip(a, b).map { abs($0 - $1) }.max()! / scale
}

private func quietOptions(_ configure: (inout ExportOptions) -> Void = { _ in }) -> ExportOptions {
    var o = ExportOptions()
    o.showProgress = false
    configure(&o)
    return o
}

@Suite("merge and export")
struct MergeTests {
    /// The tiny Llama fixture with the SmolLM2 tokenizer beside it (a model folder must have one).
    static func tinyWithTokenizer() throws -> String {
        let dir = FileSystem.join(try Fixtures.temporaryDirectory("merge-tiny"), "tiny")
        try FileSystem.makeDirectory(dir)
        let source = FileSystem.join(resources, "tiny-llama-gqa")
        for name in ["config.json", "generation_config.json", "model.safetensors"] {
            try FileSystem.writeFileAtomically(FileSystem.join(dir, name), bytes: try FileSystem.readFile(FileSystem.join(source, name)))
        }
        try FileSystem.writeFileAtomically(FileSystem.join(dir, "tokenizer.json"), bytes: try FileSystem.readFile(FileSystem.join(tokenizerResources, "smollm2-tokenizer.json")))
        return dir
    }

    @Test("a PEFT adapter merged onto the original weights gives PEFT's logits: f32 folder in shards with an index, and f32 GGUF, read back")
    func peftReference() throws {
        let base = try Self.tinyWithTokenizer()
        let adapterDir = FileSystem.join(resources, "tiny-llama-gqa-lora")
        var options = MergeOptions()
        options.onto = .original
        let merger = try ModelMerger(model: base, adapter: adapterDir, options: options)
        #expect(merger.items.filter(\.adapted).count == 7 * merger.config.layerCount)
        let reference = try SafetensorsFile(path: FileSystem.join(adapterDir, "expected_logits.safetensors"))
        let ids = reference.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let expected = reference.tensor("logits")!.values(as: Float.self)
        let T = ids.count / 2, V = merger.config.vocabSize

        let out = FileSystem.join(FileSystem.directoryName(base), "merged")
        let report = try ModelExport.writeFolder(merger, to: out, options: quietOptions { $0.dtype = .f32; $0.maxShardSize = 40_000 })
        let shards = try FileSystem.listDirectory(out).filter { $0.hasSuffix(".safetensors") }
        #expect(shards.count > 1 && shards.allSatisfy { $0.hasPrefix("model-") && $0.hasSuffix("-of-000\(shards.count).safetensors") }, "\(shards)")
        let index = try JSON.parse(try FileSystem.readFile(FileSystem.join(out, "model.safetensors.index.json")))
        #expect(index["metadata"]?["total_size"]?.intValue == report.bytes)
        #expect(index["weight_map"]?.objectValue?.count == merger.items.count)
        #expect(FileSystem.exists(FileSystem.join(out, "tokenizer.json")) && FileSystem.exists(FileSystem.join(out, "generation_config.json")))
        let config = try JSON.parse(try FileSystem.readFile(FileSystem.join(out, "config.json")))
        #expect(config["torch_dtype"]?.stringValue == "float32")
        #expect(try FileSystem.listDirectory(FileSystem.directoryName(out)).allSatisfy { !$0.contains("partial") })

        let gguf = FileSystem.join(FileSystem.directoryName(base), "merged.gguf")
        _ = try ModelExport.writeGGUF(merger, to: gguf, options: quietOptions { $0.ggufType = .f32 })
        for path in [out, gguf] {
            let model = try dense(path)
            for b in 0..<2 {
                let ours = try logits(model, Array(ids[(b * T)..<((b + 1) * T)]))
                let theirs = Array(expected[(b * T * V)..<((b + 1) * T * V)])
                #expect(relativeError(ours, theirs) < 1e-4, "\(path) sequence \(b): \(relativeError(ours, theirs))")
            }
        }
        // An existing output is refused without force, and left as it was.
        #expect(throws: ExportError.outputExists(path: out)) { try ModelExport.writeFolder(merger, to: out, options: quietOptions()) }
        #expect(FileSystem.exists(FileSystem.join(out, "model.safetensors.index.json")))
        // With force, replaced in one step (now one bf16 file).
        _ = try ModelExport.writeFolder(merger, to: out, options: quietOptions { $0.force = true })
        #expect(try FileSystem.listDirectory(out).filter { $0.hasSuffix(".safetensors") } == ["model.safetensors"])
        #expect(try FileSystem.listDirectory(FileSystem.directoryName(out)).allSatisfy { !$0.contains(".old-") && !$0.contains("partial") })
    }

    @Test("the default model (GGUF) merged onto dequant(NF4(W)) reproduces base + adapter: f32 folder and f32 GGUF; F16 and Q8_0 GGUF close")
    func defaultModel() throws {
        let dir = try Fixtures.temporaryDirectory("merge-default")
        let base = try dense(DefaultModelTests.gguf, .nf4)
        let adapterDir = FileSystem.join(dir, "adapter")
        try writeRandomAdapter(adapterDir, config: base.config, rank: 8, alpha: 16, seed: 3)
        let adapted = try base.withAdapter(adapterDir)
        let ids = [1, 504, 3458, 314, 4132, 30, 216, 11, 2]
        let expected = try logits(adapted, ids)
        // The adapter moves the logits well beyond the tolerances below, so a merge that lost it would fail.
        #expect(relativeError(try logits(base, ids), expected) > 0.05)

        let merger = try ModelMerger(model: DefaultModelTests.gguf, adapter: adapterDir)
        let folder = FileSystem.join(dir, "folder")
        _ = try ModelExport.writeFolder(merger, to: folder, options: quietOptions { $0.dtype = .f32 })
        let gguf = FileSystem.join(dir, "f32.gguf")
        _ = try ModelExport.writeGGUF(merger, to: gguf, options: quietOptions { $0.ggufType = .f32 })
        for path in [folder, gguf] {
            let e = relativeError(try logits(try dense(path), ids), expected)
            #expect(e < 1e-4, "\(path): \(e)")
        }
        // Merging onto the original weights is a different model: off by the NF4 error.
        var original = MergeOptions()
        original.onto = .original
        let onOriginal = FileSystem.join(dir, "original.gguf")
        _ = try ModelExport.writeGGUF(try ModelMerger(model: DefaultModelTests.gguf, adapter: adapterDir, options: original), to: onOriginal,
                                      options: quietOptions { $0.ggufType = .f32 })
        #expect(relativeError(try logits(try dense(onOriginal), ids), expected) > 1e-3)

        for (type, tolerance) in [(GGMLType.f16, Float(5e-3)), (.q8_0, 5e-2)] {
            let path = FileSystem.join(dir, "\(type).gguf")
            _ = try ModelExport.writeGGUF(merger, to: path, options: quietOptions { $0.ggufType = type })
            let g = try GGUFFile(path: path)
            #expect(g.tensor("blk.0.attn_q.weight")?.type == type && g.tensor("blk.0.attn_norm.weight")?.type == .f32)
            #expect(g.value("general.file_type")?.intValue == (type == .f16 ? 1 : 7))
            let e = relativeError(try logits(try dense(path), ids), expected)
            #expect(e < tolerance, "\(type): \(e)")
        }
        // The adapter alone as llama.cpp's LoRA GGUF: read back onto the same base, the same model.
        let loraFile = FileSystem.join(dir, "adapter.gguf")
        let exported = try AdapterExport.writeGGUF(adapter: adapterDir, model: DefaultModelTests.gguf, to: loraFile)
        #expect(exported.tensors == 2 * 7 * base.config.layerCount && exported.alpha == 16)
        let lg = try GGUFFile(path: loraFile)
        #expect(lg.value("general.type")?.stringValue == "adapter" && lg.value("adapter.type")?.stringValue == "lora")
        #expect(lg.tensor("blk.0.attn_q.weight.lora_a")?.shape == [8, 576] && lg.tensor("blk.0.attn_k.weight.lora_b")?.shape == [192, 8])
        let viaGGUF = relativeError(try logits(try base.withAdapter(loraFile), ids), expected)
        #expect(viaGGUF < 1e-5, "adapter GGUF: \(viaGGUF)")
        #expect(throws: ExportError.outputExists(path: loraFile)) { try AdapterExport.writeGGUF(adapter: adapterDir, model: DefaultModelTests.gguf, to: loraFile) }

        let q4 = FileSystem.join(dir, "q4_0.gguf")
        _ = try ModelExport.writeGGUF(merger, to: q4, options: quietOptions { $0.ggufType = .q4_0 })
        let g4 = try GGUFFile(path: q4)
        #expect(g4.tensor("blk.3.ffn_down.weight")?.type == .q4_0 && g4.tensor("token_embd.weight")?.type == .q8_0)
        // Q4_K: 256-long blocks, so only the 1,536-wide rows (ffn_down) take it; the 576-wide ones are Q8_0.
        let q4k = FileSystem.join(dir, "q4_k.gguf")
        _ = try ModelExport.writeGGUF(merger, to: q4k, options: quietOptions { $0.ggufType = .q4_K })
        let gk = try GGUFFile(path: q4k)
        #expect(gk.tensor("blk.3.ffn_down.weight")?.type == .q4_K && gk.tensor("blk.3.ffn_up.weight")?.type == .q8_0)
        // Read back, it is a 4-bit model that stays closer to the merged one than the all-Q4_0 file does.
        let ek = relativeError(try logits(try dense(q4k), ids), expected), e4 = relativeError(try logits(try dense(q4), ids), expected)
        #expect(ek < e4 && ek > 1e-3, "q4_k \(ek), q4_0 \(e4)")

        // The tokenizer and chat template travel: the folder's tokenizer.json and the GGUF's metadata encode
        // and render as the source GGUF does.
        let source = try Tokenizer.load(model: DefaultModelTests.gguf)
        let text = "Hello, world! 12345 <|im_start|>user\nÜnïcödé  spaces\t\ttabs"
        for path in [folder, gguf] {
            let t = try Tokenizer.load(model: path)
            #expect(t.encode(text) == source.encode(text), "\(path)")
            #expect(t.chatTemplate == source.chatTemplate && t.eosTokenID == source.eosTokenID && t.bosTokenID == source.bosTokenID)
        }
        let sourceFile = try GGUFFile(path: DefaultModelTests.gguf), written = try GGUFFile(path: gguf)
        for (key, _) in sourceFile.metadata where key.hasPrefix("tokenizer.") {
            #expect(written.typedValue(key) == sourceFile.typedValue(key), "\(key)")
        }
    }

    @Test("tokenizers across formats: SmolLM2's tokenizer.json gives the GGUF tokenizer keys llama.cpp's converter wrote, and back")
    func tokenizerConversion() throws {
        let g = try GGUFFile(path: DefaultModelTests.gguf)
        let dir = try Fixtures.temporaryDirectory("merge-tok")
        try FileSystem.writeFileAtomically(FileSystem.join(dir, "tokenizer.json"), bytes: try FileSystem.readFile(FileSystem.join(tokenizerResources, "smollm2-tokenizer.json")))
        let metadata = Dictionary(uniqueKeysWithValues: try TokenizerExport.ggufMetadata(folder: dir, vocabSize: 49152, eosTokenIDs: [2]))
        for key in ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"] {
            #expect(metadata[key] == g.typedValue(key), "\(key)")
        }
        // GGUF -> tokenizer.json: the same vocabulary and merges as the file transformers saved.
        let files = Dictionary(uniqueKeysWithValues: try TokenizerExport.huggingFaceFiles(from: g).map { ($0.name, $0.bytes) })
        let ours = try JSON.parse(files["tokenizer.json"]!)
        let theirs = try JSON.parse(try FileSystem.readFile(FileSystem.join(tokenizerResources, "smollm2-tokenizer.json")))
        #expect(ours["model"]?["vocab"] == theirs["model"]?["vocab"])
        let merges = { (j: JSONValue) in j["model"]?["merges"]?.arrayValue?.map { m in m.stringValue ?? (m.arrayValue ?? []).compactMap(\.stringValue).joined(separator: " ") } }
        #expect(merges(ours) == merges(theirs))
        // SmolLM's own file, as transformers saved it, comes back (llama.cpp's "smollm" stands for it).
        #expect(ours["pre_tokenizer"] == theirs["pre_tokenizer"])
        let oursFile = FileSystem.join(dir, "ours.json")
        try FileSystem.writeFileAtomically(oursFile, bytes: files["tokenizer.json"]!)
        let a = try Tokenizer(jsonFile: oursFile), b = try Tokenizer(jsonFile: FileSystem.join(tokenizerResources, "smollm2-tokenizer.json"))
        for text in ["In 1812, 600,000 men (3.14159%) crossed", " 42  007\n\t9x9=81", "Ünïcödé — “quotes” <|im_start|>"] {
            #expect(a.encode(text) == b.encode(text), "\(text)")
        }
        #expect(ours["added_tokens"]?.arrayValue?.map { $0["id"]! } == theirs["added_tokens"]?.arrayValue?.map { $0["id"]! })
    }

    @Test("bad input: an adapter that does not fit, a module the model lacks, a folder without a tokenizer; nothing written")
    func badInput() throws {
        let base = try Self.tinyWithTokenizer()
        let dir = FileSystem.directoryName(base)
        let config = try LlamaConfig(configFile: FileSystem.join(base, "config.json"))
        var wrong = config
        wrong.hiddenSize += 8
        let misfit = FileSystem.join(dir, "misfit")
        try writeRandomAdapter(misfit, config: wrong, seed: 1)
        do {
            _ = try ModelMerger(model: base, adapter: misfit)
            Issue.record("an adapter for another shape was accepted")
        } catch let e as ModelError {
            #expect("\(e)".contains("adapter_model.safetensors") && "\(e)".contains("lora_A.weight"), "\(e)")
        }
        var deeper = config
        deeper.layerCount += 1
        let extra = FileSystem.join(dir, "extra")
        try writeRandomAdapter(extra, config: deeper, seed: 2)
        do {
            _ = try ModelMerger(model: base, adapter: extra)
            Issue.record("an adapter with more layers was accepted")
        } catch let e as ModelError {
            #expect("\(e)".contains("model.layers.\(config.layerCount)."), "\(e)")
        }
        // The fixture without its tokenizer.
        FileSystem.remove(FileSystem.join(base, "tokenizer.json"))
        let merger = try ModelMerger(model: base, adapter: FileSystem.join(resources, "tiny-llama-gqa-lora"))
        let out = FileSystem.join(dir, "out")
        do {
            _ = try ModelExport.writeFolder(merger, to: out, options: quietOptions())
            Issue.record("a folder without a tokenizer was merged")
        } catch let e as ExportError {
            #expect("\(e)".contains("tokenizer.json") && "\(e)".contains("missing"), "\(e)")
        }
        #expect(throws: ExportError.self) { try ModelExport.writeGGUF(merger, to: out + ".gguf", options: quietOptions()) }
        #expect(!FileSystem.exists(out) && !FileSystem.exists(out + ".gguf"))
        let listing = try FileSystem.listDirectory(dir)
        #expect(listing.allSatisfy { !$0.hasPrefix(".") }, "\(listing)")
    }
}
