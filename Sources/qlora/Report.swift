// `qlora report OUTPUT_DIR`: a training run's curves as one self-contained HTML page (or SVG), read from
// the metrics.jsonl that `qlora train` writes line by line.
import ArgumentParser
import QLoRA

struct Report: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "report",
        abstract: "A training run's loss, validation loss and learning rate as a self-contained HTML page.",
        discussion: """
            Reads OUTPUT_DIR/metrics.jsonl (one line a step: step, loss, learning_rate, grad_norm, tokens_per_second, \
            val_loss on evaluation steps; rewards/* for --method dpo) and OUTPUT_DIR/training_args.yaml when present, and writes \
            OUTPUT_DIR/report.html (or --output): the training loss with its running mean over --smooth steps, the \
            validation loss, a preference run's rewards and margins, the learning rate and the gradient norm, as inline SVG (no script, no other file), with a table \
            of the run's settings. --svg writes the loss chart alone as an SVG file. A run still training can be reported \
            at any time; a last line cut short is left out.
            """
    )

    @Argument(help: "The training output folder (holding metrics.jsonl).", completion: .directory)
    var outputDir: String

    @Option(name: .customLong("output"), help: "The page to write (default: OUTPUT_DIR/report.html).", completion: .file())
    var page: String?

    @Option(help: "Also write the loss chart as an SVG file.", completion: .file())
    var svg: String?

    @Option(help: "Steps in the running mean drawn beside the training loss (1: none).")
    var smooth = 10

    func validate() throws {
        guard smooth >= 1 else { throw ValidationError("--smooth must be at least 1") }
    }

    struct Point {
        var step: Int
        var loss: Double?
        var validation: Double?
        var learningRate: Double?
        var gradNorm: Double?
        var tokensPerSecond: Double?
        /// Preference runs: TRL's rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies.
        var rewards: [String: Double] = [:]
    }
    static let rewardKeys = ["rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"]

    static func read(_ bytes: [UInt8], file: String) throws -> [Point] {
        var points: [Point] = []
        for (lineNumber, line) in JSON.completeLines(bytes) {
            func bad(_ reason: String) -> EvaluationError { .malformedLine(file: file, line: lineNumber, reason: reason) }
            let v: JSONValue
            do { v = try JSON.parse(Array(line)) } catch { throw bad("not JSON (\(error))") }
            guard let step = v["step"]?.intValue, step >= 0 else { throw bad("no \"step\" (a whole number)") }
            func number(_ key: String) throws -> Double? {
                guard let x = v[key] else { return nil }
                guard let d = x.doubleValue else { throw bad("\"\(key)\" is not a number") }
                return d
            }
            var point = Point(step: step, loss: try number("loss"), validation: try number("val_loss"), learningRate: try number("learning_rate"),
                              gradNorm: try number("grad_norm"), tokensPerSecond: try number("tokens_per_second"))
            for key in rewardKeys { point.rewards[key] = try number(key) }
            points.append(point)
        }
        return points
    }

    func run() throws {
        let metrics = FileSystem.join(outputDir, "metrics.jsonl")
        guard FileSystem.exists(metrics) else { throw EvaluationError.empty(file: metrics, what: "not found: is \(outputDir) a `qlora train` output folder?") }
        let points = try Self.read(try FileSystem.readFile(metrics), file: metrics)
        guard points.contains(where: { $0.loss != nil || $0.validation != nil }) else { throw EvaluationError.empty(file: metrics, what: "no loss recorded yet") }
        let training = points.compactMap { p in p.loss.map { (x: Double(p.step), y: $0) } }
        let validation = points.compactMap { p in p.validation.map { (x: Double(p.step), y: $0) } }
        var series: [(name: String, points: [(x: Double, y: Double)])] = []
        if !training.isEmpty { series.append(("training loss", training)) }
        if smooth > 1 && training.count > smooth {
            var running: [(x: Double, y: Double)] = []
            var sum = 0.0
            for (i, p) in training.enumerated() {
                sum += p.y
                if i >= smooth { sum -= training[i - smooth].y }
                if i >= smooth - 1 { running.append((p.x, sum / Double(smooth))) }
            }
            series.append(("mean of \(smooth) steps", running))
        }
        if !validation.isEmpty { series.append(("validation loss", validation)) }
        let lossChart = Chart.lines(title: "Loss", xAxis: "optimizer step", yAxis: "cross-entropy (nats a token)", series: series)
        var sections: [(heading: String, svg: String, table: [[String]]?)] = []
        var summary: [[String]] = [["", "value"]]
        if let last = training.last { summary.append(["steps recorded", "\(Int(last.x))"]); summary.append(["last training loss", formatFixed(last.y, 4)]) }
        if let first = validation.first, let best = validation.min(by: { $0.y < $1.y }) {
            summary.append(["validation loss at step \(Int(first.x))", formatFixed(first.y, 4)])
            summary.append(["best validation loss (step \(Int(best.x)))", formatFixed(best.y, 4)])
        }
        let speeds = points.compactMap(\.tokensPerSecond)
        if !speeds.isEmpty { summary.append(["median tokens/s", formatFixed(speeds.sorted()[speeds.count / 2], 0)]) }
        sections.append(("Loss", lossChart, summary))
        let rewardSeries = Self.rewardKeys.dropLast().map { key in (name: String(key.dropFirst("rewards/".count)), points: points.compactMap { p in p.rewards[key].map { (x: Double(p.step), y: $0) } }) }
        if rewardSeries.contains(where: { !$0.points.isEmpty }) {
            let accuracy = points.compactMap { p in p.rewards["rewards/accuracies"].map { (x: Double(p.step), y: $0) } }
            var table: [[String]] = [["", "first step", "last step"]]
            for (name, pts) in rewardSeries + [("accuracy", accuracy)] where !pts.isEmpty { table.append([name, formatFixed(pts.first!.y, 4), formatFixed(pts.last!.y, 4)]) }
            sections.append(("Preference rewards", Chart.lines(title: "DPO rewards (beta times the log-ratio to the reference)", xAxis: "optimizer step", yAxis: "reward",
                                                              series: rewardSeries.filter { !$0.points.isEmpty }), table))
        }
        let lr = points.compactMap { p in p.learningRate.map { (x: Double(p.step), y: $0) } }
        if !lr.isEmpty { sections.append(("Learning rate", Chart.lines(title: "Learning rate", xAxis: "optimizer step", yAxis: "learning rate", series: [("learning rate", lr)]), nil)) }
        let norms = points.compactMap { p in p.gradNorm.map { (x: Double(p.step), y: $0) } }
        if !norms.isEmpty { sections.append(("Gradient norm", Chart.lines(title: "Gradient norm before clipping", xAxis: "optimizer step", yAxis: "global L2 norm", series: [("gradient norm", norms)]), nil)) }
        let args = FileSystem.join(outputDir, "training_args.yaml")
        if FileSystem.exists(args) {
            let rows = String(decoding: try FileSystem.readFile(args), as: UTF8.self).split(separator: "\n").compactMap { line -> [String]? in
                guard !line.hasPrefix("#"), let colon = line.firstIndex(of: ":") else { return nil }
                return [String(line[..<colon]).trimmingWhitespace(), String(line[line.index(after: colon)...]).trimmingWhitespace()]
            }
            if !rows.isEmpty { sections.append(("Settings (training_args.yaml)", "", [["option", "value"]] + rows)) }
        }
        let out = page ?? FileSystem.join(outputDir, "report.html")
        let subtitle = "\(points.count) records from \(metrics)" + (validation.isEmpty ? "; no validation loss (train with --eval-every)" : "")
        try FileSystem.writeFileAtomically(out, bytes: Array(Chart.page(title: "Training run: \(FileSystem.baseName(outputDir))", subtitle: subtitle, sections: sections).utf8))
        if let svg { try FileSystem.writeFileAtomically(svg, bytes: Array(lossChart.utf8)) }
        print("wrote \(out)" + (svg.map { " and \($0)" } ?? ""))
    }
}
