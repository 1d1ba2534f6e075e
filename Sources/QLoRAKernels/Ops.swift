// The element-wise and row-wise operations of a Llama block, each forward beside its backward.
// Shapes: rows × dim, row-major; `d` prefixes gradients. Norm weights are frozen in QLoRA, so the
// norm backward computes the input gradient only.
import QLoRACore
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public enum Ops {
    // MARK: RMSNorm  y = w ⊙ x / sqrt(mean(x²) + eps)

    /// Writes y and the per-row reciprocal RMS (rstd) that the backward needs (y may be x). Rows are split over
    /// our threads, each row on one (its sums in the same order on any thread count).
    public static func rmsNormForward(_ y: UnsafeMutablePointer<Float>, rstd: UnsafeMutablePointer<Float>?,
                                      _ x: UnsafePointer<Float>, weight: UnsafePointer<Float>, rows: Int, dim: Int, eps: Float) {
        Parallel.forChunks(count: rows, minimumChunk: max(1, (1 << 14) / max(dim, 1))) { _, range in
            for r in range {
                let xr = x + r * dim, yr = y + r * dim
                let s = 1 / (dot(xr, xr, dim) / Float(dim) + eps).squareRoot()
                rstd?[r] = s
                for j in 0..<dim { yr[j] = weight[j] * (xr[j] * s) }
            }
        }
    }

    /// dx += rstd·(w⊙dy) − x·rstd³/dim·Σ(w⊙dy⊙x), per row (accumulates into dx).
    public static func rmsNormBackward(_ dx: UnsafeMutablePointer<Float>, _ dy: UnsafePointer<Float>, _ x: UnsafePointer<Float>,
                                       rstd: UnsafePointer<Float>, weight: UnsafePointer<Float>, rows: Int, dim: Int) {
        Parallel.forChunks(count: rows, minimumChunk: max(1, (1 << 14) / max(dim, 1))) { _, range in
            for r in range {
                let xr = x + r * dim, dyr = dy + r * dim, dxr = dx + r * dim
                let s = rstd[r]
                var dot: Float = 0
                for j in 0..<dim { dot += weight[j] * dyr[j] * xr[j] }
                let c = dot * s * s * s / Float(dim)
                for j in 0..<dim { dxr[j] += s * weight[j] * dyr[j] - c * xr[j] }
            }
        }
    }

    /// Σ a[j]·b[j] over n, in sixteen interleaved partial sums (vectorizable), then added together.
    @inline(__always)
    static func dot(_ a: UnsafePointer<Float>, _ b: UnsafePointer<Float>, _ n: Int) -> Float {
        var acc = SIMD16<Float>()
        var j = 0
        let ra = UnsafeRawPointer(a), rb = UnsafeRawPointer(b)
        while j + 16 <= n {
            acc += ra.loadUnaligned(fromByteOffset: 4 * j, as: SIMD16<Float>.self) * rb.loadUnaligned(fromByteOffset: 4 * j, as: SIMD16<Float>.self)
            j += 16
        }
        var sum = acc.sum()
        while j < n { sum += a[j] * b[j]; j += 1 }
        return sum
    }

    // MARK: RoPE (rotate_half convention: the two halves of each head rotate as pairs (i, i + d/2))

    /// cos/sin tables [positions.count, d/2] for angle = position × inv_freq.
    public static func ropeTables(positions: [Int], inverseFrequencies inv: [Float]) -> (cos: [Float], sin: [Float]) {
        var c = [Float](repeating: 0, count: positions.count * inv.count), s = c
        c.withUnsafeMutableBufferPointer { cp in
            s.withUnsafeMutableBufferPointer { sp in
                ropeTables(count: positions.count, position: { positions[$0] }, inverseFrequencies: inv, cos: cp.baseAddress!, sin: sp.baseAddress!)
            }
        }
        return (c, s)
    }

    /// cos/sin [count, d/2] into `cos` and `sin`, row t for angle = position(t) × inv_freq, in f32 as
    /// transformers computes them.
    public static func ropeTables(count: Int, position: (Int) -> Int, inverseFrequencies inv: [Float],
                                  cos c: UnsafeMutablePointer<Float>, sin s: UnsafeMutablePointer<Float>) {
        let half = inv.count
        for t in 0..<count {
            let p = Float(position(t))
            for i in 0..<half {
                let angle = p * inv[i]
                c[t * half + i] = cosf(angle)
                s[t * half + i] = sinf(angle)
            }
        }
    }

    /// Rotates x [rows, heads·d] in place; row r uses table row r. `inverse` rotates by −angle (the backward).
    /// `rotaryDim` (default d): only each head's first rotaryDim dimensions rotate, as pairs (i, i + rotaryDim/2),
    /// and the rest pass through (partial rotary, Phi-4-mini); the tables hold rotaryDim / 2 columns.
    public static func rope(_ x: UnsafeMutablePointer<Float>, rows: Int, heads: Int, headDim d: Int, rotaryDim: Int? = nil,
                            cos: UnsafePointer<Float>, sin: UnsafePointer<Float>, inverse: Bool = false) {
        let half = (rotaryDim ?? d) / 2
        for t in 0..<rows {
            for h in 0..<heads {
                let base = x + (t * heads + h) * d
                for i in 0..<half {
                    let x1 = base[i], x2 = base[half + i]
                    let c = cos[t * half + i], s = inverse ? -sin[t * half + i] : sin[t * half + i]
                    base[i] = x1 * c - x2 * s
                    base[half + i] = x2 * c + x1 * s
                }
            }
        }
    }

    // MARK: SwiGLU  a = silu(g) ⊙ u (C kernels: CKernels rowops)

    public static func swigluForward(_ a: UnsafeMutablePointer<Float>, gate g: UnsafePointer<Float>, up u: UnsafePointer<Float>, count: Int,
                                     kernels: KernelTable = .current) {
        kernels.swiglu(a, g, u, count)
    }

    /// dg = da ⊙ u ⊙ silu'(g), du = da ⊙ silu(g), with silu'(g) = σ(g)(1 + g(1 − σ(g))).
    public static func swigluBackward(dGate dg: UnsafeMutablePointer<Float>, dUp du: UnsafeMutablePointer<Float>,
                                      _ da: UnsafePointer<Float>, gate g: UnsafePointer<Float>, up u: UnsafePointer<Float>, count: Int,
                                      kernels: KernelTable = .current) {
        kernels.swigluBackward(dg, du, da, g, u, count)
    }

    // MARK: GeGLU with the tanh approximation  a = gelu_tanh(g) ⊙ u (Gemma; C kernels: CKernels rowops)

    public static func gegluForward(_ a: UnsafeMutablePointer<Float>, gate g: UnsafePointer<Float>, up u: UnsafePointer<Float>, count: Int,
                                    kernels: KernelTable = .current) {
        kernels.geglu(a, g, u, count)
    }

    /// dg = da ⊙ u ⊙ gelu_tanh'(g), du = da ⊙ gelu_tanh(g).
    public static func gegluBackward(dGate dg: UnsafeMutablePointer<Float>, dUp du: UnsafeMutablePointer<Float>,
                                     _ da: UnsafePointer<Float>, gate g: UnsafePointer<Float>, up u: UnsafePointer<Float>, count: Int,
                                     kernels: KernelTable = .current) {
        kernels.gegluBackward(dg, du, da, g, u, count)
    }

    // MARK: Softmax rows in place, over the first `visible` entries of each row (the rest set to 0)

    public static func softmaxRow(_ row: UnsafeMutablePointer<Float>, visible: Int, length: Int, kernels: KernelTable = .current) {
        kernels.softmaxRow(row, visible, length)
    }

    // MARK: Cross-entropy over one row of logits

    /// Returns −log softmax(logits)[target] and overwrites logits with its gradient
    /// (softmax − onehot(target)) × scale.
    public static func crossEntropyRow(_ logits: UnsafeMutablePointer<Float>, vocab: Int, target: Int, scale: Float,
                                       kernels: KernelTable = .current) -> Double {
        kernels.crossEntropyRow(logits, vocab, target, scale)
    }
}
