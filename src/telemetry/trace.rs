//! Distributed tracing with OpenTelemetry, exported over OTLP/gRPC. Off
//! unless `telemetry.otlp_endpoint` is set; off, every helper here returns
//! at one relaxed load and no span is made.
//!
//! One buyer's trace: the caller's `traceparent` (W3C) continues into the
//! server span of the call, with a child span per layer decision (rate
//! limit, dedup, shed, gate, queue, database), the queue publish and its
//! confirm, and the request-path commit. The context rides in the AMQP
//! message's `traceparent` header; the processor's batch is a trace of its
//! own linked to every order it holds, and each order gets a span in its
//! buyer's trace, linked back to the batch, covering the commit it was part
//! of, with how long it waited in the queue.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
};

use chrono::NaiveDateTime;
use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
    Context,
};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracerProvider},
    Resource,
};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::config::TelemetryConfig;

static ON: AtomicBool = AtomicBool::new(false);

/// The `tracing` target of every span made for tracing: the exporter
/// takes only these, and logs name them in their span lists.
pub const TARGET: &str = "stockgate::trace";

/// The W3C trace-context header, in gRPC metadata and AMQP headers alike.
pub const TRACEPARENT: &str = "traceparent";

/// Whether spans are made and exported.
pub fn enabled() -> bool {
    ON.load(Ordering::Relaxed)
}

/// The exporting provider, flushed when the process stops.
pub struct Tracing {
    pub(super) provider: SdkTracerProvider,
}

impl Tracing {
    /// Exports what is buffered, then stops exporting.
    pub fn shutdown(self) {
        ON.store(false, Ordering::Relaxed);
        if let Err(err) = self.provider.shutdown() {
            tracing::warn!(error = %err, "spans not all exported at shutdown");
        }
    }
}

/// The provider for `config`, or `None` when tracing is off.
pub(super) fn provider(config: &TelemetryConfig) -> anyhow::Result<Option<SdkTracerProvider>> {
    if config.otlp_endpoint.is_empty() {
        return Ok(None);
    }
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(&config.otlp_endpoint);
    if config.otlp_endpoint.starts_with("https://") {
        exporter =
            exporter.with_tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots());
    }
    let exporter = exporter.build()?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            config.sampling_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name(config.service_name.clone())
                .build(),
        )
        .build();
    Ok(Some(provider))
}

/// Drops every batch it is given.
#[derive(Debug)]
struct Discard;

impl opentelemetry_sdk::trace::SpanExporter for Discard {
    async fn export(
        &self,
        _batch: Vec<opentelemetry_sdk::trace::SpanData>,
    ) -> opentelemetry_sdk::error::OTelSdkResult {
        Ok(())
    }
}

/// A provider that samples every trace and batches every span as an
/// exporting one does, then drops them: what tracing costs the service
/// without a collector's share, for benchmarks.
pub(super) fn discarding() -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_batch_exporter(Discard)
        .with_sampler(Sampler::AlwaysOn)
        .build()
}

/// Stops or resumes making spans while the exporter stays installed, so a
/// benchmark compares the two in one run.
pub fn set_active(active: bool) {
    ON.store(active, Ordering::Relaxed);
}

/// The layer that turns [`TARGET`] spans into OpenTelemetry spans.
pub(super) fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    use tracing_subscriber::Layer as _;
    ON.store(true, Ordering::Relaxed);
    tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("stockgate"))
        .with_filter(
            tracing_subscriber::filter::Targets::new().with_target(TARGET, tracing::Level::TRACE),
        )
}

/// A span for one step of the current trace (`gate.reserve`,
/// `queue.publish`, `db.commit`, …); none when tracing is off.
pub fn span(name: &'static str) -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(target: TARGET, "step", otel.name = name)
}

/// `future` in the current span, for a task spawned from a traced call;
/// as it is when tracing is off.
pub fn follow<F: std::future::Future>(
    future: F,
) -> futures::future::Either<F, tracing::instrument::Instrumented<F>> {
    use tracing::Instrument;
    if enabled() {
        futures::future::Either::Right(future.in_current_span())
    } else {
        futures::future::Either::Left(future)
    }
}

/// Marks a layer's decision in the current trace: a span named after the
/// layer, with the decision. Decisions outside a traced call (the
/// listener's, the sweeper's) start no trace of their own.
pub fn decided(layer: &'static str, decision: &'static str) {
    if enabled() && !Span::current().is_none() {
        let _marked =
            tracing::info_span!(target: TARGET, "decision", otel.name = layer, decision).entered();
    }
}

/// Writes the span's trace and span ids into its `trace_id` and `span_id`
/// fields, which the logs print.
fn record_ids(span: &Span) {
    let context = span.context();
    let ids = context.span().span_context().clone();
    // An unsampled span is never exported: logs naming it would point at
    // a trace nobody can find.
    if ids.is_valid() && ids.is_sampled() {
        span.record("trace_id", ids.trace_id().to_string());
        span.record("span_id", ids.span_id().to_string());
    }
}

struct Headers<'a>(&'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The server span of one call, continuing the caller's `traceparent` if
/// it sent one; `None` when tracing is off.
pub fn rpc_span(name: &str, headers: &http::HeaderMap) -> Option<Span> {
    if !enabled() {
        return None;
    }
    let span = tracing::info_span!(
        target: TARGET,
        "rpc",
        otel.name = name,
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.grpc.status_code = tracing::field::Empty,
        otel.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    let parent = TraceContextPropagator::new().extract(&Headers(headers));
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    record_ids(&span);
    Some(span)
}

/// The current span's context as a `traceparent` value, to travel with an
/// order; `None` when tracing is off or nothing is being traced.
pub fn current_traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&Span::current().context(), &mut carrier);
    carrier.remove(TRACEPARENT)
}

fn context_of(traceparent: &str) -> Context {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    TraceContextPropagator::new().extract(&carrier)
}

/// One order of a batch, for tracing: its `traceparent` and when it was
/// made.
pub struct Traced<'a> {
    pub traceparent: Option<&'a str>,
    pub created_at: NaiveDateTime,
}

/// The processor's spans for one batch: the batch's own (a new trace,
/// linked to every traced order), and one per traced order in its buyer's
/// trace, linked to the batch, with its wait in the queue. Drop them when
/// the batch is settled. `None` when tracing is off.
pub fn batch_spans<'a>(orders: impl Iterator<Item = Traced<'a>>) -> Option<(Span, Vec<Span>)> {
    if !enabled() {
        return None;
    }
    let batch = tracing::info_span!(
        target: TARGET,
        parent: None,
        "batch",
        otel.name = "processor.batch",
        orders = tracing::field::Empty,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    let mut count = 0;
    let mut order_spans = Vec::new();
    let now = crate::domain::now();
    for order in orders {
        count += 1;
        let Some(traceparent) = order.traceparent else {
            continue;
        };
        let parent = context_of(traceparent);
        let ids = parent.span().span_context().clone();
        if !ids.is_valid() {
            continue;
        }
        batch.add_link(ids);
        let waited = (now - order.created_at).num_milliseconds().max(0);
        let span = tracing::info_span!(
            target: TARGET,
            parent: None,
            "order",
            otel.name = "processor.order",
            queue.wait_ms = waited,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        let _ = span.set_parent(parent);
        record_ids(&span);
        order_spans.push(span);
    }
    batch.record("orders", count);
    record_ids(&batch);
    let batch_ids = batch.context().span().span_context().clone();
    for span in &order_spans {
        span.add_link(batch_ids.clone());
    }
    Some((batch, order_spans))
}
