// `qlora quantize` against transformers + bitsandbytes: the same tiny Llama quantized by both must give
// the same tensors, byte for byte (Resources/tiny-llama-bnb-*, from scripts/reference/make_tiny_llama.py).
import QLoRA
import QLoRATestSupport
import Testing

@Suite("bitsandbytes checkpoints")
struct BnB4bitCheckpointTests {
    let resources = Fixtures.resources()

    func compare(reference: String, options: QuantizeOptions) throws {
        let out = try Fixtures.temporaryDirectory("quantize")
        var options = options
        options.showProgress = false
        let report = try CheckpointQuantizer.quantize(input: FileSystem.join(resources, "tiny-llama"), output: out, options: options)
        #expect(report.quantized.count == 14)  // 7 linear layers x 2 blocks; not embeddings, norms, lm_head
        let ours = try TensorCollection(path: out)
        let theirs = try TensorCollection(path: FileSystem.join(resources, reference))
        #expect(Set(ours.names) == Set(theirs.names))
        for name in theirs.names {
            guard let a = ours.tensor(name), let b = theirs.tensor(name) else { continue }
            #expect(a.dtype == b.dtype && a.shape == b.shape, "\(name): \(a.dtype) \(a.shape) vs \(b.dtype) \(b.shape)")
            // Every tensor, the quant-state JSON text included, is byte-identical.
            #expect(a.byteArray() == b.byteArray(), "\(name) differs")
        }
        for name in theirs.names where name.hasSuffix("_proj.weight") {
            let (qa, sa) = try BnB4bit.load(name, from: ours)
            let (qb, sb) = try BnB4bit.load(name, from: theirs)
            #expect(sa == sb)
            #expect(Compare.bitEqual(qa.dequantize(), qb.dequantize(), name) == nil)
        }
        let config = try JSON.parse(try FileSystem.readFile(FileSystem.join(out, "config.json")))
        let reference = try JSON.parse(try FileSystem.readFile(FileSystem.join(resources, reference, "config.json")))
        #expect(config["quantization_config"] == reference["quantization_config"])
    }

    @Test("NF4 with double quantization equals transformers' load_in_4bit checkpoint")
    func nf4() throws {
        try compare(reference: "tiny-llama-bnb-nf4", options: QuantizeOptions())
    }

    @Test("FP4 without double quantization equals transformers' checkpoint")
    func fp4() throws {
        var o = QuantizeOptions()
        o.quantType = .fp4
        o.doubleQuant = false
        try compare(reference: "tiny-llama-bnb-fp4-nodq", options: o)
    }

    @Test("a quant state with a bad block size or missing companion tensor is a clear error")
    func badState() throws {
        let dir = try Fixtures.temporaryDirectory("badstate")
        let json = Array(#"{"quant_type": "nf4", "blocksize": 48, "dtype": "float32", "shape": [2, 2]}"#.utf8)
        try SafetensorsWriter.write(path: FileSystem.join(dir, "model.safetensors"), tensors: [
            ("w.weight", .make([UInt8](repeating: 0, count: 2), dtype: .u8, shape: [2, 1])),
            ("w.weight.quant_state.bitsandbytes__nf4", .make(json, dtype: .u8, shape: [json.count])),
        ])
        let t = try TensorCollection(path: dir)
        #expect(throws: FormatError.self) { _ = try BnB4bit.load("w.weight", from: t) }
        do { _ = try BnB4bit.load("w.weight", from: t) } catch { #expect("\(error)".contains("blocksize")) }
    }
}
