// One QLoRA training step on each family's tiny model against PEFT (transformers 5.24, f32, eager): the loss and
// the gradient of every LoRA tensor, PEFT's modules of that family (Phi-3's fused qkv_proj and gate_up_proj
// adapted as one each), with and without gradient checkpointing (fixtures in QLoRAModelTests/Resources, from
// scripts/reference/make_family_fixtures.py).
import QLoRA
import QLoRATestSupport
import Testing

private let resources = FileSystem.join(Fixtures.repositoryRoot(), "Tests/QLoRAModelTests/Resources")

@Suite("family gradients against PEFT")
struct FamilyGradientTests {
    static let cases = ["tiny-qwen3", "tiny-gemma3", "tiny-phi3", "tiny-phi3-longrope"].flatMap { f in [true, false].map { (f, $0) } }

    @Test("loss and every LoRA gradient equal PEFT's", arguments: cases)
    func gradients(_ family: String, _ checkpointing: Bool) throws {
        try run(family, checkpointing: checkpointing, dtype: .f32)
    }

    @Test("bf16 compute (on the scalar reference kernels where the CPU has none): loss within 1%, gradients within 3% of PEFT's f32",
          arguments: ["tiny-qwen3", "tiny-gemma3", "tiny-phi3"])
    func bf16(_ family: String) throws {
        try run(family, checkpointing: true, dtype: .bf16, kernels: KernelTable.current.withBF16(.reference))
    }

    func run(_ family: String, checkpointing: Bool, dtype: ComputeDType, kernels: KernelTable = .current) throws {
        let ref = try SafetensorsFile(path: FileSystem.join(resources, family, "reference.safetensors"))
        var o = LoadOptions()
        o.quantType = nil
        o.showProgress = false
        let model = try LlamaModel.load(FileSystem.join(resources, family), options: o)
        let adapter = try PEFTAdapter(folder: FileSystem.join(resources, family + "-lora"))
        var c = LoRAConfig()
        c.rank = adapter.config.rank
        c.alpha = Float(adapter.config.alpha)
        c.dropout = 0
        let lora = LoRAWeights(model: model, config: c)
        #expect(lora.slots.count == adapter.modules.count)
        try lora.load(from: adapter)
        var options = TrainingOptions()
        options.computeDType = dtype
        options.gradientCheckpointing = checkpointing
        let engine = TrainingEngine(model: model, lora: lora, options: options, kernels: kernels)
        let ids = ref.tensor("train_ids")!.values(as: Int64.self).map(Int.init)
        let labels = ref.tensor("train_labels")!.values(as: Int64.self).map(Int.init)
        let loss = try engine.step(TrainingBatch(tokens: ids, labels: labels, batchSize: 2, sequenceLength: ids.count / 2))
        let expected = Double(ref.tensor("lora.loss")!.values(as: Float.self)[0])
        let bf16 = dtype == .bf16
        #expect(engine.usesBF16 == bf16)
        #expect(abs(loss - expected) / expected < (bf16 ? 1e-2 : 1e-5), "\(family) loss \(loss) vs \(expected)")
        for s in lora.slots {
            let (a, b) = LoRAWeights.peftNames(s)
            for (name, offset, count) in [(a, s.aOffset, c.rank * s.inFeatures), (b, s.bOffset, s.outFeatures * c.rank)] {
                let want = ref.tensor("grad." + name)!.values(as: Float.self)
                let ours = Array(lora.gradients[offset..<(offset + count)])
                if bf16 {
                    var err = 0.0, norm = 0.0
                    for i in 0..<count { err += Double(ours[i] - want[i]) * Double(ours[i] - want[i]); norm += Double(want[i]) * Double(want[i]) }
                    #expect((err / max(norm, 1e-30)).squareRoot() < 3e-2, "\(family) \(name): relative error \((err / norm).squareRoot())")
                    continue
                }
                let scale = want.map(abs).max()!
                let r = Compare.close(ours, want, atol: 1e-4 * scale, rtol: 1e-4, "\(family) \(name)")
                #expect(r == nil, "\(r ?? "")")
            }
        }
    }
}
