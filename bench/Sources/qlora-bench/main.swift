// qlora-bench: the Swift side of bench/ (see bench/run.sh). It times our kernels on the same tensor
// files the Python side times bitsandbytes on, and prints one JSON object.
//   qlora-bench quant FILE [--repeats N]   4-bit quantize / dequantize throughput (GB/s of f32)
//   qlora-bench infer MODEL [-p 512] [-n 128]  prefill and decode tokens/s as llama-bench measures them
//   qlora-bench bandwidth [--megabytes 512]    read and copy bandwidth (the limit of decoding)
//   qlora-bench batched MODEL [--batch 1,4,16]  batched decoding, as llama-batched-bench measures it
import CAllocationCounter
import QLoRA

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

func fail(_ message: String) -> Never {
    Log.write("error: \(message)\n")
    exit(2)
}

/// Best-of-N wall time of `body`.
func best(_ repeats: Int, _ body: () throws -> Void) rethrows -> Double {
    var t = Double.infinity
    for _ in 0..<repeats {
        let start = Clock.seconds()
        try body()
        t = min(t, Clock.seconds() - start)
    }
    return t
}

func quantBench(file: String, repeats: Int) throws {
    let tensors = try TensorCollection(path: file)
    var totals: [String: Double] = [
        "quantize_nf4_dq": 0, "quantize_nf4": 0, "dequantize_nf4_dq": 0, "dequantize_nf4": 0, "dequantize_nf4_dq_reused": 0,
    ]
    var bytes = 0
    for name in tensors.names {
        let view = tensors.tensor(name)!
        let values = view.floats()
        bytes += values.count * 4
        var qdq: Quantized4Bit?
        var q: Quantized4Bit?
        totals["quantize_nf4_dq"]! += try best(repeats) {
            qdq = try Quantized4Bit(values, shape: view.shape, type: .nf4, blockSize: 64, doubleQuant: true, name: name)
        }
        totals["quantize_nf4"]! += try best(repeats) {
            q = try Quantized4Bit(values, shape: view.shape, type: .nf4, blockSize: 64, doubleQuant: false, name: name)
        }
        // Dequantization as a model would run it: nested constants decoded, then the 4-bit codes.
        totals["dequantize_nf4_dq"]! += best(repeats) { _ = qdq!.dequantize() }
        totals["dequantize_nf4"]! += best(repeats) { _ = q!.dequantize() }
        // Into an output buffer that is reused (allocated and touched once, outside the timing).
        var out = [Float](repeating: 0, count: values.count)
        out.withUnsafeMutableBufferPointer { o in
            let dq = qdq!
            totals["dequantize_nf4_dq_reused"]! += best(repeats) {
                dq.dequantize(elements: 0..<values.count, scales: dq.blockScales(), into: o.baseAddress!)
            }
        }
    }
    var fields: [(String, JSONValue)] = [
        ("file", .string(file)), ("tensors", .int(tensors.names.count)), ("f32_bytes", .int(bytes)),
        ("kernels", .string(KernelTable.current.level.description)), ("threads", .int(Parallel.threadCount)),
    ]
    for (k, v) in totals.sorted(by: { $0.key < $1.key }) {
        fields.append((k + "_seconds", .double(v)))
        fields.append((k + "_gbps", .double(Double(bytes) / v / 1e9)))
    }
    print(JSON.serialize(.object(fields), pretty: true))
}

/// Peak resident set size of this process so far, in bytes.
func peakRSS() -> Int {
    var usage = rusage()
    // Glibc imports RUSAGE_SELF as an enum (__rusage_who), Darwin as a plain Int32; ru_maxrss is in
    // kilobytes on Linux, in bytes on Darwin.
    #if canImport(Glibc)
    getrusage(Int32(RUSAGE_SELF.rawValue), &usage)
    return Int(usage.ru_maxrss) * 1024
    #else
    getrusage(RUSAGE_SELF, &usage)
    return Int(usage.ru_maxrss)
    #endif
}

/// Writes a Llama-shaped Hugging Face folder with random bf16 weights (normal, std 0.02), streamed
/// tensor by tensor, for memory measurements on shapes we cannot download.
/// A random bf16 checkpoint of `family`'s layout (Hugging Face names and config.json) at the given size: the same
/// shapes for every family (head_dim = hidden / heads), so that their training steps compare. Gemma 3 gets its
/// four norms a block, q/k norms and a sliding window of 512 on five layers in six; Qwen3 its q/k norms; Phi-3
/// its fused projections and a sliding window of 2047.
func synthesize(output: String, hidden: Int, intermediate: Int, layers: Int, heads: Int, kvHeads: Int, vocab: Int, family: ModelFamily = .llama,
                headDim: Int? = nil) throws {
    try FileSystem.makeDirectory(output)
    let d = headDim ?? hidden / heads
    var extra = #", "head_dim": \#(d)"#
    switch family {
    case .gemma3:
        extra += #", "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": \#(d), "sliding_window": 512, "rope_local_base_freq": 10000.0"#
    case .phi3: extra += #", "sliding_window": 2047"#
    default: break
    }
    let config = """
        {"architectures": ["\(family.huggingFaceArchitecture)"], "hidden_size": \(hidden), "intermediate_size": \(intermediate),
         "num_hidden_layers": \(layers), "num_attention_heads": \(heads), "num_key_value_heads": \(kvHeads),
         "vocab_size": \(vocab), "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
         "tie_word_embeddings": false\(family == .gemma3 ? "" : #", "hidden_act": "silu""#), "dtype": "bfloat16"\(extra)}
        """
    try FileSystem.writeFileAtomically(FileSystem.join(output, "config.json"), bytes: Array(config.utf8))
    var shapes: [(String, [Int])] = [("model.embed_tokens.weight", [vocab, hidden])]
    for l in 0..<layers {
        let p = "model.layers.\(l)."
        shapes.append((p + "input_layernorm.weight", [hidden]))
        if family == .phi3 {
            shapes.append((p + "self_attn.qkv_proj.weight", [(heads + 2 * kvHeads) * d, hidden]))
        } else {
            shapes += [(p + "self_attn.q_proj.weight", [heads * d, hidden]), (p + "self_attn.k_proj.weight", [kvHeads * d, hidden]),
                       (p + "self_attn.v_proj.weight", [kvHeads * d, hidden])]
        }
        if family == .qwen3 || family == .gemma3 { shapes += [(p + "self_attn.q_norm.weight", [d]), (p + "self_attn.k_norm.weight", [d])] }
        shapes.append((p + "self_attn.o_proj.weight", [hidden, heads * d]))
        if family == .gemma3 {
            shapes += [(p + "post_attention_layernorm.weight", [hidden]), (p + "pre_feedforward_layernorm.weight", [hidden]),
                       (p + "post_feedforward_layernorm.weight", [hidden])]
        } else {
            shapes.append((p + "post_attention_layernorm.weight", [hidden]))
        }
        if family == .phi3 {
            shapes.append((p + "mlp.gate_up_proj.weight", [2 * intermediate, hidden]))
        } else {
            shapes += [(p + "mlp.gate_proj.weight", [intermediate, hidden]), (p + "mlp.up_proj.weight", [intermediate, hidden])]
        }
        shapes.append((p + "mlp.down_proj.weight", [hidden, intermediate]))
    }
    shapes += [("model.norm.weight", [hidden]), ("lm_head.weight", [vocab, hidden])]
    let writer = try SafetensorsWriter(path: FileSystem.join(output, "model.safetensors"),
                                       tensors: shapes.map { .init(name: $0.0, dtype: .bf16, shape: $0.1) })
    var rng = SeededGenerator(seed: 0)
    for (name, shape) in shapes {
        let n = shape.reduce(1, *)
        let isNorm = shape.count == 1
        var values = [UInt16](repeating: 0, count: n)
        for i in 0..<n {
            // Sum of uniforms: cheap, roughly normal.
            let u = (rng.nextFloat() + rng.nextFloat() + rng.nextFloat() - 1.5) * 0.04
            values[i] = floatToBFloat16Bits(isNorm ? (family == .gemma3 ? 0 : 1) : u)
        }
        try writer.append(name, values: values)
    }
    try writer.finish()
}

/// Llama shapes of the QLoRA paper's models (LLaMA 7B, 13B, 33B, 65B).
let llamaShapes: [String: (hidden: Int, intermediate: Int, layers: Int, heads: Int)] = [
    "7b": (4096, 11008, 32, 32), "13b": (5120, 13824, 40, 40), "33b": (6656, 17920, 60, 52), "65b": (8192, 22016, 80, 64),
]

/// Resident set size now, in bytes (/proc/self/statm).
func currentRSS() -> Int {
    guard let f = fopen("/proc/self/statm", "r") else { return 0 }
    defer { fclose(f) }
    var buffer = [CChar](repeating: 0, count: 256)
    guard fgets(&buffer, Int32(buffer.count), f) != nil else { return 0 }
    let fields = String(decoding: buffer.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self).split(separator: " ")
    return fields.count > 1 ? (Int(fields[1]) ?? 0) * Int(sysconf(Int32(_SC_PAGESIZE))) : 0
}

/// A Llama model of a paper shape with random NF4 + double-quant weights made directly in 4-bit form
/// (random codes and constants: memory and time do not depend on the values), f32 embeddings and an
/// f32 LM head as QLoRA keeps them (not quantized), then one QLoRA training step and one optimizer
/// update. Prints peak RSS next to the accounting of the paper (weights + LoRA + optimizer + activations).
func memoryBench(shape name: String, batch B: Int, seq T: Int, rank: Int, optim: OptimizerKind, layersOverride: Int?, f32Embeddings: Bool) throws {
    guard let s = llamaShapes[name] else { fail("unknown shape \(name): \(llamaShapes.keys.sorted().joined(separator: ", "))") }
    let layers = layersOverride ?? s.layers
    let config = LlamaConfig(vocabSize: 32000, hiddenSize: s.hidden, intermediateSize: s.intermediate, layerCount: layers,
                             headCount: s.heads, kvHeadCount: s.heads)
    var rng = SeededGenerator(seed: 7)
    func randomBytes(_ n: Int) -> [UInt8] {
        [UInt8](unsafeUninitializedCapacity: n) { buf, count in
            var i = 0
            while i + 8 <= n { var v = rng.next(); withUnsafeBytes(of: &v) { for k in 0..<8 { buf[i + k] = $0[k] } }; i += 8 }
            while i < n { buf[i] = UInt8(truncatingIfNeeded: rng.next()); i += 1 }
            count = n
        }
    }
    func nf4(_ out: Int, _ inF: Int) -> Linear {
        let n = out * inF, blocks = (n + 63) / 64
        let nested = NestedAbsmax(codes: randomBytes(blocks), nestedAbsmax: [Float](repeating: 0.01, count: (blocks + 255) / 256), offset: 0.02)
        let q = Quantized4Bit(quantType: .nf4, blockSize: 64, shape: [out, inF], packed: randomBytes((n + 1) / 2), absmax: nil, nested: nested)
        return Linear(weight: .quantized(q), outFeatures: out, inFeatures: inF)
    }
    // Embedding-like values, cheaply (a hash of the index, uniform in about ±1.7 std; not normal).
    func embeddingLike(_ n: Int, _ std: Float) -> [Float] {
        [Float](unsafeUninitializedCapacity: n) { buf, count in
            for i in 0..<n { buf[i] = (Float(UInt32(truncatingIfNeeded: UInt64(i) &* 0x9E37_79B9_7F4A_7C15 >> 40) & 0xFFFF) / 32768 - 1) * 1.7 * std }
            count = n
        }
    }
    let t0 = Clock.seconds()
    let D = s.hidden, I = s.intermediate
    var built: [LlamaLayer] = []
    for _ in 0..<layers {
        built.append(LlamaLayer(inputNorm: [Float](repeating: 1, count: D), q: nf4(D, D), k: nf4(D, D), v: nf4(D, D), o: nf4(D, D),
                                postAttentionNorm: [Float](repeating: 1, count: D), gate: nf4(I, D), up: nf4(I, D), down: nf4(D, I)))
    }
    // bf16 embeddings and head, as QLoRA keeps them (its compute dtype); --f32-embeddings for f32.
    func table() -> Linear {
        let w = embeddingLike(32000 * D, 0.02)
        return Linear(weight: f32Embeddings ? .dense(w) : .bf16(w.map(floatToBFloat16Bits)), outFeatures: 32000, inFeatures: D)
    }
    let model = LlamaModel(config: config, embeddings: table(), layers: built, finalNorm: [Float](repeating: 1, count: D),
                           lmHead: table(), source: "synthetic \(name)")
    let afterModel = currentRSS()
    let buildSeconds = Clock.seconds() - t0
    var c = LoRAConfig()
    c.rank = rank
    c.alpha = 16
    c.dropout = 0.05
    let lora = LoRAWeights(model: model, config: c)
    var tensors: [(offset: Int, count: Int)] = []
    for s in lora.slots { tensors += [(s.aOffset, rank * s.inFeatures), (s.bOffset, s.outFeatures * rank)] }
    let optimizer = try AdamW(kind: optim, tensors: tensors)
    let engine = TrainingEngine(model: model, lora: lora)
    let tokens = (0..<(B * T)).map { _ in Int(rng.next() % 32000) }
    let batch = TrainingBatch(tokens: tokens, labels: tokens, batchSize: B, sequenceLength: T)
    let t1 = Clock.seconds()
    lora.zeroGradients()
    let loss = try engine.step(batch)
    let stepSeconds = Clock.seconds() - t1
    let t2 = Clock.seconds()
    lora.parameters.withUnsafeMutableBufferPointer { p in lora.gradients.withUnsafeBufferPointer { g in optimizer.update(parameters: p, gradients: g, lr: 2e-4) } }
    let updateSeconds = Clock.seconds() - t2
    let fourBit = built.reduce(0) { $0 + $1.linears.reduce(0) { $0 + $1.weightBytes } }
    let embeddings = model.embeddings.weightBytes + model.head.weightBytes
    let loraBytes = lora.parameterCount * 4
    let checkpoints = layers * B * T * D * 4
    print(JSON.serialize(.object([
        ("shape", .string(name)), ("layers", .int(layers)), ("parameters", .int(config.parameterCount)),
        ("batch", .int(B)), ("seq", .int(T)), ("rank", .int(rank)), ("optimizer", .string(optim.rawValue)),
        ("loss", .double(loss)), ("build_seconds", .double(buildSeconds)), ("step_seconds", .double(stepSeconds)),
        ("update_seconds", .double(updateSeconds)), ("tokens_per_second", .double(Double(B * T) / stepSeconds)),
        ("four_bit_weight_bytes", .int(fourBit)), ("embedding_and_head_bytes", .int(embeddings)),
        ("lora_parameter_bytes", .int(loraBytes)), ("lora_gradient_bytes", .int(loraBytes)),
        ("optimizer_state_bytes", .int(optimizer.stateBytes)), ("checkpointed_activation_bytes", .int(checkpoints)),
        ("activation_arena_bytes", .int(engine.workspaceBytes)),
        ("rss_after_model_bytes", .int(afterModel)), ("rss_after_update_bytes", .int(currentRSS())), ("peak_rss_bytes", .int(peakRSS())),
    ]), pretty: true))
}

let args = Array(CommandLine.arguments.dropFirst())
func option(_ name: String, _ def: Int) -> Int {
    if let i = args.firstIndex(of: name), i + 1 < args.count, let n = Int(args[i + 1]) { return n }
    return def
}
func stringOption(_ name: String) -> String? {
    if let i = args.firstIndex(of: name), i + 1 < args.count { return args[i + 1] }
    return nil
}
func headDType(default d: EmbeddingDType) -> EmbeddingDType {
    guard let s = stringOption("--head-dtype") else { return d }
    guard let t = EmbeddingDType(rawValue: s) else { fail("--head-dtype: \(EmbeddingDType.allCases.map(\.rawValue).joined(separator: ", "))") }
    return t
}

/// Bytes a decoding step reads from memory: every linear weight and the head once (norms and the one
/// embedding row are too small to count; the KV cache grows with the context and is left out).
func decodeBytes(_ model: LlamaModel) -> Int {
    model.layers.reduce(0) { $0 + $1.linears.reduce(0) { $0 + $1.weightBytes } } + model.head.weightBytes
}

/// llama-bench's two tests on our forward pass: pp = one forward over P random tokens from an empty
/// cache (logits of the last only), tg = N forwards of one random token each from an empty cache.
/// Best of `repeats` each; one warm-up forward first.
func inferBench(model path: String, prompt P: Int, generate N: Int, depth: Int, repeats: Int, options o: LoadOptions,
                compute: ComputeDType, kvCache: KVCacheDType) throws {
    let loadStart = Clock.seconds()
    let model = try LlamaModel.load(path, options: o)
    model.computeDType = compute
    model.kvCacheDType = kvCache
    let loadSeconds = Clock.seconds() - loadStart
    var rng = SeededGenerator(seed: 42)
    let V = model.config.vocabSize
    let promptTokens = (0..<max(P, 1)).map { _ in Int(rng.next() % UInt64(V)) }
    let genTokens = (0..<max(N, 1)).map { _ in Int(rng.next() % UInt64(V)) }
    let context = (0..<depth).map { _ in Int(rng.next() % UInt64(V)) }
    let cache = model.makeCache(capacity: max(P, depth + N) + 1)
    _ = try model.forward(Array(promptTokens.prefix(8)), cache: cache, logits: .last)
    var pp = Double.infinity, tg = Double.infinity
    for _ in 0..<repeats {
        if P > 0 {
            cache.reset()
            let t = Clock.seconds()
            _ = try model.forward(promptTokens, cache: cache, logits: .last)
            pp = min(pp, Clock.seconds() - t)
        }
        if N > 0 {
            cache.reset()
            if depth > 0 { _ = try model.forward(context, cache: cache, logits: .none) }  // decoding after `depth` tokens (llama-bench -d)
            let t = Clock.seconds()
            for token in genTokens { _ = try model.forward([token], cache: cache, logits: .last) }
            tg = min(tg, Clock.seconds() - t)
        }
    }
    print(JSON.serialize(.object([
        ("model", .string(path)), ("quant_type", .string(o.quantType?.rawValue ?? "none")), ("head", .string(model.head.storageName)),
        ("kernels", .string(KernelTable.current.level.description)), ("threads", .int(Parallel.threadCount)),
        ("weight_bytes", .int(model.weightBytes)), ("decode_bytes_per_token", .int(decodeBytes(model))), ("load_seconds", .double(loadSeconds)),
        ("prompt_tokens", .int(P)), ("prefill_tokens_per_second", .double(P > 0 ? Double(P) / pp : 0)),
        ("generated_tokens", .int(N)), ("depth", .int(depth)), ("compute_dtype", .string(compute.rawValue)), ("kv_cache", .string(kvCache.rawValue)),
        ("bf16_supported", .bool(BF16Gemm.isSupported)), ("decode_tokens_per_second", .double(N > 0 ? Double(N) / tg : 0)),
        ("peak_rss_bytes", .int(peakRSS())),
    ]), pretty: true))
}

/// --compute-dtype: f32 (the library's default, the reference runs') unless named.
func computeOption() -> ComputeDType {
    guard let s = stringOption("--compute-dtype") else { return .f32 }
    guard let d = ComputeDType(rawValue: s) else { fail("--compute-dtype: f32 or bf16") }
    return d
}

/// --kv-cache: the KV cache's element type, f16 (the command line's default) unless named.
func kvCacheOption() -> KVCacheDType {
    guard let s = stringOption("--kv-cache") else { return .f16 }
    guard let d = KVCacheDType(rawValue: s) else { fail("--kv-cache: f16, bf16 or f32") }
    return d
}

/// The load options of the inference benches: --quant-type (nf4, fp4, int4, none) and --head-dtype.
func inferenceLoadOptions() -> LoadOptions {
    var o = LoadOptions()
    o.showProgress = false
    if let q = stringOption("--quant-type") {
        if q == "none" { o.quantType = nil } else if let t = QuantType(rawValue: q) { o.quantType = t } else { fail("--quant-type: nf4, fp4, int4 or none") }
    }
    o.embeddingDType = headDType(default: .auto)
    return o
}

/// Memory bandwidth of this machine, as the limit of decoding: read (memchr over a buffer that holds no
/// match, glibc's vector loop) and copy (memcpy, counted as STREAM counts it: bytes read + written),
/// on 1 thread and on all `Parallel.threadCount`; best of `repeats`, over `megabytes` MB (past the caches).
func bandwidthBench(megabytes: Int, repeats: Int) {
    let n = megabytes << 20
    let src = UnsafeMutableRawPointer.allocate(byteCount: n, alignment: 64), dst = UnsafeMutableRawPointer.allocate(byteCount: n, alignment: 64)
    memset(src, 1, n)
    memset(dst, 0, n)
    var found = 0
    func readOnce(threads: Int) {
        Parallel.forChunks(count: n, granularity: 4096, minimumChunk: threads == 1 ? n : 1) { _, r in
            if memchr(src + r.lowerBound, 7, r.count) != nil { found += 1 }
        }
    }
    func copyOnce(threads: Int) {
        Parallel.forChunks(count: n, granularity: 4096, minimumChunk: threads == 1 ? n : 1) { _, r in
            memcpy(dst + r.lowerBound, src + r.lowerBound, r.count)
        }
    }
    let all = Parallel.threadCount
    let read1 = best(repeats) { readOnce(threads: 1) }, readAll = best(repeats) { readOnce(threads: all) }
    let copy1 = best(repeats) { copyOnce(threads: 1) }, copyAll = best(repeats) { copyOnce(threads: all) }
    print(JSON.serialize(.object([
        ("megabytes", .int(megabytes)), ("threads", .int(all)),
        ("read_gbps_1_thread", .double(Double(n) / read1 / 1e9)), ("read_gbps", .double(Double(n) / readAll / 1e9)),
        ("copy_gbps_1_thread", .double(2 * Double(n) / copy1 / 1e9)), ("copy_gbps", .double(2 * Double(n) / copyAll / 1e9)),
        ("matches", .int(found)),
    ]), pretty: true))
    src.deallocate()
    dst.deallocate()
}

/// llama-batched-bench's measurement on our batched decoding: for each B, B sequences each prefill P random
/// tokens (one forward each), then N batched decoding steps of one token per sequence. Reports the
/// prefill rate and the aggregate decoding rate (B N tokens over the decoding time); best of `repeats`.
func batchedBench(model path: String, batches: [Int], prompt P: Int, generate N: Int, repeats: Int, options o: LoadOptions) throws {
    let model = try LlamaModel.load(path, options: o)
    model.kvCacheDType = kvCacheOption()
    model.computeDType = computeOption()
    var rng = SeededGenerator(seed: 7)
    let V = model.config.vocabSize
    var rows: [JSONValue] = []
    for B in batches {
        let caches = (0..<B).map { _ in model.makeCache(capacity: P + N + 1) }
        var pp = Double.infinity, tg = Double.infinity
        for _ in 0..<repeats {
            caches.forEach { $0.reset() }
            let prompts = (0..<B).map { _ in (0..<P).map { _ in Int(rng.next() % UInt64(V)) } }
            var t = Clock.seconds()
            for (i, p) in prompts.enumerated() { _ = try model.forward(p, cache: caches[i], logits: .last) }
            pp = min(pp, Clock.seconds() - t)
            var tokens = (0..<B).map { _ in Int(rng.next() % UInt64(V)) }
            t = Clock.seconds()
            for _ in 0..<N {
                _ = try model.forward(batch: tokens, caches: caches)
                tokens = tokens.map { ($0 &* 31 &+ 7) % V }
            }
            tg = min(tg, Clock.seconds() - t)
        }
        rows.append(.object([
            ("batch", .int(B)), ("prefill_tokens_per_second", .double(Double(B * P) / pp)),
            ("decode_tokens_per_second", .double(Double(B * N) / tg)), ("decode_step_seconds", .double(tg / Double(N))),
        ]))
    }
    print(JSON.serialize(.object([
        ("model", .string(path)), ("quant_type", .string(o.quantType?.rawValue ?? "none")), ("head", .string(model.head.storageName)),
        ("kernels", .string(KernelTable.current.level.description)), ("threads", .int(Parallel.threadCount)),
        ("compute_dtype", .string(model.computeDType.rawValue)), ("kv_cache", .string(model.kvCacheDType.rawValue)), ("prompt_tokens", .int(P)), ("generated_tokens", .int(N)), ("batches", .array(rows)), ("peak_rss_bytes", .int(peakRSS())),
    ]), pretty: true))
}

do {
    switch args.first {
    case "serve-load":
        try serveLoadCommand()
    case "batched":
        guard args.count >= 2 else { fail("usage: qlora-bench batched MODEL [--batch 1,4,16] [-p 128] [-n 128] [--repeats 2] [--quant-type ...] [--head-dtype ...] [--compute-dtype f32|bf16] [--kv-cache f16|bf16|f32]") }
        let o = inferenceLoadOptions()
        let batches = (stringOption("--batch") ?? "1,4,16").split(separator: ",").compactMap { Int($0) }
        try batchedBench(model: args[1], batches: batches, prompt: option("-p", 128), generate: option("-n", 128), repeats: option("--repeats", 2),
                         options: o)
    case "bandwidth":
        bandwidthBench(megabytes: option("--megabytes", 512), repeats: option("--repeats", 5))
    case "infer":
        guard args.count >= 2 else {
            fail("usage: qlora-bench infer MODEL [-p 512] [-n 128] [-d 0] [--repeats 3] [--quant-type nf4|fp4|int4|none] [--head-dtype auto|f32|bf16|q8_0] [--compute-dtype f32|bf16] [--kv-cache f16|bf16|f32]")
        }
        let o = inferenceLoadOptions()
        try inferBench(model: args[1], prompt: option("-p", 512), generate: option("-n", 128), depth: option("-d", 0), repeats: option("--repeats", 3),
                       options: o, compute: computeOption(), kvCache: kvCacheOption())
    case "quant":
        guard args.count >= 2 else { fail("usage: qlora-bench quant FILE [--repeats N]") }
        try quantBench(file: args[1], repeats: option("--repeats", 3))
    case "synth-llama":
        guard args.count >= 2 else { fail("usage: qlora-bench synth-llama DIR [--hidden N --intermediate N --layers N --heads N --kv-heads N --vocab N --head-dim N --family llama|qwen3|gemma3|phi3|...]") }
        var family = ModelFamily.llama
        if let i = args.firstIndex(of: "--family"), i + 1 < args.count {
            guard let f = ModelFamily(rawValue: args[i + 1]) else { fail("--family: \(ModelFamily.allCases.map(\.rawValue).joined(separator: ", "))") }
            family = f
        }
        try synthesize(output: args[1], hidden: option("--hidden", 2048), intermediate: option("--intermediate", 5632),
                       layers: option("--layers", 22), heads: option("--heads", 32), kvHeads: option("--kv-heads", 4),
                       vocab: option("--vocab", 32000), family: family,
                       headDim: args.contains("--head-dim") ? option("--head-dim", 64) : nil)
    case "logits":
        // Every position's logits for some token ids, as a safetensors file (for the reference checks of
        // scripts/reference/verify_merge.py): the model as `qlora generate` loads it, with an adapter or not.
        guard args.count >= 3 else { fail("usage: qlora-bench logits MODEL OUT.safetensors --ids 1,2,3 [--adapter DIR] [--quant-type nf4|none]") }
        let model = try LlamaModel.load(args[1], options: inferenceLoadOptions())
        let adapted = try stringOption("--adapter").map { try model.withAdapter($0) } ?? model
        let ids = (stringOption("--ids") ?? "").split(separator: ",").compactMap { Int($0) }
        guard !ids.isEmpty else { fail("--ids: comma-separated token ids") }
        let logits = try adapted.forward(ids, cache: KVCache(config: model.config, capacity: ids.count), logits: .all)
        try SafetensorsWriter.write(path: args[2], tensors: [
            ("logits", .make(logits, dtype: .f32, shape: [ids.count, model.config.vocabSize])),
            ("input_ids", .make(ids.map(Int64.init), dtype: .i64, shape: [ids.count])),
        ])
    case "synth-adapter":
        // A PEFT adapter with random A and B (normal, std 0.01) on all seven projections of MODEL's shape, for
        // measurements (bench/merge_bench.sh) on models no adapter was trained for.
        guard args.count >= 3 else { fail("usage: qlora-bench synth-adapter MODEL_DIR OUT_DIR [--rank 16]") }
        let c = try LlamaConfig(configFile: FileSystem.join(args[1], "config.json"))
        let r = option("--rank", 16)
        var rng = SystemRandomNumberGenerator()
        func normal() -> Float {
            let u = Float.random(in: Float.ulpOfOne..<1, using: &rng), v = Float.random(in: 0..<1, using: &rng)
            return 0.01 * (-2 * log(u)).squareRoot() * cos(2 * Float.pi * v)
        }
        let q = c.headCount * c.headDim, kv = c.kvHeadCount * c.headDim, h = c.hiddenSize, m = c.intermediateSize
        var tensors: [(String, TensorView)] = []
        for l in 0..<c.layerCount {
            for (module, o, i) in [("self_attn.q_proj", q, h), ("self_attn.k_proj", kv, h), ("self_attn.v_proj", kv, h), ("self_attn.o_proj", h, q),
                                   ("mlp.gate_proj", m, h), ("mlp.up_proj", m, h), ("mlp.down_proj", h, m)] {
                let p = "base_model.model.model.layers.\(l).\(module)"
                tensors.append((p + ".lora_A.weight", .make((0..<(r * i)).map { _ in normal() }, dtype: .f32, shape: [r, i])))
                tensors.append((p + ".lora_B.weight", .make((0..<(o * r)).map { _ in normal() }, dtype: .f32, shape: [o, r])))
            }
        }
        try FileSystem.makeDirectories(args[2])
        try SafetensorsWriter.write(path: FileSystem.join(args[2], "adapter_model.safetensors"), tensors: tensors, metadata: [("format", "pt")])
        let config = #"{"peft_type": "LORA", "r": \#(r), "lora_alpha": \#(2 * r), "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], "bias": "none", "task_type": "CAUSAL_LM"}"#
        try FileSystem.writeFileAtomically(FileSystem.join(args[2], "adapter_config.json"), bytes: Array(config.utf8))
    case "load":
        // Loads a model as `qlora generate` does and reports the peak resident set size.
        guard args.count >= 2 else { fail("usage: qlora-bench load MODEL") }
        var o = LoadOptions()
        o.showProgress = false
        let start = Clock.seconds()
        let model = try LlamaModel.load(args[1], options: o)
        let c = model.config
        let largestLayerF32 = (c.hiddenSize * c.headDim * (2 * c.headCount + 2 * c.kvHeadCount) + 3 * c.hiddenSize * c.intermediateSize) * 4
        print(JSON.serialize(.object([
            ("model", .string(args[1])), ("parameters", .int(c.parameterCount)), ("weight_bytes", .int(model.weightBytes)),
            ("one_layer_f32_bytes", .int(largestLayerF32)), ("peak_rss_bytes", .int(peakRSS())),
            ("seconds", .double(Clock.seconds() - start)),
        ]), pretty: true))
    case "train-step":
        // Times QLoRA training steps (forward + backward into LoRA) on random tokens.
        guard args.count >= 2 else { fail("usage: qlora-bench train-step MODEL [--batch N --seq N --rank N --steps N --no-checkpointing --compute-dtype f32|bf16 --loss-chunk N --bf16-embeddings --use-dora]") }
        var o = LoadOptions()
        o.showProgress = false
        o.embeddingDType = headDType(default: args.contains("--bf16-embeddings") ? .bf16 : .auto)
        let model = try LlamaModel.load(args[1], options: o)
        var c = LoRAConfig()
        c.rank = option("--rank", 16)
        c.alpha = Float(2 * c.rank)
        c.dropout = 0.05
        c.useDoRA = args.contains("--use-dora")
        let lora = LoRAWeights(model: model, config: c)
        var to = TrainingOptions()
        to.gradientCheckpointing = !args.contains("--no-checkpointing")
        if args.contains("--attention-block") { to.attentionRowBlock = option("--attention-block", 256) }
        if args.contains("--loss-chunk") { to.lossChunkRows = option("--loss-chunk", 64) }
        if let i = args.firstIndex(of: "--compute-dtype"), i + 1 < args.count {
            guard let d = ComputeDType(rawValue: args[i + 1]) else { fail("--compute-dtype: f32 or bf16") }
            to.computeDType = d
        }
        let engine = TrainingEngine(model: model, lora: lora, options: to)
        let B = option("--batch", 4), T = option("--seq", 512), steps = option("--steps", 3)
        var rng = SeededGenerator(seed: 1)
        let tokens = (0..<(B * T)).map { _ in Int(rng.next() % UInt64(model.config.vocabSize)) }
        let batch = TrainingBatch(tokens: tokens, labels: tokens, batchSize: B, sequenceLength: T)
        var times: [Double] = []
        var allocations: [(calls: UInt64, bytes: UInt64, blasBytes: UInt64)] = []
        for _ in 0..<steps {
            let t0 = Clock.seconds()
            let calls = qlora_allocation_count(), bytes = qlora_allocated_bytes(), blas = qlora_blas_allocated_bytes()
            lora.zeroGradients()
            try engine.step(batch)
            lora.markChanged()  // as an optimizer step would (DoRA computes its norms again)
            allocations.append((qlora_allocation_count() - calls, qlora_allocated_bytes() - bytes, qlora_blas_allocated_bytes() - blas))
            times.append(Clock.seconds() - t0)
        }
        let best = times.min()!
        // Steps after the first (which makes the activation arena): what the step loop itself allocates.
        let later = allocations.dropFirst()
        print(JSON.serialize(.object([
            ("model", .string(args[1])), ("batch", .int(B)), ("seq", .int(T)), ("rank", .int(c.rank)), ("dora", .bool(c.useDoRA)),
            ("compute_dtype", .string(engine.usesBF16 ? "bf16" : "f32")),
            ("trainable_parameters", .int(lora.parameterCount)), ("step_seconds", .array(times.map { .double($0) })),
            ("tokens_per_second", .double(Double(B * T) / best)), ("peak_rss_bytes", .int(peakRSS())),
            ("workspace_bytes", .int(engine.workspaceBytes)), ("workspace_allocations", .int(engine.workspaceAllocations)),
            ("allocation_counter", .bool(qlora_allocation_counter_active() != 0)),
            ("first_step_allocated_bytes", .int(Int(allocations.first?.bytes ?? 0))),
            ("later_steps_max_allocated_bytes", .int(Int(later.map(\.bytes).max() ?? 0))),
            ("later_steps_max_allocations", .int(Int(later.map(\.calls).max() ?? 0))),
            ("later_steps_max_openblas_allocated_bytes", .int(Int(later.map(\.blasBytes).max() ?? 0))),
        ]), pretty: true))
    case "sgemm":
        // The machine's f32 GEMM rate through the same BLAS the engine uses (square products, best of 5).
        let n = option("--n", 2048)
        let a = [Float](repeating: 0.5, count: n * n), b = a
        var c = a
        var best = Double.infinity
        for _ in 0..<5 {
            let t0 = Clock.seconds()
            a.withUnsafeBufferPointer { ap in b.withUnsafeBufferPointer { bp in c.withUnsafeMutableBufferPointer { cp in
                Gemm.gemm(cp.baseAddress!, ap.baseAddress!, bp.baseAddress!, m: n, n: n, k: n)
            } } }
            best = min(best, Clock.seconds() - t0)
        }
        print(JSON.serialize(.object([("n", .int(n)), ("gflops", .double(2 * Double(n * n * n) / best / 1e9))]), pretty: true))
    case "bf16gemm":
        // Our bf16 GEMM (AVX512-BF16) on square products, best of 5: the multiply alone, and with A's
        // conversion and B's packing counted.
        guard BF16Gemm.isSupported else { fail("this CPU has no AVX512-BF16") }
        let n = option("--n", 2048)
        let a = [Float](repeating: 0.5, count: n * n), b = a
        var c = a
        var ab = [UInt16](repeating: 0, count: n * n), packed = [UInt32](repeating: 0, count: BF16Gemm.packedWords(k: n, n: n))
        var bestMultiply = Double.infinity, bestAll = Double.infinity
        for _ in 0..<5 {
            let t0 = Clock.seconds()
            a.withUnsafeBufferPointer { ap in ab.withUnsafeMutableBufferPointer { BF16Gemm.convert(ap.baseAddress!, rows: n, cols: n, ld: n, into: $0.baseAddress!, ldd: n) } }
            b.withUnsafeBufferPointer { bp in packed.withUnsafeMutableBufferPointer { BF16Gemm.packB(bp.baseAddress!, ldb: n, transposed: true, k: n, n: n, into: $0.baseAddress!) } }
            let t1 = Clock.seconds()
            ab.withUnsafeBufferPointer { ap in packed.withUnsafeBufferPointer { pp in c.withUnsafeMutableBufferPointer {
                BF16Gemm.gemm($0.baseAddress!, ldc: n, ap.baseAddress!, lda: n, pp.baseAddress!, m: n, n: n, k: n, accumulate: false)
            } } }
            let t2 = Clock.seconds()
            bestMultiply = min(bestMultiply, t2 - t1)
            bestAll = min(bestAll, t2 - t0)
        }
        let flops = 2 * Double(n * n * n)
        print(JSON.serialize(.object([("n", .int(n)), ("gflops", .double(flops / bestMultiply / 1e9)),
                                      ("gflops_with_packing", .double(flops / bestAll / 1e9))]), pretty: true))
    case "plan":
        // The examples and the batch order `qlora train` trains on with the same flags (the model's chat
        // template, --val-split, grouping by length, --seed), as JSON, so that a reference script
        // (bench/nf4_vs_f32_ref.py) trains on exactly the same batches.
        guard args.count >= 3 else { fail("usage: qlora-bench plan MODEL DATA [--max-seq-len N --val-split F --batch N --grad-accum N --steps N --seed N]") }
        var valSplit = 0.05
        if let i = args.firstIndex(of: "--val-split"), i + 1 < args.count {
            guard let v = Double(args[i + 1]), v >= 0, v < 1 else { fail("--val-split must be in [0, 1)") }
            valSplit = v
        }
        // The tokenizer and chat template only: the batch order needs no model weights.
        let tokenizer = try Tokenizer.load(model: try ModelLocator.resolve(args[1]))
        guard let source = tokenizer.chatTemplate else { fail("\(args[1]) has no chat template") }
        let encoder = try ExampleEncoder(tokenizer: tokenizer, template: .chat(try ChatTemplate(source)), maxLength: option("--max-seq-len", 512),
                                         trainOnInputs: false, sourceMaxLength: nil, targetMaxLength: nil)
        var tc = TrainerConfig()
        tc.batchSize = option("--batch", 4)
        tc.gradientAccumulation = option("--grad-accum", 1)
        tc.seed = UInt64(option("--seed", 0))
        let data = try TrainingData(path: args[2], encoder: encoder, validationFraction: valSplit, seed: tc.seed)
        let train = data.train, validation = data.validation
        let steps = option("--steps", 200)
        let order = BatchOrder(lengths: train.map(\.tokens.count), config: tc)
        func examples(_ list: [EncodedExample]) -> JSONValue {
            .array(list.map { .object([("tokens", .array($0.tokens.map { .int($0) })), ("labels", .array($0.labels.map { .int($0) }))]) })
        }
        print(JSON.serialize(.object([
            ("pad_token", .int(tokenizer.eosTokenID ?? 0)), ("train", examples(train)), ("validation", examples(validation)),
            ("steps", .array((0..<steps).map { s in .array(order.microBatches(ofStep: s).map { .array($0.map { .int($0) }) }) })),
        ])))
    case "memory":
        guard args.count >= 2 else { fail("usage: qlora-bench memory 7b|13b|33b|65b [--batch N --seq N --rank N --layers N --optim KIND]") }
        let optimName = args.firstIndex(of: "--optim").flatMap { $0 + 1 < args.count ? args[$0 + 1] : nil } ?? "paged_adamw_32bit"
        guard let optim = OptimizerKind(rawValue: optimName) else { fail("unknown --optim \(optimName)") }
        try memoryBench(shape: args[1], batch: option("--batch", 1), seq: option("--seq", 512), rank: option("--rank", 64), optim: optim,
                        layersOverride: args.contains("--layers") ? option("--layers", 1) : nil, f32Embeddings: args.contains("--f32-embeddings"))
    default:
        fail("usage: qlora-bench quant FILE | synth-llama DIR | load MODEL | train-step MODEL | infer MODEL | batched MODEL | serve-load --url URL | sgemm | bf16gemm | bandwidth | plan MODEL DATA | memory SHAPE")
    }
} catch {
    fail("\(error)")
}
