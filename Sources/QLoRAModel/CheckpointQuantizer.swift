// `qlora quantize`: writes a bitsandbytes 4-bit checkpoint from a Hugging Face folder or a
// .safetensors file, one tensor at a time (peak memory: the quantized output plus one f32 tensor).
import QLoRACore
import QLoRAFormats
import QLoRAKernels

/// What to quantize and how.
public struct QuantizeOptions: Sendable {
    public var quantType: QuantType = .nf4
    public var blockSize = 64
    public var doubleQuant = true
    /// For bare tensor files: quantize only tensors whose name matches (default: every 2-D float tensor).
    public var include: String?
    public var showProgress = true

    public init() {}
}

/// Per-tensor outcome.
public struct QuantizedTensorReport: Sendable {
    public let name: String
    public let shape: [Int]
    public let sourceDType: DType
    public let bitsPerParameter: Double
    /// sqrt(mean((w - dequant(w))^2)) / sqrt(mean(w^2)).
    public let relativeRMSE: Double
}

/// The outcome of quantizing a checkpoint.
public struct QuantizeReport: Sendable {
    public let output: String
    public let quantized: [QuantizedTensorReport]
    public let copied: [String]
    public let inputBytes: Int
    public let outputBytes: Int
    public let seconds: Double

    /// Parameters in the quantized tensors.
    public var quantizedParameters: Int { quantized.reduce(0) { $0 + $1.shape.reduce(1, *) } }

    /// Bits per parameter over all quantized tensors together.
    public var bitsPerParameter: Double {
        let bits = quantized.reduce(0.0) { $0 + $1.bitsPerParameter * Double($1.shape.reduce(1, *)) }
        return bits / Double(max(quantizedParameters, 1))
    }

    /// Parameter-weighted mean of the relative RMSE.
    public var relativeRMSE: Double {
        let sum = quantized.reduce(0.0) { $0 + $1.relativeRMSE * Double($1.shape.reduce(1, *)) }
        return sum / Double(max(quantizedParameters, 1))
    }
}

public enum CheckpointQuantizer {
    /// Whether bitsandbytes (through transformers) would quantize this tensor of a model: the weight of
    /// a linear layer, that is a 2-D `.weight` that is neither an embedding nor the output head.
    public static func isLinearWeight(_ name: String, shape: [Int]) -> Bool {
        guard shape.count == 2, name.hasSuffix(".weight") else { return false }
        let lower = name.lowercased()
        if lower.contains("embed") || lower.hasPrefix("lm_head") || lower.contains(".lm_head") || lower.contains("wte") || lower.contains("wpe") {
            return false
        }
        return true
    }

    /// Quantizes `input` (an HF model folder, a .safetensors file, or a .gguf file read as a bare tensor
    /// file with its own tensor names) into folder `output`.
    public static func quantize(input: String, output: String, options: QuantizeOptions) throws -> QuantizeReport {
        let start = Clock.seconds()
        let tensors = try openTensorSource(input)
        let isModelFolder = FileSystem.isDirectory(input)
        var config: JSONValue?
        if isModelFolder {
            let configPath = FileSystem.join(input, "config.json")
            if FileSystem.exists(configPath) {
                do { config = try JSON.parse(try FileSystem.readFile(configPath, limit: 16 << 20)) } catch let e as JSONError {
                    throw FormatError.invalidConfig(file: configPath, reason: "not valid JSON: \(e)")
                }
                if config?["quantization_config"] != nil {
                    throw FormatError.invalidConfig(file: configPath, reason: "this model is already quantized (config.json has quantization_config)")
                }
            }
        }
        let pattern = try options.include.map { try Regex($0) }
        func selected(_ e: TensorInfo) -> Bool {
            guard e.isFloatingPoint, e.elementCount > 0 else { return false }
            if let pattern { return (try? pattern.firstMatch(in: e.name)) != nil }
            if isModelFolder { return isLinearWeight(e.name, shape: e.shape) }
            return e.shape.count == 2
        }
        if options.quantType == .int4 {
            Log.info("warning: int4 is swift-qlora's own format for ablations; bitsandbytes and transformers cannot load it")
        }
        try FileSystem.makeDirectories(output)
        let outputFile = FileSystem.join(output, "model.safetensors")

        // Pass 1: quantize each selected tensor (only one f32 copy alive at a time).
        var quantized: [String: (Quantized4Bit, DType)] = [:]
        var converted: [String: TensorView] = [:]
        var reports: [QuantizedTensorReport] = []
        var copied: [String] = []
        let selectedNames = tensors.tensorNames.filter { selected(tensors.info($0)!) }
        let progress = ProgressBar("quantize", total: max(selectedNames.count, 1), enabled: options.showProgress)
        for name in tensors.tensorNames {
            let entry = tensors.info(name)!
            guard selected(entry) else {
                copied.append(name)
                // Block-quantized tensors (GGUF) that stay unquantized here are written as f32.
                if tensors.plainView(name) == nil {
                    converted[name] = .make(try tensors.floats(name), dtype: .f32, shape: entry.shape)
                }
                continue
            }
            let values = try tensors.floats(name)
            tensors.releasePages(name)
            let q = try Quantized4Bit(values, shape: entry.shape, type: options.quantType, blockSize: options.blockSize,
                                      doubleQuant: options.doubleQuant, name: name)
            let restored = q.dequantize()
            var err = 0.0, ref = 0.0
            for i in 0..<values.count {
                let d = Double(values[i]) - Double(restored[i])
                err += d * d
                ref += Double(values[i]) * Double(values[i])
            }
            let sourceDType = entry.dtype ?? .f32
            quantized[name] = (q, sourceDType)
            reports.append(QuantizedTensorReport(
                name: name, shape: entry.shape, sourceDType: sourceDType, bitsPerParameter: q.bitsPerParameter,
                relativeRMSE: ref > 0 ? (err / ref).squareRoot() : 0))
            progress.advance(note: name)
        }
        if selectedNames.isEmpty { progress.advance() }

        // Pass 2: stream the output file in the input's tensor order, one tensor in flight at a time.
        func parts(_ name: String) -> [(String, TensorView)] {
            if let (q, dtype) = quantized[name] { return BnB4bit.tensors(for: q, name: name, sourceDType: dtype) }
            return [(name, converted[name] ?? tensors.plainView(name)!)]
        }
        var declarations: [SafetensorsWriter.Declaration] = []
        for name in tensors.tensorNames {
            for (n, view) in parts(name) { declarations.append(.init(name: n, dtype: view.dtype, shape: view.shape)) }
        }
        let writer = try SafetensorsWriter(path: outputFile, tensors: declarations,
                                           metadata: [("format", "pt"), ("quantized_by", "swift-qlora")])
        for name in tensors.tensorNames {
            for (n, view) in parts(name) { try writer.append(n, bytes: view.bytes) }
            tensors.releasePages(name)
            converted[name] = nil
        }
        try writer.finish()

        if isModelFolder {
            try copyCompanionFiles(from: input, to: output, config: config, options: options)
        }
        let inputBytes = tensors.tensorNames.reduce(0) { $0 + (tensors.info($1)?.byteCount ?? 0) }
        let outputBytes = (try? MappedFile(path: outputFile).size) ?? 0
        return QuantizeReport(output: output, quantized: reports, copied: copied, inputBytes: inputBytes,
                              outputBytes: outputBytes, seconds: Clock.seconds() - start)
    }

    /// The `quantization_config` block transformers writes for a bitsandbytes 4-bit model.
    public static func quantizationConfig(_ options: QuantizeOptions, computeDType: String) -> JSONValue {
        .object([
            ("_load_in_4bit", .bool(true)),
            ("_load_in_8bit", .bool(false)),
            ("bnb_4bit_compute_dtype", .string(computeDType)),
            ("bnb_4bit_quant_storage", .string("uint8")),
            ("bnb_4bit_quant_type", .string(options.quantType.rawValue)),
            ("bnb_4bit_use_double_quant", .bool(options.doubleQuant)),
            ("llm_int8_enable_fp32_cpu_offload", .bool(false)),
            ("llm_int8_has_fp16_weight", .bool(false)),
            ("llm_int8_skip_modules", .null),
            ("llm_int8_threshold", .number("6.0")),
            ("load_in_4bit", .bool(true)),
            ("load_in_8bit", .bool(false)),
            ("quant_method", .string(options.quantType == .int4 ? "swift-qlora" : "bitsandbytes")),
        ])
    }

    /// Copies config.json (with quantization_config added) and every other non-weight file.
    static func copyCompanionFiles(from input: String, to output: String, config: JSONValue?, options: QuantizeOptions) throws {
        for file in try FileSystem.listDirectory(input) {
            let lower = file.lowercased()
            if lower.hasSuffix(".safetensors") || lower == "model.safetensors.index.json" || lower.hasSuffix(".bin")
                || lower.hasSuffix(".pt") || lower.hasSuffix(".pth") || lower.hasPrefix(".") {
                continue
            }
            let source = FileSystem.join(input, file)
            if FileSystem.isDirectory(source) { continue }
            if file == "config.json", let config {
                let compute = config["torch_dtype"]?.stringValue ?? config["dtype"]?.stringValue ?? "float32"
                let updated = config.setting("quantization_config", to: quantizationConfig(options, computeDType: compute))
                try FileSystem.writeFileAtomically(FileSystem.join(output, file), bytes: Array((JSON.serialize(updated, pretty: true) + "\n").utf8))
                continue
            }
            try FileSystem.writeFileAtomically(FileSystem.join(output, file), bytes: try FileSystem.readFile(source))
        }
    }
}
