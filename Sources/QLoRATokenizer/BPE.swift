// Byte-pair encoding: a word starts as its Unicode scalars (or, with byte fallback, the bytes of
// scalars outside the vocabulary) and the adjacent pair with the lowest merge rank is merged until no
// ranked pair is left. A linked list of symbols and a min-heap of candidate pairs make a long word
// (a sentencepiece-style text is one word) cost n log n.
// Tokens are compared by their exact UTF-8 bytes, never by Swift String equality, which treats
// canonically equivalent strings (e.g. U+1F77 and U+03AF) as equal.

/// A token's exact bytes, as a dictionary key.
struct TokenBytes: Hashable {
    let bytes: [UInt8]
    init(_ s: String) { bytes = Array(s.utf8) }
    init(bytes: [UInt8]) { self.bytes = bytes }
}

struct BPEModel {
    let vocab: [TokenBytes: Int]
    let idToToken: [String]
    /// (left id, right id) -> (rank, merged id).
    let merges: [PairKey: (rank: Int, merged: Int)]
    let byteFallback: Bool
    let unkID: Int?
    let fuseUnk: Bool
    let ignoreMerges: Bool
    /// Token ids of "<0xXX>" byte tokens (byte fallback).
    let byteTokens: [Int?]

    struct PairKey: Hashable {
        let left: Int
        let right: Int
    }

    /// `mergeRanks`: each merge's rank, when several share one (SentencePiece scores); else its index.
    init(vocab entries: [(String, Int)], merges: [(String, String)], byteFallback: Bool, unkToken: String?, fuseUnk: Bool, ignoreMerges: Bool,
         mergeRanks: [Int]? = nil) {
        var vocab: [TokenBytes: Int] = [:]
        vocab.reserveCapacity(entries.count)
        var idToToken = [String](repeating: "", count: (entries.map(\.1).max() ?? -1) + 1)
        for (t, i) in entries {
            if vocab[TokenBytes(t)] == nil { vocab[TokenBytes(t)] = i }
            idToToken[i] = t
        }
        self.vocab = vocab
        self.idToToken = idToToken
        var m: [PairKey: (rank: Int, merged: Int)] = [:]
        m.reserveCapacity(merges.count)
        for (rank, (a, b)) in merges.enumerated() {
            guard let ia = vocab[TokenBytes(a)], let ib = vocab[TokenBytes(b)],
                  let merged = vocab[TokenBytes(bytes: Array(a.utf8) + Array(b.utf8))] else { continue }
            let key = PairKey(left: ia, right: ib)
            if m[key] == nil { m[key] = (mergeRanks?[rank] ?? rank, merged) }
        }
        self.merges = m
        self.byteFallback = byteFallback
        unkID = unkToken.flatMap { vocab[TokenBytes($0)] }
        self.fuseUnk = fuseUnk
        self.ignoreMerges = ignoreMerges
        byteTokens = (0..<256).map { b in
            let hex = String(b, radix: 16, uppercase: true)
            return vocab[TokenBytes("<0x" + (hex.count == 1 ? "0" + hex : hex) + ">")]
        }
    }

    func id(of token: String) -> Int? { vocab[TokenBytes(token)] }

    /// Token ids of one word.
    func encode(_ word: String) -> [Int] {
        if word.isEmpty { return [] }
        if ignoreMerges, let id = vocab[TokenBytes(word)] { return [id] }
        var ids: [Int] = []
        var lastWasUnk = false
        for scalar in word.unicodeScalars {
            var utf8: [UInt8] = []
            utf8.reserveCapacity(4)
            for b in String(scalar).utf8 { utf8.append(b) }
            if let id = vocab[TokenBytes(bytes: utf8)] {
                ids.append(id)
                lastWasUnk = false
            } else if byteFallback {
                for b in utf8 {
                    if let id = byteTokens[Int(b)] { ids.append(id) } else if let u = unkID { ids.append(u) }
                }
                lastWasUnk = false
            } else if let u = unkID {
                if !(fuseUnk && lastWasUnk) { ids.append(u) }
                lastWasUnk = true
            }
        }
        if ids.count < 2 { return ids }
        return mergeAll(ids)
    }

    private func mergeAll(_ initial: [Int]) -> [Int] {
        var ids = initial
        let n = ids.count
        var next = Array(1...n)          // next[i] (n = end)
        var prev = Array(-1..<(n - 1))   // prev[i] (-1 = start)
        var alive = [Bool](repeating: true, count: n)
        var heap = PairHeap()
        func push(_ i: Int) {
            let j = next[i]
            guard j < n, let m = merges[PairKey(left: ids[i], right: ids[j])] else { return }
            heap.push(rank: m.rank, position: i, left: ids[i], right: ids[j], merged: m.merged)
        }
        for i in 0..<(n - 1) { push(i) }
        while let top = heap.pop() {
            let i = top.position
            guard alive[i], ids[i] == top.left else { continue }
            let j = next[i]
            guard j < n, alive[j], ids[j] == top.right else { continue }
            ids[i] = top.merged
            alive[j] = false
            next[i] = next[j]
            if next[j] < n { prev[next[j]] = i }
            if prev[i] >= 0 { push(prev[i]) }
            push(i)
        }
        var out: [Int] = []
        var i = 0
        while i < n { out.append(ids[i]); i = next[i] }
        return out
    }
}

/// A binary min-heap of merge candidates ordered by (rank, position): the leftmost of equal ranks first.
struct PairHeap {
    struct Entry {
        let rank: Int
        let position: Int
        let left: Int
        let right: Int
        let merged: Int
    }

    private var items: [Entry] = []

    private static func less(_ a: Entry, _ b: Entry) -> Bool {
        a.rank < b.rank || (a.rank == b.rank && a.position < b.position)
    }

    mutating func push(rank: Int, position: Int, left: Int, right: Int, merged: Int) {
        items.append(Entry(rank: rank, position: position, left: left, right: right, merged: merged))
        var c = items.count - 1
        while c > 0 {
            let p = (c - 1) / 2
            if Self.less(items[c], items[p]) { items.swapAt(c, p); c = p } else { break }
        }
    }

    mutating func pop() -> Entry? {
        guard let first = items.first else { return nil }
        let last = items.removeLast()
        if !items.isEmpty {
            items[0] = last
            var p = 0
            while true {
                let l = 2 * p + 1, r = l + 1
                var m = p
                if l < items.count && Self.less(items[l], items[m]) { m = l }
                if r < items.count && Self.less(items[r], items[m]) { m = r }
                if m == p { break }
                items.swapAt(p, m)
                p = m
            }
        }
        return first
    }
}
