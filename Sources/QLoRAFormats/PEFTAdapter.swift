// PEFT LoRA adapter folders: adapter_config.json (peft_type LORA, r, lora_alpha, target_modules,
// use_rslora, ...) and adapter_model.safetensors with keys
// `base_model.model.<module path>.lora_A.weight` [r, in] and `...lora_B.weight` [out, r] (and with use_dora
// `...lora_magnitude_vector` [out]).
import QLoRACore

public struct PEFTAdapterConfig: Sendable, Equatable {
    public var rank: Int
    public var alpha: Double
    public var dropout: Double
    public var targetModules: [String]
    public var useRSLoRA: Bool
    public var baseModel: String?
    public var bias: String
    /// DoRA: a magnitude vector per adapted module (`<module>.lora_magnitude_vector` [out]).
    public var useDoRA: Bool

    /// The factor applied to B·A: alpha / r, or alpha / sqrt(r) with rsLoRA.
    public var scale: Float { Float(useRSLoRA ? alpha / Double(rank).squareRoot() : alpha / Double(rank)) }

    public init(rank: Int, alpha: Double, dropout: Double = 0, targetModules: [String], useRSLoRA: Bool = false,
                baseModel: String? = nil, bias: String = "none", useDoRA: Bool = false) {
        self.rank = rank
        self.alpha = alpha
        self.dropout = dropout
        self.targetModules = targetModules
        self.useRSLoRA = useRSLoRA
        self.baseModel = baseModel
        self.bias = bias
        self.useDoRA = useDoRA
    }

    public init(file: String) throws {
        func bad(_ r: String) -> FormatError { .invalidConfig(file: file, reason: r) }
        let json: JSONValue
        do { json = try JSON.parse(try FileSystem.readFile(file, limit: 16 << 20)) } catch let e as JSONError {
            throw bad("not valid JSON: \(e)")
        }
        let type = json["peft_type"]?.stringValue ?? "?"
        guard type == "LORA" else { throw bad("peft_type '\(type)' is not supported (LORA)") }
        if json["fan_in_fan_out"]?.boolValue == true { throw bad("fan_in_fan_out adapters (GPT-2 Conv1D layers) are not supported") }
        if let patterns = json["rank_pattern"]?.objectValue, !patterns.isEmpty { throw bad("per-module rank_pattern is not supported") }
        if let patterns = json["alpha_pattern"]?.objectValue, !patterns.isEmpty { throw bad("per-module alpha_pattern is not supported") }
        guard let r = json["r"]?.intValue, r > 0 else { throw bad("'r' must be a positive integer") }
        guard let alpha = json["lora_alpha"]?.doubleValue else { throw bad("'lora_alpha' is missing") }
        var targets: [String] = []
        if let list = json["target_modules"]?.arrayValue { targets = list.compactMap(\.stringValue) } else if let one = json["target_modules"]?.stringValue {
            targets = [one]
        }
        self.init(rank: r, alpha: alpha, dropout: json["lora_dropout"]?.doubleValue ?? 0, targetModules: targets,
                  useRSLoRA: json["use_rslora"]?.boolValue ?? false, baseModel: json["base_model_name_or_path"]?.stringValue,
                  bias: json["bias"]?.stringValue ?? "none", useDoRA: json["use_dora"]?.boolValue ?? false)
        guard bias == "none" else { throw bad("bias '\(bias)' is not supported (none)") }
    }
}

/// One adapted module's matrices.
public struct PEFTAdapterWeights: Sendable {
    /// The module path without the PEFT prefix, e.g. "model.layers.0.self_attn.q_proj".
    public let module: String
    /// [r, in]
    public let a: TensorView
    /// [out, r]
    public let b: TensorView
    /// DoRA's magnitude [out] (adapters with use_dora), else nil.
    public let magnitude: TensorView?
}

public struct PEFTAdapter: Sendable {
    public let folder: String
    public let config: PEFTAdapterConfig
    public let modules: [PEFTAdapterWeights]

    public static let keyPrefix = "base_model.model."
    /// The suffix of a DoRA magnitude's key (PEFT keeps it without ".weight").
    public static let magnitudeSuffix = ".lora_magnitude_vector"

    public init(folder: String) throws {
        self.folder = folder
        let configPath = FileSystem.join(folder, "adapter_config.json")
        guard FileSystem.exists(configPath) else {
            throw FormatError.invalidConfig(file: configPath, reason: "no adapter_config.json: not a PEFT adapter folder")
        }
        config = try PEFTAdapterConfig(file: configPath)
        let weightsPath = FileSystem.join(folder, "adapter_model.safetensors")
        if !FileSystem.exists(weightsPath) && FileSystem.exists(FileSystem.join(folder, "adapter_model.bin")) {
            throw FormatError.pickleRefused(file: FileSystem.join(folder, "adapter_model.bin"))
        }
        let file = try SafetensorsFile(path: weightsPath)
        var byModule: [String: (TensorView?, TensorView?)] = [:]
        var magnitudes: [String: TensorView] = [:]
        var order: [String] = []
        for name in file.names {
            guard name.hasPrefix(Self.keyPrefix) else {
                throw FormatError.invalidConfig(file: weightsPath, reason: "tensor '\(name)' does not start with '\(Self.keyPrefix)'")
            }
            let rest = String(name.dropFirst(Self.keyPrefix.count))
            if rest.hasSuffix(Self.magnitudeSuffix) {
                let t = file.tensor(name)!
                guard config.useDoRA else {
                    throw FormatError.invalidConfig(file: weightsPath, reason: "tensor '\(name)' is a DoRA magnitude but adapter_config.json has no use_dora")
                }
                guard t.shape.count == 1, t.dtype.isFloatingPoint else {
                    throw FormatError.invalidConfig(file: weightsPath, reason: "tensor '\(name)' must be a 1-D float vector")
                }
                magnitudes[String(rest.dropLast(Self.magnitudeSuffix.count))] = t
                continue
            }
            let isA = rest.hasSuffix(".lora_A.weight"), isB = rest.hasSuffix(".lora_B.weight")
            guard isA || isB else {
                throw FormatError.invalidConfig(file: weightsPath, reason: "tensor '\(name)' is not a lora_A or lora_B weight or a DoRA magnitude (only LoRA and DoRA are supported)")
            }
            let module = String(rest.dropLast(".lora_A.weight".count))
            let t = file.tensor(name)!
            guard t.shape.count == 2, t.dtype.isFloatingPoint else {
                throw FormatError.invalidConfig(file: weightsPath, reason: "tensor '\(name)' must be a 2-D float matrix")
            }
            if byModule[module] == nil { order.append(module) }
            var entry = byModule[module] ?? (nil, nil)
            if isA { entry.0 = t } else { entry.1 = t }
            byModule[module] = entry
        }
        let rank = config.rank, useDoRA = config.useDoRA
        modules = try order.map { m in
            let (a, b) = byModule[m]!
            guard let a, let b else {
                throw FormatError.invalidConfig(file: weightsPath, reason: "module '\(m)' has only one of lora_A / lora_B")
            }
            guard a.shape[0] == rank, b.shape[1] == rank else {
                throw FormatError.invalidConfig(file: weightsPath, reason: "module '\(m)': lora_A \(a.shape) and lora_B \(b.shape) do not match r = \(rank)")
            }
            let magnitude = magnitudes.removeValue(forKey: m)
            if useDoRA {
                guard let magnitude else {
                    throw FormatError.invalidConfig(file: weightsPath, reason: "use_dora but no tensor '\(Self.keyPrefix + m + Self.magnitudeSuffix)'")
                }
                guard magnitude.shape == [b.shape[0]] else {
                    throw FormatError.invalidConfig(file: weightsPath, reason: "module '\(m)': magnitude \(magnitude.shape) does not match lora_B \(b.shape)")
                }
            }
            return PEFTAdapterWeights(module: m, a: a, b: b, magnitude: magnitude)
        }
        if let extra = magnitudes.keys.sorted().first {
            throw FormatError.invalidConfig(file: weightsPath, reason: "DoRA magnitude of '\(extra)' has no lora_A / lora_B")
        }
    }
}
