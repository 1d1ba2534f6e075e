// A progress bar on stderr for long work. It redraws in place on a terminal and prints a line every
// few seconds otherwise (logs, CI); results never go to stderr, so scripts can read stdout.
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public final class ProgressBar {
    private let label: String
    private let total: Int
    private let interactive: Bool
    private let enabled: Bool
    private var current = 0
    private let start: Double
    private var lastDraw: Double = 0

    /// - Parameters:
    ///   - label: what is being done ("quantize").
    ///   - total: the number of units of work.
    ///   - enabled: false silences the bar (e.g. `--json` or `--quiet`).
    public init(_ label: String, total: Int, enabled: Bool = true) {
        self.label = label
        self.total = max(total, 1)
        self.enabled = enabled
        interactive = isatty(2) != 0
        start = Clock.seconds()
    }

    /// Advances by `units`, with an optional note (e.g. the tensor being processed).
    public func advance(by units: Int = 1, note: String = "") {
        current += units
        guard enabled else { return }
        let now = Clock.seconds()
        let done = current >= total
        if !done && now - lastDraw < (interactive ? 0.1 : 5.0) { return }
        lastDraw = now
        let fraction = Double(min(current, total)) / Double(total)
        let width = 30
        let filled = Int(fraction * Double(width))
        let bar = String(repeating: "█", count: filled) + String(repeating: "░", count: width - filled)
        let elapsed = now - start
        let eta = fraction > 0 ? elapsed / fraction - elapsed : 0
        var line = "\(label) \(bar) \(current)/\(total) \(Self.format(elapsed)) elapsed"
        if !done { line += ", ETA \(Self.format(eta))" }
        if !note.isEmpty { line += "  \(note.count > 60 ? String(note.suffix(60)) : note)" }
        if interactive {
            Log.write("\r\u{1B}[2K" + line + (done ? "\n" : ""))
        } else {
            Log.write(line + "\n")
        }
    }

    private static func format(_ seconds: Double) -> String {
        let s = Int(seconds.rounded())
        if s >= 60 { return "\(s / 60)m\(String(format2: s % 60))s" }
        let tenths = Int((seconds * 10).rounded())
        return "\(tenths / 10).\(tenths % 10)s"
    }
}

private extension String {
    init(format2 value: Int) { self = value < 10 ? "0\(value)" : "\(value)" }
}

/// Monotonic time.
public enum Clock {
    public static func seconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
    }

    /// Seconds since 1970 (wall-clock time, for logs that record when things happened).
    public static func wallSeconds() -> Double {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        return Double(ts.tv_sec) + Double(ts.tv_nsec) * 1e-9
    }
}

/// Writes to stderr (logs and progress; stdout is for results).
public enum Log {
    /// Silences info lines (the ranks other than 0 of a data-parallel run); errors are printed elsewhere.
    nonisolated(unsafe) public static var muted = false

    public static func write(_ text: String) {
        guard !muted else { return }
        var t = text
        t.withUTF8 { buf in _ = fwrite(buf.baseAddress, 1, buf.count, stderr) }
        fflush(stderr)
    }

    public static func info(_ text: String) { write(text + "\n") }
}

/// A byte count in decimal units, two decimals: "512 B", "1.50 MB".
public func formatBytes(_ n: Int) -> String {
    let units = ["B", "KB", "MB", "GB", "TB"]
    var v = Double(n), u = 0
    while v >= 1000 && u < units.count - 1 { v /= 1000; u += 1 }
    return u == 0 ? "\(n) B" : "\(Chart.fixed(v, 2)) \(units[u])"
}
