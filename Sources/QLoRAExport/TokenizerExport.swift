// Carrying a tokenizer across formats when a merged model changes format:
//   GGUF (tokenizer.ggml.model "gpt2") -> tokenizer.json, tokenizer_config.json, special_tokens_map.json;
//   tokenizer.json (byte-level BPE) -> GGUF's tokenizer.ggml.* keys.
// Only byte-level BPE tokenizers (GPT-2, SmolLM, Llama 3, Qwen 2) go either way: their vocabularies and merges
// are the same strings in both formats. The pre-tokenizer is recognised from its structure (which splits and
// which regex), the names llama.cpp gives them; SentencePiece models (Llama 2, Mistral, Gemma, Phi-3) from their tokenizer.model.
import QLoRACore
import QLoRAFormats
import QLoRAModel
import QLoRATokenizer

public enum ExportError: Error, CustomStringConvertible, Equatable {
    case tokenizer(file: String, reason: String)
    case outputExists(path: String)
    case unsupported(what: String)

    public var description: String {
        switch self {
        case let .tokenizer(file, reason): return "\(file): \(reason)"
        case let .outputExists(path): return "\(path) already exists; pass --force to replace it"
        case let .unsupported(what): return what
        }
    }
}

public enum TokenizerExport {
    /// llama.cpp's pre-tokenizer names, with the tokenizer.json pre-tokenizer each stands for.
    static let llama3Pattern = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
    static let qwen2Pattern = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#

    // MARK: GGUF -> Hugging Face files

    /// tokenizer.json, tokenizer_config.json and special_tokens_map.json for a GGUF file's tokenizer.
    public static func huggingFaceFiles(from g: GGUFFile) throws -> [(name: String, bytes: [UInt8])] {
        func bad(_ r: String) -> ExportError { .tokenizer(file: g.path, reason: r) }
        let kind = g.value("tokenizer.ggml.model")?.stringValue ?? "?"
        guard kind == "gpt2" else {
            throw bad("tokenizer model '\(kind)' cannot be written as tokenizer.json (only byte-level BPE, 'gpt2'); take the tokenizer files from the original Hugging Face model")
        }
        guard let tokens = g.value("tokenizer.ggml.tokens")?.arrayValue?.compactMap(\.stringValue), !tokens.isEmpty else {
            throw bad("no tokenizer.ggml.tokens")
        }
        let types = g.value("tokenizer.ggml.token_type")?.arrayValue?.compactMap(\.intValue) ?? []
        let merges = (g.value("tokenizer.ggml.merges")?.arrayValue ?? []).compactMap(\.stringValue)
        let pre = g.value("tokenizer.ggml.pre")?.stringValue ?? "default"
        let byteLevelSplit: JSONValue = .object([("type", .string("ByteLevel")), ("add_prefix_space", .bool(false)),
                                                 ("trim_offsets", .bool(true)), ("use_regex", .bool(true))])
        func split(_ pattern: String) -> JSONValue {
            .object([("type", .string("Sequence")), ("pretokenizers", .array([
                .object([("type", .string("Split")), ("pattern", .object([("Regex", .string(pattern))])),
                         ("behavior", .string("Isolated")), ("invert", .bool(false))]),
                .object([("type", .string("ByteLevel")), ("add_prefix_space", .bool(false)), ("trim_offsets", .bool(true)),
                         ("use_regex", .bool(false))]),
            ]))])
        }
        let preTokenizer: JSONValue
        switch pre {
        // SmolLM's own tokenizer.json splits as GPT-2 does; llama.cpp's "smollm" also puts every digit on its own,
        // which encodes alike except for whitespace just before digits. The folder gets the model's own file back.
        case "default", "gpt2", "gpt-2", "smollm": preTokenizer = byteLevelSplit
        case "starcoder", "refact":
            preTokenizer = .object([("type", .string("Sequence")), ("pretokenizers", .array([
                .object([("type", .string("Digits")), ("individual_digits", .bool(true))]), byteLevelSplit,
            ]))])
        case "llama-bpe", "llama3", "llama-v3": preTokenizer = split(llama3Pattern)
        case "qwen2": preTokenizer = split(qwen2Pattern)
        default: throw bad("pre-tokenizer '\(pre)' cannot be written as tokenizer.json (known: gpt2, smollm, starcoder, refact, llama-bpe, qwen2)")
        }
        var added: [JSONValue] = []
        for (i, t) in types.enumerated() where (t == 3 || t == 4) && i < tokens.count {
            added.append(.object([("id", .int(i)), ("content", .string(tokens[i])), ("single_word", .bool(false)), ("lstrip", .bool(false)),
                                  ("rstrip", .bool(false)), ("normalized", .bool(t == 4)), ("special", .bool(t == 3))]))
        }
        func token(_ key: String) -> String? {
            g.value("tokenizer.ggml.\(key)_token_id")?.intValue.flatMap { $0 < tokens.count ? tokens[$0] : nil }
        }
        let bos = token("bos"), eos = token("eos"), pad = token("padding"), unk = token("unknown")
        let addBOS = g.value("tokenizer.ggml.add_bos_token")?.boolValue ?? false
        var postProcessor: JSONValue = .object([("type", .string("ByteLevel")), ("add_prefix_space", .bool(true)),
                                                ("trim_offsets", .bool(false)), ("use_regex", .bool(true))])
        if addBOS, let bos, let bosID = g.value("tokenizer.ggml.bos_token_id")?.intValue {
            let special: JSONValue = .object([("SpecialToken", .object([("id", .string(bos)), ("type_id", .int(0))]))])
            func seq(_ id: String) -> JSONValue { .object([("Sequence", .object([("id", .string(id)), ("type_id", .int(0))]))]) }
            postProcessor = .object([
                ("type", .string("TemplateProcessing")), ("single", .array([special, seq("A")])), ("pair", .array([special, seq("A"), special, seq("B")])),
                ("special_tokens", .object([(bos, .object([("id", .string(bos)), ("ids", .array([.int(bosID)])), ("tokens", .array([.string(bos)]))]))])),
            ])
        }
        let vocab: [(String, JSONValue)] = tokens.enumerated().map { ($1, .int($0)) }
        let tokenizer: JSONValue = .object([
            ("version", .string("1.0")), ("truncation", .null), ("padding", .null), ("added_tokens", .array(added)),
            ("normalizer", .null), ("pre_tokenizer", preTokenizer), ("post_processor", postProcessor),
            ("decoder", .object([("type", .string("ByteLevel")), ("add_prefix_space", .bool(true)), ("trim_offsets", .bool(true)), ("use_regex", .bool(true))])),
            ("model", .object([
                ("type", .string("BPE")), ("dropout", .null), ("unk_token", unk.map { .string($0) } ?? .null), ("continuing_subword_prefix", .null),
                ("end_of_word_suffix", .null), ("fuse_unk", .bool(false)), ("byte_fallback", .bool(false)), ("ignore_merges", .bool(false)),
                ("vocab", .object(vocab)),
                ("merges", .array(try merges.map { m -> JSONValue in
                    guard let sp = m.firstIndex(of: " ") else { throw bad("merge '\(m)' has no space") }
                    return .array([.string(String(m[..<sp])), .string(String(m[m.index(after: sp)...]))])
                })),
            ])),
        ])
        var config: [(String, JSONValue)] = [
            ("tokenizer_class", .string("PreTrainedTokenizerFast")), ("clean_up_tokenization_spaces", .bool(false)),
            ("add_bos_token", .bool(addBOS)), ("add_prefix_space", .bool(false)),
            ("model_max_length", .int(g.value("llama.context_length")?.intValue ?? 2048)),
        ]
        var specials: [(String, JSONValue)] = []
        for (key, value) in [("bos_token", bos), ("eos_token", eos), ("pad_token", pad), ("unk_token", unk)] {
            if let value {
                config.append((key, .string(value)))
                specials.append((key, .string(value)))
            }
        }
        if let template = g.value("tokenizer.chat_template")?.stringValue { config.append(("chat_template", .string(template))) }
        func bytes(_ v: JSONValue) -> [UInt8] { Array((JSON.serialize(v, pretty: true) + "\n").utf8) }
        return [("tokenizer.json", bytes(tokenizer)), ("tokenizer_config.json", bytes(.object(config))),
                ("special_tokens_map.json", bytes(.object(specials)))]
    }

    // MARK: Hugging Face folder -> GGUF metadata

    /// The tokenizer.ggml.* keys (and tokenizer.chat_template) for a folder's tokenizer: a SentencePiece
    /// tokenizer.model as llama.cpp's converter writes it (tokenizer model "llama": Llama 2, Mistral, Gemma, Phi-3),
    /// else a byte-level BPE tokenizer.json ("gpt2").
    public static func ggufMetadata(folder: String, vocabSize: Int, eosTokenIDs: [Int], bosTokenID: Int? = nil,
                                    addSpacePrefix: Bool? = nil) throws -> [(String, GGUFTypedValue)] {
        let file = FileSystem.join(folder, "tokenizer.json")
        func bad(_ r: String) -> ExportError { .tokenizer(file: file, reason: r) }
        let spm = FileSystem.join(folder, "tokenizer.model")
        if FileSystem.exists(spm) {
            return try sentencePieceMetadata(folder: folder, vocabSize: vocabSize, eosTokenIDs: eosTokenIDs, bosTokenID: bosTokenID,
                                             addSpacePrefix: addSpacePrefix)
        }
        guard FileSystem.exists(file) else { throw bad("missing: a GGUF needs the model's tokenizer (tokenizer.json, or tokenizer.model for SentencePiece models)") }
        let json: JSONValue
        do { json = try JSON.parse(try FileSystem.readFile(file, limit: 512 << 20)) } catch let e as JSONError { throw bad("not valid JSON: \(e)") }
        guard json["model"]?["type"]?.stringValue ?? "BPE" == "BPE", let vocabEntries = json["model"]?["vocab"]?.objectValue else {
            throw bad("only BPE tokenizers can be written to GGUF")
        }
        if json["model"]?["byte_fallback"]?.boolValue == true || json["normalizer"].map({ JSON.serialize($0).contains("\u{2581}") }) == true
            || json["pre_tokenizer"].map({ JSON.serialize($0).contains("Metaspace") }) == true {
            throw bad("a SentencePiece-style tokenizer is written to GGUF from its tokenizer.model (as llama.cpp's converter does), and this folder has none; copy the base model's tokenizer.model beside tokenizer.json")
        }
        var pre = try preTokenizerName(json["pre_tokenizer"], file: file)
        // llama.cpp's "smollm" is GPT-2's split with every digit on its own. When no token of the vocabulary holds a
        // digit beside anything else (SmolLM's), that changes only how whitespace just before digits is grouped, and
        // llama.cpp's converter names such a tokenizer smollm.
        if pre == "gpt2" {
            let addedContents = Set((json["added_tokens"]?.arrayValue ?? []).compactMap { $0["content"]?.stringValue })
            let mixed = vocabEntries.contains { t, _ in
                !addedContents.contains(t) && t.utf8.count > 1 && t.utf8.contains { $0 >= 0x30 && $0 <= 0x39 }
            }
            if !mixed { pre = "smollm" }
        }
        var tokens: [String?] = []
        func put(_ id: Int, _ t: String) throws {
            guard id >= 0, id < 1 << 24 else { throw bad("token id \(id) is out of range") }
            if id >= tokens.count { tokens += [String?](repeating: nil, count: id + 1 - tokens.count) }
            tokens[id] = t
        }
        for (t, v) in vocabEntries {
            guard let id = v.intValue else { throw bad("vocab entry '\(t)' has no integer id") }
            try put(id, t)
        }
        var types: [Int] = []
        var added: [Int: Bool] = [:]
        for a in json["added_tokens"]?.arrayValue ?? [] {
            guard let id = a["id"]?.intValue, let content = a["content"]?.stringValue else { throw bad("an added token without id or content") }
            try put(id, content)
            added[id] = a["special"]?.boolValue ?? false
        }
        let count = max(vocabSize, tokens.count)
        var strings: [String] = []
        strings.reserveCapacity(count)
        for i in 0..<count {
            if let t = i < tokens.count ? tokens[i] : nil {
                strings.append(t)
                types.append(added[i].map { $0 ? 3 : 4 } ?? 1)  // control, user-defined, normal
            } else {
                strings.append("[PAD\(i)]")
                types.append(5)  // unused
            }
        }
        let mergeValues = json["model"]?["merges"]?.arrayValue ?? []
        let merges: [String] = try mergeValues.map { m in
            if let s = m.stringValue { return s }
            if let p = m.arrayValue, p.count == 2, let a = p[0].stringValue, let b = p[1].stringValue { return a + " " + b }
            throw bad("a merge that is neither \"a b\" nor [a, b]")
        }
        var out: [(String, GGUFTypedValue)] = [
            ("tokenizer.ggml.model", .string("gpt2")), ("tokenizer.ggml.pre", .string(pre)),
            ("tokenizer.ggml.tokens", .strings(strings)), ("tokenizer.ggml.token_type", .int32s(types)),
            ("tokenizer.ggml.merges", .strings(merges)),
        ]
        let t = try Tokenizer.load(model: folder)
        // As the converter's SpecialVocab: the tokenizer's own, else config.json's.
        if let bos = t.bosTokenID ?? bosTokenID { out.append(("tokenizer.ggml.bos_token_id", .uint32(bos))) }
        if let eos = t.eosTokenID ?? eosTokenIDs.first { out.append(("tokenizer.ggml.eos_token_id", .uint32(eos))) }
        let configPath = FileSystem.join(folder, "tokenizer_config.json")
        if let c = try? JSON.parse(try FileSystem.readFile(configPath, limit: 64 << 20)) {
            for (key, gguf) in [("pad_token", "padding"), ("unk_token", "unknown")] {
                if let s = c[key]?.stringValue ?? c[key]?["content"]?.stringValue, let id = t.id(of: s) {
                    out.append(("tokenizer.ggml.\(gguf)_token_id", .uint32(id)))
                }
            }
        }
        let withSpecial = t.encode("a", addSpecialTokens: true), without = t.encode("a")
        out.append(("tokenizer.ggml.add_bos_token", .bool(withSpecial.count > without.count && withSpecial.first == t.bosTokenID)))
        if let template = t.chatTemplate { out.append(("tokenizer.chat_template", .string(template))) }
        return out
    }

    /// The keys llama.cpp's converter writes for a SentencePiece model (its _create_vocab_sentencepiece and
    /// SpecialVocab): every piece with its score and type, padded to the model's vocabulary with [PADi]; the
    /// tokens of added_tokens.json and of tokenizer_config.json's added_tokens_decoder over them (score -1000,
    /// control when special, else user-defined with "▁" as a space); the special ids; add_bos / add_eos; the
    /// chat template.
    static func sentencePieceMetadata(folder: String, vocabSize: Int, eosTokenIDs: [Int], bosTokenID: Int?,
                                      addSpacePrefix: Bool?) throws -> [(String, GGUFTypedValue)] {
        let model = try SentencePieceModel(path: FileSystem.join(folder, "tokenizer.model"))
        var tokens = (0..<vocabSize).map { "[PAD\($0)]" }
        var scores = [Float](repeating: -10000, count: vocabSize)
        var types = [Int](repeating: 5, count: vocabSize)  // unused
        for (id, p) in model.pieces.enumerated() where id < vocabSize {
            tokens[id] = p.piece
            scores[id] = p.score
            switch p.type {
            case .unknown: types[id] = 2
            case .control: types[id] = 3
            case .unused: types[id] = 5
            case .byte: types[id] = 6
            case .normal, .userDefined: types[id] = 1
            }
        }
        func json(_ name: String) -> JSONValue? {
            let path = FileSystem.join(folder, name)
            guard FileSystem.exists(path) else { return nil }
            return try? JSON.parse(try FileSystem.readFile(path, limit: 64 << 20))
        }
        for (key, value) in json("added_tokens.json")?.objectValue ?? [] {
            guard let id = value.intValue, id >= 0, id < vocabSize else { continue }
            tokens[id] = key
            scores[id] = -1000
            types[id] = 4
        }
        let tokenizerConfig = json("tokenizer_config.json")
        for (key, data) in tokenizerConfig?["added_tokens_decoder"]?.objectValue ?? [] {
            guard let id = Int(key), id >= 0, id < vocabSize, var content = data["content"]?.stringValue else { continue }
            if data["special"]?.boolValue == true || looksSpecial(content) {
                types[id] = 3
            } else {
                content = content.replacingOccurrences(of: "\u{2581}", with: " ")
                types[id] = 4
            }
            scores[id] = -1000
            tokens[id] = content
        }
        var out: [(String, GGUFTypedValue)] = [
            ("tokenizer.ggml.model", .string("llama")), ("tokenizer.ggml.pre", .string("default")),
            ("tokenizer.ggml.tokens", .strings(tokens)), ("tokenizer.ggml.scores", .float32s(scores)),
            ("tokenizer.ggml.token_type", .int32s(types)),
        ]
        // The special ids as the converter's SpecialVocab finds them: tokenizer_config.json's tokens among
        // tokenizer.json's added tokens (when there is a tokenizer.json), else config.json's ids.
        let config = json("config.json")
        var added: [String: Int] = [:]
        for a in json("tokenizer.json")?["added_tokens"]?.arrayValue ?? [] {
            if let c = a["content"]?.stringValue, let id = a["id"]?.intValue { added[c] = id }
        }
        func special(_ name: String) -> Int? {
            let entry = tokenizerConfig?["\(name)_token"]
            if let s = entry?.stringValue ?? entry?["content"]?.stringValue, let id = added[s], id < vocabSize { return id }
            let value = config?["\(name)_token_id"]
            if let id = value?.intValue ?? value?.arrayValue?.first?.intValue, id >= 0, id < vocabSize { return id }
            return nil
        }
        if let bos = special("bos") ?? bosTokenID { out.append(("tokenizer.ggml.bos_token_id", .uint32(bos))) }
        if let eos = special("eos") ?? eosTokenIDs.first { out.append(("tokenizer.ggml.eos_token_id", .uint32(eos))) }
        if let unk = special("unk") { out.append(("tokenizer.ggml.unknown_token_id", .uint32(unk))) }
        if let pad = special("pad") { out.append(("tokenizer.ggml.padding_token_id", .uint32(pad))) }
        if let b = tokenizerConfig?["add_bos_token"]?.boolValue { out.append(("tokenizer.ggml.add_bos_token", .bool(b))) }
        if let e = tokenizerConfig?["add_eos_token"]?.boolValue { out.append(("tokenizer.ggml.add_eos_token", .bool(e))) }
        if let addSpacePrefix { out.append(("tokenizer.ggml.add_space_prefix", .bool(addSpacePrefix))) }
        let template = FileSystem.join(folder, "chat_template.jinja")
        if let t = tokenizerConfig?["chat_template"]?.stringValue {
            out.append(("tokenizer.chat_template", .string(t)))
        } else if FileSystem.exists(template) {
            out.append(("tokenizer.chat_template", .string(String(decoding: try FileSystem.readFile(template), as: UTF8.self))))
        }
        return out
    }

    /// llama.cpp's converter's test for a token that is special by its look (<...>, [...], <|...|>).
    static func looksSpecial(_ t: String) -> Bool {
        (t.hasPrefix("<|") && t.hasSuffix("|>")) || (t.hasPrefix("<") && t.hasSuffix(">") && t.count > 2)
            || (t.hasPrefix("[") && t.hasSuffix("]") && t.count > 2)
    }

    /// llama.cpp's name for a tokenizer.json pre-tokenizer, recognised by its structure.
    static func preTokenizerName(_ p: JSONValue?, file: String) throws -> String {
        func isByteLevel(_ v: JSONValue?, regex: Bool) -> Bool {
            v?["type"]?.stringValue == "ByteLevel" && (v?["use_regex"]?.boolValue ?? true) == regex && v?["add_prefix_space"]?.boolValue != true
        }
        if isByteLevel(p, regex: true) { return "gpt2" }
        if p?["type"]?.stringValue == "Sequence", let items = p?["pretokenizers"]?.arrayValue, items.count == 2 {
            if items[0]["type"]?.stringValue == "Digits", items[0]["individual_digits"]?.boolValue == true, isByteLevel(items[1], regex: true) {
                return "starcoder"
            }
            if items[0]["type"]?.stringValue == "Split", isByteLevel(items[1], regex: false), let r = items[0]["pattern"]?["Regex"]?.stringValue {
                if r == llama3Pattern { return "llama-bpe" }
                if r == qwen2Pattern { return "qwen2" }
            }
        }
        let shown = p.map { String(JSON.serialize($0).prefix(160)) } ?? "none"
        throw ExportError.tokenizer(file: file, reason: "this pre-tokenizer has no llama.cpp name we know (GPT-2, SmolLM, Llama 3 and Qwen 2 are recognised): \(shown)")
    }
}
