// Errors of tokenizer loading; each names the file and what is wrong.
public enum TokenizerError: Error, CustomStringConvertible, Equatable {
    case invalidFile(file: String, reason: String)
    case unsupported(file: String, what: String, supported: String)
    case unknownToken(String)

    public var description: String {
        switch self {
        case let .invalidFile(file, reason): return "\(file): \(reason)"
        case let .unsupported(file, what, supported): return "\(file): \(what) is not supported (supported: \(supported))"
        case let .unknownToken(t): return "token '\(t)' is not in the vocabulary"
        }
    }
}
