// Our own parallel loops: contiguous chunks over a range, one per worker, so results never depend on
// scheduling. Never run these while BLAS threads are busy (see DESIGN.md, Compute).
//
// The workers are a fixed pool of threads made once, woken through one condition variable: a training
// step makes tens of thousands of parallel calls, and DispatchQueue.concurrentPerform allocated two
// objects per call (the closure box and a block copy), the bulk of what the step loop still allocated.
// (Storing the closure for the helpers still boxes it once per call: 32 bytes.)
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

/// threadCount - 1 helper threads; the calling thread does chunk 0 itself.
final class WorkerPool: @unchecked Sendable {
    static let shared = WorkerPool(helpers: Parallel.threadCount - 1)

    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let wake = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private let done = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    // Guarded by mutex.
    private var busy = false
    private var generation: UInt64 = 0
    private var job: ((Int) -> Void)?
    private var jobWorkers = 0
    private var pending = 0
    private let helpers: Int

    private init(helpers: Int) {
        self.helpers = helpers
        pthread_mutex_init(mutex, nil)
        pthread_cond_init(wake, nil)
        pthread_cond_init(done, nil)
        for index in 0..<helpers {
            let context = Unmanaged.passRetained(HelperContext(pool: self, worker: index + 1)).toOpaque()
            var thread = pthread_t()
            let status = pthread_create(&thread, nil, { raw in
                let context = Unmanaged<HelperContext>.fromOpaque(raw!).takeRetainedValue()
                context.pool.helperLoop(worker: context.worker)
                return nil
            }, context)
            precondition(status == 0, "cannot start worker thread: \(status)")
            pthread_detach(thread)
        }
    }

    private final class HelperContext {
        let pool: WorkerPool
        let worker: Int
        init(pool: WorkerPool, worker: Int) { self.pool = pool; self.worker = worker }
    }

    /// Runs chunk(0) here and chunk(1..<workers) on helpers, returning when all are done; false (nothing
    /// run) when the pool is busy or too small.
    func run(workers: Int, _ chunk: (Int) -> Void) -> Bool {
        guard workers - 1 <= helpers else { return false }
        pthread_mutex_lock(mutex)
        if busy { pthread_mutex_unlock(mutex); return false }
        busy = true
        withoutActuallyEscaping(chunk) { escapable in
            job = escapable
            jobWorkers = workers
            pending = workers - 1
            generation &+= 1
            pthread_cond_broadcast(wake)
            pthread_mutex_unlock(mutex)
            escapable(0)
            pthread_mutex_lock(mutex)
            while pending > 0 { pthread_cond_wait(done, mutex) }
            job = nil
        }
        busy = false
        pthread_mutex_unlock(mutex)
        return true
    }

    private func helperLoop(worker: Int) {
        var seen: UInt64 = 0
        pthread_mutex_lock(mutex)
        while true {
            while generation == seen { pthread_cond_wait(wake, mutex) }
            seen = generation
            guard worker < jobWorkers, let work = job else { continue }
            pthread_mutex_unlock(mutex)
            work(worker)
            pthread_mutex_lock(mutex)
            pending -= 1
            if pending == 0 { pthread_cond_signal(done) }
        }
    }
}
