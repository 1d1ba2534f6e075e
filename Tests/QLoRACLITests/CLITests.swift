// The `qlora` binary as users and scripts see it: exit codes, one-line errors on stderr, JSON on stdout.
import Foundation
import QLoRA
import QLoRATestSupport
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Runs the qlora binary that was built beside this test bundle.
func runQLoRA(_ arguments: [String], environment: [String: String] = [:], input: String? = nil) throws -> (status: Int32, stdout: String, stderr: String) {
    try runProgram(FileSystem.join(FileSystem.directoryName(CommandLine.arguments[0]), "qlora"), arguments, environment: environment, input: input)
}

/// Runs a program, capturing stdout and stderr.
func runProgram(_ binary: String, _ arguments: [String], environment: [String: String] = [:], input: String? = nil) throws -> (status: Int32, stdout: String, stderr: String) {
    let dir = try Fixtures.temporaryDirectory("cli")
    let out = FileSystem.join(dir, "stdout"), err = FileSystem.join(dir, "stderr"), inp = FileSystem.join(dir, "stdin")
    try FileSystem.writeFileAtomically(inp, bytes: Array((input ?? "").utf8))
    func quote(_ s: String) -> String { "'" + s.split(separator: "'", omittingEmptySubsequences: false).joined(separator: "'\\''") + "'" }
    let env = environment.map { "\($0.key)=\(quote($0.value))" }.joined(separator: " ")
    let command = "\(env) \(quote(binary)) \(arguments.map(quote).joined(separator: " ")) >\(quote(out)) 2>\(quote(err)) <\(quote(inp))"
    let raw = system(command)
    let status = (raw >> 8) & 0xFF
    let o = String(decoding: try FileSystem.readFile(out), as: UTF8.self)
    let e = String(decoding: try FileSystem.readFile(err), as: UTF8.self)
    return (status, o, e)
}

@Suite("command line")
struct CLITests {
    @Test("qlora exists beside the tests")
    func binary() {
        #expect(FileSystem.exists(FileSystem.join(FileSystem.directoryName(CommandLine.arguments[0]), "qlora")))
    }

    @Test("bad safetensors files: non-zero exit and one 'error:' line naming the file and tensor", arguments: SafetensorsCLICase.all)
    func badFiles(_ c: SafetensorsCLICase) throws {
        let dir = try Fixtures.temporaryDirectory("badcli")
        let path = FileSystem.join(dir, "bad.safetensors")
        try FileSystem.writeFileAtomically(path, bytes: c.bytes)
        let r = try runQLoRA(["inspect", path])
        #expect(r.status != 0)
        let lines = r.stderr.split(separator: "\n")
        #expect(lines.count == 1, "\(c.label): \(r.stderr)")
        #expect(r.stderr.hasPrefix("error: \(path)"), "\(c.label): \(r.stderr)")
        if let t = c.tensor { #expect(r.stderr.contains(t), "\(c.label): \(r.stderr)") }
        #expect(r.stdout.isEmpty)
        // quantize refuses the same file and writes nothing.
        let out = FileSystem.join(dir, "out")
        let q = try runQLoRA(["quantize", path, "--output", out, "--quiet"])
        #expect(q.status != 0)
        #expect(q.stderr.hasPrefix("error: "))
        #expect(!FileSystem.exists(FileSystem.join(out, "model.safetensors")))
    }

    @Test("quantize then inspect: 4.5 bits/parameter without double quantization, about 4.127 with it")
    func quantizeInspect() throws {
        let dir = try Fixtures.temporaryDirectory("qi")
        var rng = SeededRandom(seed: 9)
        let rows = 512, cols = 4096
        let w = (0..<(rows * cols)).map { _ in rng.normal() * 0.02 }
        let input = FileSystem.join(dir, "w.safetensors")
        try SafetensorsWriter.write(path: input, tensors: [
            ("proj.weight", .make(w, dtype: .f32, shape: [rows, cols])),
            ("norm.weight", .make([Float](repeating: 1, count: cols), dtype: .f32, shape: [cols])),
        ])
        for (flags, bits) in [([String](), 4.127), (["--no-double-quant"], 4.5)] {
            let out = FileSystem.join(dir, flags.isEmpty ? "dq" : "plain")
            let q = try runQLoRA(["quantize", input, "--output", out, "--json"] + flags)
            #expect(q.status == 0, "\(q.stderr)")
            let report = try JSON.parse(q.stdout)
            #expect(report["quantized_tensors"]?.intValue == 1)
            #expect(report["copied_tensors"]?.intValue == 1)
            #expect(report["relative_rmse"]!.doubleValue! < 0.12)
            let i = try runQLoRA(["inspect", out, "--json"])
            #expect(i.status == 0, "\(i.stderr)")
            let info = try JSON.parse(i.stdout)
            let measured = info["quantized_bits_per_parameter"]!.doubleValue!
            #expect(abs(measured - bits) < 0.005, "\(flags): \(measured) bits/parameter")
            let tensors = info["tensors"]!.arrayValue!
            let proj = tensors.first { $0["name"]?.stringValue == "proj.weight" }!
            #expect(proj["quant_type"]?.stringValue == "nf4")
            #expect(proj["double_quant"]?.boolValue == flags.isEmpty)
        }
        // An existing output is not overwritten without --force.
        let again = try runQLoRA(["quantize", input, "--output", FileSystem.join(dir, "dq"), "--quiet"])
        #expect(again.status != 0 && again.stderr.contains("--force"))
    }

    @Test("a NaN weight stops quantize with the tensor name and index")
    func nanWeight() throws {
        let dir = try Fixtures.temporaryDirectory("nan")
        var w = [Float](repeating: 0.1, count: 256)
        w[130] = .nan
        let input = FileSystem.join(dir, "w.safetensors")
        try SafetensorsWriter.write(path: input, tensors: [("layer.weight", .make(w, dtype: .f32, shape: [4, 64]))])
        let r = try runQLoRA(["quantize", input, "--output", FileSystem.join(dir, "out"), "--quiet"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("layer.weight") && r.stderr.contains("element 130"), "\(r.stderr)")
        #expect(!FileSystem.exists(FileSystem.join(dir, "out", "model.safetensors")))
    }

    @Test("inspect --system names the kernel set, and QLORA_KERNELS forces it")
    func system() throws {
        let r = try runQLoRA(["inspect", "--system", "--json"], environment: ["QLORA_KERNELS": "reference"])
        #expect(r.status == 0)
        #expect(try JSON.parse(r.stdout)["kernels"]?.stringValue == "reference")
        let best = try runQLoRA(["inspect", "--system", "--json"])
        #expect(try JSON.parse(best.stdout)["kernels"]?.stringValue == KernelTable.available.last!.level.description)
    }

    @Test("argument errors exit non-zero and --help documents the defaults")
    func usage() throws {
        let r = try runQLoRA(["quantize", "x.safetensors", "--output", "o", "--block-size", "48"])
        #expect(r.status != 0)
        #expect(r.stderr.contains("--block-size"))
        let h = try runQLoRA(["quantize", "--help"])
        #expect(h.status == 0)
        #expect(h.stdout.contains("default: nf4") && h.stdout.contains("default: 64"))
    }
}

@Suite("command line: the default model")
struct DefaultModelCLITests {
    @Test("generate --chat, greedy: the answer streams to stdout and --json reports it")
    func generate() throws {
        let r = try runQLoRA(["generate", "--chat", "-p", "What is the capital of France?", "--temperature", "0", "--max-tokens", "12"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("Paris"), "\(r.stdout)")
        #expect(r.stderr.contains("tokens/s"))
        let j = try runQLoRA(["generate", "--chat", "-p", "What is the capital of France?", "--temperature", "0", "--max-tokens", "12", "--json"])
        let result = try JSON.parse(j.stdout)
        #expect(result["text"]?.stringValue?.contains("Paris") == true)
        #expect(result["generated_tokens"]?.intValue == 12 || result["finish_reason"]?.stringValue == "eos")
    }

    @Test("--kv-cache: f16 (the default), bf16 and f32 give the same greedy answer; another value is refused naming the choices")
    func kvCache() throws {
        var texts: [String] = []
        for dtype in ["f16", "bf16", "f32"] {
            let j = try runQLoRA(["generate", "--chat", "-p", "What is the capital of France?", "--temperature", "0", "--max-tokens", "12", "--json",
                                  "--kv-cache", dtype])
            #expect(j.status == 0, "\(j.stderr)")
            let reply = try JSON.parse(j.stdout)
            #expect(reply["kv_cache"]?.stringValue == dtype, "the cache that ran: \(j.stdout)")
            texts.append(reply["text"]?.stringValue ?? "")
        }
        #expect(texts[0].contains("Paris") && Set(texts).count == 1, "\(texts)")
        let plain = try runQLoRA(["generate", "-p", "Hi", "--max-tokens", "1", "--json"])
        #expect((try? JSON.parse(plain.stdout))?["kv_cache"]?.stringValue == "f16", "the default: \(plain.stdout)")
        // The products' precision that ran: bf16 by default where the CPU has the kernels, f32 when asked (or without them).
        #expect((try? JSON.parse(plain.stdout))?["compute_dtype"]?.stringValue == (BF16Gemm.isSupported ? "bf16" : "f32"), "\(plain.stdout)")
        let forced = try runQLoRA(["generate", "-p", "Hi", "--max-tokens", "1", "--json", "--compute-dtype", "bf16"])
        #expect((try? JSON.parse(forced.stdout))?["compute_dtype"]?.stringValue == (BF16Gemm.isSupported ? "bf16" : "f32"), "\(forced.stdout)")
        let reference = try runQLoRA(["generate", "-p", "Hi", "--max-tokens", "1", "--json", "--compute-dtype", "f32"])
        #expect((try? JSON.parse(reference.stdout))?["compute_dtype"]?.stringValue == "f32", "\(reference.stdout)")
        let bad = try runQLoRA(["generate", "-p", "x", "--kv-cache", "f8"])
        #expect(bad.status != 0 && bad.stderr.contains("--kv-cache must be f16, bf16 or f32"), "\(bad.stderr)")
    }

    @Test("chat: two turns, /reset, /exit, over standard input")
    func chat() throws {
        let r = try runQLoRA(["chat", "--temperature", "0", "--max-tokens", "16"],
                             input: "Hello!\n/reset\nWhat is the capital of France?\n/exit\n")
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("Paris"), "\(r.stdout)")
        #expect(r.stderr.contains("new conversation"))
    }

    @Test("the Swift example (Examples/TrainAndGenerate) trains the default model four steps, saves a PEFT adapter and chats with it")
    func swiftExample() throws {
        let example = FileSystem.join(FileSystem.directoryName(CommandLine.arguments[0]), "train-and-generate")
        try #require(FileSystem.exists(example), "the example is built beside the tests (swift build --build-tests)")
        let cache = Environment.get("QLORA_CACHE") ?? FileSystem.join(Environment.get("HOME") ?? "/root", ".cache/swift-qlora")
        let root = FileSystem.directoryName(FileSystem.directoryName(FileSystem.directoryName("\(#filePath)")))
        let out = FileSystem.join(try Fixtures.temporaryDirectory("example"), "adapter")
        let r = try runProgram(example, [FileSystem.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf"), FileSystem.join(root, "demo/quill.jsonl"), out])
        #expect(r.status == 0, "\(r.stdout) \(r.stderr)")
        #expect(r.stdout.contains("step 4: loss") && r.stdout.contains("adapter saved in \(out) after 4 steps") && r.stdout.contains("reply: "), "\(r.stdout)")
        for name in ["adapter_model.safetensors", "adapter_config.json", "checkpoint-4/trainer_state.json"] {
            #expect(FileSystem.exists(FileSystem.join(out, name)), "\(name)")
        }
    }

    @Test("tokenize --json gives the tokenizer's ids and the decoded text")
    func tokenize() throws {
        let cache = Environment.get("QLORA_CACHE") ?? FileSystem.join(Environment.get("HOME") ?? "/root", ".cache/swift-qlora")
        let r = try runQLoRA(["tokenize", "-m", FileSystem.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf"), "--json", "<|im_start|>user\nHi 12<|im_end|>"])
        #expect(r.status == 0, "\(r.stderr)")
        let j = try JSON.parse(r.stdout)
        #expect(j["ids"]!.arrayValue!.compactMap(\.intValue) == [1, 4093, 198, 26843, 216, 33, 34, 2])
        #expect(j["decoded"]?.stringValue == "<|im_start|>user\nHi 12<|im_end|>")
    }

    @Test("perplexity --json on a text file")
    func perplexity() throws {
        let dir = try Fixtures.temporaryDirectory("ppl")
        let file = FileSystem.join(dir, "t.txt")
        try FileSystem.writeFileAtomically(file, bytes: Array(String(repeating: "The cat sat on the mat. ", count: 20).utf8))
        let r = try runQLoRA(["perplexity", "--text-file", file, "--context", "64", "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        let j = try JSON.parse(r.stdout)
        let ppl = j["perplexity"]!.doubleValue!
        #expect(ppl > 1 && ppl < 10, "a repeated sentence is easy to predict: \(ppl)")
    }

    @Test("a missing model is one error line naming it")
    func missingModel() throws {
        let r = try runQLoRA(["generate", "-m", "/nonexistent/model", "-p", "x"])
        #expect(r.status != 0)
        #expect(r.stderr.hasPrefix("error: ") && r.stderr.contains("/nonexistent/model"), "\(r.stderr)")
        let p = try runQLoRA(["generate", "-m", "/tmp/weights.bin", "-p", "x"])
        #expect(p.stderr.contains("safetensors"), "\(p.stderr)")
    }
}

@Suite("training step memory")
struct StepAllocationTests {
    @Test("after the first step (which makes the activation arena) a step allocates almost nothing: no activation buffers")
    func noAllocationInStepLoop() throws {
        // qlora-bench counts malloc calls by interposing malloc (its own process, so other tests do not count).
        let bench = FileSystem.join(FileSystem.directoryName(CommandLine.arguments[0]), "qlora-bench")
        try #require(FileSystem.exists(bench), "qlora-bench is built beside the tests (swift build --build-tests)")
        let model = FileSystem.join(Environment.get("QLORA_CACHE") ?? FileSystem.join(Environment.get("HOME") ?? ".", ".cache/swift-qlora"),
                                    "models/SmolLM2-135M-Instruct.Q4_1.gguf")
        let out = try runProgram(bench, ["train-step", model, "--batch", "2", "--seq", "32", "--steps", "5"])
        #expect(out.status == 0, "\(out.stderr)")
        let r = try JSON.parse(out.stdout)
        try #require(r["allocation_counter"]?.boolValue == true, "malloc was not interposed")
        let arena = r["workspace_bytes"]!.intValue!
        #expect(r["workspace_allocations"]?.intValue == 1)
        #expect(r["first_step_allocated_bytes"]!.intValue! >= arena, "the first step makes the arena")
        // Bookkeeping only (closures, dispatch): under 1% of the arena per step. With the arena but the tile
        // scales still in temporary buffers it was 18.3 MB here, 68% of the arena.
        let later = r["later_steps_max_allocated_bytes"]!.intValue!
        #expect(later * 100 < arena, "a later step allocated \(later) bytes (arena \(arena))")
    }
}

@Suite("command line: training")
struct TrainCLITests {
    static func dataset() throws -> String {
        let dir = try Fixtures.temporaryDirectory("traindata")
        let path = FileSystem.join(dir, "d.jsonl")
        let lines = (0..<24).map { i in
            #"{"instruction": "Say the number \#(i) in words.", "output": "The number is \#(i), written out for you."}"#
        }
        try FileSystem.writeFileAtomically(path, bytes: Array((lines.joined(separator: "\n") + "\n").utf8))
        return path
    }

    static func trainArguments(_ data: String, _ out: String) -> [String] {
        ["train", "--data", data, "--output", out, "--lora-r", "4", "--max-steps", "6", "--batch-size", "2", "--grad-accum", "1",
         "--max-seq-len", "48", "--save-every", "1", "--val-split", "0", "--seed", "3", "--lora-dropout", "0.1", "--json"]
    }

    @Test("killed with SIGKILL mid-run and resumed, the final adapter is byte-identical to an uninterrupted run")
    func resumeAfterKill() throws {
        let data = try Self.dataset()
        let dir = try Fixtures.temporaryDirectory("resume")
        let a = FileSystem.join(dir, "a"), b = FileSystem.join(dir, "b")
        let straight = try runQLoRA(Self.trainArguments(data, a))
        #expect(straight.status == 0, "\(straight.stderr)")
        // Run b in the background, kill it once a checkpoint beyond the first exists.
        let binary = FileSystem.join(FileSystem.directoryName(CommandLine.arguments[0]), "qlora")
        let pidFile = FileSystem.join(dir, "pid")
        let args = Self.trainArguments(data, b).map { "'\($0)'" }.joined(separator: " ")
        _ = system("'\(binary)' \(args) >/dev/null 2>&1 & echo $! > '\(pidFile)'")
        let pid = Int32(String(decoding: try FileSystem.readFile(pidFile), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))!
        var waited = 0
        while !FileSystem.exists(FileSystem.join(b, "checkpoint-3")) && waited < 600 { usleep(50_000); waited += 1 }
        kill(pid, SIGKILL)
        var polls = 0
        while kill(pid, 0) == 0 && polls < 600 { usleep(10_000); polls += 1 }
        #expect(!FileSystem.exists(FileSystem.join(b, "adapter_model.safetensors")), "the run finished before it was killed")
        let resumed = try runQLoRA(Self.trainArguments(data, b) + ["--resume"])
        #expect(resumed.status == 0, "\(resumed.stderr)")
        #expect(resumed.stderr.contains("resumed from"))
        let x = try FileSystem.readFile(FileSystem.join(a, "adapter_model.safetensors"))
        let y = try FileSystem.readFile(FileSystem.join(b, "adapter_model.safetensors"))
        #expect(x == y, "adapters differ after resume")
        // metrics.jsonl has one line per step, whatever the interruption.
        let steps = String(decoding: try FileSystem.readFile(FileSystem.join(b, "metrics.jsonl")), as: UTF8.self)
            .split(separator: "\n").compactMap { try? JSON.parse(String($0)) }.compactMap { $0["loss"] != nil ? $0["step"]?.intValue : nil }
        #expect(steps == [1, 2, 3, 4, 5, 6], "\(steps)")
        // TensorBoard: one event file per process, whole records; the resumed one starts by marking its restart.
        let board = FileSystem.join(b, "tensorboard")
        let files = try FileSystem.listDirectory(board).filter { $0.hasPrefix("events.out.tfevents.") }.sorted()
        #expect(files.count == 2, "\(files)")
        if let resumedFile = files.last {
            let records = try TensorBoardEvent.records(try FileSystem.readFile(FileSystem.join(board, resumedFile)), file: resumedFile)
            // Record 1 is Event{wall_time, step, session_log{status: START}}: it ends in field 7, length 2, status 1.
            #expect(records.count >= 2 && Array(records[1].suffix(4)) == [0x3A, 0x02, 0x08, 0x01], "no SessionLog START after the header")
        }
    }

    @Test("SIGINT saves a checkpoint and stops cleanly; --resume finishes the run")
    func interrupt() throws {
        let data = try Self.dataset()
        let dir = try Fixtures.temporaryDirectory("sigint")
        let out = FileSystem.join(dir, "o")
        let binary = FileSystem.join(FileSystem.directoryName(CommandLine.arguments[0]), "qlora")
        let pidFile = FileSystem.join(dir, "pid"), log = FileSystem.join(dir, "log")
        var args = Self.trainArguments(data, out)
        args[args.firstIndex(of: "--max-steps")! + 1] = "12"
        args[args.firstIndex(of: "--save-every")! + 1] = "100"
        let quoted = args.map { "'\($0)'" }.joined(separator: " ")
        _ = system("'\(binary)' \(quoted) >/dev/null 2>'\(log)' & echo $! > '\(pidFile)'")
        let pid = Int32(String(decoding: try FileSystem.readFile(pidFile), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))!
        var waited = 0
        while waited < 6000 {
            let text = (try? FileSystem.readFile(log)).map { String(decoding: $0, as: UTF8.self) } ?? ""
            if text.contains("training ") { break }
            usleep(50_000)
            waited += 1
        }
        usleep(500_000)
        kill(pid, SIGINT)
        // The process is not our child (the shell started it in the background): poll until it is gone.
        var polls = 0
        while kill(pid, 0) == 0 && polls < 6000 { usleep(50_000); polls += 1 }
        #expect(kill(pid, 0) != 0, "still running after SIGINT")
        let stderr = String(decoding: try FileSystem.readFile(log), as: UTF8.self)
        #expect(stderr.contains("interrupted: saved"), "\(stderr.split(separator: "\n").joined(separator: " | "))")
        let saved = Trainer.checkpoints(in: out)
        #expect(saved.count == 1 && saved[0].0 < 12)
        let resumed = try runQLoRA(args + ["--resume"])
        #expect(resumed.status == 0 && FileSystem.exists(FileSystem.join(out, "adapter_model.safetensors")), "\(resumed.stderr)")
    }

    @Test("--config: a YAML file of options, overridden by flags; training_args.yaml of a run reproduces it exactly")
    func configFile() throws {
        let data = try Self.dataset()
        let dir = try Fixtures.temporaryDirectory("config")
        let a = FileSystem.join(dir, "a"), b = FileSystem.join(dir, "b")
        let yaml = """
            # a comment
            data: \(data)
            output: \(a)
            lora_r: 8
            lora-alpha: 32
            target_modules: [q_proj, v_proj]
            max_steps: 5
            batch_size: 2
            grad_accum: 1
            max_seq_len: 48
            val_split: 0
            use_rslora: true
            seed: 5
            json: true
            """
        let config = FileSystem.join(dir, "train.yaml")
        try FileSystem.writeFileAtomically(config, bytes: Array(yaml.utf8))
        // The command line wins over the file: r 4 and 2 steps.
        let r = try runQLoRA(["train", "--config", config, "--lora-r", "4", "--max-steps", "2"])
        #expect(r.status == 0, "\(r.stderr)")
        // The default compute dtype is bf16 where the CPU has AVX512-BF16, and the log says which ran.
        #expect(r.stderr.contains(BF16Gemm.isSupported ? ", bf16 compute" : ", f32 compute"), "\(r.stderr)")
        let result = try JSON.parse(r.stdout)
        // q and v of 30 layers at r 4: 4 * (576 + 576) + 4 * (576 + 192).
        #expect(result["trainable_parameters"]?.intValue == 30 * (4 * (576 + 576) + 4 * (576 + 192)), "\(r.stdout)")
        #expect(result["steps"]?.intValue == 2)
        // The run's resolved options, fed back with another output, give the same adapter byte for byte.
        let args = FileSystem.join(a, "training_args.yaml")
        let text = String(decoding: try FileSystem.readFile(args), as: UTF8.self)
        #expect(text.contains("lora_r: 4") && text.contains("lora_alpha: 32.0") && text.contains("use_rslora: true"), "\(text)")
        #expect(FileSystem.exists(FileSystem.join(a, "checkpoint-2/training_args.yaml")))
        let again = try runQLoRA(["train", "--config", args, "--output", b, "--json"])
        #expect(again.status == 0, "\(again.stderr)")
        #expect(try FileSystem.readFile(FileSystem.join(a, "adapter_model.safetensors")) == FileSystem.readFile(FileSystem.join(b, "adapter_model.safetensors")))
        // training_args.yaml names every option of `qlora train --help` but the per-invocation ones.
        let help = try runQLoRA(["train", "--help"]).stdout
        let helpNames = Set(help.split(separator: "\n").filter { $0.hasPrefix("  -") }.flatMap { line in
            line.split(separator: " ").prefix(3).filter { $0.hasPrefix("--") }.map { $0.dropFirst(2).trimmingCharacters(in: CharacterSet(charactersIn: ",")) }
        })
        let written = Set(text.split(separator: "\n").filter { !$0.hasPrefix("#") }.map { String($0.split(separator: ":")[0]).replacingOccurrences(of: "_", with: "-") })
        // (init-lora is the other name of lora-init.)
        #expect(helpNames.subtracting(["config", "resume", "json", "help", "version", "distributed", "adapter", "val-data", "source-max-len", "target-max-len", "loraplus-lr-ratio", "init-lora"]) == written.subtracting(["adapter", "val-data", "source-max-len", "target-max-len", "loraplus-lr-ratio"]), "\(helpNames.symmetricDifference(written))")
        // Mistakes name the file and line.
        let bad = FileSystem.join(dir, "bad.yaml")
        try FileSystem.writeFileAtomically(bad, bytes: Array("data: \(data)\nlora_rank: 4\n".utf8))
        let e = try runQLoRA(["train", "--config", bad, "--output", FileSystem.join(dir, "c")])
        #expect(e.status != 0 && e.stderr.contains("bad.yaml:2: unknown option 'lora_rank'"), "\(e.stderr)")
        try FileSystem.writeFileAtomically(bad, bytes: Array("data: \(data)\nresume: 3\n".utf8))
        let f = try runQLoRA(["train", "--config", bad, "--output", FileSystem.join(dir, "c")])
        #expect(f.status != 0 && f.stderr.contains("bad.yaml:2: 'resume' is a flag"), "\(f.stderr)")
    }

    @Test("an output folder with checkpoints is not reused without --resume; a bad dataset line is reported")
    func refusals() throws {
        let data = try Self.dataset()
        let dir = try Fixtures.temporaryDirectory("refuse")
        let out = FileSystem.join(dir, "o")
        try FileSystem.makeDirectory(out)
        try FileSystem.makeDirectory(FileSystem.join(out, "checkpoint-5"))
        let r = try runQLoRA(Self.trainArguments(data, out))
        #expect(r.status != 0 && r.stderr.contains("--resume"), "\(r.stderr)")
        let bad = FileSystem.join(dir, "bad.jsonl")
        try FileSystem.writeFileAtomically(bad, bytes: Array("{\"text\": \"ok\"}\n{\"text\": 3}\n".utf8))
        let dtype = try runQLoRA(Self.trainArguments(data, FileSystem.join(dir, "o3")) + ["--compute-dtype", "f16"])
        #expect(dtype.status != 0 && dtype.stderr.contains("--compute-dtype must be bf16 or f32"), "\(dtype.stderr)")
        let b = try runQLoRA(Self.trainArguments(bad, FileSystem.join(dir, "o2")))
        #expect(b.status != 0 && b.stderr.contains("bad.jsonl:2:"), "\(b.stderr)")
    }
}

struct SafetensorsCLICase: CustomStringConvertible, Sendable {
    let label: String
    let bytes: [UInt8]
    let tensor: String?
    var description: String { label }

    static func raw(_ header: String, _ data: [UInt8], length: UInt64? = nil) -> [UInt8] {
        Fixtures.rawSafetensors(header, data: data, length: length)
    }

    static let all: [SafetensorsCLICase] = [
        .init(label: "truncated", bytes: raw(#"{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#, [0, 0, 0, 0]), tensor: "w"),
        .init(label: "bad JSON", bytes: raw("{\"w\": [", []), tensor: nil),
        .init(label: "overlap", bytes: raw(#"{"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]}, "b": {"dtype": "U8", "shape": [4], "data_offsets": [2, 6]}}"#, [UInt8](repeating: 0, count: 6)), tensor: "b"),
        .init(label: "out of range", bytes: raw(#"{"w": {"dtype": "U8", "shape": [4], "data_offsets": [100, 104]}}"#, [0]), tensor: "w"),
        .init(label: "absurd header length", bytes: raw("{}", [], length: 1 << 50), tensor: nil),
        .init(label: "wrong byte count", bytes: raw(#"{"w": {"dtype": "F16", "shape": [3], "data_offsets": [0, 4]}}"#, [0, 0, 0, 0]), tensor: "w"),
        .init(label: "unknown dtype", bytes: raw(#"{"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}"#, [UInt8](repeating: 0, count: 8)), tensor: "w"),
    ]
}

@Suite("command line: eval")
struct EvalCLITests {
    @Test("eval elo: ratings and the win-rate matrix as JSON; a malformed judgment is one error line naming file:line")
    func elo() throws {
        let dir = try Fixtures.temporaryDirectory("elo")
        let path = FileSystem.join(dir, "judgments.jsonl")
        var lines: [String] = []
        for i in 0..<30 {
            lines.append(#"{"model_a": "strong", "model_b": "weak", "winner": "\#(i % 5 == 0 ? "tie" : "model_a")"}"#)
            lines.append(#"{"model_a": "weak", "model_b": "middle", "winner": "\#(i % 3 == 0 ? "model_a" : "model_b")"}"#)
        }
        try FileSystem.writeFileAtomically(path, bytes: Array(lines.joined(separator: "\n").utf8))
        let r = try runQLoRA(["eval", "elo", "--judgments", path, "--orderings", "500", "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        let v = try JSON.parse(Array(r.stdout.utf8))
        let ratings = try #require(v["ratings"]?.arrayValue)
        #expect(ratings.compactMap { $0["model"]?.stringValue } == ["strong", "middle", "weak"])
        #expect(ratings[0]["battles"]?.intValue == 30 && ratings[0]["ties"]?.intValue == 6 && ratings[0]["wins"]?.intValue == 24)
        let lower = ratings[0]["lower"]!.doubleValue!, elo = ratings[0]["elo"]!.doubleValue!, upper = ratings[0]["upper"]!.doubleValue!
        #expect(lower <= elo && elo <= upper)
        // strong scored 24 + 6/2 of 30 against weak; they are rows 0 and 2.
        #expect(abs((v["win_rate"]?.arrayValue?[0].arrayValue?[2].doubleValue ?? 0) - 0.9) < 1e-12)
        #expect(v["win_rate"]?.arrayValue?[0].arrayValue?[1] == .null)
        #expect(v["ties"]?.stringValue == "half a win for each side")
        // The human table too.
        let table = try runQLoRA(["eval", "elo", "--judgments", path, "--orderings", "50"])
        #expect(table.status == 0 && table.stdout.contains("95% interval") && table.stdout.contains("strong"))
        // A bad line.
        try FileSystem.writeFileAtomically(path, bytes: Array((lines[0] + "\n" + #"{"model_a": "a", "model_b": "b", "winner": "maybe"}"#).utf8))
        let bad = try runQLoRA(["eval", "elo", "--judgments", path])
        #expect(bad.status != 0)
        #expect(bad.stderr.hasPrefix("error: \(path):2: winner \"maybe\""), "\(bad.stderr)")
        #expect(bad.stdout.isEmpty)
    }
}

@Suite("command line: eval mmlu")
struct EvalMMLUCLITests {
    static let mmlu = FileSystem.join(FileSystem.directoryName(Fixtures.resources()), "../QLoRAEvaluationTests/Resources/mmlu")

    @Test("eval mmlu on the default model: 5-shot, two subjects, two questions each, as JSON and as a table")
    func mmlu() throws {
        let r = try runQLoRA(["eval", "mmlu", "--data", Self.mmlu, "--subjects", "abstract_algebra,virology", "--limit", "2", "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        let v = try JSON.parse(Array(r.stdout.utf8))
        #expect(v["questions"]?.intValue == 4 && v["shots"]?.intValue == 5)
        #expect(v["subjects"]?.arrayValue?.compactMap { $0["subject"]?.stringValue } == ["abstract_algebra", "virology"])
        let predictions = try #require(v["predictions"]?.arrayValue)
        #expect(predictions.count == 4)
        for p in predictions {
            let lp = p["logprobs"]?.arrayValue?.compactMap(\.doubleValue) ?? []
            #expect(lp.count == 4 && lp.allSatisfy { $0 < 0 })
            #expect(["A", "B", "C", "D"].contains(p["prediction"]?.stringValue ?? ""))
        }
        // Each subject's 5-shot prefix ran once for its two questions.
        #expect(v["tokens_computed"]!.intValue! < v["prompt_tokens"]!.intValue!)
        let table = try runQLoRA(["eval", "mmlu", "--data", Self.mmlu, "--subjects", "virology", "--limit", "1", "--shots", "0"])
        #expect(table.status == 0 && table.stdout.contains("micro accuracy") && table.stdout.contains("virology"), "\(table.stderr)")
    }

    @Test("eval mmlu: a record with a missing column or an answer that is not A-D is one error line naming file:line; an unknown subject too")
    func badInput() throws {
        let dir = try Fixtures.temporaryDirectory("mmlu-bad")
        try FileSystem.makeDirectory(FileSystem.join(dir, "test"))
        let file = FileSystem.join(dir, "test/anatomy_test.csv")
        for (text, message) in [("q,1,2,3,4,A\nq2,1,2,3,B\n", "\(file):2: 5 columns"), ("q,1,2,3,4,A\nq2,1,2,3,4,X\n", "\(file):2: the answer is \"X\"")] {
            try FileSystem.writeFileAtomically(file, bytes: Array(text.utf8))
            let r = try runQLoRA(["eval", "mmlu", "--data", dir, "--shots", "0"])
            #expect(r.status != 0)
            #expect(r.stderr.hasPrefix("error: \(message)"), "\(r.stderr)")
        }
        let r = try runQLoRA(["eval", "mmlu", "--data", Self.mmlu, "--subjects", "astrology"])
        #expect(r.status != 0 && r.stderr.hasPrefix("error: ") && r.stderr.contains("no subject \"astrology\""), "\(r.stderr)")
    }
}

@Suite("command line: eval generate")
struct EvalGenerateCLITests {
    @Test("eval generate on the default model: one line per question (MT-bench's two turns included), batched equal to one at a time when greedy, resumed after a crash, another model's answers refused")
    func generate() throws {
        let dir = try Fixtures.temporaryDirectory("eval-generate")
        let questions = FileSystem.join(dir, "questions.jsonl")
        try FileSystem.writeFileAtomically(questions, bytes: Array(#"""
            {"question_id": 1, "text": "How can I improve my time management skills?", "category": "generic"}
            {"question_id": 2, "category": "writing", "turns": ["Name a color.", "Now name another one."]}
            {"input": "### Human: What is 2 + 2? ### Assistant: 4. ### Human: And 3 + 3? ### Assistant:"}
            """#.utf8))
        func run(_ output: String, _ extra: [String]) throws -> (status: Int32, stdout: String, stderr: String) {
            try runQLoRA(["eval", "generate", "--prompts", questions, "--output", output, "--max-tokens", "6", "--temperature", "0", "--json"] + extra)
        }
        func answers(_ path: String) throws -> [String: JSONValue] {
            var byID: [String: JSONValue] = [:]
            for (_, line) in JSON.lines(try FileSystem.readFile(path)) {
                let v = try JSON.parse(Array(line))
                byID[JSON.serialize(v["question_id"]!)] = v
            }
            return byID
        }
        let one = FileSystem.join(dir, "one.jsonl"), three = FileSystem.join(dir, "three.jsonl")
        let r1 = try run(one, ["--batch", "1"])
        #expect(r1.status == 0, "\(r1.stderr)")
        #expect(try JSON.parse(Array(r1.stdout.utf8))["answered"]?.intValue == 3)
        let a1 = try answers(one)
        #expect(Set(a1.keys) == ["1", "2", "3"])
        let mt = try #require(a1["2"])
        #expect(mt["choices"]?.arrayValue?[0]["turns"]?.arrayValue?.count == 2 && mt["category"]?.stringValue == "writing")
        #expect(mt["model_id"]?.stringValue == "SmolLM2-135M-Instruct.Q4_1.gguf")
        // The second turn's prompt holds the first turn and its reply; the OA question keeps its conversation.
        let firstReply = mt["choices"]!.arrayValue![0]["turns"]!.arrayValue![0].stringValue!
        #expect(mt["prompt"]!.stringValue!.contains("Name a color.") && mt["prompt"]!.stringValue!.contains(firstReply))
        #expect(a1["3"]!["prompt"]!.stringValue!.contains("What is 2 + 2?") && a1["3"]!["prompt"]!.stringValue!.contains("<|im_start|>assistant\n4.<|im_end|>"))
        for v in a1.values { #expect(v["generation"]?.stringValue?.isEmpty == false) }
        // Three at once (batched decoding) gives the same greedy answers.
        let r3 = try run(three, ["--batch", "3"])
        #expect(r3.status == 0, "\(r3.stderr)")
        #expect(try JSON.parse(Array(r1.stdout.utf8))["largest_batch"]?.intValue == 1)
        #expect(try JSON.parse(Array(r3.stdout.utf8))["largest_batch"]?.intValue == 3, "the three questions were decoded together")
        let a3 = try answers(three)
        for key in ["1", "2", "3"] { #expect(a3[key]?["choices"] == a1[key]?["choices"], "question \(key)") }
        // A crash mid-line: the partial line goes, that question is answered again, the others are kept.
        let bytes = try FileSystem.readFile(one)
        let lines = bytes.split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false)
        let cut = Array(lines[0]) + [UInt8(ascii: "\n")] + Array(lines[1]) + [UInt8(ascii: "\n")] + Array(lines[2].prefix(20))
        try FileSystem.writeFileAtomically(one, bytes: cut)
        let resumed = try run(one, [])
        #expect(resumed.status == 0, "\(resumed.stderr)")
        #expect(try JSON.parse(Array(resumed.stdout.utf8))["answered"]?.intValue == 1)
        #expect(resumed.stderr.contains("removed a partial last line"))
        #expect(try answers(one).mapValues { $0["choices"]! } == a1.mapValues { $0["choices"]! })
        // Everything answered: nothing to do. Another model id: refused, the file untouched.
        let again = try run(one, [])
        #expect(again.status == 0 && again.stderr.contains("already answered"), "\(again.stderr)")
        let before = try FileSystem.readFile(one)
        let other = try run(one, ["--model-id", "guanaco-7b"])
        #expect(other.status != 0 && other.stderr.contains("holds answers of \"SmolLM2-135M-Instruct.Q4_1.gguf\""), "\(other.stderr)")
        #expect(try FileSystem.readFile(one) == before)
    }
}
