// bitsandbytes' blockwise 8-bit quantization with the signed dynamic map, as its CPU kernel
// (csrc/cpu_ops.cpp, quantize_cpu) computes it: per block absmax; x * (1 / absmax) clamped to [-1, 1];
// the code is read from a 65536-entry table that maps the normalized value, rounded to one of
// 65536 evenly spaced points in [-1, 1], to the nearest code by midpoints. Used for the nested
// (double) quantization of 4-bit absmax constants.
import QLoRACore

public enum Blockwise8 {
    static let lutSize = 65536

    /// value grid point -> code index, built from a sorted 256-entry code as bitsandbytes builds it.
    static func makeLUT(_ code: [Float]) -> [UInt8] {
        let midpoints = (0..<255).map { 0.5 as Float * (code[$0] + code[$0 + 1]) }
        var table = [UInt8](repeating: 0, count: lutSize)
        var idx = 0
        for i in 0..<lutSize {
            let v: Float = -1.0 + (2.0 * Float(i)) / Float(lutSize - 1)
            while idx < 255 && midpoints[idx] < v { idx += 1 }
            table[i] = UInt8(idx)
        }
        return table
    }

    static let lut = makeLUT(Codebooks.dynamic8)
    static let unsignedLUT = makeLUT(Codebooks.dynamic8Unsigned)

    @inline(__always)
    static func lutIndex(_ v: Float) -> Int {
        let c = min(max(v, -1.0), 1.0)
        let scaled: Float = (c + 1.0) * 0.5
        let position: Float = scaled * Float(lutSize - 1) + 0.5
        return position.isFinite ? Int(UInt16(position)) : 0  // NaN: cannot occur for finite input
    }

    /// Quantizes `values` in blocks with the signed dynamic map; returns the codes and one absmax per block.
    public static func quantize(_ values: [Float], blockSize: Int) -> ([UInt8], [Float]) {
        let n = values.count
        var q = [UInt8](repeating: 0, count: n)
        var absmax = [Float](repeating: 0, count: (n + blockSize - 1) / blockSize)
        values.withUnsafeBufferPointer { v in
            q.withUnsafeMutableBufferPointer { qp in
                absmax.withUnsafeMutableBufferPointer { ap in
                    quantize(v, into: qp, absmax: ap, blockSize: blockSize, unsigned: false)
                }
            }
        }
        return (q, absmax)
    }

    /// Quantizes into caller buffers with the signed or unsigned dynamic map (8-bit optimizer states).
    public static func quantize(_ values: UnsafeBufferPointer<Float>, into q: UnsafeMutableBufferPointer<UInt8>,
                                absmax: UnsafeMutableBufferPointer<Float>, blockSize: Int, unsigned: Bool) {
        let n = values.count
        let blocks = (n + blockSize - 1) / blockSize
        let table = unsigned ? unsignedLUT : lut
        table.withUnsafeBufferPointer { t in
            for b in 0..<blocks {
                let start = b * blockSize, end = min(n, start + blockSize)
                var m: Float = 0
                for i in start..<end { m = max(m, abs(values[i])) }
                absmax[b] = m
                if m == 0 {  // codes 0, as bitsandbytes writes them
                    for i in start..<end { q[i] = 0 }
                    continue
                }
                let inv: Float = 1.0 / m
                for i in start..<end { q[i] = t[lutIndex(values[i] * inv)] }
            }
        }
    }

    /// code[q[i]] * absmax[i / blockSize], in f32.
    public static func dequantize(_ q: [UInt8], absmax: [Float], blockSize: Int) -> [Float] {
        let code = Codebooks.dynamic8
        return q.indices.map { code[Int(q[$0])] * absmax[$0 / blockSize] }
    }
}
