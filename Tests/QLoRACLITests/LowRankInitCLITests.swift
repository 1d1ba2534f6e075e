// `qlora train --lora-init pissa|loftq` as users run it on the tiny Qwen3: PiSSA on an f32 base starts exactly where the
// model is (residual + s·BA = W), writes the residual base that generate then takes with the adapter, and resumes
// byte-identical (the SVDs computed again); LoftQ's one round keeps the model's own quantized base (nothing written),
// two rounds write theirs; LoftQ without a 4-bit base and --loftq-iter without LoftQ are refused by name.
import QLoRA
import QLoRATestSupport
import Testing

private let tinyQwen = FileSystem.join(Fixtures.repositoryRoot(), "Tests/QLoRAModelTests/Resources/tiny-qwen3.gguf")

@Suite("command line: train --lora-init pissa and loftq")
struct LowRankInitCLITests {
    static func arguments(_ data: String, _ out: String, _ extra: [String]) -> [String] {
        ["train", "--model", tinyQwen, "--data", data, "--output", out, "--lora-r", "8", "--max-steps", "4", "--batch-size", "2", "--grad-accum", "1",
         "--max-seq-len", "48", "--save-every", "2", "--val-split", "0.2", "--seed", "3", "--lora-dropout", "0", "--json"] + extra
    }

    @Test("PiSSA: the f32 model's validation loss at the start, the residual base written and used by generate, resumed byte-identical")
    func pissa() throws {
        let data = try TrainCLITests.dataset()
        let dir = try Fixtures.temporaryDirectory("pissa-cli")
        // (f32 products: in bf16 the residual's products round differently from W's.)
        let exact = ["--quant-type", "none", "--compute-dtype", "f32", "--max-steps", "1"]
        let plain = try runQLoRA(Self.arguments(data, FileSystem.join(dir, "plain"), exact))
        let f32 = try runQLoRA(Self.arguments(data, FileSystem.join(dir, "f32"), exact + ["--lora-init", "pissa"]))
        #expect(plain.status == 0 && f32.status == 0, "\(plain.stderr) \(f32.stderr)")
        let before = try JSON.parse(plain.stdout)["val_loss_before"]?.doubleValue ?? -1, start = try JSON.parse(f32.stdout)["val_loss_before"]?.doubleValue ?? 1
        #expect(abs(before - start) < 1e-4, "PiSSA on f32 starts at \(start), the model is at \(before)")

        let straight = FileSystem.join(dir, "straight"), resumed = FileSystem.join(dir, "resumed")
        let r = try runQLoRA(Self.arguments(data, straight, ["--lora-init", "pissa"]))
        #expect(r.status == 0, "\(r.stderr)")
        let base = FileSystem.join(straight, "base")
        #expect(FileSystem.exists(FileSystem.join(base, "config.json")) && r.stderr.contains("the new base (the residual weights) written to"), "\(r.stderr)")
        let config = try JSON.parse(try FileSystem.readFile(FileSystem.join(straight, "adapter_config.json")))
        #expect(config["base_model_name_or_path"]?.stringValue == base)
        #expect(try runQLoRA(Self.arguments(data, resumed, ["--lora-init", "pissa", "--max-steps", "2"])).status == 0)
        let second = try runQLoRA(Self.arguments(data, resumed, ["--lora-init", "pissa", "--resume"]))
        #expect(second.status == 0, "\(second.stderr)")
        #expect(try FileSystem.readFile(FileSystem.join(straight, "adapter_model.safetensors"))
                == (try FileSystem.readFile(FileSystem.join(resumed, "adapter_model.safetensors"))), "the resumed PiSSA adapter differs")
        let prompt = ["--prompt", "Say the number 7 in words.", "--max-tokens", "4", "--temperature", "0", "--json"]
        let generated = try runQLoRA(["generate", "--model", base, "--adapter", straight] + prompt)
        #expect(generated.status == 0, "\(generated.stderr)")
        // Without --model the adapter goes on the base its run wrote; on another model it is refused by name (it does not fit).
        let implicit = try runQLoRA(["generate", "--adapter", straight] + prompt)
        #expect(implicit.status == 0 && (try? JSON.parse(implicit.stdout))?["text"] == (try? JSON.parse(generated.stdout))?["text"], "\(implicit.stderr)")
        let wrong = try runQLoRA(["generate", "--model", tinyQwen, "--adapter", straight] + prompt)
        #expect(wrong.status != 0 && wrong.stderr.contains("was trained on the base its run wrote"), "\(wrong.stderr)")
        let merged = FileSystem.join(dir, "merged.gguf")
        let m = try runQLoRA(["merge", "--adapter", straight, "--output", merged, "--gguf-type", "f32", "--quiet"])
        #expect(m.status == 0 && FileSystem.exists(merged), "\(m.stderr)")
    }

    @Test("LoftQ: one round keeps the model's quantized base (nothing written), two rounds write theirs; refusals")
    func loftq() throws {
        let data = try TrainCLITests.dataset()
        let dir = try Fixtures.temporaryDirectory("loftq-cli")
        let one = FileSystem.join(dir, "one"), two = FileSystem.join(dir, "two")
        let r1 = try runQLoRA(Self.arguments(data, one, ["--lora-init", "loftq", "--max-steps", "1"]))
        #expect(r1.status == 0 && r1.stderr.contains("LoftQ (1 round)") && !FileSystem.exists(FileSystem.join(one, "base")), "\(r1.stderr)")
        let config = try JSON.parse(try FileSystem.readFile(FileSystem.join(one, "adapter_config.json")))
        #expect(config["base_model_name_or_path"]?.stringValue == tinyQwen)
        let r2 = try runQLoRA(Self.arguments(data, two, ["--init-lora", "loftq", "--loftq-iter", "2", "--max-steps", "1"]))
        #expect(r2.status == 0 && r2.stderr.contains("LoftQ (2 rounds)") && FileSystem.exists(FileSystem.join(two, "base/config.json")), "\(r2.stderr)")

        let none = try runQLoRA(Self.arguments(data, FileSystem.join(dir, "x"), ["--lora-init", "loftq", "--quant-type", "none"]))
        #expect(none.status != 0 && none.stderr.contains("--quant-type none has none"), "\(none.stderr)")
        let iter = try runQLoRA(Self.arguments(data, FileSystem.join(dir, "z"), ["--loftq-iter", "3"]))
        #expect(iter.status != 0 && iter.stderr.contains("--loftq-iter applies to --lora-init loftq"), "\(iter.stderr)")
    }
}
