//! `stockgate bench --storm`: the flash sale itself as a benchmark. An
//! in-process server with the given backends (Redis gate, every layer on);
//! per round, a no-op RPC at the same concurrency (the transport's ceiling
//! on this machine, the same-run reference) and a storm of `requests`
//! buyers for one unit through [`crate::storm::run`], with its invariant
//! checks. The median round is shown.

use super::{load, noop, server_config, tempfile_dir, BenchOptions, BenchServer, Measured};
use crate::storm;

/// One round's storm, next to its reference.
#[derive(Debug, Clone)]
pub struct StormRound {
    pub noop: Measured,
    pub storm: storm::StormReport,
}

/// The in-process server every storm round runs against: every layer on,
/// rates far above the load.
async fn storm_server(
    options: &BenchOptions,
    prefix: &str,
    dir: &std::path::Path,
) -> anyhow::Result<BenchServer> {
    let mut config = server_config(options, prefix, &dir.join("bench.db"))?;
    config.backends.dedup = options.redis_url.clone();
    // Every layer on; rates far above the load, so nothing is refused for
    // being fast (the storm's users each call once).
    config.layers.rate_limit.enabled = true;
    config.layers.rate_limit.global_per_sec = 10_000_000;
    config.layers.rate_limit.global_burst = 10_000_000;
    config.layers.dedup.enabled = true;
    config.server.max_in_flight = 100_000;
    config.validate()?;
    BenchServer::start(config, options.connections).await
}

/// A storm of `options.requests` buyers, one unit each, over `skus` SKUs
/// of `stock` units (Zipf popularity `zipf`), named after `sku`.
fn storm_options(
    options: &BenchOptions,
    server: &BenchServer,
    sku: String,
    (skus, stock, zipf): (usize, i64, f64),
) -> storm::StormOptions {
    storm::StormOptions {
        addr: format!("http://{}", server.addr),
        admin_addr: format!("http://{}", server.addr),
        token: None,
        sku,
        stock,
        skus,
        zipf,
        seed: Some(7),
        requests: options.requests,
        users: options.requests,
        concurrency: options.concurrency,
        connections: options.connections,
        quantity: 1,
        double_click: 0.0,
        retries: 0,
        timeout_ms: 60_000,
        progress: false,
        store: None,
        metrics_url: None,
        opens_in_ms: 0,
        draw_ms: 0,
    }
}

async fn clean_up(
    options: &BenchOptions,
    prefix: &str,
    dir: &std::path::Path,
) -> anyhow::Result<()> {
    super::cleanup(&options.redis_url, prefix).await?;
    if options.queue.starts_with("amqp://") {
        stockgate::queue::delete_topology(&options.queue, prefix, options.partitions).await;
    }
    let _ = std::fs::remove_dir_all(dir);
    Ok(())
}

pub async fn run(options: BenchOptions) -> anyhow::Result<Vec<StormRound>> {
    let prefix = format!("sg-bench-{}", uuid::Uuid::now_v7().simple());
    let dir = tempfile_dir()?;
    let server = storm_server(&options, &prefix, &dir).await?;
    let warm = BenchOptions {
        requests: options.requests / 10,
        ..options.clone()
    };
    load(&server.channels, &warm, "warm-up", noop).await;
    let mut rounds = Vec::new();
    for round in 0..options.rounds.max(1) {
        let reference = load(&server.channels, &options, "no-op RPC (health Check)", noop).await;
        // Fresh per run: a benchmark database outlives runs.
        let sku = format!("STORM-{}-{round}", &prefix["sg-bench-".len()..][..12]);
        let storm_options = storm_options(&options, &server, sku, (1, 1, 0.0));
        let report = storm::run(&storm_options, "storm").await?;
        rounds.push(StormRound {
            noop: reference,
            storm: report,
        });
    }
    server.stop().await?;
    clean_up(&options, &prefix, &dir).await?;
    // The round whose storm had the median throughput.
    let mut by_storm: Vec<StormRound> = rounds;
    by_storm.sort_by(|a, b| a.storm.calls_per_sec.total_cmp(&b.storm.calls_per_sec));
    let median = by_storm[by_storm.len() / 2].clone();
    Ok(vec![median])
}

/// The header's note of partitioned queues, empty for one queue.
fn partitions(options: &BenchOptions) -> String {
    if options.partitions > 1 {
        format!(" partitions={}", options.partitions)
    } else {
        String::new()
    }
}

pub fn render(rounds: &[StormRound], options: &BenchOptions) -> String {
    let mut out = format!(
        "buyers={} stock=1 concurrency={} connections={} rounds={} (median storm shown) store={} queue={}{}\n",
        options.requests,
        options.concurrency,
        options.connections,
        options.rounds,
        stockgate::config::redact_url(&options.store),
        stockgate::config::redact_url(&options.queue),
        partitions(options),
    );
    out.push_str(&format!(
        "{:<34} {:>10} {:>9} {:>9} {:>10} {:>8}\n",
        "measurement", "calls/s", "p50 ms", "p99 ms", "last ms", "x no-op"
    ));
    for round in rounds {
        let n = &round.noop;
        out.push_str(&format!(
            "{:<34} {:>10.0} {:>9.3} {:>9.3} {:>10} {:>8}\n",
            n.name, n.rps, n.p50_ms, n.p99_ms, "-", "1.00"
        ));
        let s = &round.storm;
        out.push_str(&format!(
            "{:<34} {:>10.0} {:>9.3} {:>9.3} {:>10.0} {:>8.2}\n",
            "storm: Reserve, every layer on",
            s.calls_per_sec,
            s.p50_ms,
            s.p99_ms,
            s.last_answer_ms,
            s.calls_per_sec / n.rps
        ));
        out.push_str(&format!(
            "admitted {} of {} buyers, units ordered {}, invariants {}\n",
            s.admitted,
            s.calls,
            s.units_ordered,
            if s.ok() { "hold" } else { "BROKEN" }
        ));
        // A refusal by the middleware is cheap; a storm with any would
        // flatter the figures, so they are always shown.
        let outcomes: Vec<String> = s
            .outcomes
            .iter()
            .map(|(outcome, n)| format!("{outcome} {n}"))
            .collect();
        out.push_str(&format!("answers: {}\n", outcomes.join(", ")));
    }
    out
}

/// A many-SKU sale next to a one-SKU sale of the same units, same server,
/// same round: `skus` SKUs of `stock` units with Zipf popularity `zipf`,
/// and one SKU of `skus × stock` units.
#[derive(Debug, Clone, Copy)]
pub struct ManySkus {
    pub skus: usize,
    pub stock: i64,
    pub zipf: f64,
}

/// One storm with the rate the database committed its orders at.
#[derive(Debug, Clone)]
pub struct Committed {
    pub storm: storm::StormReport,
    /// Orders the database committed during the storm.
    pub orders: u64,
    /// From the first commit to the last, in seconds (20 ms resolution).
    pub span_secs: f64,
    /// The most order queues the in-process processor consumed at once
    /// (`stockgate_processor_partitions`; 0 with one unpartitioned queue).
    pub partitions_held: u64,
}

impl Committed {
    pub fn per_sec(&self) -> f64 {
        if self.span_secs > 0.0 {
            self.orders as f64 / self.span_secs
        } else {
            0.0
        }
    }
}

/// One round: the one-SKU sale, then the many-SKU sale.
#[derive(Debug, Clone)]
pub struct ManySkusRound {
    pub one: Committed,
    pub many: Committed,
}

/// Orders the database committed so far, as this process counts them
/// (`stockgate_layer_decisions_total{layer="db",decision="committed"}`).
/// `render` gives the process's metrics in the exposition format.
fn committed_so_far(render: &impl Fn() -> String) -> u64 {
    render()
        .lines()
        .filter(|line| {
            line.starts_with(stockgate::metrics::DECISIONS)
                && line.contains("layer=\"db\"")
                && line.contains("decision=\"committed\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// The partitions this process's processor holds now
/// (`stockgate_processor_partitions`), 0 when it has none.
fn partitions_held(render: &impl Fn() -> String) -> u64 {
    render()
        .lines()
        .filter(|line| line.split(['{', ' ']).next() == Some("stockgate_processor_partitions"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|held| held as u64)
        .max()
        .unwrap_or(0)
}

/// Runs a storm while sampling the commit counter every 20 ms.
async fn timed_storm<R>(render: &R, options: &storm::StormOptions) -> anyhow::Result<Committed>
where
    R: Fn() -> String + Clone + Send + 'static,
{
    let base = committed_so_far(render);
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let sampler = {
        let (render, samples) = (render.clone(), samples.clone());
        tokio::spawn(async move {
            loop {
                let count = committed_so_far(&render) - base;
                let held = partitions_held(&render);
                samples.lock().unwrap_or_else(|p| p.into_inner()).push((
                    std::time::Instant::now(),
                    count,
                    held,
                ));
                tokio::select! {
                    _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                    _ = &mut stopped => return,
                }
            }
        })
    };
    let report = storm::run(options, "storm").await;
    let _ = stop.send(());
    sampler.await?;
    let report = report?;
    let samples = std::mem::take(&mut *samples.lock().unwrap_or_else(|p| p.into_inner()));
    let orders = committed_so_far(render) - base;
    let first = samples.iter().find(|(_, n, _)| *n > 0).map(|(at, ..)| *at);
    let last = samples
        .iter()
        .find(|(_, n, _)| *n >= orders)
        .map(|(at, ..)| *at);
    let partitions_held = samples.iter().map(|(.., held)| *held).max().unwrap_or(0);
    let span_secs = match (first, last) {
        (Some(first), Some(last)) => (last - first).as_secs_f64(),
        _ => 0.0,
    };
    Ok(Committed {
        storm: report,
        orders,
        span_secs,
        partitions_held,
    })
}

pub async fn run_many_skus(
    options: BenchOptions,
    sale: ManySkus,
) -> anyhow::Result<Vec<ManySkusRound>> {
    let prefix = format!("sg-bench-{}", uuid::Uuid::now_v7().simple());
    let dir = tempfile_dir()?;
    let server = storm_server(&options, &prefix, &dir).await?;
    let handle = stockgate::metrics::install();
    let render = move || handle.render();
    let stem = &prefix["sg-bench-".len()..][..12];
    // Every round, or the first error; the server and the keys go either
    // way (a failed run once left 1.8 million keys in the shared Redis).
    let measured = async {
        let mut rounds = Vec::new();
        for round in 0..options.rounds.max(1) {
            let units = sale.stock * sale.skus as i64;
            let one = storm_options(
                &options,
                &server,
                format!("ONE-{stem}-{round}"),
                (1, units, 0.0),
            );
            let one = timed_storm(&render, &one).await?;
            let many = storm_options(
                &options,
                &server,
                format!("MANY-{stem}-{round}"),
                (sale.skus, sale.stock, sale.zipf),
            );
            let many = timed_storm(&render, &many).await?;
            rounds.push(ManySkusRound { one, many });
        }
        anyhow::Ok(rounds)
    }
    .await;
    server.stop().await?;
    clean_up(&options, &prefix, &dir).await?;
    let mut rounds = measured?;
    // The round with the median ratio.
    rounds.sort_by(|a, b| ratio(a).total_cmp(&ratio(b)));
    let median = rounds[rounds.len() / 2].clone();
    Ok(vec![median])
}

fn ratio(round: &ManySkusRound) -> f64 {
    round.many.per_sec() / round.one.per_sec().max(f64::MIN_POSITIVE)
}

pub fn render_many_skus(
    rounds: &[ManySkusRound],
    options: &BenchOptions,
    sale: ManySkus,
) -> String {
    let mut out = format!(
        "buyers={} per sale, {} SKUs x {} units (Zipf s = {}, seed 7) next to 1 SKU x {} units; \
         concurrency={} connections={} rounds={} (median ratio shown) store={} queue={}{}\n",
        options.requests,
        sale.skus,
        sale.stock,
        sale.zipf,
        sale.stock * sale.skus as i64,
        options.concurrency,
        options.connections,
        options.rounds,
        stockgate::config::redact_url(&options.store),
        stockgate::config::redact_url(&options.queue),
        partitions(options),
    );
    out.push_str(&format!(
        "{:<30} {:>9} {:>10} {:>12} {:>10} {:>9} {:>10}\n",
        "sale", "admitted", "committed", "commits/s", "calls/s", "oversold", "invariants"
    ));
    for round in rounds {
        for (name, c) in [("1 SKU", &round.one), ("many SKUs", &round.many)] {
            out.push_str(&format!(
                "{:<30} {:>9} {:>10} {:>12.0} {:>10.0} {:>9} {:>10}\n",
                name,
                c.storm.admitted,
                c.orders,
                c.per_sec(),
                c.storm.calls_per_sec,
                c.storm.oversold,
                if c.storm.ok() { "hold" } else { "BROKEN" }
            ));
        }
        if options.partitions > 1 {
            out.push_str(&format!(
                "partitions the processor consumed at once: {}\n",
                round.one.partitions_held.max(round.many.partitions_held)
            ));
        }
        out.push_str(&format!(
            "committed orders/s, many SKUs / 1 SKU: {:.2}\n",
            ratio(round)
        ));
    }
    out
}
