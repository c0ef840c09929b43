//! `stockgate bench --cart`: what a cart costs next to the same units
//! reserved one by one. One server on the given backends sells [`LINES`]
//! SKUs; every round measures, in alternating order, Reserve of one unit
//! of one of them per call (the reference) and ReserveCart of one unit of
//! each per call, and the table compares units per second. Every call is a
//! new buyer with a key of its own, so the dedup layer, the gate and the
//! database each do a first call's work. With the queue on, both are
//! answered once queued (a cart as one message, committed by the
//! processor in one transaction), and the queue's drain after each row's
//! last call is printed beside the rows.

use std::time::Instant;

use stockgate::pb::{
    admin_service_client::AdminServiceClient, inventory_service_client::InventoryServiceClient,
    CartOutcome, ReservationLine, ReserveCartRequest, ReserveOutcome, SetStockRequest,
};
use tonic::transport::Channel;

use super::{
    cleanup, load, median_rounds, server_config, tempfile_dir, wait_drained_within,
    warm_up_options, BenchOptions, BenchServer, CallFuture, Measured,
};

/// Longest the processor may take to commit a row's queued calls: carts
/// commit one transaction each, about 200 a second here.
const DRAIN_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Lines in each measured cart.
pub const LINES: usize = 4;
const SKUS: [&str; LINES] = [
    "BENCH-CART-1",
    "BENCH-CART-2",
    "BENCH-CART-3",
    "BENCH-CART-4",
];

pub async fn run(options: BenchOptions) -> anyhow::Result<Vec<Measured>> {
    let prefix = format!("sg-bench-cart-{}", uuid::Uuid::now_v7().simple());
    let dir = tempfile_dir()?;
    let mut config = server_config(&options, &prefix, &dir.join("cart.db"))?;
    config.layers.queue.capacity = options.requests.max(1) * 2;
    config.validate()?;
    let server = BenchServer::start(config, options.connections).await?;
    let measured = measure(&server, &options, &prefix).await;
    server.stop().await?;
    cleanup(&options.redis_url, &prefix).await?;
    stockgate::queue::delete_topology(&options.queue, &prefix, options.partitions).await;
    let _ = std::fs::remove_dir_all(&dir);
    measured
}

async fn measure(
    server: &BenchServer,
    options: &BenchOptions,
    prefix: &str,
) -> anyhow::Result<Vec<Measured>> {
    let mut admin = AdminServiceClient::new(server.channels[0].clone());
    // Every round's calls and the warm-up's, twice over: never sold out.
    let stock = i64::try_from(options.requests * (options.rounds + 1) * 2)?;
    for sku in SKUS {
        admin
            .set_stock(SetStockRequest {
                sku: sku.into(),
                stock,
                max_per_user: 0,
            })
            .await?;
    }
    let warm = warm_up_options(options);
    load(
        &server.channels,
        &warm,
        "warm-up",
        cart_call(format!("warm-{prefix}")),
    )
    .await;
    // Queued warm-up carts committed while the first row runs would slow it.
    drain_all(&mut admin).await?;
    let mut rounds = Vec::new();
    for round in 0..options.rounds.max(1) {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        let mut measured: Vec<Option<Measured>> = vec![None, None];
        for row in order {
            let users = format!("{round}-{row}-{prefix}");
            let (name, measured_row) = if row == 0 {
                let name = "Reserve, 1 unit of one SKU".to_owned();
                let single = load(&server.channels, options, &name, single_call(users)).await;
                (name, single)
            } else {
                let name = format!("ReserveCart, 1 unit of {LINES} SKUs");
                let carts = load(&server.channels, options, &name, cart_call(users)).await;
                (name, carts)
            };
            // With the queue on, both rows are answered once queued: the
            // drain shows how long the processor took to commit them, and
            // with the calls' own time, the rate they were committed at.
            let drained = Instant::now();
            drain_all(&mut admin).await?;
            let drain = drained.elapsed();
            let calls = options.requests as f64 / measured_row.rps.max(f64::MIN_POSITIVE);
            eprintln!(
                "round {round}: queue drained {drain:?} after the last call of {name}: {:.0} calls committed per second, calls and drain",
                options.requests as f64 / (calls + drain.as_secs_f64())
            );
            measured[row] = Some(measured_row);
        }
        rounds.push(measured.into_iter().map(Option::unwrap).collect());
    }
    Ok(median_rounds(rounds))
}

/// Waits until every SKU's queued orders are committed.
async fn drain_all(admin: &mut AdminServiceClient<Channel>) -> anyhow::Result<()> {
    for sku in SKUS {
        wait_drained_within(admin, sku, DRAIN_LIMIT).await?;
    }
    Ok(())
}

/// Call `i` reserves one unit of SKU `i mod LINES` as buyer `{users}-i`.
fn single_call(users: String) -> impl Fn(Channel, usize) -> CallFuture + Clone + Send + 'static {
    move |channel, i| {
        let mut client = InventoryServiceClient::new(channel);
        let request = super::reserve_request(SKUS[i % LINES], format!("{users}-{i}"));
        Box::pin(async move {
            let outcome = client.reserve(request).await?.into_inner().outcome();
            Ok(matches!(
                outcome,
                ReserveOutcome::Queued | ReserveOutcome::Reserved
            ))
        })
    }
}

/// Call `i` reserves one unit of every SKU as buyer `{users}-i`.
fn cart_call(users: String) -> impl Fn(Channel, usize) -> CallFuture + Clone + Send + 'static {
    move |channel, i| {
        let mut client = InventoryServiceClient::new(channel);
        let user = format!("{users}-{i}");
        Box::pin(async move {
            let mut request = tonic::Request::new(ReserveCartRequest {
                lines: SKUS
                    .iter()
                    .map(|sku| ReservationLine {
                        sku: (*sku).into(),
                        quantity: 1,
                        ..Default::default()
                    })
                    .collect(),
            });
            let value: tonic::metadata::MetadataValue<_> = user
                .parse()
                .map_err(|_| tonic::Status::internal("a bench user id is ASCII"))?;
            request.metadata_mut().insert("x-user-id", value.clone());
            request.metadata_mut().insert("idempotency-key", value);
            let answer = client.reserve_cart(request).await?.into_inner();
            // Queued carts count as reserved calls do: held once the
            // processor commits them.
            let taken = matches!(
                answer.outcome(),
                CartOutcome::Reserved | CartOutcome::Queued
            );
            Ok(taken && answer.reservation.is_some_and(|r| r.lines.len() == LINES))
        })
    }
}

pub fn render(results: &[Measured], options: &BenchOptions) -> String {
    let mut out = format!(
        "{}\nstore={} queue={} gate={}; each call a new buyer with a key\n{:<42} {:>10} {:>10} {:>9} {:>9} {:>8}\n",
        super::sides::load_line(options),
        stockgate::config::redact_url(&options.store),
        stockgate::config::redact_url(&options.queue),
        stockgate::config::redact_url(&options.redis_url),
        "measurement",
        "calls/s",
        "units/s",
        "p50 ms",
        "p99 ms",
        "failed",
    );
    for (m, units) in results.iter().zip([1, LINES]) {
        out.push_str(&format!(
            "{:<42} {:>10.0} {:>10.0} {:>9.3} {:>9.3} {:>8}\n",
            m.name,
            m.rps,
            m.rps * units as f64,
            m.p50_ms,
            m.p99_ms,
            m.failures
        ));
    }
    if let [single, cart] = results {
        out.push_str(&format!(
            "carts / single Reserves: {:.2}x the units per second, {:.2}x the calls per second\n",
            cart.rps * LINES as f64 / single.rps,
            cart.rps / single.rps
        ));
    }
    out
}
