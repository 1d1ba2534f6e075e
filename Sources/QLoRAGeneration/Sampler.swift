// Choosing the next token from logits, as transformers' generate() does: repetition penalty, then
// temperature, top-k, top-p (nucleus) and min-p, then a draw from the softmax; temperature 0 is greedy.
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

    public init(options: SamplingOptions) {
        self.options = options
        rng = SeededGenerator(seed: options.seed)
    }

    /// The next token given the logits [V] and the ids so far (for the repetition penalty).
    public mutating func next(logits input: [Float], context: [Int]) -> Int {
        var logits = input
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
        // Candidates sorted by logit, descending (ties by id, for determinism).
        var order = Array(logits.indices)
        if options.topK > 0 && options.topK < order.count {
            order = Array(order.sorted { (logits[$0], -$0) > (logits[$1], -$1) }.prefix(options.topK))
        } else {
            order.sort { (logits[$0], -$0) > (logits[$1], -$1) }
        }
        let maxLogit = logits[order[0]] / t
        var probs = order.map { expf(logits[$0] / t - maxLogit) }
        var total = probs.reduce(0, +)
        probs = probs.map { $0 / total }
        var keep = probs.count
        if options.topP < 1 {
            // Smallest prefix whose mass reaches top_p (at least one token).
            var cumulative: Float = 0
            for (i, p) in probs.enumerated() {
                cumulative += p
                if cumulative >= options.topP { keep = i + 1; break }
            }
        }
        if options.minP > 0 {
            let threshold = options.minP * probs[0]
            keep = min(keep, max(1, probs.prefix(keep).filter { $0 >= threshold }.count))
        }
        total = probs.prefix(keep).reduce(0, +)
        var r = rng.nextFloat() * total
        for i in 0..<keep {
            r -= probs[i]
            if r < 0 { return order[i] }
        }
        return order[keep - 1]
    }
}
