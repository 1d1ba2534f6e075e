// GGUF SentencePiece vocabularies (tokenizer.ggml.model "llama") against llama.cpp's own expected ids: the
// vocab-only GGUFs and test vectors llama.cpp ships in models/ (ggml-vocab-*.gguf, .inp, .out; from the
// llama-cpp-python 0.3.36 sdist's vendored llama.cpp, MIT, Resources/llama.cpp/LICENSE.llama.cpp.txt), which its
// test-tokenizer-0 checks: each input encoded without BOS, special tokens parsed.
import QLoRA
import QLoRATestSupport
import Testing

private let folder = FileSystem.join(Fixtures.resources(), "llama.cpp")

@Suite("GGUF SentencePiece tokenizers")
struct GGUFSentencePieceTests {
    @Test("ids equal llama.cpp's test vectors (Llama 2 SPM, Phi-3)", arguments: ["llama-spm", "phi-3"])
    func vectors(_ name: String) throws {
        let path = FileSystem.join(folder, "ggml-vocab-\(name).gguf")
        let t = try Tokenizer(gguf: try GGUFFile(path: path))
        let inputs = String(decoding: try FileSystem.readFile(path + ".inp"), as: UTF8.self).components(separatedBy: "\n__ggml_vocab_test__\n")
        var outputs = String(decoding: try FileSystem.readFile(path + ".out"), as: UTF8.self).components(separatedBy: "\n")
        if outputs.last == "" { outputs.removeLast() }
        #expect(inputs.count - 1 == outputs.count || inputs.count == outputs.count, "\(inputs.count) inputs, \(outputs.count) outputs")
        var failures = 0
        for (text, line) in zip(inputs, outputs) {
            let expected = line.split(separator: " ").compactMap { Int($0) }
            let ids = t.encode(text)
            if ids != expected {
                failures += 1
                if failures <= 3 { Issue.record("\(name) \(JSON.serialize(.string(text))): \(ids) vs \(expected)") }
            }
        }
        #expect(failures == 0, "\(name): \(failures) of \(outputs.count) differ")
        #expect(outputs.count > 40)
        // BOS is added on request, and decoding gives the text back.
        #expect(t.encode("Hello world", addSpecialTokens: true).first == t.bosTokenID)
        #expect(t.decode(t.encode("Hello world")) == "Hello world")
    }

    @Test("a SentencePiece vocabulary with a NaN score: a typed error naming the token (found by the fuzzer: it trapped)")
    func nanScore() throws {
        let dir = try Fixtures.temporaryDirectory("spm-nan")
        let path = FileSystem.join(dir, "vocab.gguf")
        let tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab"]
        let writer = try GGUFWriter(path: path, metadata: [
            ("general.architecture", .string("llama")), ("tokenizer.ggml.model", .string("llama")),
            ("tokenizer.ggml.tokens", .strings(tokens)), ("tokenizer.ggml.scores", .float32s([0, 0, 0, -1, -2, .nan])),
            ("tokenizer.ggml.token_type", .int32s([2, 3, 3, 1, 1, 1])),
        ], tensors: [])
        try writer.finish()
        do {
            _ = try Tokenizer(gguf: try GGUFFile(path: path))
            Issue.record("accepted")
        } catch let e as TokenizerError {
            #expect("\(e)".contains("score of token 5 is not a finite number"), "\(e)")
        }
    }

    @Test("a SentencePiece vocabulary with a token of 100,000 characters: a typed error at once, not minutes of merges")
    func longToken() throws {
        let dir = try Fixtures.temporaryDirectory("spm-long-token")
        let path = FileSystem.join(dir, "vocab.gguf")
        let tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab", String(repeating: "ab", count: 50_000)]
        let writer = try GGUFWriter(path: path, metadata: [
            ("general.architecture", .string("llama")), ("tokenizer.ggml.model", .string("llama")),
            ("tokenizer.ggml.tokens", .strings(tokens)), ("tokenizer.ggml.scores", .float32s(tokens.indices.map { -Float($0) })),
            ("tokenizer.ggml.token_type", .int32s([2, 3, 3, 1, 1, 1, 1])),
        ], tensors: [])
        try writer.finish()
        let start = Clock.seconds()
        do {
            _ = try Tokenizer(gguf: try GGUFFile(path: path))
            Issue.record("accepted")
        } catch let e as TokenizerError {
            #expect("\(e)".contains(path) && "\(e)".contains("token 6") && "\(e)".contains("100000 characters"), "\(e)")
        }
        #expect(Clock.seconds() - start < 5)
    }
}
