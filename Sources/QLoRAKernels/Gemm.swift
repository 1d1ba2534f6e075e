// Single-precision matrix multiply: every GEMM in the package goes through `gemm`, which calls BLAS
// (OpenBLAS on Linux, Accelerate on Apple platforms); `gemmReference` is the triple loop the tests
// compare it with. Row-major throughout.
#if canImport(Accelerate)
import Accelerate
#else
import CBLAS
#endif
import QLoRACore

public enum Gemm {
    /// C[M, N] = alpha * op(A) * op(B) + beta * C, row-major, where op(A) is [M, K] and op(B) is [K, N].
    /// With `transposeB`, B is stored [N, K] (the layout of a linear layer's weight).
    public static func gemm(
        _ c: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>,
        m: Int, n: Int, k: Int, transposeA: Bool = false, transposeB: Bool = false,
        alpha: Float = 1, beta: Float = 0
    ) {
        guard m > 0, n > 0 else { return }
        let lda = transposeA ? m : k
        let ldb = transposeB ? k : n
        cblas_sgemm(
            CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
            Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(n))
    }

    /// `gemm` with explicit leading dimensions (row strides, in elements) for sub-matrices.
    public static func gemm(
        _ c: UnsafeMutablePointer<Float>, ldc: Int, _ a: UnsafePointer<Float>, lda: Int, _ b: UnsafePointer<Float>, ldb: Int,
        m: Int, n: Int, k: Int, transposeA: Bool = false, transposeB: Bool = false, alpha: Float = 1, beta: Float = 0
    ) {
        guard m > 0, n > 0 else { return }
        cblas_sgemm(
            CblasRowMajor, transposeA ? CblasTrans : CblasNoTrans, transposeB ? CblasTrans : CblasNoTrans,
            Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }

    /// `gemm` split into one BLAS call per thread of our own (`Parallel`), over the rows of C or, when it
    /// has fewer rows than columns, over its columns. For use while BLAS runs single-threaded
    /// (`withSingleThreadedBLAS`), so that one set of threads owns the cores.
    public static func parallelGemm(
        _ c: UnsafeMutablePointer<Float>, ldc: Int, _ a: UnsafePointer<Float>, lda: Int, _ b: UnsafePointer<Float>, ldb: Int,
        m: Int, n: Int, k: Int, transposeA: Bool = false, transposeB: Bool = false, alpha: Float = 1, beta: Float = 0
    ) {
        guard m > 0, n > 0 else { return }
        if Parallel.threadCount == 1 || m * n * max(k, 1) < 1 << 17 {
            gemm(c, ldc: ldc, a, lda: lda, b, ldb: ldb, m: m, n: n, k: k, transposeA: transposeA, transposeB: transposeB, alpha: alpha, beta: beta)
        } else if m >= n {
            Parallel.forChunks(count: m, granularity: 16) { _, r in
                gemm(c + r.lowerBound * ldc, ldc: ldc, a + (transposeA ? r.lowerBound : r.lowerBound * lda), lda: lda, b, ldb: ldb,
                     m: r.count, n: n, k: k, transposeA: transposeA, transposeB: transposeB, alpha: alpha, beta: beta)
            }
        } else {
            Parallel.forChunks(count: n, granularity: 16) { _, r in
                gemm(c + r.lowerBound, ldc: ldc, a, lda: lda, b + (transposeB ? r.lowerBound * ldb : r.lowerBound), ldb: ldb,
                     m: m, n: r.count, k: k, transposeA: transposeA, transposeB: transposeB, alpha: alpha, beta: beta)
            }
        }
    }

    /// Runs `body` with BLAS on the calling thread only, restoring its thread count after. OpenBLAS's
    /// idle workers spin (sched_yield) for a while after each call and take cycles from our own parallel
    /// loops; inside, the callers parallelize with `Parallel` instead. (Accelerate: no effect.)
    /// OpenBLAS's thread count is process-wide, so the scopes of all threads are counted together: the
    /// first to enter sets one thread, the last to leave restores the count, and a scope that overlaps
    /// another one's end keeps BLAS single-threaded to its own end.
    public static func withSingleThreadedBLAS<R>(_ body: () throws -> R) rethrows -> R {
        #if canImport(Accelerate)
        return try body()
        #else
        return try singleThreadedScopes.with(body)
        #endif
    }

    #if !canImport(Accelerate)
    private static let singleThreadedScopes = ScopedOverride(
        value: 1, get: { Int(openblas_get_num_threads()) }, set: { openblas_set_num_threads(Int32($0)) })
    #endif

    /// y[m] = alpha * A[m, n] x[n] + beta * y (row-major A with row stride lda).
    public static func gemv(_ y: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, lda: Int, _ x: UnsafePointer<Float>,
                            m: Int, n: Int, alpha: Float = 1, beta: Float = 0) {
        guard m > 0 else { return }
        cblas_sgemv(CblasRowMajor, CblasNoTrans, Int32(m), Int32(n), alpha, a, Int32(lda), x, 1, beta, y, 1)
    }

    /// The same contract as `gemm`, as plain loops accumulated in f64.
    public static func gemmReference(
        _ c: UnsafeMutablePointer<Float>, _ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>,
        m: Int, n: Int, k: Int, transposeA: Bool = false, transposeB: Bool = false,
        alpha: Float = 1, beta: Float = 0
    ) {
        for i in 0..<m {
            for j in 0..<n {
                var sum = 0.0
                for p in 0..<k {
                    let av = transposeA ? a[p * m + i] : a[i * k + p]
                    let bv = transposeB ? b[j * k + p] : b[p * n + j]
                    sum += Double(av) * Double(bv)
                }
                let prior = beta == 0 ? 0 : Double(beta) * Double(c[i * n + j])
                c[i * n + j] = Float(Double(alpha) * sum + prior)
            }
        }
    }
}
