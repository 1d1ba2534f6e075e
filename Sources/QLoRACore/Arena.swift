// One allocation carved into 64-byte-aligned regions, for the buffers of a computation that runs many
// times over (a training step, a forward pass): sized once, reused, never allocating in the loop.

/// A measuring arena only adds up the sizes, so a layout of buffers is carved once to learn its size and
/// once more from the real allocation (the same code both times: the two can never disagree).
public final class Arena {
    public private(set) var byteCount = 0
    private let base: UnsafeMutableRawPointer?

    /// An arena that only measures: its pointers are placeholders, never to be dereferenced.
    public init(measuring: Void) { base = nil }

    /// An arena of `byteCount` zeroed bytes.
    public init(byteCount: Int) {
        let p = UnsafeMutableRawPointer.allocate(byteCount: max(byteCount, 64), alignment: 64)
        p.initializeMemory(as: UInt8.self, repeating: 0, count: max(byteCount, 64))
        base = p
    }

    /// Lays out `make` once in a measuring arena, then again in an arena of the measured size.
    public static func sized<T>(_ make: (Arena) -> T) -> (arena: Arena, value: T) {
        let measuring = Arena(measuring: ())
        _ = make(measuring)
        let arena = Arena(byteCount: measuring.byteCount)
        return (arena, make(arena))
    }

    deinit { base?.deallocate() }

    private func reserve(_ bytes: Int) -> UnsafeMutableRawPointer {
        let offset = byteCount
        byteCount += (max(bytes, 1) + 63) / 64 * 64
        return base.map { $0 + offset } ?? UnsafeMutableRawPointer(bitPattern: 64)!
    }

    public func floats(_ n: Int) -> UnsafeMutablePointer<Float> { reserve(4 * n).bindMemory(to: Float.self, capacity: max(n, 1)) }
    public func bytes(_ n: Int) -> UnsafeMutablePointer<UInt8> { reserve(n).bindMemory(to: UInt8.self, capacity: max(n, 1)) }
    public func halves(_ n: Int) -> UnsafeMutablePointer<UInt16> { reserve(2 * n).bindMemory(to: UInt16.self, capacity: max(n, 1)) }
    public func words(_ n: Int) -> UnsafeMutablePointer<UInt32> { reserve(4 * n).bindMemory(to: UInt32.self, capacity: max(n, 1)) }
    public func ints(_ n: Int) -> UnsafeMutablePointer<Int> { reserve(MemoryLayout<Int>.stride * n).bindMemory(to: Int.self, capacity: max(n, 1)) }
}
