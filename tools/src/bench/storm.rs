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

pub async fn run(options: BenchOptions) -> anyhow::Result<Vec<StormRound>> {
    let prefix = format!("sg-bench-{}", uuid::Uuid::now_v7().simple());
    let dir = tempfile_dir()?;
    let mut config = server_config(&options, &prefix, &dir.join("bench.db"))?;
    config.backends.dedup = options.redis_url.clone();
    // Every layer on; rates far above the load, so nothing is refused for
    // being fast (the storm's users each call once).
    config.layers.rate_limit.enabled = true;
    config.layers.rate_limit.global_per_sec = 10_000_000;
    config.layers.rate_limit.global_burst = 10_000_000;
    config.layers.dedup.enabled = true;
    config.server.max_in_flight = 100_000;
    config.validate()?;
    let server = BenchServer::start(config, options.connections).await?;

    let warm = BenchOptions {
        requests: options.requests / 10,
        ..options.clone()
    };
    load(&server.channels, &warm, "warm-up", noop).await;
    let mut rounds = Vec::new();
    for round in 0..options.rounds.max(1) {
        let reference = load(&server.channels, &options, "no-op RPC (health Check)", noop).await;
        let storm_options = storm::StormOptions {
            addr: format!("http://{}", server.addr),
            admin_addr: format!("http://{}", server.addr),
            token: None,
            // Fresh per run: a benchmark database outlives runs.
            sku: format!("STORM-{}-{round}", &prefix["sg-bench-".len()..][..12]),
            stock: 1,
            skus: 1,
            zipf: 0.0,
            seed: None,
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
        };
        let report = storm::run(&storm_options, "storm").await?;
        rounds.push(StormRound {
            noop: reference,
            storm: report,
        });
    }
    server.stop().await?;
    super::cleanup(&options.redis_url, &prefix).await?;
    if options.queue.starts_with("amqp://") {
        stockgate::queue::delete_topology(&options.queue, &prefix).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    // The round whose storm had the median throughput.
    let mut by_storm: Vec<StormRound> = rounds;
    by_storm.sort_by(|a, b| a.storm.calls_per_sec.total_cmp(&b.storm.calls_per_sec));
    let median = by_storm[by_storm.len() / 2].clone();
    Ok(vec![median])
}

pub fn render(rounds: &[StormRound], options: &BenchOptions) -> String {
    let mut out = format!(
        "buyers={} stock=1 concurrency={} connections={} rounds={} (median storm shown) store={} queue={}\n",
        options.requests,
        options.concurrency,
        options.connections,
        options.rounds,
        stockgate::config::redact_url(&options.store),
        stockgate::config::redact_url(&options.queue),
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
