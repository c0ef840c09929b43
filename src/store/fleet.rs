//! The fleet's data: its stored layer switches, the audit trail, what
//! each replica reports running, and the operators' reservation listing.

use chrono::NaiveDateTime;
use diesel::prelude::*;
use diesel_async::{AsyncPgConnection, RunQueryDsl};

use super::{
    models::ReservationRow,
    schema::{audit_log, inventory, layer_switches, replicas, reservations},
    Pool, SqliteConn, StoreError,
};
use crate::domain::Reservation;

/// The stored switches: a JSON document and its revision.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = layer_switches)]
pub struct StoredSwitches {
    pub revision: i64,
    pub switches: String,
    pub changed_by: String,
    pub changed_at: NaiveDateTime,
}

/// One audited action.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = audit_log)]
pub struct AuditRow {
    pub id: i64,
    pub at: NaiveDateTime,
    pub actor: String,
    pub action: String,
    pub outcome: String,
    pub before: String,
    pub after: String,
    pub reason: String,
}

/// An audit event to append.
#[derive(Debug, Clone, Insertable)]
#[diesel(table_name = audit_log)]
pub struct NewAudit<'a> {
    pub at: NaiveDateTime,
    pub actor: &'a str,
    pub action: &'a str,
    pub outcome: &'a str,
    pub before: &'a str,
    pub after: &'a str,
    pub reason: &'a str,
}

/// What a replica last reported.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable, Insertable)]
#[diesel(table_name = replicas)]
pub struct ReplicaRow {
    pub replica: String,
    pub revision: i64,
    pub switches: String,
    pub seen_at: NaiveDateTime,
}

/// One SKU's figures for the invariant checker.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SkuFigures {
    pub sku: String,
    /// Units available for new reservations.
    pub stock: i64,
    /// Units operators made available in all.
    pub supplied: i64,
    pub held: i64,
    pub confirmed: i64,
    /// HELD reservations past their expiry by more than the grace given.
    pub overdue_holds: i64,
}

/// Filters of the operators' reservation listing.
#[derive(Debug, Clone, Default)]
pub struct ReservationFilter {
    pub sku: Option<String>,
    pub state: Option<&'static str>,
    pub limit: i64,
}

macro_rules! fleet_queries {
    ($module:ident, $Conn:ty) => {
        mod $module {
            use super::*;

            pub(super) async fn switches(conn: &mut $Conn) -> QueryResult<Option<StoredSwitches>> {
                layer_switches::table
                    .find(1)
                    .select(StoredSwitches::as_select())
                    .first(conn)
                    .await
                    .optional()
            }

            /// Writes revision `expected + 1` if the stored revision is
            /// still `expected` (0: nothing stored yet); false if another
            /// writer got there first.
            pub(super) async fn swap_switches(
                conn: &mut $Conn,
                expected: i64,
                switches: &str,
                by: &str,
                at: NaiveDateTime,
            ) -> QueryResult<bool> {
                let written = if expected == 0 {
                    diesel::insert_into(layer_switches::table)
                        .values((
                            layer_switches::id.eq(1),
                            layer_switches::revision.eq(1_i64),
                            layer_switches::switches.eq(switches),
                            layer_switches::changed_by.eq(by),
                            layer_switches::changed_at.eq(at),
                        ))
                        .on_conflict_do_nothing()
                        .execute(conn)
                        .await?
                } else {
                    diesel::update(
                        layer_switches::table
                            .filter(layer_switches::id.eq(1))
                            .filter(layer_switches::revision.eq(expected)),
                    )
                    .set((
                        layer_switches::revision.eq(expected + 1),
                        layer_switches::switches.eq(switches),
                        layer_switches::changed_by.eq(by),
                        layer_switches::changed_at.eq(at),
                    ))
                    .execute(conn)
                    .await?
                };
                Ok(written == 1)
            }

            pub(super) async fn audit(conn: &mut $Conn, event: &NewAudit<'_>) -> QueryResult<()> {
                diesel::insert_into(audit_log::table)
                    .values(event)
                    .execute(conn)
                    .await
                    .map(drop)
            }

            pub(super) async fn audit_events(
                conn: &mut $Conn,
                limit: i64,
            ) -> QueryResult<Vec<AuditRow>> {
                audit_log::table
                    .order(audit_log::id.desc())
                    .limit(limit)
                    .select(AuditRow::as_select())
                    .load(conn)
                    .await
            }

            pub(super) async fn report_replica(
                conn: &mut $Conn,
                row: &ReplicaRow,
            ) -> QueryResult<()> {
                diesel::insert_into(replicas::table)
                    .values(row)
                    .on_conflict(replicas::replica)
                    .do_update()
                    .set((
                        replicas::revision.eq(row.revision),
                        replicas::switches.eq(&row.switches),
                        replicas::seen_at.eq(row.seen_at),
                    ))
                    .execute(conn)
                    .await
                    .map(drop)
            }

            /// Replicas seen since `since`; older rows are deleted on the way
            /// (replicas that stopped).
            pub(super) async fn replicas_since(
                conn: &mut $Conn,
                since: NaiveDateTime,
            ) -> QueryResult<Vec<ReplicaRow>> {
                diesel::delete(replicas::table.filter(replicas::seen_at.lt(since)))
                    .execute(conn)
                    .await?;
                replicas::table
                    .order(replicas::replica.asc())
                    .select(ReplicaRow::as_select())
                    .load(conn)
                    .await
            }

            pub(super) async fn sku_figures(
                conn: &mut $Conn,
                sku: Option<&str>,
                overdue_before: NaiveDateTime,
            ) -> QueryResult<Vec<SkuFigures>> {
                let mut rows = inventory::table
                    .select((inventory::sku, inventory::stock, inventory::supplied))
                    .order(inventory::sku.asc())
                    .into_boxed();
                if let Some(sku) = sku {
                    rows = rows.filter(inventory::sku.eq(sku.to_owned()));
                }
                let rows: Vec<(String, i64, i64)> = rows.load(conn).await?;
                let mut live = reservations::table
                    .filter(reservations::state.eq_any(["held", "confirmed"]))
                    .group_by((reservations::sku, reservations::state))
                    .select((
                        reservations::sku,
                        reservations::state,
                        diesel::dsl::sum(reservations::quantity),
                    ))
                    .into_boxed();
                if let Some(sku) = sku {
                    live = live.filter(reservations::sku.eq(sku.to_owned()));
                }
                let live: Vec<(String, String, Option<i64>)> = live.load(conn).await?;
                let overdue: Vec<(String, i64)> = reservations::table
                    .filter(reservations::state.eq("held"))
                    .filter(reservations::expires_at.lt(overdue_before))
                    .group_by(reservations::sku)
                    .select((reservations::sku, diesel::dsl::count_star()))
                    .load(conn)
                    .await?;
                Ok(rows
                    .into_iter()
                    .map(|(sku, stock, supplied)| {
                        let units = |state: &str| {
                            live.iter()
                                .filter(|(s, st, _)| *s == sku && st == state)
                                .map(|(_, _, n)| n.unwrap_or(0))
                                .sum()
                        };
                        SkuFigures {
                            held: units("held"),
                            confirmed: units("confirmed"),
                            overdue_holds: overdue
                                .iter()
                                .find(|(s, _)| *s == sku)
                                .map_or(0, |(_, n)| *n),
                            sku,
                            stock,
                            supplied,
                        }
                    })
                    .collect())
            }

            /// (user, idempotency key) pairs held by more than one
            /// reservation (the unique constraint should make this empty).
            pub(super) async fn duplicate_keys(
                conn: &mut $Conn,
            ) -> QueryResult<Vec<(String, Option<String>, i64)>> {
                reservations::table
                    .filter(reservations::idempotency_key.is_not_null())
                    .group_by((reservations::user_id, reservations::idempotency_key))
                    .having(diesel::dsl::count_star().gt(1))
                    .select((
                        reservations::user_id,
                        reservations::idempotency_key,
                        diesel::dsl::count_star(),
                    ))
                    .load(conn)
                    .await
            }

            pub(super) async fn list_reservations(
                conn: &mut $Conn,
                filter: &ReservationFilter,
            ) -> QueryResult<Vec<Reservation>> {
                let mut query = reservations::table
                    .select(ReservationRow::as_select())
                    .order(reservations::reservation_id.desc())
                    .limit(filter.limit)
                    .into_boxed();
                if let Some(sku) = &filter.sku {
                    query = query.filter(reservations::sku.eq(sku.clone()));
                }
                if let Some(state) = filter.state {
                    query = query.filter(reservations::state.eq(state));
                }
                Ok(query
                    .load(conn)
                    .await?
                    .into_iter()
                    .map(ReservationRow::into_domain)
                    .collect())
            }
        }
    };
}

fleet_queries!(pg_fleet, AsyncPgConnection);
fleet_queries!(sqlite_fleet, SqliteConn);

macro_rules! dispatch_fleet {
    ($self:ident . $f:ident ( $($arg:expr),* $(,)? )) => {
        match &*$self.pool {
            Pool::Pg(pool) => {
                let mut conn = pool.get().await.map_err(|e| StoreError::Connect(e.to_string()))?;
                pg_fleet::$f(&mut conn, $($arg),*).await.map_err(StoreError::from)
            }
            Pool::Sqlite(pool) => {
                let mut conn = pool.get().await.map_err(|e| StoreError::Connect(e.to_string()))?;
                sqlite_fleet::$f(&mut conn, $($arg),*).await.map_err(StoreError::from)
            }
        }
    };
}

impl super::Store {
    pub async fn switches(&self) -> Result<Option<StoredSwitches>, StoreError> {
        dispatch_fleet!(self.switches())
    }

    /// Compare-and-set of the stored switches; see `swap_switches`.
    pub async fn swap_switches(
        &self,
        expected: i64,
        switches: &str,
        by: &str,
        at: NaiveDateTime,
    ) -> Result<bool, StoreError> {
        dispatch_fleet!(self.swap_switches(expected, switches, by, at))
    }

    pub async fn audit(&self, event: &NewAudit<'_>) -> Result<(), StoreError> {
        dispatch_fleet!(self.audit(event))
    }

    pub async fn audit_events(&self, limit: i64) -> Result<Vec<AuditRow>, StoreError> {
        dispatch_fleet!(self.audit_events(limit))
    }

    pub async fn report_replica(&self, row: &ReplicaRow) -> Result<(), StoreError> {
        dispatch_fleet!(self.report_replica(row))
    }

    pub async fn replicas_since(
        &self,
        since: NaiveDateTime,
    ) -> Result<Vec<ReplicaRow>, StoreError> {
        dispatch_fleet!(self.replicas_since(since))
    }

    pub async fn list_reservations(
        &self,
        filter: &ReservationFilter,
    ) -> Result<Vec<Reservation>, StoreError> {
        dispatch_fleet!(self.list_reservations(filter))
    }

    pub async fn sku_figures(
        &self,
        sku: Option<&str>,
        overdue_before: NaiveDateTime,
    ) -> Result<Vec<SkuFigures>, StoreError> {
        dispatch_fleet!(self.sku_figures(sku, overdue_before))
    }

    pub async fn duplicate_keys(&self) -> Result<Vec<(String, Option<String>, i64)>, StoreError> {
        dispatch_fleet!(self.duplicate_keys())
    }
}
