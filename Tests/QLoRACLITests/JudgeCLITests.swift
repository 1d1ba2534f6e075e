// `qlora eval judge` against a small OpenAI-protocol server that the test starts on loopback (Hummingbird):
// both orders of every pair, the API key sent and never written, requests bounded in flight, resuming,
// retries after 503, a judge that answers garbage, one that never answers, one that refuses the key, and
// judging by hand over standard input.
import Dispatch
import Foundation
import HTTPTypes
import Hummingbird
import Logging
import QLoRA
import QLoRATestSupport
import Testing

/// A judge that follows a rule picked by the request's "model": "longer" prefers the longer answer (3 when
/// equal), "garbage" ends its review without a verdict, "slow" answers after 3 s, "refuse" answers 401.
/// The first `failures` requests get 503 with Retry-After: 0.
final class FakeJudge: @unchecked Sendable {
    private let lock = NSLock()
    private var _requests: [JSONValue] = []
    private var _authorizations: [String] = []
    private var inFlight = 0
    private var _maxInFlight = 0
    private var failures: Int
    private(set) var port = 0
    private var task: Task<Void, Error>?

    init(failures: Int = 0) { self.failures = failures }

    var requests: [JSONValue] { lock.withLock { _requests } }
    var authorizations: [String] { lock.withLock { _authorizations } }
    var maxInFlight: Int { lock.withLock { _maxInFlight } }

    /// Judges by the rule: the longer answer wins.
    static func longer(_ user: String) -> Int {
        func between(_ a: String, _ b: String) -> String {
            guard let r = user.range(of: a), let e = user.range(of: b, range: r.upperBound..<user.endIndex) else { return "" }
            return String(user[r.upperBound..<e.lowerBound])
        }
        let one = between("[The Start of Assistant 1's Answer]\n", "\n\n[The End of Assistant 1's Answer]")
        let two = between("[The Start of Assistant 2's Answer]\n", "\n\n[The End of Assistant 2's Answer]")
        return one.count > two.count ? 1 : one.count < two.count ? 2 : 3
    }

    func start() async throws {
        let router = Router()
        router.post("v1/chat/completions") { request, _ -> Response in
            let body = try await request.body.collect(upTo: 1 << 22)
            let value = try JSON.parse(Array(body.readableBytesView))
            let fail: Bool = self.lock.withLock {
                self._requests.append(value)
                self._authorizations.append(request.headers[.authorization] ?? "")
                self.inFlight += 1
                self._maxInFlight = max(self._maxInFlight, self.inFlight)
                if self.failures > 0 { self.failures -= 1; return true }
                return false
            }
            defer { self.lock.withLock { self.inFlight -= 1 } }
            func respond(_ status: HTTPResponse.Status, _ json: JSONValue, _ extra: HTTPFields = [:]) -> Response {
                var headers: HTTPFields = [.contentType: "application/json"]
                headers.append(contentsOf: extra)
                return Response(status: status, headers: headers, body: ResponseBody(byteBuffer: ByteBuffer(string: JSON.serialize(json))))
            }
            func error(_ message: String) -> JSONValue { .object([("error", .object([("message", .string(message)), ("type", .string("test"))]))]) }
            if fail { return respond(.serviceUnavailable, error("busy"), [HTTPField.Name("Retry-After")!: "0"]) }
            let model = value["model"]?.stringValue ?? ""
            let user = value["messages"]?.arrayValue?.last?["content"]?.stringValue ?? ""
            let review: String
            switch model {
            case "refuse": return respond(.unauthorized, error("Incorrect API key provided"))
            case "garbage": review = "Both answers have merits.\nI would rather not choose."
            case "slow":
                try await Task.sleep(nanoseconds: 3_000_000_000)
                review = "late\n1"
            default:
                try await Task.sleep(nanoseconds: 40_000_000)  // long enough for requests to overlap
                review = "Assistant \(Self.longer(user)) gives more detail.\n\(Self.longer(user))"
            }
            return respond(.ok, .object([
                ("id", .string("chatcmpl-test")), ("object", .string("chat.completion")), ("model", .string(model)),
                ("choices", .array([.object([("index", .int(0)), ("message", .object([("role", .string("assistant")), ("content", .string(review))])), ("finish_reason", .string("stop"))])])),
                ("usage", .object([("prompt_tokens", .int(user.count / 4)), ("completion_tokens", .int(8)), ("total_tokens", .int(user.count / 4 + 8))])),
            ]))
        }
        let (stream, continuation) = AsyncStream<Int>.makeStream()
        var logger = Logger(label: "fake-judge")
        logger.logLevel = .critical
        let app = Application(router: router, configuration: .init(address: .hostname("127.0.0.1", port: 0)),
                              onServerRunning: { channel in continuation.yield(channel.localAddress?.port ?? 0) }, logger: logger)
        // On a thread of its own: the cooperative pool may be busy with other tests' arithmetic for minutes.
        task = Task(executorPreference: ThreadExecutor.servers) { try await app.run() }
        for await p in stream {
            port = p
            break
        }
    }

    func stop() {
        task?.cancel()
    }

    var url: String { "http://127.0.0.1:\(port)/v1" }
}

/// runQLoRA off the cooperative threads, which the in-process server needs.
func runQLoRAAsync(_ arguments: [String], environment: [String: String] = [:], input: String? = nil) async throws -> (status: Int32, stdout: String, stderr: String) {
    try await withCheckedThrowingContinuation { c in
        DispatchQueue.global().async {
            c.resume(with: Result { try runQLoRA(arguments, environment: environment, input: input) })
        }
    }
}

@Suite("command line: eval judge")
struct JudgeCLITests {
    static let dir = FileSystem.join(Fixtures.repositoryRoot(), "Tests/QLoRAEvaluationTests/Resources/judge")
    static let guanaco = FileSystem.join(dir, "7b-guanaco-vicuna-generations-head.jsonl")
    static let chatgpt = FileSystem.join(dir, "answer_gpt35_head.jsonl")
    static let questions = FileSystem.join(dir, "vicuna_questions_head.jsonl")
    static let key = "sk-test-0123456789abcdef"

    /// A third system: short answers to the same three questions.
    static func terse(_ dir: String) throws -> String {
        let path = FileSystem.join(dir, "terse.jsonl")
        let lines = (1...3).map { #"{"question_id": \#($0), "answer": "Sleep more."}"# }
        try FileSystem.writeFileAtomically(path, bytes: Array((lines.joined(separator: "\n") + "\n").utf8))
        return path
    }

    static func lines(_ path: String) throws -> [JSONValue] {
        try JSON.lines(try FileSystem.readFile(path)).map { try JSON.parse(Array($0.bytes)) }
    }

    @Test("three systems, both orders, the paper's prompt: every verdict follows the judge; the key is sent, never written; eval elo ranks them")
    func tournament() async throws {
        let judge = FakeJudge()
        try await judge.start()
        defer { judge.stop() }
        let dir = try Fixtures.temporaryDirectory("judge")
        let out = FileSystem.join(dir, "judgments.jsonl")
        let args = ["eval", "judge", "--answers", Self.guanaco, "chatgpt=\(Self.chatgpt)", try Self.terse(dir), "--questions", Self.questions,
                    "--judge", judge.url, "--judge-model", "longer", "--judge-prompts", FileSystem.join(Self.dir, "qlora_vicuna_prompt_threeclass.jsonl"),
                    "--output", out, "--concurrency", "3", "--json"]
        let r = try await runQLoRAAsync(args, environment: ["OPENAI_API_KEY": Self.key])
        #expect(r.status == 0, "\(r.stderr)")
        let summary = try JSON.parse(r.stdout)
        #expect(summary["judged_now"]?.intValue == 18)  // 3 pairs x 3 questions x 2 orders
        #expect(summary["no_verdict_now"]?.intValue == 0 && summary["failed_now"]?.intValue == 0)
        let judged = try Self.lines(out)
        #expect(judged.count == 18)
        var seen = Set<String>()
        for j in judged {
            let a = j["model_a"]!.stringValue!, b = j["model_b"]!.stringValue!
            seen.insert("\(j["question_id"]!.intValue!) \(a) \(b)")
            // The fake judge's rule, worked out again from the answer files: the longer answer wins.
            #expect(j["judge"]?.stringValue == "\(judge.url)/chat/completions" && j["judge_model"]?.stringValue == "longer")
            #expect(j["winner"]?.stringValue == ["model_a", "model_b", "tie"][j["verdict"]!.intValue! - 1])
        }
        // Both orders of every pair on every question.
        #expect(seen.count == 18)
        for q in 1...3 { #expect(seen.contains("\(q) chatgpt terse") && seen.contains("\(q) terse chatgpt")) }
        // Every request: the paper's prompt and system message, temperature 0.2, the key as a bearer token.
        let requests = judge.requests
        #expect(requests.count == 18)
        for q in requests {
            #expect(q["temperature"]?.doubleValue == 0.2 && q["model"]?.stringValue == "longer" && q["max_tokens"]?.intValue == 1024)
            let messages = q["messages"]!.arrayValue!
            #expect(messages[0]["role"]?.stringValue == "system" && messages[0]["content"]?.stringValue == "You are a helpful and precise assistant for checking the quality of the answer.")
            #expect(messages[1]["content"]!.stringValue!.hasPrefix("[Question]\nHow can I") || messages[1]["content"]!.stringValue!.hasPrefix("[Question]\nWhat are"))
        }
        #expect(judge.authorizations.allSatisfy { $0 == "Bearer \(Self.key)" })
        #expect(judge.maxInFlight >= 2 && judge.maxInFlight <= 3, "\(judge.maxInFlight) requests in flight at once")
        let written = String(decoding: try FileSystem.readFile(out), as: UTF8.self)
        #expect(!written.contains(Self.key) && !r.stdout.contains(Self.key) && !r.stderr.contains(Self.key))
        // The terse system never wins on length; chatgpt vs guanaco goes to whichever wrote more on each question.
        for j in judged where j["winner"]?.stringValue != "tie" {
            let winner = j["winner"]!.stringValue! == "model_a" ? j["model_a"]!.stringValue! : j["model_b"]!.stringValue!
            #expect(winner != "terse")
        }
        let elo = try await runQLoRAAsync(["eval", "elo", "--judgments", out, "--orderings", "200", "--json"])
        #expect(elo.status == 0, "\(elo.stderr)")
        let ratings = try JSON.parse(elo.stdout)["ratings"]!.arrayValue!
        #expect(ratings.last?["model"]?.stringValue == "terse" && ratings.count == 3)

        // Resume: the last 5 lines lost (and a partial line left by a crash): only those 5 are asked again.
        let kept = written.split(separator: "\n").dropLast(5).joined(separator: "\n") + "\n{\"question_id\": 3, \"mo"
        try FileSystem.writeFileAtomically(out, bytes: Array(kept.utf8))
        let again = try await runQLoRAAsync(args, environment: ["OPENAI_API_KEY": Self.key])
        #expect(again.status == 0, "\(again.stderr)")
        #expect(try JSON.parse(again.stdout)["judged_now"]?.intValue == 5)
        #expect(judge.requests.count == 23)
        #expect(try Self.lines(out).count == 18)
        #expect(again.stderr.contains("resuming: 13 of 18 matches already judged") && again.stderr.contains("removed a partial last line"))
        // Nothing left: no request at all.
        let done = try await runQLoRAAsync(args, environment: ["OPENAI_API_KEY": Self.key])
        #expect(done.status == 0 && judge.requests.count == 23)
    }

    @Test("503 is retried with backoff; garbage is written without a verdict and counted; eval elo skips it")
    func retriesAndGarbage() async throws {
        let judge = FakeJudge(failures: 3)
        try await judge.start()
        defer { judge.stop() }
        let dir = try Fixtures.temporaryDirectory("judge-retry")
        let out = FileSystem.join(dir, "j.jsonl")
        let base = ["eval", "judge", "--answers", Self.guanaco, Self.chatgpt, "--judge", judge.url, "--output", out, "--backoff", "0.01", "--concurrency", "1", "--json"]
        let r = try await runQLoRAAsync(base + ["--judge-model", "longer", "--limit", "1"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(try JSON.parse(r.stdout)["judged_now"]?.intValue == 2)
        #expect(judge.requests.count == 5)  // 3 refused with 503, then the 2 matches

        let garbage = FileSystem.join(dir, "g.jsonl")
        let g = try await runQLoRAAsync(["eval", "judge", "--answers", Self.guanaco, Self.chatgpt, "--judge", judge.url, "--judge-model", "garbage", "--output", garbage, "--limit", "2"])
        #expect(g.status == 0, "\(g.stderr)")
        #expect(g.stdout.contains("0 judged, 4 without a verdict") && g.stdout.contains("no verdict on the last line: 4"))
        let lines = try Self.lines(garbage)
        #expect(lines.count == 4 && lines.allSatisfy { $0["winner"] == .null && $0["error"] != nil && $0["review"]?.stringValue?.hasSuffix("not choose.") == true })
        // With the good file beside it: the 2 battles count, the 4 without a verdict are skipped and said so.
        let elo = try await runQLoRAAsync(["eval", "elo", "--judgments", out, garbage, "--orderings", "10", "--json"])
        #expect(elo.status == 0, "\(elo.stderr)")
        let e = try JSON.parse(elo.stdout)
        #expect(e["battles"]?.intValue == 2 && e["skipped_without_verdict"]?.intValue == 4)
    }

    @Test("a judge that never answers: a timeout after the retries, one error line, nothing written; 401 stops at once without the key")
    func timeoutAndRefusal() async throws {
        let judge = FakeJudge()
        try await judge.start()
        defer { judge.stop() }
        let dir = try Fixtures.temporaryDirectory("judge-timeout")
        let out = FileSystem.join(dir, "j.jsonl")
        let slow = try await runQLoRAAsync(["eval", "judge", "--answers", Self.guanaco, Self.chatgpt, "--judge", judge.url, "--judge-model", "slow",
                                            "--output", out, "--limit", "1", "--timeout", "0.3", "--retries", "1", "--backoff", "0.01"])
        #expect(slow.status == 1)
        let errors = slow.stderr.split(separator: "\n").filter { $0.hasPrefix("error: ") }
        #expect(errors.count == 1 && errors[0].contains("2 matches got no answer") && errors[0].contains("gave no answer within 0.3 s")
                && errors[0].contains("gave up after 2 attempts") && errors[0].contains("run the same command again"), "\(slow.stderr)")
        #expect(try FileSystem.readFile(out).isEmpty)

        let refused = try await runQLoRAAsync(["eval", "judge", "--answers", Self.guanaco, Self.chatgpt, "--judge", judge.url, "--judge-model", "refuse", "--output", out],
                                              environment: ["MY_KEY": Self.key])
        #expect(refused.status == 1)
        #expect(refused.stderr.contains("error: \(judge.url)/chat/completions answered HTTP 401: Incorrect API key provided"), "\(refused.stderr)")
        func refusedCalls() -> [String] { zip(judge.requests, judge.authorizations).filter { $0.0["model"]?.stringValue == "refuse" }.map(\.1) }
        let sent = refusedCalls().count
        #expect(sent >= 1 && sent <= 4)  // it stopped instead of sending all six (4 were in flight at once)
        #expect(refusedCalls().allSatisfy { $0.isEmpty })  // OPENAI_API_KEY is not set: no Authorization header
        #expect(!refused.stderr.contains(Self.key) && !refused.stdout.contains(Self.key))
        // --api-key-env names another variable: that one is sent.
        _ = try await runQLoRAAsync(["eval", "judge", "--answers", Self.guanaco, Self.chatgpt, "--judge", judge.url, "--judge-model", "refuse", "--output", out,
                                     "--api-key-env", "MY_KEY", "--concurrency", "1"], environment: ["MY_KEY": Self.key])
        #expect(refusedCalls().count == sent + 1 && refusedCalls().last == "Bearer \(Self.key)")
        // Nothing reachable: a clear error naming the URL.
        let nowhere = try await runQLoRAAsync(["eval", "judge", "--answers", Self.guanaco, Self.chatgpt, "--judge", "http://127.0.0.1:1/v1", "--output", out, "--retries", "0", "--limit", "1"])
        #expect(nowhere.status == 1 && nowhere.stderr.contains("cannot reach http://127.0.0.1:1/v1/chat/completions"), "\(nowhere.stderr)")
    }

    @Test("--judge human: each pair once in random order, verdicts from standard input (bad input asked again), q stops")
    func human() async throws {
        let dir = try Fixtures.temporaryDirectory("judge-human")
        let out = FileSystem.join(dir, "j.jsonl")
        let args = ["eval", "judge", "--answers", "g=\(Self.guanaco)", "c=\(Self.chatgpt)", "--questions", Self.questions, "--judge", "human", "--output", out, "--seed", "3"]
        let r = try await runQLoRAAsync(args, input: "1\nmaybe\n3\nq\n")
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout.contains("=== match 1 of 3: question 1 (generic)") && r.stdout.contains("How can I improve my time management skills?"))
        #expect(r.stdout.contains("type 1, 2, 3, s or q"))
        let lines = try Self.lines(out)
        #expect(lines.count == 2 && lines.allSatisfy { $0["judge"]?.stringValue == "human" })
        #expect(lines[0]["verdict"]?.intValue == 1 && lines[1]["winner"]?.stringValue == "tie")
        // Answer 1 as shown is model_a: the file records the order the person saw.
        let shownFirst = r.stdout.components(separatedBy: "--- Answer 1 ---\n")[1]
        let firstIsGuanaco = shownFirst.hasPrefix("Time management is a crucial skill")
        #expect(lines[0]["model_a"]?.stringValue == (firstIsGuanaco ? "g" : "c"))
        // Resumed: only the third question is shown.
        let rest = try await runQLoRAAsync(args, input: "2\n")
        #expect(rest.stdout.contains("=== match 1 of 1: question 3"))
        #expect(try Self.lines(out).count == 3)
        // Answers without question text and no --questions: one error naming the file and the fix.
        let bare = try await runQLoRAAsync(["eval", "judge", "--answers", Self.chatgpt, "x=\(Self.chatgpt)", "--judge", "human", "--output", FileSystem.join(dir, "k.jsonl")])
        #expect(bare.status == 1 && bare.stderr.contains("no question text for question_id 1") && bare.stderr.contains("give --questions"))
        // A malformed answer line: file:line.
        let broken = FileSystem.join(dir, "broken.jsonl")
        try FileSystem.writeFileAtomically(broken, bytes: Array("{\"question_id\": 1, \"answer\": \"x\"}\n{\"answer\": \"y\"}\n".utf8))
        let b = try await runQLoRAAsync(["eval", "judge", "--answers", Self.guanaco, broken, "--judge", "human", "--output", FileSystem.join(dir, "k.jsonl")])
        #expect(b.status == 1 && b.stderr.contains("error: \(broken):2: no \"question_id\""), "\(b.stderr)")
    }
}
