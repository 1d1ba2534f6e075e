// The `qlora` command line. Each subcommand parses its options, calls the library and prints;
// results go to stdout (one JSON object with --json), progress and logs to stderr, and errors are
// one `error: ...` line on stderr with a non-zero exit.
import ArgumentParser
import QLoRA
import QLoRAConfig

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

@main
struct QLoRACommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "qlora",
        abstract: "QLoRA finetuning of Llama-family models: 4-bit NormalFloat base weights, LoRA adapters.",
        discussion: """
            Results go to stdout (add --json for one JSON object), progress and logs to stderr.
            Kernels: QLORA_KERNELS=reference|avx2|avx512 forces an instruction set; QLORA_THREADS sets the thread count.
            """,
        version: QLoRAVersion.string,
        subcommands: [Train.self, Generate.self, Chat.self, Perplexity.self, Eval.self, Report.self, Serve.self, Merge.self, ExportAdapter.self, Tokenize.self, Quantize.self, Inspect.self]
    )

    static func main() async {
        // A write past a file-size limit (ulimit -f) then fails with EFBIG, which our writers report and clean up
        // after like a full disk, instead of the process being killed with its temporary files left behind.
        signal(SIGXFSZ, SIG_IGN)
        var command: ParsableCommand
        var arguments = Array(CommandLine.arguments.dropFirst())
        // `qlora train --config FILE`: the file's options go first, so the command line overrides them.
        if arguments.first == "train" {
            do {
                arguments = ["train"] + (try ConfigFile.expand(Array(arguments.dropFirst()), for: Train.self))
            } catch let error as ConfigFileError {
                Log.write("error: \(error)\n")
                terminate(1)
            } catch {
                exit(withError: error)
            }
        }
        do {
            command = try parseAsRoot(arguments)
        } catch {
            exit(withError: error)
        }
        do {
            if var asyncCommand = command as? AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
        } catch let error as ExitCode {
            exit(withError: error)
        } catch let error as ValidationError {
            exit(withError: error)
        } catch let error as CleanExit {
            exit(withError: error)
        } catch where String(reflecting: type(of: error)).hasPrefix("ArgumentParser.") {
            exit(withError: error)  // help, usage and parse errors keep ArgumentParser's own format
        } catch {
            let message = "\(error)".split(separator: "\n").joined(separator: " ")
            Log.write("error: \(message)\n")
            terminate(1)
        }
    }
}

/// Prints one JSON object on stdout.
func printJSON(_ value: JSONValue) {
    print(JSON.serialize(value, pretty: true))
}

/// Formats a byte count for people.
func formatFixed(_ v: Double, _ digits: Int) -> String { Chart.fixed(v, digits) }

/// Ends the process with `code` (libc's exit, which ParsableCommand's own `exit(withError:)` hides).
func terminate(_ code: Int32) -> Never {
    #if canImport(Glibc)
    Glibc.exit(code)
    #else
    Darwin.exit(code)
    #endif
}
