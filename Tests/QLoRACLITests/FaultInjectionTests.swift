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
}
