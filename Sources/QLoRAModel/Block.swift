// The transformer block, written once: the forward that prefill, decoding, batched decoding and the
// training step all run (Block+Backward.swift holds its backward, beside it as llm.c keeps each op's).
// Order of operations follows transformers' LlamaForCausalLM: h2 = h + o(attn(norm(h))), out = h2 +
// down(silu(gate(norm(h2))) ⊙ up(norm(h2))). Every projection is the frozen product (Linear.frozenForward)
// plus the LoRA updates the caller names (LoRA.swift); attention and where keys and values go are the
// caller's (`attend`): a KV cache in inference, the step's own rows in training.
import QLoRACore
import QLoRAKernels

/// The seven linear projections of a Llama block.
public enum Projection: Int, CaseIterable, Sendable, CustomStringConvertible {
    case q, k, v, o, gate, up, down

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
        }
    }

    /// The path inside a layer, e.g. "self_attn.q_proj".
    public var modulePath: String { (rawValue < 4 ? "self_attn." : "mlp.") + name }

    public var description: String { name }

    public init?(name: String) {
        guard let p = Projection.allCases.first(where: { $0.name == name }) else { return nil }
        self = p
    }

    public func linear(in layer: LlamaLayer) -> Linear {
        switch self {
        case .q: return layer.q
        case .k: return layer.k
        case .v: return layer.v
        case .o: return layer.o
        case .gate: return layer.gate
        case .up: return layer.up
        case .down: return layer.down
        }
    }
}

/// Where a block's forward writes its activations, rows x width each (D hidden, I intermediate). Inference
/// keeps nothing for a backward and passes one buffer for x1 and x2, h2 is h (the residual added in place),
/// and a is g (SwiGLU in place); training keeps them apart, and the norms' reciprocal RMS as well.
public struct BlockActivations {
    public var x1, q, k, v, attn, h2, x2, g, u, a: UnsafeMutablePointer<Float>
    public var rstd1, rstd2: UnsafeMutablePointer<Float>?

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

    public init(proj: UnsafeMutablePointer<Float>, tile: UnsafeMutablePointer<Float>, prepared: UnsafeMutablePointer<Float>,
                converted: UnsafeMutablePointer<UInt16>? = nil, packed: UnsafeMutablePointer<UInt32>? = nil) {
        self.proj = proj; self.tile = tile; self.prepared = prepared; self.converted = converted; self.packed = packed
    }
}

/// What a block's caller decides for one call: its rows, their rotary tables, and the precision of the
/// frozen products.
public struct BlockCall {
    public var rows: Int
    /// cos and sin [rows, d / 2] (Ops.ropeTables).
    public var cos: UnsafePointer<Float>
    public var sin: UnsafePointer<Float>
    /// bf16 kernels for the products over many rows, or nil: f32.
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
    /// attached one, the per-row adapters of a batch; none at all for the base model). `attend` runs attention on act.q, act.k and act.v (rotated) into act.attn. `out == nil` is training's
    /// recomputation under gradient checkpointing, which needs every activation but not the output: the
    /// frozen part of down_proj (a quarter of the block's weights) is skipped, its LoRA still runs (its t is kept).
    public func forward(_ h: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>?, _ act: BlockActivations, _ s: BlockScratch,
                        config c: LlamaConfig, _ call: BlockCall, lora updates: (Projection, (LoRAUpdate) -> Void) -> Void,
                        attend: () -> Void) {
        let n = call.rows, D = c.hiddenSize, I = c.intermediateSize, qDim = c.headCount * c.headDim
        let bf16 = call.bf16, kernels = call.kernels
        func lora(_ p: Projection, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>) {
            let linear = p.linear(in: self)
            updates(p) { $0.forward(x, rows: n, inFeatures: linear.inFeatures, outFeatures: linear.outFeatures, into: y, kernels: kernels) }
        }
        norm(inputNorm, act.x1, rstd: act.rstd1, h, rows: n, config: c)
        var xb = call.converted(act.x1, cols: D, s)
        Linear.frozenForwardShared(act.x1, converted: xb, rows: n, prepared: s.prepared, scratch: s.tile, packed: s.packed,
                                   q, act.q, k, act.k, v, act.v, bf16: bf16, kernels: kernels)
        lora(.q, act.x1, act.q)
        lora(.k, act.x1, act.k)
        lora(.v, act.x1, act.v)
        Ops.rope(act.q, rows: n, heads: c.headCount, headDim: c.headDim, cos: call.cos, sin: call.sin)
        Ops.rope(act.k, rows: n, heads: c.kvHeadCount, headDim: c.headDim, cos: call.cos, sin: call.sin)
        attend()
        xb = call.converted(act.attn, cols: qDim, s)
        o.frozenForward(act.attn, converted: xb, rows: n, into: s.proj, scratch: s.tile, packed: s.packed, bf16: bf16, kernels: kernels)
        lora(.o, act.attn, s.proj)
        let h2 = act.h2, proj = s.proj
        elementwise(n * D) { r in for i in r { h2[i] = h[i] + proj[i] } }
        norm(postAttentionNorm, act.x2, rstd: act.rstd2, act.h2, rows: n, config: c)
        xb = call.converted(act.x2, cols: D, s)
        Linear.frozenForwardShared(act.x2, converted: xb, rows: n, prepared: s.prepared, scratch: s.tile, packed: s.packed,
                                   gate, act.g, up, act.u, bf16: bf16, kernels: kernels)
        lora(.gate, act.x2, act.g)
        lora(.up, act.x2, act.u)
        Ops.swigluForward(act.a, gate: act.g, up: act.u, count: n * I, kernels: kernels)
        if out != nil {
            xb = call.converted(act.a, cols: I, s)
            down.frozenForward(act.a, converted: xb, rows: n, into: s.proj, scratch: s.tile, packed: s.packed, bf16: bf16, kernels: kernels)
        }
        lora(.down, act.a, s.proj)
        if let out { elementwise(n * D) { r in for i in r { out[i] = h2[i] + proj[i] } } }
    }

    /// y = RMSNorm(x) with this block's weight w, keeping the reciprocal RMS per row when asked.
    func norm(_ w: [Float], _ y: UnsafeMutablePointer<Float>, rstd: UnsafeMutablePointer<Float>?, _ x: UnsafePointer<Float>, rows: Int,
              config c: LlamaConfig) {
        w.withUnsafeBufferPointer { Ops.rmsNormForward(y, rstd: rstd, x, weight: $0.baseAddress!, rows: rows, dim: c.hiddenSize, eps: c.rmsNormEps) }
    }
}
