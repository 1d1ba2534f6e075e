// Options shared by the commands that load a model and generate.
import ArgumentParser
import QLoRA

/// The model cache folder (QLORA_CACHE, default ~/.cache/swift-qlora).
func cacheFolder() -> String {
    if let c = Environment.get("QLORA_CACHE"), !c.isEmpty { return c }
    return FileSystem.join(Environment.get("HOME") ?? ".", ".cache/swift-qlora")
}

/// Checks --quant-type (nf4, fp4, int4, and `none` where f32 is allowed) and --block-size.
func validateQuantization(quantType: String, blockSize: Int, allowNone: Bool) throws {
    let types = QuantType.allCases.map(\.rawValue) + (allowNone ? ["none"] : [])
    guard types.contains(quantType) else {
        throw ValidationError("--quant-type must be one of \(types.joined(separator: ", ")) (got '\(quantType)')")
    }
    guard Quantized4Bit.blockSizes.contains(blockSize) else {
        throw ValidationError("--block-size must be a power of two from 32 to 4096 (got \(blockSize))")
    }
}

/// The default model that scripts/setup.sh fetches.
func defaultModelPath() -> String { FileSystem.join(cacheFolder(), "models/SmolLM2-135M-Instruct.Q4_1.gguf") }

/// The base an adapter was trained on when its run changed the base (`--lora-init pissa`, or loftq past one round):
/// the folder OUTPUT/base that run wrote beside the adapter; nil for every other adapter.
func trainedBase(ofAdapter dir: String) -> String? {
    let base = FileSystem.join(dir, "base")
    return FileSystem.exists(FileSystem.join(base, "config.json")) ? base : nil
}

/// The model `adapter` goes on: the base its run wrote, when it wrote one (a --model naming another is refused: the
/// adapter does not fit it), else `given`, else `fallback()`.
func baseModel(for adapter: String, given: String?, fallback: () -> String) throws -> String {
    guard let base = trainedBase(ofAdapter: adapter) else { return given ?? fallback() }
    if let given {
        func canonical(_ p: String) -> String { ((try? ModelLocator.resolve(p)) ?? p).split(separator: "/").joined(separator: "/") }
        guard canonical(given) == canonical(base) else {
            throw ValidationError("\(adapter) was trained on the base its run wrote, \(base) (--lora-init pissa or loftq), not on \(given): leave --model out or pass --model \(base)")
        }
    }
    return base
}

struct ModelOptions: ParsableArguments {
    @Option(name: .shortAndLong, help: "A Hugging Face model folder, a bitsandbytes 4-bit folder, a .gguf file, or org/name in the local Hugging Face cache. (default: SmolLM2-135M-Instruct, fetched by scripts/setup.sh)")
    var model: String?

    @Option(help: "4-bit type for the frozen linear weights: nf4, fp4, int4, or none (f32, for reference runs). A bitsandbytes checkpoint is used as stored.")
    var quantType: String = "nf4"

    @Option(help: "Quantization block size (32 to 4096, a power of two).")
    var blockSize: Int = 64

    @Flag(help: "Keep f32 block constants instead of double-quantizing them.")
    var noDoubleQuant = false

    @Option(name: .customLong("adapter"), help: "A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) to apply (qlora serve: NAME=DIR, repeatable).")
    var adapters: [String] = []

    /// The one adapter folder of commands that apply one.
    var adapter: String? { adapters.last }

    @Option(help: ArgumentHelp("Storage of the embedding table and LM head (one matrix when tied): auto, f32, bf16 or q8_0. auto keeps the checkpoint's own values exactly in the narrowest of the others (q8_0 for a GGUF q8_0 table, bf16 for a bf16 checkpoint, else f32). Decoding reads the whole head for every token, so a smaller head decodes faster; bf16 and q8_0 round the values.", valueName: "dtype"))
    var headDtype: String = "auto"

    @Flag(help: "The same as --head-dtype bf16 (half the memory of f32, as QLoRA keeps them; values round to bf16).")
    var bf16Embeddings = false

    func validate() throws {
        try validateQuantization(quantType: quantType, blockSize: blockSize, allowNone: true)
        guard EmbeddingDType(rawValue: headDtype) != nil else {
            throw ValidationError("--head-dtype must be one of \(EmbeddingDType.allCases.map(\.rawValue).joined(separator: ", ")) (got '\(headDtype)')")
        }
        if bf16Embeddings && headDtype != "auto" && headDtype != "bf16" {
            throw ValidationError("--bf16-embeddings contradicts --head-dtype \(headDtype)")
        }
    }

    /// The embedding and head storage the options ask for.
    var embeddingDType: EmbeddingDType { bf16Embeddings ? .bf16 : EmbeddingDType(rawValue: headDtype) ?? .auto }

    /// --model, else the base the adapter's run wrote (PiSSA, LoftQ), else the default model.
    var modelPath: String { model ?? adapter.flatMap(trainedBase(ofAdapter:)) ?? defaultModelPath() }

    func loadOptions(progress: Bool) -> LoadOptions {
        var o = LoadOptions()
        o.quantType = QuantType(rawValue: quantType)
        o.blockSize = blockSize
        o.doubleQuant = !noDoubleQuant
        o.showProgress = progress
        o.embeddingDType = embeddingDType
        return o
    }

    /// Loads the model and its tokenizer, reporting the load on stderr.
    func load(progress: Bool) throws -> (LlamaModel, Tokenizer) {
        if adapters.count > 1 { throw ValidationError("--adapter takes one folder here (qlora serve takes several)") }
        if model == nil && !FileSystem.exists(modelPath) {
            throw ValidationError("the default model is not at \(modelPath); run scripts/setup.sh (or make demo) first, or pass --model")
        }
        if let adapter { _ = try baseModel(for: adapter, given: model) { modelPath } }
        let start = Clock.seconds()
        let path = try ModelLocator.resolve(modelPath)
        var m = try LlamaModel.load(path, options: loadOptions(progress: progress))
        if let adapter { m = try m.withAdapter(adapter) }
        let tokenizer = try Tokenizer.load(model: path)
        if progress {
            let params = m.config.parameterCount
            Log.info("loaded \(FileSystem.baseName(path)): \(formatFixed(Double(params) / 1e6, 1))M parameters, \(m.config.layerCount) layers, weights \(formatBytes(m.weightBytes)) (\(quantType == "none" ? "f32" : quantType), head \(m.head.storageName))\(adapter.map { " + adapter " + FileSystem.baseName($0) } ?? "") in \(formatFixed(Clock.seconds() - start, 2)) s")
        }
        return (m, tokenizer)
    }
}

struct SamplingFlags: ParsableArguments {
    @Option(help: "Sampling temperature; 0 is greedy.")
    var temperature: Float = 0.7

    @Option(help: "Nucleus sampling: keep the smallest set of tokens whose probability reaches p (1 disables).")
    var topP: Float = 0.9

    @Option(help: "Keep only the k most likely tokens (0 disables).")
    var topK: Int = 0

    @Option(help: "Drop tokens less likely than min-p times the most likely one (0 disables).")
    var minP: Float = 0

    @Option(help: "Penalty for tokens already in the context (1 disables; 1.1 to 1.3 is typical).")
    var repetitionPenalty: Float = 1

    @Option(help: "Random seed for sampling.")
    var seed: UInt64 = 0

    @Option(help: "Most tokens to generate.")
    var maxTokens: Int = 256

    @Option(name: .customLong("stop"), help: "A string that ends the reply (repeatable).")
    var stopStrings: [String] = []

    @Flag(help: "Keep generating past end-of-sequence tokens (for benchmarks).")
    var ignoreEOS = false

    func validate() throws {
        guard temperature >= 0 else { throw ValidationError("--temperature must be >= 0") }
        guard topP > 0 && topP <= 1 else { throw ValidationError("--top-p must be in (0, 1]") }
        guard topK >= 0 else { throw ValidationError("--top-k must be >= 0") }
        guard minP >= 0 && minP < 1 else { throw ValidationError("--min-p must be in [0, 1)") }
        guard repetitionPenalty > 0 else { throw ValidationError("--repetition-penalty must be > 0") }
        guard maxTokens > 0 else { throw ValidationError("--max-tokens must be positive") }
    }

    var generationOptions: GenerationOptions {
        var g = GenerationOptions()
        g.maxTokens = maxTokens
        g.stopStrings = stopStrings
        if ignoreEOS { g.eosTokenIDs = [] }
        g.sampling.temperature = temperature
        g.sampling.topP = topP
        g.sampling.topK = topK
        g.sampling.minP = minP
        g.sampling.repetitionPenalty = repetitionPenalty
        g.sampling.seed = seed
        return g
    }
}

/// Ctrl-C while generating stops the reply, not the program; in training, Ctrl-C and SIGTERM
/// (`terminateToo`) save a checkpoint and stop.
enum Interrupt {
    nonisolated(unsafe) static var requested = false

    static func install(terminateToo: Bool = false) {
        signal(SIGINT) { _ in Interrupt.requested = true }
        if terminateToo { signal(SIGTERM) { _ in Interrupt.requested = true } }
        // A parent may have started us with these signals blocked (a mask is inherited across exec,
        // and libdispatch's worker threads block signals): unblock them, or Ctrl-C would never arrive.
        var set = sigset_t()
        sigemptyset(&set)
        sigaddset(&set, SIGINT)
        sigaddset(&set, SIGTERM)
        pthread_sigmask(SIG_UNBLOCK, &set, nil)
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The precision of inference's frozen products and of its KV cache (generate, chat, perplexity, eval, serve).
struct InferenceOptions: ParsableArguments {
    @Option(help: ArgumentHelp("Precision of the frozen weights' products (a prompt's prefill, perplexity, MMLU's prompts, and decoding with 4-bit weights): auto (bf16 where the CPU has AVX512-BF16, else f32), bf16 (weights and inputs rounded to bf16, sums in f32: QLoRA's bnb_4bit_compute_dtype; on Zen 5 1.8x the f32 prefill and 1.7x the f32 decoding of 16 sequences at once, perplexity +0.03% on War and Peace) or f32 (equal to transformers in f32: for reference runs).", valueName: "dtype"))
    var computeDtype: String = "auto"

    @Option(help: ArgumentHelp("How the KV cache keeps keys and values: f16 (half f32's bytes, so decoding deep in a long context reads half as much; perplexity on War and Peace within 0.014% of f32), bf16 (f32's range, fewer mantissa bits) or f32 (exact: for reference runs).", valueName: "dtype"))
    var kvCache: String = "f16"

    func validate() throws {
        guard computeDtype == "auto" || ComputeDType(rawValue: computeDtype) != nil else {
            throw ValidationError("--compute-dtype must be auto, f32 or bf16 (got '\(computeDtype)')")
        }
        guard KVCacheDType(rawValue: kvCache) != nil else { throw ValidationError("--kv-cache must be f16, bf16 or f32 (got '\(kvCache)')") }
    }

    /// The precision asked for: auto is bf16 where the kernels have it.
    var resolved: ComputeDType {
        if computeDtype == "auto" { return BF16Gemm.isSupported ? .bf16 : .f32 }
        return ComputeDType(rawValue: computeDtype) ?? .f32
    }

    /// Sets the model's product precision and its caches' element type.
    func apply(to model: LlamaModel) {
        model.computeDType = resolved
        model.kvCacheDType = KVCacheDType(rawValue: kvCache) ?? .f16
    }
}
