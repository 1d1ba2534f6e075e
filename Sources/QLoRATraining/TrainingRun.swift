// A training run in its output folder, as `qlora train` runs one and a Swift program can too: resume from
// the latest checkpoint, steps with metrics.jsonl and TensorBoard, validation, checkpoints on a cadence and
// when asked to stop (Ctrl-C), and at the end the PEFT adapter at the folder's root.
//
// The folder:
//   adapter_config.json, adapter_model.safetensors   the final adapter (PEFT)
//   checkpoint-N/    adapter, optimizer.bin (OptimizerState header + state), trainer_state.json (format,
//                    step, checksums of the other files), training_args.yaml
//   metrics.jsonl    one object per step (step, loss, learning_rate, grad_norm, tokens_per_second, val_loss;
//                    allreduce_seconds in a data-parallel run)
//   tensorboard/     event files, one per process
//   training_args.yaml   the run's options (the caller's bytes)
import QLoRACore
import QLoRAFormats

public enum TrainingRunError: Error, CustomStringConvertible, Equatable {
    case existingCheckpoints(output: String, latest: String)
    case notEnoughSpace(output: String, free: Int, needed: Int, perCheckpoint: Int)
    /// Writing a checkpoint failed (a full disk, for one); the run stopped there, and `lastGood` is untouched.
    case checkpointFailed(step: Int, reason: String, lastGood: String?)

    public var description: String {
        switch self {
        case let .checkpointFailed(step, reason, lastGood):
            return "checkpoint-\(step) could not be written (\(reason)); training stopped at step \(step). "
                + (lastGood.map { "The last complete checkpoint, \($0), is intact: free some space and run again with --resume" }
                    ?? "No earlier checkpoint exists: free some space and start again")
        case let .existingCheckpoints(output, latest):
            return "\(output) already has checkpoints (\(latest)); pass --resume to continue, or choose another --output"
        case let .notEnoughSpace(output, free, needed, each):
            return "\(output) has \(formatBytes(free)) free; checkpoints need about \(formatBytes(needed)) (\(formatBytes(each)) each); free some space or lower --save-total-limit"
        }
    }
}

/// What a run reports as it goes.
public enum TrainingEvent {
    /// Continued from a checkpoint, at its step.
    case resumed(checkpoint: String, step: Int)
    /// The validation loss before the first step.
    case validationBefore(Double)
    /// The loop begins at `step` of `total`.
    case started(step: Int, total: Int)
    /// A step ended (with its validation loss when it was evaluated).
    case step(StepMetrics)
    /// A checkpoint was written.
    case checkpoint(String)
    /// Preference tuning: the reference has scored `done` of `total` pairs (`cached`: read from the run folder).
    case reference(done: Int, total: Int, cached: Bool)
}

public struct TrainingRunResult: Sendable {
    /// Steps done in all (a resumed run counts those before it).
    public var steps: Int
    public var finalLoss: Double?
    public var validationBefore: Double?
    public var validationAfter: Double?
    /// Stopped by `shouldStop` (a checkpoint was saved: `checkpoint`) or before the first step (nothing saved).
    public var stopped: Bool
    public var checkpoint: String?
}

public final class TrainingRun {
    public let trainer: Trainer
    public let output: String
    /// The base model's name or path, written into adapter_config.json.
    public let baseModel: String
    /// The run's options as training_args.yaml (written in each checkpoint and at the end), or nil.
    public let arguments: [UInt8]?
    /// Asked after every step (and before the first): true saves a checkpoint and ends the run (Ctrl-C).
    public var shouldStop: () -> Bool = { false }
    /// Whether this process writes the run's files (metrics, TensorBoard, checkpoints, the adapter): rank 0 of a
    /// data-parallel run; the others train alongside and write nothing.
    public var writesFiles = true

    public init(trainer: Trainer, output: String, baseModel: String, arguments: [UInt8]? = nil) {
        self.trainer = trainer
        self.output = output
        self.baseModel = baseModel
        self.arguments = arguments
        if let arguments { trainer.checkpointFiles["training_args.yaml"] = arguments }
    }

    /// Makes `output` ready for a run before anything is loaded: created, writable, rid of checkpoint folders a
    /// killed process left half-written. Returns the latest checkpoint to resume from, or nil for a new run;
    /// a folder with checkpoints is refused unless `resume`.
    public static func prepare(output: String, resume: Bool) throws -> String? {
        try FileSystem.makeDirectories(output)
        let probe = FileSystem.join(output, ".qlora-write-test")
        try FileSystem.writeFileAtomically(probe, bytes: [1])
        FileSystem.remove(probe)
        for name in try FileSystem.listDirectory(output) where name.hasPrefix(".checkpoint-") {
            try FileSystem.removeTree(FileSystem.join(output, name))
        }
        let existing = Trainer.checkpoints(in: output)
        if let latest = existing.last?.1, !resume { throw TrainingRunError.existingCheckpoints(output: output, latest: latest) }
        return existing.last?.1
    }

    /// Throws when `output` lacks room for the kept checkpoints, the one being written and the final adapter.
    public func checkSpace() throws {
        let each = trainer.engine.lora.parameterCount * 4 + trainer.optimizer.stateBytes + 4096
        let needed = each * (max(trainer.config.saveTotalLimit, 1) + 2)
        if let free = FileSystem.freeBytes(output), free < needed {
            throw TrainingRunError.notEnoughSpace(output: output, free: free, needed: needed, perCheckpoint: each)
        }
    }

    /// Runs to the last step (or until `shouldStop`), from `checkpoint` when given. metrics.jsonl keeps the
    /// lines of the steps a resumed checkpoint had done and gets one appended line per step, so a killed run
    /// keeps every finished step.
    public func run(resumingFrom checkpoint: String? = nil, progress: (TrainingEvent) -> Void = { _ in }) throws -> TrainingRunResult {
        let metricsPath = FileSystem.join(output, "metrics.jsonl")
        var kept: [String] = []
        if let checkpoint {
            try trainer.resume(from: checkpoint)
            if let old = try? FileSystem.readFile(metricsPath) {
                let done = trainer.step
                for (_, line) in JSON.completeLines(old) {
                    let step = (try? JSON.parse(Array(line)))?["step"]?.intValue ?? Int.max
                    if step <= done { kept.append(String(decoding: line, as: UTF8.self)) }
                }
            }
            progress(.resumed(checkpoint: checkpoint, step: trainer.step))
        }
        let writes = writesFiles
        var metrics: AppendingFile?
        if writes {
            try FileSystem.writeFileAtomically(metricsPath, bytes: Array((kept.map { $0 + "\n" }.joined()).utf8))
            metrics = try AppendingFile(path: metricsPath)
        }
        func record(_ fields: [(String, JSONValue)]) throws { try metrics?.append(Array((JSON.serialize(.object(fields)) + "\n").utf8)) }
        var result = TrainingRunResult(steps: trainer.step, stopped: false)
        if try stopRequested() {
            result.stopped = true
            return result
        }
        // TensorBoard: a new event file per process; a resumed run first marks its restart, so that the values
        // the interrupted process logged past the checkpoint are dropped.
        let board = writes ? try TensorBoardWriter(folder: FileSystem.join(output, "tensorboard")) : nil
        if trainer.step > 0 { try board?.sessionStart(step: trainer.step + 1) }
        if trainer.needsReference { try prepareReference(progress: progress) }
        if trainer.step == 0, let v = try trainer.validationLoss() {
            result.validationBefore = v
            progress(.validationBefore(v))
            try record([("step", .int(0)), ("val_loss", .double(v))] + validationPreferenceFields())
            try board?.scalar("eval/loss", v, step: 0)
        }
        progress(.started(step: trainer.step, total: trainer.totalSteps))
        let config = trainer.config
        var last: StepMetrics?
        while trainer.step < trainer.totalSteps {
            var m: StepMetrics
            do {
                m = try trainer.runStep()
            } catch let e as TrainingError {
                if case let .nonFinite(step, what, _) = e { throw TrainingError.nonFinite(step: step, what: what, checkpoint: result.checkpoint) }
                throw e
            }
            if config.evalEvery > 0 && m.step % config.evalEvery == 0 { m.validationLoss = try trainer.validationLoss() }
            var fields: [(String, JSONValue)] = [
                ("step", .int(m.step)), ("loss", .double(m.loss)), ("learning_rate", .double(m.learningRate)),
                ("grad_norm", .double(m.gradNorm)), ("tokens_per_second", .double(m.tokensPerSecond)),
            ]
            if let v = m.validationLoss { fields.append(("val_loss", .double(v))); fields += validationPreferenceFields() }
            if let s = m.seconds { fields.append(("step_seconds", .double(s))) }
            if let a = m.allreduceSeconds { fields.append(("allreduce_seconds", .double(a))) }
            let preference = m.preference.map(Self.preferenceFields) ?? []
            fields += preference
            try record(fields)
            for (name, value) in preference { if let v = value.doubleValue { try board?.scalar("train/" + name, v, step: m.step) } }
            try board?.scalar("train/loss", m.loss, step: m.step)
            try board?.scalar("train/learning_rate", m.learningRate, step: m.step)
            try board?.scalar("train/grad_norm", m.gradNorm, step: m.step)
            try board?.scalar("train/tokens_per_second", m.tokensPerSecond, step: m.step)
            if let v = m.validationLoss { try board?.scalar("eval/loss", v, step: m.step) }
            progress(.step(m))
            last = m
            result.steps = m.step
            result.finalLoss = m.loss
            let stop = try stopRequested()
            if writes, (config.saveEvery > 0 && m.step % config.saveEvery == 0) || stop {
                let saved = try writeCheckpoint()
                result.checkpoint = saved
                progress(.checkpoint(saved))
            }
            if stop {
                result.stopped = true
                return result
            }
        }
        // The last step may have been evaluated already (evalEvery dividing it).
        let evaluatedLast = last.flatMap { $0.step == trainer.step ? $0.validationLoss : nil }
        result.validationAfter = try evaluatedLast ?? trainer.validationLoss()
        if evaluatedLast == nil, let v = result.validationAfter {
            try record([("step", .int(trainer.step)), ("val_loss", .double(v))] + validationPreferenceFields())
            try board?.scalar("eval/loss", v, step: trainer.step)
        }
        result.steps = trainer.step
        guard writes else { return result }
        let saved = try writeCheckpoint()
        result.checkpoint = saved
        progress(.checkpoint(saved))
        try trainer.engine.lora.writePEFTAdapter(to: output, baseModel: baseModel)
        if let arguments { try FileSystem.writeFileAtomically(FileSystem.join(output, "training_args.yaml"), bytes: arguments) }
        return result
    }

    /// A preference step's metrics under TRL's names.
    /// A side without rows (KTO: no desirable, or no undesirable, rows in the step) is left out, as TRL leaves it.
    static func preferenceFields(_ m: PreferenceMetrics) -> [(String, JSONValue)] {
        let chosen = m.chosenCount > 0, rejected = m.rejectedCount > 0
        var fields: [(String, JSONValue)] = []
        if chosen { fields.append(("rewards/chosen", .double(m.rewardsChosen))) }
        if rejected { fields.append(("rewards/rejected", .double(m.rewardsRejected))) }
        if chosen && rejected { fields.append(("rewards/margins", .double(m.margins))) }
        fields.append(m.unpaired ? ("kl", .double(m.kl)) : ("rewards/accuracies", .double(m.accuracy)))
        if chosen { fields.append(("logps/chosen", .double(m.logpsChosen))) }
        if rejected { fields.append(("logps/rejected", .double(m.logpsRejected))) }
        return fields
    }

    /// The held-out pairs' rewards at the last validation, under TRL's eval_ names.
    func validationPreferenceFields() -> [(String, JSONValue)] {
        guard let m = trainer.validationPreference else { return [] }
        return Self.preferenceFields(m).map { ("eval_" + $0.0, $0.1) }
    }

    static let referenceFile = "reference_logps.json"
    static let referenceFormat = "swift-qlora reference log-probabilities 1"

    /// The reference log-probabilities of every pair: read from the run folder when they were computed for the
    /// same pairs (a resumed run), else computed (the base with the adapter off) and written there before the
    /// first step, so that a crash after it never computes them again.
    func prepareReference(progress: (TrainingEvent) -> Void) throws {
        let path = FileSystem.join(output, Self.referenceFile)
        let fingerprint = Int(trainer.pairsFingerprint)
        let count = trainer.pairs.count + trainer.validationPairs.count
        if let bytes = try? FileSystem.readFile(path), let v = try? JSON.parse(bytes), v["format"]?.stringValue == Self.referenceFormat,
           v["fingerprint"]?.intValue == fingerprint, let c = v["chosen"]?.arrayValue?.compactMap(\.doubleValue),
           let r = v["rejected"]?.arrayValue?.compactMap(\.doubleValue), c.count == count, r.count == count {
            trainer.setReference(chosen: c, rejected: r)
            progress(.reference(done: count, total: count, cached: true))
            return
        }
        try trainer.computeReference { done, total in progress(.reference(done: done, total: total, cached: false)) }
        guard writesFiles else { return }
        let (c, r) = trainer.reference
        let value: JSONValue = .object([("format", .string(Self.referenceFormat)), ("fingerprint", .int(fingerprint)),
                                        ("chosen", .array(c.map(JSONValue.double))), ("rejected", .array(r.map(JSONValue.double)))])
        try FileSystem.writeFileAtomically(path, bytes: Array(JSON.serialize(value).utf8))
    }

    /// Writes a checkpoint; a failure (ENOSPC, EIO...) becomes checkpointFailed naming the last complete one, which
    /// the failed write never touches (checkpoints are built in a hidden folder, removed on failure, and renamed
    /// into place only once complete).
    func writeCheckpoint() throws -> String {
        do {
            return try trainer.saveCheckpoint(in: output, baseModel: baseModel)
        } catch {
            throw TrainingRunError.checkpointFailed(step: trainer.step, reason: "\(error)", lastGood: Trainer.checkpoints(in: output).last?.1)
        }
    }

    /// shouldStop, agreed between the ranks of a data-parallel run (any rank asked to stop stops them all, at the
    /// same step).
    func stopRequested() throws -> Bool {
        let stop = shouldStop()
        guard let c = trainer.communicator else { return stop }
        return try c.sum([stop ? 1 : 0])[0] > 0
    }
}
