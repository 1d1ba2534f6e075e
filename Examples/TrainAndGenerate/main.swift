// swift-qlora as a library: load the default model in 4-bit NF4, train a LoRA adapter for a few steps on
// the demo's conversations, save it as a PEFT adapter, and chat with the result.
//   swift run -c release train-and-generate [MODEL.gguf] [DATA.jsonl] [OUTPUT_DIR]
import QLoRA
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

let arguments = CommandLine.arguments.dropFirst().map { $0 }
let cache = Environment.get("QLORA_CACHE") ?? FileSystem.join(Environment.get("HOME") ?? ".", ".cache/swift-qlora")
let modelPath = arguments.first ?? FileSystem.join(cache, "models/SmolLM2-135M-Instruct.Q4_1.gguf")
let dataPath = arguments.count > 1 ? arguments[1] : "demo/quill.jsonl"
let output = arguments.count > 2 ? arguments[2] : FileSystem.join(cache, "example-adapter")

do {
    // The frozen base in NF4 with double quantization, and its tokenizer and chat template.
    var load = LoadOptions()
    load.quantType = .nf4
    let model = try LlamaModel.load(modelPath, options: load)
    let tokenizer = try Tokenizer.load(model: modelPath)
    let template = try ChatTemplate(tokenizer.chatTemplate!)

    // The data through the chat template, trained on the replies only.
    let encoder = try ExampleEncoder(tokenizer: tokenizer, template: .chat(template), maxLength: 256)
    let data = try TrainingData(path: dataPath, encoder: encoder, validationPath: nil, validationFraction: 0.05, seed: 0)

    // LoRA on every projection (the paper's r 64, alpha 16), four steps of 4 sequences.
    let lora = LoRAWeights(model: model, config: LoRAConfig())
    var config = TrainerConfig()
    config.batchSize = 4
    config.gradientAccumulation = 1
    config.maxSteps = 4
    let trainer = try Trainer(engine: TrainingEngine(model: model, lora: lora), config: config, train: data.train,
                              validation: data.validation, padToken: tokenizer.eosTokenID ?? 0)
    let run = TrainingRun(trainer: trainer, output: output, baseModel: modelPath)
    let result = try run.run(resumingFrom: try TrainingRun.prepare(output: output, resume: true)) { event in
        if case let .step(m) = event { print("step \(m.step): loss \(Chart.fixed(m.loss, 4)), \(Int(m.tokensPerSecond)) tokens/s") }
    }
    print("adapter saved in \(output) after \(result.steps) steps")

    // Chat with the base and the new adapter.
    let adapted = try model.withAdapter(output)
    let chat = ChatSession(generator: Generator(model: adapted, tokenizer: tokenizer, contextLength: 1024), template: template)
    var options = GenerationOptions()
    options.maxTokens = 48
    options.sampling.temperature = 0
    let turn = try chat.send("Write one sentence about quills.", options: options)
    print("reply: \(turn.result.text)")
} catch {
    print("error: \(error)")
    exit(1)
}
