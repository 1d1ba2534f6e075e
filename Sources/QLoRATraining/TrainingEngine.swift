// One training step of QLoRA: forward through the frozen 4-bit model with LoRA adapters, chunked
// cross-entropy on the response tokens, and the explicit backward pass into the adapters (no gradient
// is ever formed for a frozen weight: through W only dX = dY · W). Shapes: B sequences of T tokens,
// N = B·T rows, D hidden, H / Hkv heads of d, I intermediate, V vocab, r LoRA rank.
// With gradient checkpointing only each layer's input is kept; the backward recomputes the layer.
// The layer forward and backward mirror each other, read top to bottom (llm.c style).
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

/// One allocation carved into 64-byte-aligned regions. A measuring arena only adds up the sizes, so a
/// workspace is laid out once to learn its size and once more in the real allocation.
final class Arena {
    private(set) var byteCount = 0
    private let base: UnsafeMutableRawPointer?

    init(measuring: Void) { base = nil }

    init(byteCount: Int) {
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(byteCount, 64), alignment: 64)
        p.initializeMemory(as: UInt8.self, repeating: 0, count: max(byteCount, 64))
        base = p
    }

    deinit { base?.deallocate() }

    private func reserve(_ bytes: Int) -> UnsafeMutableRawPointer {
        let offset = byteCount
        byteCount += (max(bytes, 1) + 63) / 64 * 64
        // While measuring, a placeholder that is never dereferenced.
        return base.map { $0 + offset } ?? UnsafeMutableRawPointer(bitPattern: 64)!
    }

    func floats(_ n: Int) -> UnsafeMutablePointer<Float> { reserve(4 * n).bindMemory(to: Float.self, capacity: max(n, 1)) }
    func bytes(_ n: Int) -> UnsafeMutablePointer<UInt8> { reserve(n).bindMemory(to: UInt8.self, capacity: max(n, 1)) }
    func halves(_ n: Int) -> UnsafeMutablePointer<UInt16> { reserve(2 * n).bindMemory(to: UInt16.self, capacity: max(n, 1)) }
    func words(_ n: Int) -> UnsafeMutablePointer<UInt32> { reserve(4 * n).bindMemory(to: UInt32.self, capacity: max(n, 1)) }
}

/// What one layer's backward needs from its forward (one set with checkpointing, one per layer without).
/// Regions are sized for the workspace's largest batch; a smaller batch uses their beginnings.
final class LayerBuffers {
    let x1, rstd1, q, k, v, probs, attn, h2, x2, rstd2, g, u, a: UnsafeMutablePointer<Float>
    /// Per projection: t = drop(x) Aᵀ [N, r], and the dropout mask [N, in] when dropout is on.
    let loraT: [UnsafeMutablePointer<Float>]
    let masks: [UnsafeMutablePointer<UInt8>?]

    init(_ arena: Arena, rows N: Int, pairs: Int, config c: LlamaConfig, rank r: Int, dropout: Bool) {
        let D = c.hiddenSize, qDim = c.headCount * c.headDim, kvDim = c.kvHeadCount * c.headDim, I = c.intermediateSize
        x1 = arena.floats(N * D); rstd1 = arena.floats(N)
        q = arena.floats(N * qDim); k = arena.floats(N * kvDim); v = arena.floats(N * kvDim)
        probs = arena.floats(pairs * c.headCount)
        attn = arena.floats(N * qDim); h2 = arena.floats(N * D); x2 = arena.floats(N * D); rstd2 = arena.floats(N)
        g = arena.floats(N * I); u = arena.floats(N * I); a = arena.floats(N * I)
        loraT = Projection.allCases.map { _ in arena.floats(N * r) }
        masks = Projection.allCases.map { p in
            guard dropout else { return nil }
            let inF = p == .o ? qDim : (p == .down ? I : D)
            return arena.bytes(N * inF)
        }
    }
}

/// One worker's buffers for bf16 attention (one sequence and kv head at a time).
final class AttentionScratch {
    /// Kᵀ (forward) or Vᵀ (backward) packed, all T keys: the B of S = Q Kᵀ and dP = dO Vᵀ.
    let keysT: UnsafeMutablePointer<UInt32>
    /// V or K rows [0, r1) packed (B of O = P V, dQ = dS K); P or dS of a block packed (B of dVᵀ, dKᵀ).
    let rowsPacked, blockPacked: UnsafeMutablePointer<UInt32>
    /// A block of Q or dO rows in bf16; a block of P or dS rows in bf16; a head's Qᵀ and dOᵀ in bf16.
    let small, block, qT, dOT: UnsafeMutablePointer<UInt16>
    /// dVᵀ and dKᵀ [d, T] of the unit, summed over its query heads and blocks, then added into dV and dK.
    let dVT, dKT: UnsafeMutablePointer<Float>

    init(_ arena: Arena, maxT T: Int, headDim d: Int) {
        let pad = BF16Gemm.paddedCount
        keysT = arena.words(BF16Gemm.packedWords(k: d, n: T))
        rowsPacked = arena.words(BF16Gemm.packedWords(k: T, n: d))
        blockPacked = arena.words(BF16Gemm.packedWords(k: T, n: T))
        small = arena.halves(T * pad(d)); block = arena.halves(T * pad(T))
        qT = arena.halves(d * pad(T)); dOT = arena.halves(d * pad(T))
        dVT = arena.floats(d * T); dKT = arena.floats(d * T)
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
    /// dP: one [maxT, maxT] block of attention-score gradients per worker thread.
    let da, dg, du, dx2, dh2, dx1, dAttn, dq, dk, dv, dP, dt, through, dropped, scratch: UnsafeMutablePointer<Float>
    let ropeCos, ropeSin: UnsafeMutablePointer<Float>
    let lossX, logits, lossDx: UnsafeMutablePointer<Float>
    /// bf16 compute: the A operand converted to bf16 rows, and a packed tile of a frozen weight.
    let abf: UnsafeMutablePointer<UInt16>
    let packed: UnsafeMutablePointer<UInt32>
    /// bf16 compute: one per worker thread.
    let attention: [AttentionScratch]
    var lossRows: [(Int, Int)] = []

    /// `rows` = B·T, `pairs` = B·T² (attention probabilities per head), `maxT` the longest sequence.
    init(_ arena: Arena, model: LlamaModel, rank r: Int, dropout: Bool, checkpointing: Bool, bf16: Bool, rows N: Int, pairs: Int, maxT: Int,
         lossChunk: Int) {
        let c = model.config
        let D = c.hiddenSize, qDim = c.headCount * c.headDim, kvDim = c.kvHeadCount * c.headDim, I = c.intermediateSize
        let maxIn = max(D, qDim, I)
        maxRows = N; maxPairs = pairs; self.maxT = maxT
        self.arena = arena
        sets = (0..<(checkpointing ? 1 : c.layerCount)).map { _ in LayerBuffers(arena, rows: N, pairs: pairs, config: c, rank: r, dropout: dropout) }
        hidden = (0...c.layerCount).map { _ in arena.floats(N * D) }
        xf = arena.floats(N * D); rstdf = arena.floats(N); dxf = arena.floats(N * D)
        dh = arena.floats(N * D); dhNext = arena.floats(N * D); proj = arena.floats(N * D)
        da = arena.floats(N * I); dg = arena.floats(N * I); du = arena.floats(N * I)
        dx2 = arena.floats(N * D); dh2 = arena.floats(N * D); dx1 = arena.floats(N * D)
        dAttn = arena.floats(N * qDim); dq = arena.floats(N * qDim); dk = arena.floats(N * kvDim); dv = arena.floats(N * kvDim)
        dP = arena.floats(Parallel.threadCount * maxT * maxT); dt = arena.floats(N * r)
        through = arena.floats(N * maxIn); dropped = arena.floats(N * maxIn)
        let scratchCount = (model.layers.flatMap(\.linears) + [model.head]).map(\.scratchCount).max() ?? 1
        scratch = arena.floats(scratchCount)
        ropeCos = arena.floats(N * c.headDim / 2); ropeSin = arena.floats(N * c.headDim / 2)
        lossX = arena.floats(lossChunk * D); logits = arena.floats(lossChunk * c.vocabSize); lossDx = arena.floats(lossChunk * D)
        if bf16 {
            let pad = BF16Gemm.paddedCount
            let widest = pad(max(D, qDim, kvDim, I))
            abf = arena.halves(max(N * widest, lossChunk * pad(c.vocabSize)))
            let words = (model.layers.flatMap(\.linears) + [model.head]).map { l -> Int in
                let tile = l.tileRows(forRows: .max)
                return max(BF16Gemm.packedWords(k: l.inFeatures, n: tile), BF16Gemm.packedWords(k: tile, n: l.inFeatures))
            }.max() ?? 1
            packed = arena.words(words)
            attention = (0..<Parallel.threadCount).map { _ in AttentionScratch(arena, maxT: maxT, headDim: c.headDim) }
        } else {
            abf = arena.halves(1); packed = arena.words(1); attention = []
        }
        lossRows.reserveCapacity(N)
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
    /// Attention's dimensions: H query heads of d, `group` of them per kv head; q rows are qDim wide, k and v
    /// rows kvDim; scores are scaled by 1/√d.
    var headLayout: (H: Int, d: Int, group: Int, qDim: Int, kvDim: Int, scale: Float) {
        let c = model.config
        return (c.headCount, c.headDim, c.headCount / c.kvHeadCount, c.headCount * c.headDim, c.kvHeadCount * c.headDim,
                1 / Float(c.headDim).squareRoot())
    }

    /// Query rows per attention block (`TrainingOptions.attentionRowBlock`, or 64).
    var attentionBlock: Int { max(1, options.attentionRowBlock ?? 64) }

    /// Rows per chunk of the loss (`TrainingOptions.lossChunkRows`, or the automatic choice).
    var lossChunkRows: Int {
        if let rows = options.lossChunkRows { return max(1, rows) }
        return min(512, max(64, (96 << 20) / (6 * max(model.config.vocabSize, 1))))
    }

    /// Whether the frozen products run in bf16 (asked for, and the CPU has AVX512-BF16).
    public var usesBF16: Bool { options.computeDType == .bf16 && BF16Gemm.isSupported }

    public init(model: LlamaModel, lora: LoRAWeights, options: TrainingOptions = TrainingOptions(), kernels: KernelTable = .current) {
        self.model = model
        self.lora = lora
        self.options = options
        self.kernels = kernels
        inverseFrequencies = model.config.ropeInverseFrequencies()
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
        let make = { (arena: Arena) in
            StepWorkspace(arena, model: self.model, rank: self.lora.config.rank, dropout: dropout, checkpointing: self.options.gradientCheckpointing,
                          bf16: self.usesBF16, rows: N, pairs: P, maxT: T, lossChunk: self.lossChunkRows)
        }
        let measuring = Arena(measuring: ())
        _ = make(measuring)
        let w = make(Arena(byteCount: measuring.byteCount))
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

    /// An f32 product of the step, split over our threads (BLAS is single-threaded inside a step).
    func mm(_ c: UnsafeMutablePointer<Float>, ldc: Int, _ a: UnsafePointer<Float>, lda: Int, _ b: UnsafePointer<Float>, ldb: Int,
            m: Int, n: Int, k: Int, transposeA: Bool = false, transposeB: Bool = false, alpha: Float = 1, beta: Float = 0) {
        Gemm.parallelGemm(c, ldc: ldc, a, lda: lda, b, ldb: ldb, m: m, n: n, k: k, transposeA: transposeA, transposeB: transposeB,
                          alpha: alpha, beta: beta)
    }

    /// Calls body(worker, unit) for each (sequence, kv head) unit on our threads. A unit owns its rows of
    /// dK and dV, so units never write the same memory.
    func forEachKVHead(_ s: Shape, _ body: (_ worker: Int, _ b: Int, _ kvh: Int) -> Void) {
        let hkv = model.config.kvHeadCount
        Parallel.forChunks(count: s.B * hkv) { w, range in for u in range { body(w, u / hkv, u % hkv) } }
    }

    func stepBody(_ batch: TrainingBatch, backward: Bool, gradientScale: Float) throws -> Double {
        let c = model.config
        let B = batch.batchSize, T = batch.sequenceLength, N = B * T, D = c.hiddenSize, L = c.layerCount
        for t in batch.tokens where t < 0 || t >= c.vocabSize { throw ForwardError.tokenOutOfRange(token: t, vocab: c.vocabSize) }
        let count = batch.targetCount
        guard count > 0 else { return 0 }
        let ws = workspace(rows: N, pairs: B * T * T, maxT: T)
        for (i, token) in batch.tokens.enumerated() { model.embeddings.copyRow(token, into: ws.hidden[0] + i * D) }
        // RoPE tables for each token's position in its example.
        let half = c.headDim / 2
        for i in 0..<N {
            let position = Float(batch.position(of: i))
            for j in 0..<half {
                let angle = position * inverseFrequencies[j]
                ws.ropeCos[i * half + j] = cosf(angle)
                ws.ropeSin[i * half + j] = sinf(angle)
            }
        }
        let shape = Shape(B: B, T: T, windowStart: batch.segmentStarts)
        for l in 0..<L {
            layerForward(l, ws.sets[options.gradientCheckpointing ? 0 : l], ws, shape, h: ws.hidden[l], out: ws.hidden[l + 1])
        }
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
        for l in stride(from: L - 1, through: 0, by: -1) {
            let act = ws.sets[options.gradientCheckpointing ? 0 : l]
            if options.gradientCheckpointing {
                // Recompute (same dropout masks: seeded by step and layer); the layer's output is not needed.
                layerForward(l, act, ws, shape, h: ws.hidden[l], out: nil)
            }
            layerBackward(l, act, ws, shape, h: ws.hidden[l], dOut: dh, dIn: dhNext)
            swap(&dh, &dhNext)
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

    /// Writes the layer's output into `out`. `out == nil`: the backward pass's rerun under checkpointing,
    /// which needs every activation but not the output, so down_proj's frozen product (a quarter of the
    /// layer's weights) is skipped.
    func layerForward(_ l: Int, _ act: LayerBuffers, _ ws: StepWorkspace, _ s: Shape, h: UnsafeMutablePointer<Float>, out: UnsafeMutablePointer<Float>?) {
        let layer = model.layers[l]
        let c = model.config
        let N = s.N, D = c.hiddenSize, I = c.intermediateSize
        rmsNorm(act.x1, act.rstd1, h, layer.inputNorm, rows: N)
        var xb = bf16Operand(ws, act.x1, rows: N, cols: D)  // q, k and v read the same converted x1
        linearForward(act, ws, layer: l, .q, rows: N, input: act.x1, inputBF16: xb, output: act.q)
        linearForward(act, ws, layer: l, .k, rows: N, input: act.x1, inputBF16: xb, output: act.k)
        linearForward(act, ws, layer: l, .v, rows: N, input: act.x1, inputBF16: xb, output: act.v)
        Ops.rope(act.q, rows: N, heads: c.headCount, headDim: c.headDim, cos: ws.ropeCos, sin: ws.ropeSin)
        Ops.rope(act.k, rows: N, heads: c.kvHeadCount, headDim: c.headDim, cos: ws.ropeCos, sin: ws.ropeSin)
        attentionForward(act, ws, s)
        let o = ws.proj
        xb = bf16Operand(ws, act.attn, rows: N, cols: c.headCount * c.headDim)
        linearForward(act, ws, layer: l, .o, rows: N, input: act.attn, inputBF16: xb, output: o)
        Self.elementwise(N * D) { r in for i in r { act.h2[i] = h[i] + o[i] } }
        rmsNorm(act.x2, act.rstd2, act.h2, layer.postAttentionNorm, rows: N)
        xb = bf16Operand(ws, act.x2, rows: N, cols: D)
        linearForward(act, ws, layer: l, .gate, rows: N, input: act.x2, inputBF16: xb, output: act.g)
        linearForward(act, ws, layer: l, .up, rows: N, input: act.x2, inputBF16: xb, output: act.u)
        Ops.swigluForward(act.a, gate: act.g, up: act.u, count: N * I)
        let d = ws.proj
        xb = out == nil ? nil : bf16Operand(ws, act.a, rows: N, cols: I)
        linearForward(act, ws, layer: l, .down, rows: N, input: act.a, inputBF16: xb, output: d, skipBase: out == nil)
        if let out { Self.elementwise(N * D) { r in for i in r { out[i] = act.h2[i] + d[i] } } }
    }

    /// Causal attention per sequence and head (GQA: query head h reads kv head h / (H / Hkv)); in a
    /// packed row each query sees only the keys of its own example.
    func attentionForward(_ act: LayerBuffers, _ ws: StepWorkspace, _ s: Shape) {
        if usesBF16 { return attentionForwardBF16(act, ws, s) }
        let T = s.T, blockRows = attentionBlock
        let (H, d, group, qDim, kvDim, scale) = headLayout
        forEachKVHead(s) { _, b, kvh in
            for h in (kvh * group)..<((kvh + 1) * group) {
                let P = act.probs + (b * H + h) * T * T
                let Q = act.q + b * T * qDim + h * d
                let K = act.k + b * T * kvDim + kvh * d
                let V = act.v + b * T * kvDim + kvh * d
                for r0 in stride(from: 0, to: T, by: blockRows) {
                    let r1 = min(T, r0 + blockRows)
                    Gemm.gemm(P + r0 * T, ldc: T, Q + r0 * qDim, lda: qDim, K, ldb: kvDim, m: r1 - r0, n: r1, k: d, transposeB: true, alpha: scale)
                    softmaxRows(P, r0..<r1, sequence: b, s)
                    Gemm.gemm(act.attn + b * T * qDim + (r0 * qDim) + h * d, ldc: qDim, P + r0 * T, lda: T, V, ldb: kvDim, m: r1 - r0, n: d, k: r1)
                }
            }
        }
    }

    /// Softmax in place over rows `rows` of one head's scores P [T, T] (sequence b): each row over the keys of
    /// its own example up to itself; the rest of the row, up to T, becomes 0.
    func softmaxRows(_ P: UnsafeMutablePointer<Float>, _ rows: Range<Int>, sequence b: Int, _ s: Shape) {
        let T = s.T
        for t in rows {
            let start = s.windowStart?[b * T + t] ?? 0
            for j in 0..<start { P[t * T + j] = 0 }
            Ops.softmaxRow(P + t * T + start, visible: t + 1 - start, length: T - start)
        }
    }

    /// Rows `rows` of S [T, T] from dP (in S) to dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale, over the keys of
    /// the block (0..<rows.upperBound); keys after a row's own position become 0.
    func scoreGradientRows(_ S: UnsafeMutablePointer<Float>, _ P: UnsafePointer<Float>, _ rows: Range<Int>, T: Int, scale: Float) {
        for t in rows {
            let prow = P + t * T, srow = S + t * T
            var dot: Float = 0
            for j in 0...t { dot += prow[j] * srow[j] }
            for j in 0...t { srow[j] = prow[j] * (srow[j] - dot) * scale }
            for j in (t + 1)..<rows.upperBound { srow[j] = 0 }
        }
    }

    /// The same computation with bf16 products (f32 softmax). Per (sequence, kv head): Kᵀ packed once; per
    /// block of query rows, V's visible rows packed once for the group's query heads.
    func attentionForwardBF16(_ act: LayerBuffers, _ ws: StepWorkspace, _ s: Shape) {
        let T = s.T, blockRows = attentionBlock
        let (H, d, group, qDim, kvDim, scale) = headLayout
        let pad = BF16Gemm.paddedCount
        forEachKVHead(s) { worker, b, kvh in
            let sc = ws.attention[worker]
            let K = act.k + b * T * kvDim + kvh * d
            let V = act.v + b * T * kvDim + kvh * d
            BF16Gemm.packB(K, ldb: kvDim, transposed: true, k: d, n: T, into: sc.keysT, parallel: false)
            for r0 in stride(from: 0, to: T, by: blockRows) {
                let r1 = min(T, r0 + blockRows), rows = r1 - r0
                BF16Gemm.packB(V, ldb: kvDim, transposed: false, k: r1, n: d, into: sc.rowsPacked, parallel: false)
                for h in (kvh * group)..<((kvh + 1) * group) {
                    let P = act.probs + (b * H + h) * T * T
                    let Q = act.q + b * T * qDim + h * d
                    BF16Gemm.convert(Q + r0 * qDim, rows: rows, cols: d, ld: qDim, into: sc.small, ldd: pad(d), parallel: false)
                    BF16Gemm.gemm(P + r0 * T, ldc: T, sc.small, lda: pad(d), sc.keysT, m: rows, n: r1, k: d, alpha: scale,
                                  accumulate: false, parallel: false)
                    softmaxRows(P, r0..<r1, sequence: b, s)
                    BF16Gemm.convert(P + r0 * T, rows: rows, cols: r1, ld: T, into: sc.block, ldd: pad(r1), parallel: false)
                    BF16Gemm.gemm(act.attn + b * T * qDim + r0 * qDim + h * d, ldc: qDim, sc.block, lda: pad(r1), sc.rowsPacked,
                                  m: rows, n: d, k: r1, accumulate: false, parallel: false)
                }
            }
        }
    }

    // MARK: - Layer backward

    /// Given dOut = dL/d(layer output), writes dL/d(layer input) into dIn and adds the LoRA gradients.
    func layerBackward(_ l: Int, _ act: LayerBuffers, _ ws: StepWorkspace, _ s: Shape, h: UnsafeMutablePointer<Float>,
                       dOut: UnsafeMutablePointer<Float>, dIn: UnsafeMutablePointer<Float>) {
        let layer = model.layers[l]
        let c = model.config
        let N = s.N, D = c.hiddenSize, I = c.intermediateSize
        let qDim = c.headCount * c.headDim, kvDim = c.kvHeadCount * c.headDim
        // h3 = h2 + down(a)
        ws.da.update(repeating: 0, count: N * I)
        linearBackward(act, ws, layer: l, .down, rows: N, dy: dOut, input: act.a, dx: ws.da)
        Ops.swigluBackward(dGate: ws.dg, dUp: ws.du, ws.da, gate: act.g, up: act.u, count: N * I)
        ws.dx2.update(repeating: 0, count: N * D)
        linearBackward(act, ws, layer: l, .gate, rows: N, dy: ws.dg, input: act.x2, dx: ws.dx2)
        linearBackward(act, ws, layer: l, .up, rows: N, dy: ws.du, input: act.x2, dx: ws.dx2)
        ws.dh2.update(from: dOut, count: N * D)  // residual
        normBackward(ws.dh2, ws.dx2, act.h2, act.rstd2, layer.postAttentionNorm, rows: N)
        // h2 = h + o(attn)
        ws.dAttn.update(repeating: 0, count: N * qDim)
        linearBackward(act, ws, layer: l, .o, rows: N, dy: ws.dh2, input: act.attn, dx: ws.dAttn)
        ws.dk.update(repeating: 0, count: N * kvDim)
        ws.dv.update(repeating: 0, count: N * kvDim)
        attentionBackward(act, ws, s)
        Ops.rope(ws.dq, rows: N, heads: c.headCount, headDim: c.headDim, cos: ws.ropeCos, sin: ws.ropeSin, inverse: true)
        Ops.rope(ws.dk, rows: N, heads: c.kvHeadCount, headDim: c.headDim, cos: ws.ropeCos, sin: ws.ropeSin, inverse: true)
        ws.dx1.update(repeating: 0, count: N * D)
        linearBackward(act, ws, layer: l, .q, rows: N, dy: ws.dq, input: act.x1, dx: ws.dx1)
        linearBackward(act, ws, layer: l, .k, rows: N, dy: ws.dk, input: act.x1, dx: ws.dx1)
        linearBackward(act, ws, layer: l, .v, rows: N, dy: ws.dv, input: act.x1, dx: ws.dx1)
        dIn.update(from: ws.dh2, count: N * D)  // residual
        normBackward(dIn, ws.dx1, h, act.rstd1, layer.inputNorm, rows: N)
    }

    /// dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale, dQ = dS K, dK += dSᵀ Q, dV += Pᵀ dO, per sequence and head,
    /// in the same row blocks as the forward (a block of rows touches only the keys before its end).
    /// (Probabilities outside a query's window are 0, so its row of dS is 0 there too.)
    func attentionBackward(_ act: LayerBuffers, _ ws: StepWorkspace, _ s: Shape) {
        if usesBF16 { return attentionBackwardBF16(act, ws, s) }
        let T = s.T, blockRows = attentionBlock
        let (H, d, group, qDim, kvDim, scale) = headLayout
        forEachKVHead(s) { worker, b, kvh in
            let S = ws.dP + worker * T * T
            for h in (kvh * group)..<((kvh + 1) * group) {
                let P = act.probs + (b * H + h) * T * T
                let qOff = b * T * qDim + h * d, kvOff = b * T * kvDim + kvh * d
                for r0 in stride(from: 0, to: T, by: blockRows) {
                    let r1 = min(T, r0 + blockRows), rows = r1 - r0
                    let dO = ws.dAttn + qOff + r0 * qDim
                    // dP = dO Vᵀ   [rows, r1]
                    Gemm.gemm(S + r0 * T, ldc: T, dO, lda: qDim, act.v + kvOff, ldb: kvDim, m: rows, n: r1, k: d, transposeB: true)
                    // dV[0..<r1] += Pᵀ dO
                    Gemm.gemm(ws.dv + kvOff, ldc: kvDim, P + r0 * T, lda: T, dO, ldb: qDim, m: r1, n: d, k: rows, transposeA: true, beta: 1)
                    scoreGradientRows(S, P, r0..<r1, T: T, scale: scale)
                    // dQ[r0..<r1] = dS K ; dK[0..<r1] += dSᵀ Q[r0..<r1]
                    Gemm.gemm(ws.dq + qOff + r0 * qDim, ldc: qDim, S + r0 * T, lda: T, act.k + kvOff, ldb: kvDim, m: rows, n: d, k: r1)
                    Gemm.gemm(ws.dk + kvOff, ldc: kvDim, S + r0 * T, lda: T, act.q + qOff + r0 * qDim, ldb: qDim, m: r1, n: d, k: rows,
                              transposeA: true, beta: 1)
                }
            }
        }
    }

    /// The same computation with bf16 products. dVᵀ and dKᵀ are formed ([d, T], A = dOᵀ or Qᵀ, which are
    /// small) and added transposed into dV and dK once per unit, so no T x T matrix is ever transposed.
    func attentionBackwardBF16(_ act: LayerBuffers, _ ws: StepWorkspace, _ s: Shape) {
        let T = s.T, blockRows = attentionBlock
        let (H, d, group, qDim, kvDim, scale) = headLayout
        let pad = BF16Gemm.paddedCount
        forEachKVHead(s) { worker, b, kvh in
            let sc = ws.attention[worker]
            let S = ws.dP + worker * T * T
            let kvOff = b * T * kvDim + kvh * d
            BF16Gemm.packB(act.v + kvOff, ldb: kvDim, transposed: true, k: d, n: T, into: sc.keysT, parallel: false)
            sc.dVT.update(repeating: 0, count: d * T)
            sc.dKT.update(repeating: 0, count: d * T)
            for h in (kvh * group)..<((kvh + 1) * group) {
                let P = act.probs + (b * H + h) * T * T
                let qOff = b * T * qDim + h * d
                BF16Gemm.convertTransposed(ws.dAttn + qOff, rows: T, cols: d, ld: qDim, into: sc.dOT, ldd: pad(T))
                BF16Gemm.convertTransposed(act.q + qOff, rows: T, cols: d, ld: qDim, into: sc.qT, ldd: pad(T))
                for r0 in stride(from: 0, to: T, by: blockRows) {
                    let r1 = min(T, r0 + blockRows), rows = r1 - r0
                    // dP = dO Vᵀ   [rows, r1]
                    BF16Gemm.convert(ws.dAttn + qOff + r0 * qDim, rows: rows, cols: d, ld: qDim, into: sc.small, ldd: pad(d), parallel: false)
                    BF16Gemm.gemm(S + r0 * T, ldc: T, sc.small, lda: pad(d), sc.keysT, m: rows, n: r1, k: d, accumulate: false, parallel: false)
                    // dVᵀ[:, 0..<r1] += dOᵀ[:, r0..<r1] P[r0..<r1, 0..<r1]
                    BF16Gemm.packB(P + r0 * T, ldb: T, transposed: false, k: rows, n: r1, into: sc.blockPacked, parallel: false)
                    BF16Gemm.gemm(sc.dVT, ldc: T, sc.dOT + r0, lda: pad(T), sc.blockPacked, m: d, n: r1, k: rows, accumulate: true, parallel: false)
                    scoreGradientRows(S, P, r0..<r1, T: T, scale: scale)
                    // dQ[r0..<r1] = dS K[0..<r1]
                    BF16Gemm.convert(S + r0 * T, rows: rows, cols: r1, ld: T, into: sc.block, ldd: pad(r1), parallel: false)
                    BF16Gemm.packB(act.k + kvOff, ldb: kvDim, transposed: false, k: r1, n: d, into: sc.rowsPacked, parallel: false)
                    BF16Gemm.gemm(ws.dq + qOff + r0 * qDim, ldc: qDim, sc.block, lda: pad(r1), sc.rowsPacked, m: rows, n: d, k: r1,
                                  accumulate: false, parallel: false)
                    // dKᵀ[:, 0..<r1] += Qᵀ[:, r0..<r1] dS
                    BF16Gemm.packB(S + r0 * T, ldb: T, transposed: false, k: rows, n: r1, into: sc.blockPacked, parallel: false)
                    BF16Gemm.gemm(sc.dKT, ldc: T, sc.qT + r0, lda: pad(T), sc.blockPacked, m: d, n: r1, k: rows, accumulate: true, parallel: false)
                }
            }
            let dV = ws.dv + kvOff, dK = ws.dk + kvOff
            for j in 0..<T {
                for e in 0..<d {
                    dV[j * kvDim + e] += sc.dVT[e * T + j]
                    dK[j * kvDim + e] += sc.dKT[e * T + j]
                }
            }
        }
    }

    // MARK: - Linear with LoRA

    /// An elementwise loop over 0..<count, split over our threads (each element written by one thread).
    static func elementwise(_ count: Int, _ body: (Range<Int>) -> Void) {
        Parallel.forChunks(count: count, granularity: 64, minimumChunk: 1 << 15) { _, r in body(r) }
    }

    /// Rows of a dropout mask drawn from one generator.
    static let dropoutBlockRows = 16

    /// Whether LoRA dropout applies now.
    var dropoutActive: Bool { training && lora.config.dropout > 0 }

    /// y = x Wᵀ (+ b) + s · (drop(x) Aᵀ) Bᵀ; keeps t = drop(x) Aᵀ and the dropout mask for the backward.
    /// `inputBF16`: x already converted by `bf16Operand` (bf16 compute), else nil.
    func linearForward(_ act: LayerBuffers, _ ws: StepWorkspace, layer l: Int, _ p: Projection, rows N: Int,
                       input x: UnsafeMutablePointer<Float>, inputBF16 xb: UnsafePointer<UInt16>?, output y: UnsafeMutablePointer<Float>,
                       skipBase: Bool = false) {
        if !skipBase {
            // The frozen product only: training adapters come from `lora`; an adapter attached to the layer for
            // inference (Linear.lora) is never applied here.
            frozenForward(p.linear(in: model.layers[l]), x, xb, rows: N, into: y, ws)
        }
        guard let slot = lora.slot(layer: l, projection: p) else { return }
        let r = lora.config.rank, inF = slot.inFeatures, outF = slot.outFeatures
        var input = UnsafePointer(x)
        if dropoutActive, let mask = act.masks[p.rawValue] {
            // Seeded by step, layer, projection and block of rows: a recomputed layer (checkpointing) draws
            // the same mask, and the blocks are drawn in parallel with the same result on any thread count.
            let seed = lora.config.seed &+ 0x9E37_79B9 &* (stepCounter &+ 1) &+ UInt64(l * 16 + p.rawValue) &* 0x1000_0001
            let dropout = lora.config.dropout, keep = 1 / (1 - dropout)
            // Each 64-bit draw gives four 16-bit uniforms u; an element is dropped when u < ⌈p · 2¹⁶⌉, i.e.
            // with probability p rounded up to a multiple of 2⁻¹⁶ (0.05 -> 0.050003). Each block of rows draws
            // from its own SplitMix64 stream (`KernelTable.dropout`, vectorized), started from the block's seed.
            let threshold = UInt32((Double(dropout) * 65_536).rounded(.up))
            let dropped = ws.dropped
            let blockRows = Self.dropoutBlockRows
            let draw = kernels.dropout
            Parallel.forChunks(count: N, granularity: blockRows) { _, range in
                for r0 in stride(from: range.lowerBound, to: range.upperBound, by: blockRows) {
                    var rng = SeededGenerator(seed: seed &+ UInt64(r0 / blockRows) &* 0xD1B5_4A32_D192_ED03)
                    let start = r0 * inF, end = min(range.upperBound, r0 + blockRows) * inF
                    draw(x + start, mask + start, dropped + start, end - start, rng.next(), threshold, keep)
                }
            }
            input = UnsafePointer(ws.dropped)
        }
        let t = act.loraT[p.rawValue]
        lora.parameters.withUnsafeBufferPointer { params in
            mm(t, ldc: r, input, lda: inF, params.baseAddress! + slot.aOffset, ldb: inF, m: N, n: r, k: inF, transposeB: true)
            mm(y, ldc: outF, t, lda: r, params.baseAddress! + slot.bOffset, ldb: r, m: N, n: outF, k: r, transposeB: true,
                      alpha: lora.config.scale, beta: 1)
        }
    }

    /// dx += dy W (frozen: no weight gradient) + s · (dy B) A ⊙ dropout; dB += s · dyᵀ t; dA += (s · dy B)ᵀ drop(x).
    func linearBackward(_ act: LayerBuffers, _ ws: StepWorkspace, layer l: Int, _ p: Projection, rows N: Int,
                        dy: UnsafeMutablePointer<Float>, input x: UnsafeMutablePointer<Float>, dx: UnsafeMutablePointer<Float>) {
        let linear = p.linear(in: model.layers[l])
        frozenInputGradient(linear, dy, rows: N, into: dx, ws)
        guard let slot = lora.slot(layer: l, projection: p) else { return }
        let r = lora.config.rank, s = lora.config.scale, inF = slot.inFeatures, outF = slot.outFeatures
        let t = act.loraT[p.rawValue]
        var mask: UnsafeMutablePointer<UInt8>?
        var input = UnsafePointer(x)
        let keep = 1 / (1 - lora.config.dropout)
        if dropoutActive, let m = act.masks[p.rawValue] {
            // drop(x) again from x and the kept mask.
            let dropped = ws.dropped
            // As the dropout kernel wrote it: x · keep where kept, +0 where dropped (whatever x holds).
            Self.elementwise(N * inF) { r in for i in r { dropped[i] = m[i] != 0 ? x[i] * keep : 0 } }
            input = UnsafePointer(ws.dropped)
            mask = m
        }
        let dt = ws.dt
        lora.parameters.withUnsafeBufferPointer { params in
            lora.gradients.withUnsafeMutableBufferPointer { grads in
                // dB += s · dyᵀ t   [out, r]
                mm(grads.baseAddress! + slot.bOffset, ldc: r, dy, lda: outF, t, ldb: r, m: outF, n: r, k: N, transposeA: true, alpha: s, beta: 1)
                // dt = s · dy B   [N, r]
                mm(dt, ldc: r, dy, lda: outF, params.baseAddress! + slot.bOffset, ldb: r, m: N, n: r, k: outF, alpha: s)
                // dA += dtᵀ drop(x)   [r, in]
                mm(grads.baseAddress! + slot.aOffset, ldc: inF, dt, lda: r, input, ldb: inF, m: r, n: inF, k: N, transposeA: true, beta: 1)
                // dx += (dt A) ⊙ dropout mask / (1 − p)
                if let mask {
                    let through = ws.through
                    mm(through, ldc: inF, dt, lda: r, params.baseAddress! + slot.aOffset, ldb: inF, m: N, n: inF, k: r)
                    Self.elementwise(N * inF) { r in for i in r { dx[i] += through[i] * (Float(mask[i]) * keep) } }
                } else {
                    mm(dx, ldc: inF, dt, lda: r, params.baseAddress! + slot.aOffset, ldb: inF, m: N, n: inF, k: r, beta: 1)
                }
            }
        }
    }

    // MARK: - Frozen products

    /// y = x Wᵀ (+ b) for a frozen W [out, in]. bf16 compute: `xb` is x already converted by `bf16Operand`
    /// (shared by the products that read the same x), and each tile of W is packed for the bf16 GEMM.
    func frozenForward(_ linear: Linear, _ x: UnsafePointer<Float>, _ xb: UnsafePointer<UInt16>?, rows N: Int,
                       into y: UnsafeMutablePointer<Float>, _ ws: StepWorkspace) {
        let inF = linear.inFeatures, outF = linear.outFeatures
        linear.forEachTile(forRows: N, scratch: ws.scratch, kernels: kernels) { rows, w in
            if let xb {
                BF16Gemm.packB(w, ldb: inF, transposed: true, k: inF, n: rows.count, into: ws.packed)
                BF16Gemm.gemm(y + rows.lowerBound, ldc: outF, xb, lda: BF16Gemm.paddedCount(inF), ws.packed, m: N, n: rows.count, k: inF,
                              accumulate: false)
            } else {
                mm(y + rows.lowerBound, ldc: outF, x, lda: inF, w, ldb: inF, m: N, n: rows.count, k: inF, transposeB: true)
            }
        }
        linear.addBias(to: y, rows: N)
    }

    /// dx += dy · W for a frozen W [out, in] (no weight gradient): each tile of W's rows is a slice of the
    /// sum over out. bf16 compute converts dy once.
    func frozenInputGradient(_ linear: Linear, _ dy: UnsafePointer<Float>, rows N: Int, into dx: UnsafeMutablePointer<Float>,
                             _ ws: StepWorkspace) {
        let inF = linear.inFeatures, outF = linear.outFeatures
        let dyb = bf16Operand(ws, dy, rows: N, cols: outF)
        linear.forEachTile(forRows: N, scratch: ws.scratch, kernels: kernels) { rows, w in
            if let dyb {
                BF16Gemm.packB(w, ldb: inF, transposed: false, k: rows.count, n: inF, into: ws.packed)
                BF16Gemm.gemm(dx, ldc: inF, dyb + rows.lowerBound, lda: BF16Gemm.paddedCount(outF), ws.packed, m: N, n: inF, k: rows.count,
                              accumulate: true)
            } else {
                mm(dx, ldc: inF, dy + rows.lowerBound, lda: outF, w, ldb: inF, m: N, n: inF, k: rows.count, beta: 1)
            }
        }
    }

    /// x [rows, cols] converted to bf16 rows in ws.abf (bf16 compute), or nil (f32 compute). The result
    /// lives until the next conversion.
    func bf16Operand(_ ws: StepWorkspace, _ x: UnsafePointer<Float>, rows: Int, cols: Int) -> UnsafePointer<UInt16>? {
        guard usesBF16 else { return nil }
        BF16Gemm.convert(x, rows: rows, cols: cols, ld: cols, into: ws.abf, ldd: BF16Gemm.paddedCount(cols))
        return UnsafePointer(ws.abf)
    }

    // MARK: - Norms and loss

    func rmsNorm(_ y: UnsafeMutablePointer<Float>, _ rstd: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, _ w: [Float], rows: Int) {
        let D = model.config.hiddenSize, eps = model.config.rmsNormEps
        w.withUnsafeBufferPointer { wp in Ops.rmsNormForward(y, rstd: rstd, x, weight: wp.baseAddress!, rows: rows, dim: D, eps: eps) }
    }

    /// dx += RMSNorm backward of dy.
    func normBackward(_ dx: UnsafeMutablePointer<Float>, _ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>, _ rstd: UnsafePointer<Float>,
                      _ w: [Float], rows: Int) {
        let D = model.config.hiddenSize
        w.withUnsafeBufferPointer { wp in Ops.rmsNormBackward(dx, dy, x, rstd: rstd, weight: wp.baseAddress!, rows: rows, dim: D) }
    }

    /// Mean cross-entropy over counted targets, computed `lossChunkRows` rows at a time; writes
    /// dL/dxf (times `scale`) into ws.dxf.
    func crossEntropy(_ ws: StepWorkspace, batch: TrainingBatch, count: Int, scale: Float, wantGradient: Bool) -> Double {
        let c = model.config
        let V = c.vocabSize, D = c.hiddenSize
        let N = batch.batchSize * batch.sequenceLength
        // Rows whose target counts: row i = (b, t) predicts labels[b, t + 1].
        ws.lossRows.removeAll(keepingCapacity: true)
        for i in 0..<N { if let target = batch.target(of: i) { ws.lossRows.append((i, target)) } }
        let rows = ws.lossRows
        let chunk = lossChunkRows
        var total = 0.0
        let inv = Float(1) / Float(count)
        let x = ws.lossX, logits = ws.logits, dx = ws.lossDx
        // The frozen head (lm_head or the tied embedding; f32 or bf16 tiles): logits = x Hᵀ, dx = dlogits H.
        let head = model.head
        var start = 0
        while start < rows.count {
            let n = min(chunk, rows.count - start)
            for k in 0..<n { (x + k * D).update(from: ws.xf + rows[start + k].0 * D, count: D) }
            frozenForward(head, x, bf16Operand(ws, x, rows: n, cols: D), rows: n, into: logits, ws)
            for k in 0..<n {
                total += Ops.crossEntropyRow(logits + k * V, vocab: V, target: rows[start + k].1, scale: inv * scale)
            }
            if wantGradient {
                dx.update(repeating: 0, count: n * D)
                frozenInputGradient(head, logits, rows: n, into: dx, ws)
                for k in 0..<n {
                    let row = ws.dxf + rows[start + k].0 * D
                    for j in 0..<D { row[j] += dx[k * D + j] }
                }
            }
            start += n
        }
        return total / Double(count)
    }
}
