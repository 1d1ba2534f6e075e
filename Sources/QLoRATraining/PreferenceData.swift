// Preference data in TRL's layouts, and its encoding as TRL's DPOTrainer tokenizes it.
//
// A record holds "prompt", "chosen" and "rejected": plain strings, or conversations (lists of {role, content}:
// the prompt's messages, and the chosen and rejected assistant turns). Without "prompt" (the "implicit prompt"
// layout), chosen and rejected are whole conversations and the prompt is the messages they share.
//
// Encoding: the prompt alone (with the generation prompt) and the prompt with each completion are rendered
// through the chat template and tokenized; each completion is what follows the tokens the prompt shares with
// both. Plain strings are tokenized as the tokenizer adds special tokens, each completion ending in EOS. Pairs are
// cut at maxLength tokens keeping the start; a pair whose chosen or rejected completion is cut away entirely is
// dropped (TRL drops those too).
import QLoRACore
import QLoRATokenizer

public enum PreferenceRecord: Sendable, Equatable {
    case text(prompt: String, chosen: String, rejected: String)
    case conversation(prompt: [ChatMessage], chosen: [ChatMessage], rejected: [ChatMessage])
}

/// KTO's unpaired record: a prompt, one completion and whether it is desirable (TRL's prompt / completion / label).
public struct UnpairedRecord: Sendable, Equatable {
    public enum Content: Sendable, Equatable {
        case text(prompt: String, completion: String)
        case conversation(prompt: [ChatMessage], completion: [ChatMessage])
    }
    public var content: Content
    public var desirable: Bool
}

/// One pair as the trainer runs it: the chosen and rejected sequences (prompt + completion, the prompt masked),
/// and the reference's summed log-probability of each completion once computed.
public struct EncodedPair: Sendable, Equatable {
    public var chosen: EncodedExample
    public var rejected: EncodedExample
    public var referenceChosen: Double?
    public var referenceRejected: Double?
    /// KTO: `chosen` is the row (prompt + its completion), `rejected` the mismatched row that estimates the KL term
    /// (the prompt with another row's completion), and this the row's label (true: desirable); nil for pairs.
    public var desirable: Bool?

    public init(chosen: EncodedExample, rejected: EncodedExample, desirable: Bool? = nil) {
        self.chosen = chosen
        self.rejected = rejected
        self.desirable = desirable
    }

    public var longest: Int { max(chosen.tokens.count, rejected.tokens.count) }
}

public enum PreferenceData {
    /// The records of a preference file; malformed ones stop the load naming their line, or are skipped.
    public static func load(_ path: String, skipBadRecords: Bool = false) throws -> (records: [PreferenceRecord], skipped: [DatasetError]) {
        var out: [PreferenceRecord] = [], skipped: [DatasetError] = []
        for (line, record) in try DatasetLoader.records(path) {
            do {
                switch record {
                case let .failure(e): throw e
                case let .success(r): out.append(try parse(r, file: path, line: line))
                }
            } catch let e as DatasetError {
                if !skipBadRecords { throw e }
                skipped.append(e)
            }
        }
        guard !out.isEmpty else { throw DatasetError(file: path, line: 1, reason: "every record was malformed (\(skipped.count) skipped)") }
        return (out, skipped)
    }

    static func parse(_ r: JSONValue, file: String, line: Int) throws -> PreferenceRecord {
        func bad(_ reason: String) -> DatasetError { DatasetError(file: file, line: line, reason: reason) }
        guard r.objectValue != nil else { throw bad("a record must be a JSON object") }
        guard let chosen = r["chosen"], let rejected = r["rejected"] else {
            let keys = r.objectValue!.map(\.0).joined(separator: ", ")
            throw bad("a preference record needs \"chosen\" and \"rejected\" (and \"prompt\", or conversations sharing their first turns); this one has \(keys)")
        }
        func messages(_ v: JSONValue, _ key: String) throws -> [ChatMessage] {
            guard let list = v.arrayValue else { throw bad("'\(key)' must be a string or a list of messages") }
            return try list.enumerated().map { i, m in
                guard let role = m["role"]?.stringValue, ["system", "user", "assistant"].contains(role) else {
                    throw bad("\(key)[\(i)] needs a role of system, user or assistant")
                }
                guard let content = m["content"]?.stringValue else { throw bad("\(key)[\(i)] has no string 'content'") }
                return ChatMessage(role: role, content: content)
            }
        }
        switch (r["prompt"], chosen, rejected) {
        case let (.string(p)?, .string(c), .string(j)):
            guard !c.isEmpty, !j.isEmpty else { throw bad("empty chosen or rejected completion") }
            return .text(prompt: p, chosen: c, rejected: j)
        case (nil, .string, .string), (.null?, .string, .string):
            throw bad("plain-text pairs need a \"prompt\"")
        case let (prompt?, c, j) where prompt != .null:
            let p = try messages(prompt, "prompt"), cm = try messages(c, "chosen"), jm = try messages(j, "rejected")
            guard !p.isEmpty else { throw bad("empty prompt") }
            guard cm.contains(where: { $0.role == "assistant" }), jm.contains(where: { $0.role == "assistant" }) else {
                throw bad("chosen and rejected must each hold an assistant turn")
            }
            return .conversation(prompt: p, chosen: cm, rejected: jm)
        default:
            // Implicit prompt: the messages chosen and rejected share.
            let cm = try messages(chosen, "chosen"), jm = try messages(rejected, "rejected")
            var shared = 0
            while shared < min(cm.count, jm.count) && cm[shared] == jm[shared] { shared += 1 }
            // The last shared message may be the start of the answers only if it is the user's: back up to the
            // last turn that is not the assistant's.
            while shared > 0 && cm[shared - 1].role == "assistant" { shared -= 1 }
            guard shared > 0, shared < cm.count, shared < jm.count else {
                throw bad("without \"prompt\", chosen and rejected must be conversations that share their first turns and then differ")
            }
            return .conversation(prompt: Array(cm[..<shared]), chosen: Array(cm[shared...]), rejected: Array(jm[shared...]))
        }
    }

    /// A prompt and its completions, as text or as conversations.
    enum Turns {
        case text(String, [String])
        case conversation([ChatMessage], [[ChatMessage]])
    }

    /// The tokens of the prompt alone and of the prompt with each completion, as TRL's trainers make them: plain text
    /// with the tokenizer's special tokens, each completion ending in EOS (appended unless it ends with EOS's text);
    /// conversations through the chat template, the prompt alone with the generation prompt.
    static func tokenized(_ turns: Turns, tokenizer: Tokenizer, template: ChatTemplate?) throws -> (prompt: [Int], full: [[Int]]) {
        switch turns {
        case let .text(prompt, completions):
            guard let eos = tokenizer.eosTokenID else {
                throw TokenizerError.invalidFile(file: tokenizer.source, reason: "the tokenizer has no EOS token; preference tuning ends each completion with it")
            }
            let eosText = tokenizer.eosToken ?? ""
            return (tokenizer.encode(prompt, addSpecialTokens: true), completions.map { c in
                let ids = tokenizer.encode(prompt + c, addSpecialTokens: true)
                return !eosText.isEmpty && c.hasSuffix(eosText) ? ids : ids + [eos]
            })
        case let .conversation(prompt, completions):
            guard let template else {
                throw TokenizerError.invalidFile(file: tokenizer.source, reason: "conversational preference data needs a chat template, and this model has none")
            }
            let special = tokenizer.templateSpecialTokens
            func render(_ ms: [ChatMessage], _ generation: Bool) throws -> [Int] {
                tokenizer.encode(try template.render(messages: ms.map { ChatTemplate.message($0.role, $0.content) }, addGenerationPrompt: generation, specialTokens: special))
            }
            return (try render(prompt, true), try completions.map { try render(prompt + $0, false) })
        }
    }

    /// Encodes a record as TRL does (see the top of this file); nil when truncation leaves no completion token.
    public static func encode(_ record: PreferenceRecord, tokenizer: Tokenizer, template: ChatTemplate?, maxLength: Int) throws -> EncodedPair? {
        let promptIDs: [Int], full: [[Int]]
        switch record {
        case let .text(prompt, chosen, rejected):
            (promptIDs, full) = try tokenized(.text(prompt, [chosen, rejected]), tokenizer: tokenizer, template: template)
        case let .conversation(prompt, chosen, rejected):
            (promptIDs, full) = try tokenized(.conversation(prompt, [chosen, rejected]), tokenizer: tokenizer, template: template)
        }
        let chosenIDs = full[0], rejectedIDs = full[1]
        func shared(_ a: [Int], _ b: [Int]) -> Int {
            var n = 0
            while n < min(a.count, b.count) && a[n] == b[n] { n += 1 }
            return n
        }
        let promptLength = min(shared(promptIDs, chosenIDs), shared(promptIDs, rejectedIDs))
        func example(_ ids: [Int]) -> EncodedExample? {
            let kept = Array(ids.prefix(maxLength))
            guard kept.count > promptLength else { return nil }
            let labels = kept.indices.map { $0 < promptLength ? TrainingBatch.ignoreIndex : kept[$0] }
            return EncodedExample(tokens: kept, labels: labels, truncated: kept.count < ids.count)
        }
        guard let c = example(chosenIDs), let r = example(rejectedIDs) else { return nil }
        return EncodedPair(chosen: c, rejected: r)
    }

    // MARK: KTO's unpaired data

    /// The records of an unpaired file (KTO): {prompt, completion, label} in plain text or conversations; a file of
    /// pairs ({prompt, chosen, rejected}) is unpaired as TRL does it: every chosen completion (desirable), then every
    /// rejected one.
    public static func loadUnpaired(_ path: String, skipBadRecords: Bool = false) throws -> (records: [UnpairedRecord], skipped: [DatasetError]) {
        var out: [UnpairedRecord] = [], fromPairs: [PreferenceRecord] = [], skipped: [DatasetError] = []
        var firstKind: (pairs: Bool, line: Int)?
        for (line, record) in try DatasetLoader.records(path) {
            do {
                switch record {
                case let .failure(e): throw e
                case let .success(r):
                    let isPair = r["chosen"] != nil || r["rejected"] != nil
                    if let first = firstKind, first.pairs != isPair {
                        throw DatasetError(file: path, line: line, reason: "\(isPair ? "a pair (chosen/rejected)" : "an unpaired record (prompt/completion/label)") in a file whose line \(first.line) is \(first.pairs ? "a pair" : "an unpaired record"): use one layout")
                    }
                    if isPair {
                        fromPairs.append(try parse(r, file: path, line: line))
                    } else {
                        out.append(try parseUnpaired(r, file: path, line: line))
                    }
                    if firstKind == nil { firstKind = (isPair, line) }
                }
            } catch let e as DatasetError {
                if !skipBadRecords { throw e }
                skipped.append(e)
            }
        }
        // TRL's unpair_preference_dataset: a batched map of 1,000 pairs at a time, each batch's chosen rows then its rejected.
        for start in stride(from: 0, to: fromPairs.count, by: 1000) {
            let batch = fromPairs[start..<min(fromPairs.count, start + 1000)]
            for desirable in [true, false] {
                for p in batch {
                    let content: UnpairedRecord.Content
                    switch p {
                    case let .text(prompt, chosen, rejected): content = .text(prompt: prompt, completion: desirable ? chosen : rejected)
                    case let .conversation(prompt, chosen, rejected): content = .conversation(prompt: prompt, completion: desirable ? chosen : rejected)
                    }
                    out.append(UnpairedRecord(content: content, desirable: desirable))
                }
            }
        }
        guard !out.isEmpty else { throw DatasetError(file: path, line: 1, reason: "every record was malformed (\(skipped.count) skipped)") }
        return (out, skipped)
    }

    static func parseUnpaired(_ r: JSONValue, file: String, line: Int) throws -> UnpairedRecord {
        func bad(_ reason: String) -> DatasetError { DatasetError(file: file, line: line, reason: reason) }
        guard let object = r.objectValue else { throw bad("a record must be a JSON object") }
        guard let prompt = r["prompt"], let completion = r["completion"], let label = r["label"] else {
            throw bad("an unpaired (KTO) record needs \"prompt\", \"completion\" and \"label\" (or \"chosen\" and \"rejected\"); this one has \(object.map(\.0).joined(separator: ", "))")
        }
        guard let desirable = label.boolValue else { throw bad("'label' must be true (desirable) or false") }
        switch (prompt, completion) {
        case let (.string(p), .string(c)):
            guard !c.isEmpty else { throw bad("empty completion") }
            return UnpairedRecord(content: .text(prompt: p, completion: c), desirable: desirable)
        case (.array, .array):
            // The conversational layout: parsed as a pair whose two completions are this one (errors reworded).
            do {
                let pair = try parse(.object([("prompt", prompt), ("chosen", completion), ("rejected", completion)]), file: file, line: line)
                guard case let .conversation(p, c, _) = pair else { throw bad("prompt and completion must both be strings or both conversations") }
                return UnpairedRecord(content: .conversation(prompt: p, completion: c), desirable: desirable)
            } catch let e as DatasetError {
                throw bad(e.reason.replacingOccurrences(of: "chosen and rejected must each hold", with: "the completion must hold")
                    .replacingOccurrences(of: "'chosen'", with: "'completion'").replacingOccurrences(of: "chosen[", with: "completion["))
            }
        default:
            throw bad("prompt and completion must both be strings or both conversations (lists of messages)")
        }
    }

    /// The row whose completion row i's KL row takes: the previous row of its block of `blockSize` consecutive rows,
    /// the block's last for its first (TRL rotates each block's completions by one; a block of one row keeps its own).
    public static func mismatchedRow(_ i: Int, count: Int, blockSize: Int) -> Int {
        let block = max(1, blockSize), start = i / block * block, end = min(count, start + block)
        return i == start ? end - 1 : i - 1
    }

    /// Encodes unpaired records as TRL's KTOTrainer does: each row's prompt and completion split where the tokenized
    /// prompt stops being a prefix of the tokenized whole (plain text: the completion ends in EOS); rows whose prompt
    /// alone fills maxLength are dropped; each row's mismatched (KL) row is its prompt with the completion of the
    /// previous row of its block of `blockSize` consecutive rows (the block's first row takes the block's last), the
    /// KL dataset TRL builds once with per_device_train_batch_size; both rows cut at maxLength keeping the start.
    /// Returns the rows (main row in `chosen`, KL row in `rejected`) and how many were dropped.
    public static func encodeUnpaired(_ records: [UnpairedRecord], tokenizer: Tokenizer, template: ChatTemplate?, maxLength: Int,
                                      blockSize: Int) throws -> (rows: [EncodedPair], dropped: Int) {
        var split: [(prompt: [Int], completion: [Int], desirable: Bool)] = []
        for record in records {
            let turns: Turns
            switch record.content {
            case let .text(prompt, completion): turns = .text(prompt, [completion])
            case let .conversation(prompt, completion): turns = .conversation(prompt, [completion])
            }
            let (promptIDs, full) = try tokenized(turns, tokenizer: tokenizer, template: template)
            let fullIDs = full[0]
            var n = 0
            while n < min(promptIDs.count, fullIDs.count) && promptIDs[n] == fullIDs[n] { n += 1 }
            guard n < maxLength, n < fullIDs.count else { continue }
            split.append((Array(fullIDs[..<n]), Array(fullIDs[n...]), record.desirable))
        }
        func example(_ prompt: [Int], _ completion: [Int]) -> EncodedExample {
            let ids = prompt + completion, kept = Array(ids.prefix(maxLength))
            let labels = kept.indices.map { $0 < prompt.count ? TrainingBatch.ignoreIndex : kept[$0] }
            return EncodedExample(tokens: kept, labels: labels, truncated: kept.count < ids.count)
        }
        let rows = split.indices.map { i -> EncodedPair in
            let other = mismatchedRow(i, count: split.count, blockSize: blockSize)
            return EncodedPair(chosen: example(split[i].prompt, split[i].completion), rejected: example(split[i].prompt, split[other].completion),
                               desirable: split[i].desirable)
        }
        return (rows, records.count - split.count)
    }
}
