// y = W x for a 4-bit W [rows, cols] (the decode step of generation): the matrix-vector kernel
// (Quantized4Bit.gemm, KernelTable.gemm4) reads the packed codes directly, rows split over threads.
import CKernels
import QLoRACore

extension Quantized4Bit {
    /// y[r] = sum_c W[r, c] * x[c] for this 2-D tensor, rows split over the worker threads. Rows must
    /// start on block boundaries (cols a multiple of the block size); otherwise the tensor is dequantized
    /// and multiplied row by row.
    public func gemv(_ x: [Float], kernels: KernelTable = .current) -> [Float] {
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
        y.withUnsafeMutableBufferPointer { yb in
            let yBase = yb.baseAddress!
            x.withUnsafeBufferPointer { xb in
                var xp = [Float](repeating: 0, count: cols)
                xp.withUnsafeMutableBufferPointer { kernels.gemv4Prepare(xb.baseAddress, cols, $0.baseAddress) }
                xp.withUnsafeBufferPointer { prepared in
                    Parallel.forChunks(count: rows, minimumChunk: 64) { _, range in
                        gemv(rows: range, x: xb.baseAddress!, prepared: prepared.baseAddress!, into: yBase + range.lowerBound, kernels: kernels)
                    }
                }
            }
        }
        return y
    }

    /// y[0..<rows.count] = rows `rows` of this 2-D tensor times x (cols a multiple of the block size), on
    /// the calling thread. `prepared` is x through `kernels.gemv4Prepare` (once per x, for any rows). The
    /// block scales are decoded inside the kernel as it reaches them (double quantization included).
    public func gemv(rows: Range<Int>, x: UnsafePointer<Float>, prepared: UnsafePointer<Float>, into y: UnsafeMutablePointer<Float>,
                     kernels: KernelTable = .current) {
        gemm(rows: rows, x: x, prepared: prepared, count: 1, into: y, ldy: rows.count, kernels: kernels)
    }

    /// y[i * ldy + (r - rows.lowerBound)] = row r times input i for `count` inputs x [count][cols] and
    /// their prepared copies (each weight group decoded once for all of them), on the calling thread;
    /// one input runs the matrix-vector kernel.
    public func gemm(rows: Range<Int>, x: UnsafePointer<Float>, prepared: UnsafePointer<Float>, count: Int,
                     into y: UnsafeMutablePointer<Float>, ldy: Int, kernels: KernelTable = .current) {
        withRows(rows) { p, scales, firstBlock, code in
            kernels.gemm4(x, prepared, count, p, scales, firstBlock, rows.count, shape[1], blockSize, code, y, ldy)
        }
    }

    /// The same product in bf16 (the bf16 compute dtype): each weight rounded to bf16 as it is decoded, the inputs
    /// given as `xb` [count][cols] through `bf16.gemm4Prepare` (reordered and rounded), products summed in f32.
    public func gemm(rows: Range<Int>, xb: UnsafePointer<UInt16>, count: Int, into y: UnsafeMutablePointer<Float>, ldy: Int,
                     bf16: BF16Kernels) {
        withRows(rows) { p, scales, firstBlock, code in
            bf16.gemm4(xb, count, p, scales, firstBlock, rows.count, shape[1], blockSize, code, y, ldy)
        }
    }

    /// The product kernels' operands for rows `rows` of this 2-D tensor (cols a multiple of the block size): the
    /// rows' first packed byte, the block scales, the index of the rows' first block, and the codebook.
    private func withRows(_ rows: Range<Int>,
                          _ body: (UnsafePointer<UInt8>, UnsafePointer<qk_block_scales>, Int, UnsafePointer<Float>) -> Void) {
        let cols = shape[1]
        precondition(cols % blockSize == 0 && rows.upperBound <= shape[0])
        quantType.codebook.withUnsafeBufferPointer { code in
            packed.withUnsafeBufferPointer { p in
                withScaleSource { scales in
                    body(p.baseAddress! + rows.lowerBound * cols / 2, scales, rows.lowerBound * (cols / blockSize), code.baseAddress!)
                }
            }
        }
    }

    /// The kernels' view of the block scales (pointers valid inside `body`).
    func withScaleSource<R>(_ body: (UnsafePointer<qk_block_scales>) -> R) -> R {
        if let absmax {
            return absmax.withUnsafeBufferPointer { a in
                var s = qk_block_scales(absmax: a.baseAddress, codes: nil, nested: nil, table: nil, offset: 0)
                return body(&s)
            }
        }
        let n = nested!
        return n.codes.withUnsafeBufferPointer { c in
            n.nestedAbsmax.withUnsafeBufferPointer { na in
                Codebooks.dynamic8.withUnsafeBufferPointer { t in
                    var s = qk_block_scales(absmax: nil, codes: c.baseAddress, nested: na.baseAddress, table: t.baseAddress, offset: n.offset)
                    return body(&s)
                }
            }
        }
    }
}
