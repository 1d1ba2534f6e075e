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

    static let scalarToByte: [UInt32: UInt8] = {
        var map: [UInt32: UInt8] = [:]
        for (b, c) in byteToChar.enumerated() { map[c.unicodeScalars.first!.value] = UInt8(b) }
        return map
    }()

    /// The byte-level string of some text.
    static func encode(_ s: Substring) -> String {
        var out = String.UnicodeScalarView()
        for b in s.utf8 { out.append(byteScalars[Int(b)]) }
        return String(out)
    }

    static let byteScalars: [Unicode.Scalar] = byteToChar.map { $0.unicodeScalars.first! }

    /// The bytes of a byte-level token; a token with any character outside the table (an added token
    /// such as "<|im_end|>" is inside it, but "é" is not) is kept as its own UTF-8, as tokenizers does.
    static func decode(_ token: String) -> [UInt8] {
        var bytes: [UInt8] = []
        for u in token.unicodeScalars {
            guard let b = scalarToByte[u.value] else { return Array(token.utf8) }
            bytes.append(b)
        }
        return bytes
    }
}
