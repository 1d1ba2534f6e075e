// Tool calls read back from what the templates themselves write: the assistant turns of the tool_call_roundtrip cases
// that transformers' apply_chat_template rendered (Tests/QLoRATokenizerTests/Resources/chat_template_cases.json) parse
// into the calls those cases' messages hold, for Qwen 2.5, Qwen 3 (Hermes) and Llama 3 (JSON); the format each
// template is given; the stream that holds back a call until the reply ends.
import QLoRA
import QLoRAServer
import QLoRATestSupport
import Testing

@Suite("tool calls")
struct ToolCallTests {
    static func templates() throws -> JSONValue {
        try JSON.parse(String(contentsOfFile: FileSystem.join(Fixtures.repositoryRoot(), "Tests/QLoRATokenizerTests/Resources/chat_template_cases.json"),
                              encoding: .utf8))["templates"] ?? .null
    }

    @Test("each template's tool format: Hermes for Qwen 2.5 and 3, JSON for Llama 3, none for the others")
    func formats() throws {
        let expected: [String: ToolFormat] = ["qwen2.5": .hermes, "qwen3": .hermes, "llama3": .llama3]
        for (name, t) in try Self.templates().objectValue ?? [] {
            let template = try ChatTemplate(t["template"]?.stringValue ?? "")
            #expect(ToolFormat.of(template) == expected[name], "\(name)")
        }
    }

    @Test("the assistant turn a template renders for a call parses back into that call (transformers' renderings)")
    func roundTrips() throws {
        let turns: [(String, ToolFormat, String, String)] = [
            ("qwen2.5", .hermes, "<|im_start|>assistant", "<|im_end|>"), ("qwen3", .hermes, "<|im_start|>assistant", "<|im_end|>"),
            ("llama3", .llama3, "<|start_header_id|>assistant<|end_header_id|>", "<|eot_id|>"),
        ]
        var checked = 0
        for (name, format, open, close) in turns {
            for c in try Self.templates()[name]?["cases"]?.arrayValue ?? [] where c["name"]?.stringValue == "tool_call_roundtrip" {
                let rendered = c["rendered"]?.stringValue ?? ""
                let expected = (c["messages"]?.arrayValue ?? []).flatMap { $0["tool_calls"]?.arrayValue ?? [] }
                guard let start = rendered.range(of: open), let end = rendered.range(of: close, range: start.upperBound..<rendered.endIndex) else {
                    Issue.record("\(name): no assistant turn in \(rendered)")
                    continue
                }
                let turn = String(rendered[start.upperBound..<end.lowerBound])
                let names = (c["tools"]?.arrayValue ?? []).compactMap { $0["function"]?["name"]?.stringValue }
                let request = ToolRequest(format: format, choice: .auto, tools: c["tools"] ?? .null, names: names)
                #expect(ToolRequest(format: format, choice: .auto, tools: c["tools"] ?? .null, names: ["other"]).parse(turn) == nil,
                        "\(name): a call of a function the request did not offer is text")
                let parsed = try #require(request.parse(turn), "\(name): \(turn)")
                #expect(parsed.calls.map(\.name) == expected.map { $0["function"]?["name"]?.stringValue ?? "" }, "\(name)")
                #expect(parsed.calls.map(\.arguments) == expected.map { $0["function"]?["arguments"] ?? .null }, "\(name)")
                checked += 1
            }
        }
        #expect(checked == 3)
    }

    @Test("Hermes: text before the calls is content, several calls (the first only without parallel calls), a malformed call is all content")
    func hermes() throws {
        let r = ToolRequest(format: .hermes, choice: .auto, tools: .array([]), names: ["a", "b"])
        let two = "Let me check.\n<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}\n</tool_call>\n<tool_call>\n{\"name\": \"b\", \"arguments\": {}}\n</tool_call>"
        let parsed = try #require(r.parse(two))
        #expect(parsed.content == "Let me check." && parsed.calls.map(\.name) == ["a", "b"])
        var single = r
        single.parallel = false
        #expect(single.parse(two)?.calls.map(\.name) == ["a"])
        #expect(r.parse("<tool_call>\n{\"name\": \"a\", \"arguments\": {\"x\": 1}}") != nil, "the last call may be left open at the end")
        #expect(r.parse("<tool_call>\n{\"name\": \"a\", \"arguments\": [1]}\n</tool_call>") == nil)
        #expect(r.parse("no call here") == nil)
        #expect(r.parse("<tool_call>\n{\"name\": \"c\", \"arguments\": {}}\n</tool_call>") == nil, "c is not among the tools")
        let llama = ToolRequest(format: .llama3, choice: .auto, tools: .array([]), names: ["a"])
        #expect(llama.parse(#"{"name": "Paris", "country": "France"}"#) == nil && llama.parse(#" {"name": "a", "parameters": {"x": 2}}"#)?.calls.first?.name == "a")
    }

    @Test("a forced call's schema holds each tool's own $defs (pydantic's nested models), moved to the top and renamed per tool")
    func nestedDefinitions() throws {
        let tools = try JSON.parse(##"[{"type": "function", "function": {"name": "get_weather", "parameters": {"$defs": {"City": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"], "additionalProperties": false}}, "type": "object", "properties": {"city": {"$ref": "#/$defs/City"}}, "required": ["city"], "additionalProperties": false}}}, {"type": "function", "function": {"name": "get_time", "parameters": {"definitions": {"City": {"enum": ["Paris"]}}, "type": "object", "properties": {"where": {"$ref": "#/definitions/City"}}, "required": ["where"], "additionalProperties": false}}}]"##)
        let request = ToolRequest(format: .hermes, choice: .required, tools: tools, names: ["get_weather", "get_time"])
        let grammar = try JSONSchemaGrammar(schema: request.callSchema())
        func accepts(_ text: String) -> Bool {
            var m = JSONSchemaMatcher(grammar)
            return m.feed(text.utf8) && m.isComplete
        }
        #expect(accepts(#"{"name": "get_weather", "arguments": {"city": {"name": "Paris"}}}"#))
        #expect(!accepts(#"{"name": "get_weather", "arguments": {"city": "Paris"}}"#))
        #expect(accepts(#"{"name": "get_time", "arguments": {"where": "Paris"}}"#) && !accepts(#"{"name": "get_time", "arguments": {"where": "Rome"}}"#))
    }

    @Test("a forced call the length limit cut: its name and its arguments as written, once the name is whole; otherwise none")
    func truncated() throws {
        let r = ToolRequest(format: .hermes, choice: .required, tools: .array([]), names: ["get_time", "get_weather"])
        let cut = try #require(r.truncatedCall(#"{"name": "get_weather", "arguments": {"city": "Par"#))
        #expect(cut.name == "get_weather" && cut.truncatedArguments == #"{"city": "Par"#)
        #expect(r.truncatedCall(#" {"name" : "get_time" ,  "#)?.truncatedArguments == "", "stopped before the arguments")
        #expect(r.truncatedCall(#"{"name": "get_ti"#) == nil, "inside the name")
        #expect(r.truncatedCall(#"{"name": "other", "arguments": {"#) == nil, "not one of the tools")
        #expect(r.truncatedCall(#"{"arguments": {"zone": "UTC"}, "name": "get_time""#) == nil, "the arguments first")
        #expect(ToolRequest(format: .hermes, choice: .auto, tools: .array([]), names: ["get_time"]).truncatedCall(#"{"name": "get_time", "#) == nil,
                "only a forced reply is a call by construction")
        let llama = ToolRequest(format: .llama3, choice: .named("get_time"), tools: .array([]), names: ["get_time"])
        #expect(llama.truncatedCall(#"{"name": "get_time", "parameters": {"zo"#)?.truncatedArguments == #"{"zo"#)
        // A forced call whose arguments hold the marker's text: all of it is the call, none of it content.
        let marked = ToolStream(ToolRequest(format: .hermes, choice: .required, tools: .array([]), names: ["f"]))
        #expect(marked.add(#"{"name": "f", "arguments": {"q": "<tool_call>"}}"#).isEmpty)
        let (before, made) = marked.finish()
        #expect(before.isEmpty && made?.first?.arguments["q"]?.stringValue == "<tool_call>", "\(before)")
        // Streamed: the held-back reply comes out at the end as the call.
        let s = ToolStream(r)
        #expect(s.add(#"{"name": "get_time", "arguments": {"zone""#).isEmpty)
        let (rest, calls) = s.finish(truncated: true)
        #expect(rest.isEmpty && calls?.first?.name == "get_time" && calls?.first?.truncatedArguments == #"{"zone""#)
    }

    @Test("streaming: text goes out until a call may begin; the call comes whole at the end")
    func stream() {
        let s = ToolStream(ToolRequest(format: .hermes, choice: .auto, tools: .array([]), names: ["f"]))
        var sent = ""
        for piece in ["Sure", ", here", " <tool", "_call>\n{\"name\": \"f\",", " \"arguments\": {\"q\": \"x\"}}\n</tool_call>"] { sent += s.add(piece) }
        #expect(sent == "Sure, here ")
        let (rest, calls) = s.finish()
        #expect(rest.isEmpty && calls?.first?.name == "f" && calls?.first?.arguments["q"]?.stringValue == "x")
        // Text that only looked like a marker's beginning goes out at the end.
        let t = ToolStream(ToolRequest(format: .hermes, choice: .auto, tools: .array([]), names: []))
        let early = t.add("a <tool")
        #expect(early == "a " && t.finish().content == "<tool" && t.finish().calls == nil)
        // A piece that only extends the character before it (a combining accent, the second half of a flag) is sent.
        let u = ToolStream(ToolRequest(format: .hermes, choice: .auto, tools: .array([]), names: []))
        let pieces = ["e", "\u{301}", " \u{1F1EB}", "\u{1F1F7}"].map { u.add($0) }.joined() + u.finish().content
        #expect(pieces == "e\u{301} \u{1F1EB}\u{1F1F7}" && pieces.unicodeScalars.count == 5)
    }
}
