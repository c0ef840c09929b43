//! Reconciliation: the gate's counters against the database, and the
//! units of admissions that never reached either.

use std::collections::HashMap;

use crate::{
    domain::{ReservationId, ReservationState, Sku},
    error::ReservationError,
    gate::{Settlement, WindowMs, RESTOCK_ALL},
    store::CommitOutcome,
};

use super::{gate_error, sale_cap, sku_stock, store_error, Pipeline};

/// What one reconcile pass found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReconcileReport {
    /// The gate had lost its counters and was reloaded from the database.
    pub reloaded: bool,
    /// SKUs whose gate view (admissible + in flight) differs from the
    /// database's available stock, with the difference (gate − database).
    pub drift: Vec<(Sku, i64)>,
    /// SKUs whose drift was the same on two passes in a row (so not a commit
    /// racing the check) and were reset from the database.
    pub repaired: Vec<Sku>,
    /// Admitted reservations found neither queued nor in the database after
    /// `layers.gate.in_flight_timeout_ms`, whose units were returned.
    pub lost_admissions: Vec<ReservationId>,
}

/// How long after a draw's close the reconciler offers to record it.
const RECORD_DRAWS_WITHIN_MS: i64 = 60 * 60 * 1_000;

impl Pipeline {
    /// Writes each SKU's finished draw (seed, stock, counts) to the audit
    /// trail, once across the fleet (the gate hands it to one replica):
    /// the entrants stay with the gate (`GetDraw`), the seed lasts here.
    async fn record_finished_draws(&self, rows: &[crate::store::InventoryRow]) {
        let now_ms = crate::domain::now().and_utc().timestamp_millis();
        // Each pass asks once per SKU whose draw closed within the hour
        // (one script run each): a draw still unclaimed after that, its
        // replicas' passes failing all along, stays in the gate only.
        for row in rows {
            let Some(ends) = WindowMs::of(&row.window()).draw_ends_at() else {
                continue;
            };
            if now_ms < ends || now_ms > ends + RECORD_DRAWS_WITHIN_MS {
                continue;
            }
            let sku = Sku::from_trusted(row.sku.clone());
            let summary = match self.gate.claim_draw_record(&sku).await {
                Ok(Some(summary)) => summary,
                Ok(None) => continue,
                Err(err) => {
                    tracing::debug!(error = %err, sku = row.sku, "draw not claimed for the audit trail");
                    continue;
                }
            };
            let mut after = serde_json::to_value(&summary).unwrap_or_default();
            after["sku"] = row.sku.clone().into();
            after["max_per_user"] = row.max_per_user.into();
            let event = crate::store::NewAudit {
                at: crate::domain::now(),
                actor: "stockgate",
                action: "draw",
                outcome: "drawn",
                before: "{}",
                after: &after.to_string(),
                reason: "a fair opening's draw closed (GetDraw lists its entrants)",
            };
            if let Err(err) = self.store.audit(&event).await {
                tracing::error!(error = %err, after = %after, "draw not stored in the audit trail (it is in this log)");
            }
        }
    }

    /// Compares the gate with the database: reloads a gate that lost its
    /// counters, reports drift, and resets SKUs whose drift held steady
    /// across two passes.
    pub async fn reconcile(&self) -> Result<ReconcileReport, ReservationError> {
        let mut report = ReconcileReport::default();
        if !self.layers().gate {
            return Ok(report);
        }
        if !self.gate.is_loaded().await.map_err(gate_error)? {
            self.reload_gate().await?;
            self.restocked(RESTOCK_ALL);
            report.reloaded = true;
            tracing::warn!("stock gate had lost its counters; reloaded from the database");
            return Ok(report);
        }
        let caps = self.store.sale_caps().await.map_err(store_error)?;
        let rows = self.store.all_inventory().await.map_err(store_error)?;
        // Every window and sale again: a change the gate missed
        // (unreachable then) is right by the next pass, well before a sale
        // opens.
        let windows: Vec<_> = rows
            .iter()
            .map(|row| {
                (
                    Sku::from_trusted(row.sku.clone()),
                    WindowMs::of(&row.window()),
                )
            })
            .collect();
        self.gate.set_windows(&windows).await.map_err(gate_error)?;
        let sales: Vec<_> = rows
            .iter()
            .map(|row| (Sku::from_trusted(row.sku.clone()), sale_cap(row, &caps)))
            .collect();
        self.gate.set_sales(&sales).await.map_err(gate_error)?;
        self.record_finished_draws(&rows).await;
        let forget = std::mem::take(
            &mut *self
                .sales_to_forget
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for (n, sale) in forget.iter().enumerate() {
            if let Err(err) = self.gate.forget_sale_counts(sale).await {
                self.sales_to_forget
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(forget[n..].iter().cloned());
                return Err(gate_error(err));
            }
        }
        let mut seen = HashMap::new();
        let mut refused = HashMap::new();
        for row in &rows {
            let sku = Sku::from_trusted(row.sku.clone());
            report
                .lost_admissions
                .extend(self.settle_stale_in_flight(&sku).await?);
            let Some(admissible) = self.gate.available(&sku).await.map_err(gate_error)? else {
                // A SKU created while this gate was off or unreachable.
                self.gate
                    .set(&sku_stock(row, &caps))
                    .await
                    .map_err(gate_error)?;
                report.repaired.push(sku);
                continue;
            };
            let in_flight = self.gate.in_flight(&sku).await.map_err(gate_error)?;
            let drift = admissible + in_flight - row.stock;
            if drift == 0 {
                continue;
            }
            report.drift.push((sku.clone(), drift));
            let steady = self
                .last_drift
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&sku)
                == Some(&drift);
            if steady {
                // Re-read: a commit since the pass began would make the
                // reset itself drift.
                if let Some(fresh) = self.store.inventory(&sku).await.map_err(store_error)? {
                    // Refused when a settlement overtook the read: the
                    // next pass measures again.
                    if self
                        .gate
                        .set(&sku_stock(&fresh, &caps))
                        .await
                        .map_err(gate_error)?
                    {
                        report.repaired.push(sku.clone());
                    } else if self.refused_before(&sku, fresh.version) {
                        // The same drift, refused at the same row version
                        // on consecutive passes: no settlement is racing
                        // the read; the database lost versions the gate
                        // saw (a failover onto a standby that lacked the
                        // last commits). Its stock is the truth now.
                        tracing::error!(sku = sku.as_str(), version = fresh.version, drift, "the database's stock row is older than changes the gate applied: commits were lost (failover?); resetting the gate from the database");
                        self.gate
                            .reset(&sku_stock(&fresh, &caps))
                            .await
                            .map_err(gate_error)?;
                        // A commit settled between the read and the reset
                        // was overwritten: set again, by the usual rule,
                        // from a read taken after it.
                        if let Some(after) =
                            self.store.inventory(&sku).await.map_err(store_error)?
                        {
                            self.gate
                                .set(&sku_stock(&after, &caps))
                                .await
                                .map_err(gate_error)?;
                        }
                        report.repaired.push(sku.clone());
                    } else {
                        refused.insert(sku.clone(), fresh.version);
                        seen.insert(sku, drift);
                    }
                }
            } else {
                seen.insert(sku, drift);
            }
        }
        *self.last_drift.lock().unwrap_or_else(|p| p.into_inner()) = seen;
        *self
            .refused_repairs
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = refused;
        let units: i64 = report.drift.iter().map(|(_, d)| d.abs()).sum();
        ::metrics::gauge!("stockgate_gate_drift_units").set(units as f64);
        ::metrics::gauge!("stockgate_gate_drift_skus").set(report.drift.len() as f64);
        if !report.drift.is_empty() {
            tracing::warn!(drift = ?report.drift, repaired = ?report.repaired, "gate and database disagree");
        }
        Ok(report)
    }

    /// Whether the last pass's repair of `sku` was refused at row `version`.
    fn refused_before(&self, sku: &Sku, version: i64) -> bool {
        self.refused_repairs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sku)
            == Some(&version)
    }

    /// Settles admissions older than the in-flight timeout by what became of
    /// them: in the database → committed or rejected; still queued here →
    /// left alone; nowhere → lost before it was queued, units returned.
    async fn settle_stale_in_flight(
        &self,
        sku: &Sku,
    ) -> Result<Vec<ReservationId>, ReservationError> {
        let timeout = chrono::TimeDelta::from_std(self.limits.in_flight_timeout)
            .unwrap_or(chrono::TimeDelta::MAX);
        let cutoff = (chrono::Utc::now() - timeout).timestamp_millis();
        let stale = self
            .gate
            .stale_in_flight(sku, cutoff)
            .await
            .map_err(gate_error)?;
        let mut lost = Vec::new();
        // With a shared broker, an admission another replica queued is not
        // in our memory: call nothing lost while messages still wait.
        let waiting = if stale.is_empty() {
            Some(0)
        } else {
            self.queue.backlog().await
        };
        for entry in stale {
            if self.pending().get(&entry.id).is_some() {
                continue;
            }
            let (action, version) = match self
                .store
                .reservation(&entry.id)
                .await
                .map_err(store_error)?
            {
                // As the processor would have settled it: a sold-out
                // rejection returns nothing, any other its units.
                // A cart's line by its own row's reason.
                Some(row) if row.state == ReservationState::Rejected => (
                    super::batch::settlement(&CommitOutcome::AlreadyCommitted(
                        row.line_row(&entry.id),
                    )),
                    None,
                ),
                Some(_) => (Settlement::Committed, self.stock_version(sku).await),
                None if waiting != Some(0) => continue,
                None => {
                    lost.push(entry.id.clone());
                    (Settlement::Released, None)
                }
            };
            let entry = entry.at_version(version);
            self.settle_gate(&[(action, entry)]).await;
        }
        if !lost.is_empty() {
            tracing::warn!(
                sku = sku.as_str(),
                lost = lost.len(),
                "returned units of admissions that never reached the queue"
            );
            self.restocked(sku.as_str());
        }
        Ok(lost)
    }
}
