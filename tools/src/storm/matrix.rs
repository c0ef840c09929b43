//! `storm --matrix`: the same storm under each layer configuration, the
//! article's naive baseline included, and the table comparing them.

use std::time::Duration;

use anyhow::Context;

use stockgate::pb::{DbCheckMode, SetLayersRequest};

use super::{run, status, Admin, StormOptions, StormReport};

/// One configuration of the matrix: its name and the switches it sets.
pub struct Strategy {
    pub name: &'static str,
    pub layers: SetLayersRequest,
}

/// The matrix: every layer on, each off in turn, the database alone in
/// both modes, and the naive baseline (which oversells: that is the point).
pub fn matrix() -> Vec<Strategy> {
    let all = SetLayersRequest {
        rate_limit: Some(true),
        dedup: Some(true),
        gate: Some(true),
        queue: Some(true),
        db_check: DbCheckMode::Optimistic as i32,
        ..Default::default()
    };
    let with = |name: &'static str, change: fn(&mut SetLayersRequest)| {
        let mut layers = all.clone();
        change(&mut layers);
        Strategy { name, layers }
    };
    let alone = |mode: DbCheckMode| SetLayersRequest {
        rate_limit: Some(false),
        dedup: Some(false),
        gate: Some(false),
        queue: Some(false),
        db_check: mode as i32,
        force: mode == DbCheckMode::Off,
        reason: "stockgate storm --matrix".into(),
        ..Default::default()
    };
    vec![
        with("all layers", |_| {}),
        with("rate limit off", |l| l.rate_limit = Some(false)),
        with("dedup off", |l| l.dedup = Some(false)),
        with("gate off", |l| l.gate = Some(false)),
        with("queue off", |l| l.queue = Some(false)),
        Strategy {
            name: "database alone, optimistic",
            layers: alone(DbCheckMode::Optimistic),
        },
        Strategy {
            name: "database alone, pessimistic",
            layers: alone(DbCheckMode::Pessimistic),
        },
        Strategy {
            name: "NAIVE read-then-write (broken)",
            layers: alone(DbCheckMode::Off),
        },
    ]
}

/// Runs the storm once per strategy (each on a fresh SKU), restoring the
/// switches found at the start afterwards.
pub async fn run_matrix(options: &StormOptions) -> anyhow::Result<Vec<StormReport>> {
    let mut admin = Admin::connect(options).await?;
    let before = admin
        .client
        .get_layers(admin.request(stockgate::pb::GetLayersRequest {}))
        .await
        .map_err(status("GetLayers"))?
        .into_inner()
        .layers
        .context("GetLayers without layers")?;
    let mut reports = Vec::new();
    let mut result = Ok(());
    for (n, strategy) in matrix().into_iter().enumerate() {
        let mut layers = strategy.layers.clone();
        layers.reason = format!("stockgate storm --matrix: {}", strategy.name);
        if let Err(err) = admin
            .client
            .set_layers(admin.request(layers))
            .await
            .map_err(status("SetLayers"))
        {
            result = Err(err);
            break;
        }
        // Replicas follow within their poll interval; wait for it.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let mut this_run = options.clone();
        this_run.sku = format!("{}-{n}", options.sku);
        match run(&this_run, strategy.name).await {
            Ok(report) => reports.push(report),
            Err(err) => {
                result = Err(err);
                break;
            }
        }
    }
    let restore = SetLayersRequest {
        rate_limit: Some(before.rate_limit),
        dedup: Some(before.dedup),
        gate: Some(before.gate),
        queue: Some(before.queue),
        db_check: before.db_check,
        rate_limit_shadow: Some(before.rate_limit_shadow),
        gate_failure_mode: before.gate_failure_mode,
        force: true,
        reason: "stockgate storm --matrix: restore".into(),
        ..Default::default()
    };
    admin
        .client
        .set_layers(admin.request(restore))
        .await
        .map_err(status("SetLayers (restore)"))?;
    result.map(|()| reports)
}

/// The matrix's comparison table.
pub fn render_matrix(reports: &[StormReport]) -> String {
    let mut out = format!(
        "{:<32} {:>8} {:>9} {:>10} {:>10} {:>9} {:>10}  {}\n",
        "strategy", "orders", "oversold", "db writes", "calls/s", "p99 ms", "last ms", "invariants"
    );
    for r in reports {
        out.push_str(&format!(
            "{:<32} {:>8} {:>9} {:>10} {:>10.0} {:>9.2} {:>10.0}  {}\n",
            r.strategy,
            r.units_ordered,
            r.oversold,
            r.db_writes.map_or("-".into(), |w| w.to_string()),
            r.calls_per_sec,
            r.p99_ms,
            r.last_answer_ms,
            if r.ok() { "hold" } else { "BROKEN" }
        ));
    }
    out
}
