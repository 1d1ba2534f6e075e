// Causal multi-head attention with grouped key-value heads, written once for every caller: many query
// rows at once (a training step, a prefill, a batched prefill), one row over a cache (decoding, alone or
// for several sequences in one step), and the backward of the many-row form (training). Scores and
// softmax in f32; the products in f32 (BLAS, on one thread: callers run inside
// Gemm.withSingleThreadedBLAS and these split the work over our own workers) or, given bf16 kernels, on
// bf16 operands with f32 sums (QLoRA's bf16 compute dtype).
//
// Shapes: H query heads of d, Hkv key-value heads, G = H / Hkv query heads read each key-value head.
// Query and output rows are H·d wide (qDim), key and value rows Hkv·d (kvDim).
import CKernels
import QLoRACore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// The head layout of an attention layer.
public struct AttentionHeads: Sendable, Equatable {
    public let heads: Int
    public let kvHeads: Int
    public let headDim: Int

    /// Scores are q·k times `scale`: 1 / √d unless a model sets its own (Gemma 3's query_pre_attn_scalar).
    public let scale: Float

    public init(heads: Int, kvHeads: Int, headDim: Int, scale: Float? = nil) {
        precondition(heads > 0 && kvHeads > 0 && heads % kvHeads == 0 && headDim > 0, "attention heads: \(heads) over \(kvHeads) of \(headDim)")
        self.heads = heads
        self.kvHeads = kvHeads
        self.headDim = headDim
        self.scale = scale ?? 1 / Float(headDim).squareRoot()
    }

    /// Query heads per key-value head.
    public var group: Int { heads / kvHeads }
    public var qDim: Int { heads * headDim }
    public var kvDim: Int { kvHeads * headDim }
}

/// How a KV cache keeps keys and values: f32, or 16-bit words widened to f32 as attention reads them (half
/// the bytes a decoded token reads from the cache; f16 keeps 10 mantissa bits, bf16 7 with f32's range).
public enum KVCacheDType: String, Sendable, CaseIterable, CustomStringConvertible {
    case f32, f16, bf16

    /// Bytes an element takes.
    public var byteWidth: Int { self == .f32 ? 4 : 2 }
    /// The C kernels' word format (CKernelsKV.h); f32 has none.
    var format: Int32 { self == .f16 ? Int32(QK_KV_F16) : Int32(QK_KV_BF16) }
    public var description: String { rawValue }

    /// `count` floats from `src` into `dst` as this type (narrowed for the 16-bit ones).
    public func store(_ src: UnsafePointer<Float>, into dst: UnsafeMutableRawPointer, count: Int, kernels: KernelTable) {
        if self == .f32 {
            dst.assumingMemoryBound(to: Float.self).update(from: src, count: count)
        } else {
            kernels.kvNarrow(src, dst.assumingMemoryBound(to: UInt16.self), count, format)
        }
    }

    /// `count` elements of this type at `src` into `dst` as f32.
    public func load(_ src: UnsafeRawPointer, into dst: UnsafeMutablePointer<Float>, count: Int, kernels: KernelTable) {
        if self == .f32 {
            dst.update(from: src.assumingMemoryBound(to: Float.self), count: count)
        } else {
            kernels.kvWiden(src.assumingMemoryBound(to: UInt16.self), dst, count, format)
        }
    }
}

public enum Attention {
    /// One sequence of a many-row call: `rows` queries at positions start..<start+rows attend over keys and
    /// values [0, start + rows) (a query at position p sees keys 0...p, or from its window's start on).
    public struct Sequence {
        /// Queries [rows, qDim]; the output [rows, qDim].
        public var q: UnsafePointer<Float>
        public var out: UnsafeMutablePointer<Float>
        /// Keys and values [start + rows, kvDim] (a cache, or this call's own rows), elements of `dtype`.
        public var keys: UnsafeRawPointer
        public var values: UnsafeRawPointer
        public var dtype: KVCacheDType
        public var rows: Int
        public var start: Int
        /// For each row, the first key it may see (examples packed in one row of a batch), or nil: key 0.
        public var windowStarts: UnsafePointer<Int>?
        /// Where to keep the probabilities, [H, rows, start + rows] (training's backward reads them), or nil.
        public var probs: UnsafeMutablePointer<Float>?

        public init(q: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, keys: UnsafePointer<Float>, values: UnsafePointer<Float>,
                    rows: Int, start: Int = 0, windowStarts: UnsafePointer<Int>? = nil, probs: UnsafeMutablePointer<Float>? = nil) {
            self.init(q: q, out: out, keys: UnsafeRawPointer(keys), values: UnsafeRawPointer(values), dtype: .f32, rows: rows, start: start,
                      windowStarts: windowStarts, probs: probs)
        }

        /// Keys and values of any cache type (a 16-bit one is widened per key-value head as a block reads it).
        public init(q: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, keys: UnsafeRawPointer, values: UnsafeRawPointer,
                    dtype: KVCacheDType, rows: Int, start: Int = 0, windowStarts: UnsafePointer<Int>? = nil,
                    probs: UnsafeMutablePointer<Float>? = nil) {
            self.q = q
            self.out = out
            self.keys = keys
            self.values = values
            self.dtype = dtype
            self.rows = rows
            self.start = start
            self.windowStarts = windowStarts
            self.probs = probs
        }
    }

    /// One query row over `length` cached positions (decoding), the cache's elements of `dtype`.
    public struct DecodeRow {
        public var q: UnsafePointer<Float>
        public var out: UnsafeMutablePointer<Float>
        public var keys: UnsafeRawPointer
        public var values: UnsafeRawPointer
        public var dtype: KVCacheDType
        public var length: Int

        public init(q: UnsafePointer<Float>, out: UnsafeMutablePointer<Float>, keys: UnsafeRawPointer, values: UnsafeRawPointer,
                    dtype: KVCacheDType = .f32, length: Int) {
            self.q = q
            self.out = out
            self.keys = keys
            self.values = values
            self.dtype = dtype
            self.length = length
        }

        /// This row's attention over positions lo..<hi for key-value head kvh's query heads (Attention.decode).
        func attend(_ heads: AttentionHeads, kvHead kvh: Int, positions lo: Int, _ hi: Int, scores: UnsafeMutablePointer<Float>,
                    out o: UnsafeMutablePointer<Float>, stats: UnsafeMutablePointer<Float>?, kernels: KernelTable) {
            let G = heads.group, d = heads.headDim, kvDim = heads.kvDim
            let offset = (lo * kvDim + kvh * d) * dtype.byteWidth
            if dtype == .f32 {
                kernels.attend(q + kvh * G * d, G, (keys + offset).assumingMemoryBound(to: Float.self),
                               (values + offset).assumingMemoryBound(to: Float.self), hi - lo, d, kvDim, heads.scale, scores, o, stats)
            } else {
                kernels.attend16(q + kvh * G * d, G, (keys + offset).assumingMemoryBound(to: UInt16.self),
                                 (values + offset).assumingMemoryBound(to: UInt16.self), hi - lo, d, kvDim, heads.scale, scores, o, stats,
                                 dtype.format)
            }
        }
    }

    /// The gradients of one sequence of a training step (start 0; keys and values are its own rows):
    /// dOut in, dQ written, dK and dV added to (they must start at zero).
    public struct Gradients {
        public var dOut: UnsafePointer<Float>
        public var dq: UnsafeMutablePointer<Float>
        public var dk: UnsafeMutablePointer<Float>
        public var dv: UnsafeMutablePointer<Float>

        public init(dOut: UnsafePointer<Float>, dq: UnsafeMutablePointer<Float>, dk: UnsafeMutablePointer<Float>, dv: UnsafeMutablePointer<Float>) {
            self.dOut = dOut
            self.dq = dq
            self.dk = dk
            self.dv = dv
        }
    }

    /// The context length from which decoding one sequence splits each head's positions over the workers.
    public static let splitFrom = 128

    /// Per-worker buffers for up to `keys` positions and blocks of `blockRows` query rows, carved from an
    /// arena (lay it out with `Arena.sized`). `backward`: also what the backward needs; `bf16`: also the
    /// packed operands of the bf16 products; `widen`: room to widen a 16-bit cache's keys and values.
    public final class Workspace {
        public let heads: AttentionHeads
        public let maxKeys: Int
        public let blockRows: Int
        let workers: [WorkerBuffers]
        /// Decoding split over ranges of positions: each range's unnormalized output, then each range's
        /// max and sum per query head.
        let partial: UnsafeMutablePointer<Float>

        public init(_ arena: Arena, heads: AttentionHeads, maxKeys: Int, blockRows: Int, backward: Bool, bf16: Bool, widen: Bool = false) {
            self.heads = heads
            self.maxKeys = max(1, maxKeys)
            self.blockRows = max(1, blockRows)
            let threads = Parallel.threadCount
            workers = (0..<threads).map { _ in
                WorkerBuffers(arena, heads: heads, keys: max(1, maxKeys), blockRows: max(1, blockRows), backward: backward, bf16: bf16,
                              widen: widen)
            }
            partial = arena.floats(threads * (heads.qDim + 2 * heads.heads))
        }
    }

    final class WorkerBuffers {
        /// Scores of a block of query rows (or of a decoding row's query heads) over every key.
        let scores: UnsafeMutablePointer<Float>
        /// A 16-bit cache's keys and values of one key-value head widened to f32 ([keys, d] each), or nil.
        let wideKeys, wideValues: UnsafeMutablePointer<Float>?
        /// Backward: the score gradients of one head, [keys, keys].
        let dP: UnsafeMutablePointer<Float>?
        /// bf16: Kᵀ (forward) or Vᵀ (backward) packed, the B of S = Q Kᵀ and dP = dO Vᵀ.
        let keysT: UnsafeMutablePointer<UInt32>?
        /// bf16: V or K rows packed (B of O = P V, dQ = dS K); a block of P or dS packed (B of dVᵀ, dKᵀ).
        let rowsPacked, blockPacked: UnsafeMutablePointer<UInt32>?
        /// bf16: a block of Q or dO rows; a block of P or dS rows; a head's Qᵀ and dOᵀ.
        let small, block, qT, dOT: UnsafeMutablePointer<UInt16>?
        /// bf16 backward: dVᵀ and dKᵀ [d, keys] of a key-value head, added into dV and dK once at its end.
        let dVT, dKT: UnsafeMutablePointer<Float>?

        init(_ arena: Arena, heads: AttentionHeads, keys S: Int, blockRows: Int, backward: Bool, bf16: Bool, widen: Bool) {
            let d = heads.headDim
            let pad = BF16Gemm.paddedCount
            let rows = min(blockRows, S)
            scores = arena.floats(max(rows, heads.group) * S)
            wideKeys = widen ? arena.floats(S * d) : nil
            wideValues = widen ? arena.floats(S * d) : nil
            dP = backward ? arena.floats(S * S) : nil
            if bf16 {
                keysT = arena.words(BF16Gemm.packedWords(k: d, n: S))
                rowsPacked = arena.words(BF16Gemm.packedWords(k: S, n: d))
                blockPacked = backward ? arena.words(BF16Gemm.packedWords(k: rows, n: S)) : nil
                small = arena.halves(rows * pad(d))
                block = arena.halves(rows * pad(S))
                qT = backward ? arena.halves(d * pad(S)) : nil
                dOT = backward ? arena.halves(d * pad(S)) : nil
                dVT = backward ? arena.floats(d * S) : nil
                dKT = backward ? arena.floats(d * S) : nil
            } else {
                keysT = nil; rowsPacked = nil; blockPacked = nil; small = nil; block = nil; qT = nil; dOT = nil; dVT = nil; dKT = nil
            }
        }
    }

    // MARK: - Many rows

    /// Causal attention of `count` sequences (`sequence(i)` describes each) in blocks of `blockRows` query
    /// rows: a block [r0, r1) reads only the keys before start + r1, so the masked triangle is mostly never
    /// computed. Each (sequence, key-value head, block) is one piece of work for the next free worker, its
    /// G query heads one after another. `bf16`: the products on bf16 operands (nil: f32).
    public static func forward(_ heads: AttentionHeads, sequences count: Int, _ sequence: (Int) -> Sequence, workspace: Workspace,
                               bf16: BF16Kernels?, kernels: KernelTable) {
        let blockRows = workspace.blockRows, Hkv = heads.kvHeads
        // Pieces of sequence i: Hkv · blocks(i), numbered after those of the sequences before it.
        var total = 0
        for i in 0..<count { total += Hkv * ((sequence(i).rows + blockRows - 1) / blockRows) }
        Parallel.forEachPiece(count: total, piece: 1) { worker, range in
            for item in range {
                var i = 0, rest = item
                var s = sequence(0)
                while true {
                    let n = Hkv * ((s.rows + blockRows - 1) / blockRows)
                    if rest < n { break }
                    rest -= n
                    i += 1
                    s = sequence(i)
                }
                let kvh = rest % Hkv, r0 = (rest / Hkv) * blockRows
                forwardBlock(heads, s, kvHead: kvh, rows: r0..<min(s.rows, r0 + blockRows), buffers: workspace.workers[worker], bf16: bf16,
                             kernels: kernels)
            }
        }
    }

    /// Query rows `rows` of sequence `s`, the query heads of key-value head `kvh`.
    static func forwardBlock(_ heads: AttentionHeads, _ s: Sequence, kvHead kvh: Int, rows: Range<Int>, buffers w: WorkerBuffers,
                             bf16: BF16Kernels?, kernels: KernelTable) {
        let d = heads.headDim, qDim = heads.qDim, kvDim = heads.kvDim, scale = heads.scale
        let S = s.start + s.rows, visible = s.start + rows.upperBound, n = rows.count
        // K and V of this key-value head with row stride ld: the f32 cache itself, or a 16-bit one's rows widened.
        let K: UnsafePointer<Float>, V: UnsafePointer<Float>, ld: Int
        if s.dtype == .f32 {
            K = s.keys.assumingMemoryBound(to: Float.self) + kvh * d
            V = s.values.assumingMemoryBound(to: Float.self) + kvh * d
            ld = kvDim
        } else {
            guard let wk = w.wideKeys, let wv = w.wideValues else { preconditionFailure("a 16-bit cache without room to widen it") }
            let width = s.dtype.byteWidth
            for j in 0..<visible {
                s.dtype.load(s.keys + ((j * kvDim + kvh * d) * width), into: wk + j * d, count: d, kernels: kernels)
                s.dtype.load(s.values + ((j * kvDim + kvh * d) * width), into: wv + j * d, count: d, kernels: kernels)
            }
            K = UnsafePointer(wk)
            V = UnsafePointer(wv)
            ld = d
        }
        if let bf16 {
            BF16Gemm.packB(K, ldb: ld, transposed: true, k: d, n: visible, into: w.keysT!, parallel: false, kernels: bf16)
            BF16Gemm.packB(V, ldb: ld, transposed: false, k: visible, n: d, into: w.rowsPacked!, parallel: false, kernels: bf16)
        }
        let pad = BF16Gemm.paddedCount
        for h in (kvh * heads.group)..<((kvh + 1) * heads.group) {
            // The block's scores [n, visible] with row stride S: kept in the probabilities, or scratch.
            let P = s.probs.map { $0 + (h * s.rows + rows.lowerBound) * S } ?? w.scores
            let Q = s.q + rows.lowerBound * qDim + h * d, O = s.out + rows.lowerBound * qDim + h * d
            if let bf16 {
                BF16Gemm.convert(Q, rows: n, cols: d, ld: qDim, into: w.small!, ldd: pad(d), parallel: false, kernels: bf16)
                BF16Gemm.gemm(P, ldc: S, w.small!, lda: pad(d), w.keysT!, m: n, n: visible, k: d, alpha: scale, accumulate: false,
                              parallel: false, kernels: bf16)
            } else {
                Gemm.gemm(P, ldc: S, Q, lda: qDim, K, ldb: ld, m: n, n: visible, k: d, transposeB: true, alpha: scale)
            }
            for t in rows {
                let row = P + (t - rows.lowerBound) * S
                let first = s.windowStarts?[t] ?? 0
                if first > 0 { row.update(repeating: 0, count: first) }
                kernels.softmaxRow(row + first, s.start + t + 1 - first, visible - first)
            }
            if let bf16 {
                BF16Gemm.convert(P, rows: n, cols: visible, ld: S, into: w.block!, ldd: pad(visible), parallel: false, kernels: bf16)
                BF16Gemm.gemm(O, ldc: qDim, w.block!, lda: pad(visible), w.rowsPacked!, m: n, n: d, k: visible, accumulate: false,
                              parallel: false, kernels: bf16)
            } else {
                Gemm.gemm(O, ldc: qDim, P, lda: S, V, ldb: ld, m: n, n: d, k: visible)
            }
        }
    }

    // MARK: - Decoding

    /// One new query row for each of `count` sequences over its cache (`row(i)`), as one parallel loop over
    /// (row, key-value head): the G query heads of a key-value head together, its keys and values read once.
    /// A single row over a long context splits each head's positions into one range per worker as well (3
    /// heads over 2 workers would leave one idle a third of the time): each range's output unnormalized with
    /// its max and sum, merged after.
    public static func decode(_ heads: AttentionHeads, rows count: Int, _ row: (Int) -> DecodeRow, workspace: Workspace, kernels: KernelTable) {
        guard count > 0 else { return }
        let H = heads.heads, Hkv = heads.kvHeads, G = heads.group, d = heads.headDim
        let qDim = heads.qDim
        let first = row(0)
        let workers = Parallel.threadCount
        let ranges = count == 1 && workers > 1 && first.length >= splitFrom ? workers : 1
        let partial = workspace.partial, stats = partial + ranges * qDim
        Parallel.forChunks(count: count * Hkv * ranges, minimumChunk: 1) { worker, units in
            let scores = workspace.workers[worker].scores
            for unit in units {
                let r = unit % ranges, kvh = (unit / ranges) % Hkv, i = unit / (ranges * Hkv)
                let x = i == 0 ? first : row(i)
                if ranges == 1 {
                    x.attend(heads, kvHead: kvh, positions: 0, x.length, scores: scores, out: x.out + kvh * G * d, stats: nil, kernels: kernels)
                } else {
                    let lo = x.length * r / ranges, hi = x.length * (r + 1) / ranges
                    x.attend(heads, kvHead: kvh, positions: lo, hi, scores: scores, out: partial + r * qDim + kvh * G * d,
                             stats: stats + 2 * (r * H + kvh * G), kernels: kernels)
                }
            }
        }
        guard ranges > 1 else { return }
        for h in 0..<H {
            // Ranges' (max, sum of exp(score − max)) pairs at stats[2 · (r · H + h)].
            let (m, l) = LogSumExp.merge(count: ranges) { r in (stats[2 * (r * H + h)], stats[2 * (r * H + h) + 1]) }
            let o = first.out + h * d
            o.update(repeating: 0, count: d)
            for r in 0..<ranges {
                let w = exp(stats[2 * (r * H + h)] - m)
                let p = partial + r * qDim + h * d
                for e in 0..<d { o[e] += w * p[e] }
            }
            let inv = 1 / l
            for e in 0..<d { o[e] *= inv }
        }
    }

    // MARK: - Backward

    /// The backward of `forward` for `count` sequences of a training step (start 0, probabilities kept):
    /// dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale, dQ = dS K, dK += dSᵀ Q, dV += Pᵀ dO, per head in the forward's
    /// row blocks. One unit of work per (sequence, key-value head), which owns its rows of dK and dV.
    /// (Probabilities outside a query's window are 0, so its row of dS is 0 there too.)
    public static func backward(_ heads: AttentionHeads, sequences count: Int, _ sequence: (Int) -> (Sequence, Gradients), workspace: Workspace,
                                bf16: BF16Kernels?) {
        let Hkv = heads.kvHeads
        Parallel.forChunks(count: count * Hkv) { worker, units in
            for u in units {
                let (s, g) = sequence(u / Hkv)
                precondition(s.start == 0 && s.probs != nil && s.dtype == .f32,
                             "attention backward: probabilities of an f32 sequence that starts at 0")
                if let bf16 {
                    backwardUnitBF16(heads, s, g, kvHead: u % Hkv, blockRows: workspace.blockRows, buffers: workspace.workers[worker], bf16: bf16)
                } else {
                    backwardUnit(heads, s, g, kvHead: u % Hkv, blockRows: workspace.blockRows, buffers: workspace.workers[worker])
                }
            }
        }
    }

    static func backwardUnit(_ heads: AttentionHeads, _ s: Sequence, _ g: Gradients, kvHead kvh: Int, blockRows: Int, buffers w: WorkerBuffers) {
        let T = s.rows, d = heads.headDim, qDim = heads.qDim, kvDim = heads.kvDim, scale = heads.scale
        let S = w.dP!
        let K = s.keys.assumingMemoryBound(to: Float.self) + kvh * d, V = s.values.assumingMemoryBound(to: Float.self) + kvh * d
        let dK = g.dk + kvh * d, dV = g.dv + kvh * d
        for h in (kvh * heads.group)..<((kvh + 1) * heads.group) {
            let P = UnsafePointer(s.probs! + h * T * T)
            let Q = s.q + h * d, dO = g.dOut + h * d, dQ = g.dq + h * d
            for r0 in stride(from: 0, to: T, by: blockRows) {
                let r1 = min(T, r0 + blockRows), rows = r1 - r0
                // dP = dO Vᵀ   [rows, r1]
                Gemm.gemm(S + r0 * T, ldc: T, dO + r0 * qDim, lda: qDim, V, ldb: kvDim, m: rows, n: r1, k: d, transposeB: true)
                // dV[0..<r1] += Pᵀ dO
                Gemm.gemm(dV, ldc: kvDim, P + r0 * T, lda: T, dO + r0 * qDim, ldb: qDim, m: r1, n: d, k: rows, transposeA: true, beta: 1)
                scoreGradientRows(S, P, r0..<r1, T: T, scale: scale)
                // dQ[r0..<r1] = dS K ; dK[0..<r1] += dSᵀ Q[r0..<r1]
                Gemm.gemm(dQ + r0 * qDim, ldc: qDim, S + r0 * T, lda: T, K, ldb: kvDim, m: rows, n: d, k: r1)
                Gemm.gemm(dK, ldc: kvDim, S + r0 * T, lda: T, Q + r0 * qDim, ldb: qDim, m: r1, n: d, k: rows, transposeA: true, beta: 1)
            }
        }
    }

    /// The same with bf16 products. dVᵀ and dKᵀ are formed ([d, T], A = dOᵀ or Qᵀ, which are small) and added
    /// transposed into dV and dK once per unit, so no T x T matrix is ever transposed.
    static func backwardUnitBF16(_ heads: AttentionHeads, _ s: Sequence, _ g: Gradients, kvHead kvh: Int, blockRows: Int,
                                 buffers w: WorkerBuffers, bf16: BF16Kernels) {
        let T = s.rows, d = heads.headDim, qDim = heads.qDim, kvDim = heads.kvDim, scale = heads.scale
        let pad = BF16Gemm.paddedCount
        let S = w.dP!, dVT = w.dVT!, dKT = w.dKT!
        let K = s.keys.assumingMemoryBound(to: Float.self) + kvh * d, V = s.values.assumingMemoryBound(to: Float.self) + kvh * d
        BF16Gemm.packB(V, ldb: kvDim, transposed: true, k: d, n: T, into: w.keysT!, parallel: false, kernels: bf16)
        dVT.update(repeating: 0, count: d * T)
        dKT.update(repeating: 0, count: d * T)
        for h in (kvh * heads.group)..<((kvh + 1) * heads.group) {
            let P = UnsafePointer(s.probs! + h * T * T)
            let Q = s.q + h * d, dO = g.dOut + h * d, dQ = g.dq + h * d
            BF16Gemm.convertTransposed(dO, rows: T, cols: d, ld: qDim, into: w.dOT!, ldd: pad(T), kernels: bf16)
            BF16Gemm.convertTransposed(Q, rows: T, cols: d, ld: qDim, into: w.qT!, ldd: pad(T), kernels: bf16)
            for r0 in stride(from: 0, to: T, by: blockRows) {
                let r1 = min(T, r0 + blockRows), rows = r1 - r0
                // dP = dO Vᵀ   [rows, r1]
                BF16Gemm.convert(dO + r0 * qDim, rows: rows, cols: d, ld: qDim, into: w.small!, ldd: pad(d), parallel: false, kernels: bf16)
                BF16Gemm.gemm(S + r0 * T, ldc: T, w.small!, lda: pad(d), w.keysT!, m: rows, n: r1, k: d, accumulate: false, parallel: false,
                              kernels: bf16)
                // dVᵀ[:, 0..<r1] += dOᵀ[:, r0..<r1] P[r0..<r1, 0..<r1]
                BF16Gemm.packB(P + r0 * T, ldb: T, transposed: false, k: rows, n: r1, into: w.blockPacked!, parallel: false, kernels: bf16)
                BF16Gemm.gemm(dVT, ldc: T, w.dOT! + r0, lda: pad(T), w.blockPacked!, m: d, n: r1, k: rows, accumulate: true, parallel: false,
                              kernels: bf16)
                scoreGradientRows(S, P, r0..<r1, T: T, scale: scale)
                // dQ[r0..<r1] = dS K[0..<r1]
                BF16Gemm.convert(S + r0 * T, rows: rows, cols: r1, ld: T, into: w.block!, ldd: pad(r1), parallel: false, kernels: bf16)
                BF16Gemm.packB(K, ldb: kvDim, transposed: false, k: r1, n: d, into: w.rowsPacked!, parallel: false, kernels: bf16)
                BF16Gemm.gemm(dQ + r0 * qDim, ldc: qDim, w.block!, lda: pad(r1), w.rowsPacked!, m: rows, n: d, k: r1, accumulate: false,
                              parallel: false, kernels: bf16)
                // dKᵀ[:, 0..<r1] += Qᵀ[:, r0..<r1] dS
                BF16Gemm.packB(S + r0 * T, ldb: T, transposed: false, k: rows, n: r1, into: w.blockPacked!, parallel: false, kernels: bf16)
                BF16Gemm.gemm(dKT, ldc: T, w.qT! + r0, lda: pad(T), w.blockPacked!, m: d, n: r1, k: rows, accumulate: true, parallel: false,
                              kernels: bf16)
            }
        }
        let dV = g.dv + kvh * d, dK = g.dk + kvh * d
        for j in 0..<T {
            for e in 0..<d {
                dV[j * kvDim + e] += dVT[e * T + j]
                dK[j * kvDim + e] += dKT[e * T + j]
            }
        }
    }

    /// Rows `rows` of S [T, T] from dP (in S) to dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale, over the keys of
    /// the block (0..<rows.upperBound); keys after a row's own position become 0.
    static func scoreGradientRows(_ S: UnsafeMutablePointer<Float>, _ P: UnsafePointer<Float>, _ rows: Range<Int>, T: Int, scale: Float) {
        for t in rows {
            let prow = P + t * T, srow = S + t * T
            var dot: Float = 0
            for j in 0...t { dot += prow[j] * srow[j] }
            for j in 0...t { srow[j] = prow[j] * (srow[j] - dot) * scale }
            for j in (t + 1)..<rows.upperBound { srow[j] = 0 }
        }
    }
}
