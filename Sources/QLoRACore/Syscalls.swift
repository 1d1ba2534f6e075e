// Every libc call the package makes, in one place: errno becomes a thrown SystemError that names the
// path, and interrupted calls are retried.
#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// A failed system call: which call, on which file, and the C library's reason.
public struct SystemError: Error, CustomStringConvertible, Sendable {
    public let call: String
    public let path: String
    public let code: Int32

    public init(call: String, path: String, code: Int32) {
        self.call = call
        self.path = path
        self.code = code
    }

    public var description: String {
        "\(path): \(call) failed: \(String(cString: strerror(code)))"
    }
}

enum Syscalls {
    static func open(_ path: String, flags: Int32, mode: mode_t = 0o644) throws -> Int32 {
        while true {
            let fd = path.withCString { systemOpen($0, flags, mode) }
            if fd >= 0 { return fd }
            if errno == EINTR { continue }
            throw SystemError(call: "open", path: path, code: errno)
        }
    }

    static func fileSize(_ fd: Int32, path: String) throws -> Int {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SystemError(call: "fstat", path: path, code: errno) }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw SystemError(call: "open (not a regular file)", path: path, code: EINVAL)
        }
        return Int(st.st_size)
    }

    static func mapReadOnly(_ fd: Int32, size: Int, path: String) throws -> UnsafeRawPointer {
        guard let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0), p != MAP_FAILED else {
            throw SystemError(call: "mmap", path: path, code: errno)
        }
        return UnsafeRawPointer(p)
    }

    static func unmap(_ pointer: UnsafeRawPointer, size: Int) {
        _ = munmap(UnsafeMutableRawPointer(mutating: pointer), size)
    }

    static func adviseDontNeed(_ pointer: UnsafeRawPointer, count: Int) {
        _ = madvise(UnsafeMutableRawPointer(mutating: pointer), count, MADV_DONTNEED)
    }

    static func close(_ fd: Int32) {
        _ = systemClose(fd)
    }

    /// Writes every byte, looping over partial writes and EINTR.
    static func writeAll(_ fd: Int32, _ buffer: UnsafeRawBufferPointer, path: String) throws {
        var offset = 0
        while offset < buffer.count {
            let n = systemWrite(fd, buffer.baseAddress! + offset, buffer.count - offset)
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError(call: "write", path: path, code: errno)
            }
            offset += n
        }
    }

    /// Reads up to `count` bytes at `offset`; returns how many were read (short only at end of file).
    static func read(_ fd: Int32, into buffer: UnsafeMutableRawPointer, count: Int, offset: Int, path: String) throws -> Int {
        var done = 0
        while done < count {
            let n = pread(fd, buffer + done, count - done, off_t(offset + done))
            if n < 0 {
                if errno == EINTR { continue }
                throw SystemError(call: "read", path: path, code: errno)
            }
            if n == 0 { break }
            done += n
        }
        return done
    }

    static func fsync(_ fd: Int32, path: String) throws {
        guard systemFsync(fd) == 0 else { throw SystemError(call: "fsync", path: path, code: errno) }
    }

    static func rename(_ from: String, _ to: String) throws {
        guard systemRename(from, to) == 0 else { throw SystemError(call: "rename to \(to)", path: from, code: errno) }
    }

    static func unlink(_ path: String) {
        _ = systemUnlink(path)
    }

    static func makeDirectory(_ path: String) throws {
        if systemMkdir(path, 0o755) != 0 && errno != EEXIST {
            throw SystemError(call: "mkdir", path: path, code: errno)
        }
    }

    static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    static func exists(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0
    }

    static func processID() -> Int32 { getpid() }
}

// Unqualified libc names would resolve to the static methods above; these aliases reach libc.
private let systemOpen: (UnsafePointer<CChar>, Int32, mode_t) -> Int32 = { open($0, $1, $2) }
private let systemClose: (Int32) -> Int32 = { close($0) }
private let systemWrite: (Int32, UnsafeRawPointer, Int) -> Int = { write($0, $1, $2) }
private let systemFsync: (Int32) -> Int32 = { fsync($0) }
private let systemRename: (String, String) -> Int32 = { rename($0, $1) }
private let systemUnlink: (String) -> Int32 = { unlink($0) }
private let systemMkdir: (String, mode_t) -> Int32 = { mkdir($0, $1) }

/// Public helpers over the syscalls for the other modules.
public enum FileSystem {
    public static func isDirectory(_ path: String) -> Bool { Syscalls.isDirectory(path) }
    public static func exists(_ path: String) -> Bool { Syscalls.exists(path) }
    public static func makeDirectory(_ path: String) throws { try Syscalls.makeDirectory(path) }

    /// Makes `path` and every missing folder above it (mkdir -p).
    public static func makeDirectories(_ path: String) throws {
        var prefix = path.hasPrefix("/") ? "/" : ""
        for part in path.split(separator: "/") {
            prefix += part
            if !Syscalls.isDirectory(prefix) { try Syscalls.makeDirectory(prefix) }
            prefix += "/"
        }
    }
    public static func remove(_ path: String) { Syscalls.unlink(path) }

    /// Reads a whole (small) file into memory.
    public static func readFile(_ path: String, limit: Int = 1 << 30) throws -> [UInt8] {
        let fd = try Syscalls.open(path, flags: O_RDONLY)
        defer { Syscalls.close(fd) }
        let size = try Syscalls.fileSize(fd, path: path)
        guard size <= limit else {
            throw SystemError(call: "read (file larger than \(limit) bytes)", path: path, code: EFBIG)
        }
        var bytes = [UInt8](repeating: 0, count: size)
        let n = try bytes.withUnsafeMutableBytes { try Syscalls.read(fd, into: $0.baseAddress!, count: size, offset: 0, path: path) }
        return Array(bytes[0..<n])
    }

    /// Writes a whole file atomically (temporary name, fsync, rename).
    public static func writeFileAtomically(_ path: String, bytes: [UInt8]) throws {
        let writer = try AtomicFileWriter(path: path)
        try writer.write(bytes)
        try writer.commit()
    }

    /// Joins path components with "/".
    public static func join(_ parts: String...) -> String {
        var result = ""
        for p in parts where !p.isEmpty {
            if result.isEmpty || p.hasPrefix("/") { result = p; continue }
            result += result.hasSuffix("/") ? p : "/" + p
        }
        return result
    }

    /// The directory part of a path ("." when there is none).
    public static func directoryName(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return "." }
        if slash == path.startIndex { return "/" }
        return String(path[..<slash])
    }

    /// The last component of a path.
    public static func baseName(_ path: String) -> String {
        guard let slash = path.lastIndex(of: "/") else { return path }
        return String(path[path.index(after: slash)...])
    }
}

extension FileSystem {
    /// Bytes available to this user on the file system holding `path`, or nil if unknown.
    public static func freeBytes(_ path: String) -> Int? {
        var s = statvfs()
        guard statvfs(path, &s) == 0 else { return nil }
        return Int(s.f_bavail) * Int(s.f_frsize)
    }

    /// Renames a file or folder (atomic within one file system).
    public static func rename(_ from: String, _ to: String) throws { try Syscalls.rename(from, to) }

    /// Removes a file or a folder with everything in it; nothing happens if it does not exist.
    public static func removeTree(_ path: String) throws {
        var st = stat()
        guard lstat(path, &st) == 0 else { return }
        if (st.st_mode & S_IFMT) == S_IFDIR {
            for name in try listDirectory(path) { try removeTree(join(path, name)) }
            guard rmdir(path) == 0 else { throw SystemError(call: "rmdir", path: path, code: errno) }
        } else {
            guard unlink(path) == 0 else { throw SystemError(call: "unlink", path: path, code: errno) }
        }
    }

    /// The names in a folder (not "." or ".."), sorted.
    public static func listDirectory(_ path: String) throws -> [String] {
        guard let dir = opendir(path) else { throw SystemError(call: "opendir", path: path, code: errno) }
        defer { closedir(dir) }
        var names: [String] = []
        while let entry = readdir(dir) {
            let name = withUnsafePointer(to: entry.pointee.d_name) {
                $0.withMemoryRebound(to: CChar.self, capacity: 256) { String(cString: $0) }
            }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }
}
