// Datasets: every format, file:line errors for malformed records, skipping; and the encoder's labels
// (responses only, chat template and Guanaco), truncation that keeps EOS.
import Foundation
import QLoRA
import QLoRATestSupport
import Testing

private func write(_ text: String, _ name: String = "d.jsonl") throws -> String {
    let dir = try Fixtures.temporaryDirectory("data")
    let path = FileSystem.join(dir, name)
    try FileSystem.writeFileAtomically(path, bytes: Array(text.utf8))
    return path
}

private func smolTokenizer() throws -> Tokenizer {
    let cache = Environment.get("QLORA_CACHE") ?? FileSystem.join(Environment.get("HOME") ?? "/root", ".cache/swift-qlora")
    return try Tokenizer.load(model: FileSystem.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf"))
}

@Suite("datasets")
struct DatasetTests {
    @Test("each format is detected and parsed")
    func formats() throws {
        let cases: [(String, DatasetFormat)] = [
            (#"{"instruction": "Add", "input": "1 and 2", "output": "3"}"#, .alpaca),
            (#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}"#, .messages),
            (#"{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}"#, .sharegpt),
            (#"{"prompt": "2+2=", "completion": "4"}"#, .promptCompletion),
            (#"{"text": "Once upon a time."}"#, .text),
        ]
        for (line, format) in cases {
            let d = try DatasetLoader.load(try write(line + "\n" + line + "\n"))
            #expect(d.format == format)
            #expect(d.examples.count == 2)
        }
        let alpaca = try DatasetLoader.load(try write(#"[{"instruction": "Add", "input": "1 and 2", "output": "3"}]"#, "d.json"))
        #expect(alpaca.examples[0] == .conversation([ChatMessage(role: "user", content: "Add\n\n1 and 2"), ChatMessage(role: "assistant", content: "3")]))
    }

    struct Bad: CustomStringConvertible, Sendable {
        let text: String
        let line: Int
        let reason: String
        var description: String { reason }
    }

    @Test("malformed records stop the load with file:line and the reason", arguments: [
        Bad(text: "{\"prompt\": \"a\", \"completion\": \"b\"}\n{\"prompt\": \"a\", \"completion\": \n", line: 2, reason: "not valid JSON"),
        Bad(text: "{\"instruction\": \"a\", \"output\": \"b\"}\n\n{\"instruction\": \"a\"}\n", line: 3, reason: "missing field 'output'"),
        Bad(text: "{\"instruction\": \"a\", \"output\": 7}\n", line: 1, reason: "field 'output' must be a string"),
        Bad(text: "{\"instruction\": \"a\", \"output\": \"   \"}\n", line: 1, reason: "empty response"),
        Bad(text: "{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n", line: 1, reason: "no assistant turn"),
        Bad(text: "{\"messages\": [{\"role\": \"wizard\", \"content\": \"hi\"}]}\n", line: 1, reason: "unknown role"),
        Bad(text: "{\"foo\": 1}\n", line: 1, reason: "cannot tell the format"),
    ])
    func malformed(_ c: Bad) throws {
        let path = try write(c.text)
        do {
            _ = try DatasetLoader.load(path)
            Issue.record("accepted: \(c.reason)")
        } catch let e as DatasetError {
            #expect(e.description.hasPrefix("\(path):\(c.line): "), "\(e)")
            #expect(e.description.contains(c.reason), "\(e)")
        }
    }

    @Test("--skip-bad-records skips and counts them")
    func skipping() throws {
        let path = try write("{\"text\": \"a\"}\nnot json\n{\"text\": \"\"}\n{\"text\": \"b\"}\n")
        let d = try DatasetLoader.load(path, skipBadRecords: true)
        #expect(d.examples.count == 2)
        #expect(d.skipped.map(\.line) == [2, 3])
    }

    @Test("a line of 1 GB (a sparse file): an error naming its line and the bound, or skipped with --skip-bad-records; the other records load")
    func gigabyteLine() throws {
        let dir = try Fixtures.temporaryDirectory("data-gigabyte")
        let path = FileSystem.join(dir, "huge.jsonl")
        // {"text": "<1 GiB of NUL bytes>"} then a normal record; the file is sparse: no disk is used for the hole.
        let head = Array(#"{"text": ""#.utf8), tail = Array("\"}\n{\"text\": \"a normal record\"}\n".utf8)
        #expect(FileManager.default.createFile(atPath: path, contents: Data(head)))
        let handle = try FileHandle(forWritingTo: URL(fileURLWithPath: path))
        try handle.seek(toOffset: UInt64(head.count + (1 << 30)))
        try handle.write(contentsOf: tail)
        try handle.close()
        let start = Clock.seconds()
        do {
            _ = try DatasetLoader.load(path)
            Issue.record("accepted a 1 GB record")
        } catch let e as DatasetError {
            #expect(e.line == 1 && e.description.contains("the record is 1073741836 bytes") && e.description.contains("at most 67108864"), "\(e)")
        }
        let d = try DatasetLoader.load(path, skipBadRecords: true)
        #expect(d.examples == [.text("a normal record")] && d.skipped.map(\.line) == [1])
        // A scan, not a parse: seconds at most, where parsing and tokenizing the line took minutes and gigabytes.
        #expect(Clock.seconds() - start < 20)
    }

    @Test("chat-template encoding trains on the responses and their end-of-turn tokens only")
    func responseOnly() throws {
        let t = try smolTokenizer()
        let encoder = try ExampleEncoder(tokenizer: t, template: .chat(try ChatTemplate(t.chatTemplate!)), maxLength: 512)
        let e = try encoder.encode(.conversation([ChatMessage(role: "user", content: "Hi"), ChatMessage(role: "assistant", content: "Hello there")]))
        let full = try ChatTemplate(t.chatTemplate!).render(messages: [ChatTemplate.message("user", "Hi"), ChatTemplate.message("assistant", "Hello there")],
                                                            addGenerationPrompt: false, specialTokens: t.templateSpecialTokens)
        #expect(t.decode(e.tokens) == full)
        let trained = e.tokens.indices.filter { e.labels[$0] != TrainingBatch.ignoreIndex }.map { e.tokens[$0] }
        #expect(t.decode(trained) == "Hello there<|im_end|>\n")
        let all = try ExampleEncoder(tokenizer: t, template: .chat(try ChatTemplate(t.chatTemplate!)), maxLength: 512, trainOnInputs: true)
        #expect(try all.encode(.conversation([ChatMessage(role: "user", content: "Hi"), ChatMessage(role: "assistant", content: "Hello there")])).trainedTokens == e.tokens.count)
    }

    @Test("Guanaco format: ### Human / ### Assistant with EOS after each response; multi-turn trains every response")
    func guanaco() throws {
        let t = try smolTokenizer()
        let encoder = try ExampleEncoder(tokenizer: t, template: .guanaco, maxLength: 512)
        let e = try encoder.encode(.conversation([
            ChatMessage(role: "user", content: "Hi"), ChatMessage(role: "assistant", content: "Hello"),
            ChatMessage(role: "user", content: "Bye"), ChatMessage(role: "assistant", content: "See you"),
        ]))
        #expect(t.decode(e.tokens) == "### Human: Hi\n### Assistant: Hello<|im_end|>\n### Human: Bye\n### Assistant: See you<|im_end|>")
        let trained = e.tokens.indices.filter { e.labels[$0] != TrainingBatch.ignoreIndex }.map { e.tokens[$0] }
        #expect(t.decode(trained) == "Hello<|im_end|>See you<|im_end|>")
    }

    @Test("source and target maximum lengths cut the prompt and the response separately; the response keeps EOS")
    func sourceTarget() throws {
        let t = try smolTokenizer()
        let encoder = try ExampleEncoder(tokenizer: t, template: .guanaco, maxLength: 512, sourceMaxLength: 5, targetMaxLength: 4)
        let e = try encoder.encode(.conversation([ChatMessage(role: "user", content: String(repeating: "question ", count: 20)),
                                                  ChatMessage(role: "assistant", content: String(repeating: "answer ", count: 20))]))
        let trained = e.tokens.indices.filter { e.labels[$0] != TrainingBatch.ignoreIndex }.map { e.tokens[$0] }
        #expect(e.truncated)
        #expect(e.tokens.count - trained.count == 5)
        // The response keeps 4 tokens, the last one EOS (not followed by a second one).
        #expect(trained.count == 4 && trained[3] == t.eosTokenID)
        #expect(e.tokens.last == t.eosTokenID)
    }

    @Test("a sequence over max length is cut and its response still ends in EOS")
    func truncation() throws {
        let t = try smolTokenizer()
        let encoder = try ExampleEncoder(tokenizer: t, template: .guanaco, maxLength: 12)
        let e = try encoder.encode(.conversation([ChatMessage(role: "user", content: "Hi"),
                                                  ChatMessage(role: "assistant", content: String(repeating: "word ", count: 40))]))
        #expect(e.truncated && e.tokens.count == 12)
        #expect(e.tokens.last == t.eosTokenID && e.labels.last == t.eosTokenID)
    }

    @Test("the validation split holds out the fraction asked, disjoint from training, in data order, the same for a seed")
    func validationSplit() {
        let examples = (0..<50).map { EncodedExample(tokens: [$0], labels: [$0], truncated: false) }
        let (train, validation) = EncodedExample.splitValidation(examples, fraction: 0.1, seed: 1)
        #expect(validation.count == 5 && train.count == 45)
        let held = validation.map { $0.tokens[0] }, kept = train.map { $0.tokens[0] }
        #expect(Set(held).isDisjoint(with: kept) && Set(held + kept) == Set(0..<50))
        #expect(held == held.sorted() && kept == kept.sorted())
        #expect(held != Array(0..<5) && held != Array(45..<50))
        #expect(EncodedExample.splitValidation(examples, fraction: 0.1, seed: 1).validation == validation)
        #expect(EncodedExample.splitValidation(examples, fraction: 0.1, seed: 2).validation != validation)
        // At least one example is held out.
        #expect(EncodedExample.splitValidation(examples, fraction: 0.001, seed: 1).validation.count == 1)
    }
}
