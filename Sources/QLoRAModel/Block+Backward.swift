// The block's backward, beside its forward (Block.swift) and read against it bottom to top. The frozen
// weights get no gradient: through each projection only dx += dy · W, plus the LoRA updates' own backward,
// which adds their dA and dB. Attention's backward is the caller's (`attendBackward`), as its forward is.
import QLoRACore
import QLoRAKernels

/// The buffers of a block's backward, rows x width each (D hidden, I intermediate, qDim = H·d, kvDim =
/// Hkv·d, r the LoRA rank, in the widest input).
public struct BlockGradients {
    public var da, dg, du: UnsafeMutablePointer<Float>       // [rows, I]
    public var dx2, dh2, dx1: UnsafeMutablePointer<Float>    // [rows, D]
    public var dAttn, dq: UnsafeMutablePointer<Float>        // [rows, qDim]
    public var dk, dv: UnsafeMutablePointer<Float>           // [rows, kvDim]
    /// LoRA scratch: dt [rows, r], and (dt A) [rows, in] before the dropout mask.
    public var dt, through: UnsafeMutablePointer<Float>

    public init(da: UnsafeMutablePointer<Float>, dg: UnsafeMutablePointer<Float>, du: UnsafeMutablePointer<Float>, dx2: UnsafeMutablePointer<Float>,
                dh2: UnsafeMutablePointer<Float>, dx1: UnsafeMutablePointer<Float>, dAttn: UnsafeMutablePointer<Float>, dq: UnsafeMutablePointer<Float>,
                dk: UnsafeMutablePointer<Float>, dv: UnsafeMutablePointer<Float>, dt: UnsafeMutablePointer<Float>, through: UnsafeMutablePointer<Float>) {
        self.da = da; self.dg = dg; self.du = du; self.dx2 = dx2; self.dh2 = dh2; self.dx1 = dx1
        self.dAttn = dAttn; self.dq = dq; self.dk = dk; self.dv = dv; self.dt = dt; self.through = through
    }
}

extension LlamaLayer {
    /// Given dOut = dL/d(block output), writes dL/d(block input) into dIn and adds the LoRA updates' gradients.
    /// `h` is the block's input and `act` what its forward kept (recomputed under checkpointing); `lora` names
    /// the same updates as in the forward, with their gradients. `attendBackward` reads g.dAttn and writes g.dq
    /// and adds to g.dk and g.dv (zeroed here first), all in rotated coordinates.
    public func backward(_ h: UnsafePointer<Float>, _ act: BlockActivations, dOut: UnsafePointer<Float>, dIn: UnsafeMutablePointer<Float>,
                         _ g: BlockGradients, _ s: BlockScratch, config c: LlamaConfig, _ call: BlockCall,
                         lora updates: (Projection, (LoRAUpdate) -> Void) -> Void, attendBackward: () -> Void) {
        let n = call.rows, D = c.hiddenSize, I = c.intermediateSize
        let qDim = c.headCount * c.headDim, kvDim = c.kvHeadCount * c.headDim
        let kernels = call.kernels
        /// dx += dy · W, and each update's backward.
        func backward(_ p: Projection, dy: UnsafePointer<Float>, input x: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>) {
            let linear = p.linear(in: self)
            let dyb = call.converted(dy, cols: linear.outFeatures, s, always: true)
            linear.inputGradient(dy, converted: dyb, rows: n, into: dx, scratch: s.tile, packed: s.packed, bf16: call.bf16, kernels: kernels)
            updates(p) {
                $0.backward(dy, input: x, rows: n, inFeatures: linear.inFeatures, outFeatures: linear.outFeatures, dx: dx, dt: g.dt, through: g.through)
            }
        }
        // out = h2 + down(a), a = silu(gate(x2)) ⊙ up(x2)
        g.da.update(repeating: 0, count: n * I)
        backward(.down, dy: dOut, input: act.a, dx: g.da)
        Ops.swigluBackward(dGate: g.dg, dUp: g.du, g.da, gate: act.g, up: act.u, count: n * I, kernels: kernels)
        g.dx2.update(repeating: 0, count: n * D)
        backward(.gate, dy: g.dg, input: act.x2, dx: g.dx2)
        backward(.up, dy: g.du, input: act.x2, dx: g.dx2)
        g.dh2.update(from: dOut, count: n * D)  // the residual
        normBackward(postAttentionNorm, g.dh2, g.dx2, act.h2, rstd: act.rstd2!, rows: n, config: c)
        // h2 = h + o(attn)
        g.dAttn.update(repeating: 0, count: n * qDim)
        backward(.o, dy: g.dh2, input: act.attn, dx: g.dAttn)
        g.dk.update(repeating: 0, count: n * kvDim)
        g.dv.update(repeating: 0, count: n * kvDim)
        attendBackward()
        Ops.rope(g.dq, rows: n, heads: c.headCount, headDim: c.headDim, cos: call.cos, sin: call.sin, inverse: true)
        Ops.rope(g.dk, rows: n, heads: c.kvHeadCount, headDim: c.headDim, cos: call.cos, sin: call.sin, inverse: true)
        // q, k, v = projections of x1 = norm(h)
        g.dx1.update(repeating: 0, count: n * D)
        backward(.q, dy: g.dq, input: act.x1, dx: g.dx1)
        backward(.k, dy: g.dk, input: act.x1, dx: g.dx1)
        backward(.v, dy: g.dv, input: act.x1, dx: g.dx1)
        dIn.update(from: g.dh2, count: n * D)  // the residual
        normBackward(inputNorm, dIn, g.dx1, h, rstd: act.rstd1!, rows: n, config: c)
    }

    /// dx += the RMSNorm backward of dy (weight w, input x, the forward's reciprocal RMS).
    func normBackward(_ w: [Float], _ dx: UnsafeMutablePointer<Float>, _ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>,
                      rstd: UnsafePointer<Float>, rows: Int, config c: LlamaConfig) {
        w.withUnsafeBufferPointer { Ops.rmsNormBackward(dx, dy, x, rstd: rstd, weight: $0.baseAddress!, rows: rows, dim: c.hiddenSize) }
    }
}
