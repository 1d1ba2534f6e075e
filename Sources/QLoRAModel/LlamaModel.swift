// A Llama-family causal language model (Llama 1-3, Mistral, Qwen2, SmolLM) on frozen 4-bit weights:
// embedding, N blocks [RMSNorm, attention with RoPE and grouped KV heads, RMSNorm, SwiGLU MLP], final
// norm, LM head. Port of transformers' modeling_llama.py (5.x) forward, without the training parts.
import QLoRACore
import QLoRAFormats
import QLoRAKernels
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public struct LlamaLayer: Sendable {
    /// The norm before attention.
    public var inputNorm: [Float]
    /// The norm before the MLP (transformers' post_attention_layernorm in Llama; Gemma 3's pre_feedforward_layernorm).
    public var mlpNorm: [Float]
    /// Per-head norms of q and k before RoPE [head_dim] (Qwen3, Gemma 3), or nil.
    public var qNorm: [Float]?
    public var kNorm: [Float]?
    /// Norms of attention's and the MLP's outputs before the residual (Gemma 3's post_attention_layernorm and
    /// post_feedforward_layernorm), or nil.
    public var attentionOutputNorm: [Float]?
    public var mlpOutputNorm: [Float]?
    /// The projections by Projection.rawValue: q, k, v, o, gate, up, down, or o, down and the fused qkv and gateUp.
    var projections: [Linear?]

    /// The seven projections of an unfused layer.
    public init(inputNorm: [Float], q: Linear, k: Linear, v: Linear, o: Linear, postAttentionNorm: [Float],
                gate: Linear, up: Linear, down: Linear) {
        self.inputNorm = inputNorm
        mlpNorm = postAttentionNorm
        projections = [q, k, v, o, gate, up, down, nil, nil]
    }

    /// A layer with Phi-3's fused projections.
    public init(inputNorm: [Float], qkv: Linear, o: Linear, mlpNorm: [Float], gateUp: Linear, down: Linear) {
        self.inputNorm = inputNorm
        self.mlpNorm = mlpNorm
        projections = [nil, nil, nil, o, nil, nil, down, qkv, gateUp]
    }

    /// Projection p, or nil where this layer does not have it (the unfused ones in a fused layer, and back).
    public subscript(p: Projection) -> Linear? {
        get { projections[p.rawValue] }
        set { projections[p.rawValue] = newValue }
    }

    /// The projections this layer has, in PEFT's order.
    public var present: [Projection] { Projection.present(fused: projections[Projection.qkv.rawValue] != nil) }

    public var linears: [Linear] { present.map { self[$0]! } }

    // The unfused layer's projections by name (o and down exist in every layer).
    public var q: Linear { get { self[.q]! } set { self[.q] = newValue } }
    public var k: Linear { get { self[.k]! } set { self[.k] = newValue } }
    public var v: Linear { get { self[.v]! } set { self[.v] = newValue } }
    public var o: Linear { get { self[.o]! } set { self[.o] = newValue } }
    public var gate: Linear { get { self[.gate]! } set { self[.gate] = newValue } }
    public var up: Linear { get { self[.up]! } set { self[.up] = newValue } }
    public var down: Linear { get { self[.down]! } set { self[.down] = newValue } }
}

/// How the embedding table and the LM head (one matrix when tied) are held in memory.
public enum EmbeddingDType: String, Sendable, CaseIterable {
    /// The narrowest of the others that holds the checkpoint's own values exactly: q8_0 for a q8_0
    /// tensor (GGUF), bf16 for a bf16 one, f32 otherwise. Nothing is rounded.
    case auto
    case f32
    /// Rounded to bfloat16 (half of f32; QLoRA keeps them in its compute dtype).
    case bf16
    /// ggml's q8_0 (9 bits a value here, a quarter of f32): values rounded to 8 bits a block of 32.
    case q8_0
}

/// How to load: the base-weight format and the progress bar.
public struct LoadOptions: Sendable {
    /// 4-bit type for frozen linear weights, or nil to keep them in f32 (reference runs).
    public var quantType: QuantType? = .nf4
    public var blockSize = 64
    public var doubleQuant = true
    public var showProgress = true
    /// The embedding table's and LM head's storage. Decoding reads the whole head for every token, so
    /// its size sets much of the decode speed (113 MB in f32 for SmolLM2's 49,152 x 576, 30 MB in q8_0).
    /// Training reads it tile by tile, dequantized (as fast as f32 on the default model, measured).
    public var embeddingDType: EmbeddingDType = .auto
    /// `embeddingDType == .bf16` (the earlier spelling of it).
    public var bf16Embeddings: Bool {
        get { embeddingDType == .bf16 }
        set { embeddingDType = newValue ? .bf16 : .auto }
    }

    public init() {}
}

/// The precision of the frozen model's products (QLoRA's `bnb_4bit_compute_dtype`).
public enum ComputeDType: String, Sendable, CaseIterable {
    /// f32 throughout (what the transformers and gradient fixtures are checked against).
    case f32
    /// The frozen products (every projection's base weight and the LM head, forward and input gradient)
    /// and attention's four products take bf16 operands and sum in f32, on AVX512-BF16's vdpbf16ps at twice
    /// the f32 FMA rate; LoRA, softmax, norms and the loss stay f32. The paper's setting. In inference
    /// (`LlamaModel.computeDType`) it is the products over many rows (prefill, perplexity, scoring) with
    /// the base weights and the head, and the 4-bit weights' products of a few rows (decoding one token, or one
    /// of each of several sequences: each weight rounded to bf16 as it is decoded); a few rows of a q8_0 or bf16
    /// head and LoRA stay f32. Without AVX512-BF16 both compute in f32.
    case bf16
}

public final class LlamaModel: @unchecked Sendable {
    public let config: LlamaConfig
    /// The embedding table [vocab, hidden] (f32, bf16 or q8_0: `LoadOptions.embeddingDType`), as a matrix:
    /// a token's row is its embedding, and a tied LM head is x · Eᵀ.
    public let embeddings: Linear
    public let layers: [LlamaLayer]
    public let finalNorm: [Float]
    /// nil when tied to the embedding.
    public let lmHead: Linear?
    /// Where the weights came from.
    public let source: String
    /// The precision of the frozen products (prefill, and decoding's 4-bit products); `.f32` unless a caller asks for bf16.
    public var computeDType: ComputeDType = .f32
    /// Whether the frozen products run in bf16 with these kernels: asked for, and the table has bf16 kernels.
    func bf16Products(_ kernels: KernelTable) -> Bool { computeDType == .bf16 && kernels.bf16 != nil }
    /// How the caches this model makes (`makeCache`) keep keys and values; `.f32` unless a caller asks for
    /// 16 bits (the command line's default, `--kv-cache f16`).
    public var kvCacheDType: KVCacheDType = .f32

    /// A KV cache of `capacity` positions for this model, of its `kvCacheDType`.
    public func makeCache(capacity: Int) -> KVCache { KVCache(config: config, capacity: capacity, dtype: kvCacheDType) }
    let inverseFrequencies: [Float]
    /// LongRoPE's long set (calls past the original length), or nil.
    let longInverseFrequencies: [Float]?
    /// The sliding layers' own (Gemma 3), or nil.
    let localInverseFrequencies: [Float]?

    public init(config: LlamaConfig, embeddings: Linear, layers: [LlamaLayer], finalNorm: [Float], lmHead: Linear?, source: String) {
        self.config = config
        self.embeddings = embeddings
        self.layers = layers
        self.finalNorm = finalNorm
        self.lmHead = lmHead
        self.source = source
        inverseFrequencies = config.ropeInverseFrequencies()
        longInverseFrequencies = config.longRope != nil ? config.ropeInverseFrequencies(long: true) : nil
        localInverseFrequencies = config.localRopeInverseFrequencies()
    }

    /// Bytes of weights held in memory.
    public var weightBytes: Int {
        let linear = layers.reduce(0) { $0 + $1.linears.reduce(0) { $0 + $1.weightBytes } }
        let norms = layers.reduce(0) { n, l in
            n + 4 * ([l.inputNorm, l.mlpNorm] + [l.qNorm, l.kNorm, l.attentionOutputNorm, l.mlpOutputNorm].compactMap { $0 }).reduce(0) { $0 + $1.count }
        } + finalNorm.count * 4
        return embeddings.weightBytes + linear + norms + (lmHead?.weightBytes ?? 0)
    }

    /// The output head as a matrix [vocab, hidden]: lm_head, or the embedding table when tied.
    public var head: Linear { lmHead ?? embeddings }
}

// MARK: - Loading

/// Names of a layer's tensors in one checkpoint convention. Parts: input_norm, mlp_norm, attn_out_norm,
/// mlp_out_norm, q_norm, k_norm, and the projections q, k, v, qkv, o, gate, up, gate_up, down (".bias" for a bias).
struct TensorNaming {
    let embedding: String
    let finalNorm: String
    let lmHead: String
    let layer: (Int, String) -> String
    /// GGUF stores Q and K rows permuted for llama.cpp's rotary layout (its llama architecture only).
    let permutedQK: Bool

    static func huggingFace(_ family: ModelFamily) -> TensorNaming {
        var map = ["input_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
                   "q_norm": "self_attn.q_norm", "k_norm": "self_attn.k_norm",
                   "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "qkv": "self_attn.qkv_proj",
                   "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "gate_up": "mlp.gate_up_proj",
                   "down": "mlp.down_proj"]
        if family == .gemma3 {
            map["mlp_norm"] = "pre_feedforward_layernorm"
            map["attn_out_norm"] = "post_attention_layernorm"
            map["mlp_out_norm"] = "post_feedforward_layernorm"
        }
        return TensorNaming(embedding: "model.embed_tokens.weight", finalNorm: "model.norm.weight", lmHead: "lm_head.weight",
                            layer: { i, part in
                                let (base, suffix) = split(part)
                                return "model.layers.\(i).\(map[base]!).\(suffix)"
                            }, permutedQK: false)
    }

    static func gguf(_ family: ModelFamily) -> TensorNaming {
        let map = ["input_norm": "attn_norm", "mlp_norm": "ffn_norm", "attn_out_norm": "post_attention_norm", "mlp_out_norm": "post_ffw_norm",
                   "q_norm": "attn_q_norm", "k_norm": "attn_k_norm", "q": "attn_q", "k": "attn_k", "v": "attn_v", "qkv": "attn_qkv",
                   "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up", "gate_up": "ffn_up", "down": "ffn_down"]
        return TensorNaming(embedding: "token_embd.weight", finalNorm: "output_norm.weight", lmHead: "output.weight",
                            layer: { i, part in
                                let (base, suffix) = split(part)
                                return "blk.\(i).\(map[base]!).\(suffix)"
                            }, permutedQK: family == .llama)
    }

    static func split(_ part: String) -> (String, String) {
        let pieces = part.split(separator: ".")
        return (String(pieces[0]), pieces.count > 1 ? String(pieces[1]) : "weight")
    }
}

extension LlamaModel {
    /// Loads a model from a Hugging Face folder (f32/f16/bf16 safetensors, single or sharded, or a
    /// bitsandbytes 4-bit checkpoint), a .gguf file, or `org/name` in the local Hugging Face cache.
    /// Linear weights are quantized one at a time as they are read, so peak memory stays near the
    /// quantized model plus one layer in f32.
    public static func load(_ model: String, options: LoadOptions = LoadOptions()) throws -> LlamaModel {
        let path = try ModelLocator.resolve(model)
        if path.lowercased().hasSuffix(".gguf") {
            let g = try GGUFFile(path: path)
            var config = try LlamaConfig(gguf: g)
            if let l = g.tensor("rope_factors_long.weight"), let sh = g.tensor("rope_factors_short.weight") {
                // LongRoPE as llama.cpp's converter stores it: the two factor sets as tensors, the attention factor
                // and original length as keys.
                let half = config.rotaryDim / 2
                for t in [l, sh] where t.shape != [half] {
                    throw ModelError.shapeMismatch(file: path, tensor: t.name, expected: [half], found: t.shape)
                }
                let arch = config.family.ggufArchitecture
                guard let original = g.value(arch + ".rope.scaling.original_context_length")?.intValue, original > 1 else {
                    throw ModelError.invalidConfig(file: path, reason: "LongRoPE factors without \(arch).rope.scaling.original_context_length")
                }
                let factor = Double(config.maxPositions) / Double(original)
                let attention = g.value(arch + ".rope.scaling.attn_factor")?.doubleValue
                    ?? (factor <= 1 ? 1 : (1 + log(factor) / log(Double(original))).squareRoot())
                config.ropeScaling = .longrope(shortFactors: try g.floats(sh).map(Double.init), longFactors: try g.floats(l).map(Double.init),
                                               originalMaxPositions: original, attentionFactor: attention)
            }
            if let t = g.tensor("rope_freqs.weight") {
                // Llama 3.1's scaling as llama.cpp stores it: a divisor per frequency.
                guard t.shape == [config.rotaryDim / 2] else {
                    throw ModelError.shapeMismatch(file: path, tensor: t.name, expected: [config.rotaryDim / 2], found: t.shape)
                }
                config.ropeFrequencyFactors = try g.floats(t)
            }
            return try load(config: config, tensors: g, naming: .gguf(config.family), options: options, source: path)
        }
        guard FileSystem.isDirectory(path) else {
            throw ModelError.notFound(model: model, reason: "\(path) is neither a model folder nor a .gguf file")
        }
        let configPath = FileSystem.join(path, "config.json")
        guard FileSystem.exists(configPath) else { throw ModelError.notFound(model: model, reason: "\(path) has no config.json") }
        var config = try LlamaConfig(configFile: configPath)
        let generation = FileSystem.join(path, "generation_config.json")
        // Like transformers, a generation_config.json that is not JSON is passed over.
        if FileSystem.exists(generation), let g = try? JSON.parse(try FileSystem.readFile(generation)) {
            config.apply(generationConfig: g)
        }
        let tensors = try TensorCollection(path: path)
        return try load(config: config, tensors: tensors, naming: .huggingFace(config.family), options: options, source: path)
    }

    static func load(config: LlamaConfig, tensors: TensorSource, naming: TensorNaming, options: LoadOptions, source: String) throws -> LlamaModel {
        var used = Set<String>()
        let file = tensors.path
        let collection = tensors as? TensorCollection

        func floats(_ name: String, shape: [Int]) throws -> [Float] {
            guard let info = tensors.info(name) else { throw ModelError.missingTensor(file: file, tensor: name) }
            guard info.shape == shape else { throw ModelError.shapeMismatch(file: file, tensor: name, expected: shape, found: info.shape) }
            used.insert(name)
            let values = try tensors.floats(name)
            tensors.releasePages(name)
            return values
        }

        func unpermute(_ w: [Float], heads: Int, cols: Int) -> [Float] { RotaryRows.toHuggingFace(w, heads: heads, cols: cols) }

        /// A norm weight as the block multiplies by it (Gemma's stored w becomes 1 + w).
        func norm(_ name: String, _ count: Int) throws -> [Float] {
            let w = try floats(name, shape: [count])
            return config.normWeightOffset == 0 ? w : w.map { $0 + config.normWeightOffset }
        }

        func linear(_ name: String, out: Int, in inFeatures: Int, permuteHeads: Int? = nil, biasName: String? = nil) throws -> Linear {
            var bias: [Float]?
            if let biasName {
                bias = try floats(biasName, shape: [out])
                if let heads = permuteHeads, naming.permutedQK { bias = unpermute(bias!, heads: heads, cols: 1) }
            }
            if let collection, BnB4bit.quantStateName(for: name, in: collection) != nil {
                // A bitsandbytes checkpoint: used as stored, without requantizing.
                let (q, state) = try BnB4bit.load(name, from: collection)
                guard state.shape == [out, inFeatures] else {
                    throw ModelError.shapeMismatch(file: file, tensor: name, expected: [out, inFeatures], found: state.shape)
                }
                BnB4bit.tensorNames(for: name, state: state).forEach { used.insert($0) }
                return Linear(weight: .quantized(q), outFeatures: out, inFeatures: inFeatures, bias: bias)
            }
            var w = try floats(name, shape: [out, inFeatures])
            if let heads = permuteHeads, naming.permutedQK { w = unpermute(w, heads: heads, cols: inFeatures) }
            guard let qt = options.quantType else {
                return Linear(weight: .dense(w), outFeatures: out, inFeatures: inFeatures, bias: bias)
            }
            let q = try Quantized4Bit(w, shape: [out, inFeatures], type: qt, blockSize: options.blockSize,
                                      doubleQuant: options.doubleQuant, name: name)
            return Linear(weight: .quantized(q), outFeatures: out, inFeatures: inFeatures, bias: bias)
        }

        let c = config
        let hidden = c.hiddenSize, qDim = c.qDim, kvDim = c.kvDim
        let progress = ProgressBar("load", total: c.layerCount + 2, enabled: options.showProgress)
        func table(_ name: String) throws -> Linear {
            let storage = tensors.info(name)?.storage.uppercased()
            // A GGUF's q8_0 table, kept (auto or q8_0): its blocks as stored, with no f32 copy made.
            if options.embeddingDType == .auto || options.embeddingDType == .q8_0, let g = tensors as? GGUFFile,
               let t = g.tensor(name), t.type == .q8_0, Quantized8Bit.canStore(cols: hidden) {
                guard t.shape == [c.vocabSize, hidden] else {
                    throw ModelError.shapeMismatch(file: file, tensor: name, expected: [c.vocabSize, hidden], found: t.shape)
                }
                used.insert(name)
                let q = try Quantized8Bit(ggmlBlocks: g.bytes(of: t), shape: t.shape, name: name)
                g.releasePages(name)
                return Linear(weight: .q8(q), outFeatures: c.vocabSize, inFeatures: hidden)
            }
            let w = try floats(name, shape: [c.vocabSize, hidden])
            let weight: Linear.Weight
            switch options.embeddingDType {
            case .f32: weight = .dense(w)
            case .bf16: weight = .bf16(w.map(floatToBFloat16Bits))
            case .q8_0:
                guard Quantized8Bit.canStore(cols: hidden) else {
                    throw ModelError.invalidConfig(file: file, reason: "q8_0 needs a hidden size that is a multiple of 32 (\(name) has \(hidden)); use --head-dtype f32 or bf16")
                }
                weight = .q8(try Quantized8Bit(w, shape: [c.vocabSize, hidden], name: name))
            case .auto:
                weight = storage == "BF16" ? .bf16(w.map(floatToBFloat16Bits)) : .dense(w)
            }
            return Linear(weight: weight, outFeatures: c.vocabSize, inFeatures: hidden)
        }
        let embeddings = try table(naming.embedding)
        progress.advance(note: naming.embedding)
        var layers: [LlamaLayer] = []
        for i in 0..<c.layerCount {
            let n = { naming.layer(i, $0) }
            let bias = c.attentionBias
            var layer: LlamaLayer
            if c.fusedProjections {
                layer = LlamaLayer(
                    inputNorm: try norm(n("input_norm"), hidden),
                    qkv: try linear(n("qkv"), out: c.qkvDim, in: hidden, biasName: bias ? n("qkv.bias") : nil),
                    o: try linear(n("o"), out: hidden, in: qDim, biasName: c.outputBias ? n("o.bias") : nil),
                    mlpNorm: try norm(n("mlp_norm"), hidden),
                    gateUp: try linear(n("gate_up"), out: 2 * c.intermediateSize, in: hidden),
                    down: try linear(n("down"), out: hidden, in: c.intermediateSize))
            } else {
                layer = LlamaLayer(
                    inputNorm: try norm(n("input_norm"), hidden),
                    q: try linear(n("q"), out: qDim, in: hidden, permuteHeads: c.headCount, biasName: bias ? n("q.bias") : nil),
                    k: try linear(n("k"), out: kvDim, in: hidden, permuteHeads: c.kvHeadCount, biasName: bias ? n("k.bias") : nil),
                    v: try linear(n("v"), out: kvDim, in: hidden, biasName: bias ? n("v.bias") : nil),
                    o: try linear(n("o"), out: hidden, in: qDim, biasName: c.outputBias ? n("o.bias") : nil),
                    postAttentionNorm: try norm(n("mlp_norm"), hidden),
                    gate: try linear(n("gate"), out: c.intermediateSize, in: hidden),
                    up: try linear(n("up"), out: c.intermediateSize, in: hidden),
                    down: try linear(n("down"), out: hidden, in: c.intermediateSize))
            }
            if c.qkNorm {
                layer.qNorm = try norm(n("q_norm"), c.headDim)
                layer.kNorm = try norm(n("k_norm"), c.headDim)
            }
            if c.outputNorms {
                layer.attentionOutputNorm = try norm(n("attn_out_norm"), hidden)
                layer.mlpOutputNorm = try norm(n("mlp_out_norm"), hidden)
            }
            layers.append(layer)
            progress.advance(note: "layer \(i)")
        }
        let finalNorm = try norm(naming.finalNorm, hidden)
        var lmHead: Linear?
        if !c.tieWordEmbeddings || tensors.info(naming.lmHead) != nil {
            // The output head stays in its own precision (bitsandbytes does not quantize lm_head either).
            lmHead = try table(naming.lmHead)
        }
        progress.advance(note: "head")
        let ropeTensors: Set<String> = ["rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight"]
        let unused = tensors.tensorNames.filter { !used.contains($0) && !$0.hasSuffix("rotary_emb.inv_freq") && !ropeTensors.contains($0) }
        if !unused.isEmpty { throw ModelError.unusedTensors(file: file, names: unused) }
        return LlamaModel(config: c, embeddings: embeddings, layers: layers, finalNorm: finalNorm, lmHead: lmHead, source: source)
    }
}

/// Finds a model: a path, or `org/name` in the local Hugging Face cache.
public enum ModelLocator {
    public static func resolve(_ model: String) throws -> String {
        if FileSystem.exists(model) { return model }
        let parts = model.split(separator: "/")
        let lower = model.lowercased()
        if lower.hasSuffix(".bin") || lower.hasSuffix(".pt") || lower.hasSuffix(".pth") {
            throw FormatError.pickleRefused(file: model)
        }
        guard parts.count == 2, !model.hasPrefix("."), !model.hasPrefix("/") else {
            throw ModelError.notFound(model: model, reason: "no such file or folder")
        }
        let hubCaches = hubCacheFolders()
        let folderName = "models--\(parts[0])--\(parts[1])"
        for hub in hubCaches {
            let repo = FileSystem.join(hub, folderName)
            guard FileSystem.isDirectory(repo) else { continue }
            let snapshots = FileSystem.join(repo, "snapshots")
            // Prefer the revision refs/main points at; else the only (or last) snapshot.
            if let ref = try? FileSystem.readFile(FileSystem.join(repo, "refs/main")) {
                let rev = String(decoding: ref, as: UTF8.self).trimmingWhitespace()
                let snap = FileSystem.join(snapshots, rev)
                if FileSystem.isDirectory(snap) { return snap }
            }
            if let revs = try? FileSystem.listDirectory(snapshots), let last = revs.last {
                return FileSystem.join(snapshots, last)
            }
        }
        throw ModelError.notFound(
            model: model,
            reason: "not in the local Hugging Face cache (looked in \(hubCaches.joined(separator: ", "))); there is no download here: copy or download the model folder and pass its path")
    }

    /// HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub.
    public static func hubCacheFolders() -> [String] {
        if let c = Environment.get("HF_HUB_CACHE"), !c.isEmpty { return [c] }
        if let h = Environment.get("HF_HOME"), !h.isEmpty { return [FileSystem.join(h, "hub")] }
        let home = Environment.get("HOME") ?? "/root"
        return [FileSystem.join(home, ".cache/huggingface/hub")]
    }
}

