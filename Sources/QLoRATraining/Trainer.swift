// The training loop of `qlora train`: batches grouped by length, gradient accumulation, clipping by
// global norm, AdamW with a learning-rate schedule, validation loss, metrics.jsonl, checkpoints written
// atomically (adapter, optimizer state, step) and exact resume: the data order and every random draw
// derive from the seed and the step, so a resumed run continues bit for bit.
import QLoRACore
import QLoRAModel

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public enum LRSchedule: String, CaseIterable, Sendable {
    case constant, cosine, linear
}

public struct TrainerConfig: Sendable {
    public var learningRate = 2e-4
    public var schedule = LRSchedule.constant
    public var warmupSteps = 0
    public var batchSize = 4
    public var gradientAccumulation = 4
    public var maxGradNorm = 0.3
    public var epochs = 1
    /// Stops after this many optimizer steps (0: run the epochs).
    public var maxSteps = 0
    public var seed: UInt64 = 0
    public var evalEvery = 0
    public var saveEvery = 0
    public var saveTotalLimit = 3
    public var groupByLength = true
    public var skipNonFinite = false
    public var optimizer = OptimizerKind.pagedAdamw32
    public var adam = AdamWConfig()
    /// LoRA+: B's learning rate is this times A's (PEFT's loraplus_lr_ratio); nil: plain LoRA.
    public var loraPlusRatio: Double?

    public init() {}
}

public struct StepMetrics: Sendable {
    public let step: Int
    public let loss: Double
    public let learningRate: Double
    public let gradNorm: Double
    public let tokensPerSecond: Double
    public var validationLoss: Double?
    /// The step's wall-clock time (with the optimizer update).
    public var seconds: Double?
    /// Data parallelism: seconds this rank spent in the step's all-reduce (waiting for the slowest rank included).
    public var allreduceSeconds: Double?
    /// Preference tuning: the step's rewards and log-probabilities (means over its pairs).
    public var preference: PreferenceMetrics?
}

/// What the trainer minimizes.
public enum TrainingObjective: Sendable, Equatable {
    /// Cross-entropy of the trained tokens (supervised finetuning).
    case sft
    /// DPO over preference pairs, the reference being the base with the adapter off.
    case dpo(DPOConfig)
    /// ORPO over preference pairs (no reference).
    case orpo(ORPOConfig)
    /// KTO over unpaired rows (EncodedPair: the row and its mismatched KL row, with its label), the reference being
    /// the base with the adapter off.
    case kto(KTOConfig)

    /// Whether the objective compares with the reference model (whose log-probabilities are computed once).
    public var needsReference: Bool {
        switch self {
        case .dpo, .kto: return true
        case .sft, .orpo: return false
        }
    }
}

public enum TrainingError: Error, CustomStringConvertible {
    case nonFinite(step: Int, what: String, checkpoint: String?)
    case noData(String)
    /// An option that cannot apply to this model or run, with the reason.
    case unsupported(String)

    public var description: String {
        switch self {
        case let .nonFinite(step, what, checkpoint):
            return "step \(step): the \(what) is not finite; training stopped" + (checkpoint.map { ", the last good checkpoint is \($0)" } ?? "")
                + " (lower --learning-rate, or --skip-nonfinite to skip such steps)"
        case let .noData(s), let .unsupported(s): return s
        }
    }
}

/// The order in which the training examples are seen: per epoch a seeded plan of micro-batches
/// (indices into the training examples), and per optimizer step its `gradientAccumulation` of them. It
/// needs only the examples' lengths, so a tool can list a run's batches without a model.
public final class BatchOrder {
    public let lengths: [Int]
    public let batchSize: Int
    public let gradientAccumulation: Int
    public let seed: UInt64
    public let groupByLength: Bool
    /// The plan of the epoch being trained, kept so each micro-batch does not reshuffle the dataset.
    private var current: (epoch: Int, batches: [[Int]])?

    public init(lengths: [Int], config: TrainerConfig) {
        self.lengths = lengths
        batchSize = config.batchSize
        gradientAccumulation = config.gradientAccumulation
        seed = config.seed
        groupByLength = config.groupByLength
    }

    public var microBatchesPerEpoch: Int { (lengths.count + batchSize - 1) / batchSize }
    public var stepsPerEpoch: Int { max(1, microBatchesPerEpoch / gradientAccumulation) }

    /// The micro-batches of an epoch (example indices), in the order they are trained: a seeded shuffle,
    /// then, with group-by-length, sorting inside windows of 50 batches so each batch pads little,
    /// then a seeded shuffle of the batches.
    public func epochPlan(_ epoch: Int) -> [[Int]] {
        var rng = SeededGenerator(seed: seed &+ 0x5EED &* UInt64(epoch + 1))
        var order = Array(lengths.indices)
        order.shuffle(using: &rng)
        if groupByLength {
            let window = batchSize * 50
            var grouped: [Int] = []
            var start = 0
            while start < order.count {
                let chunk = order[start..<min(order.count, start + window)]
                grouped += chunk.sorted { (lengths[$0], $0) > (lengths[$1], $1) }
                start += window
            }
            order = grouped
        }
        var batches: [[Int]] = stride(from: 0, to: order.count, by: batchSize).map { Array(order[$0..<min(order.count, $0 + batchSize)]) }
        if groupByLength { batches.shuffle(using: &rng) }
        return batches
    }

    /// The micro-batches of optimizer step `step`, counted from 0, in the order they are trained.
    public func microBatches(ofStep step: Int) -> [[Int]] {
        let perEpoch = stepsPerEpoch * gradientAccumulation
        return (0..<gradientAccumulation).map { micro in
            let global = step * gradientAccumulation + micro
            let epoch = global / perEpoch
            if current?.epoch != epoch { current = (epoch, epochPlan(epoch)) }
            let plan = current!.batches
            return plan[(global % perEpoch) % plan.count]
        }
    }
}

public final class Trainer {
    public let engine: TrainingEngine
    public let config: TrainerConfig
    public let train: [EncodedExample]
    public let validation: [EncodedExample]
    public let optimizer: AdamW
    public let padToken: Int
    public private(set) var step = 0
    /// Extra files written into every checkpoint (the command line's resolved options, for instance).
    public var checkpointFiles: [String: [UInt8]] = [:]
    /// Which examples each step trains on.
    public let order: BatchOrder
    /// Data parallelism: this process runs the step's micro-batches i with i % size == rank, and the gradients,
    /// loss and token count are summed over the ranks before clipping (nil: one process runs them all).
    public var communicator: GradientCommunicator?

    /// Preference tuning: the pairs (the examples `order` indexes), and those held out.
    public private(set) var pairs: [EncodedPair]
    public private(set) var validationPairs: [EncodedPair]
    public let objective: TrainingObjective
    /// Preference tuning: the held-out pairs' rewards at the last validation.
    public private(set) var validationPreference: PreferenceMetrics?

    public convenience init(engine: TrainingEngine, config: TrainerConfig, train: [EncodedExample], validation: [EncodedExample], padToken: Int) throws {
        try self.init(engine: engine, config: config, train: train, validation: validation, pairs: [], validationPairs: [], objective: .sft, padToken: padToken)
    }

    /// A preference run: each micro-batch holds `config.batchSize` pairs (twice as many rows).
    public convenience init(engine: TrainingEngine, config: TrainerConfig, pairs: [EncodedPair], validationPairs: [EncodedPair], dpo: DPOConfig, padToken: Int) throws {
        try self.init(engine: engine, config: config, pairs: pairs, validationPairs: validationPairs, objective: .dpo(dpo), padToken: padToken)
    }

    /// A preference run under `objective` (.dpo or .orpo).
    public convenience init(engine: TrainingEngine, config: TrainerConfig, pairs: [EncodedPair], validationPairs: [EncodedPair], objective: TrainingObjective, padToken: Int) throws {
        guard !pairs.isEmpty else { throw TrainingError.noData("no training pairs") }
        precondition(objective != .sft)
        try self.init(engine: engine, config: config, train: pairs.map(\.chosen), validation: validationPairs.map(\.chosen), pairs: pairs,
                      validationPairs: validationPairs, objective: objective, padToken: padToken)
    }

    /// One micro-batch of pairs under the preference objective; its loss (the mean over its pairs).
    func preferenceStep(_ pairs: [EncodedPair], backward: Bool, gradientScale: Float, report: @escaping (PreferenceMetrics) -> Void) throws -> Double {
        let (batch, reference) = makeBatch(pairs: pairs)
        switch objective {
        case let .dpo(dpo):
            precondition(!reference.contains { $0.isNaN }, "computeReference() first")
            return try engine.step(batch, objective: DPO.objective(dpo, reference: reference, report: report), backward: backward, gradientScale: gradientScale)
        case let .orpo(orpo):
            return try engine.step(batch, allTokenObjective: ORPO.objective(orpo, report: report), backward: backward, gradientScale: gradientScale)
        case let .kto(kto):
            precondition(!reference.contains { $0.isNaN }, "computeReference() first")
            // Only the rows themselves get gradients: the KL rows are scored by a forward of their own (the adapter on,
            // no dropout, no backward), and not at all for apo_zero_unpaired.
            let B = pairs.count
            let kl = kto.loss == .kto ? (policy: try engine.sequenceLogProbs(makeBatch(pairs.map(\.rejected))), reference: Array(reference[B...])) : nil
            let objective = KTO.objective(kto, reference: Array(reference[..<B]), desirable: pairs.map { row -> Bool in
                guard let label = row.desirable else { preconditionFailure("a KTO row without a label") }
                return label
            }, kl: kl, report: report)
            return try engine.step(makeBatch(pairs.map(\.chosen)), objective: objective, backward: backward, gradientScale: gradientScale)
        case .sft:
            preconditionFailure("not a preference run")
        }
    }

    init(engine: TrainingEngine, config: TrainerConfig, train: [EncodedExample], validation: [EncodedExample], pairs: [EncodedPair],
         validationPairs: [EncodedPair], objective: TrainingObjective, padToken: Int) throws {
        guard !train.isEmpty else { throw TrainingError.noData("no training examples") }
        self.engine = engine
        self.config = config
        self.train = train
        self.validation = validation
        self.pairs = pairs
        self.validationPairs = validationPairs
        self.objective = objective
        self.padToken = padToken
        order = BatchOrder(lengths: pairs.isEmpty ? train.map(\.tokens.count) : pairs.map(\.longest), config: config)
        let (tensors, isB) = Self.optimizerTensors(engine.lora)
        optimizer = try AdamW(kind: config.optimizer, config: config.adam, tensors: tensors)
        if let ratio = config.loraPlusRatio { optimizer.learningRateScales = isB.map { $0 ? ratio : 1 } }
        // The activation arena, made once for the longest batch (training or validation).
        let longest = (train + validation + (pairs + validationPairs).map(\.rejected)).map(\.tokens.count).max() ?? 1
        engine.reserve(batchSize: pairs.isEmpty ? config.batchSize : 2 * config.batchSize, sequenceLength: longest)
    }

    /// The optimizer's tensors: each slot's A, then its B, then its DoRA magnitude (whether each is in LoRA+'s B
    /// group: B, and the magnitude as PEFT's create_loraplus_optimizer puts every 1-D parameter there).
    public static func optimizerTensors(_ lora: LoRAWeights) -> (tensors: [(offset: Int, count: Int)], isB: [Bool]) {
        var tensors: [(offset: Int, count: Int)] = [], isB: [Bool] = []
        for s in lora.slots {
            tensors.append((s.aOffset, lora.config.rank * s.inFeatures))
            tensors.append((s.bOffset, s.outFeatures * lora.config.rank))
            isB += [false, true]
            if let m = s.magnitudeOffset {
                tensors.append((m, s.outFeatures))
                isB.append(true)
            }
        }
        return (tensors, isB)
    }

    // MARK: Data order

    public var totalSteps: Int { config.maxSteps > 0 ? config.maxSteps : order.stepsPerEpoch * config.epochs }

    /// Pads examples (right, with labels -100) into one batch.
    /// Packed examples keep their boundaries (attention inside each, positions restarting).
    public func makeBatch(_ examples: [EncodedExample]) -> TrainingBatch {
        let T = examples.map(\.tokens.count).max() ?? 1
        var tokens: [Int] = [], labels: [Int] = []
        let packed = examples.contains { $0.exampleStarts.count > 1 }
        var starts: [Int] = []
        for e in examples {
            tokens += e.tokens + Array(repeating: padToken, count: T - e.tokens.count)
            labels += e.labels + Array(repeating: TrainingBatch.ignoreIndex, count: T - e.labels.count)
            if packed {
                var k = 0
                for t in 0..<T {
                    while k + 1 < e.exampleStarts.count && e.exampleStarts[k + 1] <= t { k += 1 }
                    starts.append(e.exampleStarts[k])
                }
            }
        }
        return TrainingBatch(tokens: tokens, labels: labels, batchSize: examples.count, sequenceLength: T, segmentStarts: packed ? starts : nil)
    }

    /// Pairs as one batch: the chosen rows, then the rejected ones (TRL's layout), with the reference's
    /// log-probabilities of the same rows.
    public func makeBatch(pairs: [EncodedPair]) -> (batch: TrainingBatch, reference: [Double]) {
        let batch = makeBatch(pairs.map(\.chosen) + pairs.map(\.rejected))
        let reference = pairs.map { $0.referenceChosen ?? .nan } + pairs.map { $0.referenceRejected ?? .nan }
        return (batch, reference)
    }

    /// Whether some pair still lacks its reference log-probabilities.
    public var needsReference: Bool {
        guard objective.needsReference else { return false }
        return (pairs + validationPairs).contains { $0.referenceChosen == nil || $0.referenceRejected == nil }
    }

    /// A checksum of every pair's tokens and labels, naming the data a set of reference log-probabilities belongs to.
    public var pairsFingerprint: UInt32 {
        var bytes: [UInt8] = []
        for p in pairs + validationPairs {
            for e in [p.chosen, p.rejected] {
                for v in e.tokens + [-7] + e.labels + [-9] { withUnsafeBytes(of: Int32(truncatingIfNeeded: v).littleEndian) { bytes.append(contentsOf: $0) } }
            }
        }
        return CRC32C.checksum(bytes)
    }

    /// The reference (the base with the adapter off) scores every pair once, `config.batchSize` pairs a batch;
    /// the ranks of a data-parallel run share the batches. `progress(done, total)` after each batch.
    public func computeReference(progress: (Int, Int) -> Void = { _, _ in }) throws {
        let all = pairs + validationPairs
        var chosen = [Double](repeating: 0, count: all.count), rejected = chosen
        let rank = communicator?.rank ?? 0, ranks = communicator?.size ?? 1
        let starts = Array(stride(from: 0, to: all.count, by: config.batchSize))
        for (j, start) in starts.enumerated() {
            let end = min(all.count, start + config.batchSize)
            if j % ranks == rank {
                let (batch, _) = makeBatch(pairs: Array(all[start..<end]))
                let logps = try engine.sequenceLogProbs(batch, adapter: false)
                let n = end - start
                for k in 0..<n { chosen[start + k] = logps[k]; rejected[start + k] = logps[n + k] }
            }
            progress(end, all.count)
        }
        if let communicator {
            let sums = try communicator.sum(chosen + rejected)
            chosen = Array(sums[..<all.count])
            rejected = Array(sums[all.count...])
        }
        setReference(chosen: chosen, rejected: rejected)
    }

    /// The reference log-probabilities of every pair (training pairs, then validation pairs), as computed or cached.
    public var reference: (chosen: [Double], rejected: [Double]) {
        let all = pairs + validationPairs
        return (all.map { $0.referenceChosen ?? .nan }, all.map { $0.referenceRejected ?? .nan })
    }

    public func setReference(chosen: [Double], rejected: [Double]) {
        precondition(chosen.count == pairs.count + validationPairs.count && rejected.count == chosen.count)
        for i in pairs.indices { pairs[i].referenceChosen = chosen[i]; pairs[i].referenceRejected = rejected[i] }
        for i in validationPairs.indices {
            validationPairs[i].referenceChosen = chosen[pairs.count + i]
            validationPairs[i].referenceRejected = rejected[pairs.count + i]
        }
    }

    // MARK: Schedule

    public func learningRate(at step: Int) -> Double {
        let base = config.learningRate
        if step < config.warmupSteps { return base * Double(step + 1) / Double(config.warmupSteps) }
        let progress = Double(step - config.warmupSteps) / Double(max(1, totalSteps - config.warmupSteps))
        switch config.schedule {
        case .constant: return base
        case .linear: return base * max(0, 1 - progress)
        case .cosine: return base * 0.5 * (1 + cos(Double.pi * min(1, progress)))
        }
    }

    // MARK: Steps

    /// Runs one optimizer step (gradient accumulation over micro-batches); returns its metrics.
    public func runStep() throws -> StepMetrics {
        let start = Clock.seconds()
        let lora = engine.lora
        lora.zeroGradients()
        engine.training = true
        var loss = 0.0
        var tokens = 0
        let rank = communicator?.rank ?? 0, ranks = communicator?.size ?? 1
        let plan = order.microBatches(ofStep: step)
        var parts: [PreferenceMetrics] = []
        if objective != .sft {
            // Each micro-batch's loss is the mean over its pairs: weighted by its share of the step's pairs.
            let total = plan.reduce(0) { $0 + $1.count }
            for (micro, indices) in plan.enumerated() where micro % ranks == rank {
                let chunk = indices.map { pairs[$0] }
                tokens += chunk.count * 2 * chunk.map(\.longest).max()!
                let weight = Double(indices.count) / Double(total)
                engine.stepCounter = UInt64(step) &* 1_000_003 &+ UInt64(micro)
                loss += try preferenceStep(chunk, backward: true, gradientScale: Float(weight)) { parts.append($0) } * weight
            }
        } else {
            let batches = plan.map { indices in makeBatch(indices.map { train[$0] }) }
            // The step's loss is the mean over all its trained tokens, as one big batch would give (and as
            // transformers does since 4.46): micro-batch i, whose own loss is the mean over its n_i tokens,
            // is weighted n_i / sum(n), not 1 / k.
            // Every rank knows every micro-batch's count (from the labels), so the weights are the same everywhere.
            let counts = batches.map(\.targetCount)
            let total = counts.reduce(0, +)
            for (micro, batch) in batches.enumerated() where micro % ranks == rank {
                tokens += batch.tokens.count
                guard counts[micro] > 0 else { continue }
                let weight = Double(counts[micro]) / Double(total)
                // Dropout masks are drawn from (step, micro-batch): a resumed run draws the same ones, on any rank.
                engine.stepCounter = UInt64(step) &* 1_000_003 &+ UInt64(micro)
                loss += try engine.step(batch, gradientScale: Float(weight)) * weight
            }
        }
        var preference: PreferenceMetrics? = objective == .sft ? nil : PreferenceMetrics.merged(parts)
        var allreduceSeconds: Double?
        if let communicator {
            // The weighted gradients and losses add up to those of one process running every micro-batch.
            let t0 = Clock.seconds()
            try lora.gradients.withUnsafeMutableBufferPointer { try communicator.sumInPlace($0.baseAddress!, count: $0.count) }
            let sums = try communicator.sum([loss, Double(tokens)] + (preference?.weightedSums ?? []))
            allreduceSeconds = Clock.seconds() - t0
            loss = sums[0]
            tokens = Int(sums[1])
            if let p = preference {
                preference = PreferenceMetrics(weightedSums: Array(sums[2...]))
                preference?.unpaired = p.unpaired
            }
        }
        let norm = lora.gradientNorm
        let lr = learningRate(at: step)
        if !loss.isFinite || !norm.isFinite {
            if !config.skipNonFinite { throw TrainingError.nonFinite(step: step + 1, what: loss.isFinite ? "gradient norm" : "loss", checkpoint: nil) }
            step += 1
            return StepMetrics(step: step, loss: loss, learningRate: lr, gradNorm: norm, tokensPerSecond: 0)
        }
        // Clip by global norm, as torch.nn.utils.clip_grad_norm_ (max_norm / (norm + 1e-6), at most 1).
        if config.maxGradNorm > 0 {
            let coefficient = Float(min(1, config.maxGradNorm / (norm + 1e-6)))
            if coefficient < 1 { for i in lora.gradients.indices { lora.gradients[i] *= coefficient } }
        }
        lora.parameters.withUnsafeMutableBufferPointer { p in
            lora.gradients.withUnsafeBufferPointer { g in optimizer.update(parameters: p, gradients: g, lr: lr) }
        }
        lora.markChanged()
        step += 1
        let seconds = Clock.seconds() - start
        var m = StepMetrics(step: step, loss: loss, learningRate: lr, gradNorm: norm, tokensPerSecond: Double(tokens) / seconds)
        m.seconds = seconds
        m.allreduceSeconds = allreduceSeconds
        m.preference = preference
        return m
    }

    /// Mean loss over the validation examples (no dropout, no gradients).
    public func validationLoss() throws -> Double? {
        guard !validation.isEmpty else { return nil }
        engine.training = false
        defer { engine.training = true }
        if objective != .sft {
            // The mean preference loss over the held-out pairs, and their rewards (validationPreference).
            var total = 0.0
            var parts: [PreferenceMetrics] = []
            for start in stride(from: 0, to: validationPairs.count, by: config.batchSize) {
                let chunk = Array(validationPairs[start..<min(validationPairs.count, start + config.batchSize)])
                total += try preferenceStep(chunk, backward: false, gradientScale: 1) { parts.append($0) } * Double(chunk.count)
            }
            validationPreference = PreferenceMetrics.merged(parts)
            return total / Double(validationPairs.count)
        }
        var total = 0.0, count = 0
        for start in stride(from: 0, to: validation.count, by: config.batchSize) {
            let batch = makeBatch(Array(validation[start..<min(validation.count, start + config.batchSize)]))
            let n = batch.targetCount
            guard n > 0 else { continue }
            total += try engine.step(batch, backward: false) * Double(n)
            count += n
        }
        return count > 0 ? total / Double(count) : nil
    }

    // MARK: Checkpoints

    /// Writes checkpoint-`step`/ (adapter, optimizer state, trainer state) atomically: into a temporary
    /// folder that is renamed into place, so a crash never leaves a half-written checkpoint.
    public func saveCheckpoint(in output: String, baseModel: String) throws -> String {
        let name = "checkpoint-\(step)"
        let final = FileSystem.join(output, name)
        let temporary = FileSystem.join(output, ".\(name).tmp-\(getpid())")
        try FileSystem.removeTree(temporary)
        try FileSystem.makeDirectory(temporary)
        // A failed write leaves nothing behind (a full disk gets its space back), and no earlier checkpoint is touched.
        var complete = false
        defer { if !complete { try? FileSystem.removeTree(temporary) } }
        try engine.lora.writePEFTAdapter(to: temporary, baseModel: baseModel)
        let optimizerState = optimizer.serializedState()
        try FileSystem.writeFileAtomically(FileSystem.join(temporary, "optimizer.bin"), bytes: optimizerState)
        // Fault injection (tests and bench/fault_trials.sh): die here, half-way through writing checkpoint N.
        if let n = Environment.get("QLORA_FAULT_KILL_IN_CHECKPOINT").flatMap({ Int($0) }), n == step { kill(getpid(), SIGKILL) }
        // Checksums of what resume reads, so that a corrupted file is refused instead of resumed from.
        var checksums: [(String, JSONValue)] = [("optimizer.bin", .int(Int(CRC32C.checksum(optimizerState))))]
        for name in Self.checksummedAdapterFiles {
            checksums.append((name, .int(Int(CRC32C.checksum(try FileSystem.readFile(FileSystem.join(temporary, name)))))))
        }
        let state: JSONValue = .object([
            ("step", .int(step)), ("optimizer", .string(config.optimizer.rawValue)), ("optimizer_step", .int(optimizer.step)),
            ("format", .string(Self.checkpointFormat)), ("crc32c", .object(checksums)),
        ])
        try FileSystem.writeFileAtomically(FileSystem.join(temporary, "trainer_state.json"), bytes: Array(JSON.serialize(state, pretty: true).utf8))
        for (name, bytes) in checkpointFiles { try FileSystem.writeFileAtomically(FileSystem.join(temporary, name), bytes: bytes) }
        try FileSystem.removeTree(final)
        try FileSystem.rename(temporary, final)
        complete = true
        // Keep the newest saveTotalLimit checkpoints.
        let existing = Self.checkpoints(in: output)
        if config.saveTotalLimit > 0 && existing.count > config.saveTotalLimit {
            for (_, path) in existing.prefix(existing.count - config.saveTotalLimit) { try FileSystem.removeTree(path) }
        }
        return final
    }

    /// checkpoint-N folders in `output`, oldest first.
    public static func checkpoints(in output: String) -> [(Int, String)] {
        ((try? FileSystem.listDirectory(output)) ?? []).compactMap { name -> (Int, String)? in
            guard name.hasPrefix("checkpoint-"), let n = Int(name.dropFirst("checkpoint-".count)) else { return nil }
            return (n, FileSystem.join(output, name))
        }.sorted { $0.0 < $1.0 }
    }

    /// The format a checkpoint's trainer_state.json names: 2 has a header on optimizer.bin (OptimizerState)
    /// and CRC-32C checksums of the files resume reads; 1 (read too) had neither.
    public static let checkpointFormat = "swift-qlora checkpoint 2"
    static let legacyCheckpointFormat = "swift-qlora checkpoint 1"
    static let checksummedAdapterFiles = ["adapter_model.safetensors", "adapter_config.json"]

    /// Restores adapter, optimizer and step from a checkpoint folder, after checking its format and that
    /// every file matches its checksum.
    public func resume(from folder: String) throws {
        let statePath = FileSystem.join(folder, "trainer_state.json")
        let stateJSON: JSONValue
        do { stateJSON = try JSON.parse(try FileSystem.readFile(statePath)) } catch {
            throw FormatError.invalidConfig(file: statePath, reason: "cannot read the checkpoint's state (\(error)); resume from an earlier checkpoint")
        }
        let format = stateJSON["format"]?.stringValue ?? "?"
        guard format == Self.checkpointFormat || format == Self.legacyCheckpointFormat else {
            throw FormatError.invalidConfig(file: statePath, reason: "checkpoint format '\(format)'; this version of swift-qlora reads '\(Self.checkpointFormat)' and '\(Self.legacyCheckpointFormat)'")
        }
        let legacy = format == Self.legacyCheckpointFormat
        guard let s = stateJSON["step"]?.intValue, let os = stateJSON["optimizer_step"]?.intValue else {
            throw FormatError.invalidConfig(file: statePath, reason: "no step")
        }
        guard stateJSON["optimizer"]?.stringValue == config.optimizer.rawValue else {
            throw FormatError.invalidConfig(file: folder, reason: "checkpoint was written with optimizer \(stateJSON["optimizer"]?.stringValue ?? "?"), this run uses \(config.optimizer.rawValue)")
        }
        if !legacy {
            for name in Self.checksummedAdapterFiles + ["optimizer.bin"] {
                let path = FileSystem.join(folder, name)
                guard let expected = stateJSON["crc32c"]?[name]?.intValue else {
                    throw FormatError.invalidConfig(file: statePath, reason: "no checksum for \(name)")
                }
                guard Int(CRC32C.checksum(try FileSystem.readFile(path))) == expected else {
                    throw FormatError.invalidConfig(file: path, reason: "does not match its checksum in trainer_state.json: the checkpoint is corrupted; resume from an earlier checkpoint")
                }
            }
        }
        let adapter = try PEFTAdapter(folder: folder)
        try engine.lora.load(from: adapter)
        let optimizerPath = FileSystem.join(folder, "optimizer.bin")
        do {
            try optimizer.restore(state: try FileSystem.readFile(optimizerPath), step: os, legacy: legacy)
        } catch let e as OptimizerStateError {
            throw FormatError.invalidConfig(file: optimizerPath, reason: e.reason)
        }
        step = s
    }
}

import QLoRAFormats
