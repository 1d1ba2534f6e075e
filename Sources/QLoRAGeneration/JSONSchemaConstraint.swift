// JSON output that follows a JSON Schema, by constrained decoding (OpenAI's response_format
// {"type": "json_schema", ...}): the schema is compiled once into a small grammar of nodes (`JSONSchemaGrammar`), and
// `JSONSchemaMatcher` takes the reply a byte at a time, keeping every way the bytes so far can still become a value of
// the schema (anyOf and a list of types are alternatives followed side by side). The vocabulary mask is
// TokenConstraint's, as for json_object. A keyword the matcher cannot enforce (pattern, minimum, ...) is an error
// naming it at compile time, never dropped: the output then always validates against the schema it was given.
import QLoRACore

/// A schema keyword or shape this constraint cannot enforce, with where it is (a JSON pointer into the schema).
public struct JSONSchemaError: Error, CustomStringConvertible, Equatable {
    public let path: String
    public let reason: String
    public var description: String { "\(path): \(reason)" }
}

/// A JSON Schema compiled for constrained decoding.
public final class JSONSchemaGrammar: @unchecked Sendable {
    enum Node {
        /// Properties sorted by their encoded names (the bytes between the quotes), `required` a bit per property,
        /// `additional`: the node of any other key's value, or nil for none.
        case object(keys: [[UInt8]], values: [Int], required: UInt64, additional: Int?)
        case array(items: Int, minItems: Int, maxItems: Int?)
        /// A string: any (nil), or one of these encoded bodies (sorted).
        case string([[UInt8]]?)
        case number(integer: Bool)
        /// One of these exact texts (sorted): true, false, null, numbers and containers of enum/const.
        case literal([[UInt8]])
        case anyOf([Int])
        /// A `$ref` not yet resolved (only while compiling).
        case pending
    }

    var nodes: [Node] = []
    let root: Int

    /// Keywords that describe without constraining.
    static let annotations: Set<String> = ["title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated",
                                           "readOnly", "writeOnly", "$defs", "definitions"]

    public init(schema: JSONValue) throws(JSONSchemaError) {
        var compiler = Compiler(document: schema)
        root = try compiler.compile(schema, path: "#")
        nodes = compiler.nodes
        try checkCycles()
        try pruneUnproductive()
    }

    /// Refuses alternatives or references that come back to themselves before a byte is read (`{"$ref": "#"}`,
    /// `{"anyOf": [{"$ref": "#"}, ...]}`): the matcher would follow them forever.
    func checkCycles() throws(JSONSchemaError) {
        var state = [UInt8](repeating: 0, count: nodes.count)  // 0 new, 1 on the path, 2 done
        func visit(_ n: Int) -> Bool {
            if state[n] == 1 { return false }
            if state[n] == 2 { return true }
            state[n] = 1
            if case let .anyOf(list) = nodes[n] { for m in list where !visit(m) { return false } }
            state[n] = 2
            return true
        }
        for n in nodes.indices where !visit(n) {
            throw JSONSchemaError(path: "#", reason: "a $ref or anyOf refers back to itself before any value starts; such a schema admits nothing to write")
        }
    }

    /// Which nodes have a finite value (a fixpoint: strings, numbers and literals do; an object when its required
    /// properties do; an array when it may be empty or its items do; anyOf when an alternative does). The root must;
    /// elsewhere what has none is cut away (an optional property, an alternative, additional properties), so that a
    /// reply can always be finished.
    func pruneUnproductive() throws(JSONSchemaError) {
        var productive = [Bool](repeating: false, count: nodes.count)
        var changed = true
        while changed {
            changed = false
            for (i, n) in nodes.enumerated() where !productive[i] {
                let ok: Bool
                switch n {
                case .string, .number, .literal: ok = true
                case let .object(_, values, required, _): ok = values.indices.allSatisfy { required & (1 << UInt64($0)) == 0 || productive[values[$0]] }
                case let .array(items, minItems, _): ok = minItems == 0 || productive[items]
                case let .anyOf(list): ok = list.contains { productive[$0] }
                case .pending: ok = false
                }
                if ok { productive[i] = true; changed = true }
            }
        }
        guard productive[root] else {
            throw JSONSchemaError(path: "#", reason: "the schema admits no finite value (a required property or item that always needs another)")
        }
        for (i, n) in nodes.enumerated() {
            switch n {
            case let .object(keys, values, required, additional):
                // An optional property without a finite value can never be written to the end: it is not offered.
                let keep = values.indices.filter { productive[values[$0]] }
                var bits: UInt64 = 0
                for (j, k) in keep.enumerated() where required & (1 << UInt64(k)) != 0 { bits |= 1 << UInt64(j) }
                nodes[i] = .object(keys: keep.map { keys[$0] }, values: keep.map { values[$0] }, required: bits,
                                   additional: additional.flatMap { productive[$0] ? $0 : nil })
            case let .anyOf(list):
                nodes[i] = .anyOf(list.filter { productive[$0] })
            case let .array(items, minItems, _) where !productive[items] && minItems == 0:
                nodes[i] = .array(items: items, minItems: 0, maxItems: 0)
            default: break
            }
        }
    }

    struct Compiler {
        let document: JSONValue
        var nodes: [Node] = []
        var refs: [String: Int] = [:]
        /// The node of "any JSON value", made on first use.
        var anyNode: Int?

        init(document: JSONValue) { self.document = document }

        mutating func add(_ n: Node) -> Int {
            nodes.append(n)
            return nodes.count - 1
        }

        mutating func any() -> Int {
            if let a = anyNode { return a }
            let id = add(.pending)
            anyNode = id
            let object = add(.object(keys: [], values: [], required: 0, additional: id))
            let array = add(.array(items: id, minItems: 0, maxItems: nil))
            let string = add(.string(nil)), number = add(.number(integer: false))
            let literal = add(.literal(["false", "null", "true"].map { Array($0.utf8) }))
            nodes[id] = .anyOf([object, array, string, number, literal])
            return id
        }

        func fail(_ path: String, _ reason: String) -> JSONSchemaError { JSONSchemaError(path: path, reason: reason) }

        static func typeNames(_ t: JSONValue) -> [String]? {
            if let s = t.stringValue { return [s] }
            guard let list = t.arrayValue else { return nil }
            let names = list.compactMap(\.stringValue)
            return names.count == list.count && !names.isEmpty ? names : nil
        }

        /// A value's JSON type name ("number" for every number).
        static func kind(_ v: JSONValue) -> String {
            switch v {
            case .object: return "object"
            case .array: return "array"
            case .string: return "string"
            case .bool: return "boolean"
            case .null: return "null"
            case .number: return "number"
            }
        }

        static func isOfType(_ v: JSONValue, _ t: String) -> Bool {
            if case let .number(n) = v, t == "integer" { return Double(n).map { $0.rounded() == $0 } ?? false }
            return kind(v) == t
        }

        /// The JSON types a schema's values may have, when it says so plainly (type, enum or const), else nil.
        static func declaredTypes(_ s: JSONValue) -> Set<String>? {
            if let values = s["enum"]?.arrayValue ?? s["const"].map({ [$0] }) { return Set(values.map(kind)) }
            guard let t = s["type"], let names = typeNames(t) else { return nil }
            return Set(names.map { $0 == "integer" ? "number" : $0 })
        }

        /// The node of `ref` ("#", "#/$defs/Name" or "#/definitions/Name"), compiled once (recursion allowed).
        mutating func reference(_ ref: String, path: String) throws(JSONSchemaError) -> Int {
            if let id = refs[ref] { return id }
            guard ref.hasPrefix("#") else { throw fail(path, "only references within the schema (\"#/$defs/...\") are supported, not \"\(ref)\"") }
            var target: JSONValue? = document
            for part in ref.dropFirst().split(separator: "/") {
                let key = part.replacingOccurrences(of: "~1", with: "/").replacingOccurrences(of: "~0", with: "~")
                target = target?[key]
            }
            guard let target else { throw fail(path, "the reference \"\(ref)\" names nothing in the schema") }
            let id = add(.pending)
            refs[ref] = id
            let body = try compile(target, path: ref)
            nodes[id] = .anyOf([body])
            return id
        }

        mutating func compile(_ s: JSONValue, path: String) throws(JSONSchemaError) -> Int {
            if case let .bool(b) = s {
                guard b else { throw fail(path, "the schema false admits no value") }
                return any()
            }
            guard case let .object(fields) = s else { throw fail(path, "a schema must be an object or a boolean") }
            let keys = Set(fields.map(\.0))
            /// Whether the schema has no keyword but these (and annotations).
            func only(_ allowed: Set<String>) -> Bool { keys.subtracting(JSONSchemaGrammar.annotations).subtracting(allowed).isEmpty }
            if let ref = s["$ref"]?.stringValue {
                guard only(["$ref"]) else {
                    throw fail(path, "$ref beside other keywords is not supported")
                }
                return try reference(ref, path: path)
            }
            if let alternatives = s["anyOf"] ?? s["oneOf"] {
                let key = s["anyOf"] != nil ? "anyOf" : "oneOf"
                guard only([key]) else {
                    throw fail(path, "\(key) beside other keywords is not supported; move them into each alternative")
                }
                guard let list = alternatives.arrayValue, !list.isEmpty else { throw fail("\(path)/\(key)", "must be a non-empty array of schemas") }
                if key == "oneOf" {
                    // Exactly one cannot be checked a byte at a time; it holds when no value can be of two alternatives,
                    // which is sure when their types do not overlap.
                    var seen: Set<String> = []
                    for (i, a) in list.enumerated() {
                        guard let t = Self.declaredTypes(a), seen.isDisjoint(with: t) else {
                            throw fail("\(path)/oneOf/\(i)", "oneOf is enforced only when its alternatives are of different types (one value could match two here); use anyOf")
                        }
                        seen.formUnion(t)
                    }
                }
                var ids: [Int] = []
                for (i, a) in list.enumerated() { ids.append(try compile(a, path: "\(path)/\(key)/\(i)")) }
                return add(.anyOf(ids))
            }
            if let all = s["allOf"] {
                guard let list = all.arrayValue, list.count == 1, only(["allOf"]) else {
                    throw fail(path, "allOf is supported only with one schema and nothing beside it")
                }
                return try compile(list[0], path: "\(path)/allOf/0")
            }
            if let values = s["enum"] ?? s["const"].map({ JSONValue.array([$0]) }) {
                let key = s["enum"] != nil ? "enum" : "const"
                guard only([key, "type"]) else {
                    throw fail(path, "\(key) beside keywords other than type is not supported")
                }
                guard var list = values.arrayValue, !list.isEmpty else { throw fail("\(path)/enum", "must be a non-empty array") }
                if let t = s["type"] {
                    // Only the values of the given types are valid (an integral number counts as an integer, as jsonschema has it).
                    guard let types = Self.typeNames(t) else { throw fail("\(path)/type", "must be a type name or a list of them") }
                    list = list.filter { v in types.contains { Self.isOfType(v, $0) } }
                    guard !list.isEmpty else { throw fail(path, "no value of \(key) is of the type the schema gives") }
                }
                var strings: [[UInt8]] = [], others: [[UInt8]] = []
                for v in list {
                    let text = Array(JSON.serialize(v).utf8)
                    if case .string = v { strings.append(Array(text.dropFirst().dropLast())) } else { others.append(text) }
                }
                var ids: [Int] = []
                if !strings.isEmpty { ids.append(add(.string(Array(Set(strings)).sorted { $0.lexicographicallyPrecedes($1) }))) }
                if !others.isEmpty { ids.append(add(.literal(Array(Set(others)).sorted { $0.lexicographicallyPrecedes($1) }))) }
                return ids.count == 1 ? ids[0] : add(.anyOf(ids))
            }
            let types: [String]
            if let t = s["type"] {
                guard let names = Self.typeNames(t) else { throw fail("\(path)/type", "must be a type name or a list of them") }
                types = names
            } else {
                types = keys.contains("properties") ? ["object"] : keys.contains("items") ? ["array"] : []
            }
            if types.isEmpty {
                let unknown = keys.subtracting(JSONSchemaGrammar.annotations)
                guard unknown.isEmpty else { throw fail(path, "\(unknown.sorted().map { "\"\($0)\"" }.joined(separator: ", ")) without a type is not supported") }
                return any()
            }
            var ids: [Int] = []
            for t in types { ids.append(try compile(type: t, s, keys: keys, path: path)) }
            return ids.count == 1 ? ids[0] : add(.anyOf(ids))
        }

        /// One type of a schema, checking that every constraining keyword present is one this type's node enforces.
        mutating func compile(type t: String, _ s: JSONValue, keys: Set<String>, path: String) throws(JSONSchemaError) -> Int {
            let allowed: Set<String>
            switch t {
            case "object": allowed = ["type", "properties", "required", "additionalProperties"]
            case "array": allowed = ["type", "items", "minItems", "maxItems"]
            case "string", "number", "integer", "boolean", "null": allowed = ["type"]
            default: throw fail("\(path)/type", "unknown type \"\(t)\"")
            }
            // A keyword of another type (a list of types shares one schema) does not apply to this one.
            let ofOtherTypes: Set<String> = ["properties", "required", "additionalProperties", "items", "minItems", "maxItems"]
            let unsupported = keys.subtracting(JSONSchemaGrammar.annotations).subtracting(allowed).subtracting(ofOtherTypes)
            if let k = unsupported.sorted().first {
                throw fail("\(path)/\(k)", "the keyword \"\(k)\" cannot be enforced by constrained decoding here; leave it out")
            }
            switch t {
            case "object":
                var properties: [([UInt8], JSONValue, String)] = []
                if let p = s["properties"] {
                    guard case let .object(list) = p else { throw fail("\(path)/properties", "must be an object") }
                    for (name, schema) in list { properties.append((Array(JSON.serialize(.string(name)).utf8.dropFirst().dropLast()), schema, name)) }
                }
                guard properties.count <= 64 else { throw fail("\(path)/properties", "more than 64 properties in one object are not supported") }
                properties.sort { $0.0.lexicographicallyPrecedes($1.0) }
                var required: UInt64 = 0
                if let r = s["required"], r.arrayValue == nil { throw fail("\(path)/required", "must be a list of property names") }
                for r in s["required"]?.arrayValue ?? [] {
                    guard let name = r.stringValue, let i = properties.firstIndex(where: { $0.2 == name }) else {
                        throw fail("\(path)/required", "\(JSON.serialize(r)) is not one of the properties")
                    }
                    required |= 1 << UInt64(i)
                }
                var values: [Int] = []
                for (_, schema, name) in properties { values.append(try compile(schema, path: "\(path)/properties/\(name)")) }
                var additional: Int?
                switch s["additionalProperties"] {
                case nil, .bool(true)?: additional = any()
                case .bool(false)?: additional = nil
                case let schema?: additional = try compile(schema, path: "\(path)/additionalProperties")
                }
                return add(.object(keys: properties.map(\.0), values: values, required: required, additional: additional))
            case "array":
                let items = try s["items"].map { x throws(JSONSchemaError) in try compile(x, path: "\(path)/items") } ?? any()
                for k in ["minItems", "maxItems"] {
                    if let v = s[k], (v.intValue ?? -1) < 0 { throw fail("\(path)/\(k)", "must be a non-negative integer") }
                }
                let minItems = s["minItems"]?.intValue ?? 0, maxItems = s["maxItems"]?.intValue
                guard minItems <= 4096 else { throw fail("\(path)/minItems", "more than 4096 items cannot be written within a reply") }
                if let m = maxItems, m < minItems { throw fail("\(path)/maxItems", "is below minItems") }
                return add(.array(items: items, minItems: minItems, maxItems: maxItems))
            case "string": return add(.string(nil))
            case "number": return add(.number(integer: false))
            case "integer": return add(.number(integer: true))
            case "boolean": return add(.literal([Array("false".utf8), Array("true".utf8)]))
            default: return add(.literal([Array("null".utf8)]))
            }
        }
    }
}

/// The reply so far against a compiled schema: every way it can still become a value of the schema.
public struct JSONSchemaMatcher: ByteRecognizer {
    public static func == (a: JSONSchemaMatcher, b: JSONSchemaMatcher) -> Bool { a.grammar === b.grammar && a.first == b.first && a.others == b.others }

    public func hash(into h: inout Hasher) {
        h.combine(ObjectIdentifier(grammar))
        h.combine(first)
        h.combine(others)
    }

    /// What one level of the value being written expects next. Payloads are plain numbers, so that copying a matcher
    /// per vocabulary entry allocates nothing until a container opens.
    enum Frame: Hashable {
        /// A value of this node may start (whitespace first).
        case value(Int)
        /// Inside an object of `node`: the properties seen (a bit each), and where in its syntax.
        case object(node: Int, seen: UInt64, phase: ObjectPhase)
        /// Inside a key: properties lo..<hi still match the `typed` bytes after the quote (sorted keys: a range);
        /// `free`: the key may be one the schema does not list (additionalProperties).
        case key(node: Int, seen: UInt64, lo: Int, hi: Int, typed: Int, free: Bool)
        case array(node: Int, count: Int, phase: ArrayPhase)
        /// Inside a string of one of the node's values lo..<hi (an enum), or any string (`lo` = -1), with its escape state.
        case string(node: Int, lo: Int, hi: Int, typed: Int, escape: Int)
        /// `digits`: digits of the current part (integer, fraction or exponent), bounded so that a number cannot run on.
        case number(integer: Bool, state: NumberState, digits: Int)
        /// Inside one of the node's texts lo..<hi.
        case literal(node: Int, lo: Int, hi: Int, typed: Int)
    }

    enum ObjectPhase: Hashable { case keyOrClose, key, colon(property: Int), commaOrClose }
    enum ArrayPhase: Hashable { case valueOrClose, commaOrClose, value }
    typealias NumberState = JSONLex.NumberState

    /// A stack of frames, innermost on top, sharing the frames below the top between copies.
    struct Stack: Hashable {
        var top: Frame?
        var below: Link?
        /// Whitespace bytes in a row (bounded, so that a model cannot pad forever).
        var spaces = 0
        /// Frames below the top (how deep the value being written is nested).
        var depth = 0

        final class Link {
            let frame: Frame
            let below: Link?
            init(_ frame: Frame, _ below: Link?) { self.frame = frame; self.below = below }
        }

        /// Equal stacks have equal frames, compared down to the bottom (shared links at once).
        static func == (a: Stack, b: Stack) -> Bool {
            guard a.top == b.top, a.spaces == b.spaces else { return false }
            var x = a.below, y = b.below
            while true {
                if x === y { return true }
                guard let l = x, let r = y, l.frame == r.frame else { return false }
                x = l.below
                y = r.below
            }
        }

        func hash(into h: inout Hasher) {
            h.combine(top)
            h.combine(spaces)
            var x = below
            while let l = x { h.combine(l.frame); x = l.below }
        }

        mutating func push(_ f: Frame) {
            if let t = top { below = Link(t, below); depth += 1 }
            top = f
        }

        mutating func pop() {
            if below != nil { depth -= 1 }
            top = below?.frame
            below = below?.below
        }

        /// Whitespace allowed in a row here: a line break ("\r\n" at most) and an indentation of four spaces a level of
        /// nesting with one level to spare (inside a container with `depth` containers around it, a key or an item is
        /// indented depth + 1 levels), and at least `maxSpaces`.
        var spaceLimit: Int { max(JSONSchemaMatcher.maxSpaces, 2 + 4 * (depth + 2)) }
    }

    /// Whitespace in a row between tokens, at the least (deeper values get more: Stack.spaceLimit): a small model
    /// left alone pads with newlines and spaces.
    static let maxSpaces = 12
    /// Alternatives followed at once (anyOf); more are dropped (the output stays valid, the choice narrower).
    static let maxStacks = 32

    /// The stacks a byte leads to: usually one, kept inline so that feeding allocates nothing.
    struct Results {
        var first: Stack?
        var rest: [Stack] = []
        mutating func append(_ s: Stack) {
            // Alternatives that reached the same state are one (a list of int | float items would double them each item).
            guard let f = first else { first = s; return }
            if f == s || rest.contains(s) || rest.count >= JSONSchemaMatcher.maxStacks { return }
            rest.append(s)
        }
    }

    let grammar: JSONSchemaGrammar
    var first: Stack?
    var others: [Stack] = []

    public init(_ grammar: JSONSchemaGrammar) {
        self.grammar = grammar
        first = Stack(top: .value(grammar.root))
    }

    /// Whether the bytes so far are a whole value of the schema (a number at the top level ends with whitespace after it).
    public var isComplete: Bool { (first != nil && first!.top == nil) || others.contains { $0.top == nil } }

    public mutating func feed(_ b: UInt8) -> Bool {
        guard let f = first else { return false }
        var out = Results()
        Self.feed(f, b, grammar, into: &out)
        for s in others { Self.feed(s, b, grammar, into: &out) }
        guard out.first != nil else { return false }
        first = out.first
        others = out.rest
        return true
    }

    /// The entries lo..<hi of a sorted list whose byte at `typed` is `b` (they stay a contiguous range).
    static func narrow(_ list: [[UInt8]], _ lo: Int, _ hi: Int, typed: Int, _ b: UInt8) -> (Int, Int) {
        var l = lo
        while l < hi && (list[l].count <= typed || list[l][typed] < b) { l += 1 }
        var h = l
        while h < hi && list[h].count > typed && list[h][typed] == b { h += 1 }
        return (l, h)
    }

    /// The stacks `s` becomes on byte `b` (none: it cannot continue), appended to `out`.
    static func feed(_ s: Stack, _ b: UInt8, _ g: JSONSchemaGrammar, into out: inout Results) {
        var s = s
        let space = JSONLex.isSpace(b)
        guard let top = s.top else {
            // The value is complete: trailing whitespace only.
            if space && s.spaces < s.spaceLimit { s.spaces += 1; out.append(s) }
            return
        }
        // Whitespace between tokens, where a frame is between tokens.
        func between() -> Bool {
            switch top {
            case .value, .object(_, _, .keyOrClose), .object(_, _, .key), .object(_, _, .colon), .object(_, _, .commaOrClose),
                 .array(_, _, .valueOrClose), .array(_, _, .commaOrClose), .array(_, _, .value):
                return true
            default: return false
            }
        }
        if space && between() {
            // None before the value itself starts: the reply begins with it.
            let atStart: Bool
            if case .value = top, s.below == nil { atStart = true } else { atStart = false }
            if s.spaces < s.spaceLimit && !atStart { s.spaces += 1; out.append(s) }
            return
        }
        s.spaces = 0
        switch top {
        case let .value(node):
            start(node, b, s, g, into: &out)
        case let .object(node, seen, phase):
            guard case let .object(keys, values, required, additional) = g.nodes[node] else { return }
            // A key may still come: one not seen yet (at most 64 properties: a bit each), or any with additionalProperties.
            let all: UInt64 = keys.count == 64 ? ~0 : (1 << UInt64(keys.count)) - 1
            let open = seen & all != all || additional != nil
            switch phase {
            case .keyOrClose, .key:
                if b == UInt8(ascii: "\""), open {
                    s.top = .key(node: node, seen: seen, lo: 0, hi: keys.count, typed: 0, free: additional != nil)
                    out.append(s)
                } else if b == UInt8(ascii: "}"), phase == .keyOrClose, required & ~seen == 0 {
                    s.pop()
                    out.append(s)
                }
            case let .colon(property):
                guard b == UInt8(ascii: ":") else { return }
                let child = property >= 0 ? values[property] : additional!
                s.top = .object(node: node, seen: property >= 0 ? seen | (1 << UInt64(property)) : seen, phase: .commaOrClose)
                s.push(.value(child))
                out.append(s)
            case .commaOrClose:
                if b == UInt8(ascii: ","), open {
                    s.top = .object(node: node, seen: seen, phase: .key)
                    out.append(s)
                } else if b == UInt8(ascii: "}"), required & ~seen == 0 {
                    s.pop()
                    out.append(s)
                }
            }
        case let .key(node, seen, lo, hi, typed, free):
            guard case let .object(keys, _, _, _) = g.nodes[node] else { return }
            func unseen(_ i: Int) -> Bool { seen & (1 << UInt64(i)) == 0 }
            if b == UInt8(ascii: "\"") {
                // The key ends: a listed property not yet seen, or (free) a name the schema does not list; never a
                // listed name twice.
                if let i = (lo..<hi).first(where: { keys[$0].count == typed }) {
                    guard unseen(i) else { return }
                    s.top = .object(node: node, seen: seen, phase: .colon(property: i))
                    out.append(s)
                    return
                } else if free {
                    s.top = .object(node: node, seen: seen, phase: .colon(property: -1))
                    out.append(s)
                    return
                }
                // Not an end: an escaped quote inside a listed name (narrowed below like any byte).
            }
            let (l, h) = narrow(keys, lo, hi, typed: typed, b)
            // Another name than the listed ones: plain characters only (no escapes).
            let plain = free && b >= 0x20 && b != UInt8(ascii: "\\")
            // Go on only toward a property not yet seen, or a free name: never into a dead end.
            guard (l..<h).contains(where: unseen) || plain else { return }
            s.top = .key(node: node, seen: seen, lo: l, hi: h, typed: typed + 1, free: plain)
            out.append(s)
        case let .array(node, count, phase):
            guard case let .array(items, minItems, maxItems) = g.nodes[node] else { return }
            let more = maxItems.map { count < $0 } ?? true
            switch phase {
            case .valueOrClose:
                if b == UInt8(ascii: "]") {
                    guard count >= minItems else { return }
                    s.pop()
                    out.append(s)
                } else if more {
                    s.top = .array(node: node, count: count + 1, phase: .commaOrClose)
                    s.push(.value(items))
                    start(items, b, s, g, into: &out)
                }
            case .value:
                guard more else { return }
                s.top = .array(node: node, count: count + 1, phase: .commaOrClose)
                s.push(.value(items))
                start(items, b, s, g, into: &out)
            case .commaOrClose:
                if b == UInt8(ascii: ","), more {
                    s.top = .array(node: node, count: count, phase: .value)
                    out.append(s)
                } else if b == UInt8(ascii: "]"), count >= minItems {
                    s.pop()
                    out.append(s)
                }
            }
        case let .string(node, lo, hi, typed, escape):
            if lo < 0 {
                // Any string: JSON's escapes checked.
                switch escape {
                case 0:
                    if b == UInt8(ascii: "\"") { s.pop(); out.append(s); return }
                    if b == UInt8(ascii: "\\") { s.top = .string(node: node, lo: -1, hi: -1, typed: 0, escape: 1); out.append(s); return }
                    if b >= 0x20 { out.append(s) }
                case 1:
                    if b == UInt8(ascii: "u") { s.top = .string(node: node, lo: -1, hi: -1, typed: 0, escape: 5); out.append(s); return }
                    if JSONLex.isSimpleEscape(b) { s.top = .string(node: node, lo: -1, hi: -1, typed: 0, escape: 0); out.append(s) }
                default:
                    guard JSONLex.isHex(b) else { return }
                    s.top = .string(node: node, lo: -1, hi: -1, typed: 0, escape: escape == 2 ? 0 : escape - 1)
                    out.append(s)
                }
                return
            }
            guard case let .string(values?) = g.nodes[node] else { return }
            // A value's encoding has no bare quote, so a quote ends the string exactly when a value is complete.
            if b == UInt8(ascii: "\""), (lo..<hi).contains(where: { values[$0].count == typed }) {
                s.pop()
                out.append(s)
                return
            }
            let (l, h) = narrow(values, lo, hi, typed: typed, b)
            guard l < h else { return }
            s.top = .string(node: node, lo: l, hi: h, typed: typed + 1, escape: 0)
            out.append(s)
        case let .number(integer, state, digits):
            // Up to 15 digits before the point and after it (f64's precision), 2 in the exponent (f64's range): a digit
            // that stays in its state needs room.
            let room = digits < (state == .exponentSign || state == .exponentDigits ? 2 : 15)
            if let next = state.next(b, integer: integer), next != state || room {
                s.top = .number(integer: integer, state: next, digits: next == state ? digits + 1 : JSONLex.isDigit(b) ? 1 : 0)
                out.append(s)
            } else if state.mayEnd {
                // The number ends before this byte, which belongs to what follows it.
                s.pop()
                feed(s, b, g, into: &out)
            }
        case let .literal(node, lo, hi, typed):
            guard case let .literal(texts) = g.nodes[node] else { return }
            let (l, h) = narrow(texts, lo, hi, typed: typed, b)
            if l < h {
                // Taken; a text complete here with no longer one left ends the value.
                if (l..<h).allSatisfy({ texts[$0].count == typed + 1 }) {
                    s.pop()
                } else {
                    s.top = .literal(node: node, lo: l, hi: h, typed: typed + 1)
                }
                out.append(s)
            } else if (lo..<hi).contains(where: { texts[$0].count == typed }) {
                s.pop()
                feed(s, b, g, into: &out)
            }
        }
    }

    /// A value of `node` starting with `b` (the top frame is `.value(node)`); anyOf follows each alternative.
    static func start(_ node: Int, _ b: UInt8, _ s: Stack, _ g: JSONSchemaGrammar, into out: inout Results) {
        var s = s
        switch g.nodes[node] {
        case let .anyOf(list):
            for alt in list {
                s.top = .value(alt)
                start(alt, b, s, g, into: &out)
            }
        case .object:
            guard b == UInt8(ascii: "{") else { return }
            s.top = .object(node: node, seen: 0, phase: .keyOrClose)
            out.append(s)
        case .array:
            guard b == UInt8(ascii: "[") else { return }
            s.top = .array(node: node, count: 0, phase: .valueOrClose)
            out.append(s)
        case let .string(values):
            guard b == UInt8(ascii: "\"") else { return }
            s.top = .string(node: node, lo: values == nil ? -1 : 0, hi: values?.count ?? -1, typed: 0, escape: 0)
            out.append(s)
        case let .number(integer):
            if b == UInt8(ascii: "-") { s.top = .number(integer: integer, state: .minus, digits: 0) }
            else if b == UInt8(ascii: "0") { s.top = .number(integer: integer, state: .zero, digits: 1) }
            else if JSONLex.isDigit(b) { s.top = .number(integer: integer, state: .integer, digits: 1) }
            else { return }
            out.append(s)
        case let .literal(texts):
            s.top = .literal(node: node, lo: 0, hi: texts.count, typed: 0)
            feed(s, b, g, into: &out)
        case .pending:
            return
        }
    }
}
