// The training run as a library type: stopped by its flag and resumed, it ends with the adapter of a run
// that was never stopped; its checkpoints carry a format and checksums, and a corrupted or unknown one is
// refused at resume with the file named.
import QLoRA
import QLoRATestSupport
import Testing

private let modelResources = FileSystem.join(FileSystem.directoryName(Fixtures.resources()), "../QLoRAModelTests/Resources")

@Suite("training run")
struct TrainingRunTests {
    static let model: LlamaModel = {
        var o = LoadOptions()
        o.quantType = .nf4
        o.showProgress = false
        return try! LlamaModel.load(FileSystem.join(modelResources, "tiny-llama-gqa"), options: o)
    }()

    static func run(_ output: String) throws -> TrainingRun {
        var lc = LoRAConfig()
        lc.rank = 4
        lc.alpha = 8
        let lora = LoRAWeights(model: model, config: lc)
        var o = TrainingOptions()
        o.computeDType = .f32
        let engine = TrainingEngine(model: model, lora: lora, options: o)
        var c = TrainerConfig()
        c.batchSize = 2
        c.gradientAccumulation = 1
        c.maxSteps = 4
        c.saveEvery = 1
        c.learningRate = 1e-2
        var rng = SeededGenerator(seed: 8)
        let examples = (0..<8).map { i -> EncodedExample in
            let tokens = (0..<(6 + i)).map { _ in Int(rng.next() % 300) + 3 }
            return EncodedExample(tokens: tokens, labels: tokens, truncated: false)
        }
        let trainer = try Trainer(engine: engine, config: c, train: examples, validation: Array(examples.prefix(2)), padToken: 0)
        return TrainingRun(trainer: trainer, output: output, baseModel: "tiny-llama-gqa", arguments: Array("lora_r: 4\n".utf8))
    }

    @Test("stopped by its flag after step 2 and resumed, the run ends with the uninterrupted run's adapter, byte for byte; events arrive in order")
    func stopAndResume() throws {
        let straight = try Fixtures.temporaryDirectory("run-straight"), stopped = try Fixtures.temporaryDirectory("run-stopped")
        var events: [String] = []
        let a = try Self.run(straight)
        _ = try TrainingRun.prepare(output: straight, resume: false)
        let done = try a.run { event in
            switch event {
            case .resumed: events.append("resumed")
            case .validationBefore: events.append("validation")
            case let .started(step, total): events.append("started \(step)/\(total)")
            case let .step(m): events.append("step \(m.step)")
            case .checkpoint: events.append("checkpoint")
            case .reference: events.append("reference")
            }
        }
        #expect(done.steps == 4 && !done.stopped && done.validationBefore != nil && done.validationAfter != nil)
        #expect(events.prefix(4) == ["validation", "started 0/4", "step 1", "checkpoint"], "\(events)")

        let b = try Self.run(stopped)
        _ = try TrainingRun.prepare(output: stopped, resume: false)
        var steps = 0
        b.shouldStop = { steps >= 2 }
        let first = try b.run { if case .step = $0 { steps += 1 } }
        #expect(first.stopped && first.steps == 2 && first.checkpoint?.hasSuffix("checkpoint-2") == true)
        #expect(throws: TrainingRunError.self) { _ = try TrainingRun.prepare(output: stopped, resume: false) }
        let latest = try TrainingRun.prepare(output: stopped, resume: true)
        let second = try Self.run(stopped).run(resumingFrom: latest)
        #expect(second.steps == 4 && !second.stopped)
        for name in ["adapter_model.safetensors", "adapter_config.json", "training_args.yaml"] {
            #expect(try FileSystem.readFile(FileSystem.join(straight, name)) == (try FileSystem.readFile(FileSystem.join(stopped, name))), "\(name) differs")
        }
        // metrics.jsonl: the validation line and steps 1 to 4 once each, then the final validation.
        let lines = String(decoding: try FileSystem.readFile(FileSystem.join(stopped, "metrics.jsonl")), as: UTF8.self).split(separator: "\n")
        #expect(lines.compactMap { (try? JSON.parse(Array($0.utf8)))?["step"]?.intValue } == [0, 1, 2, 3, 4, 4], "\(lines)")
    }

    @Test("a checkpoint with a flipped byte, or of an unknown format, is refused at resume with the file named",
          arguments: ["optimizer.bin", "adapter_model.safetensors", "trainer_state.json"])
    func corruptedCheckpoint(file: String) throws {
        let out = try Fixtures.temporaryDirectory("run-corrupt-\(file)")
        let r = try Self.run(out)
        _ = try TrainingRun.prepare(output: out, resume: false)
        var steps = 0
        r.shouldStop = { steps >= 1 }
        _ = try r.run { if case .step = $0 { steps += 1 } }
        let checkpoint = try #require(try TrainingRun.prepare(output: out, resume: true))
        let path = FileSystem.join(checkpoint, file)
        var bytes = try FileSystem.readFile(path)
        if file == "trainer_state.json" {
            bytes = Array(String(decoding: bytes, as: UTF8.self).replacingOccurrences(of: "swift-qlora checkpoint 2", with: "swift-qlora checkpoint 9").utf8)
        } else {
            bytes[bytes.count - 3] ^= 0x10  // in the state or the tensor data, past every header
        }
        try FileSystem.writeFileAtomically(path, bytes: bytes)
        do {
            _ = try Self.run(out).run(resumingFrom: checkpoint)
            Issue.record("resumed from a checkpoint with a damaged \(file)")
        } catch {
            let message = "\(error)"
            #expect(message.contains(path), "\(message)")
            #expect(message.contains(file == "trainer_state.json" ? "checkpoint format 'swift-qlora checkpoint 9'" : "checksum"), "\(message)")
        }
    }
}
