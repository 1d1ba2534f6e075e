import QLoRACore
// Splitting a template into text and tags, with jinja2's whitespace control as transformers configures
// it: trim_blocks (the newline after a block tag goes), lstrip_blocks (spaces before a block tag on
// its own line go), and the "-" / "+" markers inside tags.

public struct TemplateError: Error, CustomStringConvertible, Equatable {
    public let message: String
    /// Set for errors raised by the template itself (raise_exception).
    public let raisedByTemplate: Bool

    public init(_ message: String, raisedByTemplate: Bool = false) {
        self.message = message
        self.raisedByTemplate = raisedByTemplate
    }

    public var description: String { raisedByTemplate ? message : "chat template: \(message)" }
}

enum Segment {
    case text(String)
    case output(String)      // {{ ... }}
    case statement(String)   // {% ... %}
}

enum JinjaLexer {
    private struct RawTag {
        var kind: Character  // "{" output, "%" statement, "#" comment
        var body: String
        var stripBefore: Bool
        var stripAfter: Bool
        var keepBefore: Bool  // "+": no lstrip_blocks
    }

    private enum Raw {
        case text(String)
        case tag(RawTag)
    }

    static func segments(_ source: String) throws -> [Segment] {
        let chars = Array(source.unicodeScalars)
        var raws: [Raw] = []
        var text = String.UnicodeScalarView()
        var i = 0
        while i < chars.count {
            if chars[i] == "{", i + 1 < chars.count, ["{", "%", "#"].contains(chars[i + 1]) {
                let kind = Character(chars[i + 1])
                let close: Unicode.Scalar = kind == "{" ? "}" : (kind == "%" ? "%" : "#")
                var j = i + 2
                var stripBefore = false, keepBefore = false
                if j < chars.count && chars[j] == "-" { stripBefore = true; j += 1 } else if j < chars.count && chars[j] == "+" { keepBefore = true; j += 1 }
                // Find the closing marker, skipping string literals inside expressions.
                var body = String.UnicodeScalarView()
                var quote: Unicode.Scalar?
                var found = false
                while j < chars.count {
                    let c = chars[j]
                    if let q = quote {
                        body.append(c)
                        if c == "\\" && j + 1 < chars.count { body.append(chars[j + 1]); j += 2; continue }
                        if c == q { quote = nil }
                        j += 1
                        continue
                    }
                    if kind != "#" && (c == "'" || c == "\"") { quote = c; body.append(c); j += 1; continue }
                    if (c == "-" || c == "+") && j + 2 < chars.count && chars[j + 1] == close && chars[j + 2] == "}" {
                        raws.append(.text(String(text)))
                        text = String.UnicodeScalarView()
                        raws.append(.tag(RawTag(kind: kind, body: String(body), stripBefore: stripBefore, stripAfter: c == "-", keepBefore: keepBefore)))
                        j += 3
                        found = true
                        break
                    }
                    if c == close && j + 1 < chars.count && chars[j + 1] == "}" {
                        raws.append(.text(String(text)))
                        text = String.UnicodeScalarView()
                        raws.append(.tag(RawTag(kind: kind, body: String(body), stripBefore: stripBefore, stripAfter: false, keepBefore: keepBefore)))
                        j += 2
                        found = true
                        break
                    }
                    body.append(c)
                    j += 1
                }
                if !found { throw TemplateError("unclosed '{\(kind)' tag") }
                i = j
                // {% raw %} ... {% endraw %}: copy verbatim.
                if case let .tag(t) = raws.last!, t.kind == "%", t.body.trimmingWhitespace() == "raw" {
                    let rest = String(String.UnicodeScalarView(chars[i...]))
                    guard let end = rest.range(of: "{% endraw %}") ?? rest.range(of: "{%- endraw %}") ?? rest.range(of: "{% endraw -%}") else {
                        throw TemplateError("{% raw %} without {% endraw %}")
                    }
                    raws.removeLast()
                    raws.append(.text(String(rest[..<end.lowerBound])))
                    i += rest[..<end.upperBound].unicodeScalars.count
                }
                continue
            }
            text.append(chars[i])
            i += 1
        }
        raws.append(.text(String(text)))

        // Whitespace control on the text around each tag, judged on the source text (jinja2's lexer
        // applies lstrip_blocks and trim_blocks to the source, so they do not see each other's work).
        let originals: [String?] = raws.map { if case let .text(t) = $0 { return t }; return nil }
        var texts = originals
        for (k, r) in raws.enumerated() {
            guard case let .tag(t) = r else { continue }
            let isBlock = t.kind != "{"
            if k > 0, let source = originals[k - 1], var before = texts[k - 1] {
                if t.stripBefore {
                    while let l = before.last, l.isWhitespace { before.removeLast() }
                } else if isBlock && !t.keepBefore {
                    // lstrip_blocks: spaces and tabs between the start of the tag's line and the tag.
                    var head = Substring(source)
                    var stripped = 0
                    while let l = head.last, l == " " || l == "\t" { head.removeLast(); stripped += 1 }
                    let atLineStart = head.isEmpty ? k - 1 == 0 : head.last == "\n"
                    if atLineStart && stripped > 0 {
                        var n = 0
                        while n < stripped, let l = before.last, l == " " || l == "\t" { before.removeLast(); n += 1 }
                    }
                }
                texts[k - 1] = before
            }
            if k + 1 < raws.count, var after = texts[k + 1] {
                if t.stripAfter {
                    while let f = after.first, f.isWhitespace { after.removeFirst() }
                } else if isBlock {
                    // trim_blocks: the first newline after a block tag.
                    // ("\r\n" is one Character in Swift: removeFirst() takes it whole; removeFirst(2) trapped on a
                    // text that was only that newline, found by make fuzz.)
                    if after.hasPrefix("\r\n") || after.hasPrefix("\n") { after.removeFirst() }
                }
                texts[k + 1] = after
            }
        }
        var out: [Segment] = []
        for (k, r) in raws.enumerated() {
            switch r {
            case .text: if let t = texts[k], !t.isEmpty { out.append(.text(t)) }
            case let .tag(t):
                if t.kind == "{" { out.append(.output(t.body)) } else if t.kind == "%" { out.append(.statement(t.body)) }
            }
        }
        return out
    }

}
