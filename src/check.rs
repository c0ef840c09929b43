//! The invariant checker behind `AdminService/CheckInvariants` and
//! `stockgate admin check`: what must hold whatever the layers did.
//!
//! Per SKU, from the database: stock ≥ 0; units ordered (held + confirmed)
//! ≤ units supplied; stock = supplied − held − confirmed (no order
//! operation changes that sum, so an oversell or a lost unit breaks it);
//! no HELD reservation left past its expiry (the sweeper expires them).
//! Across SKUs: no (user, idempotency key) holding two reservations (a
//! reservation id is the primary key, so it cannot repeat); no cart whose
//! lines are in different states (one line held or sold, another not). From the gate,
//! once the queue has drained: each admission still in flight was either
//! committed or lost, so the database's stock lies between the gate's
//! counter and the counter plus what is in flight (equal when nothing is;
//! a settlement the gate missed while Redis was unreachable stays in flight
//! until the reconciler's timeout, and is reported as a note). While orders
//! are still queued the gate comparison is skipped (and said so).

use std::time::Duration;

use crate::{
    domain::{now, Sku},
    error::ReservationError,
    reserve::Pipeline,
};

/// One SKU's figures and what disagrees.
#[derive(Debug, Clone, Default)]
pub struct SkuCheck {
    pub sku: String,
    pub supplied: i64,
    pub stock: i64,
    pub held: i64,
    pub confirmed: i64,
    /// The gate's counter, when the gate is on and has one.
    pub gate_stock: Option<i64>,
    pub gate_in_flight: Option<i64>,
    pub problems: Vec<String>,
    /// Worth knowing, not broken.
    pub notes: Vec<String>,
}

/// The whole check.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub skus: Vec<SkuCheck>,
    /// Problems not tied to one SKU.
    pub problems: Vec<String>,
    /// Orders waiting for the processor fleet-wide (`None`: unknown).
    pub queue_backlog: Option<u64>,
    /// Whether gate counters were compared (gate on and queue drained).
    pub gate_compared: bool,
}

impl CheckReport {
    pub fn ok(&self) -> bool {
        self.problems.is_empty() && self.skus.iter().all(|s| s.problems.is_empty())
    }
}

/// Checks one SKU or all; `hold_grace` is how long past its expiry a hold
/// may wait for the sweeper before it counts as stuck.
pub async fn run(
    pipeline: &Pipeline,
    sku: Option<&Sku>,
    hold_grace: Duration,
) -> Result<CheckReport, ReservationError> {
    let store = pipeline.store();
    let overdue_before =
        now() - chrono::TimeDelta::from_std(hold_grace).unwrap_or(chrono::TimeDelta::MAX);
    let figures = store
        .sku_figures(sku.map(Sku::as_str), overdue_before)
        .await
        .map_err(crate::reserve::store_error)?;
    if let (Some(sku), true) = (sku, figures.is_empty()) {
        return Err(ReservationError::UnknownSku(sku.as_str().into()));
    }
    let mut report = CheckReport {
        queue_backlog: pipeline.queue_depth().await,
        ..CheckReport::default()
    };
    let drained = report.queue_backlog == Some(0) && pipeline.pending_count() == 0;
    report.gate_compared = pipeline.layers().gate && drained;
    for figure in figures {
        let mut check = SkuCheck {
            sku: figure.sku.clone(),
            supplied: figure.supplied,
            stock: figure.stock,
            held: figure.held,
            confirmed: figure.confirmed,
            ..SkuCheck::default()
        };
        let ordered = figure.held + figure.confirmed;
        if figure.stock < 0 {
            check
                .problems
                .push(format!("stock is negative ({})", figure.stock));
        }
        if ordered > figure.supplied {
            check.problems.push(format!(
                "oversold: {ordered} units held or sold of {} supplied",
                figure.supplied
            ));
        }
        if figure.stock != figure.supplied - ordered {
            check.problems.push(format!(
                "stock {} != supplied {} - held {} - confirmed {} = {}",
                figure.stock,
                figure.supplied,
                figure.held,
                figure.confirmed,
                figure.supplied - ordered
            ));
        }
        if figure.overdue_holds > 0 {
            check.problems.push(format!(
                "{} held reservations past their expiry by more than {hold_grace:?}",
                figure.overdue_holds
            ));
        }
        if report.gate_compared {
            let sku = Sku::from_trusted(figure.sku.clone());
            match pipeline.gate_counters(&sku).await {
                Ok((available, in_flight)) => {
                    check.gate_stock = available;
                    check.gate_in_flight = Some(in_flight);
                    match available {
                        // Drained: every admission still in flight is either
                        // committed (the database took its units too) or
                        // lost (only the gate did), so the database's stock
                        // lies between the two.
                        Some(available)
                            if figure.stock < available
                                || figure.stock > available + in_flight =>
                        {
                            check.problems.push(format!(
                                "gate {available} (+ {in_flight} in flight) disagrees with database stock {}",
                                figure.stock
                            ));
                        }
                        Some(_) if in_flight > 0 => check.notes.push(format!(
                            "{in_flight} units still in flight in the gate after the queue drained: settlements the gate missed, which the reconciler settles after layers.gate.in_flight_timeout_ms"
                        )),
                        None => check
                            .problems
                            .push("the gate has no counter for this SKU".into()),
                        Some(_) => {}
                    }
                }
                Err(err) => check.problems.push(format!("gate unreadable: {err}")),
            }
        }
        report.skus.push(check);
    }
    // A property of the whole table, read whole (no index serves it by
    // SKU): only for the check of every SKU. Per SKU it made each call of
    // a 1,000-SKU storm's checker a full scan, and the calls ran into
    // their deadlines.
    let duplicates = match sku {
        Some(_) => Vec::new(),
        None => store
            .duplicate_keys()
            .await
            .map_err(crate::reserve::store_error)?,
    };
    for (user, key, count) in duplicates {
        report.problems.push(format!(
            "{count} reservations for user {user:?} with idempotency key {:?}",
            key.unwrap_or_default()
        ));
    }
    if sku.is_none() {
        let split = store
            .split_carts(overdue_before)
            .await
            .map_err(crate::reserve::store_error)?;
        for cart in split {
            report.problems.push(format!(
                "cart {cart} is in part held or confirmed and in part not"
            ));
        }
    }
    Ok(report)
}
