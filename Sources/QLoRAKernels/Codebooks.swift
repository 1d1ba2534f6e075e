// The 4-bit and 8-bit code tables of bitsandbytes, index -> value, as f32.

/// The 4-bit data types.
public enum QuantType: String, CaseIterable, Sendable, CustomStringConvertible {
    /// 4-bit NormalFloat (QLoRA paper, section 3): quantiles of N(0, 1), normalized to [-1, 1].
    case nf4
    /// bitsandbytes' 4-bit float (E2M1 with its own table; not sorted by index).
    case fp4
    /// Symmetric 4-bit integers k/7, k in -7...7 (ours, for ablations; not readable by bitsandbytes).
    case int4

    public var description: String { rawValue }

    /// index -> value.
    public var codebook: [Float] {
        switch self {
        case .nf4: return Codebooks.nf4
        case .fp4: return Codebooks.fp4
        case .int4: return Codebooks.int4
        }
    }

    /// Whether bitsandbytes (and so transformers) can load this type.
    public var isBitsandbytesType: Bool { self != .int4 }
}

public enum Codebooks {
    /// bitsandbytes `functional.get_4bit_type("nf4")`; the values are canonical as hard-coded there.
    public static let nf4: [Float] = [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ]

    /// bitsandbytes `get_4bit_type("fp4")`: the E2M1 magnitudes [0, 0.0625, 8, 12, 4, 6, 2, 3] for the
    /// three low bits, negated when bit 3 is set, divided in f32 by their maximum (12). Code 8 is +0.0,
    /// not -0.0: bitsandbytes writes that entry as the integer `-0`.
    public static let fp4: [Float] = {
        let raw: [Float] = [0, 0.0625, 8, 12, 4, 6, 2, 3]
        return (raw + raw.map { $0 == 0 ? 0 : -$0 }).map { $0 / 12 }
    }()

    /// Symmetric Int4: index i -> (i - 8) / 7. Index 0 (-8/7) lies outside [-1, 1] and is never produced.
    public static let int4: [Float] = (0..<16).map { Float($0 - 8) / 7 }

    /// bitsandbytes' signed 8-bit dynamic map (`create_dynamic_map(signed=True)`), used for the nested
    /// quantization of absmax constants. Taken from bitsandbytes 0.50.2's own output and checked against
    /// it by a test (the map's generator depends on torch.linspace's rounding, so the table is canonical).
    public static let dynamic8: [Float] = DynamicMapTable.values

    /// bitsandbytes' unsigned 8-bit dynamic map (`create_dynamic_map(signed=False)`): the code of the
    /// second moment in 8-bit Adam. Taken from bitsandbytes 0.50.2's own output, like `dynamic8`.
    public static let dynamic8Unsigned: [Float] = DynamicMapTable.unsignedValues
}

/// Midpoints and index order for quantizing to a 4-bit table by nearest value.
struct Quantize4Tables {
    /// 15 ascending decision thresholds (midpoints of adjacent sorted codes, computed in f32).
    let thresholds: [Float]
    /// sorted position -> code index.
    let remap: [UInt8]

    init(codebook: [Float]) {
        // Sort by value, ties by index (a stable sort, as torch.argsort gives for FP4's +0 and -0).
        let order = codebook.indices.sorted { (codebook[$0], $0) < (codebook[$1], $1) }
        thresholds = (0..<15).map { (codebook[order[$0]] + codebook[order[$0 + 1]]) / 2 }
        remap = order.map { UInt8($0) }
    }

    static let nf4 = Quantize4Tables(codebook: Codebooks.nf4)
    static let fp4 = Quantize4Tables(codebook: Codebooks.fp4)
    static let int4 = Quantize4Tables(codebook: Codebooks.int4)

    static func forType(_ t: QuantType) -> Quantize4Tables {
        switch t {
        case .nf4: return nf4
        case .fp4: return fp4
        case .int4: return int4
        }
    }
}
