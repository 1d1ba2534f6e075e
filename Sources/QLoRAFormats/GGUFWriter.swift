// GGUF, write side: a version-3 file streamed tensor by tensor (`qlora merge --format gguf`, `qlora
// export-adapter`). The header, metadata and tensor infos go first, with every tensor's offset worked out
// from the declared shapes and types; then each tensor's bytes in the declared order, each padded to the
// alignment (32); the file appears under its name only when complete (AtomicFileWriter).
import QLoRACore

/// GGUF's metadata value types (their ids in the file).
public enum GGUFValueType: UInt32, Sendable {
    case uint8 = 0, int8, uint16, int16, uint32, int32, float32, bool, string, array, uint64, int64, float64
}

/// A metadata value with the type it is stored as.
public struct GGUFTypedValue: Sendable, Equatable {
    public struct Kind: Sendable, Equatable {
        public let type: GGUFValueType
        /// For arrays: the type of the elements.
        public let element: GGUFValueType?

        public init(type: GGUFValueType, element: GGUFValueType? = nil) {
            self.type = type
            self.element = element
        }
    }

    public let value: GGUFValue
    public let kind: Kind

    public init(_ value: GGUFValue, kind: Kind) {
        self.value = value
        self.kind = kind
    }

    public static func uint32(_ v: Int) -> Self { .init(.uint(UInt64(v)), kind: .init(type: .uint32)) }
    public static func int32(_ v: Int) -> Self { .init(.int(Int64(v)), kind: .init(type: .int32)) }
    public static func uint64(_ v: Int) -> Self { .init(.uint(UInt64(v)), kind: .init(type: .uint64)) }
    public static func float32(_ v: Double) -> Self { .init(.float(v), kind: .init(type: .float32)) }
    public static func bool(_ v: Bool) -> Self { .init(.bool(v), kind: .init(type: .bool)) }
    public static func string(_ v: String) -> Self { .init(.string(v), kind: .init(type: .string)) }
    public static func strings(_ v: [String]) -> Self { .init(.array(v.map { .string($0) }), kind: .init(type: .array, element: .string)) }
    public static func int32s(_ v: [Int]) -> Self { .init(.array(v.map { .int(Int64($0)) }), kind: .init(type: .array, element: .int32)) }
    public static func bools(_ v: [Bool]) -> Self { .init(.array(v.map { .bool($0) }), kind: .init(type: .array, element: .bool)) }
    public static func float32s(_ v: [Float]) -> Self { .init(.array(v.map { .float(Double($0)) }), kind: .init(type: .array, element: .float32)) }
}

extension GGUFFile {
    /// A metadata entry as stored, ready to be written again.
    public func typedValue(_ key: String) -> GGUFTypedValue? {
        guard let v = value(key), let k = metadataTypes[key] else { return nil }
        return GGUFTypedValue(v, kind: k)
    }
}

public final class GGUFWriter {
    public struct Declaration: Sendable {
        public let name: String
        /// Row-major (the last dimension varies fastest), as safetensors and our tensors hold them; the file
        /// stores the dimensions the other way round (ggml's ne).
        public let shape: [Int]
        public let type: GGMLType

        public init(name: String, shape: [Int], type: GGMLType) {
            self.name = name
            self.shape = shape
            self.type = type
        }

        public var byteCount: Int { shape.reduce(1, *) / type.blockLayout.elements * type.blockLayout.bytes }
    }

    public static let alignment = 32
    public let path: String
    private let declarations: [Declaration]
    private var next = 0
    private let file: AtomicFileWriter

    public init(path: String, metadata: [(String, GGUFTypedValue)], tensors: [Declaration]) throws {
        self.path = path
        declarations = tensors
        var header: [UInt8] = []
        func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { header.append(contentsOf: $0) } }
        func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { header.append(contentsOf: $0) } }
        func string(_ s: String) {
            let b = Array(s.utf8)
            u64(UInt64(b.count))
            header.append(contentsOf: b)
        }
        func scalar(_ v: GGUFValue, _ type: GGUFValueType, key: String) throws {
            func bad() -> GGUFError { .invalid(file: path, what: "metadata '\(key)': \(v) cannot be stored as \(type)") }
            switch (type, v) {
            case let (.uint8, .uint(x)) where x <= UInt8.max: header.append(UInt8(x))
            case let (.int8, .int(x)) where Int64(Int8.min)...Int64(Int8.max) ~= x: header.append(UInt8(bitPattern: Int8(x)))
            case let (.uint16, .uint(x)) where x <= UInt16.max: withUnsafeBytes(of: UInt16(x).littleEndian) { header.append(contentsOf: $0) }
            case let (.int16, .int(x)) where Int64(Int16.min)...Int64(Int16.max) ~= x: withUnsafeBytes(of: Int16(x).littleEndian) { header.append(contentsOf: $0) }
            case let (.uint32, .uint(x)) where x <= UInt32.max: u32(UInt32(x))
            case let (.int32, .int(x)) where Int64(Int32.min)...Int64(Int32.max) ~= x: u32(UInt32(bitPattern: Int32(x)))
            case let (.uint64, .uint(x)): u64(x)
            case let (.int64, .int(x)): u64(UInt64(bitPattern: x))
            case let (.float32, .float(x)): u32(Float(x).bitPattern)
            case let (.float64, .float(x)): u64(x.bitPattern)
            case let (.bool, .bool(x)): header.append(x ? 1 : 0)
            case let (.string, .string(x)): string(x)
            default: throw bad()
            }
        }
        u32(0x4655_4747)  // "GGUF"
        u32(3)
        u64(UInt64(tensors.count))
        u64(UInt64(metadata.count))
        var seen = Set<String>()
        for (key, t) in metadata {
            guard seen.insert(key).inserted else { throw GGUFError.invalid(file: path, what: "metadata key '\(key)' given twice") }
            string(key)
            u32(t.kind.type.rawValue)
            if t.kind.type == .array {
                guard let element = t.kind.element, element != .array, let items = t.value.arrayValue else {
                    throw GGUFError.invalid(file: path, what: "metadata '\(key)': an array needs its element type")
                }
                u32(element.rawValue)
                u64(UInt64(items.count))
                for item in items { try scalar(item, element, key: key) }
            } else {
                try scalar(t.value, t.kind.type, key: key)
            }
        }
        var offset = 0
        var names = Set<String>()
        for d in tensors {
            guard names.insert(d.name).inserted else { throw GGUFError.invalidTensor(file: path, tensor: d.name, reason: "declared twice") }
            let block = d.type.blockLayout.elements
            guard let last = d.shape.last, !d.shape.isEmpty, d.shape.count <= 4, d.shape.allSatisfy({ $0 > 0 }), last % block == 0 else {
                throw GGUFError.invalidTensor(file: path, tensor: d.name, reason: "shape \(d.shape) cannot be stored as \(d.type) (rows must be whole blocks of \(block))")
            }
            string(d.name)
            u32(UInt32(d.shape.count))
            for n in d.shape.reversed() { u64(UInt64(n)) }
            u32(d.type.rawValue)
            u64(UInt64(offset))
            offset += Self.padded(d.byteCount)
        }
        while header.count % Self.alignment != 0 { header.append(0) }
        file = try AtomicFileWriter(path: path)
        try file.write(header)
    }

    static func padded(_ n: Int) -> Int { (n + alignment - 1) / alignment * alignment }

    /// Appends the next declared tensor's bytes (already in its type's layout).
    public func append(_ name: String, bytes: UnsafeRawBufferPointer) throws {
        guard next < declarations.count else { throw GGUFError.invalidTensor(file: path, tensor: name, reason: "more tensors than declared") }
        let d = declarations[next]
        guard d.name == name else { throw GGUFError.invalidTensor(file: path, tensor: name, reason: "expected '\(d.name)' next") }
        guard bytes.count == d.byteCount else {
            throw GGUFError.invalidTensor(file: path, tensor: name, reason: "\(bytes.count) bytes given, \(d.byteCount) declared")
        }
        try file.write(bytes)
        let pad = Self.padded(bytes.count) - bytes.count
        if pad > 0 { try file.write([UInt8](repeating: 0, count: pad)) }
        next += 1
    }

    public func append(_ name: String, bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try append(name, bytes: $0) }
    }

    /// Syncs and renames the file into place; every declared tensor must have been appended.
    public func finish() throws {
        guard next == declarations.count else {
            throw GGUFError.invalidTensor(file: path, tensor: declarations[next].name, reason: "never written")
        }
        try file.commit()
    }
}
