// PiSSA and LoftQ initialisation against PEFT 0.21 (Resources/lora_init.safetensors, from
// scripts/reference/make_init_fixture.py): the seven projections of layer 0 of the tiny f32 Llama, r 8, alpha 16.
// SVD components have a sign each, so products are compared: s·B·A and the residual for PiSSA (PEFT's SVD is f32,
// ours f64); LoftQ's quantized base and low-rank fit (PEFT's bitsandbytes NF4, block 64, no double quantization).
import QLoRA
import QLoRATestSupport
import Testing

private let resources = Fixtures.resources()

@Suite("PiSSA and LoftQ against PEFT")
struct LowRankInitTests {
    let f: SafetensorsFile
    let model: LlamaModel

    init() throws {
        f = try SafetensorsFile(path: FileSystem.join(resources, "lora_init.safetensors"))
        var o = LoadOptions()
        o.quantType = nil
        o.showProgress = false
        model = try LlamaModel.load(FileSystem.join(resources, "tiny-llama-train"), options: o)
    }

    /// B·A [out, in] times `scale`.
    func product(_ a: [Float], _ b: [Float], out: Int, in inF: Int, rank r: Int, scale: Float) -> [Float] {
        LowRankInit.subtractLowRank([Float](repeating: 0, count: out * inF), a: a, b: b, out: out, in: inF, rank: r, scale: -scale)
    }

    func theirs(_ variant: String, _ p: Projection) -> (a: [Float], b: [Float], base: [Float]?) {
        let module = "model.layers.0.\(p.modulePath)"
        return (f.tensor("\(variant).base_model.model.\(module).lora_A.weight")!.values(as: Float.self),
                f.tensor("\(variant).base_model.model.\(module).lora_B.weight")!.values(as: Float.self),
                f.tensor("\(variant).base.\(module).weight")?.values(as: Float.self))
    }

    @Test("PiSSA: s·B·A and the residual base equal PEFT's within 2e-5; the residual plus s·B·A is W; A's rows equal PEFT's up to sign")
    func pissa() throws {
        for p in Projection.present(fused: false) {
            let linear = model.layers[0][p]!, w = linear.denseWeight(), out = linear.outFeatures, inF = linear.inFeatures
            let (a, b, residual) = try LowRankInit.pissa(w, out: out, in: inF, rank: 8, scale: 2, what: p.name)
            let peft = theirs("pissa", p)
            #expect(Compare.close(product(a, b, out: out, in: inF, rank: 8, scale: 2), product(peft.a, peft.b, out: out, in: inF, rank: 8, scale: 2),
                                  atol: 2e-5, rtol: 0, "\(p) s·BA") == nil)
            #expect(Compare.close(residual, peft.base!, atol: 2e-5, rtol: 0, "\(p) residual") == nil)
            let restored = zip(residual, product(a, b, out: out, in: inF, rank: 8, scale: 2)).map(+)
            #expect(Compare.close(restored, w, atol: 1e-6, rtol: 0, "\(p) W") == nil)
            for j in 0..<8 {
                let ours = Array(a[(j * inF)..<((j + 1) * inF)]), ref = Array(peft.a[(j * inF)..<((j + 1) * inF)])
                let sign: Float = zip(ours, ref).map { $0 * $1 }.reduce(0, +) < 0 ? -1 : 1
                #expect(Compare.close(ours.map { $0 * sign }, ref, atol: 1e-4, rtol: 0, "\(p) A row \(j)") == nil)
            }
        }
    }

    @Test("LoftQ, 1 and 5 rounds: the quantized base equals PEFT's (bitsandbytes NF4), and s·B·A equals PEFT's low-rank fit B·A", arguments: [1, 5])
    func loftq(_ rounds: Int) throws {
        var offCodes = 0, total = 0
        for p in Projection.present(fused: false) {
            let linear = model.layers[0][p]!, w = linear.denseWeight(), out = linear.outFeatures, inF = linear.inFeatures
            let (a, b, base, _) = try LowRankInit.loftq(w, out: out, in: inF, rank: 8, scale: 2, iterations: rounds, what: p.name) {
                try Quantized4Bit($0, shape: [out, inF], type: .nf4, blockSize: 64, doubleQuant: false).dequantize()
            }
            let peft = theirs("loftq\(rounds)", p)
            // A different SVD may move an element of a later round's input across an NF4 code boundary: count those.
            offCodes += zip(base, peft.base!).filter { abs($0 - $1) > 1e-5 }.count
            total += base.count
            let fit = product(peft.a, peft.b, out: out, in: inF, rank: 8, scale: 1)
            #expect(Compare.close(product(a, b, out: out, in: inF, rank: 8, scale: 2), fit, atol: 1e-5, rtol: 0, "\(p) s·BA vs PEFT's B·A") == nil)
        }
        #expect(rounds == 1 ? offCodes == 0 : offCodes <= total / 10_000, "\(offCodes) of \(total) base values differ")
        print("LoftQ \(rounds) rounds: \(offCodes) of \(total) base values differ from PEFT's")
    }

    @Test("a bitsandbytes 4-bit checkpoint has no full-precision weights: refused by name, as PEFT refuses it")
    func bitsandbytesRefused() throws {
        let bnb = FileSystem.join(resources, "tiny-llama-train-bnb-nf4")
        #expect { try LowRankInit.source(bnb, method: .pissa) } throws: { "\($0)".contains("is a bitsandbytes 4-bit checkpoint") }
        _ = try LowRankInit.source(FileSystem.join(resources, "tiny-llama-train"), method: .loftq)
    }
}
