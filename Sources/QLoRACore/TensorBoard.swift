// TensorBoard event files without TensorFlow or protobuf: the TFRecord framing (length, masked CRC-32C
// of the length, payload, masked CRC-32C of the payload) around hand-encoded `Event` messages. Only
// what training logs needs: the file-version header, scalar summaries and SessionLog START (which tells
// TensorBoard to drop values logged past a resumed run's checkpoint). Each record is written with one
// write(2) as it comes, so a killed run keeps everything it logged.
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// CRC-32C (Castagnoli), as TFRecord uses it and checkpoints record their files with.
public enum CRC32C {
    static let table: [UInt32] = (0..<256).map { i -> UInt32 in
        var c = UInt32(i)
        for _ in 0..<8 { c = (c & 1) != 0 ? (c >> 1) ^ 0x82F6_3B78 : c >> 1 }
        return c
    }

    /// Slicing-by-8: tables[k][b] is the CRC of byte b followed by k zero bytes, so eight bytes take eight
    /// lookups and no dependency chain between them (the byte-at-a-time loop, generic over Collection and
    /// called across modules, ran at about 40 MB/s: 5 s a checkpoint of the default model at r 64).
    static let tables: [UInt32] = {
        var t = [UInt32](repeating: 0, count: 8 * 256)
        for i in 0..<256 { t[i] = table[i] }
        for k in 1..<8 {
            for i in 0..<256 { t[k * 256 + i] = (t[(k - 1) * 256 + i] >> 8) ^ table[Int(t[(k - 1) * 256 + i] & 0xFF)] }
        }
        return t
    }()

    public static func checksum<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
        if let crc = bytes.withContiguousStorageIfAvailable({ checksum(UnsafeRawBufferPointer($0)) }) { return crc }
        return reference(bytes)
    }

    /// Byte at a time: the definition the fast path is tested against.
    public static func reference<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
        var crc: UInt32 = 0xFFFF_FFFF
        for b in bytes { crc = table[Int((crc ^ UInt32(b)) & 0xFF)] ^ (crc >> 8) }
        return crc ^ 0xFFFF_FFFF
    }

    public static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        guard let base = bytes.baseAddress else { return 0 }
        let n = bytes.count
        var i = 0
        tables.withUnsafeBufferPointer { tp in
            let t = tp.baseAddress!
            while i + 8 <= n {
                let w = UInt64(littleEndian: base.loadUnaligned(fromByteOffset: i, as: UInt64.self)) ^ UInt64(crc)
                crc = t[7 * 256 + Int(w & 0xFF)] ^ t[6 * 256 + Int((w >> 8) & 0xFF)]
                    ^ t[5 * 256 + Int((w >> 16) & 0xFF)] ^ t[4 * 256 + Int((w >> 24) & 0xFF)]
                    ^ t[3 * 256 + Int((w >> 32) & 0xFF)] ^ t[2 * 256 + Int((w >> 40) & 0xFF)]
                    ^ t[1 * 256 + Int((w >> 48) & 0xFF)] ^ t[Int(w >> 56)]
                i += 8
            }
            while i < n {
                crc = t[Int((crc ^ UInt32(base.load(fromByteOffset: i, as: UInt8.self))) & 0xFF)] ^ (crc >> 8)
                i += 1
            }
        }
        return crc ^ 0xFFFF_FFFF
    }

    /// TFRecord's masking, so that a CRC of data holding CRCs stays well distributed.
    public static func masked<C: Collection>(_ bytes: C) -> UInt32 where C.Element == UInt8 {
        let c = checksum(bytes)
        return ((c >> 15) | (c << 17)) &+ 0xA282_EAD8
    }
}

public enum TensorBoardError: Error, CustomStringConvertible {
    case corrupt(file: String, reason: String)
    public var description: String {
        switch self { case let .corrupt(file, reason): return "\(file): not a TensorBoard event file: \(reason)" }
    }
}

/// The few protobuf fields of tensorboard's `Event` that training writes.
public enum TensorBoardEvent {
    static func varint(_ v: UInt64, into out: inout [UInt8]) {
        var v = v
        while v >= 0x80 { out.append(UInt8(v & 0x7F) | 0x80); v >>= 7 }
        out.append(UInt8(v))
    }

    static func key(_ field: UInt64, _ wireType: UInt64, into out: inout [UInt8]) { varint(field << 3 | wireType, into: &out) }

    static func bytesField(_ field: UInt64, _ bytes: [UInt8], into out: inout [UInt8]) {
        key(field, 2, into: &out)
        varint(UInt64(bytes.count), into: &out)
        out += bytes
    }

    static func header(wallTime: Double, step: Int64, into out: inout [UInt8]) {
        key(1, 1, into: &out)  // wall_time: double
        withUnsafeBytes(of: wallTime.bitPattern.littleEndian) { out += $0 }
        if step != 0 {
            key(2, 0, into: &out)  // step: int64
            varint(UInt64(bitPattern: step), into: &out)
        }
    }

    /// Event{wall_time, file_version: "brain.Event:2"}: the first record of every file.
    public static func fileVersion(wallTime: Double) -> [UInt8] {
        var out: [UInt8] = []
        header(wallTime: wallTime, step: 0, into: &out)
        bytesField(3, Array("brain.Event:2".utf8), into: &out)
        return out
    }

    /// Event{wall_time, step, summary{value{tag, simple_value}}}, as torch's `add_scalar` writes it.
    public static func scalar(tag: String, value: Float, step: Int64, wallTime: Double) -> [UInt8] {
        var v: [UInt8] = []
        bytesField(1, Array(tag.utf8), into: &v)
        key(2, 5, into: &v)  // simple_value: float
        withUnsafeBytes(of: value.bitPattern.littleEndian) { v += $0 }
        var summary: [UInt8] = []
        bytesField(1, v, into: &summary)
        var out: [UInt8] = []
        header(wallTime: wallTime, step: step, into: &out)
        bytesField(5, summary, into: &out)
        return out
    }

    /// Event{wall_time, step, session_log{status: START}}: values at this step and later, logged
    /// before it, are stale (a run resumed from an earlier checkpoint) and TensorBoard drops them.
    public static func sessionStart(step: Int64, wallTime: Double) -> [UInt8] {
        var out: [UInt8] = []
        header(wallTime: wallTime, step: step, into: &out)
        var log: [UInt8] = []
        key(1, 0, into: &log)
        varint(1, into: &log)  // SessionLog.START
        bytesField(7, log, into: &out)
        return out
    }

    /// One TFRecord around an encoded event.
    public static func record(_ payload: [UInt8]) -> [UInt8] {
        var length: [UInt8] = []
        withUnsafeBytes(of: UInt64(payload.count).littleEndian) { length += $0 }
        var out = length
        withUnsafeBytes(of: CRC32C.masked(length).littleEndian) { out += $0 }
        out += payload
        withUnsafeBytes(of: CRC32C.masked(payload).littleEndian) { out += $0 }
        return out
    }

    /// Splits a file into record payloads, checking both CRCs of each.
    public static func records(_ bytes: [UInt8], file: String) throws -> [[UInt8]] {
        var out: [[UInt8]] = []
        var i = 0
        func u32(_ at: Int) -> UInt32 { bytes[at..<at + 4].reversed().reduce(0) { $0 << 8 | UInt32($1) } }
        while i < bytes.count {
            guard i + 12 <= bytes.count else { throw TensorBoardError.corrupt(file: file, reason: "truncated record at byte \(i)") }
            let length = Int(bytes[i..<i + 8].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) })
            guard u32(i + 8) == CRC32C.masked(bytes[i..<i + 8]) else { throw TensorBoardError.corrupt(file: file, reason: "bad length CRC at byte \(i)") }
            guard length <= bytes.count - i - 16 else { throw TensorBoardError.corrupt(file: file, reason: "truncated record at byte \(i)") }
            let payload = Array(bytes[i + 12..<i + 12 + length])
            guard u32(i + 12 + length) == CRC32C.masked(payload) else { throw TensorBoardError.corrupt(file: file, reason: "bad data CRC at byte \(i)") }
            out.append(payload)
            i += 16 + length
        }
        return out
    }
}

/// A file that grows by whole writes: each `append` is one write(2) with O_APPEND, so a killed process
/// leaves every record it finished (logs, metrics, event files).
public final class AppendingFile {
    public let path: String
    private let fd: Int32

    public init(path: String) throws {
        self.path = path
        fd = try Syscalls.open(path, flags: O_WRONLY | O_CREAT | O_APPEND)
    }

    deinit { Syscalls.close(fd) }

    public func append(_ bytes: [UInt8]) throws {
        try bytes.withUnsafeBytes { try Syscalls.writeAll(fd, $0, path: path) }
    }
}

/// Appends events to `folder/events.out.tfevents.<seconds>.<host>.<pid>`; `tensorboard --logdir` reads it.
public final class TensorBoardWriter {
    public var path: String { file.path }
    private let file: AppendingFile

    public init(folder: String, wallTime: Double = Clock.wallSeconds()) throws {
        try FileSystem.makeDirectory(folder)
        var host = [CChar](repeating: 0, count: 256)
        gethostname(&host, host.count - 1)
        let hostName = String(decoding: host.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        file = try AppendingFile(path: FileSystem.join(folder, "events.out.tfevents.\(Int(wallTime)).\(hostName.isEmpty ? "localhost" : hostName).\(Syscalls.processID())"))
        try append(TensorBoardEvent.fileVersion(wallTime: wallTime))
    }

    private func append(_ event: [UInt8]) throws { try file.append(TensorBoardEvent.record(event)) }

    public func scalar(_ tag: String, _ value: Double, step: Int, wallTime: Double = Clock.wallSeconds()) throws {
        try append(TensorBoardEvent.scalar(tag: tag, value: Float(value), step: Int64(step), wallTime: wallTime))
    }

    /// Marks a restart at `step` (the first step the resumed run trains).
    public func sessionStart(step: Int, wallTime: Double = Clock.wallSeconds()) throws {
        try append(TensorBoardEvent.sessionStart(step: Int64(step), wallTime: wallTime))
    }
}
