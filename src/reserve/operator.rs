//! Operators' actions on stock and switches, keeping the gate in step
//! with the database.

use std::sync::Arc;

use crate::{
    domain::{
        now, switches::Layers, Reservation, ReservationState, SaleId, SaleWindow, Sku,
        SoldOutPolicy,
    },
    error::ReservationError,
    gate::{Draw, GateError, SaleCap, WindowMs},
    store::{Adjusted, InventoryRow, ReservationFilter, SaleView, SaleWrite},
};

use super::{gate_error, sku_stock, store_error, Event, Pipeline, StockView};

impl Pipeline {
    pub async fn set_sold_out_policy(
        &self,
        sku: &Sku,
        policy: SoldOutPolicy,
        waitlist_limit: u32,
    ) -> Result<StockView, ReservationError> {
        self.ensure_ready()?;
        let (row, ended) = self
            .store
            .set_sold_out_policy(sku, policy, waitlist_limit, now())
            .await
            .map_err(store_error)?
            .ok_or_else(|| ReservationError::UnknownSku(sku.as_str().into()))?;
        for reservation in ended {
            self.emit(Event::Changed(Box::new(reservation)));
        }
        self.view(row).await
    }

    /// Sets a SKU's sale window in the database, then in the gate; the
    /// row before and the view after. A gate that misses the write is
    /// corrected by the reconciler's next pass; until then the database
    /// refuses what the gate admits outside the window.
    pub async fn set_sale_window(
        &self,
        sku: &Sku,
        window: SaleWindow,
    ) -> Result<(InventoryRow, StockView), ReservationError> {
        self.ensure_ready()?;
        // A draw's entrants wait for its close: moving or dropping the
        // window under them would leave them undecided.
        let current = self.store.inventory(sku).await.map_err(store_error)?;
        if let Some(ends) = current.as_ref().and_then(|row| draw_open_until(row, now())) {
            return Err(ReservationError::DrawInProgress(format!(
                "the draw of {} is open or being decided until {}; change its window after that",
                sku.as_str(),
                crate::error::rfc3339_ms(&ends)
            )));
        }
        let (before, after) = self
            .store
            .set_sale_window(sku, window, now())
            .await
            .map_err(store_error)?
            .ok_or_else(|| ReservationError::UnknownSku(sku.as_str().into()))?;
        // Also with the gate switched off, so that it has the window when
        // it is switched back on.
        let windows = [(sku.clone(), WindowMs::of(&after.window()))];
        if let Err(err) = self.gate.set_windows(&windows).await {
            self.gate_lagging(sku, err);
        }
        // A reopened window should not wait for the fast path's memory.
        self.restocked(sku.as_str());
        Ok((before, self.view(after).await?))
    }

    /// The SKU's draw for its current opening, as the gate keeps it.
    pub async fn draw(&self, sku: &Sku) -> Result<Draw, ReservationError> {
        self.ensure_ready()?;
        self.gate
            .draw(sku)
            .await
            .map_err(gate_error)?
            .ok_or_else(|| ReservationError::UnknownDraw(sku.as_str().into()))
    }

    /// Creates or changes a sale in the database; the sale before
    /// (`None`: new) and after. The gate follows (see
    /// [`Self::gate_follows_sale`]); the database's check stands behind it.
    pub async fn set_sale(
        &self,
        sale: &SaleId,
        max_per_user: u32,
        skus: &[Sku],
    ) -> Result<(Option<SaleView>, SaleView), ReservationError> {
        self.ensure_ready()?;
        match self
            .store
            .set_sale(sale, max_per_user, skus)
            .await
            .map_err(store_error)?
        {
            SaleWrite::Applied { before, after } => {
                self.gate_follows_sale(before.as_ref(), &after).await;
                Ok((before, after))
            }
            SaleWrite::UnknownSku(sku) => Err(ReservationError::UnknownSku(sku)),
            SaleWrite::InOtherSale { sku, sale_id } => {
                Err(ReservationError::SkuInOtherSale { sku, sale: sale_id })
            }
        }
    }

    pub async fn sale(&self, sale: &SaleId) -> Result<SaleView, ReservationError> {
        self.ensure_ready()?;
        self.store
            .sale(sale)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ReservationError::UnknownSale(sale.as_str().into()))
    }

    pub async fn set_stock(
        &self,
        sku: &Sku,
        stock: i64,
        max_per_user: u32,
    ) -> Result<StockView, ReservationError> {
        self.ensure_ready()?;
        let (row, handed) = self
            .store
            .set_stock(sku, stock, max_per_user, now(), self.limits.hold_ttl)
            .await
            .map_err(store_error)?;
        self.gate_follows(row.clone()).await;
        self.restocked(sku.as_str());
        self.handed_on(&handed);
        self.view(row).await
    }

    pub async fn adjust_stock(&self, sku: &Sku, delta: i64) -> Result<StockView, ReservationError> {
        self.ensure_ready()?;
        match self
            .store
            .adjust_stock(sku, delta, now(), self.limits.hold_ttl)
            .await
            .map_err(store_error)?
        {
            Adjusted::Applied { row, handed } => {
                // Units handed to the waitlist never reached stock.
                let served: i64 = handed
                    .iter()
                    .filter(|r| r.state == ReservationState::Held)
                    .map(|r| i64::from(r.quantity))
                    .sum();
                if let Err(err) = self.gate.adjust(sku, delta - served, row.version).await {
                    self.gate_lagging(sku, err);
                }
                self.handed_on(&handed);
                if delta > 0 {
                    self.restocked(sku.as_str());
                }
                self.view(row).await
            }
            Adjusted::UnknownSku => Err(ReservationError::UnknownSku(sku.as_str().into())),
            Adjusted::BelowZero { stock } => Err(ReservationError::InsufficientStock(format!(
                "delta {delta} would take stock of {} below zero (it is {stock})",
                sku.as_str()
            ))),
        }
    }

    /// Sets the gate from `row`, read again while settlements overtake the
    /// read (a busy processor); after a few tries the reconciler takes over.
    async fn gate_follows(&self, mut row: InventoryRow) {
        let sku = Sku::from_trusted(row.sku.clone());
        let caps = match self.store.sale_caps().await {
            Ok(caps) => caps,
            Err(err) => {
                tracing::warn!(sku = sku.as_str(), error = %err, "sales not read; the reconciler will set the gate");
                self.reload_wanted.notify_one();
                return;
            }
        };
        for _ in 0..5 {
            match self.gate.set(&sku_stock(&row, &caps)).await {
                Ok(true) => return,
                Ok(false) => match self.store.inventory(&sku).await {
                    Ok(Some(fresh)) => row = fresh,
                    _ => break,
                },
                Err(err) => return self.gate_lagging(&sku, err),
            }
        }
        tracing::warn!(
            sku = sku.as_str(),
            "gate kept missing the database's latest stock; the reconciler will set it"
        );
    }

    /// Binds the sale's SKUs to its cap in the gate and unbinds those that
    /// left. A SKU that left took its users' units out of the sale (the
    /// gate forgets the sale's counts as it unbinds it), and a cap
    /// switched on or off finds counts nobody kept: the sale's counts start
    /// again (see [`crate::gate::SaleCap`]).
    async fn gate_follows_sale(&self, before: Option<&SaleView>, after: &SaleView) {
        let cap = (after.max_per_user > 0).then(|| SaleCap {
            sale_id: after.sale_id.clone(),
            max_per_user: after.max_per_user,
        });
        let mut sales: Vec<(Sku, Option<SaleCap>)> = after
            .skus
            .iter()
            .map(|sku| (Sku::from_trusted(sku.clone()), cap.clone()))
            .collect();
        let left: Vec<&String> = before
            .map(|b| b.skus.iter().filter(|s| !after.skus.contains(s)).collect())
            .unwrap_or_default();
        sales.extend(
            left.iter()
                .map(|sku| (Sku::from_trusted((*sku).clone()), None)),
        );
        let was_capped = before.is_some_and(|b| b.max_per_user > 0);
        let sale = after.sale_id.as_str();
        // After the SKUs are set: an admission decided between the two is
        // then forgotten (counted short), not kept (counted over); one
        // whose sale script lands after the drop is the window
        // docs/architecture.md describes.
        if let Err(err) = self.gate.set_sales(&sales).await {
            tracing::warn!(sale, error = %err, "stock gate not told of the sale's SKUs; the reconciler will set them");
        }
        if !left.is_empty() || was_capped != cap.is_some() {
            if let Err(err) = self.gate.forget_sale_counts(sale).await {
                tracing::warn!(sale, error = %err, "stock gate kept the sale's counts; the reconciler will drop them");
                self.sales_to_forget
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(sale.to_owned());
            }
        }
    }

    /// The database changed and the gate could not follow. The database
    /// write stands (it is the truth, and the caller must not hear "nothing
    /// changed"); the reconciler brings the gate in line.
    fn gate_lagging(&self, sku: &Sku, err: GateError) {
        tracing::warn!(sku = sku.as_str(), error = %err, "stock gate not updated; the reconciler will repair it");
        self.reload_wanted.notify_one();
    }

    /// The gate's counter for a SKU and the units it has in flight.
    pub async fn gate_counters(&self, sku: &Sku) -> Result<(Option<i64>, i64), ReservationError> {
        let available = self.gate.available(sku).await.map_err(gate_error)?;
        let in_flight = self.gate.in_flight(sku).await.map_err(gate_error)?;
        Ok((available, in_flight))
    }

    /// Reservations with a database row, newest first (operators).
    pub async fn list_reservations(
        &self,
        filter: &ReservationFilter,
    ) -> Result<Vec<Reservation>, ReservationError> {
        self.store
            .list_reservations(filter)
            .await
            .map_err(store_error)
    }

    pub async fn stock(&self, sku: &Sku) -> Result<StockView, ReservationError> {
        self.ensure_ready()?;
        let row = self
            .store
            .inventory(sku)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ReservationError::UnknownSku(sku.as_str().into()))?;
        self.view(row).await
    }

    pub(super) async fn view(&self, row: InventoryRow) -> Result<StockView, ReservationError> {
        let sku = Sku::from_trusted(row.sku.clone());
        let totals = self.store.unit_totals(&sku).await.map_err(store_error)?;
        let gate_stock = if self.layers().gate {
            // An unreachable gate shows as "no counter", not as an error:
            // operators need the database's view most when the gate is down.
            self.gate.available(&sku).await.ok().flatten()
        } else {
            None
        };
        // A queued cart counts the units of its lines of this SKU.
        let queued_units = self
            .pending()
            .values()
            .map(|p| match p.reservation.lines.as_slice() {
                [] if p.reservation.sku == sku => i64::from(p.reservation.quantity),
                lines => lines
                    .iter()
                    .filter(|line| line.sku == sku)
                    .map(|line| i64::from(line.quantity))
                    .sum(),
            })
            .sum();
        Ok(StockView {
            row,
            gate_stock,
            held_units: totals.held,
            confirmed_units: totals.confirmed,
            queued_units,
            waitlisted_units: totals.waitlisted,
        })
    }

    /// Puts `after` in force on this replica. Switching the gate on rebuilds
    /// it from the database first, because it missed every change while it
    /// was off; if that fails nothing changes. Calls already running keep
    /// the switches they read when they started.
    pub async fn apply_layers(&self, after: Layers) -> Result<(), ReservationError> {
        let before = self.layers();
        if after.gate && !before.gate {
            self.reload_gate().await?;
        }
        self.layers.store(Arc::new(after));
        Ok(())
    }
}

/// How long after a draw's close its entrants may still be asking for
/// their outcome (the longest wait of an entered call).
const DRAW_SETTLING: chrono::TimeDelta = chrono::TimeDelta::seconds(15);

/// The end of the time `row`'s draw is open or being decided, if `at` is
/// within it.
fn draw_open_until(row: &InventoryRow, at: chrono::NaiveDateTime) -> Option<chrono::NaiveDateTime> {
    let window = row.window();
    let until = window.draw_closes_at()? + DRAW_SETTLING;
    (window.opens_at? <= at && at < until).then_some(until)
}
