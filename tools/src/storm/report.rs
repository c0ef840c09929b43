//! `stockgate storm --report DIR`: one HTML page with inline SVG charts
//! (latency distribution and outcomes per strategy) and the comparison
//! table; no scripts, fonts or network needed to open it.

use std::fmt::Write as _;

use super::StormReport;

const COLORS: [&str; 8] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Cumulative latency curves, log-scaled milliseconds on x.
fn latency_chart(reports: &[StormReport]) -> String {
    let (w, h, left, bottom) = (720.0, 360.0, 60.0, 40.0);
    let all = reports.iter().flat_map(|r| r.latencies_ms.iter().copied());
    let lo = all.clone().fold(f64::INFINITY, f64::min).max(0.01);
    let hi = all.fold(0.0_f64, f64::max).max(lo * 10.0);
    let (llo, lhi) = (lo.log10().floor(), hi.log10().ceil());
    let x = |ms: f64| left + (ms.max(lo).log10() - llo) / (lhi - llo) * (w - left - 20.0);
    let y = |q: f64| (h - bottom) - q * (h - bottom - 20.0);
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    for decade in llo as i32..=lhi as i32 {
        let ms = 10f64.powi(decade);
        let _ = write!(
            svg,
            r##"<line x1="{0:.1}" y1="20" x2="{0:.1}" y2="{1:.1}" stroke="#ddd"/><text x="{0:.1}" y="{2:.1}" text-anchor="middle">{ms} ms</text>"##,
            x(ms),
            h - bottom,
            h - bottom + 15.0
        );
    }
    for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
        let _ = write!(
            svg,
            r##"<line x1="{left}" y1="{0:.1}" x2="{1}" y2="{0:.1}" stroke="#eee"/><text x="{2}" y="{3:.1}" text-anchor="end">{4}%</text>"##,
            y(q),
            w - 20.0,
            left - 5.0,
            y(q) + 4.0,
            q * 100.0
        );
    }
    for (n, report) in reports.iter().enumerate() {
        let color = COLORS[n % COLORS.len()];
        let sorted = &report.latencies_ms;
        // At most ~400 points per curve keeps the file small.
        let step = (sorted.len() / 400).max(1);
        let points: Vec<String> = sorted
            .iter()
            .enumerate()
            .step_by(step)
            .chain(sorted.iter().enumerate().next_back())
            .map(|(i, ms)| {
                format!(
                    "{:.1},{:.1}",
                    x(*ms),
                    y((i + 1) as f64 / sorted.len() as f64)
                )
            })
            .collect();
        let _ = write!(
            svg,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/><rect x="{}" y="{}" width="10" height="10" fill="{color}"/><text x="{}" y="{}">{}</text>"#,
            points.join(" "),
            left + 10.0,
            25.0 + 14.0 * n as f64,
            left + 25.0,
            34.0 + 14.0 * n as f64,
            escape(&report.strategy)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// One bar per strategy, split by outcome share.
fn outcome_chart(reports: &[StormReport]) -> String {
    let mut names: Vec<&str> = reports
        .iter()
        .flat_map(|r| r.outcomes.keys().map(String::as_str))
        .collect();
    names.sort_unstable();
    names.dedup();
    let (w, row, label) = (720.0, 24.0, 220.0);
    let h = 40.0 + row * reports.len() as f64 + 16.0 * names.len() as f64;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    for (n, report) in reports.iter().enumerate() {
        let top = 10.0 + row * n as f64;
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" text-anchor="end">{}</text>"#,
            label - 6.0,
            top + 15.0,
            escape(&report.strategy)
        );
        let mut at = label;
        for (k, name) in names.iter().enumerate() {
            let count = report.outcomes.get(*name).copied().unwrap_or(0);
            let width = count as f64 / report.calls.max(1) as f64 * (w - label - 20.0);
            if width > 0.0 {
                let _ = write!(
                    svg,
                    r#"<rect x="{at:.1}" y="{top}" width="{width:.1}" height="{}" fill="{}"><title>{}: {count}</title></rect>"#,
                    row - 6.0,
                    COLORS[k % COLORS.len()],
                    escape(name)
                );
            }
            at += width;
        }
    }
    let legend_top = 20.0 + row * reports.len() as f64;
    for (k, name) in names.iter().enumerate() {
        let top = legend_top + 16.0 * k as f64;
        let _ = write!(
            svg,
            r#"<rect x="{label}" y="{top}" width="10" height="10" fill="{}"/><text x="{}" y="{}">{}</text>"#,
            COLORS[k % COLORS.len()],
            label + 15.0,
            top + 9.0,
            escape(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

/// The whole page.
pub fn html(reports: &[StormReport]) -> String {
    let mut rows = String::new();
    for r in reports {
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.2}</td><td>{:.0}</td><td class=\"{}\">{}</td></tr>",
            escape(&r.strategy),
            r.units_ordered,
            r.oversold,
            r.db_writes.map_or("-".into(), |w| w.to_string()),
            r.calls_per_sec,
            r.p99_ms,
            r.last_answer_ms,
            if r.ok() { "ok" } else { "bad" },
            if r.ok() { "hold" } else { "BROKEN" }
        );
    }
    let first = reports.first();
    format!(
        r#"<!doctype html>
<html><head><meta charset="utf-8"><title>stockgate storm</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:60em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:right}}td:first-child{{text-align:left}}.ok{{color:#2ca02c}}.bad{{color:#d62728;font-weight:bold}}</style>
</head><body>
<h1>stockgate storm</h1>
<p>{calls} calls for {stock} units per strategy, concurrency {concurrency}, {connections} connections.</p>
<table><tr><th>strategy</th><th>orders</th><th>oversold</th><th>db writes attempted</th><th>calls/s</th><th>p99 ms</th><th>last answer ms</th><th>invariants</th></tr>{rows}</table>
<h2>Latency distribution</h2>{latency}
<h2>Outcomes</h2>{outcomes}
</body></html>
"#,
        calls = first.map_or(0, |r| r.calls),
        stock = first.map_or(0, |r| r.options.stock),
        concurrency = first.map_or(0, |r| r.options.concurrency),
        connections = first.map_or(0, |r| r.options.connections),
        latency = latency_chart(reports),
        outcomes = outcome_chart(reports),
    )
}
