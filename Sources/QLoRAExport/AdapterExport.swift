// A PEFT LoRA adapter as the GGUF file llama.cpp's `--lora` loads: general.type "adapter", adapter.type "lora",
// adapter.lora.alpha, and per adapted projection BLK.lora_a [r, in] and BLK.lora_b [out, r] under the base
// tensor's GGUF name (blk.N.attn_q.weight.lora_a, ...; Phi-3's fused attn_qkv and ffn_up), under the base's
// architecture. For llama, llama.cpp stores Q and K rows in its rotary order, so the rows of their B are permuted
// as the base weights' are (A is untouched: the permutation is of the output
// rows). llama.cpp scales B·A by alpha / r; for rsLoRA (alpha / sqrt r) the alpha written is alpha·sqrt(r).
import QLoRACore
import QLoRAFormats
import QLoRAModel

public enum AdapterExport {
    public struct Report: Sendable {
        public var tensors = 0
        public var bytes = 0
        public var alpha = 0.0
    }

    /// Writes `adapter` (a PEFT folder) for the base model `model` as a llama.cpp LoRA GGUF at `output`.
    public static func writeGGUF(adapter folder: String, model: String, to output: String, type: GGMLType = .f32, force: Bool = false) throws -> Report {
        if FileSystem.exists(output), !force { throw ExportError.outputExists(path: output) }
        guard type == .f32 || type == .f16 || type == .bf16 else {
            throw ExportError.unsupported(what: "a LoRA GGUF holds F32, F16 or BF16 tensors (llama.cpp needs them unquantized), not \(type)")
        }
        // The merger checks the adapter against the base: every module a projection, every shape right.
        let merger = try ModelMerger(model: model, adapter: folder)
        guard let adapter = merger.adapter else { throw ExportError.unsupported(what: "no adapter") }
        guard !adapter.config.useDoRA else {
            throw ExportError.unsupported(what: "a DoRA adapter (use_dora) in a llama.cpp LoRA GGUF: llama.cpp's LoRA has no magnitude vector; merge it with `qlora merge` and export the merged model instead")
        }
        let c = merger.config
        let rank = adapter.config.rank
        let alpha = Double(adapter.config.scale) * Double(rank)
        var declarations: [GGUFWriter.Declaration] = []
        var payload: [(String, [Float])] = []
        let byModule = Dictionary(uniqueKeysWithValues: adapter.modules.map { ($0.module + ".weight", $0) })
        for item in merger.items where item.adapted {
            guard let m = byModule[item.name], let base = ModelMerger.ggufName(item.name, family: c.family) else { continue }
            var b = m.b.floats()
            // Only llama.cpp's llama architecture stores Q and K rows in its rotary order.
            if case let .projection(_, module) = item.part, c.family.ggufArchitecture == "llama" {
                if module == "self_attn.q_proj" { b = ModelMerger.permute(b, heads: c.headCount, cols: rank) }
                if module == "self_attn.k_proj" { b = ModelMerger.permute(b, heads: c.kvHeadCount, cols: rank) }
            }
            declarations.append(.init(name: base + ".lora_a", shape: m.a.shape, type: type))
            declarations.append(.init(name: base + ".lora_b", shape: m.b.shape, type: type))
            payload.append((base + ".lora_a", m.a.floats()))
            payload.append((base + ".lora_b", b))
        }
        let metadata: [(String, GGUFTypedValue)] = [
            ("general.architecture", .string(c.family.ggufArchitecture)), ("general.type", .string("adapter")),
            ("general.name", .string(FileSystem.baseName(folder))),
            ("adapter.type", .string("lora")), ("adapter.lora.alpha", .float32(alpha)),
        ]
        let writer = try GGUFWriter(path: output, metadata: metadata, tensors: declarations)
        var report = Report()
        report.alpha = alpha
        for (name, values) in payload {
            let bytes = try GGMLQuantizer.quantize(values, as: type, tensor: name)
            try writer.append(name, bytes: bytes)
            report.tensors += 1
            report.bytes += bytes.count
        }
        try writer.finish()
        return report
    }
}
