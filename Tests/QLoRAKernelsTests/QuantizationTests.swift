// Properties of the 4-bit formats that the fixtures do not pin: storage cost, errors, Int4.
import QLoRACore
import QLoRATestSupport
import Testing

import QLoRAKernels

@Suite("quantization")
struct QuantizationTests {
    @Test("NF4 costs 4.5 bits/parameter without double quantization and about 4.127 with it")
    func bitsPerParameter() throws {
        var rng = SeededRandom(seed: 1)
        let rows = 1024, cols = 4096
        let w = (0..<(rows * cols)).map { _ in rng.normal() * 0.02 }
        let plain = try Quantized4Bit(w, shape: [rows, cols], blockSize: 64, doubleQuant: false)
        let dq = try Quantized4Bit(w, shape: [rows, cols], blockSize: 64, doubleQuant: true)
        // 4 + 32/64 bits, plus the 16-entry code table.
        #expect(abs(plain.bitsPerParameter - 4.5) < 0.001)
        // 4 + 8/64 + 32/(64*256) = 4.127, plus 1092 bytes of code tables and offset (0.002 bits here).
        #expect(abs(dq.bitsPerParameter - 4.127) < 0.003)
        #expect(dq.bitsPerParameter < plain.bitsPerParameter)
    }

    @Test("scales decoded per tile and tiles dequantized with them equal the whole-tensor dequantization bit for bit")
    func tileScales() throws {
        var rng = SeededGenerator(seed: 9)
        for (n, bs, dq) in [(10_007, 64, true), (70_000, 64, true), (4_099, 128, false), (33_000, 32, true)] {
            let x = (0..<n).map { _ in (rng.nextFloat() - 0.5) * (rng.nextFloat() < 0.01 ? 40 : 1) }
            let q = try Quantized4Bit(x, shape: [n], type: .nf4, blockSize: bs, doubleQuant: dq)
            let whole = q.dequantize()
            let scales = q.blockScales()
            var decoded = [Float](repeating: 0, count: scales.count)
            decoded.withUnsafeMutableBufferPointer { q.decodeScales(0..<scales.count, into: $0.baseAddress!) }
            #expect(decoded.map(\.bitPattern) == scales.map(\.bitPattern))
            for _ in 0..<20 {
                let a = Int(rng.next() % UInt64(n)), b = Int(rng.next() % UInt64(n))
                let range = min(a, b)..<(max(a, b) + 1)
                var out = [Float](repeating: .nan, count: range.count)
                var scratch = [Float](repeating: 0, count: q.blocks(spannedBy: range).count)
                out.withUnsafeMutableBufferPointer { o in
                    scratch.withUnsafeMutableBufferPointer { q.dequantize(elements: range, into: o.baseAddress!, scaleScratch: $0.baseAddress!) }
                }
                #expect(out.map(\.bitPattern) == whole[range].map(\.bitPattern), "n \(n) range \(range)")
            }
        }
    }

    @Test("NaN and infinity are rejected with the tensor name and element index")
    func nonFinite() {
        var x = [Float](repeating: 0.5, count: 300)
        x[200] = .nan
        #expect(throws: QuantizationError.nonFinite(tensor: "layers.0.q_proj.weight", index: 200, value: .nan).description) {
            do { _ = try Quantized4Bit(x, name: "layers.0.q_proj.weight") } catch { throw "\(error)" }
        }
        x[200] = 1
        x[7] = -.infinity
        for kernels in KernelTable.available {
            #expect(throws: QuantizationError.self) { _ = try Quantized4Bit(x, name: "w", kernels: kernels) }
            do { _ = try Quantized4Bit(x, name: "w", kernels: kernels) } catch let e as QuantizationError {
                guard case let .nonFinite(tensor, index, _) = e else { Issue.record("wrong error \(e)"); return }
                #expect(tensor == "w" && index == 7)
            } catch { Issue.record("wrong error \(error)") }
        }
    }

    @Test("block sizes outside 32...4096 powers of two are refused")
    func blockSizes() {
        for bs in [0, 16, 48, 8192] {
            #expect(throws: QuantizationError.invalidBlockSize(bs)) { _ = try Quantized4Bit([1, 2, 3], blockSize: bs) }
        }
    }

    @Test("Int4 is symmetric absmax rounding to k/7")
    func int4() throws {
        let x: [Float] = [1, -1, 0.6, -0.6, 0, 3.0 / 7, -2.0 / 7, 0.07]
        let q = try Quantized4Bit(x, type: .int4, blockSize: 32, doubleQuant: false)
        let d = q.dequantize()
        let expected: [Float] = [1, -1, 4.0 / 7, -4.0 / 7, 0, 3.0 / 7, -2.0 / 7, 0]
        #expect(Compare.close(d, expected, atol: 1e-6, rtol: 0, "int4") == nil)
    }

    @Test("reconstruction error of NF4 on normal weights is small and smaller than Int4's")
    func reconstruction() throws {
        var rng = SeededRandom(seed: 2)
        let w = (0..<65536).map { _ in rng.normal() }
        func rmse(_ t: QuantType) throws -> Double {
            let d = try Quantized4Bit(w, type: t, doubleQuant: false).dequantize()
            return (zip(w, d).reduce(0.0) { $0 + Double($1.0 - $1.1) * Double($1.0 - $1.1) } / Double(w.count)).squareRoot()
        }
        let nf4 = try rmse(.nf4), int4 = try rmse(.int4)
        #expect(nf4 < 0.11)
        #expect(nf4 < int4)
    }
}

extension String: @retroactive Error {}
