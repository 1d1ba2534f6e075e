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
    func engine(checkpointing: Bool) throws -> (TrainingEngine, LoRAWeights, SafetensorsFile) {
        let (model, lora) = try tinyLoRA("tiny-llama-train", weights: try SafetensorsFile(path: FileSystem.join(resources, "lora_grads.safetensors")), prefix: "untied.")
        var options = TrainingOptions()
        options.computeDType = .f32
        options.gradientCheckpointing = checkpointing
        return (TrainingEngine(model: model, lora: lora, options: options), lora, try SafetensorsFile(path: FileSystem.join(resources, "dpo_grads.safetensors")))
    }

    /// The fixture's six rows (three pairs: chosen, then rejected) with the prompt masked.
    func batch(_ f: SafetensorsFile) -> TrainingBatch {
        let ids = f.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let mask = f.tensor("completion_mask")!.values(as: Int64.self).map(Int.init)
        let labels = zip(ids, mask).map { $1 == 1 ? $0 : TrainingBatch.ignoreIndex }
        return TrainingBatch(tokens: ids, labels: labels, batchSize: f.tensor("input_ids")!.shape[0], sequenceLength: f.tensor("input_ids")!.shape[1])
    }

    /// Our metrics against the fixture's `prefix` ones (TRL's logged values).
    func checkMetrics(_ m: PreferenceMetrics, _ f: SafetensorsFile, prefix: String) {
        for (key, ours) in [("rewards_chosen", m.rewardsChosen), ("rewards_rejected", m.rewardsRejected), ("rewards_margins", m.margins),
                            ("rewards_accuracies", m.accuracy), ("logps_chosen", m.logpsChosen), ("logps_rejected", m.logpsRejected)] {
            let theirs = Double(f.tensor(prefix + key)!.values(as: Float.self)[0])
            #expect(abs(ours - theirs) <= 1e-5 * max(1, abs(theirs)), "\(prefix)\(key): \(ours) vs \(theirs)")
        }
    }

    @Test("sigmoid, hinge and IPO: loss, every LoRA gradient and the rewards equal TRL's (f32), with and without checkpointing",
          arguments: [("sigmoid", true), ("hinge", false), ("ipo", true), ("sigmoid", false)])
    func equalsTRL(_ loss: String, _ checkpointing: Bool) throws {
        let (engine, lora, f) = try engine(checkpointing: checkpointing)
        let batch = batch(f)
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
        checkMetrics(metrics, f, prefix: prefix)
        let worst = checkGradients(lora, against: f, prefix: prefix + "grad.")
        print("DPO \(loss) (checkpointing \(checkpointing)): loss \(value) vs TRL \(expected("loss")), relative \(abs(value - expected("loss")) / abs(expected("loss"))); worst LoRA gradient |ours - TRL| / max|TRL| \(worst)")
    }

    @Test("ORPO: loss (NLL over every chosen token minus beta log σ of the log odds ratio), every LoRA gradient and the rewards equal TRL's ORPOTrainer", arguments: [true, false])
    func orpoEqualsTRL(_ checkpointing: Bool) throws {
        let (engine, lora, f) = try engine(checkpointing: checkpointing)
        var metrics = PreferenceMetrics()
        lora.zeroGradients()
        let value = try engine.step(batch(f), allTokenObjective: ORPO.objective(ORPOConfig()) { metrics = $0 })
        func expected(_ key: String) -> Double { Double(f.tensor("orpo." + key)!.values(as: Float.self)[0]) }
        #expect(abs(value - expected("loss")) / expected("loss") < 1e-5, "ORPO loss \(value) vs \(expected("loss"))")
        checkMetrics(metrics, f, prefix: "orpo.")
        let worst = checkGradients(lora, against: f, prefix: "orpo.grad.")
        print("ORPO (checkpointing \(checkpointing)): loss \(value) vs TRL \(expected("loss")), relative \(abs(value - expected("loss")) / expected("loss")); worst LoRA gradient |ours - TRL| / max|TRL| \(worst)")
    }
}
