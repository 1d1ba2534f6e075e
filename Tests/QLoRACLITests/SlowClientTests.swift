// `qlora serve` against clients that send their body a byte at a time or open connections and send nothing
// (issue 28, resource bounds): they hold no generation slot and do not block other clients; a request body exactly
// at the cap is read.
import Foundation
import QLoRA
import QLoRATestSupport
import Testing

@Suite("command line: serve under slow clients")
struct SlowClientTests {
    @Test("slow and silent connections do not block a normal request; a body at the cap is read")
    func slowClients() async throws {
        try await withTaskExecutorPreference(ThreadExecutor.servers) { try await slowClientsBody() }
    }

    func slowClientsBody() async throws {
        let server = try ServeProcess(["--max-body", "4096"])
        defer { server.stop() }
        // Eight connections that send a request's head and a byte of body a second, and eight that send nothing,
        // all held open for 40 s, in one process group killed at the end.
        let head = "POST /v1/completions HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\nContent-Length: 200\\r\\n\\r\\n"
        // (bash builtins only, read -t as the pause: no child process keeps a socket open once the shells are killed)
        let slow = "exec 3<>/dev/tcp/127.0.0.1/\(server.port); printf '\(head)' >&3; for i in {1..40}; do printf '{' >&3 || exit 0; read -t 1 -u 3; done"
        let silent = "exec 3<>/dev/tcp/127.0.0.1/\(server.port); read -t 40 -u 3"
        let script = (Array(repeating: "(\(slow)) &", count: 8) + Array(repeating: "(\(silent)) &", count: 8)).joined(separator: "\n") + "\nwait"
        let holder = Process()
        holder.executableURL = URL(fileURLWithPath: "/bin/bash")
        holder.arguments = ["-c", script]
        try holder.run()
        defer { holder.terminate(); _ = system("pkill -P \(holder.processIdentifier) 2>/dev/null") }
        try await Task.sleep(nanoseconds: 1_000_000_000)
        // A normal request completes while they hang on.
        let start = Date()
        let reply = try await http(.POST, server.base + "/v1/completions", #"{"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}"#)
        #expect(reply.status == 200, "\(reply.body)")
        #expect(Date().timeIntervalSince(start) < 20, "took \(Date().timeIntervalSince(start)) s behind the slow clients")
        // A body exactly at the cap (4096 bytes) is read; one byte more is refused.
        let pad = { (n: Int) in String(repeating: " ", count: n) }
        let core = #"{"prompt": "Hi", "max_tokens": 1}"#
        let atCap = try await http(.POST, server.base + "/v1/completions", core + pad(4096 - core.utf8.count))
        #expect(atCap.status == 200, "\(atCap.body)")
        let over = try await http(.POST, server.base + "/v1/completions", core + pad(4097 - core.utf8.count))
        #expect(over.status == 413, "\(over.body)")
        #expect(try await http(.GET, server.base + "/health").status == 200)
    }
}
