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

// KTO against TRL 1.16's KTOTrainer (Resources/kto_grads.safetensors, from scripts/reference/make_kto_fixture.py): four
// unpaired rows (labels desirable, undesirable, undesirable, desirable) and their mismatched KL rows as TRL built and
// collated them; per case the loss, every LoRA gradient, the logged KL estimate and rewards, and the per-row log-probabilities.
@Suite("KTO against TRL")
struct KTOTests {
    let f: SafetensorsFile
    init() throws { f = try SafetensorsFile(path: FileSystem.join(resources, "kto_grads.safetensors")) }

    /// Rows of `ids` [B, T] without their right padding (attention mask 0), with their completion masks.
    func rows(_ prefix: String, _ key: String) -> [(ids: [Int], completion: [Int])] {
        let t = f.tensor(prefix + key + "input_ids")!, T = t.shape[1]
        let ids = t.values(as: Int64.self).map(Int.init)
        let attention = f.tensor(prefix + key + "attention_mask")!.values(as: Int64.self).map(Int.init)
        let completion = f.tensor(prefix + key + "completion_mask")!.values(as: Int64.self).map(Int.init)
        return (0..<t.shape[0]).map { b in
            let n = attention[(b * T)..<((b + 1) * T)].reduce(0, +)
            return (Array(ids[(b * T)..<(b * T + n)]), Array(completion[(b * T)..<(b * T + n)]))
        }
    }

    /// The main rows, then the KL rows, as one right-padded batch with the prompts masked (the trainer's layout).
    func batch(_ prefix: String) -> (TrainingBatch, [Bool]) {
        let all = rows(prefix, "") + rows(prefix, "KL_")
        let T = all.map(\.ids.count).max()!
        var tokens: [Int] = [], labels: [Int] = []
        for r in all {
            tokens += r.ids + Array(repeating: 0, count: T - r.ids.count)
            labels += zip(r.ids, r.completion).map { $1 == 1 ? $0 : TrainingBatch.ignoreIndex } + Array(repeating: TrainingBatch.ignoreIndex, count: T - r.ids.count)
        }
        let desirable = f.tensor(prefix + "label")!.values(as: Int64.self).map { $0 == 1 }
        return (TrainingBatch(tokens: tokens, labels: labels, batchSize: all.count, sequenceLength: T), desirable)
    }

    @Test("each row's KL row is its prompt with the previous row's completion, rotated within its block, as TRL built them")
    func mismatchedRows() throws {
        for prefix in ["", "kto_clamped."] {
            let main = rows(prefix, ""), kl = rows(prefix, "KL_")
            for i in main.indices {
                let j = PreferenceData.mismatchedRow(i, count: main.count, blockSize: main.count)
                let prompt = main[i].ids.enumerated().filter { main[i].completion[$0.offset] == 0 }.map(\.element)
                let completion = main[j].ids.enumerated().filter { main[j].completion[$0.offset] == 1 }.map(\.element)
                #expect(kl[i].ids == prompt + completion, "row \(i)")
            }
        }
        // Several blocks and a short last one, as TRL 1.16 prepares them (Resources/kto_kl_blocks.json, from
        // scripts/reference/make_kto_blocks_fixture.py: seven rows in blocks of 3).
        let blocks = try JSON.parse(try FileSystem.readFile(FileSystem.join(resources, "kto_kl_blocks.json")))
        let list = try #require(blocks["rows"]?.arrayValue)
        let block = try #require(blocks["block_size"]?.intValue)
        func ids(_ v: JSONValue?) -> [Int] { v?.arrayValue?.compactMap(\.intValue) ?? [] }
        #expect(list.count == 7 && block == 3)
        for i in list.indices {
            let j = PreferenceData.mismatchedRow(i, count: list.count, blockSize: block)
            #expect(ids(list[i]["KL_completion_ids"]) == ids(list[j]["completion_ids"]), "row \(i) takes row \(j)'s completion")
        }
    }

    @Test("loss, every LoRA gradient, the KL estimate, rewards and log-probabilities equal TRL's: kto, weighted, apo_zero_unpaired, a clamped KL",
          arguments: [("kto", ""), ("kto_weighted", ""), ("apo_zero_unpaired", ""), ("kto_clamped", "kto_clamped.")])
    func equalsTRL(_ name: String, _ batchPrefix: String) throws {
        let (model, lora) = try tinyLoRA("tiny-llama-train", weights: try SafetensorsFile(path: FileSystem.join(resources, "lora_grads.safetensors")), prefix: "untied.")
        var options = TrainingOptions()
        options.computeDType = .f32
        let engine = TrainingEngine(model: model, lora: lora, options: options)
        let (batch, desirable) = batch(batchPrefix)
        let B = desirable.count, prefix = name + "."
        let reference = try engine.sequenceLogProbs(batch, adapter: false)
        let theirReference = f.tensor(prefix + "ref_logps")!.values(as: Float.self).map(Double.init)
        #expect(zip(reference[..<B], theirReference).allSatisfy { abs($0 - $1) < 1e-4 * max(1, abs($1)) }, "\(reference) vs \(theirReference)")
        if let kl = f.tensor(prefix + "ref_KL_logps")?.values(as: Float.self) {
            #expect(zip(reference[B...], kl).allSatisfy { abs($0 - Double($1)) < 1e-4 * max(1, abs(Double($1))) })
        }
        var config = KTOConfig()
        switch name {
        case "kto_weighted": config.desirableWeight = 1.33; config.undesirableWeight = 0.5
        case "apo_zero_unpaired": config.loss = .apoZeroUnpaired
        default: break
        }
        var metrics = PreferenceMetrics()
        lora.zeroGradients()
        // As the trainer runs it: the KL rows scored by a forward of their own, the rows themselves stepped.
        let main = TrainingBatch(tokens: Array(batch.tokens[..<(B * batch.sequenceLength)]), labels: Array(batch.labels[..<(B * batch.sequenceLength)]),
                                 batchSize: B, sequenceLength: batch.sequenceLength)
        let klRows = TrainingBatch(tokens: Array(batch.tokens[(B * batch.sequenceLength)...]), labels: Array(batch.labels[(B * batch.sequenceLength)...]),
                                   batchSize: B, sequenceLength: batch.sequenceLength)
        let kl = config.loss == .kto ? (policy: try engine.sequenceLogProbs(klRows), reference: Array(reference[B...])) : nil
        if let kl, let theirs = f.tensor(prefix + "policy_KL_logps")?.values(as: Float.self) {
            #expect(zip(kl.policy, theirs).allSatisfy { abs($0 - Double($1)) < 1e-4 * max(1, abs(Double($1))) }, "\(kl.policy) vs \(theirs)")
        }
        let value = try engine.step(main, objective: KTO.objective(config, reference: Array(reference[..<B]), desirable: desirable, kl: kl) { metrics = $0 })
        func expected(_ key: String) -> Double { Double(f.tensor(prefix + key)!.values(as: Float.self)[0]) }
        #expect(abs(value - expected("loss")) / expected("loss") < 1e-5, "\(name) loss \(value) vs \(expected("loss"))")
        var keys = [("metric_rewards_chosen", metrics.rewardsChosen), ("metric_rewards_rejected", metrics.rewardsRejected),
                    ("metric_rewards_margins", metrics.margins), ("metric_logps_chosen", metrics.logpsChosen), ("metric_logps_rejected", metrics.logpsRejected)]
        if f.tensor(prefix + "metric_kl") != nil { keys.append(("metric_kl", metrics.kl)) }
        for (key, ours) in keys {
            #expect(abs(ours - expected(key)) <= 1e-5 * max(1, abs(expected(key))), "\(prefix)\(key): \(ours) vs \(expected(key))")
        }
        #expect(metrics.unpaired && (name != "kto_clamped" || metrics.kl == 0) && (name != "kto" || metrics.kl > 1))
        let worst = checkGradients(lora, against: f, prefix: prefix + "grad.")
        print("KTO \(name): loss \(value) vs TRL \(expected("loss")), relative \(abs(value - expected("loss")) / expected("loss")); KL \(metrics.kl); worst LoRA gradient |ours - TRL| / max|TRL| \(worst)")
    }

    @Test("KTO's metrics over micro-batches: each side's means over its own rows, a side a micro-batch lacks is not counted as 0, the margin from the merged means")
    func mergedMetrics() {
        var a = PreferenceMetrics(), b = PreferenceMetrics()
        a.unpaired = true; a.pairs = 4; a.chosenCount = 4; a.rejectedCount = 0; a.rewardsChosen = 0.2; a.logpsChosen = -10; a.kl = 1
        b.unpaired = true; b.pairs = 4; b.chosenCount = 1; b.rejectedCount = 3; b.rewardsChosen = 0.7; b.logpsChosen = -20
        b.rewardsRejected = -0.3; b.logpsRejected = -30; b.kl = 3
        let m = PreferenceMetrics.merged([a, b])
        #expect(abs(m.rewardsChosen - (4 * 0.2 + 0.7) / 5) < 1e-12 && abs(m.rewardsRejected - -0.3) < 1e-12 && abs(m.logpsChosen - (-40 - 20) / 5) < 1e-12)
        #expect(abs(m.margins - (m.rewardsChosen - m.rewardsRejected)) < 1e-12 && abs(m.kl - 2) < 1e-12 && m.unpaired && m.chosenCount == 5 && m.rejectedCount == 3)
        #expect(PreferenceMetrics(weightedSums: m.weightedSums).rewardsChosen == m.rewardsChosen)
    }
}
