import QLoRA
import QLoRATestSupport
import Testing

@Suite("benchmark questions")
struct BenchmarkQuestionsTests {
    func parse(_ text: String) throws -> [BenchmarkQuestion] { try BenchmarkQuestions.parse(Array(text.utf8), file: "q.jsonl") }

    @Test("the Vicuna, MT-bench, OpenAssistant and plain layouts")
    func layouts() throws {
        // Lines as the files in ../shared/data/eval hold them.
        let vicuna = try parse(#"""
            {"question_id": 1, "text": "How can I improve my time management skills?", "category": "generic"}
            {"question_id": 2, "text": "What are the most effective ways to deal with stress?", "category": "generic"}
            """#)
        #expect(vicuna.map(\.turns) == [["How can I improve my time management skills?"], ["What are the most effective ways to deal with stress?"]])
        #expect(vicuna.map(\.key) == ["1", "2"] && vicuna[0].category == "generic" && vicuna[0].context.isEmpty)
        let mt = try parse(#"{"question_id": 81, "category": "writing", "turns": ["Compose a blog post.", "Rewrite it. Start every sentence with A."]}"#)
        #expect(mt[0].turns.count == 2 && mt[0].id == .int(81))
        let oa = try parse(#"""
            {"input": "### Human: Write a sort in Swift ### Assistant: Here it is. ### Human: Now in place? ### Assistant:", "output": "Sure."}
            {"input": "### Human: Hello ### Assistant:", "output": "Hi"}
            """#)
        #expect(oa[0].context == [ChatMessage(role: "user", content: "Write a sort in Swift"), ChatMessage(role: "assistant", content: "Here it is.")])
        #expect(oa[0].turns == ["Now in place?"] && oa[0].key == "1" && oa[1].key == "2" && oa[1].turns == ["Hello"])
        let plain = try parse(#"""
            {"id": "a", "prompt": "Say hi"}
            {"instruction": "Translate", "input": "Bonjour"}
            "Just a string"
            """#)
        #expect(plain.map(\.key) == [#""a""#, "2", "3"])
        #expect(plain.map(\.turns) == [["Say hi"], ["Translate\n\nBonjour"], ["Just a string"]])
    }

    @Test("bad lines name the file and line: not JSON, no question, a repeated id, an OA conversation not ending in a human turn")
    func badLines() throws {
        let cases: [(String, String)] = [
            ("{\"text\": \"ok\"}\n{not json", "q.jsonl:2: not JSON"),
            (#"{"question_id": 3, "answer": "x"}"#, "q.jsonl:1: no question"),
            ("{\"question_id\": 3, \"text\": \"a\"}\n{\"question_id\": 3, \"text\": \"b\"}", "q.jsonl:2: question id 3 again (first on line 1)"),
            ("{\"input\": \"### Human: Hi ### Assistant: Hello\"}", "q.jsonl:1: the conversation does not end in a human turn"),
            (#"{"turns": []}"#, "q.jsonl:1: \"turns\" is not a non-empty list"),
            (#"{"question_id": [1], "text": "a"}"#, "q.jsonl:1: the question id is neither"),
        ]
        for (text, message) in cases {
            do {
                _ = try parse(text)
                Issue.record("accepted: \(text)")
            } catch {
                #expect("\(error)".hasPrefix(message), "\(error)")
            }
        }
    }

    @Test("a line appender cuts a partial last line left by a crash, and appends whole lines")
    func appender() throws {
        let dir = try Fixtures.temporaryDirectory("appender")
        let path = FileSystem.join(dir, "a.jsonl")
        try FileSystem.writeFileAtomically(path, bytes: Array("{\"question_id\": 1}\n{\"question_id\": 2, \"gen".utf8))
        #expect(try BenchmarkQuestions.answered(try FileSystem.readFile(path), file: path).map(\.key) == ["1"])
        let w = try LineAppender(path: path)
        #expect(w.droppedBytes == 23)
        try w.append(#"{"question_id": 3}"#)
        #expect(String(decoding: try FileSystem.readFile(path), as: UTF8.self) == "{\"question_id\": 1}\n{\"question_id\": 3}\n")
        let keys = try BenchmarkQuestions.answered(try FileSystem.readFile(path), file: path)
        #expect(keys.map(\.key) == ["1", "3"])
        // A file that is one partial line, and one whose partial last line is longer than the 64 KB read back at a time.
        try FileSystem.writeFileAtomically(path, bytes: Array("{\"question_id\"".utf8))
        #expect(try LineAppender(path: path).droppedBytes == 14)
        #expect(try FileSystem.readFile(path).isEmpty)
        let long = "{\"question_id\": 1}\n" + String(repeating: "x", count: 200_000)
        try FileSystem.writeFileAtomically(path, bytes: Array(long.utf8))
        #expect(try LineAppender(path: path).droppedBytes == 200_000)
        #expect(String(decoding: try FileSystem.readFile(path), as: UTF8.self) == "{\"question_id\": 1}\n")
    }
}
