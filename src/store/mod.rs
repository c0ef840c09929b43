//! The database store: PostgreSQL in production, SQLite in the embedded
//! profile, both through diesel with the same schema ([`schema`]) and the same
//! queries.
//!
//! The database is the source of truth and the last line against
//! overselling: an order is committed only by the conditional update
//! `UPDATE inventory SET stock = stock - q, version = version + 1 WHERE sku = ?
//! AND version = ? AND stock >= q` touching exactly one row, and orders are
//! unique by reservation id and by (user, idempotency key).
//!
//! The query code is written once in the `queries!` macro and instantiated
//! per connection type, because diesel's query builder is typed by backend;
//! [`Store`] picks the instance for the pool it holds.

mod models;
mod ops;
pub mod schema;

use std::{
    collections::{HashMap, HashSet},
    time::Duration,
};

use chrono::NaiveDateTime;
use diesel::{
    prelude::*,
    result::{DatabaseErrorKind, Error as DieselError},
    SqliteConnection,
};
use diesel_async::{
    pooled_connection::{bb8, AsyncDieselConnectionManager, ManagerConfig},
    sync_connection_wrapper::SyncConnectionWrapper,
    AsyncConnection, AsyncMigrationHarness, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection,
};
use diesel_migrations::{embed_migrations, EmbeddedMigrations, MigrationHarness};
use futures::FutureExt;

pub use models::InventoryRow;
use models::ReservationRow;
pub use ops::{AuditRow, NewAudit, ReplicaRow, ReservationFilter, SkuFigures, StoredSwitches};
use schema::{inventory, reservations};

use crate::{
    config::{DbCheckMode, StoreBackend, StoreConfig},
    domain::{
        IdempotencyKey, Reservation, ReservationId, ReservationState, Sku, SoldOutPolicy, UserId,
    },
};

pub const PG_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/postgres");
pub const SQLITE_MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations/sqlite");

type SqliteConn = SyncConnectionWrapper<SqliteConnection>;

/// PostgreSQL errors diesel reports as `Unknown` that pass with time:
/// deadlock (40P01), lock timeout (55P03), statement timeout (57014),
/// administrator shutdown (57P01).
const TRANSIENT_MESSAGES: [&str; 4] = [
    "deadlock detected",
    "could not obtain lock",
    "canceling statement due to statement timeout",
    "terminating connection due to administrator command",
];

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No connection could be had in time: the database is down,
    /// unreachable or saturated.
    #[error("no database connection: {0}")]
    Connect(String),
    #[error(transparent)]
    Query(#[from] DieselError),
    #[error("migrations failed: {0}")]
    Migration(String),
    #[error("not supported by this store: {0}")]
    Unsupported(&'static str),
}

impl StoreError {
    /// Whether a retry later may succeed (as opposed to a bug).
    /// Serialization failures, a read-only database (a failover in
    /// progress) and a command that could not be sent count as outages too:
    /// the processor retries them rather than give up on an order.
    pub fn is_unavailable(&self) -> bool {
        match self {
            Self::Connect(_) | Self::Query(DieselError::BrokenTransactionManager) => true,
            Self::Query(DieselError::DatabaseError(kind, info)) => {
                matches!(
                    kind,
                    DatabaseErrorKind::ClosedConnection
                        | DatabaseErrorKind::SerializationFailure
                        | DatabaseErrorKind::ReadOnlyTransaction
                        | DatabaseErrorKind::UnableToSendCommand
                ) || TRANSIENT_MESSAGES
                    .iter()
                    .any(|m| info.message().contains(m))
            }
            _ => false,
        }
    }
}

/// An order as the pipeline hands it to the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewOrder {
    pub id: ReservationId,
    pub sku: Sku,
    pub user: UserId,
    pub quantity: u32,
    pub idempotency_key: Option<IdempotencyKey>,
    pub created_at: NaiveDateTime,
}

/// How the reason of a REJECTED row starts when stock ran out, so a
/// redelivery can tell it from rejections that must return gate units.
pub const SOLD_OUT_REASON: &str = "sold out";

/// How to commit orders.
#[derive(Debug, Clone, Copy)]
pub struct CommitParams {
    pub mode: DbCheckMode,
    pub max_attempts: u32,
    /// `None`: holds never expire.
    pub hold_ttl: Option<Duration>,
    /// Store orders that cannot be filled as REJECTED rows, so a caller who
    /// was told QUEUED can see why (the queue path). The request path
    /// answers the caller directly and stores nothing.
    pub record_rejections: bool,
    pub now: NaiveDateTime,
}

/// What the database decided for one order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Stock taken, order stored as HELD.
    Committed {
        reservation: Reservation,
        remaining: i64,
        /// The SKU row's version this commit wrote: where it stands in the
        /// database's order of stock changes (see [`crate::gate::GateEntry`]).
        stock_version: i64,
    },
    /// This reservation id was committed before (a redelivered message).
    AlreadyCommitted(Reservation),
    /// Another reservation already holds this user's idempotency key.
    DuplicateKey(Reservation),
    SoldOut {
        remaining: i64,
    },
    UserLimit {
        live_units: i64,
        limit: u32,
    },
    UnknownSku,
    /// Every optimistic attempt lost its race; nothing was written.
    Contention {
        attempts: u32,
    },
    /// With `record_rejections`: the order could not be filled and is
    /// stored as REJECTED with the reason.
    Rejected {
        reservation: Reservation,
        cause: RejectCause,
    },
}

/// Why a recorded order was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectCause {
    SoldOut,
    UserLimit,
    DuplicateKey,
}

/// Units a release or expiry gave back, and where they went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restock {
    /// The SKU row's version after the change (restock and hand-off are one
    /// transaction, so no read sees one without the other).
    pub stock_version: i64,
    /// Units that reached stock: the quantity given back minus the units
    /// handed on to the waitlist.
    pub returned: i64,
    /// Waitlisted reservations that received units and are now HELD.
    pub handed: Vec<Reservation>,
}

/// The result of confirming or releasing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// The state changed now. A released hold's units went back (`restock`);
    /// a confirmed hold or a left waitlist entry returns none.
    Changed {
        reservation: Reservation,
        restock: Option<Restock>,
    },
    /// Already in the asked-for (or another final) state; nothing changed.
    Unchanged(Reservation),
    NotFound,
    NotOwner,
    /// The state forbids the transition.
    WrongState(Reservation),
    /// A hold whose expiry has passed cannot be confirmed.
    HoldExpired(Reservation),
}

/// Units of one SKU by reservation state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnitTotals {
    pub held: i64,
    pub confirmed: i64,
    /// Units waiting in the waitlist (not taken from stock).
    pub waitlisted: i64,
}

/// What joining a SKU's waitlist came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WaitlistJoin {
    /// A WAITLISTED reservation now exists, or this user's existing entry
    /// for the SKU (one per user); its `waitlist_position` is set.
    Waiting(Reservation),
    /// The user's idempotency key already names this reservation (not a
    /// waiting one): it is the answer.
    KeyUsed(Reservation),
    /// The SKU's policy is `instant`: sold out is the answer.
    NotOffered,
    /// The database has the units (asked only where its stock is the
    /// whole truth): reserve them the usual way.
    InStock,
    /// The waitlist holds `limit` entries already.
    Full {
        limit: u32,
    },
    /// The user could not receive the units under the per-user limit.
    UserLimit {
        live_units: i64,
        limit: u32,
    },
    UnknownSku,
}

/// Whether an adjustment applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Adjusted {
    /// `row` is after the adjustment and any hand-off to the waitlist.
    Applied {
        row: InventoryRow,
        handed: Vec<Reservation>,
    },
    UnknownSku,
    /// The adjustment would take stock below zero; `stock` is what is there.
    BelowZero {
        stock: i64,
    },
}

/// Whether a hold left HELD, and what its units did.
enum Transition {
    Moved { restock: Option<Restock> },
    Refused,
}

enum Pool {
    Pg(bb8::Pool<AsyncPgConnection>),
    Sqlite(bb8::Pool<SqliteConn>),
}

/// Handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    pool: std::sync::Arc<Pool>,
    target: std::sync::Arc<StoreBackend>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

fn lock_inventory_pg<'a>(
    conn: &'a mut AsyncPgConnection,
    sku: &'a str,
) -> impl std::future::Future<Output = QueryResult<Option<InventoryRow>>> + Send + 'a {
    inventory::table
        .find(sku)
        .select(InventoryRow::as_select())
        .for_update()
        .first(conn)
        .map(|r| r.optional())
}

/// SQLite has no row locks; the embedded pool has a single connection, so
/// every transaction is already serialised.
fn lock_inventory_sqlite<'a>(
    conn: &'a mut SqliteConn,
    sku: &'a str,
) -> impl std::future::Future<Output = QueryResult<Option<InventoryRow>>> + Send + 'a {
    inventory::table
        .find(sku)
        .select(InventoryRow::as_select())
        .first(conn)
        .map(|r| r.optional())
}

/// `ttl` after `now`, saturating (a huge configured TTL means "never").
fn after(now: NaiveDateTime, ttl: Duration) -> NaiveDateTime {
    now + chrono::TimeDelta::from_std(ttl).unwrap_or(chrono::TimeDelta::MAX)
}

const LIVE_STATES: [&str; 2] = ["held", "confirmed"];
const TOTALLED_STATES: [&str; 3] = ["held", "confirmed", "waitlisted"];
/// One value of the queue-ticket queries (tickets, progress).
#[derive(QueryableByName)]
struct Ticket {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    value: i64,
}

const TICKETS_NEED_PG: &str = "queue tickets need PostgreSQL (backends.store)";

/// One text value of a settings query.
#[derive(QueryableByName)]
struct Setting {
    #[diesel(sql_type = diesel::sql_types::Text)]
    value: String,
}

/// (user, key) pairs looked up in one statement: 200 bind parameters, far
/// below either database's limit.
const KEY_PAIRS_PER_QUERY: usize = 100;

/// Records a REJECTED decision of the grouped path: its outcome now, its row
/// in the batch's insert.
fn push_rejected(
    outcomes: &mut Vec<CommitOutcome>,
    rows: &mut Vec<ReservationRow>,
    row: ReservationRow,
    cause: RejectCause,
) {
    outcomes.push(CommitOutcome::Rejected {
        reservation: row.clone().into_domain(),
        cause,
    });
    rows.push(row);
}

/// One multi-row INSERT per chunk (bounded so a huge batch stays under the
/// protocol's parameter limit).
async fn insert_rows_pg(conn: &mut AsyncPgConnection, rows: &[ReservationRow]) -> QueryResult<()> {
    for chunk in rows.chunks(1_000) {
        diesel::insert_into(reservations::table)
            .values(chunk)
            .execute(conn)
            .await?;
    }
    Ok(())
}

/// Row by row: diesel cannot batch rows with optional columns on SQLite,
/// and an in-process database has no round trips to save.
async fn insert_rows_sqlite(conn: &mut SqliteConn, rows: &[ReservationRow]) -> QueryResult<()> {
    for row in rows {
        diesel::insert_into(reservations::table)
            .values(row)
            .execute(conn)
            .await?;
    }
    Ok(())
}

macro_rules! queries {
    ($name:ident, $Conn:ty, $lock:path, $insert_many:path) => {
        mod $name {
            use super::*;

            type KeyPairMatch = Box<
                dyn BoxableExpression<
                    reservations::table,
                    <$Conn as diesel_async::AsyncConnectionCore>::Backend,
                    SqlType = diesel::sql_types::Nullable<diesel::sql_types::Bool>,
                >,
            >;

            /// `(user_id = u AND idempotency_key = k) OR …` for `pairs`
            /// (not empty), as a balanced tree: SQLite's parser overflows
            /// on the left-deep chain `or_filter` builds from 100 pairs.
            fn any_key_pair(pairs: &[(&str, &str)]) -> KeyPairMatch {
                if let [(user, key)] = pairs {
                    return Box::new(
                        reservations::user_id
                            .eq(user.to_string())
                            .and(reservations::idempotency_key.eq(key.to_string())),
                    );
                }
                let (left, right) = pairs.split_at(pairs.len() / 2);
                Box::new(any_key_pair(left).or(any_key_pair(right)))
            }

            async fn find(conn: &mut $Conn, id: &str) -> QueryResult<Option<ReservationRow>> {
                reservations::table
                    .find(id)
                    .select(ReservationRow::as_select())
                    .first(conn)
                    .await
                    .optional()
            }

            async fn insert_row(conn: &mut $Conn, row: &ReservationRow) -> QueryResult<()> {
                diesel::insert_into(reservations::table)
                    .values(row)
                    .execute(conn)
                    .await
                    .map(|_| ())
            }

            /// An unfillable order as a REJECTED row. The key is not stored:
            /// it belongs to whichever reservation holds it, or may be
            /// retried once stock comes back.
            fn rejected_row(order: &NewOrder, reason: String, now: NaiveDateTime) -> ReservationRow {
                let mut row = row_for(order, ReservationState::Rejected, now);
                row.idempotency_key = None;
                row.reject_reason = Some(reason);
                row
            }

            fn row_for(
                order: &NewOrder,
                state: ReservationState,
                now: NaiveDateTime,
            ) -> ReservationRow {
                ReservationRow {
                    reservation_id: order.id.as_str().to_owned(),
                    sku: order.sku.as_str().to_owned(),
                    user_id: order.user.as_str().to_owned(),
                    idempotency_key: order
                        .idempotency_key
                        .as_ref()
                        .map(|k| k.as_str().to_owned()),
                    quantity: order.quantity as i32,
                    state: state.as_db().to_owned(),
                    reject_reason: None,
                    expires_at: None,
                    created_at: order.created_at,
                    updated_at: now,
                }
            }

            /// Stores an unfillable order as REJECTED.
            async fn reject(
                conn: &mut $Conn,
                order: &NewOrder,
                cause: RejectCause,
                reason: String,
                now: NaiveDateTime,
            ) -> QueryResult<CommitOutcome> {
                let row = rejected_row(order, reason, now);
                insert_row(conn, &row).await?;
                Ok(CommitOutcome::Rejected {
                    reservation: row.into_domain(),
                    cause,
                })
            }

            /// The queue path's group commit: the whole batch decided in
            /// FIFO order from a few set-based reads, then one optimistic
            /// update per SKU (`WHERE version = $v AND stock >= $taken`,
            /// covering every order of that SKU in the batch) and one
            /// multi-row insert, so a batch costs a handful of round trips
            /// instead of several per order. `None`: a version moved or the
            /// batch holds a case this path leaves to `decide` (the same id
            /// or idempotency key twice); the caller rolls back and decides
            /// order by order.
            async fn decide_grouped(
                conn: &mut $Conn,
                orders: &[NewOrder],
                params: CommitParams,
            ) -> QueryResult<Option<Vec<CommitOutcome>>> {
                let ids: Vec<&str> = orders.iter().map(|o| o.id.as_str()).collect();
                let existing: HashMap<String, ReservationRow> = reservations::table
                    .filter(reservations::reservation_id.eq_any(&ids))
                    .select(ReservationRow::as_select())
                    .load(conn)
                    .await?
                    .into_iter()
                    .map(|row| (row.reservation_id.clone(), row))
                    .collect();
                let keyed: Vec<(&str, &str)> = orders
                    .iter()
                    .filter_map(|o| {
                        o.idempotency_key
                            .as_ref()
                            .map(|k| (o.user.as_str(), k.as_str()))
                    })
                    .collect();
                let mut holders: HashMap<(String, String), ReservationRow> = HashMap::new();
                // One index probe per (user, key) pair. `user_id IN (..) AND
                // idempotency_key IN (..)` read the same rows, but PostgreSQL
                // 15 planned it as a scan of the whole table: 30 ms per batch
                // at 300,000 reservations, growing with every sale.
                for pairs in keyed.chunks(KEY_PAIRS_PER_QUERY) {
                    let query = reservations::table
                        .filter(any_key_pair(pairs))
                        .select(ReservationRow::as_select());
                    for row in query.load(conn).await? {
                        if let Some(key) = row.idempotency_key.clone() {
                            holders.insert((row.user_id.clone(), key), row);
                        }
                    }
                }
                let skus: Vec<&str> = orders
                    .iter()
                    .map(|o| o.sku.as_str())
                    .collect::<HashSet<_>>()
                    .into_iter()
                    .collect();
                // SKU → (row as read, units this batch takes).
                let mut stock: HashMap<String, (InventoryRow, i64)> = inventory::table
                    .filter(inventory::sku.eq_any(&skus))
                    .select(InventoryRow::as_select())
                    .load(conn)
                    .await?
                    .into_iter()
                    .map(|row| (row.sku.clone(), (row, 0)))
                    .collect();
                let capped: Vec<&str> = stock
                    .values()
                    .filter(|(row, _)| row.max_per_user > 0)
                    .map(|(row, _)| row.sku.as_str())
                    .collect();
                let mut live: HashMap<(String, String), i64> = HashMap::new();
                if !capped.is_empty() {
                    let users: Vec<&str> = orders.iter().map(|o| o.user.as_str()).collect();
                    let sums: Vec<(String, String, Option<i64>)> = reservations::table
                        .filter(reservations::sku.eq_any(&capped))
                        .filter(reservations::user_id.eq_any(&users))
                        .filter(reservations::state.eq_any(LIVE_STATES))
                        .group_by((reservations::sku, reservations::user_id))
                        .select((
                            reservations::sku,
                            reservations::user_id,
                            diesel::dsl::sum(reservations::quantity),
                        ))
                        .load(conn)
                        .await?;
                    for (sku, user, units) in sums {
                        live.insert((sku, user), units.unwrap_or(0));
                    }
                }

                let mut seen_ids = HashSet::new();
                let mut seen_keys = HashSet::new();
                let mut outcomes = Vec::with_capacity(orders.len());
                let mut rows = Vec::with_capacity(orders.len());
                for order in orders {
                    if let Some(row) = existing.get(order.id.as_str()) {
                        outcomes.push(CommitOutcome::AlreadyCommitted(row.clone().into_domain()));
                        continue;
                    }
                    if !seen_ids.insert(order.id.as_str()) {
                        return Ok(None);
                    }
                    if let Some(key) = &order.idempotency_key {
                        let slot = (order.user.as_str().to_owned(), key.as_str().to_owned());
                        if let Some(holder) = holders.get(&slot) {
                            let reason = format!(
                                "duplicate idempotency key: reservation {} holds it",
                                holder.reservation_id
                            );
                            let row = rejected_row(order, reason, params.now);
                            push_rejected(&mut outcomes, &mut rows, row, RejectCause::DuplicateKey);
                            continue;
                        }
                        if !seen_keys.insert(slot) {
                            return Ok(None);
                        }
                    }
                    let Some((current, taken)) = stock.get_mut(order.sku.as_str()) else {
                        outcomes.push(CommitOutcome::UnknownSku);
                        continue;
                    };
                    let quantity = i64::from(order.quantity);
                    let available = current.stock - *taken;
                    let slot = (order.sku.as_str().to_owned(), order.user.as_str().to_owned());
                    if current.max_per_user > 0 {
                        let units = live.get(&slot).copied().unwrap_or(0);
                        if units + quantity > i64::from(current.max_per_user) {
                            let reason = format!(
                                "user limit: {units} of {} units already held",
                                current.max_per_user
                            );
                            let row = rejected_row(order, reason, params.now);
                            push_rejected(&mut outcomes, &mut rows, row, RejectCause::UserLimit);
                            continue;
                        }
                    }
                    if available < quantity {
                        let reason = format!("{SOLD_OUT_REASON}: {available} units left");
                        let row = rejected_row(order, reason, params.now);
                        push_rejected(&mut outcomes, &mut rows, row, RejectCause::SoldOut);
                        continue;
                    }
                    *taken += quantity;
                    *live.entry(slot).or_default() += quantity;
                    let mut row = row_for(order, ReservationState::Held, params.now);
                    row.expires_at = params.hold_ttl.map(|ttl| after(params.now, ttl));
                    outcomes.push(CommitOutcome::Committed {
                        reservation: row.clone().into_domain(),
                        remaining: available - quantity,
                        // The one update below writes it, or the batch is
                        // decided again order by order.
                        stock_version: current.version + 1,
                    });
                    rows.push(row);
                }
                for (current, taken) in stock.values().filter(|(_, taken)| *taken > 0) {
                    let updated = diesel::update(
                        inventory::table
                            .filter(inventory::sku.eq(&current.sku))
                            .filter(inventory::version.eq(current.version))
                            .filter(inventory::stock.ge(*taken)),
                    )
                    .set((
                        inventory::stock.eq(inventory::stock - *taken),
                        inventory::version.eq(inventory::version + 1),
                        inventory::updated_at.eq(params.now),
                    ))
                    .execute(conn)
                    .await?;
                    if updated != 1 {
                        return Ok(None);
                    }
                }
                $insert_many(conn, &rows).await?;
                Ok(Some(outcomes))
            }

            async fn decide(
                conn: &mut $Conn,
                order: &NewOrder,
                params: CommitParams,
            ) -> QueryResult<CommitOutcome> {
                if let Some(row) = find(conn, order.id.as_str()).await? {
                    return Ok(CommitOutcome::AlreadyCommitted(row.into_domain()));
                }
                if let Some(key) = &order.idempotency_key {
                    let holder = reservations::table
                        .filter(reservations::user_id.eq(order.user.as_str()))
                        .filter(reservations::idempotency_key.eq(key.as_str()))
                        .select(ReservationRow::as_select())
                        .first(conn)
                        .await
                        .optional()?;
                    if let Some(holder) = holder {
                        if params.record_rejections {
                            let reason = format!(
                                "duplicate idempotency key: reservation {} holds it",
                                holder.reservation_id
                            );
                            return reject(
                                conn,
                                order,
                                RejectCause::DuplicateKey,
                                reason,
                                params.now,
                            )
                            .await;
                        }
                        return Ok(CommitOutcome::DuplicateKey(holder.into_domain()));
                    }
                }
                let quantity = i64::from(order.quantity);
                for _attempt in 0..params.max_attempts {
                    let current = match params.mode {
                        DbCheckMode::Optimistic | DbCheckMode::Off => inventory::table
                            .find(order.sku.as_str())
                            .select(InventoryRow::as_select())
                            .first(conn)
                            .await
                            .optional()?,
                        DbCheckMode::Pessimistic => $lock(conn, order.sku.as_str()).await?,
                    };
                    let Some(current) = current else {
                        return Ok(CommitOutcome::UnknownSku);
                    };
                    if current.max_per_user > 0 {
                        let live: Option<i64> = reservations::table
                            .filter(reservations::sku.eq(order.sku.as_str()))
                            .filter(reservations::user_id.eq(order.user.as_str()))
                            .filter(reservations::state.eq_any(LIVE_STATES))
                            .select(diesel::dsl::sum(reservations::quantity))
                            .first(conn)
                            .await?;
                        let live = live.unwrap_or(0);
                        if live + quantity > i64::from(current.max_per_user) {
                            if params.record_rejections {
                                let reason = format!(
                                    "user limit: {live} of {} units already held",
                                    current.max_per_user
                                );
                                return reject(
                                    conn,
                                    order,
                                    RejectCause::UserLimit,
                                    reason,
                                    params.now,
                                )
                                .await;
                            }
                            return Ok(CommitOutcome::UserLimit {
                                live_units: live,
                                limit: current.max_per_user as u32,
                            });
                        }
                    }
                    if current.stock < quantity {
                        if params.record_rejections {
                            let reason = format!("{SOLD_OUT_REASON}: {} units left", current.stock);
                            return reject(conn, order, RejectCause::SoldOut, reason, params.now)
                                .await;
                        }
                        return Ok(CommitOutcome::SoldOut {
                            remaining: current.stock,
                        });
                    }
                    let updated = if params.mode == DbCheckMode::Off {
                        // The article's naive write: what was read, minus
                        // the order, whatever committed in between.
                        diesel::update(
                            inventory::table.filter(inventory::sku.eq(order.sku.as_str())),
                        )
                        .set((
                            inventory::stock.eq(current.stock - quantity),
                            inventory::version.eq(current.version + 1),
                            inventory::updated_at.eq(params.now),
                        ))
                        .execute(conn)
                        .await?
                    } else {
                        diesel::update(
                            inventory::table
                                .filter(inventory::sku.eq(order.sku.as_str()))
                                .filter(inventory::version.eq(current.version))
                                .filter(inventory::stock.ge(quantity)),
                        )
                        .set((
                            inventory::stock.eq(inventory::stock - quantity),
                            inventory::version.eq(inventory::version + 1),
                            inventory::updated_at.eq(params.now),
                        ))
                        .execute(conn)
                        .await?
                    };
                    if updated == 1 {
                        let mut row = row_for(order, ReservationState::Held, params.now);
                        row.expires_at = params.hold_ttl.map(|ttl| after(params.now, ttl));
                        insert_row(conn, &row).await?;
                        return Ok(CommitOutcome::Committed {
                            reservation: row.into_domain(),
                            remaining: current.stock - quantity,
                            stock_version: current.version + 1,
                        });
                    }
                    // Another writer committed since our read: back off a
                    // little so the retries do not march in lock step.
                    crate::metrics::decision("db", "conflict");
                    let pause = rand::random_range(50..500);
                    tokio::time::sleep(Duration::from_micros(pause)).await;
                }
                Ok(CommitOutcome::Contention {
                    attempts: params.max_attempts,
                })
            }

            /// One order in its own (sub)transaction. A unique violation
            /// means a concurrent writer stored this id or key first and has
            /// committed by now, so one more pass finds its row.
            pub(super) async fn commit_one(
                conn: &mut $Conn,
                order: &NewOrder,
                params: CommitParams,
            ) -> QueryResult<CommitOutcome> {
                let mut retried = false;
                loop {
                    let result = conn
                        .transaction::<_, DieselError, _>(async |conn| {
                            decide(conn, order, params).await
                        })
                        .await;
                    match result {
                        Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _))
                            if !retried =>
                        {
                            retried = true;
                        }
                        other => return other,
                    }
                }
            }

            pub(super) async fn commit_batch(
                conn: &mut $Conn,
                orders: &[NewOrder],
                params: CommitParams,
            ) -> QueryResult<Vec<CommitOutcome>> {
                if orders.len() > 1
                    && params.record_rejections
                    && params.mode == DbCheckMode::Optimistic
                {
                    let grouped = conn
                        .transaction::<_, DieselError, _>(async |conn| {
                            decide_grouped(conn, orders, params)
                                .await?
                                .ok_or(DieselError::RollbackTransaction)
                        })
                        .await;
                    match grouped {
                        Ok(outcomes) => return Ok(outcomes),
                        // A concurrent writer moved a version or stored a
                        // clashing row: decide order by order instead.
                        Err(DieselError::RollbackTransaction)
                        | Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {}
                        Err(other) => return Err(other),
                    }
                }
                conn.transaction::<_, DieselError, _>(async |conn| {
                    let mut outcomes = Vec::with_capacity(orders.len());
                    for order in orders {
                        // Nested: each order is a savepoint, so one
                        // conflict does not undo the batch.
                        outcomes.push(commit_one(conn, order, params).await?);
                    }
                    Ok(outcomes)
                })
                .await
            }

            /// Stores an order the processor gave up on (or whose publish
            /// was never confirmed) as REJECTED, so a late delivery of it
            /// finds the row and creates nothing. An existing row wins.
            /// `created_at` is `now`: the order's own may be what failed.
            pub(super) async fn record_failed(
                conn: &mut $Conn,
                order: &NewOrder,
                reason: &str,
                now: NaiveDateTime,
            ) -> QueryResult<Reservation> {
                if let Some(row) = find(conn, order.id.as_str()).await? {
                    return Ok(row.into_domain());
                }
                let mut row = rejected_row(order, reason.to_owned(), now);
                row.created_at = now;
                match insert_row(conn, &row).await {
                    Ok(()) => Ok(row.into_domain()),
                    // The processor stored this id between our read and
                    // our insert: its row wins and is the answer.
                    Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info)) => {
                        match find(conn, order.id.as_str()).await? {
                            Some(row) => Ok(row.into_domain()),
                            None => Err(DieselError::DatabaseError(
                                DatabaseErrorKind::UniqueViolation,
                                info,
                            )),
                        }
                    }
                    Err(err) => Err(err),
                }
            }

            pub(super) async fn position_of(
                conn: &mut $Conn,
                id: &str,
            ) -> QueryResult<Option<u64>> {
                match find(conn, id).await? {
                    Some(row) if row.state == ReservationState::Waitlisted.as_db() => {
                        Ok(Some(waitlist_position(conn, &row).await?))
                    }
                    _ => Ok(None),
                }
            }

            pub(super) async fn get(
                conn: &mut $Conn,
                id: &str,
            ) -> QueryResult<Option<Reservation>> {
                Ok(find(conn, id).await?.map(ReservationRow::into_domain))
            }

            async fn restock(
                conn: &mut $Conn,
                sku: &str,
                quantity: i32,
                now: NaiveDateTime,
            ) -> QueryResult<i64> {
                diesel::update(inventory::table.find(sku))
                    .set((
                        inventory::stock.eq(inventory::stock + i64::from(quantity)),
                        inventory::version.eq(inventory::version + 1),
                        inventory::updated_at.eq(now),
                    ))
                    .returning(inventory::version)
                    .get_result(conn)
                    .await
            }

            /// Moves a HELD reservation to `to`, returning its units to stock
            /// unless it is being confirmed. The `state = 'held'` condition
            /// makes the move happen once however often it is asked for.
            async fn transition(
                conn: &mut $Conn,
                row: &ReservationRow,
                to: ReservationState,
                now: NaiveDateTime,
                hold_ttl: Option<Duration>,
            ) -> QueryResult<Transition> {
                let target = reservations::table
                    .filter(reservations::reservation_id.eq(&row.reservation_id))
                    .filter(reservations::state.eq(ReservationState::Held.as_db()));
                let changes = (
                    reservations::state.eq(to.as_db()),
                    reservations::updated_at.eq(now),
                );
                let moved = if to == ReservationState::Confirmed {
                    // A lapsed hold cannot be confirmed even if the sweeper
                    // has not reached it yet.
                    let unexpired = reservations::expires_at
                        .is_null()
                        .or(reservations::expires_at.gt(now));
                    diesel::update(target.filter(unexpired))
                        .set(changes)
                        .execute(conn)
                        .await?
                } else {
                    diesel::update(target).set(changes).execute(conn).await?
                };
                if moved != 1 {
                    return Ok(Transition::Refused);
                }
                if to == ReservationState::Confirmed {
                    return Ok(Transition::Moved { restock: None });
                }
                let version = restock(conn, &row.sku, row.quantity, now).await?;
                let (handed, units, filled) = fill_waitlist(conn, &row.sku, now, hold_ttl).await?;
                Ok(Transition::Moved {
                    restock: Some(Restock {
                        stock_version: filled.unwrap_or(version),
                        returned: i64::from(row.quantity) - units,
                        handed,
                    }),
                })
            }

            /// Hands available units to the SKU's waitlist, oldest entry
            /// first, inside the caller's transaction (after the change that
            /// made them available, which locked the row): each entry that
            /// fits becomes HELD with a hold of its own. First come, first
            /// served: an entry that does not fit stops the hand-off rather
            /// than letting a later, smaller one pass it. An entry whose
            /// user is at the per-user limit is rejected and skipped.
            /// Returns the reservations handed units, the units, and the
            /// row version the stock update wrote (None when none moved).
            async fn fill_waitlist(
                conn: &mut $Conn,
                sku: &str,
                now: NaiveDateTime,
                hold_ttl: Option<Duration>,
            ) -> QueryResult<(Vec<Reservation>, i64, Option<i64>)> {
                let Some(current) = inventory(conn, sku).await? else {
                    return Ok((Vec::new(), 0, None));
                };
                if SoldOutPolicy::from_db(&current.sold_out_policy) != SoldOutPolicy::Waitlist {
                    return Ok((Vec::new(), 0, None));
                }
                let mut stock = current.stock;
                let mut handed = Vec::new();
                let mut units = 0;
                while stock > 0 {
                    let waiting: Vec<ReservationRow> = reservations::table
                        .filter(reservations::sku.eq(sku))
                        .filter(reservations::state.eq(ReservationState::Waitlisted.as_db()))
                        .filter(reservations::expires_at.is_null().or(reservations::expires_at.gt(now)))
                        .order((reservations::created_at.asc(), reservations::reservation_id.asc()))
                        .limit(64)
                        .select(ReservationRow::as_select())
                        .load(conn)
                        .await?;
                    if waiting.is_empty() {
                        break;
                    }
                    let mut blocked = false;
                    for entry in waiting {
                        let quantity = i64::from(entry.quantity);
                        if quantity > stock {
                            blocked = true;
                            break;
                        }
                        let next_state = if current.max_per_user > 0
                            && live_units(conn, sku, &entry.user_id).await? + quantity
                                > i64::from(current.max_per_user)
                        {
                            ReservationState::Rejected
                        } else {
                            ReservationState::Held
                        };
                        let expires_at = match next_state {
                            ReservationState::Held => hold_ttl.map(|ttl| after(now, ttl)),
                            _ => None,
                        };
                        let reason = (next_state == ReservationState::Rejected).then(|| {
                            format!(
                                "user limit: the waitlist's turn came with {} units already held",
                                current.max_per_user
                            )
                        });
                        diesel::update(
                            reservations::table
                                .filter(reservations::reservation_id.eq(&entry.reservation_id))
                                .filter(reservations::state.eq(ReservationState::Waitlisted.as_db())),
                        )
                        .set((
                            reservations::state.eq(next_state.as_db()),
                            reservations::expires_at.eq(expires_at),
                            reservations::reject_reason.eq(reason),
                            reservations::updated_at.eq(now),
                        ))
                        .execute(conn)
                        .await?;
                        let mut reservation = entry.into_domain();
                        reservation.state = next_state;
                        reservation.expires_at = expires_at;
                        reservation.updated_at = now;
                        if next_state == ReservationState::Held {
                            stock -= quantity;
                            units += quantity;
                        }
                        handed.push(reservation);
                        if stock == 0 {
                            break;
                        }
                    }
                    if blocked {
                        break;
                    }
                }
                if units == 0 {
                    return Ok((handed, 0, None));
                }
                let version = diesel::update(inventory::table.find(sku))
                    .set((
                        inventory::stock.eq(inventory::stock - units),
                        inventory::version.eq(inventory::version + 1),
                        inventory::updated_at.eq(now),
                    ))
                    .returning(inventory::version)
                    .get_result(conn)
                    .await?;
                Ok((handed, units, Some(version)))
            }

            async fn live_units(conn: &mut $Conn, sku: &str, user: &str) -> QueryResult<i64> {
                let live: Option<i64> = reservations::table
                    .filter(reservations::sku.eq(sku))
                    .filter(reservations::user_id.eq(user))
                    .filter(reservations::state.eq_any(LIVE_STATES))
                    .select(diesel::dsl::sum(reservations::quantity))
                    .first(conn)
                    .await?;
                Ok(live.unwrap_or(0))
            }

            /// Up to `limit` reservations in `state` whose `expires_at` has
            /// passed, the longest lapsed first.
            async fn lapsed(
                conn: &mut $Conn,
                state: ReservationState,
                now: NaiveDateTime,
                limit: i64,
            ) -> QueryResult<Vec<ReservationRow>> {
                reservations::table
                    .filter(reservations::state.eq(state.as_db()))
                    .filter(reservations::expires_at.le(now))
                    .order(reservations::expires_at.asc())
                    .limit(limit)
                    .select(ReservationRow::as_select())
                    .load(conn)
                    .await
            }

            /// Moves a WAITLISTED reservation to `to` (it leaves the line;
            /// no units involved); false if it was no longer waiting.
            async fn leave_line(
                conn: &mut $Conn,
                id: &str,
                to: ReservationState,
                now: NaiveDateTime,
            ) -> QueryResult<bool> {
                let moved = diesel::update(
                    reservations::table
                        .filter(reservations::reservation_id.eq(id))
                        .filter(reservations::state.eq(ReservationState::Waitlisted.as_db())),
                )
                .set((
                    reservations::state.eq(to.as_db()),
                    reservations::updated_at.eq(now),
                ))
                .execute(conn)
                .await?;
                Ok(moved == 1)
            }

            /// Entries ahead of `row` in its SKU's waitlist.
            async fn waitlist_position(conn: &mut $Conn, row: &ReservationRow) -> QueryResult<u64> {
                let ahead: i64 = reservations::table
                    .filter(reservations::sku.eq(&row.sku))
                    .filter(reservations::state.eq(ReservationState::Waitlisted.as_db()))
                    .filter(
                        reservations::created_at.lt(row.created_at).or(reservations::created_at
                            .eq(row.created_at)
                            .and(reservations::reservation_id.lt(&row.reservation_id))),
                    )
                    .count()
                    .get_result(conn)
                    .await?;
                Ok(u64::try_from(ahead).unwrap_or(0))
            }

            /// Puts `order` in its SKU's waitlist (see [`WaitlistJoin`]).
            pub(super) async fn join_waitlist(
                conn: &mut $Conn,
                order: &NewOrder,
                default_limit: u32,
                ttl: Duration,
                now: NaiveDateTime,
                stock_check: bool,
            ) -> QueryResult<WaitlistJoin> {
                conn.transaction::<_, DieselError, _>(async |conn| {
                    // Serialises joins with the hand-off, which runs under
                    // the same row lock.
                    let Some(current) = $lock(conn, order.sku.as_str()).await? else {
                        return Ok(WaitlistJoin::UnknownSku);
                    };
                    if SoldOutPolicy::from_db(&current.sold_out_policy) != SoldOutPolicy::Waitlist {
                        return Ok(WaitlistJoin::NotOffered);
                    }
                    let sku = order.sku.as_str();
                    let user = order.user.as_str();
                    let mine: Option<ReservationRow> = reservations::table
                        .filter(reservations::sku.eq(sku))
                        .filter(reservations::user_id.eq(user))
                        .filter(reservations::state.eq(ReservationState::Waitlisted.as_db()))
                        .select(ReservationRow::as_select())
                        .first(conn)
                        .await
                        .optional()?;
                    if let Some(row) = mine {
                        let position = waitlist_position(conn, &row).await?;
                        let mut reservation = row.into_domain();
                        reservation.waitlist_position = Some(position);
                        return Ok(WaitlistJoin::Waiting(reservation));
                    }
                    if let Some(key) = &order.idempotency_key {
                        let used: Option<ReservationRow> = reservations::table
                            .filter(reservations::user_id.eq(user))
                            .filter(reservations::idempotency_key.eq(key.as_str()))
                            .select(ReservationRow::as_select())
                            .first(conn)
                            .await
                            .optional()?;
                        if let Some(row) = used {
                            return Ok(WaitlistJoin::KeyUsed(row.into_domain()));
                        }
                    }
                    if stock_check && current.stock >= i64::from(order.quantity) {
                        return Ok(WaitlistJoin::InStock);
                    }
                    let quantity = i64::from(order.quantity);
                    if current.max_per_user > 0 {
                        let live = live_units(conn, sku, user).await?;
                        if live + quantity > i64::from(current.max_per_user) {
                            return Ok(WaitlistJoin::UserLimit {
                                live_units: live,
                                limit: current.max_per_user as u32,
                            });
                        }
                    }
                    let limit = match current.waitlist_limit {
                        0 => default_limit,
                        own => own as u32,
                    };
                    let waiting: i64 = reservations::table
                        .filter(reservations::sku.eq(sku))
                        .filter(reservations::state.eq(ReservationState::Waitlisted.as_db()))
                        .count()
                        .get_result(conn)
                        .await?;
                    if waiting >= i64::from(limit) {
                        return Ok(WaitlistJoin::Full { limit });
                    }
                    let mut row = row_for(order, ReservationState::Waitlisted, now);
                    row.expires_at = Some(after(now, ttl));
                    insert_row(conn, &row).await?;
                    let mut reservation = row.into_domain();
                    reservation.waitlist_position = Some(u64::try_from(waiting).unwrap_or(0));
                    Ok(WaitlistJoin::Waiting(reservation))
                })
                .await
            }

            /// Sets a SKU's sold-out policy and waitlist limit. Switching to
            /// `instant` ends every waiting entry (EXPIRED, with the reason),
            /// since nothing would ever hand them units. Returns the row and
            /// the entries it ended.
            pub(super) async fn set_sold_out_policy(
                conn: &mut $Conn,
                sku: &str,
                policy: SoldOutPolicy,
                waitlist_limit: i32,
                now: NaiveDateTime,
            ) -> QueryResult<Option<(InventoryRow, Vec<Reservation>)>> {
                conn.transaction::<_, DieselError, _>(async |conn| {
                    let updated = diesel::update(inventory::table.find(sku))
                        .set((
                            inventory::sold_out_policy.eq(policy.as_db()),
                            inventory::waitlist_limit.eq(waitlist_limit),
                            inventory::updated_at.eq(now),
                        ))
                        .execute(conn)
                        .await?;
                    if updated == 0 {
                        return Ok(None);
                    }
                    let mut ended = Vec::new();
                    if policy == SoldOutPolicy::Instant {
                        let waiting: Vec<ReservationRow> = reservations::table
                            .filter(reservations::sku.eq(sku))
                            .filter(reservations::state.eq(ReservationState::Waitlisted.as_db()))
                            .select(ReservationRow::as_select())
                            .load(conn)
                            .await?;
                        let reason = "the waitlist was closed";
                        diesel::update(
                            reservations::table
                                .filter(reservations::sku.eq(sku))
                                .filter(reservations::state.eq(ReservationState::Waitlisted.as_db())),
                        )
                        .set((
                            reservations::state.eq(ReservationState::Expired.as_db()),
                            reservations::reject_reason.eq(reason),
                            reservations::updated_at.eq(now),
                        ))
                        .execute(conn)
                        .await?;
                        ended = waiting
                            .into_iter()
                            .map(|row| {
                                let mut reservation = row.into_domain();
                                reservation.state = ReservationState::Expired;
                                reservation.reject_reason = Some(reason.into());
                                reservation.updated_at = now;
                                reservation
                            })
                            .collect();
                    }
                    let row = inventory(conn, sku).await?.expect("updated in this transaction");
                    Ok(Some((row, ended)))
                })
                .await
            }

            pub(super) async fn settle(
                conn: &mut $Conn,
                id: &str,
                user: &str,
                to: ReservationState,
                now: NaiveDateTime,
                hold_ttl: Option<Duration>,
            ) -> QueryResult<Settled> {
                conn.transaction::<_, DieselError, _>(async |conn| {
                    let Some(row) = find(conn, id).await? else {
                        return Ok(Settled::NotFound);
                    };
                    if row.user_id != user {
                        return Ok(Settled::NotOwner);
                    }
                    let state = ReservationState::from_db(&row.state);
                    if state == Some(to) {
                        return Ok(Settled::Unchanged(row.into_domain()));
                    }
                    if state == Some(ReservationState::Waitlisted)
                        && to == ReservationState::Released
                    {
                        // Leaving the line: no units to return.
                        let moved = leave_line(conn, id, to, now).await?;
                        let row = find(conn, id).await?.expect("rows are never deleted");
                        return Ok(if moved {
                            Settled::Changed {
                                reservation: row.into_domain(),
                                restock: None,
                            }
                        } else {
                            Settled::Unchanged(row.into_domain())
                        });
                    }
                    if state != Some(ReservationState::Held) {
                        // Releasing something no longer held is a no-op;
                        // confirming it is an error.
                        return Ok(
                            if to == ReservationState::Released
                                && state != Some(ReservationState::Confirmed)
                            {
                                Settled::Unchanged(row.into_domain())
                            } else {
                                Settled::WrongState(row.into_domain())
                            },
                        );
                    }
                    if let Transition::Moved { restock } =
                        transition(conn, &row, to, now, hold_ttl).await?
                    {
                        let row = find(conn, id)
                            .await?
                            .expect("row updated in this transaction");
                        return Ok(Settled::Changed {
                            reservation: row.into_domain(),
                            restock,
                        });
                    }
                    let row = find(conn, id).await?.expect("rows are never deleted");
                    Ok(
                        if ReservationState::from_db(&row.state) == Some(ReservationState::Held) {
                            Settled::HoldExpired(row.into_domain())
                        } else {
                            Settled::WrongState(row.into_domain())
                        },
                    )
                })
                .await
            }

            pub(super) async fn expire_due(
                conn: &mut $Conn,
                now: NaiveDateTime,
                limit: i64,
                hold_ttl: Option<Duration>,
            ) -> QueryResult<Vec<(Reservation, Option<Restock>)>> {
                conn.transaction::<_, DieselError, _>(async |conn| {
                    // Waitlist entries past their time leave the line first,
                    // so a hold expiring below does not hand them units.
                    let waited_out = lapsed(conn, ReservationState::Waitlisted, now, limit).await?;
                    let mut expired = Vec::new();
                    for row in waited_out {
                        if leave_line(conn, &row.reservation_id, ReservationState::Expired, now)
                            .await?
                        {
                            let mut reservation = row.into_domain();
                            reservation.state = ReservationState::Expired;
                            reservation.updated_at = now;
                            expired.push((reservation, None));
                        }
                    }
                    let due = lapsed(conn, ReservationState::Held, now, limit).await?;
                    for row in due {
                        if let Transition::Moved { restock } =
                            transition(conn, &row, ReservationState::Expired, now, hold_ttl)
                                .await?
                        {
                            let mut reservation = row.into_domain();
                            reservation.state = ReservationState::Expired;
                            reservation.updated_at = now;
                            expired.push((reservation, restock));
                        }
                    }
                    Ok(expired)
                })
                .await
            }

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

            pub(super) async fn unit_totals(
                conn: &mut $Conn,
                sku: &str,
            ) -> QueryResult<UnitTotals> {
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
                        Some(ReservationState::Waitlisted) => {
                            totals.waitlisted = units.unwrap_or(0)
                        }
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
        }
    };
}

queries!(pg, AsyncPgConnection, lock_inventory_pg, insert_rows_pg);
queries!(
    sqlite,
    SqliteConn,
    lock_inventory_sqlite,
    insert_rows_sqlite
);

/// Runs `$f` from the query module matching the pool, on a pooled connection.
macro_rules! dispatch {
    ($self:ident . $f:ident ( $($arg:expr),* $(,)? )) => {
        match &*$self.pool {
            Pool::Pg(pool) => {
                let mut conn = pool.get().await.map_err(|e| StoreError::Connect(e.to_string()))?;
                pg::$f(&mut conn, $($arg),*).await.map_err(StoreError::from)
            }
            Pool::Sqlite(pool) => {
                let mut conn = pool.get().await.map_err(|e| StoreError::Connect(e.to_string()))?;
                sqlite::$f(&mut conn, $($arg),*).await.map_err(StoreError::from)
            }
        }
    };
}

impl Store {
    /// Builds the pool without connecting, so the server can start (and
    /// report NOT_SERVING) while the database is still coming up.
    pub fn connect(target: StoreBackend, config: &StoreConfig) -> Result<Self, StoreError> {
        let timeout = Duration::from_millis(config.acquire_timeout_ms);
        let pool = match &target {
            StoreBackend::Postgres(url) => {
                let manager = manager_running::<AsyncPgConnection>(url, PG_SESSION);
                Pool::Pg(
                    bb8::Pool::builder()
                        .max_size(config.max_connections)
                        .connection_timeout(timeout)
                        .build_unchecked(manager),
                )
            }
            StoreBackend::Sqlite(path) => {
                let manager = manager_running::<SqliteConn>(path, SQLITE_PRAGMAS);
                // One connection: SQLite has one writer, and a single
                // connection serialises transactions without busy errors.
                Pool::Sqlite(
                    bb8::Pool::builder()
                        .max_size(1)
                        .connection_timeout(timeout)
                        .build_unchecked(manager),
                )
            }
        };
        Ok(Self {
            pool: std::sync::Arc::new(pool),
            target: std::sync::Arc::new(target),
        })
    }

    /// "postgres" or "sqlite", for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match &*self.pool {
            Pool::Pg(_) => "postgres",
            Pool::Sqlite(_) => "sqlite",
        }
    }

    /// Applies pending migrations on a dedicated connection; returns how
    /// many ran. Needs the multi-threaded runtime (diesel's harness blocks).
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        self.with_harness(|harness, source| {
            harness
                .run_pending_migrations(source)
                .map(|done| done.len())
        })
        .await
    }

    /// How many migrations have not been applied yet.
    pub async fn pending_migrations(&self) -> Result<usize, StoreError> {
        self.with_harness(|harness, source| {
            harness.pending_migrations(source).map(|todo| todo.len())
        })
        .await
    }

    /// Reverts the latest migration (operators and the down.sql tests).
    pub async fn revert_last_migration(&self) -> Result<(), StoreError> {
        self.with_harness(|harness, source| harness.revert_last_migration(source).map(|_| 0))
            .await
            .map(|_| ())
    }

    async fn with_harness<F>(&self, run: F) -> Result<usize, StoreError>
    where
        F: FnOnce(
                &mut dyn MigrationHarnessAny,
                EmbeddedMigrations,
            ) -> diesel::migration::Result<usize>
            + Send,
    {
        let error = |e: &dyn std::fmt::Display| StoreError::Migration(e.to_string());
        match &*self.target {
            StoreBackend::Postgres(url) => {
                let conn = AsyncPgConnection::establish(url)
                    .await
                    .map_err(|e| StoreError::Connect(e.to_string()))?;
                let mut harness = AsyncMigrationHarness::new(conn);
                tokio::task::block_in_place(|| run(&mut PgHarness(&mut harness), PG_MIGRATIONS))
                    .map_err(|e| error(&*e))
            }
            StoreBackend::Sqlite(path) => {
                let conn = SqliteConn::establish(path)
                    .await
                    .map_err(|e| StoreError::Connect(e.to_string()))?;
                let mut harness = AsyncMigrationHarness::new(conn);
                tokio::task::block_in_place(|| {
                    run(&mut SqliteHarness(&mut harness), SQLITE_MIGRATIONS)
                })
                .map_err(|e| error(&*e))
            }
        }
    }

    /// A setting of a pooled connection's session (PostgreSQL only), as
    /// `SHOW` gives it: shows what [`PG_SESSION`] set.
    pub async fn session_setting(&self, name: &str) -> Result<String, StoreError> {
        let mut conn = self.pg_conn("session settings are PostgreSQL's").await?;
        let row: Setting = diesel::sql_query("SELECT current_setting($1) AS value")
            .bind::<diesel::sql_types::Text, _>(name)
            .get_result(&mut *conn)
            .await?;
        Ok(row.value)
    }

    /// A round trip, for readiness.
    pub async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self.ping())
    }

    /// Commits one order in its own transaction (queue off).
    pub async fn commit_order(
        &self,
        order: &NewOrder,
        params: CommitParams,
    ) -> Result<CommitOutcome, StoreError> {
        dispatch!(self.commit_one(order, params))
    }

    /// Commits orders in one transaction, each behind its own savepoint and
    /// its own optimistic check, in the given order (the queue path).
    pub async fn commit_batch(
        &self,
        orders: &[NewOrder],
        params: CommitParams,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        dispatch!(self.commit_batch(orders, params))
    }

    /// See `record_failed` in the query module.
    pub async fn record_failed(
        &self,
        order: &NewOrder,
        reason: &str,
        now: NaiveDateTime,
    ) -> Result<Reservation, StoreError> {
        dispatch!(self.record_failed(order, reason, now))
    }

    /// `n` fresh tickets of the shared queue-position sequence, in one
    /// round trip, ascending (PostgreSQL only: replicas sharing RabbitMQ
    /// share the database).
    pub async fn next_tickets(&self, n: usize) -> Result<Vec<u64>, StoreError> {
        let mut conn = self.pg_conn(TICKETS_NEED_PG).await?;
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        let rows: Vec<Ticket> = diesel::sql_query(
            "SELECT nextval('order_tickets') AS value FROM generate_series(1, $1)",
        )
        .bind::<diesel::sql_types::BigInt, _>(n)
        .load(&mut *conn)
        .await?;
        // Row order is not promised; callers hand them out in arrival order.
        let mut tickets: Vec<u64> = rows
            .into_iter()
            .map(|t| u64::try_from(t.value).unwrap_or(0))
            .collect();
        tickets.sort_unstable();
        Ok(tickets)
    }

    /// The last ticket handed out, 0 before the first.
    pub async fn last_ticket(&self) -> Result<u64, StoreError> {
        let sql =
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS value FROM order_tickets";
        self.ticket_query(sql, None).await
    }

    /// The highest ticket the processor settled.
    pub async fn queue_done_through(&self) -> Result<u64, StoreError> {
        self.ticket_query("SELECT done_through AS value FROM queue_progress", None)
            .await
    }

    /// Records that the processor settled every ticket up to `through`.
    pub async fn advance_queue(&self, through: u64) -> Result<(), StoreError> {
        let sql = "UPDATE queue_progress SET done_through = GREATEST(done_through, $1) \
                   WHERE id = 1 RETURNING done_through AS value";
        self.ticket_query(sql, Some(through)).await.map(|_| ())
    }

    async fn ticket_query(&self, sql: &'static str, bind: Option<u64>) -> Result<u64, StoreError> {
        let mut conn = self.pg_conn(TICKETS_NEED_PG).await?;
        let query = diesel::sql_query(sql);
        let ticket: Ticket = match bind {
            Some(value) => {
                let value = i64::try_from(value).unwrap_or(i64::MAX);
                query
                    .bind::<diesel::sql_types::BigInt, _>(value)
                    .get_result(&mut *conn)
                    .await?
            }
            None => query.get_result(&mut *conn).await?,
        };
        Ok(u64::try_from(ticket.value).unwrap_or(0))
    }

    /// A pooled PostgreSQL connection; `needs` is the error's text on
    /// SQLite.
    async fn pg_conn(
        &self,
        needs: &'static str,
    ) -> Result<bb8::PooledConnection<'_, AsyncPgConnection>, StoreError> {
        let Pool::Pg(pool) = &*self.pool else {
            return Err(StoreError::Unsupported(needs));
        };
        pool.get()
            .await
            .map_err(|e| StoreError::Connect(e.to_string()))
    }

    pub async fn reservation(&self, id: &ReservationId) -> Result<Option<Reservation>, StoreError> {
        dispatch!(self.get(id.as_str()))
    }

    pub async fn confirm(
        &self,
        id: &ReservationId,
        user: &UserId,
        now: NaiveDateTime,
    ) -> Result<Settled, StoreError> {
        dispatch!(self.settle(
            id.as_str(),
            user.as_str(),
            ReservationState::Confirmed,
            now,
            None
        ))
    }

    /// Releases a hold and returns its units to stock (or to the oldest
    /// waitlist entries, which get holds of `hold_ttl`), once. A waitlisted
    /// reservation leaves the line.
    pub async fn release(
        &self,
        id: &ReservationId,
        user: &UserId,
        now: NaiveDateTime,
        hold_ttl: Option<Duration>,
    ) -> Result<Settled, StoreError> {
        dispatch!(self.settle(
            id.as_str(),
            user.as_str(),
            ReservationState::Released,
            now,
            hold_ttl
        ))
    }

    /// Expires lapsed waitlist entries, then up to `limit` lapsed holds,
    /// whose units return as [`Store::release`]'s do.
    pub async fn expire_due(
        &self,
        now: NaiveDateTime,
        limit: i64,
        hold_ttl: Option<Duration>,
    ) -> Result<Vec<(Reservation, Option<Restock>)>, StoreError> {
        dispatch!(self.expire_due(now, limit, hold_ttl))
    }

    /// See [`WaitlistJoin`]; `default_limit` applies where the SKU sets
    /// none, `ttl` is how long the entry waits. `stock_check`: answer
    /// `InStock` when the row has the units, which is right only where no
    /// admitted order is still on its way to the database.
    pub async fn join_waitlist(
        &self,
        order: &NewOrder,
        default_limit: u32,
        ttl: Duration,
        now: NaiveDateTime,
        stock_check: bool,
    ) -> Result<WaitlistJoin, StoreError> {
        dispatch!(self.join_waitlist(order, default_limit, ttl, now, stock_check))
    }

    /// Sets a SKU's sold-out policy; `None` for an unknown SKU.
    pub async fn set_sold_out_policy(
        &self,
        sku: &Sku,
        policy: SoldOutPolicy,
        waitlist_limit: u32,
        now: NaiveDateTime,
    ) -> Result<Option<(InventoryRow, Vec<Reservation>)>, StoreError> {
        let limit = i32::try_from(waitlist_limit).unwrap_or(i32::MAX);
        dispatch!(self.set_sold_out_policy(sku.as_str(), policy, limit, now))
    }

    /// A waitlisted reservation with its current position.
    pub async fn with_waitlist_position(
        &self,
        reservation: Reservation,
    ) -> Result<Reservation, StoreError> {
        if reservation.state != ReservationState::Waitlisted {
            return Ok(reservation);
        }
        let id = reservation.id.clone();
        let position = dispatch!(self.position_of(id.as_str()))?;
        Ok(Reservation {
            waitlist_position: position,
            ..reservation
        })
    }

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

/// A pool manager whose every new connection runs `session` (settings or
/// pragmas) before it is handed out; a connection that fails to is never
/// pooled.
fn manager_running<C>(url: &str, session: &'static str) -> AsyncDieselConnectionManager<C>
where
    C: AsyncConnection + SimpleAsyncConnection + Send + 'static,
{
    let mut setup = ManagerConfig::default();
    setup.custom_setup = Box::new(move |url| {
        async move {
            let mut conn = C::establish(url).await?;
            conn.batch_execute(session)
                .await
                .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            Ok(conn)
        }
        .boxed()
    });
    AsyncDieselConnectionManager::new_with_config(url, setup)
}

/// Every pooled PostgreSQL connection plans each statement for the values
/// it is run with. Our statements are prepared and cached per connection,
/// and after five runs PostgreSQL may switch one to a generic plan, chosen
/// for the table as it was then. Prepared on a new deployment's nearly
/// empty tables, the processor's lookups (`reservation_id = ANY($1)`, the
/// (user, key) pairs) kept sequential scans as a sale grew `reservations`
/// to tens of thousands of rows, until only an ANALYZE (autovacuum, if it
/// is on at all) would replan them. Measured (`stockgate bench` through
/// RabbitMQ on a new database): each round's drain took 6, 16, then 25 s of
/// PostgreSQL at full core, 1,554 µs of machine CPU per order; planned
/// per run, 380 µs. Planning these short statements costs far less. A
/// session setting: a pooler in between must run in session mode (which
/// the prepared statements need as well).
const PG_SESSION: &str = "SET plan_cache_mode = force_custom_plan;";

/// WAL lets readers run beside the writer; NORMAL sync is durable across
/// process crashes (not power loss), which fits a laptop profile.
const SQLITE_PRAGMAS: &str = "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
     PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;";

/// The harness operations we use, object-safe so one closure serves both
/// backends.
pub trait MigrationHarnessAny {
    fn run_pending_migrations(
        &mut self,
        source: EmbeddedMigrations,
    ) -> diesel::migration::Result<Vec<String>>;
    fn pending_migrations(
        &mut self,
        source: EmbeddedMigrations,
    ) -> diesel::migration::Result<Vec<String>>;
    fn revert_last_migration(
        &mut self,
        source: EmbeddedMigrations,
    ) -> diesel::migration::Result<String>;
}

macro_rules! harness_any {
    ($name:ident, $Conn:ty) => {
        struct $name<'a>(&'a mut AsyncMigrationHarness<$Conn>);

        impl MigrationHarnessAny for $name<'_> {
            fn run_pending_migrations(
                &mut self,
                source: EmbeddedMigrations,
            ) -> diesel::migration::Result<Vec<String>> {
                MigrationHarness::run_pending_migrations(self.0, source)
                    .map(|done| done.iter().map(|v| v.to_string()).collect())
            }
            fn pending_migrations(
                &mut self,
                source: EmbeddedMigrations,
            ) -> diesel::migration::Result<Vec<String>> {
                MigrationHarness::pending_migrations(self.0, source)
                    .map(|todo| todo.iter().map(|m| m.name().to_string()).collect())
            }
            fn revert_last_migration(
                &mut self,
                source: EmbeddedMigrations,
            ) -> diesel::migration::Result<String> {
                MigrationHarness::revert_last_migration(self.0, source).map(|v| v.to_string())
            }
        }
    };
}

harness_any!(PgHarness, AsyncPgConnection);
harness_any!(SqliteHarness, SqliteConn);
