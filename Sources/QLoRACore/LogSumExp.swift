// log Σ exp(xᵢ), kept as (max, Σ exp(xᵢ − max)) so that it never overflows and parts of a row computed
// apart combine exactly. Every normalizer in Swift goes through here: a token's log-probability (perplexity,
// multiple choice, the merge's drift report) and decoding's attention split over ranges of positions.
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public enum LogSumExp {
    /// log Σ exp(x) over a row, summed in f64.
    public static func of(_ row: ArraySlice<Float>) -> Double {
        var m = -Float.infinity
        for v in row { m = Swift.max(m, v) }
        var sum = 0.0
        for v in row { sum += exp(Double(v - m)) }
        return log(sum) + Double(m)
    }

    /// −log softmax(row)[target], the negative log-likelihood of one token (target indexes the row from 0).
    public static func negativeLogLikelihood(_ row: ArraySlice<Float>, target: Int) -> Double {
        of(row) - Double(row[row.startIndex + target])
    }

    /// The (max, sum) pair of the union of `count` parts, each given as its own pair.
    @inline(__always)
    public static func merge(count: Int, _ part: (Int) -> (max: Float, sum: Float)) -> (max: Float, sum: Float) {
        var m = -Float.infinity
        for i in 0..<count { m = Swift.max(m, part(i).max) }
        var l: Float = 0
        for i in 0..<count {
            let p = part(i)
            l += exp(p.max - m) * p.sum
        }
        return (m, l)
    }
}
