// qlora-bench: the Swift side of bench/ (see bench/run.sh). It times our kernels on the same tensor
// files the Python side times bitsandbytes on, and prints one JSON object.
//   qlora-bench quant FILE [--repeats N]   4-bit quantize / dequantize throughput (GB/s of f32)
import QLoRA

#if canImport(Glibc)
import Glibc
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
    getrusage(Int32(RUSAGE_SELF.rawValue), &usage)
    return Int(usage.ru_maxrss) * 1024
}

/// Writes a Llama-shaped Hugging Face folder with random bf16 weights (normal, std 0.02), streamed
/// tensor by tensor, for memory measurements on shapes we cannot download.
func synthesize(output: String, hidden: Int, intermediate: Int, layers: Int, heads: Int, kvHeads: Int, vocab: Int) throws {
    try FileSystem.makeDirectory(output)
    let config = """
        {"architectures": ["LlamaForCausalLM"], "hidden_size": \(hidden), "intermediate_size": \(intermediate),
         "num_hidden_layers": \(layers), "num_attention_heads": \(heads), "num_key_value_heads": \(kvHeads),
         "vocab_size": \(vocab), "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": 2048,
         "tie_word_embeddings": false, "hidden_act": "silu", "dtype": "bfloat16"}
        """
    try FileSystem.writeFileAtomically(FileSystem.join(output, "config.json"), bytes: Array(config.utf8))
    let d = hidden / heads
    var shapes: [(String, [Int])] = [("model.embed_tokens.weight", [vocab, hidden])]
    for l in 0..<layers {
        let p = "model.layers.\(l)."
        shapes += [(p + "input_layernorm.weight", [hidden]), (p + "self_attn.q_proj.weight", [heads * d, hidden]),
                   (p + "self_attn.k_proj.weight", [kvHeads * d, hidden]), (p + "self_attn.v_proj.weight", [kvHeads * d, hidden]),
                   (p + "self_attn.o_proj.weight", [hidden, heads * d]), (p + "post_attention_layernorm.weight", [hidden]),
                   (p + "mlp.gate_proj.weight", [intermediate, hidden]), (p + "mlp.up_proj.weight", [intermediate, hidden]),
                   (p + "mlp.down_proj.weight", [hidden, intermediate])]
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
            values[i] = floatToBFloat16Bits(isNorm ? 1 : u)
        }
        try writer.append(name, values: values)
    }
    try writer.finish()
}

let args = Array(CommandLine.arguments.dropFirst())
func option(_ name: String, _ def: Int) -> Int {
    if let i = args.firstIndex(of: name), i + 1 < args.count, let n = Int(args[i + 1]) { return n }
    return def
}
do {
    switch args.first {
    case "quant":
        guard args.count >= 2 else { fail("usage: qlora-bench quant FILE [--repeats N]") }
        try quantBench(file: args[1], repeats: option("--repeats", 3))
    case "synth-llama":
        guard args.count >= 2 else { fail("usage: qlora-bench synth-llama DIR [--hidden N --intermediate N --layers N --heads N --kv-heads N --vocab N]") }
        try synthesize(output: args[1], hidden: option("--hidden", 2048), intermediate: option("--intermediate", 5632),
                       layers: option("--layers", 22), heads: option("--heads", 32), kvHeads: option("--kv-heads", 4),
                       vocab: option("--vocab", 32000))
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
        guard args.count >= 2 else { fail("usage: qlora-bench train-step MODEL [--batch N --seq N --rank N --steps N --no-checkpointing]") }
        var o = LoadOptions()
        o.showProgress = false
        let model = try LlamaModel.load(args[1], options: o)
        var c = LoRAConfig()
        c.rank = option("--rank", 16)
        c.alpha = Float(2 * c.rank)
        c.dropout = 0.05
        let lora = LoRAWeights(model: model, config: c)
        var to = TrainingOptions()
        to.gradientCheckpointing = !args.contains("--no-checkpointing")
        let engine = TrainingEngine(model: model, lora: lora, options: to)
        let B = option("--batch", 4), T = option("--seq", 512), steps = option("--steps", 3)
        var rng = SeededGenerator(seed: 1)
        let tokens = (0..<(B * T)).map { _ in Int(rng.next() % UInt64(model.config.vocabSize)) }
        let batch = TrainingBatch(tokens: tokens, labels: tokens, batchSize: B, sequenceLength: T)
        var times: [Double] = []
        for _ in 0..<steps {
            let t0 = Clock.seconds()
            lora.zeroGradients()
            try engine.step(batch)
            times.append(Clock.seconds() - t0)
        }
        let best = times.min()!
        print(JSON.serialize(.object([
            ("model", .string(args[1])), ("batch", .int(B)), ("seq", .int(T)), ("rank", .int(c.rank)),
            ("trainable_parameters", .int(lora.parameterCount)), ("step_seconds", .array(times.map { .double($0) })),
            ("tokens_per_second", .double(Double(B * T) / best)), ("peak_rss_bytes", .int(peakRSS())),
        ]), pretty: true))
    default:
        fail("usage: qlora-bench quant FILE | synth-llama DIR | load MODEL | train-step MODEL")
    }
} catch {
    fail("\(error)")
}
