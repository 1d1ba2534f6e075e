import QLoRATestSupport
import Testing

import QLoRAKernels

@Suite("gemm")
struct GemmTests {
    @Test("BLAS sgemm equals the reference loops in every transpose combination")
    func gemm() {
        var rng = SeededRandom(seed: 3)
        let m = 17, n = 23, k = 31
        let a = (0..<(m * k)).map { _ in rng.normal() }
        let b = (0..<(k * n)).map { _ in rng.normal() }
        for ta in [false, true] {
            for tb in [false, true] {
                var c1 = (0..<(m * n)).map { _ in rng.normal() }
                var c2 = c1
                Gemm.gemm(&c1, a, b, m: m, n: n, k: k, transposeA: ta, transposeB: tb, alpha: 0.5, beta: 2)
                Gemm.gemmReference(&c2, a, b, m: m, n: n, k: k, transposeA: ta, transposeB: tb, alpha: 0.5, beta: 2)
                #expect(Compare.close(c1, c2, atol: 1e-4, rtol: 1e-5, "gemm ta=\(ta) tb=\(tb)") == nil)
            }
        }
    }
}
