// MMLU against transformers 5.24 on the default model (Resources/mmlu_cases.json, from
// scripts/reference/make_mmlu_fixtures.py): the prompts byte for byte, the letter tokens, and the four
// letter log-probabilities of 238 prompts (228 questions 0-shot across all 57 subjects, 10 of them 5-shot)
// within 1e-3 of transformers' in f32, with the same predicted letter. Plus the readers' errors.
import QLoRA
import QLoRATestSupport
import Testing

private let resources = Fixtures.resources()
private let cases: JSONValue = try! JSON.parse(try! FileSystem.readFile(FileSystem.join(resources, "mmlu_cases.json")))

private let gguf: String = {
    let cache = Environment.get("QLORA_CACHE") ?? FileSystem.join(Environment.get("HOME") ?? "/root", ".cache/swift-qlora")
    return FileSystem.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf")
}()

@Suite("MMLU")
struct MMLUTests {
    let folder = FileSystem.join(resources, "mmlu")

    /// The fixture's prompts rebuilt from the committed CSV copies, as items.
    func fixtureItems() throws -> [MMLUItem] {
        let (dev, questions) = try MMLU.loadFolder(folder, split: "test")
        return cases["cases"]!.arrayValue!.map { c in
            let s = c["subject"]!.stringValue!, k = c["shots"]!.intValue!, i = c["index"]!.intValue!
            let q = questions[s]![i]
            return MMLUItem(subject: s, prefix: MMLU.prefix(subject: s, dev: dev[s]!, shots: k), suffix: MMLU.format(q, includeAnswer: false),
                            answer: q.answer, source: q.source)
        }
    }

    @Test("prompts equal the hendrycks/test format byte for byte (0-shot and 5-shot), answers read from the CSV")
    func prompts() throws {
        let items = try fixtureItems()
        let expected = cases["cases"]!.arrayValue!
        #expect(items.count == 238)
        var mismatches = 0
        for (item, c) in zip(items, expected) where item.prompt != c["prompt"]!.stringValue! {
            mismatches += 1
            if mismatches <= 2 { Issue.record("\(item.source): \(JSON.serialize(.string(item.prompt)).prefix(300))") }
        }
        #expect(mismatches == 0)
        for (item, c) in zip(items, expected) { #expect(MMLU.letters[item.answer] == c["answer"]!.stringValue!) }
        #expect(MMLU.header(subject: "high_school_us_history") == "The following are multiple choice questions (with answers) about  high school us history.\n\n")
        // The QLoRA repository's own 0-shot prompts begin with the same header.
        let jsonl = FileSystem.join(folder, "qlora_zero_shot_mmlu_val_head.jsonl")
        #expect(try MMLU.parseJSONL(try FileSystem.readFile(jsonl), file: jsonl)[0].prompt.hasPrefix(MMLU.header(subject: "abstract_algebra")))
    }

    @Test("letter log-probabilities within 1e-3 of transformers' (f32) on 238 prompts, the same predictions; prefixes computed once")
    func logprobs() throws {
        var o = LoadOptions()
        o.quantType = nil
        o.showProgress = false
        let model = try LlamaModel.load(gguf, options: o)
        let tokenizer = try Tokenizer.load(model: gguf)
        let evaluator = try MMLUEvaluator(model: model, tokenizer: tokenizer)
        #expect(evaluator.letterTokens == cases["letter_tokens"]!.arrayValue!.compactMap(\.intValue))
        let items = try fixtureItems()
        let result = try evaluator.evaluate(items)
        var worst = 0.0, wrong = 0
        for (i, c) in cases["cases"]!.arrayValue!.enumerated() {
            let theirs = c["logprobs"]!.arrayValue!.compactMap(\.doubleValue)
            let ours = result.scores[i].logprobs
            #expect(result.scores[i].tokens == c["tokens"]!.intValue!, "\(items[i].source): prompt tokens")
            for j in 0..<4 { worst = max(worst, abs(ours[j] - theirs[j])) }
            if MMLU.letters[result.scores[i].prediction] != c["prediction"]!.stringValue! { wrong += 1 }
        }
        #expect(worst <= 1e-3, "largest log-probability difference \(worst)")
        #expect(wrong == 0, "\(wrong) predictions differ from transformers'")
        // The 5-shot prompts of a subject share their prefix: fewer tokens computed than the prompts hold.
        #expect(result.tokensComputed < result.promptTokens)
        #expect(result.total == 238 && result.subjects.count == 57)
    }

    @Test("CSV: quoted fields with commas, doubled quotes, newlines and CRLF; bad records name file:line")
    func csv() throws {
        let text = "plain q,1,2,3,4,A\r\n\"a \"\"quoted\"\", multi\nline q\",\"x, y\",b,c,d,C\n\nlast,e,f,g,h,D"
        let q = try MMLU.parseCSV(Array(text.utf8), file: "s_test.csv", subject: "s")
        #expect(q.count == 3)
        #expect(q[0].question == "plain q" && q[0].choices == ["1", "2", "3", "4"] && q[0].answer == 0)
        #expect(q[1].question == "a \"quoted\", multi\nline q" && q[1].choices[0] == "x, y" && q[1].answer == 2)
        #expect(q[2].source == "s_test.csv:5" && q[2].answer == 3)
        let bad: [(String, String)] = [
            ("q,1,2,3,4,A\nq,1,2,3,E", "s_test.csv:2: 5 columns"),
            ("q,1,2,3,4,A\nq,1,2,3,4,E", "s_test.csv:2: the answer is \"E\""),
            ("q,1,2,3,4,A\n\"never closed,1,2,3,4,A", "s_test.csv:2: a quoted field is never closed"),
            ("q,1,2,3,4,A\nq\"x,1,2,3,4,A", "s_test.csv:2: a quote inside an unquoted field"),
        ]
        for (t, message) in bad {
            do {
                _ = try MMLU.parseCSV(Array(t.utf8), file: "s_test.csv", subject: "s")
                Issue.record("accepted \(t)")
            } catch {
                #expect("\(error)".hasPrefix(message), "\(error)")
            }
        }
        #expect(throws: EvaluationError.self) { try MMLU.loadFolder(folder, split: "test", subjects: ["no_such_subject"]) }
    }

    @Test("the QLoRA repository's JSON-lines layout: whole prompts and answer letters; bad lines name file:line")
    func jsonl() throws {
        let path = FileSystem.join(folder, "qlora_zero_shot_mmlu_val_head.jsonl")
        let items = try MMLU.parseJSONL(try FileSystem.readFile(path), file: path)
        #expect(items.count == 4 && items.allSatisfy { $0.subject == "abstract_algebra" && $0.prefix.isEmpty })
        #expect(items[0].prompt.hasPrefix(MMLU.header(subject: "abstract_algebra")) && items[0].prompt.hasSuffix("\nAnswer:"))
        #expect(items[0].answer == 0 && items[1].answer == 1)
        for (t, message) in [("{\"subject\": \"s\", \"input\": \"q\"}", "x.jsonl:1: no \"output\""),
                             ("\n{\"subject\": \"s\", \"input\": \"q\", \"output\": \"F\"}", "x.jsonl:2: the output is \"F\"")] {
            do {
                _ = try MMLU.parseJSONL(Array(t.utf8), file: "x.jsonl")
                Issue.record("accepted \(t)")
            } catch {
                #expect("\(error)".hasPrefix(message), "\(error)")
            }
        }
    }
}
