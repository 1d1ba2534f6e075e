// One training step of QLoRA: forward through the frozen 4-bit model with LoRA adapters, chunked
// cross-entropy on the response tokens, and the explicit backward pass into the adapters (no gradient
// is ever formed for a frozen weight: through W only dX = dY · W). Shapes: B sequences of T tokens,
// N = B·T rows, D hidden, H / Hkv heads of d, I intermediate, V vocab, r LoRA rank.
// With gradient checkpointing only each layer's input is kept; the backward recomputes the layer.
// The model math is the block's (QLoRAModel Block.swift, Block+Backward.swift), which inference runs too;
// this file holds the step: its buffers, the layer loop with checkpointing, and the chunked loss.
import QLoRACore
import QLoRAKernels
import QLoRAModel

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A batch of token sequences of equal length; labels hold the target of each position (-100: ignored).
/// As in transformers, position t is trained to predict labels[t + 1].
///
/// A row may hold several examples packed end to end (`segmentStarts`: for each token, the index in its
/// row where its example begins). Each token then attends only inside its own example, positions restart
/// at 0 for each, and the last token of one example is not trained to predict the first of the next, so a
/// packed row gives the same per-token losses and gradients as its examples in rows of their own.
public struct TrainingBatch: Sendable {
    public let tokens: [Int]
    public let labels: [Int]
    public let batchSize: Int
    public let sequenceLength: Int
    public let segmentStarts: [Int]?

    public init(tokens: [Int], labels: [Int], batchSize: Int, sequenceLength: Int, segmentStarts: [Int]? = nil) {
        precondition(tokens.count == batchSize * sequenceLength && labels.count == tokens.count)
        if let s = segmentStarts {
            precondition(s.count == tokens.count)
            for i in 0..<s.count { precondition(s[i] >= 0 && s[i] <= i % sequenceLength, "segment start after its token") }
        }
        self.tokens = tokens
        self.labels = labels
        self.batchSize = batchSize
        self.sequenceLength = sequenceLength
        self.segmentStarts = segmentStarts
    }

    public static let ignoreIndex = -100

    /// The target that token i (flat index) is trained to predict, or nil.
    @inline(__always)
    func target(of i: Int) -> Int? {
        let t = i % sequenceLength
        guard t != sequenceLength - 1 else { return nil }
        if let s = segmentStarts, s[i + 1] == t + 1 { return nil }  // the next token begins another example
        let label = labels[i + 1]
        return label == Self.ignoreIndex ? nil : label
    }

    /// Targets counted by the loss.
    public var targetCount: Int {
        var n = 0
        for i in 0..<tokens.count where target(of: i) != nil { n += 1 }
        return n
    }

    /// RoPE position of token i (flat index): its index in its example.
    @inline(__always)
    public func position(of i: Int) -> Int { i % sequenceLength - (segmentStarts?[i] ?? 0) }
}


public struct TrainingOptions: Sendable {
    /// Precision of the frozen products; bf16 as in the paper (f32 where the CPU lacks AVX512-BF16).
    public var computeDType: ComputeDType = .bf16
    /// Keep only each layer's input and recompute the layer in the backward pass (the default).
    public var gradientCheckpointing = true
    /// Rows of logits computed at once in the loss (the [N, V] logits never exist whole); nil: as many
    /// as keep a chunk's logits (f32, and their bf16 copy) near 96 MB, 64 to 512 rows (341 for SmolLM2's
    /// 49152 tokens, 512 for Llama 2's 32000). Each chunk reads the whole head twice, so bigger chunks
    /// mean fewer passes: on SmolLM2 with bf16 compute 341 rows ran 9% faster than 64.
    public var lossChunkRows: Int?
    /// Query rows per block of the causal attention products: a block of rows [r0, r1) needs only the
    /// keys [0, r1), so the products skip most of the masked upper triangle (75% of the full square is
    /// computed at T = 512 with blocks of 256, 53% with blocks of 64) at the cost of more, smaller
    /// products. nil: 64. Measured on SmolLM2, batch 4 x 512: in bf16, 64 gave about +5% over 256 (325
    /// against 310 tokens/s, three runs each); in f32 (single-threaded OpenBLAS per head) 64, 128 and
    /// 256 were within noise (192-198). (With multithreaded OpenBLAS per product, 128 had been 13%
    /// slower than 256.)
    public var attentionRowBlock: Int?

    public init() {}
}

/// What one layer's backward needs from its forward (one set with checkpointing, one per layer without).
/// Regions are sized for the workspace's largest batch; a smaller batch uses their beginnings.
final class LayerBuffers {
    let x1, rstd1, q, k, v, probs, attn, h2, x2, rstd2, g, u, a: UnsafeMutablePointer<Float>
    /// The optional norms' inputs and reciprocal RMS (q/k head norms; attention and MLP output norms), or nil.
    let qPre, kPre, rstdQ, rstdK, attnOut, mlpOut, rstdAttnOut, rstdMLPOut: UnsafeMutablePointer<Float>?
    /// Per projection: t = drop(x) Aᵀ [N, r], and the dropout mask [N, in] when dropout is on.
    let loraT: [UnsafeMutablePointer<Float>]
    let masks: [UnsafeMutablePointer<UInt8>?]
    /// DoRA: per projection z = W d + s·B A d [N, out] (DoRA.swift), or nil.
    let doraZ: [UnsafeMutablePointer<Float>?]

    init(_ arena: Arena, rows N: Int, pairs: Int, config c: LlamaConfig, rank r: Int, dropout: Bool, dora: Set<Projection>) {
        let D = c.hiddenSize, qDim = c.headCount * c.headDim, kvDim = c.kvHeadCount * c.headDim, I = c.intermediateSize
        x1 = arena.floats(N * D); rstd1 = arena.floats(N)
        q = arena.floats(N * qDim); k = arena.floats(N * kvDim); v = arena.floats(N * kvDim)
        probs = arena.floats(pairs * c.headCount)
        attn = arena.floats(N * qDim); h2 = arena.floats(N * D); x2 = arena.floats(N * D); rstd2 = arena.floats(N)
        g = arena.floats(N * I); u = arena.floats(N * I); a = arena.floats(N * I)
        qPre = c.qkNorm ? arena.floats(N * qDim) : nil; kPre = c.qkNorm ? arena.floats(N * kvDim) : nil
        rstdQ = c.qkNorm ? arena.floats(N * c.headCount) : nil; rstdK = c.qkNorm ? arena.floats(N * c.kvHeadCount) : nil
        attnOut = c.outputNorms ? arena.floats(N * D) : nil; mlpOut = c.outputNorms ? arena.floats(N * D) : nil
        rstdAttnOut = c.outputNorms ? arena.floats(N) : nil; rstdMLPOut = c.outputNorms ? arena.floats(N) : nil
        let present = Set(Projection.present(fused: c.fusedProjections))
        loraT = Projection.allCases.map { present.contains($0) ? arena.floats(N * r) : arena.floats(1) }
        masks = Projection.allCases.map { p in
            guard dropout, present.contains(p) else { return nil }
            let inF = p == .o ? qDim : (p == .down ? I : D)
            return arena.bytes(N * inF)
        }
        doraZ = Projection.allCases.map { p in
            guard dora.contains(p), present.contains(p) else { return nil }
            return arena.floats(N * c.outFeatures(p))
        }
    }

    /// The block's activations, all kept apart for the backward.
    var block: BlockActivations {
        var b = BlockActivations(x1: x1, q: q, k: k, v: v, attn: attn, h2: h2, x2: x2, g: g, u: u, a: a, rstd1: rstd1, rstd2: rstd2)
        b.qPre = qPre; b.kPre = kPre; b.rstdQ = rstdQ; b.rstdK = rstdK
        b.attnOut = attnOut; b.mlpOut = mlpOut; b.rstdAttnOut = rstdAttnOut; b.rstdMLPOut = rstdMLPOut
        return b
    }
}

/// Every buffer a training step uses, in one arena that is made for the largest batch seen and reused
/// by every step that fits (no allocation for activations in the step loop).
final class StepWorkspace {
    let maxRows: Int, maxPairs: Int, maxT: Int
    let arena: Arena
    let sets: [LayerBuffers]
    /// hidden[l]: the input of layer l (kept: the checkpoints); hidden[L]: the last layer's output.
    let hidden: [UnsafeMutablePointer<Float>]
    let xf, rstdf, dxf, dh, dhNext, proj: UnsafeMutablePointer<Float>
    let da, dg, du, dx2, dh2, dx1, dAttn, dq, dk, dv, dt, through, dropped, scratch, prepared: UnsafeMutablePointer<Float>
    /// DoRA: g ⊙ dy [N, widest output], or nil.
    let doraScaled: UnsafeMutablePointer<Float>?
    let ropeCos, ropeSin: UnsafeMutablePointer<Float>
    /// The sliding layers' own rotary tables (Gemma 3), or nil.
    let localCos, localSin: UnsafeMutablePointer<Float>?
    /// Each row's first visible key on a sliding layer (its example's start, or position - window + 1), or nil.
    let slidingStarts: UnsafeMutablePointer<Int>?
    /// The optional norms' input gradient, and fused projections' outputs and gradients (see BlockGradients, BlockScratch).
    let dNorm, fused: UnsafeMutablePointer<Float>?
    let lossX, logits, lossDx: UnsafeMutablePointer<Float>
    /// bf16 compute: the A operand converted to bf16 rows, and a packed tile of a frozen weight.
    let abf: UnsafeMutablePointer<UInt16>
    let packed: UnsafeMutablePointer<UInt32>
    /// Attention's buffers per worker (the score gradients of a head; bf16 compute: packed operands).
    let attention: Attention.Workspace
    var lossRows: [(Int, Int)] = []

    /// `rows` = B·T, `pairs` = B·T² (attention probabilities per head), `maxT` the longest sequence.
    init(_ arena: Arena, model: LlamaModel, rank r: Int, dropout: Bool, dora: Set<Projection>, checkpointing: Bool, bf16: Bool, rows N: Int, pairs: Int,
         maxT: Int, lossChunk: Int, attentionBlock: Int) {
        let c = model.config
        let D = c.hiddenSize, qDim = c.headCount * c.headDim, kvDim = c.kvHeadCount * c.headDim, I = c.intermediateSize
        let maxIn = max(D, qDim, I)
        maxRows = N; maxPairs = pairs; self.maxT = maxT
        self.arena = arena
        sets = (0..<(checkpointing ? 1 : c.layerCount)).map { _ in LayerBuffers(arena, rows: N, pairs: pairs, config: c, rank: r, dropout: dropout, dora: dora) }
        hidden = (0...c.layerCount).map { _ in arena.floats(N * D) }
        xf = arena.floats(N * D); rstdf = arena.floats(N); dxf = arena.floats(N * D)
        dh = arena.floats(N * D); dhNext = arena.floats(N * D); proj = arena.floats(N * D)
        da = arena.floats(N * I); dg = arena.floats(N * I); du = arena.floats(N * I)
        dx2 = arena.floats(N * D); dh2 = arena.floats(N * D); dx1 = arena.floats(N * D)
        dAttn = arena.floats(N * qDim); dq = arena.floats(N * qDim); dk = arena.floats(N * kvDim); dv = arena.floats(N * kvDim)
        dt = arena.floats(N * r)
        through = arena.floats(N * maxIn); dropped = arena.floats(N * maxIn)
        doraScaled = dora.isEmpty ? nil : arena.floats(N * dora.map { c.outFeatures($0) }.max()!)
        let scratchCount = (model.layers.flatMap(\.linears) + [model.head]).map(\.scratchCount).max() ?? 1
        scratch = arena.floats(scratchCount)
        prepared = arena.floats(min(N, Linear.batchedRowLimit) * maxIn)
        ropeCos = arena.floats(N * c.headDim / 2); ropeSin = arena.floats(N * c.headDim / 2)
        localCos = c.localRopeTheta != nil ? arena.floats(N * c.headDim / 2) : nil
        localSin = c.localRopeTheta != nil ? arena.floats(N * c.headDim / 2) : nil
        slidingStarts = c.slidingWindow != nil ? arena.ints(N) : nil
        dNorm = c.qkNorm || c.outputNorms ? arena.floats(N * max(D, qDim)) : nil
        fused = c.fusedProjections ? arena.floats(N * max(c.qkvDim, 2 * I)) : nil
        lossX = arena.floats(lossChunk * D); logits = arena.floats(lossChunk * c.vocabSize); lossDx = arena.floats(lossChunk * D)
        if bf16 {
            let pad = BF16Gemm.paddedCount
            let widest = pad(max(D, qDim, kvDim, I, c.fusedProjections ? max(c.qkvDim, 2 * I) : 0))
            abf = arena.halves(max(N * widest, lossChunk * pad(c.vocabSize)))
            let words = (model.layers.flatMap(\.linears) + [model.head]).map { $0.packedWords(forRows: .max) }.max() ?? 1
            packed = arena.words(words)
        } else {
            abf = arena.halves(1); packed = arena.words(1)
        }
        attention = Attention.Workspace(arena, heads: c.attentionHeads, maxKeys: maxT, blockRows: attentionBlock, backward: true, bf16: bf16)
        lossRows.reserveCapacity(N)
    }

    /// The block's buffers: work space of the products, and the backward's.
    func blockScratch(bf16: Bool) -> BlockScratch {
        var s = BlockScratch(proj: proj, tile: scratch, prepared: prepared, converted: bf16 ? abf : nil, packed: bf16 ? packed : nil, fused: fused)
        s.dora = doraScaled  // free in the forward, where the dropout form needs it
        return s
    }

    var gradients: BlockGradients {
        var g = BlockGradients(da: da, dg: dg, du: du, dx2: dx2, dh2: dh2, dx1: dx1, dAttn: dAttn, dq: dq, dk: dk, dv: dv, dt: dt, through: through)
        g.dNorm = dNorm
        g.dora = doraScaled
        return g
    }
}

/// The frozen model, its LoRA adapters and the step computation.
public final class TrainingEngine {
    public let model: LlamaModel
    public let lora: LoRAWeights
    public var options: TrainingOptions {
        didSet { workspace = nil }
    }
    /// Counts steps, so that dropout masks differ per step but are the same when a layer is recomputed.
    public var stepCounter: UInt64 = 0
    /// Off for evaluation (no dropout).
    public var training = true
    let kernels: KernelTable
    var workspace: StepWorkspace?
    /// How many times the activation arena was (re)made: once per larger batch shape, not per step.
    public private(set) var workspaceAllocations = 0
    /// Bytes of the activation arena.
    public var workspaceBytes: Int { workspace?.arena.byteCount ?? 0 }
    let inverseFrequencies: [Float]
    let longInverseFrequencies: [Float]?
    let localInverseFrequencies: [Float]?

    /// Query rows per attention block (`TrainingOptions.attentionRowBlock`, or 64).
    var attentionBlock: Int { max(1, options.attentionRowBlock ?? 64) }

    /// Rows per chunk of the loss (`TrainingOptions.lossChunkRows`, or the automatic choice).
    var lossChunkRows: Int {
        if let rows = options.lossChunkRows { return max(1, rows) }
        return min(512, max(64, (96 << 20) / (6 * max(model.config.vocabSize, 1))))
    }

    /// The bf16 kernels when the products run in bf16: asked for, and the kernel table has them (AVX512-BF16,
    /// or the scalar reference a test put there); nil: f32.
    var bf16: BF16Kernels? { options.computeDType == .bf16 ? kernels.bf16 : nil }

    /// Whether the frozen products run in bf16.
    public var usesBF16: Bool { bf16 != nil }

    public init(model: LlamaModel, lora: LoRAWeights, options: TrainingOptions = TrainingOptions(), kernels: KernelTable = .current) {
        self.model = model
        self.lora = lora
        self.options = options
        self.kernels = kernels
        inverseFrequencies = model.config.ropeInverseFrequencies()
        longInverseFrequencies = model.config.longRope != nil ? model.config.ropeInverseFrequencies(long: true) : nil
        localInverseFrequencies = model.config.localRopeInverseFrequencies()
    }

    deinit {
        doraFactors.first.map { $0.scale.deallocate() }
        for f in doraFactors { f.bias.map { UnsafeMutablePointer(mutating: $0).deallocate() } }
    }

    /// Makes the activation arena big enough for `batchSize` sequences of `sequenceLength` tokens ahead
    /// of time (the trainer does this for its longest batch), so no later step of that size or smaller
    /// allocates.
    public func reserve(batchSize: Int, sequenceLength: Int) {
        _ = workspace(rows: batchSize * sequenceLength, pairs: batchSize * sequenceLength * sequenceLength, maxT: sequenceLength)
    }

    func workspace(rows: Int, pairs: Int, maxT: Int) -> StepWorkspace {
        if let w = workspace, rows <= w.maxRows, pairs <= w.maxPairs, maxT <= w.maxT { return w }
        let old = workspace
        let N = max(rows, old?.maxRows ?? 0), P = max(pairs, old?.maxPairs ?? 0), T = max(maxT, old?.maxT ?? 0)
        workspace = nil  // free the old arena before making the new one
        let dropout = lora.config.dropout > 0
        let w = Arena.sized { arena in
            StepWorkspace(arena, model: self.model, rank: self.lora.config.rank, dropout: dropout,
                          dora: self.lora.config.useDoRA ? Set(self.lora.slots.map(\.projection)) : [],
                          checkpointing: self.options.gradientCheckpointing,
                          bf16: self.usesBF16, rows: N, pairs: P, maxT: T, lossChunk: self.lossChunkRows, attentionBlock: self.attentionBlock)
        }.value
        workspace = w
        workspaceAllocations += 1
        return w
    }

    // MARK: - Step

    /// Loss (mean over counted targets) and, when `backward`, the LoRA gradients added to
    /// `lora.gradients` scaled by `gradientScale` (1 / micro-batches for accumulation).
    @discardableResult
    public func step(_ batch: TrainingBatch, backward: Bool = true, gradientScale: Float = 1) throws -> Double {
        // BLAS runs single-threaded inside the step and our own threads split the work (over attention
        // heads, over the rows or columns of each product): OpenBLAS's idle workers spinning between calls
        // took cycles from our threads (19% of a bf16 step's samples; in f32 this is +9% tokens/s).
        try Gemm.withSingleThreadedBLAS { try stepBody(batch, backward: backward, gradientScale: gradientScale) }
    }

    func checkTokens(_ batch: TrainingBatch) throws {
        let V = model.config.vocabSize
        for t in batch.tokens where t < 0 || t >= V { throw ForwardError.tokenOutOfRange(token: t, vocab: V) }
    }

    /// The step's forward through every layer: ws.hidden[L] holds the last layer's output.
    func forwardLayers(_ batch: TrainingBatch) throws -> (StepWorkspace, Shape, BlockCall) {
        try checkTokens(batch)
        let c = model.config
        let B = batch.batchSize, T = batch.sequenceLength, N = B * T, D = c.hiddenSize
        let ws = workspace(rows: N, pairs: B * T * T, maxT: T)
        for (i, token) in batch.tokens.enumerated() {
            let row = ws.hidden[0] + i * D
            model.embeddings.copyRow(token, into: row)
            if let scale = c.embeddingScale { for j in 0..<D { row[j] *= scale } }
        }
        // RoPE tables for each token's position in its example.
        // LongRoPE: the batch's largest position picks the factor set for all its rows (as transformers does).
        var maxPosition = 0
        for i in 0..<N { maxPosition = max(maxPosition, batch.position(of: i)) }
        let inverse = c.usesLongRope(maxPosition: maxPosition) ? longInverseFrequencies ?? inverseFrequencies : inverseFrequencies
        Ops.ropeTables(count: N, position: batch.position(of:), inverseFrequencies: inverse, cos: ws.ropeCos, sin: ws.ropeSin)
        if let f = c.longRope?.attentionFactor, f != 1 {
            let half = c.rotaryDim / 2
            for i in 0..<(N * half) { ws.ropeCos[i] *= f; ws.ropeSin[i] *= f }
        }
        if let local = localInverseFrequencies, let lc = ws.localCos, let ls = ws.localSin {
            Ops.ropeTables(count: N, position: batch.position(of:), inverseFrequencies: local, cos: lc, sin: ls)
        }
        if let window = c.slidingWindow, let starts = ws.slidingStarts {
            // A sliding layer's row sees its own example's keys within the window.
            for i in 0..<N {
                let t = i % T
                starts[i] = max(batch.segmentStarts?[i] ?? 0, t - window + 1)
            }
        }
        let shape = Shape(B: B, T: T, windowStart: batch.segmentStarts)
        let call = BlockCall(rows: N, cos: ws.ropeCos, sin: ws.ropeSin, bf16: bf16, kernels: kernels)
        // DoRA's norms follow A and B: computed again only when the parameters changed (an optimizer step, a load).
        if lora.config.useDoRA && adapterEnabled && doraVersion != lora.version {
            refreshDoRA()
            doraVersion = lora.version
        }
        withAdapters { lora in
            for l in 0..<c.layerCount {
                layerForward(l, ws.sets[options.gradientCheckpointing ? 0 : l], ws, shape, layerCall(l, call, ws), lora, h: ws.hidden[l], out: ws.hidden[l + 1])
            }
        }
        return (ws, shape, call)
    }

    /// Layer l's call: the sliding layers' own rotary tables where the model has them.
    func layerCall(_ l: Int, _ call: BlockCall, _ ws: StepWorkspace) -> BlockCall {
        guard model.config.usesLocalRope(layer: l), let lc = ws.localCos, let ls = ws.localSin else { return call }
        var local = call
        local.cos = UnsafePointer(lc)
        local.sin = UnsafePointer(ls)
        return local
    }

    /// The logits [B·T, V] at every position of `batch` as the training step's forward computes them (the
    /// adapter being trained applied, without dropout), through the same block inference runs: for checks
    /// of one against the other, and for scoring during training.
    public func logits(_ batch: TrainingBatch) throws -> [Float] {
        let wasTraining = training
        training = false
        defer { training = wasTraining }
        return try Gemm.withSingleThreadedBLAS {
            let (ws, _, _) = try forwardLayers(batch)
            let c = model.config
            let N = batch.batchSize * batch.sequenceLength
            model.finalNorm.withUnsafeBufferPointer { w in
                Ops.rmsNormForward(ws.xf, rstd: nil, ws.hidden[c.layerCount], weight: w.baseAddress!, rows: N, dim: c.hiddenSize, eps: c.rmsNormEps)
            }
            var out = [Float](repeating: 0, count: N * c.vocabSize)
            out.withUnsafeMutableBufferPointer { o in
                model.head.frozenForward(ws.xf, rows: N, into: o.baseAddress!, scratch: ws.scratch, bf16: bf16, kernels: kernels)
            }
            return out
        }
    }

    /// An objective over whole sequences (preference tuning): given each row's summed log-probability of its
    /// targets and its target count, the loss and its derivative by each row's sum.
    public typealias SequenceObjective = (_ logProbs: [Double], _ counts: [Int]) -> (loss: Double, gradient: [Double])

    /// One step under a sequence objective: the forward gives every row's log-probability; `objective` turns
    /// them into the loss and dLoss/dlogp per row; the backward then runs once, each row's token gradients
    /// scaled by its derivative (the rows are independent up to the final hidden state, so this is exact).
    /// Unpacked batches only: one example a row. `backward: false` scores without gradients.
    @discardableResult
    public func step(_ batch: TrainingBatch, objective: @escaping SequenceObjective, backward: Bool = true, gradientScale: Float = 1) throws -> Double {
        try step(batch, objective: .completions(objective), backward: backward, gradientScale: gradientScale)
    }

    /// An objective that also needs each row's log-probability of all its tokens (ORPO's NLL runs over prompt and
    /// completion): given the completion sums and counts and the all-token sums and counts (a row's tokens end at
    /// its last labeled one), the loss and its derivative by each of the two sums of each row.
    public typealias AllTokenObjective = (_ completion: [Double], _ completionCounts: [Int], _ all: [Double], _ allCounts: [Int])
        -> (loss: Double, dCompletion: [Double], dAll: [Double])

    @discardableResult
    public func step(_ batch: TrainingBatch, allTokenObjective: @escaping AllTokenObjective, backward: Bool = true, gradientScale: Float = 1) throws -> Double {
        try step(batch, objective: .allTokens(allTokenObjective), backward: backward, gradientScale: gradientScale)
    }

    enum Objective { case completions(SequenceObjective), allTokens(AllTokenObjective) }

    func step(_ batch: TrainingBatch, objective: Objective, backward: Bool, gradientScale: Float) throws -> Double {
        precondition(batch.segmentStarts == nil, "a sequence objective needs one example a row")
        sequenceObjective = objective
        defer { sequenceObjective = nil }
        return try Gemm.withSingleThreadedBLAS { try stepBody(batch, backward: backward, gradientScale: gradientScale) }
    }

    /// Each row's summed log-probability of its targets, with the adapter (`adapter: true`, no dropout) or without
    /// it: the frozen base, the reference model of preference tuning.
    public func sequenceLogProbs(_ batch: TrainingBatch, adapter: Bool = true) throws -> [Double] {
        let wasTraining = training, wasEnabled = adapterEnabled
        training = false
        adapterEnabled = adapter
        defer { training = wasTraining; adapterEnabled = wasEnabled }
        var out: [Double] = []
        try step(batch, objective: { logProbs, _ in
            out = logProbs
            return (0, [Double](repeating: 0, count: logProbs.count))
        }, backward: false)
        return out
    }

    var sequenceObjective: Objective?
    /// False: the adapter is left out of the forward (the base model alone).
    public var adapterEnabled = true

    func stepBody(_ batch: TrainingBatch, backward: Bool, gradientScale: Float) throws -> Double {
        let c = model.config
        let N = batch.batchSize * batch.sequenceLength, D = c.hiddenSize, L = c.layerCount
        let count = batch.targetCount
        guard count > 0 || sequenceObjective != nil else {
            try checkTokens(batch)
            return 0
        }
        let (ws, shape, call) = try forwardLayers(batch)
        // Final norm and chunked cross-entropy; dh is the gradient of the loss w.r.t. the last hidden state.
        model.finalNorm.withUnsafeBufferPointer { w in
            Ops.rmsNormForward(ws.xf, rstd: ws.rstdf, ws.hidden[L], weight: w.baseAddress!, rows: N, dim: D, eps: c.rmsNormEps)
        }
        ws.dxf.update(repeating: 0, count: N * D)
        let loss = crossEntropy(ws, batch: batch, count: count, scale: gradientScale, wantGradient: backward)
        guard backward else { return loss }
        var dh = ws.dh, dhNext = ws.dhNext
        dh.update(repeating: 0, count: N * D)
        model.finalNorm.withUnsafeBufferPointer { w in
            Ops.rmsNormBackward(dh, ws.dxf, ws.hidden[L], rstd: ws.rstdf, weight: w.baseAddress!, rows: N, dim: D)
        }
        withAdapters { lora in
            for l in stride(from: L - 1, through: 0, by: -1) {
                let act = ws.sets[options.gradientCheckpointing ? 0 : l]
                let call = layerCall(l, call, ws)
                if options.gradientCheckpointing {
                    // Recompute (same dropout masks: seeded by step and layer); the layer's output is not needed.
                    layerForward(l, act, ws, shape, call, lora, h: ws.hidden[l], out: nil)
                }
                model.layers[l].backward(ws.hidden[l], act.block, dOut: dh, dIn: dhNext, ws.gradients, ws.blockScratch(bf16: usesBF16),
                                         config: c, call, lora: { p, apply in if let u = lora(l, p, act) { apply(u) } },
                                         attendBackward: { attentionBackward(l, act, ws, shape) })
                swap(&dh, &dhNext)
            }
        }
        stepCounter += 1
        return loss
    }

    struct Shape {
        let B: Int, T: Int
        let windowStart: [Int]?
        var N: Int { B * T }
    }

    // MARK: - Layer forward

    /// The adapter being trained as the block's LoRA updates: `lora(l, p, act)` is layer l's update of
    /// projection p (nil where p is not targeted), keeping its t and dropout mask in `act`, with its gradients.
    typealias Adapters = (_ layer: Int, _ p: Projection, _ act: LayerBuffers) -> LoRAUpdate?

    /// Runs body with the updates over the adapter's parameters and gradients.
    func withAdapters(_ body: (Adapters) throws -> Void) rethrows {
        let r = lora.config.rank, scale = lora.config.scale, dropout = dropoutActive ? lora.config.dropout : 0
        let seed = lora.config.seed, step = stepCounter
        let dropped = workspace!.dropped
        try lora.parameters.withUnsafeBufferPointer { params in
            try lora.gradients.withUnsafeMutableBufferPointer { grads in
                try body { l, p, act in
                    guard adapterEnabled, let slot = lora.slot(layer: l, projection: p) else { return nil }
                    // Seeded by step, layer, projection (and block of rows, in LoRADropout): a recomputed layer
                    // (checkpointing) draws the same mask, and the blocks are drawn in parallel with the same
                    // result on any thread count.
                    let drop = dropout > 0 ? act.masks[p.rawValue].map { mask in
                        LoRADropout(probability: dropout, seed: seed &+ 0x9E37_79B9 &* (step &+ 1) &+ UInt64(l * 16 + p.rawValue) &* 0x1000_0001,
                                    mask: mask, dropped: dropped)
                    } : nil
                    var update = LoRAUpdate(a: params.baseAddress! + slot.aOffset, b: params.baseAddress! + slot.bOffset, rank: r, scale: scale,
                                            t: act.loraT[p.rawValue], dropout: drop,
                                            gradA: grads.baseAddress! + slot.aOffset, gradB: grads.baseAddress! + slot.bOffset)
                    if let m = slot.magnitudeOffset, let i = lora.slotIndex(layer: l, projection: p) {
                        update.dora = LoRAUpdate.DoRA(scale: doraFactors[i].scale, bias: doraFactors[i].bias, inverseNorm: doraFactors[i].inverseNorm,
                                                      z: act.doraZ[p.rawValue], gradMagnitude: grads.baseAddress! + m)
                    }
                    return update
                }
            }
        }
    }

    /// Layer l's block over the step's rows, into `out`. `out == nil`: the backward pass's rerun under
    /// checkpointing (every activation, not the output).
    func layerForward(_ l: Int, _ act: LayerBuffers, _ ws: StepWorkspace, _ s: Shape, _ call: BlockCall, _ lora: Adapters,
                      h: UnsafeMutablePointer<Float>, out: UnsafeMutablePointer<Float>?) {
        model.layers[l].forward(h, into: out, act.block, ws.blockScratch(bf16: usesBF16), config: model.config, call,
                                lora: { p, apply in if let u = lora(l, p, act) { apply(u) } }, attend: { attentionForward(l, act, ws, s) })
    }

    /// Causal attention per sequence (Attention.forward, the probabilities kept for the backward); in a packed
    /// row each query sees only the keys of its own example.
    func attentionForward(_ l: Int, _ act: LayerBuffers, _ ws: StepWorkspace, _ s: Shape) {
        let heads = model.config.attentionHeads
        withSequences(l, act, ws, s) { sequence in
            Attention.forward(heads, sequences: s.B, { sequence($0).0 }, workspace: ws.attention, bf16: bf16, kernels: kernels)
        }
    }

    /// Sequence b's attention operands and gradients in the step's buffers.
    func withSequences(_ l: Int, _ act: LayerBuffers, _ ws: StepWorkspace, _ s: Shape,
                       _ body: ((Int) -> (Attention.Sequence, Attention.Gradients)) -> Void) {
        let heads = model.config.attentionHeads
        let T = s.T, qDim = heads.qDim, kvDim = heads.kvDim, H = heads.heads
        func run(_ starts: UnsafePointer<Int>?) {
            body { b in
                (Attention.Sequence(q: act.q + b * T * qDim, out: act.attn + b * T * qDim, keys: act.k + b * T * kvDim, values: act.v + b * T * kvDim,
                                    rows: T, windowStarts: starts.map { $0 + b * T }, probs: act.probs + b * H * T * T),
                 Attention.Gradients(dOut: ws.dAttn + b * T * qDim, dq: ws.dq + b * T * qDim, dk: ws.dk + b * T * kvDim, dv: ws.dv + b * T * kvDim))
            }
        }
        if model.config.isSliding(layer: l), let sliding = ws.slidingStarts {
            run(UnsafePointer(sliding))
        } else if let starts = s.windowStart {
            starts.withUnsafeBufferPointer { run($0.baseAddress!) }
        } else {
            run(nil)
        }
    }

    // MARK: - Layer backward

    /// Attention's backward per sequence (Attention.backward): dQ, and dK and dV added to.
    func attentionBackward(_ l: Int, _ act: LayerBuffers, _ ws: StepWorkspace, _ s: Shape) {
        let heads = model.config.attentionHeads
        withSequences(l, act, ws, s) { sequence in
            Attention.backward(heads, sequences: s.B, sequence, workspace: ws.attention, bf16: bf16)
        }
    }

    /// The adapter's version the DoRA factors were computed for.
    var doraVersion = -1
    /// DoRA's per-slot factors for the current A, B and magnitudes (refreshDoRA), each array [out], allocated once.
    var doraFactors: [(scale: UnsafeMutablePointer<Float>, inverseNorm: UnsafeMutablePointer<Float>, bias: UnsafePointer<Float>?)] = []

    /// Recomputes g = m / ‖W + s·BA‖ and 1 / ‖W + s·BA‖ for every slot from the adapter's current parameters (A
    /// and B change at each optimizer step; PEFT recomputes the norm in every forward, which gives the same).
    func refreshDoRA() {
        let norms = lora.norms(model)
        if doraFactors.isEmpty {
            let total = lora.slots.reduce(0) { $0 + 2 * $1.outFeatures }
            let storage = UnsafeMutablePointer<Float>.allocate(capacity: total)
            var offset = 0
            doraFactors = lora.slots.map { s in
                defer { offset += 2 * s.outFeatures }
                let bias = model.layers[s.layer][s.projection]!.bias.map { b -> UnsafePointer<Float> in
                    let p = UnsafeMutablePointer<Float>.allocate(capacity: b.count)
                    p.initialize(from: b, count: b.count)
                    return UnsafePointer(p)
                }
                return (storage + offset, storage + offset + s.outFeatures, bias)
            }
        }
        for (i, s) in lora.slots.enumerated() {
            guard let m = s.magnitudeOffset else { continue }
            for o in 0..<s.outFeatures {
                let inverse = 1 / norms[i][o]
                doraFactors[i].inverseNorm[o] = inverse
                doraFactors[i].scale[o] = lora.parameters[m + o] * inverse
            }
        }
    }

    /// Whether LoRA dropout applies now.
    var dropoutActive: Bool { training && lora.config.dropout > 0 }

    // MARK: - Loss

    /// x [rows, cols] converted to bf16 rows in ws.abf (bf16 compute), or nil (f32 compute). The result
    /// lives until the next conversion.
    func bf16Operand(_ ws: StepWorkspace, _ x: UnsafePointer<Float>, rows: Int, cols: Int) -> UnsafePointer<UInt16>? {
        guard let bf16 else { return nil }
        BF16Gemm.convert(x, rows: rows, cols: cols, ld: cols, into: ws.abf, ldd: BF16Gemm.paddedCount(cols), kernels: bf16)
        return UnsafePointer(ws.abf)
    }

    /// The frozen head (lm_head or the tied embedding; f32 or bf16 tiles) and log-softmax over `targets` (row
    /// position in the batch, target token), `lossChunkRows` at a time: logits = x Hᵀ, then `visit(k, loss)` with
    /// target k's -log p (its logits turned into its gradient times `scale`), and with `wantGradient` that gradient
    /// back through the head (dx = dlogits H) added into the target's row of ws.dxf.
    func chunkedHead(_ ws: StepWorkspace, targets: [(Int, Int)], scale: Float, wantGradient: Bool, visit: (Int, Double) -> Void) {
        let V = model.config.vocabSize, D = model.config.hiddenSize
        let x = ws.lossX, logits = ws.logits, dx = ws.lossDx
        let head = model.head
        var start = 0
        while start < targets.count {
            let n = min(lossChunkRows, targets.count - start)
            for k in 0..<n { (x + k * D).update(from: ws.xf + targets[start + k].0 * D, count: D) }
            head.frozenForward(x, converted: bf16Operand(ws, x, rows: n, cols: D), rows: n, into: logits, scratch: ws.scratch, packed: ws.packed,
                               bf16: bf16, kernels: kernels)
            for k in 0..<n { visit(start + k, Ops.crossEntropyRow(logits + k * V, vocab: V, target: targets[start + k].1, scale: scale)) }
            if wantGradient {
                dx.update(repeating: 0, count: n * D)
                head.inputGradient(logits, converted: bf16Operand(ws, logits, rows: n, cols: V), rows: n, into: dx, scratch: ws.scratch,
                                   packed: ws.packed, bf16: bf16, kernels: kernels)
                for k in 0..<n {
                    let row = ws.dxf + targets[start + k].0 * D
                    for j in 0..<D { row[j] += dx[k * D + j] }
                }
            }
            start += n
        }
    }

    /// Mean cross-entropy over counted targets; writes dL/dxf (times `scale`) into ws.dxf.
    func crossEntropy(_ ws: StepWorkspace, batch: TrainingBatch, count: Int, scale: Float, wantGradient: Bool) -> Double {
        if let objective = sequenceObjective { return sequenceLoss(ws, batch: batch, objective: objective, scale: scale, wantGradient: wantGradient) }
        let N = batch.batchSize * batch.sequenceLength
        // Rows whose target counts: row i = (b, t) predicts labels[b, t + 1].
        ws.lossRows.removeAll(keepingCapacity: true)
        for i in 0..<N { if let target = batch.target(of: i) { ws.lossRows.append((i, target)) } }
        var total = 0.0
        chunkedHead(ws, targets: ws.lossRows, scale: Float(1) / Float(count) * scale, wantGradient: wantGradient) { _, loss in total += loss }
        return total / Double(count)
    }

    /// The head and log-softmax as in crossEntropy, each token's gradient taken with weight 1 (that of -log p),
    /// summed per row (completion targets, and for an all-token objective every target up to the row's last labeled
    /// token); then each target's gradient is scaled by minus the objective's derivative by the sums it belongs to.
    func sequenceLoss(_ ws: StepWorkspace, batch: TrainingBatch, objective: Objective, scale: Float, wantGradient: Bool) -> Double {
        let D = model.config.hiddenSize, T = batch.sequenceLength, B = batch.batchSize
        var allTokens = false
        if case .allTokens = objective { allTokens = true }
        // Targets (row position, token), and whether each is a completion target.
        var targets: [(Int, Int)] = [], isCompletion: [Bool] = []
        for b in 0..<B {
            var end = -1
            for t in 0..<T where batch.labels[b * T + t] != TrainingBatch.ignoreIndex { end = t }
            for t in 0..<(T - 1) {
                let i = b * T + t
                if let target = batch.target(of: i) {
                    targets.append((i, target))
                    isCompletion.append(true)
                } else if allTokens && t < end {
                    targets.append((i, batch.tokens[i + 1]))
                    isCompletion.append(false)
                }
            }
        }
        var completion = [Double](repeating: 0, count: B), completionCounts = [Int](repeating: 0, count: B)
        var all = completion, allCounts = completionCounts
        chunkedHead(ws, targets: targets, scale: 1, wantGradient: wantGradient) { k, loss in
            let b = targets[k].0 / T
            all[b] -= loss
            allCounts[b] += 1
            if isCompletion[k] {
                completion[b] -= loss
                completionCounts[b] += 1
            }
        }
        let loss: Double, dCompletion: [Double], dAll: [Double]
        switch objective {
        case let .completions(f):
            (loss, dCompletion) = f(completion, completionCounts)
            dAll = [Double](repeating: 0, count: B)
        case let .allTokens(f):
            (loss, dCompletion, dAll) = f(completion, completionCounts, all, allCounts)
        }
        precondition(dCompletion.count == B && dAll.count == B)
        if wantGradient {
            for (k, (i, _)) in targets.enumerated() {
                let b = i / T
                let w = Float(-(dAll[b] + (isCompletion[k] ? dCompletion[b] : 0))) * scale
                let row = ws.dxf + i * D
                for j in 0..<D { row[j] *= w }
            }
        }
        return loss
    }
}
