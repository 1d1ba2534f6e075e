// Rendering a parsed template: Python-like evaluation of expressions, jinja2's scoping (a for loop's
// body has its own scope; namespace() objects carry values out of it), the filters, tests and string,
// list and dict methods that chat templates use, and transformers' globals (raise_exception,
// strftime_now) and tojson filter.
import Foundation
import QLoRACore
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public final class JinjaTemplate: @unchecked Sendable {
    let nodes: [Node]

    public init(_ source: String) throws {
        var parser = TemplateParser(try JinjaLexer.segments(source))
        nodes = try parser.parse(until: []).0
    }

    public func render(_ context: [String: JinjaValue]) throws -> String {
        let r = Renderer(globals: context)
        var out = ""
        _ = try r.run(nodes, into: &out)
        return out
    }
}

private enum Flow { case normal, breakLoop, continueLoop }

private final class Renderer {
    var scopes: [[String: JinjaValue]]
    /// Bounds on what a template may do, so that a hostile one (a loop of loops, a macro that calls itself through an
    /// argument, a huge range) ends with an error instead of running away: statements executed, nested macro calls,
    /// elements of a range, bytes of output.
    static let maxSteps = 10_000_000
    static let maxMacroDepth = 64
    static let maxRange = 1_000_000
    static let maxOutputBytes = 64 << 20
    var steps = 0
    var macroDepth = 0

    /// A string (bytes) or list (elements) a template builds may not pass the output bound.
    static func checkLength(_ n: Int) throws {
        guard n <= maxOutputBytes else { throw TemplateError("a value of \(n) bytes or elements is past the template limit of \(maxOutputBytes >> 20) MB") }
    }

    init(globals: [String: JinjaValue]) {
        var g = globals
        g["raise_exception"] = .function("raise_exception") { args, _ in
            throw TemplateError(args.first?.rendered ?? "error raised by the template", raisedByTemplate: true)
        }
        g["namespace"] = .function("namespace") { _, kwargs in
            .namespace(JinjaNamespace(Dictionary(kwargs, uniquingKeysWith: { $1 })))
        }
        g["range"] = .function("range") { args, _ in
            let ints = args.compactMap { v -> Int? in if case let .int(i) = v { return i }; return nil }
            guard ints.count == args.count, !ints.isEmpty else { throw TemplateError("range() takes integers") }
            let (start, stop, step) = ints.count == 1 ? (0, ints[0], 1) : (ints[0], ints[1], ints.count > 2 ? ints[2] : 1)
            guard step != 0 else { throw TemplateError("range() step must not be zero") }
            let count = step > 0 ? max(0, (stop - start + step - 1) / step) : max(0, (start - stop - step - 1) / -step)
            guard count <= Renderer.maxRange else { throw TemplateError("range() of \(count) elements is past the limit of \(Renderer.maxRange)") }
            return .array(Array(stride(from: start, to: stop, by: step)).map { .int($0) })
        }
        if g["strftime_now"] == nil {
            g["strftime_now"] = .function("strftime_now") { args, _ in
                .string(Renderer.strftime(args.first?.rendered ?? "%Y-%m-%d", Date()))
            }
        }
        scopes = [g]
    }

    func lookup(_ name: String) -> JinjaValue {
        for s in scopes.reversed() { if let v = s[name] { return v } }
        return .undefined(name)
    }

    func assign(_ name: String, _ v: JinjaValue) { scopes[scopes.count - 1][name] = v }

    func run(_ nodes: [Node], into out: inout String) throws -> Flow {
        for node in nodes {
            steps += 1
            guard steps <= Self.maxSteps else { throw TemplateError("the template ran past \(Self.maxSteps) statements (a loop that does not end?)") }
            guard out.utf8.count <= Self.maxOutputBytes else { throw TemplateError("the template's output is past \(Self.maxOutputBytes >> 20) MB") }
            switch node {
            case let .text(t): out += t
            case let .output(e): out += try eval(e).rendered
            case let .ifBlock(branches, elseBody):
                var taken = false
                for (cond, body) in branches where try eval(cond).truthy {
                    taken = true
                    let f = try run(body, into: &out)
                    if f != .normal { return f }
                    break
                }
                if !taken, let elseBody {
                    let f = try run(elseBody, into: &out)
                    if f != .normal { return f }
                }
            case let .forBlock(targets, iterable, condition, body, elseBody):
                try runFor(targets, iterable, condition, body, elseBody, into: &out)
            case let .set(target, attribute, value):
                let v = try eval(value)
                if let attribute {
                    guard case let .namespace(ns) = lookup(target) else {
                        throw TemplateError("cannot set attribute '\(attribute)' of '\(target)': not a namespace")
                    }
                    ns.values[attribute] = v
                } else {
                    assign(target, v)
                }
            case let .setBlock(target, body):
                var captured = ""
                _ = try run(body, into: &captured)
                assign(target, .string(captured))
            case let .macro(name, parameters, body):
                let defining = scopes
                assign(name, .function(name) { [unowned self] args, kwargs in
                    var local: [String: JinjaValue] = [:]
                    for (k, (pname, def)) in parameters.enumerated() {
                        if k < args.count { local[pname] = args[k] } else if let kv = kwargs.first(where: { $0.0 == pname }) {
                            local[pname] = kv.1
                        } else if let def { local[pname] = try self.eval(def) } else { local[pname] = .undefined(pname) }
                    }
                    guard self.macroDepth < Self.maxMacroDepth else {
                        throw TemplateError("macro '\(name)' nested past \(Self.maxMacroDepth) calls (a recursion that does not end?)")
                    }
                    self.macroDepth += 1
                    let saved = self.scopes
                    self.scopes = defining + [local]
                    defer { self.scopes = saved; self.macroDepth -= 1 }
                    var text = ""
                    _ = try self.run(body, into: &text)
                    return .string(text)
                })
            case .breakLoop: return .breakLoop
            case .continueLoop: return .continueLoop
            }
        }
        return .normal
    }

    func runFor(_ targets: [String], _ iterable: Expr, _ condition: Expr?, _ body: [Node], _ elseBody: [Node]?, into out: inout String) throws {
        var items: [JinjaValue]
        switch try eval(iterable) {
        case let .array(a): items = a
        case let .dict(d): items = d.map { .string($0.0) }
        case let .string(s): items = s.map { .string(String($0)) }
        case .undefined, .none: items = []
        case let v: throw TemplateError("cannot loop over a \(v.typeName)")
        }
        func bind(_ item: JinjaValue) throws {
            if targets.count == 1 { assign(targets[0], item); return }
            guard case let .array(parts) = item, parts.count == targets.count else {
                throw TemplateError("cannot unpack \(item.typeName) into \(targets.count) names")
            }
            for (t, v) in zip(targets, parts) { assign(t, v) }
        }
        if let condition {
            scopes.append([:])
            items = try items.filter { try bind($0); return try eval(condition).truthy }
            scopes.removeLast()
        }
        if items.isEmpty {
            if let elseBody { _ = try run(elseBody, into: &out) }
            return
        }
        scopes.append([:])
        defer { scopes.removeLast() }
        for (k, item) in items.enumerated() {
            let n = items.count
            var loop: [(String, JinjaValue)] = [
                ("index", .int(k + 1)), ("index0", .int(k)), ("revindex", .int(n - k)), ("revindex0", .int(n - k - 1)),
                ("first", .bool(k == 0)), ("last", .bool(k == n - 1)), ("length", .int(n)),
            ]
            loop.append(("previtem", k > 0 ? items[k - 1] : .undefined("previtem")))
            loop.append(("nextitem", k + 1 < n ? items[k + 1] : .undefined("nextitem")))
            assign("loop", .dict(loop))
            try bind(item)
            let f = try run(body, into: &out)
            if f == .breakLoop { break }
        }
    }

    // MARK: Expressions

    func eval(_ e: Expr) throws -> JinjaValue {
        switch e {
        case let .literal(v): return v
        case let .name(n): return lookup(n)
        case let .list(items): return .array(try items.map(eval))
        case let .dict(entries):
            return .dict(try entries.map { (try eval($0.0).rendered, try eval($0.1)) })
        case let .attribute(base, name):
            return try attribute(try eval(base), name)
        case let .subscript(base, index):
            return try subscriptValue(try eval(base), try eval(index))
        case let .slice(base, a, b, c):
            return try slice(try eval(base), try a.map(eval), try b.map(eval), try c.map(eval))
        case let .call(callee, args, kwargs):
            let argv = try args.map(eval)
            let kw = try kwargs.map { ($0.0, try eval($0.1)) }
            if case let .attribute(base, method) = callee {
                let target = try eval(base)
                if case .dict = target, case .function = (try? attribute(target, method)) ?? .none {
                    // A dict holding a function under this key (rare): call it.
                } else if let result = try callMethod(target, method, argv, kw) {
                    return result
                }
            }
            guard case let .function(_, f) = try eval(callee) else {
                throw TemplateError("'\(describe(callee))' is not callable")
            }
            return try f(argv, kw)
        case let .filter(base, name, args, kwargs):
            return try applyFilter(name, try eval(base), try args.map(eval), try kwargs.map { ($0.0, try eval($0.1)) })
        case let .test(base, name, args, negated):
            let r = try applyTest(name, try eval(base), try args.map(eval))
            return .bool(negated ? !r : r)
        case let .unary(op, x):
            let v = try eval(x)
            switch op {
            case "not": return .bool(!v.truthy)
            case "-":
                switch v {
                case let .int(i): return .int(-i)
                case let .double(d): return .double(-d)
                default: throw TemplateError("bad operand for unary -: \(v.typeName)")
                }
            default: throw TemplateError("unknown operator \(op)")
            }
        case let .binary(op, a, b):
            if op == "and" { let l = try eval(a); return l.truthy ? try eval(b) : l }
            if op == "or" { let l = try eval(a); return l.truthy ? l : try eval(b) }
            return try binary(op, try eval(a), try eval(b))
        case let .conditional(cond, yes, no):
            return try eval(cond).truthy ? try eval(yes) : (try no.map(eval) ?? .undefined("else"))
        }
    }

    func describe(_ e: Expr) -> String {
        switch e {
        case let .name(n): return n
        case let .attribute(b, n): return describe(b) + "." + n
        default: return "expression"
        }
    }

    func attribute(_ v: JinjaValue, _ name: String) throws -> JinjaValue {
        switch v {
        case let .dict(d): return d.first { $0.0 == name }?.1 ?? .undefined(name)
        case let .namespace(ns): return ns.values[name] ?? .undefined(name)
        case .undefined: return .undefined(name)
        default: return .undefined(name)
        }
    }

    func subscriptValue(_ v: JinjaValue, _ index: JinjaValue) throws -> JinjaValue {
        switch (v, index) {
        case let (.array(a), .int(i)):
            let j = i < 0 ? a.count + i : i
            guard j >= 0 && j < a.count else { return .undefined("[\(i)]") }
            return a[j]
        case let (.string(s), .int(i)):
            let chars = Array(s)
            let j = i < 0 ? chars.count + i : i
            guard j >= 0 && j < chars.count else { return .undefined("[\(i)]") }
            return .string(String(chars[j]))
        case let (.dict, .string(k)): return try attribute(v, k)
        case let (.namespace, .string(k)): return try attribute(v, k)
        case (.undefined, _): return .undefined("subscript")
        default: return .undefined("subscript")
        }
    }

    func slice(_ v: JinjaValue, _ a: JinjaValue?, _ b: JinjaValue?, _ c: JinjaValue?) throws -> JinjaValue {
        func int(_ x: JinjaValue?) -> Int? { if case let .int(i) = x { return i }; return nil }
        func indices(_ n: Int) throws -> [Int] {
            let step = int(c) ?? 1
            // Python (and so Jinja) raises here; stride(by: 0) would trap.
            guard step != 0 else { throw TemplateError("slice step cannot be zero") }
            func clamp(_ x: Int?, _ def: Int) -> Int {
                guard var x else { return def }
                if x < 0 { x += n }
                return step > 0 ? min(max(x, 0), n) : min(max(x, -1), n - 1)
            }
            if step > 0 {
                let s = clamp(int(a), 0), e = clamp(int(b), n)
                return s < e ? Array(stride(from: s, to: e, by: step)) : []
            }
            let s = clamp(int(a), n - 1), e = clamp(int(b), -1)
            return s > e ? Array(stride(from: s, to: e, by: step)) : []
        }
        switch v {
        case let .array(arr): return .array(try indices(arr.count).map { arr[$0] })
        case let .string(s):
            let chars = Array(s)
            return .string(String(try indices(chars.count).map { chars[$0] }))
        default: throw TemplateError("cannot slice a \(v.typeName)")
        }
    }

    func binary(_ op: String, _ a: JinjaValue, _ b: JinjaValue) throws -> JinjaValue {
        switch op {
        case "==": return .bool(a.equals(b))
        case "!=": return .bool(!a.equals(b))
        case "<", ">", "<=", ">=":
            let r: Bool
            switch (a, b) {
            case let (.string(x), .string(y)): r = op == "<" ? x < y : op == ">" ? x > y : op == "<=" ? x <= y : x >= y
            default:
                guard let x = number(a), let y = number(b) else { throw TemplateError("cannot compare \(a.typeName) and \(b.typeName)") }
                r = op == "<" ? x < y : op == ">" ? x > y : op == "<=" ? x <= y : x >= y
            }
            return .bool(r)
        case "in", "not in":
            let r: Bool
            switch b {
            case let .string(s): r = s.contains(a.rendered) || a.rendered.isEmpty
            case let .array(arr): r = arr.contains { $0.equals(a) }
            case let .dict(d): r = d.contains { $0.0 == a.rendered }
            case .undefined: r = false
            default: throw TemplateError("'in' needs a string, list or dict, not \(b.typeName)")
            }
            return .bool(op == "in" ? r : !r)
        case "~":
            let (x, y) = (a.rendered, b.rendered)
            try Self.checkLength(x.utf8.count + y.utf8.count)
            return .string(x + y)
        case "+":
            switch (a, b) {
            case let (.string(x), .string(y)):
                try Self.checkLength(x.utf8.count + y.utf8.count)
                return .string(x + y)
            case let (.array(x), .array(y)):
                try Self.checkLength(x.count + y.count)
                return .array(x + y)
            case let (.int(x), .int(y)): return .int(x + y)
            default:
                guard let x = number(a), let y = number(b) else {
                    throw TemplateError("cannot add \(a.typeName) and \(b.typeName)")
                }
                return .double(x + y)
            }
        case "-", "*", "/", "//", "%", "**":
            if op == "*", case let .string(s) = a, case let .int(n) = b {
                let (total, overflow) = s.utf8.count.multipliedReportingOverflow(by: max(n, 0))
                try Self.checkLength(overflow ? Int.max : total)
                return .string(String(repeating: s, count: max(n, 0)))
            }
            if op == "%", case let .string(s) = a { return .string(pythonFormat(s, b)) }
            if case let .int(x) = a, case let .int(y) = b, op != "/" {
                switch op {
                case "-": return .int(x - y)
                case "*": return .int(x * y)
                case "//":
                    guard y != 0 else { throw TemplateError("integer division by zero") }
                    return .int(Int((Double(x) / Double(y)).rounded(.down)))
                case "%":
                    guard y != 0 else { throw TemplateError("modulo by zero") }
                    return .int(((x % y) + y) % y)
                default: return .int(Int(pow(Double(x), Double(y))))
                }
            }
            guard let x = number(a), let y = number(b) else { throw TemplateError("bad operands for \(op): \(a.typeName), \(b.typeName)") }
            switch op {
            case "-": return .double(x - y)
            case "*": return .double(x * y)
            case "/":
                guard y != 0 else { throw TemplateError("division by zero") }
                return .double(x / y)
            case "//": return .double((x / y).rounded(.down))
            case "%": return .double(x - y * (x / y).rounded(.down))
            default: return .double(pow(x, y))
            }
        default: throw TemplateError("unknown operator \(op)")
        }
    }

    func number(_ v: JinjaValue) -> Double? {
        switch v {
        case let .int(i): return Double(i)
        case let .double(d): return d
        case let .bool(b): return b ? 1 : 0
        default: return nil
        }
    }

    func pythonFormat(_ format: String, _ arg: JinjaValue) -> String {
        var args: [JinjaValue] = []
        if case let .array(a) = arg { args = a } else { args = [arg] }
        var out = ""
        var it = format.makeIterator()
        var k = 0
        while let c = it.next() {
            if c == "%", let spec = it.next() {
                if spec == "%" { out.append("%"); continue }
                out += k < args.count ? args[k].rendered : ""
                k += 1
            } else {
                out.append(c)
            }
        }
        return out
    }

    // MARK: Methods

    func callMethod(_ v: JinjaValue, _ name: String, _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) throws -> JinjaValue? {
        func str(_ i: Int) -> String? { if i < args.count, case let .string(s) = args[i] { return s }; return nil }
        switch v {
        case let .string(s):
            switch name {
            case "strip": return .string(strip(s, str(0), left: true, right: true))
            case "lstrip": return .string(strip(s, str(0), left: true, right: false))
            case "rstrip": return .string(strip(s, str(0), left: false, right: true))
            case "upper": return .string(s.uppercased())
            case "lower": return .string(s.lowercased())
            case "title": return .string(title(s))
            case "capitalize": return .string(s.prefix(1).uppercased() + s.dropFirst().lowercased())
            case "startswith":
                if case let .array(options) = args.first { return .bool(options.contains { s.hasPrefix($0.rendered) }) }
                return .bool(s.hasPrefix(str(0) ?? ""))
            case "endswith":
                if case let .array(options) = args.first { return .bool(options.contains { s.hasSuffix($0.rendered) }) }
                return .bool(s.hasSuffix(str(0) ?? ""))
            case "replace":
                guard let a = str(0), let b = str(1) else { throw TemplateError("replace() takes two strings") }
                return .string(s.replacingOccurrences(of: a, with: b))
            case "split":
                if let sep = str(0) {
                    var parts = s.components(separatedBy: sep)
                    if args.count > 1, case let .int(maxSplit) = args[1], maxSplit >= 0, parts.count > maxSplit + 1 {
                        parts = Array(parts[0..<maxSplit]) + [parts[maxSplit...].joined(separator: sep)]
                    }
                    return .array(parts.map { .string($0) })
                }
                return .array(s.split(whereSeparator: { $0.isWhitespace }).map { .string(String($0)) })
            case "find": return .int(s.range(of: str(0) ?? "").map { s.distance(from: s.startIndex, to: $0.lowerBound) } ?? -1)
            case "count": return .int(str(0).map { s.components(separatedBy: $0).count - 1 } ?? 0)
            case "format":
                var out = s
                for a in args { if let r = out.range(of: "{}") { out.replaceSubrange(r, with: a.rendered) } }
                return .string(out)
            case "join":
                guard case let .array(items) = args.first else { throw TemplateError("join() takes a list") }
                return .string(items.map(\.rendered).joined(separator: s))
            default: return nil
            }
        case let .dict(d):
            switch name {
            case "items": return .array(d.map { .array([.string($0.0), $0.1]) })
            case "keys": return .array(d.map { .string($0.0) })
            case "values": return .array(d.map { $0.1 })
            case "get":
                let key = args.first?.rendered ?? ""
                return d.first { $0.0 == key }?.1 ?? (args.count > 1 ? args[1] : .none)
            default: return nil
            }
        case .array:
            if ["append", "pop", "extend", "insert", "remove", "clear", "sort", "reverse"].contains(name) {
                throw TemplateError("lists are immutable in chat templates (the sandbox refuses \(name)())")
            }
            return nil
        default: return nil
        }
    }

    func strip(_ s: String, _ chars: String?, left: Bool, right: Bool) -> String {
        var t = Substring(s)
        let set = chars.map { Set($0) }
        func drop(_ c: Character) -> Bool { set.map { $0.contains(c) } ?? c.isWhitespace }
        if left { while let f = t.first, drop(f) { t.removeFirst() } }
        if right { while let l = t.last, drop(l) { t.removeLast() } }
        return String(t)
    }

    func title(_ s: String) -> String {
        var out = ""
        var previousIsLetter = false
        for c in s {
            out += previousIsLetter ? c.lowercased() : c.uppercased()
            previousIsLetter = c.isLetter
        }
        return out
    }

    // MARK: Filters

    func applyFilter(_ name: String, _ v: JinjaValue, _ args: [JinjaValue], _ kwargs: [(String, JinjaValue)]) throws -> JinjaValue {
        func kw(_ k: String) -> JinjaValue? { kwargs.first { $0.0 == k }?.1 }
        switch name {
        case "trim": return .string(strip(v.rendered, args.first?.rendered, left: true, right: true))
        case "length", "count":
            switch v {
            case let .string(s): return .int(s.count)
            case let .array(a): return .int(a.count)
            case let .dict(d): return .int(d.count)
            case .undefined: return .int(0)
            default: throw TemplateError("object of type \(v.typeName) has no length")
            }
        case "upper": return .string(v.rendered.uppercased())
        case "lower": return .string(v.rendered.lowercased())
        case "title": return .string(title(v.rendered))
        case "capitalize": let s = v.rendered; return .string(s.prefix(1).uppercased() + s.dropFirst().lowercased())
        case "string": return .string(v.rendered)
        case "safe": return v
        case "e", "escape":
            var s = ""
            for c in v.rendered {
                switch c {
                case "&": s += "&amp;"
                case "<": s += "&lt;"
                case ">": s += "&gt;"
                case "\"": s += "&#34;"
                case "'": s += "&#39;"
                default: s.append(c)
                }
            }
            return .string(s)
        case "tojson":
            var indent: Int?
            if case let .int(i) = kw("indent") ?? args.first ?? .none { indent = i }
            let sortKeys = kw("sort_keys")?.truthy ?? false
            return .string(v.json(indent: indent, sortKeys: sortKeys))
        case "default", "d":
            let useOnFalsy = (args.count > 1 ? args[1].truthy : false) || (kw("boolean")?.truthy ?? false)
            if v.isUndefined || (useOnFalsy && !v.truthy) { return args.first ?? .string("") }
            return v
        case "first":
            if case let .array(a) = v { return a.first ?? .undefined("first") }
            if case let .string(s) = v { return s.first.map { .string(String($0)) } ?? .undefined("first") }
            return .undefined("first")
        case "last":
            if case let .array(a) = v { return a.last ?? .undefined("last") }
            if case let .string(s) = v { return s.last.map { .string(String($0)) } ?? .undefined("last") }
            return .undefined("last")
        case "join":
            let sep = args.first?.rendered ?? kw("d")?.rendered ?? ""
            guard case let .array(a) = v else { return .string(v.rendered) }
            if let attr = kw("attribute")?.rendered { return .string(try a.map { try attribute($0, attr).rendered }.joined(separator: sep)) }
            return .string(a.map(\.rendered).joined(separator: sep))
        case "list":
            switch v {
            case let .array(a): return .array(a)
            case let .string(s): return .array(s.map { .string(String($0)) })
            case let .dict(d): return .array(d.map { .string($0.0) })
            default: return .array([])
            }
        case "items":
            guard case let .dict(d) = v else { return .array([]) }
            return .array(d.map { .array([.string($0.0), $0.1]) })
        case "reverse":
            if case let .array(a) = v { return .array(a.reversed()) }
            return .string(String(v.rendered.reversed()))
        case "int":
            switch v {
            case let .int(i): return .int(i)
            case let .double(d): return .int(Int(d))
            case let .string(s): return .int(Int(s.trimmingWhitespace()) ?? Int(Double(s.trimmingWhitespace()) ?? 0))
            case let .bool(b): return .int(b ? 1 : 0)
            default: return .int(0)
            }
        case "float":
            return .double(number(v) ?? Double(v.rendered.trimmingWhitespace()) ?? 0)
        case "abs":
            if case let .int(i) = v { return .int(abs(i)) }
            return .double(abs(number(v) ?? 0))
        case "round":
            let digits: Int
            if case let .int(p) = args.first ?? .int(0) { digits = p } else { digits = 0 }
            let scale = pow(10.0, Double(digits))
            return .double(((number(v) ?? 0) * scale).rounded(.toNearestOrEven) / scale)
        case "replace":
            guard args.count >= 2 else { throw TemplateError("replace filter takes two arguments") }
            return .string(v.rendered.replacingOccurrences(of: args[0].rendered, with: args[1].rendered))
        case "indent":
            let width: Int
            if case let .int(w) = args.first ?? kw("width") ?? .int(4) { width = w } else { width = 4 }
            let first = (args.count > 1 ? args[1].truthy : false) || (kw("first")?.truthy ?? false)
            let pad = String(repeating: " ", count: width)
            let lines = v.rendered.components(separatedBy: "\n")
            return .string(lines.enumerated().map { i, l in (i == 0 && !first) || l.isEmpty ? l : pad + l }.joined(separator: "\n"))
        case "map":
            guard case let .array(a) = v else { return .array([]) }
            if let attr = kw("attribute")?.rendered { return .array(try a.map { try attribute($0, attr) }) }
            guard let f = args.first?.rendered else { throw TemplateError("map needs a filter name or attribute=") }
            return .array(try a.map { try applyFilter(f, $0, Array(args.dropFirst()), []) })
        case "select", "reject":
            guard case let .array(a) = v else { return .array([]) }
            let test = args.first?.rendered ?? "truthy"
            return .array(try a.filter { item in
                let r = test == "truthy" ? item.truthy : try applyTest(test, item, Array(args.dropFirst()))
                return name == "select" ? r : !r
            })
        case "selectattr", "rejectattr":
            guard case let .array(a) = v, let attr = args.first?.rendered else { return .array([]) }
            return .array(try a.filter { item in
                let value = try attribute(item, attr)
                let r = args.count > 1 ? try applyTest(args[1].rendered, value, Array(args.dropFirst(2))) : value.truthy
                return name == "selectattr" ? r : !r
            })
        case "unique":
            guard case let .array(a) = v else { return v }
            var out: [JinjaValue] = []
            for x in a where !out.contains(where: { $0.equals(x) }) { out.append(x) }
            return .array(out)
        case "sort":
            guard case let .array(a) = v else { return v }
            return .array(a.sorted { $0.rendered < $1.rendered })
        case "batch", "slice", "wordwrap", "truncate", "format", "center", "filesizeformat", "striptags", "urlencode", "xmlattr", "wordcount":
            throw TemplateError("the filter '\(name)' is not supported")
        default:
            throw TemplateError("unknown filter '\(name)'")
        }
    }

    // MARK: Tests

    func applyTest(_ name: String, _ v: JinjaValue, _ args: [JinjaValue]) throws -> Bool {
        switch name {
        case "defined": return !v.isUndefined
        case "undefined": return v.isUndefined
        case "none": return v.isNone
        case "string": if case .string = v { return true }; return false
        case "number": switch v { case .int, .double: return true; default: return false }
        case "integer": if case .int = v { return true }; return false
        case "float": if case .double = v { return true }; return false
        case "boolean": if case .bool = v { return true }; return false
        case "true": if case .bool(true) = v { return true }; return false
        case "false": if case .bool(false) = v { return true }; return false
        case "mapping": if case .dict = v { return true }; return false
        case "sequence", "iterable":
            switch v { case .array, .string, .dict: return true; default: return false }
        case "callable": if case .function = v { return true }; return false
        case "equalto", "eq", "==", "sameas": return v.equals(args.first ?? .none)
        case "ne", "!=": return !v.equals(args.first ?? .none)
        case "odd": if case let .int(i) = v { return i % 2 != 0 }; return false
        case "even": if case let .int(i) = v { return i % 2 == 0 }; return false
        case "divisibleby":
            if case let .int(i) = v, case let .int(d) = args.first ?? .int(1), d != 0 { return i % d == 0 }
            return false
        case "in": return try binary("in", v, args.first ?? .array([])).truthy
        case "lower": return v.rendered == v.rendered.lowercased()
        case "upper": return v.rendered == v.rendered.uppercased()
        case "gt", ">": return try binary(">", v, args.first ?? .none).truthy
        case "ge", ">=": return try binary(">=", v, args.first ?? .none).truthy
        case "lt", "<": return try binary("<", v, args.first ?? .none).truthy
        case "le", "<=": return try binary("<=", v, args.first ?? .none).truthy
        default: throw TemplateError("unknown test '\(name)'")
        }
    }

    static func strftime(_ format: String, _ date: Date) -> String {
        var t = time_t(date.timeIntervalSince1970)
        var tmv = tm()
        localtime_r(&t, &tmv)
        // CChar: signed on x86-64, unsigned on Linux aarch64.
        var buffer = [CChar](repeating: 0, count: 256)
        #if canImport(Glibc)
        let n = Glibc.strftime(&buffer, buffer.count, format, &tmv)
        #else
        let n = Darwin.strftime(&buffer, buffer.count, format, &tmv)
        #endif
        return buffer.withUnsafeBytes { String(decoding: $0.prefix(n), as: UTF8.self) }
    }
}
