// Every family through the commands a user runs, on the tiny GGUFs llama.cpp's converter wrote (their
// tokenizers are the models' own: byte-level BPE for Qwen3, SentencePiece for Gemma 3 and Phi-3): train a few
// steps, generate with the adapter, merge to GGUF and read it back, perplexity; a target module the family
// does not have is refused by name.
import QLoRA
import QLoRATestSupport
import Testing

private let models = FileSystem.join(Fixtures.repositoryRoot(), "Tests/QLoRAModelTests/Resources")

@Suite("command line: model families")
struct FamilyCLITests {
    @Test("train, generate with the adapter, merge to GGUF, perplexity", arguments: ["tiny-qwen3", "tiny-gemma3", "tiny-phi3"])
    func commands(_ family: String) throws {
        let model = FileSystem.join(models, family + ".gguf")
        let data = try TrainCLITests.dataset()
        let dir = try Fixtures.temporaryDirectory("family-\(family)")
        let out = FileSystem.join(dir, "adapter")
        let train = try runQLoRA(["train", "--model", model, "--data", data, "--output", out, "--lora-r", "4", "--max-steps", "2",
                                  "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "48", "--val-split", "0", "--template", "guanaco", "--json"])
        #expect(train.status == 0, "\(train.stderr)")
        let config = try JSON.parse(try FileSystem.readFile(FileSystem.join(out, "adapter_config.json")))
        let targets = Set(config["target_modules"]?.arrayValue?.compactMap(\.stringValue) ?? [])
        let fused = family == "tiny-phi3"
        #expect(targets == Set(Projection.present(fused: fused).map(\.name)), "\(targets)")

        let gen = try runQLoRA(["generate", "--model", model, "--adapter", out, "--prompt", "The war", "--max-tokens", "4", "--json"])
        #expect(gen.status == 0, "\(gen.stderr)")
        #expect(try JSON.parse(gen.stdout)["generated_tokens"]?.intValue == 4, "\(gen.stdout)")

        let merged = FileSystem.join(dir, "merged.gguf")
        let merge = try runQLoRA(["merge", "--model", model, "--adapter", out, "--output", merged, "--format", "gguf", "--gguf-type", "f32", "--quiet"])
        #expect(merge.status == 0, "\(merge.stderr)")
        let g = try GGUFFile(path: merged)
        #expect(g.value("general.architecture")?.stringValue == String(family.dropFirst("tiny-".count)))
        #expect(g.value("tokenizer.ggml.model")?.stringValue == (family == "tiny-qwen3" ? "gpt2" : "llama"))

        let text = FileSystem.join(dir, "text.txt")
        try FileSystem.writeFileAtomically(text, bytes: Array(String(repeating: "The war and the peace of the world. ", count: 20).utf8))
        let ppl = try runQLoRA(["perplexity", "--model", merged, "--text-file", text, "--json"])
        #expect(ppl.status == 0, "\(ppl.stderr)")
        #expect((try JSON.parse(ppl.stdout)["perplexity"]?.doubleValue ?? 0) > 1, "\(ppl.stdout)")
    }

    @Test("a target module the model does not have is refused, naming the ones it has")
    func unknownTarget() throws {
        let r = try runQLoRA(["train", "--model", FileSystem.join(models, "tiny-phi3.gguf"), "--data", try TrainCLITests.dataset(),
                              "--output", FileSystem.join(try Fixtures.temporaryDirectory("phi3-target"), "o"), "--target-modules", "q_proj,v_proj"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("q_proj") && r.stderr.contains("qkv_proj") && r.stderr.contains("gate_up_proj"), "\(r.stderr)")
    }
}
