// safetensors: read (memory-mapped, zero copy) and write (streamed through a temporary file).
// Format: 8-byte little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
// optional "__metadata__" (string to string), then the data section. The header is hostile input:
// its size is capped, its JSON is strict, and every offset and byte count is checked before use.
// Spec: https://github.com/huggingface/safetensors (README "Format").
import QLoRACore

/// One tensor's entry in a safetensors header.
public struct SafetensorsEntry: Sendable, Equatable {
    public let name: String
    public let dtype: DType
    public let shape: [Int]
    /// Byte range within the data section.
    public let begin: Int
    public let end: Int

    public var byteCount: Int { end - begin }
    public var elementCount: Int { shape.reduce(1, *) }
}

/// A parsed, validated, memory-mapped safetensors file.
public final class SafetensorsFile: @unchecked Sendable {
    /// Headers larger than this are refused (the reference implementation uses the same 100 MB cap).
    public static let maxHeaderLength = 100_000_000

    public let path: String
    public let mapping: MappedFile
    /// Tensors in header order.
    public let entries: [SafetensorsEntry]
    public let metadata: [(String, String)]
    private let index: [String: Int]
    private let dataStart: Int

    public init(path: String) throws {
        self.path = path
        mapping = try MappedFile(path: path)
        let bytes = mapping.bytes
        guard bytes.count >= 8 else { throw SafetensorsError.truncated(file: path, size: bytes.count, needed: 8) }
        let length = bytes.loadUnaligned(fromByteOffset: 0, as: UInt64.self).littleEndian
        guard length <= UInt64(Self.maxHeaderLength) else {
            throw SafetensorsError.headerTooLarge(file: path, length: length, limit: Self.maxHeaderLength)
        }
        let headerLength = Int(length)
        guard bytes.count >= 8 + headerLength else {
            throw SafetensorsError.truncated(file: path, size: bytes.count, needed: 8 + headerLength)
        }
        dataStart = 8 + headerLength
        let parsed = try Self.parseHeader(UnsafeRawBufferPointer(rebasing: bytes[8..<dataStart]),
                                          dataSize: bytes.count - dataStart, path: path)
        entries = parsed.entries
        metadata = parsed.metadata
        var index: [String: Int] = [:]
        for (i, e) in entries.enumerated() { index[e.name] = i }
        self.index = index
    }

    public var names: [String] { entries.map(\.name) }

    public func entry(_ name: String) -> SafetensorsEntry? { index[name].map { entries[$0] } }

    /// A zero-copy view of a tensor (nil if absent). The view keeps the mapping alive.
    public func tensor(_ name: String) -> TensorView? {
        guard let e = entry(name) else { return nil }
        return view(e)
    }

    public func view(_ e: SafetensorsEntry) -> TensorView {
        let base = mapping.bytes.baseAddress.map { $0 + dataStart + e.begin }
        return TensorView(dtype: e.dtype, shape: e.shape, bytes: UnsafeRawBufferPointer(start: base, count: e.byteCount), owner: mapping)
    }

    public func metadataValue(_ key: String) -> String? { metadata.first { $0.0 == key }?.1 }

    /// Lets the pages of a tensor leave memory once read (see MappedFile.releasePages).
    public func releasePages(_ e: SafetensorsEntry) {
        mapping.releasePages((dataStart + e.begin)..<(dataStart + e.end))
    }

    // MARK: - Header validation

    struct Header {
        var entries: [SafetensorsEntry]
        var metadata: [(String, String)]
    }

    static func parseHeader(_ text: UnsafeRawBufferPointer, dataSize: Int, path: String) throws -> Header {
        let json: JSONValue
        do {
            json = try JSON.parse(text)
        } catch let e as JSONError {
            throw SafetensorsError.invalidHeaderJSON(file: path, reason: e.description)
        }
        guard case let .object(fields) = json else { throw SafetensorsError.headerNotObject(file: path) }
        var entries: [SafetensorsEntry] = []
        var metadata: [(String, String)] = []
        for (name, value) in fields {
            if name == "__metadata__" {
                guard case let .object(meta) = value else {
                    throw SafetensorsError.invalidEntry(file: path, tensor: name, reason: "__metadata__ must be an object of strings")
                }
                for (k, v) in meta {
                    guard let s = v.stringValue else {
                        throw SafetensorsError.invalidEntry(file: path, tensor: name, reason: "__metadata__ value for '\(k)' is not a string")
                    }
                    metadata.append((k, s))
                }
                continue
            }
            entries.append(try parseEntry(name: name, value: value, dataSize: dataSize, path: path))
        }
        // No two tensors may share bytes.
        let sorted = entries.filter { $0.byteCount > 0 }.sorted { $0.begin < $1.begin }
        for (a, b) in zip(sorted, sorted.dropFirst()) where b.begin < a.end {
            throw SafetensorsError.overlap(file: path, tensor: b.name, other: a.name)
        }
        return Header(entries: entries, metadata: metadata)
    }

    static func parseEntry(name: String, value: JSONValue, dataSize: Int, path: String) throws -> SafetensorsEntry {
        func bad(_ reason: String) -> SafetensorsError { .invalidEntry(file: path, tensor: name, reason: reason) }
        guard case let .object(fields) = value else { throw bad("entry must be an object with dtype, shape and data_offsets") }
        for (k, _) in fields where !["dtype", "shape", "data_offsets"].contains(k) {
            throw bad("unexpected field '\(k)'")
        }
        guard let dtypeName = value["dtype"]?.stringValue else { throw bad("missing or non-string 'dtype'") }
        guard let dtype = DType(rawValue: dtypeName) else {
            throw SafetensorsError.unknownDType(file: path, tensor: name, dtype: dtypeName)
        }
        guard let shapeValues = value["shape"]?.arrayValue else { throw bad("missing or non-array 'shape'") }
        var shape: [Int] = []
        for d in shapeValues {
            guard let v = d.intValue, v >= 0 else { throw bad("shape must hold non-negative integers") }
            shape.append(v)
        }
        guard let offsets = value["data_offsets"]?.arrayValue, offsets.count == 2,
              let begin = offsets[0].intValue, let end = offsets[1].intValue, begin >= 0, end >= begin
        else { throw bad("data_offsets must be [begin, end] with 0 <= begin <= end") }
        guard let count = checkedElementCount(shape) else { throw bad("shape \(shape) overflows") }
        let (expected, overflow) = count.multipliedReportingOverflow(by: dtype.byteSize)
        guard !overflow else { throw bad("shape \(shape) overflows") }
        guard end <= dataSize else {
            throw SafetensorsError.offsetOutOfRange(file: path, tensor: name, end: end, dataSize: dataSize)
        }
        guard end - begin == expected else {
            throw SafetensorsError.byteCountMismatch(file: path, tensor: name, expected: expected, actual: end - begin)
        }
        return SafetensorsEntry(name: name, dtype: dtype, shape: shape, begin: begin, end: end)
    }
}

// MARK: - Writing

/// Writes a safetensors file tensor by tensor, so that only one tensor needs to be in memory.
/// Declare every tensor first (the header is written up front), then `append` their bytes in the
/// declared order, then `finish()`; the file appears under its final name only then.
public final class SafetensorsWriter {
    public struct Declaration: Sendable {
        public let name: String
        public let dtype: DType
        public let shape: [Int]

        public init(name: String, dtype: DType, shape: [Int]) {
            self.name = name
            self.dtype = dtype
            self.shape = shape
        }

        public var byteCount: Int { shape.reduce(1, *) * dtype.byteSize }
    }

    public let path: String
    private let declarations: [Declaration]
    private var next = 0
    private let file: AtomicFileWriter

    public init(path: String, tensors: [Declaration], metadata: [(String, String)] = []) throws {
        self.path = path
        declarations = tensors
        var seen = Set<String>()
        var fields: [(String, JSONValue)] = []
        if !metadata.isEmpty {
            fields.append(("__metadata__", .object(metadata.map { ($0.0, .string($0.1)) })))
        }
        var offset = 0
        for d in tensors {
            guard seen.insert(d.name).inserted else {
                throw SafetensorsError.duplicateTensor(file: path, tensor: d.name, other: path)
            }
            fields.append((d.name, .object([
                ("dtype", .string(d.dtype.rawValue)),
                ("shape", .array(d.shape.map { .int($0) })),
                ("data_offsets", .array([.int(offset), .int(offset + d.byteCount)])),
            ])))
            offset += d.byteCount
        }
        var header = Array(JSON.serialize(.object(fields)).utf8)
        // Pad with spaces so the data section starts 8-byte aligned, as the reference writer does.
        while (8 + header.count) % 8 != 0 { header.append(0x20) }
        file = try AtomicFileWriter(path: path)
        var length = UInt64(header.count).littleEndian
        try withUnsafeBytes(of: &length) { try file.write($0) }
        try file.write(header)
    }

    /// Appends the next declared tensor's bytes.
    public func append(_ name: String, bytes: UnsafeRawBufferPointer) throws {
        guard next < declarations.count else {
            throw SafetensorsError.writeMismatch(file: path, tensor: name, reason: "more tensors than declared")
        }
        let d = declarations[next]
        guard d.name == name else {
            throw SafetensorsError.writeMismatch(file: path, tensor: name, reason: "expected '\(d.name)' next")
        }
        guard bytes.count == d.byteCount else {
            throw SafetensorsError.writeMismatch(file: path, tensor: name, reason: "\(bytes.count) bytes given, \(d.byteCount) declared")
        }
        try file.write(bytes)
        next += 1
    }

    public func append<T>(_ name: String, values: [T]) throws {
        try values.withUnsafeBytes { try append(name, bytes: $0) }
    }

    /// Syncs and renames the file into place. Every declared tensor must have been appended.
    public func finish() throws {
        guard next == declarations.count else {
            throw SafetensorsError.writeMismatch(file: path, tensor: declarations[next].name, reason: "never written")
        }
        try file.commit()
    }

    /// Writes whole tensors in one call.
    public static func write(path: String, tensors: [(String, TensorView)], metadata: [(String, String)] = []) throws {
        let writer = try SafetensorsWriter(
            path: path, tensors: tensors.map { Declaration(name: $0.0, dtype: $0.1.dtype, shape: $0.1.shape) }, metadata: metadata)
        for (name, t) in tensors { try writer.append(name, bytes: t.bytes) }
        try writer.finish()
    }
}
