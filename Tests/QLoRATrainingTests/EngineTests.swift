// The training step's gradients: finite differences of the loss on a tiny model, checkpointing on and off
// giving identical gradients, and the LoRA invariants (B = 0 is the base model).
import QLoRA
import QLoRATestSupport
import Testing

private let modelResources = FileSystem.join(FileSystem.directoryName(Fixtures.resources()), "../QLoRAModelTests/Resources")

private func tinyModel(_ quant: QuantType? = nil) throws -> LlamaModel {
    var o = LoadOptions()
    o.quantType = quant
    o.showProgress = false
    return try LlamaModel.load(FileSystem.join(modelResources, "tiny-llama-gqa"), options: o)
}

private func batch() -> TrainingBatch {
    var rng = SeededGenerator(seed: 11)
    let B = 2, T = 10
    let tokens = (0..<(B * T)).map { _ in Int(rng.next() % 300) + 3 }
    var labels = tokens
    for b in 0..<B { for t in 0..<3 { labels[b * T + t] = TrainingBatch.ignoreIndex } }
    return TrainingBatch(tokens: tokens, labels: labels, batchSize: B, sequenceLength: T)
}

/// The precisions a step runs in: f32; bf16 on this CPU's kernels (f32 where it has no AVX512-BF16); bf16 on
/// the scalar reference kernels, which any CPU runs.
enum StepPrecision: String, CaseIterable, CustomStringConvertible {
    case f32, bf16, bf16Reference = "bf16-reference"
    var description: String { rawValue }
    var dtype: ComputeDType { self == .f32 ? .f32 : .bf16 }
    var kernels: KernelTable { self == .bf16Reference ? KernelTable.current.withBF16(.reference) : .current }
}

private func engine(_ model: LlamaModel, dropout: Float = 0, checkpointing: Bool = true, dtype: ComputeDType = .f32,
                    kernels: KernelTable = .current) -> TrainingEngine {
    var c = LoRAConfig()
    c.rank = 4
    c.alpha = 8
    c.dropout = dropout
    let lora = LoRAWeights(model: model, config: c)
    var rng = SeededGenerator(seed: 5)
    // Non-zero B so every path carries gradient.
    for s in lora.slots { for i in 0..<(s.outFeatures * c.rank) { lora.parameters[s.bOffset + i] = (rng.nextFloat() - 0.5) * 0.2 } }
    var o = TrainingOptions()
    o.computeDType = dtype  // f32 unless a test asks: finite differences need the f32 products
    o.gradientCheckpointing = checkpointing
    o.lossChunkRows = 7
    return TrainingEngine(model: model, lora: lora, options: o, kernels: kernels)
}

private func engine(_ model: LlamaModel, dropout: Float = 0, checkpointing: Bool = true, _ precision: StepPrecision) -> TrainingEngine {
    engine(model, dropout: dropout, checkpointing: checkpointing, dtype: precision.dtype, kernels: precision.kernels)
}

@Suite("training engine")
struct EngineTests {
    @Test("gradients agree with central finite differences of the loss")
    func finiteDifferences() throws {
        let e = engine(try tinyModel())
        let b = batch()
        e.lora.zeroGradients()
        try e.step(b)
        let grads = e.lora.gradients
        var rng = SeededGenerator(seed: 3)
        var worst = 0.0
        for _ in 0..<40 {
            let i = Int(rng.next() % UInt64(grads.count))
            let original = e.lora.parameters[i]
            let h: Float = 1e-2
            e.lora.parameters[i] = original + h
            let up = try e.step(b, backward: false)
            e.lora.parameters[i] = original - h
            let down = try e.step(b, backward: false)
            e.lora.parameters[i] = original
            let numeric = (up - down) / Double(2 * h)
            // The f32 loss carries ~1e-7 relative rounding, ~1e-5 in the quotient: absolute plus relative.
            let excess = abs(numeric - Double(grads[i])) - (5e-5 + 2e-3 * abs(numeric))
            worst = max(worst, excess)
        }
        #expect(worst <= 0, "worst excess over tolerance \(worst)")
    }

    @Test("gradientScale scales every gradient once (accumulation of k micro-batches at 1/k is their mean)")
    func gradientScale() throws {
        let model = try tinyModel()
        let a = engine(model), b = engine(model)
        a.lora.zeroGradients()
        b.lora.zeroGradients()
        let la = try a.step(batch()), lb = try b.step(batch(), gradientScale: 0.25)
        #expect(la == lb, "the returned loss is not scaled")
        var worst: Float = 0
        for i in 0..<a.lora.gradients.count {
            worst = max(worst, abs(b.lora.gradients[i] - 0.25 * a.lora.gradients[i]) - 1e-6 * abs(a.lora.gradients[i]))
        }
        #expect(worst <= 1e-9, "gradients at scale 0.25 differ from a quarter of those at scale 1 by \(worst)")
    }

    @Test("gradient checkpointing gives the same gradients as keeping every activation (f32 and bf16 compute, bf16 on the reference kernels)",
          arguments: StepPrecision.allCases)
    func checkpointing(precision: StepPrecision) throws {
        let model = try tinyModel(.nf4)
        let a = engine(model, checkpointing: true, precision), b = engine(model, checkpointing: false, precision)
        let la = try a.step(batch()), lb = try b.step(batch())
        #expect(la == lb)
        #expect(a.lora.gradients == b.lora.gradients)
        // With dropout too (the recomputed layer draws the same masks).
        let c = engine(model, dropout: 0.1, checkpointing: true, precision), d = engine(model, dropout: 0.1, checkpointing: false, precision)
        #expect(try c.step(batch()) == (try d.step(batch())))
        #expect(c.lora.gradients == d.lora.gradients)
    }

    @Test("a non-finite loss stops the trainer with the step named, or is skipped with skipNonFinite")
    func nonFinite() throws {
        let model = try tinyModel()
        for skip in [false, true] {
            let e = engine(model)
            e.lora.parameters[e.lora.slots[0].bOffset] = .nan
            var c = TrainerConfig()
            c.batchSize = 2
            c.gradientAccumulation = 1
            c.skipNonFinite = skip
            let b = batch()
            let examples = (0..<2).map { s in
                EncodedExample(tokens: Array(b.tokens[(s * 10)..<(s * 10 + 10)]), labels: Array(b.labels[(s * 10)..<(s * 10 + 10)]), truncated: false)
            }
            let trainer = try Trainer(engine: e, config: c, train: examples, validation: [], padToken: 0)
            if skip {
                let m = try trainer.runStep()
                #expect(!m.loss.isFinite && trainer.step == 1)
            } else {
                #expect(throws: TrainingError.self) { _ = try trainer.runStep() }
                do { _ = try trainer.runStep() } catch { #expect("\(error)".contains("step 1") && "\(error)".contains("not finite")) }
            }
        }
    }

    @Test("with B = 0 the adapted model's loss is the base model's")
    func zeroB() throws {
        let model = try tinyModel()
        var c = LoRAConfig()
        c.rank = 8
        let lora = LoRAWeights(model: model, config: c)  // PEFT init: B = 0
        var options = TrainingOptions()
        options.computeDType = .f32  // compared with the f32 inference pass at 1e-5
        let e = TrainingEngine(model: model, lora: lora, options: options)
        e.training = false
        let b = batch()
        let loss = try e.step(b, backward: false)
        // The base model's loss from the inference forward pass.
        var total = 0.0, n = 0
        for s in 0..<b.batchSize {
            let seq = Array(b.tokens[(s * b.sequenceLength)..<((s + 1) * b.sequenceLength)])
            let logits = try model.forward(seq, cache: KVCache(config: model.config, capacity: 16), logits: .all)
            let V = model.config.vocabSize
            for t in 0..<(b.sequenceLength - 1) {
                let target = b.labels[s * b.sequenceLength + t + 1]
                if target == TrainingBatch.ignoreIndex { continue }
                total += PerplexityEvaluator.nll(logits[(t * V)..<((t + 1) * V)], target: target)
                n += 1
            }
        }
        #expect(abs(loss - total / Double(n)) < 1e-5)
    }

    @Test("gradient accumulation weighs micro-batches by their trained tokens: two micro-batches give one big batch's loss and gradients")
    func accumulationIsTokenWeighted() throws {
        let model = try tinyModel()
        var rng = SeededGenerator(seed: 4)
        // 8 and 3 trained tokens: a plain mean of the two micro-batch losses would weigh them equally.
        let examples = [9, 4].map { n -> EncodedExample in
            let tokens = (0..<n).map { _ in Int(rng.next() % 300) + 3 }
            return EncodedExample(tokens: tokens, labels: tokens, truncated: false)
        }
        func run(batchSize: Int, accumulation: Int) throws -> (Double, [Float]) {
            let e = engine(model)
            var c = TrainerConfig()
            c.batchSize = batchSize
            c.gradientAccumulation = accumulation
            c.maxGradNorm = 0  // compare the raw gradients
            let trainer = try Trainer(engine: e, config: c, train: examples, validation: [], padToken: 0)
            let m = try trainer.runStep()
            return (m.loss, e.lora.gradients)
        }
        let (bigLoss, bigGrad) = try run(batchSize: 2, accumulation: 1)
        let (accLoss, accGrad) = try run(batchSize: 1, accumulation: 2)
        #expect(abs(accLoss - bigLoss) <= 1e-6 * abs(bigLoss), "loss \(accLoss) accumulated vs \(bigLoss)")
        // f32 rounding differs between the two (different GEMM shapes): the atol is 1e-5 of the largest
        // gradient (0.19). OpenBLAS's Haswell kernels leave one element of 8,960 2e-7 off; with 1/k
        // weighting the gradients differ by far more.
        let scale = bigGrad.map(abs).max() ?? 0
        #expect(Compare.close(accGrad, bigGrad, atol: 1e-5 * scale, rtol: 1e-4, "gradients") == nil)
    }

    @Test("the step plan trains every example once per epoch, in micro-batches of the batch size, reshuffled each epoch")
    func stepPlan() throws {
        var c = TrainerConfig()
        c.batchSize = 3
        c.gradientAccumulation = 2
        c.seed = 5
        let order = BatchOrder(lengths: (0..<23).map { 2 + $0 % 7 }, config: c)
        #expect(order.microBatchesPerEpoch == 8 && order.stepsPerEpoch == 4)
        var epochs: [[[Int]]] = []
        for epoch in 0..<2 {
            let micro = (0..<4).flatMap { order.microBatches(ofStep: epoch * 4 + $0) }
            #expect(micro.count == 8 && micro.allSatisfy { $0.count <= 3 })
            // 4 steps of 2 micro-batches cover all 8 batches of the plan: every example once.
            #expect(micro.flatMap { $0 }.sorted() == Array(0..<23))
            #expect(micro == order.epochPlan(epoch))
            epochs.append(micro)
        }
        #expect(epochs[0] != epochs[1])
        // Asked again (a resumed run), a step gives the same micro-batches.
        #expect(order.microBatches(ofStep: 1) == epochs[0][2..<4].map { $0 })
        // The trainer trains in this order.
        let examples = (0..<23).map { i in EncodedExample(tokens: Array(repeating: i + 3, count: 2 + i % 7), labels: Array(repeating: i + 3, count: 2 + i % 7), truncated: false) }
        let trainer = try Trainer(engine: engine(try tinyModel()), config: c, train: examples, validation: [], padToken: 0)
        #expect((0..<8).allSatisfy { trainer.order.microBatches(ofStep: $0) == order.microBatches(ofStep: $0) })
    }

    @Test("a packed row gives the loss and gradients of its examples in rows of their own")
    func packing() throws {
        let model = try tinyModel(.nf4)
        var rng = SeededGenerator(seed: 21)
        // Three examples of different lengths; the first token's label is trainable (text format) so
        // that a missing boundary would show up as an extra target.
        let lengths = [7, 4, 9]
        let examples = lengths.map { n -> EncodedExample in
            let tokens = (0..<n).map { _ in Int(rng.next() % 300) + 3 }
            var labels = tokens
            labels[1] = TrainingBatch.ignoreIndex
            return EncodedExample(tokens: tokens, labels: labels, truncated: false)
        }
        let packed = Packing.pack(examples, capacity: 12)
        // First-fit decreasing: 9 opens a bin, 7 does not fit beside it and opens another, 4 joins the 7.
        #expect(packed.map(\.tokens.count) == [9, 11])
        #expect(packed[1].exampleStarts == [0, 7])
        let a = engine(model), b = engine(model)
        let ta = try Trainer(engine: a, config: TrainerConfig(), train: packed, validation: [], padToken: 0)
        let tb = try Trainer(engine: b, config: TrainerConfig(), train: examples, validation: [], padToken: 0)
        let packedBatch = ta.makeBatch(packed), plainBatch = tb.makeBatch(examples)
        #expect(packedBatch.segmentStarts?[11 + 7] == 7 && packedBatch.segmentStarts?[11 + 6] == 0)
        #expect(packedBatch.position(of: 11 + 8) == 1)
        #expect(packedBatch.targetCount == plainBatch.targetCount)
        a.lora.zeroGradients()
        b.lora.zeroGradients()
        let la = try a.step(packedBatch), lb = try b.step(plainBatch)
        #expect(abs(la - lb) <= 1e-6 * abs(lb), "loss \(la) packed vs \(lb)")
        var worst: Float = 0, scale: Float = 0
        for i in 0..<a.lora.gradients.count {
            worst = max(worst, abs(a.lora.gradients[i] - b.lora.gradients[i]))
            scale = max(scale, abs(b.lora.gradients[i]))
        }
        #expect(worst <= 1e-5 * scale, "largest gradient difference \(worst) of \(scale)")
        // Without the boundaries the same tokens give another loss (the check can fail).
        let unmasked = TrainingBatch(tokens: packedBatch.tokens, labels: packedBatch.labels, batchSize: 2, sequenceLength: packedBatch.sequenceLength)
        #expect(abs(try a.step(unmasked, backward: false) - lb) > 1e-3)
    }

    @Test("bf16 embeddings and head: the same logits, loss and gradients as f32 tables holding the same rounded values")
    func bf16Embeddings() throws {
        var o = LoadOptions()
        o.showProgress = false
        o.bf16Embeddings = true
        let half = try LlamaModel.load(FileSystem.join(modelResources, "tiny-llama-gqa"), options: o)
        guard case .bf16 = half.embeddings.weight else { Issue.record("embeddings not bf16"); return }
        func dense(_ l: Linear) -> Linear { Linear(weight: .dense(l.denseWeight()), outFeatures: l.outFeatures, inFeatures: l.inFeatures) }
        let full = LlamaModel(config: half.config, embeddings: dense(half.embeddings), layers: half.layers, finalNorm: half.finalNorm,
                              lmHead: half.lmHead.map(dense), source: "rounded")
        #expect(half.weightBytes < full.weightBytes)
        let tokens = Array(batch().tokens.prefix(10))
        let a = try half.forward(tokens, cache: KVCache(config: half.config, capacity: 16), logits: .all)
        let b = try full.forward(tokens, cache: KVCache(config: full.config, capacity: 16), logits: .all)
        #expect(Compare.close(a, b, atol: 1e-5, rtol: 1e-5, "logits") == nil)
        let ea = engine(half), eb = engine(full)
        ea.lora.zeroGradients()
        eb.lora.zeroGradients()
        let la = try ea.step(batch()), lb = try eb.step(batch())
        #expect(abs(la - lb) <= 1e-6 * abs(lb))
        #expect(Compare.close(ea.lora.gradients, eb.lora.gradients, atol: 1e-6, rtol: 1e-4, "gradients") == nil)
    }

    @Test("causal attention in row blocks gives the gradients of whole squares (plain and packed rows; f32 and bf16, bf16 on the reference kernels)",
          arguments: StepPrecision.allCases)
    func attentionBlocks(precision: StepPrecision) throws {
        let model = try tinyModel()
        for packed in [false, true] {
            var results: [(Double, [Float])] = []
            for block in [1000, 3, 4] {
                let e = engine(model, precision)
                e.options.attentionRowBlock = block
                e.lora.zeroGradients()
                var b = batch()
                if packed {
                    let starts = (0..<b.tokens.count).map { i in i % 10 < 4 ? 0 : 4 }
                    b = TrainingBatch(tokens: b.tokens, labels: b.labels, batchSize: b.batchSize, sequenceLength: b.sequenceLength, segmentStarts: starts)
                }
                results.append((try e.step(b), e.lora.gradients))
            }
            for r in results.dropFirst() {
                #expect(abs(r.0 - results[0].0) <= 1e-6 * abs(results[0].0), "loss, packed \(packed)")
                #expect(Compare.close(r.1, results[0].1, atol: 1e-7, rtol: 1e-4, "gradients, packed \(packed)") == nil)
            }
        }
    }

    @Test("bf16 compute on the scalar reference kernels (any CPU): the loss and gradients of f32 within bf16 rounding, and those of the AVX512-BF16 kernels within f32 summation order where the CPU has them")
    func bf16OnReferenceKernels() throws {
        let model = try tinyModel(.nf4)
        func run(_ precision: StepPrecision, kernels: KernelTable? = nil) throws -> (Double, [Float], Bool) {
            let e = kernels.map { engine(model, dtype: precision.dtype, kernels: $0) } ?? engine(model, precision)
            e.lora.zeroGradients()
            let loss = try e.step(batch())
            return (loss, e.lora.gradients, e.usesBF16)
        }
        let f32 = try run(.f32), reference = try run(.bf16Reference)
        #expect(reference.2, "the engine computes in f32 with bf16 reference kernels in its table")
        #expect(abs(reference.0 - f32.0) <= 1e-2 * abs(f32.0), "loss \(reference.0) against f32's \(f32.0)")
        #expect(abs(reference.0 - f32.0) > 0, "bf16 rounding moved nothing: the bf16 path did not run")
        // Single gradients of a tiny model move by much more than bf16's 2⁻⁸ (a small one is a difference of large
        // terms); the gradient as a whole stays within a few percent of f32's.
        var diff = 0.0, norm = 0.0
        for (x, y) in zip(reference.1, f32.1) {
            diff += Double(x - y) * Double(x - y)
            norm += Double(y) * Double(y)
        }
        #expect((diff / norm).squareRoot() <= 5e-2, "bf16 (reference kernels) against f32 gradients: relative distance \((diff / norm).squareRoot())")
        if let fast = BF16Kernels.avx512bf16 {
            let avx = try run(.bf16, kernels: KernelTable.current.withBF16(fast))
            #expect(abs(avx.0 - reference.0) <= 1e-5 * abs(reference.0), "loss \(avx.0) against the reference kernels' \(reference.0)")
            #expect(Compare.close(avx.1, reference.1, atol: 1e-6, rtol: 1e-3, "AVX512-BF16 against reference kernels' gradients") == nil)
        }
    }

    @Test("the training step's forward and the inference forward give the same logits (one block; f32, an adapter on, plain and packed rows)")
    func trainingForwardIsInferenceForward() throws {
        // (In bf16 they differ by design: inference keeps attention's products in f32 and decodes few rows
        // through the matrix-vector kernels.)
        let precision = StepPrecision.f32
        let model = try tinyModel(.nf4)
        let e = engine(model, dropout: 0.1, precision)  // dropout is off outside training: logits() runs without it
        for i in e.lora.parameters.indices { e.lora.parameters[i] *= 3 }  // an update large enough to matter
        let dir = try Fixtures.temporaryDirectory("forward-lora")
        try e.lora.writePEFTAdapter(to: dir, baseModel: "tiny-llama-gqa")
        let adapted = try model.withAdapter(dir)
        let V = model.config.vocabSize
        for packed in [false, true] {
            var b = batch()
            if packed {
                let starts = (0..<b.tokens.count).map { i in i % 10 < 4 ? 0 : 4 }
                b = TrainingBatch(tokens: b.tokens, labels: b.labels, batchSize: b.batchSize, sequenceLength: b.sequenceLength, segmentStarts: starts)
            }
            let training = try e.logits(b)
            let base = try TrainingEngine(model: model, lora: LoRAWeights(model: model, config: e.lora.config), options: e.options,
                                          kernels: precision.kernels).logits(b)
            var moved: Float = 0
            for s in 0..<b.batchSize {
                // Each example of a row on its own cache, as inference runs it.
                let row = s * b.sequenceLength
                for (lo, hi) in packed ? [(0, 4), (4, b.sequenceLength)] : [(0, b.sequenceLength)] {
                    let ids = Array(b.tokens[(row + lo)..<(row + hi)])
                    let inference = try adapted.forward(ids, cache: KVCache(config: model.config, capacity: 16), logits: .all, kernels: precision.kernels)
                    let ours = Array(training[((row + lo) * V)..<((row + hi) * V)])
                    #expect(Compare.close(ours, inference, atol: 2e-5, rtol: 1e-4, "\(precision) packed \(packed), sequence \(s) rows \(lo)..<\(hi)") == nil)
                    for (x, y) in zip(ours, base[((row + lo) * V)..<((row + hi) * V)]) { moved = max(moved, abs(x - y)) }
                }
            }
            #expect(moved > 1e-2, "the adapter moved the logits by \(moved) only: the comparison would not see it missing")
        }
    }
}
