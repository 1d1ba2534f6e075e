import ArgumentParser
import QLoRA

struct Perplexity: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Measure a model's perplexity on a text file.",
        discussion: "The text is tokenized once (with the tokenizer's special tokens) and scored in windows of --context tokens that advance by --stride; each token is scored once, with up to --context tokens before it, as in the Hugging Face perplexity guide. Prints the mean negative log-likelihood (nats per token) and the perplexity."
    )

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var inference: InferenceOptions

    @Option(help: "A UTF-8 text file.")
    var textFile: String

    @Option(help: "Tokens per window.")
    var context: Int = 512

    @Option(help: "Tokens the window advances by (default: the context, i.e. no overlap).")
    var stride: Int?

    @Option(help: "Score at most this many tokens of the file (0: all).")
    var maxTokens: Int = 0

    @Flag(help: "Print one JSON object on stdout.")
    var json = false

    func validate() throws {
        guard context >= 2 else { throw ValidationError("--context must be at least 2") }
        if let stride { guard stride >= 1 && stride <= context else { throw ValidationError("--stride must be in 1...context") } }
    }

    func run() throws {
        let (model, tokenizer) = try modelOptions.load(progress: !json)
        inference.apply(to: model)
        let text = String(decoding: try FileSystem.readFile(textFile), as: UTF8.self)
        var ids = tokenizer.encode(text, addSpecialTokens: true)
        if maxTokens > 0 && ids.count > maxTokens + 1 { ids = Array(ids.prefix(maxTokens + 1)) }
        guard ids.count >= 2 else { throw ValidationError("\(textFile): fewer than 2 tokens") }
        let window = min(context, model.config.maxPositions)
        let step = stride ?? window
        let result = try PerplexityEvaluator.evaluate(model: model, tokens: ids, context: window, stride: step, showProgress: !json)
        if json {
            printJSON(.object([
                ("file", .string(textFile)), ("tokens", .int(result.scoredTokens)), ("context", .int(window)), ("stride", .int(step)),
                ("mean_nll", .double(result.meanNLL)), ("perplexity", .double(result.perplexity)), ("seconds", .double(result.seconds)),
            ]))
            return
        }
        print("\(FileSystem.baseName(textFile)): \(result.scoredTokens) tokens, context \(window), stride \(step)")
        print("mean NLL \(formatFixed(result.meanNLL, 4)) nats/token, perplexity \(formatFixed(result.perplexity, 3)) (\(formatFixed(result.seconds, 1)) s, \(formatFixed(Double(result.scoredTokens) / max(result.seconds, 1e-9), 1)) tokens/s)")
    }
}
