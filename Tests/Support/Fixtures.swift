// Helpers shared by the test targets: fixture paths and comparisons that report where they differ.
import QLoRACore
import QLoRAFormats

public enum Fixtures {
    /// The Resources folder beside the calling test file.
    public static func resources(_ file: String = #filePath) -> String {
        FileSystem.join(FileSystem.directoryName(file), "Resources")
    }

    /// The repository root (two levels above a test file).
    public static func repositoryRoot(_ file: String = #filePath) -> String {
        FileSystem.directoryName(FileSystem.directoryName(FileSystem.directoryName(file)))
    }

    public static func open(_ name: String, _ file: String = #filePath) throws -> SafetensorsFile {
        try SafetensorsFile(path: FileSystem.join(resources(file), name))
    }

    /// A fresh empty temporary folder, removed with everything in it when the test process exits
    /// (QLORA_KEEP_TEST_FILES=1 keeps them for a look). Several tests write merged models of hundreds of
    /// megabytes: left behind, each `make test` had filled about 2 GB of /tmp.
    public static func temporaryDirectory(_ label: String) throws -> String {
        let base = Environment.get("TMPDIR") ?? "/tmp"
        var n = 0
        while true {
            let dir = FileSystem.join(base, "qlora-test-\(label)-\(Clock.seconds().bitPattern % 1_000_000_007)-\(n)")
            if !FileSystem.exists(dir) {
                try FileSystem.makeDirectory(dir)
                TemporaryDirectories.shared.add(dir)
                return dir
            }
            n += 1
        }
    }
}

extension Fixtures {
    /// A safetensors file from a raw header string and a data section; `length` overrides the header
    /// length field (for hostile-input tests).
    public static func rawSafetensors(_ header: String, data: [UInt8], length: UInt64? = nil) -> [UInt8] {
        let h = Array(header.utf8)
        var l = (length ?? UInt64(h.count)).littleEndian
        return withUnsafeBytes(of: &l) { Array($0) } + h + data
    }
}

public enum Compare {
    /// nil when `actual` and `expected` are bit-identical; else a message naming the first difference.
    public static func bitEqual(_ actual: [Float], _ expected: [Float], _ label: String) -> String? {
        guard actual.count == expected.count else { return "\(label): \(actual.count) values, expected \(expected.count)" }
        var mismatches = 0
        var first = -1
        for i in 0..<actual.count where actual[i].bitPattern != expected[i].bitPattern {
            if first < 0 { first = i }
            mismatches += 1
        }
        if mismatches == 0 { return nil }
        return "\(label): \(mismatches) of \(actual.count) differ; first at \(first): \(actual[first]) vs \(expected[first])"
    }

    /// As `bitEqual`, but +0.0 and -0.0 count as equal (bitsandbytes itself is inconsistent about the
    /// sign of FP4's zero code, see scripts/reference/NOTES.md).
    public static func bitEqualIgnoringZeroSign(_ actual: [Float], _ expected: [Float], _ label: String) -> String? {
        bitEqual(actual.map { $0 == 0 ? 0 : $0 }, expected.map { $0 == 0 ? 0 : $0 }, label)
    }

    public static func equal(_ actual: [UInt8], _ expected: [UInt8], _ label: String) -> String? {
        guard actual.count == expected.count else { return "\(label): \(actual.count) bytes, expected \(expected.count)" }
        let diffs = actual.indices.filter { actual[$0] != expected[$0] }
        if diffs.isEmpty { return nil }
        let i = diffs[0]
        return "\(label): \(diffs.count) of \(actual.count) bytes differ; first at \(i): \(actual[i]) vs \(expected[i])"
    }

    /// nil when |a - e| <= atol + rtol * |e| everywhere; else the worst element.
    public static func close(_ actual: [Float], _ expected: [Float], atol: Float, rtol: Float, _ label: String) -> String? {
        guard actual.count == expected.count else { return "\(label): \(actual.count) values, expected \(expected.count)" }
        var worst = -1
        var worstExcess: Float = 0
        for i in 0..<actual.count {
            let excess = abs(actual[i] - expected[i]) - (atol + rtol * abs(expected[i]))
            if excess > worstExcess || (actual[i].isNaN != expected[i].isNaN) { worst = i; worstExcess = excess.isNaN ? .infinity : excess }
        }
        if worst < 0 { return nil }
        return "\(label): element \(worst) is \(actual[worst]), expected \(expected[worst]) (atol \(atol), rtol \(rtol))"
    }
}

/// A seeded generator (SplitMix64) so tests are repeatable.
public struct SeededRandom: RandomNumberGenerator {
    private var state: UInt64
    public init(seed: UInt64) { state = seed }
    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }

    /// A standard normal sample (Box-Muller).
    public mutating func normal() -> Float {
        let u1 = max(Double.random(in: 0..<1, using: &self), 1e-300)
        let u2 = Double.random(in: 0..<1, using: &self)
        return Float((-2 * log(u1)).squareRoot() * cos(2 * Double.pi * u2))
    }
}

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

import Foundation

extension Fixtures {
    /// Large text fixtures are committed compressed (`NAME.xz` in a Resources folder) and decompressed
    /// by `xz` (Debian's xz-utils, which scripts/setup.sh installs) into `.build/test-fixtures/` under the
    /// repository, once per test process: the fresh copy replaces any earlier one with a rename, so a
    /// changed fixture is never read stale and a half-written file is never read at all.
    /// Returns the decompressed file's path; throws, naming the file, when `xz` is missing or fails.
    public static func decompressed(_ compressed: String, file: String = #filePath) throws -> String {
        guard compressed.hasSuffix(".xz") else { throw FixtureError("\(compressed): not an .xz file") }
        guard FileSystem.exists(compressed) else { throw FixtureError("\(compressed): no such fixture") }
        return try DecompressedFixtures.shared.path(for: compressed, root: repositoryRoot(file))
    }
}

public struct FixtureError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

/// The test process's temporary folders, removed at exit.
private final class TemporaryDirectories: @unchecked Sendable {
    static let shared: TemporaryDirectories = {
        let t = TemporaryDirectories()
        atexit { TemporaryDirectories.shared.removeAll() }
        return t
    }()
    private let lock = NSLock()
    private var folders: [String] = []

    func add(_ dir: String) {
        lock.lock(); defer { lock.unlock() }
        folders.append(dir)
    }

    func removeAll() {
        guard Environment.get("QLORA_KEEP_TEST_FILES") != "1" else { return }
        lock.lock(); defer { lock.unlock() }
        for dir in folders { try? FileSystem.removeTree(dir) }
        folders.removeAll()
    }
}

private final class DecompressedFixtures: @unchecked Sendable {
    static let shared = DecompressedFixtures()
    private let lock = NSLock()
    private var done: [String: String] = [:]

    func path(for compressed: String, root: String) throws -> String {
        lock.lock(); defer { lock.unlock() }
        if let p = done[compressed] { return p }
        // Resources/<sub>/NAME.xz -> .build/test-fixtures/<Resources' test target>/<sub>/NAME
        let relative = compressed.hasPrefix(root + "/") ? String(compressed.dropFirst(root.count + 1)) : FileSystem.baseName(compressed)
        let target = FileSystem.join(root, ".build/test-fixtures/" + String(relative.dropLast(3)))
        try FileManager.default.createDirectory(atPath: FileSystem.directoryName(target), withIntermediateDirectories: true)
        let partial = target + ".part-\(getpid())"
        FileManager.default.createFile(atPath: partial, contents: nil)
        guard let out = FileHandle(forWritingAtPath: partial) else { throw FixtureError("\(partial): cannot write") }
        let xz = Process()
        xz.executableURL = URL(fileURLWithPath: "/usr/bin/env")
        xz.arguments = ["xz", "--decompress", "--stdout", compressed]
        xz.standardOutput = out
        let errors = Pipe()
        xz.standardError = errors
        do { try xz.run() } catch {
            try? out.close(); unlink(partial)
            throw FixtureError("\(compressed): cannot run xz (\(error)); install xz-utils or run scripts/setup.sh")
        }
        let message = String(decoding: errors.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        xz.waitUntilExit()
        try? out.close()
        guard xz.terminationStatus == 0 else {
            unlink(partial)
            throw FixtureError("\(compressed): xz exited with \(xz.terminationStatus): \(message.trimmingCharacters(in: .whitespacesAndNewlines)); install xz-utils or run scripts/setup.sh")
        }
        guard rename(partial, target) == 0 else { unlink(partial); throw FixtureError("\(target): rename failed (errno \(errno))") }
        done[compressed] = target
        return target
    }
}
