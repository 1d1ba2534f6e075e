// Adapters written by swift-qlora, read by PEFT: Resources/ours-lora/ was written by `writePEFTAdapter`
// (LoRA r 8, seeded non-zero weights, tiny-llama-gqa), with our logits in ours-lora/our_logits.safetensors;
// scripts/reference/check_adapter_roundtrip.py loads it with peft.PeftModel.from_pretrained and compares.
// Here: the writer still writes exactly those bytes, and reading them back gives the same logits.
import QLoRA
import QLoRATestSupport
import Testing

private let modelResources = FileSystem.join(FileSystem.directoryName(Fixtures.resources()), "../QLoRAModelTests/Resources")

@Suite("adapter round trip")
struct AdapterRoundTripTests {
    static func makeAdapter(_ model: LlamaModel) -> LoRAWeights {
        var c = LoRAConfig()
        c.rank = 8
        c.alpha = 16
        c.dropout = 0
        let lora = LoRAWeights(model: model, config: c)
        var rng = SeededGenerator(seed: 42)
        for i in lora.parameters.indices { lora.parameters[i] = (rng.nextFloat() - 0.5) * 0.2 }
        return lora
    }

    @Test("the PEFT folder we write is stable and loads back with our logits")
    func roundTrip() throws {
        var o = LoadOptions()
        o.quantType = nil
        o.showProgress = false
        let model = try LlamaModel.load(FileSystem.join(modelResources, "tiny-llama-gqa"), options: o)
        let lora = Self.makeAdapter(model)
        let dir = try Fixtures.temporaryDirectory("ours-lora")
        try lora.writePEFTAdapter(to: dir, baseModel: "tiny-llama-gqa")
        let committed = FileSystem.join(Fixtures.resources(), "ours-lora")
        #expect(try FileSystem.readFile(FileSystem.join(dir, "adapter_model.safetensors"))
                == (try FileSystem.readFile(FileSystem.join(committed, "adapter_model.safetensors"))))
        #expect(try FileSystem.readFile(FileSystem.join(dir, "adapter_config.json"))
                == (try FileSystem.readFile(FileSystem.join(committed, "adapter_config.json"))))
        let adapted = try model.withAdapter(dir)
        let ids = [1, 5, 9, 200, 17, 3, 99, 42]
        let logits = try adapted.forward(ids, cache: KVCache(config: model.config, capacity: 16), logits: .all)
        let expected = try SafetensorsFile(path: FileSystem.join(committed, "our_logits.safetensors")).tensor("logits")!.values(as: Float.self)
        #expect(Compare.close(logits, expected, atol: 1e-5, rtol: 1e-5, "our logits") == nil)
    }
}
