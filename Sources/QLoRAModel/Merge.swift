// Merging a LoRA adapter into its base, one tensor at a time (`qlora merge`). The adapter was trained against
// the dequantized 4-bit weights, so the merge that reproduces the trained model is
//     W' = dequant(quant(W)) + s·B·A,
// with quant() the same NF4/FP4 quantization the training ran on (type, block size, double quantization).
// Merging onto the original W instead (`.original`) gives a model that was never trained: closer to the
// pretrained one, off the finetuned one by the quantization error. Tensors come out in Hugging Face names and
// layout (Q and K rows in transformers' order, whatever the source); writers turn them into files.
import QLoRACore
import QLoRAFormats
import QLoRAKernels

public enum MergeBase: String, Sendable, CaseIterable {
    /// dequant(quant(W)): the weights the adapter was trained on.
    case quantized
    /// The checkpoint's own W (not what the adapter was trained on).
    case original
}

public struct MergeOptions: Sendable {
    public var onto: MergeBase = .quantized
    /// The quantization the adapter was trained against (`qlora train`'s --quant-type, --block-size, --no-double-quant).
    public var quantType: QuantType = .nf4
    public var blockSize = 64
    public var doubleQuant = true

    public init() {}
}

/// A base model and an adapter, ready to be merged tensor by tensor.
public final class ModelMerger: @unchecked Sendable {
    public enum Part: Sendable, Equatable {
        case embedding, finalNorm, head
        case norm(layer: Int)
        case projection(layer: Int, module: String)
        /// A projection's bias (Qwen2's q/k/v), carried as it is.
        case bias(layer: Int, module: String)

        public var isNorm: Bool {
            switch self {
            case .norm, .finalNorm: return true
            default: return false
            }
        }
    }

    /// One tensor of the merged model.
    public struct Item: Sendable {
        /// Its Hugging Face name (model.layers.0.self_attn.q_proj.weight, ...).
        public let name: String
        /// Row-major [out, in] for matrices.
        public let shape: [Int]
        public let part: Part
        /// The name in the source checkpoint.
        let sourceName: String
        let permuteHeads: Int?
        /// Whether the adapter changes it.
        public let adapted: Bool
    }

    public let config: LlamaConfig
    /// The resolved base model path (a folder or a .gguf file).
    public let basePath: String
    public let tensors: TensorSource
    public let adapter: PEFTAdapter?
    public let options: MergeOptions
    public let items: [Item]
    let naming: TensorNaming
    private let lora: [String: (a: TensorView, b: TensorView, magnitude: TensorView?)]

    public var gguf: GGUFFile? { tensors as? GGUFFile }

    /// Opens the base and the adapter and checks that every adapter module is a projection of this model with
    /// the right shapes, before anything is written.
    public init(model: String, adapter adapterFolder: String?, options: MergeOptions = MergeOptions()) throws {
        let path = try ModelLocator.resolve(model)
        basePath = path
        self.options = options
        if path.lowercased().hasSuffix(".gguf") {
            let g = try GGUFFile(path: path)
            config = try LlamaConfig(gguf: g)
            tensors = g
            naming = .gguf(config.family)
        } else {
            guard FileSystem.isDirectory(path) else {
                throw ModelError.notFound(model: model, reason: "\(path) is neither a model folder nor a .gguf file")
            }
            let configPath = FileSystem.join(path, "config.json")
            guard FileSystem.exists(configPath) else { throw ModelError.notFound(model: model, reason: "\(path) has no config.json") }
            config = try LlamaConfig(configFile: configPath)
            tensors = try TensorCollection(path: path)
            naming = .huggingFace(config.family)
        }
        let c = config
        let hidden = c.hiddenSize, qDim = c.qDim, kvDim = c.kvDim, I = c.intermediateSize
        var items: [Item] = []
        func add(_ name: String, _ shape: [Int], _ part: Part, source: String, permute: Int? = nil) {
            items.append(Item(name: name, shape: shape, part: part, sourceName: source, permuteHeads: permute, adapted: false))
        }
        let hf = TensorNaming.huggingFace(c.family), naming = self.naming
        add(hf.embedding, [c.vocabSize, hidden], .embedding, source: naming.embedding)
        // (part, module, out, in, heads of a rotary permutation in llama GGUFs, bias)
        let attention: [(String, String, Int, Int, Int?, Bool)] = c.fusedProjections
            ? [("qkv", "self_attn.qkv_proj", c.qkvDim, hidden, nil, c.attentionBias)]
            : [("q", "self_attn.q_proj", qDim, hidden, c.headCount, c.attentionBias), ("k", "self_attn.k_proj", kvDim, hidden, c.kvHeadCount, c.attentionBias),
               ("v", "self_attn.v_proj", kvDim, hidden, nil, c.attentionBias)]
        let mlp: [(String, String, Int, Int, Int?, Bool)] = c.fusedProjections
            ? [("gate_up", "mlp.gate_up_proj", 2 * I, hidden, nil, false)]
            : [("gate", "mlp.gate_proj", I, hidden, nil, false), ("up", "mlp.up_proj", I, hidden, nil, false)]
        func projection(_ i: Int, _ p: (String, String, Int, Int, Int?, Bool)) {
            let (short, module, out, inFeatures, heads, bias) = p
            add(hf.layer(i, short), [out, inFeatures], .projection(layer: i, module: module), source: naming.layer(i, short),
                permute: naming.permutedQK ? heads : nil)
            if bias {
                add(hf.layer(i, short + ".bias"), [out], .bias(layer: i, module: module), source: naming.layer(i, short + ".bias"),
                    permute: naming.permutedQK ? heads : nil)
            }
        }
        for i in 0..<c.layerCount {
            add(hf.layer(i, "input_norm"), [hidden], .norm(layer: i), source: naming.layer(i, "input_norm"))
            attention.forEach { projection(i, $0) }
            if c.qkNorm {
                add(hf.layer(i, "q_norm"), [c.headDim], .norm(layer: i), source: naming.layer(i, "q_norm"))
                add(hf.layer(i, "k_norm"), [c.headDim], .norm(layer: i), source: naming.layer(i, "k_norm"))
            }
            projection(i, ("o", "self_attn.o_proj", hidden, qDim, nil, c.outputBias))
            if c.outputNorms { add(hf.layer(i, "attn_out_norm"), [hidden], .norm(layer: i), source: naming.layer(i, "attn_out_norm")) }
            add(hf.layer(i, "mlp_norm"), [hidden], .norm(layer: i), source: naming.layer(i, "mlp_norm"))
            mlp.forEach { projection(i, $0) }
            projection(i, ("down", "mlp.down_proj", hidden, I, nil, false))
            if c.outputNorms { add(hf.layer(i, "mlp_out_norm"), [hidden], .norm(layer: i), source: naming.layer(i, "mlp_out_norm")) }
        }
        add(hf.finalNorm, [hidden], .finalNorm, source: naming.finalNorm)
        if !c.tieWordEmbeddings || tensors.info(naming.lmHead) != nil {
            add(hf.lmHead, [c.vocabSize, hidden], .head, source: naming.lmHead)
        }
        // Every source tensor must be there with its shape (a bnb-4bit weight's shape is in its quant state).
        let collection = tensors as? TensorCollection
        for item in items {
            if let collection, BnB4bit.quantStateName(for: item.sourceName, in: collection) != nil { continue }
            guard let info = tensors.info(item.sourceName) else { throw ModelError.missingTensor(file: path, tensor: item.sourceName) }
            guard info.shape == item.shape else {
                throw ModelError.shapeMismatch(file: path, tensor: item.sourceName, expected: item.shape, found: info.shape)
            }
        }

        var lora: [String: (a: TensorView, b: TensorView, magnitude: TensorView?)] = [:]
        if let adapterFolder {
            let a = try PEFTAdapter(folder: adapterFolder)
            let weightsFile = FileSystem.join(adapterFolder, "adapter_model.safetensors")
            let byName = Dictionary(uniqueKeysWithValues: items.enumerated().map { ($1.name, $0) })
            for m in a.modules {
                guard let index = byName[m.module + ".weight"], case .projection = items[index].part else {
                    throw ModelError.invalidConfig(file: weightsFile, reason: "adapter module '\(m.module)' is not a projection of this model (\(c.layerCount) layers; \(Projection.present(fused: c.fusedProjections).map(\.name).joined(separator: ", ")))")
                }
                let shape = items[index].shape
                let expectA = [a.config.rank, shape[1]], expectB = [shape[0], a.config.rank]
                guard m.a.shape == expectA else {
                    throw ModelError.shapeMismatch(file: weightsFile, tensor: m.module + ".lora_A.weight", expected: expectA, found: m.a.shape)
                }
                guard m.b.shape == expectB else {
                    throw ModelError.shapeMismatch(file: weightsFile, tensor: m.module + ".lora_B.weight", expected: expectB, found: m.b.shape)
                }
                lora[items[index].name] = (m.a, m.b, m.magnitude)
                let old = items[index]
                items[index] = Item(name: old.name, shape: old.shape, part: old.part, sourceName: old.sourceName,
                                    permuteHeads: old.permuteHeads, adapted: true)
            }
            adapter = a
        } else {
            adapter = nil
        }
        self.items = items
        self.lora = lora
        if options.onto == .original, let collection, items.contains(where: { BnB4bit.quantStateName(for: $0.sourceName, in: collection) != nil }) {
            throw ModelError.invalidConfig(file: path, reason: "a bitsandbytes 4-bit checkpoint has no original weights to merge onto; merge onto its quantized weights (the default)")
        }
    }

    /// Whether the source stores `item` as bitsandbytes 4-bit.
    public func isStoredQuantized(_ item: Item) -> Bool {
        guard let collection = tensors as? TensorCollection else { return false }
        return BnB4bit.quantStateName(for: item.sourceName, in: collection) != nil
    }

    /// A projection's weight as the source stores it: a bitsandbytes 4-bit tensor as its codes and constants (not
    /// quantized again), anything else as f32 (the merge's values).
    public func storedWeight(_ item: Item) throws -> Linear.Weight {
        if let collection = tensors as? TensorCollection, BnB4bit.quantStateName(for: item.sourceName, in: collection) != nil {
            return .quantized(try BnB4bit.load(item.sourceName, from: collection).0)
        }
        return .dense(try values(item))
    }

    /// Tensors to write instead of the merge, by name (a frozen base that PiSSA or LoftQ replaced, written with it).
    public var replacements: [String: [Float]] = [:]

    /// The merged tensor in f32, row-major in `item.shape`.
    public func values(_ item: Item) throws -> [Float] {
        if let replaced = replacements[item.name] { return replaced }
        var w: [Float]
        if let collection = tensors as? TensorCollection, BnB4bit.quantStateName(for: item.sourceName, in: collection) != nil {
            w = try BnB4bit.load(item.sourceName, from: collection).0.dequantize()
        } else {
            w = try tensors.floats(item.sourceName)
            tensors.releasePages(item.sourceName)
            if let heads = item.permuteHeads { w = Self.unpermute(w, heads: heads, cols: item.shape.count > 1 ? item.shape[1] : 1) }
            // Gemma's GGUF norms hold 1 + w; its Hugging Face ones w.
            if item.part.isNorm, gguf != nil, config.family == .gemma3 { w = w.map { $0 - 1 } }
            if case .projection = item.part, options.onto == .quantized {
                let q = try Quantized4Bit(w, shape: item.shape, type: options.quantType, blockSize: options.blockSize,
                                          doubleQuant: options.doubleQuant, name: item.sourceName)
                w = q.dequantize()
            }
        }
        if let pair = lora[item.name], let adapter {
            let rank = adapter.config.rank, out = item.shape[0], inFeatures = item.shape[1]
            let fa = pair.a.floats(), fb = pair.b.floats()
            // W += s · B[out, r] · A[r, in]
            w.withUnsafeMutableBufferPointer { wp in
                fb.withUnsafeBufferPointer { bp in
                    fa.withUnsafeBufferPointer { ap in
                        Gemm.gemm(wp.baseAddress!, bp.baseAddress!, ap.baseAddress!, m: out, n: inFeatures, k: rank,
                                  alpha: adapter.config.scale, beta: 1)
                    }
                }
            }
            // DoRA (PEFT's merge): each row of W + s·BA rescaled to its magnitude, W' = m ⊙ (W + s·BA) / ‖W + s·BA‖.
            if let m = pair.magnitude?.floats() {
                for o in 0..<out {
                    var sum = 0.0
                    for j in 0..<inFeatures { sum += Double(w[o * inFeatures + j]) * Double(w[o * inFeatures + j]) }
                    let factor = m[o] / Float(sum.squareRoot())
                    for j in 0..<inFeatures { w[o * inFeatures + j] *= factor }
                }
            }
        }
        return w
    }

    /// GGUF's Q/K rows to transformers' order (RotaryRows).
    public static func unpermute(_ w: [Float], heads: Int, cols: Int) -> [Float] { RotaryRows.toHuggingFace(w, heads: heads, cols: cols) }

    /// transformers' Q/K rows to GGUF's order, as llama.cpp's converter writes them (RotaryRows).
    public static func permute(_ w: [Float], heads: Int, cols: Int) -> [Float] { RotaryRows.toGGUF(w, heads: heads, cols: cols) }

    /// The GGUF name of a merged tensor (llama.cpp's names for `family`).
    public static func ggufName(_ hfName: String, family: ModelFamily = .llama) -> String? {
        switch hfName {
        case "model.embed_tokens.weight": return "token_embd.weight"
        case "model.norm.weight": return "output_norm.weight"
        case "lm_head.weight": return "output.weight"
        default: break
        }
        let p = hfName.split(separator: ".").map(String.init)
        guard p.count == 6 || p.count == 5, p[0] == "model", p[1] == "layers", let i = Int(p[2]) else { return nil }
        let module = p.count == 6 ? "\(p[3]).\(p[4])" : p[3]
        var map = ["input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                   "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "self_attn.qkv_proj": "attn_qkv", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down"]
        if family == .gemma3 {
            map["post_attention_layernorm"] = "post_attention_norm"
            map["pre_feedforward_layernorm"] = "ffn_norm"
            map["post_feedforward_layernorm"] = "post_ffw_norm"
        }
        guard let g = map[module] else { return nil }
        return "blk.\(i).\(g).\(p.last!)"
    }
}

/// The two orders of a Q or K projection's rows: transformers rotates the halves of each head as pairs
/// (i, i + d/2), llama.cpp adjacent pairs (2i, 2i + 1), so its converter interleaves the halves: GGUF row
/// h·d + 2i + s holds transformers' row h·d + s·d/2 + i. Rows of `cols` values each (a weight, B of an
/// adapter, or a bias with cols 1).
public enum RotaryRows {
    public static func toHuggingFace(_ w: [Float], heads: Int, cols: Int) -> [Float] { reorder(w, heads: heads, cols: cols, fromGGUF: true) }
    public static func toGGUF(_ w: [Float], heads: Int, cols: Int) -> [Float] { reorder(w, heads: heads, cols: cols, fromGGUF: false) }

    static func reorder(_ w: [Float], heads: Int, cols: Int, fromGGUF: Bool) -> [Float] {
        let d = w.count / cols / heads
        var out = [Float](repeating: 0, count: w.count)
        for h in 0..<heads {
            for i in 0..<(d / 2) {
                for s in 0..<2 {
                    let gguf = (h * d + 2 * i + s) * cols, hf = (h * d + s * (d / 2) + i) * cols
                    let (src, dst) = fromGGUF ? (gguf, hf) : (hf, gguf)
                    for c in 0..<cols { out[dst + c] = w[src + c] }
                }
            }
        }
        return out
    }
}
