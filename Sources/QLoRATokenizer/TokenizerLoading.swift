// Building a Tokenizer from tokenizer.json (+ tokenizer_config.json) or from GGUF metadata.
import Foundation
import QLoRACore
import QLoRAFormats

extension Tokenizer {
    /// Loads the tokenizer of a model folder (tokenizer.json; chat template from tokenizer_config.json or
    /// chat_template.jinja) or of a .gguf file.
    public static func load(model path: String) throws -> Tokenizer {
        if path.lowercased().hasSuffix(".gguf") { return try Tokenizer(gguf: try GGUFFile(path: path)) }
        let file = FileSystem.isDirectory(path) ? FileSystem.join(path, "tokenizer.json") : path
        guard FileSystem.exists(file) else {
            throw TokenizerError.invalidFile(file: file, reason: "no tokenizer.json (only the fast-tokenizer format is read; save it with transformers' tokenizer.save_pretrained)")
        }
        let t = try Tokenizer(jsonFile: file)
        let folder = FileSystem.isDirectory(path) ? path : FileSystem.directoryName(path)
        try t.readConfig(folder: folder)
        return t
    }

    /// Reads special tokens and the chat template from tokenizer_config.json and chat_template.jinja
    /// (transformers 5 writes the template to the latter).
    func readConfig(folder: String) throws {
        let configPath = FileSystem.join(folder, "tokenizer_config.json")
        if FileSystem.exists(configPath) {
            let json: JSONValue
            do { json = try JSON.parse(try FileSystem.readFile(configPath, limit: 64 << 20)) } catch let e as JSONError {
                throw TokenizerError.invalidFile(file: configPath, reason: "not valid JSON: \(e)")
            }
            func tokenString(_ v: JSONValue?) -> String? { v?.stringValue ?? v?["content"]?.stringValue }
            bosToken = tokenString(json["bos_token"]) ?? bosToken
            eosToken = tokenString(json["eos_token"]) ?? eosToken
            if let t = json["chat_template"]?.stringValue {
                chatTemplate = t
            } else if let list = json["chat_template"]?.arrayValue {
                // A list of named templates: take "default".
                chatTemplate = list.first { $0["name"]?.stringValue == "default" }?["template"]?.stringValue
            }
        }
        let jinja = FileSystem.join(folder, "chat_template.jinja")
        if FileSystem.exists(jinja) { chatTemplate = String(decoding: try FileSystem.readFile(jinja), as: UTF8.self) }
    }

    public convenience init(jsonFile path: String) throws {
        let json: JSONValue
        do { json = try JSON.parse(try FileSystem.readFile(path, limit: 512 << 20)) } catch let e as JSONError {
            throw TokenizerError.invalidFile(file: path, reason: "not valid JSON: \(e)")
        }
        try self.init(json: json, file: path)
    }

    convenience init(json: JSONValue, file: String) throws {
        func bad(_ r: String) -> TokenizerError { .invalidFile(file: file, reason: r) }
        guard let m = json["model"] else { throw bad("no \"model\"") }
        let type = m["type"]?.stringValue ?? "BPE"
        guard type == "BPE" else { throw TokenizerError.unsupported(file: file, what: "model type '\(type)'", supported: "BPE") }
        guard let vocabEntries = m["vocab"]?.objectValue else { throw bad("BPE model without a vocab object") }
        var vocab: [(String, Int)] = []
        vocab.reserveCapacity(vocabEntries.count)
        for (t, v) in vocabEntries {
            guard let id = v.intValue, id >= 0, id < 10_000_000 else { throw bad("vocab id of '\(t)' is not a valid integer") }
            vocab.append((t, id))
        }
        var merges: [(String, String)] = []
        for (i, entry) in (m["merges"]?.arrayValue ?? []).enumerated() {
            if let s = entry.stringValue {
                guard let space = s.firstIndex(of: " ") else { throw bad("merge \(i) '\(s)' has no space") }
                merges.append((String(s[..<space]), String(s[s.index(after: space)...])))
            } else if let pair = entry.arrayValue, pair.count == 2, let a = pair[0].stringValue, let b = pair[1].stringValue {
                merges.append((a, b))
            } else {
                throw bad("merge \(i) is neither \"a b\" nor [a, b]")
            }
        }
        if m["continuing_subword_prefix"]?.stringValue?.isEmpty == false || m["end_of_word_suffix"]?.stringValue?.isEmpty == false {
            throw TokenizerError.unsupported(file: file, what: "continuing_subword_prefix / end_of_word_suffix", supported: "plain BPE")
        }
        let model = BPEModel(vocab: vocab, merges: merges, byteFallback: m["byte_fallback"]?.boolValue ?? false,
                             unkToken: m["unk_token"]?.stringValue, fuseUnk: m["fuse_unk"]?.boolValue ?? false,
                             ignoreMerges: m["ignore_merges"]?.boolValue ?? false)
        var added: [AddedToken] = []
        for a in json["added_tokens"]?.arrayValue ?? [] {
            guard let id = a["id"]?.intValue, let content = a["content"]?.stringValue else { throw bad("added token without id/content") }
            added.append(AddedToken(id: id, content: content, special: a["special"]?.boolValue ?? false,
                                    lstrip: a["lstrip"]?.boolValue ?? false, rstrip: a["rstrip"]?.boolValue ?? false,
                                    singleWord: a["single_word"]?.boolValue ?? false,
                                    normalized: a["normalized"]?.boolValue ?? !(a["special"]?.boolValue ?? false)))
        }
        let normalizer = try json["normalizer"].flatMap { $0 == .null ? nil : try Self.normalizer($0, file: file) }
        let pre = try json["pre_tokenizer"].flatMap { $0 == .null ? nil : try Self.preTokenizer($0, file: file) }
        let decoder = try json["decoder"].flatMap { $0 == .null ? nil : try Self.decoder($0, file: file) }
        var prefix: [Int] = [], suffix: [Int] = []
        if let post = json["post_processor"], post != .null {
            (prefix, suffix) = try Self.postProcessor(post, file: file, lookup: { name in
                added.first(where: { TokenBytes($0.content) == TokenBytes(name) })?.id ?? model.id(of: name)
            })
        }
        self.init(model: model, normalizer: normalizer, preTokenizer: pre, decoder: decoder, prefixIDs: prefix, suffixIDs: suffix,
                  added: added, source: file)
    }

    static func normalizer(_ j: JSONValue, file: String) throws -> Normalizer {
        let type = j["type"]?.stringValue ?? "?"
        switch type {
        case "NFC": return .nfc
        case "NFKC": return .nfkc
        case "NFD": return .nfd
        case "NFKD": return .nfkd
        case "Lowercase": return .lowercase
        case "Prepend": return .prepend(j["prepend"]?.stringValue ?? "")
        case "Replace":
            guard let p = j["pattern"]?["String"]?.stringValue else {
                throw TokenizerError.unsupported(file: file, what: "Replace normalizer with a regex pattern", supported: "String patterns")
            }
            return .replace(pattern: p, content: j["content"]?.stringValue ?? "")
        case "Strip": return .strip(left: j["strip_left"]?.boolValue ?? true, right: j["strip_right"]?.boolValue ?? true)
        case "Sequence": return .sequence(try (j["normalizers"]?.arrayValue ?? []).map { try normalizer($0, file: file) })
        default:
            throw TokenizerError.unsupported(file: file, what: "normalizer '\(type)'", supported: "NFC, NFKC, NFD, NFKD, Lowercase, Prepend, Replace, Strip, Sequence")
        }
    }

    static func preTokenizer(_ j: JSONValue, file: String) throws -> PreTokenizer {
        let type = j["type"]?.stringValue ?? "?"
        switch type {
        case "ByteLevel":
            return .byteLevel(addPrefixSpace: j["add_prefix_space"]?.boolValue ?? false, useRegex: j["use_regex"]?.boolValue ?? true)
        case "Split":
            let pattern: SplitPattern
            if let r = j["pattern"]?["Regex"]?.stringValue {
                do { pattern = try SplitPattern(regex: r) } catch {
                    throw TokenizerError.invalidFile(file: file, reason: "Split pattern does not compile: \(error)")
                }
            } else if let s = j["pattern"]?["String"]?.stringValue {
                pattern = SplitPattern(literal: s)
            } else {
                throw TokenizerError.invalidFile(file: file, reason: "Split pre-tokenizer without a pattern")
            }
            guard let behavior = SplitBehavior(rawValue: j["behavior"]?.stringValue ?? "Isolated") else {
                throw TokenizerError.unsupported(file: file, what: "Split behavior '\(j["behavior"]?.stringValue ?? "")'", supported: "Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous")
            }
            return .split(pattern, behavior, invert: j["invert"]?.boolValue ?? false)
        case "Digits": return .digits(individual: j["individual_digits"]?.boolValue ?? false)
        case "Metaspace":
            let scheme = j["prepend_scheme"]?.stringValue ?? ((j["add_prefix_space"]?.boolValue ?? true) ? "always" : "never")
            return .metaspace(replacement: j["replacement"]?.stringValue ?? "▁", prependScheme: scheme, split: j["split"]?.boolValue ?? true)
        case "WhitespaceSplit": return .whitespaceSplit
        case "Sequence": return .sequence(try (j["pretokenizers"]?.arrayValue ?? []).map { try preTokenizer($0, file: file) })
        default:
            throw TokenizerError.unsupported(file: file, what: "pre-tokenizer '\(type)'", supported: "ByteLevel, Split, Digits, Metaspace, WhitespaceSplit, Sequence")
        }
    }

    static func decoder(_ j: JSONValue, file: String) throws -> TokenDecoder {
        let type = j["type"]?.stringValue ?? "?"
        switch type {
        case "ByteLevel": return .byteLevel
        case "ByteFallback": return .byteFallback
        case "Fuse": return .fuse
        case "Replace":
            guard let p = j["pattern"]?["String"]?.stringValue else {
                throw TokenizerError.unsupported(file: file, what: "Replace decoder with a regex", supported: "String patterns")
            }
            return .replace(pattern: p, content: j["content"]?.stringValue ?? "")
        case "Strip":
            let content = j["content"]?.stringValue?.first ?? " "
            return .strip(content: content, start: j["start"]?.intValue ?? 0, stop: j["stop"]?.intValue ?? 0)
        case "Metaspace":
            let scheme = j["prepend_scheme"]?.stringValue ?? ((j["add_prefix_space"]?.boolValue ?? true) ? "always" : "never")
            return .metaspace(replacement: j["replacement"]?.stringValue ?? "▁", prependScheme: scheme)
        case "Sequence": return .sequence(try (j["decoders"]?.arrayValue ?? []).map { try decoder($0, file: file) })
        default:
            throw TokenizerError.unsupported(file: file, what: "decoder '\(type)'", supported: "ByteLevel, ByteFallback, Fuse, Replace, Strip, Metaspace, Sequence")
        }
    }

    /// The ids a post-processor puts before and after a single sequence.
    static func postProcessor(_ j: JSONValue, file: String, lookup: (String) -> Int?) throws -> ([Int], [Int]) {
        let type = j["type"]?.stringValue ?? "?"
        switch type {
        case "ByteLevel": return ([], [])
        case "Sequence":
            var prefix: [Int] = [], suffix: [Int] = []
            for p in j["processors"]?.arrayValue ?? [] {
                let (a, b) = try postProcessor(p, file: file, lookup: lookup)
                prefix += a
                suffix += b
            }
            return (prefix, suffix)
        case "TemplateProcessing":
            var prefix: [Int] = [], suffix: [Int] = []
            var seenSequence = false
            for piece in j["single"]?.arrayValue ?? [] {
                if piece["Sequence"] != nil { seenSequence = true; continue }
                guard let name = piece["SpecialToken"]?["id"]?.stringValue else { continue }
                let ids = j["special_tokens"]?[name]?["ids"]?.arrayValue?.compactMap(\.intValue) ?? [lookup(name)].compactMap { $0 }
                if seenSequence { suffix += ids } else { prefix += ids }
            }
            return (prefix, suffix)
        default:
            throw TokenizerError.unsupported(file: file, what: "post-processor '\(type)'", supported: "TemplateProcessing, ByteLevel, Sequence")
        }
    }

    /// The tokenizer in a GGUF file's metadata (tokenizer.ggml.model "gpt2": byte-level BPE; "llama": SentencePiece).
    public convenience init(gguf g: GGUFFile) throws {
        let kind = g.value("tokenizer.ggml.model")?.stringValue ?? "?"
        if kind == "llama" {
            try self.init(sentencePieceGGUF: g)
            return
        }
        guard kind == "gpt2" else {
            throw TokenizerError.unsupported(file: g.path, what: "GGUF tokenizer model '\(kind)'", supported: "gpt2 (byte-level BPE), llama (SentencePiece)")
        }
        guard let tokens = g.value("tokenizer.ggml.tokens")?.arrayValue?.compactMap(\.stringValue) else {
            throw TokenizerError.invalidFile(file: g.path, reason: "no tokenizer.ggml.tokens")
        }
        let vocab = tokens.enumerated().map { ($1, $0) }
        let merges: [(String, String)] = (g.value("tokenizer.ggml.merges")?.arrayValue ?? []).compactMap {
            guard let s = $0.stringValue, let sp = s.firstIndex(of: " ") else { return nil }
            return (String(s[..<sp]), String(s[s.index(after: sp)...]))
        }
        let types = g.value("tokenizer.ggml.token_type")?.arrayValue?.compactMap(\.intValue) ?? []
        // Token types 3 (control) and 4 (user defined) are added tokens, matched before BPE.
        var added: [AddedToken] = []
        for (i, t) in types.enumerated() where (t == 3 || t == 4) && i < tokens.count {
            added.append(AddedToken(id: i, content: tokens[i], special: t == 3, lstrip: false, rstrip: false, singleWord: false,
                                    normalized: false))
        }
        let pre = g.value("tokenizer.ggml.pre")?.stringValue ?? "default"
        let preTokenizer: PreTokenizer
        switch pre {
        case "default", "gpt2", "gpt-2":
            preTokenizer = .byteLevel(addPrefixSpace: false, useRegex: true)
        case "smollm", "starcoder", "refact":
            preTokenizer = .sequence([.digits(individual: true), .byteLevel(addPrefixSpace: false, useRegex: true)])
        case "llama-bpe", "llama3", "llama-v3":
            preTokenizer = .sequence([.split(try SplitPattern(regex: GGUFPatterns.llama3), .isolated, invert: false),
                                      .byteLevel(addPrefixSpace: false, useRegex: false)])
        case "qwen2":
            preTokenizer = .sequence([.split(try SplitPattern(regex: GGUFPatterns.qwen2), .isolated, invert: false),
                                      .byteLevel(addPrefixSpace: false, useRegex: false)])
        default:
            throw TokenizerError.unsupported(file: g.path, what: "GGUF pre-tokenizer '\(pre)'", supported: "default, gpt2, smollm, starcoder, llama-bpe, qwen2")
        }
        let model = BPEModel(vocab: vocab, merges: merges, byteFallback: false, unkToken: nil, fuseUnk: false, ignoreMerges: false)
        let bos = g.value("tokenizer.ggml.bos_token_id")?.intValue
        let addBOS = g.value("tokenizer.ggml.add_bos_token")?.boolValue ?? false
        self.init(model: model, normalizer: nil, preTokenizer: preTokenizer, decoder: .byteLevel,
                  prefixIDs: addBOS ? [bos].compactMap { $0 } : [], suffixIDs: [], added: added, source: g.path)
        bosToken = bos.flatMap { $0 < tokens.count ? tokens[$0] : nil }
        eosToken = g.value("tokenizer.ggml.eos_token_id")?.intValue.flatMap { $0 < tokens.count ? tokens[$0] : nil }
        chatTemplate = g.value("tokenizer.chat_template")?.stringValue
    }
}

extension Tokenizer {
    /// A GGUF's SentencePiece vocabulary (tokenizer.ggml.model "llama": Llama 2, Mistral, Gemma, Phi-3) encoding as
    /// llama.cpp's SPM tokenizer does: spaces become "▁" (and one is put before the text, and after each special
    /// token, unless add_space_prefix is false); then, from the UTF-8 characters, the adjacent pair whose
    /// concatenation is a token of the highest score merges first (the leftmost of equal scores), and characters
    /// left outside the vocabulary become their <0xXX> byte tokens. Here that is BPE with one merge per way of
    /// splitting each token in two, ranked by the token's score; control and user-defined tokens are matched in
    /// the raw text first.
    static let maxSentencePieceToken = 1024
    static let maxSentencePieceWork = 1_000_000_000

    convenience init(sentencePieceGGUF g: GGUFFile) throws {
        guard let tokens = g.value("tokenizer.ggml.tokens")?.arrayValue?.compactMap(\.stringValue), !tokens.isEmpty else {
            throw TokenizerError.invalidFile(file: g.path, reason: "no tokenizer.ggml.tokens")
        }
        let scores = g.value("tokenizer.ggml.scores")?.arrayValue?.compactMap(\.doubleValue) ?? []
        let types = g.value("tokenizer.ggml.token_type")?.arrayValue?.compactMap(\.intValue) ?? []
        guard scores.count == tokens.count, types.count == tokens.count else {
            throw TokenizerError.invalidFile(file: g.path, reason: "tokenizer.ggml.scores and token_type must have one entry per token (\(tokens.count))")
        }
        // A NaN score has no rank (NaN equals nothing): found by the fuzzer, it trapped below.
        if let bad = scores.firstIndex(where: { !$0.isFinite }) {
            throw TokenizerError.invalidFile(file: g.path, reason: "tokenizer.ggml.scores: the score of token \(bad) is not a finite number")
        }
        // Rank of each score, highest first; equal scores share a rank (the heap then takes the leftmost).
        let distinct = Array(Set(scores)).sorted(by: >)
        let rankOf = Dictionary(uniqueKeysWithValues: distinct.enumerated().map { ($1, $0) })
        var ids: [TokenBytes: Int] = [:]
        for (i, t) in tokens.enumerated() where ids[TokenBytes(t)] == nil { ids[TokenBytes(t)] = i }
        // Each token of L characters is tried at its L - 1 splits, each built and looked up: L^2 work. A hostile
        // vocabulary with a token of 100,000 characters had not finished after 120 s; real ones stay far below both
        // bounds (Llama 2's and Phi-3's 32,000 tokens: at most 16 characters, about 1.0e6 in all).
        var work = 0
        for (i, t) in tokens.enumerated() where types[i] != 6 {
            let l = t.unicodeScalars.count
            guard l <= Self.maxSentencePieceToken else {
                throw TokenizerError.invalidFile(file: g.path, reason: "token \(i) has \(l) characters; a SentencePiece token may have at most \(Self.maxSentencePieceToken)")
            }
            work += l * l
            guard work <= Self.maxSentencePieceWork else {
                throw TokenizerError.invalidFile(file: g.path, reason: "the tokens up to token \(i) hold too many characters to build merges from (the sum of their squared lengths passes \(Self.maxSentencePieceWork))")
            }
        }
        var merges: [(rank: Int, left: String, right: String)] = []
        for (i, t) in tokens.enumerated() where types[i] != 6 {  // byte tokens are never formed from text
            let scalars = Array(t.unicodeScalars)
            guard scalars.count > 1 else { continue }
            for k in 1..<scalars.count {
                var left = "", right = ""
                left.unicodeScalars.append(contentsOf: scalars[..<k])
                right.unicodeScalars.append(contentsOf: scalars[k...])
                if ids[TokenBytes(left)] != nil, ids[TokenBytes(right)] != nil { merges.append((rankOf[scores[i]]!, left, right)) }
            }
        }
        merges.sort { $0.rank < $1.rank }
        let unk = types.firstIndex(of: 2).map { tokens[$0] }
        let model = BPEModel(vocab: tokens.enumerated().map { ($1, $0) }, merges: merges.map { ($0.left, $0.right) }, byteFallback: true,
                             unkToken: unk, fuseUnk: false, ignoreMerges: false, mergeRanks: merges.map(\.rank))
        var added: [AddedToken] = []
        for (i, t) in types.enumerated() where t == 3 || t == 4 {
            added.append(AddedToken(id: i, content: tokens[i], special: t == 3, lstrip: false, rstrip: false, singleWord: false, normalized: false))
        }
        let prefix = g.value("tokenizer.ggml.add_space_prefix")?.boolValue ?? true
        let space = Normalizer.replace(pattern: " ", content: "\u{2581}")
        let decoder: TokenDecoder = .sequence([.replace(pattern: "\u{2581}", content: " "), .byteFallback, .fuse]
                                              + (prefix ? [.strip(content: " ", start: 1, stop: 0)] : []))
        let bos = g.value("tokenizer.ggml.bos_token_id")?.intValue, eos = g.value("tokenizer.ggml.eos_token_id")?.intValue
        let addBOS = g.value("tokenizer.ggml.add_bos_token")?.boolValue ?? true
        let addEOS = g.value("tokenizer.ggml.add_eos_token")?.boolValue ?? false
        self.init(model: model, normalizer: prefix ? .sequence([.prepend("\u{2581}"), space]) : space, preTokenizer: nil, decoder: decoder,
                  prefixIDs: addBOS ? [bos].compactMap { $0 } : [], suffixIDs: addEOS ? [eos].compactMap { $0 } : [], added: added, source: g.path)
        bosToken = bos.flatMap { $0 < tokens.count ? tokens[$0] : nil }
        eosToken = eos.flatMap { $0 < tokens.count ? tokens[$0] : nil }
        chatTemplate = g.value("tokenizer.chat_template")?.stringValue
    }
}

enum GGUFPatterns {
    static let llama3 = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
    static let qwen2 = #"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"#
}
