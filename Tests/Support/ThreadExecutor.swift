// A task executor with a thread of its own, for servers that tests start in-process.
//
// Swift Testing runs synchronous tests on the cooperative pool, which has one thread per core: on a
// 2-core machine two long numerical tests hold every thread for minutes. A server whose handlers wait for
// a pool thread then answers only after its client has timed out and retried, and a test that counts
// requests sees the retries. Tasks that prefer this executor (and their child tasks) run here instead.
import Foundation

public final class ThreadExecutor: TaskExecutor, @unchecked Sendable {
    private let condition = NSCondition()
    private var jobs: [UnownedJob] = []

    /// One for the whole test process; its thread lives as long as the process.
    public static let servers = ThreadExecutor(name: "test-servers")

    private init(name: String) {
        let thread = Thread { self.loop() }
        thread.name = name
        thread.start()
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        condition.lock()
        jobs.append(job)
        condition.signal()
        condition.unlock()
    }

    private func loop() {
        while true {
            condition.lock()
            while jobs.isEmpty { condition.wait() }
            let batch = jobs
            jobs.removeAll(keepingCapacity: true)
            condition.unlock()
            for job in batch { job.runSynchronously(on: asUnownedTaskExecutor()) }
        }
    }
}
