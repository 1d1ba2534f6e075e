// SentencePiece's tokenizer.model (a protobuf ModelProto): the pieces with their scores and types, which is
// what llama.cpp's converter turns into a GGUF's tokenizer.ggml.tokens / scores / token_type. Only the fields
// read here are decoded; the rest are skipped by wire type. Field numbers are those of sentencepiece_model.proto:
// ModelProto.pieces = 1 (repeated SentencePiece), normalizer_spec = 3 (add_dummy_prefix = 3);
// SentencePiece.piece = 1, score = 2 (float), type = 3 (enum, NORMAL when absent).
import QLoRACore

public struct SentencePieceModel: Sendable, Equatable {
    /// sentencepiece's piece types (their enum values).
    public enum PieceType: Int, Sendable {
        case normal = 1, unknown = 2, control = 3, userDefined = 4, unused = 5, byte = 6
    }

    public struct Piece: Sendable, Equatable {
        public var piece: String
        public var score: Float
        public var type: PieceType
    }

    public var pieces: [Piece]
    /// The normalizer's add_dummy_prefix (a "▁" before the text; true when absent).
    public var addDummyPrefix = true

    /// Reads a tokenizer.model file.
    public init(path: String) throws {
        try self.init(bytes: try FileSystem.readFile(path, limit: 256 << 20), file: path)
    }

    public init(bytes: [UInt8], file: String) throws {
        func bad(_ r: String) -> TokenizerError { .invalidFile(file: file, reason: "not a SentencePiece model: \(r)") }
        var pieces: [Piece] = []
        var dummy = true
        try bytes.withUnsafeBufferPointer { buffer in
            var reader = ProtobufReader(buffer, bad: bad)
            while let (field, wire) = try reader.nextField() {
                switch (field, wire) {
                case (1, 2):
                    var sub = ProtobufReader(try reader.lengthDelimited(), bad: bad)
                    var p = Piece(piece: "", score: 0, type: .normal)
                    while let (f, w) = try sub.nextField() {
                        switch (f, w) {
                        case (1, 2): p.piece = String(decoding: try sub.lengthDelimited(), as: UTF8.self)
                        case (2, 5): p.score = Float(bitPattern: try sub.fixed32())
                        case (3, 0):
                            let v = try sub.varint()
                            guard let t = PieceType(rawValue: Int(truncatingIfNeeded: v)) else { throw bad("piece type \(v)") }
                            p.type = t
                        default: try sub.skip(wire: w)
                        }
                    }
                    pieces.append(p)
                case (3, 2):
                    var sub = ProtobufReader(try reader.lengthDelimited(), bad: bad)
                    while let (f, w) = try sub.nextField() {
                        if f == 3, w == 0 { dummy = try sub.varint() != 0 } else { try sub.skip(wire: w) }
                    }
                default: try reader.skip(wire: wire)
                }
            }
        }
        guard !pieces.isEmpty else { throw bad("no pieces") }
        self.pieces = pieces
        addDummyPrefix = dummy
    }
}

/// Protobuf's wire format, read from a byte buffer.
struct ProtobufReader {
    let bytes: UnsafeBufferPointer<UInt8>
    var offset = 0
    let bad: (String) -> TokenizerError

    init(_ bytes: UnsafeBufferPointer<UInt8>, bad: @escaping (String) -> TokenizerError) {
        self.bytes = bytes
        self.bad = bad
    }

    mutating func varint() throws -> UInt64 {
        var value: UInt64 = 0
        var shift: UInt64 = 0
        while true {
            guard offset < bytes.count, shift < 64 else { throw bad("a varint runs past the end at byte \(offset)") }
            let b = bytes[offset]
            offset += 1
            value |= UInt64(b & 0x7F) << shift
            if b & 0x80 == 0 { return value }
            shift += 7
        }
    }

    /// The next field's number and wire type, or nil at the end.
    mutating func nextField() throws -> (Int, Int)? {
        guard offset < bytes.count else { return nil }
        let key = try varint()
        return (Int(key >> 3), Int(key & 7))
    }

    mutating func lengthDelimited() throws -> UnsafeBufferPointer<UInt8> {
        let n = try varint()
        guard n <= UInt64(bytes.count - offset) else { throw bad("a field of \(n) bytes runs past the end at byte \(offset)") }
        let slice = UnsafeBufferPointer(rebasing: bytes[offset..<(offset + Int(n))])
        offset += Int(n)
        return slice
    }

    mutating func fixed32() throws -> UInt32 {
        guard bytes.count - offset >= 4 else { throw bad("a 32-bit field runs past the end") }
        let v = UInt32(bytes[offset]) | UInt32(bytes[offset + 1]) << 8 | UInt32(bytes[offset + 2]) << 16 | UInt32(bytes[offset + 3]) << 24
        offset += 4
        return v
    }

    mutating func skip(wire: Int) throws {
        switch wire {
        case 0: _ = try varint()
        case 1:
            guard bytes.count - offset >= 8 else { throw bad("a 64-bit field runs past the end") }
            offset += 8
        case 2: _ = try lengthDelimited()
        case 5: _ = try fixed32()
        default: throw bad("wire type \(wire) at byte \(offset)")
        }
    }
}
