//! The hottest SKUs by Reserve calls that reach the stock decision (after
//! load shedding, rate limits and dedup, which answer without reading the
//! SKU; any valid SKU name counts, stocked or not), as a bounded set of
//! series: a SKU
//! label on every call's metric would grow with every SKU ever sold (the
//! reason no other metric carries one). Calls are counted per SKU in two
//! half-windows of [`HALF`]; a scrape shows the top `metrics.hot_skus` over
//! the last one to two halves, and everything else summed under
//! `sku="(other)"` (not a valid SKU, so it clashes with none).
//!
//! Memory is bounded too: at most [`DISTINCT`] SKUs are counted per half;
//! calls for SKUs beyond that go to `(other)` directly.

use std::{
    collections::HashMap,
    fmt::Write as _,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Mutex, OnceLock,
    },
    time::{Duration, Instant},
};

/// The series' name.
pub const NAME: &str = "stockgate_hot_sku_calls";
/// One half of the window a scrape reports.
pub const HALF: Duration = Duration::from_secs(30);
/// SKUs counted one by one per half.
pub const DISTINCT: usize = 4_096;
/// The label value of every SKU outside the top.
pub const OTHER: &str = "(other)";

/// How many SKUs a scrape names; 0 leaves calls uncounted.
static TOP: AtomicUsize = AtomicUsize::new(0);
static COUNTS: OnceLock<Mutex<Counts>> = OnceLock::new();

/// Sets `metrics.hot_skus` (process-wide, as the recorder is).
pub fn configure(top: usize) {
    TOP.store(top, Ordering::Relaxed);
}

/// Counts one Reserve call for `sku`.
pub fn record(sku: &str) {
    if TOP.load(Ordering::Relaxed) == 0 {
        return;
    }
    counts()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .record(sku, Instant::now());
}

/// The series in Prometheus text form (empty when off).
pub fn render() -> String {
    let top = TOP.load(Ordering::Relaxed);
    if top == 0 {
        return String::new();
    }
    counts()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .render(top, Instant::now())
}

fn counts() -> &'static Mutex<Counts> {
    COUNTS.get_or_init(|| Mutex::new(Counts::new(Instant::now())))
}

struct Counts {
    started: Instant,
    current: HashMap<Box<str>, u64>,
    previous: HashMap<Box<str>, u64>,
    current_other: u64,
    previous_other: u64,
}

impl Counts {
    fn new(now: Instant) -> Self {
        Self {
            started: now,
            current: HashMap::new(),
            previous: HashMap::new(),
            current_other: 0,
            previous_other: 0,
        }
    }

    fn rotate(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.started);
        if elapsed < HALF {
            return;
        }
        if elapsed < 2 * HALF {
            self.previous = std::mem::take(&mut self.current);
            self.previous_other = std::mem::take(&mut self.current_other);
            self.started += HALF;
        } else {
            // Quiet for a whole window: nothing in it is recent.
            self.previous.clear();
            self.current.clear();
            self.previous_other = 0;
            self.current_other = 0;
            self.started = now;
        }
    }

    fn record(&mut self, sku: &str, now: Instant) {
        self.rotate(now);
        if let Some(calls) = self.current.get_mut(sku) {
            *calls += 1;
        } else if self.current.len() < DISTINCT {
            self.current.insert(sku.into(), 1);
        } else {
            self.current_other += 1;
        }
    }

    fn render(&mut self, top: usize, now: Instant) -> String {
        self.rotate(now);
        let mut calls: HashMap<&str, u64> = HashMap::with_capacity(self.current.len());
        for (sku, n) in self.current.iter().chain(self.previous.iter()) {
            *calls.entry(sku).or_default() += n;
        }
        let mut ranked: Vec<(&str, u64)> = calls.into_iter().collect();
        ranked.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let rest: u64 = ranked.iter().skip(top).map(|(_, n)| n).sum::<u64>()
            + self.current_other
            + self.previous_other;
        let mut out = format!(
            "# HELP {NAME} Reserve calls per SKU over the last {}-{} s, for the hottest SKUs (metrics.hot_skus); every other SKU summed under sku=\"{OTHER}\".\n# TYPE {NAME} gauge\n",
            HALF.as_secs(),
            2 * HALF.as_secs()
        );
        // SKUs are letters, digits, '.', '_' and '-': nothing to escape.
        for (sku, n) in ranked.iter().take(top) {
            let _ = writeln!(out, "{NAME}{{sku=\"{sku}\"}} {n}");
        }
        let _ = writeln!(out, "{NAME}{{sku=\"{OTHER}\"}} {rest}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().filter(|l| !l.starts_with('#')).collect()
    }

    #[test]
    fn the_top_is_named_and_the_rest_summed() {
        let t0 = Instant::now();
        let mut counts = Counts::new(t0);
        for (sku, n) in [("A", 5), ("B", 9), ("C", 1), ("D", 2)] {
            for _ in 0..n {
                counts.record(sku, t0);
            }
        }
        assert_eq!(
            lines(&counts.render(2, t0)),
            [
                "stockgate_hot_sku_calls{sku=\"B\"} 9",
                "stockgate_hot_sku_calls{sku=\"A\"} 5",
                "stockgate_hot_sku_calls{sku=\"(other)\"} 3",
            ]
        );
    }

    #[test]
    fn the_window_slides_by_halves_and_forgets_a_quiet_spell() {
        let t0 = Instant::now();
        let mut counts = Counts::new(t0);
        counts.record("OLD", t0);
        counts.record("NEW", t0 + HALF + Duration::from_secs(1));
        counts.record("NEW", t0 + HALF + Duration::from_secs(2));
        // Both halves count.
        let both = counts.render(5, t0 + HALF + Duration::from_secs(3));
        assert!(both.contains("{sku=\"OLD\"} 1"), "{both}");
        assert!(both.contains("{sku=\"NEW\"} 2"), "{both}");
        // A half later, OLD's half has left the window.
        let later = counts.render(5, t0 + 2 * HALF + Duration::from_secs(1));
        assert!(!later.contains("OLD"), "{later}");
        assert!(later.contains("{sku=\"NEW\"} 2"), "{later}");
        // Two quiet windows: nothing named, the rest 0.
        let quiet = counts.render(5, t0 + 5 * HALF);
        assert_eq!(
            lines(&quiet),
            ["stockgate_hot_sku_calls{sku=\"(other)\"} 0"]
        );
    }

    #[test]
    fn memory_is_bounded_by_distinct_skus_per_half() {
        let t0 = Instant::now();
        let mut counts = Counts::new(t0);
        for i in 0..DISTINCT + 100 {
            counts.record(&format!("S{i}"), t0);
        }
        counts.record("S0", t0);
        assert_eq!(counts.current.len(), DISTINCT);
        assert_eq!(counts.current_other, 100);
        let text = counts.render(1, t0);
        assert_eq!(
            lines(&text),
            [
                "stockgate_hot_sku_calls{sku=\"S0\"} 2",
                &format!(
                    "stockgate_hot_sku_calls{{sku=\"(other)\"}} {}",
                    DISTINCT + 99
                ),
            ]
        );
    }
}
