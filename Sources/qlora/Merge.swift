#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import ArgumentParser
import QLoRA
import Yams

struct Merge: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Merge a LoRA adapter into its base model and write a Hugging Face folder or a GGUF file.",
        discussion: """
            The adapter was trained against the 4-bit weights, so by default the merge is W' = dequant(quant(W)) + s·B·A \
            with the same quantization as training (read from the adapter's training_args.yaml when there, else NF4, \
            block 64, double quantization): the only merge that reproduces the finetuned model. `--onto original` merges \
            into the unquantized W instead, which gives a model that was never trained (off by the quantization error). \
            A bitsandbytes 4-bit base is merged onto its stored weights.

            --format safetensors writes a folder transformers loads: config.json, generation_config.json, the tokenizer \
            files (copied from a Hugging Face base, or made from a GGUF's tokenizer) and model.safetensors, in shards with \
            model.safetensors.index.json past --max-shard-size. --format gguf writes one file llama.cpp loads, with the \
            tokenizer and chat template; --gguf-type sets the matrices' type (norms stay F32; with q4_0 and q4_k the \
            output head is Q8_0, and so are rows that are not whole blocks). --requantize nf4 writes a bitsandbytes 4-bit folder of the merged model instead and reports how far its \
            logits drift from the unmerged model (requantizing rounds the merged weights again, so it is not the trained \
            model). The merge streams one tensor at a time; nothing appears under OUTPUT until it is complete.
            """
    )

    @Option(name: .shortAndLong, help: "The base model: a Hugging Face folder, a bitsandbytes 4-bit folder, a .gguf file or org/name in the Hugging Face cache. (default: the adapter's training_args.yaml model, else SmolLM2-135M-Instruct)")
    var model: String?

    @Option(help: "A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors), e.g. a qlora train output.")
    var adapter: String

    @Option(name: .shortAndLong, help: "The output: a folder (--format safetensors) or a .gguf file (--format gguf).")
    var output: String

    @Option(help: "safetensors (a Hugging Face folder) or gguf (one llama.cpp file). (default: gguf when OUTPUT ends in .gguf)")
    var format: String?

    @Option(help: "The floating-point type of the safetensors weights: bf16, f16 or f32.")
    var dtype: String = "bf16"

    @Option(help: "The type of a GGUF's matrices: f16, bf16, f32, q8_0, q4_0 or q4_k (4-bit types keep the output head, and rows that are not whole blocks, in q8_0).")
    var ggufType: String = "f16"

    @Option(help: "quantized: onto dequant(quant(W)), what the adapter was trained on; original: onto W itself.")
    var onto: String = "quantized"

    @Option(help: "The 4-bit type the adapter was trained against: nf4, fp4 or int4. (default: from training_args.yaml, else nf4)")
    var quantType: String?

    @Option(help: "Its block size. (default: from training_args.yaml, else 64)")
    var blockSize: Int?

    @Flag(help: "It was trained without double quantization. (default: from training_args.yaml)")
    var noDoubleQuant = false

    @Option(help: ArgumentHelp("Write the merged model as a bitsandbytes 4-bit checkpoint (nf4 or fp4, with --block-size and double quantization as trained) and report how far its logits drift from the unmerged model's.", valueName: "type"))
    var requantize: String?

    @Option(help: "A UTF-8 text for the --requantize drift report (default: a short built-in paragraph).")
    var driftText: String?

    @Option(help: "Tokens of that text to score.")
    var driftTokens: Int = 256

    @Option(help: "Largest safetensors shard, e.g. 5GB, 500MB or a number of bytes.")
    var maxShardSize: String = "5GB"

    @Flag(help: "Replace OUTPUT if it exists (only once the new one is complete).")
    var force = false

    @Flag(help: "Print one JSON object with the results on stdout.")
    var json = false

    @Flag(name: .shortAndLong, help: "No progress bar.")
    var quiet = false

    static func byteCount(_ text: String) -> Int? {
        let t = text.trimmingWhitespace().uppercased()
        let units: [(String, Double)] = [("GIB", 1_073_741_824), ("MIB", 1_048_576), ("KIB", 1024), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1)]
        for (suffix, factor) in units where t.hasSuffix(suffix) {
            guard let v = Double(String(t.dropLast(suffix.count)).trimmingWhitespace()), v > 0 else { return nil }
            return Int(v * factor)
        }
        return Int(t).flatMap { $0 > 0 ? $0 : nil }
    }

    var resolvedFormat: String { format ?? (output.lowercased().hasSuffix(".gguf") ? "gguf" : "safetensors") }

    func validate() throws {
        guard MergeFormat(rawValue: resolvedFormat) != nil else { throw ValidationError("--format must be safetensors or gguf (got '\(resolvedFormat)')") }
        guard MergeDType(rawValue: dtype) != nil else { throw ValidationError("--dtype must be bf16, f16 or f32 (got '\(dtype)')") }
        guard let t = GGMLType.allCases.first(where: { $0.description.lowercased() == ggufType.lowercased() }), GGMLQuantizer.writable.contains(t) else {
            throw ValidationError("--gguf-type must be f16, bf16, f32, q8_0, q4_0 or q4_k (got '\(ggufType)')")
        }
        guard MergeBase(rawValue: onto) != nil else { throw ValidationError("--onto must be quantized or original (got '\(onto)')") }
        if let quantType { try validateQuantization(quantType: quantType, blockSize: blockSize ?? 64, allowNone: false) }
        if let blockSize { try validateQuantization(quantType: quantType ?? "nf4", blockSize: blockSize, allowNone: false) }
        guard Self.byteCount(maxShardSize) != nil else { throw ValidationError("--max-shard-size must be a size such as 5GB, 500MB or 1000000 (got '\(maxShardSize)')") }
        if let requantize {
            guard requantize == "nf4" || requantize == "fp4" else { throw ValidationError("--requantize must be nf4 or fp4 (got '\(requantize)')") }
            guard resolvedFormat == "safetensors" else { throw ValidationError("--requantize writes a Hugging Face folder; leave out --format gguf") }
        }
        guard driftTokens >= 2 else { throw ValidationError("--drift-tokens must be at least 2") }
        if resolvedFormat == "gguf" && format == nil && !output.lowercased().hasSuffix(".gguf") {
            throw ValidationError("a GGUF output should end in .gguf")
        }
    }

    /// An adapter's training options (training_args.yaml), when it has them.
    static func trainingArguments(_ adapter: String) throws -> [String: String] {
        let path = FileSystem.join(adapter, "training_args.yaml")
        guard FileSystem.exists(path) else { return [:] }
        let text = String(decoding: try FileSystem.readFile(path, limit: 1 << 20), as: UTF8.self)
        guard let node = try? Yams.compose(yaml: text), let mapping = node.mapping else { return [:] }
        var out: [String: String] = [:]
        for (k, v) in mapping { if let key = k.string, let value = v.string { out[key] = value } }
        return out
    }

    func run() throws {
        let args = try Self.trainingArguments(adapter)
        var options = MergeOptions()
        options.onto = MergeBase(rawValue: onto)!
        options.quantType = QuantType(rawValue: quantType ?? args["quant_type"] ?? "nf4") ?? .nf4
        options.blockSize = blockSize ?? args["block_size"].flatMap(Int.init) ?? 64
        options.doubleQuant = !(noDoubleQuant || args["no_double_quant"] == "true")
        let base = try baseModel(for: adapter, given: model) { args["model"] ?? defaultModelPath() }
        let merger = try ModelMerger(model: base, adapter: adapter, options: options)
        var export = ExportOptions()
        export.dtype = MergeDType(rawValue: dtype)!
        export.ggufType = GGMLType.allCases.first { $0.description.lowercased() == ggufType.lowercased() }!
        export.maxShardSize = Self.byteCount(maxShardSize)!
        export.force = force
        export.showProgress = !quiet && !json
        let start = Clock.wallSeconds()
        let gguf = resolvedFormat == "gguf"
        var report: ExportReport
        var drift: LogitDrift?
        if let requantize {
            var q = QuantizeOptions()
            q.quantType = QuantType(rawValue: requantize)!
            q.blockSize = options.blockSize
            q.doubleQuant = options.doubleQuant
            report = try ModelExport.writeRequantized(merger, to: output, options: export, quantization: q)
            // The drift: the unmerged model as trained (base in 4-bit + adapter) against the requantized merge.
            var load = LoadOptions()
            load.quantType = options.quantType
            load.blockSize = options.blockSize
            load.doubleQuant = options.doubleQuant
            load.showProgress = false
            let reference = try LlamaModel.load(merger.basePath, options: load).withAdapter(adapter)
            let requantized = try LlamaModel.load(output, options: load)
            let text = try driftText.map { String(decoding: try FileSystem.readFile($0), as: UTF8.self) } ?? Self.builtInDriftText
            let ids = Array(try Tokenizer.load(model: output).encode(text).prefix(driftTokens))
            guard ids.count >= 2 else { throw ValidationError("the drift text has fewer than 2 tokens") }
            drift = try LogitDrift.measure(reference: reference, other: requantized, ids: ids)
        } else {
            report = gguf ? try ModelExport.writeGGUF(merger, to: output, options: export)
                          : try ModelExport.writeFolder(merger, to: output, options: export)
        }
        let seconds = Clock.wallSeconds() - start
        let onto = options.onto == .quantized
            ? "dequant(\(options.quantType.rawValue)(W)), block \(options.blockSize), double quantization \(options.doubleQuant ? "on" : "off")"
            : "the original W"
        if json {
            printJSON(.object([
                ("output", .string(output)), ("format", .string(resolvedFormat)), ("base", .string(merger.basePath)),
                ("adapter", .string(adapter)), ("onto", .string(options.onto.rawValue)),
                ("quant_type", .string(options.quantType.rawValue)), ("block_size", .int(options.blockSize)), ("double_quant", .bool(options.doubleQuant)),
                ("type", .string(gguf ? export.ggufType.description.lowercased() : export.dtype.rawValue)),
                ("tensors", .int(report.tensors)), ("adapted_tensors", .int(report.adaptedTensors)), ("bytes", .int(report.bytes)),
                ("files", .array(report.files.map { .string($0) })), ("seconds", .double(seconds)),
                ("peak_rss_bytes", .int(peakResidentBytes())),
            ] + (drift.map { d in [("drift", .object([
                ("requantize", .string(requantize ?? "")), ("tokens", .int(d.tokens)), ("max_abs_logit_diff", .double(Double(d.maxAbsolute))),
                ("mean_abs_logit_diff", .double(d.meanAbsolute)), ("nll_unmerged", .double(d.nllReference)),
                ("nll_requantized", .double(d.nllOther)), ("nll_change", .double(d.nllOther - d.nllReference)),
            ]))] } ?? [])))
            return
        }
        print("merged \(adapter) into \(merger.basePath), onto \(onto)")
        print("  \(report.tensors) tensors, \(report.adaptedTensors) changed by the adapter, \(formatFixed(Double(report.bytes) / 1e6, 1)) MB of weights")
        if let drift, let requantize {
            print("  wrote \(output) (bitsandbytes \(requantize), block \(options.blockSize)) in \(formatFixed(seconds, 1)) s")
            print("  drift from the unmerged model on \(drift.tokens) tokens: max |Δlogit| \(formatFixed(Double(drift.maxAbsolute), 4)), mean \(formatFixed(drift.meanAbsolute, 5)); NLL \(formatFixed(drift.nllReference, 4)) -> \(formatFixed(drift.nllOther, 4)) nats/token (\(drift.nllOther >= drift.nllReference ? "+" : "")\(formatFixed(drift.nllOther - drift.nllReference, 4)))")
            return
        }
        print("  wrote \(output)" + (gguf ? " (GGUF, \(export.ggufType))" : " (\(report.files.count) files, \(export.dtype.rawValue))") + " in \(formatFixed(seconds, 1)) s")
    }

    /// The default text of the drift report.
    static let builtInDriftText = """
        A small library stood at the end of the harbour road. Every morning the keeper opened the shutters, swept the \
        steps and set out the newspapers for the fishermen, who read them over coffee before the boats went out. In \
        winter the reading room was the warmest place in the village, and children did their homework there while \
        the wind rattled the windows. Nobody remembered who had built it, but everyone agreed that the village would \
        not be the same without it.
        """
}

/// This process's peak resident set size so far, in bytes (getrusage; kilobytes on Linux).
func peakResidentBytes() -> Int {
    var usage = rusage()
    // Glibc imports RUSAGE_SELF as an enum (__rusage_who), Darwin as a plain Int32.
    #if canImport(Glibc)
    getrusage(Int32(RUSAGE_SELF.rawValue), &usage)
    #else
    getrusage(RUSAGE_SELF, &usage)
    #endif
    #if os(Linux)
    return Int(usage.ru_maxrss) * 1024
    #else
    return Int(usage.ru_maxrss)
    #endif
}

struct ExportAdapter: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "export-adapter",
        abstract: "Write a PEFT LoRA adapter as a GGUF file for llama.cpp's --lora.",
        discussion: """
            The file holds each adapted projection's A and B under llama.cpp's tensor names (blk.N.attn_q.weight.lora_a, \
            ...), with the rows of Q's and K's B in llama.cpp's rotary order, and adapter.lora.alpha such that \
            llama.cpp's alpha / r is the adapter's scale. Use it beside a GGUF of the same base: \
            llama-cli -m BASE.gguf --lora ADAPTER.gguf. The adapter is checked against the base model first.
            """
    )

    @Option(help: "A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors).")
    var adapter: String

    @Option(name: .shortAndLong, help: "The base model the adapter was trained on. (default: the adapter's training_args.yaml model, else SmolLM2-135M-Instruct)")
    var model: String?

    @Option(name: .shortAndLong, help: "The .gguf file to write.")
    var output: String

    @Option(help: "The tensors' type: f32, f16 or bf16.")
    var type: String = "f32"

    @Flag(help: "Replace OUTPUT if it exists.")
    var force = false

    @Flag(help: "Print one JSON object with the results on stdout.")
    var json = false

    func validate() throws {
        guard ["f32", "f16", "bf16"].contains(type) else { throw ValidationError("--type must be f32, f16 or bf16 (got '\(type)')") }
    }

    func run() throws {
        let args = try Merge.trainingArguments(adapter)
        let base = try baseModel(for: adapter, given: model) { args["model"] ?? defaultModelPath() }
        let t = GGMLType.allCases.first { $0.description.lowercased() == type }!
        let report = try AdapterExport.writeGGUF(adapter: adapter, model: base, to: output, type: t, force: force)
        if json {
            printJSON(.object([
                ("output", .string(output)), ("adapter", .string(adapter)), ("base", .string(base)), ("type", .string(type)),
                ("tensors", .int(report.tensors)), ("bytes", .int(report.bytes)), ("alpha", .double(report.alpha)),
            ]))
            return
        }
        print("wrote \(output): \(report.tensors) tensors (\(type)), alpha \(formatFixed(report.alpha, 3)), for \(base)")
    }
}
