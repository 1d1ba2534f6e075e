// libFuzzer targets over every reader of files that come from strangers: model files, tokenizers, chat
// templates, configs, datasets, evaluation files and the server's request bodies. One binary, built by
// `make fuzz` with `--sanitize=fuzzer --sanitize=address -Xswiftc -DQLORA_FUZZ`; QLORA_FUZZ_TARGET names
// the target, the rest of the command line is libFuzzer's. A target fails on a crash (a Swift trap: bounds,
// overflow, force unwrap), a sanitizer report, a hang (-timeout), an allocation past -malloc_limit_mb, or
// a broken property checked below; a typed error thrown for bad input is the expected outcome.
import QLoRACore
import QLoRAConfig
import QLoRAEvaluation
import QLoRAFormats
import QLoRAModel
import QLoRAServer
import QLoRATokenizer
import QLoRATraining

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

enum FuzzTarget: String, CaseIterable {
    case json, safetensors, gguf, tokenizer, encode, template, config, yaml, dataset, mmlu, judging, request
}

/// What every target shares: the target picked, a scratch file for the readers that take paths, and the
/// real tokenizers that the encoding, dataset and request targets run against.
final class Harness {
    let target: FuzzTarget
    let scratch: String
    private var loaded: [Tokenizer]?
    private var templateCache: ChatTemplate??

    init(target name: String? = getenv("QLORA_FUZZ_TARGET").map({ String(cString: $0) })) {
        guard let name, let t = FuzzTarget(rawValue: name) else {
            let names = FuzzTarget.allCases.map(\.rawValue).joined(separator: ", ")
            fputs("qlora-fuzz: set QLORA_FUZZ_TARGET to one of: \(names)\n", stderr)
            exit(2)
        }
        target = t
        let dir = getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp"
        scratch = "\(dir)/qlora-fuzz-\(getpid())-\(t.rawValue)"
    }

    /// The byte-level BPE tokenizer of the default model (SmolLM2), then any others in QLORA_FUZZ_TOKENIZERS
    /// (a folder of *.tokenizer.json), loaded once.
    var tokenizers: [Tokenizer] {
        if let loaded { return loaded }
        guard let dir = getenv("QLORA_FUZZ_TOKENIZERS").map({ String(cString: $0) }) else {
            fputs("qlora-fuzz: set QLORA_FUZZ_TOKENIZERS to a folder of *.tokenizer.json (make fuzz does)\n", stderr)
            exit(2)
        }
        var list: [Tokenizer] = []
        let names = ((try? FileSystem.listDirectory(dir)) ?? []).filter { $0.hasSuffix(".tokenizer.json") }.sorted {
            ($0.hasPrefix("smollm2") ? 0 : 1, $0) < ($1.hasPrefix("smollm2") ? 0 : 1, $1)
        }
        for n in names {
            do { list.append(try Tokenizer(jsonFile: FileSystem.join(dir, n))) } catch {
                fputs("qlora-fuzz: \(n): \(error)\n", stderr)
                exit(2)
            }
        }
        guard !list.isEmpty else {
            fputs("qlora-fuzz: no *.tokenizer.json in \(dir)\n", stderr)
            exit(2)
        }
        loaded = list
        return list
    }

    /// The bytes that have a token of their own in the first tokenizer's byte-level alphabet (GPT-2's map of
    /// bytes to printable characters).
    lazy var byteTokens: Set<UInt8> = {
        var printable = Array(33...126) + Array(161...172) + Array(174...255)
        var chars = printable
        var extra = 0
        for b in 0..<256 where !printable.contains(b) {
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
        }
        var covered = Set<UInt8>()
        for (b, c) in zip(printable, chars) where tokenizers[0].id(of: String(Character(Unicode.Scalar(UInt32(c))!))) != nil {
            covered.insert(UInt8(b))
        }
        return covered
    }()

    var template: ChatTemplate? {
        if let templateCache { return templateCache }
        let t = tokenizers[0].chatTemplate.flatMap { try? ChatTemplate($0) }
        templateCache = .some(t)
        return t
    }

    /// Writes the input where a path-taking reader will find it (plain writes, no fsync: it is scratch).
    func file(_ bytes: [UInt8]) -> String {
        let fd = open(scratch, O_WRONLY | O_CREAT | O_TRUNC, 0o600)
        var written = 0
        if fd >= 0 {
            written = bytes.withUnsafeBytes { b in b.isEmpty ? 0 : write(fd, b.baseAddress, b.count) }
            close(fd)
        }
        guard fd >= 0, written == bytes.count else {
            fputs("qlora-fuzz: cannot write \(scratch)\n", stderr)
            exit(2)
        }
        return scratch
    }

    func run(_ bytes: [UInt8]) {
        switch target {
        case .json: fuzzJSON(bytes)
        case .safetensors: fuzzSafetensors(bytes)
        case .gguf: fuzzGGUF(bytes)
        case .tokenizer: fuzzTokenizerFile(bytes)
        case .encode: fuzzEncode(bytes)
        case .template: fuzzTemplate(bytes)
        case .config: fuzzConfigs(bytes)
        case .yaml: fuzzYAML(bytes)
        case .dataset: fuzzDataset(bytes)
        case .mmlu: fuzzMMLU(bytes)
        case .judging: fuzzJudging(bytes)
        case .request: fuzzRequest(bytes)
        }
    }

    // MARK: the targets

    func fuzzJSON(_ bytes: [UInt8]) {
        guard let v = try? JSON.parse(bytes) else { return }
        // What we write, we read back as the same value.
        let text = JSON.serialize(v)
        guard let again = try? JSON.parse(text) else { fatalError("JSON.serialize wrote what JSON.parse refuses: \(text)") }
        guard again == v else { fatalError("JSON round trip changed the value: \(text)") }
    }

    func fuzzSafetensors(_ bytes: [UInt8]) {
        guard let f = try? SafetensorsFile(path: file(bytes)) else { return }
        for e in f.entries {
            let view = f.view(e)
            // Every entry's bytes lie inside the file: touch the first and last.
            if let first = view.bytes.first, let last = view.bytes.last { blackHole(Int(first) &+ Int(last)) }
            if e.elementCount <= 1 << 16 { blackHole(view.floats().count) }
        }
    }

    func fuzzGGUF(_ bytes: [UInt8]) {
        guard let g = try? GGUFFile(path: file(bytes)) else { return }
        for t in g.tensors {
            let b = g.bytes(of: t)
            if let first = b.first, let last = b.last { blackHole(Int(first) &+ Int(last)) }
            if t.elementCount <= 1 << 16, let values = try? g.floats(t) { blackHole(values.count) }
        }
        _ = try? LlamaConfig(gguf: g)
        if let tok = try? Tokenizer(gguf: g) { blackHole(tok.encode("Hello, world! 123").count) }
    }

    func fuzzTokenizerFile(_ bytes: [UInt8]) {
        guard let tok = try? Tokenizer(jsonFile: file(bytes)) else { return }
        for text in ["Hello, world!", " a  b\n\tc", "héllo 世界 🦙", "<s>[INST] hi [/INST]", ""] {
            let ids = tok.encode(text, addSpecialTokens: true)
            blackHole(tok.decode(ids).utf8.count)
        }
    }

    func fuzzEncode(_ bytes: [UInt8]) {
        guard let selector = bytes.first else { return }
        let all = tokenizers
        let tok = all[Int(selector) % all.count]
        let text = String(decoding: bytes.dropFirst(), as: UTF8.self)
        let ids = tok.encode(text)
        let vocabulary = tok.vocabularySize
        for id in ids where id < 0 || id >= vocabulary { fatalError("encode gave id \(id) outside the vocabulary (\(vocabulary))") }
        let back = tok.decode(ids)
        // A byte-level BPE tokenizer without a normalizer (the default model's) gives back what it was given,
        // when each byte has its token: SmolLM2's vocabulary lacks 21 of the 256 (0x04, 0x14, 0xC0, ...), and
        // without an unknown token those bytes are dropped, as Hugging Face tokenizers drop them (found by make fuzz).
        if selector % UInt8(all.count) == 0 && text.utf8.allSatisfy(byteTokens.contains) && back != text {
            fatalError("decode(encode(s)) != s: \(Array(text.utf8)) -> \(ids) -> \(Array(back.utf8))")
        }
        if ids.count <= 48 {
            let stream = StreamingDecoder(tokenizer: tok, skipSpecialTokens: false)
            var streamed = ""
            for id in ids { streamed += stream.add(id) }
            streamed += stream.finish()
            guard stream.text == back, streamed == back else { fatalError("streamed decoding differs from decode: \(ids)") }
        }
    }

    /// The input is a template; it renders a fixed conversation. The Jinja subset must refuse what it does not
    /// support with an error, never crash or run without end.
    func fuzzTemplate(_ bytes: [UInt8]) {
        guard let source = String(validating: bytes, as: UTF8.self), let t = try? ChatTemplate(source) else { return }
        let messages: [JSONValue] = [
            ChatTemplate.message("system", "You are helpful."), ChatTemplate.message("user", "Hi <b> & \"you\""),
            ChatTemplate.message("assistant", "Hello!"), ChatTemplate.message("user", "Tell me 2 things."),
        ]
        for prompt in [true, false] {
            if let s = try? t.render(messages: messages, addGenerationPrompt: prompt, specialTokens: ["bos_token": "<s>", "eos_token": "</s>"]) {
                blackHole(s.utf8.count)
            }
        }
    }

    /// config.json (as LlamaConfig reads it), generation_config.json and adapter_config.json.
    func fuzzConfigs(_ bytes: [UInt8]) {
        if let json = try? JSON.parse(bytes), var config = try? LlamaConfig(json: json, file: "config.json") {
            config.apply(generationConfig: json)
            if config.headDim > 0 && config.headDim <= 1 << 12 { blackHole(config.ropeInverseFrequencies().count) }
        }
        if let adapter = try? PEFTAdapterConfig(file: file(bytes)) { blackHole(Int(adapter.scale.isFinite ? 1 : 0)) }
    }

    func fuzzYAML(_ bytes: [UInt8]) {
        let known = ["lora-r": true, "lora-alpha": true, "learning-rate": true, "target-modules": true, "gradient-checkpointing": false,
                     "double-quant": false, "model": true, "dataset": true, "max-steps": true]
        _ = try? YAMLOptions.arguments(bytes: bytes, file: "config.yaml", known: known)
    }

    /// The first byte picks the format and whether bad records are skipped; the examples then go through the
    /// training encoder (the default model's tokenizer and chat template, and the Guanaco prompt).
    func fuzzDataset(_ bytes: [UInt8]) {
        guard let selector = bytes.first else { return }
        let formats = DatasetFormat.allCases
        let format = formats[Int(selector >> 1) % formats.count]
        let path = file(Array(bytes.dropFirst()))
        guard let data = try? DatasetLoader.load(path, format: format, skipBadRecords: selector & 1 == 1) else { return }
        let tok = tokenizers[0]
        let promptTemplate: PromptTemplate = selector & 0x80 != 0 ? .guanaco : (template.map(PromptTemplate.chat) ?? .guanaco)
        guard let encoder = try? ExampleEncoder(tokenizer: tok, template: promptTemplate, maxLength: 64, sourceMaxLength: 48, targetMaxLength: 32) else { return }
        for example in data.examples.prefix(8) {
            guard let e = try? encoder.encode(example) else { continue }
            guard e.tokens.count == e.labels.count, e.tokens.count <= 64 else {
                fatalError("encoded example: \(e.tokens.count) tokens, \(e.labels.count) labels, limit 64")
            }
        }
    }

    func fuzzMMLU(_ bytes: [UInt8]) {
        if let questions = try? MMLU.parseCSV(bytes, file: "x_test.csv", subject: "x") {
            for q in questions.prefix(4) { blackHole(MMLU.format(q, includeAnswer: true).utf8.count) }
        }
        _ = try? MMLU.parseJSONL(bytes, file: "mmlu.jsonl")
    }

    /// Answer files, judge prompts, judgments and benchmark questions, and the verdict reader.
    func fuzzJudging(_ bytes: [UInt8]) {
        let answers = try? SystemAnswers.parse(bytes, file: "answers.jsonl", name: "a")
        if let answers, let other = try? SystemAnswers.parse(bytes, file: "answers.jsonl", name: "b") {
            _ = try? Tournament.matches([answers, other])
        }
        if let prompts = try? JudgePrompt.parse(bytes, file: "prompts.jsonl"), !prompts.isEmpty {
            blackHole(JudgePrompt.choose(prompts, category: "writing").render(question: ["q"], first: ["a"], second: ["b"]).utf8.count)
        }
        _ = try? Tournament.judged(bytes, file: "judgments.jsonl")
        _ = try? Tournament.summary(bytes, file: "judgments.jsonl", systems: ["a", "b"])
        _ = try? BenchmarkQuestions.parse(bytes, file: "questions.jsonl")
        _ = try? BenchmarkQuestions.answered(bytes, file: "answers.jsonl")
        _ = Verdict.parse(String(decoding: bytes, as: UTF8.self))
    }

    /// A request body: the first byte picks chat or text completions.
    func fuzzRequest(_ bytes: [UInt8]) {
        guard let selector = bytes.first else { return }
        var options = ServerOptions()
        options.maxTokensCap = 256
        options.defaultMaxTokens = 64
        let r = try? Server.decodeRequest(Array(bytes.dropFirst()), chat: selector & 1 == 0, modelIDs: ["base", "quill"], template: template,
                                          tokenizer: tokenizers[0], contextLength: 512, options: options)
        if let r {
            guard !r.prompt.isEmpty, r.prompt.count < 512, r.options.maxTokens >= 1, r.options.maxTokens <= 256,
                  r.prompt.count + r.options.maxTokens <= 512 else {
                fatalError("request accepted outside the caps: \(r.prompt.count) prompt tokens, max_tokens \(r.options.maxTokens)")
            }
        }
    }
}

@inline(never)
func blackHole(_ x: Int) {
    if x == Int.min { fputs("", stderr) }
}

#if QLORA_FUZZ
nonisolated(unsafe) var harness: Harness?

@_cdecl("LLVMFuzzerInitialize")
public func fuzzInitialize(_ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>) -> CInt {
    let h = Harness()
    if [.encode, .dataset, .request].contains(h.target) { _ = h.tokenizers; _ = h.template }
    harness = h
    return 0
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    harness!.run(size == 0 ? [] : [UInt8](UnsafeBufferPointer(start: data, count: size)))
    return 0
}
#else
/// The ordinary build replays inputs through a target without libFuzzer (CI replays every committed corpus:
/// seconds, not a campaign): `qlora-fuzz replay TARGET FILE_OR_FOLDER ...` runs each file once and exits 0
/// when none crashed (a crash ends the process, naming the file on stderr first).
@main
struct FuzzReplay {
    static func main() {
        let args = Array(CommandLine.arguments.dropFirst())
        guard args.count >= 3, args[0] == "replay" else {
            print("usage: qlora-fuzz replay TARGET FILE_OR_FOLDER ... (the libFuzzer build is make fuzz: scripts/fuzz.sh)")
            exit(2)
        }
        let harness = Harness(target: args[1])
        var files: [String] = []
        for path in args[2...] {
            if FileSystem.isDirectory(path) {
                files += ((try? FileSystem.listDirectory(path)) ?? []).map { FileSystem.join(path, $0) }
            } else {
                files.append(path)
            }
        }
        for file in files {
            guard let bytes = try? FileSystem.readFile(file) else {
                fputs("qlora-fuzz: cannot read \(file)\n", stderr)
                exit(2)
            }
            fputs("\(file)\n", stderr)
            harness.run(bytes)
        }
        print("replayed \(files.count) inputs through \(args[1])")
    }
}
#endif
