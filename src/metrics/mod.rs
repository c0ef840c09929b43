//! Prometheus metrics: the recorder, the `/metrics` endpoint, the per-RPC
//! tower layer, and the names every layer records under. Names follow
//! Prometheus conventions; every label has a fixed, small set of values
//! (no SKU or user ids), except `caller`: calling services' certificate
//! identities, which the operators' CA bounds (and
//! `middleware::callers::MAX_CALLERS` caps), and `sku` on
//! [`hot_skus::NAME`] alone, which names only the hottest few.
//!
//! The recorder is process-wide (the `metrics` facade), so two servers in
//! one process (tests) share one set of figures.

pub mod hot_skus;

use std::{
    convert::Infallible,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::future::BoxFuture;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tower::{Layer, Service};

use crate::{
    config::{DbCheckMode, GateFailureMode},
    domain::switches::Layers,
};

/// Decisions per layer: `layer` and `decision` values are the constants
/// passed to [`decision`].
pub const DECISIONS: &str = "stockgate_layer_decisions_total";

/// Every metric this service exports; dashboards and alerts may use only
/// these (a test checks both against this list and against a scrape).
pub const NAMES: &[&str] = &[
    "stockgate_build_info",
    "stockgate_grpc_requests_total",
    "stockgate_grpc_request_duration_seconds",
    DECISIONS,
    "stockgate_layer_enabled",
    "stockgate_switches_revision",
    "stockgate_switch_changes_total",
    "stockgate_admin_auth_failures_total",
    "stockgate_caller_refusals_total",
    "stockgate_in_flight_calls",
    "stockgate_open_watches",
    "stockgate_watch_feeds",
    "stockgate_queue_pending",
    "stockgate_queue_depth",
    "stockgate_processor_lag_seconds",
    "stockgate_processor_batch_size",
    "stockgate_processor_commit_duration_seconds",
    "stockgate_processor_partitions",
    "stockgate_gate_drift_units",
    "stockgate_gate_drift_skus",
    "stockgate_ready",
    "stockgate_dlq_messages",
    "stockgate_dlq_set_aside_total",
    "stockgate_dlq_operator_messages_total",
    hot_skus::NAME,
];

/// A series name without its histogram suffix (`_bucket`, `_sum`, `_count`).
pub fn base_name(series: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|suffix| series.strip_suffix(suffix))
        .filter(|base| NAMES.contains(base))
        .unwrap_or(series)
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let latency = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0,
            ];
            let sizes = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("stockgate_processor_batch_size".into()),
                        &sizes,
                    )
                })
                .expect("bucket lists are non-empty")
                .install_recorder()
                .expect("no other metrics recorder is installed");
            gauge!(
                "stockgate_build_info",
                "version" => env!("CARGO_PKG_VERSION"),
                "revision" => crate::GIT_REVISION
            )
            .set(1.0);
            handle
        })
        .clone()
}

/// Counts one decision of one layer.
pub fn decision(layer: &'static str, decision: &'static str) {
    counter!(DECISIONS, "layer" => layer, "decision" => decision).increment(1);
    crate::telemetry::trace::decided(layer, decision);
}

/// A call refused because its calling service used up its share of
/// `layer`'s budget ("shed" or "rate_limit").
pub fn caller_refused(layer: &'static str, caller: &str) {
    counter!("stockgate_caller_refusals_total", "layer" => layer, "caller" => caller.to_owned())
        .increment(1);
}

/// An admin call refused for a missing or wrong credential.
pub fn admin_auth_failure() {
    counter!("stockgate_admin_auth_failures_total").increment(1);
}

/// The processor set a message aside in the dead-letter queue: `cause`
/// is `given_up` (the database kept refusing the order) or `unreadable`.
pub fn set_aside(cause: &'static str) {
    counter!("stockgate_dlq_set_aside_total", "cause" => cause).increment(1);
}

/// Messages an operator moved out of the dead-letter queue: `action` is
/// `redrive` or `purge`.
pub fn dead_letters_moved(action: &'static str, messages: usize) {
    counter!("stockgate_dlq_operator_messages_total", "action" => action)
        .increment(messages as u64);
}

/// A switch change: `applied`, `forced` or `refused`.
pub fn switch_change(outcome: &'static str) {
    counter!("stockgate_switch_changes_total", "outcome" => outcome).increment(1);
}

/// One gauge per switch, and the revision, after switches were applied.
pub fn layers(layers: &Layers, revision: u64) {
    let on = |b: bool| if b { 1.0 } else { 0.0 };
    let set = |layer: &'static str, value: f64| {
        gauge!("stockgate_layer_enabled", "layer" => layer).set(value);
    };
    set("rate_limit", on(layers.rate_limit));
    set("rate_limit_shadow", on(layers.rate_limit_shadow));
    set("dedup", on(layers.dedup));
    set("gate", on(layers.gate));
    set(
        "gate_bypass",
        on(layers.gate_failure == GateFailureMode::Bypass),
    );
    set("queue", on(layers.queue));
    set("db_check", on(layers.db_check != DbCheckMode::Off));
    set(
        "db_check_pessimistic",
        on(layers.db_check == DbCheckMode::Pessimistic),
    );
    gauge!("stockgate_switches_revision").set(revision as f64);
}

/// Scrapers connected at once; a scrape is one short request.
const MAX_SCRAPERS: usize = 64;
/// A scrape connection's whole life: headers within a few seconds, and one
/// request per connection, so a caller cannot park partial requests here.
const SCRAPE_HEADERS_WITHIN: Duration = Duration::from_secs(5);
const SCRAPE_CONNECTION_LIFE: Duration = Duration::from_secs(30);

/// Serves `GET /metrics` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    handle: PrometheusHandle,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_SCRAPERS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    tracing::warn!(error = %err, "metrics listener accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = async { let _ = shutdown.wait_for(|stop| *stop).await; } => return,
        };
        let handle = handle.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let handle = handle.clone();
                async move { Ok::<_, Infallible>(respond(&request, &handle)) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(SCRAPE_HEADERS_WITHIN)
                .keep_alive(false)
                .serve_connection(io, service);
            let _ = tokio::time::timeout(SCRAPE_CONNECTION_LIFE, connection).await;
            drop(slot);
        });
    }
}

fn respond<B>(
    request: &http::Request<B>,
    handle: &PrometheusHandle,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&http::Method::GET, "/metrics") => (
            http::StatusCode::OK,
            "text/plain; version=0.0.4",
            handle.render() + &hot_skus::render(),
        ),
        (_, "/metrics") => (
            http::StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        ),
        _ => (
            http::StatusCode::NOT_FOUND,
            "text/plain",
            "see /metrics\n".to_owned(),
        ),
    };
    http::Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .body(http_body_util::Full::new(bytes::Bytes::from(body)))
        .expect("a valid response")
}

/// Drains histogram buffers between scrapes so they stay bounded.
pub fn upkeep() {
    if let Some(handle) = HANDLE.get() {
        handle.run_upkeep();
    }
}

/// The outermost layer: counts and times every call by service, method
/// and gRPC status code. Unknown paths are counted as `other`, so a caller
/// cannot grow the label set.
#[derive(Clone, Default)]
pub struct GrpcMetricsLayer;

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

/// The services we serve, by path prefix; the method is kept only for these.
const SERVICES: [&str; 5] = [
    "stockgate.v1.InventoryService",
    "stockgate.v1.AdminService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The gRPC status of an answer as its headers carry it: a unary error
/// travels there (trailers-only answer); a success's status comes in the
/// trailers, after the headers, so its absence here means OK (0).
pub(crate) fn header_status<B>(response: &http::Response<B>) -> i32 {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0)
}

pub(crate) fn labels(path: &str) -> (&'static str, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (service, method) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    match SERVICES.iter().find(|known| **known == service) {
        // Method names are bounded by the service's own definition; an
        // unknown one under a known service is answered UNIMPLEMENTED and
        // still a short, caller-chosen string, so cap its length.
        Some(known) if method.len() <= 64 && !method.contains('/') => (known, method.to_owned()),
        _ => ("other", "other".to_owned()),
    }
}

impl<S, B> Service<http::Request<B>> for GrpcMetrics<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>> + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let (service, method) = labels(request.uri().path());
        let started = Instant::now();
        let future = self.inner.call(request);
        Box::pin(async move {
            let result = future.await;
            let code = match &result {
                Ok(response) => code_name(header_status(response)),
                Err(_) => "UNKNOWN",
            };
            histogram!(
                "stockgate_grpc_request_duration_seconds",
                "service" => service,
                "method" => method.clone(),
                "code" => code
            )
            .record(started.elapsed().as_secs_f64());
            counter!(
                "stockgate_grpc_requests_total",
                "service" => service,
                "method" => method,
                "code" => code
            )
            .increment(1);
            result
        })
    }
}

/// The canonical upper-case name of a gRPC status code.
pub fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "UNKNOWN",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_stay_bounded() {
        assert_eq!(
            labels("/stockgate.v1.InventoryService/Reserve"),
            ("stockgate.v1.InventoryService", "Reserve".to_owned())
        );
        assert_eq!(labels("/evil.Service/x"), ("other", "other".to_owned()));
        assert_eq!(
            labels(&format!("/grpc.health.v1.Health/{}", "x".repeat(65))),
            ("other", "other".to_owned())
        );
        assert_eq!(labels("/"), ("other", "other".to_owned()));
    }
}
