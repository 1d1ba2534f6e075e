// `qlora train --use-dora` as users run it: the tiny Qwen3 with dropout (DoRA's dropout form), stopped at a checkpoint and
// resumed to the same adapter byte for byte, PEFT's layout written; the adapter merged by `qlora merge` generates what the
// attached adapter generates; llama.cpp's LoRA GGUF refuses it by name.
import QLoRA
import QLoRATestSupport
import Testing

private let tinyQwen = FileSystem.join(Fixtures.repositoryRoot(), "Tests/QLoRAModelTests/Resources/tiny-qwen3.gguf")

@Suite("command line: train --use-dora")
struct DoRACLITests {
    static func arguments(_ data: String, _ out: String) -> [String] {
        ["train", "--model", tinyQwen, "--use-dora", "--data", data, "--output", out, "--lora-r", "8", "--max-steps", "4", "--batch-size", "2",
         "--grad-accum", "1", "--max-seq-len", "48", "--save-every", "2", "--val-split", "0", "--seed", "3", "--lora-dropout", "0.1",
         "--learning-rate", "2e-3", "--json"]
    }

    @Test("trained with dropout, resumed byte-identical, PEFT's layout; merged generates as attached; export-adapter refuses DoRA")
    func trainMergeGenerate() throws {
        let data = try TrainCLITests.dataset()
        let dir = try Fixtures.temporaryDirectory("dora-cli")
        let straight = FileSystem.join(dir, "straight"), resumed = FileSystem.join(dir, "resumed")
        let r = try runQLoRA(Self.arguments(data, straight))
        #expect(r.status == 0, "\(r.stderr)")
        let config = try JSON.parse(try FileSystem.readFile(FileSystem.join(straight, "adapter_config.json")))
        #expect(config["use_dora"]?.boolValue == true)
        let weights = try SafetensorsFile(path: FileSystem.join(straight, "adapter_model.safetensors"))
        let magnitudes = weights.names.filter { $0.hasSuffix(".lora_magnitude_vector") }
        #expect(magnitudes.count == 7 * 2 && magnitudes.count * 2 == weights.names.count - magnitudes.count, "\(weights.names)")

        #expect(try runQLoRA(Self.arguments(data, resumed) + ["--max-steps", "2"]).status == 0)
        let second = try runQLoRA(Self.arguments(data, resumed) + ["--resume"])
        #expect(second.status == 0, "\(second.stderr)")
        #expect(try FileSystem.readFile(FileSystem.join(straight, "adapter_model.safetensors"))
                == (try FileSystem.readFile(FileSystem.join(resumed, "adapter_model.safetensors"))), "the resumed DoRA adapter differs")

        // Merged onto the weights it was trained on, the model generates what the base with the adapter attached generates.
        let merged = FileSystem.join(dir, "merged.gguf")
        let m = try runQLoRA(["merge", "--model", tinyQwen, "--adapter", straight, "--output", merged, "--gguf-type", "f32", "--quiet"])
        #expect(m.status == 0, "\(m.stderr)")
        // (The attached adapter on the NF4 base it was trained on; the merged f32 model unquantized.)
        let prompt = ["--prompt", "Say the number 7 in words.", "--max-tokens", "12", "--temperature", "0", "--json"]
        let attached = try runQLoRA(["generate", "--model", tinyQwen, "--adapter", straight] + prompt)
        let fromMerged = try runQLoRA(["generate", "--model", merged, "--quant-type", "none"] + prompt)
        #expect(attached.status == 0 && fromMerged.status == 0, "\(attached.stderr) \(fromMerged.stderr)")
        let a = try JSON.parse(attached.stdout)["text"]?.stringValue, b = try JSON.parse(fromMerged.stdout)["text"]?.stringValue
        #expect(a != nil && a == b, "\(String(describing: a)) vs \(String(describing: b))")

        let export = try runQLoRA(["export-adapter", "--model", tinyQwen, "--adapter", straight, "--output", FileSystem.join(dir, "lora.gguf")])
        #expect(export.status != 0 && export.stderr.contains("DoRA") && export.stderr.contains("qlora merge"), "\(export.stderr)")
    }
}
