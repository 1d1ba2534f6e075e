// The sampler's contract: greedy is argmax, a seed fixes the draw, top-k / top-p / min-p restrict the
// candidates, and the repetition penalty follows transformers (divide positive logits, multiply negative).
import Foundation
import QLoRA
import Testing

@Suite("sampler")
struct SamplerTests {
    let logits: [Float] = [0.5, 3.0, 2.9, -1.0, 1.0]

    func draws(_ o: SamplingOptions, _ n: Int = 400) -> [Int] {
        var s = Sampler(options: o)
        return (0..<n).map { _ in s.next(logits: logits, context: []) }
    }

    @Test("temperature 0 is argmax; top-k 1 is argmax too")
    func greedy() {
        #expect(Set(draws(.greedy, 10)) == [1])
        var o = SamplingOptions()
        o.topK = 1
        #expect(Set(draws(o, 50)) == [1])
    }

    @Test("the same seed gives the same tokens; another seed others")
    func seeds() {
        var a = SamplingOptions(), b = SamplingOptions()
        a.topP = 1
        b.topP = 1
        b.seed = 7
        #expect(draws(a) == draws(a))
        #expect(draws(a) != draws(b))
    }

    @Test("top-p keeps the smallest set reaching p; min-p drops tokens below min-p times the best")
    func nucleus() {
        var o = SamplingOptions()
        o.temperature = 1
        o.topP = 0.5  // tokens 1 and 2 carry ~0.43 and ~0.39: {1, 2} reaches 0.5
        #expect(Set(draws(o)) == [1, 2])
        o.topP = 1
        o.minP = 0.5  // exp(-0.1) ≈ 0.9 of the best passes, exp(-2) does not
        #expect(Set(draws(o)) == [1, 2])
        o.minP = 0
        #expect(Set(draws(o, 2000)).count == 5)
    }

    @Test("repetition penalty divides positive and multiplies negative logits of seen tokens")
    func penalty() {
        var o = SamplingOptions.greedy
        o.repetitionPenalty = 2
        var s = Sampler(options: o)
        // Token 1 (3.0) penalized to 1.5 < 2.9: token 2 wins.
        #expect(s.next(logits: logits, context: [1]) == 2)
        // A negative logit gets more negative, never better.
        #expect(s.next(logits: [-1, -1.5], context: [0]) == 1)
    }

    @Test("logit bias moves a token before sampling; presence and frequency penalties follow OpenAI's formula over the tokens chosen, not the context")
    func openAIPenalties() {
        var o = SamplingOptions.greedy
        o.logitBias = [4: 2.5]  // 1.0 + 2.5 > 3.0
        var biased = Sampler(options: o)
        #expect(biased.next(logits: logits, context: [1, 1, 1]) == 4)
        o.logitBias = [1: -100]
        var banned = Sampler(options: o)
        #expect(banned.next(logits: logits, context: []) == 2)

        // Frequency 0.06 per use: token 1 (3.0) wins until it is 0.1 below token 2 (2.9): after 2 uses
        // 3.0 - 0.12 = 2.88 < 2.9, so 1, 1, 2, then 2.9 - 0.06 = 2.84 < 2.88: 1 again.
        o.logitBias = [:]
        o.frequencyPenalty = 0.06
        var freq = Sampler(options: o)
        #expect((0..<4).map { _ in freq.next(logits: logits, context: [1, 1, 1, 1]) } == [1, 1, 2, 1])
        // Presence 0.2 once a token has appeared: 1, then 2 (2.9 > 2.8), then 1 (2.8 > 2.7), then 1 again (no
        // further loss).
        o.frequencyPenalty = 0
        o.presencePenalty = 0.2
        var presence = Sampler(options: o)
        #expect((0..<4).map { _ in presence.next(logits: logits, context: []) } == [1, 2, 1, 1])
        // A negative penalty favours what was said.
        o.presencePenalty = -0.5
        var negative = Sampler(options: o)
        #expect((0..<3).map { _ in negative.next(logits: [2.0, 2.2, 0], context: []) } == [1, 1, 1])
    }

    @Test("over a 49,152-word vocabulary every draw lies in the exact nucleus (a full sort), also when the nucleus needs the long tail")
    func largeVocabulary() {
        var rng = SeededGenerator(seed: 5)
        let V = 49_152
        let peaked = (0..<V).map { _ in Float(rng.next() % 10_000) / 400 }  // logits 0..25
        let flatTail = [Float(0)] + [Float](repeating: -8, count: V - 1)  // e^-8 < the first cutoff: the nucleus is mostly tail
        for (label, logits) in [("peaked", peaked), ("long tail", flatTail)] {
            var o = SamplingOptions()
            o.temperature = 0.7
            o.topP = 0.9
            // The nucleus by a full sort, in f64.
            let w = logits.map { exp(Double($0) / 0.7) }
            let total = w.reduce(0, +)
            var nucleus = Set<Int>(), mass = 0.0
            for id in logits.indices.sorted(by: { (w[$0], -$0) > (w[$1], -$1) }) {
                nucleus.insert(id)
                mass += w[id]
                if mass >= 0.9 * total { break }
            }
            var s = Sampler(options: o)
            let drawn = (0..<300).map { _ in s.next(logits: logits, context: []) }
            #expect(drawn.allSatisfy { nucleus.contains($0) }, "\(label)")
            // The tail holds 35% of the mass: about a third of the draws come from it.
            if label == "long tail" { #expect(Set(drawn).count > 50, "the tail is drawn from") }
        }
    }
}
