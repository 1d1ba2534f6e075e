// ScopedOverride: a process-wide setting (BLAS's thread count in Gemm.withSingleThreadedBLAS) held while
// any scope is open, however the scopes of different threads interleave.
import Dispatch
import QLoRACore
import Testing

/// A stand-in for the process-wide setting, with a log of every write.
private final class Setting: @unchecked Sendable {
    var value = 2
    var writes: [Int] = []
}

@Suite("scoped override")
struct ScopedOverrideTests {
    @Test("overlapping scopes keep the override until the last one closes, then restore the setting once")
    func overlapping() {
        let s = Setting()
        let o = ScopedOverride(value: 1, get: { s.value }, set: { s.value = $0; s.writes.append($0) })
        o.enter()  // the first scope (say, one engine's step)
        #expect(s.value == 1)
        o.enter()  // a second, on another thread
        o.leave()  // the first ends while the second still runs
        #expect(s.value == 1 && o.openScopes == 1)
        o.leave()
        #expect(s.value == 2 && o.openScopes == 0)
        #expect(s.writes == [1, 2])
        // Nested on one thread: the same.
        o.with { o.with { #expect(s.value == 1) }; #expect(s.value == 1) }
        #expect(s.value == 2)
        // A setting already at the value is never written.
        s.value = 1
        s.writes = []
        o.with { #expect(s.value == 1) }
        #expect(s.writes.isEmpty)
    }

    @Test("scopes from many threads at once end with the setting restored")
    func concurrent() {
        let s = Setting()
        let o = ScopedOverride(value: 1, get: { s.value }, set: { s.value = $0 })
        let seen = UnsafeMutablePointer<Int>.allocate(capacity: 64)
        defer { seen.deallocate() }
        DispatchQueue.concurrentPerform(iterations: 64) { i in
            o.with {
                // Inside any scope the override holds (the mutex orders the writes before this read).
                o.with { seen[i] = s.value }
            }
        }
        #expect((0..<64).allSatisfy { seen[$0] == 1 })
        #expect(s.value == 2 && o.openScopes == 0)
    }
}
