// `--config FILE`: a YAML mapping of a subcommand's options, spelled as on the command line with or
// without the dashes (`lora_r: 16`, `lora-r: 16`). The file's options are placed before the command
// line's, so a flag given on the command line overrides the file.
import ArgumentParser
import QLoRA
import Yams

struct ConfigFileError: Error, CustomStringConvertible {
    let file: String
    let line: Int?
    let reason: String
    var description: String { "\(file)\(line.map { ":\($0)" } ?? ""): \(reason)" }
}

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
                let rest = line.components(separatedBy: "--" + name).dropFirst().first ?? ""
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
        for file in files { fromFiles += try Self.arguments(fromFile: file, known: known) }
        return fromFiles + rest
    }

    static func arguments(fromFile file: String, known: [String: Bool]) throws -> [String] {
        let bytes: [UInt8]
        do { bytes = try FileSystem.readFile(file) } catch { throw ConfigFileError(file: file, line: nil, reason: "cannot read the config file (\(error))") }
        guard let text = String(validating: bytes, as: UTF8.self) else { throw ConfigFileError(file: file, line: nil, reason: "not UTF-8 text") }
        let root: Node?
        do { root = try Yams.compose(yaml: text) } catch let e as YamlError {
            throw ConfigFileError(file: file, line: nil, reason: "not valid YAML: \(String(describing: e).split(separator: "\n").joined(separator: " "))")
        }
        guard let root else { return [] }  // an empty file
        guard let mapping = root.mapping else {
            throw ConfigFileError(file: file, line: root.mark.map { $0.line }, reason: "expected a mapping of option names to values")
        }
        var args: [String] = []
        for (keyNode, value) in mapping {
            let line = keyNode.mark?.line
            guard let key = keyNode.string else { throw ConfigFileError(file: file, line: line, reason: "option names must be strings") }
            let name = key.replacingOccurrences(of: "_", with: "-")
            if name == "config" { throw ConfigFileError(file: file, line: line, reason: "a config file cannot name another config file") }
            guard let takesValue = known[name] else {
                let close = known.keys.filter { $0.hasPrefix(String(name.prefix(4))) }.sorted()
                throw ConfigFileError(file: file, line: line, reason: "unknown option '\(key)'" + (close.isEmpty ? "" : " (did you mean \(close.map { $0.replacingOccurrences(of: "-", with: "_") }.joined(separator: ", "))?)"))
            }
            if value.scalar != nil && value.tag.description.hasSuffix(":null") { continue }  // `key:` or `key: null`: not set
            if !takesValue {
                guard let b = value.bool else { throw ConfigFileError(file: file, line: line, reason: "'\(key)' is a flag: give true or false") }
                if b { args.append("--" + name) }
                continue
            }
            if let list = value.sequence {
                let items = try list.map { item -> String in
                    guard let s = item.string else { throw ConfigFileError(file: file, line: item.mark?.line ?? line, reason: "'\(key)' lists must hold plain values") }
                    return s
                }
                args += ["--" + name, items.joined(separator: ",")]
            } else if let s = value.scalar?.string {
                args += ["--" + name, s]
            } else {
                throw ConfigFileError(file: file, line: line, reason: "'\(key)' must be a single value, not a mapping")
            }
        }
        return args
    }
}
