// The bitsandbytes 4-bit checkpoint layout, as transformers saves a model loaded with
// BitsAndBytesConfig(load_in_4bit=True) (bitsandbytes QuantState.as_dict(packed=True)). For a linear
// weight `P.weight` the file holds:
//   P.weight                                  U8 [(n+1)/2, 1]  packed codes, first element high nibble
//   P.weight.absmax                           U8 [blocks] when double-quantized, else F32 [blocks]
//   P.weight.quant_map                        F32 [16]         the 4-bit code table
//   P.weight.nested_absmax                    F32 [ceil(blocks/256)]   (double quantization only)
//   P.weight.nested_quant_map                 F32 [256]        the 8-bit dynamic map (ditto)
//   P.weight.quant_state.bitsandbytes__nf4    U8 [len]         UTF-8 JSON: quant_type, blocksize,
//        dtype, shape, and when nested nested_blocksize, nested_dtype, nested_offset
import QLoRACore
import QLoRAFormats
import QLoRAKernels

/// The JSON part of a bitsandbytes quant state.
public struct BnBQuantState: Equatable, Sendable {
    public var quantType: QuantType
    public var blockSize: Int
    /// The weight's dtype before quantization ("float32", "bfloat16", "float16").
    public var dtype: String
    public var shape: [Int]
    public var nestedBlockSize: Int?
    public var nestedDType: String?
    public var nestedOffset: Float?

    /// The key suffix after "quant_state." for this type. Int4 is ours, so it gets our own prefix.
    public var keySuffix: String {
        quantType == .int4 ? "swiftqlora__int4" : "bitsandbytes__\(quantType.rawValue)"
    }

    /// JSON bytes in bitsandbytes' key order and Python json.dumps spacing.
    public func jsonBytes() -> [UInt8] {
        var fields: [(String, JSONValue)] = [
            ("quant_type", .string(quantType.rawValue)),
            ("blocksize", .int(blockSize)),
            ("dtype", .string(dtype)),
            ("shape", .array(shape.map { .int($0) })),
        ]
        if let nestedBlockSize, let nestedDType, let nestedOffset {
            fields.append(("nested_blocksize", .int(nestedBlockSize)))
            fields.append(("nested_dtype", .string(nestedDType)))
            fields.append(("nested_offset", .number(pythonRepr(Double(nestedOffset)))))
        }
        return Array(Self.pythonStyle(.object(fields)).utf8)
    }

    /// json.dumps with its default separators (", " and ": ").
    static func pythonStyle(_ v: JSONValue) -> String {
        switch v {
        case let .array(items): return "[" + items.map(pythonStyle).joined(separator: ", ") + "]"
        case let .object(entries):
            return "{" + entries.map { JSON.serialize(.string($0.0)) + ": " + pythonStyle($0.1) }.joined(separator: ", ") + "}"
        default: return JSON.serialize(v)
        }
    }

    /// Parses the quant-state JSON of tensor `name` in `file`.
    public init(json bytes: [UInt8], file: String, tensor: String) throws {
        func bad(_ reason: String) -> FormatError { .invalidQuantState(file: file, tensor: tensor, reason: reason) }
        let v: JSONValue
        do { v = try JSON.parse(bytes) } catch { throw bad("quant state is not valid JSON: \(error)") }
        guard let qt = v["quant_type"]?.stringValue else { throw bad("quant state has no quant_type") }
        guard let type = QuantType(rawValue: qt) else { throw bad("unsupported quant_type '\(qt)' (supported: nf4, fp4, int4)") }
        guard let bs = v["blocksize"]?.intValue, Quantized4Bit.blockSizes.contains(bs) else {
            throw bad("quant state blocksize must be a power of two from 32 to 4096")
        }
        guard let shapeValues = v["shape"]?.arrayValue else { throw bad("quant state has no shape") }
        var shape: [Int] = []
        for d in shapeValues {
            guard let x = d.intValue, x >= 0 else { throw bad("quant state shape must hold non-negative integers") }
            shape.append(x)
        }
        guard checkedElementCount(shape) != nil else { throw bad("quant state shape overflows") }
        quantType = type
        blockSize = bs
        dtype = v["dtype"]?.stringValue ?? "float32"
        self.shape = shape
        if let nb = v["nested_blocksize"] {
            guard let nbs = nb.intValue, nbs > 0 else { throw bad("nested_blocksize must be a positive integer") }
            guard let off = v["nested_offset"]?.doubleValue else { throw bad("nested quant state has no nested_offset") }
            nestedBlockSize = nbs
            nestedDType = v["nested_dtype"]?.stringValue ?? "float32"
            nestedOffset = Float(off)
        }
    }

    public init(quantType: QuantType, blockSize: Int, dtype: String, shape: [Int], nestedOffset: Float?) {
        self.quantType = quantType
        self.blockSize = blockSize
        self.dtype = dtype
        self.shape = shape
        if let nestedOffset {
            nestedBlockSize = NestedAbsmax.blockSize
            nestedDType = "float32"
            self.nestedOffset = nestedOffset
        }
    }
}

/// Python's repr of a float: the shortest string that round-trips (Swift's description matches it
/// for finite values, except that Swift writes 1e-05 as "1e-05" too, and both write "0.1").
func pythonRepr(_ d: Double) -> String {
    var s = "\(d)"
    if s.hasSuffix(".0") == false, !s.contains("."), !s.contains("e"), !s.contains("n"), !s.contains("i") { s += ".0" }
    return s
}

/// Torch's name of a safetensors dtype, as bitsandbytes writes it in a quant state.
func torchDTypeName(_ d: DType) -> String {
    switch d {
    case .bf16: return "bfloat16"
    case .f16: return "float16"
    default: return "float32"
    }
}

public enum BnB4bit {
    /// The quant-state tensor of weight `name`, if the collection holds `name` in bitsandbytes form.
    public static func quantStateName(for name: String, in tensors: TensorCollection) -> String? {
        for t in QuantType.allCases {
            let candidate = name + ".quant_state." + BnBQuantState(quantType: t, blockSize: 64, dtype: "", shape: [], nestedOffset: nil).keySuffix
            if tensors.contains(candidate) { return candidate }
        }
        return nil
    }

    /// Names of the tensors a quantized weight is stored as (weight first).
    public static func tensorNames(for name: String, state: BnBQuantState) -> [String] {
        var names = [name, name + ".absmax", name + ".quant_map"]
        if state.nestedOffset != nil { names += [name + ".nested_absmax", name + ".nested_quant_map"] }
        names.append(name + ".quant_state." + state.keySuffix)
        return names
    }

    /// The tensors to write for `q` stored under weight name `name`.
    public static func tensors(for q: Quantized4Bit, name: String, sourceDType: DType) -> [(String, TensorView)] {
        let state = BnBQuantState(quantType: q.quantType, blockSize: q.blockSize, dtype: torchDTypeName(sourceDType),
                                  shape: q.shape, nestedOffset: q.nested?.offset)
        var out: [(String, TensorView)] = [
            (name, .make(q.packed, dtype: .u8, shape: [q.packed.count, 1])),
        ]
        if let nested = q.nested {
            out.append((name + ".absmax", .make(nested.codes, dtype: .u8, shape: [nested.codes.count])))
            out.append((name + ".quant_map", .make(q.quantType.codebook, dtype: .f32, shape: [16])))
            out.append((name + ".nested_absmax", .make(nested.nestedAbsmax, dtype: .f32, shape: [nested.nestedAbsmax.count])))
            out.append((name + ".nested_quant_map", .make(Codebooks.dynamic8, dtype: .f32, shape: [256])))
        } else {
            let absmax = q.absmax!
            out.append((name + ".absmax", .make(absmax, dtype: .f32, shape: [absmax.count])))
            out.append((name + ".quant_map", .make(q.quantType.codebook, dtype: .f32, shape: [16])))
        }
        let json = state.jsonBytes()
        out.append((name + ".quant_state." + state.keySuffix, .make(json, dtype: .u8, shape: [json.count])))
        return out
    }

    /// Reads a quantized weight stored in bitsandbytes form, checking every size against the state.
    public static func load(_ name: String, from tensors: TensorCollection) throws -> (Quantized4Bit, BnBQuantState) {
        guard let stateName = quantStateName(for: name, in: tensors), let stateTensor = tensors.tensor(stateName) else {
            throw FormatError.invalidQuantState(file: tensors.path, tensor: name, reason: "no quant_state tensor for this weight")
        }
        let file = tensors.file(of: stateName) ?? tensors.path
        let state = try BnBQuantState(json: stateTensor.byteArray(), file: file, tensor: stateName)
        func need(_ suffix: String, _ dtype: DType, _ count: Int) throws -> TensorView {
            let full = name + suffix
            guard let t = tensors.tensor(full) else {
                throw FormatError.invalidQuantState(file: file, tensor: full, reason: "missing (needed by \(stateName))")
            }
            guard t.dtype == dtype, t.elementCount == count else {
                throw FormatError.invalidQuantState(
                    file: tensors.file(of: full) ?? file, tensor: full,
                    reason: "expected \(dtype) with \(count) elements, found \(t.dtype) \(t.shape)")
            }
            return t
        }
        let n = checkedElementCount(state.shape)!
        let blocks = (n + state.blockSize - 1) / state.blockSize
        let packed = try need("", .u8, (n + 1) / 2).byteArray()
        let quantMap = try need(".quant_map", .f32, 16).values(as: Float.self)
        guard quantMap == state.quantType.codebook else {
            throw FormatError.invalidQuantState(file: file, tensor: name + ".quant_map",
                                                reason: "code table differs from the standard \(state.quantType) table")
        }
        var q = Quantized4Bit(quantType: state.quantType, blockSize: state.blockSize, shape: state.shape, packed: packed, absmax: nil, nested: nil)
        if let offset = state.nestedOffset {
            let nb = state.nestedBlockSize ?? NestedAbsmax.blockSize
            guard nb == NestedAbsmax.blockSize else {
                throw FormatError.invalidQuantState(file: file, tensor: stateName, reason: "nested_blocksize \(nb) is not supported (256)")
            }
            let codes = try need(".absmax", .u8, blocks).byteArray()
            let nestedAbsmax = try need(".nested_absmax", .f32, (blocks + nb - 1) / nb).values(as: Float.self)
            let nestedMap = try need(".nested_quant_map", .f32, 256).values(as: Float.self)
            guard nestedMap == Codebooks.dynamic8 else {
                throw FormatError.invalidQuantState(file: file, tensor: name + ".nested_quant_map",
                                                    reason: "nested code table differs from bitsandbytes' dynamic map")
            }
            q.nested = NestedAbsmax(codes: codes, nestedAbsmax: nestedAbsmax, offset: offset)
        } else {
            q.absmax = try need(".absmax", .f32, blocks).values(as: Float.self)
        }
        return (q, state)
    }
}
