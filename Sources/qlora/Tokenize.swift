import ArgumentParser
import QLoRA

struct Tokenize: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show the token ids (and tokens) of a text with a model's tokenizer.",
        discussion: "MODEL is a model folder with tokenizer.json, a tokenizer.json file, or a .gguf file."
    )

    @Option(name: .shortAndLong, help: "The model (folder, tokenizer.json or .gguf) whose tokenizer to use.")
    var model: String

    @Argument(help: "The text to tokenize (read from standard input when omitted).")
    var text: String?

    @Flag(help: "Add the tokenizer's special tokens (e.g. a leading BOS) as the post-processor does.")
    var addSpecialTokens = false

    @Flag(help: "Print one JSON object with ids, tokens and the decoded text.")
    var json = false

    func run() throws {
        let tokenizer = try Tokenizer.load(model: try ModelLocator.resolve(model))
        let input = text ?? readAllStandardInput()
        let ids = tokenizer.encode(input, addSpecialTokens: addSpecialTokens)
        let tokens = ids.map { tokenizer.token(of: $0) ?? "?" }
        if json {
            printJSON(.object([
                ("ids", .array(ids.map { .int($0) })),
                ("tokens", .array(tokens.map { .string($0) })),
                ("count", .int(ids.count)),
                ("decoded", .string(tokenizer.decode(ids))),
            ]))
            return
        }
        for (id, token) in zip(ids, tokens) { print("\(id)\t\(JSON.serialize(.string(token)))") }
        print("\(ids.count) tokens")
    }
}

func readAllStandardInput() -> String {
    var lines: [String] = []
    while let line = readLine(strippingNewline: false) { lines.append(line) }
    return lines.joined()
}
