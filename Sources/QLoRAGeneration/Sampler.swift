// Choosing the next token from logits, as transformers' generate() does: OpenAI's logit bias and presence /
// frequency penalties, repetition penalty, then temperature, top-k, top-p (nucleus) and min-p, then a draw from
// the softmax; temperature 0 is greedy.
import QLoRACore

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public struct SamplingOptions: Sendable {
    /// 0 means greedy.
    public var temperature: Float = 0.7
    /// 0 disables top-k.
    public var topK = 0
    /// 1 disables top-p.
    public var topP: Float = 0.9
    /// 0 disables min-p.
    public var minP: Float = 0
    /// 1 disables the penalty (>1 discourages repeating tokens of the context).
    public var repetitionPenalty: Float = 1
    /// OpenAI's penalties on the tokens this sampler has chosen so far (not the prompt's): a token's logit
    /// loses frequencyPenalty times its count, and presencePenalty once it has appeared.
    public var presencePenalty: Float = 0
    public var frequencyPenalty: Float = 0
    /// Added to the logits of these token ids before anything else (OpenAI's logit_bias; -100 bans, 100 forces).
    public var logitBias: [Int: Float] = [:]
    public var seed: UInt64 = 0

    public init() {}

    /// The QLoRA paper's evaluation setting: nucleus sampling with p 0.9 and temperature 0.7.
    public static let paper = SamplingOptions()

    public static var greedy: SamplingOptions {
        var o = SamplingOptions()
        o.temperature = 0
        o.topP = 1
        return o
    }
}

public struct Sampler {
    public let options: SamplingOptions
    var rng: SeededGenerator
    /// How often each token has been chosen, for the presence and frequency penalties.
    var chosen: [Int: Int] = [:]

    public init(options: SamplingOptions) {
        self.options = options
        rng = SeededGenerator(seed: options.seed)
    }

    /// The next token given the logits [V] and the ids so far (for the repetition penalty).
    public mutating func next(logits input: [Float], context: [Int]) -> Int {
        let id = choose(logits: input, context: context)
        if options.presencePenalty != 0 || options.frequencyPenalty != 0 { chosen[id, default: 0] += 1 }
        return id
    }

    mutating func choose(logits input: [Float], context: [Int]) -> Int {
        var logits = input
        for (id, bias) in options.logitBias where id >= 0 && id < logits.count { logits[id] += bias }
        for (id, count) in chosen where id < logits.count {
            logits[id] -= options.frequencyPenalty * Float(count) + options.presencePenalty
        }
        if options.repetitionPenalty != 1 {
            for id in Set(context) where id >= 0 && id < logits.count {
                let l = logits[id]
                logits[id] = l < 0 ? l * options.repetitionPenalty : l / options.repetitionPenalty
            }
        }
        if options.temperature <= 0 {
            var best = 0
            for i in 1..<logits.count where logits[i] > logits[best] { best = i }
            return best
        }
        let t = options.temperature
        var maxLogit = -Float.infinity
        for l in logits where l > maxLogit { maxLogit = l }
        let top = maxLogit / t
        // Unnormalized probabilities e_i = exp(l_i / t - max); the most likely token has 1.
        var weights = [Float](repeating: 0, count: logits.count)
        var total: Float = 0
        for i in logits.indices {
            let e = expf(logits[i] / t - top)
            weights[i] = e
            total += e
        }
        // Candidates in descending order (ties by id). Sorting all 49,152 words of a vocabulary every token
        // took longer than the forward pass; the nucleus (or the top k, or min-p's survivors) lies among the
        // few likeliest, so only the tokens above a cutoff are sorted, the cutoff lowered until they hold
        // enough of the mass. Without top-k, top-p or min-p every token is a candidate, in id order.
        var order: [Int]
        if options.topK > 0 && options.topK < logits.count {
            order = Array(logits.indices.sorted { (weights[$0], -$0) > (weights[$1], -$1) }.prefix(options.topK))
        } else if options.topP < 1 || options.minP > 0 {
            var cutoff: Float = 1e-3
            while true {
                if options.minP > 0 { cutoff = min(cutoff, options.minP) }
                var mass: Float = 0
                order = []
                for i in weights.indices where weights[i] >= cutoff {
                    order.append(i)
                    mass += weights[i]
                }
                // Enough when the candidates reach top-p (min-p alone: its survivors are all above its cutoff).
                if cutoff == 0 || options.topP >= 1 || mass >= options.topP * total { break }
                cutoff = cutoff < 1e-12 ? 0 : cutoff * 1e-3
            }
            order.sort { (weights[$0], -$0) > (weights[$1], -$1) }
        } else {
            order = Array(logits.indices)
        }
        var keep = order.count
        if options.topP < 1 {
            // Smallest prefix whose mass reaches top_p (at least one token).
            var cumulative: Float = 0
            for (i, id) in order.enumerated() {
                cumulative += weights[id]
                if cumulative >= options.topP * total { keep = i + 1; break }
            }
        }
        if options.minP > 0 {
            // The best candidate has weight 1.
            keep = min(keep, max(1, order.prefix(keep).filter { weights[$0] >= options.minP }.count))
        }
        var kept: Float = 0
        for id in order.prefix(keep) { kept += weights[id] }
        var r = rng.nextFloat() * kept
        for id in order.prefix(keep) {
            r -= weights[id]
            if r < 0 { return id }
        }
        return order[keep - 1]
    }
}
