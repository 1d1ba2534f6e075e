// The bf16 matrix multiply of the training step (QLoRA's bf16 compute dtype): A converted to bf16 rows
// once, B packed into 32-column panels of bf16 pairs, C accumulated in f32 by the AVX512-BF16 kernel
// (CKernels/bf16gemm.c), which runs at twice the f32 FMA rate. The scalar reference defines the results.
// Which of the two runs is a field of the kernel table (`KernelTable.bf16`): nil where the CPU lacks
// AVX512-BF16, and callers then compute in f32; a test can put the scalar reference there on any CPU
// (`KernelTable.withBF16(.reference)`) to run the bf16 paths, slowly, where the fast kernels cannot.
import CKernels
import QLoRACore

/// The bf16 kernels of one implementation: conversion to bf16 rows (plain and transposed), packing of B, the
/// product, and decoding's 4-bit product (its inputs reordered and rounded once, each weight rounded as it is decoded).
public struct BF16Kernels: Sendable {
    public let name: String
    let convertRows: @convention(c) (UnsafePointer<Float>?, Int, Int, Int, UnsafeMutablePointer<UInt16>?, Int) -> Void
    let convertTransposed: @convention(c) (UnsafePointer<Float>?, Int, Int, Int, UnsafeMutablePointer<UInt16>?, Int) -> Void
    let packB: @convention(c) (UnsafePointer<Float>?, Int, Int32, Int, Int, Int, Int, UnsafeMutablePointer<UInt32>?) -> Void
    let gemm: @convention(c) (UnsafePointer<UInt16>?, Int, UnsafePointer<UInt32>?, Int, Int, UnsafeMutablePointer<Float>?, Int,
                              Int, Int, Int, Int, Float, Int32) -> Void
    /// Decoding's 4-bit products in bf16 (CKernelsGemv.h, qk_gemm4_bf16): inputs reordered and rounded, and the product.
    public let gemm4Prepare: @convention(c) (UnsafePointer<Float>?, Int, UnsafeMutablePointer<UInt16>?) -> Void
    let gemm4: @convention(c) (UnsafePointer<UInt16>?, Int, UnsafePointer<UInt8>?, UnsafePointer<qk_block_scales>?, Int, Int, Int, Int,
                               UnsafePointer<Float>?, UnsafeMutablePointer<Float>?, Int) -> Void

    /// The scalar references (any CPU; they define the results).
    public static let reference = BF16Kernels(name: "reference", convertRows: qk_bf16_convert_rows_reference,
                                              convertTransposed: qk_bf16_convert_transposed_reference,
                                              packB: qk_bf16_pack_b_reference, gemm: qk_bf16_gemm_reference,
                                              gemm4Prepare: qk_gemm4_bf16_prepare_reference, gemm4: qk_gemm4_bf16_reference)

    /// The AVX512-BF16 kernels, or nil where this CPU cannot run them.
    public static let avx512bf16: BF16Kernels? = qk_cpu_supports_bf16() != 0
        ? BF16Kernels(name: "avx512bf16", convertRows: qk_bf16_convert_rows_avx512bf16,
                      convertTransposed: qk_bf16_convert_transposed_avx512bf16,
                      packB: qk_bf16_pack_b_avx512bf16, gemm: qk_bf16_gemm_avx512bf16,
                      gemm4Prepare: qk_gemm4_bf16_prepare_avx512bf16, gemm4: qk_gemm4_bf16_avx512bf16)
        : nil

    /// The process-wide table's bf16 kernels, or the reference where it has none.
    public static var `default`: BF16Kernels { KernelTable.current.bf16 ?? .reference }
}

public enum BF16Gemm {
    /// Whether the process-wide kernel table has fast bf16 products: this CPU has AVX512-BF16 and
    /// QLORA_KERNELS does not force a level below avx512 (forcing `reference` or `avx2` turns them off, and
    /// training then computes in f32).
    public static var isSupported: Bool { KernelTable.current.bf16 != nil }

    /// Columns per packed panel.
    public static let panelWidth = Int(QK_BF16_NR)

    /// Row length of a converted A of `k` columns (rounded up to even: the kernel reads pairs).
    @inlinable public static func paddedCount(_ k: Int) -> Int { (k + 1) & ~1 }

    /// UInt32 words of a packed B of k x n.
    public static func packedWords(k: Int, n: Int) -> Int { Int(qk_bf16_packed_words(k, n)) }

    /// dst[r][c] = bf16(src[r * ld + c]) (round to nearest even), rows padded to even length with 0.
    public static func convert(_ src: UnsafePointer<Float>, rows: Int, cols: Int, ld: Int, into dst: UnsafeMutablePointer<UInt16>, ldd: Int,
                               parallel: Bool = true, kernels: BF16Kernels = .default) {
        precondition(ldd >= paddedCount(cols))
        forChunks(parallel, count: rows, minimumChunk: max(1, 16_384 / max(cols, 1))) { range in
            let s = src + range.lowerBound * ld, d = dst + range.lowerBound * ldd
            kernels.convertRows(s, range.count, cols, ld, d, ldd)
        }
    }

    /// Packs B (k x n) from f32: `transposed` when B is stored [n][ldb] (a weight W for C = A Wᵀ), else [k][ldb].
    public static func packB(_ b: UnsafePointer<Float>, ldb: Int, transposed: Bool, k: Int, n: Int, into packed: UnsafeMutablePointer<UInt32>,
                             parallel: Bool = true, kernels: BF16Kernels = .default) {
        let panels = (n + panelWidth - 1) / panelWidth
        forChunks(parallel, count: panels, minimumChunk: max(1, 8192 / max(k, 1))) { range in
            kernels.packB(b, ldb, transposed ? 1 : 0, k, n, range.lowerBound, range.upperBound, packed)
        }
    }

    /// C[m, n] = alpha · A[m, k] · B[k, n] (+ C when `accumulate`), A as converted bf16 rows (row stride lda), B packed; products of
    /// bf16 values summed in f32. Splits rows among threads, or panels when there are few rows.
    public static func gemm(_ c: UnsafeMutablePointer<Float>, ldc: Int, _ a: UnsafePointer<UInt16>, lda: Int, _ packed: UnsafePointer<UInt32>,
                            m: Int, n: Int, k: Int, alpha: Float = 1, accumulate: Bool, parallel: Bool = true,
                            kernels: BF16Kernels = .default) {
        guard m > 0, n > 0 else { return }
        let panels = (n + panelWidth - 1) / panelWidth
        let mr = Int(QK_BF16_MR)
        let acc: Int32 = accumulate ? 1 : 0
        func run(_ m0: Int, _ m1: Int, _ p0: Int, _ p1: Int) {
            kernels.gemm(a, lda, packed, k, n, c, ldc, m0, m1, p0, p1, alpha, acc)
        }
        let work = m * n * k
        if !parallel || work < 1 << 18 || Parallel.threadCount == 1 {
            run(0, m, 0, panels)
        } else if m >= 8 * mr * Parallel.threadCount {
            Parallel.forChunks(count: m, granularity: mr) { _, range in run(range.lowerBound, range.upperBound, 0, panels) }
        } else {
            Parallel.forChunks(count: panels) { _, range in run(0, m, range.lowerBound, range.upperBound) }
        }
    }

    /// The transpose of src [rows, cols] (row stride ld) as bf16 rows: dst[c][r] = bf16(src[r * ld + c]),
    /// each of the `cols` rows padded to even length with 0 (ldd >= paddedCount(rows)). For the small
    /// operands of attention's backward (a head's Q or dO, d x T). On the calling thread.
    public static func convertTransposed(_ src: UnsafePointer<Float>, rows: Int, cols: Int, ld: Int, into dst: UnsafeMutablePointer<UInt16>,
                                         ldd: Int, kernels: BF16Kernels = .default) {
        precondition(ldd >= paddedCount(rows))
        kernels.convertTransposed(src, rows, cols, ld, dst, ldd)
    }

    private static func forChunks(_ parallel: Bool, count: Int, minimumChunk: Int, _ body: (Range<Int>) -> Void) {
        if parallel {
            Parallel.forChunks(count: count, minimumChunk: minimumChunk) { _, range in body(range) }
        } else if count > 0 {
            body(0..<count)
        }
    }
}
