// A process-wide setting overridden while work runs, when several threads may run such work at once.
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Holds a process-wide setting (BLAS's thread count, for one) at `value` while any scope is open, on
/// any thread: the first scope to open saves the setting and overrides it, the last to close restores
/// it. A scope that is still open when another one closes keeps the override to its own end.
public final class ScopedOverride: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let value: Int
    private let get: () -> Int
    private let set: (Int) -> Void
    private var open = 0
    private var saved = 0

    public init(value: Int, get: @escaping () -> Int, set: @escaping (Int) -> Void) {
        self.value = value
        self.get = get
        self.set = set
        pthread_mutex_init(mutex, nil)
    }

    deinit {
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
    }

    /// The number of scopes open now.
    public var openScopes: Int {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return open
    }

    public func enter() {
        pthread_mutex_lock(mutex)
        if open == 0 {
            saved = get()
            if saved != value { set(value) }
        }
        open += 1
        pthread_mutex_unlock(mutex)
    }

    public func leave() {
        pthread_mutex_lock(mutex)
        precondition(open > 0, "ScopedOverride.leave without enter")
        open -= 1
        if open == 0 && saved != value { set(saved) }
        pthread_mutex_unlock(mutex)
    }

    /// Runs `body` inside a scope.
    public func with<R>(_ body: () throws -> R) rethrows -> R {
        enter()
        defer { leave() }
        return try body()
    }
}
