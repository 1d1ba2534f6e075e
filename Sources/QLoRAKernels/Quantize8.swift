// 8-bit block quantization in ggml's q8_0 layout (blocks of 32 values, one scale each: value = d * q,
// q an Int8), for the LM head and embedding table at inference. Quantizing follows ggml's reference
// (quantize_row_q8_0_ref): d = absmax / 127, q = round(x / d) half away from zero, with d then stored
// in f16. The scales are kept here as f32 (the f16 value, exactly), so dequantizing is one f32
// product, as ggml's own. A GGUF's own q8_0 tensor is read as it is stored (init(ggmlBlocks:)).
import QLoRACore

public struct Quantized8Bit: Sendable, Equatable {
    public static let blockSize = 32
    /// Row-major [rows, cols]; cols is a multiple of 32.
    public let shape: [Int]
    public var codes: [Int8]
    /// One per block of 32 (f16 values held in f32).
    public var scales: [Float]

    public var elementCount: Int { codes.count }
    /// Bytes held: the codes and the scales as stored (f16 would be 8.5 bits a value; f32 here is 9).
    public var storedByteCount: Int { codes.count + scales.count * 4 }

    /// Whether a row of `cols` values can be stored (ggml requires whole blocks per row too).
    public static func canStore(cols: Int) -> Bool { cols > 0 && cols % blockSize == 0 }

    /// Quantizes row-major `values` of `shape` ([rows, cols], cols a multiple of 32).
    public init(_ values: [Float], shape: [Int], name: String) throws {
        guard shape.count == 2, Self.canStore(cols: shape[1]), values.count == shape[0] * shape[1] else {
            throw QuantizationError.invalidShape(tensor: name, shape: shape, reason: "q8_0 needs [rows, cols] with cols a multiple of 32")
        }
        let blocks = values.count / Self.blockSize
        var codes = [Int8](repeating: 0, count: values.count)
        var scales = [Float](repeating: 0, count: blocks)
        try values.withUnsafeBufferPointer { x in
            for b in 0..<blocks {
                var amax: Float = 0
                for j in 0..<Self.blockSize {
                    let v = x[b * Self.blockSize + j]
                    guard v.isFinite else { throw QuantizationError.nonFinite(tensor: name, index: b * Self.blockSize + j, value: v) }
                    amax = max(amax, abs(v))
                }
                let d = amax / 127
                let inverse: Float = d != 0 ? 1 / d : 0
                for j in 0..<Self.blockSize {
                    codes[b * Self.blockSize + j] = Int8((x[b * Self.blockSize + j] * inverse).rounded(.toNearestOrAwayFromZero))
                }
                scales[b] = float16BitsToFloat(floatToFloat16Bits(d))
            }
        }
        self.shape = shape
        self.codes = codes
        self.scales = scales
    }

    /// ggml's q8_0 blocks as a GGUF file stores them (per block of 32: an f16 scale, then 32 Int8 codes),
    /// taken as they are: no value changes, and no f32 copy of the tensor is made.
    public init(ggmlBlocks bytes: UnsafeRawBufferPointer, shape: [Int], name: String) throws {
        guard shape.count == 2, Self.canStore(cols: shape[1]) else {
            throw QuantizationError.invalidShape(tensor: name, shape: shape, reason: "q8_0 needs [rows, cols] with cols a multiple of 32")
        }
        let blocks = shape[0] * shape[1] / Self.blockSize
        guard bytes.count == blocks * 34 else {
            throw QuantizationError.invalidShape(tensor: name, shape: shape, reason: "\(bytes.count) bytes of q8_0 blocks, expected \(blocks * 34)")
        }
        var codes = [Int8](repeating: 0, count: blocks * Self.blockSize)
        var scales = [Float](repeating: 0, count: blocks)
        codes.withUnsafeMutableBytes { c in
            for b in 0..<blocks {
                let base = b * 34
                scales[b] = float16BitsToFloat(UInt16(bytes[base]) | UInt16(bytes[base + 1]) << 8)
                c.baseAddress!.advanced(by: b * Self.blockSize).copyMemory(from: bytes.baseAddress!.advanced(by: base + 2), byteCount: Self.blockSize)
            }
        }
        for s in scales where !s.isFinite { throw QuantizationError.nonFinite(tensor: name, index: 0, value: s) }
        self.shape = shape
        self.codes = codes
        self.scales = scales
    }

    /// Values `elements` (a run of the row-major tensor) as f32 into `out`.
    public func dequantize(elements: Range<Int>, into out: UnsafeMutablePointer<Float>) {
        codes.withUnsafeBufferPointer { q in
            scales.withUnsafeBufferPointer { s in
                for i in elements { out[i - elements.lowerBound] = Float(q[i]) * s[i / Self.blockSize] }
            }
        }
    }

    /// The whole tensor as f32.
    public func dequantize() -> [Float] {
        [Float](unsafeUninitializedCapacity: codes.count) { out, count in
            dequantize(elements: 0..<codes.count, into: out.baseAddress!)
            count = codes.count
        }
    }
}
