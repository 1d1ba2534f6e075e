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
    let layers: Int
    let rowWidth: Int  // Hkv * d
    /// [layers, capacity, Hkv * d]; pages are touched only as positions fill.
    let keys: UnsafeMutablePointer<Float>
    let values: UnsafeMutablePointer<Float>
    var workspace: ForwardWorkspace?

    public init(config: LlamaConfig, capacity: Int) {
        self.capacity = capacity
        layers = config.layerCount
        rowWidth = config.kvHeadCount * config.headDim
        keys = .allocate(capacity: max(1, layers * capacity * rowWidth))
        values = .allocate(capacity: max(1, layers * capacity * rowWidth))
    }

    deinit {
        keys.deallocate()
        values.deallocate()
    }

    /// Forgets every position (a new conversation).
    public func reset() { length = 0 }

    /// Keeps the first `n` positions only.
    public func truncate(to n: Int) { length = min(length, max(0, n)) }

    /// Holds the first `count` positions of `other` (a prefix shared by several continuations), every layer.
    public func copyPrefix(of other: KVCache, count: Int) {
        precondition(other.layers == layers && other.rowWidth == rowWidth, "caches of different models")
        precondition(count <= other.length && count <= capacity, "the prefix is longer than one of the caches")
        for l in 0..<layers {
            keys(layer: l).update(from: other.keys(layer: l), count: count * rowWidth)
            values(layer: l).update(from: other.values(layer: l), count: count * rowWidth)
        }
        length = count
    }

    func advance(by n: Int) { length += n }

    /// Layer `l`'s keys and values: position j at + j * rowWidth.
    func keys(layer l: Int) -> UnsafeMutablePointer<Float> { keys + l * capacity * rowWidth }
    func values(layer l: Int) -> UnsafeMutablePointer<Float> { values + l * capacity * rowWidth }
}

/// The activations of one forward pass over up to `rows` tokens (grown when a call has more).
final class ForwardWorkspace {
    let rows: Int
    /// Positions an attention row holds (scores).
    let capacity: Int
    let h, xn, q, k, v, attn, proj, g, u: UnsafeMutablePointer<Float>
    /// A dequantized tile of a weight and its block scales (many-row products).
    let scratch: UnsafeMutablePointer<Float>
    /// x rearranged for the 4-bit matrix-vector kernel (one-row products).
    let prepared: UnsafeMutablePointer<Float>
    /// Attention scores: rows x capacity for prefill, or one capacity-long row per worker for decoding.
    let scores: UnsafeMutablePointer<Float>
    /// Decoding's attention split over ranges of positions: each range's unnormalized output (a row of
    /// queries per worker), then each range's max and sum per query head.
    let partial: UnsafeMutablePointer<Float>
    private let all: [UnsafeMutablePointer<Float>]

    init(rows T: Int, config c: LlamaConfig, capacity: Int, scratchCount: Int) {
        rows = T
        self.capacity = capacity
        let D = c.hiddenSize, qDim = c.headCount * c.headDim, kvDim = c.kvHeadCount * c.headDim, I = c.intermediateSize
        func make(_ n: Int) -> UnsafeMutablePointer<Float> {
            let p = UnsafeMutablePointer<Float>.allocate(capacity: max(n, 1))
            p.initialize(repeating: 0, count: max(n, 1))
            return p
        }
        h = make(T * D); xn = make(T * D); q = make(T * qDim); k = make(T * kvDim); v = make(T * kvDim)
        attn = make(T * qDim); proj = make(T * D); g = make(T * I); u = make(T * I)
        scratch = make(scratchCount)
        prepared = make(min(T, Linear.batchedRowLimit) * max(D, I, qDim))
        scores = make(max(T, Parallel.threadCount * c.headCount / max(c.kvHeadCount, 1)) * capacity)
        partial = make(Parallel.threadCount * (qDim + 2 * c.headCount))
        all = [h, xn, q, k, v, attn, proj, g, u, scratch, prepared, scores, partial]
    }

    deinit { for p in all { p.deallocate() } }
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
        let c = config
        let T = tokens.count
        guard T > 0 else { return [] }
        let start = cache.length
        guard start + T <= cache.capacity else { throw ForwardError.contextFull(capacity: cache.capacity, needed: start + T) }
        for t in tokens where t < 0 || t >= c.vocabSize { throw ForwardError.tokenOutOfRange(token: t, vocab: c.vocabSize) }
        let kvDim = c.kvHeadCount * c.headDim
        let ws = workspace(cache, rows: T)
        for (t, token) in tokens.enumerated() { embeddings.copyRow(token, into: ws.h + t * c.hiddenSize) }
        let (cos, sin) = ropeTables(positions: start..<(start + T))
        // More than one row: the BLAS products are split over our own workers with BLAS on one thread
        // each, so that OpenBLAS's threads do not spin against ours (measured: a fifth of a prefill's time
        // in sched_yield otherwise).
        func run() -> [Float] {
            runLayers(ws, rows: T, cos: cos, sin: sin, kernels: kernels) { l in
                // This step's keys and values join the cache; the queries attend over all of it.
                (cache.keys(layer: l) + start * kvDim).update(from: ws.k, count: T * kvDim)
                (cache.values(layer: l) + start * kvDim).update(from: ws.v, count: T * kvDim)
                attention(q: ws.q, layer: l, cache: cache, start: start, rows: T, into: ws.attn, scores: ws.scores, partial: ws.partial, kernels: kernels)
            }
            cache.advance(by: T)
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

    /// The blocks over `rows` rows of ws.h, in place: for each layer, norm, q/k/v, rotation, then
    /// `attend(layer)` (which stores the keys and values and leaves attention's output in ws.attn), the
    /// output projection and residual, then the MLP and residual. Rows in `adapters` also get that run's
    /// LoRA updates on every projection (on top of this model's own, if it has any).
    func runLayers(_ ws: ForwardWorkspace, rows n: Int, cos: [Float], sin: [Float], kernels: KernelTable,
                   adapters: [AdapterRun] = [], attend: (Int) -> Void) {
        let c = config
        let D = c.hiddenSize, d = c.headDim
        let h = ws.h, xn = ws.xn, q = ws.q, k = ws.k, v = ws.v, proj = ws.proj, g = ws.g, u = ws.u, scratch = ws.scratch
        let bf16 = bf16Products
        for (l, layer) in layers.enumerated() {
            // y += the run's LoRA update of the projection at `path`, for each run's rows of x.
            func lora(_ path: KeyPath<LlamaLayer, Linear>, _ x: UnsafePointer<Float>, _ y: UnsafeMutablePointer<Float>) {
                for run in adapters {
                    let linear = run.layers[l][keyPath: path]
                    linear.addLoRA(x + run.rows.lowerBound * linear.inFeatures, rows: run.rows.count,
                                   to: y + run.rows.lowerBound * linear.outFeatures)
                }
            }
            rmsNorm(xn, h, weight: layer.inputNorm, rows: n)
            Linear.forwardShared(xn, rows: n, prepared: ws.prepared, scratch: scratch, layer.q, q, layer.k, k, layer.v, v, bf16: bf16, kernels: kernels)
            lora(\.q, xn, q)
            lora(\.k, xn, k)
            lora(\.v, xn, v)
            Ops.rope(q, rows: n, heads: c.headCount, headDim: d, cos: cos, sin: sin)
            Ops.rope(k, rows: n, heads: c.kvHeadCount, headDim: d, cos: cos, sin: sin)
            attend(l)
            layer.o.forward(ws.attn, rows: n, into: proj, scratch: scratch, bf16: bf16, kernels: kernels)
            lora(\.o, ws.attn, proj)
            for i in 0..<(n * D) { h[i] = h[i] + proj[i] }
            rmsNorm(xn, h, weight: layer.postAttentionNorm, rows: n)
            Linear.forwardShared(xn, rows: n, prepared: ws.prepared, scratch: scratch, layer.gate, g, layer.up, u, bf16: bf16, kernels: kernels)
            lora(\.gate, xn, g)
            lora(\.up, xn, u)
            Ops.swigluForward(g, gate: g, up: u, count: n * c.intermediateSize)
            layer.down.forward(g, rows: n, into: proj, scratch: scratch, bf16: bf16, kernels: kernels)
            lora(\.down, g, proj)
            for i in 0..<(n * D) { h[i] = h[i] + proj[i] }
        }
    }

    /// logits [rows.count, V] of rows `rows` of ws.h: the final norm, then the head.
    func outputLogits(_ ws: ForwardWorkspace, rows: Range<Int>, kernels: KernelTable) -> [Float] {
        rmsNorm(ws.xn, ws.h + rows.lowerBound * config.hiddenSize, weight: finalNorm, rows: rows.count)
        var out = [Float](repeating: 0, count: rows.count * config.vocabSize)
        out.withUnsafeMutableBufferPointer { o in
            head.forward(ws.xn, rows: rows.count, into: o.baseAddress!, scratch: ws.scratch, bf16: bf16Products, kernels: kernels)
        }
        return out
    }

    /// The cache's workspace, made (or remade larger) for `rows` tokens and attention rows of `capacity`.
    func workspace(_ cache: KVCache, rows: Int, capacity: Int? = nil) -> ForwardWorkspace {
        let capacity = capacity ?? cache.capacity
        if let ws = cache.workspace, ws.rows >= rows, ws.capacity >= capacity { return ws }
        let scratchCount = ((layers.first?.linears ?? []) + [head]).map(\.scratchCount).max() ?? 0
        let ws = ForwardWorkspace(rows: max(rows, cache.workspace?.rows ?? 0), config: config,
                                  capacity: max(capacity, cache.workspace?.capacity ?? 0), scratchCount: scratchCount)
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
        let Hkv = c.kvHeadCount, d = c.headDim
        let qDim = c.headCount * d, kvDim = Hkv * d, group = c.headCount / Hkv
        let ws = workspace(caches[0], rows: B, capacity: caches.map(\.capacity).max()!)
        for (i, token) in tokens.enumerated() { embeddings.copyRow(token, into: ws.h + i * c.hiddenSize) }
        let positions = caches.map(\.length)
        let (cos, sin) = Ops.ropeTables(positions: positions, inverseFrequencies: inverseFrequencies)
        let scale = 1 / Float(d).squareRoot()
        let q = UnsafePointer(ws.q), attn = ws.attn, scores = ws.scores, rowCapacity = ws.capacity
        // BLAS on one thread while our workers split its products (as in forward(tokens:)).
        return Gemm.withSingleThreadedBLAS {
            runLayers(ws, rows: B, cos: cos, sin: sin, kernels: kernels, adapters: runs) { l in
                for (i, cache) in caches.enumerated() {
                    (cache.keys(layer: l) + positions[i] * kvDim).update(from: ws.k + i * kvDim, count: kvDim)
                    (cache.values(layer: l) + positions[i] * kvDim).update(from: ws.v + i * kvDim, count: kvDim)
                }
                // (sequence, key-value head) pairs over the workers, each worker with its own rows of scores.
                Parallel.forChunks(count: B * Hkv, minimumChunk: 1) { worker, pairs in
                    let rows = scores + worker * group * rowCapacity
                    for pair in pairs {
                        let i = pair / Hkv, kvh = pair % Hkv
                        let cache = caches[i]
                        kernels.attend(q + i * qDim + kvh * group * d, group, cache.keys(layer: l) + kvh * d, cache.values(layer: l) + kvh * d,
                                       positions[i] + 1, d, kvDim, scale, rows, attn + i * qDim + kvh * group * d, nil)
                    }
                }
            }
            for cache in caches { cache.advance(by: 1) }
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
        let runs = try adapterRuns(adapters, rowCounts: tokens.map(\.count))
        let qDim = c.headCount * c.headDim, kvDim = c.kvHeadCount * c.headDim, D = c.hiddenSize
        var offsets: [Int] = []
        var n = 0
        for seq in tokens { offsets.append(n); n += seq.count }
        let ws = workspace(caches[0], rows: n, capacity: caches.map(\.capacity).max()!)
        var positions: [Int] = []
        positions.reserveCapacity(n)
        for (i, seq) in tokens.enumerated() {
            for (t, token) in seq.enumerated() { embeddings.copyRow(token, into: ws.h + (offsets[i] + t) * D) }
            positions += caches[i].length..<(caches[i].length + seq.count)
        }
        let (cos, sin) = Ops.ropeTables(positions: positions, inverseFrequencies: inverseFrequencies)
        let starts = caches.map(\.length)
        return Gemm.withSingleThreadedBLAS {
            runLayers(ws, rows: n, cos: cos, sin: sin, kernels: kernels, adapters: runs) { l in
                for (i, cache) in caches.enumerated() {
                    let o = offsets[i], T = tokens[i].count
                    (cache.keys(layer: l) + starts[i] * kvDim).update(from: ws.k + o * kvDim, count: T * kvDim)
                    (cache.values(layer: l) + starts[i] * kvDim).update(from: ws.v + o * kvDim, count: T * kvDim)
                    attention(q: ws.q + o * qDim, layer: l, cache: cache, start: starts[i], rows: T, into: ws.attn + o * qDim,
                              scores: ws.scores, partial: ws.partial, kernels: kernels)
                }
            }
            for (i, cache) in caches.enumerated() { cache.advance(by: tokens[i].count) }
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

    /// cos and sin [positions, d/2] of position * inv_freq (f32, as transformers computes them).
    func ropeTables(positions: Range<Int>) -> ([Float], [Float]) {
        Ops.ropeTables(positions: Array(positions), inverseFrequencies: inverseFrequencies)
    }

    /// The context length from which decoding's attention splits each head's positions over the workers.
    public static let splitAttentionFrom = 128
    /// Query rows of a prefill attention piece.
    static let prefillAttentionRows = 32

    /// Causal attention of this step's queries over every cached position, per head, grouped KV heads
    /// shared by H / Hkv query heads. Softmax in f32 with the row maximum subtracted.
    func attention(q: UnsafePointer<Float>, layer l: Int, cache: KVCache, start: Int, rows T: Int, into out: UnsafeMutablePointer<Float>,
                   scores: UnsafeMutablePointer<Float>, partial: UnsafeMutablePointer<Float>, kernels: KernelTable) {
        let c = config
        let H = c.headCount, Hkv = c.kvHeadCount, d = c.headDim
        let group = H / Hkv
        let S = start + T
        let qDim = H * d, kvDim = Hkv * d
        let scale = 1 / Float(d).squareRoot()
        let kBase = UnsafePointer(cache.keys(layer: l)), vBase = UnsafePointer(cache.values(layer: l))
        let capacity = cache.workspace?.capacity ?? cache.capacity
        if T == 1 {
            // Decoding: the query heads of each key-value head together (its keys and values read once).
            // Short contexts: key-value heads over the workers. Long ones: each head's positions in as many
            // ranges as there are workers too, so that every worker has the same share (3 heads over 2
            // workers would leave one idle a third of the time), each range's output unnormalized with its
            // max and sum, combined after (qk_attend with stats).
            let workers = Parallel.threadCount
            let ranges = workers > 1 && S >= Self.splitAttentionFrom ? workers : 1
            let stats = partial + ranges * qDim
            Parallel.forChunks(count: Hkv * ranges, minimumChunk: 1) { worker, units in
                let rows = scores + worker * group * capacity
                for unit in units {
                    let kvh = unit / ranges, r = unit % ranges
                    if ranges == 1 {
                        kernels.attend(q + kvh * group * d, group, kBase + kvh * d, vBase + kvh * d, S, d, kvDim, scale, rows,
                                       out + kvh * group * d, nil)
                    } else {
                        let lo = S * r / ranges, hi = S * (r + 1) / ranges
                        kernels.attend(q + kvh * group * d, group, kBase + lo * kvDim + kvh * d, vBase + lo * kvDim + kvh * d, hi - lo, d, kvDim,
                                       scale, rows, partial + r * qDim + kvh * group * d, stats + 2 * (r * H + kvh * group))
                    }
                }
            }
            if ranges > 1 {
                for h in 0..<H {
                    var m = -Float.infinity
                    for r in 0..<ranges { m = max(m, stats[2 * (r * H + h)]) }
                    var l: Float = 0
                    let o = out + h * d
                    o.update(repeating: 0, count: d)
                    for r in 0..<ranges {
                        let w = exp(stats[2 * (r * H + h)] - m)
                        l += w * stats[2 * (r * H + h) + 1]
                        let p = partial + r * qDim + h * d
                        for i in 0..<d { o[i] += w * p[i] }
                    }
                    let inv = 1 / l
                    for i in 0..<d { o[i] *= inv }
                }
            }
        } else {
            // Prefill: per head, scores [T, S] and output [T, d] through BLAS, in pieces of query rows
            // handed to the workers (BLAS single-threaded: `forward` runs this inside withSingleThreadedBLAS).
            // A piece's rows see positions up to start + its last row only: the causal mask's zeros are
            // neither computed nor read.
            for h in 0..<H {
                let kvh = h / group
                Parallel.forPieces(count: T, piece: Self.prefillAttentionRows) { rows in
                    let visible = start + rows.upperBound
                    let sc = scores + rows.lowerBound * S
                    Gemm.gemm(sc, ldc: S, q + rows.lowerBound * qDim + h * d, lda: qDim, kBase + kvh * d, ldb: kvDim,
                              m: rows.count, n: visible, k: d, transposeB: true, alpha: scale)
                    for t in rows {
                        Ops.softmaxRow(scores + t * S, visible: start + t + 1, length: visible, kernels: kernels)
                    }
                    Gemm.gemm(out + rows.lowerBound * qDim + h * d, ldc: qDim, sc, lda: S, vBase + kvh * d, ldb: kvDim,
                              m: rows.count, n: d, k: visible)
                }
            }
        }
    }
}
