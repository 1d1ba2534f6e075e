// Perplexity with a sliding window, as the Hugging Face guide computes it: windows of `context` tokens
// advancing by `stride`; in each window only the tokens not scored by an earlier window count, each
// predicted from everything before it in the window. Log-softmax in f64 over the vocabulary.
import QLoRACore
import QLoRAModel

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public struct PerplexityResult: Sendable {
    public let totalNLL: Double
    public let scoredTokens: Int
    public let seconds: Double

    public var meanNLL: Double { totalNLL / Double(max(scoredTokens, 1)) }
    public var perplexity: Double { exp(meanNLL) }
}

public enum PerplexityEvaluator {
    /// Negative log-likelihood of `target` under `logits` (one row of V).
    public static func nll(_ logits: ArraySlice<Float>, target: Int) -> Double {
        LogSumExp.negativeLogLikelihood(logits, target: target)
    }

    public static func evaluate(model: LlamaModel, tokens: [Int], context: Int, stride: Int, showProgress: Bool = true) throws -> PerplexityResult {
        let start = Clock.seconds()
        let V = model.config.vocabSize
        var total = 0.0, count = 0
        var previousEnd = 0  // tokens[0..<previousEnd] have been scored as targets (position 0 never is)
        var windows: [(Int, Int)] = []
        var begin = 0
        while true {
            let end = min(begin + context, tokens.count)
            windows.append((begin, end))
            if end == tokens.count { break }
            begin += stride
        }
        let progress = ProgressBar("perplexity", total: windows.count, enabled: showProgress)
        for (begin, end) in windows {
            let input = Array(tokens[begin..<end])
            let cache = model.makeCache(capacity: input.count)
            let logits = try model.forward(input, cache: cache, logits: .all)
            // Targets: positions max(previousEnd, begin + 1)..<end, each predicted by the row before it.
            let firstTarget = max(previousEnd, begin + 1)
            for t in firstTarget..<end {
                let row = t - 1 - begin
                total += nll(logits[(row * V)..<((row + 1) * V)], target: tokens[t])
                count += 1
            }
            previousEnd = end
            let running = (exp(total / Double(max(count, 1))) * 1000).rounded() / 1000
            progress.advance(note: "ppl \(running)")
        }
        return PerplexityResult(totalNLL: total, scoredTokens: count, seconds: Clock.seconds() - start)
    }
}

