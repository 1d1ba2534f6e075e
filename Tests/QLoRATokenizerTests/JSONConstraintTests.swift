// JSON output by constrained decoding: JSONPrefix (the byte-level recognizer of a JSON object) against our RFC 8259 parser
// (QLoRACore's JSON, tested on RFC cases and fuzzed) on every string of a small alphabet up to length 6 and on random longer
// ones, on real documents and each of their prefixes; JSONConstraint's mask over the SmolLM2 vocabulary.
import QLoRA
import QLoRATestSupport
import Testing

@Suite("JSON constraint")
struct JSONConstraintTests {
    /// Whether the recognizer takes every byte of `s` and ends with the object closed.
    static func accepts(_ s: String) -> (all: Bool, complete: Bool) {
        var p = JSONPrefix()
        let all = p.feed(Array(s.utf8))
        return (all, all && p.isComplete)
    }

    /// Whether our parser reads `s` as a JSON object.
    static func parsesAsObject(_ s: String) -> Bool { (try? JSON.parse(s))?.objectValue != nil }

    @Test("real documents are taken whole and complete; each proper prefix is taken and not complete")
    func documents() {
        let docs = [#"{}"#, #" { "a" : 1 } "#, #"{"name": "France", "capital": "Paris", "population": 6.8e7, "eu": true, "king": null}"#,
                    #"{"a": [1, -2.5, 3E-2, 0, -0, {"b": []}, "x\"y\\z\/\u00e9\n"], "c": {"d": {"e": false}}}"#,
                    "{\"caf\u{e9}\": \"\u{1F600} ok\"}", #"{"nested": [[[[]]], [{}]]}"#]
        for d in docs {
            #expect(Self.parsesAsObject(d), "\(d)")
            #expect(Self.accepts(d) == (true, true), "\(d)")
            let bytes = Array(d.utf8)
            var end = bytes.count
            while end > 0 && JSONPrefix.isSpace(bytes[end - 1]) { end -= 1 }
            for n in 0..<(end - 1) {
                var p = JSONPrefix()
                #expect(p.feed(bytes[..<n]) && !p.isComplete, "\(d) cut at \(n)")
            }
        }
        for bad in [#"[1]"#, #""x""#, #"{"a" 1}"#, #"{,}"#, #"{"a":01}"#, #"{"a":1}}"#, #"{"a":1,}"#, #"{"a":tru e}"#, "{\"a\":\"\u{1}\"}",
                    #"{"a":-}"#, #"{"a":1.}"#, #"{"a":1e}"#, #"{"a":"\x"}"#, #"{"a":"\u12G4"}"#, #"{'a':1}"#, #"{"a":1} x"#] {
            #expect(!Self.accepts(bad).complete && !Self.parsesAsObject(bad), "\(bad)")
        }
    }

    @Test("complete exactly when our RFC 8259 parser reads an object: every string of a small alphabet up to 6 bytes, and 20,000 random ones up to 24")
    func againstParser() {
        let alphabet = Array(#"{}[]":,0-1.etrufalsn "#.utf8)
        var checked = 0, objects = 0
        func check(_ bytes: [UInt8]) {
            let s = String(decoding: bytes, as: UTF8.self)
            let ours = Self.accepts(s).complete, theirs = Self.parsesAsObject(s)
            #expect(ours == theirs, "\(s): ours \(ours), parser \(theirs)")
            checked += 1
            if theirs { objects += 1 }
        }
        var current: [[UInt8]] = [[]]
        for _ in 1...6 {
            current = current.flatMap { prefix in alphabet.map { prefix + [$0] } }.filter { candidate in
                // Only strings whose every prefix the recognizer takes can become objects; the rest are checked once here.
                var p = JSONPrefix()
                let taken = p.feed(candidate)
                if !taken { check(candidate) }
                return taken
            }
            current.forEach(check)
        }
        var rng = SeededGenerator(seed: 9)
        for _ in 0..<20_000 {
            let n = 1 + Int(rng.next() % 24)
            check((0..<n).map { _ in alphabet[Int(rng.next() % UInt64(alphabet.count))] })
        }
        #expect(objects > 20)
        print("JSONPrefix against the parser: \(checked) strings, \(objects) objects among them, no disagreement")
    }

    @Test("the mask over the SmolLM2 vocabulary: after a key only tokens that continue it, after the object only the end token")
    func mask() throws {
        let tokenizer = try Tokenizer(jsonFile: FileSystem.join(Fixtures.resources(), "smollm2-tokenizer.json"))
        let V = tokenizer.vocabularySize
        let end = try #require(tokenizer.eosTokenID ?? tokenizer.id(of: "<|im_end|>"))
        let eos: Set<Int> = [end]
        let constraint = JSONConstraint(tokenizer: tokenizer, vocabularySize: V)
        func allowed() -> [Int] {
            var logits = [Float](repeating: 0, count: V)
            _ = constraint.mask(&logits, eos: eos)
            return logits.indices.filter { logits[$0] == 0 }
        }
        let first = allowed()
        // At the start: whitespace, or whitespace then '{' and what may follow it (`{"`, `{\n`...); never a letter, never the end.
        #expect(!first.isEmpty && !first.contains(end))
        for id in first {
            let text = tokenizer.decodedBytes([id]).drop { JSONPrefix.isSpace($0) }
            #expect(text.isEmpty || text.first == UInt8(ascii: "{"), "\(tokenizer.decode([id]))")
        }
        #expect(!first.contains(tokenizer.encode("Paris")[0]))
        for id in tokenizer.encode(#"{"name": "Paris"}"#) {
            #expect(allowed().contains(id), "\(tokenizer.decode([id]))")
            constraint.advance(id)
        }
        #expect(allowed() == [end])
        // What the mask costs a decoding step (printed, not asserted: timings are for bench/).
        let again = JSONConstraint(tokenizer: tokenizer, vocabularySize: V)
        for id in tokenizer.encode(#"{"name": "Pa"#) { again.advance(id) }
        var logits = [Float](repeating: 0, count: V)
        let start = Clock.seconds()
        for _ in 0..<20 { _ = again.mask(&logits, eos: eos) }
        print("JSONConstraint.mask over \(V) tokens inside a string: \(Chart.fixed((Clock.seconds() - start) / 20 * 1000, 2)) ms")
    }
}
