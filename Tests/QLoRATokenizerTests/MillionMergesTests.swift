// A resource bound of ROBUSTNESS.md: a tokenizer.json with a million merges (four times Llama 3's 280,147)
// loads and encodes as Hugging Face tokenizers does. The tokenizer is built here, as
// scripts/reference/make_million_merges_fixture.py builds it (30 MB of JSON is not committed); the expected
// ids come from tokenizers 0.23.3 (Resources/million_merges_cases.json).
import Foundation
import QLoRA
import QLoRATestSupport
import Testing

@Suite("tokenizer with a million merges")
struct MillionMergesTests {
    /// 1,000 base characters from U+4E00 (ids 0-999); merge k joins the pair p = k * 999983 mod 10^6
    /// (a = p / 1000, b = p mod 1000) into the token 1000 + k.
    static func tokenizerJSON() -> String {
        let n = 1000
        let base = (0..<n).map { String(UnicodeScalar(0x4E00 + $0)!) }
        var vocab = "", merges = ""
        vocab.reserveCapacity(24 << 20)
        merges.reserveCapacity(16 << 20)
        for (i, c) in base.enumerated() { vocab += "\"\(c)\":\(i)," }
        for k in 0..<(n * n) {
            let p = (k * 999_983) % (n * n)
            let a = base[p / n], b = base[p % n]
            vocab += "\"\(a)\(b)\":\(n + k)"
            if k < n * n - 1 { vocab += "," }
            merges += "\"\(a) \(b)\""
            if k < n * n - 1 { merges += "," }
        }
        return #"{"version":"1.0","added_tokens":[],"normalizer":null,"pre_tokenizer":null,"post_processor":null,"decoder":null,"model":{"type":"BPE","dropout":null,"unk_token":null,"fuse_unk":false,"byte_fallback":false,"vocab":{"# + vocab + #"},"merges":["# + merges + "]}}"
    }

    @Test("loads, and encodes and decodes ten texts as Hugging Face tokenizers does")
    func millionMerges() throws {
        let dir = try Fixtures.temporaryDirectory("million-merges")
        let path = FileSystem.join(dir, "tokenizer.json")
        let json = Self.tokenizerJSON()
        try FileSystem.writeFileAtomically(path, bytes: Array(json.utf8))
        let start = Date()
        let tokenizer = try Tokenizer(jsonFile: path)
        let seconds = Date().timeIntervalSince(start)
        #expect(tokenizer.vocabularySize == 1_001_000)
        let cases = try JSON.parse(try FileSystem.readFile(FileSystem.join(Fixtures.resources(), "million_merges_cases.json")))
        let list = cases["cases"]?.arrayValue ?? []
        #expect(list.count == 10)
        for c in list {
            let text = c["text"]?.stringValue ?? ""
            let expected = c["ids"]?.arrayValue?.compactMap(\.intValue) ?? []
            let ids = tokenizer.encode(text)
            #expect(ids == expected, "\(text.unicodeScalars.count) characters")
            #expect(tokenizer.decode(ids) == text)
        }
        print("million merges: \(json.utf8.count) bytes of JSON loaded in \(String(format: "%.1f", seconds)) s")
    }
}
