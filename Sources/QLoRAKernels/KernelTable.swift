// One dispatch table for the C kernels, picked once per process: the best level the CPU supports,
// or the one forced by QLORA_KERNELS=reference|avx2|avx512 (for tests and triage).
import CKernels
import QLoRACore

/// Instruction-set level of a kernel set.
public enum KernelLevel: Int, CaseIterable, Sendable, CustomStringConvertible {
    case reference = 0
    case avx2 = 1
    case avx512 = 2

    public var description: String {
        switch self {
        case .reference: return "reference"
        case .avx2: return "avx2"
        case .avx512: return "avx512"
        }
    }

    /// Whether this CPU can run this level.
    public var isSupported: Bool { qk_cpu_supports(Int32(rawValue)) != 0 }

    public init?(name: String) {
        guard let level = KernelLevel.allCases.first(where: { $0.description == name.lowercased() }) else { return nil }
        self = level
    }
}

public typealias Quantize4Function = @convention(c) (
    UnsafePointer<Float>?, Int, Int, UnsafePointer<Float>?, UnsafePointer<UInt8>?, UnsafeMutablePointer<UInt8>?,
    UnsafeMutablePointer<Float>?
) -> Int64
public typealias Dequantize4Function = @convention(c) (
    UnsafePointer<UInt8>?, UnsafePointer<Float>?, Int, Int, UnsafePointer<Float>?, UnsafeMutablePointer<Float>?
) -> Void
public typealias Dot4Function = @convention(c) (
    UnsafePointer<Float>?, UnsafePointer<UInt8>?, UnsafePointer<Float>?, Int, Int, UnsafePointer<Float>?
) -> Float

public typealias Gemv4PrepareFunction = @convention(c) (UnsafePointer<Float>?, Int, UnsafeMutablePointer<Float>?) -> Void
typealias Gemm4Function = @convention(c) (
    UnsafePointer<Float>?, UnsafePointer<Float>?, Int, UnsafePointer<UInt8>?, UnsafePointer<qk_block_scales>?, Int, Int, Int, Int,
    UnsafePointer<Float>?, UnsafeMutablePointer<Float>?, Int
) -> Void
public typealias Gemm8Function = @convention(c) (
    UnsafePointer<Float>?, Int, UnsafePointer<Int8>?, UnsafePointer<Float>?, Int, Int, UnsafeMutablePointer<Float>?, Int
) -> Void
public typealias GemmBF16Function = @convention(c) (UnsafePointer<Float>?, Int, UnsafePointer<UInt16>?, Int, Int, UnsafeMutablePointer<Float>?, Int) -> Void
public typealias Gemv8Function = @convention(c) (UnsafePointer<Float>?, UnsafePointer<Int8>?, UnsafePointer<Float>?, Int, Int, UnsafeMutablePointer<Float>?) -> Void
public typealias GemvBF16Function = @convention(c) (UnsafePointer<Float>?, UnsafePointer<UInt16>?, Int, Int, UnsafeMutablePointer<Float>?) -> Void

public typealias SoftmaxRowFunction = @convention(c) (UnsafeMutablePointer<Float>?, Int, Int) -> Void
public typealias AttendFunction = @convention(c) (
    UnsafePointer<Float>?, Int, UnsafePointer<Float>?, UnsafePointer<Float>?, Int, Int, Int, Float, UnsafeMutablePointer<Float>?,
    UnsafeMutablePointer<Float>?, UnsafeMutablePointer<Float>?
) -> Void
public typealias Attend16Function = @convention(c) (
    UnsafePointer<Float>?, Int, UnsafePointer<UInt16>?, UnsafePointer<UInt16>?, Int, Int, Int, Float, UnsafeMutablePointer<Float>?,
    UnsafeMutablePointer<Float>?, UnsafeMutablePointer<Float>?, Int32
) -> Void
public typealias KVNarrowFunction = @convention(c) (UnsafePointer<Float>?, UnsafeMutablePointer<UInt16>?, Int, Int32) -> Void
public typealias KVWidenFunction = @convention(c) (UnsafePointer<UInt16>?, UnsafeMutablePointer<Float>?, Int, Int32) -> Void
public typealias SwiGLUFunction = @convention(c) (UnsafeMutablePointer<Float>?, UnsafePointer<Float>?, UnsafePointer<Float>?, Int) -> Void
public typealias SwiGLUBackwardFunction = @convention(c) (
    UnsafeMutablePointer<Float>?, UnsafeMutablePointer<Float>?, UnsafePointer<Float>?, UnsafePointer<Float>?, UnsafePointer<Float>?, Int
) -> Void
public typealias CrossEntropyRowFunction = @convention(c) (UnsafeMutablePointer<Float>?, Int, Int, Float) -> Double
public typealias DropoutFunction = @convention(c) (UnsafePointer<Float>?, UnsafeMutablePointer<UInt8>?, UnsafeMutablePointer<Float>?, Int, UInt64, UInt32, Float) -> Void

/// The kernels of one instruction-set level.
public struct KernelTable: Sendable {
    public let level: KernelLevel
    public let quantize4: Quantize4Function
    public let dequantize4: Dequantize4Function
    public let dot4: Dot4Function
    /// Decoding's matrix-vector products (CKernelsGemv.h): q8_0 rows, bf16 rows, and x prepared once by
    /// gemv4Prepare for 4-bit rows.
    public let gemv4Prepare: Gemv4PrepareFunction
    public let gemv8: Gemv8Function
    public let gemvBF16: GemvBF16Function
    /// The same products for any number of inputs (batched decoding; one input runs the matrix-vector
    /// kernel): each weight is read once for all. 4-bit rows through Quantized4Bit.gemm.
    let gemm4: Gemm4Function
    public let gemm8: Gemm8Function
    public let gemmBF16: GemmBF16Function
    public let softmaxRow: SoftmaxRowFunction
    /// Decoding's attention: the query heads of one key-value head over its cached positions.
    public let attend: AttendFunction
    /// The same over a 16-bit cache (CKernelsKV.h), and the cache's conversions from and to f32.
    public let attend16: Attend16Function
    public let kvNarrow: KVNarrowFunction
    public let kvWiden: KVWidenFunction
    public let swiglu: SwiGLUFunction
    public let swigluBackward: SwiGLUBackwardFunction
    /// GeGLU with GELU's tanh approximation (Gemma), forward and backward, of SwiGLU's signatures.
    public let geglu: SwiGLUFunction
    public let gegluBackward: SwiGLUBackwardFunction
    public let crossEntropyRow: CrossEntropyRowFunction
    public let dropout: DropoutFunction
    /// The bf16 products of the `bf16` compute dtype (BF16Gemm), or nil where they would not be fast (no
    /// AVX512-BF16, or a level below avx512): callers then compute in f32. `withBF16` replaces them.
    public private(set) var bf16: BF16Kernels?

    /// The table for `level`, or nil if this CPU cannot run it.
    public static func forLevel(_ level: KernelLevel) -> KernelTable? {
        guard level.isSupported else { return nil }
        switch level {
        case .reference:
            return KernelTable(level: level, quantize4: qk_quantize4_reference, dequantize4: qk_dequantize4_reference, dot4: qk_dot4_reference,
                               gemv4Prepare: qk_gemv4_prepare_reference, gemv8: qk_gemv8_reference,
                               gemvBF16: qk_gemv_bf16_reference,
                               gemm4: qk_gemm4_reference, gemm8: qk_gemm8_reference, gemmBF16: qk_gemm_bf16_reference,
                               softmaxRow: qk_softmax_row_reference, attend: qk_attend_reference, attend16: qk_attend16_reference, kvNarrow: qk_kv_narrow_reference, kvWiden: qk_kv_widen_reference,
                               swiglu: qk_swiglu_reference, swigluBackward: qk_swiglu_backward_reference,
                               geglu: qk_geglu_reference, gegluBackward: qk_geglu_backward_reference,
                               crossEntropyRow: qk_cross_entropy_row_reference, dropout: qk_dropout_reference, bf16: nil)
        case .avx2:
            return KernelTable(level: level, quantize4: qk_quantize4_avx2, dequantize4: qk_dequantize4_avx2, dot4: qk_dot4_avx2,
                               gemv4Prepare: qk_gemv4_prepare_avx2, gemv8: qk_gemv8_avx2, gemvBF16: qk_gemv_bf16_avx2,
                               gemm4: qk_gemm4_avx2, gemm8: qk_gemm8_avx2, gemmBF16: qk_gemm_bf16_avx2,
                               softmaxRow: qk_softmax_row_avx2, attend: qk_attend_avx2, attend16: qk_attend16_avx2, kvNarrow: qk_kv_narrow_avx2, kvWiden: qk_kv_widen_avx2,
                               swiglu: qk_swiglu_avx2, swigluBackward: qk_swiglu_backward_avx2,
                               geglu: qk_geglu_avx2, gegluBackward: qk_geglu_backward_avx2,
                               crossEntropyRow: qk_cross_entropy_row_avx2, dropout: qk_dropout_avx2, bf16: nil)
        case .avx512:
            return KernelTable(level: level, quantize4: qk_quantize4_avx512, dequantize4: qk_dequantize4_avx512, dot4: qk_dot4_avx512,
                               gemv4Prepare: qk_gemv4_prepare_avx512, gemv8: qk_gemv8_avx512,
                               gemvBF16: qk_gemv_bf16_avx512,
                               gemm4: qk_gemm4_avx512, gemm8: qk_gemm8_avx512, gemmBF16: qk_gemm_bf16_avx512,
                               softmaxRow: qk_softmax_row_avx512, attend: qk_attend_avx512, attend16: qk_attend16_avx512, kvNarrow: qk_kv_narrow_avx2, kvWiden: qk_kv_widen_avx2,
                               swiglu: qk_swiglu_avx512, swigluBackward: qk_swiglu_backward_avx512,
                               geglu: qk_geglu_avx512, gegluBackward: qk_geglu_backward_avx512,
                               crossEntropyRow: qk_cross_entropy_row_avx512, dropout: qk_dropout_avx512,
                               bf16: BF16Kernels.avx512bf16)
        }
    }

    /// This table with other bf16 kernels: `.reference` runs every bf16 path on the scalar references on
    /// any CPU (tests), nil computes in f32.
    public func withBF16(_ kernels: BF16Kernels?) -> KernelTable {
        var t = self
        t.bf16 = kernels
        return t
    }

    /// Every level this CPU supports, reference first.
    public static var available: [KernelTable] { KernelLevel.allCases.compactMap(forLevel) }

    /// The environment variable that forces a level.
    public static let environmentVariable = "QLORA_KERNELS"

    /// The process-wide table: the best supported level, unless QLORA_KERNELS names another.
    public static let current: KernelTable = {
        let best = available.last!
        guard let forced = Environment.get(environmentVariable), !forced.isEmpty else { return best }
        guard let level = KernelLevel(name: forced) else {
            Log.info("warning: \(environmentVariable)=\(forced) is not one of reference, avx2, avx512; using \(best.level)")
            return best
        }
        guard let table = forLevel(level) else {
            Log.info("warning: \(environmentVariable)=\(forced) is not supported by this CPU; using \(best.level)")
            return best
        }
        return table
    }()
}
