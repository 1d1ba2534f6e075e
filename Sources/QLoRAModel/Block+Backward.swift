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
    /// The input gradient of an optional norm (q/k head norms, output norms), [rows, max(D, qDim)]: nil for a
    /// model without them.
    public var dNorm: UnsafeMutablePointer<Float>?
    /// DoRA: g ⊙ dy [rows, widest output], or nil without DoRA.
    public var dora: UnsafeMutablePointer<Float>?

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
        let qDim = c.qDim, kvDim = c.kvDim
        let kernels = call.kernels
        /// dx += dy · W, and each update's backward (DoRA's: the whole projection's, DoRA.swift).
        func backward(_ p: Projection, dy: UnsafePointer<Float>, input x: UnsafePointer<Float>, dx: UnsafeMutablePointer<Float>) {
            guard let linear = self[p] else { return }
            var dora: LoRAUpdate?
            updates(p) { if $0.dora != nil { dora = $0 } }
            if let dora {
                linear.doraBackward(dora, dy, input: x, rows: n, dx: dx, g, s, call)
                return
            }
            let dyb = call.converted(dy, cols: linear.outFeatures, s, always: true)
            linear.inputGradient(dy, converted: dyb, rows: n, into: dx, scratch: s.tile, packed: s.packed, bf16: call.bf16, kernels: kernels)
            updates(p) {
                $0.backward(dy, input: x, rows: n, inFeatures: linear.inFeatures, outFeatures: linear.outFeatures, dx: dx, dt: g.dt, through: g.through)
            }
        }
        /// The gradient at the input of an output norm w given the gradient at its output: g.dNorm.
        func throughNorm(_ w: [Float], _ dy: UnsafePointer<Float>, input x: UnsafeMutablePointer<Float>?, rstd: UnsafeMutablePointer<Float>?) -> UnsafePointer<Float> {
            let d = g.dNorm!
            d.update(repeating: 0, count: n * D)
            normBackward(w, d, dy, x!, rstd: rstd!, rows: n, dim: D)
            return UnsafePointer(d)
        }
        // out = h2 + N_m(down(a)), a = act(gate(x2)) ⊙ up(x2)
        let dDown = mlpOutputNorm.map { throughNorm($0, dOut, input: act.mlpOut, rstd: act.rstdMLPOut) } ?? dOut
        g.da.update(repeating: 0, count: n * I)
        backward(.down, dy: dDown, input: act.a, dx: g.da)
        switch c.activation {
        case .silu: Ops.swigluBackward(dGate: g.dg, dUp: g.du, g.da, gate: act.g, up: act.u, count: n * I, kernels: kernels)
        case .geluTanh:
            let dg = g.dg, du = g.du, da = g.da, gate = act.g, up = act.u
            elementwise(n * I) { r in
                let o = r.lowerBound
                Ops.gegluBackward(dGate: dg + o, dUp: du + o, da + o, gate: gate + o, up: up + o, count: r.count, kernels: kernels)
            }
        }
        g.dx2.update(repeating: 0, count: n * D)
        if self[.gateUp] != nil {
            Self.gather([(UnsafePointer(g.dg), I), (UnsafePointer(g.du), I)], rows: n, into: s.fused!)
            backward(.gateUp, dy: s.fused!, input: act.x2, dx: g.dx2)
        } else {
            backward(.gate, dy: g.dg, input: act.x2, dx: g.dx2)
            backward(.up, dy: g.du, input: act.x2, dx: g.dx2)
        }
        g.dh2.update(from: dOut, count: n * D)  // the residual
        normBackward(mlpNorm, g.dh2, g.dx2, act.h2, rstd: act.rstd2!, rows: n, dim: D)
        // h2 = h + N_a(o(attn))
        let dO = attentionOutputNorm.map { throughNorm($0, g.dh2, input: act.attnOut, rstd: act.rstdAttnOut) } ?? UnsafePointer(g.dh2)
        g.dAttn.update(repeating: 0, count: n * qDim)
        backward(.o, dy: dO, input: act.attn, dx: g.dAttn)
        g.dk.update(repeating: 0, count: n * kvDim)
        g.dv.update(repeating: 0, count: n * kvDim)
        attendBackward()
        Ops.rope(g.dq, rows: n, heads: c.headCount, headDim: c.headDim, rotaryDim: c.rotaryDim, cos: call.cos, sin: call.sin, inverse: true)
        Ops.rope(g.dk, rows: n, heads: c.kvHeadCount, headDim: c.headDim, rotaryDim: c.rotaryDim, cos: call.cos, sin: call.sin, inverse: true)
        if let qNorm, let kNorm {
            // Through the per-head norms: d(q before its norm), in place of dq (and the same for k).
            for (w, grad, x, rstd, width, heads) in [(qNorm, g.dq, act.qPre!, act.rstdQ!, qDim, c.headCount),
                                                     (kNorm, g.dk, act.kPre!, act.rstdK!, kvDim, c.kvHeadCount)] {
                let d = g.dNorm!
                d.update(repeating: 0, count: n * width)
                normBackward(w, d, grad, x, rstd: rstd, rows: n * heads, dim: c.headDim)
                grad.update(from: d, count: n * width)
            }
        }
        // q, k, v = projections of x1 = norm(h)
        g.dx1.update(repeating: 0, count: n * D)
        if self[.qkv] != nil {
            Self.gather([(UnsafePointer(g.dq), qDim), (UnsafePointer(g.dk), kvDim), (UnsafePointer(g.dv), kvDim)], rows: n, into: s.fused!)
            backward(.qkv, dy: s.fused!, input: act.x1, dx: g.dx1)
        } else {
            backward(.q, dy: g.dq, input: act.x1, dx: g.dx1)
            backward(.k, dy: g.dk, input: act.x1, dx: g.dx1)
            backward(.v, dy: g.dv, input: act.x1, dx: g.dx1)
        }
        dIn.update(from: g.dh2, count: n * D)  // the residual
        normBackward(inputNorm, dIn, g.dx1, h, rstd: act.rstd1!, rows: n, dim: D)
    }

    /// dx += the RMSNorm backward of dy (weight w, input x [rows, dim], the forward's reciprocal RMS).
    func normBackward(_ w: [Float], _ dx: UnsafeMutablePointer<Float>, _ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>,
                      rstd: UnsafePointer<Float>, rows: Int, dim: Int) {
        w.withUnsafeBufferPointer { Ops.rmsNormBackward(dx, dy, x, rstd: rstd, weight: $0.baseAddress!, rows: rows, dim: dim) }
    }
}
