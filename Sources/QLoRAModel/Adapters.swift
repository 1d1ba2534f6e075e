// Applying a PEFT LoRA adapter to a loaded model for inference: every adapted projection gets its A, B
// and scale. Module paths follow transformers' names, so adapters trained with PEFT on the Hugging Face
// model apply to the same model loaded from a folder, a bitsandbytes checkpoint or a GGUF file.
import QLoRACore
import QLoRAFormats

extension LlamaModel {
    /// The model with the adapter in `folder` attached (the base weights are shared, not copied).
    /// - Throws: `ModelError` for a module the model does not have or a shape that does not fit.
    public func withAdapter(_ folder: String) throws -> LlamaModel {
        let adapter = try PEFTAdapter(folder: folder)
        var layers = self.layers
        let scale = adapter.config.scale
        let weightsFile = FileSystem.join(folder, "adapter_model.safetensors")
        for m in adapter.modules {
            // model.layers.N.(self_attn|mlp).NAME
            let parts = m.module.split(separator: ".").map(String.init)
            guard parts.count == 5, parts[0] == "model", parts[1] == "layers", let i = Int(parts[2]), i < layers.count,
                  let keyPath = Self.projectionKeyPaths["\(parts[3]).\(parts[4])"]
            else {
                throw ModelError.invalidConfig(file: weightsFile, reason: "adapter module '\(m.module)' is not a projection of this model (supported: q/k/v/o_proj, gate/up/down_proj)")
            }
            var linear = layers[i][keyPath: keyPath]
            let expectA = [adapter.config.rank, linear.inFeatures], expectB = [linear.outFeatures, adapter.config.rank]
            guard m.a.shape == expectA else {
                throw ModelError.shapeMismatch(file: weightsFile, tensor: m.module + ".lora_A.weight", expected: expectA, found: m.a.shape)
            }
            guard m.b.shape == expectB else {
                throw ModelError.shapeMismatch(file: weightsFile, tensor: m.module + ".lora_B.weight", expected: expectB, found: m.b.shape)
            }
            linear.lora = Linear.LoRA(a: m.a.floats(), b: m.b.floats(), rank: adapter.config.rank, scale: scale)
            layers[i][keyPath: keyPath] = linear
        }
        return LlamaModel(config: config, embeddings: embeddings, layers: layers, finalNorm: finalNorm, lmHead: lmHead, source: source)
    }

    static let projectionKeyPaths: [String: WritableKeyPath<LlamaLayer, Linear>] = [
        "self_attn.q_proj": \.q, "self_attn.k_proj": \.k, "self_attn.v_proj": \.v, "self_attn.o_proj": \.o,
        "mlp.gate_proj": \.gate, "mlp.up_proj": \.up, "mlp.down_proj": \.down,
    ]
}
