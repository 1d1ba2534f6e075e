// `qlora train --method dpo` as users run it: plain-text pairs on the tiny Qwen3 (the margins grow, metrics.jsonl
// has TRL's reward columns, the reference is computed once and read back on --resume, and a resumed run ends with
// the uninterrupted run's adapter byte for byte), conversational pairs through the default model's chat template,
// and the errors (methods not implemented, options of supervised finetuning, malformed records).
import Foundation
import QLoRA
import QLoRATestSupport
import Testing

private let tinyQwen = FileSystem.join(Fixtures.repositoryRoot(), "Tests/QLoRAModelTests/Resources/tiny-qwen3.gguf")

@Suite("command line: train --method dpo")
struct PreferenceCLITests {
    static func pairs(conversational: Bool) throws -> String {
        let dir = try Fixtures.temporaryDirectory("dpo-data")
        let path = FileSystem.join(dir, "pairs.jsonl")
        let lines = (0..<16).map { i -> String in
            if conversational {
                return #"{"prompt": [{"role": "user", "content": "What is \#(i) plus one?"}], "chosen": [{"role": "assistant", "content": "It is \#(i + 1)."}], "rejected": [{"role": "assistant", "content": "I do not know."}]}"#
            }
            return #"{"prompt": "Count on from \#(i):", "chosen": " \#(i + 1), \#(i + 2), \#(i + 3).", "rejected": " banana banana."}"#
        }
        try FileSystem.writeFileAtomically(path, bytes: Array((lines.joined(separator: "\n") + "\n").utf8))
        return path
    }

    static func arguments(_ data: String, _ out: String, steps: Int) -> [String] {
        ["train", "--model", tinyQwen, "--method", "dpo", "--data", data, "--output", out, "--lora-r", "8", "--max-steps", "\(steps)",
         "--batch-size", "2", "--grad-accum", "2", "--max-seq-len", "48", "--val-split", "0", "--seed", "5", "--lora-dropout", "0",
         "--learning-rate", "2e-3", "--save-every", "3", "--json"]
    }

    static func metrics(_ out: String) throws -> [JSONValue] {
        try JSON.completeLines(try FileSystem.readFile(FileSystem.join(out, "metrics.jsonl"))).map { try JSON.parse(Array($0.1)) }
    }

    @Test("plain-text pairs: the reward margin grows, TRL's columns in metrics.jsonl, the reference computed once and read back on --resume, the resumed adapter byte-identical")
    func plainPairs() throws {
        let data = try Self.pairs(conversational: false)
        let straight = try Fixtures.temporaryDirectory("dpo-straight")
        let r = try runQLoRA(Self.arguments(data, straight, steps: 6))
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stderr.contains("16 preference pairs, 16 train / 0 validation") && r.stderr.contains("with DPO (sigmoid, beta 0.1)"), "\(r.stderr)")
        let lines = try Self.metrics(straight).filter { $0["loss"] != nil }
        #expect(lines.count == 6)
        let margins = lines.compactMap { $0["rewards/margins"]?.doubleValue }
        #expect(margins.count == 6 && margins.last! > margins.first! + 0.05, "\(margins)")
        for key in ["rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected"] { #expect(lines[0][key]?.doubleValue != nil, "\(key)") }
        // The first step starts from B = 0: the policy is the reference, the loss log 2 and every reward 0.
        #expect(abs((lines[0]["loss"]?.doubleValue ?? 0) - 0.693147) < 1e-4 && abs(margins[0]) < 1e-6)
        #expect((lines.last?["loss"]?.doubleValue ?? 1) < 0.69)
        let report = try runQLoRA(["report", straight])
        let page = String(decoding: (try? FileSystem.readFile(FileSystem.join(straight, "report.html"))) ?? [], as: UTF8.self)
        #expect(report.status == 0 && page.contains("Preference rewards"))
        let reference = try JSON.parse(try FileSystem.readFile(FileSystem.join(straight, "reference_logps.json")))
        #expect(reference["chosen"]?.arrayValue?.count == 16 && reference["rejected"]?.arrayValue?.count == 16)

        // Stopped after step 3 (its checkpoint), resumed to 6: the reference is read, not recomputed, and the adapter is the same.
        let resumed = try Fixtures.temporaryDirectory("dpo-resumed")
        #expect(try runQLoRA(Self.arguments(data, resumed, steps: 6) + ["--max-steps", "3"]).status == 0)
        let second = try runQLoRA(Self.arguments(data, resumed, steps: 6) + ["--resume"])
        #expect(second.status == 0, "\(second.stderr)")
        #expect(second.stderr.contains("reference log-probabilities of 16 pairs read from"), "\(second.stderr)")
        let a = try FileSystem.readFile(FileSystem.join(straight, "adapter_model.safetensors"))
        let b = try FileSystem.readFile(FileSystem.join(resumed, "adapter_model.safetensors"))
        #expect(a == b, "the resumed adapter differs")
    }

    @Test("conversational pairs through the default model's chat template; hinge and ipo losses; a validation split")
    func conversationalPairs() throws {
        let data = try Self.pairs(conversational: true)
        for loss in ["hinge", "ipo"] {
            let out = try Fixtures.temporaryDirectory("dpo-chat")
            let r = try runQLoRA(["train", "--method", "dpo", "--dpo-loss", loss, "--data", data, "--output", out, "--lora-r", "4", "--max-steps", "2",
                                  "--batch-size", "2", "--grad-accum", "1", "--max-seq-len", "64", "--val-data", data, "--json"])
            #expect(r.status == 0, "\(r.stderr)")
            let lines = try Self.metrics(out)
            #expect(lines.contains { $0["rewards/margins"] != nil } && lines.contains { $0["val_loss"] != nil && $0["eval_rewards/margins"] != nil && $0["eval_logps/chosen"] != nil }, "\(lines)")
            #expect(FileSystem.exists(FileSystem.join(out, "adapter_model.safetensors")))
        }
    }

    @Test("two MPI ranks: the reference scored half on each, the step's pairs split, the same rewards and adapter as one process")
    func twoRanks() throws {
        let data = try Self.pairs(conversational: false)
        let one = try Fixtures.temporaryDirectory("dpo-one"), two = try Fixtures.temporaryDirectory("dpo-two")
        #expect(try runQLoRA(Self.arguments(data, one, steps: 4)).status == 0)
        let binary = FileSystem.join(FileSystem.directoryName(CommandLine.arguments[0]), "qlora")
        let b = try runProgram(DistributedCLITests.mpirun, DistributedCLITests.launch + [binary] + Self.arguments(data, two, steps: 4))
        #expect(b.status == 0 && b.stderr.contains("data parallel: 2 ranks"), "mpirun: \(b.stderr)")
        let ma = try Self.metrics(one).filter { $0["loss"] != nil }, mb = try Self.metrics(two).filter { $0["loss"] != nil }
        #expect(ma.count == 4 && mb.count == 4)
        for (x, y) in zip(ma, mb) {
            for key in ["loss", "rewards/margins", "rewards/chosen", "logps/rejected"] {
                let u = x[key]?.doubleValue ?? .nan, v = y[key]?.doubleValue ?? -1
                #expect(abs(u - v) <= 1e-5 * max(1, abs(u)), "step \(x["step"]?.intValue ?? 0) \(key): \(u) vs \(v)")
            }
        }
        let (worst, scale) = try adapterDifference(one, two)
        #expect(scale > 0 && worst <= 1e-5 * scale, "adapter differs by \(worst) (max |value| \(scale))")
        let r1 = try JSON.parse(try FileSystem.readFile(FileSystem.join(one, "reference_logps.json")))["chosen"]?.arrayValue?.compactMap(\.doubleValue) ?? []
        let r2 = try JSON.parse(try FileSystem.readFile(FileSystem.join(two, "reference_logps.json")))["chosen"]?.arrayValue?.compactMap(\.doubleValue) ?? []
        #expect(r1.count == 16 && zip(r1, r2).allSatisfy { abs($0 - $1) <= 1e-9 * max(1, abs($0)) })
    }

    @Test("--loraplus-lr-ratio: B moves that much faster than A (DPO and SFT alike), and training_args.yaml keeps it")
    func loraPlus() throws {
        let data = try Self.pairs(conversational: false)
        let plain = try Fixtures.temporaryDirectory("loraplus-off"), plus = try Fixtures.temporaryDirectory("loraplus-on")
        #expect(try runQLoRA(Self.arguments(data, plain, steps: 2)).status == 0)
        let r = try runQLoRA(Self.arguments(data, plus, steps: 2) + ["--loraplus-lr-ratio", "16"])
        #expect(r.status == 0 && r.stderr.contains("(B: x16.0, LoRA+)"), "\(r.stderr)")
        let args = String(decoding: try FileSystem.readFile(FileSystem.join(plus, "training_args.yaml")), as: UTF8.self)
        #expect(args.contains("loraplus_lr_ratio: 16.0"))
        // A starts random and B at zero; after two steps B has moved much further with the ratio, A about as far.
        func norms(_ dir: String) throws -> (a: Float, b: Float) {
            let f = try SafetensorsFile(path: FileSystem.join(dir, "adapter_model.safetensors"))
            var a: Float = 0, b: Float = 0
            for name in f.names {
                let v = f.tensor(name)!.values(as: Float.self).reduce(0) { $0 + $1 * $1 }
                if name.contains("lora_B") { b += v } else { a += v }
            }
            return (a.squareRoot(), b.squareRoot())
        }
        let (x, y) = (try norms(plain), try norms(plus))
        #expect(y.b > 5 * x.b && abs(y.a - x.a) < 0.1 * x.a, "B \(x.b) -> \(y.b), A \(x.a) -> \(y.a)")
    }

    @Test("--method orpo: no reference file, the margin grows, the chosen sequences' likelihood rises")
    func orpo() throws {
        let data = try Self.pairs(conversational: false)
        let out = try Fixtures.temporaryDirectory("orpo")
        let args = Self.arguments(data, out, steps: 6).map { $0 == "dpo" ? "orpo" : $0 }
        let r = try runQLoRA(args)
        #expect(r.status == 0 && r.stderr.contains("with ORPO (beta 0.1)"), "\(r.stderr)")
        #expect(!FileSystem.exists(FileSystem.join(out, "reference_logps.json")))
        let lines = try Self.metrics(out).filter { $0["loss"] != nil }
        let margins = lines.compactMap { $0["rewards/margins"]?.doubleValue }, chosen = lines.compactMap { $0["logps/chosen"]?.doubleValue }
        #expect(margins.count == 6 && margins.last! > margins.first! && chosen.last! > chosen.first!, "\(margins) \(chosen)")
        let dpoLoss = try runQLoRA(args + ["--dpo-loss", "ipo"])
        #expect(dpoLoss.status != 0 && dpoLoss.stderr.contains("--dpo-loss applies to --method dpo"))
    }

    @Test("errors: KTO with a batch of one or DPO with KTO's options; options of supervised finetuning are refused; a record without chosen names its line")
    func errors() throws {
        let out = try Fixtures.temporaryDirectory("dpo-errors")
        let data = try Self.pairs(conversational: false)
        let kto = try runQLoRA(["train", "--model", tinyQwen, "--method", "kto", "--batch-size", "1", "--data", data, "--output", out])
        #expect(kto.status != 0 && kto.stderr.contains("--method kto needs --batch-size of at least 2"), "\(kto.stderr)")
        let weights = try runQLoRA(["train", "--model", tinyQwen, "--method", "dpo", "--desirable-weight", "2", "--data", data, "--output", out])
        #expect(weights.status != 0 && weights.stderr.contains("--desirable-weight applies to --method kto"), "\(weights.stderr)")
        let packing = try runQLoRA(["train", "--model", tinyQwen, "--method", "dpo", "--packing", "--data", data, "--output", out])
        #expect(packing.status != 0 && packing.stderr.contains("--packing applies to --method sft"), "\(packing.stderr)")
        let bad = FileSystem.join(out, "bad.jsonl")
        try FileSystem.writeFileAtomically(bad, bytes: Array(#"{"prompt": "a", "chosen": " b", "rejected": " c"}\#n{"prompt": "a", "answer": "b"}\#n"#.utf8))
        let r = try runQLoRA(["train", "--model", tinyQwen, "--method", "dpo", "--data", bad, "--output", FileSystem.join(out, "o")])
        #expect(r.status != 0 && r.stderr.contains("bad.jsonl:2: a preference record needs \"chosen\" and \"rejected\""), "\(r.stderr)")
        let badKTO = FileSystem.join(out, "bad-kto.jsonl")
        try FileSystem.writeFileAtomically(badKTO, bytes: Array(#"{"prompt": "a", "completion": " b", "label": true}\#n{"prompt": "a", "completion": " b", "label": "yes"}\#n"#.utf8))
        let k = try runQLoRA(["train", "--model", tinyQwen, "--method", "kto", "--data", badKTO, "--output", FileSystem.join(out, "k")])
        #expect(k.status != 0 && k.stderr.contains("bad-kto.jsonl:2: 'label' must be true (desirable) or false"), "\(k.stderr)")
    }

    static func unpaired() throws -> String {
        let dir = try Fixtures.temporaryDirectory("kto-data")
        let path = FileSystem.join(dir, "rows.jsonl")
        let lines = (0..<16).map { i -> String in
            i % 2 == 0 ? #"{"prompt": "Count on from \#(i):", "completion": " \#(i + 1), \#(i + 2), \#(i + 3).", "label": true}"#
                : #"{"prompt": "Count on from \#(i):", "completion": " banana banana.", "label": false}"#
        }
        try FileSystem.writeFileAtomically(path, bytes: Array((lines.joined(separator: "\n") + "\n").utf8))
        return path
    }

    @Test("KTO on unpaired rows: the margin grows, kl and TRL's reward columns in metrics.jsonl, the reference read back on --resume, the resumed adapter byte-identical; pairs are unpaired")
    func kto() throws {
        let data = try Self.unpaired()
        func arguments(_ out: String) -> [String] {
            ["train", "--model", tinyQwen, "--method", "kto", "--data", data, "--output", out, "--lora-r", "8", "--max-steps", "6",
             "--batch-size", "4", "--grad-accum", "1", "--max-seq-len", "48", "--val-split", "0", "--seed", "5", "--lora-dropout", "0",
             "--learning-rate", "2e-3", "--save-every", "3", "--json"]
        }
        let straight = try Fixtures.temporaryDirectory("kto-straight")
        let r = try runQLoRA(arguments(straight))
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stderr.contains("16 KTO rows (8 desirable, 8 undesirable in training)") && r.stderr.contains("with KTO (kto, beta 0.1, weights 1.0 / 1.0)"), "\(r.stderr)")
        let lines = try Self.metrics(straight).filter { $0["loss"] != nil }
        #expect(lines.count == 6)
        let margins = lines.compactMap { $0["rewards/margins"]?.doubleValue }
        #expect(margins.count == 6 && margins.last! > margins.first! + 0.05, "\(margins)")
        #expect(lines.allSatisfy { $0["kl"]?.doubleValue != nil && $0["rewards/accuracies"] == nil }, "\(lines)")
        // The first step starts from B = 0: the policy is the reference, every reward 0 and each loss 1 − σ(0).
        #expect(abs((lines[0]["loss"]?.doubleValue ?? 0) - 0.5) < 1e-6 && abs(margins[0]) < 1e-6)
        let resumed = try Fixtures.temporaryDirectory("kto-resumed")
        #expect(try runQLoRA(arguments(resumed) + ["--max-steps", "3"]).status == 0)
        let second = try runQLoRA(arguments(resumed) + ["--resume"])
        #expect(second.status == 0, "\(second.stderr)")
        #expect(second.stderr.contains("reference log-probabilities of 16 rows read from"), "\(second.stderr)")
        #expect(try FileSystem.readFile(FileSystem.join(straight, "adapter_model.safetensors"))
                == (try FileSystem.readFile(FileSystem.join(resumed, "adapter_model.safetensors"))), "the resumed adapter differs")
        // A file of conversational pairs, through the default model's chat template: each pair gives a desirable and an undesirable row.
        let fromPairs = try runQLoRA(["train", "--method", "kto", "--data", try Self.pairs(conversational: true), "--output",
                                      try Fixtures.temporaryDirectory("kto-pairs"), "--lora-r", "4", "--max-steps", "1", "--batch-size", "2",
                                      "--grad-accum", "1", "--max-seq-len", "64", "--val-split", "0"])
        #expect(fromPairs.status == 0 && fromPairs.stderr.contains("32 KTO rows (16 desirable, 16 undesirable in training)"), "\(fromPairs.stderr)")
    }
}
