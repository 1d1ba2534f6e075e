// Every kernel variant this CPU supports against the scalar reference, over lengths with tails
// (as ggml's test-quantize-fns sweeps them).
import CKernels
import Foundation
import QLoRACore
import QLoRATestSupport
import Testing

import QLoRAKernels

private let lengths = [1, 2, 3, 5, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 255, 256, 257, 1000, 4095, 4096, 4097, 12345]

private func randomValues(_ n: Int, seed: UInt64) -> [Float] {
    var rng = SeededRandom(seed: seed)
    return (0..<n).map { i in
        let v = rng.normal() * 0.02
        return i % 97 == 0 ? v * 50 : v  // a few outliers
    }
}

@Suite("kernel variants")
struct KernelVariantTests {
    static let levels = KernelTable.available.map(\.level).filter { $0 != .reference }
    let reference = KernelTable.forLevel(.reference)!

    @Test("the reference level is always available and QLORA_KERNELS names levels")
    func levels() {
        #expect(KernelTable.forLevel(.reference) != nil)
        #expect(KernelLevel(name: "AVX2") == .avx2)
        #expect(KernelLevel(name: "neon") == nil)
        #expect(KernelTable.current.level.isSupported)
    }

    @Test("quantize: identical bytes and absmax to the reference", arguments: levels)
    func quantize(level: KernelLevel) throws {
        let kernels = KernelTable.forLevel(level)!
        for qt in QuantType.allCases {
            for bs in [32, 64, 128, 4096] {
                for n in lengths {
                    let x = randomValues(n, seed: UInt64(n * 31 + bs))
                    let a = try Quantized4Bit(x, type: qt, blockSize: bs, doubleQuant: false, kernels: reference)
                    let b = try Quantized4Bit(x, type: qt, blockSize: bs, doubleQuant: false, kernels: kernels)
                    #expect(a == b, "\(level) \(qt) block \(bs) length \(n)")
                }
            }
        }
    }

    @Test("dequantize: bit-identical to the reference", arguments: levels)
    func dequantize(level: KernelLevel) throws {
        let kernels = KernelTable.forLevel(level)!
        for qt in QuantType.allCases {
            for bs in [32, 64, 256] {
                for n in lengths {
                    let q = try Quantized4Bit(randomValues(n, seed: UInt64(n)), type: qt, blockSize: bs, doubleQuant: true, kernels: reference)
                    #expect(Compare.bitEqual(q.dequantize(kernels: kernels), q.dequantize(kernels: reference), "\(level) \(qt) \(bs) \(n)") == nil)
                }
            }
        }
    }

    @Test("fused 4-bit dot product: within f32 summation error of the reference", arguments: levels)
    func dot(level: KernelLevel) throws {
        let kernels = KernelTable.forLevel(level)!
        for bs in [32, 64, 128] {
            for n in lengths {
                let w = randomValues(n, seed: UInt64(7 * n + 1))
                let x = randomValues(n, seed: UInt64(11 * n + 3)).map { $0 * 40 }
                let q = try Quantized4Bit(w, type: .nf4, blockSize: bs, doubleQuant: false, kernels: reference)
                let scales = q.blockScales()
                let code = QuantType.nf4.codebook
                let dequantized = q.dequantize(kernels: reference)
                var exact = 0.0, magnitude = 0.0
                for i in 0..<n { exact += Double(dequantized[i]) * Double(x[i]); magnitude += abs(Double(dequantized[i]) * Double(x[i])) }
                let got = q.packed.withUnsafeBufferPointer { p in
                    scales.withUnsafeBufferPointer { a in
                        kernels.dot4(x, p.baseAddress, a.baseAddress, n, bs, code)
                    }
                }
                let ref = q.packed.withUnsafeBufferPointer { p in
                    scales.withUnsafeBufferPointer { a in
                        reference.dot4(x, p.baseAddress, a.baseAddress, n, bs, code)
                    }
                }
                // f32 accumulation: error bounded by a few ulps of the sum of magnitudes.
                let bound = magnitude * 1e-6 + 1e-12
                #expect(abs(Double(got) - exact) <= bound, "\(level) block \(bs) length \(n): \(got) vs \(exact)")
                #expect(abs(Double(ref) - exact) <= bound, "reference block \(bs) length \(n): \(ref) vs \(exact)")
            }
        }
    }

    /// |got - exact| <= max(1e-6, n u) * sum |terms| for each row: (n - 1) u sum |terms| bounds an f32 sum of
    /// n terms in any order (u = 2^-24), and blocked sums stay near 1e-6.
    private func expectRows(_ got: [Float], _ terms: (Int) -> [Double], _ label: String) {
        for r in 0..<got.count {
            let t = terms(r)
            let exact = t.reduce(0, +), magnitude = t.reduce(0) { $0 + abs($1) }
            if abs(Double(got[r]) - exact) > magnitude * max(1e-6, Double(t.count) * 0x1p-24) + 1e-12 {
                Issue.record("\(label) row \(r): \(got[r]) vs \(exact)")
                return
            }
        }
    }

    @Test("4-bit matrix-vector kernel: every row within f32 summation error of the exact product, every type and block size",
          arguments: KernelTable.available.map(\.level))
    func gemv4(level: KernelLevel) throws {
        let kernels = KernelTable.forLevel(level)!
        let rows = 37
        for cols in [64, 128, 320, 576, 1536, 32896] {  // 32,896 at block 32: rows longer than the AVX-512 kernel's scale buffer
            for bs in [32, 64, 128, 256, 512] where cols % bs == 0 {
                for qt in QuantType.allCases {
                    let w = randomValues(rows * cols, seed: UInt64(cols * 13 + bs))
                    let x = randomValues(cols, seed: UInt64(cols + bs)).map { $0 * 40 }
                    let q = try Quantized4Bit(w, shape: [rows, cols], type: qt, blockSize: bs, doubleQuant: qt != .int4, kernels: reference)
                    let d = q.dequantize(kernels: reference)
                    let scales = q.blockScales()
                    var xp = [Float](repeating: .nan, count: cols)
                    kernels.gemv4Prepare(x, cols, &xp)
                    var y = [Float](repeating: .nan, count: rows)
                    // Two calls over row ranges: the second starts mid-matrix (its scales are not the first).
                    let split = 13
                    x.withUnsafeBufferPointer { xb in
                        xp.withUnsafeBufferPointer { pb in
                            y.withUnsafeMutableBufferPointer { yb in
                                q.gemv(rows: 0..<split, x: xb.baseAddress!, prepared: pb.baseAddress!, into: yb.baseAddress!, kernels: kernels)
                                q.gemv(rows: split..<rows, x: xb.baseAddress!, prepared: pb.baseAddress!, into: yb.baseAddress! + split, kernels: kernels)
                            }
                        }
                    }
                    expectRows(y, { r in (0..<cols).map { Double(d[r * cols + $0]) * Double(x[$0]) } }, "\(level) \(qt) \(cols) block \(bs)")
                    // Several inputs at once (batched decoding): each equals its own product.
                    for count in [2, 5, 17] {
                        let xs = (0..<count).flatMap { i in randomValues(cols, seed: UInt64(cols + bs + 100 * i)).map { $0 * 40 } }
                        var xps = [Float](repeating: .nan, count: count * cols)
                        for i in 0..<count { xs.withUnsafeBufferPointer { xb in xps.withUnsafeMutableBufferPointer { kernels.gemv4Prepare(xb.baseAddress! + i * cols, cols, $0.baseAddress! + i * cols) } } }
                        var ys = [Float](repeating: .nan, count: count * rows)
                        xs.withUnsafeBufferPointer { xb in
                            xps.withUnsafeBufferPointer { pb in
                                ys.withUnsafeMutableBufferPointer { yb in
                                    q.gemm(rows: 0..<split, x: xb.baseAddress!, prepared: pb.baseAddress!, count: count, into: yb.baseAddress!, ldy: rows, kernels: kernels)
                                    q.gemm(rows: split..<rows, x: xb.baseAddress!, prepared: pb.baseAddress!, count: count, into: yb.baseAddress! + split,
                                           ldy: rows, kernels: kernels)
                                }
                            }
                        }
                        for i in 0..<count {
                            expectRows(Array(ys[(i * rows)..<((i + 1) * rows)]), { r in (0..<cols).map { Double(d[r * cols + $0]) * Double(xs[i * cols + $0]) } },
                                       "\(level) \(qt) \(cols) block \(bs) batch \(count) input \(i)")
                        }
                    }
                    // The reference level is the per-row reference dot product over the decoded scales, to the bit.
                    if level == .reference {
                        let dots: [Float] = (0..<rows).map { r in
                            q.packed.withUnsafeBufferPointer { p in
                                scales.withUnsafeBufferPointer { a in
                                    reference.dot4(x, p.baseAddress! + r * cols / 2, a.baseAddress! + r * cols / bs, cols, bs, qt.codebook)
                                }
                            }
                        }
                        #expect(Compare.bitEqual(y, dots, "reference gemv4 \(qt) \(cols) \(bs)") == nil)
                    }
                }
            }
        }
    }

    @Test("q8_0 and bf16 matrix-vector kernels: every row within f32 summation error of the exact product",
          arguments: KernelTable.available.map(\.level))
    func gemv8AndBF16(level: KernelLevel) throws {
        let kernels = KernelTable.forLevel(level)!
        let rows = 45
        for cols in [32, 64, 96, 576, 1000, 1024, 4096] {
            let w = randomValues(rows * cols, seed: UInt64(cols * 7))
            let x = randomValues(cols, seed: UInt64(cols * 3 + 1)).map { $0 * 40 }
            let bf = w.map(floatToBFloat16Bits)
            var y = [Float](repeating: .nan, count: rows)
            kernels.gemvBF16(x, bf, rows, cols, &y)
            expectRows(y, { r in (0..<cols).map { Double(bfloat16BitsToFloat(bf[r * cols + $0])) * Double(x[$0]) } }, "\(level) bf16 \(cols)")
            guard Quantized8Bit.canStore(cols: cols) else { continue }
            let q = try Quantized8Bit(w, shape: [rows, cols], name: "w")
            let d = q.dequantize()
            y = [Float](repeating: .nan, count: rows)
            kernels.gemv8(x, q.codes, q.scales, rows, cols, &y)
            expectRows(y, { r in (0..<cols).map { Double(d[r * cols + $0]) * Double(x[$0]) } }, "\(level) q8_0 \(cols)")
            // Several inputs at once.
            for count in [3, 8, 17] {
                let xs = (0..<count).flatMap { i in randomValues(cols, seed: UInt64(cols * 3 + 7 * i)).map { $0 * 40 } }
                var ys = [Float](repeating: .nan, count: count * rows), yb = ys
                kernels.gemm8(xs, count, q.codes, q.scales, rows, cols, &ys, rows)
                kernels.gemmBF16(xs, count, bf, rows, cols, &yb, rows)
                for i in 0..<count {
                    expectRows(Array(ys[(i * rows)..<((i + 1) * rows)]), { r in (0..<cols).map { Double(d[r * cols + $0]) * Double(xs[i * cols + $0]) } },
                               "\(level) q8_0 \(cols) batch \(count) input \(i)")
                    expectRows(Array(yb[(i * rows)..<((i + 1) * rows)]),
                               { r in (0..<cols).map { Double(bfloat16BitsToFloat(bf[r * cols + $0])) * Double(xs[i * cols + $0]) } },
                               "\(level) bf16 \(cols) batch \(count) input \(i)")
                }
            }
        }
    }

    @Test("gemv over a 4-bit matrix equals dequantize-then-multiply")
    func gemv() throws {
        let rows = 96, cols = 320
        let w = randomValues(rows * cols, seed: 5)
        let x = randomValues(cols, seed: 6)
        for (c, bs) in [(cols, 64), (cols, 32), (cols - 1, 64)] {
            let wv = Array(w.prefix(rows * c))
            let xv = Array(x.prefix(c))
            let q = try Quantized4Bit(wv, shape: [rows, c], type: .nf4, blockSize: bs, doubleQuant: true)
            let y = q.gemv(xv)
            let d = q.dequantize()
            let expected: [Float] = (0..<rows).map { r in
                Float((0..<c).reduce(0.0) { $0 + Double(d[r * c + $1]) * Double(xv[$1]) })
            }
            #expect(Compare.close(y, expected, atol: 1e-5, rtol: 1e-4, "gemv \(rows)x\(c) block \(bs)") == nil)
        }
    }
}

@Suite("partial dequantization")
struct PartialDequantizeTests {
    @Test("any element range, odd starts and mid-block ends included, equals the same slice of the whole")
    func ranges() throws {
        var rng = SeededRandom(seed: 12)
        let n = 64 * 40 + 17
        let x = (0..<n).map { _ in rng.normal() }
        for bs in [32, 64, 256] {
            let q = try Quantized4Bit(x, type: .nf4, blockSize: bs, doubleQuant: true)
            let whole = q.dequantize()
            let scales = q.blockScales()
            for range in [0..<n, 1..<n, 3..<70, 63..<64, 64..<128, 100..<2000, 511..<n, n..<n] {
                var out = [Float](repeating: .nan, count: range.count)
                out.withUnsafeMutableBufferPointer { o in
                    if let base = o.baseAddress { q.dequantize(elements: range, scales: scales, into: base) }
                }
                #expect(Compare.bitEqual(out, Array(whole[range]), "block \(bs) range \(range)") == nil)
            }
        }
    }
}

@Suite("row kernels")
struct RowKernelTests {
    static let levels = KernelTable.available.map(\.level).filter { $0 != .reference }
    let reference = KernelTable.forLevel(.reference)!

    @Test("softmax, SwiGLU forward and backward, cross-entropy: each variant within 4e-6 relative of the reference", arguments: levels)
    func rows(level: KernelLevel) {
        let k = KernelTable.forLevel(level)!
        var rng = SeededRandom(seed: 21)
        for n in [1, 7, 8, 15, 16, 17, 33, 100, 257, 1000] {
            let x = (0..<n).map { _ in rng.normal() * 4 }
            let g = (0..<n).map { _ in rng.normal() * 6 }, u = (0..<n).map { _ in rng.normal() }, da = (0..<n).map { _ in rng.normal() }
            var a1 = x, a2 = x
            a1.withUnsafeMutableBufferPointer { reference.softmaxRow($0.baseAddress, max(1, n - 3), n) }
            a2.withUnsafeMutableBufferPointer { k.softmaxRow($0.baseAddress, max(1, n - 3), n) }
            #expect(Compare.close(a2, a1, atol: 1e-7, rtol: 4e-6, "softmax \(level) \(n)") == nil)
            var s1 = [Float](repeating: 0, count: n), s2 = s1
            reference.swiglu(&s1, g, u, n)
            k.swiglu(&s2, g, u, n)
            #expect(Compare.close(s2, s1, atol: 1e-7, rtol: 4e-6, "swiglu \(level) \(n)") == nil)
            var dg1 = s1, du1 = s1, dg2 = s1, du2 = s1
            reference.swigluBackward(&dg1, &du1, da, g, u, n)
            k.swigluBackward(&dg2, &du2, da, g, u, n)
            #expect(Compare.close(dg2, dg1, atol: 1e-7, rtol: 4e-6, "swiglu dg \(level) \(n)") == nil)
            #expect(Compare.close(du2, du1, atol: 1e-7, rtol: 4e-6, "swiglu du \(level) \(n)") == nil)
            // GeGLU (tanh approximation): the SIMD kernels' x·sigmoid(2u) against the reference's 0.5x(1 + tanh(u)).
            var e1 = [Float](repeating: 0, count: n), e2 = e1
            reference.geglu(&e1, g, u, n)
            k.geglu(&e2, g, u, n)
            #expect(Compare.close(e2, e1, atol: 1e-6, rtol: 4e-6, "geglu \(level) \(n)") == nil)
            var eg1 = e1, eu1 = e1, eg2 = e1, eu2 = e1
            reference.gegluBackward(&eg1, &eu1, da, g, u, n)
            k.gegluBackward(&eg2, &eu2, da, g, u, n)
            // Where the slope is near zero (a gate near -3) its two terms cancel, in the reference's tanh form more
            // than in the sigmoid form: an absolute tolerance on the scale of the values.
            let scale = eg1.map(abs).max() ?? 1
            #expect(Compare.close(eg2, eg1, atol: 2e-6 * scale, rtol: 4e-6, "geglu dg \(level) \(n)") == nil)
            #expect(Compare.close(eu2, eu1, atol: 1e-6, rtol: 4e-6, "geglu du \(level) \(n)") == nil)
            var c1 = x, c2 = x
            let l1 = reference.crossEntropyRow(&c1, n, n / 2, 0.5), l2 = k.crossEntropyRow(&c2, n, n / 2, 0.5)
            #expect(abs(l1 - l2) <= 1e-5 * max(1, abs(l1)), "cross-entropy \(level) \(n)")
            #expect(Compare.close(c2, c1, atol: 1e-7, rtol: 4e-6, "cross-entropy gradient \(level) \(n)") == nil)
        }
    }

    @Test("attention of a key-value head's queries: each variant within f32 rounding of an f64 computation, every head size and length, whole and split in two",
          arguments: KernelTable.available.map(\.level))
    func attend(level: KernelLevel) {
        let k = KernelTable.forLevel(level)!
        var rng = SeededRandom(seed: 33)
        for d in [64, 128, 48, 36, 8, 5] {
            for S in [1, 7, 8, 9, 16, 33, 63, 64, 65, 300] {
                for nq in [1, 3] {
                    let stride = 3 * d + 4  // keys of other heads between one position's and the next
                    let q = (0..<(nq * d)).map { _ in rng.normal() }
                    let keys = (0..<(S * stride)).map { _ in rng.normal() }, values = (0..<(S * stride)).map { _ in rng.normal() }
                    let scale = 1 / Float(d).squareRoot()
                    checkAttention("\(level) d \(d) S \(S)", q: q, nq: nq, d: d, S: S, scale: scale,
                                   key: { Double(keys[$0 * stride + $1]) }, value: { Double(values[$0 * stride + $1]) }) { lo, hi, sc, o, st in
                        keys.withUnsafeBufferPointer { kb in
                            values.withUnsafeBufferPointer { vb in
                                k.attend(q, nq, kb.baseAddress! + lo * stride, vb.baseAddress! + lo * stride, hi - lo, d, stride, scale, &sc, &o, st)
                            }
                        }
                    }
                }
            }
        }
    }

    @Test("the 16-bit cache's conversions: f16 and bf16, narrowed and widened bit for bit as QLoRACore's (numpy's) conversions, every length",
          arguments: KernelTable.available.map(\.level))
    func kvConversions(level: KernelLevel) {
        let k = KernelTable.forLevel(level)!
        // Edges: zeros, f16's subnormals and their rounding, its largest value and the first that overflows, bf16
        // midpoints (ties to even both ways), infinities and NaN.
        let edges: [Float] = [0, -0, 5.96e-8, 2.98e-8, 2.99e-8, 6.1e-5, 6.0975e-5, 65504, 65519.9, 65520, 1e10, -1e10, .infinity, -.infinity,
                              .nan, Float(bitPattern: 0x3F80_8000), Float(bitPattern: 0x3F81_8000), Float(bitPattern: 0x3F80_8001),
                              Float(bitPattern: 0x3F80_1000), Float(bitPattern: 0x3F80_3000), 1.0009765625, -3.3e-7, Float.leastNormalMagnitude]
        for n in lengths + [edges.count] {
            var rng = SeededRandom(seed: UInt64(n))
            let x: [Float] = n == edges.count ? edges : (0..<n).map { i in i % 11 == 0 ? rng.normal() * 1e-6 : rng.normal() * 8 }
            for (dtype, format) in [(KVCacheDType.f16, Int32(QK_KV_F16)), (.bf16, Int32(QK_KV_BF16))] {
                var narrowed = [UInt16](repeating: 0xDEAD, count: n)
                k.kvNarrow(x, &narrowed, n, format)
                let expected = x.map { dtype == .f16 ? floatToFloat16Bits($0) : floatToBFloat16Bits($0) }
                #expect(narrowed == expected, "\(level) \(dtype) narrowed, n \(n)")
                var widened = [Float](repeating: 1234, count: n)
                k.kvWiden(narrowed, &widened, n, format)
                let back = expected.map { dtype == .f16 ? float16BitsToFloat($0) : bfloat16BitsToFloat($0) }
                #expect(widened.map(\.bitPattern) == back.map(\.bitPattern), "\(level) \(dtype) widened, n \(n)")
            }
        }
    }

    @Test("attention over a 16-bit cache: each variant within f32 rounding of an f64 computation on the widened keys and values, whole and split",
          arguments: KernelTable.available.map(\.level))
    func attend16(level: KernelLevel) {
        let k = KernelTable.forLevel(level)!
        var rng = SeededRandom(seed: 34)
        for (dtype, format) in [(KVCacheDType.f16, Int32(QK_KV_F16)), (.bf16, Int32(QK_KV_BF16))] {
            for d in [64, 128, 48, 8, 5] {
                for S in [1, 7, 8, 9, 33, 65, 300] {
                    for nq in [1, 3] {
                        let stride = 3 * d + 4
                        let q = (0..<(nq * d)).map { _ in rng.normal() }
                        let narrow = { (v: Float) in dtype == .f16 ? floatToFloat16Bits(v) : floatToBFloat16Bits(v) }
                        let widen = { (b: UInt16) in dtype == .f16 ? float16BitsToFloat(b) : bfloat16BitsToFloat(b) }
                        let keys = (0..<(S * stride)).map { _ in narrow(rng.normal()) }, values = (0..<(S * stride)).map { _ in narrow(rng.normal()) }
                        let scale = 1 / Float(d).squareRoot()
                        checkAttention("\(level) \(dtype) d \(d) S \(S)", q: q, nq: nq, d: d, S: S, scale: scale,
                                       key: { Double(widen(keys[$0 * stride + $1])) }, value: { Double(widen(values[$0 * stride + $1])) }) { lo, hi, sc, o, st in
                            keys.withUnsafeBufferPointer { kb in
                                values.withUnsafeBufferPointer { vb in
                                    k.attend16(q, nq, kb.baseAddress! + lo * stride, vb.baseAddress! + lo * stride, hi - lo, d, stride, scale, &sc, &o, st,
                                               format)
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    @Test("dropout: the same mask and outputs as the reference, bit for bit, for every length, start and rate", arguments: levels)
    func dropout(level: KernelLevel) {
        let k = KernelTable.forLevel(level)!
        for n in lengths {
            let x = randomValues(n, seed: UInt64(n))
            for (start, threshold) in [(UInt64(0), UInt32(3277)), (0xDEAD_BEEF_1234_5678, 6554), (UInt64.max, 32768), (42, 0), (7, 65535), (9, 65536)] {
                var m1 = [UInt8](repeating: 9, count: n), m2 = m1
                var o1 = [Float](repeating: .nan, count: n), o2 = o1
                reference.dropout(x, &m1, &o1, n, start, threshold, 1.25)
                k.dropout(x, &m2, &o2, n, start, threshold, 1.25)
                #expect(m2 == m1, "dropout mask \(level) n \(n) threshold \(threshold)")
                #expect(o2.map(\.bitPattern) == o1.map(\.bitPattern), "dropout output \(level) n \(n) threshold \(threshold)")
            }
        }
    }

    @Test("the reference dropout drops each element with probability threshold / 65536, independently, and scales the rest")
    func dropoutRate() {
        let n = 1 << 20
        let x = [Float](repeating: 2, count: n)
        var mask = [UInt8](repeating: 0, count: n), out = [Float](repeating: 0, count: n)
        reference.dropout(x, &mask, &out, n, 12345, 6554, 1 / 0.9)  // p = 0.1
        let dropped = mask.filter { $0 == 0 }.count
        // Binomial(2^20, 0.100006): standard deviation 307; allow 5 of them.
        #expect(abs(Double(dropped) - Double(n) * 6554 / 65536) < 5 * 307, "dropped \(dropped) of \(n)")
        #expect((0..<n).allSatisfy { mask[$0] == 0 ? out[$0] == 0 : out[$0] == 2 * Float(1 / 0.9) })
        // Neighbours are independent: both of a pair dropped about p^2 of the time (within 5 sigma).
        let pairs = stride(from: 0, to: n, by: 2).filter { mask[$0] == 0 && mask[$0 + 1] == 0 }.count
        let expected = Double(n / 2) * 0.01
        #expect(abs(Double(pairs) - expected) < 5 * expected.squareRoot(), "both of a pair dropped \(pairs) times, expected \(expected)")
        // Dropped nowhere at threshold 0, everywhere above 65535.
        reference.dropout(x, &mask, &out, 1000, 1, 0, 1)
        #expect(mask.prefix(1000).allSatisfy { $0 == 1 })
        reference.dropout(x, &mask, &out, 1000, 1, 65536, 1)
        #expect(mask.prefix(1000).allSatisfy { $0 == 0 })
    }
}

/// One decoding-attention kernel, run by `run(lo, hi, scores, out, stats)` over positions lo..<hi (stats nil: normalized),
/// against an f64 computation over key(j, e) and value(j, e): whole (output and probabilities), and split at S / 2 into
/// two unnormalized ranges combined by their max and sum.
private func checkAttention(_ label: String, q: [Float], nq: Int, d: Int, S: Int, scale: Float, key: (Int, Int) -> Double,
                            value: (Int, Int) -> Double,
                            run: (Int, Int, inout [Float], inout [Float], UnsafeMutablePointer<Float>?) -> Void) {
    var scores = [Float](repeating: .nan, count: nq * S), out = [Float](repeating: .nan, count: nq * d)
    run(0, S, &scores, &out, nil)
    let cut = S / 2
    var combined = [Float](repeating: .nan, count: nq * d)
    if cut > 0 {
        var s1 = [Float](repeating: .nan, count: nq * cut), s2 = [Float](repeating: .nan, count: nq * (S - cut))
        var o1 = [Float](repeating: .nan, count: nq * d), o2 = o1
        var t1 = [Float](repeating: .nan, count: 2 * nq), t2 = t1
        t1.withUnsafeMutableBufferPointer { run(0, cut, &s1, &o1, $0.baseAddress) }
        t2.withUnsafeMutableBufferPointer { run(cut, S, &s2, &o2, $0.baseAddress) }
        for qi in 0..<nq {
            let m = max(t1[2 * qi], t2[2 * qi])
            let w1 = Foundation.exp(t1[2 * qi] - m), w2 = Foundation.exp(t2[2 * qi] - m)
            let l = w1 * t1[2 * qi + 1] + w2 * t2[2 * qi + 1]
            for i in 0..<d { combined[qi * d + i] = (w1 * o1[qi * d + i] + w2 * o2[qi * d + i]) / l }
        }
    }
    for qi in 0..<nq {
        // f64: softmax of the scaled dots, then the weighted sum of values.
        let dots = (0..<S).map { j in Double(scale) * (0..<d).reduce(0.0) { $0 + Double(q[qi * d + $1]) * key(j, $1) } }
        let m = dots.max()!
        let e = dots.map { Foundation.exp($0 - m) }, sum = e.reduce(0, +)
        let expected = (0..<d).map { i in Float((0..<S).reduce(0.0) { $0 + e[$1] / sum * value($1, i) }) }
        let at = "\(label) query \(qi) of \(nq)"
        #expect(Compare.close(Array(out[(qi * d)..<((qi + 1) * d)]), expected, atol: 2e-6, rtol: 2e-5, at) == nil)
        if cut > 0 {
            #expect(Compare.close(Array(combined[(qi * d)..<((qi + 1) * d)]), expected, atol: 2e-6, rtol: 2e-5, "\(at) split at \(cut)") == nil)
        }
        #expect(Compare.close(Array(scores[(qi * S)..<((qi + 1) * S)]), e.map { Float($0 / sum) }, atol: 1e-7, rtol: 2e-5, "\(at) probabilities") == nil)
    }
}
