// ggml's block quantizers, for the GGUF files we write (`qlora merge --format gguf`): the bytes of a tensor in
// q8_0 or q4_0 as llama.cpp's reference quantizers (quantize_row_q8_0_ref, quantize_row_q4_0_ref) and
// gguf-py's numpy versions write them, byte for byte (tested on gguf-py's output).
//   q8_0, per block of 32: d = absmax / 127, q = round(x / d) half away from zero (Int8); d stored as f16.
//   q4_0, per block of 32: m = the value of largest magnitude (the first, if several), d = m / -8,
//         q = min(15, trunc(x / d + 8.5)) (so q in 0...15 stands for q - 8); d stored as f16; the codes of
//         values 0-15 fill the low nibbles of the block's 16 bytes and those of values 16-31 the high ones.
// The quotient x / d is x times 1 / d, both in f32 as the reference computes it, from the f32 d (not the f16).
import QLoRACore

public enum GGMLQuantizationError: Error, CustomStringConvertible, Equatable {
    case notWholeBlocks(tensor: String, count: Int, blockSize: Int)
    case nonFinite(tensor: String, index: Int, value: Float)
    case unsupported(tensor: String, type: GGMLType)

    public var description: String {
        switch self {
        case let .notWholeBlocks(tensor, count, blockSize):
            return "tensor '\(tensor)': \(count) values are not whole blocks of \(blockSize) (its rows must be a multiple of \(blockSize) long)"
        case let .nonFinite(tensor, index, value):
            return "tensor '\(tensor)': value \(index) is \(value); a quantized GGUF tensor cannot hold it"
        case let .unsupported(tensor, type):
            return "tensor '\(tensor)': swift-qlora does not write \(type) (it writes F32, F16, BF16, Q8_0, Q4_0 and Q4_K)"
        }
    }
}

public enum GGMLQuantizer {
    /// The types `quantize` writes.
    public static let writable: Set<GGMLType> = [.f32, .f16, .bf16, .q8_0, .q4_0, .q4_K]

    /// `values` (row-major, rows a whole number of blocks long) in `type`'s GGUF bytes.
    public static func quantize(_ values: [Float], as type: GGMLType, tensor: String) throws -> [UInt8] {
        try values.withUnsafeBufferPointer { try quantize($0, as: type, tensor: tensor) }
    }

    public static func quantize(_ x: UnsafeBufferPointer<Float>, as type: GGMLType, tensor: String) throws -> [UInt8] {
        let (block, bytes) = type.blockLayout
        guard writable.contains(type) else { throw GGMLQuantizationError.unsupported(tensor: tensor, type: type) }
        guard x.count % block == 0 else { throw GGMLQuantizationError.notWholeBlocks(tensor: tensor, count: x.count, blockSize: block) }
        var out = [UInt8](repeating: 0, count: x.count / block * bytes)
        try out.withUnsafeMutableBufferPointer { o in
            let p = o.baseAddress!
            switch type {
            case .f32:
                for (i, v) in x.enumerated() { store16or32(v.bitPattern, p + 4 * i, bytes: 4) }
            case .f16:
                for (i, v) in x.enumerated() { store16or32(UInt32(floatToFloat16Bits(v)), p + 2 * i, bytes: 2) }
            case .bf16:
                for (i, v) in x.enumerated() { store16or32(UInt32(floatToBFloat16Bits(v)), p + 2 * i, bytes: 2) }
            case .q8_0:
                for b in 0..<(x.count / 32) { try q8_0Block(x.baseAddress! + 32 * b, into: p + 34 * b, tensor: tensor, first: 32 * b) }
            case .q4_0:
                for b in 0..<(x.count / 32) { try q4_0Block(x.baseAddress! + 32 * b, into: p + 18 * b, tensor: tensor, first: 32 * b) }
            case .q4_K:
                for b in 0..<(x.count / 256) { try q4_KBlock(x.baseAddress! + 256 * b, into: p + 144 * b, tensor: tensor, first: 256 * b) }
            default:
                throw GGMLQuantizationError.unsupported(tensor: tensor, type: type)
            }
        }
        return out
    }

    /// `count` values back from `type`'s GGUF bytes (the reader's dequantization).
    public static func dequantize(_ bytes: [UInt8], as type: GGMLType, count: Int, tensor: String) throws -> [Float] {
        let (block, size) = type.blockLayout
        guard type.canDequantize else { throw GGMLQuantizationError.unsupported(tensor: tensor, type: type) }
        guard count % block == 0, bytes.count == count / block * size else {
            throw GGMLQuantizationError.notWholeBlocks(tensor: tensor, count: count, blockSize: block)
        }
        return [Float](unsafeUninitializedCapacity: count) { out, n in
            bytes.withUnsafeBytes { GGMLDequantize.run(type, $0.baseAddress!, out.baseAddress!, count) }
            n = count
        }
    }

    @inline(__always)
    private static func store16or32(_ v: UInt32, _ p: UnsafeMutablePointer<UInt8>, bytes: Int) {
        for k in 0..<bytes { p[k] = UInt8(truncatingIfNeeded: v >> (8 * UInt32(k))) }
    }

    private static func checkFinite(_ x: UnsafePointer<Float>, tensor: String, first: Int) throws {
        for j in 0..<32 where !x[j].isFinite { throw GGMLQuantizationError.nonFinite(tensor: tensor, index: first + j, value: x[j]) }
    }

    static func q8_0Block(_ x: UnsafePointer<Float>, into p: UnsafeMutablePointer<UInt8>, tensor: String, first: Int) throws {
        try checkFinite(x, tensor: tensor, first: first)
        var amax: Float = 0
        for j in 0..<32 { amax = max(amax, abs(x[j])) }
        let d = amax / 127
        let inverse: Float = d != 0 ? 1 / d : 0
        store16or32(UInt32(floatToFloat16Bits(d)), p, bytes: 2)
        for j in 0..<32 { p[2 + j] = UInt8(bitPattern: Int8((x[j] * inverse).rounded(.toNearestOrAwayFromZero))) }
    }

    static func q4_0Block(_ x: UnsafePointer<Float>, into p: UnsafeMutablePointer<UInt8>, tensor: String, first: Int) throws {
        try checkFinite(x, tensor: tensor, first: first)
        var amax: Float = 0, m: Float = 0
        for j in 0..<32 where abs(x[j]) > amax {
            amax = abs(x[j])
            m = x[j]
        }
        let d = m / -8
        let inverse: Float = d != 0 ? 1 / d : 0
        store16or32(UInt32(floatToFloat16Bits(d)), p, bytes: 2)
        func code(_ v: Float) -> UInt8 { UInt8(min(15, Int((v * inverse + 8.5).rounded(.towardZero)))) }
        for j in 0..<16 { p[2 + j] = code(x[j]) | code(x[16 + j]) << 4 }
    }

    // MARK: Q4_K

    /// ggml's nearest_int: x rounded to the nearest integer, ties to even, through the bits of x + 1.5·2^23
    /// (exact for |x| < 2^22, which every caller here stays within).
    @inline(__always) static func nearestInt(_ x: Float) -> Int {
        Int((x + 12_582_912).bitPattern & 0x007F_FFFF) - 0x0040_0000
    }

    /// ggml's make_qkx2_quants for 32 values with weights, nmax 15, rmin -1, rdelta 0.1, 20 steps, squared error:
    /// the codes `l` (0...15), and (scale, -min) such that x ≈ scale · l + min. Each sum and product in the
    /// reference's order and in f32, so that the search takes the same branches.
    static func makeQKX2(_ x: UnsafePointer<Float>, _ w: UnsafePointer<Float>, _ l: UnsafeMutablePointer<UInt8>) -> (scale: Float, negativeMin: Float) {
        let n = 32, nmax: Float = 15
        var lo = x[0], hi = x[0]
        var sumW = w[0]
        var sumX = sumW * x[0]
        for i in 1..<n {
            if x[i] < lo { lo = x[i] }
            if x[i] > hi { hi = x[i] }
            sumW += w[i]
            sumX += w[i] * x[i]
        }
        if lo > 0 { lo = 0 }
        if hi == lo {
            for i in 0..<n { l[i] = 0 }
            return (0, -lo)
        }
        var iscale = nmax / (hi - lo)
        var scale = 1 / iscale
        var bestError: Float = 0
        for i in 0..<n {
            l[i] = UInt8(max(0, min(15, nearestInt(iscale * (x[i] - lo)))))
            let diff = scale * Float(l[i]) + lo - x[i]
            bestError += w[i] * (diff * diff)
        }
        var aux = [UInt8](repeating: 0, count: n)
        for step in 0...20 {
            iscale = (-1 + 0.1 * Float(step) + nmax) / (hi - lo)
            var sumL: Float = 0, sumL2: Float = 0, sumXL: Float = 0
            for i in 0..<n {
                let q = max(0, min(15, nearestInt(iscale * (x[i] - lo))))
                aux[i] = UInt8(q)
                let fl = Float(q)
                sumL += w[i] * fl
                sumL2 += w[i] * fl * fl
                sumXL += w[i] * fl * x[i]
            }
            let det = sumW * sumL2 - sumL * sumL
            guard det > 0 else { continue }
            var thisScale = (sumW * sumXL - sumX * sumL) / det
            var thisMin = (sumL2 * sumX - sumL * sumXL) / det
            if thisMin > 0 {
                thisMin = 0
                thisScale = sumXL / sumL2
            }
            var error: Float = 0
            for i in 0..<n {
                let diff = thisScale * Float(aux[i]) + thisMin - x[i]
                error += w[i] * (diff * diff)
            }
            if error < bestError {
                for i in 0..<n { l[i] = aux[i] }
                bestError = error
                scale = thisScale
                lo = thisMin
            }
        }
        return (scale, -lo)
    }

    /// One Q4_K super-block of 256 values (144 bytes: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins for the
    /// eight sub-blocks of 32, 128 bytes of 4-bit codes), as ggml's quantize_row_q4_K_ref writes it.
    static func q4_KBlock(_ x: UnsafePointer<Float>, into p: UnsafeMutablePointer<UInt8>, tensor: String, first: Int) throws {
        for j in 0..<8 { try checkFinite(x + 32 * j, tensor: tensor, first: first + 32 * j) }
        var codes = [UInt8](repeating: 0, count: 256)
        var scales = [Float](repeating: 0, count: 8), mins = [Float](repeating: 0, count: 8)
        var weights = [Float](repeating: 0, count: 32)
        var maxScale: Float = 0, maxMin: Float = 0
        codes.withUnsafeMutableBufferPointer { c in
            weights.withUnsafeMutableBufferPointer { w in
                for j in 0..<8 {
                    let v = x + 32 * j
                    var sumX2: Float = 0
                    for i in 0..<32 { sumX2 += v[i] * v[i] }
                    let average = (sumX2 / 32).squareRoot()
                    for i in 0..<32 { w[i] = average + abs(v[i]) }
                    let (scale, negativeMin) = makeQKX2(v, w.baseAddress!, c.baseAddress! + 32 * j)
                    scales[j] = scale
                    mins[j] = negativeMin
                    if scale > maxScale { maxScale = scale }
                    if negativeMin > maxMin { maxMin = negativeMin }
                }
            }
        }
        let inverseScale: Float = maxScale > 0 ? 63 / maxScale : 0
        let inverseMin: Float = maxMin > 0 ? 63 / maxMin : 0
        let packed = p + 4
        for j in 0..<12 { packed[j] = 0 }
        for j in 0..<8 {
            let ls = min(63, UInt8(truncatingIfNeeded: nearestInt(inverseScale * scales[j])))
            let lm = min(63, UInt8(truncatingIfNeeded: nearestInt(inverseMin * mins[j])))
            if j < 4 {
                packed[j] = ls
                packed[j + 4] = lm
            } else {
                packed[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                packed[j - 4] |= (ls >> 4) << 6
                packed[j] |= (lm >> 4) << 6
            }
        }
        let dBits = floatToFloat16Bits(maxScale / 63), dminBits = floatToFloat16Bits(maxMin / 63)
        store16or32(UInt32(dBits), p, bytes: 2)
        store16or32(UInt32(dminBits), p + 2, bytes: 2)
        let d = float16BitsToFloat(dBits), dmin = float16BitsToFloat(dminBits)
        for j in 0..<8 {
            let (sc, m) = scaleMinK4(j, packed)
            let dj = d * Float(sc)
            if dj == 0 { continue }  // the codes of make_qkx2 stay
            let dmj = dmin * Float(m)
            for i in 0..<32 { codes[32 * j + i] = UInt8(max(0, min(15, nearestInt((x[32 * j + i] + dmj) / dj)))) }
        }
        let qs = p + 16
        for half in 0..<4 {
            for i in 0..<32 { qs[32 * half + i] = codes[64 * half + i] | (codes[64 * half + 32 + i] << 4) }
        }
    }

    /// Sub-block j's 6-bit scale and min from the 12 packed bytes.
    static func scaleMinK4(_ j: Int, _ q: UnsafePointer<UInt8>) -> (UInt8, UInt8) {
        if j < 4 { return (q[j] & 63, q[j + 4] & 63) }
        return ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}
