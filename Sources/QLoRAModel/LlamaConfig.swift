// The shape of a decoder-only transformer and what sets each supported family apart, as data: read from a
// Hugging Face config.json (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text, Phi-3) or from GGUF metadata (the
// llama.cpp architectures llama, qwen2, qwen3, gemma3, phi3). The block (Block.swift) reads these fields;
// no family is named anywhere else in the model's math.
import QLoRACore
import QLoRAFormats
import QLoRAKernels

/// How rotary position frequencies are scaled for long contexts.
public enum RopeScaling: Equatable, Sendable {
    case none
    /// Positions divided by `factor` (inv_freq / factor).
    case linear(factor: Double)
    /// Llama 3.1's frequency-dependent scaling.
    case llama3(factor: Double, lowFreqFactor: Double, highFreqFactor: Double, originalMaxPositions: Int)
    /// LongRoPE (Phi-3.5, Phi-4-mini, Phi-3's 128k models): each inverse frequency divided by its short factor while
    /// a call's positions stay within `originalMaxPositions`, by its long factor past it; cos and sin times
    /// `attentionFactor`.
    case longrope(shortFactors: [Double], longFactors: [Double], originalMaxPositions: Int, attentionFactor: Double)
}

/// The model families whose checkpoints load (each through the same block).
public enum ModelFamily: String, Sendable, CaseIterable {
    case llama, mistral, qwen2, qwen3, gemma3, phi3

    /// transformers' class name.
    public var huggingFaceArchitecture: String {
        switch self {
        case .llama: return "LlamaForCausalLM"
        case .mistral: return "MistralForCausalLM"
        case .qwen2: return "Qwen2ForCausalLM"
        case .qwen3: return "Qwen3ForCausalLM"
        case .gemma3: return "Gemma3ForCausalLM"
        case .phi3: return "Phi3ForCausalLM"
        }
    }

    /// transformers' model_type.
    public var modelType: String { self == .gemma3 ? "gemma3_text" : rawValue }

    /// llama.cpp's architecture name (Mistral converts to llama).
    public var ggufArchitecture: String { self == .mistral ? "llama" : rawValue }

    init?(huggingFace arch: String) {
        guard let f = ModelFamily.allCases.first(where: { $0.huggingFaceArchitecture == arch }) else { return nil }
        self = f
    }
}

/// The MLP's gate activation: a = act(gate(x)) ⊙ up(x).
public enum GateActivation: String, Sendable {
    /// SwiGLU (Llama, Mistral, Qwen, Phi-3).
    case silu
    /// GELU with the tanh approximation (Gemma's gelu_pytorch_tanh).
    case geluTanh = "gelu_pytorch_tanh"
}

public enum ModelError: Error, CustomStringConvertible, Equatable {
    case unsupportedArchitecture(file: String, found: String)
    case invalidConfig(file: String, reason: String)
    case missingTensor(file: String, tensor: String)
    case shapeMismatch(file: String, tensor: String, expected: [Int], found: [Int])
    case unusedTensors(file: String, names: [String])
    case notFound(model: String, reason: String)

    public static let supportedArchitectures = ModelFamily.allCases.map(\.huggingFaceArchitecture)
        + ["GGUF " + ModelFamily.allCases.filter { $0 != .mistral }.map(\.ggufArchitecture).joined(separator: "/")]

    public var description: String {
        switch self {
        case let .unsupportedArchitecture(file, found):
            return "\(file): architecture '\(found)' is not supported (supported: \(Self.supportedArchitectures.joined(separator: ", ")); mixture-of-experts and vision-language models are not)"
        case let .invalidConfig(file, reason): return "\(file): \(reason)"
        case let .missingTensor(file, tensor): return "\(file): tensor '\(tensor)' is missing"
        case let .shapeMismatch(file, tensor, expected, found):
            return "\(file): tensor '\(tensor)' has shape \(found), the config needs \(expected)"
        case let .unusedTensors(file, names):
            return "\(file): \(names.count) tensors are not used by the model (first: \(names.prefix(3).joined(separator: ", "))); is the config right?"
        case let .notFound(model, reason): return "model '\(model)': \(reason)"
        }
    }
}

public struct LlamaConfig: Equatable, Sendable {
    public var family = ModelFamily.llama
    /// The architecture as the checkpoint names it (config.json's class, or "GGUF <arch>").
    public var architecture = "LlamaForCausalLM"
    public var vocabSize: Int
    public var hiddenSize: Int
    public var intermediateSize: Int
    public var layerCount: Int
    public var headCount: Int
    public var kvHeadCount: Int
    public var headDim: Int
    public var rmsNormEps: Float = 1e-5
    public var ropeTheta: Double = 10000
    public var ropeScaling: RopeScaling = .none
    public var maxPositions: Int = 2048
    public var tieWordEmbeddings = false
    /// q/k/v projections carry a bias (Qwen2; Qwen3 with attention_bias).
    public var attentionBias = false
    /// o_proj carries a bias too (Qwen3 with attention_bias).
    public var outputBias = false
    public var bosTokenID: Int?
    public var eosTokenIDs: [Int] = []

    // What sets the families apart.
    /// The MLP's gate activation.
    public var activation = GateActivation.silu
    /// An RMSNorm over each query and key head before RoPE (Qwen3, Gemma 3).
    public var qkNorm = false
    /// RMSNorms on attention's and the MLP's outputs before the residual adds them (Gemma 3's four norms a block).
    public var outputNorms = false
    /// Added to every stored norm weight at load: Gemma's RMSNorm scales by (1 + w) (its GGUF files store 1 + w).
    public var normWeightOffset: Float = 0
    /// Embedding rows are multiplied by this (Gemma: √hidden); nil: 1.
    public var embeddingScale: Float?
    /// Attention's score scale; nil: 1 / √head_dim (Gemma 3: query_pre_attn_scalar^-½).
    public var attentionScale: Float?
    /// Sliding-window attention: a query at position p sees keys p - window + 1 ... p, on the layers that
    /// `slidingLayers` marks (Mistral v0.1, Phi-3: all; Gemma 3: five of every six).
    public var slidingWindow: Int?
    public var slidingLayers: [Bool] = []
    /// The sliding layers' own RoPE base, without scaling (Gemma 3's local layers); nil: the model's.
    public var localRopeTheta: Double?
    /// How many dimensions of each head RoPE rotates (Phi-4-mini's partial rotary factor); the rest pass through.
    public var rotaryDim: Int
    /// Per-frequency divisors of the inverse frequencies (a GGUF's rope_freqs tensor: Llama 3.1's scaling as
    /// llama.cpp stores it), rotaryDim / 2 of them; nil: none.
    public var ropeFrequencyFactors: [Float]?
    /// The checkpoint fuses q, k, v into qkv_proj and gate, up into gate_up_proj (Phi-3), and LoRA adapts them fused.
    public var fusedProjections = false

    public init(vocabSize: Int, hiddenSize: Int, intermediateSize: Int, layerCount: Int, headCount: Int, kvHeadCount: Int, headDim: Int? = nil) {
        self.vocabSize = vocabSize
        self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize
        self.layerCount = layerCount
        self.headCount = headCount
        self.kvHeadCount = kvHeadCount
        self.headDim = headDim ?? hiddenSize / headCount
        rotaryDim = self.headDim
    }

    /// Whether layer l attends through the sliding window.
    public func isSliding(layer l: Int) -> Bool {
        slidingWindow != nil && (slidingLayers.isEmpty || (l < slidingLayers.count && slidingLayers[l]))
    }

    /// Whether layer l uses the local RoPE tables.
    public func usesLocalRope(layer l: Int) -> Bool { localRopeTheta != nil && isSliding(layer: l) }

    /// The widths of the query and key-value rows, and of q, k, v fused.
    public var qDim: Int { headCount * headDim }
    public var kvDim: Int { kvHeadCount * headDim }
    public var qkvDim: Int { qDim + 2 * kvDim }

    /// The output width of projection p.
    public func outFeatures(_ p: Projection) -> Int {
        switch p {
        case .q: return qDim
        case .k, .v: return kvDim
        case .o, .down: return hiddenSize
        case .gate, .up: return intermediateSize
        case .qkv: return qkvDim
        case .gateUp: return 2 * intermediateSize
        }
    }

    /// Parameters of the model (embeddings counted once when tied).
    public var parameterCount: Int {
        let attention = hiddenSize * headDim * (2 * headCount + 2 * kvHeadCount)
        let mlp = 3 * hiddenSize * intermediateSize
        let norms = (outputNorms ? 4 : 2) * hiddenSize + (qkNorm ? 2 * headDim : 0)
        let biases = (attentionBias ? qkvDim : 0) + (outputBias ? hiddenSize : 0)
        return vocabSize * hiddenSize * (tieWordEmbeddings ? 1 : 2) + layerCount * (attention + mlp + norms + biases) + hiddenSize
    }

    /// Reads config.json.
    public init(configFile path: String) throws {
        let json: JSONValue
        do {
            json = try JSON.parse(try FileSystem.readFile(path, limit: 16 << 20))
        } catch let e as JSONError {
            throw ModelError.invalidConfig(file: path, reason: "not valid JSON: \(e)")
        }
        try self.init(json: json, file: path)
    }

    public init(json: JSONValue, file: String) throws {
        func bad(_ r: String) -> ModelError { .invalidConfig(file: file, reason: r) }
        let arch = json["architectures"]?.arrayValue?.first?.stringValue ?? json["model_type"]?.stringValue ?? "?"
        guard let family = ModelFamily(huggingFace: arch) else { throw ModelError.unsupportedArchitecture(file: file, found: arch) }
        func int(_ k: String) throws -> Int {
            guard let v = json[k]?.intValue, v > 0 else { throw bad("'\(k)' must be a positive integer") }
            return v
        }
        let heads = try int("num_attention_heads")
        let hidden = try int("hidden_size")
        // Optional, but positive when given (a zero divided the head count: found by make fuzz).
        func optionalInt(_ k: String) throws -> Int? {
            guard let v = json[k], v != .null else { return nil }
            guard let n = v.intValue, n > 0 else { throw bad("'\(k)' must be a positive integer") }
            return n
        }
        self.init(vocabSize: try int("vocab_size"), hiddenSize: hidden, intermediateSize: try int("intermediate_size"),
                  layerCount: try int("num_hidden_layers"), headCount: heads,
                  kvHeadCount: try optionalInt("num_key_value_heads") ?? heads,
                  headDim: try optionalInt("head_dim") ?? hidden / heads)
        self.family = family
        architecture = arch
        guard headCount % kvHeadCount == 0 else { throw bad("num_attention_heads \(headCount) is not a multiple of num_key_value_heads \(kvHeadCount)") }
        guard headDim > 0, headDim % 2 == 0 else { throw bad("head_dim \(headDim) must be positive and even for rotary embeddings") }
        if let eps = json["rms_norm_eps"]?.doubleValue { rmsNormEps = Float(eps) }
        maxPositions = json["max_position_embeddings"]?.intValue ?? maxPositions
        tieWordEmbeddings = json["tie_word_embeddings"]?.boolValue ?? (family == .gemma3)
        attentionBias = json["attention_bias"]?.boolValue ?? (family == .qwen2)
        // Qwen2's o_proj never has a bias; Llama's and Qwen3's follow attention_bias.
        outputBias = attentionBias && family != .qwen2
        if json["mlp_bias"]?.boolValue == true { throw bad("mlp_bias is not supported") }
        let act = json["hidden_activation"]?.stringValue ?? json["hidden_act"]?.stringValue
        switch family {
        case .gemma3:
            guard act == nil || act == "gelu_pytorch_tanh" else { throw bad("hidden_activation '\(act!)' is not supported (gelu_pytorch_tanh)") }
            activation = .geluTanh
            qkNorm = true
            outputNorms = true
            normWeightOffset = 1
            embeddingScale = Float(hidden).squareRoot()
            attentionScale = 1 / Float(json["query_pre_attn_scalar"]?.doubleValue ?? 256).squareRoot()
            for k in ["final_logit_softcapping", "attn_logit_softcapping"] where json[k] != nil && json[k] != .null {
                throw bad("'\(k)' is not supported (Gemma 3 has none; Gemma 2 is not supported)")
            }
            if json["use_bidirectional_attention"]?.boolValue == true { throw bad("use_bidirectional_attention is not supported (an encoder)") }
        default:
            if let act, act != "silu" { throw bad("hidden_act '\(act)' is not supported (silu)") }
        }
        if family == .qwen3 { qkNorm = true }
        if family == .phi3 { fusedProjections = true }
        try readRope(json, family: family, bad: bad)
        try readSlidingWindow(json, family: family, bad: bad)
        bosTokenID = json["bos_token_id"]?.intValue
        if let e = json["eos_token_id"] {
            eosTokenIDs = e.arrayValue?.compactMap(\.intValue) ?? [e.intValue].compactMap { $0 }
        }
    }

    /// One rope parameter set (default, linear, llama3) into ropeTheta / ropeScaling.
    mutating func readRopeParameters(_ rope: JSONValue?, originalMaxPositions: Int? = nil, bad: (String) -> ModelError) throws {
        guard let rope, rope != .null else { return }
        if let theta = rope["rope_theta"]?.doubleValue { ropeTheta = theta }
        let type = rope["rope_type"]?.stringValue ?? rope["type"]?.stringValue ?? "default"
        switch type {
        case "default": break
        case "linear":
            guard let f = rope["factor"]?.doubleValue, f > 0 else { throw bad("linear rope scaling needs a positive factor") }
            ropeScaling = .linear(factor: f)
        case "llama3":
            guard let f = rope["factor"]?.doubleValue, let lo = rope["low_freq_factor"]?.doubleValue,
                  let hi = rope["high_freq_factor"]?.doubleValue, let orig = rope["original_max_position_embeddings"]?.intValue,
                  hi > lo
            else { throw bad("llama3 rope scaling needs factor, low_freq_factor < high_freq_factor, original_max_position_embeddings") }
            ropeScaling = .llama3(factor: f, lowFreqFactor: lo, highFreqFactor: hi, originalMaxPositions: orig)
        case "longrope", "su":
            guard let short = rope["short_factor"]?.arrayValue?.compactMap(\.doubleValue),
                  let long = rope["long_factor"]?.arrayValue?.compactMap(\.doubleValue), short.count == long.count,
                  short.allSatisfy({ $0 > 0 }), long.allSatisfy({ $0 > 0 })
            else { throw bad("longrope scaling needs short_factor and long_factor lists of positive numbers, one length") }
            guard let original = rope["original_max_position_embeddings"]?.intValue ?? originalMaxPositions, original > 1 else {
                throw bad("longrope scaling needs original_max_position_embeddings")
            }
            // As transformers: factor is max / original positions unless given; the attention factor
            // sqrt(1 + ln factor / ln original) unless given.
            let factor = rope["factor"]?.doubleValue ?? Double(maxPositions) / Double(original)
            let attention = rope["attention_factor"]?.doubleValue
                ?? (factor <= 1 ? 1 : (1 + log(factor) / log(Double(original))).squareRoot())
            ropeScaling = .longrope(shortFactors: short, longFactors: long, originalMaxPositions: original, attentionFactor: attention)
        default:
            throw bad("rope type '\(type)' is not supported (default, linear, llama3, longrope)")
        }
    }

    /// RoPE: transformers 5 writes rope_parameters (Gemma 3: one set per layer type), older files rope_theta and
    /// rope_scaling (Gemma 3: rope_local_base_freq for the sliding layers); partial_rotary_factor in either place.
    mutating func readRope(_ json: JSONValue, family: ModelFamily, bad: (String) -> ModelError) throws {
        if let theta = json["rope_theta"]?.doubleValue { ropeTheta = theta }
        let parameters = json["rope_parameters"]
        if family == .gemma3 {
            ropeTheta = json["rope_theta"]?.doubleValue ?? 1_000_000
            localRopeTheta = json["rope_local_base_freq"]?.doubleValue ?? 10_000
            if let p = parameters, p != .null, p["full_attention"] != nil || p["sliding_attention"] != nil {
                try readRopeParameters(p["full_attention"], bad: bad)
                if let local = p["sliding_attention"], local != .null {
                    let type = local["rope_type"]?.stringValue ?? "default"
                    guard type == "default" else { throw bad("rope type '\(type)' on sliding layers is not supported (default)") }
                    if let t = local["rope_theta"]?.doubleValue { localRopeTheta = t }
                }
            } else {
                try readRopeParameters(json["rope_scaling"], bad: bad)
            }
        } else {
            let original = json["original_max_position_embeddings"]?.intValue
            try readRopeParameters(parameters ?? json["rope_scaling"], originalMaxPositions: original, bad: bad)
            if parameters != nil, let scaling = json["rope_scaling"], scaling != .null {
                try readRopeParameters(scaling, originalMaxPositions: original, bad: bad)
            }
        }
        let partial = parameters?["partial_rotary_factor"]?.doubleValue ?? json["partial_rotary_factor"]?.doubleValue ?? 1
        guard partial > 0, partial <= 1 else { throw bad("partial_rotary_factor \(partial) must be in (0, 1]") }
        rotaryDim = Int(Double(headDim) * partial)
        guard rotaryDim >= 2, rotaryDim % 2 == 0 else { throw bad("partial_rotary_factor \(partial) of head_dim \(headDim) gives \(rotaryDim) rotary dimensions; they must be even") }
        if case let .longrope(short, _, _, _) = ropeScaling, short.count != rotaryDim / 2 {
            throw bad("longrope has \(short.count) factors; the model rotates \(rotaryDim / 2) frequencies")
        }
    }

    /// Which layers attend through a sliding window: layer_types when the config lists them, else each family's rule.
    mutating func readSlidingWindow(_ json: JSONValue, family: ModelFamily, bad: (String) -> ModelError) throws {
        guard let w = json["sliding_window"], w != .null else { return }
        guard let window = w.intValue, window > 0 else { throw bad("'sliding_window' must be a positive integer") }
        if let types = json["layer_types"]?.arrayValue {
            guard types.count == layerCount else { throw bad("layer_types lists \(types.count) layers, the model has \(layerCount)") }
            slidingLayers = try types.map { t in
                switch t.stringValue {
                case "sliding_attention": return true
                case "full_attention": return false
                default: throw bad("layer type '\(t.stringValue ?? "?")' is not supported (sliding_attention, full_attention)")
                }
            }
        } else {
            switch family {
            case .qwen2, .qwen3:
                let from = json["max_window_layers"]?.intValue ?? layerCount
                slidingLayers = (0..<layerCount).map { json["use_sliding_window"]?.boolValue == true && $0 >= from }
            case .gemma3:
                let pattern = max(1, json["sliding_window_pattern"]?.intValue ?? json["_sliding_window_pattern"]?.intValue ?? 6)
                slidingLayers = (0..<layerCount).map { ($0 + 1) % pattern != 0 }
            default:
                slidingLayers = Array(repeating: true, count: layerCount)
            }
        }
        if slidingLayers.contains(true) { slidingWindow = window } else { slidingLayers = [] }
    }

    /// Reads GGUF metadata (the llama.cpp architectures llama, qwen2, qwen3, gemma3, phi3; Mistral converts to llama).
    public init(gguf g: GGUFFile) throws {
        let arch = g.value("general.architecture")?.stringValue ?? "?"
        guard let family = ModelFamily(rawValue: arch), family != .mistral else {
            throw ModelError.unsupportedArchitecture(file: g.path, found: "GGUF \(arch)")
        }
        let prefix = arch + "."
        func bad(_ r: String) -> ModelError { .invalidConfig(file: g.path, reason: r) }
        func int(_ k: String) throws -> Int {
            guard let v = g.value(prefix + k)?.intValue, v > 0 else { throw bad("metadata '\(prefix + k)' is missing or not a positive integer") }
            return v
        }
        let hidden = try int("embedding_length")
        let heads = try int("attention.head_count")
        let vocab = g.value(prefix + "vocab_size")?.intValue ?? g.value("tokenizer.ggml.tokens")?.arrayValue?.count ?? 0
        guard vocab > 0 else { throw bad("no vocabulary size") }
        func optionalInt(_ k: String) throws -> Int? {
            guard let v = g.value(prefix + k) else { return nil }
            guard let n = v.intValue, n > 0 else { throw bad("metadata '\(prefix + k)' is not a positive integer") }
            return n
        }
        self.init(vocabSize: vocab, hiddenSize: hidden, intermediateSize: try int("feed_forward_length"),
                  layerCount: try int("block_count"), headCount: heads,
                  kvHeadCount: try optionalInt("attention.head_count_kv") ?? heads,
                  headDim: try optionalInt("attention.key_length") ?? hidden / heads)
        self.family = family
        architecture = "GGUF \(arch)"
        guard headCount % kvHeadCount == 0, headDim > 0, headDim % 2 == 0 else {
            throw bad("\(headCount) heads of \(headDim) over \(kvHeadCount) key-value heads: the heads must divide evenly and head_dim be even")
        }
        if let eps = g.value(prefix + "attention.layer_norm_rms_epsilon")?.doubleValue { rmsNormEps = Float(eps) }
        if let theta = g.value(prefix + "rope.freq_base")?.doubleValue { ropeTheta = theta }
        maxPositions = g.value(prefix + "context_length")?.intValue ?? maxPositions
        if let type = g.value(prefix + "rope.scaling.type")?.stringValue, type != "none" {
            guard type == "linear", let f = g.value(prefix + "rope.scaling.factor")?.doubleValue, f > 0 else {
                throw bad("rope scaling '\(type)' is not supported (linear, or llama3 through a rope_freqs tensor)")
            }
            ropeScaling = .linear(factor: f)
        }
        if let r = try optionalInt("rope.dimension_count") {
            guard r <= headDim, r % 2 == 0 else { throw bad("rope.dimension_count \(r) must be even and at most head_dim \(headDim)") }
            rotaryDim = r
        }
        tieWordEmbeddings = g.tensor("output.weight") == nil
        attentionBias = g.tensor("blk.0.attn_q.bias") != nil
        outputBias = g.tensor("blk.0.attn_output.bias") != nil
        qkNorm = g.tensor("blk.0.attn_q_norm.weight") != nil
        fusedProjections = g.tensor("blk.0.attn_qkv.weight") != nil
        // The converter writes 0 for no window.
        if let w = g.value(prefix + "attention.sliding_window")?.intValue, w > 0 {
            slidingWindow = w
            switch family {
            case .gemma3:
                // llama.cpp: a per-layer array, or every n-th layer global (n = the pattern, 6 when absent).
                if let a = g.value(prefix + "attention.sliding_window_pattern")?.arrayValue {
                    guard a.count == layerCount else { throw bad("sliding_window_pattern lists \(a.count) layers, the model has \(layerCount)") }
                    slidingLayers = a.map { $0.boolValue ?? ($0.intValue.map { $0 != 0 } ?? false) }
                } else {
                    let n = max(1, g.value(prefix + "attention.sliding_window_pattern")?.intValue ?? 6)
                    slidingLayers = (0..<layerCount).map { ($0 + 1) % n != 0 }
                }
            default:
                slidingLayers = Array(repeating: true, count: layerCount)
            }
        }
        if family == .gemma3 {
            activation = .geluTanh
            outputNorms = true
            embeddingScale = Float(hidden).squareRoot()
            localRopeTheta = g.value(prefix + "rope.freq_base_swa")?.doubleValue ?? 10_000
            // llama.cpp takes the query scale from the model's size: 1 / √(hidden / heads) for the 27B, else 1 / √head_dim.
            if layerCount == 62 { attentionScale = 1 / Float(hidden / heads).squareRoot() }
            if let cap = g.value(prefix + "final_logit_softcapping")?.doubleValue, cap != 0 {
                throw bad("final_logit_softcapping is not supported")
            }
            // The converter stores Gemma's norms as 1 + w already: normWeightOffset stays 0.
        }
        // Llama 3.1's scaling travels as a tensor of per-frequency divisors, LongRoPE's as two (rope_factors_short and
        // _long, with rope.scaling.attn_factor): both read by LlamaModel.load.
        bosTokenID = g.value("tokenizer.ggml.bos_token_id")?.intValue
        if let e = g.value("tokenizer.ggml.eos_token_id")?.intValue { eosTokenIDs = [e] }
        if let eot = g.value("tokenizer.ggml.eot_token_id")?.intValue, !eosTokenIDs.contains(eot) { eosTokenIDs.append(eot) }
    }

    /// Takes the end and start tokens of a generation_config.json (eos_token_id: one id or a list).
    public mutating func apply(generationConfig g: JSONValue) {
        if let e = g["eos_token_id"] {
            let ids = e.arrayValue?.compactMap(\.intValue) ?? [e.intValue].compactMap { $0 }
            if !ids.isEmpty { eosTokenIDs = ids }
        }
        if let b = g["bos_token_id"]?.intValue { bosTokenID = b }
    }

    /// Rotary inverse frequencies (rotary_dim / 2 of them), as transformers computes them in f32; `long`: LongRoPE's
    /// set for calls past the original length (the short one otherwise).
    public func ropeInverseFrequencies(long: Bool = false) -> [Float] {
        let half = rotaryDim / 2
        var inv = (0..<half).map { i -> Float in
            let exponent = Float(2 * i) / Float(rotaryDim)
            return 1.0 / Float(pow(ropeTheta, Double(exponent)))
        }
        if let factors = ropeFrequencyFactors, factors.count == inv.count {
            for i in inv.indices { inv[i] /= factors[i] }
        }
        switch ropeScaling {
        case .none: break
        case let .longrope(short, longFactors, _, _):
            let factors = long ? longFactors : short
            inv = inv.indices.map { i in
                let exponent = Float(2 * i) / Float(rotaryDim)
                return 1 / (Float(factors[i]) * powf(Float(ropeTheta), exponent))
            }
        case let .linear(factor):
            inv = inv.map { $0 / Float(factor) }
        case let .llama3(factor, low, high, original):
            let lowWavelen = Double(original) / low
            let highWavelen = Double(original) / high
            inv = inv.map { f in
                let wavelen = 2 * Double.pi / Double(f)
                if wavelen < highWavelen { return f }
                if wavelen > lowWavelen { return Float(Double(f) / factor) }
                let smooth = (Double(original) / wavelen - low) / (high - low)
                return Float((1 - smooth) * Double(f) / factor + smooth * Double(f))
            }
        }
        return inv
    }

    /// LongRoPE's original length and attention factor, or nil without LongRoPE.
    public var longRope: (originalMaxPositions: Int, attentionFactor: Float)? {
        guard case let .longrope(_, _, original, attention) = ropeScaling else { return nil }
        return (original, Float(attention))
    }

    /// Whether a call whose largest position is `maxPosition` takes LongRoPE's long factors (transformers: the
    /// call's length, its largest position + 1, past the original length).
    public func usesLongRope(maxPosition: Int) -> Bool {
        guard let l = longRope else { return false }
        return maxPosition + 1 > l.originalMaxPositions
    }

    /// The sliding layers' inverse frequencies (localRopeTheta, no scaling), or nil when they use the model's.
    public func localRopeInverseFrequencies() -> [Float]? {
        guard let theta = localRopeTheta else { return nil }
        var c = self
        c.ropeTheta = theta
        c.ropeScaling = .none
        c.ropeFrequencyFactors = nil
        return c.ropeInverseFrequencies()
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension LlamaConfig {
    /// Attention's head layout.
    public var attentionHeads: AttentionHeads { AttentionHeads(heads: headCount, kvHeads: kvHeadCount, headDim: headDim, scale: attentionScale) }
}
