//! Distributed tracing, seen by a real collector: a gRPC server we did not
//! write (Python grpcio with the `opentelemetry-proto` package's
//! `TraceService/Export`) receives what two real `stockgate` processes, an
//! API replica and an order processor, export over OTLP.

use std::{
    collections::HashSet,
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use serde_json::Value;
use stockgate::{
    config::{LogFormat, Role},
    domain::{ReservationId, ReservationState},
    pb::{ReserveOutcome, ReserveRequest},
};
use tonic::Request;

use crate::harness::{
    config_for, connect, open_store, python_grpc, python_packages, BinaryServer, Profile, ROOT,
};

/// The caller's trace: W3C ids a caller's own tracer would have made.
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";

struct Receiver {
    child: Child,
    port: u16,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Self {
        let grpc = python_grpc();
        // Its stubs only: protobuf comes with grpcio's folder.
        let otlp = python_packages(
            "python-otlp",
            "opentelemetry.proto",
            &["--no-deps", "opentelemetry-proto==1.45.2"],
        );
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("spans.jsonl");
        let mut child = Command::new("python3")
            .arg(format!("{ROOT}/clients/python/otlp_receiver.py"))
            .arg("--out")
            .arg(&out)
            .env("PYTHONPATH", format!("{otlp}:{grpc}"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line.trim().parse().expect("the receiver prints its port");
        Self {
            child,
            port,
            out,
            _dir: dir,
        }
    }

    fn spans(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    }

    /// Waits until `done` holds for what has arrived.
    async fn wait_for(&self, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        for _ in 0..100 {
            let spans = self.spans();
            if done(&spans) {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{what}: received {:#?}", self.spans());
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn named<'a>(spans: &'a [Value], name: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["name"] == name).collect()
}

fn one<'a>(spans: &'a [Value], name: &str) -> &'a Value {
    let found = named(spans, name);
    assert_eq!(found.len(), 1, "{name} in {spans:#?}");
    found[0]
}

async fn reserve_traced(addr: std::net::SocketAddr, sku: &str, user: &str) -> ReservationId {
    let mut client =
        stockgate::pb::inventory_service_client::InventoryServiceClient::new(connect(addr).await);
    let mut request = Request::new(ReserveRequest {
        sku: sku.into(),
        quantity: 1,
        ..Default::default()
    });
    let metadata = request.metadata_mut();
    metadata.insert("x-user-id", user.parse().unwrap());
    metadata.insert("idempotency-key", format!("key-{user}").parse().unwrap());
    metadata.insert(
        "traceparent",
        format!("00-{TRACE}-{CALLER_SPAN}-01").parse().unwrap(),
    );
    let answer = client.reserve(request).await.unwrap().into_inner();
    assert_eq!(answer.outcome(), ReserveOutcome::Queued);
    ReservationId::parse(&answer.reservation.unwrap().reservation_id).unwrap()
}

fn log_lines(path: &std::path::Path, message: &str) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| line["message"] == message)
        .collect()
}

/// Whether a JSON log line's span list carries `trace_id`.
fn logged_in_trace(line: &Value, trace_id: &str) -> bool {
    line["spans"]
        .as_array()
        .is_some_and(|spans| spans.iter().any(|s| s["trace_id"] == trace_id))
}

/// One Reserve, traced by its caller: the API replica continues the
/// caller's trace (server span, each layer's decision: rate limit, dedup,
/// gate, queue; the gate's call and the publish with its confirm); the processor, another process reading the context from the
/// AMQP headers, adds the order's span to that trace, linked to the batch
/// commit, whose own trace links back to the order; both processes' JSON
/// logs name the trace. With tracing off, nothing reaches the collector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reserve_is_one_trace_from_the_caller_through_the_queue_to_the_commit() {
    let receiver = Receiver::start();
    let (mut config, _db, _data) = config_for(Profile::Rabbit).await;
    config.metrics.listen = String::new();
    config.log.format = LogFormat::Json;
    config.telemetry.otlp_endpoint = format!("http://127.0.0.1:{}", receiver.port);
    // Every layer on, so each has a decision to show.
    config.layers.dedup.enabled = true;
    let limits = &mut config.layers.rate_limit;
    limits.enabled = true;
    limits.per_user_burst = 10;
    limits.global_per_sec = 1_000;
    limits.global_burst = 1_000;
    let logs = tempfile::tempdir().unwrap();
    let env = [
        ("RUST_LOG", "stockgate=debug"),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let start = |role: Role, name: &str| {
        let mut config = config.clone();
        config.server.role = role;
        config.telemetry.service_name = format!("stockgate-{name}");
        let log = std::fs::File::create(logs.path().join(format!("{name}.log"))).unwrap();
        BinaryServer::start_logging(config, &env, log)
    };
    let mut api = start(Role::Api, "api").await;
    let mut processor = start(Role::Processor, "processor").await;
    api.wait_serving().await;
    api.set_stock("TRACED", 5, 0).await;
    let id = reserve_traced(api.addr, "TRACED", "tess").await;
    let store = open_store(&config);
    for _ in 0..200 {
        let row = store.reservation(&id).await.unwrap();
        if row.is_some_and(|r| r.state == ReservationState::Held) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SIGTERM flushes what each process still buffers.
    assert!(api.terminate().success());
    assert!(processor.terminate().success());

    let spans = receiver
        .wait_for("the order's span in the caller's trace", |spans| {
            spans
                .iter()
                .any(|s| s["name"] == "processor.order" && s["trace_id"] == TRACE)
        })
        .await;
    let ours: Vec<Value> = spans
        .iter()
        .filter(|s| s["trace_id"] == TRACE)
        .cloned()
        .collect();
    let server = one(&ours, "stockgate.v1.InventoryService/Reserve");
    assert_eq!(server["parent_span_id"], CALLER_SPAN, "{server:#}");
    assert_eq!(server["kind"], 2, "a server span: {server:#}");
    assert_eq!(server["service"], "stockgate-api");
    assert_eq!(
        server["attributes"]["rpc.grpc.status_code"], 0,
        "{server:#}"
    );
    // Every span of the trace hangs off the caller's span, in one tree.
    let ids: HashSet<&str> = ours
        .iter()
        .map(|s| s["span_id"].as_str().unwrap())
        .collect();
    for span in &ours {
        let parent = span["parent_span_id"].as_str().unwrap();
        assert!(
            parent == CALLER_SPAN || ids.contains(parent),
            "{span:#} has no parent in the trace"
        );
    }
    for (layer, decision) in [
        ("rate_limit", "admitted"),
        ("dedup", "first"),
        ("gate", "admitted"),
        ("queue", "queued"),
    ] {
        let span = one(&ours, layer);
        assert_eq!(span["attributes"]["decision"], decision, "{span:#}");
    }
    one(&ours, "gate.reserve");
    let publish = one(&ours, "queue.publish");
    // The processor's half, in the same trace: a child of the publish.
    let order = one(&ours, "processor.order");
    assert_eq!(order["service"], "stockgate-processor");
    assert_eq!(order["parent_span_id"], publish["span_id"], "{order:#}");
    assert!(
        order["attributes"]["queue.wait_ms"].as_i64().is_some(),
        "{order:#}"
    );
    // ... linked to the batch commit, which links back.
    let batch = one(&spans, "processor.batch");
    assert_ne!(batch["trace_id"], TRACE);
    assert_eq!(
        order["links"][0],
        serde_json::json!({"trace_id": batch["trace_id"], "span_id": batch["span_id"]}),
        "{order:#}"
    );
    assert!(
        batch["links"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["trace_id"] == TRACE && l["span_id"] == publish["span_id"]),
        "{batch:#}"
    );
    let batch_trace: Vec<&Value> = spans
        .iter()
        .filter(|s| s["trace_id"] == batch["trace_id"])
        .collect();
    let commit = batch_trace
        .iter()
        .find(|s| s["name"] == "db.commit")
        .expect("the batch's commit span");
    assert_eq!(commit["parent_span_id"], batch["span_id"]);
    assert!(
        batch_trace
            .iter()
            .any(|s| s["name"] == "db" && s["attributes"]["decision"] == "committed"),
        "{batch_trace:#?}"
    );

    // The JSON logs name the trace each line belongs to.
    let queued = log_lines(&logs.path().join("api.log"), "order queued");
    assert!(
        queued.iter().any(|line| logged_in_trace(line, TRACE)),
        "{queued:#?}"
    );
    let committed = log_lines(&logs.path().join("processor.log"), "batch committed");
    let batch_trace_id = batch["trace_id"].as_str().unwrap();
    assert!(
        committed
            .iter()
            .any(|line| logged_in_trace(line, batch_trace_id)),
        "{committed:#?}"
    );

    // Tracing off (no endpoint; the SDK's own variable does not turn it
    // on): the same call sends nothing.
    let before = receiver.spans().len();
    let mut quiet = config.clone();
    quiet.telemetry.otlp_endpoint = String::new();
    let endpoint = format!("http://127.0.0.1:{}", receiver.port);
    let mut api = BinaryServer::start_logging(
        quiet,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100"),
        ],
        Stdio::null(),
    )
    .await;
    api.wait_serving().await;
    reserve_traced(api.addr, "TRACED", "ursula").await;
    assert!(api.terminate().success());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.spans().len(),
        before,
        "spans sent with tracing off"
    );
}
