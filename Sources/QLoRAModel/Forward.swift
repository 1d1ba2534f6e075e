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

/// Keys and values of every layer for the positions seen so far.
public final class KVCache {
    public let capacity: Int
    public private(set) var length = 0
    let layers: Int
    let rowWidth: Int  // Hkv * d
    /// Per layer: [capacity, Hkv * d].
    var keys: [[Float]]
    var values: [[Float]]

    public init(config: LlamaConfig, capacity: Int) {
        self.capacity = capacity
        layers = config.layerCount
        rowWidth = config.kvHeadCount * config.headDim
        keys = Array(repeating: [Float](repeating: 0, count: capacity * rowWidth), count: layers)
        values = keys
    }

    /// Forgets every position (a new conversation).
    public func reset() { length = 0 }

    /// Keeps the first `n` positions only.
    public func truncate(to n: Int) { length = min(length, max(0, n)) }

    func advance(by n: Int) { length += n }
}

public enum ForwardError: Error, CustomStringConvertible, Equatable {
    case contextFull(capacity: Int, needed: Int)
    case tokenOutOfRange(token: Int, vocab: Int)

    public var description: String {
        switch self {
        case let .contextFull(capacity, needed):
            return "the context holds \(capacity) tokens and this step needs \(needed); start a new conversation or raise the context size"
        case let .tokenOutOfRange(token, vocab): return "token id \(token) is outside the vocabulary (0..<\(vocab))"
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
        let D = c.hiddenSize, H = c.headCount, Hkv = c.kvHeadCount, d = c.headDim
        let qDim = H * d, kvDim = Hkv * d, I = c.intermediateSize

        var h = [Float](repeating: 0, count: T * D)
        h.withUnsafeMutableBufferPointer { hp in
            for (t, token) in tokens.enumerated() { embeddings.copyRow(token, into: hp.baseAddress! + t * D) }
        }
        var xn = [Float](repeating: 0, count: T * D)
        var q = [Float](repeating: 0, count: T * qDim)
        var k = [Float](repeating: 0, count: T * kvDim)
        var v = [Float](repeating: 0, count: T * kvDim)
        var attn = [Float](repeating: 0, count: T * qDim)
        var proj = [Float](repeating: 0, count: T * D)
        var g = [Float](repeating: 0, count: T * I)
        var u = [Float](repeating: 0, count: T * I)
        let scratchCount = layers.first.map { $0.linears.map(\.scratchCount).max() ?? 0 } ?? 0
        var scratch = [Float](repeating: 0, count: max(scratchCount, 1))
        let (cos, sin) = ropeTables(positions: start..<(start + T))

        for (l, layer) in layers.enumerated() {
            rmsNorm(h, weight: layer.inputNorm, into: &xn, rows: T, dim: D, eps: c.rmsNormEps)
            xn.withUnsafeBufferPointer { x in
                scratch.withUnsafeMutableBufferPointer { s in
                    q.withUnsafeMutableBufferPointer { layer.q.forward(x.baseAddress!, rows: T, into: $0.baseAddress!, scratch: s.baseAddress!, kernels: kernels) }
                    k.withUnsafeMutableBufferPointer { layer.k.forward(x.baseAddress!, rows: T, into: $0.baseAddress!, scratch: s.baseAddress!, kernels: kernels) }
                    v.withUnsafeMutableBufferPointer { layer.v.forward(x.baseAddress!, rows: T, into: $0.baseAddress!, scratch: s.baseAddress!, kernels: kernels) }
                }
            }
            applyRope(&q, rows: T, heads: H, headDim: d, cos: cos, sin: sin)
            applyRope(&k, rows: T, heads: Hkv, headDim: d, cos: cos, sin: sin)
            // Append this step's keys and values to the cache.
            for t in 0..<T {
                let row = (start + t) * kvDim
                for j in 0..<kvDim {
                    cache.keys[l][row + j] = k[t * kvDim + j]
                    cache.values[l][row + j] = v[t * kvDim + j]
                }
            }
            attention(q: q, layer: l, cache: cache, start: start, rows: T, into: &attn)
            attn.withUnsafeBufferPointer { a in
                scratch.withUnsafeMutableBufferPointer { s in
                    proj.withUnsafeMutableBufferPointer { layer.o.forward(a.baseAddress!, rows: T, into: $0.baseAddress!, scratch: s.baseAddress!, kernels: kernels) }
                }
            }
            for i in 0..<(T * D) { h[i] = h[i] + proj[i] }

            rmsNorm(h, weight: layer.postAttentionNorm, into: &xn, rows: T, dim: D, eps: c.rmsNormEps)
            xn.withUnsafeBufferPointer { x in
                scratch.withUnsafeMutableBufferPointer { s in
                    g.withUnsafeMutableBufferPointer { layer.gate.forward(x.baseAddress!, rows: T, into: $0.baseAddress!, scratch: s.baseAddress!, kernels: kernels) }
                    u.withUnsafeMutableBufferPointer { layer.up.forward(x.baseAddress!, rows: T, into: $0.baseAddress!, scratch: s.baseAddress!, kernels: kernels) }
                }
            }
            g.withUnsafeMutableBufferPointer { gp in
                u.withUnsafeBufferPointer { Ops.swigluForward(gp.baseAddress!, gate: gp.baseAddress!, up: $0.baseAddress!, count: T * I) }
            }
            g.withUnsafeBufferPointer { a in
                scratch.withUnsafeMutableBufferPointer { s in
                    proj.withUnsafeMutableBufferPointer { layer.down.forward(a.baseAddress!, rows: T, into: $0.baseAddress!, scratch: s.baseAddress!, kernels: kernels) }
                }
            }
            for i in 0..<(T * D) { h[i] = h[i] + proj[i] }
        }
        cache.advance(by: T)

        let rows: Range<Int>
        switch logits {
        case .none: return []
        case .last: rows = (T - 1)..<T
        case .all: rows = 0..<T
        }
        var last = [Float](repeating: 0, count: rows.count * D)
        let selected = Array(h[(rows.lowerBound * D)..<(rows.upperBound * D)])
        rmsNorm(selected, weight: finalNorm, into: &last, rows: rows.count, dim: D, eps: c.rmsNormEps)
        return outputLogits(last, rows: rows.count)
    }

    /// logits[n, V] = x[n, D] · Eᵀ (tied) or lm_head.
    func outputLogits(_ x: [Float], rows n: Int) -> [Float] {
        let V = config.vocabSize
        var out = [Float](repeating: 0, count: n * V)
        x.withUnsafeBufferPointer { xp in
            out.withUnsafeMutableBufferPointer { o in
                let head = self.head
                var scratch = [Float](repeating: 0, count: max(head.scratchCount, 1))
                scratch.withUnsafeMutableBufferPointer { s in
                    head.forward(xp.baseAddress!, rows: n, into: o.baseAddress!, scratch: s.baseAddress!)
                }
            }
        }
        return out
    }

    /// RMSNorm: x / sqrt(mean(x²) + eps) * weight, per row, in f32.
    func rmsNorm(_ x: [Float], weight: [Float], into out: inout [Float], rows: Int, dim: Int, eps: Float) {
        x.withUnsafeBufferPointer { xp in
            weight.withUnsafeBufferPointer { wp in
                out.withUnsafeMutableBufferPointer { op in
                    Ops.rmsNormForward(op.baseAddress!, rstd: nil, xp.baseAddress!, weight: wp.baseAddress!, rows: rows, dim: dim, eps: eps)
                }
            }
        }
    }

    /// cos and sin [positions, d/2] of position * inv_freq (f32, as transformers computes them).
    func ropeTables(positions: Range<Int>) -> ([Float], [Float]) {
        Ops.ropeTables(positions: Array(positions), inverseFrequencies: inverseFrequencies)
    }

    /// Rotates each head's halves (transformers' rotate_half convention, not interleaved pairs).
    func applyRope(_ x: inout [Float], rows: Int, heads: Int, headDim d: Int, cos: [Float], sin: [Float]) {
        x.withUnsafeMutableBufferPointer { xp in
            Ops.rope(xp.baseAddress!, rows: rows, heads: heads, headDim: d, cos: cos, sin: sin)
        }
    }

    /// Causal attention of this step's queries over every cached position, per head, grouped KV heads
    /// shared by H / Hkv query heads. Softmax in f32 with the row maximum subtracted.
    func attention(q: [Float], layer l: Int, cache: KVCache, start: Int, rows T: Int, into out: inout [Float]) {
        let c = config
        let H = c.headCount, Hkv = c.kvHeadCount, d = c.headDim
        let group = H / Hkv
        let S = start + T
        let qDim = H * d, kvDim = Hkv * d
        let scale = 1 / Float(d).squareRoot()
        cache.keys[l].withUnsafeBufferPointer { kc in
            cache.values[l].withUnsafeBufferPointer { vc in
                q.withUnsafeBufferPointer { qp in
                    out.withUnsafeMutableBufferPointer { op in
                        let qBase = qp.baseAddress!, kBase = kc.baseAddress!, vBase = vc.baseAddress!, oBase = op.baseAddress!
                        if T == 1 {
                            // Decoding: small dot products, heads in parallel, no BLAS.
                            Parallel.forChunks(count: H, minimumChunk: 1) { _, heads in
                                var scores = [Float](repeating: 0, count: S)
                                for h in heads {
                                    let kvh = h / group
                                    let qh = qBase + h * d
                                    var m = -Float.infinity
                                    for j in 0..<S {
                                        let kj = kBase + j * kvDim + kvh * d
                                        var dot: Float = 0
                                        for i in 0..<d { dot += qh[i] * kj[i] }
                                        scores[j] = dot * scale
                                        m = max(m, scores[j])
                                    }
                                    var sum: Float = 0
                                    for j in 0..<S { scores[j] = expf(scores[j] - m); sum += scores[j] }
                                    let oh = oBase + h * d
                                    for i in 0..<d { oh[i] = 0 }
                                    for j in 0..<S {
                                        let p = scores[j] / sum
                                        let vj = vBase + j * kvDim + kvh * d
                                        for i in 0..<d { oh[i] += p * vj[i] }
                                    }
                                }
                            }
                        } else {
                            // Prefill: per head, scores [T, S] and output [T, d] through BLAS.
                            var scores = [Float](repeating: 0, count: T * S)
                            scores.withUnsafeMutableBufferPointer { sp in
                                let sBase = sp.baseAddress!
                                for h in 0..<H {
                                    let kvh = h / group
                                    Gemm.gemm(sBase, ldc: S, qBase + h * d, lda: qDim, kBase + kvh * d, ldb: kvDim,
                                              m: T, n: S, k: d, transposeB: true, alpha: scale)
                                    for t in 0..<T { Ops.softmaxRow(sBase + t * S, visible: start + t + 1, length: S) }
                                    Gemm.gemm(oBase + h * d, ldc: qDim, sBase, lda: S, vBase + kvh * d, ldb: kvDim,
                                              m: T, n: d, k: S)
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
