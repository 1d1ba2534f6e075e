// Fault injection in training (issue 28): a run SIGKILLed at a random moment, or half-way through writing a
// checkpoint (QLORA_FAULT_KILL_IN_CHECKPOINT), then resumed, ends with the adapter of an uninterrupted run, byte
// for byte. Three trials here (bench/fault_trials.sh runs twenty on the default model).
import QLoRA
import QLoRATestSupport
import Testing

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

private let model = FileSystem.join(Fixtures.repositoryRoot(), "Tests/QLoRAModelTests/Resources/tiny-qwen3.gguf")

private func arguments(_ data: String, _ out: String) -> [String] {
    ["train", "--model", model, "--data", data, "--output", out, "--lora-r", "4", "--max-steps", "40", "--batch-size", "2",
     "--grad-accum", "2", "--max-seq-len", "48", "--val-split", "0", "--seed", "5", "--lora-dropout", "0.1", "--template", "guanaco",
     "--save-every", "1", "--json"]
}

@Suite("fault injection in training")
struct FaultInjectionTests {
    /// Starts the run in the background with `environment`, SIGKILLs it after `delay` microseconds (if it still runs),
    /// and waits for it to end. Returns whether the kill landed before the run finished.
    func killed(_ data: String, _ out: String, delay: UInt32, environment: String = "") throws -> Bool {
        let binary = FileSystem.join(FileSystem.directoryName(CommandLine.arguments[0]), "qlora")
        let pidFile = out + ".pid"
        let args = arguments(data, out).map { "'\($0)'" }.joined(separator: " ")
        _ = system("\(environment) '\(binary)' \(args) >/dev/null 2>&1 & echo $! > '\(pidFile)'")
        let pid = Int32(String(decoding: try FileSystem.readFile(pidFile), as: UTF8.self).trimmingCharacters(in: .whitespacesAndNewlines))!
        // Wait `delay` (or until the run ends by itself, as under the checkpoint fault), then kill.
        var waited: UInt32 = 0
        while waited < delay && kill(pid, 0) == 0 {
            let slice = min(UInt32(5_000), delay - waited)
            usleep(slice)
            waited += slice
        }
        kill(pid, SIGKILL)
        var polls = 0
        while kill(pid, 0) == 0 && polls < 1000 { usleep(10_000); polls += 1 }
        // The shell's child is gone; reap nothing more (system's shell already returned).
        return !FileSystem.exists(FileSystem.join(out, "adapter_model.safetensors"))
    }

    @Test("killed during a checkpoint write or at random moments, then resumed: the uninterrupted adapter, byte for byte")
    func trials() throws {
        let data = try TrainCLITests.dataset()
        let dir = try Fixtures.temporaryDirectory("faults")
        let reference = FileSystem.join(dir, "reference")
        let straight = try runQLoRA(arguments(data, reference))
        #expect(straight.status == 0, "\(straight.stderr)")
        let expected = try FileSystem.readFile(FileSystem.join(reference, "adapter_model.safetensors"))
        var rng = SeededRandom(seed: UInt64(time(nil)))
        // Trial 0 dies inside checkpoint 7's write (optimizer.bin written, trainer_state.json not, folder not renamed);
        // the others at a random moment of the run.
        for trial in 0..<3 {
            let out = FileSystem.join(dir, "trial\(trial)")
            let delay = trial == 0 ? 20_000_000 : UInt32(20_000 + Double.random(in: 0..<1, using: &rng) * 300_000)
            let wasKilled = try killed(data, out, delay: delay, environment: trial == 0 ? "QLORA_FAULT_KILL_IN_CHECKPOINT=7" : "")
            if trial == 0 {
                #expect(wasKilled, "the run finished before the injected kill")
                #expect(Trainer.checkpoints(in: out).last?.0 == 6, "\(Trainer.checkpoints(in: out))")
            }
            let resumed = try runQLoRA(arguments(data, out) + ["--resume"])
            #expect(resumed.status == 0, "trial \(trial) (killed after \(delay) us): \(resumed.stderr)")
            let got = try FileSystem.readFile(FileSystem.join(out, "adapter_model.safetensors"))
            #expect(got == expected, "trial \(trial) (killed after \(delay) us, killed: \(wasKilled)): adapters differ")
        }
    }

    /// Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN, as in CI here); the full-disk test needs one.
    static let canMountTmpfs: Bool = {
        guard let dir = try? Fixtures.temporaryDirectory("tmpfs-probe") else { return false }
        guard system("mount -t tmpfs -o size=1m tmpfs '\(dir)' 2>/dev/null") == 0 else { return false }
        _ = system("umount '\(dir)'")
        return true
    }()

    @Test("a disk that fills during training: the checkpoint being written fails cleanly, the last one stays intact and resumes",
          .enabled(if: canMountTmpfs, "needs to mount a small tmpfs (root)"))
    func fullDisk() throws {
        let data = try TrainCLITests.dataset()
        let dir = try Fixtures.temporaryDirectory("full-disk")
        let reference = FileSystem.join(dir, "reference")
        var args = arguments(data, reference)
        args[args.firstIndex(of: "--max-steps")! + 1] = "400"
        let straight = try runQLoRA(args)
        #expect(straight.status == 0, "\(straight.stderr)")
        let mount = FileSystem.join(dir, "small")
        try FileSystem.makeDirectory(mount)
        #expect(system("mount -t tmpfs -o size=4m tmpfs '\(mount)'") == 0)
        defer { _ = system("umount '\(mount)'") }
        let out = FileSystem.join(mount, "out")
        let binary = FileSystem.join(FileSystem.directoryName(CommandLine.arguments[0]), "qlora")
        var runArgs = args
        runArgs[runArgs.firstIndex(of: "--output")! + 1] = out
        let quoted = runArgs.map { "'\($0)'" }.joined(separator: " ")
        // Once a checkpoint exists, fill the disk but for 64 KB: metrics lines still fit, a checkpoint (about 120 KB) not.
        let script = """
            '\(binary)' \(quoted) >/dev/null 2>'\(dir)/err' & P=$!
            for i in $(seq 1000); do ls '\(out)' 2>/dev/null | grep -q '^checkpoint-' && break; sleep 0.01; done
            avail=$(df -k --output=avail '\(mount)' | tail -1)
            dd if=/dev/zero of='\(mount)/filler' bs=1k count=$((avail - 64)) 2>/dev/null
            wait $P; echo "status $?"
            """
        let r = try runProgram("/bin/sh", ["-c", script])
        let err = String(decoding: try FileSystem.readFile(FileSystem.join(dir, "err")), as: UTF8.self)
        #expect(!r.stdout.contains("status 0"), "the run did not meet the full disk: \(r.stdout)")
        #expect(err.contains("could not be written") && err.contains("is intact") && err.contains("--resume"), "\(err)")
        // Nothing half-written stays behind, and the last checkpoint resumes once there is room again.
        let left = try FileSystem.listDirectory(out)
        #expect(left.allSatisfy { !$0.hasPrefix(".checkpoint-") }, "\(left)")
        FileSystem.remove(FileSystem.join(mount, "filler"))
        let resumed = try runQLoRA(runArgs + ["--resume"])
        #expect(resumed.status == 0, "\(resumed.stderr)")
        let x = try FileSystem.readFile(FileSystem.join(reference, "adapter_model.safetensors"))
        let y = try FileSystem.readFile(FileSystem.join(out, "adapter_model.safetensors"))
        #expect(x == y, "the resumed adapter differs from the uninterrupted one")
    }
}
