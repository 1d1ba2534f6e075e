// The transformer block, written once: the forward that prefill, decoding, batched decoding and the
// training step all run (Block+Backward.swift holds its backward, beside it as llm.c keeps each op's).
// Order of operations follows transformers' LlamaForCausalLM: h2 = h + o(attn(norm(h))), out = h2 +
// down(silu(gate(norm(h2))) ⊙ up(norm(h2))). Every projection is the frozen product (Linear.frozenForward)
// plus the LoRA updates the caller names (LoRA.swift); attention and where keys and values go are the
// caller's (`attend`): a KV cache in inference, the step's own rows in training.
import QLoRACore
import QLoRAKernels

/// The linear projections of a block: seven in most families, q/k/v and gate/up fused in Phi-3's checkpoints
/// (and adapted fused by PEFT, so fused here too).
public enum Projection: Int, CaseIterable, Sendable, CustomStringConvertible {
    case q, k, v, o, gate, up, down, qkv, gateUp

    /// The module name (transformers / PEFT).
    public var name: String {
        switch self {
        case .q: return "q_proj"
        case .k: return "k_proj"
        case .v: return "v_proj"
        case .o: return "o_proj"
        case .gate: return "gate_proj"
        case .up: return "up_proj"
        case .down: return "down_proj"
        case .qkv: return "qkv_proj"
        case .gateUp: return "gate_up_proj"
        }
    }

    /// Whether it belongs to attention (else to the MLP).
    public var isAttention: Bool { self == .q || self == .k || self == .v || self == .o || self == .qkv }

    /// The path inside a layer, e.g. "self_attn.q_proj".
    public var modulePath: String { (isAttention ? "self_attn." : "mlp.") + name }

    public var description: String { name }

    public init?(name: String) {
        guard let p = Projection.allCases.first(where: { $0.name == name }) else { return nil }
        self = p
    }

    /// The projections a layer of this shape has, in PEFT's order.
    public static func present(fused: Bool) -> [Projection] { fused ? [.qkv, .o, .gateUp, .down] : [.q, .k, .v, .o, .gate, .up, .down] }

    public func linear(in layer: LlamaLayer) -> Linear? { layer[self] }
}

/// Where a block's forward writes its activations, rows x width each (D hidden, I intermediate). Inference
/// keeps nothing for a backward and passes one buffer for x1 and x2, h2 is h (the residual added in place),
/// and a is g (SwiGLU in place); training keeps them apart, and the norms' reciprocal RMS as well.
public struct BlockActivations {
    public var x1, q, k, v, attn, h2, x2, g, u, a: UnsafeMutablePointer<Float>
    public var rstd1, rstd2: UnsafeMutablePointer<Float>?
    /// What the backward of the optional norms needs (training; nil in inference, where they run in place):
    /// q and k before their per-head norms [rows, qDim], [rows, kvDim] and those norms' reciprocal RMS
    /// [rows·H], [rows·Hkv]; attention's and the MLP's outputs before their norms [rows, D] and theirs.
    public var qPre, kPre, rstdQ, rstdK: UnsafeMutablePointer<Float>?
    public var attnOut, mlpOut, rstdAttnOut, rstdMLPOut: UnsafeMutablePointer<Float>?

    public init(x1: UnsafeMutablePointer<Float>, q: UnsafeMutablePointer<Float>, k: UnsafeMutablePointer<Float>, v: UnsafeMutablePointer<Float>,
                attn: UnsafeMutablePointer<Float>, h2: UnsafeMutablePointer<Float>, x2: UnsafeMutablePointer<Float>,
                g: UnsafeMutablePointer<Float>, u: UnsafeMutablePointer<Float>, a: UnsafeMutablePointer<Float>,
                rstd1: UnsafeMutablePointer<Float>? = nil, rstd2: UnsafeMutablePointer<Float>? = nil) {
        self.x1 = x1; self.q = q; self.k = k; self.v = v; self.attn = attn; self.h2 = h2; self.x2 = x2
        self.g = g; self.u = u; self.a = a; self.rstd1 = rstd1; self.rstd2 = rstd2
    }
}

/// The work buffers of a block's products.
public struct BlockScratch {
    /// [rows, D]: the output of o_proj and down_proj before the residual.
    public var proj: UnsafeMutablePointer<Float>
    /// A dequantized tile of a weight and its block scales (Linear.scratchCount).
    public var tile: UnsafeMutablePointer<Float>
    /// x rearranged for the 4-bit matrix-vector kernels: min(rows, Linear.batchedRowLimit) x the widest input.
    public var prepared: UnsafeMutablePointer<Float>
    /// bf16 compute: an operand converted once for the products that read it, rows x paddedCount(widest), and
    /// a packed tile of a weight (Linear.packedWords); nil: temporaries made by each product.
    public var converted: UnsafeMutablePointer<UInt16>?
    public var packed: UnsafeMutablePointer<UInt32>?
    /// Fused projections (Phi-3): their output [rows, qDim + 2 kvDim] or [rows, 2 I] before it is split, and
    /// the gradient gathered for their backward; nil for a model without them.
    public var fused: UnsafeMutablePointer<Float>?
    /// DoRA with dropout in training: the frozen product of the dropped-out input [rows, widest output]; nil: a temporary.
    public var dora: UnsafeMutablePointer<Float>?

    public init(proj: UnsafeMutablePointer<Float>, tile: UnsafeMutablePointer<Float>, prepared: UnsafeMutablePointer<Float>,
                converted: UnsafeMutablePointer<UInt16>? = nil, packed: UnsafeMutablePointer<UInt32>? = nil,
                fused: UnsafeMutablePointer<Float>? = nil) {
        self.proj = proj; self.tile = tile; self.prepared = prepared; self.converted = converted; self.packed = packed; self.fused = fused
    }
}

/// What a block's caller decides for one call: its rows, their rotary tables, and the precision of the
/// frozen products.
public struct BlockCall {
    public var rows: Int
    /// cos and sin [rows, rotaryDim / 2] (Ops.ropeTables): this layer's (Gemma 3's sliding layers have their own).
    public var cos: UnsafePointer<Float>
    public var sin: UnsafePointer<Float>
    /// bf16 kernels for the frozen products (over many rows; and the 4-bit ones over a few), or nil: f32.
    public var bf16: BF16Kernels?
    public var kernels: KernelTable

    public init(rows: Int, cos: UnsafePointer<Float>, sin: UnsafePointer<Float>, bf16: BF16Kernels?, kernels: KernelTable) {
        self.rows = rows; self.cos = cos; self.sin = sin; self.bf16 = bf16; self.kernels = kernels
    }

    /// x [rows, cols] converted to bf16 rows into s.converted, when the products will read it so (bf16 compute,
    /// more rows than the matrix-vector kernels take, and a buffer for it); else nil.
    func converted(_ x: UnsafePointer<Float>, cols: Int, _ s: BlockScratch, always: Bool = false) -> UnsafePointer<UInt16>? {
        guard let bf16, let out = s.converted, always || rows > Linear.batchedRowLimit else { return nil }
        BF16Gemm.convert(x, rows: rows, cols: cols, ld: cols, into: out, ldd: BF16Gemm.paddedCount(cols), kernels: bf16)
        return UnsafePointer(out)
    }
}

extension LlamaLayer {
    /// The block over `call.rows` rows of h: writes `out` (which may be h), keeping the activations in `act`.
    /// `lora(p, apply)` calls `apply` for each LoRA update of projection p (the adapter being trained, an
    /// attached one, the per-row adapters of a batch; none at all for the base model). `attend` runs attention on
    /// act.q, act.k and act.v (normed where the model norms them, rotated) into act.attn. `out == nil` is training's
    /// recomputation under gradient checkpointing, which needs every activation but not the output: the frozen
    /// part of down_proj (a quarter of the block's weights) is skipped unless a norm or DoRA follows it; its LoRA still runs.
    ///
    /// h2 = h + N_a(o(attn(x1))), x1 = norm(h); out = h2 + N_m(down(act(gate(x2)) ⊙ up(x2))), x2 = norm'(h2), where
    /// N_a and N_m are Gemma 3's output norms (identity elsewhere).
    public func forward(_ h: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>?, _ act: BlockActivations, _ s: BlockScratch,
                        config c: LlamaConfig, _ call: BlockCall, lora updates: (Projection, (LoRAUpdate) -> Void) -> Void,
                        attend: () -> Void) {
        let n = call.rows, D = c.hiddenSize, I = c.intermediateSize, qDim = c.qDim, kvDim = c.kvDim
        let bf16 = call.bf16, kernels = call.kernels
        func lora(_ p: Projection, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>) {
            guard let linear = self[p] else { return }
            updates(p) { u in
                if u.dora != nil && u.dropout != nil {
                    linear.doraDropoutForward(u, x, rows: n, into: y, s, call)
                } else {
                    u.forward(x, rows: n, inFeatures: linear.inFeatures, outFeatures: linear.outFeatures, into: y, kernels: kernels)
                }
            }
        }
        norm(inputNorm, act.x1, rstd: act.rstd1, h, rows: n, config: c)
        var xb = call.converted(act.x1, cols: D, s)
        // q and k as projected: kept apart when their norms need a backward, else normed in place.
        let qOut = act.qPre ?? act.q, kOut = act.kPre ?? act.k
        if let qkv = self[.qkv] {
            let fused = s.fused!
            qkv.frozenForward(act.x1, converted: xb, rows: n, into: fused, scratch: s.tile, packed: s.packed, bf16: bf16, kernels: kernels)
            lora(.qkv, act.x1, fused)
            Self.split(fused, rows: n, into: [(qOut, qDim), (kOut, kvDim), (act.v, kvDim)])
        } else {
            Linear.frozenForwardShared(act.x1, converted: xb, rows: n, prepared: s.prepared, scratch: s.tile, packed: s.packed,
                                       q, qOut, k, kOut, v, act.v, bf16: bf16, kernels: kernels)
            lora(.q, act.x1, qOut)
            lora(.k, act.x1, kOut)
            lora(.v, act.x1, act.v)
        }
        if let qNorm, let kNorm {
            headNorm(qNorm, act.q, rstd: act.rstdQ, qOut, rows: n * c.headCount, config: c)
            headNorm(kNorm, act.k, rstd: act.rstdK, kOut, rows: n * c.kvHeadCount, config: c)
        }
        Ops.rope(act.q, rows: n, heads: c.headCount, headDim: c.headDim, rotaryDim: c.rotaryDim, cos: call.cos, sin: call.sin)
        Ops.rope(act.k, rows: n, heads: c.kvHeadCount, headDim: c.headDim, rotaryDim: c.rotaryDim, cos: call.cos, sin: call.sin)
        attend()
        xb = call.converted(act.attn, cols: qDim, s)
        let oOut = act.attnOut ?? s.proj
        o.frozenForward(act.attn, converted: xb, rows: n, into: oOut, scratch: s.tile, packed: s.packed, bf16: bf16, kernels: kernels)
        lora(.o, act.attn, oOut)
        if let attentionOutputNorm { norm(attentionOutputNorm, s.proj, rstd: act.rstdAttnOut, oOut, rows: n, config: c) }
        let h2 = act.h2, proj = s.proj
        elementwise(n * D) { r in for i in r { h2[i] = h[i] + proj[i] } }
        norm(mlpNorm, act.x2, rstd: act.rstd2, act.h2, rows: n, config: c)
        xb = call.converted(act.x2, cols: D, s)
        if let gateUp = self[.gateUp] {
            let fused = s.fused!
            gateUp.frozenForward(act.x2, converted: xb, rows: n, into: fused, scratch: s.tile, packed: s.packed, bf16: bf16, kernels: kernels)
            lora(.gateUp, act.x2, fused)
            Self.split(fused, rows: n, into: [(act.g, I), (act.u, I)])
        } else {
            Linear.frozenForwardShared(act.x2, converted: xb, rows: n, prepared: s.prepared, scratch: s.tile, packed: s.packed,
                                       gate, act.g, up, act.u, bf16: bf16, kernels: kernels)
            lora(.gate, act.x2, act.g)
            lora(.up, act.x2, act.u)
        }
        switch c.activation {
        case .silu: Ops.swigluForward(act.a, gate: act.g, up: act.u, count: n * I, kernels: kernels)
        case .geluTanh:
            let a = act.a, g = act.g, u = act.u
            elementwise(n * I) { r in Ops.gegluForward(a + r.lowerBound, gate: g + r.lowerBound, up: u + r.lowerBound, count: r.count, kernels: kernels) }
        }
        let downOut = act.mlpOut ?? s.proj
        var doraDown = false  // DoRA without dropout scales the frozen output (its dropout form reruns the product itself)
        updates(.down) { if $0.dora != nil && $0.dropout == nil { doraDown = true } }
        if out != nil || mlpOutputNorm != nil || doraDown {
            xb = call.converted(act.a, cols: I, s)
            down.frozenForward(act.a, converted: xb, rows: n, into: downOut, scratch: s.tile, packed: s.packed, bf16: bf16, kernels: kernels)
        }
        lora(.down, act.a, downOut)
        if let mlpOutputNorm { norm(mlpOutputNorm, s.proj, rstd: act.rstdMLPOut, downOut, rows: n, config: c) }
        if let out { elementwise(n * D) { r in for i in r { out[i] = h2[i] + proj[i] } } }
    }

    /// Copies each row of a fused output [rows, Σ widths] into the parts' own buffers [rows, width].
    static func split(_ fused: UnsafePointer<Float>, rows: Int, into parts: [(UnsafeMutablePointer<Float>, Int)]) {
        let total = parts.reduce(0) { $0 + $1.1 }
        for r in 0..<rows {
            var offset = 0
            for (dst, width) in parts {
                (dst + r * width).update(from: fused + r * total + offset, count: width)
                offset += width
            }
        }
    }

    /// The inverse of split: the parts' rows side by side in `fused`.
    static func gather(_ parts: [(UnsafePointer<Float>, Int)], rows: Int, into fused: UnsafeMutablePointer<Float>) {
        let total = parts.reduce(0) { $0 + $1.1 }
        for r in 0..<rows {
            var offset = 0
            for (src, width) in parts {
                (fused + r * total + offset).update(from: src + r * width, count: width)
                offset += width
            }
        }
    }

    /// y = RMSNorm(x) with this block's weight w, keeping the reciprocal RMS per row when asked (y may be x).
    func norm(_ w: [Float], _ y: UnsafeMutablePointer<Float>, rstd: UnsafeMutablePointer<Float>?, _ x: UnsafePointer<Float>, rows: Int,
              config c: LlamaConfig) {
        w.withUnsafeBufferPointer { Ops.rmsNormForward(y, rstd: rstd, x, weight: $0.baseAddress!, rows: rows, dim: c.hiddenSize, eps: c.rmsNormEps) }
    }

    /// The per-head norm of q or k: `rows` = tokens x heads, each head_dim wide (y may be x).
    func headNorm(_ w: [Float], _ y: UnsafeMutablePointer<Float>, rstd: UnsafeMutablePointer<Float>?, _ x: UnsafePointer<Float>, rows: Int,
                  config c: LlamaConfig) {
        w.withUnsafeBufferPointer { Ops.rmsNormForward(y, rstd: rstd, x, weight: $0.baseAddress!, rows: rows, dim: c.headDim, eps: c.rmsNormEps) }
    }
}
