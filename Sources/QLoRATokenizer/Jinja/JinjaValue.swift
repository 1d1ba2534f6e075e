import QLoRACore

// Values of the Jinja subset that chat templates use, with Python's semantics for truth, equality,
// string conversion and JSON output (transformers renders templates with jinja2 in Python).

public final class JinjaNamespace {
    var values: [String: JinjaValue]
    init(_ values: [String: JinjaValue]) { self.values = values }
}

public indirect enum JinjaValue {
    case undefined(String)
    case none
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case array([JinjaValue])
    case dict([(String, JinjaValue)])
    case namespace(JinjaNamespace)
    case function(String, ([JinjaValue], [(String, JinjaValue)]) throws -> JinjaValue)

    /// Builds a value from JSON (messages, tools).
    public init(json: JSONValue) {
        switch json {
        case .null: self = .none
        case let .bool(b): self = .bool(b)
        case let .number(n):
            if let i = Int(n) { self = .int(i) } else { self = .double(Double(n) ?? 0) }
        case let .string(s): self = .string(s)
        case let .array(a): self = .array(a.map(JinjaValue.init(json:)))
        case let .object(o): self = .dict(o.map { ($0.0, JinjaValue(json: $0.1)) })
        }
    }

    var isUndefined: Bool { if case .undefined = self { return true }; return false }
    var isNone: Bool { if case .none = self { return true }; return false }

    /// Python truthiness.
    var truthy: Bool {
        switch self {
        case .undefined, .none: return false
        case let .bool(b): return b
        case let .int(i): return i != 0
        case let .double(d): return d != 0
        case let .string(s): return !s.isEmpty
        case let .array(a): return !a.isEmpty
        case let .dict(d): return !d.isEmpty
        case .namespace, .function: return true
        }
    }

    /// str(x) as Jinja prints it.
    var rendered: String {
        switch self {
        case .undefined: return ""
        case .none: return "None"
        case let .bool(b): return b ? "True" : "False"
        case let .int(i): return String(i)
        case let .double(d): return Self.pythonFloat(d)
        case let .string(s): return s
        case let .array(a): return "[" + a.map(\.repr).joined(separator: ", ") + "]"
        case let .dict(d): return "{" + d.map { "'\($0.0)': \($0.1.repr)" }.joined(separator: ", ") + "}"
        case .namespace: return "<Namespace>"
        case let .function(name, _): return "<function \(name)>"
        }
    }

    /// repr(x), for strings inside containers.
    var repr: String {
        if case let .string(s) = self {
            let quote: Character = s.contains("'") && !s.contains("\"") ? "\"" : "'"
            var out = String(quote)
            for c in s {
                switch c {
                case "\\": out += "\\\\"
                case "\n": out += "\\n"
                case "\t": out += "\\t"
                case "\r": out += "\\r"
                default:
                    if c == quote { out += "\\" + String(c) } else { out.append(c) }
                }
            }
            return out + String(quote)
        }
        return rendered
    }

    static func pythonFloat(_ d: Double) -> String {
        if d.isNaN { return "nan" }
        if d.isInfinite { return d > 0 ? "inf" : "-inf" }
        if d == d.rounded() && abs(d) < 1e16 { return String(Int(d)) + ".0" }
        return "\(d)"
    }

    /// json.dumps(x, ensure_ascii=False) with the given separators and indent (transformers' tojson).
    func json(indent: Int?, sortKeys: Bool, level: Int = 0) -> String {
        let itemSep = indent == nil ? ", " : ","
        func pad(_ l: Int) -> String { indent.map { "\n" + String(repeating: " ", count: $0 * l) } ?? "" }
        switch self {
        case .undefined, .none: return "null"
        case let .bool(b): return b ? "true" : "false"
        case let .int(i): return String(i)
        case let .double(d):
            if d.isNaN { return "NaN" }
            if d.isInfinite { return d > 0 ? "Infinity" : "-Infinity" }
            return Self.pythonFloat(d)
        case let .string(s): return Self.jsonString(s)
        case let .array(a):
            if a.isEmpty { return "[]" }
            return "[" + a.map { pad(level + 1) + $0.json(indent: indent, sortKeys: sortKeys, level: level + 1) }.joined(separator: itemSep) + pad(level) + "]"
        case let .dict(d):
            if d.isEmpty { return "{}" }
            let entries = sortKeys ? d.sorted { $0.0 < $1.0 } : d
            return "{" + entries.map { pad(level + 1) + Self.jsonString($0.0) + ": " + $0.1.json(indent: indent, sortKeys: sortKeys, level: level + 1) }
                .joined(separator: itemSep) + pad(level) + "}"
        case .namespace, .function: return "null"
        }
    }

    static func jsonString(_ s: String) -> String { JSON.serialize(.string(s)) }

    /// Python ==.
    func equals(_ other: JinjaValue) -> Bool {
        switch (self, other) {
        case (.undefined, .undefined), (.none, .none): return true
        case let (.bool(a), .bool(b)): return a == b
        case let (.int(a), .int(b)): return a == b
        case let (.double(a), .double(b)): return a == b
        case let (.int(a), .double(b)), let (.double(b), .int(a)): return Double(a) == b
        case let (.bool(a), .int(b)), let (.int(b), .bool(a)): return (a ? 1 : 0) == b
        case let (.string(a), .string(b)): return a == b
        case let (.array(a), .array(b)): return a.count == b.count && zip(a, b).allSatisfy { $0.equals($1) }
        case let (.dict(a), .dict(b)):
            return a.count == b.count && a.allSatisfy { k, v in b.first { $0.0 == k }.map { $0.1.equals(v) } ?? false }
        default: return false
        }
    }

    /// The type name, for error messages.
    var typeName: String {
        switch self {
        case .undefined: return "undefined"
        case .none: return "NoneType"
        case .bool: return "bool"
        case .int: return "int"
        case .double: return "float"
        case .string: return "str"
        case .array: return "list"
        case .dict: return "dict"
        case .namespace: return "Namespace"
        case .function: return "function"
        }
    }
}

