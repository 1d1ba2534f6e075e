// DoRA against PEFT 0.21 (Resources/dora_grads.safetensors, from scripts/reference/make_dora_fixture.py): the
// tiny Llama, f32 and the bitsandbytes NF4 base, with DoRA r 8, alpha 16 on every projection, non-zero A and B and
// magnitudes away from their initial norms; the loss, every gradient (A, B and the magnitude), the logits, the
// merged weights, and PEFT's own saved adapter (Resources/peft-dora-adapter) read back.
import QLoRA
import QLoRATestSupport
import Testing

private let resources = Fixtures.resources()

@Suite("DoRA against PEFT")
struct DoRATests {
    let fixture: SafetensorsFile

    init() throws { fixture = try SafetensorsFile(path: FileSystem.join(resources, "dora_grads.safetensors")) }

    func batch() -> TrainingBatch {
        let ids = fixture.tensor("input_ids")!.values(as: Int64.self).map(Int.init)
        let labels = fixture.tensor("labels")!.values(as: Int64.self).map(Int.init)
        return TrainingBatch(tokens: ids, labels: labels, batchSize: 2, sequenceLength: ids.count / 2)
    }

    func engine(_ base: String, quant: QuantType?, prefix: String, checkpointing: Bool) throws -> (TrainingEngine, LoRAWeights) {
        let (model, lora) = try tinyLoRA(base, quant: quant, weights: fixture, prefix: prefix, dora: true)
        var options = TrainingOptions()
        options.computeDType = .f32
        options.gradientCheckpointing = checkpointing
        return (TrainingEngine(model: model, lora: lora, options: options), lora)
    }

    @Test("loss, every gradient (A, B, magnitude) and the logits equal PEFT's, f32 and NF4 bases, with and without checkpointing",
          arguments: [("tiny-llama-train", "dora.", true), ("tiny-llama-train", "dora.", false), ("tiny-llama-train-bnb-nf4", "dora_nf4.", true)])
    func equalsPEFT(_ base: String, _ prefix: String, _ checkpointing: Bool) throws {
        let (engine, lora) = try engine(base, quant: base.hasSuffix("nf4") ? .nf4 : nil, prefix: prefix, checkpointing: checkpointing)
        let expectedLogits = fixture.tensor(prefix + "logits")!.values(as: Float.self)
        let logits = try engine.logits(batch())
        let scale = expectedLogits.map(abs).max()!
        #expect(Compare.close(logits, expectedLogits, atol: 1e-4 * scale, rtol: 1e-4, "\(prefix)logits") == nil)
        lora.zeroGradients()
        let loss = try engine.step(batch())
        let expectedLoss = Double(fixture.tensor(prefix + "loss")!.values(as: Float.self)[0])
        #expect(abs(loss - expectedLoss) / expectedLoss < 1e-5, "\(prefix) loss \(loss) vs \(expectedLoss)")
        let worst = checkGradients(lora, against: fixture, prefix: prefix + "grad.")
        let expectedNorm = Double(fixture.tensor(prefix + "grad_norm")!.values(as: Float.self)[0])
        #expect(abs(lora.gradientNorm - expectedNorm) / expectedNorm < 1e-4)
        print("DoRA \(prefix) (checkpointing \(checkpointing)): loss \(loss) vs PEFT \(expectedLoss), relative \(abs(loss - expectedLoss) / expectedLoss); worst gradient |ours - PEFT| / max|PEFT| \(worst)")
    }

    @Test("a new DoRA adapter starts at the base: its magnitudes are the rows' norms of W, as PEFT initialises them")
    func initialMagnitudes() throws {
        var o = LoadOptions()
        o.showProgress = false
        let model = try LlamaModel.load(FileSystem.join(resources, "tiny-llama-train"), options: o)
        var c = LoRAConfig()
        c.rank = 8
        c.useDoRA = true
        let lora = LoRAWeights(model: model, config: c)
        let plain = TrainingEngine(model: model, lora: LoRAWeights(model: model, config: { var p = c; p.useDoRA = false; return p }()))
        let dora = TrainingEngine(model: model, lora: lora)
        for s in lora.slots {
            let w = model.layers[s.layer][s.projection]!.denseWeight()
            for o in 0..<s.outFeatures {
                var sum: Float = 0
                for j in 0..<s.inFeatures { sum += w[o * s.inFeatures + j] * w[o * s.inFeatures + j] }
                #expect(abs(lora.parameters[s.magnitudeOffset! + o] - sum.squareRoot()) <= 1e-5 * sum.squareRoot())
            }
        }
        #expect(Compare.close(try dora.logits(batch()), try plain.logits(batch()), atol: 1e-5, rtol: 1e-5, "initial DoRA vs base") == nil)
    }

    /// The f32 tiny model with PEFT's own saved DoRA adapter attached.
    func peftAdapted() throws -> (LlamaModel, LlamaModel) {
        var o = LoadOptions()
        o.quantType = nil
        o.showProgress = false
        let model = try LlamaModel.load(FileSystem.join(resources, "tiny-llama-train"), options: o)
        return (model, try model.withAdapter(FileSystem.join(resources, "peft-dora-adapter")))
    }

    @Test("PEFT's saved DoRA adapter, attached for inference, gives PEFT's logits: whole sequences and token by token")
    func attachedPEFTAdapter() throws {
        let (model, adapted) = try peftAdapted()
        let adapter = try PEFTAdapter(folder: FileSystem.join(resources, "peft-dora-adapter"))
        #expect(adapter.config.useDoRA && adapter.modules.allSatisfy { $0.magnitude != nil })
        let ids = batch().tokens, T = ids.count / 2, V = model.config.vocabSize
        let expected = fixture.tensor("dora.logits")!.values(as: Float.self)
        let scale = expected.map(abs).max()!
        for b in 0..<2 {
            let row = Array(ids[(b * T)..<((b + 1) * T)]), theirs = Array(expected[(b * T * V)..<((b + 1) * T * V)])
            let whole = try adapted.forward(row, cache: KVCache(config: model.config, capacity: T), logits: .all)
            #expect(Compare.close(whole, theirs, atol: 1e-4 * scale, rtol: 1e-4, "row \(b)") == nil)
            let cache = KVCache(config: model.config, capacity: T)
            var stepwise: [Float] = []
            for t in row { stepwise += try adapted.forward([t], cache: cache, logits: .last) }
            #expect(Compare.close(stepwise, theirs, atol: 1e-4 * scale, rtol: 1e-4, "row \(b) token by token") == nil)
        }
    }

    @Test("in a batch that mixes models (what qlora serve runs), the DoRA rows get PEFT's logits and the base's rows the base's")
    func mixedBatch() throws {
        let (model, adapted) = try peftAdapted()
        let ids = batch().tokens, T = ids.count / 2, V = model.config.vocabSize
        let rows = [Array(ids[0..<T]), Array(ids[T..<(2 * T)])]
        let caches = rows.map { _ in KVCache(config: model.config, capacity: T + 1) }
        // Prefill both (one pass over the two prompts), then one batched decoding step.
        let last = try model.forward(sequences: rows, caches: caches, adapters: [adapted, nil])
        let expected = fixture.tensor("dora.logits")!.values(as: Float.self)
        let scale = expected.map(abs).max()!
        #expect(Compare.close(Array(last[0..<V]), Array(expected[((T - 1) * V)..<(T * V)]), atol: 1e-4 * scale, rtol: 1e-4, "DoRA row") == nil)
        let base = try model.forward(rows[1], cache: KVCache(config: model.config, capacity: T + 1), logits: .last)
        #expect(Compare.close(Array(last[V..<(2 * V)]), base, atol: 1e-4 * scale, rtol: 1e-4, "base row") == nil)
        let next = [5, 9]
        let stepped = try model.forward(batch: next, caches: caches, adapters: [adapted, nil])
        let alone = try adapted.forward(rows[0] + [5], cache: KVCache(config: model.config, capacity: T + 1), logits: .last)
        #expect(Compare.close(Array(stepped[0..<V]), alone, atol: 1e-4 * scale, rtol: 1e-4, "DoRA row, decoding") == nil)
    }

    @Test("qlora merge of PEFT's DoRA adapter gives PEFT's merge_and_unload weights")
    func merge() throws {
        var options = MergeOptions()
        options.onto = .original
        let merger = try ModelMerger(model: FileSystem.join(resources, "tiny-llama-train"), adapter: FileSystem.join(resources, "peft-dora-adapter"),
                                     options: options)
        for name in ["model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"] {
            let item = merger.items.first { $0.name == name }!
            #expect(item.adapted)
            let theirs = fixture.tensor("dora.merged." + name)!.values(as: Float.self)
            #expect(Compare.close(try merger.values(item), theirs, atol: 1e-5, rtol: 1e-5, name) == nil)
        }
    }

    @Test("the DoRA adapter we write holds PEFT's keys and config and reads back to the same weights and logits")
    func writeAndRead() throws {
        let (model, lora) = try tinyLoRA("tiny-llama-train", weights: fixture, prefix: "dora.", dora: true)
        let dir = try Fixtures.temporaryDirectory("ours-dora")
        try lora.writePEFTAdapter(to: dir, baseModel: "tiny-llama-train")
        let config = try JSON.parse(try FileSystem.readFile(FileSystem.join(dir, "adapter_config.json")))
        #expect(config["use_dora"]?.boolValue == true)
        let written = try SafetensorsFile(path: FileSystem.join(dir, "adapter_model.safetensors"))
        let peft = try SafetensorsFile(path: FileSystem.join(resources, "peft-dora-adapter/adapter_model.safetensors"))
        #expect(Set(written.names) == Set(peft.names))
        for name in peft.names { #expect(written.tensor(name)!.shape == peft.tensor(name)!.shape, "\(name)") }
        var c = lora.config
        c.initialization = .gaussian
        let back = LoRAWeights(model: model, config: c)
        try back.load(from: try PEFTAdapter(folder: dir))
        #expect(back.parameters == lora.parameters)
        // Attached for inference, our adapter gives the training engine's logits (and PEFT's).
        let expected = fixture.tensor("dora.logits")!.values(as: Float.self)
        let ids = batch().tokens, T = ids.count / 2, V = model.config.vocabSize
        let adapted = try model.withAdapter(dir)
        let row = Array(ids[0..<T])
        let ours = try adapted.forward(row, cache: KVCache(config: model.config, capacity: T), logits: .all)
        #expect(Compare.close(ours, Array(expected[0..<(T * V)]), atol: 1e-4 * expected.map(abs).max()!, rtol: 1e-4, "written adapter") == nil)
        // A DoRA adapter is not plain LoRA: a run without --use-dora refuses it by name, and llama.cpp's LoRA GGUF cannot hold it.
        var plainConfig = lora.config
        plainConfig.useDoRA = false
        #expect(throws: FormatError.self) { try LoRAWeights(model: model, config: plainConfig).load(from: try PEFTAdapter(folder: dir)) }
    }
}

@Suite("DoRA with dropout")
struct DoRADropoutTests {
    /// The dropout form on one dense projection with a bias, against the formula PEFT runs with dropout (y = W x + b + (g − 1) ⊙ W d +
    /// g ⊙ s·B A d, d = drop(x)) computed here in f64, and the gradients against central differences of that formula. PEFT's
    /// dropout masks are torch's and cannot be drawn here; make_dora_fixture.py checks that PEFT's DoRA with dropout computes
    /// this formula (dora.dropout_check.maxdiff in dora_grads.safetensors' metadata: 4.8e-7).
    @Test("forward and every gradient (A, B, magnitude, x) of the dropout form equal PEFT's formula", arguments: [Float(0.3), 0])
    func dropoutForm(_ p: Float) throws {
        let n = 5, inF = 24, outF = 16, r = 4, s: Float = 2
        var rng = SeededGenerator(seed: 7)
        func random(_ count: Int, _ scale: Float = 1) -> [Float] { (0..<count).map { _ in (rng.nextFloat() * 2 - 1) * scale } }
        let w = random(outF * inF, 0.3), bias = random(outF, 0.1), a = random(r * inF, 0.3), b = random(outF * r, 0.3)
        let x = random(n * inF), dy = random(n * outF)
        let linear = Linear(weight: .dense(w), outFeatures: outF, inFeatures: inF, bias: bias)
        let norms = a.withUnsafeBufferPointer { ap in b.withUnsafeBufferPointer { bp in linear.doraNorms(a: ap.baseAddress!, b: bp.baseAddress!, rank: r, scale: s) } }
        let m = norms.enumerated().map { $0.element * (1 + 0.2 * Float($0.offset % 3) - 0.1) }
        let g = zip(m, norms).map { $0 / $1 }, inverse = norms.map { 1 / $0 }
        // Buffers as the block hands them over (freed at the end).
        var owned: [UnsafeMutablePointer<Float>] = []
        func buffer(_ values: [Float]) -> UnsafeMutablePointer<Float> {
            let p = UnsafeMutablePointer<Float>.allocate(capacity: max(values.count, 1))
            p.initialize(from: values, count: values.count)
            owned.append(p)
            return p
        }
        func zeros(_ count: Int) -> UnsafeMutablePointer<Float> { buffer([Float](repeating: 0, count: count)) }
        let maskp = UnsafeMutablePointer<UInt8>.allocate(capacity: n * inF)
        defer { maskp.deallocate(); owned.forEach { $0.deallocate() } }
        // y = W x + b (the frozen product), then the DoRA dropout form; then its backward.
        let yp = zeros(n * outF), xp = buffer(x), dyp = buffer(dy)
        for i in 0..<n { for o in 0..<outF { yp[i * outF + o] = bias[o] + (0..<inF).reduce(Float(0)) { $0 + w[o * inF + $1] * x[i * inF + $1] } } }
        let dummy = zeros(16)
        let call = BlockCall(rows: n, cos: dummy, sin: dummy, bf16: nil, kernels: .current)
        let scratch = BlockScratch(proj: dummy, tile: dummy, prepared: dummy)
        let dropout = LoRADropout(probability: p, seed: 11, mask: maskp, dropped: zeros(n * inF))
        let dap = zeros(r * inF), dbp = zeros(outF * r), dmp = zeros(outF), dxp = zeros(n * inF)
        let u = LoRAUpdate(a: buffer(a), b: buffer(b), rank: r, scale: s, t: zeros(n * r), dropout: dropout, gradA: dap, gradB: dbp,
                           dora: .init(scale: buffer(g), bias: buffer(bias), inverseNorm: buffer(inverse), z: zeros(n * outF), gradMagnitude: dmp))
        linear.doraDropoutForward(u, xp, rows: n, into: yp, scratch, call)
        var grads = BlockGradients(da: dummy, dg: dummy, du: dummy, dx2: dummy, dh2: dummy, dx1: dummy, dAttn: dummy, dq: dummy, dk: dummy,
                                   dv: dummy, dt: zeros(n * r), through: zeros(n * inF))
        grads.dora = zeros(n * outF)
        linear.doraBackward(u, dyp, input: xp, rows: n, dx: dxp, grads, scratch, call)
        let mask = Array(UnsafeBufferPointer(start: maskp, count: n * inF))
        let y = Array(UnsafeBufferPointer(start: yp, count: n * outF)), dA = Array(UnsafeBufferPointer(start: dap, count: r * inF))
        let dB = Array(UnsafeBufferPointer(start: dbp, count: outF * r)), dm = Array(UnsafeBufferPointer(start: dmp, count: outF))
        let dx = Array(UnsafeBufferPointer(start: dxp, count: n * inF))
        #expect(p == 0 ? mask.allSatisfy { $0 == 1 } : mask.contains(0) && mask.contains(1))
        // PEFT computes this formula with dropout (checked by the fixture's generator on its own dropout masks).
        let fixture = try SafetensorsFile(path: FileSystem.join(resources, "dora_grads.safetensors"))
        #expect((Double(fixture.metadataValue("dora.dropout_check.maxdiff") ?? "1") ?? 1) < 1e-6)
        let keep = 1 / (1 - Double(p))
        // PEFT's formula in f64, as a function of (A, B, m, x), for the loss Σ dy ⊙ y.
        func loss(_ a: [Double], _ b: [Double], _ m: [Double], _ x: [Double]) -> (y: [Double], value: Double) {
            var y = [Double](repeating: 0, count: n * outF), value = 0.0
            for i in 0..<n {
                let d = (0..<inF).map { x[i * inF + $0] * Double(mask[i * inF + $0]) * keep }
                let ad = (0..<r).map { k in (0..<inF).reduce(0.0) { $0 + a[k * inF + $1] * d[$1] } }
                for o in 0..<outF {
                    let wx = (0..<inF).reduce(0.0) { $0 + Double(w[o * inF + $1]) * x[i * inF + $1] }
                    let wd = (0..<inF).reduce(0.0) { $0 + Double(w[o * inF + $1]) * d[$1] }
                    let bad = (0..<r).reduce(0.0) { $0 + b[o * r + $1] * ad[$1] }
                    let gg = m[o] / Double(norms[o])
                    let v = wx + Double(bias[o]) + (gg - 1) * wd + gg * Double(s) * bad
                    y[i * outF + o] = v
                    value += v * Double(dy[i * outF + o])
                }
            }
            return (y, value)
        }
        let da = a.map(Double.init), db = b.map(Double.init), dmv = m.map(Double.init), dxv = x.map(Double.init)
        let reference = loss(da, db, dmv, dxv)
        #expect(Compare.close(y, reference.y.map(Float.init), atol: 1e-5, rtol: 1e-5, "y") == nil)
        // Central differences (the formula is linear in each of A, B, m and x, so they are exact up to rounding).
        func numeric(_ v: [Double], _ f: ([Double]) -> Double) -> [Float] {
            (0..<v.count).map { i in
                var plus = v, minus = v
                plus[i] += 1e-3; minus[i] -= 1e-3
                return Float((f(plus) - f(minus)) / 2e-3)
            }
        }
        #expect(Compare.close(dA, numeric(da) { loss($0, db, dmv, dxv).value }, atol: 1e-4, rtol: 1e-4, "dA") == nil)
        #expect(Compare.close(dB, numeric(db) { loss(da, $0, dmv, dxv).value }, atol: 1e-4, rtol: 1e-4, "dB") == nil)
        #expect(Compare.close(dm, numeric(dmv) { loss(da, db, $0, dxv).value }, atol: 1e-4, rtol: 1e-4, "dm") == nil)
        #expect(Compare.close(dx, numeric(dxv) { loss(da, db, dmv, $0).value }, atol: 1e-4, rtol: 1e-4, "dx") == nil)
    }
}
