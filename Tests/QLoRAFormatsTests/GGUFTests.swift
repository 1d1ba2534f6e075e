// GGUF reading against the `gguf` Python package: metadata of every value type, and every tensor type
// dequantized bit-for-bit like gguf-py (Resources/mixed*.gguf, from scripts/reference/make_gguf_fixtures.py).
import QLoRACore
import QLoRAFormats
import QLoRATestSupport
import Testing

private let resources = Fixtures.resources()
private let expected = try! SafetensorsFile(path: FileSystem.join(resources, "mixed_gguf_expected.safetensors"))

/// A GGUF value as the JSON the fixture stores (nested arrays kept).
private func asJSON(_ v: GGUFValue) -> JSONValue {
    switch v {
    case let .uint(u): return .number(String(u))
    case let .int(i): return .number(String(i))
    case let .float(d): return .number("\(d)")
    case let .bool(b): return .bool(b)
    case let .string(s): return .string(s)
    case let .array(a): return .array(a.map(asJSON))
    }
}

@Suite("GGUF")
struct GGUFTests {
    @Test("metadata: every value type equals what gguf-py wrote")
    func metadata() throws {
        let g = try GGUFFile(path: FileSystem.join(resources, "mixed.gguf"))
        #expect(g.version == 3)
        let reference = try JSON.parse(expected.metadataValue("metadata.json")!)
        let keys = reference.objectValue!.map(\.0)
        #expect(keys.count >= 25)
        for key in keys {
            guard let ours = g.value(key) else { Issue.record("missing key \(key)"); continue }
            #expect(asJSON(ours) == reference[key]!, "\(key)")
        }
        #expect(g.value("test.u64") == .uint(18_364_758_544_493_064_720))
        #expect(g.value("tokenizer.chat_template")?.stringValue?.contains("{%") == true)
    }

    @Test("every tensor type dequantizes bit-exactly like gguf-py")
    func tensors() throws {
        let g = try GGUFFile(path: FileSystem.join(resources, "mixed.gguf"))
        #expect(g.tensors.count == 12)
        var types = Set<String>()
        for t in g.tensors {
            let want = expected.tensor(t.name)!.values(as: Float.self)
            #expect(expected.metadataValue("type.\(t.name)") == t.type.description)
            #expect(expected.metadataValue("shape.\(t.name)") == t.dims.map(String.init).joined(separator: ","))
            #expect(Compare.bitEqual(try g.floats(t), want, t.name) == nil)
            types.insert(t.type.description)
        }
        #expect(types == ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"])
    }

    @Test("version 2 with a custom alignment")
    func version2() throws {
        let g = try GGUFFile(path: FileSystem.join(resources, "mixed-v2.gguf"))
        #expect(g.version == 2 && g.alignment == 64)
        #expect(try g.floats(g.tensor("v2.a")!) == [0, 0.5, 1, 1.5, 2, 2.5])
        #expect(g.tensor("v2.a")!.shape == [2, 3])
        #expect(try g.floats(g.tensor("v2.b")!) == [-2, -1, 0, 1, 2])
    }

    @Test("the default model's GGUF: llama metadata, 272 tensors, Q4_1 weights")
    func defaultModel() throws {
        let cache = Environment.get("QLORA_CACHE") ?? FileSystem.join(Environment.get("HOME") ?? "/root", ".cache/swift-qlora")
        let path = FileSystem.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf")
        // scripts/setup.sh fetches the model before `make test`; a missing model is a failure, not a skip.
        let g = try GGUFFile(path: path)
        #expect(g.value("general.architecture")?.stringValue == "llama")
        #expect(g.value("llama.block_count")?.intValue == 30)
        #expect(g.tensors.count == 272)
        let w = g.tensor("blk.0.ffn_down.weight")!
        #expect(w.type == .q4_1 && w.shape == [576, 1536])
        let values = try g.floats(w)
        #expect(values.allSatisfy { $0.isFinite })
    }

    struct BadCase: CustomStringConvertible, Sendable {
        let label: String
        let mutate: @Sendable ([UInt8]) -> [UInt8]
        let expected: String
        var description: String { label }
    }

    static func putU64(_ b: inout [UInt8], _ at: Int, _ v: UInt64) {
        for i in 0..<8 { b[at + i] = UInt8((v >> (8 * UInt64(i))) & 0xFF) }
    }

    static let badCases: [BadCase] = [
        BadCase(label: "not GGUF", mutate: { var b = $0; b[0] = 0x50; return b }, expected: "not a GGUF file"),
        BadCase(label: "version 1", mutate: { var b = $0; b[4] = 1; return b }, expected: "version 1"),
        BadCase(label: "truncated in metadata", mutate: { Array($0.prefix(100)) }, expected: "truncated"),
        BadCase(label: "truncated data", mutate: { Array($0.prefix($0.count - 500)) }, expected: "runs past the end"),
        BadCase(label: "absurd tensor count", mutate: { var b = $0; putU64(&b, 8, 1 << 60); return b }, expected: "tensor count"),
        BadCase(label: "absurd string length", mutate: { var b = $0; putU64(&b, 24, 1 << 62); return b }, expected: "claims"),
    ]

    @Test("hostile GGUF files give typed errors naming the file", arguments: badCases)
    func hostile(_ c: BadCase) throws {
        let bytes = c.mutate(try FileSystem.readFile(FileSystem.join(resources, "mixed.gguf")))
        let dir = try Fixtures.temporaryDirectory("gguf")
        let path = FileSystem.join(dir, "bad.gguf")
        try FileSystem.writeFileAtomically(path, bytes: bytes)
        do {
            _ = try GGUFFile(path: path)
            Issue.record("\(c.label): accepted")
        } catch let e as GGUFError {
            #expect(e.description.hasPrefix(path) && e.description.contains(c.expected), "\(c.label): \(e)")
        }
    }

    @Test("a GGUF that claims 2^40 tensors, a 2^40-byte string or a 2^40-element array: a typed error at once, nothing allocated for it")
    func claims() throws {
        func u32(_ v: UInt32) -> [UInt8] { (0..<4).map { UInt8((v >> (8 * UInt32($0))) & 0xFF) } }
        func u64(_ v: UInt64) -> [UInt8] { (0..<8).map { UInt8((v >> (8 * UInt64($0))) & 0xFF) } }
        func str(_ s: String) -> [UInt8] { u64(UInt64(s.utf8.count)) + Array(s.utf8) }
        let header = Array("GGUF".utf8) + u32(3)
        let files: [(String, [UInt8], String)] = [
            ("tensors", header + u64(1 << 40) + u64(0) + [UInt8](repeating: 0, count: 64), "tensor count"),
            ("string", header + u64(0) + u64(1) + str("general.name") + u32(8) + u64(1 << 40) + Array("abc".utf8), "claims"),
            ("array", header + u64(0) + u64(1) + str("tokenizer.ggml.tokens") + u32(9) + u32(8) + u64(1 << 40), "runs past the end"),
        ]
        let dir = try Fixtures.temporaryDirectory("gguf-claims")
        for (label, bytes, expected) in files {
            let path = FileSystem.join(dir, label + ".gguf")
            try FileSystem.writeFileAtomically(path, bytes: bytes)
            let start = Clock.seconds()
            do {
                _ = try GGUFFile(path: path)
                Issue.record("\(label): accepted")
            } catch let e as GGUFError {
                #expect(e.description.hasPrefix(path) && e.description.contains(expected), "\(label): \(e)")
            }
            #expect(Clock.seconds() - start < 1, "\(label)")
        }
    }

    @Test("a tensor with an unknown type or misaligned offset is named in the error")
    func badTensor() throws {
        var bytes = try FileSystem.readFile(FileSystem.join(resources, "mixed.gguf"))
        let g = try GGUFFile(path: FileSystem.join(resources, "mixed.gguf"))
        // The last tensor info ends right before the padding to the data section: its u64 offset is the
        // last 8 bytes and its u32 type the 4 before them. Find the info of the last tensor by its name.
        let last = g.tensors.last!
        let name = Array(last.name.utf8)
        var at = -1
        for i in stride(from: g.dataStart - name.count, through: 0, by: -1) where Array(bytes[i..<(i + name.count)]) == name { at = i; break }
        #expect(at > 0)
        let typeAt = at + name.count + 4 + 8 * last.dims.count
        let dir = try Fixtures.temporaryDirectory("ggufbad")
        var unknown = bytes
        unknown[typeAt] = 99
        try FileSystem.writeFileAtomically(FileSystem.join(dir, "a.gguf"), bytes: unknown)
        #expect(throws: GGUFError.self) { _ = try GGUFFile(path: FileSystem.join(dir, "a.gguf")) }
        do { _ = try GGUFFile(path: FileSystem.join(dir, "a.gguf")) } catch { #expect("\(error)".contains(last.name) && "\(error)".contains("99")) }
        bytes[typeAt + 4] &+= 4  // offset no longer a multiple of the alignment
        try FileSystem.writeFileAtomically(FileSystem.join(dir, "b.gguf"), bytes: bytes)
        do { _ = try GGUFFile(path: FileSystem.join(dir, "b.gguf")); Issue.record("accepted") } catch {
            #expect("\(error)".contains(last.name) && "\(error)".contains("aligned"))
        }
    }
}

@Suite("GGML quantizers")
struct GGMLQuantizerTests {
    static let fixture = try! SafetensorsFile(path: FileSystem.join(resources, "ggml_quant.safetensors"))

    @Test("q8_0, q4_0, f16 and bf16 bytes equal gguf-py's (ties of magnitude, halves, zero, tiny and f16-maximum blocks)",
          arguments: [GGMLType.q8_0, .q4_0, .f16, .bf16])
    func sameBytes(_ type: GGMLType) throws {
        let values = Self.fixture.tensor("values")!.values(as: Float.self)
        let want = Self.fixture.tensor(type.description.lowercased())!.values(as: UInt8.self)
        let ours = try GGMLQuantizer.quantize(values, as: type, tensor: "values")
        #expect(ours.count == want.count)
        let first = zip(ours, want).enumerated().first { $0.element.0 != $0.element.1 }
        #expect(first == nil, "\(type): first differing byte \(first.map { "\($0.offset): \($0.element.0) vs \($0.element.1)" } ?? "")")
        // And what we wrote reads back through the GGUF dequantizer as gguf-py's bytes do.
        let back = try GGMLQuantizer.dequantize(ours, as: type, count: values.count, tensor: "values")
        // Within the type's step of each block's largest magnitude (q4_0: d = amax / 8, and the largest value
        // of the other sign is clipped to 7d; q8_0: half of amax / 127; f16, bf16: their rounding; and the f16
        // rounding of the scale, up to 2^-11 of amax), plus 1e-5
        // for the tiny block, whose f16 scale is subnormal.
        let tolerance: Float = [.q4_0: 0.126, .q8_0: 0.0045, .f16: 0.0005, .bf16: 0.004][type]!
        for b in 0..<(values.count / 32) {
            let block = values[(32 * b)..<(32 * b + 32)], amax = block.map(abs).max()!
            for j in block.indices where abs(back[j] - values[j]) > tolerance * amax + 1e-5 {
                Issue.record("\(type): value \(j) reads back as \(back[j]), was \(values[j]) (block max \(amax))")
                break
            }
        }
    }

    @Test("q4_K bytes equal llama.cpp's quantize_row_q4_K_ref (zero, constant, one-signed, tiny, huge sub-blocks; real weights); read back close")
    func q4K() throws {
        let fixture = try SafetensorsFile(path: FileSystem.join(resources, "ggml_q4k.safetensors"))
        let values = fixture.tensor("values")!.values(as: Float.self)
        let want = fixture.tensor("q4_K")!.values(as: UInt8.self)
        let ours = try GGMLQuantizer.quantize(values, as: .q4_K, tensor: "values")
        #expect(ours.count == want.count)
        let differing = zip(ours, want).enumerated().filter { $0.element.0 != $0.element.1 }.map(\.offset)
        #expect(differing.isEmpty, "\(differing.count) bytes differ; first in super-block \(differing.first.map { $0 / 144 } ?? -1), byte \(differing.first.map { $0 % 144 } ?? -1)")
        let back = try GGMLQuantizer.dequantize(ours, as: .q4_K, count: values.count, tensor: "values")
        // Each sub-block of 32 spans its range in 15 steps (6-bit scales of an f16 super-scale): within a step, on
        // the rows whose sub-blocks are alike (not row 4's outliers or row 5, where a huge sub-block leaves its small
        // neighbours a 6-bit scale of zero, as llama.cpp's own bytes do).
        for b in 0..<(values.count / 32) where ![4, 5].contains(b / 16) {
            let block = values[(32 * b)..<(32 * b + 32)]
            let range = max(block.max()!, 0) - min(block.min()!, 0)
            for j in block.indices where abs(back[j] - values[j]) > range / 15 + 1e-6 {
                Issue.record("q4_K: value \(j) reads back as \(back[j]), was \(values[j]) (sub-block range \(range))")
                break
            }
        }
    }

    @Test("bad input: rows that are not whole blocks, a non-finite value, a type we do not write")
    func errors() {
        #expect(throws: GGMLQuantizationError.notWholeBlocks(tensor: "w", count: 40, blockSize: 32)) {
            _ = try GGMLQuantizer.quantize([Float](repeating: 1, count: 40), as: .q4_0, tensor: "w")
        }
        var values = [Float](repeating: 1, count: 64)
        values[37] = .nan
        #expect(throws: GGMLQuantizationError.self) { _ = try GGMLQuantizer.quantize(values, as: .q8_0, tensor: "w") }
        #expect("\(GGMLQuantizationError.nonFinite(tensor: "w", index: 37, value: .nan))".contains("value 37"))
        #expect(throws: GGMLQuantizationError.notWholeBlocks(tensor: "w", count: 288, blockSize: 256)) {
            _ = try GGMLQuantizer.quantize([Float](repeating: 1, count: 288), as: .q4_K, tensor: "w")
        }
        #expect(throws: GGMLQuantizationError.unsupported(tensor: "w", type: .q5_K)) {
            _ = try GGMLQuantizer.quantize([Float](repeating: 1, count: 256), as: .q5_K, tensor: "w")
        }
    }
}
