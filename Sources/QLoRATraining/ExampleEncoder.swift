// From an example to tokens and labels: the conversation is rendered with the model's chat template
// (or the paper's Guanaco format "### Human: ... ### Assistant: ..."), tokenized turn by turn, and only
// the assistant turns (with the template's end-of-turn tokens, or EOS) are trained on, unless
// trainOnInputs. Sequences longer than maxLength are cut; a cut response still ends in EOS.
import QLoRACore
import QLoRATokenizer

public struct EncodedExample: Sendable, Equatable {
    public var tokens: [Int]
    /// Per position the token itself (trained) or -100 (not). Shifted by the trainer (t predicts t + 1).
    public var labels: [Int]
    public var truncated: Bool
    /// Where each example starts: [0] for one example; more after packing.
    public var exampleStarts: [Int]

    public init(tokens: [Int], labels: [Int], truncated: Bool, exampleStarts: [Int] = [0]) {
        self.tokens = tokens
        self.labels = labels
        self.truncated = truncated
        self.exampleStarts = exampleStarts
    }

    public var trainedTokens: Int { labels.filter { $0 != TrainingBatch.ignoreIndex }.count }

    /// Holds out `fraction` of the examples (or pairs; at least one) for validation, chosen by a shuffle seeded
    /// with `seed`; both parts keep the data's order.
    public static func splitValidation<T>(_ items: [T], fraction: Double, seed: UInt64) -> (train: [T], validation: [T]) {
        var rng = SeededGenerator(seed: seed &+ 77)
        var order = Array(items.indices)
        order.shuffle(using: &rng)
        let n = min(items.count, max(1, Int(Double(items.count) * fraction)))
        let held = Set(order.prefix(n))
        return (items.indices.filter { !held.contains($0) }.map { items[$0] }, order.prefix(n).sorted().map { items[$0] })
    }
}

/// What a training run trains and validates on: the data file's records encoded, less those with no
/// trained token left after truncation, and the validation examples: a file's, or `validationFraction`
/// of the data held out (only with 20 examples or more). `qlora train` and `qlora-bench plan` both use it.
public struct TrainingData {
    public let dataset: LoadedDataset
    public var train: [EncodedExample]
    public var validation: [EncodedExample]
    /// Records dropped because no response token fit in the maximum length.
    public let dropped: Int

    public init(path: String, format: DatasetFormat = .auto, skipBadRecords: Bool = false, encoder: ExampleEncoder,
                validationPath: String? = nil, validationFraction: Double, seed: UInt64) throws {
        dataset = try DatasetLoader.load(path, format: format, skipBadRecords: skipBadRecords)
        let encoded = try dataset.examples.map(encoder.encode)
        train = encoded.filter { $0.trainedTokens > 0 }
        dropped = encoded.count - train.count
        validation = []
        if let validationPath {
            validation = try DatasetLoader.load(validationPath, format: format, skipBadRecords: skipBadRecords).examples.map(encoder.encode)
        } else if validationFraction > 0 && train.count >= 20 {
            (train, validation) = EncodedExample.splitValidation(train, fraction: validationFraction, seed: seed)
        }
    }
}

/// Packing: short examples share a sequence so less of each batch is padding. Attention stays inside
/// each example and positions restart (see `TrainingBatch`), so packing changes which examples share a
/// batch, not what the model learns from each.
public enum Packing {
    /// First-fit decreasing into sequences of at most `capacity` tokens; deterministic. Examples
    /// longer than `capacity` stay alone.
    public static func pack(_ examples: [EncodedExample], capacity: Int) -> [EncodedExample] {
        let order = examples.indices.sorted { (examples[$0].tokens.count, $1) > (examples[$1].tokens.count, $0) }
        var bins: [[Int]] = []
        var free: [Int] = []
        for i in order {
            let n = examples[i].tokens.count
            if let b = free.firstIndex(where: { $0 >= n }) {
                bins[b].append(i)
                free[b] -= n
            } else {
                bins.append([i])
                free.append(capacity - n)
            }
        }
        return bins.map { members in
            var e = EncodedExample(tokens: [], labels: [], truncated: false, exampleStarts: [])
            for i in members {
                e.exampleStarts.append(e.tokens.count)
                e.tokens += examples[i].tokens
                e.labels += examples[i].labels
                e.truncated = e.truncated || examples[i].truncated
            }
            return e
        }
    }
}

public enum PromptTemplate: Sendable {
    /// The model's chat template (Jinja).
    case chat(ChatTemplate)
    /// "### Human: {user}\n### Assistant: {assistant}" with EOS after each response (QLoRA's Guanaco).
    case guanaco
}

public final class ExampleEncoder {
    public let tokenizer: Tokenizer
    public let template: PromptTemplate
    public let maxLength: Int
    public let trainOnInputs: Bool
    /// The paper's source_max_len / target_max_len: each prompt segment keeps its first
    /// `sourceMaxLength` tokens, each response its first `targetMaxLength` (ending in EOS). nil: no limit.
    public var sourceMaxLength: Int?
    public var targetMaxLength: Int?
    let eos: Int

    public init(tokenizer: Tokenizer, template: PromptTemplate, maxLength: Int, trainOnInputs: Bool = false,
                sourceMaxLength: Int? = nil, targetMaxLength: Int? = nil) throws {
        self.tokenizer = tokenizer
        self.template = template
        self.maxLength = maxLength
        self.trainOnInputs = trainOnInputs
        self.sourceMaxLength = sourceMaxLength
        self.targetMaxLength = targetMaxLength
        guard let eos = tokenizer.eosTokenID else {
            throw TokenizerError.invalidFile(file: tokenizer.source, reason: "the tokenizer has no EOS token; training needs one to end responses")
        }
        self.eos = eos
    }

    /// Text segments with whether each is trained.
    func segments(_ example: TrainingExample) throws -> [(String, Bool)] {
        switch example {
        case let .text(t):
            return [(t, true)]
        case let .conversation(messages):
            switch template {
            case .guanaco:
                var out: [(String, Bool)] = []
                var pending = ""
                for m in messages {
                    switch m.role {
                    case "system": pending += m.content + "\n"
                    case "user": pending += "### Human: " + m.content + "\n### Assistant: "
                    default:
                        out.append((pending, false))
                        pending = ""
                        out.append((m.content, true))
                        out.append(("\u{0}EOS", true))  // placeholder: the EOS id itself
                        pending = "\n"
                    }
                }
                return out
            case let .chat(t):
                // Render prefixes: the text before each assistant turn (with the generation prompt) and
                // through it; what lies between is that turn's trained span.
                let special = tokenizer.templateSpecialTokens
                func render(_ ms: ArraySlice<ChatMessage>, _ prompt: Bool) throws -> String {
                    try t.render(messages: ms.map { ChatTemplate.message($0.role, $0.content) }, addGenerationPrompt: prompt, specialTokens: special)
                }
                var out: [(String, Bool)] = []
                var done = ""
                for (i, m) in messages.enumerated() where m.role == "assistant" {
                    let before = try render(messages[..<i], true)
                    let through = try render(messages[...i], false)
                    guard before.hasPrefix(done), through.hasPrefix(before) else {
                        throw TemplateError("the chat template does not render conversations prefix by prefix, so responses cannot be located; use --template guanaco")
                    }
                    out.append((String(before.dropFirst(done.count)), false))
                    out.append((String(through.dropFirst(before.count)), true))
                    done = through
                }
                return out
            }
        }
    }

    public func encode(_ example: TrainingExample) throws -> EncodedExample {
        var tokens: [Int] = [], labels: [Int] = []
        var segmentTruncated = false
        // A leading BOS as the tokenizer's post-processor adds it (chat templates usually write their own).
        var first = true
        for (text, trained) in try segments(example) {
            var ids: [Int]
            if text == "\u{0}EOS" {
                if tokens.last == eos { continue }  // a response cut by --target-max-len already ends in EOS
                ids = [eos]
            } else {
                ids = tokenizer.encode(text, addSpecialTokens: false)
                if first, case .text = example { ids = tokenizer.encode(text, addSpecialTokens: true) }
                if first, case .conversation = example, case .guanaco = template, let bos = tokenizer.bosTokenID,
                   tokenizer.encode("", addSpecialTokens: true).first == bos {
                    ids = [bos] + ids
                }
            }
            first = false
            var truncatedSegment = false
            if !trained, let limit = sourceMaxLength, ids.count > limit {
                ids = Array(ids.prefix(limit))
                truncatedSegment = true
            }
            if trained, text != "\u{0}EOS", let limit = targetMaxLength, ids.count > limit {
                ids = Array(ids.prefix(limit))
                ids[limit - 1] = eos
                truncatedSegment = true
            }
            segmentTruncated = segmentTruncated || truncatedSegment
            tokens += ids
            labels += (trained || trainOnInputs) ? ids : Array(repeating: TrainingBatch.ignoreIndex, count: ids.count)
        }
        if case .text = example, tokens.last != eos {
            tokens.append(eos)
            labels.append(eos)
        }
        var truncated = segmentTruncated
        if tokens.count > maxLength {
            truncated = true
            tokens = Array(tokens.prefix(maxLength))
            labels = Array(labels.prefix(maxLength))
            // A response cut by the limit still ends in EOS (the model keeps learning where replies end).
            if labels[maxLength - 1] != TrainingBatch.ignoreIndex {
                tokens[maxLength - 1] = eos
                labels[maxLength - 1] = eos
            }
        }
        return EncodedExample(tokens: tokens, labels: labels, truncated: truncated)
    }
}
