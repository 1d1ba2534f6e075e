// Pairwise judging as the QLoRA paper ran its tournament: every pair of systems, on every question both
// answered, shown to a judge in both orders (GPT-4 favours whichever answer comes first), with a three-way
// verdict (first, second, tie) on the judge's last line. This file holds what does not touch the network:
// reading answer files, planning the matches, writing the judge's prompt, reading its verdict, and the
// judgment lines that `qlora eval elo` reads back.
import QLoRACore

/// One system's answer to one question.
public struct SystemAnswer: Sendable, Equatable {
    public let questionID: JSONValue
    /// The question's turns when the answer file carries them (ours, the QLoRA repository's), else nil.
    public let question: [String]?
    public let category: String?
    /// The answer's turns (one per question turn).
    public let turns: [String]
    public var key: String { JSON.serialize(questionID) }

    public init(questionID: JSONValue, question: [String]?, category: String?, turns: [String]) {
        self.questionID = questionID
        self.question = question
        self.category = category
        self.turns = turns
    }
}

/// The answers of one system, read from one file.
public struct SystemAnswers: Sendable {
    public let name: String
    public let file: String
    public let answers: [SystemAnswer]
    public func answer(_ key: String) -> SystemAnswer? { byKey[key].map { answers[$0] } }
    let byKey: [String: Int]

    public init(name: String, file: String, answers: [SystemAnswer]) {
        self.name = name
        self.file = file
        self.answers = answers
        var m: [String: Int] = [:]
        for (i, a) in answers.enumerated() { m[a.key] = i }
        byKey = m
    }

    /// Reads one answer a line, in any of these layouts:
    /// - `qlora eval generate` and FastChat's MT-bench answers: "choices": [{"turns": [...]}] (the question in
    ///   "turns" or "text" when present);
    /// - the QLoRA repository's generations: "generation_truncated", else "generation" (the question in "text");
    /// - FastChat's Vicuna answers: "text" is the answer (no question: give the questions file);
    /// - "answer", "output" or "response" with the question in "question", "instruction" or "prompt".
    /// Every line needs "question_id" (or "id"). The system's name is `name` when given, else the lines'
    /// "model_id" (which must then be the same on every line), else the file's name without its extension.
    public static func parse(_ bytes: [UInt8], file: String, name: String? = nil) throws -> SystemAnswers {
        var answers: [SystemAnswer] = []
        var seen: [String: Int] = [:]
        var modelID: String?
        for (lineNumber, line) in JSON.lines(bytes) {
            func bad(_ reason: String) -> EvaluationError { .malformedLine(file: file, line: lineNumber, reason: reason) }
            let value: JSONValue
            do { value = try JSON.parse(Array(line)) } catch { throw bad("not JSON (\(error))") }
            guard case .object = value else { throw bad("not a JSON object") }
            guard let id = value["question_id"] ?? value["id"] else { throw bad("no \"question_id\"") }
            switch id {
            case .number, .string: break
            default: throw bad("the question id is neither a number nor a string")
            }
            func strings(_ v: JSONValue, _ what: String) throws -> [String] {
                guard let items = v.arrayValue, !items.isEmpty else { throw bad("\(what) is not a non-empty list") }
                return try items.enumerated().map { i, t in
                    guard let s = t.stringValue else { throw bad("\(what): item \(i + 1) is not a string") }
                    return s
                }
            }
            var question: [String]?
            let turns: [String]
            if let choices = value["choices"] {
                guard let first = choices.arrayValue?.first, let t = first["turns"] else { throw bad("\"choices\" has no first choice with \"turns\"") }
                turns = try strings(t, "choices[0].turns")
                if let q = value["turns"] { question = try strings(q, "\"turns\"") } else if let q = value["text"]?.stringValue { question = [q] }
            } else if let g = value["generation_truncated"] ?? value["generation"] {
                // The QLoRA repository's "generation_truncated" is the reply cut before a turn the model went on to invent.
                guard let s = g.stringValue else { throw bad("\"generation\" is not a string") }
                turns = [s]
                question = value["text"]?.stringValue.map { [$0] }
            } else if let a = value["answer"] ?? value["output"] ?? value["response"] {
                guard let s = a.stringValue else { throw bad("the answer is not a string") }
                turns = [s]
                question = (value["question"] ?? value["instruction"] ?? value["prompt"])?.stringValue.map { [$0] }
            } else if let t = value["text"] {
                guard let s = t.stringValue else { throw bad("\"text\" is not a string") }
                turns = [s]
            } else {
                throw bad("no answer: expected \"choices\", \"generation\", \"answer\", \"output\", \"response\" or \"text\"")
            }
            if let m = value["model_id"]?.stringValue, name == nil {
                if let earlier = modelID, earlier != m { throw bad("model_id \"\(m)\" differs from \"\(earlier)\" on an earlier line: one system a file, or name it with NAME=\(file)") }
                modelID = m
            }
            let a = SystemAnswer(questionID: id, question: question, category: value["category"]?.stringValue, turns: turns)
            if let first = seen[a.key] { throw bad("question id \(a.key) again (first on line \(first))") }
            seen[a.key] = lineNumber
            answers.append(a)
        }
        guard !answers.isEmpty else { throw EvaluationError.empty(file: file, what: "no answers") }
        var fallback = FileSystem.baseName(file)
        for ext in [".jsonl", ".json"] where fallback.hasSuffix(ext) && fallback.count > ext.count { fallback.removeLast(ext.count) }
        return SystemAnswers(name: name ?? modelID ?? fallback, file: file, answers: answers)
    }
}

/// The judge's instructions for one category of question: a system prompt and a template with
/// {question}, {answer_1}, {answer_2} and {prompt} (the QLoRA and FastChat prompt files' layout).
public struct JudgePrompt: Sendable, Equatable {
    public let category: String
    public let system: String
    public let template: String
    public let prompt: String

    public init(category: String, system: String, template: String, prompt: String) {
        self.category = category
        self.system = system
        self.template = template
        self.prompt = prompt
    }

    /// Our default: the paper's protocol (judge helpfulness, relevance, accuracy and detail; explain; the
    /// last line 1, 2 or 3) in our own words.
    public static let builtIn: [JudgePrompt] = {
        let template = """
            [Question]
            {question}

            [Assistant 1's answer begins]
            {answer_1}
            [Assistant 1's answer ends]

            [Assistant 2's answer begins]
            {answer_2}
            [Assistant 2's answer ends]

            [Instructions]
            {prompt}

            """
        let ending = "Then, on a new line of its own, write only the verdict: 1 if Assistant 1's answer is better, 2 if Assistant 2's answer is better, or 3 if they are equally good. Nothing may follow that line."
        let system = "You compare two AI assistants' answers to a user's question, carefully and without bias."
        return [
            JudgePrompt(category: "general", system: system, template: template, prompt: "Compare the two answers above for helpfulness, relevance, accuracy and level of detail. Explain your comparison briefly; the order in which the answers are shown must not influence it. " + ending),
            JudgePrompt(category: "coding", system: system, template: template, prompt: "Both assistants were asked to write code. Check whether each program solves the problem correctly and efficiently, and how clear, well commented and idiomatic it is. Explain your comparison briefly. " + ending),
            JudgePrompt(category: "math", system: system, template: template, prompt: "Solve the problem yourself first. Then check each assistant's steps and final result for correctness; the steps count as well as the result. Explain your comparison briefly. " + ending),
        ]
    }()

    /// Prompts from JSON lines with "prompt_template", "system_prompt", "defaults": {"prompt"} and
    /// "category" (the QLoRA repository's and FastChat's judge prompt files).
    public static func parse(_ bytes: [UInt8], file: String) throws -> [JudgePrompt] {
        var out: [JudgePrompt] = []
        for (lineNumber, line) in JSON.lines(bytes) {
            func bad(_ reason: String) -> EvaluationError { .malformedLine(file: file, line: lineNumber, reason: reason) }
            let value: JSONValue
            do { value = try JSON.parse(Array(line)) } catch { throw bad("not JSON (\(error))") }
            guard let template = value["prompt_template"]?.stringValue else { throw bad("no \"prompt_template\" string") }
            for field in ["{question}", "{answer_1}", "{answer_2}"] where !template.contains(field) {
                throw bad("the template has no \(field)")
            }
            out.append(JudgePrompt(category: value["category"]?.stringValue ?? "general", system: value["system_prompt"]?.stringValue ?? "",
                                   template: template, prompt: value["defaults"]?["prompt"]?.stringValue ?? ""))
        }
        guard !out.isEmpty else { throw EvaluationError.empty(file: file, what: "no judge prompts") }
        return out
    }

    /// The prompt for a question's category: the one named so, else coding and math questions get those
    /// prompts and the rest "general", else the first.
    public static func choose(_ prompts: [JudgePrompt], category: String?) -> JudgePrompt {
        let c = category?.lowercased() ?? "general"
        if let p = prompts.first(where: { $0.category.lowercased() == c }) { return p }
        let family = c == "coding" || c == "math" ? c : "general"
        return prompts.first { $0.category.lowercased() == family } ?? prompts[0]
    }

    /// The user message for a question and two answers, in that order. Only the four fields are replaced;
    /// other braces stay as they are.
    public func render(question: [String], first: [String], second: [String]) -> String {
        func join(_ turns: [String]) -> String {
            turns.count == 1 ? turns[0] : turns.enumerated().map { "[Turn \($0.offset + 1)]\n\($0.element)" }.joined(separator: "\n\n")
        }
        var out = ""
        var rest = Substring(template)
        let fields: [(String, String)] = [("{question}", join(question)), ("{answer_1}", join(first)), ("{answer_2}", join(second)), ("{prompt}", prompt)]
        while let open = rest.firstIndex(of: "{") {
            out += rest[..<open]
            let tail = rest[open...]
            if let (field, value) = fields.first(where: { tail.hasPrefix($0.0) }) {
                out += value
                rest = tail.dropFirst(field.count)
            } else {
                out += "{"
                rest = tail.dropFirst()
            }
        }
        return out + rest
    }
}

/// A judge's three-way verdict on one match.
public enum Verdict: Int, Sendable, Equatable {
    case first = 1, second = 2, tie = 3

    /// The verdict on the review's last non-empty line: "1", "2" or "3", alone or with decoration
    /// ("**2**", "Verdict: 1.", "Assistant 2", "Final answer: 3"). Nil when that line holds any other
    /// word ("1. Python is..." is a list item, not a verdict), no number, or more than one.
    public static func parse(_ review: String) -> Verdict? {
        let lines = review.split(whereSeparator: \.isNewline).map { String($0).trimmingWhitespace() }
        guard let last = lines.last(where: { !$0.isEmpty }) else { return nil }
        var digits: [Character] = []
        var token = ""
        for c in last + " " {
            if c.isNumber || c.isLetter { token.append(c); continue }
            if !token.isEmpty {
                if token.allSatisfy(\.isNumber) {
                    // a number of more than one digit names no verdict but still makes the line ambiguous
                    digits.append(token.count == 1 ? token.first! : "x")
                } else if !verdictWords.contains(token.lowercased()) {
                    return nil
                }
            }
            token = ""
        }
        guard digits.count >= 1, Set(digits).count == 1, let v = digits[0].wholeNumberValue, let verdict = Verdict(rawValue: v) else { return nil }
        return verdict
    }

    /// Words that may stand beside the number on a verdict line.
    static let verdictWords: Set<String> = ["assistant", "answer", "verdict", "final", "the", "is", "better", "choice", "output", "winner",
                                            "my", "result", "score", "rating", "decision", "judgment", "judgement", "option", "response", "number"]
}

/// One match to judge: a question, and two systems in the order the judge sees them.
public struct Match: Sendable, Hashable {
    public let questionKey: String
    public let first: String
    public let second: String
    public init(questionKey: String, first: String, second: String) {
        self.questionKey = questionKey
        self.first = first
        self.second = second
    }
    /// The key a judgments file records a match under, to resume.
    public var key: String { "\(questionKey)\u{1F}\(first)\u{1F}\(second)" }
}

public enum Tournament {
    /// Every pair of systems on every question both answered, in both orders (or the first order only),
    /// question by question in the first system's order. Fails on two systems of one name.
    public static func matches(_ systems: [SystemAnswers], bothOrders: Bool = true) throws -> [Match] {
        var names = Set<String>()
        for s in systems where !names.insert(s.name).inserted {
            throw EvaluationError.empty(file: s.file, what: "a second system named \"\(s.name)\": name them with NAME=FILE")
        }
        var keys: [String] = []
        var seen = Set<String>()
        for s in systems { for a in s.answers where seen.insert(a.key).inserted { keys.append(a.key) } }
        var out: [Match] = []
        for k in keys {
            for i in systems.indices {
                for j in systems.indices where j > i {
                    guard systems[i].answer(k) != nil, systems[j].answer(k) != nil else { continue }
                    out.append(Match(questionKey: k, first: systems[i].name, second: systems[j].name))
                    if bothOrders { out.append(Match(questionKey: k, first: systems[j].name, second: systems[i].name)) }
                }
            }
        }
        return out
    }

    /// The matches a judgments file already holds (by `Match.key`), judged or counted as failed. A last
    /// line without its newline does not count.
    public static func judged(_ bytes: [UInt8], file: String) throws -> Set<String> {
        var done = Set<String>()
        for (lineNumber, line) in JSON.completeLines(bytes) {
            func bad(_ reason: String) -> EvaluationError { .malformedLine(file: file, line: lineNumber, reason: reason) }
            let value: JSONValue
            do { value = try JSON.parse(Array(line)) } catch { throw bad("not JSON (\(error))") }
            guard let id = value["question_id"], let a = value["model_a"]?.stringValue, let b = value["model_b"]?.stringValue else {
                throw bad("a judgment without \"question_id\", \"model_a\" and \"model_b\"")
            }
            done.insert(Match(questionKey: JSON.serialize(id), first: a, second: b).key)
        }
        return done
    }

    /// The judgment line for a match: model_a is the system shown first. `verdict` nil records a judge
    /// that gave no verdict (with `error`), which `qlora eval elo` counts and skips.
    public static func judgment(_ match: Match, questionID: JSONValue, category: String?, verdict: Verdict?, review: String?,
                                judge: String, judgeModel: String?, error: String? = nil, seconds: Double? = nil) -> JSONValue {
        let winner: JSONValue
        switch verdict {
        case .first: winner = .string("model_a")
        case .second: winner = .string("model_b")
        case .tie: winner = .string("tie")
        case nil: winner = .null
        }
        var fields: [(String, JSONValue)] = [("question_id", questionID), ("model_a", .string(match.first)), ("model_b", .string(match.second)), ("winner", winner)]
        if let category { fields.append(("category", .string(category))) }
        fields.append(("verdict", verdict.map { .int($0.rawValue) } ?? .null))
        fields.append(("judge", .string(judge)))
        if let judgeModel { fields.append(("judge_model", .string(judgeModel))) }
        if let review { fields.append(("review", .string(review))) }
        if let error { fields.append(("error", .string(error))) }
        if let seconds { fields.append(("seconds", .double((seconds * 1000).rounded() / 1000))) }
        fields.append(("tstamp", .double(Clock.wallSeconds())))
        return .object(fields)
    }

    /// Counts over a judgments file's lines between `systems`: verdicts, lines without one, ties, and how
    /// often the answer shown first (model_a) or second won, the position bias the paper measured.
    public static func summary(_ bytes: [UInt8], file: String, systems: Set<String>) throws -> JudgmentSummary {
        var s = JudgmentSummary()
        for (lineNumber, line) in JSON.lines(bytes) {
            guard let value = try? JSON.parse(Array(line)) else { throw EvaluationError.malformedLine(file: file, line: lineNumber, reason: "not JSON") }
            guard let a = value["model_a"]?.stringValue, let b = value["model_b"]?.stringValue, systems.contains(a), systems.contains(b) else { continue }
            switch value["winner"]?.stringValue {
            case "model_a": s.verdicts += 1; s.firstShownWon += 1
            case "model_b": s.verdicts += 1; s.secondShownWon += 1
            case "tie", "tie (bothbad)": s.verdicts += 1; s.ties += 1
            default: s.noVerdict += 1
            }
        }
        return s
    }
}

public struct JudgmentSummary: Sendable, Equatable {
    public var verdicts = 0
    public var noVerdict = 0
    public var ties = 0
    public var firstShownWon = 0
    public var secondShownWon = 0
    public init() {}
}
