// CI replays every committed fuzz corpus (fuzz/corpus/TARGET, what make fuzz has kept) through its target in
// the ordinary build: seconds, not a campaign, so that an input that once crashed a parser stays fixed.
import QLoRA
import QLoRATestSupport
import Testing

@Suite("fuzz corpora")
struct FuzzReplayTests {
    @Test("every committed corpus replays through its target without a crash or a broken property",
          arguments: ["json", "safetensors", "gguf", "tokenizer", "encode", "template", "config", "yaml", "dataset", "mmlu", "judging", "request"])
    func replay(target: String) throws {
        let fuzz = FileSystem.join(FileSystem.directoryName(CommandLine.arguments[0]), "qlora-fuzz")
        try #require(FileSystem.exists(fuzz), "qlora-fuzz is built beside the tests (swift build --build-tests)")
        let root = FileSystem.directoryName(FileSystem.directoryName(FileSystem.directoryName("\(#filePath)")))
        let corpus = FileSystem.join(root, "fuzz/corpus/\(target)")
        try #require(FileSystem.isDirectory(corpus), "no corpus for \(target)")
        // The tokenizer the encoding, dataset and request targets run against: the default model's.
        let scratch = try Fixtures.temporaryDirectory("fuzz-\(target)")
        let tokenizers = FileSystem.join(scratch, "tokenizers")
        try FileSystem.makeDirectories(tokenizers)
        try FileSystem.writeFileAtomically(FileSystem.join(tokenizers, "smollm2.tokenizer.json"),
                                           bytes: try FileSystem.readFile(FileSystem.join(root, "Tests/QLoRATokenizerTests/Resources/smollm2-tokenizer.json")))
        let r = try runProgram(fuzz, ["replay", target, corpus], environment: ["QLORA_FUZZ_TOKENIZERS": tokenizers, "TMPDIR": scratch])
        let inputs = try FileSystem.listDirectory(corpus).count
        #expect(r.status == 0, "\(target): the last input named is the one that failed\n\(String(r.stderr.suffix(3000)))")
        #expect(r.stdout.contains("replayed \(inputs) inputs through \(target)"), "\(r.stdout)")
    }
}
