// A Hugging Face tokenizer (tokenizer.json with a BPE model, byte-level or sentencepiece-style), or the
// tokenizer stored in a GGUF file's metadata. Encoding: added tokens are cut out of the raw text first,
// then each remaining section is normalized, pre-tokenized and BPE-encoded; the post-processor adds
// special tokens on request. Decoding runs the decoder chain; StreamingDecoder emits text as it becomes
// complete UTF-8.
import Foundation
import QLoRACore
import QLoRAFormats

public final class Tokenizer: @unchecked Sendable {
    public struct AddedToken: Sendable {
        public let id: Int
        public let content: String
        public let special: Bool
        let lstrip: Bool
        let rstrip: Bool
        let singleWord: Bool
        /// Matched in the normalized text, by its normalized content (e.g. Llama 2's "<s>" as "▁<s>").
        let normalized: Bool
    }

    let model: BPEModel
    let normalizer: Normalizer?
    let preTokenizer: PreTokenizer?
    let decoder: TokenDecoder?
    /// Ids added before / after a sequence by the post-processor.
    let prefixIDs: [Int]
    let suffixIDs: [Int]
    public let addedTokens: [AddedToken]
    private let addedByContent: [TokenBytes: AddedToken]
    private let addedByID: [Int: AddedToken]
    /// Added tokens matched in the raw text, longest first.
    private let rawAdded: [(AddedToken, [UInt8])]
    /// Added tokens matched after normalization, by their normalized content, longest first.
    private let normalizedAdded: [(AddedToken, [UInt8])]
    private var cache: [String: [Int]] = [:]
    private let cacheLock = NSLock()

    /// Special-token strings and chat template from tokenizer_config.json or GGUF metadata.
    public var bosToken: String?
    public var eosToken: String?
    public var chatTemplate: String?
    /// Where the tokenizer came from.
    public let source: String

    public var vocabularySize: Int { max(model.idToToken.count, (addedTokens.map(\.id).max() ?? -1) + 1) }

    init(model: BPEModel, normalizer: Normalizer?, preTokenizer: PreTokenizer?, decoder: TokenDecoder?,
         prefixIDs: [Int], suffixIDs: [Int], added: [AddedToken], source: String) {
        self.model = model
        self.normalizer = normalizer
        self.preTokenizer = preTokenizer
        self.decoder = decoder
        self.prefixIDs = prefixIDs
        self.suffixIDs = suffixIDs
        addedTokens = added
        var byContent: [TokenBytes: AddedToken] = [:]
        var byID: [Int: AddedToken] = [:]
        for a in added {
            byContent[TokenBytes(a.content)] = a
            byID[a.id] = a
        }
        addedByContent = byContent
        addedByID = byID
        let usable = added.filter { !$0.content.isEmpty }
        rawAdded = usable.filter { !$0.normalized || normalizer == nil }.map { ($0, Array($0.content.utf8)) }
            .sorted { $0.1.count > $1.1.count }
        normalizedAdded = usable.filter { $0.normalized && normalizer != nil }.map { ($0, Array(normalizer!.apply($0.content).utf8)) }
            .sorted { $0.1.count > $1.1.count }
        self.source = source
    }

    // MARK: Lookup

    public func id(of token: String) -> Int? { addedByContent[TokenBytes(token)]?.id ?? model.id(of: token) }

    public func token(of id: Int) -> String? {
        if let a = addedByID[id] { return a.normalized ? (normalizer?.apply(a.content) ?? a.content) : a.content }
        return id >= 0 && id < model.idToToken.count ? model.idToToken[id] : nil
    }

    public var bosTokenID: Int? { bosToken.flatMap(id(of:)) }
    public var eosTokenID: Int? { eosToken.flatMap(id(of:)) }

    public func isSpecial(_ id: Int) -> Bool { addedByID[id]?.special ?? false }

    // MARK: Encoding

    /// Token ids of `text`; `addSpecialTokens` applies the post-processor (e.g. a leading BOS).
    /// As in tokenizers: added tokens are cut from the raw text, each remaining section is normalized,
    /// normalized added tokens are cut from that, and the rest is pre-tokenized and BPE-encoded.
    public func encode(_ text: String, addSpecialTokens: Bool = false) -> [Int] {
        var ids: [Int] = []
        var sectionIndex = 0
        for section in Self.split(Array(text.utf8), on: rawAdded) {
            switch section {
            case let .added(token):
                ids.append(token.id)
            case let .text(raw):
                let normalized = normalizer.map { $0.apply(String(decoding: raw, as: UTF8.self)) }
                let pieces = normalized.map { Self.split(Array($0.utf8), on: normalizedAdded) } ?? [.text(raw)]
                for piece in pieces {
                    switch piece {
                    case let .added(token): ids.append(token.id)
                    case let .text(bytes):
                        let s = String(decoding: bytes, as: UTF8.self)
                        let words = preTokenizer?.apply([(s, sectionIndex == 0)]) ?? [(s, sectionIndex == 0)]
                        for (word, _) in words { ids += encodeWord(word) }
                    }
                }
            }
            sectionIndex += 1
        }
        return addSpecialTokens ? prefixIDs + ids + suffixIDs : ids
    }

    private func encodeWord(_ word: String) -> [Int] {
        cacheLock.lock()
        if let hit = cache[word] { cacheLock.unlock(); return hit }
        cacheLock.unlock()
        let ids = model.encode(word)
        cacheLock.lock()
        if cache.count > 100_000 { cache.removeAll(keepingCapacity: true) }
        cache[word] = ids
        cacheLock.unlock()
        return ids
    }

    enum Section {
        case text([UInt8])
        case added(AddedToken)
    }

    /// Cuts added tokens (longest first at each position) out of UTF-8 text, honouring lstrip/rstrip
    /// and single_word.
    static func split(_ bytes: [UInt8], on tokens: [(AddedToken, [UInt8])]) -> [Section] {
        guard !tokens.isEmpty else { return bytes.isEmpty ? [] : [.text(bytes)] }
        var sections: [Section] = []
        var textStart = 0
        var i = 0
        func flush(_ end: Int) {
            if end > textStart { sections.append(.text(Array(bytes[textStart..<end]))) }
        }
        while i < bytes.count {
            var matched: (AddedToken, Int)?
            for (a, c) in tokens where c.count <= bytes.count - i && c.first == bytes[i] && bytes[i..<(i + c.count)].elementsEqual(c) {
                if a.singleWord {
                    let before = i == 0 || !isWordByte(bytes[i - 1])
                    let after = i + c.count == bytes.count || !isWordByte(bytes[i + c.count])
                    if !(before && after) { continue }
                }
                matched = (a, c.count)
                break
            }
            guard let (a, length) = matched else { i += 1; continue }
            var end = i
            if a.lstrip { while end > textStart && isSpaceByte(bytes[end - 1]) { end -= 1 } }
            flush(end)
            sections.append(.added(a))
            i += length
            if a.rstrip { while i < bytes.count && isSpaceByte(bytes[i]) { i += 1 } }
            textStart = i
        }
        flush(bytes.count)
        return sections
    }

    private static func isSpaceByte(_ b: UInt8) -> Bool { b == 0x20 || b == 0x09 || b == 0x0A || b == 0x0D }
    private static func isWordByte(_ b: UInt8) -> Bool { b >= 0x80 || (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x5F }

    // MARK: Decoding

    /// The text of `ids`; `skipSpecialTokens` leaves out special added tokens. Every token, added
    /// ones included, goes through the decoder chain together, as in tokenizers.
    /// The bytes `ids` decode to, before they are read as UTF-8 (a byte-level token may hold part of a character).
    public func decodedBytes(_ ids: [Int]) -> [UInt8] {
        let tokens: [Chunk] = ids.compactMap { token(of: $0).map(Chunk.text) }
        return (decoder?.apply(tokens) ?? tokens).flatMap(\.utf8)
    }

    public func decode(_ ids: [Int], skipSpecialTokens: Bool = false) -> String {
        var tokens: [Chunk] = []
        tokens.reserveCapacity(ids.count)
        for id in ids {
            if skipSpecialTokens && isSpecial(id) { continue }
            if let t = token(of: id) { tokens.append(.text(t)) }
        }
        let decoded = decoder?.apply(tokens) ?? tokens
        return String(decoding: decoded.flatMap(\.utf8), as: UTF8.self)
    }
}

/// Decodes ids one at a time and returns only text that is complete (no split UTF-8 character).
/// Works on bytes, so a token that extends a grapheme cluster (a combining mark, the rest of an emoji
/// ZWJ sequence) is emitted as just its new scalars.
public final class StreamingDecoder {
    let tokenizer: Tokenizer
    let skipSpecialTokens: Bool
    private var ids: [Int] = []
    private var emitted: [UInt8] = []

    public init(tokenizer: Tokenizer, skipSpecialTokens: Bool = true) {
        self.tokenizer = tokenizer
        self.skipSpecialTokens = skipSpecialTokens
    }

    /// Adds a token; returns the new complete text (empty while a character is incomplete).
    public func add(_ id: Int) -> String {
        ids.append(id)
        let text = Array(tokenizer.decode(ids, skipSpecialTokens: skipSpecialTokens).utf8)
        // U+FFFD at the end: an incomplete UTF-8 sequence, wait for more bytes.
        if text.count >= 3 && text[(text.count - 3)...] == [0xEF, 0xBF, 0xBD] { return "" }
        var common = 0
        while common < min(text.count, emitted.count) && text[common] == emitted[common] { common += 1 }
        let new = String(decoding: text[common...], as: UTF8.self)
        emitted = text
        return new
    }

    /// Ends the stream: the text held back, if any (a U+FFFD at the end that no later token completed: an
    /// incomplete character, or a real replacement character), so that the whole stream is `decode(ids)`.
    public func finish() -> String {
        let text = Array(tokenizer.decode(ids, skipSpecialTokens: skipSpecialTokens).utf8)
        var common = 0
        while common < min(text.count, emitted.count) && text[common] == emitted[common] { common += 1 }
        let rest = String(decoding: text[common...], as: UTF8.self)
        emitted = text
        return rest
    }

    /// Everything emitted so far.
    public var text: String { String(decoding: emitted, as: UTF8.self) }
}
