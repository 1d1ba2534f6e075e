// The set-up several reference tests share: a tiny model of Resources with LoRA r 8, alpha 16 on every projection,
// its weights read from a fixture by their PEFT names, and the check of every LoRA gradient against a fixture's.
import QLoRA
import QLoRATestSupport
import Testing

/// The LoRA tensors of `lora` (and DoRA magnitudes) as PEFT names them, with their place in the flat parameter (and gradient) vector.
func peftTensors(_ lora: LoRAWeights) -> [(name: String, offset: Int, count: Int)] {
    let r = lora.config.rank
    return lora.slots.flatMap { s -> [(name: String, offset: Int, count: Int)] in
        let (a, b) = LoRAWeights.peftNames(s)
        let magnitude = s.magnitudeOffset.map { [(LoRAWeights.peftMagnitudeName(s), $0, s.outFeatures)] } ?? []
        return [(a, s.aOffset, r * s.inFeatures), (b, s.bOffset, s.outFeatures * r)] + magnitude
    }
}

/// The model in Resources/`folder` (f32 unless `quant`) with LoRA r 8, alpha 16, no dropout, on every projection, each
/// tensor set from `weights`' tensor `prefix + its PEFT name` (DoRA's magnitudes too with `dora`).
func tinyLoRA(_ folder: String, quant: QuantType? = nil, weights: SafetensorsFile, prefix: String, dora: Bool = false) throws -> (LlamaModel, LoRAWeights) {
    var o = LoadOptions()
    o.quantType = quant
    o.showProgress = false
    let model = try LlamaModel.load(FileSystem.join(Fixtures.resources(), folder), options: o)
    var c = LoRAConfig()
    c.rank = 8
    c.alpha = 16
    c.dropout = 0
    c.useDoRA = dora
    let lora = LoRAWeights(model: model, config: c)
    for (name, offset, count) in peftTensors(lora) {
        let v = weights.tensor(prefix + name)!.values(as: Float.self)
        for i in 0..<count { lora.parameters[offset + i] = v[i] }
    }
    return (model, lora)
}

/// Checks every LoRA gradient against `reference`'s `prefix + PEFT name` tensors (1e-4 relative, and 1e-4 of the
/// tensor's largest value absolute); returns the worst |ours - theirs| / max|theirs|.
@discardableResult
func checkGradients(_ lora: LoRAWeights, against reference: SafetensorsFile, prefix: String) -> Float {
    var worst: Float = 0
    for (name, offset, count) in peftTensors(lora) {
        let theirs = reference.tensor(prefix + name)!.values(as: Float.self)
        let ours = Array(lora.gradients[offset..<(offset + count)])
        let scale = theirs.map(abs).max()!
        #expect(scale > 0, "\(prefix)\(name)")
        #expect(Compare.close(ours, theirs, atol: 1e-4 * scale, rtol: 1e-4, "\(prefix)\(name)") == nil)
        worst = max(worst, zip(ours, theirs).map { abs($0 - $1) }.max()! / scale)
    }
    return worst
}
