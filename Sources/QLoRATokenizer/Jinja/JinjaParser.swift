import QLoRACore
// Parsing the Jinja subset into a tree: statements (if/elif/else, for with else and loop filters, set
// including namespace attributes and block sets, macro, break/continue, generation blocks) and
// expressions (literals, names, attributes, subscripts and slices, calls, filters, tests, Python
// operators and the conditional expression).

indirect enum Expr {
    case literal(JinjaValue)
    case name(String)
    case list([Expr])
    case dict([(Expr, Expr)])
    case attribute(Expr, String)
    case `subscript`(Expr, Expr)
    case slice(Expr, Expr?, Expr?, Expr?)
    case call(Expr, [Expr], [(String, Expr)])
    case filter(Expr, String, [Expr], [(String, Expr)])
    case test(Expr, String, [Expr], negated: Bool)
    case unary(String, Expr)
    case binary(String, Expr, Expr)
    case conditional(Expr, Expr, Expr?)
}

indirect enum Node {
    case text(String)
    case output(Expr)
    case ifBlock([(Expr, [Node])], [Node]?)
    case forBlock(targets: [String], iterable: Expr, condition: Expr?, body: [Node], elseBody: [Node]?)
    case set(target: String, attribute: String?, value: Expr)
    case setBlock(target: String, body: [Node])
    case macro(name: String, parameters: [(String, Expr?)], body: [Node])
    case breakLoop
    case continueLoop
}

enum Tok: Equatable {
    case name(String)
    case string(String)
    case int(Int)
    case double(Double)
    case op(String)
    case end
}

struct ExprLexer {
    static func tokens(_ s: String) throws -> [Tok] {
        let c = Array(s.unicodeScalars)
        var out: [Tok] = []
        var i = 0
        let ops3 = ["//=", "**="]
        let ops2 = ["==", "!=", "<=", ">=", "//", "**"]
        while i < c.count {
            let ch = c[i]
            if ch == " " || ch == "\n" || ch == "\t" || ch == "\r" { i += 1; continue }
            if ch == "'" || ch == "\"" {
                var j = i + 1
                var str = String.UnicodeScalarView()
                while j < c.count && c[j] != ch {
                    if c[j] == "\\" && j + 1 < c.count {
                        j += 1
                        switch c[j] {
                        case "n": str.append("\n")
                        case "t": str.append("\t")
                        case "r": str.append("\r")
                        case "\\": str.append("\\")
                        case "'": str.append("'")
                        case "\"": str.append("\"")
                        default: str.append("\\"); str.append(c[j])
                        }
                    } else {
                        str.append(c[j])
                    }
                    j += 1
                }
                guard j < c.count else { throw TemplateError("unterminated string literal") }
                out.append(.string(String(str)))
                i = j + 1
                continue
            }
            if ch.properties.numericType != nil && ("0"..."9").contains(ch) {
                var j = i
                var isFloat = false
                while j < c.count && (("0"..."9").contains(c[j]) || c[j] == "_" || (c[j] == "." && !isFloat && j + 1 < c.count && ("0"..."9").contains(c[j + 1]))) {
                    if c[j] == "." { isFloat = true }
                    j += 1
                }
                let text = String(String.UnicodeScalarView(c[i..<j])).replacingOccurrencesOfUnderscore()
                out.append(isFloat ? .double(Double(text) ?? 0) : .int(Int(text) ?? 0))
                i = j
                continue
            }
            if ch == "_" || ch.properties.isAlphabetic {
                var j = i
                while j < c.count && (c[j] == "_" || c[j].properties.isAlphabetic || ("0"..."9").contains(c[j])) { j += 1 }
                out.append(.name(String(String.UnicodeScalarView(c[i..<j]))))
                i = j
                continue
            }
            let rest = String(String.UnicodeScalarView(c[i..<min(c.count, i + 3)]))
            if let op = ops3.first(where: { rest.hasPrefix($0) }) { out.append(.op(op)); i += 3; continue }
            if let op = ops2.first(where: { rest.hasPrefix($0) }) { out.append(.op(op)); i += 2; continue }
            if "+-*/%~|.,:()[]{}<>=!".unicodeScalars.contains(ch) { out.append(.op(String(ch))); i += 1; continue }
            throw TemplateError("unexpected character '\(ch)' in an expression")
        }
        out.append(.end)
        return out
    }
}

private extension String {
    func replacingOccurrencesOfUnderscore() -> String { String(filter { $0 != "_" }) }
}

struct ExprParser {
    var toks: [Tok]
    var i = 0

    init(_ s: String) throws { toks = try ExprLexer.tokens(s) }

    var peek: Tok { toks[i] }
    mutating func advance() -> Tok { defer { i += 1 }; return toks[i] }
    mutating func accept(_ op: String) -> Bool {
        if toks[i] == .op(op) { i += 1; return true }
        return false
    }
    mutating func acceptName(_ n: String) -> Bool {
        if toks[i] == .name(n) { i += 1; return true }
        return false
    }
    mutating func expect(_ op: String) throws {
        guard accept(op) else { throw TemplateError("expected '\(op)' in an expression") }
    }
    mutating func name() throws -> String {
        guard case let .name(n) = advance() else { throw TemplateError("expected a name") }
        return n
    }
    var atEnd: Bool { peek == .end }

    mutating func expression() throws -> Expr {
        let value = try orExpr()
        if acceptName("if") {
            let cond = try orExpr()
            let other = acceptName("else") ? try expression() : nil
            return .conditional(cond, value, other)
        }
        return value
    }

    mutating func orExpr() throws -> Expr {
        var l = try andExpr()
        while acceptName("or") { l = .binary("or", l, try andExpr()) }
        return l
    }

    mutating func andExpr() throws -> Expr {
        var l = try notExpr()
        while acceptName("and") { l = .binary("and", l, try notExpr()) }
        return l
    }

    mutating func notExpr() throws -> Expr {
        if acceptName("not") { return .unary("not", try notExpr()) }
        return try compare()
    }

    mutating func compare() throws -> Expr {
        var l = try concat()
        while true {
            if case let .op(o) = peek, ["==", "!=", "<", ">", "<=", ">="].contains(o) {
                i += 1
                l = .binary(o, l, try concat())
            } else if acceptName("in") {
                l = .binary("in", l, try concat())
            } else if peek == .name("not"), toks[i + 1] == .name("in") {
                i += 2
                l = .binary("not in", l, try concat())
            } else if acceptName("is") {
                let negated = acceptName("not")
                let test = try name()
                var args: [Expr] = []
                if accept("(") {
                    if !accept(")") {
                        repeat { args.append(try expression()) } while accept(",")
                        try expect(")")
                    }
                } else if case .name = peek, !["and", "or", "else", "if", "in", "is", "not"].contains(nameOf(peek)) {
                    args.append(try primaryWithPostfix())
                } else if case .string = peek {
                    args.append(try primaryWithPostfix())
                } else if case .int = peek {
                    args.append(try primaryWithPostfix())
                }
                l = .test(l, test, args, negated: negated)
            } else {
                return l
            }
        }
    }

    func nameOf(_ t: Tok) -> String { if case let .name(n) = t { return n }; return "" }

    mutating func concat() throws -> Expr {
        var l = try additive()
        while accept("~") { l = .binary("~", l, try additive()) }
        return l
    }

    mutating func additive() throws -> Expr {
        var l = try multiplicative()
        while true {
            if accept("+") { l = .binary("+", l, try multiplicative()) } else if accept("-") { l = .binary("-", l, try multiplicative()) } else { return l }
        }
    }

    mutating func multiplicative() throws -> Expr {
        var l = try power()
        while true {
            if accept("*") { l = .binary("*", l, try power()) } else if accept("//") { l = .binary("//", l, try power()) } else if accept("/") {
                l = .binary("/", l, try power())
            } else if accept("%") { l = .binary("%", l, try power()) } else { return l }
        }
    }

    mutating func power() throws -> Expr {
        let l = try unary()
        if accept("**") { return .binary("**", l, try unary()) }
        return l
    }

    mutating func unary() throws -> Expr {
        if accept("-") { return .unary("-", try unary()) }
        if accept("+") { return try unary() }
        var e = try primaryWithPostfix()
        while accept("|") {
            let f = try name()
            var args: [Expr] = [], kwargs: [(String, Expr)] = []
            if accept("(") { (args, kwargs) = try callArguments() }
            e = .filter(e, f, args, kwargs)
            e = try postfix(e)
        }
        return e
    }

    mutating func callArguments() throws -> ([Expr], [(String, Expr)]) {
        var args: [Expr] = [], kwargs: [(String, Expr)] = []
        if accept(")") { return (args, kwargs) }
        repeat {
            if case let .name(n) = peek, toks[i + 1] == .op("=") {
                i += 2
                kwargs.append((n, try expression()))
            } else {
                args.append(try expression())
            }
        } while accept(",")
        try expect(")")
        return (args, kwargs)
    }

    mutating func primaryWithPostfix() throws -> Expr { try postfix(try primary()) }

    mutating func postfix(_ start: Expr) throws -> Expr {
        var e = start
        while true {
            if accept(".") {
                e = .attribute(e, try name())
            } else if accept("[") {
                var parts: [Expr?] = [nil]
                var isSlice = false
                if peek != .op(":") { parts[0] = try expression() }
                while accept(":") {
                    isSlice = true
                    parts.append(peek == .op(":") || peek == .op("]") ? nil : try expression())
                }
                try expect("]")
                if isSlice {
                    e = .slice(e, parts[0], parts.count > 1 ? parts[1] : nil, parts.count > 2 ? parts[2] : nil)
                } else {
                    e = .subscript(e, parts[0]!)
                }
            } else if accept("(") {
                let (args, kwargs) = try callArguments()
                e = .call(e, args, kwargs)
            } else {
                return e
            }
        }
    }

    mutating func primary() throws -> Expr {
        switch advance() {
        case let .string(s):
            var text = s
            while case let .string(more) = peek { text += more; i += 1 }  // adjacent literals concatenate
            return .literal(.string(text))
        case let .int(v): return .literal(.int(v))
        case let .double(v): return .literal(.double(v))
        case let .name(n):
            switch n {
            case "true", "True": return .literal(.bool(true))
            case "false", "False": return .literal(.bool(false))
            case "none", "None": return .literal(.none)
            default: return .name(n)
            }
        case .op("("):
            let e = try expression()
            if accept(",") {  // a tuple: treated as a list
                var items = [e]
                if !accept(")") {
                    repeat { if peek == .op(")") { break }; items.append(try expression()) } while accept(",")
                    try expect(")")
                }
                return .list(items)
            }
            try expect(")")
            return e
        case .op("["):
            var items: [Expr] = []
            if !accept("]") {
                repeat { if peek == .op("]") { break }; items.append(try expression()) } while accept(",")
                try expect("]")
            }
            return .list(items)
        case .op("{"):
            var entries: [(Expr, Expr)] = []
            if !accept("}") {
                repeat {
                    if peek == .op("}") { break }
                    let k = try expression()
                    try expect(":")
                    entries.append((k, try expression()))
                } while accept(",")
                try expect("}")
            }
            return .dict(entries)
        case let t:
            throw TemplateError("unexpected \(t) in an expression")
        }
    }
}

/// Builds the statement tree from the lexer's segments.
struct TemplateParser {
    let segments: [Segment]
    var i = 0

    init(_ segments: [Segment]) { self.segments = segments }

    /// Parses nodes until one of `terminators` (a statement keyword) or the end.
    mutating func parse(until terminators: Set<String>) throws -> ([Node], String?, ExprParser?) {
        var nodes: [Node] = []
        while i < segments.count {
            let seg = segments[i]
            i += 1
            switch seg {
            case let .text(t): nodes.append(.text(t))
            case let .output(body):
                var p = try ExprParser(body)
                let e = try p.expression()
                guard p.atEnd else { throw TemplateError("unexpected text after an expression in {{ \(body.trimmingWhitespace()) }}") }
                nodes.append(.output(e))
            case let .statement(body):
                var p = try ExprParser(body)
                let keyword = try p.name()
                if terminators.contains(keyword) { return (nodes, keyword, p) }
                nodes.append(try statement(keyword, &p, body: body))
            }
        }
        if !terminators.isEmpty { throw TemplateError("missing {% \(terminators.sorted().joined(separator: " / ")) %}") }
        return (nodes, nil, nil)
    }

    mutating func statement(_ keyword: String, _ p: inout ExprParser, body: String) throws -> Node {
        switch keyword {
        case "if":
            var branches: [(Expr, [Node])] = []
            var cond = try p.expression()
            while true {
                let (nodes, term, next) = try parse(until: ["elif", "else", "endif"])
                branches.append((cond, nodes))
                if term == "elif" {
                    var q = next!
                    cond = try q.expression()
                    continue
                }
                if term == "else" {
                    let (elseNodes, _, _) = try parse(until: ["endif"])
                    return .ifBlock(branches, elseNodes)
                }
                return .ifBlock(branches, nil)
            }
        case "for":
            var targets = [try p.name()]
            while p.accept(",") { targets.append(try p.name()) }
            guard p.acceptName("in") else { throw TemplateError("expected 'in' in {% for %}") }
            // The iterable: stop before a trailing "if" (a loop filter) or "recursive".
            let iterable = try p.orExpr()
            var condition: Expr?
            if p.acceptName("if") { condition = try p.expression() }
            let (nodes, term, _) = try parse(until: ["else", "endfor"])
            var elseBody: [Node]?
            if term == "else" { elseBody = try parse(until: ["endfor"]).0 }
            return .forBlock(targets: targets, iterable: iterable, condition: condition, body: nodes, elseBody: elseBody)
        case "set":
            let target = try p.name()
            var attribute: String?
            if p.accept(".") { attribute = try p.name() }
            if p.accept("=") {
                return .set(target: target, attribute: attribute, value: try p.expression())
            }
            let (nodes, _, _) = try parse(until: ["endset"])
            return .setBlock(target: target, body: nodes)
        case "macro":
            let name = try p.name()
            var params: [(String, Expr?)] = []
            try p.expect("(")
            if !p.accept(")") {
                repeat {
                    let n = try p.name()
                    params.append((n, p.accept("=") ? try p.expression() : nil))
                } while p.accept(",")
                try p.expect(")")
            }
            let (nodes, _, _) = try parse(until: ["endmacro"])
            return .macro(name: name, parameters: params, body: nodes)
        case "break": return .breakLoop
        case "continue": return .continueLoop
        case "generation":
            // transformers' assistant-mask marker: renders its body unchanged.
            let (nodes, _, _) = try parse(until: ["endgeneration"])
            return .ifBlock([(.literal(.bool(true)), nodes)], nil)
        default:
            throw TemplateError("unsupported statement '{% \(body.trimmingWhitespace()) %}' (supported: if, elif, else, for, set, macro, break, continue, generation, raw)")
        }
    }
}
