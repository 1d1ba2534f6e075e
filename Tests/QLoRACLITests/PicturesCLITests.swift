// The pages `eval elo --html/--svg`, `eval mmlu --html` and `qlora report` write, rendered by a real
// headless browser (Debian's chromium-headless-shell, which scripts/setup.sh installs).
import Foundation
import QLoRA
import QLoRATestSupport
import Testing

enum Browser {
    static let candidates = ["/usr/bin/chromium-headless-shell", "/usr/bin/chromium", "/usr/bin/google-chrome"]
    static var path: String? { candidates.first { FileManager.default.isExecutableFile(atPath: $0) } }

    /// Runs the browser headless on `url` with its profile, cache and home inside `dir`.
    static func run(_ arguments: [String], dir: String) throws -> (status: Int32, stdout: String, stderr: String) {
        guard let path else { throw BrowserMissing() }
        let home = FileSystem.join(dir, "browser-home")
        try FileSystem.makeDirectories(home)
        return try runProgram(path, ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--user-data-dir=\(home)/profile"] + arguments,
                              environment: ["HOME": home, "XDG_CONFIG_HOME": home, "XDG_CACHE_HOME": home])
    }

    struct BrowserMissing: Error, CustomStringConvertible {
        var description: String { "no headless chromium (\(Browser.candidates.joined(separator: ", "))): run scripts/setup.sh, which installs chromium-headless-shell" }
    }
}

@Suite("command line: pictures")
struct PicturesCLITests {
    @Test("eval elo --svg and --html, and qlora report: the browser parses the SVG without an error and draws the page")
    func rendered() throws {
        let dir = try Fixtures.temporaryDirectory("pictures")
        let judgments = FileSystem.join(dir, "j.jsonl")
        var lines: [String] = []
        for (a, b, w, n) in [("guanaco", "chatgpt", "model_a", 6), ("chatgpt", "guanaco", "model_a", 4), ("guanaco", "smol <base>", "model_a", 9), ("smol <base>", "chatgpt", "tie", 3), ("chatgpt", "smol <base>", "model_a", 7)] {
            lines += Array(repeating: #"{"model_a": "\#(a)", "model_b": "\#(b)", "winner": "\#(w)"}"#, count: n)
        }
        try FileSystem.writeFileAtomically(judgments, bytes: Array((lines.joined(separator: "\n") + "\n").utf8))
        let html = FileSystem.join(dir, "elo.html"), svg = FileSystem.join(dir, "elo.svg")
        let r = try runQLoRA(["eval", "elo", "--judgments", judgments, "--orderings", "200", "--html", html, "--svg", svg])
        #expect(r.status == 0, "\(r.stderr)")
        let page = String(decoding: try FileSystem.readFile(html), as: UTF8.self)
        #expect(page.contains("smol &lt;base&gt;") && page.contains("29 battles from"))

        // The SVG as the browser's XML parser reads it: no parser error, one dot a model, 6 cells.
        let dom = try Browser.run(["--dump-dom", "file://\(svg)"], dir: dir)
        #expect(dom.status == 0, "\(dom.stderr)")
        #expect(!dom.stdout.contains("parsererror") && !dom.stdout.contains("error on line"))
        #expect(dom.stdout.components(separatedBy: "<circle").count - 1 == 3)
        #expect(dom.stdout.components(separatedBy: "class=\"cell\"").count - 1 == 6)
        // A broken SVG is caught the same way (the check can fail).
        let broken = FileSystem.join(dir, "broken.svg")
        try FileSystem.writeFileAtomically(broken, bytes: Array(#"<svg xmlns="http://www.w3.org/2000/svg"><g><text>a & b</text></svg>"#.utf8))
        let bad = try Browser.run(["--dump-dom", "file://\(broken)"], dir: dir)
        #expect(bad.stdout.contains("parsererror"))

        // The page drawn: a screenshot of it holds far more than one of an empty page of the same size.
        let blank = FileSystem.join(dir, "blank.html")
        try FileSystem.writeFileAtomically(blank, bytes: Array("<!DOCTYPE html><html><body></body></html>".utf8))
        func shot(_ file: String, _ name: String) throws -> Int {
            let png = FileSystem.join(dir, name)
            let s = try Browser.run(["--window-size=900,1200", "--screenshot=\(png)", "file://\(file)"], dir: dir)
            #expect(s.status == 0, "\(s.stderr)")
            let bytes = try FileSystem.readFile(png)
            #expect(bytes.starts(with: [0x89, 0x50, 0x4E, 0x47]))
            return bytes.count
        }
        let empty = try shot(blank, "blank.png"), drawn = try shot(html, "elo.png")
        #expect(drawn > 10 * empty, "\(drawn) bytes against \(empty) for an empty page")

        // qlora report on a run folder: curves, a last line cut short left out, a malformed line named.
        let run = FileSystem.join(dir, "run")
        try FileSystem.makeDirectories(run)
        var metrics = #"{"step": 0, "val_loss": 4.5}"# + "\n"
        for step in 1...30 { metrics += #"{"step": \#(step), "loss": \#(4.0 - Double(step) * 0.08), "learning_rate": 0.0002, "grad_norm": 1.5, "tokens_per_second": 250}"# + "\n" }
        metrics += #"{"step": 30, "val_loss": 2.9}"# + "\n" + #"{"step": 31, "lo"#
        try FileSystem.writeFileAtomically(FileSystem.join(run, "metrics.jsonl"), bytes: Array(metrics.utf8))
        let rep = try runQLoRA(["report", run, "--svg", FileSystem.join(dir, "loss.svg")])
        #expect(rep.status == 0, "\(rep.stderr)")
        let report = String(decoding: try FileSystem.readFile(FileSystem.join(run, "report.html")), as: UTF8.self)
        #expect(report.contains("32 records") && report.contains("best validation loss (step 30)") && report.contains("<polyline"))
        #expect(try shot(FileSystem.join(run, "report.html"), "report.png") > 10 * empty)
        let lossDOM = try Browser.run(["--dump-dom", "file://\(FileSystem.join(dir, "loss.svg"))"], dir: dir)
        #expect(!lossDOM.stdout.contains("parsererror") && lossDOM.stdout.contains("validation loss"))
        try FileSystem.writeFileAtomically(FileSystem.join(run, "metrics.jsonl"), bytes: Array((#"{"step": 1, "loss": 2}"# + "\n" + #"{"loss": 2}"# + "\n").utf8))
        let badRun = try runQLoRA(["report", run])
        #expect(badRun.status == 1 && badRun.stderr.contains("metrics.jsonl:2: no \"step\""), "\(badRun.stderr)")
        let missing = try runQLoRA(["report", dir])
        #expect(missing.status == 1 && missing.stderr.contains("is \(dir) a `qlora train` output folder?"))
    }
}
