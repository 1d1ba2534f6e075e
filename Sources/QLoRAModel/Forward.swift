// The inference forward pass with a KV cache. Shapes: T new tokens at positions start..<start+T,
// D hidden, H query heads, Hkv key/value heads, d head_dim, V vocab. Activations are row-major [T, ...].
// Order of operations follows transformers' LlamaForCausalLM: x + attn(norm(x)), then + mlp(norm(x)).
import QLoRACore
import QLoRAKernels

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// Keys and values of every layer for the positions seen so far, and the buffers of the forward pass
/// (kept between calls, so that decoding a token allocates nothing). One thread uses a cache at a time.
public final class KVCache {
    public let capacity: Int
    public private(set) var length = 0
    /// How keys and values are kept: f32 (exact, the reference runs' and training's), or f16/bf16 (half the bytes
    /// decoding reads a position; the command line's default is f16).
    public let dtype: KVCacheDType
    let layers: Int
    let rowWidth: Int  // Hkv * d
    /// [layers, capacity, Hkv * d] elements of `dtype`; pages are touched only as positions fill.
    let keys: UnsafeMutableRawPointer
    let values: UnsafeMutableRawPointer
    var workspace: ForwardWorkspace?

    public init(config: LlamaConfig, capacity: Int, dtype: KVCacheDType = .f32) {
        self.capacity = capacity
        self.dtype = dtype
        layers = config.layerCount
        rowWidth = config.kvHeadCount * config.headDim
        let bytes = max(1, layers * capacity * rowWidth) * dtype.byteWidth
        keys = .allocate(byteCount: bytes, alignment: 64)
        values = .allocate(byteCount: bytes, alignment: 64)
    }

    deinit {
        keys.deallocate()
        values.deallocate()
    }

    /// Bytes of keys and values the cache holds room for.
    public var byteCount: Int { 2 * layers * capacity * rowWidth * dtype.byteWidth }

    /// The tokens at the cached positions (a LongRoPE model recomputes them once a conversation outgrows its
    /// original length, as transformers' generate does).
    public private(set) var tokens: [Int] = []
    /// Whether the cached keys were rotated with LongRoPE's long factors.
    var longRope = false

    /// Forgets every position (a new conversation).
    public func reset() {
        length = 0
        tokens.removeAll(keepingCapacity: true)
        longRope = false
    }

    /// Keeps the first `n` positions only.
    public func truncate(to n: Int) {
        length = min(length, max(0, n))
        if tokens.count > length { tokens.removeLast(tokens.count - length) }
    }

    /// Holds the first `count` positions of `other` (a prefix shared by several continuations), every layer.
    public func copyPrefix(of other: KVCache, count: Int) {
        precondition(other.layers == layers && other.rowWidth == rowWidth, "caches of different models")
        precondition(other.dtype == dtype, "caches of different element types (\(other.dtype), \(dtype))")
        precondition(count <= other.length && count <= capacity, "the prefix is longer than one of the caches")
        let bytes = count * rowWidth * dtype.byteWidth
        for l in 0..<layers {
            keys(layer: l).copyMemory(from: other.keys(layer: l), byteCount: bytes)
            values(layer: l).copyMemory(from: other.values(layer: l), byteCount: bytes)
        }
        length = count
        tokens = Array(other.tokens.prefix(count))
        longRope = other.longRope
    }

    func advance(by n: Int) { length += n }

    /// Records the tokens a call added (and the rotation their keys got).
    func record(_ new: [Int], longRope long: Bool) {
        tokens += new
        longRope = long
    }

    /// Layer `l`'s keys and values: position j's row at element j * rowWidth.
    func keys(layer l: Int) -> UnsafeMutableRawPointer { keys + l * capacity * rowWidth * dtype.byteWidth }
    func values(layer l: Int) -> UnsafeMutableRawPointer { values + l * capacity * rowWidth * dtype.byteWidth }

    /// Writes `rows` rows of keys and values (f32, rowWidth apart) at positions position... of layer `l`,
    /// narrowed to the cache's type.
    func store(layer l: Int, at position: Int, keys k: UnsafePointer<Float>, values v: UnsafePointer<Float>, rows: Int, kernels: KernelTable) {
        let offset = position * rowWidth * dtype.byteWidth
        dtype.store(k, into: keys(layer: l) + offset, count: rows * rowWidth, kernels: kernels)
        dtype.store(v, into: values(layer: l) + offset, count: rows * rowWidth, kernels: kernels)
    }
}

/// The activations of one forward pass over up to `rows` tokens (grown when a call has more), carved from
/// one arena.
final class ForwardWorkspace {
    let rows: Int
    /// Positions an attention row holds.
    let capacity: Int
    let arena: Arena
    let h, xn, q, k, v, attn, proj, g, u: UnsafeMutablePointer<Float>
    /// A dequantized tile of a weight and its block scales (many-row products).
    let scratch: UnsafeMutablePointer<Float>
    /// x rearranged for the 4-bit matrix-vector kernel (one-row products).
    let prepared: UnsafeMutablePointer<Float>
    /// bf16 compute: an operand converted once for the products that read it, and a packed weight tile.
    let converted: UnsafeMutablePointer<UInt16>?
    let packed: UnsafeMutablePointer<UInt32>?
    /// A fused projection's output before it is split (Phi-3), or nil.
    let fused: UnsafeMutablePointer<Float>?
    /// Attention's scores and partial sums, per worker.
    let attention: Attention.Workspace

    /// `packedWords`: the words of a packed weight tile when the products run in bf16, else nil.
    /// Whether attention has room to widen a 16-bit cache's keys and values.
    let widens: Bool

    init(rows T: Int, config c: LlamaConfig, capacity: Int, scratchCount: Int, packedWords: Int?, widen: Bool) {
        widens = widen
        rows = T
        self.capacity = capacity
        let D = c.hiddenSize, qDim = c.headCount * c.headDim, kvDim = c.kvHeadCount * c.headDim, I = c.intermediateSize
        let widest = max(D, I, qDim)
        struct Layout {
            let h, xn, q, k, v, attn, proj, g, u, scratch, prepared: UnsafeMutablePointer<Float>
            let converted: UnsafeMutablePointer<UInt16>?
            let packed: UnsafeMutablePointer<UInt32>?
            let fused: UnsafeMutablePointer<Float>?
            let attention: Attention.Workspace
        }
        let (arena, l) = Arena.sized { a in
            Layout(h: a.floats(T * D), xn: a.floats(T * D), q: a.floats(T * qDim), k: a.floats(T * kvDim), v: a.floats(T * kvDim),
                   attn: a.floats(T * qDim), proj: a.floats(T * D), g: a.floats(T * I), u: a.floats(T * I), scratch: a.floats(scratchCount),
                   prepared: a.floats(min(T, Linear.batchedRowLimit) * widest),
                   converted: packedWords.map { _ in a.halves(T * BF16Gemm.paddedCount(widest)) }, packed: packedWords.map { a.words($0) },
                   fused: c.fusedProjections ? a.floats(T * max(c.qkvDim, 2 * I)) : nil,
                   attention: Attention.Workspace(a, heads: c.attentionHeads, maxKeys: capacity, blockRows: LlamaModel.prefillAttentionRows,
                                                  backward: false, bf16: false, widen: widen))
        }
        self.arena = arena
        h = l.h; xn = l.xn; q = l.q; k = l.k; v = l.v; attn = l.attn; proj = l.proj; g = l.g; u = l.u
        scratch = l.scratch; prepared = l.prepared; converted = l.converted; packed = l.packed; fused = l.fused; attention = l.attention
    }

    /// The block's view of these buffers: nothing kept for a backward, so x1 and x2 share xn, the residual
    /// adds into h in place, and SwiGLU writes over g.
    var block: (BlockActivations, BlockScratch) {
        (BlockActivations(x1: xn, q: q, k: k, v: v, attn: attn, h2: h, x2: xn, g: g, u: u, a: g),
         BlockScratch(proj: proj, tile: scratch, prepared: prepared, converted: converted, packed: packed, fused: fused))
    }
}

public enum ForwardError: Error, CustomStringConvertible, Equatable {
    case contextFull(capacity: Int, needed: Int)
    case tokenOutOfRange(token: Int, vocab: Int)
    /// A row's adapter model is not over a base of this model's shape (or the list has the wrong length).
    case adapterMismatch(String)

    public var description: String {
        switch self {
        case let .contextFull(capacity, needed):
            return "the context holds \(capacity) tokens and this step needs \(needed); start a new conversation or raise the context size"
        case let .tokenOutOfRange(token, vocab): return "token id \(token) is outside the vocabulary (0..<\(vocab))"
        case let .adapterMismatch(reason): return "per-row adapters: \(reason)"
        }
    }
}

extension LlamaModel {
    /// Which positions to compute logits for.
    public enum LogitsRange: Sendable { case last, all, none }

    /// Runs `tokens` at the cache's next positions and appends their keys and values to it.
    /// - Returns: logits [n, V] for the requested positions (n = 1 for `.last`, T for `.all`).
    public func forward(_ tokens: [Int], cache: KVCache, logits: LogitsRange = .last, kernels: KernelTable = .current) throws -> [Float] {
        try forward(tokens, cache: cache, logits: logits, kernels: kernels, forceLongRope: false)
    }

    /// `forceLongRope`: rotate with LongRoPE's long factors even within the original length (recomputing a cache
    /// for a call that will cross it).
    func forward(_ tokens: [Int], cache: KVCache, logits: LogitsRange, kernels: KernelTable, forceLongRope: Bool) throws -> [Float] {
        let c = config
        let T = tokens.count
        guard T > 0 else { return [] }
        let start = cache.length
        guard start + T <= cache.capacity else { throw ForwardError.contextFull(capacity: cache.capacity, needed: start + T) }
        for t in tokens where t < 0 || t >= c.vocabSize { throw ForwardError.tokenOutOfRange(token: t, vocab: c.vocabSize) }
        let long = c.longRope != nil && (forceLongRope || c.usesLongRope(maxPosition: start + T - 1))
        if long, !cache.longRope, start > 0 {
            // LongRoPE past the original length: the cached keys were rotated with the short factors; recompute them
            // all with the long ones (transformers' generate drops its cache at this point too).
            let all = cache.tokens + tokens
            cache.reset()
            let out = try forward(all, cache: cache, logits: logits, kernels: kernels)
            return logits == .all ? Array(out.suffix(T * c.vocabSize)) : out
        }
        let ws = workspace(cache, rows: T, widen: T > 1 && cache.dtype != .f32, kernels: kernels)
        for (t, token) in tokens.enumerated() { embed(token, into: ws.h + t * c.hiddenSize) }
        let rope = ropeTables(positions: Array(start..<(start + T)), long: Array(repeating: long, count: T))
        // More than one row: the BLAS products are split over our own workers with BLAS on one thread
        // each, so that OpenBLAS's threads do not spin against ours (measured: a fifth of a prefill's time
        // in sched_yield otherwise).
        let rows = AttentionRows(caches: [cache], counts: [T], starts: [start], window: c.slidingWindow)
        func run() -> [Float] {
            runLayers(ws, rows: T, rope: rope, kernels: kernels) { l in
                // This step's keys and values join the cache; the queries attend over all of it.
                cache.store(layer: l, at: start, keys: ws.k, values: ws.v, rows: T, kernels: kernels)
                attention(ws, layer: l, rows, kernels: kernels)
            }
            cache.advance(by: T)
            cache.record(tokens, longRope: long)
            switch logits {
            case .none: return []
            case .last: return outputLogits(ws, rows: (T - 1)..<T, kernels: kernels)
            case .all: return outputLogits(ws, rows: 0..<T, kernels: kernels)
            }
        }
        return T > 1 ? Gemm.withSingleThreadedBLAS(run) : run()
    }

    /// Consecutive rows of a batch whose LoRA comes from another model over the same base: `layers` are
    /// that model's (LlamaModel.withAdapter), of which only the adapters are used.
    struct AdapterRun {
        let rows: Range<Int>
        let layers: [LlamaLayer]
    }

    /// The runs of rows that take an adapter model: `adapters[i]` (nil: this model alone) applies to the
    /// `rowCounts[i]` rows of sequence i. Each must be this base with adapters attached (same shape).
    func adapterRuns(_ adapters: [LlamaModel?]?, rowCounts: [Int]) throws -> [AdapterRun] {
        guard let adapters else { return [] }
        guard adapters.count == rowCounts.count else {
            throw ForwardError.adapterMismatch("\(adapters.count) adapters for \(rowCounts.count) sequences")
        }
        var runs: [AdapterRun] = []
        var row = 0, last: ObjectIdentifier? = nil
        for (model, count) in zip(adapters, rowCounts) {
            defer { row += count }
            guard let model, model !== self else { last = nil; continue }
            guard model.config == config, model.layers.count == layers.count else {
                throw ForwardError.adapterMismatch("the adapter model from \(model.source) does not have this model's shape")
            }
            if last == ObjectIdentifier(model), let previous = runs.popLast() {
                runs.append(AdapterRun(rows: previous.rows.lowerBound..<(row + count), layers: previous.layers))
            } else {
                runs.append(AdapterRun(rows: row..<(row + count), layers: model.layers))
            }
            last = ObjectIdentifier(model)
        }
        return runs
    }

    /// The blocks over `rows` rows of ws.h, in place (LlamaLayer.forward): `attend(layer)` stores the keys
    /// and values and leaves attention's output in ws.attn. Each projection takes the layer's attached
    /// adapter, if any, and rows in `adapters` that run's adapter as well.
    func runLayers(_ ws: ForwardWorkspace, rows n: Int, rope: RopeTables, kernels: KernelTable,
                   adapters: [AdapterRun] = [], attend: (Int) -> Void) {
        let bf16 = bf16Products(kernels) ? kernels.bf16 : nil
        let (act, scratch) = ws.block
        rope.withCalls(rows: n, bf16: bf16, kernels: kernels) { call in
            for (l, layer) in layers.enumerated() {
                layer.forward(ws.h, into: ws.h, act, scratch, config: config, call(l), lora: { p, apply in
                    p.linear(in: layer)?.lora?.withUpdate(apply)
                    for run in adapters { p.linear(in: run.layers[l])?.lora?.withUpdate(rows: run.rows, apply) }
                }, attend: { attend(l) })
            }
        }
    }

    /// Embedding row `token` into `out` (times the family's embedding scale).
    func embed(_ token: Int, into out: UnsafeMutablePointer<Float>) {
        embeddings.copyRow(token, into: out)
        if let scale = config.embeddingScale {
            for j in 0..<config.hiddenSize { out[j] *= scale }
        }
    }

    /// logits [rows.count, V] of rows `rows` of ws.h: the final norm, then the head.
    func outputLogits(_ ws: ForwardWorkspace, rows: Range<Int>, kernels: KernelTable) -> [Float] {
        rmsNorm(ws.xn, ws.h + rows.lowerBound * config.hiddenSize, weight: finalNorm, rows: rows.count)
        var out = [Float](repeating: 0, count: rows.count * config.vocabSize)
        out.withUnsafeMutableBufferPointer { o in
            head.forward(ws.xn, rows: rows.count, into: o.baseAddress!, scratch: ws.scratch, bf16: bf16Products(kernels), kernels: kernels)
        }
        return out
    }

    /// The cache's workspace, made (or remade larger) for `rows` tokens and attention rows of `capacity`, with
    /// the bf16 operands' buffers when these kernels run the products in bf16. `widen`: room to widen a 16-bit cache's
    /// keys and values, which a prefill's attention needs (decoding reads them as they are).
    func workspace(_ cache: KVCache, rows: Int, capacity: Int? = nil, widen: Bool, kernels: KernelTable) -> ForwardWorkspace {
        let capacity = capacity ?? cache.capacity
        let bf16 = bf16Products(kernels) && rows > Linear.batchedRowLimit
        let widen = widen || cache.workspace?.widens == true  // a workspace that has the room keeps it
        if let ws = cache.workspace, ws.rows >= rows, ws.capacity >= capacity, !bf16 || ws.packed != nil, !widen || ws.widens { return ws }
        let linears = (layers.first?.linears ?? []) + [head]
        let scratchCount = linears.map(\.scratchCount).max() ?? 0
        let rows = max(rows, cache.workspace?.rows ?? 0)
        let packedWords = bf16 || cache.workspace?.packed != nil ? linears.map { $0.packedWords(forRows: rows) }.max() ?? 1 : nil
        let ws = ForwardWorkspace(rows: rows, config: config, capacity: max(capacity, cache.workspace?.capacity ?? 0), scratchCount: scratchCount,
                                  packedWords: packedWords, widen: widen)
        cache.workspace = ws
        return ws
    }

    /// One decoding step of several sequences at once (batched decoding): token i goes at the next position
    /// of `caches[i]`, each sequence attending over its own cache only. Every weight is read once for the
    /// whole batch. Equal, up to the order of f32 sums, to one `forward([tokens[i]], cache: caches[i])` each.
    /// `adapters` (one per sequence, nil for none): sequence i also takes the LoRA adapters of `adapters[i]`,
    /// which must be this base with adapters attached (`withAdapter`), so that requests for different
    /// finetunes decode in one step over the shared base weights. Equal, up to the order of f32 sums, to
    /// `adapters[i].forward([tokens[i]], cache: caches[i])`.
    /// - Returns: logits [B, V], row i for sequence i.
    public func forward(batch tokens: [Int], caches: [KVCache], adapters: [LlamaModel?]? = nil, kernels: KernelTable = .current) throws -> [Float] {
        let c = config
        let B = tokens.count
        guard B > 0 else { return [] }
        precondition(caches.count == B, "one cache a token")
        precondition(Set(caches.map(ObjectIdentifier.init)).count == B, "a cache appears twice in the batch")
        for cache in caches where cache.length + 1 > cache.capacity {
            throw ForwardError.contextFull(capacity: cache.capacity, needed: cache.length + 1)
        }
        for t in tokens where t < 0 || t >= c.vocabSize { throw ForwardError.tokenOutOfRange(token: t, vocab: c.vocabSize) }
        let runs = try adapterRuns(adapters, rowCounts: Array(repeating: 1, count: B))
        for (i, cache) in caches.enumerated() { try refreshLongRope(cache, reaching: cache.length, adapter: adapters?[i], kernels: kernels) }
        let kvDim = c.kvHeadCount * c.headDim
        let ws = workspace(caches[0], rows: B, capacity: caches.map(\.capacity).max()!, widen: false, kernels: kernels)
        for (i, token) in tokens.enumerated() { embed(token, into: ws.h + i * c.hiddenSize) }
        let positions = caches.map(\.length)
        let longRows = positions.map { c.usesLongRope(maxPosition: $0) }
        let rope = ropeTables(positions: positions, long: longRows)
        let rows = AttentionRows(caches: caches, counts: Array(repeating: 1, count: B), starts: positions)
        // BLAS on one thread while our workers split its products (as in forward(tokens:)).
        return Gemm.withSingleThreadedBLAS {
            runLayers(ws, rows: B, rope: rope, kernels: kernels, adapters: runs) { l in
                for (i, cache) in caches.enumerated() {
                    cache.store(layer: l, at: positions[i], keys: ws.k + i * kvDim, values: ws.v + i * kvDim, rows: 1, kernels: kernels)
                }
                attention(ws, layer: l, rows, kernels: kernels)
            }
            for (i, cache) in caches.enumerated() {
                cache.advance(by: 1)
                cache.record([tokens[i]], longRope: longRows[i])
            }
            return outputLogits(ws, rows: 0..<B, kernels: kernels)
        }
    }

    /// Several sequences' next tokens in one pass (a batched prefill): sequence i's tokens go at the next
    /// positions of `caches[i]`, attending over that cache and their own earlier tokens only, as
    /// `forward(tokens[i], cache: caches[i])` would, while every weight is read once for all the rows.
    /// MMLU runs the questions of a subject this way, each cache holding a copy of the shared few-shot prefix.
    /// `adapters`: as in `forward(batch:)`, sequence i's rows take `adapters[i]`'s LoRA (serve prefills
    /// new requests for several finetunes together this way).
    /// - Returns: each sequence's last-position logits, [B, V].
    public func forward(sequences tokens: [[Int]], caches: [KVCache], adapters: [LlamaModel?]? = nil, kernels: KernelTable = .current) throws -> [Float] {
        let c = config
        let B = tokens.count
        guard B > 0 else { return [] }
        precondition(caches.count == B, "one cache a sequence")
        precondition(Set(caches.map(ObjectIdentifier.init)).count == B, "a cache appears twice")
        for (seq, cache) in zip(tokens, caches) {
            precondition(!seq.isEmpty, "an empty sequence")
            guard cache.length + seq.count <= cache.capacity else { throw ForwardError.contextFull(capacity: cache.capacity, needed: cache.length + seq.count) }
            for t in seq where t < 0 || t >= c.vocabSize { throw ForwardError.tokenOutOfRange(token: t, vocab: c.vocabSize) }
        }
        for (i, cache) in caches.enumerated() {
            try refreshLongRope(cache, reaching: cache.length + tokens[i].count - 1, adapter: adapters?[i], kernels: kernels)
        }
        let rows = AttentionRows(caches: caches, counts: tokens.map(\.count), starts: caches.map(\.length), window: c.slidingWindow)
        let runs = try adapterRuns(adapters, rowCounts: rows.counts)
        let kvDim = c.kvHeadCount * c.headDim, D = c.hiddenSize
        let offsets = rows.offsets, starts = rows.starts, n = rows.counts.reduce(0, +)
        let ws = workspace(caches[0], rows: n, capacity: caches.map(\.capacity).max()!,
                           widen: !rows.decoding && caches.contains { $0.dtype != .f32 }, kernels: kernels)
        var positions: [Int] = [], longRows: [Bool] = []
        positions.reserveCapacity(n)
        let longSequences = zip(caches, tokens).map { c.usesLongRope(maxPosition: $0.length + $1.count - 1) }
        for (i, seq) in tokens.enumerated() {
            for (t, token) in seq.enumerated() { embed(token, into: ws.h + (offsets[i] + t) * D) }
            positions += caches[i].length..<(caches[i].length + seq.count)
            longRows += Array(repeating: longSequences[i], count: seq.count)
        }
        let rope = ropeTables(positions: positions, long: longRows)
        return Gemm.withSingleThreadedBLAS {
            runLayers(ws, rows: n, rope: rope, kernels: kernels, adapters: runs) { l in
                for (i, cache) in caches.enumerated() {
                    let o = offsets[i], T = tokens[i].count
                    cache.store(layer: l, at: starts[i], keys: ws.k + o * kvDim, values: ws.v + o * kvDim, rows: T, kernels: kernels)
                }
                attention(ws, layer: l, rows, kernels: kernels)
            }
            for (i, cache) in caches.enumerated() {
                cache.advance(by: tokens[i].count)
                cache.record(tokens[i], longRope: longSequences[i])
            }
            // Each sequence's last row moves up to row i (a source row is never below a later destination).
            for i in 0..<B {
                let last = offsets[i] + tokens[i].count - 1
                if last != i { (ws.h + i * D).update(from: ws.h + last * D, count: D) }
            }
            return outputLogits(ws, rows: 0..<B, kernels: kernels)
        }
    }

    func rmsNorm(_ y: UnsafeMutablePointer<Float>, _ x: UnsafePointer<Float>, weight: [Float], rows: Int) {
        weight.withUnsafeBufferPointer { w in
            Ops.rmsNormForward(y, rstd: nil, x, weight: w.baseAddress!, rows: rows, dim: config.hiddenSize, eps: config.rmsNormEps)
        }
    }

    /// The rotary tables of these positions: the model's (LongRoPE's long set on the rows `long` marks, and its
    /// attention factor on cos and sin), and the sliding layers' own where they have them.
    func ropeTables(positions: [Int], long: [Bool]? = nil) -> RopeTables {
        var global = Ops.ropeTables(positions: positions, inverseFrequencies: inverseFrequencies)
        if let longInverse = longInverseFrequencies, let long, long.contains(true) {
            let l = Ops.ropeTables(positions: positions, inverseFrequencies: longInverse)
            let half = longInverse.count
            for (t, isLong) in long.enumerated() where isLong {
                global.cos.replaceSubrange((t * half)..<((t + 1) * half), with: l.cos[(t * half)..<((t + 1) * half)])
                global.sin.replaceSubrange((t * half)..<((t + 1) * half), with: l.sin[(t * half)..<((t + 1) * half)])
            }
        }
        if let f = config.longRope?.attentionFactor, f != 1 {
            global.cos = global.cos.map { $0 * f }
            global.sin = global.sin.map { $0 * f }
        }
        let local = localInverseFrequencies.map { Ops.ropeTables(positions: positions, inverseFrequencies: $0) }
        return RopeTables(config: config, global: global, local: local)
    }

    /// LongRoPE: before a call whose largest position in `cache` will be `maxPosition`, recomputes the cached keys
    /// with the long factors if the call crosses the original length and they were rotated with the short ones.
    func refreshLongRope(_ cache: KVCache, reaching maxPosition: Int, adapter: LlamaModel?, kernels: KernelTable) throws {
        guard config.usesLongRope(maxPosition: maxPosition), !cache.longRope, cache.length > 0 else { return }
        let held = cache.tokens
        cache.reset()
        _ = try (adapter ?? self).forward(held, cache: cache, logits: .none, kernels: kernels, forceLongRope: true)
    }

    /// The context length from which decoding's attention splits each head's positions over the workers.
    public static var splitAttentionFrom: Int { Attention.splitFrom }
    /// Query rows of a prefill attention piece.
    static let prefillAttentionRows = 32

    /// Where a forward call's rows attend: sequence i's `counts[i]` rows (after those of the sequences before
    /// it, from `offsets[i]`) sit at positions starts[i]... of caches[i]. Made once per call, not per layer.
    struct AttentionRows {
        let caches: [KVCache]
        let counts: [Int]
        let starts: [Int]
        let offsets: [Int]
        /// One row a sequence: decoding.
        let decoding: Bool
        /// For a model with a sliding window and more than one row a sequence: each row's first visible key
        /// (position p sees keys from max(0, p - window + 1)), rows in call order.
        let windowStarts: [Int]?

        init(caches: [KVCache], counts: [Int], starts: [Int], window: Int? = nil) {
            self.caches = caches
            self.counts = counts
            self.starts = starts
            var offsets: [Int] = []
            var n = 0
            for c in counts { offsets.append(n); n += c }
            self.offsets = offsets
            decoding = counts.allSatisfy { $0 == 1 }
            if let window, !decoding {
                var w: [Int] = []
                w.reserveCapacity(n)
                for (c, s) in zip(counts, starts) { for p in s..<(s + c) { w.append(max(0, p - window + 1)) } }
                windowStarts = w
            } else {
                windowStarts = nil
            }
        }
    }

    /// Causal attention of this step's queries (ws.q) over every cached position of their own cache (or the
    /// last `slidingWindow` of them on a sliding layer), into ws.attn: decoding when each sequence has one row,
    /// otherwise a prefill (Attention.forward).
    func attention(_ ws: ForwardWorkspace, layer l: Int, _ rows: AttentionRows, kernels: KernelTable) {
        let heads = config.attentionHeads
        let qDim = heads.qDim, kvDim = heads.kvDim
        let caches = rows.caches, starts = rows.starts, offsets = rows.offsets, counts = rows.counts
        let window = config.isSliding(layer: l) ? config.slidingWindow : nil
        if rows.decoding {
            Attention.decode(heads, rows: caches.count, { i in
                // A query at position p sees keys max(0, p - window + 1) ... p.
                let length = starts[i] + 1, first = window.map { max(0, length - $0) } ?? 0
                let cache = caches[i], offset = first * kvDim * cache.dtype.byteWidth
                return Attention.DecodeRow(q: ws.q + i * qDim, out: ws.attn + i * qDim, keys: cache.keys(layer: l) + offset,
                                           values: cache.values(layer: l) + offset, dtype: cache.dtype, length: length - first)
            }, workspace: ws.attention, kernels: kernels)
            return
        }
        func run(_ windowStarts: UnsafePointer<Int>?) {
            Attention.forward(heads, sequences: caches.count, { i in
                Attention.Sequence(q: ws.q + offsets[i] * qDim, out: ws.attn + offsets[i] * qDim, keys: caches[i].keys(layer: l),
                                   values: caches[i].values(layer: l), dtype: caches[i].dtype, rows: counts[i], start: starts[i],
                                   windowStarts: windowStarts.map { $0 + offsets[i] })
            }, workspace: ws.attention, bf16: nil, kernels: kernels)
        }
        if window != nil, let w = rows.windowStarts { w.withUnsafeBufferPointer { run($0.baseAddress!) } } else { run(nil) }
    }
}

/// The rotary tables of one forward call: the model's, and the sliding layers' own (Gemma 3's local base).
struct RopeTables {
    let config: LlamaConfig
    let global: (cos: [Float], sin: [Float])
    let local: (cos: [Float], sin: [Float])?

    /// Runs body with a function giving each layer's BlockCall.
    func withCalls(rows n: Int, bf16: BF16Kernels?, kernels: KernelTable, _ body: ((Int) -> BlockCall) -> Void) {
        let local = self.local ?? global
        global.cos.withUnsafeBufferPointer { gc in
            global.sin.withUnsafeBufferPointer { gs in
                local.cos.withUnsafeBufferPointer { lc in
                    local.sin.withUnsafeBufferPointer { ls in
                        let g = BlockCall(rows: n, cos: gc.baseAddress!, sin: gs.baseAddress!, bf16: bf16, kernels: kernels)
                        let l = BlockCall(rows: n, cos: lc.baseAddress!, sin: ls.baseAddress!, bf16: bf16, kernels: kernels)
                        body { config.usesLocalRope(layer: $0) ? l : g }
                    }
                }
            }
        }
    }
}
