// Chat templates against transformers' render_jinja_template / apply_chat_template for nine real
// templates (SmolLM2, Llama 2, Llama 3, Mistral, Zephyr, Gemma, Qwen2.5, Qwen3, Phi-3), including the
// errors they raise (Resources/chat_template_cases.json, from scripts/reference/make_chat_template_fixtures.py).
import QLoRA
import QLoRATestSupport
import Testing

private let fixture: JSONValue = try! JSON.parse(try! FileSystem.readFile(FileSystem.join(Fixtures.resources(), "chat_template_cases.json")))

@Suite("chat templates")
struct ChatTemplateTests {
    static let names = ["smollm2", "llama2", "llama3", "mistral", "zephyr", "gemma", "qwen2.5", "qwen3", "phi3"]

    @Test("renders exactly as transformers, or raises the template's own error", arguments: names)
    func render(_ name: String) throws {
        let entry = fixture["templates"]![name]!
        let template = try ChatTemplate(entry["template"]!.stringValue!)
        var special: [String: String] = [:]
        for (k, v) in entry["special_tokens"]?.objectValue ?? [] { if let s = v.stringValue { special[k] = s } }
        var defaults: [String: JSONValue] = [:]
        for (k, v) in entry["default_kwargs"]?.objectValue ?? [] { defaults[k] = v }
        for c in entry["cases"]!.arrayValue! {
            var variables = defaults
            for (k, v) in c["kwargs"]?.objectValue ?? [] { variables[k] = v }
            let tools = c["tools"].flatMap { $0 == .null ? nil : $0 }
            let label = "\(name)/\(c["name"]!.stringValue!)"
            do {
                let out = try template.render(messages: c["messages"]!.arrayValue!, addGenerationPrompt: c["add_generation_prompt"]!.boolValue!,
                                              specialTokens: special, tools: tools, variables: variables)
                if let expected = c["rendered"]?.stringValue {
                    #expect(out == expected, "\(label)\n--- ours\n\(out)\n--- transformers\n\(expected)")
                } else {
                    Issue.record("\(label): rendered, but transformers raised \(c["error"]?.stringValue ?? "?")")
                }
            } catch let e as TemplateError {
                guard let expected = c["error"]?.stringValue else {
                    Issue.record("\(label): \(e)")
                    continue
                }
                if e.raisedByTemplate {
                    #expect(e.message == expected, "\(label)")
                } else {
                    // jinja2's own errors (an undefined attribute of an undefined value) differ in wording.
                    #expect(expected.contains("Undefined") || expected.contains("has no attribute"), "\(label): \(e) vs \(expected)")
                }
            }
        }
    }

    @Test("an unsupported construct is an error that names it")
    func unsupported() {
        #expect(throws: TemplateError.self) { _ = try ChatTemplate("{% include 'x.jinja' %}") }
        do { _ = try ChatTemplate("{% include 'x.jinja' %}") } catch { #expect("\(error)".contains("include")) }
        #expect(throws: TemplateError.self) { _ = try ChatTemplate("{{ messages | wordcount }}").render(messages: [], addGenerationPrompt: false) }
    }

    @Test("whitespace control: trim_blocks, lstrip_blocks and the - markers")
    func whitespace() throws {
        let t = try ChatTemplate("{% for m in messages %}\n  {%- if true %}[{{ m.content }}]\n  {% endif %}\n{% endfor %}")
        let out = try t.render(messages: [ChatTemplate.message("user", "a"), ChatTemplate.message("user", "b")], addGenerationPrompt: false)
        #expect(out == "[a]\n[b]\n")
    }

    @Test("a hostile template ends with an error in bounded time: nested loops, a macro recursing through its argument, a huge range")
    func bounds() throws {
        let cases = [
            ("{% for i in range(1000000) %}{% for j in range(1000000) %}x{% endfor %}{% endfor %}", "statements"),
            ("{% macro m(f) %}{{ f(f) }}{% endmacro %}{{ m(m) }}", "nested past"),
            ("{{ range(1000000000000) | length }}", "past the limit"),
            ("{% set ns = namespace(s='x') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}", "MB"),
            ("{{ 'x' * 100000000000 }}", "MB"),
            // Found by the fuzzer (run 3): a slice step of zero trapped (stride by 0); Python raises, so do we.
            ("{{ [1, 2, 3][::-0] }}", "slice step cannot be zero"),
            ("{{ 'abc'[1:2:0] }}", "slice step cannot be zero"),
        ]
        for (source, expected) in cases {
            let start = Clock.seconds()
            do {
                _ = try ChatTemplate(source).render(messages: [], addGenerationPrompt: false)
                Issue.record("\(source): rendered")
            } catch {
                #expect("\(error)".contains(expected), "\(source): \(error)")
            }
            #expect(Clock.seconds() - start < 30, "\(source): took \(Clock.seconds() - start) s")
        }
    }
}
