// GGUF (llama.cpp's model format), read side: header, metadata, tensor infos, and dequantization of
// F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K and Q6_K to f32. The file is memory-mapped and treated as
// hostile: every length, count, dimension and offset is checked before use.
// Layout (versions 2 and 3, little-endian): "GGUF", u32 version, u64 tensor count, u64 metadata count,
// metadata (string key, u32 type, value), tensor infos (string name, u32 n_dims, u64 dims[n_dims] with
// dims[0] the fastest-varying, u32 ggml type, u64 offset), padding to `general.alignment` (default 32),
// then the data section. Spec: ggml's docs/gguf.md.
import QLoRACore

/// A GGUF metadata value.
public indirect enum GGUFValue: Equatable, Sendable {
    case uint(UInt64)
    case int(Int64)
    case float(Double)
    case bool(Bool)
    case string(String)
    case array([GGUFValue])

    public var intValue: Int? {
        switch self {
        case let .uint(v): return v <= UInt64(Int.max) ? Int(v) : nil
        case let .int(v): return Int(v)
        default: return nil
        }
    }

    public var doubleValue: Double? {
        switch self {
        case let .float(v): return v
        case let .uint(v): return Double(v)
        case let .int(v): return Double(v)
        default: return nil
        }
    }

    public var stringValue: String? { if case let .string(s) = self { return s }; return nil }
    public var arrayValue: [GGUFValue]? { if case let .array(a) = self { return a }; return nil }
    public var boolValue: Bool? { if case let .bool(b) = self { return b }; return nil }
}

/// The ggml tensor types this reader knows (raw values are ggml's type ids).
public enum GGMLType: UInt32, Sendable, CaseIterable, CustomStringConvertible {
    case f32 = 0, f16 = 1, q4_0 = 2, q4_1 = 3, q5_0 = 6, q5_1 = 7, q8_0 = 8, q8_1 = 9
    case q2_K = 10, q3_K = 11, q4_K = 12, q5_K = 13, q6_K = 14, q8_K = 15
    case bf16 = 30

    public var description: String {
        switch self {
        case .f32: return "F32"
        case .f16: return "F16"
        case .bf16: return "BF16"
        case .q4_0: return "Q4_0"
        case .q4_1: return "Q4_1"
        case .q5_0: return "Q5_0"
        case .q5_1: return "Q5_1"
        case .q8_0: return "Q8_0"
        case .q8_1: return "Q8_1"
        case .q2_K: return "Q2_K"
        case .q3_K: return "Q3_K"
        case .q4_K: return "Q4_K"
        case .q5_K: return "Q5_K"
        case .q6_K: return "Q6_K"
        case .q8_K: return "Q8_K"
        }
    }

    /// (elements per block, bytes per block).
    public var blockLayout: (elements: Int, bytes: Int) {
        switch self {
        case .f32: return (1, 4)
        case .f16, .bf16: return (1, 2)
        case .q4_0: return (32, 18)
        case .q4_1: return (32, 20)
        case .q5_0: return (32, 22)
        case .q5_1: return (32, 24)
        case .q8_0: return (32, 34)
        case .q8_1: return (32, 36)
        case .q2_K: return (256, 84)
        case .q3_K: return (256, 110)
        case .q4_K: return (256, 144)
        case .q5_K: return (256, 176)
        case .q6_K: return (256, 210)
        case .q8_K: return (256, 292)
        }
    }

    /// Whether `dequantize` supports this type.
    public var canDequantize: Bool {
        switch self {
        case .f32, .f16, .bf16, .q8_0, .q4_0, .q4_1, .q4_K, .q5_K, .q6_K: return true
        default: return false
        }
    }

    /// The safetensors dtype with the same bytes, for the unquantized types.
    public var plainDType: DType? {
        switch self {
        case .f32: return .f32
        case .f16: return .f16
        case .bf16: return .bf16
        default: return nil
        }
    }
}

/// One tensor of a GGUF file.
public struct GGUFTensorInfo: Sendable {
    public let name: String
    /// Dimensions as GGUF stores them: dims[0] varies fastest.
    public let dims: [Int]
    public let type: GGMLType
    /// Offset within the data section.
    public let offset: Int
    public let byteCount: Int

    /// Row-major shape (slowest first), as PyTorch and safetensors write it.
    public var shape: [Int] { dims.reversed() }
    public var elementCount: Int { dims.reduce(1, *) }
}

public enum GGUFError: Error, CustomStringConvertible, Equatable {
    case notGGUF(file: String)
    case unsupportedVersion(file: String, version: UInt32)
    case truncated(file: String, offset: Int, what: String)
    case invalid(file: String, what: String)
    case invalidTensor(file: String, tensor: String, reason: String)
    case unsupportedType(file: String, tensor: String, type: String)

    public var description: String {
        switch self {
        case let .notGGUF(file): return "\(file): not a GGUF file (no 'GGUF' magic)"
        case let .unsupportedVersion(file, v):
            return "\(file): GGUF version \(v) is not supported (versions 2 and 3 are; re-convert with a current llama.cpp)"
        case let .truncated(file, offset, what): return "\(file): truncated GGUF file: \(what) at byte \(offset) runs past the end"
        case let .invalid(file, what): return "\(file): invalid GGUF: \(what)"
        case let .invalidTensor(file, tensor, reason): return "\(file): tensor '\(tensor)': \(reason)"
        case let .unsupportedType(file, tensor, type):
            return "\(file): tensor '\(tensor)': ggml type \(type) cannot be dequantized (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)"
        }
    }
}

/// A parsed, memory-mapped GGUF file.
public final class GGUFFile: @unchecked Sendable {
    public let path: String
    public let version: UInt32
    public let mapping: MappedFile
    /// Metadata in file order.
    public let metadata: [(String, GGUFValue)]
    /// Each metadata key's stored type (and element type, for arrays), so that a copy keeps them.
    public let metadataTypes: [String: GGUFTypedValue.Kind]
    public let tensors: [GGUFTensorInfo]
    public let alignment: Int
    public let dataStart: Int
    private let index: [String: Int]

    static let maxStringLength = 1 << 26
    static let maxDims = 4

    public init(path: String) throws {
        self.path = path
        mapping = try MappedFile(path: path)
        var r = Reader(bytes: mapping.bytes, path: path)
        guard mapping.size >= 4, try r.u32("magic") == 0x4655_4747 else { throw GGUFError.notGGUF(file: path) }
        version = try r.u32("version")
        guard version == 2 || version == 3 else { throw GGUFError.unsupportedVersion(file: path, version: version) }
        let tensorCount = try r.count("tensor count", minimumBytesEach: 24)
        let kvCount = try r.count("metadata count", minimumBytesEach: 12)
        var metadata: [(String, GGUFValue)] = []
        var types: [String: GGUFTypedValue.Kind] = [:]
        for _ in 0..<kvCount {
            let key = try r.string("metadata key")
            guard types[key] == nil else { throw GGUFError.invalid(file: path, what: "metadata key '\(key)' appears twice") }
            let type = try r.u32("type of '\(key)'")
            let at = r.offset
            metadata.append((key, try r.value(type: type, key: key, depth: 0)))
            let element = type == 9 ? GGUFValueType(rawValue: r.bytes.loadUnaligned(fromByteOffset: at, as: UInt32.self)) : nil
            types[key] = GGUFTypedValue.Kind(type: GGUFValueType(rawValue: type)!, element: element)
        }
        self.metadata = metadata
        metadataTypes = types
        var alignment = 32
        if let a = metadata.first(where: { $0.0 == "general.alignment" })?.1 {
            guard let v = a.intValue, v > 0, v & (v - 1) == 0, v <= 1 << 20 else {
                throw GGUFError.invalid(file: path, what: "general.alignment must be a power of two")
            }
            alignment = v
        }
        self.alignment = alignment
        var infos: [(String, [Int], UInt32, UInt64)] = []
        for _ in 0..<tensorCount {
            let name = try r.string("tensor name")
            let nDims = Int(try r.u32("dimension count of '\(name)'"))
            guard (1...Self.maxDims).contains(nDims) else {
                throw GGUFError.invalidTensor(file: path, tensor: name, reason: "\(nDims) dimensions (1 to \(Self.maxDims) allowed)")
            }
            var dims: [Int] = []
            for _ in 0..<nDims {
                let d = try r.u64("dimension of '\(name)'")
                guard d <= UInt64(Int32.max) else { throw GGUFError.invalidTensor(file: path, tensor: name, reason: "dimension \(d) is too large") }
                dims.append(Int(d))
            }
            infos.append((name, dims, try r.u32("type of '\(name)'"), try r.u64("offset of '\(name)'")))
        }
        dataStart = (r.offset + alignment - 1) / alignment * alignment
        let dataSize = mapping.size - min(dataStart, mapping.size)
        var tensors: [GGUFTensorInfo] = []
        var index: [String: Int] = [:]
        for (name, dims, rawType, offset) in infos {
            func bad(_ reason: String) -> GGUFError { .invalidTensor(file: path, tensor: name, reason: reason) }
            guard index[name] == nil else { throw bad("appears twice") }
            guard let type = GGMLType(rawValue: rawType) else { throw bad("unknown ggml type id \(rawType)") }
            guard let count = checkedElementCount(dims) else { throw bad("dimensions \(dims) overflow") }
            let (blockElements, blockBytes) = type.blockLayout
            guard dims[0] % blockElements == 0 else { throw bad("first dimension \(dims[0]) is not a multiple of the \(type) block (\(blockElements))") }
            let (bytes, overflow) = (count / blockElements).multipliedReportingOverflow(by: blockBytes)
            guard !overflow else { throw bad("size overflows") }
            guard offset % UInt64(alignment) == 0 else { throw bad("offset \(offset) is not aligned to \(alignment)") }
            guard offset <= UInt64(dataSize), UInt64(bytes) <= UInt64(dataSize) - offset else {
                throw bad("data [\(offset), \(offset + UInt64(bytes))) runs past the end of the data section (\(dataSize) bytes; truncated file?)")
            }
            index[name] = tensors.count
            tensors.append(GGUFTensorInfo(name: name, dims: dims, type: type, offset: Int(offset), byteCount: bytes))
        }
        let sorted = tensors.filter { $0.byteCount > 0 }.sorted { $0.offset < $1.offset }
        for (a, b) in zip(sorted, sorted.dropFirst()) where b.offset < a.offset + a.byteCount {
            throw GGUFError.invalidTensor(file: path, tensor: b.name, reason: "overlaps tensor '\(a.name)'")
        }
        self.tensors = tensors
        self.index = index
    }

    public func value(_ key: String) -> GGUFValue? { metadata.first { $0.0 == key }?.1 }

    public func tensor(_ name: String) -> GGUFTensorInfo? { index[name].map { tensors[$0] } }

    /// The raw bytes of a tensor (valid while this object lives).
    public func bytes(of t: GGUFTensorInfo) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(rebasing: mapping.bytes[(dataStart + t.offset)..<(dataStart + t.offset + t.byteCount)])
    }

    /// The tensor as f32, row-major in `t.shape`.
    public func floats(_ t: GGUFTensorInfo) throws -> [Float] {
        guard t.type.canDequantize else { throw GGUFError.unsupportedType(file: path, tensor: t.name, type: t.type.description) }
        let n = t.elementCount
        let src = bytes(of: t)
        return [Float](unsafeUninitializedCapacity: n) { out, count in
            GGMLDequantize.run(t.type, src.baseAddress!, out.baseAddress!, n)
            count = n
        }
    }

    // MARK: - Reading

    struct Reader {
        let bytes: UnsafeRawBufferPointer
        let path: String
        var offset = 0

        mutating func need(_ n: Int, _ what: String) throws {
            guard n >= 0, n <= bytes.count - offset else { throw GGUFError.truncated(file: path, offset: offset, what: what) }
        }

        mutating func u8(_ what: String) throws -> UInt8 {
            try need(1, what); defer { offset += 1 }
            return bytes[offset]
        }

        mutating func u16(_ what: String) throws -> UInt16 {
            try need(2, what); defer { offset += 2 }
            return UInt16(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
        }

        mutating func u32(_ what: String) throws -> UInt32 {
            try need(4, what); defer { offset += 4 }
            return UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
        }

        mutating func u64(_ what: String) throws -> UInt64 {
            try need(8, what); defer { offset += 8 }
            return UInt64(littleEndian: bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
        }

        /// A u64 count whose items need at least `minimumBytesEach` bytes each (so absurd counts fail early).
        mutating func count(_ what: String, minimumBytesEach: Int) throws -> Int {
            let at = offset
            let n = try u64(what)
            guard n <= UInt64(bytes.count - offset) / UInt64(max(minimumBytesEach, 1)) else {
                throw GGUFError.truncated(file: path, offset: at, what: "\(what) \(n)")
            }
            return Int(n)
        }

        mutating func string(_ what: String) throws -> String {
            let at = offset
            let n = try u64(what + " length")
            guard n <= UInt64(GGUFFile.maxStringLength) else {
                throw GGUFError.invalid(file: path, what: "\(what) at byte \(at) claims \(n) bytes")
            }
            try need(Int(n), what)
            defer { offset += Int(n) }
            let slice = UnsafeRawBufferPointer(rebasing: bytes[offset..<(offset + Int(n))])
            // Vocabularies hold arbitrary bytes; invalid UTF-8 is repaired rather than refused.
            return String(decoding: slice, as: UTF8.self)
        }

        mutating func value(type: UInt32, key: String, depth: Int) throws -> GGUFValue {
            switch type {
            case 0: return .uint(UInt64(try u8(key)))
            case 1: return .int(Int64(Int8(bitPattern: try u8(key))))
            case 2: return .uint(UInt64(try u16(key)))
            case 3: return .int(Int64(Int16(bitPattern: try u16(key))))
            case 4: return .uint(UInt64(try u32(key)))
            case 5: return .int(Int64(Int32(bitPattern: try u32(key))))
            case 6: return .float(Double(Float(bitPattern: try u32(key))))
            case 7:
                let b = try u8(key)
                guard b <= 1 else { throw GGUFError.invalid(file: path, what: "bool '\(key)' has value \(b)") }
                return .bool(b == 1)
            case 8: return .string(try string(key))
            case 9:
                guard depth < 4 else { throw GGUFError.invalid(file: path, what: "arrays nested too deeply in '\(key)'") }
                let elementType = try u32(key)
                let n = try count("array '\(key)'", minimumBytesEach: elementType == 8 ? 8 : 1)
                var items: [GGUFValue] = []
                items.reserveCapacity(n)
                for _ in 0..<n { items.append(try value(type: elementType, key: key, depth: depth + 1)) }
                return .array(items)
            case 10: return .uint(try u64(key))
            case 11: return .int(Int64(bitPattern: try u64(key)))
            case 12: return .float(Double(bitPattern: try u64(key)))
            default: throw GGUFError.invalid(file: path, what: "metadata '\(key)' has unknown value type \(type)")
            }
        }
    }
}

/// Dequantization of ggml blocks to f32 (the formulas of ggml-quants.c `dequantize_row_*`).
enum GGMLDequantize {
    @inline(__always)
    static func half(_ p: UnsafeRawPointer, _ at: Int) -> Float {
        float16BitsToFloat(p.loadUnaligned(fromByteOffset: at, as: UInt16.self).littleEndian)
    }

    static func run(_ type: GGMLType, _ src: UnsafeRawPointer, _ out: UnsafeMutablePointer<Float>, _ n: Int) {
        let (qk, size) = type.blockLayout
        let blocks = n / qk
        let q = src.assumingMemoryBound(to: UInt8.self)
        switch type {
        case .f32:
            UnsafeMutableRawPointer(out).copyMemory(from: src, byteCount: n * 4)
        case .f16:
            for i in 0..<n { out[i] = half(src, 2 * i) }
        case .bf16:
            for i in 0..<n { out[i] = bfloat16BitsToFloat(src.loadUnaligned(fromByteOffset: 2 * i, as: UInt16.self).littleEndian) }
        case .q8_0:
            for b in 0..<blocks {
                let base = b * size
                let d = half(src, base)
                for j in 0..<32 { out[b * 32 + j] = d * Float(Int8(bitPattern: q[base + 2 + j])) }
            }
        case .q4_0:
            for b in 0..<blocks {
                let base = b * size
                let d = half(src, base)
                for j in 0..<16 {
                    let byte = q[base + 2 + j]
                    out[b * 32 + j] = d * Float(Int(byte & 0x0F) - 8)
                    out[b * 32 + j + 16] = d * Float(Int(byte >> 4) - 8)
                }
            }
        case .q4_1:
            for b in 0..<blocks {
                let base = b * size
                let d = half(src, base), m = half(src, base + 2)
                for j in 0..<16 {
                    let byte = q[base + 4 + j]
                    out[b * 32 + j] = d * Float(byte & 0x0F) + m
                    out[b * 32 + j + 16] = d * Float(byte >> 4) + m
                }
            }
        case .q4_K, .q5_K:
            let five = type == .q5_K
            for b in 0..<blocks {
                let base = b * size
                let d = half(src, base), dmin = half(src, base + 2)
                let scales = q + base + 4
                let qh = q + base + 16
                var ql = q + base + (five ? 48 : 16)
                var y = out + b * 256
                for chunk in 0..<4 {
                    let (sc1, m1) = scaleMin(chunk * 2, scales)
                    let (sc2, m2) = scaleMin(chunk * 2 + 1, scales)
                    let d1 = d * Float(sc1), min1 = dmin * Float(m1)
                    let d2 = d * Float(sc2), min2 = dmin * Float(m2)
                    let u1 = UInt8(1) << (2 * chunk), u2 = UInt8(2) << (2 * chunk)
                    for l in 0..<32 {
                        let high1: UInt8 = five && (qh[l] & u1) != 0 ? 16 : 0
                        y[l] = d1 * Float((ql[l] & 0x0F) + high1) - min1
                    }
                    for l in 0..<32 {
                        let high2: UInt8 = five && (qh[l] & u2) != 0 ? 16 : 0
                        y[l + 32] = d2 * Float((ql[l] >> 4) + high2) - min2
                    }
                    ql += 32
                    y += 64
                }
            }
        case .q6_K:
            for b in 0..<blocks {
                let base = b * size
                var ql = q + base
                var qh = q + base + 128
                var sc = UnsafeRawPointer(q + base + 192).assumingMemoryBound(to: Int8.self)
                let d = half(src, base + 208)
                var y = out + b * 256
                for _ in 0..<2 {
                    for l in 0..<32 {
                        let s = l / 16
                        let q1 = Int(ql[l] & 0x0F | ((qh[l] >> 0) & 3) << 4) - 32
                        let q2 = Int(ql[l + 32] & 0x0F | ((qh[l] >> 2) & 3) << 4) - 32
                        let q3 = Int(ql[l] >> 4 | ((qh[l] >> 4) & 3) << 4) - 32
                        let q4 = Int(ql[l + 32] >> 4 | ((qh[l] >> 6) & 3) << 4) - 32
                        y[l] = d * Float(sc[s]) * Float(q1)
                        y[l + 32] = d * Float(sc[s + 2]) * Float(q2)
                        y[l + 64] = d * Float(sc[s + 4]) * Float(q3)
                        y[l + 96] = d * Float(sc[s + 6]) * Float(q4)
                    }
                    y += 128
                    ql += 64
                    qh += 32
                    sc += 8
                }
            }
        default:
            preconditionFailure("dequantize called for \(type)")
        }
    }

    /// The 6-bit scale and min of sub-block j from a K-quant's 12 packed bytes.
    @inline(__always)
    static func scaleMin(_ j: Int, _ s: UnsafePointer<UInt8>) -> (UInt8, UInt8) {
        if j < 4 { return (s[j] & 63, s[j + 4] & 63) }
        return ((s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}
