// Perplexity against transformers (sliding-window method of the Hugging Face guide) on the default
// model and a public-domain excerpt (Resources/perplexity.json, from scripts/reference/make_perplexity_fixture.py).
import QLoRA
import QLoRATestSupport
import Testing

@Suite("perplexity")
struct PerplexityTests {
    @Test("SmolLM2 f32: total NLL and scored tokens equal transformers' for strides 128 and 64")
    func smollm2() throws {
        let fixture = try JSON.parse(try FileSystem.readFile(FileSystem.join(Fixtures.resources(), "perplexity.json")))
        let cache = Environment.get("QLORA_CACHE") ?? FileSystem.join(Environment.get("HOME") ?? "/root", ".cache/swift-qlora")
        let path = FileSystem.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf")
        var options = LoadOptions()
        options.quantType = nil
        options.showProgress = false
        let model = try LlamaModel.load(path, options: options)
        let tokenizer = try Tokenizer.load(model: path)
        let text = String(decoding: try FileSystem.readFile(FileSystem.join(Fixtures.resources(), "war_and_peace_excerpt.txt")), as: UTF8.self)
        let ids = tokenizer.encode(text, addSpecialTokens: true)
        #expect(ids.count == fixture["tokens"]!.intValue!)
        #expect(Array(ids.prefix(16)) == fixture["ids_head"]!.arrayValue!.compactMap(\.intValue))
        for run in fixture["runs"]!.arrayValue! {
            let r = try PerplexityEvaluator.evaluate(model: model, tokens: ids, context: run["context"]!.intValue!,
                                                     stride: run["stride"]!.intValue!, showProgress: false)
            #expect(r.scoredTokens == run["scored_tokens"]!.intValue!)
            let expected = run["mean_nll"]!.doubleValue!
            #expect(abs(r.meanNLL - expected) / expected < 1e-4, "stride \(run["stride"]!): \(r.meanNLL) vs \(expected)")
        }
    }

    @Test("perplexity orders the 4-bit types as the paper does: NF4 below FP4 and Int4 (and f32 below all)")
    func ordering() throws {
        let cache = Environment.get("QLORA_CACHE") ?? FileSystem.join(Environment.get("HOME") ?? "/root", ".cache/swift-qlora")
        let path = FileSystem.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf")
        let tokenizer = try Tokenizer.load(model: path)
        let text = String(decoding: try FileSystem.readFile(FileSystem.join(Fixtures.resources(), "war_and_peace_excerpt.txt")), as: UTF8.self)
        let ids = tokenizer.encode(text, addSpecialTokens: true)
        var ppl: [String: Double] = [:]
        for qt in [QuantType?.none, .nf4, .fp4, .int4] {
            var o = LoadOptions()
            o.quantType = qt
            o.showProgress = false
            let model = try LlamaModel.load(path, options: o)
            ppl[qt?.rawValue ?? "f32"] = try PerplexityEvaluator.evaluate(model: model, tokens: ids, context: 512, stride: 512, showProgress: false).perplexity
        }
        #expect(ppl["f32"]! < ppl["nf4"]!)
        #expect(ppl["nf4"]! < ppl["fp4"]!)
        #expect(ppl["nf4"]! < ppl["int4"]!)
    }

    @Test("negative log-likelihood of one row is log-sum-exp minus the target logit")
    func nll() {
        let logits: [Float] = [1, 2, 3]
        let expected = log(exp(1.0) + exp(2.0) + exp(3.0)) - 2
        #expect(abs(PerplexityEvaluator.nll(logits[...], target: 1) - expected) < 1e-12)
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
