// safetensors: round trips, sharded folders, and hostile headers (each a typed error naming the file
// and the tensor, never a trap).
import QLoRACore
import QLoRAFormats
import QLoRATestSupport
import Testing

func rawSafetensors(_ header: String, data: [UInt8], lengthOverride: UInt64? = nil) -> [UInt8] {
    Fixtures.rawSafetensors(header, data: data, length: lengthOverride)
}

func writeTemp(_ bytes: [UInt8], name: String) throws -> String {
    let dir = try Fixtures.temporaryDirectory("st")
    let path = FileSystem.join(dir, name)
    try FileSystem.writeFileAtomically(path, bytes: bytes)
    return path
}

@Suite("safetensors")
struct SafetensorsTests {
    @Test("write then read: dtypes, shapes, metadata, 8-byte aligned data, zero-copy views")
    func roundTrip() throws {
        let dir = try Fixtures.temporaryDirectory("roundtrip")
        let path = FileSystem.join(dir, "t.safetensors")
        let a: [Float] = [1, -2.5, 3.25, 0]
        let b: [UInt16] = [0x3C00, 0xC000, 0x7BFF]
        let c: [Int64] = [-1, 1 << 40]
        let d: [UInt8] = []
        try SafetensorsWriter.write(path: path, tensors: [
            ("a", .make(a, dtype: .f32, shape: [2, 2])),
            ("half", .make(b, dtype: .f16, shape: [3])),
            ("ints", .make(c, dtype: .i64, shape: [2, 1])),
            ("empty", .make(d, dtype: .u8, shape: [0, 5])),
        ], metadata: [("format", "pt"), ("note", "q\"uoted")])
        let f = try SafetensorsFile(path: path)
        #expect(f.names == ["a", "half", "ints", "empty"])
        #expect(f.tensor("a")!.values(as: Float.self) == a)
        #expect(f.tensor("a")!.shape == [2, 2])
        #expect(f.tensor("half")!.floats() == [1, -2, 65504])
        #expect(f.tensor("ints")!.values(as: Int64.self) == c)
        #expect(f.tensor("empty")!.elementCount == 0)
        #expect(f.metadataValue("note") == "q\"uoted")
        let headerLength = f.mapping.bytes.loadUnaligned(as: UInt64.self)
        #expect((8 + headerLength) % 8 == 0)
        // A partially written file never appears under the final name.
        #expect(try FileSystem.listDirectory(dir) == ["t.safetensors"])
    }

    @Test("a writer dropped before finish leaves no file behind")
    func atomic() throws {
        let dir = try Fixtures.temporaryDirectory("atomic")
        let path = FileSystem.join(dir, "x.safetensors")
        do {
            let w = try SafetensorsWriter(path: path, tensors: [.init(name: "a", dtype: .f32, shape: [2])])
            #expect(throws: SafetensorsError.self) { try w.finish() }
        }
        #expect(try FileSystem.listDirectory(dir).isEmpty)
    }

    struct BadCase: CustomStringConvertible, Sendable {
        let label: String
        let bytes: [UInt8]
        let tensor: String?
        let expected: String
        var description: String { label }
    }

    static let badCases: [BadCase] = [
        BadCase(label: "file shorter than the length field", bytes: [1, 2, 3], tensor: nil, expected: "truncated"),
        BadCase(label: "absurd header length", bytes: rawSafetensors("{}", data: [], lengthOverride: 1 << 40), tensor: nil, expected: "over the"),
        BadCase(label: "header longer than the file", bytes: rawSafetensors("{}", data: [], lengthOverride: 4096), tensor: nil, expected: "truncated"),
        BadCase(label: "bad JSON", bytes: rawSafetensors("{\"a\": {\"dtype\": \"F32\",}", data: []), tensor: nil, expected: "not valid JSON"),
        BadCase(label: "header not an object", bytes: rawSafetensors("[1, 2]", data: []), tensor: nil, expected: "must be a JSON object"),
        BadCase(label: "duplicate tensor name", bytes: rawSafetensors(
            #"{"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}"#,
            data: [UInt8](repeating: 0, count: 8)), tensor: "w", expected: "duplicate key"),
        BadCase(label: "unknown dtype", bytes: rawSafetensors(
            #"{"w": {"dtype": "F8_E9M9", "shape": [1], "data_offsets": [0, 1]}}"#, data: [0]), tensor: "w", expected: "unsupported dtype"),
        BadCase(label: "offset past the data", bytes: rawSafetensors(
            #"{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}"#, data: [UInt8](repeating: 0, count: 8)), tensor: "w", expected: "data ends at byte 16"),
        BadCase(label: "byte count not shape x dtype", bytes: rawSafetensors(
            #"{"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}"#, data: [UInt8](repeating: 0, count: 8)), tensor: "w", expected: "need 12"),
        BadCase(label: "overlapping tensors", bytes: rawSafetensors(
            #"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#,
            data: [UInt8](repeating: 0, count: 12)), tensor: "b", expected: "overlaps tensor 'a'"),
        BadCase(label: "begin after end", bytes: rawSafetensors(
            #"{"w": {"dtype": "U8", "shape": [0], "data_offsets": [4, 0]}}"#, data: [UInt8](repeating: 0, count: 4)), tensor: "w", expected: "data_offsets"),
        BadCase(label: "negative dimension", bytes: rawSafetensors(
            #"{"w": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 0]}}"#, data: []), tensor: "w", expected: "non-negative"),
        BadCase(label: "shape overflow", bytes: rawSafetensors(
            #"{"w": {"dtype": "F64", "shape": [4294967296, 4294967296, 16], "data_offsets": [0, 0]}}"#, data: []), tensor: "w", expected: "overflows"),
        BadCase(label: "missing dtype", bytes: rawSafetensors(
            #"{"w": {"shape": [1], "data_offsets": [0, 1]}}"#, data: [0]), tensor: "w", expected: "dtype"),
        BadCase(label: "metadata value not a string", bytes: rawSafetensors(
            #"{"__metadata__": {"n": 3}}"#, data: []), tensor: "__metadata__", expected: "not a string"),
        BadCase(label: "trailing garbage after the header", bytes: rawSafetensors("{} x", data: []), tensor: nil, expected: "after the JSON"),
        BadCase(label: "deeply nested JSON", bytes: rawSafetensors(String(repeating: "[", count: 100_000), data: []), tensor: nil, expected: "nesting"),
    ]

    @Test("hostile headers give a typed error naming the file and the tensor", arguments: badCases)
    func hostile(_ c: BadCase) throws {
        let path = try writeTemp(c.bytes, name: "bad.safetensors")
        do {
            _ = try SafetensorsFile(path: path)
            Issue.record("\(c.label): accepted")
        } catch let e as SafetensorsError {
            let message = e.description
            #expect(message.hasPrefix(path), "\(c.label): \(message)")
            if let t = c.tensor { #expect(message.contains("'\(t)'") || message.contains("\"\(t)\""), "\(c.label): \(message)") }
            #expect(message.contains(c.expected), "\(c.label): \(message)")
            #expect(!message.contains("\n"))
        }
    }

    @Test("sharded checkpoints: index, shards, and bad indexes")
    func sharded() throws {
        let dir = try Fixtures.temporaryDirectory("sharded")
        try SafetensorsWriter.write(path: FileSystem.join(dir, "model-00001-of-00002.safetensors"), tensors: [
            ("a", .make([Float(1), 2], dtype: .f32, shape: [2])),
        ])
        try SafetensorsWriter.write(path: FileSystem.join(dir, "model-00002-of-00002.safetensors"), tensors: [
            ("b", .make([Float(3)], dtype: .f32, shape: [1])), ("c", .make([UInt8(7)], dtype: .u8, shape: [1])),
        ])
        let index = #"{"metadata": {"total_size": 13}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors", "c": "model-00002-of-00002.safetensors"}}"#
        try FileSystem.writeFileAtomically(FileSystem.join(dir, "model.safetensors.index.json"), bytes: Array(index.utf8))
        let t = try TensorCollection(path: dir)
        #expect(t.names == ["a", "b", "c"])
        #expect(t.tensor("b")!.floats() == [3])
        #expect(t.file(of: "a")!.hasSuffix("model-00001-of-00002.safetensors"))

        let missing = #"{"weight_map": {"a": "model-00001-of-00002.safetensors", "zz": "model-00001-of-00002.safetensors"}}"#
        try FileSystem.writeFileAtomically(FileSystem.join(dir, "model.safetensors.index.json"), bytes: Array(missing.utf8))
        #expect(throws: SafetensorsError.missingTensor(file: FileSystem.join(dir, "model-00001-of-00002.safetensors"), tensor: "zz")) {
            _ = try TensorCollection(path: dir)
        }
        let escape = #"{"weight_map": {"a": "../secret.safetensors"}}"#
        try FileSystem.writeFileAtomically(FileSystem.join(dir, "model.safetensors.index.json"), bytes: Array(escape.utf8))
        #expect(throws: SafetensorsError.self) { _ = try TensorCollection(path: dir) }
    }

    @Test("pickle checkpoints are refused with a pointer to safetensors")
    func pickle() throws {
        let dir = try Fixtures.temporaryDirectory("pickle")
        try FileSystem.writeFileAtomically(FileSystem.join(dir, "pytorch_model.bin"), bytes: [0x80, 0x02])
        #expect(throws: FormatError.noWeights(folder: dir, pickle: ["pytorch_model.bin"])) { _ = try TensorCollection(path: dir) }
        #expect(FormatError.noWeights(folder: dir, pickle: ["pytorch_model.bin"]).description.contains("safetensors"))
        #expect(throws: FormatError.pickleRefused(file: FileSystem.join(dir, "pytorch_model.bin"))) {
            _ = try TensorCollection(path: FileSystem.join(dir, "pytorch_model.bin"))
        }
    }

    @Test("reads a checkpoint written by transformers (tiny Llama, f32)")
    func transformersCheckpoint() throws {
        let t = try TensorCollection(path: FileSystem.join(Fixtures.resources(), "tiny-llama"))
        #expect(t.contains("model.layers.1.mlp.down_proj.weight"))
        #expect(t.entry("model.layers.0.self_attn.k_proj.weight")!.shape == [32, 64])
        #expect(t.entry("lm_head.weight")!.dtype == .f32)
    }
}
