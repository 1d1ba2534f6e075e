// Our own parallel loops: contiguous chunks over a range, one per worker, so results never depend on
// scheduling. Never run these while BLAS threads are busy (see DESIGN.md, Compute).
//
// The workers are a fixed pool of threads made once: a training step makes tens of thousands of parallel
// calls, and DispatchQueue.concurrentPerform allocated two objects per call (the closure box and a block
// copy), the bulk of what the step loop still allocated. (Storing the closure for the helpers still
// boxes it once per call: 32 bytes.)
import Atomics
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public enum Parallel {
    /// Worker count: QLORA_THREADS if set, else the number of online CPUs.
    public static let threadCount: Int = {
        if let s = Environment.get("QLORA_THREADS"), let n = Int(s), n > 0 { return n }
        return max(1, Int(sysconf(Int32(_SC_NPROCESSORS_ONLN))))
    }()

    /// Calls `body(worker, range)` on disjoint chunks covering 0..<count, each a multiple of
    /// `granularity` long (except the last), on up to `threadCount` threads; `worker` is in
    /// 0..<threadCount. A call made while the pool is busy (from inside another parallel loop, or from
    /// a second thread) runs its chunks one after another on the calling thread, with the same chunks.
    public static func forChunks(count: Int, granularity: Int = 1, minimumChunk: Int = 1, _ body: (Int, Range<Int>) -> Void) {
        guard count > 0 else { return }
        let units = (count + granularity - 1) / granularity
        let workers = min(threadCount, max(1, count / max(minimumChunk, 1)), units)
        if workers <= 1 { body(0, 0..<count); return }
        let unitsPerWorker = (units + workers - 1) / workers
        func chunk(_ w: Int) {
            let start = w * unitsPerWorker * granularity
            let end = min(count, (w + 1) * unitsPerWorker * granularity)
            if start < end { body(w, start..<end) }
        }
        if !WorkerPool.shared.run(workers: workers, chunk) {
            for w in 0..<workers { chunk(w) }
        }
    }
}

extension Parallel {
    /// Calls `body(range)` on consecutive pieces of `piece` items covering 0..<count, handed to the workers
    /// as they come free: for loops of equal items where a worker may start late (a helper waking up), which
    /// static chunks would leave the others waiting for. Which worker runs a piece varies from call to call,
    /// so `body` must compute each item the same way wherever it runs. A call made while the pool is busy runs
    /// the same pieces one after another on the calling thread, as does one thread: results depend on
    /// neither the contention nor the thread count (prefill attention's products, for one, are sized by
    /// their piece).
    public static func forPieces(count: Int, piece: Int, _ body: (Range<Int>) -> Void) {
        forEachPiece(count: count, piece: piece) { _, range in body(range) }
    }

    /// `forPieces` with the worker (0..<threadCount) that runs each piece: for pieces that need scratch
    /// memory of their own. Pieces run on the calling thread (one thread, or the pool busy) get worker 0.
    public static func forEachPiece(count: Int, piece: Int, _ body: (_ worker: Int, Range<Int>) -> Void) {
        guard count > 0 else { return }
        let pieces = (count + piece - 1) / piece
        let workers = min(threadCount, pieces)
        if workers <= 1 {
            for p in 0..<pieces { body(0, (p * piece)..<min(count, (p + 1) * piece)) }
            return
        }
        let pool = WorkerPool.shared
        let ran = pool.run(workers: workers, resetCursor: true) { worker in
            while true {
                let p = pool.nextPiece()
                guard p < pieces else { break }
                body(worker, (p * piece)..<min(count, (p + 1) * piece))
            }
        }
        if !ran {
            for p in 0..<pieces { body(0, (p * piece)..<min(count, (p + 1) * piece)) }
        }
    }
}

/// threadCount - 1 helper threads; the calling thread does chunk 0 itself.
///
/// A helper that finishes a job spins for a short while (`spinSeconds`) watching for the next one
/// before it sleeps on the condition variable: decoding one token runs about 150 parallel loops a few
/// microseconds apart, and waking a sleeping thread through the kernel costs about as much as the work
/// of a loop. The caller waits for the helpers by spinning too. Between tokens (and whenever work is
/// sparser than that), the helpers sleep and cost nothing.
final class WorkerPool: @unchecked Sendable {
    static let shared = WorkerPool(helpers: Parallel.threadCount - 1)
    /// How long an idle helper watches for work before sleeping.
    static let spinSeconds = 100e-6

    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let wake = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    /// Bumped for each job; helpers run a job when they see it change.
    private let generation = ManagedAtomic<UInt64>(0)
    /// Helpers still running the current job.
    private let pending = ManagedAtomic<Int>(0)
    /// Helpers asleep (or about to be) on `wake`.
    private let sleepers = ManagedAtomic<Int>(0)
    private let busy = ManagedAtomic<Bool>(false)
    /// The next piece of a `Parallel.forPieces` loop.
    private let cursor = ManagedAtomic<Int>(0)
    // Written by the caller before the generation bump, read by helpers after it.
    private var job: ((Int) -> Void)?
    private var jobWorkers = 0
    private let helpers: Int

    private init(helpers: Int) {
        self.helpers = helpers
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(wake, nil)
        for index in 0..<helpers {
            let context = Unmanaged.passRetained(HelperContext(pool: self, worker: index + 1)).toOpaque()
            // pthread_t is an integer in glibc and an optional pointer in Darwin, whose start routine also
            // takes a non-optional argument.
            #if canImport(Glibc)
            var thread = pthread_t()
            let status = pthread_create(&thread, nil, { raw in
                let context = Unmanaged<HelperContext>.fromOpaque(raw!).takeRetainedValue()
                context.pool.helperLoop(worker: context.worker)
                return nil
            }, context)
            precondition(status == 0, "cannot start worker thread: \(status)")
            pthread_detach(thread)
            #else
            var thread: pthread_t?
            let status = pthread_create(&thread, nil, { raw in
                let context = Unmanaged<HelperContext>.fromOpaque(raw).takeRetainedValue()
                context.pool.helperLoop(worker: context.worker)
                return nil
            }, context)
            precondition(status == 0, "cannot start worker thread: \(status)")
            if let thread { pthread_detach(thread) }
            #endif
        }
    }

    private final class HelperContext {
        let pool: WorkerPool
        let worker: Int
        init(pool: WorkerPool, worker: Int) { self.pool = pool; self.worker = worker }
    }

    /// Runs chunk(0) here and chunk(1..<workers) on helpers, returning when all are done; false (nothing
    /// run) when the pool is busy or too small.
    func run(workers: Int, resetCursor: Bool = false, _ chunk: (Int) -> Void) -> Bool {
        guard workers - 1 <= helpers else { return false }
        guard busy.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged else { return false }
        if resetCursor { cursor.store(0, ordering: .relaxed) }
        withoutActuallyEscaping(chunk) { escapable in
            job = escapable
            jobWorkers = workers
            pending.store(helpers, ordering: .relaxed)
            generation.wrappingIncrement(ordering: .sequentiallyConsistent)
            if sleepers.load(ordering: .sequentiallyConsistent) > 0 {
                pthread_mutex_lock(mutex)
                pthread_cond_broadcast(wake)
                pthread_mutex_unlock(mutex)
            }
            escapable(0)
            var spins = 0
            while pending.load(ordering: .acquiring) > 0 {
                spins += 1
                if spins & 1023 == 0 { sched_yield() }
            }
            job = nil
        }
        busy.store(false, ordering: .releasing)
        return true
    }

    /// Takes the next piece number (0, 1, 2, ... for each `forPieces` loop).
    func nextPiece() -> Int { cursor.loadThenWrappingIncrement(ordering: .relaxed) }

    private func helperLoop(worker: Int) {
        var seen: UInt64 = 0
        while true {
            // Watch for the next job, then sleep.
            var current = generation.load(ordering: .acquiring)
            if current == seen {
                let deadline = Clock.seconds() + Self.spinSeconds
                var spins = 0
                while current == seen {
                    spins += 1
                    if spins & 255 == 0 && Clock.seconds() > deadline { break }
                    current = generation.load(ordering: .acquiring)
                }
            }
            if current == seen {
                pthread_mutex_lock(mutex)
                sleepers.wrappingIncrement(ordering: .sequentiallyConsistent)
                current = generation.load(ordering: .sequentiallyConsistent)
                while current == seen {
                    pthread_cond_wait(wake, mutex)
                    current = generation.load(ordering: .sequentiallyConsistent)
                }
                sleepers.wrappingDecrement(ordering: .sequentiallyConsistent)
                pthread_mutex_unlock(mutex)
            }
            seen = current
            if worker < jobWorkers, let work = job { work(worker) }
            pending.wrappingDecrement(ordering: .releasing)
        }
    }
}
