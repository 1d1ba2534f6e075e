// Writing a merged model (ModelMerger's tensors, one at a time) as a Hugging Face folder (config.json,
// generation_config.json, tokenizer files, safetensors sharded with an index) or as one GGUF file that
// llama.cpp loads (llama.* metadata, the tokenizer, Q/K rows in llama.cpp's order, F32/F16/BF16/Q8_0/Q4_0).
// Nothing appears under the output's name until it is complete: a folder is built under a hidden name beside
// it and renamed; a GGUF goes through AtomicFileWriter. A failure removes what was written.
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import QLoRACore
import QLoRAFormats
import QLoRAKernels
import QLoRAModel

public enum MergeFormat: String, Sendable, CaseIterable {
    case safetensors, gguf
}

/// The floating-point type of a safetensors output.
public enum MergeDType: String, Sendable, CaseIterable {
    case f32, f16, bf16

    var dtype: DType {
        switch self {
        case .f32: return .f32
        case .f16: return .f16
        case .bf16: return .bf16
        }
    }

    var torchName: String {
        switch self {
        case .f32: return "float32"
        case .f16: return "float16"
        case .bf16: return "bfloat16"
        }
    }
}

public struct ExportOptions: Sendable {
    public var dtype: MergeDType = .bf16
    public var ggufType: GGMLType = .f16
    /// Largest safetensors shard, in bytes (transformers' max_shard_size, 5 GB by default).
    public var maxShardSize = 5_000_000_000
    /// Replace an existing output.
    public var force = false
    public var showProgress = true

    public init() {}
}

public struct ExportReport: Sendable {
    public var files: [String] = []
    public var bytes = 0
    public var tensors = 0
    public var adaptedTensors = 0
}

public enum ModelExport {
    // MARK: Hugging Face folder

    /// Writes the merged model as a Hugging Face folder at `output`.
    public static func writeFolder(_ merger: ModelMerger, to output: String, options: ExportOptions) throws -> ExportReport {
        try checkOutput(output, force: options.force)
        // The tokenizer first: a model folder without one is refused before any weight is written.
        let tokenizerFiles = try tokenizerFiles(merger)
        let parent = FileSystem.directoryName(output)
        if !FileSystem.exists(parent) { try FileSystem.makeDirectories(parent) }
        let staging = FileSystem.join(parent, ".\(FileSystem.baseName(output)).partial-\(getpid())")
        if FileSystem.exists(staging) { try FileSystem.removeTree(staging) }
        try FileSystem.makeDirectory(staging)
        var report = ExportReport()
        do {
            for (name, bytes) in tokenizerFiles { try FileSystem.writeFileAtomically(FileSystem.join(staging, name), bytes: bytes) }
            try FileSystem.writeFileAtomically(FileSystem.join(staging, "config.json"), bytes: try configJSON(merger, dtype: options.dtype))
            try FileSystem.writeFileAtomically(FileSystem.join(staging, "generation_config.json"), bytes: try generationConfigJSON(merger))
            report = try writeShards(merger, into: staging, options: options)
            report.files = (try FileSystem.listDirectory(staging)).map { FileSystem.join(output, $0) }
            try place(staging, at: output)
        } catch {
            try? FileSystem.removeTree(staging)
            throw error
        }
        return report
    }

    static func writeShards(_ merger: ModelMerger, into folder: String, options: ExportOptions) throws -> ExportReport {
        let dtype = options.dtype.dtype
        var shards: [[ModelMerger.Item]] = [[]]
        var size = 0
        for item in merger.items {
            let bytes = item.shape.reduce(1, *) * dtype.byteSize
            if !shards[shards.count - 1].isEmpty, size + bytes > options.maxShardSize {
                shards.append([])
                size = 0
            }
            shards[shards.count - 1].append(item)
            size += bytes
        }
        let names = shards.count == 1 ? ["model.safetensors"]
            : (1...shards.count).map { "model-\(pad5($0))-of-\(pad5(shards.count)).safetensors" }
        let progress = ProgressBar("merge", total: merger.items.count, enabled: options.showProgress)
        var report = ExportReport()
        var weightMap: [(String, JSONValue)] = []
        for (shard, name) in zip(shards, names) {
            let writer = try SafetensorsWriter(
                path: FileSystem.join(folder, name),
                tensors: shard.map { SafetensorsWriter.Declaration(name: $0.name, dtype: dtype, shape: $0.shape) },
                metadata: [("format", "pt")])
            for item in shard {
                let values = try merger.values(item)
                try append(values, as: options.dtype, name: item.name, to: writer)
                report.bytes += values.count * dtype.byteSize
                report.tensors += 1
                if item.adapted { report.adaptedTensors += 1 }
                weightMap.append((item.name, .string(name)))
                progress.advance(note: item.name)
            }
            try writer.finish()
        }
        if shards.count > 1 {
            let index: JSONValue = .object([("metadata", .object([("total_size", .int(report.bytes))])), ("weight_map", .object(weightMap))])
            try FileSystem.writeFileAtomically(FileSystem.join(folder, "model.safetensors.index.json"),
                                               bytes: Array((JSON.serialize(index, pretty: true) + "\n").utf8))
        }
        return report
    }

    static func pad5(_ n: Int) -> String {
        let s = String(n)
        return String(repeating: "0", count: max(0, 5 - s.count)) + s
    }

    static func append(_ values: [Float], as dtype: MergeDType, name: String, to writer: SafetensorsWriter) throws {
        switch dtype {
        case .f32: try writer.append(name, values: values)
        case .f16: try writer.append(name, values: values.map(floatToFloat16Bits))
        case .bf16: try writer.append(name, values: values.map(floatToBFloat16Bits))
        }
    }

    /// The tokenizer files of the output folder: copied from a Hugging Face base, made from a GGUF's metadata.
    static func tokenizerFiles(_ merger: ModelMerger) throws -> [(String, [UInt8])] {
        if let g = merger.gguf { return try TokenizerExport.huggingFaceFiles(from: g).map { ($0.name, $0.bytes) } }
        let folder = merger.basePath
        guard FileSystem.exists(FileSystem.join(folder, "tokenizer.json")) || FileSystem.exists(FileSystem.join(folder, "tokenizer.model")) else {
            throw ExportError.tokenizer(file: FileSystem.join(folder, "tokenizer.json"),
                                        reason: "missing: the merged model needs the base model's tokenizer (tokenizer.json or tokenizer.model beside config.json)")
        }
        let names = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                     "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json"]
        return try names.filter { FileSystem.exists(FileSystem.join(folder, $0)) }.map { ($0, try FileSystem.readFile(FileSystem.join(folder, $0))) }
    }

    /// config.json: the base's own (without its quantization_config) or, from a GGUF, one made from its metadata.
    static func configJSON(_ merger: ModelMerger, dtype: MergeDType) throws -> [UInt8] {
        var json: JSONValue
        let source = FileSystem.join(merger.basePath, "config.json")
        if merger.gguf == nil, FileSystem.exists(source) {
            json = try JSON.parse(try FileSystem.readFile(source, limit: 16 << 20))
            if case let .object(fields) = json { json = .object(fields.filter { $0.0 != "quantization_config" }) }
        } else {
            let c = merger.config
            func number(_ x: Double) -> JSONValue { .double(x) }
            var fields: [(String, JSONValue)] = [
                ("architectures", .array([.string(c.family.huggingFaceArchitecture)])), ("model_type", .string(c.family.modelType)),
                ("vocab_size", .int(c.vocabSize)), ("hidden_size", .int(c.hiddenSize)), ("intermediate_size", .int(c.intermediateSize)),
                ("num_hidden_layers", .int(c.layerCount)), ("num_attention_heads", .int(c.headCount)),
                ("num_key_value_heads", .int(c.kvHeadCount)), ("head_dim", .int(c.headDim)),
                (c.family == .gemma3 ? "hidden_activation" : "hidden_act", .string(c.activation.rawValue)),
                ("max_position_embeddings", .int(c.maxPositions)),
                // The f32 value's shortest decimal (1e-05, not 9.99999974e-06).
                ("rms_norm_eps", number(Double("\(c.rmsNormEps)") ?? Double(c.rmsNormEps))), ("rope_theta", number(c.ropeTheta)),
                ("tie_word_embeddings", .bool(c.tieWordEmbeddings)), ("use_cache", .bool(true)),
            ]
            if c.family != .qwen2 && c.family != .phi3 { fields += [("attention_bias", .bool(c.attentionBias)), ("mlp_bias", .bool(false))] }
            if c.family == .gemma3 {
                let scale = c.attentionScale ?? 1 / Float(c.headDim).squareRoot()
                fields += [("query_pre_attn_scalar", number(Double(1 / (scale * scale)).rounded())),
                           ("rope_local_base_freq", number(c.localRopeTheta ?? 10_000)),
                           ("final_logit_softcapping", .null), ("attn_logit_softcapping", .null)]
            }
            if c.rotaryDim != c.headDim { fields.append(("partial_rotary_factor", number(Double(c.rotaryDim) / Double(c.headDim)))) }
            if let w = c.slidingWindow {
                fields.append(("sliding_window", .int(w)))
                if !c.slidingLayers.isEmpty {
                    fields.append(("layer_types", .array(c.slidingLayers.map { .string($0 ? "sliding_attention" : "full_attention") })))
                }
                if c.family == .qwen2 || c.family == .qwen3 { fields.append(("use_sliding_window", .bool(true))) }
            } else {
                fields.append(("sliding_window", .null))
            }
            if c.ropeFrequencyFactors != nil {
                throw ExportError.unsupported(what: "a GGUF's rope_freqs divisors cannot be written as config.json rope scaling; merge from the Hugging Face folder")
            }
            switch c.ropeScaling {
            case .none: fields.append(("rope_scaling", .null))
            case let .linear(factor): fields.append(("rope_scaling", .object([("rope_type", .string("linear")), ("factor", number(factor))])))
            case let .llama3(factor, low, high, original):
                fields.append(("rope_scaling", .object([("rope_type", .string("llama3")), ("factor", number(factor)), ("low_freq_factor", number(low)),
                                                        ("high_freq_factor", number(high)), ("original_max_position_embeddings", .int(original))])))
            case let .longrope(short, long, original, attention):
                fields.append(("rope_scaling", .object([("rope_type", .string("longrope")), ("short_factor", .array(short.map(number))),
                                                        ("long_factor", .array(long.map(number))), ("attention_factor", number(attention)),
                                                        ("original_max_position_embeddings", .int(original))])))
                fields.append(("original_max_position_embeddings", .int(original)))
            }
            if let b = c.bosTokenID { fields.append(("bos_token_id", .int(b))) }
            if let e = c.eosTokenIDs.first { fields.append(("eos_token_id", c.eosTokenIDs.count == 1 ? .int(e) : .array(c.eosTokenIDs.map { .int($0) }))) }
            json = .object(fields)
        }
        json = json.setting("torch_dtype", to: .string(dtype.torchName))
        return Array((JSON.serialize(json, pretty: true) + "\n").utf8)
    }

    static func generationConfigJSON(_ merger: ModelMerger) throws -> [UInt8] {
        let source = FileSystem.join(merger.basePath, "generation_config.json")
        if merger.gguf == nil, FileSystem.exists(source) { return try FileSystem.readFile(source, limit: 16 << 20) }
        let c = merger.config
        var fields: [(String, JSONValue)] = []
        if let b = c.bosTokenID { fields.append(("bos_token_id", .int(b))) }
        if let e = c.eosTokenIDs.first { fields.append(("eos_token_id", c.eosTokenIDs.count == 1 ? .int(e) : .array(c.eosTokenIDs.map { .int($0) }))) }
        return Array((JSON.serialize(.object(fields), pretty: true) + "\n").utf8)
    }

    // MARK: GGUF

    /// general.file_type for a GGUF whose matrices are `type` (llama.cpp's llama_ftype).
    static func fileType(_ type: GGMLType) -> Int {
        switch type {
        case .f32: return 0
        case .f16: return 1
        case .q4_0: return 2
        case .q8_0: return 7
        case .bf16: return 32
        case .q4_K: return 14  // MOSTLY_Q4_K_S
        default: return 1
        }
    }

    /// The type a merged tensor is stored as: norms in F32; matrices in `type`, except: for the 4-bit types the
    /// output head (or the tied embedding, which is also the head) in Q8_0 (llama.cpp's quantizer gives it Q6_K),
    /// and rows that are not whole blocks in Q8_0 (Q4_K's blocks are 256 long: SmolLM2's 576-wide rows) or F16.
    static func ggufType(for item: ModelMerger.Item, type: GGMLType, tied: Bool) -> GGMLType {
        if item.shape.count == 1 { return .f32 }
        var type = type
        if type == .q4_0 || type == .q4_K, item.part == .head || (tied && item.part == .embedding) { type = .q8_0 }
        if item.shape[1] % type.blockLayout.elements != 0 { type = .q8_0 }
        if item.shape[1] % type.blockLayout.elements != 0 { type = .f16 }
        return type
    }

    /// Writes the merged model as one GGUF file at `output`.
    public static func writeGGUF(_ merger: ModelMerger, to output: String, options: ExportOptions) throws -> ExportReport {
        try checkOutput(output, force: options.force)
        guard GGMLQuantizer.writable.contains(options.ggufType) else {
            throw ExportError.unsupported(what: "GGUF type \(options.ggufType) is not written (f32, f16, bf16, q8_0, q4_0, q4_k)")
        }
        let c = merger.config
        let arch = c.family.ggufArchitecture
        func key(_ k: String) -> String { arch + "." + k }
        var metadata: [(String, GGUFTypedValue)] = [
            ("general.architecture", .string(arch)), ("general.type", .string("model")),
            ("general.name", .string(merger.gguf?.value("general.name")?.stringValue ?? FileSystem.baseName(merger.basePath))),
            ("general.file_type", .uint32(fileType(options.ggufType))),
        ]
        if options.ggufType.plainDType == nil { metadata.append(("general.quantization_version", .uint32(2))) }
        metadata += [
            (key("vocab_size"), .uint32(c.vocabSize)), (key("context_length"), .uint32(c.maxPositions)),
            (key("embedding_length"), .uint32(c.hiddenSize)), (key("block_count"), .uint32(c.layerCount)),
            (key("feed_forward_length"), .uint32(c.intermediateSize)), (key("rope.dimension_count"), .uint32(c.rotaryDim)),
            (key("attention.head_count"), .uint32(c.headCount)), (key("attention.head_count_kv"), .uint32(c.kvHeadCount)),
            (key("attention.layer_norm_rms_epsilon"), .float32(Double(c.rmsNormEps))), (key("rope.freq_base"), .float32(c.ropeTheta)),
        ]
        metadata += [(key("attention.key_length"), .uint32(c.headDim)), (key("attention.value_length"), .uint32(c.headDim))]
        if case let .linear(factor) = c.ropeScaling {
            metadata += [(key("rope.scaling.type"), .string("linear")), (key("rope.scaling.factor"), .float32(factor))]
        }
        if c.slidingWindow == nil, c.family == .phi3 {
            metadata.append((key("attention.sliding_window"), .uint32(0)))  // the converter's "none"
        }
        if let w = c.slidingWindow {
            metadata.append((key("attention.sliding_window"), .uint32(w)))
            // llama.cpp makes every sixth Gemma 3 layer global unless told otherwise.
            if c.family == .gemma3, c.slidingLayers != (0..<c.layerCount).map({ ($0 + 1) % 6 != 0 }) {
                metadata.append((key("attention.sliding_window_pattern"), .bools(c.slidingLayers)))
            }
        }
        if let local = c.localRopeTheta { metadata.append((key("rope.freq_base_swa"), .float32(local))) }
        if case let .longrope(_, _, original, attention) = c.ropeScaling {
            metadata += [(key("rope.scaling.attn_factor"), .float32(attention)), (key("rope.scaling.original_context_length"), .uint32(original))]
        } else if c.family == .phi3 {
            metadata.append((key("rope.scaling.original_context_length"), .uint32(c.maxPositions)))
        }
        if c.family == .gemma3, let scale = c.attentionScale, abs(scale - 1 / Float(c.headDim).squareRoot()) > 1e-7,
           !(c.layerCount == 62 && abs(scale - 1 / Float(c.hiddenSize / c.headCount).squareRoot()) < 1e-7) {
            throw ExportError.unsupported(what: "Gemma 3's query_pre_attn_scalar other than head_dim cannot be written to GGUF (llama.cpp derives it from the model size)")
        }
        if let g = merger.gguf {
            for (key, _) in g.metadata where key.hasPrefix("tokenizer.") {
                if let v = g.typedValue(key) { metadata.append((key, v)) }
            }
        } else {
            metadata += try TokenizerExport.ggufMetadata(folder: merger.basePath, vocabSize: c.vocabSize, eosTokenIDs: c.eosTokenIDs,
                                                         bosTokenID: c.bosTokenID, addSpacePrefix: c.family == .gemma3 ? false : nil)
        }
        let tied = !merger.items.contains { $0.part == .head }
        var declarations: [GGUFWriter.Declaration] = []
        for item in merger.items {
            guard let name = ModelMerger.ggufName(item.name, family: c.family) else {
                throw ExportError.unsupported(what: "tensor '\(item.name)' has no GGUF name")
            }
            declarations.append(.init(name: name, shape: item.shape, type: ggufType(for: item, type: options.ggufType, tied: tied)))
        }
        // Llama 3.1's scaling: llama.cpp divides each inverse frequency by the rope_freqs entry (its converter's
        // generate_extra_tensors), with no scaling keys.
        let ropeFactors = ropeFrequencyFactors(c)
        if let f = ropeFactors { declarations.append(.init(name: "rope_freqs.weight", shape: [f.count], type: .f32)) }
        // LongRoPE: its two factor sets as tensors (the converter's names), long first.
        var longRope: [(String, [Float])] = []
        if case let .longrope(short, long, _, _) = c.ropeScaling {
            longRope = [("rope_factors_long.weight", long.map(Float.init)), ("rope_factors_short.weight", short.map(Float.init))]
            for (name, values) in longRope { declarations.append(.init(name: name, shape: [values.count], type: .f32)) }
        }
        let parent = FileSystem.directoryName(output)
        if !FileSystem.exists(parent) { try FileSystem.makeDirectories(parent) }
        let writer = try GGUFWriter(path: output, metadata: metadata, tensors: declarations)
        let progress = ProgressBar("merge", total: merger.items.count, enabled: options.showProgress)
        var report = ExportReport()
        for (item, d) in zip(merger.items, declarations) {
            var values = try merger.values(item)
            // llama.cpp's llama architecture rotates adjacent pairs: its converter permutes Q and K rows (and biases).
            if c.family.ggufArchitecture == "llama" {
                switch item.part {
                case let .projection(_, module) where module == "self_attn.q_proj",
                     let .bias(_, module) where module == "self_attn.q_proj":
                    values = ModelMerger.permute(values, heads: c.headCount, cols: item.shape.count > 1 ? item.shape[1] : 1)
                case let .projection(_, module) where module == "self_attn.k_proj",
                     let .bias(_, module) where module == "self_attn.k_proj":
                    values = ModelMerger.permute(values, heads: c.kvHeadCount, cols: item.shape.count > 1 ? item.shape[1] : 1)
                default: break
                }
            }
            // Gemma's norms: the block scales by 1 + w, and llama.cpp's files store 1 + w.
            if c.family == .gemma3, item.part.isNorm { values = values.map { $0 + 1 } }
            let bytes = try GGMLQuantizer.quantize(values, as: d.type, tensor: d.name)
            try writer.append(d.name, bytes: bytes)
            report.bytes += bytes.count
            report.tensors += 1
            if item.adapted { report.adaptedTensors += 1 }
            progress.advance(note: item.name)
        }
        if let f = ropeFactors {
            try writer.append("rope_freqs.weight", bytes: try GGMLQuantizer.quantize(f, as: .f32, tensor: "rope_freqs.weight"))
            report.tensors += 1
        }
        for (name, values) in longRope {
            try writer.append(name, bytes: try GGMLQuantizer.quantize(values, as: .f32, tensor: name))
            report.tensors += 1
        }
        try writer.finish()
        report.files = [output]
        return report
    }

    /// The rope_freqs divisors of Llama 3.1's scaling as llama.cpp's converter computes them (in double precision
    /// from f32 base frequencies), or a GGUF source's own; nil without.
    static func ropeFrequencyFactors(_ c: LlamaConfig) -> [Float]? {
        if let f = c.ropeFrequencyFactors { return f }
        guard case let .llama3(factor, low, high, original) = c.ropeScaling else { return nil }
        var base = c
        base.ropeScaling = .none
        // The converter's arithmetic is torch's on f32 tensors (Python's scalars taken as f32).
        let lowWavelen = Double(original) / low, highWavelen = Double(original) / high
        let f32Factor = Float(factor), f32Low = Float(low), f32Span = Float(high - low), f32Original = Float(original)
        return base.ropeInverseFrequencies().map { f in
            let wavelen = Float(2 * Double.pi) / f
            if Double(wavelen) < highWavelen { return 1 }
            if Double(wavelen) > lowWavelen { return f32Factor }
            let smooth = (f32Original / wavelen - f32Low) / f32Span
            return 1 / ((1 - smooth) / f32Factor + smooth)
        }
    }

    // MARK: Output handling

    /// Refuses an existing output unless `force`.
    static func checkOutput(_ output: String, force: Bool) throws {
        if FileSystem.exists(output), !force { throw ExportError.outputExists(path: output) }
    }

    /// Moves a finished staging folder to `output`, replacing what is there only once the new one is complete.
    static func place(_ staging: String, at output: String) throws {
        if FileSystem.exists(output) {
            let old = FileSystem.join(FileSystem.directoryName(output), ".\(FileSystem.baseName(output)).old-\(getpid())")
            try FileSystem.rename(output, old)
            try FileSystem.rename(staging, output)
            try FileSystem.removeTree(old)
        } else {
            try FileSystem.rename(staging, output)
        }
    }
}

// MARK: - Requantized to bitsandbytes 4-bit

extension ModelExport {
    /// Writes the merged model as a bitsandbytes 4-bit checkpoint (`qlora merge --requantize nf4`): the merged
    /// f32 folder is built beside the output, quantized as `qlora quantize` does (linear weights only), and removed.
    public static func writeRequantized(_ merger: ModelMerger, to output: String, options: ExportOptions,
                                        quantization: QuantizeOptions) throws -> ExportReport {
        try checkOutput(output, force: options.force)
        let parent = FileSystem.directoryName(output)
        if !FileSystem.exists(parent) { try FileSystem.makeDirectories(parent) }
        let merged = FileSystem.join(parent, ".\(FileSystem.baseName(output)).merged-\(getpid())")
        let staging = FileSystem.join(parent, ".\(FileSystem.baseName(output)).partial-\(getpid())")
        var folderOptions = options
        folderOptions.dtype = .f32
        folderOptions.maxShardSize = Int.max
        folderOptions.force = true
        defer { try? FileSystem.removeTree(merged) }
        var report = try writeFolder(merger, to: merged, options: folderOptions)
        do {
            if FileSystem.exists(staging) { try FileSystem.removeTree(staging) }
            var q = quantization
            q.showProgress = options.showProgress
            let quantized = try CheckpointQuantizer.quantize(input: merged, output: staging, options: q)
            report.bytes = quantized.outputBytes
            report.files = (try FileSystem.listDirectory(staging)).map { FileSystem.join(output, $0) }
            try place(staging, at: output)
        } catch {
            try? FileSystem.removeTree(staging)
            throw error
        }
        return report
    }
}

/// How far one model's logits are from another's on the same tokens (the merged-and-requantized model against the
/// unmerged one it came from).
public struct LogitDrift: Sendable {
    public var tokens = 0
    public var maxAbsolute: Float = 0
    public var meanAbsolute: Double = 0
    /// Mean next-token negative log-likelihood (nats) of each model on the tokens.
    public var nllReference: Double = 0
    public var nllOther: Double = 0

    public static func measure(reference: LlamaModel, other: LlamaModel, ids: [Int]) throws -> LogitDrift {
        let a = try reference.forward(ids, cache: KVCache(config: reference.config, capacity: ids.count), logits: .all)
        let b = try other.forward(ids, cache: KVCache(config: other.config, capacity: ids.count), logits: .all)
        let V = reference.config.vocabSize
        var d = LogitDrift()
        d.tokens = ids.count
        var sum = 0.0
        for (x, y) in zip(a, b) {
            let e = abs(x - y)
            d.maxAbsolute = max(d.maxAbsolute, e)
            sum += Double(e)
        }
        d.meanAbsolute = sum / Double(max(a.count, 1))
        func nll(_ l: [Float]) -> Double {
            var total = 0.0
            for t in 0..<(ids.count - 1) {
                total += LogSumExp.negativeLogLikelihood(l[(t * V)..<((t + 1) * V)], target: ids[t + 1])
            }
            return total / Double(max(ids.count - 1, 1))
        }
        d.nllReference = nll(a)
        d.nllOther = nll(b)
        return d
    }
}
