// TensorBoard event files against one written by PyTorch's SummaryWriter (Resources/tensorboard,
// scripts/reference/make_tensorboard_fixture.py): the same events give the same bytes.
import QLoRACore
import QLoRATestSupport
import Testing

@Suite("TensorBoard event files")
struct TensorBoardTests {
    static let folder = FileSystem.join(Fixtures.resources(), "tensorboard")

    @Test("CRC-32C check value and TFRecord masking")
    func crc() {
        #expect(CRC32C.checksum(Array("123456789".utf8)) == 0xE306_9283)
        #expect(CRC32C.checksum([UInt8](repeating: 0, count: 32)) == 0x8A91_36AA)
        // Slicing-by-8 against the byte-at-a-time definition: every length to 80, slices starting off any
        // alignment, and a long buffer.
        var rng = SeededGenerator(seed: 7)
        let bytes = (0..<4099).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        for n in 0...80 { #expect(CRC32C.checksum(Array(bytes.prefix(n))) == CRC32C.reference(bytes.prefix(n)), "length \(n)") }
        for start in 0..<9 { #expect(CRC32C.checksum(bytes[start...]) == CRC32C.reference(bytes[start...]), "from \(start)") }
    }

    @Test("scalars and SessionLog START encode to the bytes torch's SummaryWriter wrote")
    func matchesTorch() throws {
        let fixture = try FileSystem.readFile(FileSystem.join(Self.folder, "events.out.tfevents.fixture"))
        let records = try TensorBoardEvent.records(fixture, file: "fixture")
        let events = try JSON.parse(try FileSystem.readFile(FileSystem.join(Self.folder, "scalars.json"))).arrayValue!
        #expect(records.count == events.count + 1)
        // The header: wall time of the run, then file_version.
        #expect(String(decoding: records[0], as: UTF8.self).contains("brain.Event:2"))
        #expect(Array(TensorBoardEvent.fileVersion(wallTime: 1).dropFirst(9)) == Array(records[0].dropFirst(9).prefix(15)))
        for (i, e) in events.enumerated() {
            let wall = e["wall_time"]!.doubleValue!
            let ours: [UInt8]
            if let s = e["session_log_start_step"]?.intValue {
                ours = TensorBoardEvent.sessionStart(step: Int64(s), wallTime: wall)
            } else {
                ours = TensorBoardEvent.scalar(tag: e["tag"]!.stringValue!, value: Float(e["value"]!.doubleValue!),
                                               step: Int64(e["step"]!.intValue!), wallTime: wall)
            }
            #expect(ours == records[i + 1], "event \(i)")
            #expect(TensorBoardEvent.record(ours) == TensorBoardEvent.record(records[i + 1]))
        }
    }

    @Test("the writer appends whole records; a damaged file is reported")
    func writer() throws {
        let dir = try Fixtures.temporaryDirectory("tb")
        let w = try TensorBoardWriter(folder: dir, wallTime: 1_764_000_000)
        try w.scalar("train/loss", 2.5, step: 1, wallTime: 1_764_000_001)
        try w.sessionStart(step: 1, wallTime: 1_764_000_002)
        let bytes = try FileSystem.readFile(w.path)
        let records = try TensorBoardEvent.records(bytes, file: w.path)
        #expect(records == [TensorBoardEvent.fileVersion(wallTime: 1_764_000_000),
                            TensorBoardEvent.scalar(tag: "train/loss", value: 2.5, step: 1, wallTime: 1_764_000_001),
                            TensorBoardEvent.sessionStart(step: 1, wallTime: 1_764_000_002)])
        #expect(FileSystem.baseName(w.path).hasPrefix("events.out.tfevents.1764000000."))
        var damaged = bytes
        damaged[damaged.count - 7] ^= 1
        #expect(throws: TensorBoardError.self) { try TensorBoardEvent.records(damaged, file: "x") }
        #expect(throws: TensorBoardError.self) { try TensorBoardEvent.records(Array(bytes.dropLast(3)), file: "x") }
    }
}
