// Blockwise 4-bit quantization (NF4, FP4, Int4) with optional double quantization of the absmax
// constants, bit-exact with bitsandbytes 0.50 on CPU (proved by tests against its own outputs).
// See DESIGN.md "Formats to match exactly" and QLoRA paper section 3.
import QLoRACore

/// Errors of the quantizers; each names the tensor.
public enum QuantizationError: Error, CustomStringConvertible, Equatable {
    case invalidBlockSize(Int)
    case nonFinite(tensor: String, index: Int, value: Float)
    case empty(tensor: String)
    case invalidShape(tensor: String, shape: [Int], reason: String)

    public var description: String {
        switch self {
        case let .invalidBlockSize(b):
            return "block size \(b) is not supported: use a power of two from 32 to 4096 (64 is the QLoRA default)"
        case let .nonFinite(tensor, index, value):
            return "tensor '\(tensor)': element \(index) is \(value); 4-bit quantization needs finite weights (bitsandbytes would silently store garbage: a NaN or infinity poisons its whole block)"
        case let .empty(tensor):
            return "tensor '\(tensor)' has no elements"
        case let .invalidShape(tensor, shape, reason):
            return "tensor '\(tensor)' of shape \(shape): \(reason)"
        }
    }
}

/// The double-quantized absmax constants: 8-bit codes of (absmax - offset) in blocks of 256, with
/// the signed dynamic map. absmax[i] = dynamic8[codes[i]] * nestedAbsmax[i / 256] + offset.
public struct NestedAbsmax: Sendable, Equatable {
    public static let blockSize = 256
    public var codes: [UInt8]
    public var nestedAbsmax: [Float]
    public var offset: Float

    public init(codes: [UInt8], nestedAbsmax: [Float], offset: Float) {
        self.codes = codes
        self.nestedAbsmax = nestedAbsmax
        self.offset = offset
    }

    /// Quantizes first-level constants. `offset` defaults to their mean.
    public init(absmax: [Float], offset: Float? = nil) {
        let off = offset ?? Self.mean(absmax)
        let centered = absmax.map { $0 - off }
        let (q, scales) = Blockwise8.quantize(centered, blockSize: Self.blockSize)
        self.init(codes: q, nestedAbsmax: scales, offset: off)
    }

    /// The first-level constants: code * nested absmax, rounded, plus the offset, rounded (two
    /// roundings in f32, as bitsandbytes computes them). A sum past the largest float (only for
    /// constants within a rounding of Float.greatestFiniteMagnitude) is held at that value.
    public func dequantize() -> [Float] {
        let n = codes.count
        return [Float](unsafeUninitializedCapacity: n) { out, count in
            decode(0..<n, into: out.baseAddress!)
            count = n
        }
    }

    /// The constants of `range` into `out` (`out[0]` is constant `range.lowerBound`), as `dequantize()`.
    public func decode(_ range: Range<Int>, into out: UnsafeMutablePointer<Float>) {
        Codebooks.dynamic8.withUnsafeBufferPointer { table in
            codes.withUnsafeBufferPointer { q in
                nestedAbsmax.withUnsafeBufferPointer { scale in
                    for i in range {
                        let value = table[Int(q[i])] * scale[i / Self.blockSize] + offset
                        out[i - range.lowerBound] = value.isFinite ? value : .greatestFiniteMagnitude
                    }
                }
            }
        }
    }

    /// The mean of the constants as bitsandbytes computes it (torch's f32 mean, see TorchSum), so
    /// offsets match to the bit. Where that f32 sum overflows (constants near Float.greatestFiniteMagnitude)
    /// bitsandbytes gets an infinite offset and a NaN tensor; we take the f64 mean instead.
    public static func mean(_ values: [Float]) -> Float {
        guard !values.isEmpty else { return 0 }
        let m = TorchSum.mean(values)
        if m.isFinite { return m }
        var sum = 0.0
        for v in values { sum += Double(v) }
        return Float(sum / Double(values.count))
    }
}

/// A tensor in blockwise 4-bit form.
public struct Quantized4Bit: Sendable, Equatable {
    public var quantType: QuantType
    public var blockSize: Int
    /// The original shape (row-major); quantization ran over the flattened elements.
    public var shape: [Int]
    /// Two codes a byte, first element in the high nibble; (n + 1) / 2 bytes.
    public var packed: [UInt8]
    /// One f32 absmax per block, when not double-quantized.
    public var absmax: [Float]?
    /// The double-quantized absmax, when double quantization is on.
    public var nested: NestedAbsmax?

    public var elementCount: Int { shape.reduce(1, *) }
    public var blockCount: Int { (elementCount + blockSize - 1) / blockSize }
    public var isDoubleQuantized: Bool { nested != nil }

    /// The supported block sizes (powers of two, as bitsandbytes accepts).
    public static let blockSizes = [32, 64, 128, 256, 512, 1024, 2048, 4096]

    /// Quantizes `values` (row-major, `shape`), bit-exact with bitsandbytes' quantize_4bit.
    /// - Throws: `QuantizationError` for a bad block size, an empty tensor, or a NaN / infinity
    ///   (named by `name` and element index).
    public init(
        _ values: UnsafeBufferPointer<Float>, shape: [Int], type: QuantType = .nf4, blockSize: Int = 64,
        doubleQuant: Bool = true, name: String = "tensor", kernels: KernelTable = .current
    ) throws {
        guard Self.blockSizes.contains(blockSize) else { throw QuantizationError.invalidBlockSize(blockSize) }
        let n = values.count
        precondition(n == shape.reduce(1, *), "shape does not match the element count")
        guard n > 0 else { throw QuantizationError.empty(tensor: name) }
        let tables = Quantize4Tables.forType(type)
        let blocks = (n + blockSize - 1) / blockSize
        var packed = [UInt8](repeating: 0, count: (n + 1) / 2)
        var absmax = [Float](repeating: 0, count: blocks)
        var badBlock = -1
        packed.withUnsafeMutableBufferPointer { p in
            absmax.withUnsafeMutableBufferPointer { a in
                tables.thresholds.withUnsafeBufferPointer { t in
                    tables.remap.withUnsafeBufferPointer { r in
                        // Chunks of whole blocks; only the final chunk may end in a short block.
                        let pBase = p.baseAddress!, aBase = a.baseAddress!
                        // One slot per worker for the first block holding a NaN or infinity.
                        var firstBad = [Int](repeating: -1, count: Parallel.threadCount)
                        firstBad.withUnsafeMutableBufferPointer { fb in
                            let fbBase = fb.baseAddress!
                            Parallel.forChunks(count: n, granularity: blockSize, minimumChunk: 1 << 16) { worker, range in
                                let bad = kernels.quantize4(
                                    values.baseAddress! + range.lowerBound, range.count, blockSize, t.baseAddress,
                                    r.baseAddress, pBase + range.lowerBound / 2, aBase + range.lowerBound / blockSize)
                                if bad >= 0 { fbBase[worker] = range.lowerBound / blockSize + Int(bad) }
                            }
                        }
                        badBlock = firstBad.filter { $0 >= 0 }.min() ?? -1
                    }
                }
            }
        }
        if badBlock >= 0 {
            let start = badBlock * blockSize
            let end = min(n, start + blockSize)
            let i = (start..<end).first { !values[$0].isFinite } ?? start
            throw QuantizationError.nonFinite(tensor: name, index: i, value: values[i])
        }
        self.quantType = type
        self.blockSize = blockSize
        self.shape = shape
        self.packed = packed
        if doubleQuant {
            self.absmax = nil
            self.nested = NestedAbsmax(absmax: absmax)
        } else {
            self.absmax = absmax
            self.nested = nil
        }
    }

    public init(quantType: QuantType, blockSize: Int, shape: [Int], packed: [UInt8], absmax: [Float]?, nested: NestedAbsmax?) {
        self.quantType = quantType
        self.blockSize = blockSize
        self.shape = shape
        self.packed = packed
        self.absmax = absmax
        self.nested = nested
    }

    /// The per-block f32 scales (dequantizing the nested constants if needed).
    public func blockScales() -> [Float] {
        if let absmax { return absmax }
        return nested!.dequantize()
    }

    /// Dequantizes to f32, bit-exact with bitsandbytes' dequantize_4bit (float32 output).
    public func dequantize(kernels: KernelTable = .current) -> [Float] {
        let n = elementCount
        let scales = blockScales()
        return [Float](unsafeUninitializedCapacity: n) { out, count in
            dequantize(elements: 0..<n, scales: scales, into: out.baseAddress!, kernels: kernels)
            count = n
        }
    }

    /// Dequantizes the flat elements `elements` into `out` (which must hold `elements.count` floats), with
    /// `scales` from `blockScales()` (decode them once and reuse them). The range may start and end anywhere.
    public func dequantize(elements: Range<Int>, scales: [Float], into out: UnsafeMutablePointer<Float>,
                           kernels: KernelTable = .current) {
        precondition(elements.lowerBound >= 0 && elements.upperBound <= elementCount && scales.count == blockCount)
        scales.withUnsafeBufferPointer { dequantize(elements: elements, scales: $0.baseAddress!, firstBlock: 0, into: out, kernels: kernels) }
    }

    /// Blocks that the flat elements `elements` touch.
    public func blocks(spannedBy elements: Range<Int>) -> Range<Int> {
        elements.isEmpty ? 0..<0 : (elements.lowerBound / blockSize)..<((elements.upperBound - 1) / blockSize + 1)
    }

    /// Decodes the f32 scales of `blocks` into `out`, bit for bit as `blockScales()` gives them.
    public func decodeScales(_ blocks: Range<Int>, into out: UnsafeMutablePointer<Float>) {
        if let absmax {
            absmax.withUnsafeBufferPointer { a in (out).update(from: a.baseAddress! + blocks.lowerBound, count: blocks.count) }
            return
        }
        nested!.decode(blocks, into: out)
    }

    /// Dequantizes the flat elements `elements` into `out`, decoding only the scales of the blocks they
    /// touch into `scaleScratch` (at least `blocks(spannedBy: elements).count` floats). This is how a
    /// matrix product dequantizes a tile of rows into a reused buffer without keeping every decoded scale.
    public func dequantize(elements: Range<Int>, into out: UnsafeMutablePointer<Float>, scaleScratch: UnsafeMutablePointer<Float>,
                           kernels: KernelTable = .current) {
        precondition(elements.lowerBound >= 0 && elements.upperBound <= elementCount)
        let blocks = blocks(spannedBy: elements)
        if let absmax {
            absmax.withUnsafeBufferPointer { dequantize(elements: elements, scales: $0.baseAddress!, firstBlock: 0, into: out, kernels: kernels) }
            return
        }
        decodeScales(blocks, into: scaleScratch)
        dequantize(elements: elements, scales: UnsafePointer(scaleScratch), firstBlock: blocks.lowerBound, into: out, kernels: kernels)
    }

    /// `scales[k]` is the scale of block `firstBlock + k`.
    private func dequantize(elements: Range<Int>, scales: UnsafePointer<Float>, firstBlock: Int, into out: UnsafeMutablePointer<Float>,
                            kernels: KernelTable) {
        let code = quantType.codebook
        let bs = blockSize
        // Head: up to the first block boundary, in scalar code (it may start mid-byte).
        let firstBoundary = min(elements.upperBound, (elements.lowerBound + bs - 1) / bs * bs)
        for i in elements.lowerBound..<firstBoundary {
            let byte = packed[i >> 1]
            let q = (i & 1) == 1 ? byte & 0x0F : byte >> 4
            out[i - elements.lowerBound] = code[Int(q)] * scales[i / bs - firstBlock]
        }
        let body = firstBoundary..<elements.upperBound
        guard !body.isEmpty else { return }
        let outBody = out + (firstBoundary - elements.lowerBound)
        packed.withUnsafeBufferPointer { p in
            code.withUnsafeBufferPointer { c in
                Parallel.forChunks(count: body.count, granularity: bs, minimumChunk: 1 << 16) { _, range in
                    let start = body.lowerBound + range.lowerBound
                    kernels.dequantize4(p.baseAddress! + start / 2, scales + (start / bs - firstBlock), range.count, bs,
                                        c.baseAddress, outBody + range.lowerBound)
                }
            }
        }
    }

    /// Bytes stored for this tensor in a bitsandbytes checkpoint: packed codes, absmax (u8 when
    /// nested, else f32), the 16-entry code table, and when nested the nested absmax, the 256-entry
    /// nested code table and the offset.
    public var storedByteCount: Int {
        var bytes = packed.count + 16 * 4
        if let nested {
            bytes += nested.codes.count + nested.nestedAbsmax.count * 4 + 256 * 4 + 4
        } else {
            bytes += blockCount * 4
        }
        return bytes
    }

    /// Bits per parameter, everything stored included.
    public var bitsPerParameter: Double { Double(storedByteCount * 8) / Double(elementCount) }
}

extension Quantized4Bit {
    /// Convenience over an array.
    public init(_ values: [Float], shape: [Int]? = nil, type: QuantType = .nf4, blockSize: Int = 64,
                doubleQuant: Bool = true, name: String = "tensor", kernels: KernelTable = .current) throws {
        self = try values.withUnsafeBufferPointer {
            try Quantized4Bit($0, shape: shape ?? [values.count], type: type, blockSize: blockSize,
                              doubleQuant: doubleQuant, name: name, kernels: kernels)
        }
    }
}
