// Pairwise judging without the network: answer files in the layouts the paper's data comes in, the plan of
// matches, the judge's prompt as the QLoRA repository's template fills it, and verdicts read off reviews.
import QLoRA
import QLoRATestSupport
import Testing

@Suite("judging")
struct JudgingTests {
    static let dir = FileSystem.join(Fixtures.resources(), "judge")
    static func read(_ name: String) throws -> [UInt8] { try FileSystem.readFile(FileSystem.join(dir, name)) }

    @Test("answer files: the QLoRA repository's generations, FastChat's answers, ours; names from NAME, model_id or the file")
    func answerLayouts() throws {
        let guanaco = try SystemAnswers.parse(try Self.read("7b-guanaco-vicuna-generations-head.jsonl"), file: "7b-guanaco-vicuna-generations-head.jsonl")
        #expect(guanaco.name == "7b-guanaco-vicuna-generations-head")
        #expect(guanaco.answers.count == 3)
        #expect(guanaco.answers[0].question == ["How can I improve my time management skills?"])
        #expect(guanaco.answers[0].turns[0].hasPrefix("Time management is a crucial skill"))
        #expect(guanaco.answers[0].category == "generic")

        let chatgpt = try SystemAnswers.parse(try Self.read("answer_gpt35_head.jsonl"), file: "answer_gpt35_head.jsonl")
        #expect(chatgpt.name == "gpt-3.5-turbo:20230327")
        #expect(chatgpt.answers[0].question == nil)  // FastChat's "text" is the answer
        #expect(chatgpt.answers[0].turns[0].hasPrefix("Here are some tips to improve your time management skills"))
        #expect(try SystemAnswers.parse(try Self.read("answer_gpt35_head.jsonl"), file: "x.jsonl", name: "chatgpt").name == "chatgpt")

        // `qlora eval generate`'s layout: choices[0].turns, the question's turns beside them.
        let ours = #"{"question_id": 7, "model_id": "smol", "text": "q1", "turns": ["q1", "q2"], "choices": [{"index": 0, "turns": ["a1", "a2"]}], "generation": "a2"}"#
        let s = try SystemAnswers.parse(Array(ours.utf8), file: "ours.jsonl")
        #expect(s.name == "smol" && s.answers[0].question == ["q1", "q2"] && s.answers[0].turns == ["a1", "a2"] && s.answers[0].key == "7")
        // The QLoRA repository's truncated generation wins over the raw one (which runs on into a made-up turn).
        let cut = #"{"question_id": 3, "text": "q", "generation": "8 units.### Human: Good answer.", "generation_truncated": "8 units."}"#
        #expect(try SystemAnswers.parse(Array(cut.utf8), file: "g.jsonl").answers[0].turns == ["8 units."])
    }

    @Test("bad answer files: file:line for a line without an id or an answer, a repeated id, two model ids")
    func badAnswers() throws {
        func message(_ text: String) -> String {
            do { _ = try SystemAnswers.parse(Array(text.utf8), file: "a.jsonl"); return "" } catch { return "\(error)" }
        }
        #expect(message("{\"question_id\": 1, \"text\": \"x\"}\n{\"text\": \"y\"}\n") == "a.jsonl:2: no \"question_id\"")
        #expect(message("{\"question_id\": 1, \"category\": \"c\"}\n").hasPrefix("a.jsonl:1: no answer"))
        #expect(message("{\"question_id\": 1, \"text\": \"x\"}\n\n{\"question_id\": 1, \"text\": \"y\"}\n") == "a.jsonl:3: question id 1 again (first on line 1)")
        #expect(message("{\"question_id\": 1, \"model_id\": \"a\", \"text\": \"x\"}\n{\"question_id\": 2, \"model_id\": \"b\", \"text\": \"y\"}\n").hasPrefix("a.jsonl:2: model_id \"b\" differs"))
        #expect(message("not json\n").hasPrefix("a.jsonl:1: not JSON"))
        #expect(message("\n") == "a.jsonl: no answers")
    }

    @Test("matches: every pair on every question both answered, in both orders; two systems of one name refused")
    func matches() throws {
        func system(_ name: String, _ ids: [Int]) -> SystemAnswers {
            SystemAnswers(name: name, file: name, answers: ids.map { SystemAnswer(questionID: .int($0), question: ["q\($0)"], category: nil, turns: ["\(name) \($0)"]) })
        }
        let m = try Tournament.matches([system("a", [1, 2]), system("b", [1, 2]), system("c", [2])])
        #expect(m.map { "\($0.questionKey):\($0.first)-\($0.second)" } == ["1:a-b", "1:b-a", "2:a-b", "2:b-a", "2:a-c", "2:c-a", "2:b-c", "2:c-b"])
        #expect(try Tournament.matches([system("a", [1]), system("b", [1])], bothOrders: false).count == 1)
        #expect(throws: EvaluationError.self) { try Tournament.matches([system("a", [1]), system("a", [1])]) }
    }

    @Test("the paper's prompt file: the template filled as Python's str.format fills it, by category")
    func prompts() throws {
        let prompts = try JudgePrompt.parse(try Self.read("qlora_vicuna_prompt_threeclass.jsonl"), file: "p.jsonl")
        #expect(prompts.map(\.category) == ["general", "coding", "math"])
        #expect(JudgePrompt.choose(prompts, category: "coding").category == "coding")
        #expect(JudgePrompt.choose(prompts, category: "math").category == "math")
        #expect(JudgePrompt.choose(prompts, category: "generic").category == "general")
        #expect(JudgePrompt.choose(prompts, category: nil).category == "general")
        let p = prompts[0]
        let text = p.render(question: ["Q?"], first: ["one {x}"], second: ["two"])
        // What the QLoRA repository's Python gives: template.format(question=..., answer_1=..., answer_2=..., prompt=...)
        // (its templates hold no other braces; ours leaves any other brace alone and never re-reads a filled answer).
        #expect(text == "[Question]\nQ?\n\n[The Start of Assistant 1's Answer]\none {x}\n\n[The End of Assistant 1's Answer]\n\n[The Start of Assistant 2's Answer]\ntwo\n\n[The End of Assistant 2's Answer]\n\n[System]\n\(p.prompt)\n\n")
        #expect(p.system == "You are a helpful and precise assistant for checking the quality of the answer.")
        #expect(p.prompt.hasSuffix("Do not output anything else other than the number in this last line."))
        // Two turns are labeled.
        #expect(JudgePrompt.builtIn[0].render(question: ["a", "b"], first: ["x", "y"], second: ["z", "w"]).contains("[Turn 1]\na\n\n[Turn 2]\nb"))
        #expect(throws: EvaluationError.self) { try JudgePrompt.parse(Array(#"{"prompt_template": "{question} {answer_1}"}"#.utf8), file: "p") }
    }

    @Test("verdicts: the last non-empty line's 1, 2 or 3, with or without decoration; anything else is none")
    func verdicts() {
        #expect(Verdict.parse("Both are fine.\nAssistant 1 is more detailed.\n\n1\n") == .first)
        #expect(Verdict.parse("long review\n2") == .second)
        #expect(Verdict.parse("review\n3") == .tie)
        #expect(Verdict.parse("review\n**2**") == .second)
        #expect(Verdict.parse("review\nVerdict: 1.") == .first)
        #expect(Verdict.parse("review\nAssistant 2") == .second)
        #expect(Verdict.parse("Assistant 1 is better than Assistant 2") == nil)  // two numbers
        #expect(Verdict.parse("2\nI cannot decide.") == nil)  // the verdict must be on the last line
        #expect(Verdict.parse("review\n4") == nil)
        #expect(Verdict.parse("review\n12") == nil)
        #expect(Verdict.parse("") == nil)
        #expect(Verdict.parse("1 1") == .first)
        #expect(Verdict.parse("Final answer: 3") == .tie && Verdict.parse("My verdict is 2.") == .second)
        #expect(Verdict.parse("1. Python is interpreted") == nil)  // a list item, not a verdict
        #expect(Verdict.parse("review\nAnswer 3:") == .tie)
    }

    @Test("judgment lines: winner in the Arena layout (model_a shown first); no verdict is null and eval elo skips it")
    func judgmentLines() throws {
        let m = Match(questionKey: "5", first: "a", second: "b")
        let won = Tournament.judgment(m, questionID: .int(5), category: "math", verdict: .second, review: "r\n2", judge: "j", judgeModel: "gpt-4")
        let none = Tournament.judgment(m, questionID: .int(5), category: nil, verdict: nil, review: "?", judge: "j", judgeModel: nil, error: "no verdict")
        let text = JSON.serialize(won) + "\n" + JSON.serialize(none) + "\n"
        var unjudged = 0
        let battles = try Elo.parseBattles(Array(text.utf8), file: "j.jsonl", unjudged: &unjudged)
        #expect(battles == [Battle("a", "b", .second)] && unjudged == 1)
        #expect(try Tournament.judged(Array(text.utf8), file: "j.jsonl") == [m.key])
        // A cut-short last line is not counted as judged (the appender drops it on open).
        #expect(try Tournament.judged(Array((text + "{\"question_id\": 6, \"mod").utf8), file: "j.jsonl") == [m.key])
        let s = try Tournament.summary(Array(text.utf8), file: "j.jsonl", systems: ["a", "b"])
        #expect(s.verdicts == 1 && s.noVerdict == 1 && s.secondShownWon == 1)
    }
}
