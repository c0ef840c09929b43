//! `stockgate bench --tls-…`: what TLS to the backends costs. Two servers in
//! this process, one with plaintext URLs and one with TLS URLs to the same
//! PostgreSQL, Redis and RabbitMQ servers (each listening both ways), are
//! measured in alternating order every round: Reserve with stock (gate,
//! dedup, queue and commit all cross TLS) and sold out (answered from the
//! sold-out cache, so only dedup's claim and answer cross TLS, to Redis).

use std::time::Duration;

use stockgate::pb::{admin_service_client::AdminServiceClient, ReserveOutcome};

use super::{
    cleanup, load, median_rounds, reserve_call, server_config, stock_both, tempfile_dir,
    wait_drained, warm_up_options, BenchOptions, BenchServer, Measured,
};

/// The TLS side: URLs to the same servers as the plaintext ones in
/// [`BenchOptions`], and the files every backend's TLS uses.
#[derive(Debug, Clone)]
pub struct TlsBackends {
    pub store: String,
    pub redis_url: String,
    pub queue: String,
    pub ca_file: String,
    pub cert_file: String,
    pub key_file: String,
}

// As stock_both names them.
const STOCK: &str = "BENCH-AVAIL";
const SOLD_OUT: &str = "BENCH-SOLDOUT";

pub async fn run(options: BenchOptions, tls: TlsBackends) -> anyhow::Result<Vec<Measured>> {
    let dir = tempfile_dir()?;
    let base = format!("sg-bench-tls-{}", uuid::Uuid::now_v7().simple());
    let mut servers = Vec::new();
    for (side, secure) in [("plain", false), ("tls", true)] {
        let prefix = format!("{base}-{side}");
        let mut side_options = options.clone();
        if secure {
            side_options.store = tls.store.clone();
            side_options.redis_url = tls.redis_url.clone();
            side_options.queue = tls.queue.clone();
        }
        let mut config = server_config(&side_options, &prefix, &dir.join(format!("{side}.db")))?;
        config.backends.dedup = side_options.redis_url.clone();
        config.layers.dedup.enabled = true;
        config.layers.queue.capacity = options.requests.max(1) * 2;
        for (ca, cert, key) in [
            (
                &mut config.store.tls_ca_file,
                &mut config.store.tls_cert_file,
                &mut config.store.tls_key_file,
            ),
            (
                &mut config.redis.tls_ca_file,
                &mut config.redis.tls_cert_file,
                &mut config.redis.tls_key_file,
            ),
            (
                &mut config.rabbitmq.tls_ca_file,
                &mut config.rabbitmq.tls_cert_file,
                &mut config.rabbitmq.tls_key_file,
            ),
        ] {
            *ca = tls.ca_file.clone();
            *cert = tls.cert_file.clone();
            *key = tls.key_file.clone();
        }
        config.validate()?;
        let server = BenchServer::start(config, options.connections).await?;
        let mut admin = AdminServiceClient::new(server.channels[0].clone());
        stock_both(&mut admin, &options).await?;
        let warm = warm_up_options(&options);
        let call = reserve_call(STOCK, format!("warm-{side}"), ReserveOutcome::Queued);
        load(&server.channels, &warm, "warm-up", call).await;
        wait_drained(&mut admin, STOCK).await?;
        servers.push((side, prefix, server, admin));
    }

    let mut rounds = Vec::new();
    for round in 0..options.rounds.max(1) {
        // Alternate which side goes first, so a trend in the machine's load
        // does not favour one.
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1]
        } else {
            vec![1, 0]
        };
        let mut measured: Vec<Option<Measured>> = vec![None; 4];
        for &i in &order {
            let (side, _, server, admin) = &mut servers[i];
            let label = if i == 0 {
                "plaintext backends"
            } else {
                "TLS to all three"
            };
            let call = reserve_call(STOCK, format!("in-{round}-{side}"), ReserveOutcome::Queued);
            let with_stock = load(
                &server.channels,
                &options,
                &format!("Reserve, stock, {label}"),
                call,
            )
            .await;
            // The processor's commits cross TLS too: how long they took
            // after the last call is printed beside the rows.
            let drained = std::time::Instant::now();
            wait_drained(admin, STOCK).await?;
            let drain = drained.elapsed();
            let call = reserve_call(
                SOLD_OUT,
                format!("out-{round}-{side}"),
                ReserveOutcome::SoldOut,
            );
            let sold_out = load(
                &server.channels,
                &options,
                &format!("Reserve, sold out, {label}"),
                call,
            )
            .await;
            eprintln!("round {round} {label}: queue drained {drain:?} after the last call");
            measured[i] = Some(with_stock);
            measured[2 + i] = Some(sold_out);
        }
        rounds.push(measured.into_iter().map(Option::unwrap).collect());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let results = median_rounds(rounds);

    for (_, prefix, server, _) in servers {
        server.stop().await?;
        cleanup(&options.redis_url, &prefix).await?;
        stockgate::queue::delete_topology(&options.queue, &prefix).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(results)
}

pub fn render(results: &[Measured], options: &BenchOptions, tls: &TlsBackends) -> String {
    let mut out = format!(
        "requests={} concurrency={} connections={} rounds={} (median round shown)\nplaintext: store={} gate/dedup={} queue={}\nTLS:       store={} gate/dedup={} queue={}\n{:<42} {:>10} {:>9} {:>9} {:>8}\n",
        options.requests,
        options.concurrency,
        options.connections,
        options.rounds,
        stockgate::config::redact_url(&options.store),
        stockgate::config::redact_url(&options.redis_url),
        stockgate::config::redact_url(&options.queue),
        stockgate::config::redact_url(&tls.store),
        stockgate::config::redact_url(&tls.redis_url),
        stockgate::config::redact_url(&tls.queue),
        "measurement",
        "calls/s",
        "p50 ms",
        "p99 ms",
        "failed",
    );
    for m in results {
        out.push_str(&format!(
            "{:<42} {:>10.0} {:>9.3} {:>9.3} {:>8}\n",
            m.name, m.rps, m.p50_ms, m.p99_ms, m.failures
        ));
    }
    if let [plain, secure, plain_out, secure_out] = results {
        out.push_str(&format!(
            "TLS / plaintext: Reserve with stock {:.2}x (target >= 0.85), sold out {:.2}x\n",
            secure.rps / plain.rps,
            secure_out.rps / plain_out.rps
        ));
    }
    out
}
