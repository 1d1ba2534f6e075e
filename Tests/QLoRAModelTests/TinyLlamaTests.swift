// The forward pass against transformers on a tiny random Llama (Tests/QLoRAFormatsTests/Resources/tiny-llama,
// written by scripts/reference/make_tiny_llama.py): f32 logits, NF4 logits, and KV-cache steps.
import QLoRA
import QLoRATestSupport
import Testing

private let formats = FileSystem.join(FileSystem.directoryName(Fixtures.resources()), "../QLoRAFormatsTests/Resources")

@Suite("tiny Llama forward")
struct TinyLlamaTests {
    let reference = try! SafetensorsFile(path: FileSystem.join(formats, "tiny-llama-logits.safetensors"))
    let ids = [1, 5, 9, 200, 17, 3, 99, 42]

    func options(_ qt: QuantType?, dq: Bool = true) -> LoadOptions {
        var o = LoadOptions()
        o.quantType = qt
        o.doubleQuant = dq
        o.showProgress = false
        return o
    }

    @Test("f32 weights: logits equal transformers' within 1e-4 relative")
    func f32() throws {
        let model = try LlamaModel.load(FileSystem.join(formats, "tiny-llama"), options: options(nil))
        let cache = KVCache(config: model.config, capacity: 64)
        let logits = try model.forward(ids, cache: cache, logits: .all)
        let expected = reference.tensor("logits.f32")!.values(as: Float.self)
        let scale = expected.map(abs).max()!
        #expect(Compare.close(logits, expected, atol: 1e-4 * scale, rtol: 1e-4, "f32 logits") == nil)
    }

    @Test("NF4 + double quantization: logits equal transformers + bitsandbytes NF4")
    func nf4() throws {
        let model = try LlamaModel.load(FileSystem.join(formats, "tiny-llama"), options: options(.nf4))
        let cache = KVCache(config: model.config, capacity: 64)
        let logits = try model.forward(ids, cache: cache, logits: .all)
        let expected = reference.tensor("logits.bnb_nf4")!.values(as: Float.self)
        let scale = expected.map(abs).max()!
        #expect(Compare.close(logits, expected, atol: 1e-4 * scale, rtol: 1e-4, "nf4 logits") == nil)
        // A bitsandbytes checkpoint written by transformers loads as it is and gives the same logits.
        let stored = try LlamaModel.load(FileSystem.join(formats, "tiny-llama-bnb-nf4"), options: options(.nf4))
        let again = try stored.forward(ids, cache: KVCache(config: stored.config, capacity: 64), logits: .all)
        #expect(Compare.close(again, expected, atol: 1e-4 * scale, rtol: 1e-4, "stored nf4 logits") == nil)
    }

    @Test("prefill then one token at a time through the KV cache equals one full pass")
    func cacheSteps() throws {
        let model = try LlamaModel.load(FileSystem.join(formats, "tiny-llama"), options: options(.nf4))
        let full = try model.forward(ids, cache: KVCache(config: model.config, capacity: 64), logits: .all)
        let cache = KVCache(config: model.config, capacity: 64)
        var stepped = try model.forward(Array(ids[0..<5]), cache: cache, logits: .all)
        for t in 5..<ids.count { stepped += try model.forward([ids[t]], cache: cache, logits: .last) }
        #expect(cache.length == ids.count)
        #expect(Compare.close(stepped, full, atol: 1e-5, rtol: 1e-4, "cached steps") == nil)
    }
}
