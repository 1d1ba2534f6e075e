// `--config FILE`: a YAML mapping of a subcommand's options, spelled as on the command line with or
// without the dashes (`lora_r: 16`, `lora-r: 16`). The file's options are placed before the command
// line's, so a flag given on the command line overrides the file.
import ArgumentParser
import QLoRA
import QLoRAConfig

enum ConfigFile {
    /// The long option names of a command and whether each takes a value, read from its help text
    /// (so the file accepts exactly what the command line accepts).
    static func options(of command: ParsableCommand.Type) -> [String: Bool] {
        var result: [String: Bool] = [:]
        for line in command.helpMessage(columns: 1000).split(separator: "\n") {
            // Option lines are indented by two spaces; wrapped descriptions by more.
            guard line.hasPrefix("  -") else { continue }
            for word in line.dropFirst(2).split(separator: " ", omittingEmptySubsequences: true).prefix(3) {
                let w = word.hasSuffix(",") ? word.dropLast() : word
                guard w.hasPrefix("--") else { continue }
                let name = String(w.dropFirst(2))
                var rest = Substring(line.components(separatedBy: "--" + name).dropFirst().first ?? "")
                // Past the option's other names (`--lora-init, --init-lora <init>`).
                while rest.hasPrefix(", --") { rest = rest.dropFirst(2).drop { $0 != " " } }
                result[name] = rest.hasPrefix(" <")
            }
        }
        return result
    }

    /// Replaces `--config FILE` (or `--config=FILE`) in `arguments` (those after the subcommand)
    /// with the options the file holds, placed first.
    static func expand(_ arguments: [String], for command: ParsableCommand.Type) throws -> [String] {
        var rest: [String] = []
        var files: [String] = []
        var i = 0
        while i < arguments.count {
            let a = arguments[i]
            if a == "--" { rest += arguments[i...]; break }
            if a == "--config" {
                guard i + 1 < arguments.count else { throw ValidationError("--config needs a YAML file") }
                files.append(arguments[i + 1])
                i += 2
                continue
            }
            if a.hasPrefix("--config=") { files.append(String(a.dropFirst("--config=".count))); i += 1; continue }
            rest.append(a)
            i += 1
        }
        guard !files.isEmpty else { return arguments }
        let known = options(of: command)
        var fromFiles: [String] = []
        for file in files { fromFiles += try YAMLOptions.arguments(fromFile: file, known: known) }
        return fromFiles + rest
    }
}
