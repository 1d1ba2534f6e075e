// Byte-pair encoding: a word starts as its characters (or bytes) and the adjacent pair with the lowest
// merge rank is merged until no ranked pair is left. Implemented with a linked list of symbols and a
// min-heap of candidate pairs, so a long word (a sentencepiece-style text is one word) costs n log n.
struct BPEModel {
    let vocab: [String: Int]
    let idToToken: [String]
    /// "left right" pair -> rank.
    let merges: [PairKey: Int]
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

    init(vocab: [String: Int], merges: [(String, String)], byteFallback: Bool, unkToken: String?, fuseUnk: Bool, ignoreMerges: Bool) {
        self.vocab = vocab
        var idToToken = [String](repeating: "", count: (vocab.values.max() ?? -1) + 1)
        for (t, i) in vocab { idToToken[i] = t }
        self.idToToken = idToToken
        var m: [PairKey: Int] = [:]
        m.reserveCapacity(merges.count)
        for (rank, (a, b)) in merges.enumerated() {
            guard let ia = vocab[a], let ib = vocab[b] else { continue }
            let key = PairKey(left: ia, right: ib)
            if m[key] == nil { m[key] = rank }
        }
        self.merges = m
        self.byteFallback = byteFallback
        unkID = unkToken.flatMap { vocab[$0] }
        self.fuseUnk = fuseUnk
        self.ignoreMerges = ignoreMerges
        byteTokens = (0..<256).map { b in
            let hex = String(b, radix: 16, uppercase: true)
            return vocab["<0x" + (hex.count == 1 ? "0" + hex : hex) + ">"]
        }
    }

    /// The merged token id of a pair (the vocabulary id of the concatenation).
    func mergedID(_ a: Int, _ b: Int) -> Int? { vocab[idToToken[a] + idToToken[b]] }

    /// Token ids of one word.
    func encode(_ word: String) -> [Int] {
        if word.isEmpty { return [] }
        if ignoreMerges, let id = vocab[word] { return [id] }
        // Initial symbols: characters in the vocabulary; others become byte tokens or unk.
        var ids: [Int] = []
        var lastWasUnk = false
        for ch in word {
            if let id = vocab[String(ch)] {
                ids.append(id)
                lastWasUnk = false
            } else if byteFallback {
                for b in String(ch).utf8 {
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
            guard j < n, let rank = merges[PairKey(left: ids[i], right: ids[j])] else { return }
            heap.push(rank: rank, position: i, left: ids[i], right: ids[j])
        }
        for i in 0..<(n - 1) { push(i) }
        while let top = heap.pop() {
            let i = top.position
            guard alive[i], ids[i] == top.left else { continue }
            let j = next[i]
            guard j < n, alive[j], ids[j] == top.right else { continue }
            guard let merged = mergedID(top.left, top.right) else { continue }
            ids[i] = merged
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
    }

    private var items: [Entry] = []

    private static func less(_ a: Entry, _ b: Entry) -> Bool {
        a.rank < b.rank || (a.rank == b.rank && a.position < b.position)
    }

    mutating func push(rank: Int, position: Int, left: Int, right: Int) {
        items.append(Entry(rank: rank, position: position, left: left, right: right))
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
