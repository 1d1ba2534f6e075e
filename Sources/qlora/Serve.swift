// `qlora serve`: an OpenAI-compatible HTTP server over one 4-bit base and any number of LoRA adapters.
import ArgumentParser
import Logging
import QLoRA
import QLoRAServer

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "serve",
        abstract: "Serve the model and its adapters over the OpenAI chat API (POST /v1/chat/completions, /v1/completions).",
        discussion: """
            The base model is loaded once, in 4 bits; each --adapter NAME=DIR adds a model id NAME that applies that \
            LoRA adapter to the shared base. A request's "model" picks one (the base's id is the model file or folder \
            name; GET /v1/models lists them); POST /v1/adapters {"name", "path"} and DELETE /v1/adapters/NAME load and \
            unload adapters while serving. Requests in flight are decoded together, one batched step a token \
            (--max-batch), whatever their models: each step reads the base weights once for the whole batch and \
            applies each request's own adapter to its own rows; requests that arrive together are prefilled in one \
            pass. Up to --max-queue requests wait; beyond that the answer is 429 with Retry-After.

            Endpoints: POST /v1/chat/completions and /v1/completions (model, messages or prompt, temperature, top_p, \
            max_tokens, stop, seed, stream as server-sent events ending in "data: [DONE]", usage), GET /v1/models, \
            GET /health, GET /metrics (Prometheus text). Errors are OpenAI error objects: 400 for malformed JSON, wrong \
            types, an unknown model or a prompt past the context, 401 without the key, 413 past --max-body. It listens \
            on loopback unless --host says otherwise; --api-key (or QLORA_API_KEY) makes every endpoint but /health \
            require "Authorization: Bearer KEY". One log line a request on stderr (swift-log): model, tokens, latency.
            Without "temperature" and "top_p" a request samples at 1.0 and 1.0, as OpenAI's API does.
            """
    )

    @OptionGroup var modelOptions: ModelOptions
    @OptionGroup var inference: InferenceOptions

    @Option(help: ArgumentHelp("A Jinja chat template file to use instead of the model's own (as llama-server's --chat-template-file): for a model whose template lacks something, such as tool calls.", valueName: "file"))
    var chatTemplate: String?

    @Option(help: "The address to listen on (127.0.0.1: this machine only; 0.0.0.0: every interface).")
    var host = "127.0.0.1"

    @Option(help: "The port (0: any free port; the one bound is printed).")
    var port = 8080

    @Option(help: "Require this bearer token (default: $QLORA_API_KEY when set).")
    var apiKey: String?

    @Option(help: "Requests decoded together at most.")
    var maxBatch = 8

    @Option(help: "Requests waiting at most before new ones get 429.")
    var maxQueue = 64

    @Option(help: "The most tokens a request may ask for.")
    var maxTokensCap = 2048

    @Option(help: "Tokens generated when a request gives no max_tokens.")
    var defaultMaxTokens = 512

    @Option(help: "The largest request body in bytes.")
    var maxBody = 1 << 20

    @Option(help: "Megabytes of keys and values kept from earlier prompts: a request whose prompt starts as a kept one did (a shared system prompt, the earlier turns of a conversation; per model and adapter) copies that prefix instead of running it again, as llama-server's prompt cache does; least recently used evicted; usage.prompt_tokens_details.cached_tokens says how many. 0 turns it off.")
    var prefixCacheMb = 512

    func validate() throws {
        guard (0...65535).contains(port) else { throw ValidationError("--port must be from 0 to 65535") }
        guard maxBatch >= 1 && maxBatch <= Linear.batchedRowLimit else { throw ValidationError("--max-batch must be from 1 to \(Linear.batchedRowLimit)") }
        guard prefixCacheMb >= 0 else { throw ValidationError("--prefix-cache-mb must be 0 or more") }
        guard maxQueue >= 1 && maxTokensCap >= 1 && defaultMaxTokens >= 1 && maxBody >= 1024 else {
            throw ValidationError("--max-queue, --max-tokens-cap and --default-max-tokens must be positive, --max-body at least 1024")
        }
    }

    func run() async throws {
        var adapterSpecs: [(String, String)] = []
        for spec in modelOptions.adapters {
            guard let eq = spec.firstIndex(of: "="), eq != spec.startIndex else {
                adapterSpecs.append((FileSystem.baseName(spec), spec))
                continue
            }
            adapterSpecs.append((String(spec[..<eq]), String(spec[spec.index(after: eq)...])))
        }
        var base = modelOptions
        base.adapters = []
        let (model, tokenizer) = try base.load(progress: true)
        inference.apply(to: model)
        let baseID = FileSystem.baseName(modelOptions.modelPath)
        var models: [(id: String, model: LlamaModel)] = [(baseID, model)]
        for (_, dir) in adapterSpecs { _ = try baseModel(for: dir, given: modelOptions.modelPath) { modelOptions.modelPath } }
        for (name, dir) in adapterSpecs {
            guard !models.contains(where: { $0.id == name }) else { throw ValidationError("two models named \"\(name)\": name the adapters with NAME=DIR") }
            let m = try model.withAdapter(dir)
            models.append((name, m))
            Log.info("adapter \(name): \(dir)")
        }
        let template: ChatTemplate?
        if let file = chatTemplate {
            guard FileSystem.exists(file) else { throw ValidationError("--chat-template: no file at \(file)") }
            do { template = try ChatTemplate(String(decoding: try FileSystem.readFile(file), as: UTF8.self)) } catch {
                throw ValidationError("--chat-template \(file): \(error)")
            }
        } else {
            template = try tokenizer.chatTemplate.map { try ChatTemplate($0) }
        }
        if let t = template, let format = ToolFormat.of(t) { Log.info("tool calls: the chat template writes them in the \(format.rawValue) format") }
        if template == nil { Log.info("note: the model has no chat template; /v1/chat/completions will refuse requests (use /v1/completions)") }
        let engine = Engine(models: models, tokenizer: tokenizer, maxBatch: maxBatch, maxQueue: maxQueue,
                            prefixCache: prefixCacheMb > 0 ? PrefixCache(byteBudget: prefixCacheMb << 20) : nil)
        engine.start()
        var options = ServerOptions()
        options.host = host
        options.port = port
        options.apiKey = apiKey ?? Environment.get("QLORA_API_KEY").flatMap { $0.isEmpty ? nil : $0 }
        if options.apiKey == nil && host != "127.0.0.1" && host != "localhost" && host != "::1" {
            Log.info("warning: listening on \(host) without --api-key: anyone who can reach this port can use the model")
        }
        options.maxBodyBytes = maxBody
        options.maxTokensCap = maxTokensCap
        options.defaultMaxTokens = min(defaultMaxTokens, maxTokensCap)
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = .info
            return h
        }
        let server = Server(engine: engine, template: template, options: options, logger: Logger(label: "qlora.serve"), loadAdapter: { dir in
            try model.withAdapter(dir)
        })
        let host = self.host, auth = options.apiKey != nil, ids = models.map(\.id).joined(separator: ", ")
        defer { engine.stop() }
        try await server.run { port in
            print("listening on http://\(host):\(port)/v1 (models: \(ids)\(auth ? "; API key required" : ""))")
            fflush(stdout)
        }
    }
}
