// AdamW against torch.optim.AdamW and bitsandbytes' AdamW8bit (CPU) over 10 steps
// (Resources/adamw*.safetensors, from scripts/reference/make_training_fixtures.py).
import QLoRA
import QLoRATestSupport
import Testing

private let resources = Fixtures.resources()

@Suite("optimizers")
struct OptimizerTests {
    @Test("32-bit AdamW equals torch.optim.AdamW over 10 steps (weight decay 0 and 0.01)", arguments: ["wd0.", "wd001."], [false, true])
    func adamw(_ prefix: String, paged: Bool) throws {
        let f = try SafetensorsFile(path: FileSystem.join(resources, "adamw.safetensors"))
        var p = f.tensor("p0")!.values(as: Float.self)
        var c = AdamWConfig()
        c.weightDecay = prefix == "wd0." ? 0 : 0.01
        let opt = try AdamW(kind: paged ? .pagedAdamw32 : .adamw32, config: c, tensors: [(0, p.count)])
        for t in 1...10 {
            let g = f.tensor("grad.\(t)")!.values(as: Float.self)
            p.withUnsafeMutableBufferPointer { pp in g.withUnsafeBufferPointer { opt.update(parameters: pp, gradients: $0, lr: 1e-2) } }
            let expected = f.tensor(prefix + "param.\(t)")!.values(as: Float.self)
            // torch's CPU sqrt is off by an ulp for some inputs (TRAINING_NOTES.md §4): 1e-6 relative.
            #expect(Compare.close(p, expected, atol: 1e-7, rtol: 1e-6, "\(prefix) step \(t)") == nil)
        }
        let (m, v) = opt.moments(of: 0)
        #expect(Compare.bitEqual(m, f.tensor(prefix + "exp_avg")!.values(as: Float.self), "exp_avg") == nil)
        #expect(Compare.bitEqual(v, f.tensor(prefix + "exp_avg_sq")!.values(as: Float.self), "exp_avg_sq") == nil)
    }

    @Test("LoRA+: the trainer's optimizer (B at 16x the learning rate, weight decay 0.01) equals PEFT's create_loraplus_optimizer over torch's AdamW, 3 steps", arguments: [false, true])
    func loraPlus(paged: Bool) throws {
        let f = try SafetensorsFile(path: FileSystem.join(resources, "loraplus.safetensors"))
        let (_, lora) = try tinyLoRA("tiny-llama-train", weights: try SafetensorsFile(path: FileSystem.join(resources, "lora_grads.safetensors")), prefix: "untied.")
        let names = peftTensors(lora)
        var adam = AdamWConfig()
        adam.weightDecay = 0.01
        let (tensors, isB) = Trainer.optimizerTensors(lora)
        let opt = try AdamW(kind: paged ? .pagedAdamw32 : .adamw32, config: adam, tensors: tensors)
        opt.learningRateScales = isB.map { $0 ? 16 : 1 }
        for t in 1...3 {
            var grads = [Float](repeating: 0, count: lora.parameters.count)
            for (name, offset, count) in names {
                let g = f.tensor("step\(t).grad." + name)!.values(as: Float.self)
                for i in 0..<count { grads[offset + i] = g[i] }
            }
            lora.parameters.withUnsafeMutableBufferPointer { p in grads.withUnsafeBufferPointer { opt.update(parameters: p, gradients: $0, lr: 1e-3) } }
            for (name, offset, count) in names {
                let expected = f.tensor("step\(t)." + name)!.values(as: Float.self)
                #expect(Compare.close(Array(lora.parameters[offset..<(offset + count)]), expected, atol: 1e-7, rtol: 1e-6, "step \(t) \(name)") == nil)
            }
        }
    }

    @Test("8-bit AdamW equals bitsandbytes' AdamW8bit: codes and absmax bit for bit, parameters within 1e-6; small tensors in 32-bit",
          arguments: [false, true])
    func adamw8(paged: Bool) throws {
        let f = try SafetensorsFile(path: FileSystem.join(resources, "adamw8bit.safetensors"))
        let big = f.tensor("p0")!.values(as: Float.self), small = f.tensor("small.p0")!.values(as: Float.self)
        var p = big + small
        let opt = try AdamW(kind: paged ? .pagedAdamw8 : .adamw8, tensors: [(0, big.count), (big.count, small.count)])
        #expect(Compare.bitEqual(Codebooks.dynamic8, f.tensor("qmap1")!.values(as: Float.self), "qmap1") == nil)
        #expect(Compare.bitEqual(Codebooks.dynamic8Unsigned, f.tensor("qmap2")!.values(as: Float.self), "qmap2") == nil)
        for t in 1...10 {
            let g = f.tensor("grad.\(t)")!.values(as: Float.self) + f.tensor("small.grad.\(t)")!.values(as: Float.self)
            p.withUnsafeMutableBufferPointer { pp in g.withUnsafeBufferPointer { opt.update(parameters: pp, gradients: $0, lr: 1e-2) } }
            let state = opt.quantizedState(of: 0)!
            #expect(Compare.equal(state.q1, f.tensor("state1.\(t)")!.byteArray(), "state1 step \(t)") == nil)
            #expect(Compare.equal(state.q2, f.tensor("state2.\(t)")!.byteArray(), "state2 step \(t)") == nil)
            #expect(Compare.bitEqual(state.absmax1, f.tensor("absmax1.\(t)")!.values(as: Float.self), "absmax1 step \(t)") == nil)
            #expect(Compare.bitEqual(state.absmax2, f.tensor("absmax2.\(t)")!.values(as: Float.self), "absmax2 step \(t)") == nil)
            #expect(Compare.close(Array(p[0..<big.count]), f.tensor("param.\(t)")!.values(as: Float.self), atol: 1e-7, rtol: 1e-6, "param \(t)") == nil)
            #expect(Compare.close(Array(p[big.count...]), f.tensor("small.param.\(t)")!.values(as: Float.self), atol: 1e-7, rtol: 1e-6, "small param \(t)") == nil)
        }
        #expect(opt.quantizedState(of: 1) == nil)  // under 4096 elements: 32-bit state
        let (m, v) = opt.moments(of: 1)
        #expect(Compare.bitEqual(m, f.tensor("small.state1")!.values(as: Float.self), "small exp_avg") == nil)
        #expect(Compare.bitEqual(v, f.tensor("small.state2")!.values(as: Float.self), "small exp_avg_sq") == nil)
    }
}
