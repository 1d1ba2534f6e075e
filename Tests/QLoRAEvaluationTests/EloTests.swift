// Elo ratings (the paper's tournament method) on tournaments small enough to compute by hand, the
// convergence of the mean over orderings, and the battle reader's errors.
import QLoRA
import QLoRATestSupport
import Testing

@Suite("Elo")
struct EloTests {
    @Test("one pass: the sequential update computed by hand (K 32, initial 1000; a tie is half a win)")
    func sequentialUpdate() {
        let o = EloOptions()
        // A beats B: both expected 1/2, so A +16, B -16.
        #expect(Elo.ratings([(0, 1, 1)], order: [0], models: 2, options: o) == [1016, 984])
        // Then B beats A: expected for B = 1 / (1 + 10^(32/400)), delta = 32 (1 - that) = 17.4695015289755.
        let r = Elo.ratings([(0, 1, 1), (0, 1, 0)], order: [0, 1], models: 2, options: o)
        #expect(abs(r[0] - 998.5304984710245) < 1e-9 && abs(r[1] - 1001.4695015289755) < 1e-9)
        // A beats B, A beats C, B ties C, in that order (hand-computed in f64).
        let t = Elo.ratings([(0, 1, 1), (0, 2, 1), (1, 2, 0.5)], order: [0, 1, 2], models: 3, options: o)
        #expect(abs(t[0] - 1031.263693206478) < 1e-9)
        #expect(abs(t[1] - 984.0339081301692) < 1e-9)
        #expect(abs(t[2] - 984.7023986633528) < 1e-9)
        // Ratings are conserved: every update moves both by the same amount.
        #expect(abs(t.reduce(0, +) - 3000) < 1e-9)
    }

    @Test("over orderings: one battle gives one result; a win each way averages back to the start, the interval spans both orders")
    func orderings() {
        var o = EloOptions()
        o.orderings = 2000
        let one = Elo.run([Battle("a", "b", .first)], options: o)
        #expect(one.ratings.map(\.model) == ["a", "b"])
        #expect(one.ratings[0].mean == 1016 && one.ratings[0].lower == 1016 && one.ratings[0].upper == 1016)
        #expect(one.ratings[1].mean == 984)
        let two = Elo.run([Battle("a", "b", .first), Battle("b", "a", .first)], options: o)
        for r in two.ratings {
            #expect(abs(r.mean - 1000) < 1.5, "\(r.model) \(r.mean)")  // half the orderings each way: ±1.47 at the ends
            #expect(abs(r.lower - 998.5304984710245) < 1e-9 && abs(r.upper - 1001.4695015289755) < 1e-9)
            #expect(r.wins == 1 && r.losses == 1 && r.ties == 0)
        }
        #expect(two.winRate[0][1] == 0.5 && two.battles[0][1] == 2 && two.winRate[0][0] == nil)
    }

    @Test("the mean over orderings converges to the exact mean over every permutation")
    func convergence() {
        // Five battles among three models: 120 orders, enumerated.
        let battles = [Battle("a", "b", .first), Battle("b", "c", .first), Battle("a", "c", .tie), Battle("c", "a", .first), Battle("b", "a", .second)]
        let encoded: [(Int, Int, Double)] = [(0, 1, 1), (1, 2, 1), (0, 2, 0.5), (2, 0, 1), (1, 0, 0)]
        var exact = [Double](repeating: 0, count: 3)
        var count = 0
        func permute(_ rest: [Int], _ prefix: [Int]) {
            if rest.isEmpty {
                let r = Elo.ratings(encoded, order: prefix, models: 3, options: EloOptions())
                for m in 0..<3 { exact[m] += r[m] }
                count += 1
                return
            }
            for (i, x) in rest.enumerated() { var r = rest; r.remove(at: i); permute(r, prefix + [x]) }
        }
        permute(Array(0..<5), [])
        #expect(count == 120)
        exact = exact.map { $0 / Double(count) }
        func error(_ n: Int) -> Double {
            var o = EloOptions()
            o.orderings = n
            o.seed = 7
            let result = Elo.run(battles, options: o)
            return ["a", "b", "c"].enumerated().map { m, name in abs(result.ratings.first { $0.model == name }!.mean - exact[m]) }.max()!
        }
        let coarse = error(20), fine = error(20_000)
        #expect(fine < 0.05, "mean over 20,000 orderings is \(fine) from the exact one")
        #expect(fine < coarse, "20 orderings: \(coarse), 20,000: \(fine)")
    }

    @Test("the same seed gives the same ratings; another seed other orderings")
    func seeded() {
        let battles = (0..<60).map { i in Battle(["x", "y", "z"][i % 3], ["y", "z", "x"][i % 3], i % 4 == 0 ? .tie : (i % 5 < 3 ? .first : .second)) }
        var o = EloOptions()
        o.orderings = 300
        let a = Elo.run(battles, options: o), b = Elo.run(battles, options: o)
        #expect(a.ratings.map(\.mean) == b.ratings.map(\.mean) && a.ratings.map(\.lower) == b.ratings.map(\.lower))
        o.seed = 1
        #expect(Elo.run(battles, options: o).ratings.map(\.mean) != a.ratings.map(\.mean))
    }

    @Test("battles read from Chatbot Arena lines; a bad line is an error naming file:line")
    func parsing() throws {
        let good = #"""
            {"model_a": "guanaco-65b", "model_b": "chatgpt", "winner": "model_a", "question_id": 1}

            {"model_a": "chatgpt", "model_b": "guanaco-65b", "winner": "tie (bothbad)"}
            {"model_b": "vicuna", "model_a": "chatgpt", "winner": "model_b"}
            """#
        let battles = try Elo.parseBattles(Array(good.utf8), file: "j.jsonl")
        #expect(battles == [Battle("guanaco-65b", "chatgpt", .first), Battle("chatgpt", "guanaco-65b", .tie), Battle("chatgpt", "vicuna", .second)])
        let cases: [(String, String)] = [
            ("{\"model_a\": \"a\", \"model_b\": \"b\", \"winner\": \"model_a\"}\n{\"model_a\": \"a\", \"model_b\": \"b\", \"winner\": \"draw\"}", "j.jsonl:2: winner \"draw\""),
            ("{\"model_a\": \"a\", \"winner\": \"tie\"}", "j.jsonl:1: no \"model_b\""),
            ("\n\n{not json", "j.jsonl:3: not JSON"),
            ("[1, 2]", "j.jsonl:1: not a JSON object"),
            ("{\"model_a\": \"a\", \"model_b\": \"a\", \"winner\": \"tie\"}", "j.jsonl:1: model_a and model_b are both"),
        ]
        for (text, message) in cases {
            do {
                _ = try Elo.parseBattles(Array(text.utf8), file: "j.jsonl")
                Issue.record("accepted: \(text)")
            } catch {
                #expect("\(error)".hasPrefix(message), "\(error)")
            }
        }
    }
}
