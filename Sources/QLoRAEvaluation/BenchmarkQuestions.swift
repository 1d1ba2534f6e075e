// The questions of a chat benchmark, read from the layouts the QLoRA paper's evaluations use, and the
// answers file `qlora eval generate` writes (FastChat's answer layout plus the QLoRA repository's
// "generation" field), which it reads back to resume.
import QLoRACore
import QLoRATokenizer

/// One benchmark question: the user turns to answer in order, after an optional fixed conversation.
public struct BenchmarkQuestion: Sendable, Equatable {
    /// The question's id as the file gives it (a number or a string), or its line number.
    public let id: JSONValue
    public let category: String?
    /// Earlier turns given by the file (the OpenAssistant layout's conversation before its last human
    /// turn): role ("user" or "assistant") and text.
    public let context: [ChatMessage]
    /// The user turns to answer, one reply each (MT-bench has two).
    public let turns: [String]

    /// The id as a key (its JSON text).
    public var key: String { JSON.serialize(id) }
}

public enum BenchmarkQuestions {
    /// Questions from JSON lines in any of these layouts (the first field found wins):
    /// - Vicuna: {"question_id", "text", "category"};
    /// - MT-bench and FastChat's llm_judge: {"question_id", "category", "turns": [...]};
    /// - OpenAssistant (the paper's OA benchmark): {"input": "### Human: ... ### Assistant:"}, a conversation in
    ///   Guanaco's format whose last human turn is the question;
    /// - any JSON lines with "prompt", "instruction" (+ "input"), "question" or "text", or a JSON string a line.
    /// Ids come from "question_id" or "id", else the line number; a repeated id is an error.
    public static func parse(_ bytes: [UInt8], file: String) throws -> [BenchmarkQuestion] {
        var questions: [BenchmarkQuestion] = []
        var seen: [String: Int] = [:]
        for (lineNumber, line) in JSON.lines(bytes) {
            func bad(_ reason: String) -> EvaluationError { .malformedLine(file: file, line: lineNumber, reason: reason) }
            let value: JSONValue
            do { value = try JSON.parse(Array(line)) } catch { throw bad("not JSON (\(error))") }
            let q: BenchmarkQuestion
            if let text = value.stringValue {
                q = BenchmarkQuestion(id: .int(lineNumber), category: nil, context: [], turns: [text])
            } else {
                guard case .object = value else { throw bad("neither a JSON object nor a string") }
                let id = value["question_id"] ?? value["id"] ?? .int(lineNumber)
                switch id {
                case .number, .string: break
                default: throw bad("the question id is neither a number nor a string")
                }
                let category = value["category"]?.stringValue
                var context: [ChatMessage] = []
                var turns: [String]
                if let list = value["turns"] {
                    guard let items = list.arrayValue, !items.isEmpty else { throw bad("\"turns\" is not a non-empty list") }
                    turns = try items.enumerated().map { i, t in
                        guard let s = t.stringValue else { throw bad("turn \(i + 1) is not a string") }
                        return s
                    }
                } else if let input = value["input"]?.stringValue, input.contains("### Human:") {
                    let conversation = try guanacoTurns(input, bad: bad)
                    context = Array(conversation.dropLast())
                    turns = [conversation.last!.content]
                } else if let prompt = value["prompt"]?.stringValue ?? value["question"]?.stringValue ?? value["text"]?.stringValue {
                    turns = [prompt]
                } else if let instruction = value["instruction"]?.stringValue {
                    let input = value["input"]?.stringValue ?? ""
                    turns = [input.isEmpty ? instruction : instruction + "\n\n" + input]
                } else {
                    throw bad("no question: expected \"text\", \"turns\", \"input\" (### Human: ...), \"prompt\", \"instruction\" or \"question\"")
                }
                guard turns.allSatisfy({ !$0.isEmpty }) else { throw bad("an empty question") }
                q = BenchmarkQuestion(id: id, category: category, context: context, turns: turns)
            }
            if let first = seen[q.key] { throw bad("question id \(q.key) again (first on line \(first))") }
            seen[q.key] = lineNumber
            questions.append(q)
        }
        return questions
    }

    /// The turns of a conversation in Guanaco's format ("### Human: ... ### Assistant: ..."), which must
    /// end in a human turn, optionally followed by an empty "### Assistant:".
    static func guanacoTurns(_ text: String, bad: (String) -> EvaluationError) throws -> [ChatMessage] {
        var turns: [ChatMessage] = []
        var rest = Substring(text)
        let human = "### Human:", assistant = "### Assistant:"
        guard let first = rest.range(of: human) else { throw bad("no \"### Human:\" turn") }
        rest = rest[first.lowerBound...]
        while !rest.isEmpty {
            let role: String, marker: String
            if rest.hasPrefix(human) { role = "user"; marker = human } else if rest.hasPrefix(assistant) { role = "assistant"; marker = assistant } else {
                throw bad("text outside a turn")
            }
            rest = rest.dropFirst(marker.count)
            let nextHuman = rest.range(of: human)?.lowerBound, nextAssistant = rest.range(of: assistant)?.lowerBound
            let end = [nextHuman, nextAssistant].compactMap { $0 }.min() ?? rest.endIndex
            let content = String(rest[..<end]).trimmingWhitespace()
            rest = rest[end...]
            if content.isEmpty && role == "assistant" && rest.isEmpty { break }  // the trailing prompt for the reply
            guard !content.isEmpty else { throw bad("an empty \(role == "user" ? "human" : "assistant") turn") }
            if let last = turns.last, last.role == role { throw bad("two \(role == "user" ? "human" : "assistant") turns in a row") }
            turns.append(ChatMessage(role: role, content: content))
        }
        guard let last = turns.last, last.role == "user" else { throw bad("the conversation does not end in a human turn") }
        return turns
    }

    /// The question keys (`BenchmarkQuestion.key`) already answered in an answers file, with the model id
    /// each answer names. Lines must be JSON objects with "question_id"; a last line without its newline
    /// (a write cut short, which LineAppender removes) does not count.
    public static func answered(_ bytes: [UInt8], file: String) throws -> [(key: String, model: String?)] {
        var keys: [(String, String?)] = []
        for (lineNumber, line) in JSON.completeLines(bytes) {
            func bad(_ reason: String) -> EvaluationError { .malformedLine(file: file, line: lineNumber, reason: reason) }
            let value: JSONValue
            do { value = try JSON.parse(Array(line)) } catch { throw bad("not JSON (\(error))") }
            guard let id = value["question_id"] else { throw bad("an answer without \"question_id\"") }
            keys.append((JSON.serialize(id), value["model_id"]?.stringValue))
        }
        return keys
    }
}
