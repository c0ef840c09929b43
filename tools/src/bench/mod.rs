//! `stockgate bench`: Reserve throughput and latency next to same-run
//! references, so ratios stay comparable on a noisy machine.
//!
//! In one run, at one concurrency, it measures: raw `redis-benchmark`
//! running the gate's own reserve script (EVALSHA) against the same Redis;
//! a no-op RPC (grpc.health.v1 Check) on the same server, the transport's
//! ceiling; and Reserve with every available layer on, for a SKU with stock
//! and for a sold-out SKU. The server runs in this process on 127.0.0.1:0
//! with the backends given; the load shares the machine with it, as the
//! reference loads do.

pub mod cart;
pub mod cluster;
pub mod cpu;
pub mod middleware;
pub mod queue;
pub mod sale;
mod sides;
pub mod storm;
pub mod tls;

use std::{
    process::Command,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use tokio::sync::oneshot;
use tonic::{
    transport::{Channel, Endpoint},
    Request,
};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

use self::cpu::CpuMeter;
use stockgate::{
    config::Config,
    pb::{
        admin_service_client::AdminServiceClient, inventory_service_client::InventoryServiceClient,
        ReserveOutcome, ReserveRequest, SetStockRequest,
    },
};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Calls per measurement.
    pub requests: usize,
    /// Calls in flight at once (also redis-benchmark's `-c`).
    pub concurrency: usize,
    /// HTTP/2 connections the calls are spread over.
    pub connections: usize,
    /// Rounds of every measurement, interleaved; the median round is
    /// reported, so a burst of noise from elsewhere moves one round only.
    pub rounds: usize,
    /// The Redis gate; also where redis-benchmark runs the script.
    pub redis_url: String,
    /// The store: `embedded` or a postgres:// URL.
    pub store: String,
    /// The queue: `embedded` or an amqp:// URL (needs a postgres store).
    pub queue: String,
    /// Also measure the sold-out path with every call traced (the process
    /// must have been started with [`stockgate::telemetry::init_discarding`]).
    pub tracing: bool,
    /// Order queues through RabbitMQ (`rabbitmq.partitions`; 1: one queue).
    pub partitions: u16,
}

/// One measured line.
#[derive(Debug, Clone)]
pub struct Measured {
    pub name: String,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub failures: usize,
    /// CPU per call, from just before the calls until their work was done
    /// (for Reserve with stock: until the processor drained the queue).
    pub cpu: Option<cpu::CpuPerCall>,
}

pub async fn run(options: BenchOptions) -> anyhow::Result<Vec<Measured>> {
    let prefix = format!("sg-bench-{}", uuid::Uuid::now_v7().simple());
    let dir = tempfile_dir()?;
    let mut config = server_config(&options, &prefix, &dir.join("bench.db"))?;
    config.layers.queue.capacity = options.requests.max(1) * 2;
    config.validate()?;

    // Through RabbitMQ, a second server beside the first publishes each
    // order as a message of its own, as before batching, so one run shows
    // what batching changes. Same database, gate and queue: whichever
    // processor is the active consumer commits both servers' orders.
    let unbatched = if options.queue.starts_with("amqp://") {
        let mut config = config.clone();
        config.rabbitmq.publish_batch_max = 1;
        // Publishing only: a second processor would idle as the standby
        // and still cost this process's CPU column.
        config.server.role = stockgate::config::Role::Api;
        Some(BenchServer::start(config, options.connections).await?)
    } else {
        None
    };
    let BenchServer {
        channels,
        stop,
        server,
        ..
    } = BenchServer::start(config, options.connections).await?;

    let mut admin = AdminServiceClient::new(channels[0].clone());
    stock_both(&mut admin, &options).await?;

    // Warm connections, caches and the script before anything counts.
    let warm = warm_up_options(&options);
    load(&channels, &warm, "warm-up", noop).await;
    if let Some(unbatched) = &unbatched {
        load(&unbatched.channels, &warm, "warm-up", noop).await;
    }
    load(
        &channels,
        &warm,
        "warm-up",
        reserve_call("BENCH-SOLDOUT", "warm".into(), ReserveOutcome::SoldOut),
    )
    .await;

    let mut meter = CpuMeter::connect(&options.redis_url).await?;
    let n = options.requests;
    let mut rounds: Vec<Vec<Measured>> = Vec::new();
    // Spans are made only in the traced row; the exporter stays installed.
    stockgate::telemetry::trace::set_active(false);
    for round in 0..options.rounds.max(1) {
        let mut measured = vec![
            meter.measure(n, redis_benchmark(&options, &prefix)).await?,
            meter
                .measure(n, async {
                    Ok(load(&channels, &options, "no-op RPC (health Check)", noop).await)
                })
                .await?,
            meter
                .measure(n, async {
                    let call = reserve_call(
                        "BENCH-SOLDOUT",
                        format!("out-{round}"),
                        ReserveOutcome::SoldOut,
                    );
                    Ok(load(&channels, &options, "Reserve, sold out", call).await)
                })
                .await?,
            meter
                .measure(n, {
                    let users = format!("in-{round}");
                    stock_row(
                        &channels,
                        &options,
                        &mut admin,
                        "Reserve, stock available",
                        users,
                    )
                })
                .await?,
        ];
        if let Some(unbatched) = &unbatched {
            let users = format!("one-{round}");
            let name = "Reserve, stock, 1 order/message";
            let row = stock_row(&unbatched.channels, &options, &mut admin, name, users);
            measured.push(meter.measure(n, row).await?);
        }
        if options.tracing {
            stockgate::telemetry::trace::set_active(true);
            let traced = meter
                .measure(n, async {
                    let call = reserve_call(
                        "BENCH-SOLDOUT",
                        format!("traced-{round}"),
                        ReserveOutcome::SoldOut,
                    );
                    Ok(load(
                        &channels,
                        &options,
                        "Reserve, sold out, every call traced",
                        call,
                    )
                    .await)
                })
                .await;
            stockgate::telemetry::trace::set_active(false);
            measured.push(traced?);
        }
        rounds.push(measured);
    }
    let results = median_rounds(rounds);

    let _ = stop.send(());
    server.await??;
    if let Some(unbatched) = unbatched {
        unbatched.stop().await?;
    }
    cleanup(&options.redis_url, &prefix).await?;
    if options.queue.starts_with("amqp://") {
        stockgate::queue::delete_topology(&options.queue, &prefix, options.partitions).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(results)
}

/// Reserve with stock on `channels`, a distinct user per call (so each is
/// queued), until the processor has committed them: its work counts in
/// the row's CPU, and must not weigh on the next row's.
async fn stock_row(
    channels: &[Channel],
    options: &BenchOptions,
    admin: &mut AdminServiceClient<Channel>,
    name: &str,
    users: String,
) -> anyhow::Result<Measured> {
    let call = reserve_call("BENCH-AVAIL", users, ReserveOutcome::Queued);
    let measured = load(channels, options, name, call).await;
    wait_drained(admin, "BENCH-AVAIL").await?;
    Ok(measured)
}

/// `BENCH-AVAIL` with stock for every round and `BENCH-SOLDOUT` with none.
pub(crate) async fn stock_both(
    admin: &mut AdminServiceClient<Channel>,
    options: &BenchOptions,
) -> anyhow::Result<()> {
    let stock = i64::try_from(options.requests * (options.rounds + 1) * 3)?;
    for (sku, units) in [("BENCH-AVAIL", stock), ("BENCH-SOLDOUT", 0)] {
        admin
            .set_stock(SetStockRequest {
                sku: sku.into(),
                stock: units,
                max_per_user: 0,
            })
            .await?;
    }
    Ok(())
}

/// A tenth of the calls, to warm connections, caches and scripts.
pub(crate) fn warm_up_options(options: &BenchOptions) -> BenchOptions {
    BenchOptions {
        requests: options.requests / 10,
        ..options.clone()
    }
}

/// An in-process bench server's config: the backends in `options`, Redis
/// keys and RabbitMQ queues under `prefix`, SQLite at `sqlite`, port 0,
/// and no metrics listener (bench servers run side by side).
pub(crate) fn server_config(
    options: &BenchOptions,
    prefix: &str,
    sqlite: &std::path::Path,
) -> anyhow::Result<Config> {
    let mut config = Config::default();
    config.metrics.listen = String::new();
    config.server.listen = "127.0.0.1:0".parse()?;
    config.backends.gate = options.redis_url.clone();
    config.backends.store = options.store.clone();
    config.backends.queue = options.queue.clone();
    config.rabbitmq.queue = prefix.to_owned();
    config.rabbitmq.partitions = options.partitions;
    config.store.sqlite_path = sqlite.display().to_string();
    config.redis.key_prefix = prefix.to_owned();
    Ok(config)
}

/// A server in this process, with client connections to it.
pub(crate) struct BenchServer {
    pub addr: std::net::SocketAddr,
    pub channels: Vec<Channel>,
    pub stop: oneshot::Sender<()>,
    pub server: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl BenchServer {
    /// A server on `config`, with its switches in force fleet-wide: a
    /// server adopts the switches stored in its database over its config,
    /// and a benchmark database outlives runs (an earlier run's rate limits
    /// once throttled a storm).
    pub async fn start(config: Config, connections: usize) -> anyhow::Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (stop, stopped) = oneshot::channel::<()>();
        let switches = stockgate::grpc::set_every_switch(
            stockgate::domain::switches::Layers::from_config(&config),
            "benchmark: the switches of its config",
        );
        let server = stockgate::server::spawn(config, listener, async move {
            let _ = stopped.await;
        });
        let channels = connect(addr, connections).await?;
        wait_serving(&channels[0]).await?;
        AdminServiceClient::new(channels[0].clone())
            .set_layers(switches)
            .await
            .context("set the config's switches")?;
        Ok(Self {
            addr,
            channels,
            stop,
            server,
        })
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        self.server.await?
    }
}

pub(crate) fn noop(
    channel: Channel,
    _: usize,
) -> impl std::future::Future<Output = Result<bool, tonic::Status>> {
    let mut client = HealthClient::new(channel);
    async move {
        client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| true)
    }
}

/// One call per user, each with its own idempotency key, as real callers
/// send them (the dedup layer, when on, claims every one).
fn reserve_request(sku: &str, user: String) -> Request<ReserveRequest> {
    let mut request = Request::new(ReserveRequest {
        sku: sku.into(),
        quantity: 1,
        ..Default::default()
    });
    let value: tonic::metadata::MetadataValue<_> = user.parse().expect("ASCII user id");
    request.metadata_mut().insert("x-user-id", value.clone());
    request.metadata_mut().insert("idempotency-key", value);
    request
}

/// One measured call's answer: whether it was the one expected.
pub(crate) type CallFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, tonic::Status>> + Send>>;

/// Reserve as user `{users}-i`, counting only the expected outcome as
/// success.
pub(crate) fn reserve_call(
    sku: &'static str,
    users: String,
    expect: ReserveOutcome,
) -> impl Fn(Channel, usize) -> CallFuture + Clone + Send + 'static {
    move |channel, i| {
        let mut client = InventoryServiceClient::new(channel);
        let user = format!("{users}-{i}");
        Box::pin(async move {
            let response = client
                .reserve(reserve_request(sku, user))
                .await?
                .into_inner();
            Ok(response.outcome() == expect)
        })
    }
}

pub(crate) async fn wait_drained(
    admin: &mut AdminServiceClient<Channel>,
    sku: &str,
) -> anyhow::Result<()> {
    wait_drained_within(admin, sku, Duration::from_secs(60)).await
}

/// Waits until nothing of `sku` is queued, at most `limit`.
pub(crate) async fn wait_drained_within(
    admin: &mut AdminServiceClient<Channel>,
    sku: &str,
    limit: Duration,
) -> anyhow::Result<()> {
    let polls = limit.as_millis() / 50;
    for _ in 0..polls.max(1) {
        let view = admin
            .get_stock(stockgate::pb::GetStockRequest { sku: sku.into() })
            .await?
            .into_inner()
            .stock
            .context("stock view")?;
        if view.queued_units == 0 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the order queue did not drain within {limit:?}")
}

/// Per measurement, the round with the median throughput, and the CPU
/// figures of the round with the median CPU: a round whose drain met other
/// work on the machine (one read 2,511 µs a call against 370 in the others)
/// then moves neither figure.
pub(crate) fn median_rounds(rounds: Vec<Vec<Measured>>) -> Vec<Measured> {
    let Some(first) = rounds.first() else {
        return Vec::new();
    };
    (0..first.len())
        .map(|i| {
            let mut column: Vec<Measured> = rounds.iter().map(|r| r[i].clone()).collect();
            let cpu: Vec<cpu::CpuPerCall> = column.iter().filter_map(|m| m.cpu).collect();
            column.sort_by(|a, b| a.rps.total_cmp(&b.rps));
            let mut median = column[column.len() / 2].clone();
            median.cpu = cpu::median(&cpu);
            median
        })
        .collect()
}

pub(crate) fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!("stockgate-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

async fn connect(addr: std::net::SocketAddr, n: usize) -> anyhow::Result<Vec<Channel>> {
    let mut channels = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        channels.push(
            Endpoint::from_shared(format!("http://{addr}"))?
                .connect()
                .await?,
        );
    }
    Ok(channels)
}

async fn wait_serving(channel: &Channel) -> anyhow::Result<()> {
    let mut health = HealthClient::new(channel.clone());
    for _ in 0..200 {
        let status = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner()
            .status;
        if status == ServingStatus::Serving as i32 {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("server did not become SERVING (is Redis reachable and the store migrated?)")
}

/// `requests` calls from `concurrency` workers; a call counts as failed
/// when it errs or does not answer as expected.
pub(crate) async fn load<F, Fut>(
    channels: &[Channel],
    options: &BenchOptions,
    name: &str,
    call: F,
) -> Measured
where
    F: Fn(Channel, usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Result<bool, tonic::Status>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..options.concurrency)
        .map(|w| {
            let channel = channels[w % channels.len()].clone();
            let next = next.clone();
            let call = call.clone();
            let total = options.requests;
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut failures = 0;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return (latencies, failures);
                    }
                    let begun = Instant::now();
                    match call(channel.clone(), i).await {
                        Ok(true) => latencies.push(begun.elapsed()),
                        _ => failures += 1,
                    }
                }
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(options.requests);
    let mut failures = 0;
    for worker in workers {
        if let Ok((mut l, f)) = worker.await {
            latencies.append(&mut l);
            failures += f;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return f64::NAN;
        }
        let idx = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        latencies[idx].as_secs_f64() * 1000.0
    };
    Measured {
        name: name.into(),
        rps: options.requests as f64 / elapsed,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        failures,
        cpu: None,
    }
}

/// redis-benchmark running the reserve script itself, at the same
/// concurrency, on a SKU with stock that never runs out.
async fn redis_benchmark(options: &BenchOptions, prefix: &str) -> anyhow::Result<Measured> {
    let client = redis::Client::open(options.redis_url.as_str())?;
    let (host, port) = match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => (host.clone(), *port),
        other => bail!("redis-benchmark needs a TCP address, not {other:?}"),
    };
    let mut conn = client.get_multiplexed_async_connection().await?;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(stockgate::gate::RESERVE_SCRIPT)
        .query_async(&mut conn)
        .await?;
    let key = |part: &str| format!("{prefix}:{{BENCH-RAW}}:{part}");
    let _: () = redis::cmd("HSET")
        .arg(key("inv"))
        .arg("stock")
        .arg(i64::MAX / 2)
        .arg("cap")
        .arg(0)
        .arg("inflight")
        .arg(0)
        .query_async(&mut conn)
        .await?;
    let output = Command::new("redis-benchmark")
        .args(["-h", &host, "-p", &port.to_string()])
        .args(["-c", &options.concurrency.to_string()])
        .args(["-n", &options.requests.to_string()])
        .arg("--csv")
        .args(["EVALSHA", &sha, "4"])
        .args([key("inv"), key("users"), key("res:raw"), key("pending")])
        .args(["bench-user", "1", "60", "0", "raw", "0"])
        .output()
        .context("running redis-benchmark (Debian package redis-tools)")?;
    if !output.status.success() {
        bail!(
            "redis-benchmark failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    parse_redis_benchmark_csv(&String::from_utf8_lossy(&output.stdout))
}

/// The last CSV row: "test","rps","avg","min","p50","p95","p99","max".
fn parse_redis_benchmark_csv(csv: &str) -> anyhow::Result<Measured> {
    let row = csv
        .lines()
        .rev()
        .find(|line| line.starts_with("\"EVALSHA"))
        .context("no EVALSHA row in redis-benchmark output")?;
    let fields: Vec<&str> = row.split("\",\"").map(|f| f.trim_matches('"')).collect();
    if fields.len() < 8 {
        bail!("unexpected redis-benchmark row {row:?}");
    }
    Ok(Measured {
        name: "raw redis-benchmark EVALSHA reserve.lua".into(),
        rps: fields[1].parse()?,
        p50_ms: fields[4].parse()?,
        p99_ms: fields[6].parse()?,
        failures: 0,
        cpu: None,
    })
}

/// Deletes every key under `prefix` (a run's, or a test's), on one Redis
/// server or on every master of a cluster.
pub async fn cleanup(redis_url: &str, prefix: &str) -> anyhow::Result<()> {
    let Some(seeds) = stockgate::redis_client::cluster_seeds(redis_url) else {
        return cleanup_node(redis_url, prefix, false).await;
    };
    let mut last_error = None;
    for seed in seeds {
        match cluster_masters(&seed).await {
            Ok(masters) => {
                for master in masters {
                    cleanup_node(&master, prefix, true).await?;
                }
                return Ok(());
            }
            Err(err) => last_error = Some(err),
        }
    }
    Err(last_error.unwrap_or_else(|| anyhow::anyhow!("no seed in {redis_url}")))
}

/// The masters of the cluster `seed` belongs to, as URLs like `seed`.
async fn cluster_masters(seed: &str) -> anyhow::Result<Vec<String>> {
    let mut conn = redis::Client::open(seed)?
        .get_multiplexed_async_connection()
        .await?;
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(&mut conn)
        .await?;
    let (scheme_and_user, rest) = match seed.rsplit_once('@') {
        Some((before, after)) => (format!("{before}@"), after),
        None => {
            let (scheme, rest) = seed.split_once("://").unwrap_or(("redis", seed));
            (format!("{scheme}://"), rest)
        }
    };
    let tail = rest.find(['/', '?']).map_or("", |at| &rest[at..]);
    Ok(nodes
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let flags = fields.get(2)?;
            let addr = fields.get(1)?.split('@').next()?;
            (flags.split(',').any(|f| f == "master") && !flags.contains("fail"))
                .then(|| format!("{scheme_and_user}{addr}{tail}"))
        })
        .collect())
}

/// Deletes the keys under `prefix` on one node; on a cluster node one key
/// per UNLINK, since keys of several slots cannot go in one.
async fn cleanup_node(redis_url: &str, prefix: &str, per_key: bool) -> anyhow::Result<()> {
    // A run leaves a few hundred thousand keys (reservation records, dedup
    // answers): SCAN in slices rather than one KEYS, which blocks Redis and
    // outlasts the client's response timeout on a big database.
    let client = redis::Client::open(redis_url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}:*"))
            .arg("COUNT")
            .arg(10_000)
            .query_async(&mut conn)
            .await?;
        if per_key && !keys.is_empty() {
            let mut pipe = redis::pipe();
            for key in keys {
                pipe.cmd("UNLINK").arg(key).ignore();
            }
            let () = pipe.query_async(&mut conn).await?;
        } else if !keys.is_empty() {
            let _: () = redis::cmd("UNLINK")
                .arg(keys)
                .query_async(&mut conn)
                .await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

/// Under every table with CPU columns: a pasted table must say what they
/// count.
pub(crate) const CPU_LEGEND: &str = "cpu/call: CPU µs per call on the whole machine; in proc: this process (server and load generator; redis-benchmark is a process of its own); redis: the Redis server; rabbitmq, postgres: those servers' processes on this machine; from the round with the median cpu/call\n";

/// The table `stockgate bench` prints.
pub fn render(results: &[Measured], options: &BenchOptions) -> String {
    let find = |prefix: &str| results.iter().find(|m| m.name.starts_with(prefix));
    let noop = find("no-op").map(|m| m.rps);
    let raw = find("raw").map(|m| m.rps);
    let mut out = format!(
        "requests={} concurrency={} connections={} rounds={} (median round shown) store={} queue={}\n{:<42} {:>10} {:>9} {:>9} {:>8} {:>8} {:>8} {}\n",
        options.requests,
        options.concurrency,
        options.connections,
        options.rounds,
        stockgate::config::redact_url(&options.store),
        stockgate::config::redact_url(&options.queue),
        "measurement",
        "calls/s",
        "p50 ms",
        "p99 ms",
        "failed",
        "x no-op",
        "x raw",
        cpu::headings()
    );
    for m in results {
        let ratio = |base: Option<f64>| base.map_or("-".into(), |b| format!("{:.2}", m.rps / b));
        out.push_str(&format!(
            "{:<42} {:>10.0} {:>9.3} {:>9.3} {:>8} {:>8} {:>8} {}\n",
            m.name,
            m.rps,
            m.p50_ms,
            m.p99_ms,
            m.failures,
            ratio(noop),
            ratio(raw),
            cpu::columns(m.cpu)
        ));
    }
    out.push_str(CPU_LEGEND);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_redis_benchmark_csv() {
        let csv = "\"test\",\"rps\",\"avg_latency_ms\",\"min_latency_ms\",\"p50_latency_ms\",\"p95_latency_ms\",\"p99_latency_ms\",\"max_latency_ms\"\n\
                   \"EVALSHA abc 4 k1 k2 k3 k4 u 1 60 0 raw\",\"41152.26\",\"1.100\",\"0.200\",\"1.023\",\"1.599\",\"2.111\",\"5.000\"\n";
        let m = parse_redis_benchmark_csv(csv).unwrap();
        assert_eq!(m.rps, 41152.26);
        assert_eq!(m.p50_ms, 1.023);
        assert_eq!(m.p99_ms, 2.111);
    }
}
