// The trainable part of QLoRA: a low-rank pair (A [r, in], B [out, r]) on each targeted projection of
// every layer, y = W x + s · B A dropout(x), s = alpha / r (alpha / √r with rsLoRA). All parameters live
// in one flat buffer and all gradients in another, so the optimizer is one loop (as in llm.c).
// See Hu et al. 2021 (LoRA), Dettmers et al. 2023 (QLoRA, §3), Kalajdzievski 2023 (rsLoRA).
import QLoRACore
import QLoRAFormats
import QLoRAModel

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public struct LoRAConfig: Sendable, Equatable {
    public enum Initialization: String, Sendable { case kaiming, gaussian }

    /// The paper's Guanaco defaults: r 64, alpha 16, dropout 0.1, every linear layer but lm_head.
    public var rank = 64
    public var alpha: Float = 16
    public var dropout: Float = 0.1
    public var targets: [Projection] = Projection.allCases
    public var useRSLoRA = false
    public var initialization = Initialization.kaiming
    public var seed: UInt64 = 0
    /// DoRA (Liu et al. 2024): a trained magnitude per output row of each adapted projection (LoRAUpdate.DoRA).
    public var useDoRA = false

    public init() {}

    public var scale: Float { useRSLoRA ? alpha / Float(rank).squareRoot() : alpha / Float(rank) }
}

public final class LoRAWeights {
    /// Where one projection's matrices sit in the flat buffers.
    public struct Slot: Sendable {
        public let layer: Int
        public let projection: Projection
        public let inFeatures: Int
        public let outFeatures: Int
        /// Offsets of A [r, in] and B [out, r] in `parameters` (and `gradients`).
        public let aOffset: Int
        public let bOffset: Int
        /// DoRA: the offset of the magnitude m [out], or nil.
        public let magnitudeOffset: Int?
    }

    public let config: LoRAConfig
    public let slots: [Slot]
    /// slot index per layer and projection.
    let index: [[Int?]]
    public var parameters: [Float]
    public var gradients: [Float]
    /// Counts the changes of `parameters` that `markChanged()` reports (an optimizer step, a load): what depends on
    /// them, as DoRA's norms, is computed again when it moves. (An observer on `parameters` would copy the array at
    /// every element written.)
    public private(set) var version = 0

    /// Reports that `parameters` changed.
    public func markChanged() { version &+= 1 }

    /// Trainable parameter count (what PEFT's print_trainable_parameters reports).
    public var parameterCount: Int { parameters.count }

    /// Lays out the adapters for `model` and initializes them as PEFT does: A Kaiming-uniform with
    /// a = √5 (bound 1/√in) or Gaussian (std 1/r), B zeros, so the adapted model starts as the base; with DoRA
    /// the magnitude is each row's norm of W (PEFT's ‖W + s·BA‖ with B = 0).
    public init(model: LlamaModel, config: LoRAConfig) {
        self.config = config
        var slots: [Slot] = []
        var index = [[Int?]](repeating: [Int?](repeating: nil, count: Projection.allCases.count), count: model.layers.count)
        var offset = 0
        for (l, layer) in model.layers.enumerated() {
            for p in layer.present where config.targets.contains(p) {
                let lin = layer[p]!
                let slot = Slot(layer: l, projection: p, inFeatures: lin.inFeatures, outFeatures: lin.outFeatures,
                                aOffset: offset, bOffset: offset + config.rank * lin.inFeatures,
                                magnitudeOffset: config.useDoRA ? offset + config.rank * (lin.inFeatures + lin.outFeatures) : nil)
                offset += config.rank * (lin.inFeatures + lin.outFeatures) + (config.useDoRA ? lin.outFeatures : 0)
                index[l][p.rawValue] = slots.count
                slots.append(slot)
            }
        }
        self.slots = slots
        self.index = index
        parameters = [Float](repeating: 0, count: offset)
        gradients = [Float](repeating: 0, count: offset)
        var rng = SeededGenerator(seed: config.seed)
        for s in slots {
            let n = config.rank * s.inFeatures
            switch config.initialization {
            case .kaiming:
                let bound = 1 / Float(s.inFeatures).squareRoot()
                for i in 0..<n { parameters[s.aOffset + i] = (rng.nextFloat() * 2 - 1) * bound }
            case .gaussian:
                let std = 1 / Float(config.rank)
                for i in 0..<n { parameters[s.aOffset + i] = Self.normal(&rng) * std }
            }
        }
        if config.useDoRA { initializeMagnitudes(model) }
    }

    /// Sets each DoRA magnitude to ‖W + s·BA‖ per row with the current A and B (PEFT's initial magnitude).
    public func initializeMagnitudes(_ model: LlamaModel) {
        for (s, norms) in zip(slots, norms(model)) {
            guard let m = s.magnitudeOffset else { continue }
            for o in 0..<s.outFeatures { parameters[m + o] = norms[o] }
        }
        markChanged()
    }

    /// ‖W + s·BA‖ per output row of every slot (DoRA's weight norm; empty arrays without DoRA).
    public func norms(_ model: LlamaModel) -> [[Float]] {
        guard config.useDoRA else { return slots.map { _ in [] } }
        return parameters.withUnsafeBufferPointer { p in
            slots.map { s in
                model.layers[s.layer][s.projection]!.doraNorms(a: p.baseAddress! + s.aOffset, b: p.baseAddress! + s.bOffset,
                                                                rank: config.rank, scale: config.scale)
            }
        }
    }

    /// The index of layer l's slot for projection p in `slots`, or nil.
    public func slotIndex(layer: Int, projection: Projection) -> Int? { index[layer][projection.rawValue] }

    static func normal(_ rng: inout SeededGenerator) -> Float {
        let u1 = max(rng.nextDouble(), 1e-300), u2 = rng.nextDouble()
        return Float((-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2))
    }

    public func slot(layer: Int, projection: Projection) -> Slot? {
        index[layer][projection.rawValue].map { slots[$0] }
    }

    public func zeroGradients() {
        for i in gradients.indices { gradients[i] = 0 }
    }

    /// sqrt(Σ g²) over every gradient.
    public var gradientNorm: Double {
        var s = 0.0
        for g in gradients { s += Double(g) * Double(g) }
        return s.squareRoot()
    }

    /// The PEFT tensor names of a slot's matrices.
    public static func peftNames(_ s: Slot) -> (a: String, b: String) {
        let base = PEFTAdapter.keyPrefix + "model.layers.\(s.layer).\(s.projection.modulePath)"
        return (base + ".lora_A.weight", base + ".lora_B.weight")
    }

    /// The PEFT tensor name of a slot's DoRA magnitude.
    public static func peftMagnitudeName(_ s: Slot) -> String {
        PEFTAdapter.keyPrefix + "model.layers.\(s.layer).\(s.projection.modulePath)" + PEFTAdapter.magnitudeSuffix
    }

    /// Copies A and B from named tensors (a PEFT adapter's), checking shapes.
    public func load(from adapter: PEFTAdapter) throws {
        guard adapter.config.rank == config.rank else {
            throw FormatError.invalidConfig(file: adapter.folder, reason: "adapter rank \(adapter.config.rank) differs from \(config.rank)")
        }
        guard adapter.config.useDoRA == config.useDoRA else {
            throw FormatError.invalidConfig(file: adapter.folder, reason: adapter.config.useDoRA ? "a DoRA adapter (use_dora) for a run without --use-dora" : "not a DoRA adapter (no use_dora) for a run with --use-dora")
        }
        var byModule: [String: PEFTAdapterWeights] = [:]
        for m in adapter.modules { byModule[m.module] = m }
        for s in slots {
            let module = "model.layers.\(s.layer).\(s.projection.modulePath)"
            guard let m = byModule[module] else {
                throw FormatError.invalidConfig(file: adapter.folder, reason: "adapter has no weights for \(module)")
            }
            let a = m.a.floats(), b = m.b.floats()
            guard a.count == config.rank * s.inFeatures, b.count == s.outFeatures * config.rank else {
                throw FormatError.invalidConfig(file: adapter.folder, reason: "adapter shapes of \(module) do not fit")
            }
            for i in 0..<a.count { parameters[s.aOffset + i] = a[i] }
            for i in 0..<b.count { parameters[s.bOffset + i] = b[i] }
            if let offset = s.magnitudeOffset, let m = m.magnitude?.floats() {
                for i in 0..<m.count { parameters[offset + i] = m[i] }
            }
        }
        markChanged()
    }
}
