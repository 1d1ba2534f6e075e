// Errors for safetensors files: each names the file and, where there is one, the tensor.

public enum SafetensorsError: Error, CustomStringConvertible, Equatable {
    case truncated(file: String, size: Int, needed: Int)
    case headerTooLarge(file: String, length: UInt64, limit: Int)
    case invalidHeaderJSON(file: String, reason: String)
    case headerNotObject(file: String)
    case invalidEntry(file: String, tensor: String, reason: String)
    case unknownDType(file: String, tensor: String, dtype: String)
    case byteCountMismatch(file: String, tensor: String, expected: Int, actual: Int)
    case offsetOutOfRange(file: String, tensor: String, end: Int, dataSize: Int)
    case overlap(file: String, tensor: String, other: String)
    case duplicateTensor(file: String, tensor: String, other: String)
    case invalidIndex(file: String, reason: String)
    case missingTensor(file: String, tensor: String)
    case writeMismatch(file: String, tensor: String, reason: String)

    public var description: String {
        switch self {
        case let .truncated(file, size, needed):
            return "\(file): truncated safetensors file: \(size) bytes, the header needs at least \(needed)"
        case let .headerTooLarge(file, length, limit):
            return "\(file): safetensors header length \(length) is over the \(limit)-byte limit (corrupt or not a safetensors file)"
        case let .invalidHeaderJSON(file, reason):
            return "\(file): safetensors header is not valid JSON: \(reason)"
        case let .headerNotObject(file):
            return "\(file): safetensors header must be a JSON object"
        case let .invalidEntry(file, tensor, reason):
            return "\(file): tensor '\(tensor)': \(reason)"
        case let .unknownDType(file, tensor, dtype):
            return "\(file): tensor '\(tensor)': unsupported dtype '\(dtype)' (supported: \(DTypeNames.all))"
        case let .byteCountMismatch(file, tensor, expected, actual):
            return "\(file): tensor '\(tensor)': data_offsets span \(actual) bytes but dtype and shape need \(expected)"
        case let .offsetOutOfRange(file, tensor, end, dataSize):
            return "\(file): tensor '\(tensor)': data ends at byte \(end) of the data section, which has only \(dataSize) bytes (truncated file?)"
        case let .overlap(file, tensor, other):
            return "\(file): tensor '\(tensor)' overlaps tensor '\(other)'"
        case let .duplicateTensor(file, tensor, other):
            return "\(file): tensor '\(tensor)' appears twice (also in \(other))"
        case let .invalidIndex(file, reason):
            return "\(file): invalid safetensors index: \(reason)"
        case let .missingTensor(file, tensor):
            return "\(file): tensor '\(tensor)' listed in the index is not in its shard"
        case let .writeMismatch(file, tensor, reason):
            return "\(file): cannot write tensor '\(tensor)': \(reason)"
        }
    }
}

import QLoRACore

enum DTypeNames {
    static let all = DType.allCases.map(\.rawValue).joined(separator: ", ")
}
