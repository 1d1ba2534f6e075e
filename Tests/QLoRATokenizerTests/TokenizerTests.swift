// Tokenizers against Hugging Face `tokenizers` 0.23.3 on a 64-text corpus (languages, code, emoji,
// whitespace runs, special tokens inside text): ids, ids with special tokens, decoding and streaming
// (Resources/tokenizer_cases.json, from scripts/reference/make_tokenizer_fixtures.py). The six other
// tokenizer.json files are committed xz-compressed in Resources/tokenizers (sources and licenses in its
// SOURCES.md) and decompressed into .build/test-fixtures at test time; SmolLM2's is
// Resources/smollm2-tokenizer.json (and the default GGUF).
import QLoRA
import QLoRATestSupport
import Testing

private let cases: JSONValue = try! JSON.parse(try! FileSystem.readFile(FileSystem.join(Fixtures.resources(), "tokenizer_cases.json")))

private func tokenizerPath(_ name: String) -> String {
    if name == "smollm2" { return FileSystem.join(Fixtures.resources(), "smollm2-tokenizer.json") }
    return FileSystem.join(Fixtures.resources(), "tokenizers/\(name).tokenizer.json.xz")
}

private func ints(_ v: JSONValue?) -> [Int] { v?.arrayValue?.compactMap(\.intValue) ?? [] }

private let tokenizerCache = TokenizerCache()
private final class TokenizerCache: @unchecked Sendable {
    var loaded: [String: Tokenizer] = [:]
    let lock = NSLockLike()
    func get(_ name: String) throws -> Tokenizer {
        lock.lock(); defer { lock.unlock() }
        if let t = loaded[name] { return t }
        var path = tokenizerPath(name)
        if path.hasSuffix(".xz") { path = try Fixtures.decompressed(path) }
        let t = try Tokenizer.load(model: path)
        loaded[name] = t
        return t
    }
}

@Suite("tokenizers")
struct TokenizerTests {
    static let names = ["gpt2", "llama2", "llama3", "mistral", "qwen3", "phi3", "smollm2"]

    @Test("ids equal Hugging Face tokenizers on the corpus, with and without special tokens", arguments: names)
    func encode(_ name: String) throws {
        let t = try tokenizerCache.get(name)
        let entry = cases["tokenizers"]![name]!
        var failures = 0
        for c in entry["cases"]!.arrayValue! {
            let text = c["text"]!.stringValue!
            let ids = t.encode(text)
            if ids != ints(c["ids"]) {
                failures += 1
                if failures <= 3 { Issue.record("\(name) \(JSON.serialize(.string(text))): \(ids) vs \(ints(c["ids"]))") }
            }
            let withSpecial = t.encode(text, addSpecialTokens: true)
            if withSpecial != ints(c["ids_with_special"]) {
                failures += 1
                if failures <= 3 { Issue.record("\(name) with special \(JSON.serialize(.string(text))): \(withSpecial) vs \(ints(c["ids_with_special"]))") }
            }
        }
        #expect(failures == 0, "\(name): \(failures) mismatches")
    }

    @Test("decoding equals Hugging Face, keeping or skipping special tokens", arguments: names)
    func decode(_ name: String) throws {
        let t = try tokenizerCache.get(name)
        var failures = 0
        for c in cases["tokenizers"]![name]!["cases"]!.arrayValue! {
            let decoded = t.decode(ints(c["ids"]))
            if decoded != c["decoded"]!.stringValue! {
                failures += 1
                if failures <= 3 { Issue.record("\(name): \(JSON.serialize(.string(decoded))) vs \(JSON.serialize(c["decoded"]!))") }
            }
            // tokenizers 0.23 keeps llama2's "▁<s>" when skipping special tokens; transformers drops it (we do too).
            let expectedSkip = c["transformers"]?["decoded_skip_special_of_file_ids"]?.stringValue ?? c["decoded_skip_special"]!.stringValue!
            let skipped = t.decode(ints(c["ids_with_special"]), skipSpecialTokens: true)
            if skipped != expectedSkip {
                failures += 1
                if failures <= 3 { Issue.record("\(name) skip: \(JSON.serialize(.string(skipped))) vs \(JSON.serialize(.string(expectedSkip)))") }
            }
        }
        #expect(failures == 0, "\(name): \(failures) mismatches")
    }

    @Test("streaming decode never splits a UTF-8 character and joins to the full text", arguments: names)
    func streaming(_ name: String) throws {
        let t = try tokenizerCache.get(name)
        for check in cases["tokenizers"]![name]!["decode_checks"]!.arrayValue! {
            let ids = ints(check["ids"])
            let s = StreamingDecoder(tokenizer: t, skipSpecialTokens: false)
            var pieces: [String] = []
            for id in ids { pieces.append(s.add(id)) }
            #expect(pieces.allSatisfy { !$0.contains("\u{FFFD}") } || check["decoded"]!.stringValue!.contains("\u{FFFD}"))
            #expect(pieces.joined() == check["decoded"]!.stringValue!, "\(name): \(pieces)")
        }
    }

    @Test("the default model's GGUF tokenizer equals its tokenizer.json")
    func gguf() throws {
        let cache = Environment.get("QLORA_CACHE") ?? FileSystem.join(Environment.get("HOME") ?? "/root", ".cache/swift-qlora")
        let fromGGUF = try Tokenizer.load(model: FileSystem.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
        #expect(fromGGUF.chatTemplate?.contains("<|im_start|>") == true)
        #expect(fromGGUF.eosToken == "<|im_end|>" || fromGGUF.eosToken == "<|endoftext|>")
        for c in cases["tokenizers"]!["smollm2"]!["cases"]!.arrayValue! {
            #expect(fromGGUF.encode(c["text"]!.stringValue!) == ints(c["ids"]))
        }
    }

    @Test("a tokenizer.json with an unsupported model type says what is supported")
    func unsupported() throws {
        let dir = try Fixtures.temporaryDirectory("tok")
        let path = FileSystem.join(dir, "tokenizer.json")
        try FileSystem.writeFileAtomically(path, bytes: Array(#"{"model": {"type": "Unigram", "vocab": []}}"#.utf8))
        #expect(throws: TokenizerError.unsupported(file: path, what: "model type 'Unigram'", supported: "BPE")) {
            _ = try Tokenizer(jsonFile: path)
        }
    }
}

final class NSLockLike: @unchecked Sendable {
    private var mutex = pthread_mutex_t()
    init() { pthread_mutex_init(&mutex, nil) }
    func lock() { pthread_mutex_lock(&mutex) }
    func unlock() { pthread_mutex_unlock(&mutex) }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
