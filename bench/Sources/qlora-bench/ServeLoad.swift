// `qlora-bench serve-load`: a load test of an OpenAI-compatible chat server (ours or llama.cpp's
// llama-server) on loopback. For each level of concurrency, that many clients send streamed chat requests
// back to back (prompts and model ids taken in turn from the lists, so several adapters are mixed in
// flight), bounded by a count of requests and a time limit. Reports requests/s, generated tokens/s and
// the percentiles of time to first token and of total latency, and counts every status that is not 200.
import AsyncHTTPClient
import Foundation
import NIOCore
import NIOHTTP1
import QLoRA

struct LoadSample {
    let status: Int
    let firstToken: Double?
    let total: Double
    let tokens: Int
    /// What went wrong, when the status is not 200 (-1: no HTTP answer).
    var error: String? = nil
}

/// Hands out request numbers until the count or the time is up, and keeps the samples.
actor LoadState {
    private var next = 0
    private let limit: Int
    private let deadline: Double
    private(set) var samples: [LoadSample] = []

    init(limit: Int, seconds: Double) {
        self.limit = limit
        deadline = Clock.seconds() + seconds
    }

    func take() -> Int? {
        guard next < limit, Clock.seconds() < deadline else { return nil }
        defer { next += 1 }
        return next
    }

    func add(_ sample: LoadSample) { samples.append(sample) }
}

struct LoadSettings {
    var url: String
    var models: [String]
    var prompts: [String]
    var maxTokens: Int
    var apiKey: String?
}

/// One streamed chat request: status, time to the first piece of content, total time, and the tokens
/// generated (the usage count when the server sends one, else the pieces of content received).
func streamedChat(_ client: HTTPClient, _ s: LoadSettings, index: Int) async -> LoadSample {
    let start = Clock.seconds()
    // "lora:K" (llama-server): the base model with its adapter K at scale 1 for this request and every other adapter
    // at 0 (llama-server's per-request "lora" field); when the list names adapters so, a base request sets them all to 0.
    let name = s.models[index % s.models.count]
    var fields: [(String, JSONValue)] = [("model", .string(name.hasPrefix("lora:") ? s.models[0] : name))]
    let adapters = s.models.filter { $0.hasPrefix("lora:") }.compactMap { Int($0.dropFirst(5)) }
    if !adapters.isEmpty {
        let own = name.hasPrefix("lora:") ? Int(name.dropFirst(5)) : nil
        fields.append(("lora", .array(adapters.map { k in .object([("id", .int(k)), ("scale", .double(k == own ? 1 : 0))]) })))
    }
    let body = JSONValue.object(fields + [
        ("messages", .array([.object([("role", .string("user")), ("content", .string(s.prompts[index % s.prompts.count]))])])),
        ("max_tokens", .int(s.maxTokens)), ("temperature", .double(0)), ("stream", .bool(true)),
        ("stream_options", .object([("include_usage", .bool(true))])),
    ])
    var request = HTTPClientRequest(url: s.url + "/v1/chat/completions")
    request.method = .POST
    request.headers.add(name: "Content-Type", value: "application/json")
    // A new connection for every request, on every server: llama-server closes a connection after a streamed
    // reply without saying so, and a request sent on it fails ("I/O on closed channel").
    request.headers.add(name: "Connection", value: "close")
    if let key = s.apiKey { request.headers.add(name: "Authorization", value: "Bearer \(key)") }
    request.body = .bytes(ByteBuffer(string: JSON.serialize(body)))
    do {
        let response = try await client.execute(request, timeout: .seconds(600))
        let status = Int(response.status.code)
        guard status == 200 else {
            let text = (try? await response.body.collect(upTo: 1 << 20)).map { String(buffer: $0) } ?? ""
            return LoadSample(status: status, firstToken: nil, total: Clock.seconds() - start, tokens: 0, error: String(text.prefix(200)))
        }
        var pending: [UInt8] = []
        var first: Double?
        var pieces = 0
        var usage: Int?
        for try await chunk in response.body {
            pending += chunk.readableBytesView
            while let newline = pending.firstIndex(of: UInt8(ascii: "\n")) {
                let line = String(decoding: pending[..<newline], as: UTF8.self)
                pending.removeSubrange(...newline)
                guard line.hasPrefix("data: "), !line.hasPrefix("data: [DONE]"), let event = try? JSON.parse(String(line.dropFirst(6))) else { continue }
                if let n = event["usage"]?["completion_tokens"]?.intValue { usage = n }
                if let text = event["choices"]?.arrayValue?.first?["delta"]?["content"]?.stringValue, !text.isEmpty {
                    if first == nil { first = Clock.seconds() - start }
                    pieces += 1
                }
            }
        }
        return LoadSample(status: 200, firstToken: first, total: Clock.seconds() - start, tokens: usage ?? pieces)
    } catch {
        return LoadSample(status: -1, firstToken: nil, total: Clock.seconds() - start, tokens: 0, error: "\(error)")
    }
}

/// The value at percentile `p` (nearest rank) of `values`.
func percentile(_ values: [Double], _ p: Double) -> Double {
    guard !values.isEmpty else { return .nan }
    let sorted = values.sorted()
    let rank = Int((p / 100 * Double(sorted.count)).rounded(.up))
    return sorted[min(max(rank - 1, 0), sorted.count - 1)]
}

func serveLoad(_ settings: LoadSettings, clients levels: [Int], requestsPerClient: Int, minimumRequests: Int, seconds: Double, label: String) async throws {
    var configuration = HTTPClient.Configuration()
    configuration.connectionPool.concurrentHTTP1ConnectionsPerHostSoftLimit = max(64, (levels.max() ?? 1) * 2)
    let client = HTTPClient(eventLoopGroupProvider: .singleton, configuration: configuration)
    await runLevels(client, settings, levels: levels, requestsPerClient: requestsPerClient, minimumRequests: minimumRequests, seconds: seconds, label: label)
    try await client.shutdown()
}

func runLevels(_ client: HTTPClient, _ settings: LoadSettings, levels: [Int], requestsPerClient: Int, minimumRequests: Int, seconds: Double, label: String) async {
    // One request first, not counted: the server's first request may pay for lazy set-up.
    let warm = await streamedChat(client, settings, index: 0)
    guard warm.status == 200 else { fail("\(label): the warm-up request got status \(warm.status) from \(settings.url)") }
    // Each level starts where the last one stopped in the prompt list, so that a server's cache of earlier
    // prompts helps no more than the prompts' shared prefix (the chat template's system prompt) does.
    var offset = 1
    for clients in levels {
        let state = LoadState(limit: max(minimumRequests, clients * requestsPerClient), seconds: seconds)
        let first = offset
        let start = Clock.seconds()
        await withTaskGroup(of: Void.self) { group in
            for _ in 0..<clients {
                group.addTask {
                    while let i = await state.take() { await state.add(await streamedChat(client, settings, index: first + i)) }
                }
            }
        }
        let wall = Clock.seconds() - start
        let samples = await state.samples
        offset += samples.count
        let ok = samples.filter { $0.status == 200 }
        for (message, count) in Dictionary(grouping: samples.compactMap(\.error), by: { $0 }).mapValues(\.count) {
            FileHandle.standardError.write(Data("serve-load: \(label), \(clients) clients: \(count)x \(message)\n".utf8))
        }
        let tokens = ok.reduce(0) { $0 + $1.tokens }
        let ttft = ok.compactMap(\.firstToken), total = ok.map(\.total)
        let row = JSONValue.object([
            ("server", .string(label)), ("clients", .int(clients)), ("requests", .int(samples.count)), ("ok", .int(ok.count)),
            ("status_429", .int(samples.filter { $0.status == 429 }.count)),
            ("errors", .int(samples.filter { $0.status != 200 && $0.status != 429 }.count)),
            ("seconds", .double(wall)), ("requests_per_second", .double(Double(ok.count) / wall)),
            ("generated_tokens", .int(tokens)), ("tokens_per_second", .double(Double(tokens) / wall)),
            ("ttft_p50", .double(percentile(ttft, 50))), ("ttft_p90", .double(percentile(ttft, 90))), ("ttft_p99", .double(percentile(ttft, 99))),
            ("total_p50", .double(percentile(total, 50))), ("total_p90", .double(percentile(total, 90))), ("total_p99", .double(percentile(total, 99))),
        ])
        print(JSON.serialize(row))
        fflush(stdout)
    }
}

/// Runs `serve-load` from the command line (main.swift's arguments).
func serveLoadCommand() throws {
    guard let url = stringOption("--url") else {
        fail("usage: qlora-bench serve-load --url http://127.0.0.1:PORT --prompts FILE [--models a,b,lora:0,...] [--clients 1,4,16] [--requests-per-client 4] [--min-requests 8] [--seconds 120] [--max-tokens 64] [--label NAME]")
    }
    guard let promptFile = stringOption("--prompts") else { fail("serve-load: --prompts FILE (JSON lines with text, prompt or question)") }
    let prompts = try JSON.completeLines(FileSystem.readFile(promptFile)).compactMap { _, line -> String? in
        guard let j = try? JSON.parse(Array(line)) else { return nil }
        return j["text"]?.stringValue ?? j["prompt"]?.stringValue ?? j["question"]?.stringValue
    }
    guard !prompts.isEmpty else { fail("serve-load: no prompts in \(promptFile)") }
    let models = (stringOption("--models") ?? "default").split(separator: ",").map(String.init)
    let levels = (stringOption("--clients") ?? "1,4,16").split(separator: ",").compactMap { Int($0) }
    let settings = LoadSettings(url: url, models: models, prompts: prompts, maxTokens: option("--max-tokens", 64),
                                apiKey: Environment.get("QLORA_API_KEY"))
    let label = stringOption("--label") ?? url
    let seconds = Double(option("--seconds", 120))
    let perClient = option("--requests-per-client", 4), minimum = option("--min-requests", 8)
    final class Outcome: @unchecked Sendable { var error: Error? }
    let outcome = Outcome()
    let done = DispatchSemaphore(value: 0)
    Task {
        do { try await serveLoad(settings, clients: levels, requestsPerClient: perClient, minimumRequests: minimum, seconds: seconds, label: label) }
        catch { outcome.error = error }
        done.signal()
    }
    done.wait()
    if let error = outcome.error { throw error }
}
