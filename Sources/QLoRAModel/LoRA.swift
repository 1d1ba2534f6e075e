// The low-rank update of a projection, forward and backward, written once for every caller: an adapter
// attached for inference, the per-row adapters of a batch that serves several finetunes, and the adapter
// being trained (with dropout on its input, and its gradients).
//   y  += s · t Bᵀ,  t = drop(x) Aᵀ           A [r, in], B [out, r], s = alpha / r (or alpha / √r)
//   dB += s · dyᵀ t,  dt = s · dy B,  dA += dtᵀ drop(x),  dx += (dt A) ⊙ mask / (1 − p)
// DoRA (Liu et al. 2024, as PEFT computes it) scales each output of the adapted projection by g = m / ‖W + s·BA‖
// (the row's norm, not differentiated): y = g ⊙ (W x + s·B A x) + b without dropout; with dropout PEFT adds
// g ⊙ (W d + s·B A d) − W d to W x + b, d = drop(x) (DoRA.swift has that form and the backward).
import QLoRACore
import QLoRAKernels

/// LoRA dropout on the input of the adapter in training: drop(x) = x · mask / (1 − p), the mask drawn from
/// `seed` (one stream per block of rows, so it is the same on any thread count and when a layer is
/// recomputed) and kept for the backward.
public struct LoRADropout {
    public var probability: Float
    public var seed: UInt64
    /// [rows, in], 1 where kept.
    public var mask: UnsafeMutablePointer<UInt8>
    /// Scratch [rows, in] for drop(x).
    public var dropped: UnsafeMutablePointer<Float>

    public init(probability: Float, seed: UInt64, mask: UnsafeMutablePointer<UInt8>, dropped: UnsafeMutablePointer<Float>) {
        self.probability = probability
        self.seed = seed
        self.mask = mask
        self.dropped = dropped
    }

    /// Rows of a mask drawn from one generator.
    static let blockRows = 16

    /// 1 / (1 − p), the scale of a kept element.
    var keep: Float { 1 / (1 - probability) }
}

/// One adapter's update of a projection over rows `rows` of a call (all rows when nil).
public struct LoRAUpdate {
    public var a: UnsafePointer<Float>
    public var b: UnsafePointer<Float>
    public var rank: Int
    public var scale: Float
    public var rows: Range<Int>?
    /// Where t = drop(x) Aᵀ [rows, r] is kept for the backward (training), or nil: a temporary.
    public var t: UnsafeMutablePointer<Float>?
    public var dropout: LoRADropout?
    /// Training: dA [r, in] and dB [out, r], added to by the backward.
    public var gradA: UnsafeMutablePointer<Float>?
    public var gradB: UnsafeMutablePointer<Float>?
    /// DoRA's magnitude scaling of the update's projection, or nil (plain LoRA).
    public var dora: DoRA?

    /// DoRA's per-output factors for one projection [out] and what training keeps.
    public struct DoRA {
        /// g = m / ‖W + s·BA‖ per output row.
        public var scale: UnsafePointer<Float>
        /// The projection's bias (g scales W x + s·BA x only), or nil.
        public var bias: UnsafePointer<Float>?
        /// Training: 1 / ‖W + s·BA‖ per row, z = W d + s·B A d [rows, out] kept by the forward, and dm [out].
        public var inverseNorm: UnsafePointer<Float>?
        public var z: UnsafeMutablePointer<Float>?
        public var gradMagnitude: UnsafeMutablePointer<Float>?

        public init(scale: UnsafePointer<Float>, bias: UnsafePointer<Float>? = nil, inverseNorm: UnsafePointer<Float>? = nil,
                    z: UnsafeMutablePointer<Float>? = nil, gradMagnitude: UnsafeMutablePointer<Float>? = nil) {
            self.scale = scale; self.bias = bias; self.inverseNorm = inverseNorm; self.z = z; self.gradMagnitude = gradMagnitude
        }
    }

    public init(a: UnsafePointer<Float>, b: UnsafePointer<Float>, rank: Int, scale: Float, rows: Range<Int>? = nil,
                t: UnsafeMutablePointer<Float>? = nil, dropout: LoRADropout? = nil,
                gradA: UnsafeMutablePointer<Float>? = nil, gradB: UnsafeMutablePointer<Float>? = nil, dora: DoRA? = nil) {
        self.a = a
        self.b = b
        self.rank = rank
        self.scale = scale
        self.rows = rows
        self.t = t
        self.dropout = dropout
        self.gradA = gradA
        self.gradB = gradB
        self.dora = dora
    }

    /// Inputs of at most this many rows take the matrix-vector form (each row of A and of B read once and
    /// dotted with every input row) instead of BLAS, which packs all of B for a product with one or two
    /// rows (measured in serve: r 64 on every projection of the default model added 13 ms to a 10 ms token
    /// through BLAS, Zen 3).
    public static let fewRows = Linear.batchedRowLimit

    /// Adapters of at least this many floats (A and B together) split their few-row products over the workers.
    static let parallelFloats = 1 << 16

    /// y += s · (drop(x) Aᵀ) Bᵀ for the update's rows of x [n, in] and y [n, out] (n the call's rows); with DoRA
    /// (no dropout: DoRA.swift has that form), y = g ⊙ (y − b + s · (x Aᵀ) Bᵀ) + b, keeping the parenthesis in z.
    public func forward(_ x: UnsafePointer<Float>, rows n: Int, inFeatures inF: Int, outFeatures outF: Int,
                        into y: UnsafeMutablePointer<Float>, kernels: KernelTable = .current) {
        let range = rows ?? 0..<n
        guard !range.isEmpty else { return }
        let x = x + range.lowerBound * inF, y = y + range.lowerBound * outF, n = range.count
        if let dora {
            precondition(dropout == nil, "DoRA with dropout runs through Linear.doraDropoutForward")
            var plain = self
            plain.dora = nil
            plain.rows = nil
            func run(_ z: UnsafeMutablePointer<Float>) {
                dora.unscaled(y, rows: n, outFeatures: outF, into: z)
                plain.forward(x, rows: n, inFeatures: inF, outFeatures: outF, into: z, kernels: kernels)
                dora.rescale(z, rows: n, outFeatures: outF, into: y)
            }
            if let z = dora.z { run(z + range.lowerBound * outF) } else {
                withUnsafeTemporaryAllocation(of: Float.self, capacity: n * outF) { run($0.baseAddress!) }
            }
            return
        }
        var input = x
        if let dropout {
            dropout.draw(x, rows: n, inFeatures: inF, kernels: kernels)
            input = UnsafePointer(dropout.dropped)
        }
        func run(_ t: UnsafeMutablePointer<Float>) {
            if n <= Self.fewRows {
                fewRowsForward(input, rows: n, inF: inF, outF: outF, t: t, into: y)
            } else {
                // t = drop(x) Aᵀ [n, r]; y += s · t Bᵀ
                Gemm.parallelGemm(t, ldc: rank, input, lda: inF, a, ldb: inF, m: n, n: rank, k: inF, transposeB: true)
                Gemm.parallelGemm(y, ldc: outF, t, lda: rank, b, ldb: rank, m: n, n: outF, k: rank, transposeB: true, alpha: scale, beta: 1)
            }
        }
        if let t { run(t) } else { withUnsafeTemporaryAllocation(of: Float.self, capacity: n * rank) { run($0.baseAddress!) } }
    }

    /// The few-row form: each row of A, then of B, dotted with every row (rows of A and B split over the
    /// workers for large adapters).
    private func fewRowsForward(_ x: UnsafePointer<Float>, rows n: Int, inF: Int, outF: Int, t: UnsafeMutablePointer<Float>,
                                into y: UnsafeMutablePointer<Float>) {
        let r = rank, scale = scale, a = a, b = b
        let parallel = r * (inF + outF) >= Self.parallelFloats
        func rowsOfA(_ range: Range<Int>) {
            for j in range {
                for i in 0..<n { t[i * r + j] = dotF32(x + i * inF, a + j * inF, inF) }
            }
        }
        if parallel { Parallel.forPieces(count: r, piece: max(1, r / (2 * Parallel.threadCount)), rowsOfA) } else { rowsOfA(0..<r) }
        let tc = UnsafePointer(t)
        func rowsOfB(_ range: Range<Int>) {
            for o in range {
                for i in 0..<n { y[i * outF + o] += scale * dotF32(tc + i * r, b + o * r, r) }
            }
        }
        if parallel { Parallel.forPieces(count: outF, piece: Linear.gemvPieceRows, rowsOfB) } else { rowsOfB(0..<outF) }
    }

    /// Given dy [n, out] for the update's rows, adds dA and dB (the update's gradA and gradB, which the
    /// training update must have) and dx += the input gradient through the adapter. `x` is the input the
    /// forward saw, `t` and the dropout mask are as it kept them; `dt` [n, r] and `through` [n, in] are scratch.
    public func backward(_ dy: UnsafePointer<Float>, input x: UnsafePointer<Float>, rows n: Int, inFeatures inF: Int, outFeatures outF: Int,
                         dx: UnsafeMutablePointer<Float>, dt: UnsafeMutablePointer<Float>, through: UnsafeMutablePointer<Float>) {
        guard let gradA, let gradB, let t else { preconditionFailure("LoRA backward of an update without gradients or kept t") }
        let range = rows ?? 0..<n
        guard !range.isEmpty else { return }
        let x = x + range.lowerBound * inF, dy = dy + range.lowerBound * outF, dx = dx + range.lowerBound * inF, n = range.count
        let r = rank, s = scale
        var input = x
        if let dropout {
            // drop(x) again from x and the kept mask, as the dropout kernel wrote it: x · keep where kept, +0
            // where dropped (whatever x holds).
            let dropped = dropout.dropped, m = dropout.mask, keep = dropout.keep
            elementwise(n * inF) { range in for i in range { dropped[i] = m[i] != 0 ? x[i] * keep : 0 } }
            input = UnsafePointer(dropped)
        }
        // dB += s · dyᵀ t   [out, r]
        Gemm.parallelGemm(gradB, ldc: r, dy, lda: outF, t, ldb: r, m: outF, n: r, k: n, transposeA: true, alpha: s, beta: 1)
        // dt = s · dy B   [n, r]
        Gemm.parallelGemm(dt, ldc: r, dy, lda: outF, b, ldb: r, m: n, n: r, k: outF, alpha: s)
        // dA += dtᵀ drop(x)   [r, in]
        Gemm.parallelGemm(gradA, ldc: inF, dt, lda: r, input, ldb: inF, m: r, n: inF, k: n, transposeA: true, beta: 1)
        // dx += (dt A) ⊙ mask / (1 − p)
        if let dropout {
            let mask = dropout.mask, keep = dropout.keep
            Gemm.parallelGemm(through, ldc: inF, dt, lda: r, a, ldb: inF, m: n, n: inF, k: r)
            elementwise(n * inF) { range in for i in range { dx[i] += through[i] * (Float(mask[i]) * keep) } }
        } else {
            Gemm.parallelGemm(dx, ldc: inF, dt, lda: r, a, ldb: inF, m: n, n: inF, k: r, beta: 1)
        }
    }
}

extension LoRAUpdate.DoRA {
    /// z = y − b over rows x [out].
    func unscaled(_ y: UnsafePointer<Float>, rows n: Int, outFeatures outF: Int, into z: UnsafeMutablePointer<Float>) {
        z.update(from: y, count: n * outF)
        guard let bias else { return }
        byRows(n) { r in for o in 0..<outF { z[r * outF + o] -= bias[o] } }
    }

    /// y = g ⊙ z + b.
    func rescale(_ z: UnsafePointer<Float>, rows n: Int, outFeatures outF: Int, into y: UnsafeMutablePointer<Float>) {
        let g = scale, bias = bias
        byRows(n) { r in
            let yr = y + r * outF, zr = z + r * outF
            if let bias { for o in 0..<outF { yr[o] = g[o] * zr[o] + bias[o] } } else { for o in 0..<outF { yr[o] = g[o] * zr[o] } }
        }
    }
}

/// body(r) for each row r < n, rows split over our threads.
func byRows(_ n: Int, _ body: (Int) -> Void) {
    Parallel.forChunks(count: n, granularity: 1, minimumChunk: 8) { _, range in for r in range { body(r) } }
}

extension LoRADropout {
    /// Draws the mask for x [rows, in] and writes drop(x). Each 64-bit draw gives four 16-bit uniforms u; an
    /// element is dropped when u < ⌈p · 2¹⁶⌉, i.e. with probability p rounded up to a multiple of 2⁻¹⁶ (0.05 ->
    /// 0.050003). Each block of rows draws from its own SplitMix64 stream (`KernelTable.dropout`, vectorized),
    /// started from the block's seed.
    func draw(_ x: UnsafePointer<Float>, rows n: Int, inFeatures inF: Int, kernels: KernelTable) {
        let threshold = UInt32((Double(probability) * 65_536).rounded(.up))
        let keep = keep, seed = seed, mask = mask, dropped = dropped
        let blockRows = Self.blockRows
        let draw = kernels.dropout
        Parallel.forChunks(count: n, granularity: blockRows) { _, range in
            for r0 in stride(from: range.lowerBound, to: range.upperBound, by: blockRows) {
                var rng = SeededGenerator(seed: seed &+ UInt64(r0 / blockRows) &* 0xD1B5_4A32_D192_ED03)
                let start = r0 * inF, end = min(range.upperBound, r0 + blockRows) * inF
                draw(x + start, mask + start, dropped + start, end - start, rng.next(), threshold, keep)
            }
        }
    }
}

/// An elementwise loop over 0..<count, split over our threads (each element written by one thread).
func elementwise(_ count: Int, _ body: (Range<Int>) -> Void) {
    Parallel.forChunks(count: count, granularity: 64, minimumChunk: 1 << 15) { _, r in body(r) }
}
