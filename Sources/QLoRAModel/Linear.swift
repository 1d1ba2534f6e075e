// A linear layer y = x Wᵀ + b whose weight W [out, in] is either frozen 4-bit (the QLoRA base) or dense
// f32 (`--quant-type none`, reference runs). Many rows (prefill, training) dequantize W tile by tile into
// a reused buffer and multiply with BLAS; one row (decoding) uses the fused dequantize-and-dot kernel.
import QLoRACore
import QLoRAKernels

public struct Linear: Sendable {
    public enum Weight: Sendable {
        case dense([Float])
        /// The 4-bit weight; double-quantized block scales are decoded tile by tile as they are used
        /// (keeping them decoded would cost another 0.5 bits per parameter).
        case quantized(Quantized4Bit)
        /// bfloat16 (embeddings and the LM head of big models, as QLoRA keeps them in its compute dtype).
        case bf16([UInt16])
    }

    /// A low-rank update: y += scale · (x Aᵀ) Bᵀ, A [r, in], B [out, r] (LoRA, Hu et al. 2021).
    public struct LoRA: Sendable {
        public var a: [Float]
        public var b: [Float]
        public var rank: Int
        public var scale: Float

        public init(a: [Float], b: [Float], rank: Int, scale: Float) {
            self.a = a
            self.b = b
            self.rank = rank
            self.scale = scale
        }
    }

    public let outFeatures: Int
    public let inFeatures: Int
    public var weight: Weight
    public var bias: [Float]?
    public var lora: LoRA?

    public init(weight: Weight, outFeatures: Int, inFeatures: Int, bias: [Float]? = nil) {
        self.weight = weight
        self.outFeatures = outFeatures
        self.inFeatures = inFeatures
        self.bias = bias
    }

    /// Bytes held by the weight (codes and constants; or f32).
    public var weightBytes: Int {
        switch weight {
        case let .dense(w): return w.count * 4
        case let .quantized(q): return q.storedByteCount
        case let .bf16(w): return w.count * 2
        }
    }

    /// Row `r` of W as f32 (an embedding lookup; dense or bf16 weights).
    public func copyRow(_ r: Int, into out: UnsafeMutablePointer<Float>) {
        switch weight {
        case let .dense(w): w.withUnsafeBufferPointer { out.update(from: $0.baseAddress! + r * inFeatures, count: inFeatures) }
        case let .bf16(w): for j in 0..<inFeatures { out[j] = bfloat16BitsToFloat(w[r * inFeatures + j]) }
        case .quantized: preconditionFailure("row lookup in a 4-bit weight")
        }
    }

    /// Dequantizes rows `rows` of a 4-bit W into `out` ([rows.count, in]), decoding their block scales
    /// into `scaleScratch` (at least `scaleScratchCount(rows: rows.count)` floats).
    public func dequantizeRows(_ rows: Range<Int>, into out: UnsafeMutablePointer<Float>, scaleScratch: UnsafeMutablePointer<Float>,
                               kernels: KernelTable = .current) {
        let elements = (rows.lowerBound * inFeatures)..<(rows.upperBound * inFeatures)
        switch weight {
        case let .quantized(q): q.dequantize(elements: elements, into: out, scaleScratch: scaleScratch, kernels: kernels)
        case let .bf16(w):
            w.withUnsafeBufferPointer { src in
                Parallel.forChunks(count: elements.count, minimumChunk: 1 << 16) { _, range in
                    for i in range { out[i] = bfloat16BitsToFloat(src[elements.lowerBound + i]) }
                }
            }
        case .dense: preconditionFailure("dequantizeRows on a dense weight")
        }
    }

    /// Scale floats that dequantizing `rows` rows may need (a tile can straddle block boundaries).
    public func scaleScratchCount(rows: Int) -> Int {
        guard case let .quantized(q) = weight else { return 0 }
        return rows * inFeatures / q.blockSize + 2
    }

    /// Rows of W dequantized per tile. Few input rows (prefill, small batches): about 256 KB of f32, so a
    /// tile stays in L2 while BLAS reads it. Many rows (training): about 8 MB, so BLAS packs the
    /// activations once per few hundred weight rows instead of once per hundred.
    public func tileRows(forRows rows: Int) -> Int {
        let budget = rows >= 64 ? 8 << 20 : 256 << 10
        return max(8, min(outFeatures, budget / max(4 * inFeatures, 1)))
    }

    /// Calls `body(tile, w)` for consecutive tiles of W's rows (`tileRows(forRows:)` each), `w` the tile as
    /// f32 [tile.count, in]: a dense W's own rows, or the rows dequantized into `scratch` (which must hold
    /// `scratchCount` floats). The tile loop of every product with many rows of input.
    public func forEachTile(forRows n: Int, scratch: UnsafeMutablePointer<Float>, kernels: KernelTable = .current,
                            _ body: (Range<Int>, UnsafePointer<Float>) -> Void) {
        let tile = tileRows(forRows: n)
        for r0 in stride(from: 0, to: outFeatures, by: tile) {
            let rows = r0..<min(outFeatures, r0 + tile)
            if case let .dense(w) = weight {
                w.withUnsafeBufferPointer { body(rows, $0.baseAddress! + r0 * inFeatures) }
            } else {
                dequantizeRows(rows, into: scratch, scaleScratch: scratch + tile * inFeatures, kernels: kernels)
                body(rows, scratch)
            }
        }
    }

    /// y[r] += b for each of `rows` rows of y [rows, out] (nothing without a bias).
    public func addBias(to y: UnsafeMutablePointer<Float>, rows: Int) {
        guard let bias else { return }
        bias.withUnsafeBufferPointer { b in
            for r in 0..<rows {
                let row = y + r * outFeatures
                for j in 0..<outFeatures { row[j] += b[j] }
            }
        }
    }

    /// y[rows, out] = x[rows, in] Wᵀ + b. `scratch` must hold `scratchCount` floats when the
    /// weight is quantized and rows > 1.
    public func forward(_ x: UnsafePointer<Float>, rows: Int, into y: UnsafeMutablePointer<Float>,
                        scratch: UnsafeMutablePointer<Float>, kernels: KernelTable = .current) {
        switch weight {
        case let .dense(w):
            w.withUnsafeBufferPointer { wp in
                if rows == 1 {
                    Gemm.gemv(y, wp.baseAddress!, lda: inFeatures, x, m: outFeatures, n: inFeatures)
                } else {
                    Gemm.gemm(y, ldc: outFeatures, x, lda: inFeatures, wp.baseAddress!, ldb: inFeatures,
                              m: rows, n: outFeatures, k: inFeatures, transposeB: true)
                }
            }
        case .quantized, .bf16:
            if rows == 1, case let .quantized(q) = weight, inFeatures % q.blockSize == 0 {
                fusedGemv(q, x, y, kernels: kernels)
            } else {
                forEachTile(forRows: rows, scratch: scratch, kernels: kernels) { tile, w in
                    Gemm.gemm(y + tile.lowerBound, ldc: outFeatures, x, lda: inFeatures, w, ldb: inFeatures,
                              m: rows, n: tile.count, k: inFeatures, transposeB: true)
                }
            }
        }
        addBias(to: y, rows: rows)
        if let lora {
            var t = [Float](repeating: 0, count: rows * lora.rank)
            t.withUnsafeMutableBufferPointer { tp in
                lora.a.withUnsafeBufferPointer { a in
                    Gemm.gemm(tp.baseAddress!, ldc: lora.rank, x, lda: inFeatures, a.baseAddress!, ldb: inFeatures,
                              m: rows, n: lora.rank, k: inFeatures, transposeB: true)
                }
                lora.b.withUnsafeBufferPointer { b in
                    Gemm.gemm(y, ldc: outFeatures, tp.baseAddress!, lda: lora.rank, b.baseAddress!, ldb: lora.rank,
                              m: rows, n: outFeatures, k: lora.rank, transposeB: true, alpha: lora.scale, beta: 1)
                }
            }
        }
    }

    /// Scratch floats `forward` needs: a tile of W and its block scales.
    public var scratchCount: Int {
        switch weight {
        case .quantized:
            let tile = tileRows(forRows: .max)
            return tile * inFeatures + scaleScratchCount(rows: tile)
        case .bf16: return tileRows(forRows: .max) * inFeatures
        case .dense: return 0
        }
    }

    private func fusedGemv(_ q: Quantized4Bit, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>, kernels: KernelTable) {
        let cols = inFeatures
        let blocksPerRow = cols / q.blockSize
        let code = q.quantType.codebook
        q.packed.withUnsafeBufferPointer { p in
            code.withUnsafeBufferPointer { c in
                Parallel.forChunks(count: outFeatures, minimumChunk: 32) { _, range in
                    // The chunk's scales, decoded once (a 64th of the work of the dot products).
                    withUnsafeTemporaryAllocation(of: Float.self, capacity: range.count * blocksPerRow) { s in
                        let a = s.baseAddress!
                        q.decodeScales((range.lowerBound * blocksPerRow)..<(range.upperBound * blocksPerRow), into: a)
                        for r in range {
                            y[r] = kernels.dot4(x, p.baseAddress! + r * cols / 2, a + (r - range.lowerBound) * blocksPerRow,
                                                cols, q.blockSize, c.baseAddress)
                        }
                    }
                }
            }
        }
    }

    /// W as f32 [out, in] (dequantized if needed).
    public func denseWeight() -> [Float] {
        switch weight {
        case let .dense(w): return w
        case let .quantized(q): return q.dequantize()
        case let .bf16(w): return w.map(bfloat16BitsToFloat)
        }
    }
}
