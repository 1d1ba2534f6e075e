// The stages of a Hugging Face tokenizer.json around the BPE model, each as its file describes it:
// normalizers (NFC, NFKC, Prepend, Replace, Lowercase, Strip, Sequence), pre-tokenizers (ByteLevel,
// Split, Digits, Metaspace, Whitespace, Punctuation, Sequence) and decoders (ByteLevel, Replace,
// ByteFallback, Fuse, Strip, Metaspace, Sequence). Semantics follow huggingface/tokenizers.
import Foundation
import QLoRACore

// MARK: - Literal replacement

extension String {
    /// Replaces every occurrence of `target` by `replacement`, comparing exact scalars (Foundation's
    /// replacingOccurrences treats a space followed by a combining mark as one unit and misses it).
    func replacingScalars(_ target: String, with replacement: String) -> String {
        let t = Array(target.unicodeScalars)
        guard !t.isEmpty else { return self }
        let source = Array(unicodeScalars)
        var out = String.UnicodeScalarView()
        var i = 0
        while i < source.count {
            if source[i] == t[0], i + t.count <= source.count, Array(source[i..<(i + t.count)]) == t {
                out.append(contentsOf: replacement.unicodeScalars)
                i += t.count
            } else {
                out.append(source[i])
                i += 1
            }
        }
        return String(out)
    }
}

// MARK: - Normalizers

indirect enum Normalizer {
    case nfc, nfkc, nfd, nfkd, lowercase
    case prepend(String)
    case replace(pattern: String, content: String)
    case strip(left: Bool, right: Bool)
    case sequence([Normalizer])

    func apply(_ s: String) -> String {
        switch self {
        case .nfc: return s.precomposedStringWithCanonicalMapping
        case .nfkc: return s.precomposedStringWithCompatibilityMapping
        case .nfd: return s.decomposedStringWithCanonicalMapping
        case .nfkd: return s.decomposedStringWithCompatibilityMapping
        case .lowercase: return s.lowercased()
        case let .prepend(p): return s.isEmpty ? s : p + s
        case let .replace(pattern, content): return s.replacingScalars(pattern, with: content)
        case let .strip(left, right):
            var t = Substring(s)
            if left { while let f = t.first, f.isWhitespace { t.removeFirst() } }
            if right { while let l = t.last, l.isWhitespace { t.removeLast() } }
            return String(t)
        case let .sequence(list): return list.reduce(s) { $1.apply($0) }
        }
    }
}

// MARK: - Pre-tokenizers

/// How a Split keeps the pieces its pattern matches.
enum SplitBehavior: String {
    case removed = "Removed", isolated = "Isolated", mergedWithPrevious = "MergedWithPrevious"
    case mergedWithNext = "MergedWithNext", contiguous = "Contiguous"
}

/// A pattern that finds (start, end) UTF-8 offset ranges in a string.
final class SplitPattern: @unchecked Sendable {
    let regex: Regex<AnyRegexOutput>?
    let literal: String?

    init(regex pattern: String) throws {
        regex = try Regex(pattern).matchingSemantics(.unicodeScalar)
        literal = nil
    }

    init(literal: String) {
        regex = nil
        self.literal = literal
    }

    func matches(in s: Substring) -> [Range<String.Index>] {
        if let regex { return s.matches(of: regex).map(\.range).filter { !$0.isEmpty } }
        guard let literal, !literal.isEmpty else { return [] }
        return s.ranges(of: literal)
    }
}

indirect enum PreTokenizer {
    /// Byte-level: optionally split with GPT-2's pattern, then map bytes to characters.
    case byteLevel(addPrefixSpace: Bool, useRegex: Bool)
    case split(SplitPattern, SplitBehavior, invert: Bool)
    case digits(individual: Bool)
    case metaspace(replacement: String, prependScheme: String, split: Bool)
    case whitespaceSplit
    case sequence([PreTokenizer])

    static let gpt2Pattern = #"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"#
    static let gpt2Split = try! SplitPattern(regex: gpt2Pattern)

    /// Splits every piece further. `first` tells whether a piece starts the text (Metaspace "first").
    func apply(_ pieces: [(String, Bool)]) -> [(String, Bool)] {
        switch self {
        case let .sequence(list):
            return list.reduce(pieces) { $1.apply($0) }
        case let .byteLevel(addPrefixSpace, useRegex):
            return pieces.flatMap { piece, first -> [(String, Bool)] in
                var text = piece
                if addPrefixSpace && !text.hasPrefix(" ") { text = " " + text }
                let parts = useRegex ? Self.splitPieces(Substring(text), Self.gpt2Split, .isolated, invert: false) : [Substring(text)]
                return parts.enumerated().map { (ByteLevel.encode($1), first && $0 == 0) }
            }
        case let .split(pattern, behavior, invert):
            return pieces.flatMap { piece, first in
                Self.splitPieces(Substring(piece), pattern, behavior, invert: invert).enumerated().map { (String($1), first && $0 == 0) }
            }
        case let .digits(individual):
            return pieces.flatMap { piece, first in
                Self.splitDigits(piece, individual: individual).enumerated().map { ($1, first && $0 == 0) }
            }
        case let .metaspace(replacement, scheme, split):
            return pieces.flatMap { piece, first -> [(String, Bool)] in
                var text = piece.replacingScalars(" ", with: replacement)
                if scheme == "always" || (scheme == "first" && first) {
                    if !text.utf8.starts(with: replacement.utf8) { text = replacement + text }
                }
                guard split else { return [(text, first)] }
                // Split before each replacement scalar (it starts the next piece).
                let mark = replacement.unicodeScalars.first
                var out: [String] = []
                var current = String.UnicodeScalarView()
                for u in text.unicodeScalars {
                    if u == mark && !current.isEmpty { out.append(String(current)); current = String.UnicodeScalarView() }
                    current.append(u)
                }
                if !current.isEmpty { out.append(String(current)) }
                return out.enumerated().map { ($1, first && $0 == 0) }
            }
        case .whitespaceSplit:
            return pieces.flatMap { piece, first in
                piece.split(whereSeparator: { $0.isWhitespace }).enumerated().map { (String($1), first && $0 == 0) }
            }
        }
    }

    static func splitPieces(_ s: Substring, _ pattern: SplitPattern, _ behavior: SplitBehavior, invert: Bool) -> [Substring] {
        let matches = pattern.matches(in: s)
        // (range, isMatch) covering s.
        var spans: [(Range<String.Index>, Bool)] = []
        var cursor = s.startIndex
        for m in matches {
            if cursor < m.lowerBound { spans.append((cursor..<m.lowerBound, false)) }
            spans.append((m, true))
            cursor = m.upperBound
        }
        if cursor < s.endIndex { spans.append((cursor..<s.endIndex, false)) }
        if invert { spans = spans.map { ($0.0, !$0.1) } }
        var out: [Substring] = []
        switch behavior {
        case .removed:
            out = spans.filter { !$0.1 }.map { s[$0.0] }
        case .isolated:
            out = spans.map { s[$0.0] }
        case .contiguous:
            var i = 0
            while i < spans.count {
                var r = spans[i].0
                while i + 1 < spans.count && spans[i + 1].1 == spans[i].1 { i += 1; r = r.lowerBound..<spans[i].0.upperBound }
                out.append(s[r])
                i += 1
            }
        case .mergedWithPrevious:
            var current: Range<String.Index>?
            for (r, isMatch) in spans {
                if isMatch, let c = current { current = c.lowerBound..<r.upperBound } else {
                    if let c = current { out.append(s[c]) }
                    current = r
                }
            }
            if let c = current { out.append(s[c]) }
        case .mergedWithNext:
            var pending: Range<String.Index>?
            for (r, isMatch) in spans {
                if isMatch {
                    if let p = pending { out.append(s[p]) }
                    pending = r
                } else if let p = pending {
                    out.append(s[p.lowerBound..<r.upperBound]); pending = nil
                } else {
                    out.append(s[r])
                }
            }
            if let p = pending { out.append(s[p]) }
        }
        return out.filter { !$0.isEmpty }
    }

    static func splitDigits(_ s: String, individual: Bool) -> [String] {
        var out: [String] = []
        var current = String.UnicodeScalarView()
        var currentIsDigit = false
        for u in s.unicodeScalars {
            let isDigit = u.properties.generalCategory == .decimalNumber
            if isDigit && individual {
                if !current.isEmpty { out.append(String(current)); current = String.UnicodeScalarView() }
                out.append(String(u))
                currentIsDigit = false
                continue
            }
            if !current.isEmpty && isDigit != currentIsDigit { out.append(String(current)); current = String.UnicodeScalarView() }
            current.append(u)
            currentIsDigit = isDigit
        }
        if !current.isEmpty { out.append(String(current)) }
        return out
    }
}

// MARK: - Decoders

indirect enum TokenDecoder {
    case byteLevel
    case replace(pattern: String, content: String)
    case byteFallback
    case fuse
    case strip(content: Character, start: Int, stop: Int)
    case metaspace(replacement: String, prependScheme: String)
    case sequence([TokenDecoder])

    /// Decodes token strings into bytes-or-text chunks (bytes are joined and read as UTF-8 at the end).
    func apply(_ tokens: [Chunk]) -> [Chunk] {
        switch self {
        case let .sequence(list):
            return list.reduce(tokens) { $1.apply($0) }
        case .byteLevel:
            return tokens.map { c in
                if case let .text(t) = c { return .bytes(ByteLevel.decode(t)) }
                return c
            }
        case let .replace(pattern, content):
            return tokens.map { c in
                if case let .text(t) = c { return .text(t.replacingScalars(pattern, with: content)) }
                return c
            }
        case .byteFallback:
            return tokens.map { c in
                if case let .text(t) = c, t.count == 6, t.hasPrefix("<0x"), t.hasSuffix(">"),
                   let b = UInt8(t.dropFirst(3).dropLast(), radix: 16) {
                    return .bytes([b])
                }
                return c
            }
        case .fuse:
            return [Chunk.joined(tokens)]
        case let .strip(content, start, stop):
            let mark = content.unicodeScalars.first!
            return tokens.map { c in
                guard case let .text(t) = c else { return c }
                var u = Substring(t).unicodeScalars
                var n = 0
                while n < start, u.first == mark { u.removeFirst(); n += 1 }
                n = 0
                while n < stop, u.last == mark { u.removeLast(); n += 1 }
                return .text(String(u))
            }
        case let .metaspace(replacement, scheme):
            return tokens.enumerated().map { i, c in
                guard case let .text(t) = c else { return c }
                var s = t.replacingScalars(replacement, with: " ")
                if i == 0 && scheme != "never" && s.utf8.first == 0x20 { s = String(s.unicodeScalars.dropFirst()) }
                return .text(s)
            }
        }
    }
}

/// A decoded piece: text, or raw bytes still to be read as UTF-8 together with their neighbours.
enum Chunk {
    case text(String)
    case bytes([UInt8])

    var utf8: [UInt8] {
        switch self {
        case let .text(t): return Array(t.utf8)
        case let .bytes(b): return b
        }
    }

    /// Concatenates chunks; runs of bytes are read as UTF-8 (invalid sequences become U+FFFD).
    static func joined(_ chunks: [Chunk]) -> Chunk {
        .text(String(decoding: chunks.flatMap(\.utf8), as: UTF8.self))
    }
}
