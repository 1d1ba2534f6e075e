import ArgumentParser
import QLoRA

struct Inspect: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "List the tensors of a checkpoint, with quantization settings and bits per parameter.",
        discussion: """
            PATH is a .safetensors file, a model folder (single or sharded safetensors) or a .gguf file. Quantized weights stored in \
            bitsandbytes' layout are shown as one tensor with their type, block size, double quantization and bits per \
            parameter. --system prints the machine and the kernels in use instead.
            """
    )

    @Argument(help: "A .safetensors file, a model folder or a .gguf file.")
    var path: String?

    @Flag(help: "Show the CPU features, the kernel set in use and the thread count.")
    var system = false

    @Flag(help: "Print one JSON object on stdout.")
    var json = false

    func validate() throws {
        if !system && path == nil { throw ValidationError("give a PATH to inspect, or --system") }
    }

    func run() throws {
        if system { return printSystem() }
        let source = try openTensorSource(path!)
        var rows: [JSONValue] = []
        var lines: [[String]] = []
        var claimed = Set<String>()
        var totalBytes = 0
        var parameters = 0
        var quantizedParameters = 0
        var quantizedBytes = 0
        // Quantized weights first claim their companion tensors.
        var quantized: [String: (Quantized4Bit, BnBQuantState, Int)] = [:]
        if let tensors = source as? TensorCollection {
            for name in tensors.names where BnB4bit.quantStateName(for: name, in: tensors) != nil {
                let (q, state) = try BnB4bit.load(name, from: tensors)
                let parts = BnB4bit.tensorNames(for: name, state: state)
                let bytes = parts.reduce(0) { $0 + (tensors.entry($1)?.byteCount ?? 0) }
                parts.forEach { claimed.insert($0) }
                quantized[name] = (q, state, bytes)
            }
        }
        for name in source.tensorNames.sorted(by: naturalOrder) {
            if let (q, state, bytes) = quantized[name] {
                let n = q.elementCount
                let bits = Double(bytes * 8) / Double(n)
                parameters += n
                quantizedParameters += n
                quantizedBytes += bytes
                totalBytes += bytes
                rows.append(.object([
                    ("name", .string(name)), ("dtype", .string(q.quantType.rawValue.uppercased())),
                    ("shape", .array(q.shape.map { .int($0) })), ("bytes", .int(bytes)),
                    ("quant_type", .string(q.quantType.rawValue)), ("block_size", .int(q.blockSize)),
                    ("double_quant", .bool(q.isDoubleQuantized)), ("original_dtype", .string(state.dtype)),
                    ("bits_per_parameter", .double(bits)),
                ]))
                lines.append([name, "\(q.quantType.rawValue.uppercased())\(q.isDoubleQuantized ? "+DQ" : "") b\(q.blockSize)",
                              "\(q.shape)", formatBytes(bytes), formatFixed(bits, 3)])
                continue
            }
            if claimed.contains(name) { continue }
            let e = source.info(name)!
            parameters += e.elementCount
            totalBytes += e.byteCount
            let bits = e.elementCount > 0 ? Double(e.byteCount * 8) / Double(e.elementCount) : 0
            rows.append(.object([
                ("name", .string(name)), ("dtype", .string(e.storage)), ("shape", .array(e.shape.map { .int($0) })),
                ("bytes", .int(e.byteCount)), ("bits_per_parameter", .double(bits)),
            ]))
            lines.append([name, e.storage, "\(e.shape)", formatBytes(e.byteCount), formatFixed(bits, 3)])
        }
        let overallBits = parameters > 0 ? Double(totalBytes * 8) / Double(parameters) : 0
        let quantBits = quantizedParameters > 0 ? Double(quantizedBytes * 8) / Double(quantizedParameters) : 0
        if json {
            var summary: [(String, JSONValue)] = [
                ("path", .string(path!)), ("files", .array(source.filePaths.map { .string($0) })),
                ("tensors", .array(rows)), ("parameters", .int(parameters)), ("bytes", .int(totalBytes)),
                ("bits_per_parameter", .double(overallBits)),
                ("quantized_parameters", .int(quantizedParameters)),
            ]
            if quantizedParameters > 0 { summary.append(("quantized_bits_per_parameter", .double(quantBits))) }
            printJSON(.object(summary))
            return
        }
        printTable(header: ["tensor", "type", "shape", "bytes", "bits/param"], rows: lines)
        print("")
        if let gguf = source as? GGUFFile {
            let arch = gguf.value("general.architecture")?.stringValue ?? "?"
            let name = gguf.value("general.name")?.stringValue ?? FileSystem.baseName(gguf.path)
            print("GGUF v\(gguf.version): \(name), architecture \(arch), \(gguf.metadata.count) metadata keys")
        }
        print("\(source.tensorNames.count - claimed.count + quantized.count) tensors in \(source.filePaths.count) file(s), \(parameters) parameters, \(formatBytes(totalBytes)), \(formatFixed(overallBits, 3)) bits/parameter")
        if quantizedParameters > 0 {
            print("quantized: \(quantized.count) tensors, \(quantizedParameters) parameters at \(formatFixed(quantBits, 3)) bits/parameter")
        }
    }

    func printSystem() {
        let current = KernelTable.current
        let levels = KernelLevel.allCases.map { ($0.description, $0.isSupported) }
        if json {
            printJSON(.object([
                ("version", .string(QLoRAVersion.string)),
                ("kernels", .string(current.level.description)),
                ("supported_kernels", .array(levels.filter { $0.1 }.map { .string($0.0) })),
                ("threads", .int(Parallel.threadCount)),
                ("blas", .string(BLASInfo.description)),
                ("bf16_gemm", .bool(BF16Gemm.isSupported)),
            ]))
            return
        }
        print("swift-qlora \(QLoRAVersion.string)")
        print("kernels:   \(current.level) (supported: \(levels.filter { $0.1 }.map { $0.0 }.joined(separator: ", ")); force with \(KernelTable.environmentVariable))")
        print("threads:   \(Parallel.threadCount) (QLORA_THREADS)")
        print("blas:      \(BLASInfo.description)")
        print("bf16 gemm: \(BF16Gemm.isSupported ? "AVX512-BF16 (training computes in bf16 by default)" : "not available on this CPU (training computes in f32)")")
    }
}

/// Orders names with embedded numbers numerically ("layers.2" before "layers.10").
func naturalOrder(_ a: String, _ b: String) -> Bool {
    func parts(_ s: String) -> [(String, Int?)] {
        var out: [(String, Int?)] = []
        var current = ""
        var digits = false
        for c in s {
            if c.isASCII && c.isNumber != digits && !current.isEmpty {
                out.append((current, digits ? Int(current) : nil))
                current = ""
            }
            digits = c.isASCII && c.isNumber
            current.append(c)
        }
        if !current.isEmpty { out.append((current, digits ? Int(current) : nil)) }
        return out
    }
    let pa = parts(a), pb = parts(b)
    for (x, y) in zip(pa, pb) where x.0 != y.0 {
        if let nx = x.1, let ny = y.1 { return nx < ny }
        return x.0 < y.0
    }
    return pa.count < pb.count
}

func printTable(header: [String], rows: [[String]]) {
    var widths = header.map(\.count)
    for r in rows { for (i, c) in r.enumerated() { widths[i] = max(widths[i], c.count) } }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { i, c in
            i == cells.count - 1 ? String(repeating: " ", count: widths[i] - c.count) + c : c + String(repeating: " ", count: widths[i] - c.count)
        }.joined(separator: "  ")
    }
    print(line(header))
    for r in rows { print(line(r)) }
}
