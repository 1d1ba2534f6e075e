// MMLU (Hendrycks et al., 2021) as the QLoRA paper scores it: k-shot prompts built as the hendrycks/test
// code builds them, and the prediction is the answer letter with the largest logit at the prompt's last
// position (the log-softmax over the whole vocabulary is reported for the four letters). The few-shot
// prefix of a subject is the same for every question, so its keys and values are computed once and
// each question continues from them.
import QLoRACore
import QLoRAModel
import QLoRATokenizer

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public struct MMLUQuestion: Sendable, Equatable {
    public let subject: String
    public let question: String
    public let choices: [String]
    /// 0..<4 (A-D).
    public let answer: Int
    /// file:line of the record.
    public let source: String
}

/// One prompt to score: `prefix` (shared by the questions of a subject) + `suffix`.
public struct MMLUItem: Sendable {
    public let subject: String
    public let prefix: String
    public let suffix: String
    public let answer: Int
    public let source: String

    public var prompt: String { prefix + suffix }

    public init(subject: String, prefix: String, suffix: String, answer: Int, source: String) {
        self.subject = subject
        self.prefix = prefix
        self.suffix = suffix
        self.answer = answer
        self.source = source
    }
}

public enum MMLU {
    public static let letters = ["A", "B", "C", "D"]

    /// "The following are multiple choice questions (with answers) about " + " word" per word of the subject
    /// + ".\n\n": hendrycks/test's format_subject puts a space before each word after the template's own
    /// space, hence two after "about" (as in the QLoRA repository's prompts).
    public static func header(subject: String) -> String {
        "The following are multiple choice questions (with answers) about " + subject.split(separator: "_").map { " " + $0 }.joined() + ".\n\n"
    }

    /// The question, "\nA. ..." for each choice, "\nAnswer:", and with the answer " X\n\n".
    public static func format(_ q: MMLUQuestion, includeAnswer: Bool) -> String {
        var s = q.question
        for (j, c) in q.choices.enumerated() { s += "\n\(letters[j]). \(c)" }
        s += "\nAnswer:"
        if includeAnswer { s += " \(letters[q.answer])\n\n" }
        return s
    }

    /// The header and the first `shots` dev examples with their answers.
    public static func prefix(subject: String, dev: [MMLUQuestion], shots: Int) -> String {
        header(subject: subject) + dev.prefix(shots).map { format($0, includeAnswer: true) }.joined()
    }

    /// Records of a hendrycks/test CSV file: no header, `question,A,B,C,D,answer` with the answer a letter
    /// A-D; RFC 4180 quoting (fields in double quotes may hold commas, newlines and doubled quotes).
    public static func parseCSV(_ bytes: [UInt8], file: String, subject: String) throws -> [MMLUQuestion] {
        var questions: [MMLUQuestion] = []
        for (line, fields) in try csvRecords(bytes, file: file) {
            func bad(_ reason: String) -> EvaluationError { .malformedLine(file: file, line: line, reason: reason) }
            guard fields.count == 6 else { throw bad("\(fields.count) columns; an MMLU record has 6 (question, A, B, C, D, answer)") }
            let a = fields[5].trimmingWhitespace()
            guard let answer = letters.firstIndex(of: a) else { throw bad("the answer is \"\(a)\", not one of A, B, C, D") }
            questions.append(MMLUQuestion(subject: subject, question: fields[0], choices: Array(fields[1...4]), answer: answer,
                                          source: "\(file):\(line)"))
        }
        return questions
    }

    /// (line of the record's start, fields) for each record of a CSV file; an empty line is no record.
    static func csvRecords(_ bytes: [UInt8], file: String) throws -> [(Int, [String])] {
        var records: [(Int, [String])] = []
        var fields: [String] = []
        var field: [UInt8] = []
        var line = 1, recordLine = 1
        var i = 0
        var inQuotes = false, wasQuoted = false, recordHasContent = false
        func endField() {
            fields.append(String(decoding: field, as: UTF8.self))
            field.removeAll(keepingCapacity: true)
            wasQuoted = false
        }
        func endRecord() {
            if recordHasContent || !fields.isEmpty {
                endField()
                records.append((recordLine, fields))
            }
            fields.removeAll()
            field.removeAll(keepingCapacity: true)
            recordHasContent = false
            wasQuoted = false
        }
        while i < bytes.count {
            let c = bytes[i]
            if inQuotes {
                if c == 0x22 {
                    if i + 1 < bytes.count && bytes[i + 1] == 0x22 { field.append(0x22); i += 2; continue }
                    inQuotes = false
                } else {
                    if c == 0x0A { line += 1 }
                    field.append(c)
                }
                i += 1
                continue
            }
            switch c {
            case 0x22:
                guard field.isEmpty && !wasQuoted else {
                    throw EvaluationError.malformedLine(file: file, line: line, reason: "a quote inside an unquoted field")
                }
                inQuotes = true
                wasQuoted = true
                recordHasContent = true
            case 0x2C:
                endField()
                recordHasContent = true
            case 0x0A:
                endRecord()
                line += 1
                recordLine = line
            case 0x0D where i + 1 < bytes.count && bytes[i + 1] == 0x0A:
                break
            default:
                guard !wasQuoted else {
                    throw EvaluationError.malformedLine(file: file, line: line, reason: "text after a quoted field's closing quote")
                }
                field.append(c)
                recordHasContent = true
            }
            i += 1
        }
        if inQuotes { throw EvaluationError.malformedLine(file: file, line: recordLine, reason: "a quoted field is never closed") }
        endRecord()
        return records
    }

    /// The hendrycks/test layout: `DIR/dev/<subject>_dev.csv` (the few-shot examples) and
    /// `DIR/<split>/<subject>_<split>.csv`; `subjects` limits it (nil: every subject of the split).
    public static func loadFolder(_ dir: String, split: String, subjects: [String]? = nil) throws -> (dev: [String: [MMLUQuestion]], questions: [String: [MMLUQuestion]]) {
        let splitDir = FileSystem.join(dir, split)
        guard FileSystem.isDirectory(splitDir) else {
            throw EvaluationError.empty(file: dir, what: "no \(split)/ folder (the hendrycks/test layout: dev/ and test/ with <subject>_<split>.csv files)")
        }
        let suffix = "_\(split).csv"
        let available = try FileSystem.listDirectory(splitDir).filter { $0.hasSuffix(suffix) }.map { String($0.dropLast(suffix.count)) }.sorted()
        var chosen = available
        if let subjects {
            for s in subjects where !available.contains(s) {
                throw EvaluationError.empty(file: splitDir, what: "no subject \"\(s)\" (there are: \(available.joined(separator: ", ")))")
            }
            chosen = subjects
        }
        guard !chosen.isEmpty else { throw EvaluationError.empty(file: splitDir, what: "no *\(suffix) files") }
        var dev: [String: [MMLUQuestion]] = [:], questions: [String: [MMLUQuestion]] = [:]
        for s in chosen {
            let q = FileSystem.join(splitDir, s + suffix)
            questions[s] = try parseCSV(try FileSystem.readFile(q), file: q, subject: s)
            let d = FileSystem.join(dir, "dev", s + "_dev.csv")
            dev[s] = FileSystem.exists(d) ? try parseCSV(try FileSystem.readFile(d), file: d, subject: s) : []
        }
        return (dev, questions)
    }

    /// Items for k-shot evaluation of a folder's questions (a subject without dev examples gets 0 shots).
    public static func items(dev: [String: [MMLUQuestion]], questions: [String: [MMLUQuestion]], shots: Int, limit: Int? = nil) -> [MMLUItem] {
        var out: [MMLUItem] = []
        for s in questions.keys.sorted() {
            let p = prefix(subject: s, dev: dev[s] ?? [], shots: shots)
            for q in questions[s]!.prefix(limit ?? .max) {
                out.append(MMLUItem(subject: s, prefix: p, suffix: format(q, includeAnswer: false), answer: q.answer, source: q.source))
            }
        }
        return out
    }

    /// The QLoRA repository's layout: JSON lines `{"subject", "input" (a whole prompt), "output" (A-D)}`.
    public static func parseJSONL(_ bytes: [UInt8], file: String) throws -> [MMLUItem] {
        var items: [MMLUItem] = []
        for (line, text) in JSON.lines(bytes) {
            func bad(_ reason: String) -> EvaluationError { .malformedLine(file: file, line: line, reason: reason) }
            let v: JSONValue
            do { v = try JSON.parse(Array(text)) } catch { throw bad("not JSON (\(error))") }
            guard let subject = v["subject"]?.stringValue else { throw bad("no \"subject\" string") }
            guard let input = v["input"]?.stringValue else { throw bad("no \"input\" string") }
            guard let output = v["output"]?.stringValue else { throw bad("no \"output\" string") }
            guard let answer = letters.firstIndex(of: output.trimmingWhitespace()) else { throw bad("the output is \"\(output)\", not one of A, B, C, D") }
            items.append(MMLUItem(subject: subject, prefix: "", suffix: input, answer: answer, source: "\(file):\(line)"))
        }
        return items
    }
}

public struct MMLUScore: Sendable {
    /// Log-probabilities of A-D at the prompt's last position (log-softmax over the vocabulary, f64).
    public let logprobs: [Double]
    public let prediction: Int
    public let tokens: Int
}

public struct MMLUResult: Sendable {
    public struct Subject: Sendable {
        public let subject: String
        public let correct: Int
        public let total: Int
        public var accuracy: Double { Double(correct) / Double(max(total, 1)) }
    }

    public let subjects: [Subject]
    public let scores: [MMLUScore]
    public let seconds: Double
    /// Tokens run through the model (prefixes once each) and tokens the prompts hold in all.
    public let tokensComputed: Int
    public let promptTokens: Int

    public var correct: Int { subjects.reduce(0) { $0 + $1.correct } }
    public var total: Int { subjects.reduce(0) { $0 + $1.total } }
    /// Over all questions.
    public var microAccuracy: Double { Double(correct) / Double(max(total, 1)) }
    /// The mean of the subjects' accuracies.
    public var macroAccuracy: Double { subjects.isEmpty ? 0 : subjects.reduce(0) { $0 + $1.accuracy } / Double(subjects.count) }
}

public enum MMLUError: Error, CustomStringConvertible {
    case letterToken(String)

    public var description: String {
        switch self {
        case let .letterToken(letter):
            return "the tokenizer does not give the answer letter \(letter) one token after \"Answer:\"; MMLU scoring needs one"
        }
    }
}

public final class MMLUEvaluator {
    public let model: LlamaModel
    public let tokenizer: Tokenizer
    /// The token each letter gets right after "Answer:": ids("Answer: X") minus ids("Answer:"). For a
    /// sentencepiece tokenizer that is "▁X", the token the QLoRA repository scores; for byte-level BPE "ĠX".
    public let letterTokens: [Int]

    public init(model: LlamaModel, tokenizer: Tokenizer) throws {
        self.model = model
        self.tokenizer = tokenizer
        let base = tokenizer.encode("Answer:")
        letterTokens = try MMLU.letters.map { l in
            let ids = tokenizer.encode("Answer: " + l)
            guard ids.count == base.count + 1, Array(ids.prefix(base.count)) == base else { throw MMLUError.letterToken(l) }
            return ids[base.count]
        }
    }

    /// Questions of one prefix run together in one pass (`LlamaModel.forward(sequences:caches:)`), at most
    /// this many, and at most `batchRows` of their tokens.
    public var batchSize = 8
    public var batchRows = 1024

    /// Scores every item; `progress(done, total)` after each. Consecutive items with the same prefix share
    /// the keys and values of its tokens (computed once): as many of them as begin the first such prompt's
    /// tokens, for every later prompt that begins with them too; their own tokens run `batchSize` questions
    /// at a time, each continuing a copy of the prefix. Any other prompt runs whole.
    public func evaluate(_ items: [MMLUItem], progress: (Int, Int) -> Void = { _, _ in }) throws -> MMLUResult {
        let start = Clock.seconds()
        let limit = model.config.maxPositions
        var scores: [MMLUScore] = []
        var computed = 0, promptTokens = 0
        var cache: KVCache?
        var cachedPrefix: (String, [Int])?
        var prefixVersion = 0
        func ensureCache(_ n: Int) -> KVCache {
            if let c = cache, c.capacity >= n { return c }
            let c = model.makeCache(capacity: min(limit, max(n, 512)))
            cache = c
            cachedPrefix = nil
            return c
        }
        // One cache per question of a batch, holding a copy of the prefix (made once per prefix).
        var slots: [KVCache] = []
        var slotVersion: [Int] = []
        func slot(_ i: Int, capacity: Int) -> KVCache {
            while slots.count <= i { slots.append(model.makeCache(capacity: 0)); slotVersion.append(-1) }
            if slots[i].capacity < capacity {
                slots[i] = model.makeCache(capacity: min(limit, max(capacity, 1024)))
                slotVersion[i] = -1
            }
            return slots[i]
        }
        func score(_ logits: ArraySlice<Float>, tokens: Int) -> MMLUScore {
            let logZ = LogSumExp.of(logits)
            let lp = letterTokens.map { Double(logits[logits.startIndex + $0]) - logZ }
            var best = 0
            for j in 1..<4 where lp[j] > lp[best] { best = j }
            return MMLUScore(logprobs: lp, prediction: best, tokens: tokens)
        }
        /// The prompt's tokens and, when it continues its prefix, the prefix's tokens as they begin it.
        func prepare(_ item: MMLUItem) -> (full: [Int], prefix: [Int]?) {
            var full = tokenizer.encode(item.prompt, addSpecialTokens: true)
            if full.count > limit { full = Array(full.suffix(limit)) }  // keep the question; the oldest shots go
            let prefixTokens: [Int]
            if let p = cachedPrefix, p.0 == item.prefix {
                prefixTokens = p.1
            } else if item.prefix.isEmpty {
                prefixTokens = []
            } else {
                // The prefix's tokens as they begin this prompt: alone, its closing "\n\n" may merge into one
                // token that the whole prompt splits, so only the part common to both is shared.
                let alone = tokenizer.encode(item.prefix, addSpecialTokens: true)
                var common = 0
                while common < min(alone.count, full.count) && alone[common] == full[common] { common += 1 }
                prefixTokens = Array(alone.prefix(common))
            }
            let continues = !prefixTokens.isEmpty && prefixTokens.count < full.count && Array(full.prefix(prefixTokens.count)) == prefixTokens
            return (full, continues ? prefixTokens : nil)
        }
        let V = model.config.vocabSize
        var n = 0
        var next: (full: [Int], prefix: [Int]?)?
        while n < items.count {
            let item = items[n]
            let first = next ?? prepare(item)
            next = nil
            guard let prefixTokens = first.prefix else {
                promptTokens += first.full.count
                let c = ensureCache(first.full.count)
                c.reset()
                cachedPrefix = nil
                let logits = try model.forward(first.full, cache: c, logits: .last)
                computed += first.full.count
                scores.append(score(logits[...], tokens: first.full.count))
                n += 1
                progress(n, items.count)
                continue
            }
            let c = ensureCache(first.full.count)
            if cachedPrefix?.0 != item.prefix || cachedPrefix?.1 != prefixTokens || c.length < prefixTokens.count {
                c.reset()
                _ = try model.forward(prefixTokens, cache: c, logits: .none)
                computed += prefixTokens.count
                cachedPrefix = (item.prefix, prefixTokens)
                prefixVersion += 1
            }
            c.truncate(to: prefixTokens.count)
            // The batch: this question and the next ones that continue the same prefix tokens.
            var batch: [[Int]] = [first.full]
            var rows = first.full.count - prefixTokens.count
            while batch.count < batchSize && n + batch.count < items.count && items[n + batch.count].prefix == item.prefix {
                let candidate = prepare(items[n + batch.count])
                guard candidate.prefix == prefixTokens, rows + candidate.full.count - prefixTokens.count <= batchRows else {
                    next = candidate
                    break
                }
                rows += candidate.full.count - prefixTokens.count
                batch.append(candidate.full)
            }
            let P = prefixTokens.count
            var caches: [KVCache] = []
            for (i, full) in batch.enumerated() {
                let s = slot(i, capacity: full.count)
                if slotVersion[i] != prefixVersion {
                    s.copyPrefix(of: c, count: P)
                    slotVersion[i] = prefixVersion
                }
                s.truncate(to: P)
                caches.append(s)
            }
            let logits = try model.forward(sequences: batch.map { Array($0[P...]) }, caches: caches)
            for (i, full) in batch.enumerated() {
                promptTokens += full.count
                computed += full.count - P
                scores.append(score(logits[(i * V)..<((i + 1) * V)], tokens: full.count))
                progress(n + i + 1, items.count)
            }
            n += batch.count
        }
        var bySubject: [String: (Int, Int)] = [:]
        for (item, s) in zip(items, scores) {
            let (c, t) = bySubject[item.subject] ?? (0, 0)
            bySubject[item.subject] = (c + (s.prediction == item.answer ? 1 : 0), t + 1)
        }
        let subjects = bySubject.keys.sorted().map { MMLUResult.Subject(subject: $0, correct: bySubject[$0]!.0, total: bySubject[$0]!.1) }
        return MMLUResult(subjects: subjects, scores: scores, seconds: Clock.seconds() - start, tokensComputed: computed, promptTokens: promptTokens)
    }
}
