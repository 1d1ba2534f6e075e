// The shape of a Llama-family model, read from a Hugging Face config.json (LlamaForCausalLM,
// MistralForCausalLM, Qwen2ForCausalLM) or from GGUF metadata (architecture "llama").
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
}

public enum ModelError: Error, CustomStringConvertible, Equatable {
    case unsupportedArchitecture(file: String, found: String)
    case invalidConfig(file: String, reason: String)
    case missingTensor(file: String, tensor: String)
    case shapeMismatch(file: String, tensor: String, expected: [Int], found: [Int])
    case unusedTensors(file: String, names: [String])
    case notFound(model: String, reason: String)

    public static let supportedArchitectures = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "GGUF llama"]

    public var description: String {
        switch self {
        case let .unsupportedArchitecture(file, found):
            return "\(file): architecture '\(found)' is not supported (supported: \(Self.supportedArchitectures.joined(separator: ", ")))"
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
    /// q/k/v projections carry a bias (Qwen2).
    public var attentionBias = false
    public var bosTokenID: Int?
    public var eosTokenIDs: [Int] = []

    public init(vocabSize: Int, hiddenSize: Int, intermediateSize: Int, layerCount: Int, headCount: Int, kvHeadCount: Int, headDim: Int? = nil) {
        self.vocabSize = vocabSize
        self.hiddenSize = hiddenSize
        self.intermediateSize = intermediateSize
        self.layerCount = layerCount
        self.headCount = headCount
        self.kvHeadCount = kvHeadCount
        self.headDim = headDim ?? hiddenSize / headCount
    }

    /// Parameters of the model (embeddings counted once when tied).
    public var parameterCount: Int {
        let attention = hiddenSize * headDim * (2 * headCount + 2 * kvHeadCount)
        let mlp = 3 * hiddenSize * intermediateSize
        let layer = attention + mlp + 2 * hiddenSize + (attentionBias ? headDim * (headCount + 2 * kvHeadCount) : 0)
        return vocabSize * hiddenSize * (tieWordEmbeddings ? 1 : 2) + layerCount * layer + hiddenSize
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
        let supported = ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"]
        guard supported.contains(arch) else { throw ModelError.unsupportedArchitecture(file: file, found: arch) }
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
        architecture = arch
        guard headCount % kvHeadCount == 0 else { throw bad("num_attention_heads \(headCount) is not a multiple of num_key_value_heads \(kvHeadCount)") }
        guard headDim > 0, headDim % 2 == 0 else { throw bad("head_dim \(headDim) must be positive and even for rotary embeddings") }
        if let eps = json["rms_norm_eps"]?.doubleValue { rmsNormEps = Float(eps) }
        maxPositions = json["max_position_embeddings"]?.intValue ?? maxPositions
        tieWordEmbeddings = json["tie_word_embeddings"]?.boolValue ?? (arch == "Qwen2ForCausalLM" ? false : false)
        attentionBias = json["attention_bias"]?.boolValue ?? (arch == "Qwen2ForCausalLM")
        if json["mlp_bias"]?.boolValue == true { throw bad("mlp_bias is not supported") }
        if let act = json["hidden_act"]?.stringValue, act != "silu" { throw bad("hidden_act '\(act)' is not supported (silu)") }
        // transformers 5 writes rope settings as rope_parameters; older files as rope_theta + rope_scaling.
        let rope = json["rope_parameters"] ?? json["rope_scaling"]
        if let theta = json["rope_parameters"]?["rope_theta"]?.doubleValue ?? json["rope_theta"]?.doubleValue { ropeTheta = theta }
        if let rope, rope != .null {
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
            default:
                throw bad("rope type '\(type)' is not supported (default, linear, llama3)")
            }
        }
        bosTokenID = json["bos_token_id"]?.intValue
        if let e = json["eos_token_id"] {
            eosTokenIDs = e.arrayValue?.compactMap(\.intValue) ?? [e.intValue].compactMap { $0 }
        }
    }

    /// Reads GGUF metadata (architecture "llama"; Mistral-style models convert to it too).
    public init(gguf g: GGUFFile) throws {
        let arch = g.value("general.architecture")?.stringValue ?? "?"
        guard arch == "llama" else { throw ModelError.unsupportedArchitecture(file: g.path, found: "GGUF \(arch)") }
        func int(_ k: String) throws -> Int {
            guard let v = g.value("llama." + k)?.intValue, v > 0 else {
                throw ModelError.invalidConfig(file: g.path, reason: "metadata 'llama.\(k)' is missing or not a positive integer")
            }
            return v
        }
        let hidden = try int("embedding_length")
        let heads = try int("attention.head_count")
        let vocab = g.value("llama.vocab_size")?.intValue ?? g.value("tokenizer.ggml.tokens")?.arrayValue?.count ?? 0
        guard vocab > 0 else { throw ModelError.invalidConfig(file: g.path, reason: "no vocabulary size") }
        func optionalInt(_ k: String) throws -> Int? {
            guard let v = g.value("llama." + k) else { return nil }
            guard let n = v.intValue, n > 0 else {
                throw ModelError.invalidConfig(file: g.path, reason: "metadata 'llama.\(k)' is not a positive integer")
            }
            return n
        }
        self.init(vocabSize: vocab, hiddenSize: hidden, intermediateSize: try int("feed_forward_length"),
                  layerCount: try int("block_count"), headCount: heads,
                  kvHeadCount: try optionalInt("attention.head_count_kv") ?? heads,
                  headDim: try optionalInt("attention.key_length") ?? hidden / heads)
        architecture = "GGUF llama"
        guard headCount % kvHeadCount == 0, headDim > 0, headDim % 2 == 0 else {
            throw ModelError.invalidConfig(file: g.path, reason: "\(headCount) heads of \(headDim) over \(kvHeadCount) key-value heads: the heads must divide evenly and head_dim be even")
        }
        if let eps = g.value("llama.attention.layer_norm_rms_epsilon")?.doubleValue { rmsNormEps = Float(eps) }
        if let theta = g.value("llama.rope.freq_base")?.doubleValue { ropeTheta = theta }
        maxPositions = g.value("llama.context_length")?.intValue ?? maxPositions
        if let type = g.value("llama.rope.scaling.type")?.stringValue, type == "linear",
           let f = g.value("llama.rope.scaling.factor")?.doubleValue {
            ropeScaling = .linear(factor: f)
        }
        tieWordEmbeddings = g.tensor("output.weight") == nil
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

    /// Rotary inverse frequencies (head_dim / 2 of them), as transformers computes them in f32.
    public func ropeInverseFrequencies() -> [Float] {
        let half = headDim / 2
        var inv = (0..<half).map { i -> Float in
            let exponent = Float(2 * i) / Float(headDim)
            return 1.0 / Float(pow(ropeTheta, Double(exponent)))
        }
        switch ropeScaling {
        case .none: break
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
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

extension LlamaConfig {
    /// Attention's head layout.
    public var attentionHeads: AttentionHeads { AttentionHeads(heads: headCount, kvHeads: kvHeadCount, headDim: headDim) }
}
