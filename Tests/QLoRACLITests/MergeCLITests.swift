// `qlora merge` and `qlora export-adapter` on the command line: the default model and an adapter into a GGUF and
// a folder our loader reads back; an existing output refused; a write that runs out of space (a file-size limit,
// as a full disk fails) leaves nothing behind; --requantize nf4 and its drift report; the adapter as a llama.cpp
// LoRA GGUF that generate applies as it applies the PEFT folder; --help says which merge reproduces the model.
import QLoRA
import QLoRATestSupport
import Testing

@Suite("command line: merge")
struct MergeCLITests {
    static var qlora: String { FileSystem.join(FileSystem.directoryName(CommandLine.arguments[0]), "qlora") }

    @Test("merge the default model and an adapter: GGUF and folder read back; output exists; out of space mid-write; --help")
    func merge() throws {
        let dir = try Fixtures.temporaryDirectory("merge-cli")
        let adapter = FileSystem.join(dir, "adapter")
        try writeTestAdapter(adapter)
        let gguf = FileSystem.join(dir, "merged.gguf")
        let r = try runQLoRA(["merge", "--adapter", adapter, "--output", gguf, "--gguf-type", "q8_0", "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        let summary = try JSON.parse(r.stdout)
        #expect(summary["format"]?.stringValue == "gguf" && summary["type"]?.stringValue == "q8_0" && summary["onto"]?.stringValue == "quantized")
        #expect(summary["adapted_tensors"]?.intValue == 60 && summary["tensors"]?.intValue == 272)
        #expect((summary["peak_rss_bytes"]?.intValue ?? 0) > 0)
        let generated = try runQLoRA(["generate", "--model", gguf, "--prompt", "What is the capital of France?", "--max-tokens", "4", "--temperature", "0", "--json"])
        #expect(generated.status == 0, "\(generated.stderr)")

        // An existing output: refused, one error line, the file untouched.
        let before = try FileSystem.readFile(gguf)
        let again = try runQLoRA(["merge", "--adapter", adapter, "--output", gguf])
        #expect(again.status != 0 && again.stderr.hasPrefix("error: ") && again.stderr.contains("--force"), "\(again.stderr)")
        #expect(try FileSystem.readFile(gguf) == before)

        // Out of space while writing the folder (a 20 MB file-size limit; the bf16 weights need 270 MB): an error
        // that names the file, and neither the folder nor its staging copy left.
        let folder = FileSystem.join(dir, "folder")
        let limited = try runProgram("/bin/bash", ["-c", "ulimit -f 20000; exec \"$0\" \"$@\"", Self.qlora, "merge", "--adapter", adapter, "--output", folder, "--quiet"])
        #expect(limited.status != 0 && limited.stderr.hasPrefix("error: ") && limited.stderr.contains("model.safetensors"), "\(limited.stderr)")
        #expect(limited.stderr.split(separator: "\n").count == 1, "\(limited.stderr)")
        #expect(!FileSystem.exists(folder))
        let listing = try FileSystem.listDirectory(dir)
        #expect(listing.allSatisfy { !$0.hasPrefix(".") }, "\(listing)")
        let ok = try runQLoRA(["merge", "--adapter", adapter, "--output", folder, "--dtype", "f16", "--quiet"])
        #expect(ok.status == 0, "\(ok.stderr)")
        #expect(ok.stdout.contains("onto dequant(nf4(W)), block 64, double quantization on"), "\(ok.stdout)")
        for name in ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
            #expect(FileSystem.exists(FileSystem.join(folder, name)), "\(name)")
        }

        // --requantize nf4: a bitsandbytes folder of the merged model and the drift report.
        let requantized = FileSystem.join(dir, "nf4")
        let rq = try runQLoRA(["merge", "--adapter", adapter, "--output", requantized, "--requantize", "nf4", "--json"])
        #expect(rq.status == 0, "\(rq.stderr)")
        let drift = try JSON.parse(rq.stdout)["drift"]
        #expect(drift?["tokens"]?.intValue ?? 0 > 50)
        let mean = drift?["mean_abs_logit_diff"]?.doubleValue ?? -1, maxDiff = drift?["max_abs_logit_diff"]?.doubleValue ?? -1
        #expect(mean > 0 && mean < maxDiff && maxDiff.isFinite, "\(String(describing: drift))")
        #expect(abs(drift?["nll_change"]?.doubleValue ?? 9) < 1)
        let qconfig = try JSON.parse(try FileSystem.readFile(FileSystem.join(requantized, "config.json")))
        #expect(qconfig["quantization_config"]?["bnb_4bit_quant_type"]?.stringValue == "nf4")
        #expect(try FileSystem.listDirectory(dir).allSatisfy { !$0.hasPrefix(".") })

        // export-adapter: llama.cpp's LoRA GGUF, which generate reads back onto the same base.
        let lora = FileSystem.join(dir, "adapter.gguf")
        let ex = try runQLoRA(["export-adapter", "--adapter", adapter, "--output", lora, "--json"])
        #expect(ex.status == 0, "\(ex.stderr)")
        #expect(try JSON.parse(ex.stdout)["tensors"]?.intValue == 120)
        let prompt = ["--prompt", "What is the capital of France?", "--max-tokens", "6", "--temperature", "0", "--json"]
        let viaFolder = try runQLoRA(["generate", "--adapter", adapter] + prompt), viaGGUF = try runQLoRA(["generate", "--adapter", lora] + prompt)
        #expect(viaFolder.status == 0 && viaGGUF.status == 0, "\(viaGGUF.stderr)")
        #expect(try JSON.parse(viaFolder.stdout)["text"] == JSON.parse(viaGGUF.stdout)["text"])

        let help = try runQLoRA(["merge", "--help"])
        #expect(help.stdout.contains("dequant(quant(W)) + s·B·A") && help.stdout.contains("--onto"))
    }
}
