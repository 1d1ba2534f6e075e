// An append-only file of lines (JSON lines of results that a run adds one by one and a later run resumes):
// each line goes out in one write(2) with its newline and is fsync'd before `append` returns, so a crash
// leaves every earlier line whole and at most a partial last line, which the next `init` cuts off.
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
        fd = try Syscalls.open(path, flags: O_RDWR | O_APPEND | O_CREAT | O_CLOEXEC)
        do { droppedBytes = try Self.cutPartialLine(fd, path: path) } catch {
            Syscalls.close(fd)
            throw error
        }
    }

    /// Truncates the file after its last newline; returns the bytes removed. Only the end is read: back
    /// from the last byte to the last newline, 64 KB at a time.
    private static func cutPartialLine(_ fd: Int32, path: String) throws -> Int {
        let size = try Syscalls.fileSize(fd, path: path)
        var keep = size
        var chunk = [UInt8](repeating: 0, count: 1 << 16)
        while keep > 0 {
            let start = max(0, keep - chunk.count), n = keep - start
            _ = try chunk.withUnsafeMutableBytes { try Syscalls.read(fd, into: $0.baseAddress!, count: n, offset: start, path: path) }
            if let i = chunk[..<n].lastIndex(of: UInt8(ascii: "\n")) { keep = start + i + 1; break }
            keep = start
        }
        if keep < size && ftruncate(fd, off_t(keep)) != 0 { throw SystemError(call: "ftruncate", path: path, code: errno) }
        return size - keep
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
