// JSON output by constrained decoding (OpenAI's response_format {"type": "json_object"}): at each step the tokens whose
// bytes cannot continue a valid JSON object are masked out before sampling, and once the object is closed only an end
// token may follow, so a reply that ends by itself always parses. `JSONPrefix` is the byte-level recognizer of RFC 8259
// text whose top level is an object; `TokenConstraint` applies it (or JSONSchemaMatcher, for json_schema) to a
// tokenizer's vocabulary.
import Foundation
import QLoRACore
import QLoRATokenizer

/// JSON's lexical pieces, shared by the json_object recognizer (JSONPrefix) and the json_schema one (JSONSchemaMatcher).
enum JSONLex {
    static func isSpace(_ b: UInt8) -> Bool { b == 0x20 || b == 0x0A || b == 0x0D || b == 0x09 }
    static func isDigit(_ b: UInt8) -> Bool { b >= 0x30 && b <= 0x39 }
    static func isHex(_ b: UInt8) -> Bool { isDigit(b) || (b >= 0x41 && b <= 0x46) || (b >= 0x61 && b <= 0x66) }

    /// After a backslash in a string: the escapes of one byte (`u` starts four hex digits instead).
    static func isSimpleEscape(_ b: UInt8) -> Bool {
        switch b {
        case UInt8(ascii: "\""), UInt8(ascii: "\\"), UInt8(ascii: "/"), UInt8(ascii: "b"), UInt8(ascii: "f"), UInt8(ascii: "n"),
             UInt8(ascii: "r"), UInt8(ascii: "t"):
            return true
        default: return false
        }
    }

    /// Where a number is: after its sign, a leading zero, integer digits, the point, fraction digits, the exponent's
    /// letter, its sign, its digits.
    enum NumberState: Hashable {
        case minus, zero, integer, point, fraction, exponent, exponentSign, exponentDigits

        /// The state after byte b, or nil when b cannot continue the number (`integer`: no point and no exponent).
        func next(_ b: UInt8, integer: Bool = false) -> NumberState? {
            let digit = JSONLex.isDigit(b), e = b == UInt8(ascii: "e") || b == UInt8(ascii: "E")
            switch self {
            case .minus: return b == UInt8(ascii: "0") ? .zero : digit ? .integer : nil
            case .zero, .integer:
                if digit { return self == .integer ? .integer : nil }
                if integer { return nil }
                return b == UInt8(ascii: ".") ? .point : e ? .exponent : nil
            case .point: return digit ? .fraction : nil
            case .fraction: return digit ? .fraction : e ? .exponent : nil
            case .exponent: return b == UInt8(ascii: "+") || b == UInt8(ascii: "-") ? .exponentSign : digit ? .exponentDigits : nil
            case .exponentSign, .exponentDigits: return digit ? .exponentDigits : nil
            }
        }

        /// Whether the number may end here (the next byte then belongs to what follows it).
        var mayEnd: Bool {
            switch self {
            case .zero, .integer, .fraction, .exponentDigits: return true
            default: return false
            }
        }
    }
}

/// Whether a byte sequence is the beginning of a JSON object (RFC 8259), fed one byte at a time.
public struct JSONPrefix: Sendable, Hashable {
    enum State: Hashable {
        case start                      // before the top-level object: whitespace or '{'
        case value                      // a value must come: after ':' or ','-in-array
        case keyOrClose                 // after '{': a key or '}'
        case key                        // after ',' in an object: a key
        case colon                      // after a key
        case valueOrClose               // after '[': a value or ']'
        case commaOrClose               // after a value inside a container
        case string(key: Bool)
        case escape(key: Bool)
        case unicode(key: Bool, left: Int)
        case number(NumberState)
        case literal(rest: [UInt8])
        case done                       // the top-level object is closed: whitespace only
    }

    typealias NumberState = JSONLex.NumberState

    var state = State.start
    /// Open containers, innermost last: '{' or '['.
    var stack: [UInt8] = []

    public init() {}

    /// Whether the top-level object has been closed.
    public var isComplete: Bool { state == .done }

    /// JSON's whitespace.
    public static func isSpace(_ b: UInt8) -> Bool { JSONLex.isSpace(b) }

    /// A value has ended: what may follow it.
    mutating func endValue() { state = stack.isEmpty ? .done : .commaOrClose }

    /// The start of a value at `b`, or false.
    mutating func startValue(_ b: UInt8) -> Bool {
        switch b {
        case UInt8(ascii: "{"): stack.append(b); state = .keyOrClose
        case UInt8(ascii: "["): stack.append(b); state = .valueOrClose
        case UInt8(ascii: "\""): state = .string(key: false)
        case UInt8(ascii: "-"): state = .number(.minus)
        case UInt8(ascii: "0"): state = .number(.zero)
        case UInt8(ascii: "1")...UInt8(ascii: "9"): state = .number(.integer)
        case UInt8(ascii: "t"): state = .literal(rest: Array("rue".utf8))
        case UInt8(ascii: "f"): state = .literal(rest: Array("alse".utf8))
        case UInt8(ascii: "n"): state = .literal(rest: Array("ull".utf8))
        default: return false
        }
        return true
    }

    /// Closes the innermost container with `b` if it matches, or false.
    mutating func close(_ b: UInt8) -> Bool {
        guard let open = stack.last, (open == UInt8(ascii: "{") && b == UInt8(ascii: "}")) || (open == UInt8(ascii: "[") && b == UInt8(ascii: "]")) else { return false }
        stack.removeLast()
        endValue()
        return true
    }

    /// Takes one byte; false (and the state unchanged in meaning: the caller drops this copy) when it cannot continue.
    public mutating func feed(_ b: UInt8) -> Bool {
        switch state {
        case .start:
            if JSONLex.isSpace(b) { return true }
            guard b == UInt8(ascii: "{") else { return false }
            stack.append(b)
            state = .keyOrClose
            return true
        case .done:
            return JSONLex.isSpace(b)
        case .value:
            return JSONLex.isSpace(b) || startValue(b)
        case .keyOrClose:
            if JSONLex.isSpace(b) { return true }
            if b == UInt8(ascii: "\"") { state = .string(key: true); return true }
            return close(b)
        case .key:
            if JSONLex.isSpace(b) { return true }
            guard b == UInt8(ascii: "\"") else { return false }
            state = .string(key: true)
            return true
        case .colon:
            if JSONLex.isSpace(b) { return true }
            guard b == UInt8(ascii: ":") else { return false }
            state = .value
            return true
        case .valueOrClose:
            if JSONLex.isSpace(b) { return true }
            return startValue(b) || close(b)
        case .commaOrClose:
            if JSONLex.isSpace(b) { return true }
            if b == UInt8(ascii: ",") { state = stack.last == UInt8(ascii: "{") ? .key : .value; return true }
            return close(b)
        case let .string(key):
            switch b {
            case UInt8(ascii: "\""):
                if key { state = .colon } else { endValue() }
                return true
            case UInt8(ascii: "\\"): state = .escape(key: key); return true
            default: return b >= 0x20
            }
        case let .escape(key):
            if JSONLex.isSimpleEscape(b) { state = .string(key: key); return true }
            if b == UInt8(ascii: "u") { state = .unicode(key: key, left: 4); return true }
            return false
        case let .unicode(key, left):
            guard JSONLex.isHex(b) else { return false }
            state = left == 1 ? .string(key: key) : .unicode(key: key, left: left - 1)
            return true
        case let .literal(rest):
            guard b == rest[0] else { return false }
            if rest.count == 1 { endValue() } else { state = .literal(rest: Array(rest.dropFirst())) }
            return true
        case let .number(n):
            if let next = n.next(b) { state = .number(next); return true }
            // The number ends here if it may; the byte then belongs to what follows it.
            guard n.mayEnd else { return false }
            endValue()
            return feed(b)
        }
    }
}

/// A byte-level recognizer of what a constrained reply may be: takes bytes while they can continue it.
public protocol ByteRecognizer: Hashable {
    /// Takes one byte; false when it cannot continue (the caller then drops this copy).
    mutating func feed(_ b: UInt8) -> Bool
    /// Whether the bytes so far are a whole reply (an end token may come).
    var isComplete: Bool { get }
}

extension ByteRecognizer {
    /// Takes `bytes`; false when they cannot continue (self is then left partway: use a copy).
    public mutating func feed<S: Sequence>(_ bytes: S) -> Bool where S.Element == UInt8 {
        for b in bytes where !feed(b) { return false }
        return true
    }
}

extension JSONPrefix: ByteRecognizer {}

/// A tokenizer's vocabulary under a ByteRecognizer: which tokens may come next, and the state after each one taken.
public final class TokenConstraint<Recognizer: ByteRecognizer>: @unchecked Sendable, VocabularyMask {
    /// Each token's bytes, or nil for tokens that never appear in constrained output (special and added ones, empty ones).
    let pieces: [[UInt8]?]
    /// The first token's bytes: a reply decoded on its own loses its first token's leading space under a
    /// SentencePiece decoder, so the first step sees the token decoded alone (the same as `pieces` elsewhere).
    let firstPieces: [[UInt8]?]
    public private(set) var state: Recognizer
    /// Whether a token has been taken.
    private var started = false

    public init(tokenizer: Tokenizer, vocabularySize: Int, start: Recognizer) {
        (pieces, firstPieces) = VocabularyPieces.pieces(tokenizer, vocabularySize)
        state = start
    }

    /// The tokens allowed in states met before (a reply inside a long string meets the same state at every step), at
    /// most `memoLimit` of them.
    private var memo: [Recognizer: [UInt64]] = [:]
    static var memoLimit: Int { 256 }

    /// Sets every logit whose token cannot continue the reply to -infinity; once it is complete, every token but the
    /// end tokens `eos` (which only a complete reply may take). Returns false when no token is left (the caller ends
    /// the reply).
    public func mask(_ logits: inout [Float], eos: Set<Int>) -> Bool {
        // One lookup (hashing a schema matcher walks its whole stack).
        let known = started ? memo[state] : nil
        let bits = known ?? allowedTokens(count: logits.count, eos: eos)
        if started && known == nil {
            if memo.count >= Self.memoLimit { memo.removeAll(keepingCapacity: true) }
            memo[state] = bits
        }
        var any = false
        for id in logits.indices {
            if bits[id >> 6] & (1 << UInt64(id & 63)) != 0 { any = true } else { logits[id] = -.infinity }
        }
        return any
    }

    /// A bit per token: whether it may come next in this state.
    func allowedTokens(count: Int, eos: Set<Int>) -> [UInt64] {
        var bits = [UInt64](repeating: 0, count: (count + 63) / 64)
        let complete = state.isComplete
        let table = started ? pieces : firstPieces
        for id in 0..<count {
            var allowed = false
            if eos.contains(id) {
                allowed = complete
            } else if !complete, let bytes = table.indices.contains(id) ? table[id] : nil {
                // A loop of its own, not feed(bytes): this generic type runs unspecialized in its callers' modules, where the
                // Sequence-generic helper steps through iterator witnesses (measured: the first mask 56-58 ms against 33-44).
                var copy = state
                allowed = true
                for b in bytes where !copy.feed(b) { allowed = false; break }
            }
            if allowed { bits[id >> 6] |= 1 << UInt64(id & 63) }
        }
        return bits
    }

    /// Takes the chosen token (one `mask` allowed).
    public func advance(_ id: Int) {
        let table = started ? pieces : firstPieces
        started = true
        guard table.indices.contains(id), let bytes = table[id] else { return }
        for b in bytes where !state.feed(b) { return }
    }
}

/// JSON output (response_format json_object): any JSON object.
public typealias JSONConstraint = TokenConstraint<JSONPrefix>

extension TokenConstraint where Recognizer == JSONPrefix {
    public convenience init(tokenizer: Tokenizer, vocabularySize: Int) { self.init(tokenizer: tokenizer, vocabularySize: vocabularySize, start: JSONPrefix()) }
}

/// What the sampler asks of a constraint, whatever its recognizer.
public protocol VocabularyMask: AnyObject {
    func mask(_ logits: inout [Float], eos: Set<Int>) -> Bool
    func advance(_ id: Int)
}

/// The vocabulary's bytes, made once per tokenizer and size (a server's requests share them). Entries hold their
/// tokenizer, so that another one made later at the same address is not taken for it.
enum VocabularyPieces {
    /// Each token's bytes after other text, and decoded alone (a reply's first token), or nil for tokens that never
    /// appear in constrained output (special ones, empty ones).
    static func pieces(_ tokenizer: Tokenizer, _ size: Int) -> ([[UInt8]?], [[UInt8]?]) {
        if let known = cacheLock.withLock({ cache.first { $0.tokenizer === tokenizer && $0.size == size } }) { return (known.pieces, known.first) }
        // A token's bytes as they come out after other text: decoded after an anchor token and taken off it, because
        // a SentencePiece decoder drops the leading space of the first token (Metaspace's first-token rule, Llama 2's
        // Strip), which a reply's later tokens keep. A byte-fallback token (<0xC3>) is its byte, which decoded alone
        // would be U+FFFD.
        let anchor = tokenizer.encode("a").first
        let anchorBytes = anchor.map { tokenizer.decodedBytes([$0]) } ?? []
        var later: [[UInt8]?] = [], first: [[UInt8]?] = []
        later.reserveCapacity(size)
        first.reserveCapacity(size)
        for id in 0..<size {
            guard !tokenizer.isSpecial(id) else { later.append(nil); first.append(nil); continue }
            if let t = tokenizer.token(of: id), t.utf8.count == 6, t.hasPrefix("<0x"), t.hasSuffix(">"), let b = UInt8(t.dropFirst(3).prefix(2), radix: 16) {
                later.append([b])
                first.append([b])
                continue
            }
            let alone = tokenizer.decodedBytes([id])
            var bytes = alone
            if let anchor {
                let both = tokenizer.decodedBytes([anchor, id])
                if both.starts(with: anchorBytes) { bytes = Array(both.dropFirst(anchorBytes.count)) }
            }
            later.append(bytes.isEmpty ? nil : bytes)
            first.append(alone.isEmpty ? nil : alone)
        }
        cacheLock.withLock {
            cache.append((tokenizer, size, later, first))
            if cache.count > 8 { cache.removeFirst() }
        }
        return (later, first)
    }

    nonisolated(unsafe) static var cache: [(tokenizer: Tokenizer, size: Int, pieces: [[UInt8]?], first: [[UInt8]?])] = []
    static let cacheLock = NSLock()
}
