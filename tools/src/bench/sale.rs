//! `stockgate bench --sale`: what a per-user cap across a sale's SKUs
//! costs a Reserve. Two servers in this process on the same backends
//! (see [`super::sides`]): one sells the bench SKUs on their own, the
//! other sells them in a sale with a per-user cap, so every admission
//! also counts the buyer's units against the sale (on Redis a second
//! script, in the sale's own hash slot) and the store checks the cap
//! again. Each call is a new buyer, so the cap never refuses: the rows
//! measure the checking, not refusals. Before measuring, the capped side
//! must refuse a buyer's second unit, or the bench stops. The store and
//! queue are embedded, one per side, so the rows differ in the gate's
//! second script and the embedded store's own cap check.

use anyhow::bail;
use stockgate::pb::{
    inventory_service_client::InventoryServiceClient, ReserveOutcome, ReserveRequest,
    SetSaleRequest,
};
use tonic::transport::Channel;

use super::{
    server_config,
    sides::{self, Side},
    tempfile_dir, BenchOptions, Measured,
};

/// The sale the capped side's SKUs belong to.
const SALE: &str = "BENCH-SALE";
/// One unit per buyer, as flash sales do; each measured call is a new
/// buyer's first.
const CAP: u32 = 1;

pub async fn run(options: BenchOptions) -> anyhow::Result<Vec<Measured>> {
    // Each side has a store of its own, so the sale set on one cannot
    // reach the other's SKUs (a shared database would cap both).
    if options.store != "embedded" || options.queue != "embedded" {
        bail!("--sale runs on the embedded store and queue (a store per side); leave out --store and --queue");
    }
    let dir = tempfile_dir()?;
    let base = format!("sg-bench-sale-{}", uuid::Uuid::now_v7().simple());
    let mut sides = Vec::new();
    for (side, label, cap) in [
        ("plain", "no sale", None),
        ("capped", "in a capped sale", Some(CAP)),
    ] {
        let prefix = format!("{base}-{side}");
        let mut config = server_config(&options, &prefix, &dir.join(format!("{side}.db")))?;
        config.layers.queue.capacity = options.requests.max(1) * 2;
        let sale = cap.map(|max_per_user| SetSaleRequest {
            sale_id: SALE.into(),
            max_per_user,
            skus: sides::SKUS.iter().map(|sku| sku.to_string()).collect(),
            reason: "benchmark: a capped sale".into(),
        });
        let redis_url = options.redis_url.clone();
        let started = Side::start_in_sale(label, config, prefix, redis_url, &options, sale).await;
        let checked = match started {
            Ok(side) if cap.is_some() => match a_second_unit_is_refused(side.channel()).await {
                Ok(()) => Ok(side),
                Err(err) => {
                    side.stop(&options).await?;
                    Err(err)
                }
            },
            other => other,
        };
        match checked {
            Ok(side) => sides.push(side),
            Err(err) => {
                // The sides already started go too: their servers and keys.
                for side in sides {
                    side.stop(&options).await?;
                }
                return Err(err);
            }
        }
    }
    sides::run(sides, &options, &dir).await
}

/// One buyer reserves a unit, then another: the first must be admitted
/// and the second refused
/// by the sale's cap (the SKUs have no cap of their own), or the capped
/// side is not measuring what it claims to.
async fn a_second_unit_is_refused(channel: Channel) -> anyhow::Result<()> {
    let mut client = InventoryServiceClient::new(channel);
    let mut outcomes = Vec::new();
    for key in ["probe-1", "probe-2"] {
        let mut request = tonic::Request::new(ReserveRequest {
            sku: sides::SKUS[0].into(),
            quantity: 1,
            ..Default::default()
        });
        request
            .metadata_mut()
            .insert("x-user-id", "bench-sale-probe".parse()?);
        request
            .metadata_mut()
            .insert("idempotency-key", key.parse()?);
        outcomes.push(client.reserve(request).await?.into_inner().outcome());
    }
    let admitted = [ReserveOutcome::Queued, ReserveOutcome::Reserved];
    if !admitted.contains(&outcomes[0]) || outcomes[1] != ReserveOutcome::UserLimitReached {
        bail!("the capped side answered one buyer's two units with {outcomes:?}, not admitted then USER_LIMIT_REACHED: the sale's cap is not being checked");
    }
    Ok(())
}

pub fn render(results: &[Measured], options: &BenchOptions) -> String {
    let header = format!(
        "{}\nstore={} queue={} gate={}; the capped side's SKUs are in sale {SALE} (max {CAP} per user; one call per buyer)",
        sides::load_line(options),
        stockgate::config::redact_url(&options.store),
        stockgate::config::redact_url(&options.queue),
        stockgate::config::redact_url(&options.redis_url),
    );
    sides::render(results, &header, "in a capped sale / no sale")
}
