// y = W x for a 4-bit W [rows, cols] (the decode step of generation): the fused dequantize-and-dot
// kernel reads the packed codes directly, one row per call, rows split over threads.
import QLoRACore

extension Quantized4Bit {
    /// y[r] = sum_c W[r, c] * x[c] for this 2-D tensor, with `scales` its per-block f32 absmax
    /// (pass `blockScales()` once and keep it: dequantizing nested constants per call would waste time).
    /// Rows must start on block boundaries (cols a multiple of the block size); otherwise the
    /// tensor is dequantized and multiplied row by row.
    public func gemv(_ x: [Float], scales: [Float], kernels: KernelTable = .current) -> [Float] {
        precondition(shape.count == 2 && x.count == shape[1], "gemv needs a 2-D weight and x of its column count")
        let rows = shape[0], cols = shape[1]
        var y = [Float](repeating: 0, count: rows)
        if cols % blockSize != 0 {
            let w = dequantize(kernels: kernels)
            for r in 0..<rows {
                var s: Float = 0
                for c in 0..<cols { s += w[r * cols + c] * x[c] }
                y[r] = s
            }
            return y
        }
        let code = quantType.codebook
        let blocksPerRow = cols / blockSize
        y.withUnsafeMutableBufferPointer { yb in
            let yBase = yb.baseAddress!
            x.withUnsafeBufferPointer { xb in
                packed.withUnsafeBufferPointer { p in
                    scales.withUnsafeBufferPointer { a in
                        code.withUnsafeBufferPointer { c in
                            Parallel.forChunks(count: rows, minimumChunk: 64) { _, range in
                                for r in range {
                                    yBase[r] = kernels.dot4(
                                        xb.baseAddress, p.baseAddress! + r * cols / 2, a.baseAddress! + r * blocksPerRow,
                                        cols, blockSize, c.baseAddress)
                                }
                            }
                        }
                    }
                }
            }
        }
        return y
    }
}
