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
    }

    let model: BPEModel
    let normalizer: Normalizer?
    let preTokenizer: PreTokenizer?
    let decoder: TokenDecoder?
    /// Ids added before / after a sequence by the post-processor.
    let prefixIDs: [Int]
    let suffixIDs: [Int]
    public let addedTokens: [AddedToken]
    private let addedByContent: [String: AddedToken]
    private let addedSorted: [AddedToken]
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
        var byContent: [String: AddedToken] = [:]
        for a in added { byContent[a.content] = a }
        addedByContent = byContent
        addedSorted = added.filter { !$0.content.isEmpty }.sorted { $0.content.utf8.count > $1.content.utf8.count }
        self.source = source
    }

    // MARK: Lookup

    public func id(of token: String) -> Int? { addedByContent[token]?.id ?? model.vocab[token] }

    public func token(of id: Int) -> String? {
        if let a = addedTokens.first(where: { $0.id == id }) { return a.content }
        return id >= 0 && id < model.idToToken.count ? model.idToToken[id] : nil
    }

    public var bosTokenID: Int? { bosToken.flatMap(id(of:)) }
    public var eosTokenID: Int? { eosToken.flatMap(id(of:)) }

    public func isSpecial(_ id: Int) -> Bool { addedTokens.contains { $0.id == id && $0.special } }

    // MARK: Encoding

    /// Token ids of `text`; `addSpecialTokens` applies the post-processor (e.g. a leading BOS).
    public func encode(_ text: String, addSpecialTokens: Bool = false) -> [Int] {
        var ids: [Int] = []
        var sectionIndex = 0
        for section in splitOnAddedTokens(text) {
            switch section {
            case let .added(token):
                ids.append(token.id)
            case let .text(t):
                var s = t
                if let normalizer { s = normalizer.apply(s) }
                let pieces = preTokenizer?.apply([(s, sectionIndex == 0)]) ?? [(s, sectionIndex == 0)]
                for (piece, _) in pieces { ids += encodeWord(piece) }
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
        case text(String)
        case added(AddedToken)
    }

    /// Cuts added tokens (longest first at each position) out of the text, honouring lstrip/rstrip.
    func splitOnAddedTokens(_ text: String) -> [Section] {
        guard !addedSorted.isEmpty else { return text.isEmpty ? [] : [.text(text)] }
        let bytes = Array(text.utf8)
        var sections: [Section] = []
        var textStart = 0
        var i = 0
        func flush(_ end: Int) {
            if end > textStart { sections.append(.text(String(decoding: bytes[textStart..<end], as: UTF8.self))) }
        }
        while i < bytes.count {
            var matched: AddedToken?
            for a in addedSorted {
                let c = a.content.utf8
                if c.count <= bytes.count - i && bytes[i..<(i + c.count)].elementsEqual(c) {
                    if a.singleWord {
                        let before = i == 0 || !isWordByte(bytes[i - 1])
                        let after = i + c.count == bytes.count || !isWordByte(bytes[i + c.count])
                        if !(before && after) { continue }
                    }
                    matched = a
                    break
                }
            }
            guard let a = matched else { i += 1; continue }
            var end = i
            if a.lstrip { while end > textStart && isSpaceByte(bytes[end - 1]) { end -= 1 } }
            flush(end)
            sections.append(.added(a))
            i += a.content.utf8.count
            if a.rstrip { while i < bytes.count && isSpaceByte(bytes[i]) { i += 1 } }
            textStart = i
        }
        flush(bytes.count)
        return sections
    }

    private func isSpaceByte(_ b: UInt8) -> Bool { b == 0x20 || b == 0x09 || b == 0x0A || b == 0x0D }
    private func isWordByte(_ b: UInt8) -> Bool { b >= 0x80 || (b >= 0x30 && b <= 0x39) || (b >= 0x41 && b <= 0x5A) || (b >= 0x61 && b <= 0x7A) || b == 0x5F }

    // MARK: Decoding

    /// The text of `ids`; `skipSpecialTokens` leaves out special added tokens.
    public func decode(_ ids: [Int], skipSpecialTokens: Bool = false) -> String {
        var chunks: [Chunk] = []
        var pending: [String] = []
        func flushPending() {
            guard !pending.isEmpty else { return }
            let decoded = decoder?.apply(pending.map { .text($0) }) ?? pending.map { .text($0) }
            chunks.append(Chunk.joined(decoded))
            pending = []
        }
        for id in ids {
            if let a = addedTokens.first(where: { $0.id == id }), a.special || model.vocab[a.content] == nil {
                if skipSpecialTokens && a.special { continue }
                flushPending()
                chunks.append(.text(a.content))
            } else if let t = token(of: id) {
                pending.append(t)
            }
        }
        flushPending()
        return String(decoding: chunks.flatMap(\.utf8), as: UTF8.self)
    }
}

/// Decodes ids one at a time and returns only text that is complete (no split UTF-8 character).
public final class StreamingDecoder {
    let tokenizer: Tokenizer
    let skipSpecialTokens: Bool
    private var ids: [Int] = []
    private var emitted = ""

    public init(tokenizer: Tokenizer, skipSpecialTokens: Bool = true) {
        self.tokenizer = tokenizer
        self.skipSpecialTokens = skipSpecialTokens
    }

    /// Adds a token; returns the new complete text (possibly empty while a character is incomplete).
    public func add(_ id: Int) -> String {
        ids.append(id)
        let text = tokenizer.decode(ids, skipSpecialTokens: skipSpecialTokens)
        if text.hasSuffix("\u{FFFD}") { return "" }  // an incomplete UTF-8 sequence: wait for more
        guard text.hasPrefix(emitted) else {
            // A decoder that changes earlier text (rare): emit the difference from the common prefix.
            let common = text.commonPrefix(with: emitted)
            emitted = text
            return String(text.dropFirst(common.count))
        }
        let new = String(text.dropFirst(emitted.count))
        emitted = text
        return new
    }

    /// Everything emitted so far.
    public var text: String { emitted }
}
