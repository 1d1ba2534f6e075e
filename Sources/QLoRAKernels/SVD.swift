// The singular value decomposition for PiSSA's and LoftQ's initialisation of LoRA: LAPACK's divide-and-conquer
// dgesdd (OpenBLAS ships LAPACK) in f64, on row-major matrices.
#if canImport(Accelerate)
import Accelerate
#else
import CBLAS
#endif

public enum SVDError: Error, CustomStringConvertible {
    case failed(info: Int, what: String)

    public var description: String {
        switch self {
        case let .failed(info, what): return "the SVD of \(what) failed (LAPACK dgesdd info \(info))"
        }
    }
}

public enum SVD {
    /// The thin SVD a = U diag(s) Vt of a row-major [m, n] matrix: U [m, k] and Vt [k, n] row-major, k = min(m, n),
    /// s in descending order. `what` names the matrix in an error.
    public static func thin(_ a: [Double], rows m: Int, cols n: Int, what: String = "a matrix") throws -> (u: [Double], s: [Double], vt: [Double]) {
        precondition(a.count == m * n && m > 0 && n > 0)
        // Row-major a is column-major aᵀ [n, m]: aᵀ = U' S V'ᵀ gives a = V' S U'ᵀ, so LAPACK's VT (column-major [k, m])
        // read row-major is our U [m, k], and its U (column-major [n, k]) read row-major is our Vt [k, n].
        let k = min(m, n)
        var work = a, s = [Double](repeating: 0, count: k)
        var u = [Double](repeating: 0, count: n * k), vt = [Double](repeating: 0, count: k * m)
        var iwork = [Int32](repeating: 0, count: 8 * k)
        var rowsL = Int32(n), colsL = Int32(m), lda = Int32(n), ldu = Int32(n), ldvt = Int32(k), info: Int32 = 0
        var jobz = Int8(UInt8(ascii: "S"))
        // The workspace size first (lwork = -1), then the decomposition.
        var query = [0.0], lwork: Int32 = -1
        func call(_ space: UnsafeMutablePointer<Double>) {
            #if canImport(Accelerate)
            dgesdd_(&jobz, &rowsL, &colsL, &work, &lda, &s, &u, &ldu, &vt, &ldvt, space, &lwork, &iwork, &info)
            #else
            dgesdd_(&jobz, &rowsL, &colsL, &work, &lda, &s, &u, &ldu, &vt, &ldvt, space, &lwork, &iwork, &info, 1)
            #endif
        }
        call(&query)
        guard info == 0 else { throw SVDError.failed(info: Int(info), what: what) }
        lwork = Int32(query[0].rounded(.up))
        var space = [Double](repeating: 0, count: Int(lwork))
        call(&space)
        guard info == 0 else { throw SVDError.failed(info: Int(info), what: what) }
        return (vt, s, u)
    }
}
