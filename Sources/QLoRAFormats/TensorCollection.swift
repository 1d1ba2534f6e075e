// The tensors of a checkpoint, whether one .safetensors file, a folder holding model.safetensors, or a
// folder of shards listed by model.safetensors.index.json ({"metadata": ..., "weight_map": {name: shard}}).
import QLoRACore

/// Named tensors gathered from one or more safetensors files, each memory-mapped.
public final class TensorCollection: @unchecked Sendable {
    /// Where the tensors came from (a file or a folder).
    public let path: String
    public let files: [SafetensorsFile]
    /// Tensor name -> (file index, entry), in file and header order.
    public let names: [String]
    private let location: [String: (Int, SafetensorsEntry)]

    /// Opens a .safetensors file, or a folder with model.safetensors or a sharded index.
    public init(path: String) throws {
        self.path = path
        var files: [SafetensorsFile] = []
        var names: [String] = []
        var location: [String: (Int, SafetensorsEntry)] = [:]

        func add(_ file: SafetensorsFile, only: Set<String>?) throws {
            let fileIndex = files.count
            files.append(file)
            for e in file.entries where only?.contains(e.name) ?? true {
                if let (other, _) = location[e.name] {
                    throw SafetensorsError.duplicateTensor(file: file.path, tensor: e.name, other: files[other].path)
                }
                location[e.name] = (fileIndex, e)
                names.append(e.name)
            }
        }

        if FileSystem.isDirectory(path) {
            let indexPath = FileSystem.join(path, "model.safetensors.index.json")
            let single = FileSystem.join(path, "model.safetensors")
            if FileSystem.exists(indexPath) {
                let shards = try Self.readIndex(indexPath)
                for (shard, tensors) in shards {
                    let file = try SafetensorsFile(path: FileSystem.join(path, shard))
                    for t in tensors where file.entry(t) == nil {
                        throw SafetensorsError.missingTensor(file: file.path, tensor: t)
                    }
                    try add(file, only: Set(tensors))
                }
            } else if FileSystem.exists(single) {
                try add(try SafetensorsFile(path: single), only: nil)
            } else {
                throw FormatError.noWeights(folder: path, pickle: Self.pickleFiles(in: path))
            }
        } else {
            if path.hasSuffix(".bin") || path.hasSuffix(".pt") || path.hasSuffix(".pth") || path.hasSuffix(".ckpt") {
                throw FormatError.pickleRefused(file: path)
            }
            try add(try SafetensorsFile(path: path), only: nil)
        }
        self.files = files
        self.names = names
        self.location = location
    }

    public func contains(_ name: String) -> Bool { location[name] != nil }

    public func entry(_ name: String) -> SafetensorsEntry? { location[name]?.1 }

    /// The file that holds `name`.
    public func file(of name: String) -> String? { location[name].map { files[$0.0].path } }

    public func tensor(_ name: String) -> TensorView? {
        guard let (f, e) = location[name] else { return nil }
        return files[f].view(e)
    }

    /// Parses an index file into shard -> tensor names (shards in first-seen order).
    static func readIndex(_ indexPath: String) throws -> [(String, [String])] {
        let json: JSONValue
        do {
            json = try JSON.parse(try FileSystem.readFile(indexPath, limit: 64 << 20))
        } catch let e as JSONError {
            throw SafetensorsError.invalidIndex(file: indexPath, reason: e.description)
        }
        guard let map = json["weight_map"]?.objectValue else {
            throw SafetensorsError.invalidIndex(file: indexPath, reason: "no \"weight_map\" object")
        }
        var order: [String] = []
        var byShard: [String: [String]] = [:]
        for (tensor, shardValue) in map {
            guard let shard = shardValue.stringValue else {
                throw SafetensorsError.invalidIndex(file: indexPath, reason: "shard for '\(tensor)' is not a string")
            }
            // A shard name is a file beside the index: no folders, no way out of the model folder.
            guard !shard.isEmpty, !shard.contains("/"), shard != ".", shard != ".." else {
                throw SafetensorsError.invalidIndex(file: indexPath, reason: "shard name '\(shard)' for '\(tensor)' must be a file name in the same folder")
            }
            if byShard[shard] == nil { order.append(shard) }
            byShard[shard, default: []].append(tensor)
        }
        return order.map { ($0, byShard[$0]!) }
    }

    static func pickleFiles(in folder: String) -> [String] {
        ["pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth"]
            .filter { FileSystem.exists(FileSystem.join(folder, $0)) }
    }
}

/// Errors about model files and folders (as opposed to a single file's contents).
public enum FormatError: Error, CustomStringConvertible, Equatable {
    case noWeights(folder: String, pickle: [String])
    case pickleRefused(file: String)
    case invalidConfig(file: String, reason: String)
    case invalidQuantState(file: String, tensor: String, reason: String)

    public var description: String {
        switch self {
        case let .noWeights(folder, pickle):
            if !pickle.isEmpty {
                return "\(folder): only pickle weights (\(pickle.joined(separator: ", "))) found; pickle files can run arbitrary code and are never loaded. Convert them to safetensors (e.g. transformers' save_pretrained(..., safe_serialization=True))"
            }
            return "\(folder): no model.safetensors or model.safetensors.index.json in this folder"
        case let .pickleRefused(file):
            return "\(file): pickle checkpoints (.bin/.pt) can run arbitrary code and are never loaded; convert to safetensors (transformers: save_pretrained(..., safe_serialization=True))"
        case let .invalidConfig(file, reason):
            return "\(file): \(reason)"
        case let .invalidQuantState(file, tensor, reason):
            return "\(file): tensor '\(tensor)': \(reason)"
        }
    }
}
