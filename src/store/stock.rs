//! Stock rows: operators' writes, and the reads every layer needs.

use std::time::Duration;

use chrono::NaiveDateTime;

use super::{Adjusted, InventoryRow, Store, StoreError, UnitTotals};
use crate::domain::{Reservation, SaleWindow, Sku};

/// Stock queries, written once; `dialect!` in `mod.rs` expands
/// them into each connection type's module.
macro_rules! stock_queries {
    ($Conn:ty) => {
        pub(super) async fn set_stock(
            conn: &mut $Conn,
            sku: &str,
            stock: i64,
            max_per_user: i32,
            now: NaiveDateTime,
            hold_ttl: Option<Duration>,
        ) -> QueryResult<(InventoryRow, Vec<Reservation>)> {
            conn.transaction::<_, DieselError, _>(async |conn| {
                let row = diesel::insert_into(inventory::table)
                    .values((
                        inventory::sku.eq(sku),
                        inventory::stock.eq(stock),
                        inventory::version.eq(0i64),
                        inventory::max_per_user.eq(max_per_user),
                        inventory::created_at.eq(now),
                        inventory::updated_at.eq(now),
                    ))
                    .on_conflict(inventory::sku)
                    .do_update()
                    .set((
                        inventory::stock.eq(stock),
                        inventory::version.eq(inventory::version + 1),
                        inventory::max_per_user.eq(max_per_user),
                        inventory::updated_at.eq(now),
                    ))
                    .returning(InventoryRow::as_returning())
                    .get_result(conn)
                    .await?;
                // All units made available: the new stock plus what is
                // held or sold. The upsert locked the row, so no commit
                // moves units in between.
                let live: Option<i64> = reservations::table
                    .filter(reservations::sku.eq(sku))
                    .filter(reservations::state.eq_any(LIVE_STATES))
                    .select(diesel::dsl::sum(reservations::quantity))
                    .first(conn)
                    .await?;
                diesel::update(inventory::table.find(sku))
                    .set(inventory::supplied.eq(stock + live.unwrap_or(0)))
                    .execute(conn)
                    .await?;
                let (handed, _, filled) = fill_waitlist(conn, sku, now, hold_ttl).await?;
                let row = match filled {
                    Some(_) => inventory(conn, sku).await?.expect("upserted above"),
                    None => row,
                };
                Ok((row, handed))
            })
            .await
        }

        pub(super) async fn adjust_stock(
            conn: &mut $Conn,
            sku: &str,
            delta: i64,
            now: NaiveDateTime,
            hold_ttl: Option<Duration>,
        ) -> QueryResult<Adjusted> {
            conn.transaction::<_, DieselError, _>(async |conn| {
                let updated = diesel::update(
                    inventory::table
                        .filter(inventory::sku.eq(sku))
                        .filter((inventory::stock + delta).ge(0i64)),
                )
                .set((
                    inventory::stock.eq(inventory::stock + delta),
                    inventory::supplied.eq(inventory::supplied + delta),
                    inventory::version.eq(inventory::version + 1),
                    inventory::updated_at.eq(now),
                ))
                .returning(InventoryRow::as_returning())
                .get_result(conn)
                .await
                .optional()?;
                if let Some(row) = updated {
                    let (handed, _, filled) = fill_waitlist(conn, sku, now, hold_ttl).await?;
                    let row = match filled {
                        Some(_) => inventory(conn, sku).await?.expect("updated above"),
                        None => row,
                    };
                    return Ok(Adjusted::Applied { row, handed });
                }
                Ok(match inventory(conn, sku).await? {
                    Some(row) => Adjusted::BelowZero { stock: row.stock },
                    None => Adjusted::UnknownSku,
                })
            })
            .await
        }

        /// Sets a SKU's sale window; the row before and after, `None` for
        /// an unknown SKU. The version is left alone: no units moved.
        pub(super) async fn set_sale_window(
            conn: &mut $Conn,
            sku: &str,
            window: SaleWindow,
            now: NaiveDateTime,
        ) -> QueryResult<Option<(InventoryRow, InventoryRow)>> {
            conn.transaction::<_, DieselError, _>(async |conn| {
                let Some(before) = own::lock_inventory(conn, sku).await? else {
                    return Ok(None);
                };
                let after = diesel::update(inventory::table.find(sku))
                    .set((
                        inventory::opens_at.eq(window.opens_at),
                        inventory::closes_at.eq(window.closes_at),
                        inventory::draw_window_ms
                            .eq(i32::try_from(window.draw_window_ms).unwrap_or(i32::MAX)),
                        inventory::updated_at.eq(now),
                    ))
                    .returning(InventoryRow::as_returning())
                    .get_result(conn)
                    .await?;
                Ok(Some((before, after)))
            })
            .await
        }

        pub(super) async fn inventory(
            conn: &mut $Conn,
            sku: &str,
        ) -> QueryResult<Option<InventoryRow>> {
            inventory::table
                .find(sku)
                .select(InventoryRow::as_select())
                .first(conn)
                .await
                .optional()
        }

        pub(super) async fn all_inventory(conn: &mut $Conn) -> QueryResult<Vec<InventoryRow>> {
            inventory::table
                .select(InventoryRow::as_select())
                .order(inventory::sku.asc())
                .load(conn)
                .await
        }

        pub(super) async fn unit_totals(conn: &mut $Conn, sku: &str) -> QueryResult<UnitTotals> {
            let rows: Vec<(String, Option<i64>)> = reservations::table
                .filter(reservations::sku.eq(sku))
                .filter(reservations::state.eq_any(TOTALLED_STATES))
                .group_by(reservations::state)
                .select((
                    reservations::state,
                    diesel::dsl::sum(reservations::quantity),
                ))
                .load(conn)
                .await?;
            let mut totals = UnitTotals::default();
            for (state, units) in rows {
                match ReservationState::from_db(&state) {
                    Some(ReservationState::Held) => totals.held = units.unwrap_or(0),
                    Some(ReservationState::Confirmed) => totals.confirmed = units.unwrap_or(0),
                    Some(ReservationState::Waitlisted) => totals.waitlisted = units.unwrap_or(0),
                    _ => {}
                }
            }
            Ok(totals)
        }

        /// Every reservation of a SKU, oldest first (tests and checks).
        pub(super) async fn reservations_of(
            conn: &mut $Conn,
            sku: &str,
        ) -> QueryResult<Vec<Reservation>> {
            Ok(reservations::table
                .filter(reservations::sku.eq(sku))
                .order(reservations::reservation_id.asc())
                .select(ReservationRow::as_select())
                .load(conn)
                .await?
                .into_iter()
                .map(ReservationRow::into_domain)
                .collect())
        }

        pub(super) async fn ping(conn: &mut $Conn) -> QueryResult<()> {
            conn.batch_execute("SELECT 1").await
        }
    };
}

impl Store {
    /// Creates the SKU or overwrites its available stock and per-user
    /// limit; units then available go to its waitlist first (holds of
    /// `hold_ttl`). Returns the row after that and the entries served.
    pub async fn set_stock(
        &self,
        sku: &Sku,
        stock: i64,
        max_per_user: u32,
        now: NaiveDateTime,
        hold_ttl: Option<Duration>,
    ) -> Result<(InventoryRow, Vec<Reservation>), StoreError> {
        let limit = i32::try_from(max_per_user).unwrap_or(i32::MAX);
        dispatch!(self.set_stock(sku.as_str(), stock, limit, now, hold_ttl))
    }

    /// Adds `delta` to the stock; units then available go to the waitlist
    /// first, as with [`Store::set_stock`].
    pub async fn adjust_stock(
        &self,
        sku: &Sku,
        delta: i64,
        now: NaiveDateTime,
        hold_ttl: Option<Duration>,
    ) -> Result<Adjusted, StoreError> {
        dispatch!(self.adjust_stock(sku.as_str(), delta, now, hold_ttl))
    }

    /// Sets a SKU's sale window: the row before and after, `None` for an
    /// unknown SKU.
    pub async fn set_sale_window(
        &self,
        sku: &Sku,
        window: SaleWindow,
        now: NaiveDateTime,
    ) -> Result<Option<(InventoryRow, InventoryRow)>, StoreError> {
        dispatch!(self.set_sale_window(sku.as_str(), window, now))
    }

    pub async fn inventory(&self, sku: &Sku) -> Result<Option<InventoryRow>, StoreError> {
        dispatch!(self.inventory(sku.as_str()))
    }

    pub async fn all_inventory(&self) -> Result<Vec<InventoryRow>, StoreError> {
        dispatch!(self.all_inventory())
    }

    pub async fn unit_totals(&self, sku: &Sku) -> Result<UnitTotals, StoreError> {
        dispatch!(self.unit_totals(sku.as_str()))
    }

    pub async fn reservations_of(&self, sku: &Sku) -> Result<Vec<Reservation>, StoreError> {
        dispatch!(self.reservations_of(sku.as_str()))
    }
}
