// Initialisations of LoRA that start the adapter where the weight's structure is, instead of at zero:
//   PiSSA (Meng et al. 2024): the adapter takes W's r principal singular directions and the frozen base keeps the
//   rest, W = W_res + s·BA, so the model starts unchanged and the base to quantize is the residual (smaller, and
//   quantized with less error);
//   LoftQ (Li et al. 2023): alternately quantize and take the rank-r SVD of what quantization lost, so that
//   Q + s·BA is closer to W than Q alone.
// Both as PEFT 0.21 computes them (LoraConfig init_lora_weights "pissa", LoftQConfig), with one deliberate change for
// LoftQ: PEFT sets B·A to the low-rank fit L·R although the forward adds s·B·A (its open issue #1982; with alpha 16
// and r 8 its initial error is then the same as Q's alone); here s·B·A = L·R, which is PEFT's when s = 1.
// SVDs in f64 through LAPACK (PEFT: f32), so components agree with PEFT's up to sign and f32 rounding.
import QLoRACore
import QLoRAKernels
import QLoRAModel

public enum LowRankInit {
    /// PiSSA for one weight W [out, in] (f32): with W = U diag(S) Vt and S' = S[..<r] / s, A = √S' Vt[..<r] [r, in],
    /// B = U[:, ..<r] √S' [out, r] and the residual W − s·BA (from the f32 A and B, as PEFT).
    public static func pissa(_ w: [Float], out: Int, in inF: Int, rank r: Int, scale s: Float, what: String) throws
        -> (a: [Float], b: [Float], residual: [Float]) {
        let (a, b) = try factors(w.map(Double.init), out: out, in: inF, rank: r, scale: s, what: what)
        return (a, b, subtractLowRank(w, a: a, b: b, out: out, in: inF, rank: r, scale: s))
    }

    /// LoftQ for one weight W [out, in]: `iterations` rounds of Q = quantize(W − L), L = the rank-r SVD of W − Q
    /// (L = 0 before the first), as PEFT's loftq_init; returns A and B with s·BA = L (the last round's), Q (dequantized:
    /// the frozen base) and what was quantized into Q (W itself after one round).
    public static func loftq(_ w: [Float], out: Int, in inF: Int, rank r: Int, scale s: Float, iterations: Int, what: String,
                             quantize: ([Float]) throws -> [Float]) throws -> (a: [Float], b: [Float], base: [Float], quantized: [Float]) {
        precondition(iterations >= 1)
        var input = w
        var a = [Float](repeating: 0, count: r * inF), b = [Float](repeating: 0, count: out * r), q: [Float] = []
        for round in 0..<iterations {
            q = try quantize(input)
            // PEFT's L = U[:, ..<r] √S and R = √S Vt[..<r], as A and B with s·BA = L·R.
            (a, b) = try factors(zip(w, q).map { Double($0) - Double($1) }, out: out, in: inF, rank: r, scale: s,
                                 what: "\(what) (LoftQ round \(round + 1))")
            if round + 1 < iterations { input = subtractLowRank(w, a: a, b: b, out: out, in: inF, rank: r, scale: s) }
        }
        return (a, b, q, input)
    }

    /// A [r, in] and B [out, r] with s·BA the rank-r truncated SVD of m [out, in] (each side √(S / s) times a singular
    /// vector: PiSSA's A and B, and LoftQ's with its fit as s·BA).
    static func factors(_ m: [Double], out: Int, in inF: Int, rank r: Int, scale s: Float, what: String) throws -> (a: [Float], b: [Float]) {
        let (u, sv, vt) = try SVD.thin(m, rows: out, cols: inF, what: what)
        var a = [Float](repeating: 0, count: r * inF), b = [Float](repeating: 0, count: out * r)
        for j in 0..<min(r, sv.count) {
            let root = (sv[j] / Double(s)).squareRoot()
            for c in 0..<inF { a[j * inF + c] = Float(root * vt[j * inF + c]) }
            for o in 0..<out { b[o * r + j] = Float(u[o * sv.count + j] * root) }
        }
        return (a, b)
    }

    /// W − s·B·A in f32 (B [out, r], A [r, in]).
    public static func subtractLowRank(_ w: [Float], a: [Float], b: [Float], out: Int, in inF: Int, rank r: Int, scale s: Float) -> [Float] {
        var result = w
        result.withUnsafeMutableBufferPointer { rp in
            b.withUnsafeBufferPointer { bp in
                a.withUnsafeBufferPointer { ap in
                    Gemm.gemm(rp.baseAddress!, bp.baseAddress!, ap.baseAddress!, m: out, n: inF, k: r, alpha: -s, beta: 1)
                }
            }
        }
        return result
    }
}

extension LowRankInit {
    public enum Method: String, Sendable, CaseIterable { case pissa, loftq }

    /// The model's full-precision weights, read one tensor at a time (a merger with no adapter, onto the original
    /// weights). A bitsandbytes 4-bit checkpoint has none: refused, as PEFT refuses PiSSA on one.
    public static func source(_ model: String, method: Method) throws -> ModelMerger {
        let stored = try ModelMerger(model: model, adapter: nil)
        if stored.items.contains(where: { stored.isStoredQuantized($0) }) {
            throw TrainingError.unsupported("--lora-init \(method.rawValue) needs the model's full-precision weights; \(stored.basePath) is a bitsandbytes 4-bit checkpoint (PEFT refuses it too): start from the model it was quantized from")
        }
        var o = MergeOptions()
        o.onto = .original
        return try ModelMerger(model: model, adapter: nil, options: o)
    }

    /// The model with each adapted projection's frozen weight read from `folder` (the base a PiSSA or LoftQ run wrote:
    /// its 4-bit codes as written, so a resumed run trains on the same base without running the SVDs again).
    public static func restoreBases(from folder: String, model: LlamaModel, lora: LoRAWeights) throws -> LlamaModel {
        let written = try ModelMerger(model: folder, adapter: nil)
        let byName = Dictionary(uniqueKeysWithValues: written.items.map { ($0.name, $0) })
        var layers = model.layers
        for slot in lora.slots {
            let name = "model.layers.\(slot.layer).\(slot.projection.modulePath).weight"
            guard let item = byName[name], var linear = layers[slot.layer][slot.projection], item.shape == [linear.outFeatures, linear.inFeatures] else {
                throw TrainingError.unsupported("\(folder) has no tensor \(name) of this model's shape: not the base this run wrote")
            }
            linear.weight = try written.storedWeight(item)
            layers[slot.layer][slot.projection] = linear
        }
        let restored = LlamaModel(config: model.config, embeddings: model.embeddings, layers: layers, finalNorm: model.finalNorm,
                                  lmHead: model.lmHead, source: model.source)
        restored.computeDType = model.computeDType
        return restored
    }

    /// How the frozen bases are stored: a 4-bit type with its block size and double quantization, or nil (f32).
    public typealias Quantization = (type: QuantType, blockSize: Int, doubleQuant: Bool)

    /// Starts `lora` by PiSSA or LoftQ (`iterations` rounds) from the full-precision weights of `source` (read one
    /// tensor at a time, as `qlora merge --onto original` reads them) and returns `model` with each adapted
    /// projection's frozen weight replaced by its new base (PiSSA: the residual; LoftQ: Q), stored as `quantization`,
    /// and the f32 values each new base was made from, by tensor name (quantized again with the same settings, they
    /// give the same codes: what a base written for later use holds). `progress(done, total)` after each projection.
    /// `progress` may throw (an interrupt) to stop between projections.
    public static func apply(_ method: Method, iterations: Int = 1, model: LlamaModel, lora: LoRAWeights, source: ModelMerger,
                             quantization: Quantization?, progress: (Int, Int) throws -> Void = { _, _ in }) throws -> (model: LlamaModel, bases: [String: [Float]]) {
        if method == .loftq && quantization == nil {
            throw TrainingError.unsupported("LoftQ starts the adapter from the error of a 4-bit base; with --quant-type none there is none")
        }
        let r = lora.config.rank, s = lora.config.scale
        var layers = model.layers
        var bases: [String: [Float]] = [:]
        let byName = Dictionary(uniqueKeysWithValues: source.items.map { ($0.name, $0) })
        func store(_ values: [Float], _ linear: Linear, name: String) throws -> Linear.Weight {
            guard let q = quantization else { return .dense(values) }
            return .quantized(try Quantized4Bit(values, shape: [linear.outFeatures, linear.inFeatures], type: q.type, blockSize: q.blockSize,
                                                doubleQuant: q.doubleQuant, name: name))
        }
        for (done, slot) in lora.slots.enumerated() {
            let name = "model.layers.\(slot.layer).\(slot.projection.modulePath).weight"
            guard let item = byName[name], var linear = layers[slot.layer][slot.projection] else {
                throw TrainingError.unsupported("\(source.basePath) has no tensor \(name) to start \(method.rawValue) from")
            }
            let w = try source.values(item), out = linear.outFeatures, inF = linear.inFeatures
            let a: [Float], b: [Float], base: [Float]
            switch method {
            case .pissa:
                (a, b, base) = try pissa(w, out: out, in: inF, rank: r, scale: s, what: name)
            case .loftq:
                let q = quantization!
                (a, b, _, base) = try loftq(w, out: out, in: inF, rank: r, scale: s, iterations: iterations, what: name) {
                    try Quantized4Bit($0, shape: [out, inF], type: q.type, blockSize: q.blockSize, doubleQuant: q.doubleQuant, name: name).dequantize()
                }
            }
            for i in 0..<a.count { lora.parameters[slot.aOffset + i] = a[i] }
            for i in 0..<b.count { lora.parameters[slot.bOffset + i] = b[i] }
            linear.weight = try store(base, linear, name: name)
            layers[slot.layer][slot.projection] = linear
            bases[name] = base
            try progress(done + 1, lora.slots.count)
        }
        let updated = LlamaModel(config: model.config, embeddings: model.embeddings, layers: layers, finalNorm: model.finalNorm,
                                 lmHead: model.lmHead, source: model.source)
        updated.computeDType = model.computeDType
        lora.markChanged()
        if lora.config.useDoRA { lora.initializeMagnitudes(updated) }
        return (updated, bases)
    }
}
