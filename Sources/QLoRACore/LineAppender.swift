// An append-only file of lines (JSON lines of results that a run adds one by one and a later run resumes):
// each line goes out in one write(2) with its newline and is fsync'd before `append` returns, so a crash
// leaves every earlier line whole and at most a partial last line, which `openResuming` cuts off.
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

public final class LineAppender {
    public let path: String
    private let fd: Int32

    /// Opens (creating) `path` for appending. A last line without its newline (a write cut short) is
    /// removed first; `droppedBytes` says how many bytes that was (0 when the file ended cleanly).
    public init(path: String) throws {
        self.path = path
        var dropped = 0
        if FileSystem.exists(path) {
            let bytes = try FileSystem.readFile(path)
            if let last = bytes.last, last != UInt8(ascii: "\n") {
                let keep = (bytes.lastIndex(of: UInt8(ascii: "\n")).map { $0 + 1 }) ?? 0
                dropped = bytes.count - keep
                guard truncate(path, off_t(keep)) == 0 else { throw SystemError(call: "truncate", path: path, code: errno) }
            }
        }
        droppedBytes = dropped
        fd = try Syscalls.open(path, flags: O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC)
    }

    /// Bytes of a partial last line removed when opening.
    public let droppedBytes: Int

    /// Appends `line` (which must not contain a newline) and its newline, durably.
    public func append(_ line: String) throws {
        precondition(!line.utf8.contains(UInt8(ascii: "\n")), "a line with a newline inside")
        var bytes = Array(line.utf8)
        bytes.append(UInt8(ascii: "\n"))
        try bytes.withUnsafeBytes { try Syscalls.writeAll(fd, $0, path: path) }
        try Syscalls.fsync(fd, path: path)
    }

    deinit { Syscalls.close(fd) }
}
