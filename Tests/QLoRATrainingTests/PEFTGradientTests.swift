// Loss and every LoRA gradient against PyTorch + PEFT (transformers 5.24, eager attention, f32) for the
// same base weights, the same non-zero LoRA weights and one batch with masked prompt tokens; on an
// untied and a tied f32 base, and on the bitsandbytes NF4 base (Resources/, from
// scripts/reference/make_training_fixtures.py).
import QLoRA
import QLoRATestSupport
import Testing

private let resources = Fixtures.resources()


@Suite("gradients against PyTorch + PEFT")
struct PEFTGradientTests {
    func run(base: String, fixture: String, prefix: String, quant: QuantType?, checkpointing: Bool, dtype: ComputeDType = .f32) throws {
        let f = try SafetensorsFile(path: FileSystem.join(resources, fixture))
        let (model, lora) = try tinyLoRA(base, quant: quant, weights: f, prefix: prefix)
        var options = TrainingOptions()
        options.computeDType = dtype  // f32: checked at 1e-4 against PEFT's f32 gradients
        options.gradientCheckpointing = checkpointing
        let engine = TrainingEngine(model: model, lora: lora, options: options)
        let ids = f.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let labels = f.tensor("labels")!.values(as: Int64.self).map(Int.init)
        let batch = TrainingBatch(tokens: ids, labels: labels, batchSize: 2, sequenceLength: ids.count / 2)
        let loss = try engine.step(batch)
        let expectedLoss = Double(f.tensor(prefix + "loss")!.values(as: Float.self)[0])
        if dtype == .bf16 {
            // The bf16 kernels are in use where the CPU has them, and then the loss is not f32's (which
            // equals PEFT's to 1e-5): the check below would pass on the f32 path too.
            #expect(engine.usesBF16 == BF16Gemm.isSupported)
            if BF16Gemm.isSupported { #expect(abs(loss - expectedLoss) / expectedLoss > 1e-5, "bf16 loss equals f32's: \(loss)") }
            // bf16 operands carry 8 significant bits: each tensor's gradient within 3% of PEFT's f32 one
            // (relative L2 error), the loss within 1%.
            #expect(abs(loss - expectedLoss) / expectedLoss < 1e-2, "bf16 loss \(loss) vs \(expectedLoss)")
            for (name, offset, count) in peftTensors(lora) {
                let expected = f.tensor(prefix + "grad." + name)!.values(as: Float.self)
                var err = 0.0, norm = 0.0
                for i in 0..<count {
                    let e = Double(expected[i]), o = Double(lora.gradients[offset + i])
                    err += (o - e) * (o - e); norm += e * e
                }
                #expect((err / max(norm, 1e-30)).squareRoot() < 3e-2, "\(name): relative error \((err / norm).squareRoot())")
            }
            let expectedNorm = Double(f.tensor(prefix + "grad_norm")!.values(as: Float.self)[0])
            #expect(abs(lora.gradientNorm - expectedNorm) / expectedNorm < 1e-2)
            return
        }
        #expect(abs(loss - expectedLoss) / expectedLoss < 1e-5, "\(fixture) \(prefix) loss \(loss) vs \(expectedLoss)")
        checkGradients(lora, against: f, prefix: prefix + "grad.")
        let expectedNorm = Double(f.tensor(prefix + "grad_norm")!.values(as: Float.self)[0])
        #expect(abs(lora.gradientNorm - expectedNorm) / expectedNorm < 1e-4)
    }

    @Test("f32 untied base: loss, every LoRA gradient and the gradient norm, with and without checkpointing", arguments: [true, false])
    func untied(checkpointing: Bool) throws {
        try run(base: "tiny-llama-train", fixture: "lora_grads.safetensors", prefix: "untied.", quant: nil, checkpointing: checkpointing)
    }

    @Test("f32 tied base (the output head is the embedding)")
    func tied() throws {
        try run(base: "tiny-llama-train-tied", fixture: "lora_grads.safetensors", prefix: "tied.", quant: nil, checkpointing: true)
    }

    @Test("NF4 + double-quantized base written by transformers: gradients flow through the 4-bit layers")
    func nf4() throws {
        try run(base: "tiny-llama-train-bnb-nf4", fixture: "lora_grads_nf4.safetensors", prefix: "", quant: .nf4, checkpointing: true)
    }

    @Test("bf16 compute (the default) stays within bf16 error of PEFT's f32 loss and gradients", arguments: [true, false])
    func bf16(checkpointing: Bool) throws {
        try run(base: "tiny-llama-train", fixture: "lora_grads.safetensors", prefix: "untied.", quant: nil, checkpointing: checkpointing, dtype: .bf16)
        try run(base: "tiny-llama-train-tied", fixture: "lora_grads.safetensors", prefix: "tied.", quant: nil, checkpointing: true, dtype: .bf16)
        try run(base: "tiny-llama-train-bnb-nf4", fixture: "lora_grads_nf4.safetensors", prefix: "", quant: .nf4, checkpointing: true, dtype: .bf16)
    }

    @Test("trainable parameters equal PEFT's print_trainable_parameters for the default model (r 16 and 64)")
    func trainableCount() throws {
        let expected = try JSON.parse(try FileSystem.readFile(FileSystem.join(resources, "trainable_params.json")))
        let cache = Environment.get("QLORA_CACHE") ?? FileSystem.join(Environment.get("HOME") ?? "/root", ".cache/swift-qlora")
        var o = LoadOptions()
        o.showProgress = false
        let model = try LlamaModel.load(FileSystem.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf"), options: o)
        for r in [16, 64] {
            var c = LoRAConfig()
            c.rank = r
            let lora = LoRAWeights(model: model, config: c)
            let text = "\(expected)"
            #expect(text.contains(String(lora.parameterCount)), "r \(r): \(lora.parameterCount)")
        }
        #expect(LoRAWeights(model: model, config: { var c = LoRAConfig(); c.rank = 16; return c }()).parameterCount == 4_884_480)
    }
}
