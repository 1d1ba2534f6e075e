// torch's CPU float32 sum of a contiguous vector, restated so that the double-quantization offset
// (bitsandbytes: `absmax.mean()`) matches bitsandbytes to the bit. torch (aten/src/ATen/native/cpu/
// SumKernel.cpp, `vectorized_inner_sum` -> `row_sum` -> `multi_row_sum`) sums 8-lane vectors in four
// interleaved rows, each a four-level cascade, then the leftovers, then the lanes. Measured against
// torch 2.15 on this CPU over 1636 vectors (scripts/reference/NOTES.md, part c): identical for every
// size when torch runs one thread; above 32768 values torch's result also depends on its thread count.

enum TorchSum {
    static let width = 8

    static func ceilLog2(_ x: Int) -> Int { x <= 2 ? 1 : (Int.bitWidth - (x - 1).leadingZeroBitCount) }

    /// Sums `size` rows of `lanes` floats (row r at rows[r * lanes]) into one row, torch's way.
    static func rowSum(_ v: UnsafeBufferPointer<Float>, rows size: Int, lanes: Int) -> [Float] {
        let ilp = size / 4
        // Four interleaved accumulators, each a cascade over `ilp` rows.
        let accumulatorCount = 4 * lanes
        var acc = [[Float]](repeating: [Float](repeating: 0, count: accumulatorCount), count: 4)
        let power = max(4, ceilLog2(ilp) / 4)
        let step = 1 << power
        var i = 0
        func addRow(_ r: Int) {
            let base = r * 4 * lanes
            for k in 0..<accumulatorCount { acc[0][k] += v[base + k] }
        }
        while i + step <= ilp {
            for _ in 0..<step { addRow(i); i += 1 }
            for j in 1..<4 {
                for k in 0..<accumulatorCount { acc[j][k] += acc[j - 1][k]; acc[j - 1][k] = 0 }
                if i & ((step - 1) << (j * power)) != 0 { break }
            }
        }
        while i < ilp { addRow(i); i += 1 }
        for j in 1..<4 { for k in 0..<accumulatorCount { acc[0][k] += acc[j][k] } }
        // Accumulator row q of the 4 is acc[0][q * lanes ..< (q + 1) * lanes].
        var part = Array(acc[0][0..<lanes])
        for r in (ilp * 4)..<size { for k in 0..<lanes { part[k] += v[r * lanes + k] } }
        for q in 1..<4 { for k in 0..<lanes { part[k] += acc[0][q * lanes + k] } }
        return part
    }

    /// torch.sum of a contiguous f32 vector on one thread.
    static func sum(_ values: [Float]) -> Float {
        values.withUnsafeBufferPointer { v in
            let n = v.count
            if n < width { return rowSum(v, rows: n, lanes: 1)[0] }
            let nv = n / width
            let lanes = rowSum(UnsafeBufferPointer(rebasing: v[0..<(nv * width)]), rows: nv, lanes: width)
            var total: Float = 0
            for i in (nv * width)..<n { total += v[i] }
            for l in lanes { total += l }
            return total
        }
    }

    /// torch.mean: the sum divided by the count in f32.
    static func mean(_ values: [Float]) -> Float {
        sum(values) / Float(values.count)
    }
}
