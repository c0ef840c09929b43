//! `stockgate bench --middleware`: what each tower layer costs on the path
//! it lets through, under: no middleware, each layer alone, and all of
//! them, interleaved in the same run. Two paths: Reserve with stock (the
//! call the layers exist to let through: gate script, queue, commit) and
//! Reserve for a sold-out SKU (decided by the gate's fast path in memory,
//! so the layers are most of the work: the worst case for them). Four
//! servers run in this process over the same backends: load shedding off
//! and on, each with dedup's store in Redis (the shared profile) and
//! in-process (the embedded profile's), and one whose rate limits are
//! shared by the fleet in Redis (`backends.rate_limit`); shedding and the
//! stores are start-up config. Rate limiting and dedup are switched per row through
//! AdminService, as SREs do. Limits are set so that nothing is
//! refused, and every call carries its own idempotency key, so dedup keeps
//! an answer for every one.

use anyhow::Context;

use super::{
    cleanup, load, median_rounds, reserve_call, tempfile_dir, wait_drained, BenchOptions,
    BenchServer, Measured,
};
use stockgate::pb::{
    admin_service_client::AdminServiceClient, ReserveOutcome, SetLayersRequest, SetStockRequest,
};

/// The servers of the run: shedding and the stores are start-up config,
/// so each combination measured is a server of its own.
const SERVERS: [Server; 5] = [
    Server {
        shedding: false,
        dedup_in_redis: true,
        fleet_limits: false,
    },
    Server {
        shedding: true,
        dedup_in_redis: true,
        fleet_limits: false,
    },
    Server {
        shedding: false,
        dedup_in_redis: false,
        fleet_limits: false,
    },
    Server {
        shedding: true,
        dedup_in_redis: false,
        fleet_limits: false,
    },
    Server {
        shedding: false,
        dedup_in_redis: true,
        fleet_limits: true,
    },
];

#[derive(Debug, Clone, Copy)]
struct Server {
    shedding: bool,
    dedup_in_redis: bool,
    fleet_limits: bool,
}

/// (row, index into SERVERS, rate limit, dedup)
const ROWS: [(&str, usize, bool, bool); 8] = [
    ("middleware off", 0, false, false),
    ("load shedding only", 1, false, false),
    ("rate limit only", 0, true, false),
    // Every call also spends from the budgets in Redis.
    ("rate limit, fleet-wide", 4, true, false),
    ("dedup only (Redis)", 0, false, true),
    // The layer's own cost, apart from its store's round trips.
    ("dedup only (in-process)", 2, false, true),
    ("all middleware on", 1, true, true),
    // The whole stack as the embedded profile runs it.
    ("all on, dedup in-process", 3, true, true),
];

pub async fn run(options: BenchOptions) -> anyhow::Result<Vec<Measured>> {
    let prefix = format!("sg-bench-mw-{}", uuid::Uuid::now_v7().simple());
    let dir = tempfile_dir()?;
    let mut servers = Vec::new();
    for (i, kind) in SERVERS.iter().enumerate() {
        let mut config = super::server_config(
            &options,
            &format!("{prefix}-{i}"),
            &dir.join(format!("bench-mw-{i}.db")),
        )?;
        if kind.dedup_in_redis {
            config.backends.dedup = options.redis_url.clone();
        }
        if kind.fleet_limits {
            config.backends.rate_limit = options.redis_url.clone();
        }
        // The middleware is measured; the queue stays in-process.
        config.backends.queue = stockgate::config::EMBEDDED.into();
        config.server.max_in_flight = if kind.shedding { 4_096 } else { 0 };
        config.layers.queue.capacity = options.requests.max(1) * 2;
        // Every call is a new user; the global budget must never bind.
        config.layers.rate_limit.global_per_sec = 100_000_000;
        config.layers.rate_limit.global_burst = 100_000_000;
        config.validate()?;
        let server = BenchServer::start(config, options.connections).await?;
        AdminServiceClient::new(server.channels[0].clone())
            .set_stock(SetStockRequest {
                sku: "BENCH-SOLDOUT".into(),
                stock: 0,
                max_per_user: 0,
            })
            .await
            .context("set up the sold-out SKU")?;
        AdminServiceClient::new(server.channels[0].clone())
            .set_stock(SetStockRequest {
                sku: "BENCH-STOCK".into(),
                stock: i64::try_from(options.requests * (options.rounds.max(1) + 1) * ROWS.len())?,
                max_per_user: 0,
            })
            .await
            .context("set up the SKU with stock")?;
        servers.push(server);
    }

    let mut meter = super::cpu::CpuMeter::connect(&options.redis_url).await?;
    let mut rounds = Vec::new();
    for round in 0..options.rounds.max(1) {
        let (mut sold_out, mut with_stock) = (Vec::new(), Vec::new());
        for (row, (name, server, rate_limit, dedup)) in ROWS.iter().enumerate() {
            let server = &servers[*server];
            AdminServiceClient::new(server.channels[0].clone())
                .set_layers(SetLayersRequest {
                    rate_limit: Some(*rate_limit),
                    dedup: Some(*dedup),
                    ..Default::default()
                })
                .await?;
            sold_out.push(
                meter
                    .measure(options.requests, async {
                        let call = reserve_call(
                            "BENCH-SOLDOUT",
                            format!("mw-{round}-{row}"),
                            ReserveOutcome::SoldOut,
                        );
                        Ok(load(&server.channels, &options, name, call).await)
                    })
                    .await?,
            );
            with_stock.push(
                meter
                    .measure(options.requests, async {
                        let call = reserve_call(
                            "BENCH-STOCK",
                            format!("mws-{round}-{row}"),
                            ReserveOutcome::Queued,
                        );
                        let measured = load(&server.channels, &options, name, call).await;
                        // The processor's commits count in this row's CPU,
                        // and would otherwise weigh on the next row.
                        wait_drained(
                            &mut AdminServiceClient::new(server.channels[0].clone()),
                            "BENCH-STOCK",
                        )
                        .await?;
                        Ok(measured)
                    })
                    .await?,
            );
        }
        sold_out.append(&mut with_stock);
        rounds.push(sold_out);
    }
    for server in servers {
        server.stop().await?;
    }
    for i in 0..SERVERS.len() {
        cleanup(&options.redis_url, &format!("{prefix}-{i}")).await?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(median_rounds(rounds))
}

/// Two tables (sold out, then with stock), each row's throughput relative
/// to that path's "middleware off".
pub fn render(results: &[Measured], options: &BenchOptions) -> String {
    let mut out = format!(
        "requests={} concurrency={} connections={} rounds={} (median round shown) store={} queue=embedded\n",
        options.requests,
        options.concurrency,
        options.connections,
        options.rounds,
        stockgate::config::redact_url(&options.store),
    );
    let (sold_out, with_stock) = results.split_at(results.len().min(ROWS.len()));
    for (path, rows) in [
        ("Reserve (sold out) with", sold_out),
        ("Reserve (stock) with", with_stock),
    ] {
        table(&mut out, path, rows);
    }
    out.push_str(super::CPU_LEGEND);
    out
}

fn table(out: &mut String, path: &str, results: &[Measured]) {
    let base = results.first().map(|m| m.rps);
    out.push_str(&format!(
        "{:<28} {:>10} {:>9} {:>9} {:>8} {:>10} {}\n",
        path,
        "calls/s",
        "p50 ms",
        "p99 ms",
        "failed",
        "x off",
        super::cpu::headings()
    ));
    for m in results {
        let ratio = base.map_or("-".into(), |b| format!("{:.2}", m.rps / b));
        out.push_str(&format!(
            "{:<28} {:>10.0} {:>9.3} {:>9.3} {:>8} {:>10} {}\n",
            m.name,
            m.rps,
            m.p50_ms,
            m.p99_ms,
            m.failures,
            ratio,
            super::cpu::columns(m.cpu)
        ));
    }
}
