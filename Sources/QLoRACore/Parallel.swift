// Our own parallel loops: contiguous chunks over a range, one per worker, so results never depend on
// scheduling. Never run these while BLAS threads are busy (see DESIGN.md, Compute).
import Dispatch
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
    /// 0..<threadCount.
    public static func forChunks(count: Int, granularity: Int = 1, minimumChunk: Int = 1, _ body: (Int, Range<Int>) -> Void) {
        guard count > 0 else { return }
        let units = (count + granularity - 1) / granularity
        let workers = min(threadCount, max(1, count / max(minimumChunk, 1)), units)
        if workers <= 1 { body(0, 0..<count); return }
        let unitsPerWorker = (units + workers - 1) / workers
        DispatchQueue.concurrentPerform(iterations: workers) { w in
            let start = w * unitsPerWorker * granularity
            let end = min(count, (w + 1) * unitsPerWorker * granularity)
            if start < end { body(w, start..<end) }
        }
    }
}
