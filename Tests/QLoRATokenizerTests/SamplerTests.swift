// The sampler's contract: greedy is argmax, a seed fixes the draw, top-k / top-p / min-p restrict the
// candidates, and the repetition penalty follows transformers (divide positive logits, multiply negative).
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
}
