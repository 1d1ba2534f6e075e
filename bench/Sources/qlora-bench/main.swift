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

let args = Array(CommandLine.arguments.dropFirst())
guard args.count >= 2, args[0] == "quant" else { fail("usage: qlora-bench quant FILE [--repeats N]") }
var repeats = 3
if let i = args.firstIndex(of: "--repeats"), i + 1 < args.count, let n = Int(args[i + 1]) { repeats = n }
do {
    try quantBench(file: args[1], repeats: repeats)
} catch {
    fail("\(error)")
}
