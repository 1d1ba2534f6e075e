// Instruction datasets: JSON (an array of records) or JSONL (one record a line) in the formats the
// Hugging Face ecosystem uses, detected from the first record or given: alpaca (instruction, input,
// output), messages (OpenAI roles), sharegpt (conversations with from/value), prompt/completion, and
// text. A malformed record is an error naming the file and line, or is skipped and counted.
import QLoRACore
import QLoRATokenizer

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public enum DatasetFormat: String, CaseIterable, Sendable {
    case auto, alpaca, messages, sharegpt
    case promptCompletion = "prompt_completion"
    case text
}

/// One training example: a conversation (trained on its assistant turns) or plain text (trained on all).
public enum TrainingExample: Sendable, Equatable {
    case conversation([ChatMessage])
    case text(String)
}

public struct DatasetError: Error, CustomStringConvertible, Equatable {
    public let file: String
    /// 1-based line (JSONL) or record number (JSON array).
    public let line: Int
    public let reason: String

    public var description: String { "\(file):\(line): \(reason)" }
}

public struct LoadedDataset: Sendable {
    public let examples: [TrainingExample]
    public let format: DatasetFormat
    /// Records skipped with --skip-bad-records, with their reasons.
    public let skipped: [DatasetError]
}

public enum DatasetLoader {
    /// The largest record (a JSON line) read: a longer line is a bad record naming its line, never parsed, so
    /// that a line of a gigabyte costs a scan, not gigabytes of memory and an hour of tokenizing. A training
    /// example is cut at --max-length tokens anyway; long documents belong in several records.
    public static let maxRecordBytes = 64 << 20
    /// The largest dataset written as one JSON array (parsed whole); JSON lines have no bound but the disk's.
    public static let maxArrayFileBytes = 1 << 30

    /// Loads `path`. With `skipBadRecords`, malformed records are counted instead of stopping the load.
    public static func load(_ path: String, format requested: DatasetFormat = .auto, skipBadRecords: Bool = false) throws -> LoadedDataset {
        let records = try records(path)
        var format = requested
        if format == .auto {
            guard let first = records.first(where: { if case .success = $0.1 { return true }; return false }), case let .success(r) = first.1 else {
                if case let .failure(e) = records[0].1 { throw e }
                throw DatasetError(file: path, line: 1, reason: "no valid record")
            }
            format = try detect(r, file: path, line: first.0)
        }
        var examples: [TrainingExample] = []
        var skipped: [DatasetError] = []
        for (line, record) in records {
            do {
                switch record {
                case let .failure(e): throw e
                case let .success(r): examples.append(try parse(r, format: format, file: path, line: line))
                }
            } catch let e as DatasetError {
                if !skipBadRecords { throw e }
                skipped.append(e)
            }
        }
        guard !examples.isEmpty else { throw DatasetError(file: path, line: 1, reason: "every record was malformed (\(skipped.count) skipped)") }
        return LoadedDataset(examples: examples, format: format, skipped: skipped)
    }

    /// The offset of the next newline at or after `start`, or the end of the file. Scanned 16 MB at a time; the
    /// pages of a line already past maxRecordBytes leave memory as the scan passes them.
    static func nextNewline(in file: MappedFile, from start: Int) -> Int {
        let bytes = file.bytes
        guard start < bytes.count, let base = bytes.baseAddress else { return start }
        var at = start
        while at < bytes.count {
            let n = min(16 << 20, bytes.count - at)
            if let hit = memchr(base + at, 0x0A, n) { return UnsafeRawPointer(hit) - base }
            at += n
            if at - start > maxRecordBytes { file.releasePages(start..<at) }
        }
        return bytes.count
    }

    /// The records of a JSON-array or JSON-lines file, each with its line (JSON lines) or number (array), parsed
    /// or the reason it is malformed. A file with none is an error.
    public static func records(_ path: String) throws -> [(Int, Result<JSONValue, DatasetError>)] {
        let file = try MappedFile(path: path)
        let bytes = file.bytes
        var records: [(Int, Result<JSONValue, DatasetError>)] = []
        let firstNonSpace = bytes.first { $0 != 0x20 && $0 != 0x0A && $0 != 0x0D && $0 != 0x09 }
        if firstNonSpace == UInt8(ascii: "[") {
            guard bytes.count <= maxArrayFileBytes else {
                throw DatasetError(file: path, line: 1, reason: "a dataset written as one JSON array may hold at most \(maxArrayFileBytes) bytes (this one has \(bytes.count)); write it as JSON lines, one record a line")
            }
            let json: JSONValue
            do { json = try JSON.parse(bytes) } catch let e as JSONError {
                throw DatasetError(file: path, line: lineOf(offset: e.offset, in: bytes), reason: "not valid JSON: \(e.message)")
            }
            for (i, r) in (json.arrayValue ?? []).enumerated() { records.append((i + 1, .success(r))) }
        } else {
            var start = 0, lineNumber = 0
            while start <= bytes.count {
                let end = nextNewline(in: file, from: start)
                lineNumber += 1
                defer { start = end + 1 }
                let line = UnsafeRawBufferPointer(rebasing: bytes[start..<end])
                if line.allSatisfy({ $0 == 0x20 || $0 == 0x0D || $0 == 0x09 }) { continue }
                guard line.count <= maxRecordBytes else {
                    records.append((lineNumber, .failure(DatasetError(file: path, line: lineNumber, reason: "the record is \(line.count) bytes; a record may hold at most \(maxRecordBytes) (split long documents into several records)"))))
                    file.releasePages(start..<end)
                    continue
                }
                do {
                    records.append((lineNumber, .success(try JSON.parse(line))))
                } catch let e as JSONError {
                    records.append((lineNumber, .failure(DatasetError(file: path, line: lineNumber, reason: "not valid JSON: \(e.message)"))))
                }
            }
        }
        guard !records.isEmpty else { throw DatasetError(file: path, line: 1, reason: "no records") }
        return records
    }

    static func lineOf(offset: Int, in bytes: UnsafeRawBufferPointer) -> Int {
        1 + bytes.prefix(min(offset, bytes.count)).filter { $0 == 0x0A }.count
    }

    static func detect(_ r: JSONValue, file: String, line: Int) throws -> DatasetFormat {
        guard r.objectValue != nil else { throw DatasetError(file: file, line: line, reason: "a record must be a JSON object") }
        if r["messages"] != nil { return .messages }
        if r["conversations"] != nil { return .sharegpt }
        if r["instruction"] != nil { return .alpaca }
        if r["prompt"] != nil && r["completion"] != nil { return .promptCompletion }
        if r["text"] != nil { return .text }
        let keys = r.objectValue!.map(\.0).joined(separator: ", ")
        throw DatasetError(file: file, line: line, reason: "cannot tell the format from the keys (\(keys)); expected instruction/output (alpaca), messages, conversations (sharegpt), prompt/completion or text; or pass --format")
    }

    static func parse(_ r: JSONValue, format: DatasetFormat, file: String, line: Int) throws -> TrainingExample {
        func bad(_ reason: String) -> DatasetError { DatasetError(file: file, line: line, reason: reason) }
        guard r.objectValue != nil else { throw bad("a record must be a JSON object") }
        func string(_ key: String, required: Bool = true) throws -> String? {
            guard let v = r[key], v != .null else {
                if required { throw bad("missing field '\(key)'") }
                return nil
            }
            guard let s = v.stringValue else { throw bad("field '\(key)' must be a string") }
            return s
        }
        func nonEmpty(_ s: String, _ what: String) throws -> String {
            if s.trimmingWhitespace().isEmpty { throw bad("empty \(what)") }
            return s
        }
        switch format {
        case .alpaca:
            let instruction = try nonEmpty(try string("instruction")!, "instruction")
            let input = try string("input", required: false) ?? ""
            let output = try nonEmpty(try string("output")!, "response ('output')")
            let prompt = input.isEmpty ? instruction : instruction + "\n\n" + input
            var messages: [ChatMessage] = []
            if let system = try string("system", required: false), !system.isEmpty { messages.append(ChatMessage(role: "system", content: system)) }
            return .conversation(messages + [ChatMessage(role: "user", content: prompt), ChatMessage(role: "assistant", content: output)])
        case .promptCompletion:
            let prompt = try nonEmpty(try string("prompt")!, "prompt")
            let completion = try nonEmpty(try string("completion")!, "completion")
            return .conversation([ChatMessage(role: "user", content: prompt), ChatMessage(role: "assistant", content: completion)])
        case .text:
            return .text(try nonEmpty(try string("text")!, "text"))
        case .messages, .sharegpt:
            let key = format == .messages ? "messages" : "conversations"
            guard let list = r[key]?.arrayValue else { throw bad("field '\(key)' must be a list") }
            var messages: [ChatMessage] = []
            for (i, m) in list.enumerated() {
                let roleKey = format == .messages ? "role" : "from", contentKey = format == .messages ? "content" : "value"
                guard let rawRole = m[roleKey]?.stringValue else { throw bad("\(key)[\(i)] has no string '\(roleKey)'") }
                guard let content = m[contentKey]?.stringValue else { throw bad("\(key)[\(i)] has no string '\(contentKey)'") }
                let role: String
                switch rawRole.lowercased() {
                case "user", "human": role = "user"
                case "assistant", "gpt", "chatgpt", "bing", "bard", "model": role = "assistant"
                case "system": role = "system"
                default: throw bad("\(key)[\(i)] has unknown role '\(rawRole)' (user/human, assistant/gpt, system)")
                }
                if role == "assistant" && content.trimmingWhitespace().isEmpty { throw bad("\(key)[\(i)]: empty assistant response") }
                messages.append(ChatMessage(role: role, content: content))
            }
            guard messages.contains(where: { $0.role == "assistant" }) else { throw bad("no assistant turn to train on") }
            return .conversation(messages)
        case .auto:
            preconditionFailure("format resolved before parsing")
        }
    }
}

