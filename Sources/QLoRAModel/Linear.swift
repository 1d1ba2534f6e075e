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
        /// ggml's q8_0: 8-bit codes with a scale per 32 values (the embedding table and LM head at inference;
        /// a GGUF's own q8_0 table is held exactly as stored).
        case q8(Quantized8Bit)
    }

    /// A low-rank update: y += scale · (x Aᵀ) Bᵀ, A [r, in], B [out, r] (LoRA, Hu et al. 2021).
    public struct LoRA: Sendable {
        public var a: [Float]
        public var b: [Float]
        public var rank: Int
        public var scale: Float
        /// DoRA: g = m / ‖W + s·BA‖ per output row, fixed when attached, and the projection's bias (nil: plain LoRA).
        public var doraScale: [Float]?
        public var doraBias: [Float]?

        public init(a: [Float], b: [Float], rank: Int, scale: Float) {
            self.a = a
            self.b = b
            self.rank = rank
            self.scale = scale
        }

        /// The adapter as the update LoRA.swift applies, over `rows` of a call (all when nil).
        public func withUpdate<R>(rows: Range<Int>? = nil, _ body: (LoRAUpdate) -> R) -> R {
            a.withUnsafeBufferPointer { ap in
                b.withUnsafeBufferPointer { bp in
                    var u = LoRAUpdate(a: ap.baseAddress!, b: bp.baseAddress!, rank: rank, scale: scale, rows: rows)
                    guard let doraScale else { return body(u) }
                    return doraScale.withUnsafeBufferPointer { g in
                        func run(_ bias: UnsafePointer<Float>?) -> R {
                            u.dora = LoRAUpdate.DoRA(scale: g.baseAddress!, bias: bias)
                            return body(u)
                        }
                        if let doraBias { return doraBias.withUnsafeBufferPointer { run($0.baseAddress!) } }
                        return run(nil)
                    }
                }
            }
        }
    }

    /// The weight's storage as a short name: f32, bf16, q8_0, or the 4-bit type (nf4, fp4, int4).
    public var storageName: String {
        switch weight {
        case .dense: return "f32"
        case .bf16: return "bf16"
        case .q8: return "q8_0"
        case let .quantized(q): return q.quantType.rawValue
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
        case let .q8(q): return q.storedByteCount
        }
    }

    /// Row `r` of W as f32 (an embedding lookup; dense or bf16 weights).
    public func copyRow(_ r: Int, into out: UnsafeMutablePointer<Float>) {
        switch weight {
        case let .dense(w): w.withUnsafeBufferPointer { out.update(from: $0.baseAddress! + r * inFeatures, count: inFeatures) }
        case let .bf16(w): for j in 0..<inFeatures { out[j] = bfloat16BitsToFloat(w[r * inFeatures + j]) }
        case let .q8(q): q.dequantize(elements: (r * inFeatures)..<((r + 1) * inFeatures), into: out)
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
        case let .q8(q):
            Parallel.forChunks(count: elements.count, granularity: Quantized8Bit.blockSize, minimumChunk: 1 << 16) { _, range in
                let run = (elements.lowerBound + range.lowerBound)..<(elements.lowerBound + range.upperBound)
                q.dequantize(elements: run, into: out + range.lowerBound)
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

    /// y[rows, out] = x[rows, in] Wᵀ + b (+ the attached adapter's update). `scratch` must hold `scratchCount`
    /// floats. `bf16`: the frozen product takes bf16 operands where the kernel table has bf16 kernels
    /// (frozenForward). Call inside Gemm.withSingleThreadedBLAS, as LlamaModel.forward does.
    public func forward(_ x: UnsafePointer<Float>, rows: Int, into y: UnsafeMutablePointer<Float>,
                        scratch: UnsafeMutablePointer<Float>, bf16: Bool = false, kernels: KernelTable = .current) {
        frozenForward(x, rows: rows, into: y, scratch: scratch, bf16: bf16 ? kernels.bf16 : nil, kernels: kernels)
        addLoRA(x, rows: rows, to: y, kernels: kernels)
    }

    /// y[rows, out] = x[rows, in] Wᵀ + b, the frozen product of inference and training alike. A few rows go
    /// through the matrix-vector kernels (the weight read once in its own format; with `bf16` kernels a 4-bit
    /// weight's products take bf16 operands there too, each weight rounded as it is decoded); more rows through tiles
    /// of W dequantized into `scratch` (`scratchCount` floats) and multiplied by BLAS, split over our workers
    /// (Gemm.parallelGemm: call inside Gemm.withSingleThreadedBLAS) or, with `bf16` kernels, on bf16
    /// operands with f32 sums: x converted once (`converted`, when the caller already has it as
    /// `BF16Gemm.convert` writes it, row stride paddedCount(in)), each tile packed into `packed` (at least
    /// `packedWords(forRows:)` words; nil: a temporary).
    public func frozenForward(_ x: UnsafePointer<Float>, converted: UnsafePointer<UInt16>? = nil, rows: Int, into y: UnsafeMutablePointer<Float>,
                              scratch: UnsafeMutablePointer<Float>, packed: UnsafeMutablePointer<UInt32>? = nil, bf16: BF16Kernels?,
                              kernels: KernelTable = .current) {
        if rows <= Self.batchedRowLimit && gemvSupported {
            gemv(x, rows: rows, y, bf16: bf16, kernels: kernels)
        } else if let bf16 {
            let pad = BF16Gemm.paddedCount(inFeatures)
            withBF16Operands(x, converted: converted, rows: rows, packed: packed, bf16: bf16) { xb, packed in
                forEachTile(forRows: rows, scratch: scratch, kernels: kernels) { tile, w in
                    BF16Gemm.packB(w, ldb: inFeatures, transposed: true, k: inFeatures, n: tile.count, into: packed, kernels: bf16)
                    BF16Gemm.gemm(y + tile.lowerBound, ldc: outFeatures, xb, lda: pad, packed, m: rows, n: tile.count, k: inFeatures,
                                  accumulate: false, kernels: bf16)
                }
            }
        } else if case let .dense(w) = weight {
            w.withUnsafeBufferPointer { wp in
                if rows == 1 {
                    Gemm.gemv(y, wp.baseAddress!, lda: inFeatures, x, m: outFeatures, n: inFeatures)
                } else {
                    Gemm.parallelGemm(y, ldc: outFeatures, x, lda: inFeatures, wp.baseAddress!, ldb: inFeatures,
                                      m: rows, n: outFeatures, k: inFeatures, transposeB: true)
                }
            }
        } else {
            forEachTile(forRows: rows, scratch: scratch, kernels: kernels) { tile, w in
                Gemm.parallelGemm(y + tile.lowerBound, ldc: outFeatures, x, lda: inFeatures, w, ldb: inFeatures,
                                  m: rows, n: tile.count, k: inFeatures, transposeB: true)
            }
        }
        addBias(to: y, rows: rows)
    }

    /// dx[rows, in] += dy[rows, out] · W: the input gradient through the frozen weight (it gets no gradient
    /// of its own), each tile of W's rows a slice of the sum over out. bf16 as in `frozenForward` (dy converted
    /// once, `converted` with row stride paddedCount(out)).
    public func inputGradient(_ dy: UnsafePointer<Float>, converted: UnsafePointer<UInt16>? = nil, rows: Int, into dx: UnsafeMutablePointer<Float>,
                              scratch: UnsafeMutablePointer<Float>, packed: UnsafeMutablePointer<UInt32>? = nil, bf16: BF16Kernels?,
                              kernels: KernelTable = .current) {
        let inF = inFeatures, outF = outFeatures
        if let bf16 {
            let pad = BF16Gemm.paddedCount(outF)
            withBF16Operands(dy, converted: converted, rows: rows, cols: outF, packed: packed, bf16: bf16) { dyb, packed in
                forEachTile(forRows: rows, scratch: scratch, kernels: kernels) { tile, w in
                    BF16Gemm.packB(w, ldb: inF, transposed: false, k: tile.count, n: inF, into: packed, kernels: bf16)
                    BF16Gemm.gemm(dx, ldc: inF, dyb + tile.lowerBound, lda: pad, packed, m: rows, n: inF, k: tile.count, accumulate: true,
                                  kernels: bf16)
                }
            }
        } else {
            forEachTile(forRows: rows, scratch: scratch, kernels: kernels) { tile, w in
                Gemm.parallelGemm(dx, ldc: inF, dy + tile.lowerBound, lda: outF, w, ldb: inF, m: rows, n: inF, k: tile.count, beta: 1)
            }
        }
    }

    /// Words of a packed tile of W for a product over `rows` rows (forward or input gradient).
    public func packedWords(forRows rows: Int) -> Int {
        let tile = tileRows(forRows: rows)
        return max(BF16Gemm.packedWords(k: inFeatures, n: tile), BF16Gemm.packedWords(k: tile, n: inFeatures))
    }

    /// Calls body with x [rows, cols] as bf16 rows (`converted`, or converted into a temporary) and a buffer
    /// for a packed tile (`packed`, or a temporary).
    private func withBF16Operands(_ x: UnsafePointer<Float>, converted: UnsafePointer<UInt16>?, rows: Int, cols: Int? = nil,
                                  packed: UnsafeMutablePointer<UInt32>?, bf16: BF16Kernels,
                                  _ body: (UnsafePointer<UInt16>, UnsafeMutablePointer<UInt32>) -> Void) {
        let cols = cols ?? inFeatures
        func withPacked(_ xb: UnsafePointer<UInt16>) {
            if let packed { body(xb, packed); return }
            withUnsafeTemporaryAllocation(of: UInt32.self, capacity: packedWords(forRows: rows)) { body(xb, $0.baseAddress!) }
        }
        if let converted { withPacked(converted); return }
        let pad = BF16Gemm.paddedCount(cols)
        withUnsafeTemporaryAllocation(of: UInt16.self, capacity: rows * pad) { xb in
            BF16Gemm.convert(x, rows: rows, cols: cols, ld: cols, into: xb.baseAddress!, ldd: pad, kernels: bf16)
            withPacked(UnsafePointer(xb.baseAddress!))
        }
    }

    /// y += scale · (x Aᵀ) Bᵀ when an adapter is attached.
    func addLoRA(_ x: UnsafePointer<Float>, rows: Int, to y: UnsafeMutablePointer<Float>, kernels: KernelTable = .current) {
        lora?.withUpdate { $0.forward(x, rows: rows, inFeatures: inFeatures, outFeatures: outFeatures, into: y, kernels: kernels) }
    }

    /// Scratch floats `forward` needs: a tile of W and its block scales.
    public var scratchCount: Int {
        switch weight {
        case .quantized:
            let tile = tileRows(forRows: .max)
            return tile * inFeatures + scaleScratchCount(rows: tile)
        case .bf16, .q8: return tileRows(forRows: .max) * inFeatures
        case .dense: return 0
        }
    }

    /// Whether one row of input goes through a fused matrix-vector kernel (the weight read once, in its own format).
    var gemvSupported: Bool {
        switch weight {
        case let .quantized(q): return inFeatures % q.blockSize == 0
        case .bf16, .q8: return true
        case .dense: return false
        }
    }

    /// Rows of W a worker takes at a time in a matrix-vector product (pieces handed out as workers come free).
    static let gemvPieceRows = 64

    /// Inputs of at most this many rows go through the matrix-vector kernels (each weight read and decoded
    /// once for all the rows: decoding one token, or one token of each of several sequences) instead of
    /// dequantized tiles and BLAS.
    public static let batchedRowLimit = 16

    /// y[rows, out] = x[rows, in] Wᵀ for a 4-bit, q8_0 or bf16 W and a few rows of x, W's rows split over
    /// the worker threads. `bf16`: a 4-bit W's products take bf16 operands (the bf16 compute dtype, as the
    /// products over many rows do), with these kernels.
    func gemv(_ x: UnsafePointer<Float>, rows n: Int, _ y: UnsafeMutablePointer<Float>, bf16: BF16Kernels?, kernels: KernelTable) {
        withUnsafeTemporaryAllocation(of: Float.self, capacity: n * inFeatures) { xp in
            if case .quantized = weight { Self.prepare(x, rows: n, cols: inFeatures, into: xp.baseAddress!, bf16: bf16, kernels: kernels) }
            let prepared = UnsafeRawPointer(xp.baseAddress!)
            Parallel.forPieces(count: outFeatures, piece: Self.gemvPieceRows) { range in
                rowsTimes(range, x: x, prepared: prepared, count: n, into: y, bf16: bf16, kernels: kernels)
            }
        }
    }

    /// x [rows, cols] rearranged for the 4-bit kernels into xp (room for rows x cols floats): f32 for
    /// `kernels.gemm4`, or bf16 words for `bf16.gemm4` when `bf16` is given.
    static func prepare(_ x: UnsafePointer<Float>, rows n: Int, cols: Int, into xp: UnsafeMutablePointer<Float>, bf16: BF16Kernels?,
                        kernels: KernelTable) {
        if let bf16 {
            let xb = UnsafeMutableRawPointer(xp).assumingMemoryBound(to: UInt16.self)
            for i in 0..<n { bf16.gemm4Prepare(x + i * cols, cols, xb + i * cols) }
        } else {
            for i in 0..<n { kernels.gemv4Prepare(x + i * cols, cols, xp + i * cols) }
        }
    }

    /// y[i * out + r] = row r of W times row i of x, for r in `rows` and i < count, on this thread
    /// (`gemvSupported` weights). `prepared` is x through `prepare` with the same `bf16` (read by 4-bit weights only).
    func rowsTimes(_ rows: Range<Int>, x: UnsafePointer<Float>, prepared: UnsafeRawPointer, count: Int,
                   into y: UnsafeMutablePointer<Float>, bf16: BF16Kernels?, kernels: KernelTable) {
        let cols = inFeatures, yr = y + rows.lowerBound
        switch weight {
        case let .quantized(q):
            if let bf16 {
                q.gemm(rows: rows, xb: prepared.assumingMemoryBound(to: UInt16.self), count: count, into: yr, ldy: outFeatures, bf16: bf16)
            } else {
                q.gemm(rows: rows, x: x, prepared: prepared.assumingMemoryBound(to: Float.self), count: count, into: yr, ldy: outFeatures,
                       kernels: kernels)
            }
        case let .q8(q):
            q.codes.withUnsafeBufferPointer { codes in
                q.scales.withUnsafeBufferPointer { scales in
                    kernels.gemm8(x, count, codes.baseAddress! + rows.lowerBound * cols,
                                  scales.baseAddress! + rows.lowerBound * cols / Quantized8Bit.blockSize, rows.count, cols, yr, outFeatures)
                }
            }
        case let .bf16(w):
            w.withUnsafeBufferPointer { wp in
                kernels.gemmBF16(x, count, wp.baseAddress! + rows.lowerBound * cols, rows.count, cols, yr, outFeatures)
            }
        case .dense:
            preconditionFailure("gemv on a dense weight (BLAS does it)")
        }
    }

    /// y_i = x W_iᵀ + b_i for two or three linears that read the same x (q, k and v; gate and up): the frozen
    /// products of the block. A few rows (at most `batchedRowLimit`) split the linears' rows over the workers
    /// together, one parallel loop instead of one each (`prepared` must hold rows x `inFeatures` floats);
    /// otherwise one `frozenForward` each, sharing x's bf16 conversion (`converted`) and `packed`.
    public static func frozenForwardShared(_ x: UnsafePointer<Float>, converted: UnsafePointer<UInt16>? = nil, rows n: Int,
                                           prepared: UnsafeMutablePointer<Float>, scratch: UnsafeMutablePointer<Float>,
                                           packed: UnsafeMutablePointer<UInt32>? = nil,
                                           _ a: Linear, _ ya: UnsafeMutablePointer<Float>, _ b: Linear, _ yb: UnsafeMutablePointer<Float>,
                                           _ c: Linear? = nil, _ yc: UnsafeMutablePointer<Float>? = nil, bf16: BF16Kernels?,
                                           kernels: KernelTable = .current) {
        guard n <= batchedRowLimit, a.gemvSupported, b.gemvSupported, c?.gemvSupported ?? true, a.inFeatures == b.inFeatures,
              c.map({ $0.inFeatures == a.inFeatures }) ?? true else {
            a.frozenForward(x, converted: converted, rows: n, into: ya, scratch: scratch, packed: packed, bf16: bf16, kernels: kernels)
            b.frozenForward(x, converted: converted, rows: n, into: yb, scratch: scratch, packed: packed, bf16: bf16, kernels: kernels)
            if let c, let yc { c.frozenForward(x, converted: converted, rows: n, into: yc, scratch: scratch, packed: packed, bf16: bf16, kernels: kernels) }
            return
        }
        // One preparation serves every 4-bit weight (it depends on the kernel level and bf16 only).
        prepare(x, rows: n, cols: a.inFeatures, into: prepared, bf16: bf16, kernels: kernels)
        let xp = UnsafeRawPointer(prepared)
        let na = a.outFeatures, nb = b.outFeatures, total = na + nb + (c?.outFeatures ?? 0)
        Parallel.forPieces(count: total, piece: gemvPieceRows) { range in
            // The part of `range` that falls in each linear's rows.
            func part(_ l: Linear, _ y: UnsafeMutablePointer<Float>, _ start: Int) {
                let lo = max(range.lowerBound, start), hi = min(range.upperBound, start + l.outFeatures)
                if lo < hi { l.rowsTimes((lo - start)..<(hi - start), x: x, prepared: xp, count: n, into: y, bf16: bf16, kernels: kernels) }
            }
            part(a, ya, 0)
            part(b, yb, na)
            if let c, let yc { part(c, yc, na + nb) }
        }
        a.addBias(to: ya, rows: n)
        b.addBias(to: yb, rows: n)
        if let c, let yc { c.addBias(to: yc, rows: n) }
    }

    /// W as f32 [out, in] (dequantized if needed).
    public func denseWeight() -> [Float] {
        switch weight {
        case let .dense(w): return w
        case let .quantized(q): return q.dequantize()
        case let .bf16(w): return w.map(bfloat16BitsToFloat)
        case let .q8(q): return q.dequantize()
        }
    }
}

/// Σ a[i]·b[i] over n floats, in 32-float steps with two vector accumulators.
@inline(__always)
func dotF32(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
    var s0 = SIMD16<Float>(), s1 = SIMD16<Float>()
    let ra = UnsafeRawPointer(a), rb = UnsafeRawPointer(b)
    var i = 0
    while i + 32 <= n {
        s0 += ra.loadUnaligned(fromByteOffset: 4 * i, as: SIMD16<Float>.self) * rb.loadUnaligned(fromByteOffset: 4 * i, as: SIMD16<Float>.self)
        s1 += ra.loadUnaligned(fromByteOffset: 4 * i + 64, as: SIMD16<Float>.self) * rb.loadUnaligned(fromByteOffset: 4 * i + 64, as: SIMD16<Float>.self)
        i += 32
    }
    if i + 16 <= n {
        s0 += ra.loadUnaligned(fromByteOffset: 4 * i, as: SIMD16<Float>.self) * rb.loadUnaligned(fromByteOffset: 4 * i, as: SIMD16<Float>.self)
        i += 16
    }
    var sum = (s0 + s1).sum()
    while i < n {
        sum += a[i] * b[i]
        i += 1
    }
    return sum
}
