// `qlora serve` on the default model, started as users start it (the binary, a free loopback port), and
// spoken to with a real HTTP client (AsyncHTTPClient): every endpoint, streaming, concurrent requests
// decoded together, the 429 path, a client that hangs up mid-stream, adapters loaded and unloaded, the API
// key, and the errors. Greedy answers are checked against `qlora generate`'s.
import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import QLoRA
import QLoRATestSupport
import Testing

/// A `qlora serve` process on a free port; stderr (the request log) goes to a file.
final class ServeProcess: @unchecked Sendable {
    let process = Process()
    let port: Int
    let log: String

    init(_ arguments: [String], environment: [String: String] = [:]) throws {
        let dir = try Fixtures.temporaryDirectory("serve")
        log = FileSystem.join(dir, "stderr")
        _ = FileManager.default.createFile(atPath: log, contents: nil)
        process.executableURL = URL(fileURLWithPath: FileSystem.join(FileSystem.directoryName(CommandLine.arguments[0]), "qlora"))
        process.arguments = ["serve", "--port", "0"] + arguments
        var env = ProcessInfo.processInfo.environment
        for (k, v) in environment { env[k] = v }
        process.environment = env
        let out = Pipe()
        process.standardOutput = out
        process.standardError = FileHandle(forWritingAtPath: log)
        try process.run()
        // The first line on stdout: "listening on http://127.0.0.1:PORT/v1 (...)".
        var line = Data()
        while !line.contains(UInt8(ascii: "\n")) {
            let chunk = out.fileHandleForReading.availableData
            if chunk.isEmpty { break }
            line.append(chunk)
        }
        let text = String(decoding: line, as: UTF8.self)
        guard let r = text.range(of: "http://127.0.0.1:"), let p = Int(text[r.upperBound...].prefix { $0.isNumber }) else {
            process.terminate()
            throw ServeFailed(message: "no 'listening on' line: \(text) \(String(decoding: (try? FileSystem.readFile(log)) ?? [], as: UTF8.self))")
        }
        port = p
    }

    struct ServeFailed: Error, CustomStringConvertible {
        let message: String
        var description: String { message }
    }

    var base: String { "http://127.0.0.1:\(port)" }
    var stderr: String { String(decoding: (try? FileSystem.readFile(log)) ?? [], as: UTF8.self) }

    func stop() {
        process.terminate()
        process.waitUntilExit()
    }
}

struct HTTPReply {
    let status: Int
    let headers: HTTPHeaders
    let body: String
    var json: JSONValue? { try? JSON.parse(body) }
}

func http(_ method: HTTPMethod, _ url: String, _ body: String? = nil, headers: [(String, String)] = []) async throws -> HTTPReply {
    var request = HTTPClientRequest(url: url)
    request.method = method
    for (k, v) in headers { request.headers.add(name: k, value: v) }
    if let body {
        request.headers.add(name: "Content-Type", value: "application/json")
        request.body = .bytes(ByteBuffer(string: body))
    }
    let response = try await HTTPClient.shared.execute(request, timeout: .seconds(120))
    let bytes = try await response.body.collect(upTo: 16 << 20)
    return HTTPReply(status: Int(response.status.code), headers: response.headers, body: String(buffer: bytes))
}

func chatBody(_ prompt: String, model: String? = nil, maxTokens: Int = 16, stream: Bool = false, extra: String = "") -> String {
    let m = model.map { #""model": "\#($0)", "# } ?? ""
    return #"{\#(m)"messages": [{"role": "user", "content": \#(JSON.serialize(.string(prompt)))}], "temperature": 0, "max_tokens": \#(maxTokens), "stream": \#(stream)\#(extra)}"#
}

/// The text of a server-sent-events chat stream, and whether it ended with [DONE].
func streamedText(_ body: String) throws -> (text: String, done: Bool, finish: String?) {
    var text = "", done = false, finish: String?
    for event in body.components(separatedBy: "\n\n") where event.hasPrefix("data: ") {
        let payload = String(event.dropFirst(6))
        if payload == "[DONE]" { done = true; continue }
        let v = try JSON.parse(payload)
        guard let choice = v["choices"]?.arrayValue?.first else { continue }
        text += choice["delta"]?["content"]?.stringValue ?? choice["text"]?.stringValue ?? ""
        if let f = choice["finish_reason"]?.stringValue { finish = f }
    }
    return (text, done, finish)
}

/// A small LoRA adapter for the default model (q_proj and v_proj of every layer, fixed pseudo-random values).
func writeTestAdapter(_ dir: String, seed: UInt64 = 7, amplitude: Float = 0.05) throws {
    try FileSystem.makeDirectories(dir)
    let config = #"{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "SmolLM2-135M-Instruct", "bias": "none", "task_type": "CAUSAL_LM"}"#
    try FileSystem.writeFileAtomically(FileSystem.join(dir, "adapter_config.json"), bytes: Array(config.utf8))
    var header: [(String, JSONValue)] = []
    var data: [UInt8] = []
    var rng = SeededGenerator(seed: seed)
    for layer in 0..<30 {
        for (name, out) in [("q_proj", 576), ("v_proj", 192)] {
            for (part, shape) in [("lora_A", [4, 576]), ("lora_B", [out, 4])] {
                let count = shape[0] * shape[1]
                let start = data.count
                for _ in 0..<count {
                    let v = (Float(rng.next() % 2001) / 1000 - 1) * amplitude
                    withUnsafeBytes(of: v.bitPattern.littleEndian) { data.append(contentsOf: $0) }
                }
                header.append(("base_model.model.model.layers.\(layer).self_attn.\(name).\(part).weight",
                               .object([("dtype", .string("F32")), ("shape", .array(shape.map { .int($0) })), ("data_offsets", .array([.int(start), .int(data.count)]))])))
            }
        }
    }
    try FileSystem.writeFileAtomically(FileSystem.join(dir, "adapter_model.safetensors"), bytes: Fixtures.rawSafetensors(JSON.serialize(.object(header)), data: data))
}

@Suite("command line: serve")
struct ServeCLITests {
    static let prompts = ["What is the capital of France?", "Name a primary color.", "What is 2 + 2?", "Say hello in Spanish."]

    @Test("endpoints: health, models, chat (whole and streamed) equal qlora generate's greedy answer; completions; usage; metrics; the log line")
    func endpoints() async throws {
        // The client on a thread of its own, so that other tests' arithmetic on the cooperative pool cannot run its deadlines out.
        try await withTaskExecutorPreference(ThreadExecutor.servers) { try await endpointsBody() }
    }

    func endpointsBody() async throws {
        let dir = try Fixtures.temporaryDirectory("serve-adapter")
        let adapter = FileSystem.join(dir, "tuned")
        try writeTestAdapter(adapter)
        let server = try ServeProcess(["--adapter", "tuned=\(adapter)"])
        defer { server.stop() }
        let health = try await http(.GET, server.base + "/health")
        #expect(health.status == 200 && health.json?["status"]?.stringValue == "ok")
        let models = try await http(.GET, server.base + "/v1/models")
        let ids = models.json?["data"]?.arrayValue?.compactMap { $0["id"]?.stringValue } ?? []
        #expect(ids == ["SmolLM2-135M-Instruct.Q4_1.gguf", "tuned"])

        let prompt = Self.prompts[0]
        let reference = try await runQLoRAAsync(["generate", "--chat", "-p", prompt, "--temperature", "0", "--max-tokens", "16", "--json"])
        let expected = try JSON.parse(reference.stdout)["text"]!.stringValue!
        let whole = try await http(.POST, server.base + "/v1/chat/completions", chatBody(prompt))
        #expect(whole.status == 200, "\(whole.body)")
        let j = whole.json!
        #expect(j["object"]?.stringValue == "chat.completion" && j["model"]?.stringValue == "SmolLM2-135M-Instruct.Q4_1.gguf")
        let choice = j["choices"]!.arrayValue![0]
        #expect(choice["message"]?["content"]?.stringValue == expected && choice["message"]?["role"]?.stringValue == "assistant")
        #expect(["stop", "length"].contains(choice["finish_reason"]?.stringValue ?? ""))
        let usage = j["usage"]!
        #expect(usage["completion_tokens"]!.intValue! <= 16 && usage["prompt_tokens"]!.intValue! > 5
                && usage["total_tokens"]!.intValue! == usage["prompt_tokens"]!.intValue! + usage["completion_tokens"]!.intValue!)
        #expect(usage["prompt_tokens_details"]?["cached_tokens"]?.intValue == 0, "\(usage)")

        let streamed = try await http(.POST, server.base + "/v1/chat/completions", chatBody(prompt, stream: true, extra: #", "stream_options": {"include_usage": true}"#))
        #expect(streamed.status == 200 && streamed.headers.first(name: "Content-Type") == "text/event-stream")
        let s = try streamedText(streamed.body)
        #expect(s.text == expected && s.done && s.finish != nil)
        #expect(streamed.body.contains(#""usage":{"prompt_tokens""#))
        // The same prompt again: all but its last token come from the prefix cache, and the answer is the same.
        let promptTokens = usage["prompt_tokens"]!.intValue!
        #expect(streamed.body.contains(#""prompt_tokens_details":{"cached_tokens":\#(promptTokens - 1)}"#), "\(streamed.body)")

        // The adapter: the same answer as qlora generate --adapter, and not the base's.
        let tunedReference = try JSON.parse(try await runQLoRAAsync(["generate", "--chat", "-p", prompt, "--temperature", "0", "--max-tokens", "16", "--json", "--adapter", adapter]).stdout)["text"]!.stringValue!
        let tuned = try await http(.POST, server.base + "/v1/chat/completions", chatBody(prompt, model: "tuned"))
        #expect(tuned.json?["choices"]?.arrayValue?[0]["message"]?["content"]?.stringValue == tunedReference)
        #expect(tunedReference != expected)

        let completion = try await http(.POST, server.base + "/v1/completions", #"{"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}"#)
        let ctext = try JSON.parse(try await runQLoRAAsync(["generate", "-p", "The capital of France is", "--temperature", "0", "--max-tokens", "5", "--json"]).stdout)["text"]!.stringValue!
        #expect(completion.json?["object"]?.stringValue == "text_completion" && completion.json?["choices"]?.arrayValue?[0]["text"]?.stringValue == ctext)

        // Stop strings end the reply before them.
        let stopped = try await http(.POST, server.base + "/v1/chat/completions", chatBody(prompt, extra: #", "stop": ["Paris"]"#))
        let stoppedText = stopped.json?["choices"]?.arrayValue?[0]["message"]?["content"]?.stringValue ?? "?"
        #expect(!stoppedText.contains("Paris") && expected.hasPrefix(stoppedText))

        let metrics = try await http(.GET, server.base + "/metrics")
        #expect(metrics.body.contains("qlora_prefix_cache_hits_total ") && !metrics.body.contains("qlora_prefix_cache_hits_total 0\n"), "\(metrics.body)")
        #expect(metrics.body.contains("# TYPE qlora_generated_tokens_total counter") && metrics.body.contains(#"qlora_http_requests_total{path="/v1/chat/completions",status="200"} 4"#), "\(metrics.body)")
        #expect(server.stderr.contains("prompt_tokens=") && server.stderr.contains("first_token_seconds=") && server.stderr.contains("model=tuned"))
    }

    @Test("concurrent requests for the base and two adapters are decoded together, each row with its own adapter, and each gets its own greedy answer; a full queue answers 429 with Retry-After")
    func concurrency() async throws {
        try await withTaskExecutorPreference(ThreadExecutor.servers) { try await concurrencyBody() }
    }

    func concurrencyBody() async throws {
        let dir = try Fixtures.temporaryDirectory("serve-mixed")
        try writeTestAdapter(FileSystem.join(dir, "one"), seed: 11, amplitude: 0.2)
        try writeTestAdapter(FileSystem.join(dir, "two"), seed: 12, amplitude: 0.2)
        // f32 products: alone, each prompt is prefilled whole (many rows); together, each is a repeat whose last token is
        // computed on its own after a prefix-cache hit. In bf16 the two orders of the f32 sums can round an activation to
        // neighbouring bf16 values, enough to turn a near tie of these random adapters (measured: one answer of nine
        // changed). A batch equals each sequence alone in bf16 too: DefaultModelTests.bf16Decode.
        let server = try ServeProcess(["--max-batch", "4", "--compute-dtype", "f32",
                                       "--adapter", "one=\(FileSystem.join(dir, "one"))", "--adapter", "two=\(FileSystem.join(dir, "two"))"])
        defer { server.stop() }
        let base = "SmolLM2-135M-Instruct.Q4_1.gguf"
        // Three prompts with each model: 9 requests, alone and then all at once (at most 4 decode together).
        let prompts = Array(Self.prompts.prefix(3))
        let cases = prompts.flatMap { p in [base, "one", "two"].map { (p, $0) } }
        func answer(_ c: (String, String)) async throws -> String {
            let r = try await http(.POST, server.base + "/v1/chat/completions", chatBody(c.0, model: c.1, maxTokens: 24))
            return r.json?["choices"]?.arrayValue?[0]["message"]?["content"]?.stringValue ?? "status \(r.status): \(r.body)"
        }
        var alone: [String] = []
        for c in cases { alone.append(try await answer(c)) }
        let together = try await withThrowingTaskGroup(of: (Int, String).self) { group in
            for (i, c) in cases.enumerated() { group.addTask { (i, try await answer(c)) } }
            var out = [String](repeating: "", count: cases.count)
            for try await (i, t) in group { out[i] = t }
            return out
        }
        #expect(together == alone)
        // The adapters change the answers (a row that lost its adapter would show above).
        #expect(prompts.indices.contains { alone[3 * $0] != alone[3 * $0 + 1] } && prompts.indices.contains { alone[3 * $0 + 1] != alone[3 * $0 + 2] })
        // And they were decoded together, models mixed: alone, every step held one request, and a batch of
        // one model's requests would hold at most 3.
        let metrics = try await http(.GET, server.base + "/metrics").body
        let widest = metrics.split(separator: "\n").first { $0.hasPrefix("qlora_batch_size_max ") }.flatMap { Int($0.split(separator: " ")[1]) } ?? 0
        #expect(widest == 4, "\(metrics)")

        // One slot and one place in the queue: of 6 long requests at once, some get 429.
        let small = try ServeProcess(["--max-batch", "1", "--max-queue", "1"])
        defer { small.stop() }
        let statuses = try await withThrowingTaskGroup(of: HTTPReply.self) { group in
            for _ in 0..<6 { group.addTask { try await http(.POST, small.base + "/v1/chat/completions", chatBody("Tell me a long story.", maxTokens: 64)) } }
            var out: [HTTPReply] = []
            for try await r in group { out.append(r) }
            return out
        }
        let busy = statuses.filter { $0.status == 429 }
        #expect(!busy.isEmpty && statuses.contains { $0.status == 200 }, "\(statuses.map(\.status))")
        #expect(busy.allSatisfy { $0.headers.first(name: "Retry-After") == "1" && $0.json?["error"]?["type"]?.stringValue == "rate_limit_exceeded" })
    }

    @Test("a client that hangs up mid-stream stops its generation; errors are OpenAI error objects; the API key; adapters loaded and unloaded")
    func errorsAuthAdapters() async throws {
        try await withTaskExecutorPreference(ThreadExecutor.servers) { try await errorsAuthAdaptersBody() }
    }

    func errorsAuthAdaptersBody() async throws {
        let server = try ServeProcess(["--max-tokens-cap", "8192", "--max-body", "65536"], environment: ["QLORA_API_KEY": "secret-key"])
        defer { server.stop() }
        let auth = [("Authorization", "Bearer secret-key")]
        // Without the key: 401, but /health answers.
        let denied = try await http(.GET, server.base + "/v1/models")
        #expect(denied.status == 401 && denied.json?["error"]?["code"]?.stringValue == "invalid_api_key")
        #expect(try await http(.GET, server.base + "/v1/models", headers: [("Authorization", "Bearer wrong")]).status == 401)
        #expect(try await http(.GET, server.base + "/health").status == 200)
        #expect(try await http(.GET, server.base + "/v1/models", headers: auth).status == 200)

        // Hang up after the first piece of an 8,000-token stream: the generation ends as "cancelled", long before
        // its max_tokens, and frees its slot.
        var request = HTTPClientRequest(url: server.base + "/v1/chat/completions")
        request.method = .POST
        request.headers.add(name: "Authorization", value: "Bearer secret-key")
        request.body = .bytes(ByteBuffer(string: chatBody("Write a very long essay about the sea.", maxTokens: 8000, stream: true)))
        let client = HTTPClient(eventLoopGroupProvider: .singleton)
        let response = try await client.execute(request, timeout: .seconds(60))
        var iterator = response.body.makeAsyncIterator()
        _ = try await iterator.next()
        try await client.shutdown()  // closes the connection mid-stream
        var line: Substring?
        for _ in 0..<600 where line == nil {
            try await Task.sleep(nanoseconds: 100_000_000)
            line = server.stderr.split(separator: "\n").first { $0.contains("client went away mid-stream") }
        }
        #expect(line?.contains("finish=cancelled") == true, "\(line ?? "no line")")
        let tokens = line.flatMap { l in l.split(separator: " ").first { $0.hasPrefix("completion_tokens=") }.flatMap { Int($0.dropFirst(18)) } } ?? -1
        #expect(tokens >= 1 && tokens < 8000, "\(tokens) tokens")
        let metrics = try await http(.GET, server.base + "/metrics", headers: auth).body
        #expect(metrics.contains("qlora_requests_running 0\n"))

        // Errors: 400 with an error object naming the parameter; 413 past the body cap.
        func error(_ body: String, _ path: String = "/v1/chat/completions") async throws -> (Int, String?, String?) {
            let r = try await http(.POST, server.base + path, body, headers: auth)
            return (r.status, r.json?["error"]?["param"]?.stringValue, r.json?["error"]?["message"]?.stringValue)
        }
        #expect(try await error("{not json").0 == 400)
        #expect(try await error(#"{"messages": "hi"}"#).1 == "messages")
        #expect(try await error(#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#).1 == "temperature")
        #expect(try await error(#"{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9000}"#).2?.contains("at most 8192") == true)
        let unknown = try await error(#"{"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}"#)
        #expect(unknown.0 == 400 && unknown.1 == "model")
        #expect(try await error(#"{"prompt": 5}"#, "/v1/completions").1 == "prompt")

        // No field is dropped without a word: what is not implemented is a 400 naming it, with or without stream.
        let hi = #""messages": [{"role": "user", "content": "hi"}]"#
        for (field, value) in [("response_format", #"{"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "a+"}}}"#),
                               ("tools", #"[{"type": "function", "function": {"name": "f", "parameters": {}}}]"#), ("functions", #"[{"name": "f"}]"#),
                               ("store", "true"), ("audio", #"{"voice": "alloy"}"#), ("frobnicate", "1")] {
            for stream in [false, true] {
                let r = try await http(.POST, server.base + "/v1/chat/completions", #"{\#(hi), "stream": \#(stream), "\#(field)": \#(value)}"#, headers: auth)
                #expect(r.status == 400 && r.json?["error"]?["param"]?.stringValue == field, "\(field): \(r.status) \(r.body)")
                let code = r.json?["error"]?["code"]?.stringValue
                #expect(code == (field == "frobnicate" ? "unknown_parameter" : "unsupported_value"), "\(field): \(r.body)")
            }
        }
        for (field, value) in [("n", "9"), ("logprobs", "6"), ("echo", "true"), ("best_of", "2"), ("suffix", #""end""#), ("messages", "[]")] {
            let r = try await http(.POST, server.base + "/v1/completions", #"{"prompt": "Hi", "\#(field)": \#(value)}"#, headers: auth)
            #expect(r.status == 400 && r.json?["error"]?["param"]?.stringValue == field, "\(field): \(r.status) \(r.body)")
        }
        // JSON output (response_format json_object) by constrained decoding: whole and streamed, the reply parses as an object.
        for stream in [false, true] {
            let body = #"{"messages": [{"role": "user", "content": "Give the name and the capital of France as JSON."}], "response_format": {"type": "json_object"}, "temperature": 0, "max_tokens": 120, "stream": \#(stream)}"#
            let r = try await http(.POST, server.base + "/v1/chat/completions", body, headers: auth)
            let text = stream ? try streamedText(r.body).text : r.json?["choices"]?.arrayValue?.first?["message"]?["content"]?.stringValue ?? ""
            #expect(r.status == 200 && (try? JSON.parse(text))?.objectValue != nil, "\(r.body)")
        }
        // response_format json_schema: the reply is a value of the schema (the matcher is checked against jsonschema's
        // verdicts in JSONSchemaTests), whole and streamed; a keyword that cannot be enforced was a 400 naming it above.
        let schema = #"{"type": "object", "properties": {"country": {"type": "string"}, "capital": {"type": "string"}, "population_millions": {"type": "number"}, "continent": {"enum": ["Europe", "Asia", "Africa", "America", "Oceania"]}}, "required": ["country", "capital", "population_millions", "continent"], "additionalProperties": false}"#
        for stream in [false, true] {
            let body = #"{"messages": [{"role": "user", "content": "Describe France as JSON."}], "response_format": {"type": "json_schema", "json_schema": {"name": "country", "strict": true, "schema": \#(schema)}}, "temperature": 0, "max_tokens": 160, "stream": \#(stream)}"#
            let r = try await http(.POST, server.base + "/v1/chat/completions", body, headers: auth)
            let text = stream ? try streamedText(r.body).text : r.json?["choices"]?.arrayValue?.first?["message"]?["content"]?.stringValue ?? ""
            let value = try? JSON.parse(text)
            let keys = Set((value?.objectValue ?? []).map(\.0))
            #expect(r.status == 200 && keys == ["country", "capital", "population_millions", "continent"], "\(r.body)")
            #expect(value?["country"]?.stringValue != nil && value?["population_millions"]?.doubleValue != nil, "\(text)")
            #expect(["Europe", "Asia", "Africa", "America", "Oceania"].contains(value?["continent"]?.stringValue ?? ""), "\(text)")
        }
        let badSchema = try await error(#"{\#(hi), "response_format": {"type": "json_schema", "json_schema": {"name": "x y", "schema": {}}}}"#)
        #expect(badSchema.1 == "response_format" && badSchema.2?.contains("name") == true)
        // Other formats, or a known one with fields it does not take; parallel_tool_calls must be a boolean even without tools.
        for format in [#"{"type": "xml"}"#, #"{"type": "json_object", "schema": {}}"#, #""json""#] {
            let r = try await error(#"{\#(hi), "response_format": \#(format)}"#)
            #expect(r.0 == 400 && r.1 == "response_format" && r.2?.contains("json_schema") == true, "\(format): \(r)")
        }
        #expect(try await error(#"{\#(hi), "parallel_tool_calls": "yes"}"#).1 == "parallel_tool_calls")
        // SmolLM2's template has no tool calls: tools are a 400 naming them (above); tool_choice without tools too.
        #expect(try await error(#"{\#(hi), "tool_choice": "required"}"#).1 == "tool_choice")
        let toolMessage = try await error(#"{"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}, {"role": "user", "content": "hi"}]}"#)
        #expect(toolMessage.0 == 400 && toolMessage.2?.contains("tool_calls") == true)
        #expect(try await error(#"{\#(hi), "stream_options": {"include_usage": true, "chunk_size": 3}}"#).1 == "stream_options")
        #expect(try await error(#"{\#(hi), "logit_bias": {"99999999": 5}}"#).1 == "logit_bias")
        #expect(try await error(#"{\#(hi), "presence_penalty": 3}"#).1 == "presence_penalty")
        // The values that ask for nothing are accepted, as a client that sends its defaults sends them; the message
        // a client got back, sent back with its empty fields, too.
        let defaults = #""n": 1, "logprobs": false, "top_logprobs": null, "response_format": {"type": "text"}, "tools": [], "tool_choice": "auto", "parallel_tool_calls": true, "presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "store": false, "service_tier": "auto", "user": "user-42", "stream_options": {"include_usage": false}"#
        let plain = try await http(.POST, server.base + "/v1/chat/completions", chatBody("Name a primary color.", maxTokens: 6), headers: auth)
        let withDefaults = try await http(.POST, server.base + "/v1/chat/completions", chatBody("Name a primary color.", maxTokens: 6, extra: ", " + defaults), headers: auth)
        #expect(plain.status == 200 && withDefaults.status == 200, "\(withDefaults.body)")
        let answer = plain.json?["choices"]?.arrayValue?.first?["message"]?["content"]?.stringValue
        #expect(answer != nil && withDefaults.json?["choices"]?.arrayValue?.first?["message"]?["content"]?.stringValue == answer)
        #expect(server.stderr.contains("user=user-42"))
        let returned = #"{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!", "refusal": null, "annotations": [], "tool_calls": null, "audio": null}, {"role": "user", "content": "Bye", "name": "ann"}], "max_tokens": 2}"#
        #expect(try await http(.POST, server.base + "/v1/chat/completions", returned, headers: auth).status == 200)
        // logprobs: each generated token's log-probability under the model and the likeliest alternatives; greedy, the
        // chosen token is the first alternative. Streamed replies with logprobs are refused by name (not yet).
        let lp = try await http(.POST, server.base + "/v1/chat/completions", #"{\#(hi), "temperature": 0, "max_tokens": 6, "logprobs": true, "top_logprobs": 3}"#, headers: auth)
        let content = lp.json?["choices"]?.arrayValue?.first?["logprobs"]?["content"]?.arrayValue ?? []
        #expect(lp.status == 200 && content.count == lp.json?["usage"]?["completion_tokens"]?.intValue, "\(lp.body)")
        for entry in content {
            let top = entry["top_logprobs"]?.arrayValue ?? []
            let values = top.compactMap { $0["logprob"]?.doubleValue }
            #expect(top.count == 3 && values == values.sorted(by: >) && values.allSatisfy { $0 <= 0 } && values.map(exp).reduce(0, +) <= 1 + 1e-9)
            #expect(top.first?["token"]?.stringValue == entry["token"]?.stringValue && abs((values.first ?? 1) - (entry["logprob"]?.doubleValue ?? 0)) < 1e-9, "\(entry)")
            #expect(entry["bytes"]?.arrayValue?.count == entry["token"]?.stringValue?.utf8.count)
        }
        let joined = content.compactMap { $0["token"]?.stringValue }.joined()
        #expect(joined == lp.json?["choices"]?.arrayValue?.first?["message"]?["content"]?.stringValue, "\(joined)")
        // Streamed, each chunk carries the log-probabilities of the tokens its text came from: together, the same entries.
        let lpStream = try await http(.POST, server.base + "/v1/chat/completions", #"{\#(hi), "temperature": 0, "max_tokens": 6, "logprobs": true, "top_logprobs": 3, "stream": true}"#, headers: auth)
        var streamedEntries: [JSONValue] = []
        for event in lpStream.body.components(separatedBy: "\n\n") where event.hasPrefix("data: {") {
            let c = try JSON.parse(String(event.dropFirst(6)))["choices"]?.arrayValue?.first
            streamedEntries += c?["logprobs"]?["content"]?.arrayValue ?? []
        }
        #expect(lpStream.status == 200 && streamedEntries.count == content.count, "\(lpStream.body)")
        // (This prompt's keys and values come from the prefix cache: its last token runs alone through the one-row
        // kernels, whose sums are ordered differently from the whole prompt's, and its key and value are then rounded to
        // the f16 cache, where an element on a rounding boundary lands one unit (2^-11) apart: the values agree to about
        // 1e-3 (measured up to 1.4e-3; 1e-4 with --kv-cache f32), not 1e-9.)
        for (a, b) in zip(streamedEntries, content) {
            #expect(a["token"] == b["token"] && abs((a["logprob"]?.doubleValue ?? 1) - (b["logprob"]?.doubleValue ?? 0)) < 5e-3, "\(a) against \(b)")
        }
        #expect(try await error(#"{\#(hi), "top_logprobs": 2}"#).1 == "top_logprobs")
        let clp = try await http(.POST, server.base + "/v1/completions", #"{"prompt": "The capital of France is", "temperature": 0, "max_tokens": 5, "logprobs": 2}"#, headers: auth)
        let lpc = clp.json?["choices"]?.arrayValue?.first?["logprobs"]
        let offsets = lpc?["text_offset"]?.arrayValue?.compactMap(\.intValue) ?? []
        #expect(lpc?["tokens"]?.arrayValue?.count == 5 && lpc?["token_logprobs"]?.arrayValue?.count == 5 && offsets.first == 0 && offsets == offsets.sorted(), "\(clp.body)")
        #expect((lpc?["top_logprobs"]?.arrayValue ?? []).allSatisfy { ($0.objectValue?.count ?? 0) >= 1 && ($0.objectValue?.count ?? 9) <= 2 })

        // n: that many choices, each its own seeded sequence (decoded together), the prompt counted once in usage;
        // streamed, each choice's pieces carry its index and each ends with its own finish_reason.
        let three = try await http(.POST, server.base + "/v1/chat/completions", #"{\#(hi), "n": 3, "temperature": 1, "seed": 5, "max_tokens": 12}"#, headers: auth)
        let choices = three.json?["choices"]?.arrayValue ?? []
        #expect(three.status == 200 && choices.map { $0["index"]?.intValue ?? -1 } == [0, 1, 2], "\(three.body)")
        let texts = choices.compactMap { $0["message"]?["content"]?.stringValue }
        #expect(texts.count == 3 && Set(texts).count > 1, "\(texts)")
        let one = try await http(.POST, server.base + "/v1/chat/completions", #"{\#(hi), "temperature": 1, "seed": 6, "max_tokens": 12}"#, headers: auth)
        #expect(one.json?["choices"]?.arrayValue?.first?["message"]?["content"]?.stringValue == texts[1], "choice 1 is seeded seed + 1")
        let prompt = three.json?["usage"]?["prompt_tokens"]?.intValue ?? 0, completion = three.json?["usage"]?["completion_tokens"]?.intValue ?? 0
        #expect(prompt == one.json?["usage"]?["prompt_tokens"]?.intValue && completion > 12, "\(three.body)")
        let streamed = try await http(.POST, server.base + "/v1/completions", #"{"prompt": "Once upon a time", "n": 2, "temperature": 1, "seed": 5, "max_tokens": 8, "stream": true}"#, headers: auth)
        var byIndex: [Int: String] = [:], finishes: [Int: String] = [:]
        for event in streamed.body.components(separatedBy: "\n\n") where event.hasPrefix("data: {") {
            guard let c = try JSON.parse(String(event.dropFirst(6)))["choices"]?.arrayValue?.first, let i = c["index"]?.intValue else { continue }
            byIndex[i, default: ""] += c["text"]?.stringValue ?? ""
            if let f = c["finish_reason"]?.stringValue { finishes[i] = f }
        }
        #expect(Set(byIndex.keys) == [0, 1] && finishes.count == 2 && streamed.body.hasSuffix("data: [DONE]\n\n"), "\(streamed.body)")
        let whole = try await http(.POST, server.base + "/v1/completions", #"{"prompt": "Once upon a time", "n": 2, "temperature": 1, "seed": 5, "max_tokens": 8}"#, headers: auth)
        #expect(whole.json?["choices"]?.arrayValue?.compactMap { $0["text"]?.stringValue } == [byIndex[0] ?? "", byIndex[1] ?? ""], "streamed and whole choices agree")

        // The implemented sampling fields act: a bias of 100 on "," (SmolLM2's token 28) makes it the greedy answer.
        let plainFirst = try await http(.POST, server.base + "/v1/completions", #"{"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0}"#, headers: auth)
        let forced = try await http(.POST, server.base + "/v1/completions", #"{"prompt": "The capital of France is", "max_tokens": 1, "temperature": 0, "logit_bias": {"28": 100}}"#, headers: auth)
        #expect(plainFirst.json?["choices"]?.arrayValue?.first?["text"]?.stringValue != ",")
        #expect(forced.status == 200 && forced.json?["choices"]?.arrayValue?.first?["text"]?.stringValue == ",", "\(forced.body)")
        let huge = String(repeating: "word ", count: 20_000)
        #expect(try await http(.POST, server.base + "/v1/completions", #"{"prompt": "\#(huge)"}"#, headers: auth).status == 413)
        let long = String(repeating: "the sea and the sky ", count: 2_000)  // past the 8,192-token context
        let tooLong = try await http(.POST, server.base + "/v1/completions", #"{"prompt": "\#(long)"}"#, headers: auth)
        #expect(tooLong.status == 400 && tooLong.json?["error"]?["code"]?.stringValue == "context_length_exceeded")

        // Adapters while serving.
        let dir = try Fixtures.temporaryDirectory("serve-load")
        try writeTestAdapter(FileSystem.join(dir, "a"))
        let added = try await http(.POST, server.base + "/v1/adapters", #"{"name": "late", "path": "\#(FileSystem.join(dir, "a"))"}"#, headers: auth)
        #expect(added.status == 200, "\(added.body)")
        #expect(try await http(.GET, server.base + "/v1/models", headers: auth).body.contains(#""id":"late""#))
        #expect(try await http(.POST, server.base + "/v1/chat/completions", chatBody("Hi", model: "late", maxTokens: 4), headers: auth).status == 200)
        let bad = try await http(.POST, server.base + "/v1/adapters", #"{"name": "x", "path": "/nonexistent"}"#, headers: auth)
        #expect(bad.status == 400 && bad.json?["error"]?["param"]?.stringValue == "path")
        #expect(try await http(.DELETE, server.base + "/v1/adapters/late", headers: auth).status == 200)
        #expect(try await http(.POST, server.base + "/v1/chat/completions", chatBody("Hi", model: "late"), headers: auth).status == 400)
        #expect(try await http(.DELETE, server.base + "/v1/adapters/SmolLM2-135M-Instruct.Q4_1.gguf", headers: auth).status == 404)
        #expect(try await http(.POST, server.base + "/v1/adapters", #"{"name": "y", "path": "\#(FileSystem.join(dir, "a"))"}"#).status == 401)
    }

    @Test("tools through a chat template that writes Hermes calls (Qwen 2.5's, --chat-template): required and named calls follow the tools' schemas, whole and streamed; calls and tool results go back to the template")
    func tools() async throws {
        let cases = try JSON.parse(String(contentsOfFile: FileSystem.join(Fixtures.repositoryRoot(), "Tests/QLoRATokenizerTests/Resources/chat_template_cases.json"), encoding: .utf8))
        let dir = try Fixtures.temporaryDirectory("tools")
        let templateFile = FileSystem.join(dir, "qwen2.5.jinja")
        try FileSystem.writeFileAtomically(templateFile, bytes: Array((cases["templates"]?["qwen2.5"]?["template"]?.stringValue ?? "").utf8))
        let server = try ServeProcess(["--chat-template", templateFile])
        defer { server.stop() }
        #expect(server.stderr.contains("tool calls: the chat template writes them in the hermes format"))
        let tools = #"[{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"], "additionalProperties": false}}}, {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"], "additionalProperties": false}}}]"#
        let ask = #""messages": [{"role": "user", "content": "What is the weather in Paris?"}], "temperature": 0, "max_tokens": 60, "tools": \#(tools)"#
        for (choice, name, finish) in [(#""required""#, nil as String?, "tool_calls"), (#"{"type": "function", "function": {"name": "get_time"}}"#, "get_time", "stop")] {
            for stream in [false, true] {
                let r = try await http(.POST, server.base + "/v1/chat/completions", #"{\#(ask), "tool_choice": \#(choice), "stream": \#(stream)}"#)
                var calls: [JSONValue] = [], reason: String?
                if stream {
                    for event in r.body.components(separatedBy: "\n\n") where event.hasPrefix("data: {") {
                        let c = try JSON.parse(String(event.dropFirst(6)))["choices"]?.arrayValue?.first
                        calls += c?["delta"]?["tool_calls"]?.arrayValue ?? []
                        #expect((c?["delta"]?["content"]?.stringValue ?? "").isEmpty, "a forced call streams no text: \(event)")
                        if let f = c?["finish_reason"]?.stringValue { reason = f }
                    }
                } else {
                    let c = r.json?["choices"]?.arrayValue?.first
                    calls = c?["message"]?["tool_calls"]?.arrayValue ?? []
                    reason = c?["finish_reason"]?.stringValue
                    #expect(c?["message"]?["content"] == .null, "\(r.body)")
                }
                #expect(r.status == 200 && calls.count == 1 && reason == finish, "\(choice) stream \(stream): \(r.body)")
                let f = calls.first?["function"]
                let called = f?["name"]?.stringValue ?? ""
                let arguments = try JSON.parse(f?["arguments"]?.stringValue ?? "")
                #expect(calls.first?["id"]?.stringValue?.hasPrefix("call_") == true && calls.first?["type"]?.stringValue == "function")
                #expect(name == nil ? ["get_weather", "get_time"].contains(called) : called == name, "\(r.body)")
                // The arguments follow the called tool's schema: its required keys, and nothing else.
                let keys = Set((arguments.objectValue ?? []).map(\.0))
                #expect(keys == (called == "get_weather" ? ["city", "unit"] : ["zone"]), "\(r.body)")
                if called == "get_weather" { #expect(["celsius", "fahrenheit"].contains(arguments["unit"]?.stringValue ?? "")) }
            }
        }
        // A forced call the length limit cuts: the call with its arguments as far as they got, finish_reason "length"
        // (as OpenAI answers), not the unfinished JSON as content.
        for stream in [false, true] {
            let named = #"{"type": "function", "function": {"name": "get_time"}}"#
            let r = try await http(.POST, server.base + "/v1/chat/completions",
                                   #"{\#(ask.replacingOccurrences(of: #""max_tokens": 60"#, with: #""max_tokens": 12"#)), "tool_choice": \#(named), "stream": \#(stream)}"#)
            var calls: [JSONValue] = [], reason: String?, content = ""
            if stream {
                for event in r.body.components(separatedBy: "\n\n") where event.hasPrefix("data: {") {
                    let c = try JSON.parse(String(event.dropFirst(6)))["choices"]?.arrayValue?.first
                    calls += c?["delta"]?["tool_calls"]?.arrayValue ?? []
                    content += c?["delta"]?["content"]?.stringValue ?? ""
                    if let f = c?["finish_reason"]?.stringValue { reason = f }
                }
            } else {
                let c = r.json?["choices"]?.arrayValue?.first
                calls = c?["message"]?["tool_calls"]?.arrayValue ?? []
                reason = c?["finish_reason"]?.stringValue
                content = c?["message"]?["content"]?.stringValue ?? ""
            }
            let f = calls.first?["function"]
            let arguments = f?["arguments"]?.stringValue ?? "?"
            #expect(r.status == 200 && reason == "length" && calls.count == 1 && f?["name"]?.stringValue == "get_time" && content.isEmpty,
                    "stream \(stream): \(r.body)")
            #expect(arguments.isEmpty || arguments.hasPrefix("{"), "the arguments as written: \(arguments)")
        }
        // A call and its result sent back: the template renders them (arguments as the JSON text OpenAI clients send).
        let roundTrip = #"{"messages": [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"unit\": \"celsius\"}"}}]}, {"role": "tool", "tool_call_id": "call_1", "content": "21 degrees, sunny"}], "tools": \#(tools), "max_tokens": 4}"#
        let back = try await http(.POST, server.base + "/v1/chat/completions", roundTrip)
        #expect(back.status == 200, "\(back.body)")
        // The prompt is transformers' rendering of the same conversation (chat_template_cases.json's qwen2.5
        // tool_call_roundtrip), sent as an OpenAI client sends it: arguments as JSON text, the tool message with its call's id.
        let fixture = try #require(cases["templates"]?["qwen2.5"]?["cases"]?.arrayValue?.first { $0["name"]?.stringValue == "tool_call_roundtrip" })
        let sent: [JSONValue] = (fixture["messages"]?.arrayValue ?? []).map { m in
            guard case let .object(fields) = m else { return m }
            var out: [(String, JSONValue)] = fields.map { key, value in
                guard key == "tool_calls" else { return (key, value) }
                return (key, .array((value.arrayValue ?? []).enumerated().map { j, c in
                    .object([("id", .string("call_\(j)")), ("type", .string("function")),
                             ("function", .object([("name", c["function"]?["name"] ?? .null), ("arguments", .string(JSON.serialize(c["function"]?["arguments"] ?? .null)))]))])
                }))
            }
            if m["role"]?.stringValue == "tool" { out.append(("tool_call_id", .string("call_0"))) }
            return .object(out)
        }
        let body = JSON.serialize(.object([("messages", .array(sent)), ("tools", fixture["tools"] ?? .null), ("max_tokens", .int(1))]))
        let same = try await http(.POST, server.base + "/v1/chat/completions", body)
        let tokenizer = try Tokenizer(jsonFile: FileSystem.join(Fixtures.repositoryRoot(), "Tests/QLoRATokenizerTests/Resources/smollm2-tokenizer.json"))
        let expected = tokenizer.encode(fixture["rendered"]?.stringValue ?? "").count
        #expect(same.status == 200 && same.json?["usage"]?["prompt_tokens"]?.intValue == expected, "\(expected) tokens expected: \(same.body)")
        // The errors: a tool_choice naming no tool, malformed tools, arguments that are not JSON, a schema keyword that cannot be enforced.
        for (body, param) in [(#"{\#(ask), "tool_choice": {"type": "function", "function": {"name": "nope"}}}"#, "tool_choice"),
                              (#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}"#, "tools"),
                              (#"{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1}}}}}], "tool_choice": "required"}"#, "tools"),
                              (#"{"messages": [{"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}, {"role": "user", "content": "x"}]}"#, "messages")] {
            let r = try await http(.POST, server.base + "/v1/chat/completions", body)
            #expect(r.status == 400 && r.json?["error"]?["param"]?.stringValue == param, "\(r.body)")
        }
    }

    @Test("eval judge against qlora serve: the default model judges two systems through the same protocol")
    func judgeThroughServe() async throws {
        try await withTaskExecutorPreference(ThreadExecutor.servers) { try await judgeThroughServeBody() }
    }

    func judgeThroughServeBody() async throws {
        let server = try ServeProcess([])
        defer { server.stop() }
        let dir = try Fixtures.temporaryDirectory("serve-judge")
        let a = FileSystem.join(dir, "a.jsonl"), b = FileSystem.join(dir, "b.jsonl"), out = FileSystem.join(dir, "j.jsonl")
        try FileSystem.writeFileAtomically(a, bytes: Array(#"{"question_id": 1, "question": "What is the capital of France?", "answer": "Paris."}"#.utf8 + [10]))
        try FileSystem.writeFileAtomically(b, bytes: Array(#"{"question_id": 1, "question": "What is the capital of France?", "answer": "Berlin."}"#.utf8 + [10]))
        let r = try await runQLoRAAsync(["eval", "judge", "--answers", a, b, "--judge", server.base + "/v1", "--max-tokens", "48", "--output", out, "--json"])
        #expect(r.status == 0, "\(r.stderr)")
        let lines = try JSON.lines(try FileSystem.readFile(out)).map { try JSON.parse(Array($0.bytes)) }
        #expect(lines.count == 2 && lines.allSatisfy { ($0["review"]?.stringValue?.isEmpty == false) && $0["judge"]?.stringValue == server.base + "/v1/chat/completions" })
        #expect(server.stderr.contains("completion_tokens="))
    }
}
