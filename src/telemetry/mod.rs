//! Structured logs through `tracing` (text for people, JSON for shippers),
//! and distributed tracing ([`trace`]) when an OTLP endpoint is set.

pub mod layer;
pub mod trace;

use tracing_subscriber::{fmt, layer::SubscriberExt, util::SubscriberInitExt, EnvFilter, Layer};

pub use trace::Tracing;

use crate::config::{LogConfig, LogFormat, TelemetryConfig};

/// Installs the global subscriber: logs (`RUST_LOG` overrides
/// `log.filter`) and, with `telemetry.otlp_endpoint` set, the span
/// exporter, returned so that the caller flushes it on the way out.
pub fn init(log: &LogConfig, telemetry: &TelemetryConfig) -> anyhow::Result<Option<Tracing>> {
    let provider = trace::provider(telemetry)?;
    install(log, provider.as_ref());
    Ok(provider.map(|provider| Tracing { provider }))
}

/// As [`init`], with tracing on but every span dropped instead of
/// exported (see [`trace::set_active`]): for measuring what tracing costs.
pub fn init_discarding(log: &LogConfig) -> Tracing {
    let provider = trace::discarding();
    install(log, Some(&provider));
    Tracing { provider }
}

fn install(log: &LogConfig, provider: Option<&opentelemetry_sdk::trace::SdkTracerProvider>) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.filter));
    let logs = match log.format {
        LogFormat::Text => fmt::layer().with_target(false).boxed(),
        // Inside a traced call, the span list carries its trace_id and span_id.
        LogFormat::Json => fmt::layer()
            .json()
            .flatten_event(true)
            .with_target(false)
            .boxed(),
    };
    let spans = provider.map(trace::layer);
    // A second init (tests) keeps the first subscriber.
    let _ = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(spans)
        .try_init();
}

/// Log sampling for events a caller can cause at will (refusals, a store
/// that is down under a flood): the first [`Sampled::PER_WINDOW`] in each
/// ten-second window are logged, the rest only counted, and the next
/// logged one says how many were left out. Metrics count every one.
pub struct Sampled {
    window: std::sync::atomic::AtomicU64,
    seen: std::sync::atomic::AtomicU64,
    left_out: std::sync::atomic::AtomicU64,
}

impl Sampled {
    pub const PER_WINDOW: u64 = 5;
    const WINDOW_SECS: u64 = 10;

    pub const fn new() -> Self {
        use std::sync::atomic::AtomicU64;
        Self {
            window: AtomicU64::new(0),
            seen: AtomicU64::new(0),
            left_out: AtomicU64::new(0),
        }
    }

    /// `Some(left_out)`: log this one, mentioning `left_out` earlier ones
    /// that were not; `None`: count it only.
    pub fn admit(&self) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() / Self::WINDOW_SECS);
        if self.window.swap(now, Relaxed) != now {
            self.seen.store(0, Relaxed);
        }
        if self.seen.fetch_add(1, Relaxed) < Self::PER_WINDOW {
            Some(self.left_out.swap(0, Relaxed))
        } else {
            self.left_out.fetch_add(1, Relaxed);
            None
        }
    }
}

impl Default for Sampled {
    fn default() -> Self {
        Self::new()
    }
}

/// Caller-supplied text for a log line: at most `max` characters, marked
/// when cut, so a 1 MB header cannot become a 1 MB log line.
pub fn truncated(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max) {
        None => std::borrow::Cow::Borrowed(text),
        Some((cut, _)) => format!("{}…({} bytes)", &text[..cut], text.len()).into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_logs_a_few_and_counts_the_rest() {
        let sampled = Sampled::new();
        let logged: Vec<_> = (0..1_000).filter_map(|_| sampled.admit()).collect();
        // A window boundary may fall inside the loop: at most two windows.
        assert!(
            (Sampled::PER_WINDOW..=2 * Sampled::PER_WINDOW).contains(&(logged.len() as u64)),
            "{logged:?}"
        );
        assert_eq!(truncated("abc", 5), "abc");
        assert_eq!(truncated(&"x".repeat(1_000), 4), "xxxx…(1000 bytes)");
    }
}
