// A strict JSON reader and writer (RFC 8259) for headers and configs that come from untrusted files:
// object keys keep their order, duplicate keys are an error, nesting depth is capped, and every error
// carries the byte offset where parsing stopped.

/// A parsed JSON value. Objects keep their key order.
public enum JSONValue: Equatable, Sendable {
    case null
    case bool(Bool)
    /// A number with its original text (so integers beyond 2^53 survive).
    case number(String)
    case string(String)
    case array([JSONValue])
    case object([(String, JSONValue)])

    public static func == (a: JSONValue, b: JSONValue) -> Bool {
        switch (a, b) {
        case (.null, .null): return true
        case let (.bool(x), .bool(y)): return x == y
        case let (.number(x), .number(y)): return x == y || Double(x) == Double(y)
        case let (.string(x), .string(y)): return x == y
        case let (.array(x), .array(y)): return x == y
        case let (.object(x), .object(y)):
            return x.count == y.count && zip(x, y).allSatisfy { $0.0 == $1.0 && $0.1 == $1.1 }
        default: return false
        }
    }

    public static func int(_ v: Int) -> JSONValue { .number(String(v)) }
    public static func double(_ v: Double) -> JSONValue {
        if v.isFinite && v == v.rounded() && abs(v) < 1e15 { return .number(String(Int(v)) + ".0") }
        return .number("\(v)")
    }

    public subscript(key: String) -> JSONValue? {
        if case let .object(entries) = self { return entries.first { $0.0 == key }?.1 }
        return nil
    }

    public var stringValue: String? { if case let .string(s) = self { return s }; return nil }
    public var boolValue: Bool? { if case let .bool(b) = self { return b }; return nil }
    public var arrayValue: [JSONValue]? { if case let .array(a) = self { return a }; return nil }
    public var objectValue: [(String, JSONValue)]? { if case let .object(o) = self { return o }; return nil }
    public var doubleValue: Double? { if case let .number(n) = self { return Double(n) }; return nil }

    /// The value as an exact integer (no fraction or exponent), or nil.
    public var intValue: Int? {
        guard case let .number(n) = self else { return nil }
        if let i = Int(n) { return i }
        if let d = Double(n), d == d.rounded(), abs(d) < 9.0e15 { return Int(d) }
        return nil
    }

    /// Returns a copy of this object with `key` set (replaced in place or appended).
    public func setting(_ key: String, to value: JSONValue) -> JSONValue {
        guard case var .object(entries) = self else { return self }
        if let i = entries.firstIndex(where: { $0.0 == key }) { entries[i].1 = value } else { entries.append((key, value)) }
        return .object(entries)
    }
}

/// Why a JSON text was rejected, with the byte offset.
public struct JSONError: Error, CustomStringConvertible, Sendable {
    public let message: String
    public let offset: Int
    public var description: String { "\(message) at byte \(offset)" }
}

public enum JSON {
    public static let maxDepth = 128

    /// The non-blank lines of a JSON-lines file, numbered from 1: (line number, bytes of the line without
    /// its newline). A blank line (spaces, tabs, a carriage return) is skipped but still counted.
    /// `lines` of the file up to its last newline: a last line without one (a write cut short, or one
    /// still being written) is left out.
    public static func completeLines(_ bytes: [UInt8]) -> [(line: Int, bytes: ArraySlice<UInt8>)] {
        guard bytes.last != UInt8(ascii: "\n") else { return lines(bytes) }
        return lines(Array(bytes[..<((bytes.lastIndex(of: UInt8(ascii: "\n")).map { $0 + 1 }) ?? 0)]))
    }

    public static func lines(_ bytes: [UInt8]) -> [(line: Int, bytes: ArraySlice<UInt8>)] {
        var out: [(line: Int, bytes: ArraySlice<UInt8>)] = []
        var number = 0, start = 0
        for i in 0...bytes.count where i == bytes.count || bytes[i] == 0x0A {
            number += 1
            let line = bytes[start..<i]
            start = i + 1
            if !line.allSatisfy({ $0 == 0x20 || $0 == 0x0D || $0 == 0x09 }) { out.append((number, line)) }
        }
        return out
    }

    /// Parses one JSON value that must fill the whole input (trailing whitespace allowed).
    public static func parse(_ bytes: UnsafeRawBufferPointer) throws -> JSONValue {
        var parser = Parser(bytes: bytes)
        parser.skipWhitespace()
        let value = try parser.parseValue(depth: 0)
        parser.skipWhitespace()
        if parser.index != bytes.count { throw parser.error("unexpected data after the JSON value") }
        return value
    }

    public static func parse(_ bytes: [UInt8]) throws -> JSONValue {
        try bytes.withUnsafeBytes { try parse($0) }
    }

    public static func parse(_ text: String) throws -> JSONValue {
        try parse(Array(text.utf8))
    }

    /// Serializes compactly (`pretty` adds newlines and two-space indentation).
    public static func serialize(_ value: JSONValue, pretty: Bool = false) -> String {
        var out = ""
        write(value, into: &out, pretty: pretty, indent: 0)
        return out
    }

    private static func write(_ value: JSONValue, into out: inout String, pretty: Bool, indent: Int) {
        switch value {
        case .null: out += "null"
        case let .bool(b): out += b ? "true" : "false"
        case let .number(n): out += n
        case let .string(s): writeString(s, into: &out)
        case let .array(items):
            if items.isEmpty { out += "[]"; return }
            out += "["
            for (i, item) in items.enumerated() {
                if i > 0 { out += pretty ? ", " : "," }
                write(item, into: &out, pretty: pretty, indent: indent + 1)
            }
            out += "]"
        case let .object(entries):
            if entries.isEmpty { out += "{}"; return }
            out += "{"
            for (i, (k, v)) in entries.enumerated() {
                if i > 0 { out += "," }
                if pretty { out += "\n" + String(repeating: "  ", count: indent + 1) }
                writeString(k, into: &out)
                out += pretty ? ": " : ":"
                write(v, into: &out, pretty: pretty, indent: indent + 1)
            }
            if pretty { out += "\n" + String(repeating: "  ", count: indent) }
            out += "}"
        }
    }

    /// Writes a JSON string literal as Python's json.dumps(ensure_ascii=False) does.
    static func writeString(_ s: String, into out: inout String) {
        out += "\""
        for scalar in s.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case "\u{08}": out += "\\b"
            case "\u{0C}": out += "\\f"
            default:
                if scalar.value < 0x20 {
                    let hex = String(scalar.value, radix: 16)
                    out += "\\u" + String(repeating: "0", count: 4 - hex.count) + hex
                } else {
                    out.unicodeScalars.append(scalar)
                }
            }
        }
        out += "\""
    }

    private struct Parser {
        let bytes: UnsafeRawBufferPointer
        var index = 0

        func error(_ message: String) -> JSONError { JSONError(message: message, offset: index) }

        mutating func skipWhitespace() {
            while index < bytes.count {
                switch bytes[index] {
                case 0x20, 0x09, 0x0A, 0x0D: index += 1
                default: return
                }
            }
        }

        mutating func expect(_ literal: StaticString) throws {
            let n = literal.utf8CodeUnitCount
            guard index + n <= bytes.count else { throw error("unexpected end of input") }
            for i in 0..<n where bytes[index + i] != literal.utf8Start[i] { throw error("invalid literal") }
            index += n
        }

        mutating func parseValue(depth: Int) throws -> JSONValue {
            guard depth <= JSON.maxDepth else { throw error("nesting deeper than \(JSON.maxDepth)") }
            guard index < bytes.count else { throw error("unexpected end of input") }
            switch bytes[index] {
            case UInt8(ascii: "{"): return try parseObject(depth: depth)
            case UInt8(ascii: "["): return try parseArray(depth: depth)
            case UInt8(ascii: "\""): return .string(try parseString())
            case UInt8(ascii: "t"): try expect("true"); return .bool(true)
            case UInt8(ascii: "f"): try expect("false"); return .bool(false)
            case UInt8(ascii: "n"): try expect("null"); return .null
            case UInt8(ascii: "-"), UInt8(ascii: "0")...UInt8(ascii: "9"): return try parseNumber()
            default: throw error("unexpected character '\(Character(Unicode.Scalar(bytes[index])))'")
            }
        }

        mutating func parseObject(depth: Int) throws -> JSONValue {
            index += 1
            var entries: [(String, JSONValue)] = []
            // Keys compare by their exact scalars: Swift's String equality is canonical equivalence,
            // under which distinct vocabulary entries (e.g. U+1F77 and U+03AF) would collide.
            var seen = Set<[UInt8]>()
            skipWhitespace()
            if index < bytes.count && bytes[index] == UInt8(ascii: "}") { index += 1; return .object(entries) }
            while true {
                skipWhitespace()
                guard index < bytes.count, bytes[index] == UInt8(ascii: "\"") else { throw error("expected a string key") }
                let keyStart = index
                let key = try parseString()
                guard seen.insert(Array(key.utf8)).inserted else {
                    throw JSONError(message: "duplicate key \"\(key)\"", offset: keyStart)
                }
                skipWhitespace()
                guard index < bytes.count, bytes[index] == UInt8(ascii: ":") else { throw error("expected ':'") }
                index += 1
                skipWhitespace()
                entries.append((key, try parseValue(depth: depth + 1)))
                skipWhitespace()
                guard index < bytes.count else { throw error("unexpected end of input in an object") }
                if bytes[index] == UInt8(ascii: ",") { index += 1; continue }
                if bytes[index] == UInt8(ascii: "}") { index += 1; return .object(entries) }
                throw error("expected ',' or '}'")
            }
        }

        mutating func parseArray(depth: Int) throws -> JSONValue {
            index += 1
            var items: [JSONValue] = []
            skipWhitespace()
            if index < bytes.count && bytes[index] == UInt8(ascii: "]") { index += 1; return .array(items) }
            while true {
                skipWhitespace()
                items.append(try parseValue(depth: depth + 1))
                skipWhitespace()
                guard index < bytes.count else { throw error("unexpected end of input in an array") }
                if bytes[index] == UInt8(ascii: ",") { index += 1; continue }
                if bytes[index] == UInt8(ascii: "]") { index += 1; return .array(items) }
                throw error("expected ',' or ']'")
            }
        }

        mutating func parseNumber() throws -> JSONValue {
            let start = index
            func digits(_ p: inout Parser) -> Int {
                let s = p.index
                while p.index < p.bytes.count, (UInt8(ascii: "0")...UInt8(ascii: "9")).contains(p.bytes[p.index]) { p.index += 1 }
                return p.index - s
            }
            if bytes[index] == UInt8(ascii: "-") { index += 1 }
            guard index < bytes.count else { throw error("incomplete number") }
            if bytes[index] == UInt8(ascii: "0") {
                index += 1
            } else if digits(&self) == 0 {
                throw error("invalid number")
            }
            if index < bytes.count && bytes[index] == UInt8(ascii: ".") {
                index += 1
                if digits(&self) == 0 { throw error("invalid number: digits expected after '.'") }
            }
            if index < bytes.count && (bytes[index] == UInt8(ascii: "e") || bytes[index] == UInt8(ascii: "E")) {
                index += 1
                if index < bytes.count && (bytes[index] == UInt8(ascii: "+") || bytes[index] == UInt8(ascii: "-")) { index += 1 }
                if digits(&self) == 0 { throw error("invalid number: digits expected in exponent") }
            }
            return .number(String(decoding: UnsafeRawBufferPointer(rebasing: bytes[start..<index]), as: UTF8.self))
        }

        mutating func parseHex4() throws -> UInt32 {
            guard index + 4 <= bytes.count else { throw error("incomplete \\u escape") }
            var v: UInt32 = 0
            for _ in 0..<4 {
                let c = bytes[index]
                let d: UInt32
                switch c {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): d = UInt32(c - UInt8(ascii: "0"))
                case UInt8(ascii: "a")...UInt8(ascii: "f"): d = UInt32(c - UInt8(ascii: "a") + 10)
                case UInt8(ascii: "A")...UInt8(ascii: "F"): d = UInt32(c - UInt8(ascii: "A") + 10)
                default: throw error("invalid \\u escape")
                }
                v = v << 4 | d
                index += 1
            }
            return v
        }

        mutating func parseString() throws -> String {
            index += 1  // opening quote
            var scalars = String.UnicodeScalarView()
            var runStart = index
            func flushRun(_ p: Parser, to out: inout String.UnicodeScalarView) throws {
                if runStart < p.index {
                    let slice = UnsafeRawBufferPointer(rebasing: p.bytes[runStart..<p.index])
                    guard let s = String(validating: slice, as: UTF8.self) else {
                        throw JSONError(message: "invalid UTF-8 in a string", offset: runStart)
                    }
                    out.append(contentsOf: s.unicodeScalars)
                }
            }
            while true {
                guard index < bytes.count else { throw error("unterminated string") }
                let c = bytes[index]
                if c == UInt8(ascii: "\"") {
                    try flushRun(self, to: &scalars)
                    index += 1
                    return String(scalars)
                }
                if c < 0x20 { throw error("control character in a string") }
                if c != UInt8(ascii: "\\") { index += 1; continue }
                try flushRun(self, to: &scalars)
                index += 1
                guard index < bytes.count else { throw error("unterminated escape") }
                let e = bytes[index]
                index += 1
                switch e {
                case UInt8(ascii: "\""): scalars.append("\"")
                case UInt8(ascii: "\\"): scalars.append("\\")
                case UInt8(ascii: "/"): scalars.append("/")
                case UInt8(ascii: "b"): scalars.append("\u{08}")
                case UInt8(ascii: "f"): scalars.append("\u{0C}")
                case UInt8(ascii: "n"): scalars.append("\n")
                case UInt8(ascii: "r"): scalars.append("\r")
                case UInt8(ascii: "t"): scalars.append("\t")
                case UInt8(ascii: "u"):
                    var code = try parseHex4()
                    if (0xD800...0xDBFF).contains(code) {
                        guard index + 6 <= bytes.count, bytes[index] == UInt8(ascii: "\\"), bytes[index + 1] == UInt8(ascii: "u") else {
                            throw error("unpaired surrogate in \\u escape")
                        }
                        index += 2
                        let low = try parseHex4()
                        guard (0xDC00...0xDFFF).contains(low) else { throw error("invalid low surrogate") }
                        code = 0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)
                    } else if (0xDC00...0xDFFF).contains(code) {
                        throw error("unpaired surrogate in \\u escape")
                    }
                    scalars.append(Unicode.Scalar(code)!)
                default: throw error("invalid escape '\\\(Character(Unicode.Scalar(e)))'")
                }
                runStart = index
            }
        }
    }
}

extension String {
    /// The string without leading and trailing whitespace.
    public func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let f = s.first, f.isWhitespace { s.removeFirst() }
        while let l = s.last, l.isWhitespace { s.removeLast() }
        return String(s)
    }
}
