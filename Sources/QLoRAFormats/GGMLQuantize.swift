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
            return "tensor '\(tensor)': swift-qlora does not write \(type) (it writes F32, F16, BF16, Q8_0 and Q4_0)"
        }
    }
}

public enum GGMLQuantizer {
    /// The types `quantize` writes.
    public static let writable: Set<GGMLType> = [.f32, .f16, .bf16, .q8_0, .q4_0]

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
}
