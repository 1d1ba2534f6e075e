// GPT-2's byte-to-character table: every byte maps to a printable Unicode character, so byte-level BPE
// can work on strings. Printable Latin-1 bytes map to themselves; the other 68 to U+0100 onward.
enum ByteLevel {
    static let byteToChar: [Character] = {
        var table = [Character](repeating: " ", count: 256)
        var next: UInt32 = 256
        for b in 0..<256 {
            let printable = (0x21...0x7E).contains(b) || (0xA1...0xAC).contains(b) || (0xAE...0xFF).contains(b)
            if printable {
                table[b] = Character(Unicode.Scalar(UInt32(b))!)
            } else {
                table[b] = Character(Unicode.Scalar(next)!)
                next += 1
            }
        }
        return table
    }()

    static let charToByte: [Character: UInt8] = {
        var map: [Character: UInt8] = [:]
        for (b, c) in byteToChar.enumerated() { map[c] = UInt8(b) }
        return map
    }()

    /// The byte-level string of some text.
    static func encode(_ s: Substring) -> String {
        var out = String()
        out.reserveCapacity(s.utf8.count)
        for b in s.utf8 { out.append(byteToChar[Int(b)]) }
        return out
    }

    /// The bytes of a byte-level token (characters outside the table are kept as their UTF-8).
    static func decode(_ token: String) -> [UInt8] {
        var bytes: [UInt8] = []
        for c in token {
            if let b = charToByte[c] { bytes.append(b) } else { bytes += Array(String(c).utf8) }
        }
        return bytes
    }
}
