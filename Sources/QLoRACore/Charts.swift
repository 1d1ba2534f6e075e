// Self-contained charts as SVG (no script, no external file): ratings with intervals, a heat map, bars,
// and line curves, plus an HTML page that holds several. Every text is escaped, every number finite.

public enum Chart {
    public static let palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2"]

    /// Text for XML (elements and attribute values).
    public static func escape(_ s: String) -> String {
        var out = ""
        out.reserveCapacity(s.utf8.count)
        for c in s.unicodeScalars {
            switch c {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default:
                // XML 1.0 allows no control characters but tab, newline and carriage return.
                if c.value < 0x20 && c != "\t" && c != "\n" && c != "\r" { out += " " } else { out.unicodeScalars.append(c) }
            }
        }
        return out
    }

    /// A number for an attribute, with at most 2 decimals.
    static func n(_ v: Double) -> String {
        guard v.isFinite else { return "0" }
        let r = (v * 100).rounded() / 100
        if r == r.rounded() { return String(Int(r)) }
        return String(r)
    }

    /// A value as text with `digits` decimals.
    public static func fixed(_ v: Double, _ digits: Int) -> String {
        guard v.isFinite else { return "\(v)" }
        var scale = 1.0
        for _ in 0..<digits { scale *= 10 }
        let r = (abs(v) * scale).rounded()
        let whole = Int(r / scale), frac = Int(r - Double(whole) * scale)
        var s = (v < 0 && r != 0 ? "-" : "") + String(whole)
        if digits > 0 {
            let f = String(frac)
            s += "." + String(repeating: "0", count: digits - f.count) + f
        }
        return s
    }

    /// About `count` round tick values covering [lo, hi].
    public static func ticks(_ lo: Double, _ hi: Double, count: Int = 5) -> [Double] {
        guard lo.isFinite && hi.isFinite else { return [0] }
        let span = hi > lo ? hi - lo : max(abs(lo), 1)
        let raw = span / Double(max(1, count))
        var step = 1.0
        while step > raw { step /= 10 }
        while step * 10 <= raw { step *= 10 }
        for m in [1.0, 2.0, 5.0, 10.0] where step * m >= raw {
            step *= m
            break
        }
        let first = (lo / step).rounded(.down) * step
        var out: [Double] = []
        var t = first
        while t <= hi + step * 1e-9 && out.count < 50 {
            if t >= lo - step * 1e-9 { out.append(abs(t) < step * 1e-9 ? 0 : t) }
            t += step
        }
        return out.isEmpty ? [lo] : out
    }

    static func decimals(for ticks: [Double]) -> Int {
        guard ticks.count > 1 else { return 1 }
        let step = abs(ticks[1] - ticks[0])
        var d = 0
        var s = step
        while s < 1 && d < 6 { s *= 10; d += 1 }
        return d
    }

    static func svg(width: Double, height: Double, title: String, body: String) -> String {
        """
        <svg xmlns="http://www.w3.org/2000/svg" width="\(n(width))" height="\(n(height))" viewBox="0 0 \(n(width)) \(n(height))" font-family="system-ui, sans-serif" font-size="12">
        <title>\(escape(title))</title>
        <rect width="100%" height="100%" fill="#ffffff"/>
        <text x="\(n(width / 2))" y="20" text-anchor="middle" font-size="15" font-weight="bold">\(escape(title))</text>
        \(body)</svg>

        """
    }

    /// One row per label: a dot at the value and a line over [lower, upper] (Elo and its 95% interval).
    public static func intervals(title: String, axis: String, rows: [(label: String, value: Double, lower: Double, upper: Double)]) -> String {
        let labelWidth = Double(min(40, rows.map(\.label.count).max() ?? 5)) * 7 + 20
        let plot = 420.0, rowHeight = 26.0, top = 40.0
        let width = labelWidth + plot + 100, height = top + Double(rows.count) * rowHeight + 50
        let lo = rows.map(\.lower).min() ?? 0, hi = rows.map(\.upper).max() ?? 1
        let pad = max((hi - lo) * 0.08, 1)
        let ts = ticks(lo - pad, hi + pad)
        let a = min(ts.first!, lo - pad), b = max(ts.last!, hi + pad)
        func x(_ v: Double) -> Double { labelWidth + (v - a) / (b - a) * plot }
        var body = ""
        let bottom = top + Double(rows.count) * rowHeight
        for t in ts {
            body += "<line x1=\"\(n(x(t)))\" y1=\"\(n(top))\" x2=\"\(n(x(t)))\" y2=\"\(n(bottom))\" stroke=\"#e0e0e0\"/>\n"
            body += "<text x=\"\(n(x(t)))\" y=\"\(n(bottom + 16))\" text-anchor=\"middle\" fill=\"#555\">\(fixed(t, decimals(for: ts)))</text>\n"
        }
        body += "<text x=\"\(n(labelWidth + plot / 2))\" y=\"\(n(bottom + 34))\" text-anchor=\"middle\" fill=\"#333\">\(escape(axis))</text>\n"
        for (i, r) in rows.enumerated() {
            let y = top + (Double(i) + 0.5) * rowHeight, color = palette[i % palette.count]
            body += "<g class=\"row\"><title>\(escape(r.label)): \(fixed(r.value, 1)) [\(fixed(r.lower, 1)), \(fixed(r.upper, 1))]</title>\n"
            body += "<text x=\"\(n(labelWidth - 10))\" y=\"\(n(y + 4))\" text-anchor=\"end\">\(escape(String(r.label.prefix(40))))</text>\n"
            body += "<line x1=\"\(n(x(r.lower)))\" y1=\"\(n(y))\" x2=\"\(n(x(r.upper)))\" y2=\"\(n(y))\" stroke=\"\(color)\" stroke-width=\"3\"/>\n"
            body += "<circle cx=\"\(n(x(r.value)))\" cy=\"\(n(y))\" r=\"5\" fill=\"\(color)\"/>\n"
            body += "<text x=\"\(n(labelWidth + plot + 10))\" y=\"\(n(y + 4))\">\(fixed(r.value, 1))</text></g>\n"
        }
        return svg(width: width, height: height, title: title, body: body)
    }

    /// A square matrix of values in [0, 1] (nil: no value) as colored cells with their numbers; row i,
    /// column j is labels[i] against labels[j]. `counts` (optional) go into each cell's tooltip.
    public static func heatMap(title: String, labels: [String], values: [[Double?]], counts: [[Int]]? = nil, note: String) -> String {
        let labelWidth = Double(min(40, labels.map(\.count).max() ?? 5)) * 7 + 20
        let cell = 56.0, top = 40.0 + labelWidth * 0.72
        let width = labelWidth + Double(labels.count) * cell + 30, height = top + Double(labels.count) * cell + 40
        var body = ""
        for (j, l) in labels.enumerated() {
            let x = labelWidth + (Double(j) + 0.5) * cell
            body += "<text transform=\"translate(\(n(x)),\(n(top - 8))) rotate(-45)\">\(escape(String(l.prefix(40))))</text>\n"
        }
        for (i, l) in labels.enumerated() {
            let y = top + Double(i) * cell
            body += "<text x=\"\(n(labelWidth - 8))\" y=\"\(n(y + cell / 2 + 4))\" text-anchor=\"end\">\(escape(String(l.prefix(40))))</text>\n"
            for j in labels.indices {
                let x = labelWidth + Double(j) * cell
                let v = i < values.count && j < values[i].count ? values[i][j] : nil
                guard let v, v.isFinite else {
                    body += "<rect x=\"\(n(x))\" y=\"\(n(y))\" width=\"\(n(cell - 2))\" height=\"\(n(cell - 2))\" fill=\"#f2f2f2\"/>\n"
                    continue
                }
                // Blue (0) through white (0.5) to red (1).
                let t = max(0, min(1, v))
                let (r, g, b): (Double, Double, Double) = t < 0.5
                    ? (255 - (0.5 - t) * 2 * (255 - 33), 255 - (0.5 - t) * 2 * (255 - 102), 255 - (0.5 - t) * 2 * (255 - 172))
                    : (255 - (t - 0.5) * 2 * (255 - 178), 255 - (t - 0.5) * 2 * (255 - 24), 255 - (t - 0.5) * 2 * (255 - 43))
                let fill = "rgb(\(Int(r)),\(Int(g)),\(Int(b)))"
                let count = counts.map { " (\($0[i][j]) battles)" } ?? ""
                body += "<g class=\"cell\"><title>\(escape(l)) against \(escape(labels[j])): \(fixed(100 * v, 1))%\(count)</title>"
                body += "<rect x=\"\(n(x))\" y=\"\(n(y))\" width=\"\(n(cell - 2))\" height=\"\(n(cell - 2))\" fill=\"\(fill)\"/>"
                body += "<text x=\"\(n(x + cell / 2 - 1))\" y=\"\(n(y + cell / 2 + 4))\" text-anchor=\"middle\" fill=\"\(abs(t - 0.5) > 0.35 ? "#fff" : "#000")\">\(fixed(100 * v, 0))%</text></g>\n"
            }
        }
        body += "<text x=\"\(n(labelWidth))\" y=\"\(n(height - 14))\" fill=\"#555\">\(escape(note))</text>\n"
        return svg(width: max(width, 420), height: height, title: title, body: body)
    }

    /// Horizontal bars of values in [0, maximum], one a label, with an optional reference line (chance).
    public static func bars(title: String, axis: String, rows: [(label: String, value: Double)], maximum: Double, reference: (value: Double, label: String)? = nil) -> String {
        let labelWidth = Double(min(48, rows.map(\.label.count).max() ?? 5)) * 7 + 20
        let plot = 400.0, rowHeight = 18.0, top = 40.0
        let width = labelWidth + plot + 80, bottom = top + Double(rows.count) * rowHeight, height = bottom + 50
        func x(_ v: Double) -> Double { labelWidth + max(0, min(v, maximum)) / maximum * plot }
        var body = ""
        let ts = ticks(0, maximum)
        for t in ts {
            body += "<line x1=\"\(n(x(t)))\" y1=\"\(n(top))\" x2=\"\(n(x(t)))\" y2=\"\(n(bottom))\" stroke=\"#e0e0e0\"/>\n"
            body += "<text x=\"\(n(x(t)))\" y=\"\(n(bottom + 16))\" text-anchor=\"middle\" fill=\"#555\">\(fixed(t, decimals(for: ts)))</text>\n"
        }
        body += "<text x=\"\(n(labelWidth + plot / 2))\" y=\"\(n(bottom + 34))\" text-anchor=\"middle\" fill=\"#333\">\(escape(axis))</text>\n"
        for (i, r) in rows.enumerated() {
            let y = top + Double(i) * rowHeight
            body += "<g class=\"bar\"><title>\(escape(r.label)): \(fixed(r.value, 2))</title>"
            body += "<text x=\"\(n(labelWidth - 8))\" y=\"\(n(y + 13))\" text-anchor=\"end\" font-size=\"11\">\(escape(String(r.label.prefix(48))))</text>"
            body += "<rect x=\"\(n(labelWidth))\" y=\"\(n(y + 2))\" width=\"\(n(x(r.value) - labelWidth))\" height=\"\(n(rowHeight - 4))\" fill=\"\(palette[0])\"/>"
            body += "<text x=\"\(n(x(r.value) + 4))\" y=\"\(n(y + 13))\" font-size=\"11\">\(fixed(r.value, 1))</text></g>\n"
        }
        if let reference {
            body += "<line x1=\"\(n(x(reference.value)))\" y1=\"\(n(top - 4))\" x2=\"\(n(x(reference.value)))\" y2=\"\(n(bottom))\" stroke=\"#d62728\" stroke-dasharray=\"4 3\"/>\n"
            body += "<text x=\"\(n(x(reference.value) + 4))\" y=\"\(n(top - 6))\" fill=\"#d62728\" font-size=\"11\">\(escape(reference.label))</text>\n"
        }
        return svg(width: width, height: height, title: title, body: body)
    }

    /// Curves over a shared x axis: each series a polyline (and dots when it has few points).
    public static func lines(title: String, xAxis: String, yAxis: String, series: [(name: String, points: [(x: Double, y: Double)])]) -> String {
        let left = 70.0, top = 40.0, plotW = 560.0, plotH = 300.0
        let width = left + plotW + 170, height = top + plotH + 60
        let all = series.flatMap(\.points).filter { $0.x.isFinite && $0.y.isFinite }
        let x0 = all.map(\.x).min() ?? 0, x1 = all.map(\.x).max() ?? 1
        let y0 = all.map(\.y).min() ?? 0, y1 = all.map(\.y).max() ?? 1
        let xt = ticks(x0, x1 > x0 ? x1 : x0 + 1), ypad = max((y1 - y0) * 0.05, 1e-3)
        let yt = ticks(y0 - ypad, y1 + ypad)
        let xa = min(xt.first!, x0), xb = max(xt.last!, x1 > x0 ? x1 : x0 + 1)
        let ya = min(yt.first!, y0 - ypad), yb = max(yt.last!, y1 + ypad)
        func px(_ v: Double) -> Double { left + (v - xa) / (xb - xa) * plotW }
        func py(_ v: Double) -> Double { top + plotH - (v - ya) / (yb - ya) * plotH }
        var body = ""
        for t in xt {
            body += "<line x1=\"\(n(px(t)))\" y1=\"\(n(top))\" x2=\"\(n(px(t)))\" y2=\"\(n(top + plotH))\" stroke=\"#eeeeee\"/>"
            body += "<text x=\"\(n(px(t)))\" y=\"\(n(top + plotH + 16))\" text-anchor=\"middle\" fill=\"#555\">\(fixed(t, decimals(for: xt)))</text>\n"
        }
        for t in yt {
            body += "<line x1=\"\(n(left))\" y1=\"\(n(py(t)))\" x2=\"\(n(left + plotW))\" y2=\"\(n(py(t)))\" stroke=\"#eeeeee\"/>"
            body += "<text x=\"\(n(left - 6))\" y=\"\(n(py(t) + 4))\" text-anchor=\"end\" fill=\"#555\">\(fixed(t, decimals(for: yt)))</text>\n"
        }
        body += "<rect x=\"\(n(left))\" y=\"\(n(top))\" width=\"\(n(plotW))\" height=\"\(n(plotH))\" fill=\"none\" stroke=\"#999\"/>\n"
        body += "<text x=\"\(n(left + plotW / 2))\" y=\"\(n(top + plotH + 40))\" text-anchor=\"middle\" fill=\"#333\">\(escape(xAxis))</text>\n"
        body += "<text transform=\"translate(18,\(n(top + plotH / 2))) rotate(-90)\" text-anchor=\"middle\" fill=\"#333\">\(escape(yAxis))</text>\n"
        for (i, s) in series.enumerated() {
            let color = palette[i % palette.count]
            let pts = s.points.filter { $0.x.isFinite && $0.y.isFinite }
            body += "<g class=\"series\"><title>\(escape(s.name))</title>"
            if pts.count > 1 {
                body += "<polyline fill=\"none\" stroke=\"\(color)\" stroke-width=\"1.8\" points=\"\(pts.map { "\(n(px($0.x))),\(n(py($0.y)))" }.joined(separator: " "))\"/>"
            }
            if pts.count <= 60 {
                for p in pts { body += "<circle cx=\"\(n(px(p.x)))\" cy=\"\(n(py(p.y)))\" r=\"3\" fill=\"\(color)\"><title>\(escape(s.name)) at \(fixed(p.x, 0)): \(fixed(p.y, 4))</title></circle>" }
            }
            body += "</g>\n"
            let ly = top + 10 + Double(i) * 18
            body += "<line x1=\"\(n(left + plotW + 14))\" y1=\"\(n(ly))\" x2=\"\(n(left + plotW + 34))\" y2=\"\(n(ly))\" stroke=\"\(color)\" stroke-width=\"3\"/>"
            body += "<text x=\"\(n(left + plotW + 40))\" y=\"\(n(ly + 4))\">\(escape(s.name))</text>\n"
        }
        return svg(width: width, height: height, title: title, body: body)
    }

    /// Several charts stacked into one SVG document.
    public static func stack(_ charts: [String]) -> String {
        var y = 0.0, width = 0.0, body = ""
        for c in charts {
            let w = attribute(c, "width"), h = attribute(c, "height")
            body += "<svg x=\"0\" y=\"\(n(y))\"" + c.drop(while: { $0 != " " })
            y += h + 10
            width = max(width, w)
        }
        return "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"\(n(width))\" height=\"\(n(y))\" viewBox=\"0 0 \(n(width)) \(n(y))\">\n\(body)</svg>\n"
    }

    /// The number in the first ` name="..."` of an SVG's opening tag.
    static func attribute(_ svg: String, _ name: String) -> Double {
        let tag = svg.prefix { $0 != ">" }
        let marker = " \(name)=\""
        var rest = Substring(tag)
        while !rest.isEmpty {
            if rest.hasPrefix(marker) { return Double(rest.dropFirst(marker.count).prefix { $0 != "\"" }) ?? 0 }
            rest = rest.dropFirst()
        }
        return 0
    }

    /// An HTML page of sections, each a heading, its chart and an optional table (rows of cells; the
    /// first row is the header).
    public static func page(title: String, subtitle: String, sections: [(heading: String, svg: String, table: [[String]]?)]) -> String {
        var html = """
            <!DOCTYPE html>
            <html lang="en"><head><meta charset="utf-8"><title>\(escape(title))</title>
            <style>body{font-family:system-ui,sans-serif;margin:2em;color:#222}h1{font-size:1.4em}h2{font-size:1.15em;margin-top:2em}
            table{border-collapse:collapse;margin-top:.8em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}
            th{background:#f4f4f4}td.t,th:first-child{text-align:left}p.sub{color:#555}</style></head>
            <body><h1>\(escape(title))</h1><p class="sub">\(escape(subtitle))</p>

            """
        for s in sections {
            html += "<section><h2>\(escape(s.heading))</h2>\n\(s.svg)"
            if let table = s.table, let header = table.first {
                html += "<table><tr>" + header.map { "<th>\(escape($0))</th>" }.joined() + "</tr>\n"
                for row in table.dropFirst() {
                    // Numbers line up on the right, words on the left.
                    html += "<tr>" + row.map { cell in
                        let numeric = cell.first.map { $0.isNumber || $0 == "[" || $0 == "-" || $0 == "+" } ?? false
                        return numeric ? "<td>\(escape(cell))</td>" : "<td class=\"t\">\(escape(cell))</td>"
                    }.joined() + "</tr>\n"
                }
                html += "</table>\n"
            }
            html += "</section>\n"
        }
        return html + "</body></html>\n"
    }
}
