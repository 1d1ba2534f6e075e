// `--config FILE`: a YAML mapping of a command's options, spelled as on the command line with or without
// the dashes (`lora_r: 16`, `lora-r: 16`), turned into the arguments they stand for. The CLI places them
// before the command line's own, so a flag given on the command line overrides the file.
import Foundation
import QLoRACore
import Yams

/// A config file that cannot be used, with the line at fault where there is one.
public struct ConfigFileError: Error, CustomStringConvertible {
    public let file: String
    public let line: Int?
    public let reason: String
    public init(file: String, line: Int?, reason: String) {
        self.file = file
        self.line = line
        self.reason = reason
    }
    public var description: String { "\(file)\(line.map { ":\($0)" } ?? ""): \(reason)" }
}

public enum YAMLOptions {
    /// The options a config file holds, as command-line arguments (`--name value`, `--flag`).
    /// `known` maps each long option the command accepts to whether it takes a value.
    public static func arguments(fromFile file: String, known: [String: Bool]) throws -> [String] {
        let bytes: [UInt8]
        do { bytes = try FileSystem.readFile(file) } catch { throw ConfigFileError(file: file, line: nil, reason: "cannot read the config file (\(error))") }
        return try arguments(bytes: bytes, file: file, known: known)
    }

    /// The same for a config file's bytes; `file` names it in errors.
    public static func arguments(bytes: [UInt8], file: String, known: [String: Bool]) throws -> [String] {
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
