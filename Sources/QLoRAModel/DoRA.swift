// DoRA (Liu et al. 2024) as PEFT computes it: the adapted weight W + s·BA is split into a direction and a
// trained magnitude m [out], W' = m ⊙ (W + s·BA) / ‖W + s·BA‖, the norm taken over each output row (the
// paper's "column" in its [in, out] layout) and treated as a constant in the backward (the paper's §4.3).
// With g = m / ‖W + s·BA‖ and d the adapter's input (x, or drop(x) in training with dropout):
//   y = W x + b + g ⊙ z − W d,   z = W d + s · (d Aᵀ) Bᵀ
// which is g ⊙ (W x + s·BA x) + b without dropout (LoRAUpdate.forward). Backward, e = g ⊙ dy:
//   dm += Σ_rows dy ⊙ z / ‖·‖,   through z: the LoRA backward of e,   dx += W ᵀdy + mask ⊙ Wᵀ((g − 1) ⊙ dy) / (1 − p)
// (without dropout the last is dx += Wᵀ e).
import QLoRACore
import QLoRAKernels

extension Linear {
    /// ‖W + s·BA‖ per output row [out] (sums in f64), W dequantized tile by tile; A [r, in], B [out, r].
    public func doraNorms(a: UnsafePointer<Float>, b: UnsafePointer<Float>, rank: Int, scale: Float, kernels: KernelTable = .current) -> [Float] {
        var norms = [Float](repeating: 0, count: outFeatures)
        let inF = inFeatures, tile = tileRows(forRows: .max)
        norms.withUnsafeMutableBufferPointer { normsBuffer in
            let out = normsBuffer.baseAddress!
            withUnsafeTemporaryAllocation(of: Float.self, capacity: max(scratchCount, 1) + tile * inF) { buffer in
                let scratch = buffer.baseAddress!, delta = scratch + max(scratchCount, 1)
                Gemm.withSingleThreadedBLAS {
                    forEachTile(forRows: .max, scratch: scratch, kernels: kernels) { rows, w in
                        // delta = B[rows] A   [rows, in]
                        Gemm.parallelGemm(delta, ldc: inF, b + rows.lowerBound * rank, lda: rank, a, ldb: inF, m: rows.count, n: inF, k: rank)
                        Parallel.forPieces(count: rows.count, piece: 8) { piece in
                            for r in piece {
                                var sum = 0.0
                                let wr = w + r * inF, dr = delta + r * inF
                                for j in 0..<inF {
                                    let v = Double(wr[j] + scale * dr[j])
                                    sum += v * v
                                }
                                out[rows.lowerBound + r] = Float(sum.squareRoot())
                            }
                        }
                    }
                }
            }
        }
        return norms
    }

    /// DoRA's forward with dropout on the adapter's input (training): y += g ⊙ z − W d, z = W d + s·(d Aᵀ) Bᵀ kept
    /// in the update's z, d = drop(x) drawn into the dropout's buffer.
    public func doraDropoutForward(_ u: LoRAUpdate, _ x: UnsafePointer<Float>, rows n: Int, into y: UnsafeMutablePointer<Float>,
                                   _ s: BlockScratch, _ call: BlockCall) {
        guard let dora = u.dora, let dropout = u.dropout, let z = dora.z, u.rows == nil else {
            preconditionFailure("DoRA dropout forward needs the training update (dropout, kept z, all rows)")
        }
        let outF = outFeatures
        var plain = u
        plain.dora = nil
        z.update(repeating: 0, count: n * outF)
        plain.forward(x, rows: n, inFeatures: inFeatures, outFeatures: outF, into: z, kernels: call.kernels)  // z = s·BA d; d drawn
        func run(_ wd: UnsafeMutablePointer<Float>) {
            frozenForward(dropout.dropped, rows: n, into: wd, scratch: s.tile, packed: s.packed, bf16: call.bf16, kernels: call.kernels)
            let g = dora.scale, bias = dora.bias
            byRows(n) { r in
                let zr = z + r * outF, yr = y + r * outF, wr = wd + r * outF
                for o in 0..<outF {
                    let frozen = wr[o] - (bias?[o] ?? 0)
                    zr[o] += frozen
                    yr[o] += g[o] * zr[o] - frozen
                }
            }
        }
        if let buffer = s.dora { run(buffer) } else { withUnsafeTemporaryAllocation(of: Float.self, capacity: n * outF) { run($0.baseAddress!) } }
    }

    /// DoRA's backward for the training update `u` given dy [n, out]: adds dm, dA and dB, and dx += the whole input
    /// gradient of the projection (the frozen product's too: the caller adds nothing for it). g.dora holds g ⊙ dy.
    public func doraBackward(_ u: LoRAUpdate, _ dy: UnsafePointer<Float>, input x: UnsafePointer<Float>, rows n: Int,
                             dx: UnsafeMutablePointer<Float>, _ g: BlockGradients, _ s: BlockScratch, _ call: BlockCall) {
        guard let dora = u.dora, let z = dora.z, let inverseNorm = dora.inverseNorm, let dm = dora.gradMagnitude, let e = g.dora,
              u.rows == nil else {
            preconditionFailure("DoRA backward needs the training update (kept z, norms, magnitude gradient) and g.dora")
        }
        let outF = outFeatures, inF = inFeatures, scale = dora.scale
        // dm[o] += Σ_r dy[r, o] z[r, o] / ‖·‖[o]
        Parallel.forPieces(count: outF, piece: 64) { piece in
            withUnsafeTemporaryAllocation(of: Float.self, capacity: piece.count) { acc in
                acc.initialize(repeating: 0)
                for r in 0..<n {
                    let dr = dy + r * outF + piece.lowerBound, zr = z + r * outF + piece.lowerBound
                    for i in 0..<piece.count { acc[i] += dr[i] * zr[i] }
                }
                for i in 0..<piece.count { dm[piece.lowerBound + i] += acc[i] * inverseNorm[piece.lowerBound + i] }
            }
        }
        func frozenGradient(_ d: UnsafePointer<Float>, into out: UnsafeMutablePointer<Float>) {
            let converted = call.converted(d, cols: outF, s, always: true)
            inputGradient(d, converted: converted, rows: n, into: out, scratch: s.tile, packed: s.packed, bf16: call.bf16, kernels: call.kernels)
        }
        var plain = u
        plain.dora = nil
        if let dropout = u.dropout {
            frozenGradient(dy, into: dx)
            // e = (g − 1) ⊙ dy; dx += mask ⊙ Wᵀ e / (1 − p); then e = g ⊙ dy
            byRows(n) { r in for o in 0..<outF { e[r * outF + o] = (scale[o] - 1) * dy[r * outF + o] } }
            let through = g.through, mask = dropout.mask, keep = dropout.keep
            through.update(repeating: 0, count: n * inF)
            frozenGradient(e, into: through)
            elementwise(n * inF) { range in for i in range { dx[i] += through[i] * (Float(mask[i]) * keep) } }
            elementwise(n * outF) { range in for i in range { e[i] += dy[i] } }
        } else {
            byRows(n) { r in for o in 0..<outF { e[r * outF + o] = scale[o] * dy[r * outF + o] } }
            frozenGradient(e, into: dx)
        }
        plain.backward(e, input: x, rows: n, inFeatures: inF, outFeatures: outF, dx: dx, dt: g.dt, through: g.through)
    }
}
