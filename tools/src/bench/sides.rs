//! Two servers in this process that differ in one way (TLS to the
//! backends, a Redis Cluster, a capped sale), measured in alternating order every round:
//! Reserve with stock (gate, dedup, queue and commit) and sold out
//! (answered from the sold-out cache, so only dedup's claim and answer
//! reach Redis). The median round is reported.

use std::time::{Duration, Instant};

use stockgate::{
    config::Config,
    pb::{admin_service_client::AdminServiceClient, ReserveOutcome, SetSaleRequest},
};
use tonic::transport::Channel;

use super::{
    cleanup, load, median_rounds, reserve_call, stock_both, wait_drained, warm_up_options,
    BenchOptions, BenchServer, Measured,
};

// As stock_both names them.
const STOCK: &str = "BENCH-AVAIL";
const SOLD_OUT: &str = "BENCH-SOLDOUT";
/// Both SKUs a side sells.
pub(crate) const SKUS: [&str; 2] = [STOCK, SOLD_OUT];

/// One side: its server, the label its rows carry, and where its keys
/// live (deleted when it stops).
pub(crate) struct Side {
    label: &'static str,
    prefix: String,
    redis_url: String,
    server: BenchServer,
    admin: AdminServiceClient<Channel>,
}

impl Side {
    /// Starts a server on `config` (keys under `prefix` on `redis_url`),
    /// stocks both SKUs and warms it up.
    pub(crate) async fn start(
        label: &'static str,
        config: Config,
        prefix: String,
        redis_url: String,
        options: &BenchOptions,
    ) -> anyhow::Result<Self> {
        Self::start_in_sale(label, config, prefix, redis_url, options, None).await
    }

    /// As [`Side::start`], then puts both SKUs in `sale` (when given)
    /// before the warm-up, so the warm-up loads the sale's scripts too.
    pub(crate) async fn start_in_sale(
        label: &'static str,
        config: Config,
        prefix: String,
        redis_url: String,
        options: &BenchOptions,
        sale: Option<SetSaleRequest>,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        let server = BenchServer::start(config, options.connections).await?;
        let mut admin = AdminServiceClient::new(server.channels[0].clone());
        let mut prepared = stock_both(&mut admin, options).await;
        if let (Ok(()), Some(sale)) = (&prepared, sale) {
            prepared = admin.set_sale(sale).await.map(drop).map_err(Into::into);
        }
        if let Err(err) = prepared {
            server.stop().await?;
            cleanup(&redis_url, &prefix).await?;
            return Err(err);
        }
        let call = reserve_call(STOCK, format!("warm-{prefix}"), ReserveOutcome::Queued);
        load(&server.channels, &warm_up_options(options), "warm-up", call).await;
        wait_drained(&mut admin, STOCK).await?;
        Ok(Self {
            label,
            prefix,
            redis_url,
            server,
            admin,
        })
    }

    /// A connection to this side's server.
    pub(crate) fn channel(&self) -> Channel {
        self.server.channels[0].clone()
    }

    pub(crate) async fn stop(self, options: &BenchOptions) -> anyhow::Result<()> {
        self.server.stop().await?;
        cleanup(&self.redis_url, &self.prefix).await?;
        stockgate::queue::delete_topology(&options.queue, &self.prefix, options.partitions).await;
        Ok(())
    }
}

/// Measures two started sides (see [`measure`]), then stops them and
/// removes `dir`, their files.
pub(crate) async fn run(
    sides: Vec<Side>,
    options: &BenchOptions,
    dir: &std::path::Path,
) -> anyhow::Result<Vec<Measured>> {
    let mut sides: [Side; 2] = sides.try_into().map_err(|_| anyhow::anyhow!("two sides"))?;
    let results = measure(&mut sides, options).await;
    for side in sides {
        side.stop(options).await?;
    }
    let _ = std::fs::remove_dir_all(dir);
    results
}

/// The load both sides get, for the table's first line.
pub(crate) fn load_line(options: &BenchOptions) -> String {
    format!(
        "requests={} concurrency={} connections={} rounds={} (median round shown)",
        options.requests, options.concurrency, options.connections, options.rounds,
    )
}

/// Every round, each side's Reserve with stock then sold out, the sides
/// in alternating order (so a trend in the machine's load favours
/// neither). Returns the median round: with stock on side 0 and 1, then
/// sold out on side 0 and 1.
async fn measure(sides: &mut [Side; 2], options: &BenchOptions) -> anyhow::Result<Vec<Measured>> {
    let mut rounds = Vec::new();
    for round in 0..options.rounds.max(1) {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut measured: Vec<Option<Measured>> = vec![None; 4];
        for i in order {
            let side = &mut sides[i];
            let tag = format!("{round}-{i}-{}", side.prefix);
            let call = reserve_call(STOCK, format!("in-{tag}"), ReserveOutcome::Queued);
            let name = format!("Reserve, stock, {}", side.label);
            let with_stock = load(&side.server.channels, options, &name, call).await;
            // The processor's commits count too: how long they took after
            // the last call is printed beside the rows.
            let drained = Instant::now();
            wait_drained(&mut side.admin, STOCK).await?;
            let drain = drained.elapsed();
            let call = reserve_call(SOLD_OUT, format!("out-{tag}"), ReserveOutcome::SoldOut);
            let name = format!("Reserve, sold out, {}", side.label);
            let sold_out = load(&side.server.channels, options, &name, call).await;
            eprintln!(
                "round {round} {}: queue drained {drain:?} after the last call",
                side.label
            );
            measured[i] = Some(with_stock);
            measured[2 + i] = Some(sold_out);
        }
        rounds.push(measured.into_iter().map(Option::unwrap).collect());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(median_rounds(rounds))
}

/// The rows as a table under `header`, then `ratio` (side 1 / side 0).
pub(crate) fn render(results: &[Measured], header: &str, ratio: &str) -> String {
    let mut out = format!(
        "{header}\n{:<42} {:>10} {:>9} {:>9} {:>8}\n",
        "measurement", "calls/s", "p50 ms", "p99 ms", "failed",
    );
    for m in results {
        out.push_str(&format!(
            "{:<42} {:>10.0} {:>9.3} {:>9.3} {:>8}\n",
            m.name, m.rps, m.p50_ms, m.p99_ms, m.failures
        ));
    }
    if let [first, second, first_out, second_out] = results {
        out.push_str(&format!(
            "{ratio}: Reserve with stock {:.2}x, sold out {:.2}x\n",
            second.rps / first.rps,
            second_out.rps / first_out.rps
        ));
    }
    out
}
