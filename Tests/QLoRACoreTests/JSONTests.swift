import QLoRACore
import Testing

@Suite("JSON")
struct JSONTests {
    @Test("parses the whole grammar, keeps key order and big integers")
    func parse() throws {
        let v = try JSON.parse(#"{"b": [1, -2.5e3, true, false, null], "a": "x\u00e9\ud83d\ude00\n", "n": 18446744073709551615}"#)
        #expect(v.objectValue!.map(\.0) == ["b", "a", "n"])
        #expect(v["a"]?.stringValue == "xé😀\n")
        #expect(v["b"]?.arrayValue?[1].doubleValue == -2500)
        #expect(v["n"] == .number("18446744073709551615"))
        #expect(try JSON.parse(JSON.serialize(v)) == v)
        #expect(try JSON.parse(JSON.serialize(v, pretty: true)) == v)
    }

    @Test("rejects what RFC 8259 rejects", arguments: [
        "{\"a\": 1,}", "[1 2]", "01", "1.", ".5", "+1", "\"\\x\"", "\"a\u{01}\"", "{a: 1}", "[", "nul", "\"\\ud800\"",
        "{\"k\": 1, \"k\": 2}", "", "  ", "1 2", "\"abc",
    ])
    func reject(_ text: String) {
        #expect(throws: JSONError.self) { _ = try JSON.parse(text) }
    }

    @Test("invalid UTF-8 inside a string is an error")
    func utf8() {
        #expect(throws: JSONError.self) { _ = try JSON.parse([0x22, 0xC3, 0x28, 0x22]) }
    }
}
