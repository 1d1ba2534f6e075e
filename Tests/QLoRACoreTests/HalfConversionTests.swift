// f16 and bf16 conversions against numpy (f16) and torch (bf16) on every f16 bit pattern and on
// f32 values chosen for ties, subnormals, overflow and NaN (Resources/half.safetensors).
import QLoRACore
import QLoRAFormats
import QLoRATestSupport
import Testing

private let fixture = try! Fixtures.open("half.safetensors")

@Suite("half precision")
struct HalfConversionTests {
    @Test("f16 -> f32 for all 65536 bit patterns equals numpy")
    func widenHalf() {
        let expected = fixture.tensor("f16_to_f32")!.values(as: Float.self)
        #expect(expected.count == 65536)
        let ours = (0..<65536).map { float16BitsToFloat(UInt16($0)) }
        #expect(Compare.bitEqual(ours, expected, "f16_to_f32") == nil)
    }

    @Test("f32 -> f16 rounds to nearest even like numpy")
    func narrowHalf() {
        let x = fixture.tensor("f32_samples")!.values(as: Float.self)
        let expected = fixture.tensor("f32_to_f16_bits")!.values(as: UInt16.self)
        #expect(x.count > 10_000)
        var mismatches = 0
        for i in 0..<x.count where floatToFloat16Bits(x[i]) != expected[i] {
            // NaN payloads: both are quiet NaNs; numpy may keep more payload bits.
            if x[i].isNaN && float16BitsToFloat(floatToFloat16Bits(x[i])).isNaN && float16BitsToFloat(expected[i]).isNaN { continue }
            mismatches += 1
            if mismatches < 5 { Issue.record("f16 of \(x[i]) (0x\(String(x[i].bitPattern, radix: 16))): 0x\(String(floatToFloat16Bits(x[i]), radix: 16)) vs 0x\(String(expected[i], radix: 16))") }
        }
        #expect(mismatches == 0)
    }

    @Test("f32 -> bf16 rounds to nearest even like torch")
    func narrowBFloat() {
        let x = fixture.tensor("f32_samples")!.values(as: Float.self)
        let expected = fixture.tensor("f32_to_bf16_bits")!.values(as: UInt16.self)
        var mismatches = 0
        for i in 0..<x.count where floatToBFloat16Bits(x[i]) != expected[i] {
            if x[i].isNaN && bfloat16BitsToFloat(floatToBFloat16Bits(x[i])).isNaN && bfloat16BitsToFloat(expected[i]).isNaN { continue }
            mismatches += 1
            if mismatches < 5 { Issue.record("bf16 of \(x[i]): 0x\(String(floatToBFloat16Bits(x[i]), radix: 16)) vs 0x\(String(expected[i], radix: 16))") }
        }
        #expect(mismatches == 0)
    }

    @Test("bf16 -> f32 is exact and conversions of all dtypes go through convertToFloat32")
    func widen() {
        #expect(bfloat16BitsToFloat(0x3F80) == 1)
        #expect(bfloat16BitsToFloat(0xC049) == -3.140625)
        let ints: [Int16] = [-3, 0, 7]
        var out = [Float](repeating: 0, count: 3)
        ints.withUnsafeBytes { convertToFloat32(&out, from: $0.baseAddress!, dtype: .i16, count: 3) }
        #expect(out == [-3, 0, 7])
    }
}
