// Quantization and dequantization against outputs that bitsandbytes 0.50.2 itself produced on CPU
// (Resources/bnb_quant.safetensors, written by scripts/reference/make_quant_fixtures.py).
import QLoRACore
import QLoRAFormats
import QLoRATestSupport
import Testing

import QLoRAKernels

private let fixture = try! Fixtures.open("bnb_quant.safetensors")

private func floats(_ name: String) -> [Float] {
    guard let t = fixture.tensor(name) else { fatalError("fixture has no tensor \(name)") }
    return t.values(as: Float.self)
}

private func bytes(_ name: String) -> [UInt8] {
    guard let t = fixture.tensor(name) else { fatalError("fixture has no tensor \(name)") }
    return t.byteArray()
}

/// (case name, quant type, block size) for every 4-bit case in the fixture.
private let fourBitCases: [(String, QuantType, Int)] = fixture.names.compactMap { name in
    guard name.hasPrefix("case."), name.hasSuffix(".packed") else { return nil }
    let parts = name.split(separator: ".").map(String.init)  // case, NAME, qt, bsN, packed
    guard parts.count == 5, let qt = QuantType(rawValue: parts[2]), let bs = Int(parts[3].dropFirst(2)) else { return nil }
    return (parts[1], qt, bs)
}

/// Bit equality; for FP4 the sign of zero is not compared: bitsandbytes' C++ CPU kernel decodes code 8
/// as -0.0 while its Python path (odd last dimension, or block size >= 2048 on AVX-512) decodes +0.0.
private func dequantEqual(_ qt: QuantType, _ a: [Float], _ e: [Float], _ label: String) -> String? {
    qt == .fp4 ? Compare.bitEqualIgnoringZeroSign(a, e, label) : Compare.bitEqual(a, e, label)
}

@Suite("bitsandbytes fixtures")
struct BitsandbytesFixtureTests {
    @Test("code tables equal bitsandbytes' get_4bit_type and create_dynamic_map")
    func codeTables() {
        #expect(Compare.bitEqual(Codebooks.nf4, floats("code.nf4"), "nf4") == nil)
        #expect(Compare.bitEqual(Codebooks.fp4, floats("code.fp4"), "fp4") == nil)
        #expect(Compare.bitEqual(Codebooks.dynamic8, floats("code.dynamic"), "dynamic") == nil)
    }

    @Test("the fixture covers NF4 and FP4 at several block sizes")
    func coverage() {
        #expect(fourBitCases.count >= 60)
        #expect(Set(fourBitCases.map(\.2)).isSuperset(of: [32, 64, 128, 256, 4096]))
        #expect(Set(fourBitCases.map(\.1)) == [.nf4, .fp4])
    }

    @Test("4-bit quantize and dequantize without double quantization are bit-exact", arguments: KernelTable.available.map(\.level))
    func plain(level: KernelLevel) throws {
        let kernels = KernelTable.forLevel(level)!
        for (name, qt, bs) in fourBitCases {
            let key = "case.\(name).\(qt).bs\(bs)"
            let input = floats("case.\(name).input")
            let q = try Quantized4Bit(input, type: qt, blockSize: bs, doubleQuant: false, kernels: kernels)
            #expect(Compare.equal(q.packed, bytes(key + ".packed"), key + ".packed") == nil)
            #expect(Compare.bitEqual(q.absmax!, floats(key + ".absmax"), key + ".absmax") == nil)
            #expect(dequantEqual(qt, q.dequantize(kernels: kernels), floats(key + ".dequant"), key + ".dequant") == nil)
        }
    }

    @Test("double quantization: nested codes, nested absmax and dequantized values are bit-exact", arguments: KernelTable.available.map(\.level))
    func doubleQuant(level: KernelLevel) throws {
        let kernels = KernelTable.forLevel(level)!
        var checked = 0
        for (name, qt, bs) in fourBitCases {
            let key = "case.\(name).\(qt).bs\(bs)"
            let input = floats("case.\(name).input")
            let q = try Quantized4Bit(input, type: qt, blockSize: bs, doubleQuant: true, kernels: kernels)
            let expectedOffset = floats(key + ".dq.offset")[0]
            if !expectedOffset.isFinite {
                // bitsandbytes' f32 mean overflows for constants near Float.greatestFiniteMagnitude and
                // its nested state is then garbage; ours stays finite and close.
                #expect(q.nested!.offset.isFinite, "\(key)")
                let scales = q.blockScales(), exact = floats(key + ".absmax")
                let largest = exact.map(abs).max()!
                #expect(Compare.close(scales, exact, atol: largest * 0.01, rtol: 0, key + " finite double quantization") == nil)
                continue
            }
            // The offset (torch's f32 mean of the absmax) and everything downstream are bit-exact.
            #expect(q.nested!.offset.bitPattern == expectedOffset.bitPattern, "\(key): offset \(q.nested!.offset) vs \(expectedOffset)")
            checked += 1
            let same = q
            #expect(Compare.equal(same.packed, bytes(key + ".packed"), key + ".packed") == nil)
            #expect(Compare.equal(same.nested!.codes, bytes(key + ".dq.qabsmax"), key + ".dq.qabsmax") == nil)
            #expect(Compare.bitEqual(same.nested!.nestedAbsmax, floats(key + ".dq.nested_absmax"), key + ".dq.nested_absmax") == nil)
            #expect(Compare.bitEqual(same.blockScales(), floats(key + ".dq.absmax"), key + ".dq.absmax") == nil)
            #expect(dequantEqual(qt, same.dequantize(kernels: kernels), floats(key + ".dq.dequant"), key + ".dq.dequant") == nil)
        }
        #expect(checked > 100)
    }

    @Test("8-bit blockwise quantization with the dynamic map is bit-exact")
    func blockwise8() {
        let cases = Set(fixture.names.filter { $0.hasPrefix("blockwise8.") }.map { $0.split(separator: ".")[1] })
        #expect(cases.count >= 4)
        for c in cases {
            let key = "blockwise8.\(c)"
            let (q, absmax) = Blockwise8.quantize(floats(key + ".input"), blockSize: 256)
            #expect(Compare.equal(q, bytes(key + ".q"), key + ".q") == nil)
            #expect(Compare.bitEqual(absmax, floats(key + ".absmax"), key + ".absmax") == nil)
            #expect(Compare.bitEqual(Blockwise8.dequantize(q, absmax: absmax, blockSize: 256), floats(key + ".dequant"), key + ".dequant") == nil)
        }
    }
}
