// The SVG charts behind `--html` / `--svg` and `qlora report`: well-formed XML whatever the labels hold, the
// marks each chart promises, the heat map's colour scale and round axis ticks.
import QLoRACore
import Testing

/// Fails with a reason when `text` is not well-formed XML as far as these charts go: every tag closed in
/// order, attribute values quoted, `&` only in entities, no `<` inside text.
func xmlProblem(_ text: String) -> String? {
    var stack: [String] = []
    var i = text.startIndex
    let entities = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"]
    while i < text.endIndex {
        let c = text[i]
        if c == "&" {
            guard entities.contains(where: { text[i...].hasPrefix($0) }) else { return "a bare & at \(text.distance(from: text.startIndex, to: i))" }
        }
        if c == "<" {
            guard let close = text[i...].firstIndex(of: ">") else { return "an unclosed tag" }
            let tag = String(text[text.index(after: i)..<close])
            if tag.hasPrefix("!") || tag.hasPrefix("?") {
                // <!DOCTYPE ...>, <?xml ...?>
            } else if tag.hasPrefix("/") {
                let name = String(tag.dropFirst())
                guard stack.last == name else { return "</\(name)> closes <\(stack.last ?? "nothing")>" }
                stack.removeLast()
            } else {
                guard !tag.contains("<") else { return "a < inside the tag <\(tag)>" }
                let name = String(tag.prefix { $0 != " " && $0 != "/" && $0 != "\n" })
                guard !name.isEmpty else { return "an empty tag name" }
                // Attribute values: name="..." with no quote inside.
                var rest = Substring(tag.dropFirst(name.count))
                while let eq = rest.firstIndex(of: "=") {
                    let after = rest[rest.index(after: eq)...]
                    guard after.first == "\"" else { return "an unquoted attribute in <\(name)>" }
                    guard let end = after.dropFirst().firstIndex(of: "\"") else { return "an unterminated attribute in <\(name)>" }
                    rest = after[after.index(after: end)...]
                }
                if !tag.hasSuffix("/") && !["meta", "br", "hr", "img", "link", "input"].contains(name) { stack.append(name) }
            }
            i = text.index(after: close)
            continue
        }
        i = text.index(after: i)
    }
    return stack.isEmpty ? nil : "<\(stack.last!)> is never closed"
}

func count(_ needle: String, in text: String) -> Int {
    var n = 0
    var rest = Substring(text)
    while let r = rest.firstRange(of: needle) {
        n += 1
        rest = rest[r.upperBound...]
    }
    return n
}

@Suite("charts")
struct ChartsTests {
    static let hostile = "a<b & \"c\" 'd'>\u{1}"

    @Test("escaping: markup characters become entities, control characters spaces")
    func escaping() {
        #expect(Chart.escape(Self.hostile) == "a&lt;b &amp; &quot;c&quot; &#39;d&#39;&gt; ")
        #expect(Chart.escape("Éa\tb") == "Éa\tb")
    }

    @Test("ticks are round and cover the range")
    func ticks() {
        #expect(Chart.ticks(0, 100) == [0, 20, 40, 60, 80, 100])
        #expect(Chart.ticks(0.5, 4.4) == [1, 2, 3, 4])
        #expect(Chart.ticks(760, 1240) == [800, 900, 1000, 1100, 1200])
        let small = Chart.ticks(0.001, 0.0012, count: 2)
        #expect(small.count == 3 && zip(small, [0.001, 0.0011, 0.0012]).allSatisfy { abs($0 - $1) < 1e-12 })
        #expect(Chart.fixed(1016.25, 1) == "1016.3" && Chart.fixed(-0.04, 1) == "0.0" && Chart.fixed(-2.5, 0) == "-3" && Chart.fixed(0.5, 3) == "0.500")
    }

    @Test("every chart is well-formed XML with its marks, whatever its labels hold")
    func charts() {
        let labels = [Self.hostile, "b", "c"]
        let ranking = Chart.intervals(title: "t <1>", axis: "Elo", rows: labels.enumerated().map { ($0.element, 1000 + Double($0.offset) * 10, 990, 1030) })
        #expect(xmlProblem(ranking) == nil, "\(xmlProblem(ranking) ?? "")")
        #expect(count("<circle", in: ranking) == 3 && count("class=\"row\"", in: ranking) == 3)
        #expect(!ranking.contains(Self.hostile))

        let heat = Chart.heatMap(title: "w", labels: labels, values: [[nil, 1, 0.5], [0, nil, 0.25], [0.5, 0.75, nil]], counts: [[0, 2, 2], [2, 0, 2], [2, 2, 0]], note: "n & m")
        #expect(xmlProblem(heat) == nil, "\(xmlProblem(heat) ?? "")")
        #expect(count("class=\"cell\"", in: heat) == 6)
        // The scale: 1 is the darkest red, 0 the darkest blue, 0.5 white.
        #expect(heat.contains("fill=\"rgb(178,24,43)\"") && heat.contains("fill=\"rgb(33,102,172)\"") && heat.contains("fill=\"rgb(255,255,255)\""))
        #expect(heat.contains("(2 battles)"))

        let bars = Chart.bars(title: "MMLU", axis: "%", rows: [("x", 50), (Self.hostile, 25), ("z", 120)], maximum: 100, reference: (25, "chance"))
        #expect(xmlProblem(bars) == nil && count("class=\"bar\"", in: bars) == 3)

        let lines = Chart.lines(title: "Loss", xAxis: "step", yAxis: "loss", series: [("train", [(1, 3), (2, 2.5), (3, .nan)]), ("val", [(0, 4)])])
        #expect(xmlProblem(lines) == nil && count("<polyline", in: lines) == 1 && count("<circle", in: lines) == 3)
        #expect(!lines.contains("nan") && !lines.contains("inf"))

        let both = Chart.stack([ranking, heat])
        #expect(xmlProblem(both) == nil && count("<svg", in: both) == 3)
        let page = Chart.page(title: "T & t", subtitle: "s", sections: [("R", ranking, [["model", "Elo"], [Self.hostile, "1000.0"]]), ("W", heat, nil)])
        #expect(xmlProblem(page) == nil, "\(xmlProblem(page) ?? "")")
        #expect(page.hasPrefix("<!DOCTYPE html>") && count("<table>", in: page) == 1 && page.contains("<td class=\"t\">a&lt;b"))
        #expect(xmlProblem("<svg><g></svg>") != nil && xmlProblem("<a b=c></a>") != nil && xmlProblem("<a>&</a>") != nil)
    }
}
