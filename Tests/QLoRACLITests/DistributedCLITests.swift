// Data-parallel training over MPI (`mpirun -np 2 qlora train`, OpenMPI on loopback; scripts/setup.sh installs it):
// two ranks, each running half of every step's micro-batches, end with the loss and the adapter of one process
// over the same global batches; a rank killed mid-run ends the run with an error instead of a hang.
import QLoRA
import QLoRATestSupport
import Testing

private let model = FileSystem.join(Fixtures.repositoryRoot(), "Tests/QLoRAModelTests/Resources/tiny-qwen3.gguf")

private func trainArguments(_ data: String, _ out: String, steps: Int = 4) -> [String] {
    ["train", "--model", model, "--data", data, "--output", out, "--lora-r", "4", "--max-steps", "\(steps)", "--batch-size", "2",
     "--grad-accum", "4", "--max-seq-len", "48", "--val-split", "0", "--seed", "3", "--lora-dropout", "0.1", "--template", "guanaco", "--json"]
}

/// The largest |difference| between the adapters written in two output folders, and the largest |value| of the first.
func adapterDifference(_ a: String, _ b: String) throws -> (worst: Float, scale: Float) {
    let x = try SafetensorsFile(path: FileSystem.join(a, "adapter_model.safetensors"))
    let y = try SafetensorsFile(path: FileSystem.join(b, "adapter_model.safetensors"))
    var worst: Float = 0, scale: Float = 0
    for name in x.names {
        let u = x.tensor(name)!.values(as: Float.self), v = y.tensor(name)!.values(as: Float.self)
        worst = max(worst, zip(u, v).map { abs($0 - $1) }.max() ?? 0)
        scale = max(scale, u.map(abs).max() ?? 0)
    }
    return (worst, scale)
}

@Suite("command line: data-parallel training")
struct DistributedCLITests {
    static let mpirun = ["/usr/bin/mpirun", "/usr/local/bin/mpirun"].first(where: FileSystem.exists) ?? "mpirun"
    static let launch = ["--allow-run-as-root", "--oversubscribe", "-np", "2"]

    @Test("two ranks give one process's loss and adapter (to f32 summation order), rank 0 alone writing")
    func twoRanks() throws {
        let data = try TrainCLITests.dataset()
        let dir = try Fixtures.temporaryDirectory("mpi")
        let one = FileSystem.join(dir, "one"), two = FileSystem.join(dir, "two")
        let a = try runQLoRA(trainArguments(data, one))
        #expect(a.status == 0, "\(a.stderr)")
        let binary = FileSystem.join(FileSystem.directoryName(CommandLine.arguments[0]), "qlora")
        let b = try runProgram(Self.mpirun, Self.launch + [binary] + trainArguments(data, two))
        #expect(b.status == 0, "mpirun: \(b.stderr)")
        #expect(b.stderr.contains("data parallel: 2 ranks"), "\(b.stderr)")
        // One JSON report (rank 0's), the same final loss.
        let la = try JSON.parse(a.stdout)["final_loss"]?.doubleValue ?? .nan, lb = try JSON.parse(b.stdout)["final_loss"]?.doubleValue ?? -1
        #expect(abs(la - lb) <= 1e-6 * abs(la), "loss \(la) vs \(lb)")
        let (worst, scale) = try adapterDifference(one, two)
        #expect(worst <= 1e-5 * scale, "adapter differs by \(worst) (max |value| \(scale))")
        // Rank 0 wrote the run's files; the metrics have one line per step, with the all-reduce's time.
        let metrics = String(decoding: try FileSystem.readFile(FileSystem.join(two, "metrics.jsonl")), as: UTF8.self)
        #expect(metrics.split(separator: "\n").count == 4)
        #expect(metrics.contains("allreduce_seconds"))
        // A checkpoint of two ranks resumes in one process (the checkpoint does not depend on the rank count).
        let mixed = FileSystem.join(dir, "mixed")
        let half = try runProgram(Self.mpirun, Self.launch + [binary] + trainArguments(data, mixed, steps: 2) + ["--save-every", "1"])
        #expect(half.status == 0, "\(half.stderr)")
        let rest = try runQLoRA(trainArguments(data, mixed) + ["--resume"])
        #expect(rest.status == 0, "\(rest.stderr)")
        let resumedWorst = try adapterDifference(one, mixed).worst
        #expect(resumedWorst <= 1e-5 * scale, "resumed adapter differs by \(resumedWorst)")
    }

    @Test("a rank killed mid-run ends the run with an error, not a hang")
    func killedRank() throws {
        let data = try TrainCLITests.dataset()
        let out = FileSystem.join(try Fixtures.temporaryDirectory("mpi-kill"), "out")
        let binary = FileSystem.join(FileSystem.directoryName(CommandLine.arguments[0]), "qlora")
        func quote(_ s: String) -> String { "'" + s + "'" }
        let command = ([Self.mpirun] + Self.launch + [binary] + trainArguments(data, out, steps: 1_000_000)).map(quote).joined(separator: " ")
        // mpirun in the background; once both ranks train (metrics appear), SIGKILL one rank; at most 60 s in all.
        let script = """
            timeout 60 \(command) & T=$!
            for i in $(seq 100); do [ -s \(quote(out))/metrics.jsonl ] && break; sleep 0.2; done
            R=$(pgrep -P "$(pgrep -P $T)" -f 'qlora train' | tail -1)
            echo "killing rank process $R" >&2
            kill -9 $R
            wait $T; echo "status $?"
            """
        let r = try runProgram("/bin/sh", ["-c", script])
        let status = r.stdout.split(separator: "\n").last.flatMap { Int($0.dropFirst("status ".count)) } ?? -1
        #expect(status != 0 && status != 124, "status \(status) (124: it hung until the timeout); \(r.stderr.suffix(600))")
        // mpirun names the rank that died and ends the others (OpenMPI: "process rank 1 ... exited on signal 9").
        #expect(r.stderr.contains("exited on signal 9"), "\(r.stderr.suffix(600))")
        #expect(r.stderr.contains("killing rank process"), "\(r.stderr.suffix(600))")
    }
}
