// The bf16 GEMM: rounding against PyTorch's f32 -> bf16 conversion, products against PyTorch's bf16
// operands multiplied in float64 (Resources/bf16.safetensors, from scripts/reference/make_bf16_fixtures.py),
// and the AVX512-BF16 kernels against the scalar references on awkward shapes.
import QLoRACore
import QLoRAFormats
import QLoRATestSupport
import Testing

import CKernels
import QLoRAKernels

private let fixture = try! Fixtures.open("bf16.safetensors")

private func floats(_ name: String) -> [Float] {
    guard let t = fixture.tensor(name) else { fatalError("fixture has no tensor \(name)") }
    return t.values(as: Float.self)
}

/// C = A[m, k] · op(B), through convert + pack + gemm (A row stride lda >= padded k).
/// The scalar references, or the AVX512-BF16 kernels.
private func bf16Kernels(_ reference: Bool) -> BF16Kernels { reference ? .reference : BF16Kernels.avx512bf16! }

private func product(_ a: [Float], _ b: [Float], m: Int, n: Int, k: Int, transposedB: Bool, reference: Bool,
                     alpha: Float = 1, accumulateInto c0: [Float]? = nil) -> [Float] {
    let lda = BF16Gemm.paddedCount(k) + 2  // a wider stride than needed: strides are honoured
    var ab = [UInt16](repeating: 0xFFFF, count: m * lda)
    var packed = [UInt32](repeating: 0xDEAD_BEEF, count: BF16Gemm.packedWords(k: k, n: n))
    var c = c0 ?? [Float](repeating: .nan, count: m * n)
    a.withUnsafeBufferPointer { ap in
        ab.withUnsafeMutableBufferPointer { BF16Gemm.convert(ap.baseAddress!, rows: m, cols: k, ld: k, into: $0.baseAddress!, ldd: lda, kernels: bf16Kernels(reference)) }
    }
    b.withUnsafeBufferPointer { bp in
        packed.withUnsafeMutableBufferPointer {
            BF16Gemm.packB(bp.baseAddress!, ldb: transposedB ? k : n, transposed: transposedB, k: k, n: n, into: $0.baseAddress!, kernels: bf16Kernels(reference))
        }
    }
    ab.withUnsafeBufferPointer { ap in
        packed.withUnsafeBufferPointer { pp in
            c.withUnsafeMutableBufferPointer {
                BF16Gemm.gemm($0.baseAddress!, ldc: n, ap.baseAddress!, lda: lda, pp.baseAddress!, m: m, n: n, k: k, alpha: alpha,
                              accumulate: c0 != nil, kernels: bf16Kernels(reference))
            }
        }
    }
    return c
}

private func transpose(_ x: [Float], rows: Int, cols: Int) -> [Float] {
    var t = [Float](repeating: 0, count: x.count)
    for r in 0..<rows { for c in 0..<cols { t[c * rows + r] = x[r * cols + c] } }
    return t
}

@Suite("bf16 gemm")
struct BF16GemmTests {
    @Test("f32 -> bf16 rounds as PyTorch does (nearest even, ties, carries, overflow), in both kernels")
    func rounding() {
        let x = floats("x")
        let expected = fixture.tensor("x_bf16")!.values(as: Int16.self).map { UInt16(bitPattern: $0) }
        for reference in [true, false] where reference || BF16Gemm.isSupported {
            var out = [UInt16](repeating: 0, count: x.count + 1)
            x.withUnsafeBufferPointer { xp in
                out.withUnsafeMutableBufferPointer {
                    BF16Gemm.convert(xp.baseAddress!, rows: 1, cols: x.count, ld: x.count, into: $0.baseAddress!, ldd: x.count + 1, kernels: bf16Kernels(reference))
                }
            }
            let mismatches = (0..<x.count).filter { out[$0] != expected[$0] }
            #expect(mismatches.isEmpty, "reference \(reference): \(mismatches.count) mismatches, first at \(mismatches.first.map { "\(x[$0]): \(out[$0]) vs \(expected[$0])" } ?? "")")
            #expect(out[x.count] == 0, "an odd row is padded with 0")
        }
    }

    @Test("NaN stays NaN; subnormals become signed zeros (as vcvtneps2bf16 does)")
    func specials() {
        let values: [Float] = [.nan, -.nan, Float(bitPattern: 0x7F80_0001), Float(bitPattern: 0x000B_0000), Float(bitPattern: 0x800B_0000), Float.leastNonzeroMagnitude]
        for reference in [true, false] where reference || BF16Gemm.isSupported {
            var out = [UInt16](repeating: 0, count: values.count)
            values.withUnsafeBufferPointer { xp in
                out.withUnsafeMutableBufferPointer {
                    BF16Gemm.convert(xp.baseAddress!, rows: 1, cols: values.count, ld: values.count, into: $0.baseAddress!, ldd: values.count,
                                     kernels: bf16Kernels(reference))
                }
            }
            for i in 0..<3 { #expect(out[i] & 0x7F80 == 0x7F80 && out[i] & 0x7F != 0 || out[i] & 0x7FC0 == 0x7FC0, "NaN \(i): \(out[i])") }
            #expect(Array(out[3...]) == [0, 0x8000, 0], "reference \(reference)")
        }
    }

    @Test("products equal PyTorch's bf16 operands multiplied in float64, to f32 summation error")
    func againstTorch() {
        let a = floats("a"), b = floats("b"), expected = floats("c")
        let m = 37, k = 61, n = 45
        // Bound on f32 summation error: k ulps of the sum of |a||b|.
        var bound = [Float](repeating: 0, count: m * n)
        for i in 0..<m { for j in 0..<n { for p in 0..<k { bound[i * n + j] += abs(a[i * k + p] * b[p * n + j]) } } }
        for reference in [true, false] where reference || BF16Gemm.isSupported {
            for transposedB in [false, true] {
                let c = product(a, transposedB ? transpose(b, rows: k, cols: n) : b, m: m, n: n, k: k, transposedB: transposedB, reference: reference)
                let worst = (0..<(m * n)).map { abs(c[$0] - expected[$0]) / (bound[$0] * Float(k) * Float.ulpOfOne) }.max()!
                #expect(worst <= 1, "reference \(reference) transposedB \(transposedB): error \(worst) of the bound")
            }
        }
    }

    @Test("AVX512-BF16 convert, pack and gemm equal the scalar references on odd shapes, ranges, alpha and accumulate",
          .enabled(if: BF16Gemm.isSupported, "this CPU has no AVX512-BF16 (or QLORA_KERNELS forces a lower level)"))
    func kernelsAgainstReference() throws {
        var rng = SeededRandom(seed: 11)
        for (m, n, k) in [(1, 1, 1), (13, 33, 7), (25, 70, 63), (12, 32, 2), (100, 64, 576), (37, 100, 1001), (3, 5, 2048), (20, 47, 40), (30, 40, 2101)] {
            let a = (0..<(m * k)).map { _ in rng.normal() }
            for transposedB in [false, true] {
                let b = (0..<(k * n)).map { _ in rng.normal() }
                let c0 = (0..<(m * n)).map { _ in rng.normal() }
                for (alpha, acc) in [(Float(1), false), (0.125, true)] {
                    let fast = product(a, b, m: m, n: n, k: k, transposedB: transposedB, reference: false, alpha: alpha, accumulateInto: acc ? c0 : nil)
                    let slow = product(a, b, m: m, n: n, k: k, transposedB: transposedB, reference: true, alpha: alpha, accumulateInto: acc ? c0 : nil)
                    // Same pairs in the same order: equal up to how the hardware rounds within one vdpbf16ps.
                    #expect(Compare.close(fast, slow, atol: 1e-5 * Float(k).squareRoot(), rtol: 1e-6, "m\(m) n\(n) k\(k) tb \(transposedB)") == nil)
                }
                // Packing is bit-exact.
                var p1 = [UInt32](repeating: 1, count: BF16Gemm.packedWords(k: k, n: n)), p2 = p1
                let ldb = transposedB ? k : n
                b.withUnsafeBufferPointer { bp in
                    p1.withUnsafeMutableBufferPointer { BF16Gemm.packB(bp.baseAddress!, ldb: ldb, transposed: transposedB, k: k, n: n, into: $0.baseAddress!, kernels: .reference) }
                    p2.withUnsafeMutableBufferPointer { BF16Gemm.packB(bp.baseAddress!, ldb: ldb, transposed: transposedB, k: k, n: n, into: $0.baseAddress!, kernels: BF16Kernels.avx512bf16!) }
                }
                #expect(p1 == p2, "pack m\(m) n\(n) k\(k) transposed \(transposedB)")
            }
        }
    }

    @Test("a row range and a panel range compute exactly their block of C")
    func ranges() {
        var rng = SeededRandom(seed: 5)
        let m = 29, n = 77, k = 19
        let a = (0..<(m * k)).map { _ in rng.normal() }, b = (0..<(k * n)).map { _ in rng.normal() }
        let whole = product(a, b, m: m, n: n, k: k, transposedB: false, reference: !BF16Gemm.isSupported)
        let lda = BF16Gemm.paddedCount(k)
        var ab = [UInt16](repeating: 0, count: m * lda), packed = [UInt32](repeating: 0, count: BF16Gemm.packedWords(k: k, n: n))
        a.withUnsafeBufferPointer { ap in ab.withUnsafeMutableBufferPointer { BF16Gemm.convert(ap.baseAddress!, rows: m, cols: k, ld: k, into: $0.baseAddress!, ldd: lda) } }
        b.withUnsafeBufferPointer { bp in packed.withUnsafeMutableBufferPointer { BF16Gemm.packB(bp.baseAddress!, ldb: n, transposed: false, k: k, n: n, into: $0.baseAddress!) } }
        var c = [Float](repeating: -7, count: m * n)
        ab.withUnsafeBufferPointer { ap in packed.withUnsafeBufferPointer { pp in c.withUnsafeMutableBufferPointer { cp in
            let f = BF16Gemm.isSupported ? qk_bf16_gemm_avx512bf16 : qk_bf16_gemm_reference
            f(ap.baseAddress!, lda, pp.baseAddress!, k, n, cp.baseAddress!, n, 5, 18, 1, 2, 1, 0)
        } } }
        for i in 0..<m {
            for j in 0..<n {
                let inside = (5..<18).contains(i) && (32..<64).contains(j)
                #expect(c[i * n + j] == (inside ? whole[i * n + j] : -7), "(\(i), \(j))")
            }
        }
    }

    @Test("the transposed conversion is the conversion of the transpose (both kernels)", arguments: [true, false])
    func transposedConversion(reference: Bool) {
        guard reference || BF16Gemm.isSupported else { return }
        var rng = SeededRandom(seed: 9)
        for (rows, cols) in [(7, 3), (64, 9), (33, 64), (1, 1), (512, 64), (95, 17)] {
            let x = (0..<(rows * cols)).map { _ in rng.normal() }
            let ldd = BF16Gemm.paddedCount(rows)
            var viaT = [UInt16](repeating: 1, count: cols * ldd), direct = viaT
            x.withUnsafeBufferPointer { xp in viaT.withUnsafeMutableBufferPointer {
                BF16Gemm.convertTransposed(xp.baseAddress!, rows: rows, cols: cols, ld: cols, into: $0.baseAddress!, ldd: ldd, kernels: bf16Kernels(reference))
            } }
            transpose(x, rows: rows, cols: cols).withUnsafeBufferPointer { tp in direct.withUnsafeMutableBufferPointer {
                BF16Gemm.convert(tp.baseAddress!, rows: cols, cols: rows, ld: rows, into: $0.baseAddress!, ldd: ldd, kernels: .reference)
            } }
            #expect(viaT == direct, "\(rows) x \(cols), reference \(reference)")
        }
    }

    // Decoding's 4-bit product in bf16 (qk_gemm4_bf16): each 64 inputs as their 32 even elements then their 32 odd
    // ones, a last 32 likewise, the rest in place (CKernelsGemv.h), written here from that description.
    private static func preparedPosition(_ e: Int, cols: Int) -> Int {
        let c64 = cols / 64 * 64
        if e < c64 { return e / 64 * 64 + (e & 1) * 32 + (e % 64) / 2 }
        if e < c64 + 32 && c64 + 32 <= cols { return c64 + (e & 1) * 16 + (e - c64) / 2 }
        return e
    }

    private static func prepare(_ x: [Float], rows: Int, cols: Int, _ kernels: BF16Kernels) -> [UInt16] {
        var xb = [UInt16](repeating: 0xFFFF, count: rows * cols)
        x.withUnsafeBufferPointer { xp in
            xb.withUnsafeMutableBufferPointer { for i in 0..<rows { kernels.gemm4Prepare(xp.baseAddress! + i * cols, cols, $0.baseAddress! + i * cols) } }
        }
        return xb
    }

    @Test("4-bit bf16 product's inputs: reordered, and rounded as PyTorch rounds them, in both kernels; the two agree on every length")
    func gemm4Prepare() {
        let x = floats("x")
        let expected = fixture.tensor("x_bf16")!.values(as: Int16.self).map { UInt16(bitPattern: $0) }
        for cols in [x.count, 64, 96, 100, 31, 1] where cols <= x.count {
            let part = Array(x.prefix(cols))
            for reference in [true, false] where reference || BF16Gemm.isSupported {
                let xb = Self.prepare(part, rows: 1, cols: cols, bf16Kernels(reference))
                let back = (0..<cols).map { xb[Self.preparedPosition($0, cols: cols)] }
                #expect(back == Array(expected.prefix(cols)), "\(cols) values, reference \(reference)")
            }
        }
        guard BF16Gemm.isSupported else { return }
        var rng = SeededRandom(seed: 21)
        for cols in [1, 2, 31, 32, 33, 63, 64, 65, 95, 96, 127, 128, 129, 160, 576, 1000, 1536] {
            var v = (0..<cols).map { _ in rng.normal() }
            if cols > 8 { v[3] = .nan; v[5] = Float(bitPattern: 0x000B_0000); v[7] = -.infinity }
            #expect(Self.prepare(v, rows: 1, cols: cols, .reference) == Self.prepare(v, rows: 1, cols: cols, BF16Kernels.avx512bf16!), "\(cols)")
        }
    }

    @Test("4-bit bf16 product: each row within f32 summation error of the exact sum of bf16(dequantized weight) x bf16(input), every type and block size, 1 to 17 inputs, in both kernels; an input's sums the same bits in a batch as alone",
          arguments: [true, false])
    func gemm4(reference: Bool) throws {
        guard reference || BF16Gemm.isSupported else { return }
        // Three calls over row ranges: the later ones start mid-matrix (their scales are not the first), and the ranges
        // leave 1, 2 and 3 rows past the vector kernel's blocks of four (and 5, 2 and 7 past its blocks of eight).
        let kernels = bf16Kernels(reference), rows = 38, splits = [0..<13, 13..<31, 31..<38]
        var rng = SeededRandom(seed: 5)
        // 36,000 at block 32: rows longer than the AVX-512 kernel's scale buffer (a second piece of 101 blocks, ending in
        // a 32-code tail); past the last 128-code group, 64 and 576 end in 64 codes, 160 in 32, 96 in 64 and 32.
        for cols in [64, 96, 128, 160, 576, 1536, 36000] {
            for bs in [32, 64, 128, 256] where cols % bs == 0 {
                for qt in QuantType.allCases {
                    if cols == 36000 && (qt != .nf4 || reference) { continue }  // the long rows once, on the fast kernel
                    let w = (0..<(rows * cols)).map { i in rng.normal() * (i % 97 == 0 ? 1 : 0.02) }
                    let q = try Quantized4Bit(w, shape: [rows, cols], type: qt, blockSize: bs, doubleQuant: qt != .int4, kernels: KernelTable.forLevel(.reference)!)
                    let d = q.dequantize().map { Double(bfloat16BitsToFloat(qk_bf16_from_float($0))) }
                    func product(_ xb: [UInt16], count: Int) -> [Float] {
                        var y = [Float](repeating: .nan, count: count * rows)
                        xb.withUnsafeBufferPointer { xp in
                            y.withUnsafeMutableBufferPointer { yp in
                                for r in splits {
                                    q.gemm(rows: r, xb: xp.baseAddress!, count: count, into: yp.baseAddress! + r.lowerBound, ldy: rows, bf16: kernels)
                                }
                            }
                        }
                        return y
                    }
                    for count in [1, 2, 3, 5, 16, 17] {
                        let xs = (0..<(count * cols)).map { _ in rng.normal() }
                        let xb = Self.prepare(xs, rows: count, cols: cols, kernels)
                        let y = product(xb, count: count)
                        // The first and last inputs alone: the bits they got in the batch.
                        for i in Set([0, count - 1]) where count > 1 {
                            let alone = product(Array(xb[(i * cols)..<((i + 1) * cols)]), count: 1)
                            #expect(Compare.bitEqual(Array(y[(i * rows)..<((i + 1) * rows)]), alone, "reference \(reference) \(qt) \(cols) block \(bs): input \(i) of \(count) alone") == nil)
                        }
                        let xr = xs.map { Double(bfloat16BitsToFloat(qk_bf16_from_float($0))) }
                        for i in 0..<count {
                            for r in 0..<rows {
                                var exact = 0.0, magnitude = 0.0
                                for c in 0..<cols {
                                    let t = d[r * cols + c] * xr[i * cols + c]
                                    exact += t
                                    magnitude += abs(t)
                                }
                                // f32 sums of exact bf16 products: a rounding an addition, of random sign (a bound of
                                // cols units would let a lost 128-code piece of the longest rows pass).
                                let got = Double(y[i * rows + r])
                                if abs(got - exact) > magnitude * 8 * Double(cols).squareRoot() * 0x1p-24 + 1e-12 {
                                    Issue.record("reference \(reference) \(qt) \(cols) block \(bs) inputs \(count): input \(i) row \(r): \(got) vs \(exact)")
                                    return
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
