// DPO against TRL 1.16's own DPOTrainer (Resources/dpo_grads.safetensors, from
// scripts/reference/make_preference_fixtures.py): the tiny f32 Llama with non-zero LoRA weights on all seven
// projections, three pairs tokenized and collated by TRL (chosen rows, then rejected rows, right-padded, the
// prompt masked), the reference the base with the adapter off; per loss type the loss, every LoRA gradient and
// the logged rewards.
import QLoRA
import QLoRATestSupport
import Testing

private let resources = Fixtures.resources()

@Suite("DPO against TRL")
struct PreferenceTests {
    func engine(checkpointing: Bool) throws -> (TrainingEngine, LoRAWeights, SafetensorsFile, LoRAConfig) {
        let lorasFile = try SafetensorsFile(path: FileSystem.join(resources, "lora_grads.safetensors"))
        var o = LoadOptions()
        o.quantType = nil
        o.showProgress = false
        let model = try LlamaModel.load(FileSystem.join(resources, "tiny-llama-train"), options: o)
        var c = LoRAConfig()
        c.rank = 8
        c.alpha = 16
        c.dropout = 0
        let lora = LoRAWeights(model: model, config: c)
        for s in lora.slots {
            let (a, b) = LoRAWeights.peftNames(s)
            let av = lorasFile.tensor("untied." + a)!.values(as: Float.self), bv = lorasFile.tensor("untied." + b)!.values(as: Float.self)
            for i in 0..<av.count { lora.parameters[s.aOffset + i] = av[i] }
            for i in 0..<bv.count { lora.parameters[s.bOffset + i] = bv[i] }
        }
        var options = TrainingOptions()
        options.computeDType = .f32
        options.gradientCheckpointing = checkpointing
        return (TrainingEngine(model: model, lora: lora, options: options), lora, try SafetensorsFile(path: FileSystem.join(resources, "dpo_grads.safetensors")), c)
    }

    @Test("sigmoid, hinge and IPO: loss, every LoRA gradient and the rewards equal TRL's (f32), with and without checkpointing",
          arguments: [("sigmoid", true), ("hinge", false), ("ipo", true), ("sigmoid", false)])
    func equalsTRL(_ loss: String, _ checkpointing: Bool) throws {
        let (engine, lora, f, c) = try engine(checkpointing: checkpointing)
        let ids = f.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let mask = f.tensor("completion_mask")!.values(as: Int64.self).map(Int.init)
        let rows = f.tensor("input_ids")!.shape[0], T = f.tensor("input_ids")!.shape[1]
        let labels = zip(ids, mask).map { $1 == 1 ? $0 : TrainingBatch.ignoreIndex }
        let batch = TrainingBatch(tokens: ids, labels: labels, batchSize: rows, sequenceLength: T)
        let reference = try engine.sequenceLogProbs(batch, adapter: false)
        let policy = try engine.sequenceLogProbs(batch)
        #expect(zip(reference, policy).contains { abs($0 - $1) > 1e-3 }, "the adapter must move the log-probabilities")
        var config = DPOConfig()
        config.loss = DPOLoss(rawValue: loss)!
        var metrics = PreferenceMetrics()
        lora.zeroGradients()
        let value = try engine.step(batch, objective: DPO.objective(config, reference: reference) { metrics = $0 })
        let prefix = loss + "."
        func expected(_ key: String) -> Double { Double(f.tensor(prefix + key)!.values(as: Float.self)[0]) }
        #expect(abs(value - expected("loss")) / abs(expected("loss")) < 1e-5, "\(loss) loss \(value) vs \(expected("loss"))")
        for (key, ours) in [("rewards_chosen", metrics.rewardsChosen), ("rewards_rejected", metrics.rewardsRejected), ("rewards_margins", metrics.margins),
                            ("rewards_accuracies", metrics.accuracy), ("logps_chosen", metrics.logpsChosen), ("logps_rejected", metrics.logpsRejected)] {
            #expect(abs(ours - expected(key)) <= 1e-5 * max(1, abs(expected(key))), "\(key): \(ours) vs \(expected(key))")
        }
        var worst: Float = 0
        for s in lora.slots {
            let (a, b) = LoRAWeights.peftNames(s)
            for (name, offset, count) in [(a, s.aOffset, c.rank * s.inFeatures), (b, s.bOffset, s.outFeatures * c.rank)] {
                let theirs = f.tensor(prefix + "grad." + name)!.values(as: Float.self)
                let ours = Array(lora.gradients[offset..<(offset + count)])
                let scale = theirs.map(abs).max()!
                #expect(scale > 0)
                #expect(Compare.close(ours, theirs, atol: 1e-4 * scale, rtol: 1e-4, "\(prefix)\(name)") == nil)
                worst = max(worst, zip(ours, theirs).map { abs($0 - $1) }.max()! / scale)
            }
        }
        print("DPO \(loss) (checkpointing \(checkpointing)): loss \(value) vs TRL \(expected("loss")), relative \(abs(value - expected("loss")) / abs(expected("loss"))); worst LoRA gradient |ours - TRL| / max|TRL| \(worst)")
    }

    @Test("ORPO: loss (NLL over every chosen token minus beta log σ of the log odds ratio), every LoRA gradient and the rewards equal TRL's ORPOTrainer", arguments: [true, false])
    func orpoEqualsTRL(_ checkpointing: Bool) throws {
        let (engine, lora, f, c) = try engine(checkpointing: checkpointing)
        let ids = f.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let mask = f.tensor("completion_mask")!.values(as: Int64.self).map(Int.init)
        let rows = f.tensor("input_ids")!.shape[0], T = f.tensor("input_ids")!.shape[1]
        let labels = zip(ids, mask).map { $1 == 1 ? $0 : TrainingBatch.ignoreIndex }
        let batch = TrainingBatch(tokens: ids, labels: labels, batchSize: rows, sequenceLength: T)
        var metrics = PreferenceMetrics()
        lora.zeroGradients()
        let value = try engine.step(batch, allTokenObjective: ORPO.objective(ORPOConfig()) { metrics = $0 })
        func expected(_ key: String) -> Double { Double(f.tensor("orpo." + key)!.values(as: Float.self)[0]) }
        #expect(abs(value - expected("loss")) / expected("loss") < 1e-5, "ORPO loss \(value) vs \(expected("loss"))")
        for (key, ours) in [("rewards_chosen", metrics.rewardsChosen), ("rewards_rejected", metrics.rewardsRejected), ("rewards_margins", metrics.margins),
                            ("rewards_accuracies", metrics.accuracy), ("logps_chosen", metrics.logpsChosen), ("logps_rejected", metrics.logpsRejected)] {
            #expect(abs(ours - expected(key)) <= 1e-5 * max(1, abs(expected(key))), "\(key): \(ours) vs \(expected(key))")
        }
        var worst: Float = 0
        for s in lora.slots {
            let (a, b) = LoRAWeights.peftNames(s)
            for (name, offset, count) in [(a, s.aOffset, c.rank * s.inFeatures), (b, s.bOffset, s.outFeatures * c.rank)] {
                let theirs = f.tensor("orpo.grad." + name)!.values(as: Float.self)
                let ours = Array(lora.gradients[offset..<(offset + count)])
                let scale = theirs.map(abs).max()!
                #expect(Compare.close(ours, theirs, atol: 1e-4 * scale, rtol: 1e-4, "orpo \(name)") == nil)
                worst = max(worst, zip(ours, theirs).map { abs($0 - $1) }.max()! / scale)
            }
        }
        print("ORPO (checkpointing \(checkpointing)): loss \(value) vs TRL \(expected("loss")), relative \(abs(value - expected("loss")) / expected("loss")); worst LoRA gradient |ours - TRL| / max|TRL| \(worst)")
    }
}
