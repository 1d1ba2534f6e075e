import ArgumentParser
import QLoRA

struct Quantize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Quantize a model or tensor file to a bitsandbytes 4-bit checkpoint.",
        discussion: """
            INPUT is a Hugging Face model folder (config.json + model.safetensors or shards) or a .safetensors file. \
            For a model folder, exactly the tensors bitsandbytes would quantize are quantized (linear-layer weights; not \
            embeddings, norms or lm_head), everything else is copied, and config.json gets a quantization_config, so \
            transformers loads the result as it loads its own 4-bit checkpoints. For a bare tensor file, every 2-D \
            floating-point tensor is quantized, or those matching --include.
            """
    )

    @Argument(help: "A Hugging Face model folder or a .safetensors file.")
    var input: String

    @Option(name: .shortAndLong, help: "Output folder (created if missing); model.safetensors is written there.")
    var output: String

    @Option(help: "4-bit data type: nf4 (QLoRA's NormalFloat), fp4 (bitsandbytes' float), int4 (symmetric; ours, for ablations).")
    var quantType: String = "nf4"

    @Option(help: "Elements per quantization block: a power of two from 32 to 4096.")
    var blockSize: Int = 64

    @Flag(help: "Store each block's absmax as f32 instead of double-quantizing it (4.5 instead of ~4.127 bits/parameter).")
    var noDoubleQuant = false

    @Option(help: "For a bare tensor file: quantize only tensors whose name matches this regular expression.")
    var include: String?

    @Flag(help: "Overwrite an existing model.safetensors in the output folder.")
    var force = false

    @Flag(help: "Print one JSON object with the results on stdout.")
    var json = false

    @Flag(name: .shortAndLong, help: "No progress bar.")
    var quiet = false

    func validate() throws {
        try validateQuantization(quantType: quantType, blockSize: blockSize, allowNone: false)
    }

    func run() throws {
        let target = FileSystem.join(output, "model.safetensors")
        if FileSystem.exists(target) && !force {
            throw ValidationError("\(target) already exists; pass --force to overwrite it")
        }
        var options = QuantizeOptions()
        options.quantType = QuantType(rawValue: quantType)!
        options.blockSize = blockSize
        options.doubleQuant = !noDoubleQuant
        options.include = include
        options.showProgress = !quiet && !json
        let report = try CheckpointQuantizer.quantize(input: input, output: output, options: options)
        if json {
            printJSON(.object([
                ("output", .string(report.output)),
                ("quant_type", .string(quantType)),
                ("block_size", .int(blockSize)),
                ("double_quant", .bool(!noDoubleQuant)),
                ("quantized_tensors", .int(report.quantized.count)),
                ("copied_tensors", .int(report.copied.count)),
                ("quantized_parameters", .int(report.quantizedParameters)),
                ("bits_per_parameter", .double(report.bitsPerParameter)),
                ("relative_rmse", .double(report.relativeRMSE)),
                ("input_bytes", .int(report.inputBytes)),
                ("output_bytes", .int(report.outputBytes)),
                ("seconds", .double(report.seconds)),
            ]))
            return
        }
        print("Wrote \(FileSystem.join(report.output, "model.safetensors"))")
        print("  quantized \(report.quantized.count) tensors (\(report.quantizedParameters) parameters) to \(quantType), block \(blockSize), double quantization \(noDoubleQuant ? "off" : "on")")
        print("  kept \(report.copied.count) other tensors unquantized")
        print("  bits per parameter: \(formatFixed(report.bitsPerParameter, 3))")
        print("  relative RMS reconstruction error: \(formatFixed(report.relativeRMSE * 100, 2))%")
        print("  size: \(formatBytes(report.inputBytes)) -> \(formatBytes(report.outputBytes)) in \(formatFixed(report.seconds, 2)) s")
    }
}
