// Owners of tensor memory: each allocation or mapping has exactly one owner, a final class that frees
// or unmaps it in deinit. Views (TensorView) keep their owner alive.
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Heap memory aligned to 64 bytes, zero-filled.
public final class HeapBuffer: @unchecked Sendable {
    public let pointer: UnsafeMutableRawPointer
    public let byteCount: Int

    public init(byteCount: Int) {
        self.byteCount = byteCount
        pointer = UnsafeMutableRawPointer.allocate(byteCount: max(byteCount, 1), alignment: 64)
        pointer.initializeMemory(as: UInt8.self, repeating: 0, count: max(byteCount, 1))
    }

    deinit { pointer.deallocate() }

    /// Typed access to the first `count` elements. Do not let the pointer escape the closure.
    public func withMutableBuffer<T, R>(of type: T.Type, count: Int, _ body: (UnsafeMutableBufferPointer<T>) throws -> R) rethrows -> R {
        precondition(count * MemoryLayout<T>.stride <= byteCount)
        return try body(UnsafeMutableBufferPointer(start: pointer.bindMemory(to: T.self, capacity: count), count: count))
    }
}

/// A whole file mapped read-only. Views into it never outlive this object.
public final class MappedFile: @unchecked Sendable {
    public let path: String
    public let size: Int
    private let base: UnsafeRawPointer?

    public init(path: String) throws {
        self.path = path
        let fd = try Syscalls.open(path, flags: O_RDONLY)
        defer { Syscalls.close(fd) }
        size = try Syscalls.fileSize(fd, path: path)
        base = size > 0 ? try Syscalls.mapReadOnly(fd, size: size, path: path) : nil
    }

    deinit {
        if let base { Syscalls.unmap(base, size: size) }
    }

    /// The mapped bytes. Do not let the pointer escape beyond the lifetime of this object.
    public var bytes: UnsafeRawBufferPointer { UnsafeRawBufferPointer(start: base, count: size) }

    /// Tells the kernel that the pages wholly inside `range` (byte offsets) are not needed for now, so
    /// they leave the resident set; a later read maps them in again from the file.
    public func releasePages(_ range: Range<Int>) {
        guard let base, !range.isEmpty else { return }
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let start = (range.lowerBound + page - 1) / page * page
        let end = min(size, range.upperBound) / page * page
        if end > start { Syscalls.adviseDontNeed(base + start, count: end - start) }
    }
}
