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

    /// RoPE position of every token: its index in its example.
    public var positions: [Int] {
        (0..<tokens.count).map { $0 % sequenceLength - (segmentStarts?[$0] ?? 0) }
    }
}

/// Activations of one layer that its backward needs.
final class LayerActivations {
    let N: Int, D: Int, qDim: Int, kvDim: Int, I: Int, r: Int, B: Int, T: Int, H: Int
    var h: [Float]          // [N, D] layer input
    var x1: [Float]         // [N, D] input_layernorm(h)
    var rstd1: [Float]      // [N]
    var q: [Float]          // [N, qDim] after RoPE
    var k: [Float]          // [N, kvDim] after RoPE
    var v: [Float]          // [N, kvDim]
    var probs: [Float]      // [B, H, T, T] attention probabilities
    var attn: [Float]       // [N, qDim] attention output (o_proj input)
    var h2: [Float]         // [N, D] h + o
    var x2: [Float]         // [N, D] post_attention_layernorm(h2)
    var rstd2: [Float]      // [N]
    var g: [Float]          // [N, I] gate_proj
    var u: [Float]          // [N, I] up_proj
    var a: [Float]          // [N, I] silu(g) ⊙ u (down_proj input)
    var out: [Float]        // [N, D] layer output h2 + down(a)
    var windowStart: [Int]? // [N] first key each query may see (packed rows); nil: 0
    /// Per projection: the LoRA input after dropout [N, in] (only when dropout > 0) and t = x Aᵀ [N, r].
    var loraInput: [[Float]?]
    var loraMask: [[UInt8]?]
    var loraT: [[Float]]

    init(N: Int, D: Int, qDim: Int, kvDim: Int, I: Int, r: Int, B: Int, T: Int, H: Int, windowStart: [Int]? = nil) {
        self.N = N; self.D = D; self.qDim = qDim; self.kvDim = kvDim; self.I = I; self.r = r
        self.windowStart = windowStart
        self.B = B; self.T = T; self.H = H
        h = [Float](repeating: 0, count: N * D); x1 = h; h2 = h; x2 = h
        rstd1 = [Float](repeating: 0, count: N); rstd2 = rstd1
        q = [Float](repeating: 0, count: N * qDim); attn = q
        k = [Float](repeating: 0, count: N * kvDim); v = k
        probs = [Float](repeating: 0, count: B * H * T * T)
        g = [Float](repeating: 0, count: N * I); u = g; a = g
        out = h
        loraInput = Array(repeating: nil, count: Projection.allCases.count)
        loraMask = Array(repeating: nil, count: Projection.allCases.count)
        loraT = Array(repeating: [], count: Projection.allCases.count)
    }
}

public struct TrainingOptions: Sendable {
    /// Keep only each layer's input and recompute the layer in the backward pass (the default).
    public var gradientCheckpointing = true
    /// Rows of logits computed at once in the loss (the [N, V] logits never exist whole).
    public var lossChunkRows = 64

    public init() {}
}

/// The frozen model, its LoRA adapters and the step computation.
public final class TrainingEngine {
    public let model: LlamaModel
    public let lora: LoRAWeights
    public var options: TrainingOptions
    /// Counts steps, so that dropout masks differ per step but are the same when a layer is recomputed.
    public var stepCounter: UInt64 = 0
    /// Off for evaluation (no dropout).
    public var training = true
    let kernels: KernelTable

    public init(model: LlamaModel, lora: LoRAWeights, options: TrainingOptions = TrainingOptions(), kernels: KernelTable = .current) {
        self.model = model
        self.lora = lora
        self.options = options
        self.kernels = kernels
    }

    // MARK: - Step

    /// Loss (mean over counted targets) and, when `backward`, the LoRA gradients added to
    /// `lora.gradients` scaled by `gradientScale` (1 / micro-batches for accumulation).
    @discardableResult
    public func step(_ batch: TrainingBatch, backward: Bool = true, gradientScale: Float = 1) throws -> Double {
        let c = model.config
        let N = batch.batchSize * batch.sequenceLength, D = c.hiddenSize
        for t in batch.tokens where t < 0 || t >= c.vocabSize { throw ForwardError.tokenOutOfRange(token: t, vocab: c.vocabSize) }
        let count = batch.targetCount
        guard count > 0 else { return 0 }
        var h = [Float](repeating: 0, count: N * D)
        for (i, token) in batch.tokens.enumerated() {
            for j in 0..<D { h[i * D + j] = model.embedding[token * D + j] }
        }
        let rope = Ops.ropeTables(positions: batch.positions, inverseFrequencies: c.ropeInverseFrequencies())
        // Forward, keeping each layer's input (checkpointing) or all activations.
        var inputs: [[Float]] = []
        var stored: [LayerActivations] = []
        for l in 0..<c.layerCount {
            let act = makeActivations(batch)
            act.h = h
            layerForward(l, act, rope: rope)
            if options.gradientCheckpointing { inputs.append(h) } else { stored.append(act) }
            h = act.out
        }
        // Final norm and chunked cross-entropy; dh is the gradient of the loss w.r.t. the last hidden state.
        var xf = [Float](repeating: 0, count: N * D)
        var rstdf = [Float](repeating: 0, count: N)
        rmsNorm(&xf, &rstdf, h, model.finalNorm, rows: N)
        var dxf = [Float](repeating: 0, count: N * D)
        let loss = crossEntropy(xf, batch: batch, count: count, dxf: &dxf, scale: gradientScale, wantGradient: backward)
        guard backward else { return loss }
        var dh = [Float](repeating: 0, count: N * D)
        dh.withUnsafeMutableBufferPointer { dhp in
            dxf.withUnsafeBufferPointer { d in
                h.withUnsafeBufferPointer { x in
                    rstdf.withUnsafeBufferPointer { rs in
                        model.finalNorm.withUnsafeBufferPointer { w in
                            Ops.rmsNormBackward(dhp.baseAddress!, d.baseAddress!, x.baseAddress!, rstd: rs.baseAddress!, weight: w.baseAddress!, rows: N, dim: D)
                        }
                    }
                }
            }
        }
        for l in stride(from: c.layerCount - 1, through: 0, by: -1) {
            let act: LayerActivations
            if options.gradientCheckpointing {
                act = makeActivations(batch)
                act.h = inputs[l]
                // Recompute (same dropout masks: seeded by step and layer); the layer's output is not needed.
                layerForward(l, act, rope: rope, recompute: true)
            } else {
                act = stored[l]
            }
            dh = layerBackward(l, act, dOut: dh, rope: rope)
        }
        stepCounter += 1
        return loss
    }

    func makeActivations(_ batch: TrainingBatch) -> LayerActivations {
        let c = model.config
        return LayerActivations(N: batch.batchSize * batch.sequenceLength, D: c.hiddenSize, qDim: c.headCount * c.headDim,
                                kvDim: c.kvHeadCount * c.headDim, I: c.intermediateSize, r: lora.config.rank,
                                B: batch.batchSize, T: batch.sequenceLength, H: c.headCount, windowStart: batch.segmentStarts)
    }

    // MARK: - Layer forward

    /// `recompute`: the backward pass's rerun under checkpointing, which needs every activation but not
    /// the layer's output, so down_proj's frozen product (a quarter of the layer's weights) is skipped.
    func layerForward(_ l: Int, _ act: LayerActivations, rope: (cos: [Float], sin: [Float]), recompute: Bool = false) {
        let layer = model.layers[l]
        let c = model.config
        let N = act.N
        rmsNorm(&act.x1, &act.rstd1, act.h, layer.inputNorm, rows: N)
        linearForward(act, layer: l, .q, input: act.x1, output: &act.q, store: true)
        linearForward(act, layer: l, .k, input: act.x1, output: &act.k, store: true)
        linearForward(act, layer: l, .v, input: act.x1, output: &act.v, store: true)
        act.q.withUnsafeMutableBufferPointer { Ops.rope($0.baseAddress!, rows: N, heads: c.headCount, headDim: c.headDim, cos: rope.cos, sin: rope.sin) }
        act.k.withUnsafeMutableBufferPointer { Ops.rope($0.baseAddress!, rows: N, heads: c.kvHeadCount, headDim: c.headDim, cos: rope.cos, sin: rope.sin) }
        attentionForward(act)
        var o = [Float](repeating: 0, count: N * act.D)
        linearForward(act, layer: l, .o, input: act.attn, output: &o, store: true)
        for i in 0..<o.count { act.h2[i] = act.h[i] + o[i] }
        rmsNorm(&act.x2, &act.rstd2, act.h2, layer.postAttentionNorm, rows: N)
        linearForward(act, layer: l, .gate, input: act.x2, output: &act.g, store: true)
        linearForward(act, layer: l, .up, input: act.x2, output: &act.u, store: true)
        act.a.withUnsafeMutableBufferPointer { ap in
            act.g.withUnsafeBufferPointer { gp in
                act.u.withUnsafeBufferPointer { up in Ops.swigluForward(ap.baseAddress!, gate: gp.baseAddress!, up: up.baseAddress!, count: N * act.I) }
            }
        }
        var d = [Float](repeating: 0, count: N * act.D)
        linearForward(act, layer: l, .down, input: act.a, output: &d, store: true, skipBase: recompute)
        if !recompute { for i in 0..<d.count { act.out[i] = act.h2[i] + d[i] } }
    }

    /// Causal attention per sequence and head (GQA: query head h reads kv head h / (H / Hkv)).
    func attentionForward(_ act: LayerActivations) {
        let c = model.config
        let T = act.T, H = c.headCount, d = c.headDim, group = c.headCount / c.kvHeadCount
        let scale = 1 / Float(d).squareRoot()
        act.q.withUnsafeBufferPointer { qp in
            act.k.withUnsafeBufferPointer { kp in
                act.v.withUnsafeBufferPointer { vp in
                    act.probs.withUnsafeMutableBufferPointer { pp in
                        act.attn.withUnsafeMutableBufferPointer { op in
                            for b in 0..<act.B {
                                for h in 0..<H {
                                    let kvh = h / group
                                    let P = pp.baseAddress! + (b * H + h) * T * T
                                    let Q = qp.baseAddress! + b * T * act.qDim + h * d
                                    let K = kp.baseAddress! + b * T * act.kvDim + kvh * d
                                    let Vv = vp.baseAddress! + b * T * act.kvDim + kvh * d
                                    Gemm.gemm(P, ldc: T, Q, lda: act.qDim, K, ldb: act.kvDim, m: T, n: T, k: d, transposeB: true, alpha: scale)
                                    if let starts = act.windowStart {
                                        // Packed rows: keys before the query's own example get probability 0.
                                        for t in 0..<T {
                                            let s = starts[b * T + t]
                                            for j in 0..<s { P[t * T + j] = 0 }
                                            Ops.softmaxRow(P + t * T + s, visible: t + 1 - s, length: T - s)
                                        }
                                    } else {
                                        for t in 0..<T { Ops.softmaxRow(P + t * T, visible: t + 1, length: T) }
                                    }
                                    Gemm.gemm(op.baseAddress! + b * T * act.qDim + h * d, ldc: act.qDim, P, lda: T, Vv, ldb: act.kvDim,
                                              m: T, n: d, k: T)
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    // MARK: - Layer backward

    /// Given dOut = dL/d(layer output), returns dL/d(layer input) and adds the LoRA gradients.
    func layerBackward(_ l: Int, _ act: LayerActivations, dOut: [Float], rope: (cos: [Float], sin: [Float])) -> [Float] {
        let layer = model.layers[l]
        let c = model.config
        let N = act.N
        // h3 = h2 + down(a)
        var da = [Float](repeating: 0, count: N * act.I)
        linearBackward(act, layer: l, .down, dy: dOut, input: act.a, dx: &da)
        var dg = [Float](repeating: 0, count: N * act.I), du = dg
        dg.withUnsafeMutableBufferPointer { dgp in
            du.withUnsafeMutableBufferPointer { dup in
                da.withUnsafeBufferPointer { dap in
                    act.g.withUnsafeBufferPointer { gp in
                        act.u.withUnsafeBufferPointer { up in
                            Ops.swigluBackward(dGate: dgp.baseAddress!, dUp: dup.baseAddress!, dap.baseAddress!, gate: gp.baseAddress!, up: up.baseAddress!, count: N * act.I)
                        }
                    }
                }
            }
        }
        var dx2 = [Float](repeating: 0, count: N * act.D)
        linearBackward(act, layer: l, .gate, dy: dg, input: act.x2, dx: &dx2)
        linearBackward(act, layer: l, .up, dy: du, input: act.x2, dx: &dx2)
        var dh2 = dOut  // residual
        normBackward(&dh2, dx2, act.h2, act.rstd2, layer.postAttentionNorm, rows: N)
        // h2 = h + o(attn)
        var dAttn = [Float](repeating: 0, count: N * act.qDim)
        linearBackward(act, layer: l, .o, dy: dh2, input: act.attn, dx: &dAttn)
        var dq = [Float](repeating: 0, count: N * act.qDim)
        var dk = [Float](repeating: 0, count: N * act.kvDim), dv = dk
        attentionBackward(act, dAttn: dAttn, dq: &dq, dk: &dk, dv: &dv)
        dq.withUnsafeMutableBufferPointer { Ops.rope($0.baseAddress!, rows: N, heads: c.headCount, headDim: c.headDim, cos: rope.cos, sin: rope.sin, inverse: true) }
        dk.withUnsafeMutableBufferPointer { Ops.rope($0.baseAddress!, rows: N, heads: c.kvHeadCount, headDim: c.headDim, cos: rope.cos, sin: rope.sin, inverse: true) }
        var dx1 = [Float](repeating: 0, count: N * act.D)
        linearBackward(act, layer: l, .q, dy: dq, input: act.x1, dx: &dx1)
        linearBackward(act, layer: l, .k, dy: dk, input: act.x1, dx: &dx1)
        linearBackward(act, layer: l, .v, dy: dv, input: act.x1, dx: &dx1)
        var dh = dh2  // residual
        normBackward(&dh, dx1, act.h, act.rstd1, layer.inputNorm, rows: N)
        return dh
    }

    /// dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale, dQ = dS K, dK += dSᵀ Q, dV += Pᵀ dO, per sequence and head.
    func attentionBackward(_ act: LayerActivations, dAttn: [Float], dq: inout [Float], dk: inout [Float], dv: inout [Float]) {
        let c = model.config
        let T = act.T, H = c.headCount, d = c.headDim, group = c.headCount / c.kvHeadCount
        let scale = 1 / Float(d).squareRoot()
        var dP = [Float](repeating: 0, count: T * T)
        act.q.withUnsafeBufferPointer { qp in
            act.k.withUnsafeBufferPointer { kp in
                act.v.withUnsafeBufferPointer { vp in
                    act.probs.withUnsafeBufferPointer { pp in
                        dAttn.withUnsafeBufferPointer { dop in
                            dq.withUnsafeMutableBufferPointer { dqp in
                                dk.withUnsafeMutableBufferPointer { dkp in
                                    dv.withUnsafeMutableBufferPointer { dvp in
                                        dP.withUnsafeMutableBufferPointer { dpp in
                                            let S = dpp.baseAddress!
                                            for b in 0..<act.B {
                                                for h in 0..<H {
                                                    let kvh = h / group
                                                    let P = pp.baseAddress! + (b * H + h) * T * T
                                                    let qOff = b * T * act.qDim + h * d, kvOff = b * T * act.kvDim + kvh * d
                                                    // dP = dO Vᵀ
                                                    Gemm.gemm(S, ldc: T, dop.baseAddress! + qOff, lda: act.qDim, vp.baseAddress! + kvOff, ldb: act.kvDim,
                                                              m: T, n: T, k: d, transposeB: true)
                                                    // dV += Pᵀ dO
                                                    Gemm.gemm(dvp.baseAddress! + kvOff, ldc: act.kvDim, P, lda: T, dop.baseAddress! + qOff, ldb: act.qDim,
                                                              m: T, n: d, k: T, transposeA: true, beta: 1)
                                                    for t in 0..<T {
                                                        let prow = P + t * T, srow = S + t * T
                                                        var dot: Float = 0
                                                        for j in 0...t { dot += prow[j] * srow[j] }
                                                        for j in 0...t { srow[j] = prow[j] * (srow[j] - dot) * scale }
                                                        for j in (t + 1)..<T { srow[j] = 0 }
                                                    }
                                                    // dQ = dS K ; dK += dSᵀ Q
                                                    Gemm.gemm(dqp.baseAddress! + qOff, ldc: act.qDim, S, lda: T, kp.baseAddress! + kvOff, ldb: act.kvDim,
                                                              m: T, n: d, k: T)
                                                    Gemm.gemm(dkp.baseAddress! + kvOff, ldc: act.kvDim, S, lda: T, qp.baseAddress! + qOff, ldb: act.qDim,
                                                              m: T, n: d, k: T, transposeA: true, beta: 1)
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    // MARK: - Linear with LoRA

    /// y = x Wᵀ (+ b) + s · (drop(x) Aᵀ) Bᵀ; stores drop(x) and t = drop(x) Aᵀ for the backward.
    func linearForward(_ act: LayerActivations, layer l: Int, _ p: Projection, input x: [Float], output y: inout [Float], store: Bool,
                       skipBase: Bool = false) {
        let linear = p.linear(in: model.layers[l])
        let N = act.N
        if !skipBase {
            var scratch = [Float](repeating: 0, count: max(linear.scratchCount, 1))
            var base = linear
            base.lora = nil  // training adapters come from `lora`, not from an attached inference adapter
            x.withUnsafeBufferPointer { xp in
                y.withUnsafeMutableBufferPointer { yp in
                    scratch.withUnsafeMutableBufferPointer { sp in
                        base.forward(xp.baseAddress!, rows: N, into: yp.baseAddress!, scratch: sp.baseAddress!, kernels: kernels)
                    }
                }
            }
        }
        guard let slot = lora.slot(layer: l, projection: p) else { return }
        let r = lora.config.rank, inF = slot.inFeatures, outF = slot.outFeatures
        var input = x
        var mask: [UInt8]?
        let dropout = training ? lora.config.dropout : 0
        if dropout > 0 {
            // Seeded by step, layer and projection: a recomputed layer (checkpointing) draws the same mask.
            var rng = SeededGenerator(seed: lora.config.seed &+ 0x9E37_79B9 &* (stepCounter &+ 1) &+ UInt64(l * 16 + p.rawValue) &* 0x1000_0001)
            let keep = 1 / (1 - dropout)
            var m = [UInt8](repeating: 1, count: input.count)
            for i in 0..<input.count {
                if rng.nextFloat() < dropout { m[i] = 0; input[i] = 0 } else { input[i] *= keep }
            }
            mask = m
        }
        var t = [Float](repeating: 0, count: N * r)
        lora.parameters.withUnsafeBufferPointer { params in
            input.withUnsafeBufferPointer { ip in
                t.withUnsafeMutableBufferPointer { tp in
                    Gemm.gemm(tp.baseAddress!, ldc: r, ip.baseAddress!, lda: inF, params.baseAddress! + slot.aOffset, ldb: inF,
                              m: N, n: r, k: inF, transposeB: true)
                }
            }
            t.withUnsafeBufferPointer { tp in
                y.withUnsafeMutableBufferPointer { yp in
                    Gemm.gemm(yp.baseAddress!, ldc: outF, tp.baseAddress!, lda: r, params.baseAddress! + slot.bOffset, ldb: r,
                              m: N, n: outF, k: r, transposeB: true, alpha: lora.config.scale, beta: 1)
                }
            }
        }
        if store {
            act.loraT[p.rawValue] = t
            act.loraInput[p.rawValue] = mask == nil ? nil : input
            act.loraMask[p.rawValue] = mask
        }
    }

    /// dx += dy W (frozen: no weight gradient) + s · (dy B) A ⊙ dropout; dB += s · dyᵀ t; dA += (s · dy B)ᵀ drop(x).
    func linearBackward(_ act: LayerActivations, layer l: Int, _ p: Projection, dy: [Float], input x: [Float], dx: inout [Float]) {
        let linear = p.linear(in: model.layers[l])
        let N = act.N, inF = linear.inFeatures, outF = linear.outFeatures
        dy.withUnsafeBufferPointer { dyp in
            dx.withUnsafeMutableBufferPointer { dxp in
                frozenInputGradient(linear, dyp.baseAddress!, rows: N, into: dxp.baseAddress!)
            }
        }
        guard let slot = lora.slot(layer: l, projection: p) else { return }
        let r = lora.config.rank, s = lora.config.scale
        let t = act.loraT[p.rawValue]
        let input = act.loraInput[p.rawValue] ?? x
        var dt = [Float](repeating: 0, count: N * r)
        lora.parameters.withUnsafeBufferPointer { params in
            lora.gradients.withUnsafeMutableBufferPointer { grads in
                dy.withUnsafeBufferPointer { dyp in
                    // dB += s · dyᵀ t   [out, r]
                    t.withUnsafeBufferPointer { tp in
                        Gemm.gemm(grads.baseAddress! + slot.bOffset, ldc: r, dyp.baseAddress!, lda: outF, tp.baseAddress!, ldb: r,
                                  m: outF, n: r, k: N, transposeA: true, alpha: s, beta: 1)
                    }
                    // dt = s · dy B   [N, r]
                    dt.withUnsafeMutableBufferPointer { dtp in
                        Gemm.gemm(dtp.baseAddress!, ldc: r, dyp.baseAddress!, lda: outF, params.baseAddress! + slot.bOffset, ldb: r,
                                  m: N, n: r, k: outF, alpha: s)
                    }
                }
                dt.withUnsafeBufferPointer { dtp in
                    // dA += dtᵀ drop(x)   [r, in]
                    input.withUnsafeBufferPointer { ip in
                        Gemm.gemm(grads.baseAddress! + slot.aOffset, ldc: inF, dtp.baseAddress!, lda: r, ip.baseAddress!, ldb: inF,
                                  m: r, n: inF, k: N, transposeA: true, beta: 1)
                    }
                    // dx += (dt A) ⊙ dropout mask / (1 − p)
                    if let mask = act.loraMask[p.rawValue] {
                        var through = [Float](repeating: 0, count: N * inF)
                        through.withUnsafeMutableBufferPointer { tp in
                            Gemm.gemm(tp.baseAddress!, ldc: inF, dtp.baseAddress!, lda: r, params.baseAddress! + slot.aOffset, ldb: inF,
                                      m: N, n: inF, k: r)
                        }
                        let keep = 1 / (1 - lora.config.dropout)
                        for i in 0..<through.count where mask[i] != 0 { dx[i] += through[i] * keep }
                    } else {
                        dx.withUnsafeMutableBufferPointer { dxp in
                            Gemm.gemm(dxp.baseAddress!, ldc: inF, dtp.baseAddress!, lda: r, params.baseAddress! + slot.aOffset, ldb: inF,
                                      m: N, n: inF, k: r, beta: 1)
                        }
                    }
                }
            }
        }
    }

    /// dx += dy · W for a frozen W [out, in], tile by tile for a 4-bit W.
    func frozenInputGradient(_ linear: Linear, _ dy: UnsafePointer<Float>, rows N: Int, into dx: UnsafeMutablePointer<Float>) {
        let inF = linear.inFeatures, outF = linear.outFeatures
        switch linear.weight {
        case let .dense(w):
            w.withUnsafeBufferPointer { wp in
                Gemm.gemm(dx, ldc: inF, dy, lda: outF, wp.baseAddress!, ldb: inF, m: N, n: inF, k: outF, beta: 1)
            }
        case .quantized:
            let tile = linear.tileRows(forRows: N)
            var scratch = [Float](repeating: 0, count: tile * inF)
            scratch.withUnsafeMutableBufferPointer { sp in
                var r0 = 0
                while r0 < outF {
                    let r1 = min(outF, r0 + tile)
                    linear.dequantizeRows(r0..<r1, into: sp.baseAddress!, kernels: kernels)
                    Gemm.gemm(dx, ldc: inF, dy + r0, lda: outF, sp.baseAddress!, ldb: inF, m: N, n: inF, k: r1 - r0, beta: 1)
                    r0 = r1
                }
            }
        }
    }

    // MARK: - Norms and loss

    func rmsNorm(_ y: inout [Float], _ rstd: inout [Float], _ x: [Float], _ w: [Float], rows: Int) {
        let D = model.config.hiddenSize, eps = model.config.rmsNormEps
        y.withUnsafeMutableBufferPointer { yp in
            rstd.withUnsafeMutableBufferPointer { rp in
                x.withUnsafeBufferPointer { xp in
                    w.withUnsafeBufferPointer { wp in
                        Ops.rmsNormForward(yp.baseAddress!, rstd: rp.baseAddress!, xp.baseAddress!, weight: wp.baseAddress!, rows: rows, dim: D, eps: eps)
                    }
                }
            }
        }
    }

    /// dx += rmsNorm backward of dy.
    func normBackward(_ dx: inout [Float], _ dy: [Float], _ x: [Float], _ rstd: [Float], _ w: [Float], rows: Int) {
        let D = model.config.hiddenSize
        dx.withUnsafeMutableBufferPointer { dxp in
            dy.withUnsafeBufferPointer { dyp in
                x.withUnsafeBufferPointer { xp in
                    rstd.withUnsafeBufferPointer { rp in
                        w.withUnsafeBufferPointer { wp in
                            Ops.rmsNormBackward(dxp.baseAddress!, dyp.baseAddress!, xp.baseAddress!, rstd: rp.baseAddress!, weight: wp.baseAddress!, rows: rows, dim: D)
                        }
                    }
                }
            }
        }
    }

    /// Mean cross-entropy over counted targets, computed `lossChunkRows` rows at a time; writes
    /// dL/dxf (times `scale`) into dxf.
    func crossEntropy(_ xf: [Float], batch: TrainingBatch, count: Int, dxf: inout [Float], scale: Float, wantGradient: Bool) -> Double {
        let c = model.config
        let V = c.vocabSize, D = c.hiddenSize, T = batch.sequenceLength
        let N = batch.batchSize * T
        // Rows whose target counts: row i = (b, t) predicts labels[b, t + 1].
        var rows: [(Int, Int)] = []
        for i in 0..<N { if let target = batch.target(of: i) { rows.append((i, target)) } }
        let chunk = max(1, options.lossChunkRows)
        var total = 0.0
        let inv = Float(1) / Float(count)
        let head: [Float] = { if let lm = model.lmHead { return lm.denseWeight() }; return model.embedding }()
        var x = [Float](repeating: 0, count: chunk * D)
        var logits = [Float](repeating: 0, count: chunk * V)
        var dx = [Float](repeating: 0, count: chunk * D)
        var start = 0
        while start < rows.count {
            let n = min(chunk, rows.count - start)
            for k in 0..<n { for j in 0..<D { x[k * D + j] = xf[rows[start + k].0 * D + j] } }
            head.withUnsafeBufferPointer { e in
                x.withUnsafeBufferPointer { xp in
                    logits.withUnsafeMutableBufferPointer { lp in
                        Gemm.gemm(lp.baseAddress!, ldc: V, xp.baseAddress!, lda: D, e.baseAddress!, ldb: D, m: n, n: V, k: D, transposeB: true)
                        for k in 0..<n {
                            total += Ops.crossEntropyRow(lp.baseAddress! + k * V, vocab: V, target: rows[start + k].1, scale: inv * scale)
                        }
                    }
                    if wantGradient {
                        logits.withUnsafeBufferPointer { lp in
                            dx.withUnsafeMutableBufferPointer { dp in
                                Gemm.gemm(dp.baseAddress!, ldc: D, lp.baseAddress!, lda: V, e.baseAddress!, ldb: D, m: n, n: D, k: V)
                            }
                        }
                    }
                }
            }
            if wantGradient {
                for k in 0..<n { for j in 0..<D { dxf[rows[start + k].0 * D + j] += dx[k * D + j] } }
            }
            start += n
        }
        return total / Double(count)
    }

}
