// json_schema by constrained decoding: JSONSchemaMatcher against the `jsonschema` package's verdicts on thousands of texts
// (Resources/json_schema_cases.json, scripts/reference/make_schema_fixture.py), random walks that never reach a dead end
// and always end in JSON our parser reads, the keywords it refuses by name, and the mask over the SmolLM2 vocabulary.
import QLoRA
import QLoRATestSupport
import Testing

@Suite("JSON schema constraint")
struct JSONSchemaTests {
    static func cases() throws -> [(name: String, schema: JSONValue, texts: [(String, Bool)])] {
        let root = try JSON.parse(String(contentsOfFile: FileSystem.join(Fixtures.resources(), "json_schema_cases.json"), encoding: .utf8))
        return (root["cases"]?.arrayValue ?? []).map { c in
            (c["name"]?.stringValue ?? "", c["schema"] ?? .null,
             (c["texts"]?.arrayValue ?? []).map { ($0["text"]?.stringValue ?? "", $0["valid"]?.boolValue ?? false) })
        }
    }

    /// Whether the matcher takes every byte of `text` and ends with a whole value.
    static func accepts(_ grammar: JSONSchemaGrammar, _ text: String) -> Bool {
        var m = JSONSchemaMatcher(grammar)
        return m.feed(text.utf8) && m.isComplete
    }

    @Test("every text jsonschema (Draft 2020-12) calls valid is taken whole; every one it calls invalid is refused")
    func agreesWithJsonschema() throws {
        let all = try Self.cases()
        #expect(all.count >= 9)
        var checked = 0
        for c in all {
            let grammar = try JSONSchemaGrammar(schema: c.schema)
            for (text, valid) in c.texts {
                #expect(Self.accepts(grammar, text) == valid, "\(c.name): \(valid ? "valid" : "invalid") text \(text)")
                checked += 1
            }
        }
        print("JSONSchemaMatcher against jsonschema: \(checked) texts over \(all.count) schemas")
    }

    @Test("indented values are taken at any depth (a line break and four spaces a level), and a run of whitespace past that is refused")
    func indentation() throws {
        // Objects nested eight deep, the innermost holding an array of numbers.
        var schema: JSONValue = .object([("type", .string("array")), ("items", .object([("type", .string("integer"))]))])
        var value: JSONValue = .array([.int(1), .int(2)])
        for level in 0..<8 {
            schema = .object([("type", .string("object")), ("properties", .object([("k\(level)", schema)])), ("required", .array([.string("k\(level)")]))])
            value = .object([("k\(level)", value)])
        }
        let grammar = try JSONSchemaGrammar(schema: schema)
        // JSON.serialize(pretty:) indents by two; the same with four spaces and with tabs and \r\n line breaks.
        let two = JSON.serialize(value, pretty: true)
        #expect(two.contains("\n" + String(repeating: " ", count: 16)), "the text is nested past the old limit")
        for text in [two, two.replacingOccurrences(of: "  ", with: "    "), two.replacingOccurrences(of: "  ", with: "\t").replacingOccurrences(of: "\n", with: "\r\n")] {
            #expect(Self.accepts(grammar, text), "\(text)")
        }
        // Padding is still bounded: at the top, after the value, and deep inside.
        let compact = JSON.serialize(value)
        #expect(Self.accepts(grammar, compact))
        #expect(!Self.accepts(grammar, "{" + String(repeating: " ", count: 40) + compact.dropFirst()))
        #expect(!Self.accepts(grammar, compact + String(repeating: "\n", count: 13)))
        let deep = two.replacingOccurrences(of: #""k0""#, with: String(repeating: " ", count: 60) + #""k0""#)
        #expect(deep != two && !Self.accepts(grammar, deep))
    }

    @Test("random walks over the bytes a schema allows never reach a dead end, and those that end parse as JSON")
    func randomWalks() throws {
        var rng = SeededRandom(seed: 9)
        // Every printable ASCII byte, a newline and a two-byte character: whatever a model writes (every schema's names too).
        let alphabet = Array(0x20...0x7E) + [0x0A] + Array("é".utf8)
        var ended = 0
        for c in try Self.cases() {
            let grammar = try JSONSchemaGrammar(schema: c.schema)
            for _ in 0..<60 {
                var m = JSONSchemaMatcher(grammar)
                var bytes: [UInt8] = []
                for _ in 0..<400 {
                    let allowed = alphabet.filter { var copy = m; return copy.feed($0) }
                    if m.isComplete, allowed.allSatisfy({ $0 == 0x20 || $0 == 0x0A }) || rng.next() % 10 < 3 { break }
                    guard let b = allowed.isEmpty ? nil : allowed[Int(rng.next() % UInt64(allowed.count))] else {
                        Issue.record("\(c.name): dead end after \(String(decoding: bytes, as: UTF8.self).debugDescription)")
                        break
                    }
                    _ = m.feed(b)
                    bytes.append(b)
                }
                guard m.isComplete else { continue }
                ended += 1
                let text = String(decoding: bytes, as: UTF8.self)
                #expect((try? JSON.parse(text)) != nil, "\(c.name): \(text)")
            }
        }
        #expect(ended > 100, "\(ended) walks ended")
    }

    @Test("a keyword that cannot be enforced is an error naming where it is; references and type lists compile")
    func refusals() throws {
        func error(_ schema: String) -> String? {
            do {
                _ = try JSONSchemaGrammar(schema: try JSON.parse(schema))
                return nil
            } catch {
                return "\(error)"
            }
        }
        #expect(error(#"{"type": "string", "pattern": "^a+$"}"#)?.hasPrefix("#/pattern") == true)
        #expect(error(#"{"type": "object", "properties": {"n": {"type": "integer", "minimum": 3}}}"#)?.hasPrefix("#/properties/n/minimum") == true)
        #expect(error(#"{"type": "objekt"}"#)?.contains("unknown type") == true)
        #expect(error(#"{"$ref": "https://example.com/s.json"}"#)?.contains("only references within the schema") == true)
        #expect(error(##"{"$ref": "#/$defs/missing"}"##)?.contains("names nothing") == true)
        #expect(error(#"{"type": "object", "required": ["x"]}"#)?.contains("is not one of the properties") == true)
        #expect(error("false")?.contains("admits no value") == true)
        #expect(error(#"{"type": ["string", "null"], "description": "d", "title": "t"}"#) == nil)
        #expect(error(##"{"$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/a"}}}, "$ref": "#/$defs/a"}"##) == nil)
        // Schemas the matcher could not follow or finish: refused when compiled, not met at the first token.
        #expect(error(##"{"$ref": "#"}"##)?.contains("refers back to itself") == true)
        #expect(error(##"{"anyOf": [{"$ref": "#"}, {"type": "string"}]}"##)?.contains("refers back to itself") == true)
        #expect(error(##"{"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "required": ["next"]}}, "$ref": "#/$defs/n"}"##)?.contains("no finite value") == true)
        #expect(error(#"{"oneOf": [{"type": "number"}, {"type": "integer"}]}"#)?.contains("use anyOf") == true)
        #expect(error(#"{"oneOf": [{"type": "string"}, {"type": "null"}]}"#) == nil)
        #expect(error(#"{"type": "object", "properties": {"a": {"type": "string"}}, "required": "a"}"#)?.contains("list of property names") == true)
        #expect(error(#"{"type": "array", "minItems": "3"}"#)?.contains("non-negative integer") == true)
        // type beside enum keeps only the values of that type.
        let typed = try JSONSchemaGrammar(schema: JSON.parse(#"{"type": "string", "enum": ["a", null, 1]}"#))
        #expect(Self.accepts(typed, #""a""#) && !Self.accepts(typed, "null") && !Self.accepts(typed, "1"))
        // An optional property that could never be finished is not offered.
        let pruned = try JSONSchemaGrammar(schema: JSON.parse(##"{"$defs": {"n": {"type": "object", "properties": {"next": {"$ref": "#/$defs/n"}}, "required": ["next"]}}, "type": "object", "properties": {"x": {"$ref": "#/$defs/n"}, "y": {"type": "integer"}}, "additionalProperties": false}"##))
        var m = JSONSchemaMatcher(pruned)
        #expect(Self.accepts(pruned, #"{"y": 1}"#) && m.feed(UInt8(ascii: "{")) && m.feed(UInt8(ascii: "\"")) && !m.feed(UInt8(ascii: "x")))
        let nested = try JSONSchemaGrammar(schema: JSON.parse(##"{"$defs": {"a": {"type": "array", "items": {"$ref": "#/$defs/a"}}}, "$ref": "#/$defs/a"}"##))
        #expect(Self.accepts(nested, "[[], [[]], [[[]]]]") && !Self.accepts(nested, "[1]"))
    }

    @Test("over a SentencePiece vocabulary (Llama 2) the mask sees each token's bytes as the reply holds them: its leading space, byte tokens as bytes")
    func sentencePiece() throws {
        let tokenizer = try Tokenizer.load(model: Fixtures.decompressed(FileSystem.join(Fixtures.resources(), "tokenizers/llama2.tokenizer.json.xz")))
        let V = tokenizer.vocabularySize
        let end = try #require(tokenizer.eosTokenID ?? tokenizer.id(of: "</s>"))
        let schema = try JSON.parse(#"{"type": "object", "properties": {"n": {"type": "array", "items": {"type": "integer"}}, "unit": {"enum": ["celsius"]}, "city": {"type": "string"}}, "required": ["n", "unit", "city"], "additionalProperties": false}"#)
        let constraint = TokenConstraint(tokenizer: tokenizer, vocabularySize: V, start: JSONSchemaMatcher(try JSONSchemaGrammar(schema: schema)))
        func allowed() -> Set<Int> {
            var logits = [Float](repeating: 0, count: V)
            _ = constraint.mask(&logits, eos: [end])
            return Set(logits.indices.filter { logits[$0] == 0 })
        }
        let doc = #"{"n": [1, 12], "unit": "celsius", "city": "Zürich 東京"}"#
        let ids = tokenizer.encode(doc)
        #expect(tokenizer.decode(ids) == doc)
        for (k, id) in ids.enumerated() {
            let a = allowed()
            #expect(a.contains(id), "token \(k) \(tokenizer.token(of: id) ?? "?")")
            if k > 0, tokenizer.decode(Array(ids.prefix(k))).hasSuffix("[1"), let spaced = tokenizer.id(of: "\u{2581}2") {
                // "1" then "▁2" reads " 2" in the reply: not the number 12.
                #expect(!a.contains(spaced))
            }
            constraint.advance(id)
        }
        #expect(allowed() == [end])
    }

    @Test("the mask over the SmolLM2 vocabulary follows the schema: an enum's tokens only, the end token only when the value is whole")
    func mask() throws {
        let tokenizer = try Tokenizer(jsonFile: FileSystem.join(Fixtures.resources(), "smollm2-tokenizer.json"))
        let V = tokenizer.vocabularySize
        let end = try #require(tokenizer.eosTokenID ?? tokenizer.id(of: "<|im_end|>"))
        let schema = try JSON.parse(#"{"type": "object", "properties": {"unit": {"enum": ["celsius", "kelvin"]}, "t": {"type": "number"}}, "required": ["unit", "t"], "additionalProperties": false}"#)
        let constraint = TokenConstraint(tokenizer: tokenizer, vocabularySize: V, start: JSONSchemaMatcher(try JSONSchemaGrammar(schema: schema)))
        func allowed() -> [Int] {
            var logits = [Float](repeating: 0, count: V)
            _ = constraint.mask(&logits, eos: [end])
            return logits.indices.filter { logits[$0] == 0 }
        }
        for id in tokenizer.encode(#"{"unit": ""#) { constraint.advance(id) }
        // Inside the enum's string: every token allowed is the start of "celsius" or "kelvin" (closing quote included).
        let inside = allowed()
        #expect(!inside.isEmpty)
        for id in inside {
            let piece = tokenizer.decode([id])
            #expect("celsius\"".hasPrefix(piece) || "kelvin\"".hasPrefix(piece), "\(piece)")
        }
        for id in tokenizer.encode(#"kelvin", "t": 2"#) {
            #expect(allowed().contains(id), "\(tokenizer.decode([id]))")
            constraint.advance(id)
        }
        #expect(!allowed().contains(end))
        for id in tokenizer.encode("}") { constraint.advance(id) }
        #expect(allowed() == [end])
        // What the mask costs a decoding step inside a free string (printed, not asserted: timings are for bench/).
        let open = try JSON.parse(#"{"type": "object", "properties": {"name": {"type": "string"}}}"#)
        let again = TokenConstraint(tokenizer: tokenizer, vocabularySize: V, start: JSONSchemaMatcher(try JSONSchemaGrammar(schema: open)))
        for id in tokenizer.encode(#"{"name": "Pa"#) { again.advance(id) }
        var logits = [Float](repeating: 0, count: V)
        let start = Clock.seconds()
        _ = again.mask(&logits, eos: [end])
        let first = Clock.seconds() - start
        for _ in 0..<20 { _ = again.mask(&logits, eos: [end]) }
        print("json_schema mask over \(V) tokens inside a string: \(Chart.fixed(first * 1000, 2)) ms the first time, "
              + "\(Chart.fixed((Clock.seconds() - start - first) / 20 * 1000, 2)) ms in a state met before")
    }
}
