// Files are written under a temporary name in the destination folder and renamed into place after
// fsync, so a crash never leaves a half-written file under the final name.
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Streams bytes to `path` through a temporary file; `commit()` makes it visible atomically.
/// If the writer is dropped without commit, the temporary file is removed.
public final class AtomicFileWriter {
    public let path: String
    public let temporaryPath: String
    private var fd: Int32
    private var buffer: [UInt8] = []
    private let bufferLimit = 1 << 20
    private var committed = false
    public private(set) var bytesWritten = 0

    public init(path: String) throws {
        self.path = path
        let dir = FileSystem.directoryName(path)
        temporaryPath = FileSystem.join(dir, ".\(FileSystem.baseName(path)).tmp-\(Syscalls.processID())")
        fd = try Syscalls.open(temporaryPath, flags: O_WRONLY | O_CREAT | O_TRUNC)
        buffer.reserveCapacity(bufferLimit)
    }

    deinit {
        if fd >= 0 { Syscalls.close(fd) }
        if !committed { Syscalls.unlink(temporaryPath) }
    }

    public func write(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try write($0) }
    }

    public func write(_ bytes: UnsafeRawBufferPointer) throws {
        bytesWritten += bytes.count
        if buffer.count + bytes.count > bufferLimit { try flush() }
        if bytes.count >= bufferLimit {
            try Syscalls.writeAll(fd, bytes, path: temporaryPath)
        } else {
            buffer.append(contentsOf: bytes)
        }
    }

    private func flush() throws {
        guard !buffer.isEmpty else { return }
        try buffer.withUnsafeBytes { try Syscalls.writeAll(fd, $0, path: temporaryPath) }
        buffer.removeAll(keepingCapacity: true)
    }

    /// Flushes, syncs and renames the file to its final name.
    public func commit() throws {
        try flush()
        try Syscalls.fsync(fd, path: temporaryPath)
        Syscalls.close(fd)
        fd = -1
        try Syscalls.rename(temporaryPath, path)
        committed = true
    }
}
