// Writing LoRA weights as a PEFT adapter folder that peft.PeftModel.from_pretrained loads:
// adapter_config.json and adapter_model.safetensors (keys base_model.model.model.layers.N.<module>.lora_A.weight, and
// with DoRA <module>.lora_magnitude_vector).
import QLoRACore
import QLoRAFormats

extension LoRAWeights {
    /// Writes `folder`/adapter_config.json and adapter_model.safetensors atomically.
    public func writePEFTAdapter(to folder: String, baseModel: String) throws {
        try FileSystem.makeDirectory(folder)
        let targets = Array(Set(slots.map(\.projection.name))).sorted()
        let config: JSONValue = .object([
            ("alpha_pattern", .object([])),
            ("auto_mapping", .null),
            ("base_model_name_or_path", .string(baseModel)),
            ("bias", .string("none")),
            ("fan_in_fan_out", .bool(false)),
            ("inference_mode", .bool(true)),
            ("init_lora_weights", .bool(true)),
            ("layers_pattern", .null),
            ("layers_to_transform", .null),
            ("lora_alpha", .double(Double(self.config.alpha))),
            ("lora_dropout", .double(Double(self.config.dropout))),
            ("modules_to_save", .null),
            ("peft_type", .string("LORA")),
            ("r", .int(self.config.rank)),
            ("rank_pattern", .object([])),
            ("revision", .null),
            ("target_modules", .array(targets.map { .string($0) })),
            ("task_type", .string("CAUSAL_LM")),
            ("use_dora", .bool(self.config.useDoRA)),
            ("use_rslora", .bool(self.config.useRSLoRA)),
        ])
        var tensors: [(String, TensorView)] = []
        let r = self.config.rank
        for s in slots {
            let (a, b) = Self.peftNames(s)
            tensors.append((a, .make(Array(parameters[s.aOffset..<(s.aOffset + r * s.inFeatures)]), dtype: .f32, shape: [r, s.inFeatures])))
            tensors.append((b, .make(Array(parameters[s.bOffset..<(s.bOffset + s.outFeatures * r)]), dtype: .f32, shape: [s.outFeatures, r])))
            if let m = s.magnitudeOffset {
                tensors.append((Self.peftMagnitudeName(s), .make(Array(parameters[m..<(m + s.outFeatures)]), dtype: .f32, shape: [s.outFeatures])))
            }
        }
        try SafetensorsWriter.write(path: FileSystem.join(folder, "adapter_model.safetensors"), tensors: tensors, metadata: [("format", "pt")])
        try FileSystem.writeFileAtomically(FileSystem.join(folder, "adapter_config.json"), bytes: Array((JSON.serialize(config, pretty: true) + "\n").utf8))
    }
}
