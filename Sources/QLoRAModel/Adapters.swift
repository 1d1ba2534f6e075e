// Applying a PEFT LoRA adapter to a loaded model for inference: every adapted projection gets its A, B
// and scale (and a DoRA adapter its per-row factor). Module paths follow transformers' names, so adapters trained with PEFT on the Hugging Face
// model apply to the same model loaded from a folder, a bitsandbytes checkpoint or a GGUF file.
import QLoRACore
import QLoRAFormats

extension LlamaModel {
    /// The model with the adapter in `folder` attached (the base weights are shared, not copied).
    /// - Throws: `ModelError` for a module the model does not have or a shape that does not fit.
    public func withAdapter(_ folder: String) throws -> LlamaModel {
        if folder.lowercased().hasSuffix(".gguf") { return try withGGUFAdapter(folder) }
        let adapter = try PEFTAdapter(folder: folder)
        var layers = self.layers
        let scale = adapter.config.scale
        let weightsFile = FileSystem.join(folder, "adapter_model.safetensors")
        for m in adapter.modules {
            // model.layers.N.(self_attn|mlp).NAME
            let parts = m.module.split(separator: ".").map(String.init)
            guard parts.count == 5, parts[0] == "model", parts[1] == "layers", let i = Int(parts[2]), i < layers.count,
                  let p = Projection.allCases.first(where: { $0.modulePath == "\(parts[3]).\(parts[4])" }), var linear = layers[i][p]
            else {
                let names = layers.first?.present.map(\.name).joined(separator: ", ") ?? ""
                throw ModelError.invalidConfig(file: weightsFile, reason: "adapter module '\(m.module)' is not a projection of this model (it has \(names))")
            }
            let expectA = [adapter.config.rank, linear.inFeatures], expectB = [linear.outFeatures, adapter.config.rank]
            guard m.a.shape == expectA else {
                throw ModelError.shapeMismatch(file: weightsFile, tensor: m.module + ".lora_A.weight", expected: expectA, found: m.a.shape)
            }
            guard m.b.shape == expectB else {
                throw ModelError.shapeMismatch(file: weightsFile, tensor: m.module + ".lora_B.weight", expected: expectB, found: m.b.shape)
            }
            var lora = Linear.LoRA(a: m.a.floats(), b: m.b.floats(), rank: adapter.config.rank, scale: scale)
            if let magnitude = m.magnitude?.floats() {
                // DoRA: g = m / ‖W + s·BA‖ per row, fixed for inference.
                let norms = lora.a.withUnsafeBufferPointer { a in
                    lora.b.withUnsafeBufferPointer { b in linear.doraNorms(a: a.baseAddress!, b: b.baseAddress!, rank: lora.rank, scale: scale) }
                }
                lora.doraScale = zip(magnitude, norms).map { $0 / $1 }
                lora.doraBias = linear.bias
            }
            linear.lora = lora
            layers[i][p] = linear
        }
        return inheritingSettings(LlamaModel(config: config, embeddings: embeddings, layers: layers, finalNorm: finalNorm, lmHead: lmHead, source: source))
    }

}

extension LlamaModel {
    /// The model with a llama.cpp LoRA GGUF (general.type adapter: BLK.lora_a [r, in], BLK.lora_b [out, r],
    /// adapter.lora.alpha; Q and K rows of B in llama.cpp's rotary order) attached.
    func withGGUFAdapter(_ path: String) throws -> LlamaModel {
        let g = try GGUFFile(path: path)
        func bad(_ reason: String) -> ModelError { .invalidConfig(file: path, reason: reason) }
        guard g.value("general.type")?.stringValue == "adapter", g.value("adapter.type")?.stringValue == "lora" else {
            throw bad("not a LoRA adapter GGUF (general.type 'adapter', adapter.type 'lora')")
        }
        guard let alpha = g.value("adapter.lora.alpha")?.doubleValue else { throw bad("no adapter.lora.alpha") }
        let fused = config.fusedProjections
        let names: [String: Projection] = ["attn_q": .q, "attn_k": .k, "attn_v": .v, "attn_qkv": .qkv, "attn_output": .o, "ffn_gate": .gate,
                                           "ffn_up": fused ? .gateUp : .up, "ffn_down": .down]
        var layers = self.layers
        var used = 0
        for t in g.tensors where t.name.hasSuffix(".lora_a") {
            let base = String(t.name.dropLast(".lora_a".count))
            let parts = base.split(separator: ".").map(String.init)
            guard parts.count == 4, parts[0] == "blk", let i = Int(parts[1]), i < layers.count, parts[3] == "weight", let p = names[parts[2]],
                  var linear = layers[i][p] else {
                throw bad("tensor '\(t.name)' is not a LoRA of a projection of this model")
            }
            guard let bInfo = g.tensor(base + ".lora_b") else { throw ModelError.missingTensor(file: path, tensor: base + ".lora_b") }
            let rank = t.shape[0]
            guard t.shape == [rank, linear.inFeatures] else {
                throw ModelError.shapeMismatch(file: path, tensor: t.name, expected: [rank, linear.inFeatures], found: t.shape)
            }
            guard bInfo.shape == [linear.outFeatures, rank] else {
                throw ModelError.shapeMismatch(file: path, tensor: bInfo.name, expected: [linear.outFeatures, rank], found: bInfo.shape)
            }
            var b = try g.floats(bInfo)
            if config.family == .llama, parts[2] == "attn_q" { b = ModelMerger.unpermute(b, heads: config.headCount, cols: rank) }
            if config.family == .llama, parts[2] == "attn_k" { b = ModelMerger.unpermute(b, heads: config.kvHeadCount, cols: rank) }
            linear.lora = Linear.LoRA(a: try g.floats(t), b: b, rank: rank, scale: Float(alpha / Double(rank)))
            layers[i][p] = linear
            used += 2
        }
        guard used == g.tensors.count else { throw bad("\(g.tensors.count - used) tensors are not lora_a / lora_b pairs") }
        return inheritingSettings(LlamaModel(config: config, embeddings: embeddings, layers: layers, finalNorm: finalNorm, lmHead: lmHead, source: source))
    }

    /// `other` (this base with adapters) with this model's inference settings: the compute and cache types.
    func inheritingSettings(_ other: LlamaModel) -> LlamaModel {
        other.computeDType = computeDType
        other.kvCacheDType = kvCacheDType
        return other
    }
}
