// Preference tuning on the 4-bit base: DPO's losses (sigmoid, hinge, IPO) as TRL's DPOTrainer computes them,
// as sequence objectives of the training engine. A batch holds P pairs as 2P rows, the chosen completions
// first and then the rejected ones (TRL's layout), each row prompt + completion with the prompt masked. The
// reference model is the frozen base with the adapter off, so its log-probabilities are computed once per pair
// (`TrainingEngine.sequenceLogProbs(_:adapter: false)`) and can be kept.
import Foundation

#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

public enum DPOLoss: String, CaseIterable, Sendable {
    /// -log σ(β Δ), the DPO paper's loss.
    case sigmoid
    /// max(0, 1 - β Δ) (SLiC).
    case hinge
    /// (Δ̄ - 1 / 2β)², IPO, with each completion's log-ratio averaged over its tokens as TRL does.
    case ipo
}

public struct DPOConfig: Sendable, Equatable {
    /// The strength of the pull towards the reference (TRL's default 0.1).
    public var beta = 0.1
    public var loss = DPOLoss.sigmoid
    public init() {}
}

/// What a preference step logs, as TRL names it: means over the batch's pairs.
public struct PreferenceMetrics: Sendable, Equatable {
    /// β (log π(chosen) - log π_ref(chosen)).
    public var rewardsChosen = 0.0
    public var rewardsRejected = 0.0
    /// rewardsChosen - rewardsRejected.
    public var margins = 0.0
    /// The fraction of pairs whose chosen reward beats the rejected one.
    public var accuracy = 0.0
    /// The policy's summed log-probability of the completions.
    public var logpsChosen = 0.0
    public var logpsRejected = 0.0
    /// KTO: the estimate of KL(policy ‖ reference) from mismatched prompt/completion rows (0 for DPO and ORPO).
    public var kl = 0.0
    /// Pairs (rows for KTO) the means are over.
    public var pairs = 0
    /// The rows the chosen and the rejected means are over: the pairs for DPO and ORPO; KTO's desirable and
    /// undesirable rows (either may be 0 in a micro-batch).
    public var chosenCount = 0
    public var rejectedCount = 0
    /// KTO's unpaired rows: the rewards are means over the desirable and the undesirable rows, there is no
    /// accuracy, and kl is logged.
    public var unpaired = false
    public init() {}

    /// Each pair's rewards and policy log-probabilities, averaged (margin and accuracy derived from the rewards).
    init(perPair: [(rewardChosen: Double, rewardRejected: Double, logpChosen: Double, logpRejected: Double)]) {
        pairs = perPair.count
        chosenCount = pairs
        rejectedCount = pairs
        guard pairs > 0 else { return }
        let n = Double(pairs)
        for p in perPair {
            rewardsChosen += p.rewardChosen / n
            rewardsRejected += p.rewardRejected / n
            accuracy += (p.rewardChosen > p.rewardRejected ? 1 : 0) / n
            logpsChosen += p.logpChosen / n
            logpsRejected += p.logpRejected / n
        }
        margins = rewardsChosen - rewardsRejected
    }

    /// Sums that add up over micro-batches and ranks: each chosen mean times its row count, each rejected mean times
    /// its, accuracy and kl times the pairs, then the three counts. The margin is derived again from the merged means.
    public var weightedSums: [Double] {
        let c = Double(chosenCount), r = Double(rejectedCount), p = Double(pairs)
        return [rewardsChosen * c, logpsChosen * c, rewardsRejected * r, logpsRejected * r, accuracy * p, kl * p, c, r, p]
    }

    /// The metrics whose weightedSums these are (summed over parts).
    public init(weightedSums s: [Double]) {
        precondition(s.count == 9)
        chosenCount = Int(s[6])
        rejectedCount = Int(s[7])
        pairs = Int(s[8])
        if chosenCount > 0 { rewardsChosen = s[0] / s[6]; logpsChosen = s[1] / s[6] }
        if rejectedCount > 0 { rewardsRejected = s[2] / s[7]; logpsRejected = s[3] / s[7] }
        if pairs > 0 { accuracy = s[4] / s[8]; kl = s[5] / s[8] }
        margins = chosenCount > 0 && rejectedCount > 0 ? rewardsChosen - rewardsRejected : 0
    }

    /// The row-weighted means of several micro-batches' metrics.
    public static func merged(_ parts: [PreferenceMetrics]) -> PreferenceMetrics {
        var m = PreferenceMetrics(weightedSums: parts.reduce([Double](repeating: 0, count: 9)) { zip($0, $1.weightedSums).map(+) })
        m.unpaired = parts.first?.unpaired ?? false
        return m
    }
}

public enum DPO {
    /// The objective of one batch of P pairs (rows: chosen 0..<P, then rejected), given the reference's summed
    /// log-probabilities of the same rows: the loss is the mean over the pairs; `report` receives the metrics.
    public static func objective(_ config: DPOConfig, reference: [Double], report: @escaping (PreferenceMetrics) -> Void = { _ in }) -> TrainingEngine.SequenceObjective {
        { logps, counts in
            precondition(logps.count == reference.count && logps.count % 2 == 0)
            let P = logps.count / 2, beta = config.beta
            var loss = 0.0
            var gradient = [Double](repeating: 0, count: 2 * P)
            var perPair: [(rewardChosen: Double, rewardRejected: Double, logpChosen: Double, logpRejected: Double)] = []
            for i in 0..<P {
                let chosenRatio = logps[i] - reference[i], rejectedRatio = logps[P + i] - reference[P + i]
                let delta = chosenRatio - rejectedRatio
                switch config.loss {
                case .sigmoid:
                    // -log σ(βΔ) = softplus(-βΔ), computed without overflow either way.
                    let z = -beta * delta
                    loss += z > 0 ? z + log1p(exp(-z)) : log1p(exp(z))
                    let d = -beta / (1 + exp(beta * delta))  // -β σ(-βΔ)
                    gradient[i] = d
                    gradient[P + i] = -d
                case .hinge:
                    let h = 1 - beta * delta
                    loss += max(0, h)
                    let d = h > 0 ? -beta : 0
                    gradient[i] = d
                    gradient[P + i] = -d
                case .ipo:
                    let nc = Double(max(counts[i], 1)), nr = Double(max(counts[P + i], 1))
                    let e = chosenRatio / nc - rejectedRatio / nr - 1 / (2 * beta)
                    loss += e * e
                    gradient[i] = 2 * e / nc
                    gradient[P + i] = -2 * e / nr
                }
                perPair.append((beta * chosenRatio, beta * rejectedRatio, logps[i], logps[P + i]))
            }
            let p = Double(P)
            for k in gradient.indices { gradient[k] /= p }
            report(PreferenceMetrics(perPair: perPair))
            return (loss / p, gradient)
        }
    }
}

/// ORPO (Hong et al., 2024) as TRL's ORPOTrainer computes it: no reference model; the loss is the chosen sequences'
/// negative log-likelihood over all their tokens (prompt and completion, the mean over the batch's chosen tokens)
/// minus beta times the mean log σ of the log odds ratio of the completions' average log-probabilities.
public struct ORPOConfig: Sendable, Equatable {
    /// λ of the paper, TRL's beta (default 0.1).
    public var beta = 0.1
    public init() {}
}

public enum ORPO {
    /// log(1 - e^x) for x < 0, split at -ln 2 as TRL does.
    static func log1mexp(_ x: Double) -> Double { x < -0.6931471805599453 ? log1p(-exp(x)) : log(-expm1(x)) }

    /// The objective of one batch of P pairs (rows: chosen 0..<P, then rejected). Rewards are beta times the average
    /// log-probabilities, as TRL logs them; logps/* are the average log-probabilities.
    public static func objective(_ config: ORPOConfig, report: @escaping (PreferenceMetrics) -> Void = { _ in }) -> TrainingEngine.AllTokenObjective {
        { completion, counts, all, allCounts in
            precondition(completion.count % 2 == 0)
            let P = completion.count / 2, beta = config.beta
            var dCompletion = [Double](repeating: 0, count: 2 * P), dAll = dCompletion
            // NLL over every token of the chosen rows.
            var chosenTokens = 0, chosenSum = 0.0
            for i in 0..<P { chosenTokens += allCounts[i]; chosenSum += all[i] }
            let n = Double(max(chosenTokens, 1))
            var loss = -chosenSum / n
            for i in 0..<P { dAll[i] = -1 / n }
            var perPair: [(rewardChosen: Double, rewardRejected: Double, logpChosen: Double, logpRejected: Double)] = []
            for i in 0..<P {
                let nc = Double(max(counts[i], 1)), nr = Double(max(counts[P + i], 1))
                let ac = completion[i] / nc, ar = completion[P + i] / nr
                let logOdds = (ac - ar) - (log1mexp(ac) - log1mexp(ar))
                // -beta log σ(lo), averaged over the pairs.
                let logSigmoid = logOdds >= 0 ? -log1p(exp(-logOdds)) : logOdds - log1p(exp(logOdds))
                loss -= beta * logSigmoid / Double(P)
                let dLogOdds = -beta / Double(P) / (1 + exp(logOdds))  // -(beta/P) σ(-lo)
                dCompletion[i] = dLogOdds / (1 - exp(ac)) / nc
                dCompletion[P + i] = -dLogOdds / (1 - exp(ar)) / nr
                perPair.append((beta * ac, beta * ar, ac, ar))
            }
            report(PreferenceMetrics(perPair: perPair))
            return (loss, dCompletion, dAll)
        }
    }
}

/// KTO (Ethayarajh et al., 2024) as TRL's KTOTrainer computes it: unpaired completions labelled desirable or not. Each
/// row's log-ratio r = log π(completion) − log π_ref(completion) (sums over the completion's tokens) is compared with
/// z, an estimate of KL(π ‖ π_ref) from mismatched rows (each prompt with another row's completion: the mean of their
/// log-ratios, at least 0, not differentiated). Desirable rows lose w_d (1 − σ(β (r − z))), undesirable ones
/// w_u (1 − σ(β (z − r))); the loss is the mean over all rows. TRL's apo_zero_unpaired drops z: 1 − σ(β r) and σ(β r).
public enum KTOLoss: String, CaseIterable, Sendable {
    case kto
    case apoZeroUnpaired = "apo_zero_unpaired"
}

public struct KTOConfig: Sendable, Equatable {
    /// TRL's defaults: beta 0.1, both weights 1.
    public var beta = 0.1
    public var desirableWeight = 1.0
    public var undesirableWeight = 1.0
    public var loss = KTOLoss.kto
    public init() {}
}

public enum KTO {
    /// The objective of one batch of B rows, given the reference's summed log-probabilities of the same rows, each
    /// row's label (true: desirable) and, for the kto loss, the policy's and the reference's log-probabilities of the
    /// rows' mismatched (KL) rows, scored without gradients (as TRL scores them under no_grad).
    public static func objective(_ config: KTOConfig, reference: [Double], desirable: [Bool], kl: (policy: [Double], reference: [Double])?,
                                 report: @escaping (PreferenceMetrics) -> Void = { _ in }) -> TrainingEngine.SequenceObjective {
        { logps, _ in
            precondition(logps.count == reference.count && logps.count == desirable.count)
            let B = desirable.count, beta = config.beta
            var z = 0.0
            if config.loss == .kto {
                guard let kl, kl.policy.count == B, kl.reference.count == B else { preconditionFailure("the kto loss needs the KL rows' log-probabilities") }
                for i in 0..<B { z += kl.policy[i] - kl.reference[i] }
                z = max(0, z / Double(B))
            }
            var loss = 0.0
            var gradient = [Double](repeating: 0, count: B)
            var m = PreferenceMetrics()
            m.unpaired = true
            m.pairs = B
            m.kl = z
            var chosen = 0, rejected = 0
            for i in 0..<B {
                let r = logps[i] - reference[i]
                // 1 − σ(x) = σ(−x); d/dr.
                func sigmoid(_ x: Double) -> Double { x >= 0 ? 1 / (1 + exp(-x)) : exp(x) / (1 + exp(x)) }
                if desirable[i] {
                    let x = beta * (r - (config.loss == .kto ? z : 0)), s = sigmoid(x)
                    loss += config.desirableWeight * (1 - s)
                    gradient[i] = -config.desirableWeight * beta * s * (1 - s)
                    chosen += 1
                    m.rewardsChosen += beta * r
                    m.logpsChosen += logps[i]
                } else if config.loss == .kto {
                    let x = beta * (z - r), s = sigmoid(x)
                    loss += config.undesirableWeight * (1 - s)
                    gradient[i] = config.undesirableWeight * beta * s * (1 - s)
                    rejected += 1
                    m.rewardsRejected += beta * r
                    m.logpsRejected += logps[i]
                } else {
                    let s = sigmoid(beta * r)
                    loss += config.undesirableWeight * s
                    gradient[i] = config.undesirableWeight * beta * s * (1 - s)
                    rejected += 1
                    m.rewardsRejected += beta * r
                    m.logpsRejected += logps[i]
                }
            }
            if chosen > 0 { m.rewardsChosen /= Double(chosen); m.logpsChosen /= Double(chosen) }
            if rejected > 0 { m.rewardsRejected /= Double(rejected); m.logpsRejected /= Double(rejected) }
            m.chosenCount = chosen
            m.rejectedCount = rejected
            m.margins = chosen > 0 && rejected > 0 ? m.rewardsChosen - m.rewardsRejected : 0
            for k in 0..<B { gradient[k] /= Double(B) }
            report(m)
            return (loss / Double(B), gradient)
        }
    }
}
