// Merging a PEFT adapter into each family's model and writing it as a Hugging Face folder and as a GGUF under
// the family's llama.cpp architecture: read back, the merged models give PEFT's adapted logits; the
// SentencePiece tokenizer keys written for Gemma 3 and Phi-3 are the ones llama.cpp's converter wrote
// (fixtures from scripts/reference/make_family_fixtures.py).
import QLoRA
import QLoRATestSupport
import Testing

private let resources = Fixtures.resources()

private func quiet(_ configure: (inout ExportOptions) -> Void = { _ in }) -> ExportOptions {
    var o = ExportOptions()
    o.showProgress = false
    configure(&o)
    return o
}

@Suite("family merge and export")
struct FamilyMergeTests {
    @Test("merged onto the original weights: the f32 folder and the f32 GGUF give PEFT's logits", arguments: ["tiny-qwen3", "tiny-gemma3", "tiny-phi3"])
    func merge(_ family: String) throws {
        let ref = try SafetensorsFile(path: FileSystem.join(resources, family, "reference.safetensors"))
        var options = MergeOptions()
        options.onto = .original
        let merger = try ModelMerger(model: FileSystem.join(resources, family), adapter: FileSystem.join(resources, family + "-lora"), options: options)
        let adapted = Projection.present(fused: merger.config.fusedProjections).count * merger.config.layerCount
        #expect(merger.items.filter(\.adapted).count == adapted)
        let dir = try Fixtures.temporaryDirectory("merge-\(family)")
        let folder = FileSystem.join(dir, "merged"), gguf = FileSystem.join(dir, "merged.gguf")
        // In shards, so that each family also loads from a sharded folder with its index.
        _ = try ModelExport.writeFolder(merger, to: folder, options: quiet { $0.dtype = .f32; $0.maxShardSize = 150_000 })
        #expect(try FileSystem.listDirectory(folder).filter { $0.hasSuffix(".safetensors") }.count > 1)
        _ = try ModelExport.writeGGUF(merger, to: gguf, options: quiet { $0.ggufType = .f32 })
        let g = try GGUFFile(path: gguf)
        #expect(g.value("general.architecture")?.stringValue == String(family.dropFirst("tiny-".count)))
        let ids = ref.tensor("train_ids")!.values(as: Int64.self).map(Int.init), expected = ref.tensor("lora.logits")!.values(as: Float.self)
        for path in [folder, gguf] {
            var o = LoadOptions()
            o.quantType = nil
            o.showProgress = false
            let model = try LlamaModel.load(path, options: o)
            #expect(model.config.family == merger.config.family)
            let T = ids.count / 2, V = model.config.vocabSize
            for b in 0..<2 {
                let ours = try model.forward(Array(ids[(b * T)..<((b + 1) * T)]), cache: KVCache(config: model.config, capacity: 32), logits: .all)
                let want = Array(expected[(b * T * V)..<((b + 1) * T * V)])
                let scale = want.map(abs).max()!
                let r = Compare.close(ours, want, atol: 1e-4 * scale, rtol: 1e-4, "\(family) merged \(FileSystem.baseName(path)) \(b)")
                #expect(r == nil, "\(r ?? "")")
            }
        }
    }

    @Test("SentencePiece vocabularies (Gemma 3, Phi-3) get the tokenizer keys llama.cpp's converter wrote", arguments: ["tiny-gemma3", "tiny-phi3"])
    func sentencePieceKeys(_ family: String) throws {
        let folder = FileSystem.join(resources, family)
        let config = try LlamaConfig(configFile: FileSystem.join(folder, "config.json"))
        let ours = Dictionary(uniqueKeysWithValues: try TokenizerExport.ggufMetadata(
            folder: folder, vocabSize: config.vocabSize, eosTokenIDs: config.eosTokenIDs, bosTokenID: config.bosTokenID,
            addSpacePrefix: config.family == .gemma3 ? false : nil))
        let theirs = try GGUFFile(path: FileSystem.join(resources, family + ".gguf"))
        let keys = theirs.metadata.map(\.0).filter { $0.hasPrefix("tokenizer.") }
        #expect(Set(ours.keys) == Set(keys), "\(Set(ours.keys).symmetricDifference(Set(keys)))")
        for key in keys {
            #expect(ours[key] == theirs.typedValue(key), "\(key)")
        }
        // The pieces are the model's own (not only [PAD] fillers).
        let model = try SentencePieceModel(path: FileSystem.join(folder, "tokenizer.model"))
        #expect(model.pieces.count == 300 && model.pieces.contains { $0.type == .normal && $0.piece.hasPrefix("\u{2581}") })
    }
}

extension FamilyMergeTests {
    @Test("with no adapter, the GGUF written from the folder has the metadata and tensors llama.cpp's converter wrote (Llama 3.1's rope_freqs too)",
          arguments: ["tiny-qwen3", "tiny-gemma3", "tiny-phi3", "tiny-phi3-longrope", "tiny-llama3-rope"])
    func sameAsConverter(_ family: String) throws {
        var options = MergeOptions()
        options.onto = .original
        var folder = FileSystem.join(resources, family)
        if family == "tiny-llama3-rope" {
            // The converter ran with the tiny byte-level BPE that tiny-qwen3 carries.
            folder = FileSystem.join(try Fixtures.temporaryDirectory("llama3-rope"), family)
            try FileSystem.makeDirectory(folder)
            for (dir, name) in [(family, "config.json"), (family, "generation_config.json"), (family, "model.safetensors"),
                                ("tiny-qwen3", "tokenizer.json"), ("tiny-qwen3", "tokenizer_config.json")] {
                try FileSystem.writeFileAtomically(FileSystem.join(folder, name), bytes: try FileSystem.readFile(FileSystem.join(resources, dir, name)))
            }
        }
        let merger = try ModelMerger(model: folder, adapter: nil, options: options)
        let path = FileSystem.join(try Fixtures.temporaryDirectory("gguf-\(family)"), "out.gguf")
        _ = try ModelExport.writeGGUF(merger, to: path, options: quiet { $0.ggufType = .f32 })
        let ours = try GGUFFile(path: path), theirs = try GGUFFile(path: FileSystem.join(resources, family + ".gguf"))
        let arch = theirs.value("general.architecture")!.stringValue!
        // (The fixture's converter was told the tiny BPE's pre-tokenizer is "qwen2": it hashes known models' output.)
        for (key, _) in theirs.metadata where (key.hasPrefix(arch + ".") || key.hasPrefix("tokenizer.")) && key != "tokenizer.ggml.pre" {
            let a = ours.typedValue(key), b = theirs.typedValue(key)
            if case .float? = b?.value, case let .float(x)? = a?.value, case let .float(y)? = b?.value {
                #expect(Float(x) == Float(y), "\(family): \(key) \(x) vs \(y)")
            } else {
                #expect(a == b, "\(family): \(key) \(String(describing: a)) vs \(String(describing: b))")
            }
        }
        #expect(Set(ours.tensors.map(\.name)) == Set(theirs.tensors.map(\.name)))
        for t in theirs.tensors {
            guard let o = ours.tensor(t.name) else { continue }
            #expect(o.shape == t.shape, "\(t.name)")
            #expect(try ours.floats(o) == theirs.floats(t), "\(family): \(t.name)")
        }
    }

    @Test("Llama 3.1's rope scaling read from a GGUF's rope_freqs gives transformers' logits")
    func ropeFreqs() throws {
        var o = LoadOptions()
        o.quantType = nil
        o.showProgress = false
        let model = try LlamaModel.load(FileSystem.join(resources, "tiny-llama3-rope.gguf"), options: o)
        #expect(model.config.ropeFrequencyFactors?.count == model.config.headDim / 2)
        let reference = try SafetensorsFile(path: FileSystem.join(resources, "tiny-llama3-rope", "logits.safetensors"))
        let ids = reference.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let expected = reference.tensor("logits")!.values(as: Float.self)
        let T = ids.count / 2, V = model.config.vocabSize
        let ours = try model.forward(Array(ids[0..<T]), cache: KVCache(config: model.config, capacity: 32), logits: .all)
        let want = Array(expected[0..<(T * V)])
        let r = Compare.close(ours, want, atol: 1e-4 * want.map(abs).max()!, rtol: 1e-4, "tiny-llama3-rope.gguf")
        #expect(r == nil, "\(r ?? "")")
        let inv = model.config.ropeInverseFrequencies(), hf = reference.tensor("rope.inv_freq")!.values(as: Float.self)
        #expect(Compare.close(inv, hf, atol: 0, rtol: 1e-6, "inv_freq") == nil)
    }
}

extension FamilyMergeTests {
    @Test("export-adapter: the family's PEFT adapter as a llama.cpp LoRA GGUF applies with the same logits", arguments: ["tiny-qwen3", "tiny-gemma3", "tiny-phi3"])
    func adapterGGUF(_ family: String) throws {
        let base = FileSystem.join(resources, family), peft = FileSystem.join(resources, family + "-lora")
        let out = FileSystem.join(try Fixtures.temporaryDirectory("lora-\(family)"), "adapter.gguf")
        let report = try AdapterExport.writeGGUF(adapter: peft, model: base, to: out)
        let g = try GGUFFile(path: out)
        #expect(g.value("general.architecture")?.stringValue == String(family.dropFirst("tiny-".count)))
        var o = LoadOptions()
        o.quantType = nil
        o.showProgress = false
        let model = try LlamaModel.load(base, options: o)
        #expect(report.tensors == 2 * model.config.layerCount * Projection.present(fused: model.config.fusedProjections).count)
        let ids = [1, 17, 250, 3, 99, 42, 7, 319]
        let a = try model.withAdapter(peft).forward(ids, cache: KVCache(config: model.config, capacity: 16), logits: .all)
        let b = try model.withAdapter(out).forward(ids, cache: KVCache(config: model.config, capacity: 16), logits: .all)
        #expect(Compare.close(b, a, atol: 1e-5, rtol: 1e-5, "\(family) GGUF adapter") == nil)
    }
}
