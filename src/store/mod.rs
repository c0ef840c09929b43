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
//! The query code is written once per concern (`commit.rs`, `holds.rs`,
//! `stock.rs`, `sale.rs`, each a macro) and instantiated per connection type by
//! `dialect!`, because diesel's query builder is typed by backend; [`Store`]
//! picks the instance for the pool it holds. All of them expand into the same
//! module per dialect, so they call each other's helpers (committing fills
//! a waitlist's positions, a stock write hands units to the waitlist).
//! `tickets.rs` numbers the queue, `migrate.rs` runs the embedded
//! migrations.

mod fleet;
mod models;
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
    AsyncConnection, AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection,
};
use diesel_migrations::{embed_migrations, EmbeddedMigrations};
use futures::FutureExt;

pub use fleet::{AuditRow, NewAudit, ReplicaRow, ReservationFilter, SkuFigures, StoredSwitches};
pub use models::InventoryRow;
use models::ReservationRow;
use schema::{inventory, reservations, sales};

use crate::{
    config::{DbCheckMode, StoreBackend, StoreConfig},
    domain::{
        IdempotencyKey, Reservation, ReservationId, ReservationState, SaleWindow, Sku,
        SoldOutPolicy, UserId, WindowCheck,
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
    /// Whether the statement (a commit, say) may have taken effect though
    /// its answer never came: the connection broke while it ran. A refused
    /// connection or a statement the server rejected changed nothing.
    pub fn outcome_unknown(&self) -> bool {
        match self {
            Self::Query(DieselError::BrokenTransactionManager) => true,
            Self::Query(DieselError::DatabaseError(kind, info)) => {
                matches!(
                    kind,
                    DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand
                ) || info.message().contains("terminating connection")
            }
            _ => false,
        }
    }

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

/// How the reason of a REJECTED row starts when the user held the SKU's
/// own per-user limit already (a sale's cap: [`SALE_LIMIT_REASON`]).
pub const USER_LIMIT_REASON: &str = "user limit";

/// The REJECTED reason of an order over the SKU's per-user `limit`, with
/// `live` units held.
pub fn user_limit_reason(live: i64, limit: impl std::fmt::Display) -> String {
    format!("{USER_LIMIT_REASON}: {live} of {limit} units already held")
}

/// How the reason of a REJECTED row starts when the processor gave the
/// order up (the database kept refusing it with an error, or its message
/// could not be read). Only such a row is decided again when an operator
/// redrives the order from the dead-letter queue.
pub const GIVEN_UP_REASON: &str = "processing failed";

/// The reason of a REJECTED row whose Reserve was decided outside the
/// SKU's sale window (a gate whose copy of the window was stale admitted
/// it); `None` inside it.
pub fn window_reason(check: WindowCheck) -> Option<String> {
    let at = crate::error::rfc3339_ms;
    match check {
        WindowCheck::Open => None,
        WindowCheck::NotOpen(opens) => Some(format!("{NOT_OPEN_REASON} {}", at(&opens))),
        WindowCheck::Closed(closes) => Some(format!("{CLOSED_REASON} {}", at(&closes))),
    }
}

/// How [`window_reason`]'s reasons start.
pub const NOT_OPEN_REASON: &str = "the sale opens at";
pub const CLOSED_REASON: &str = "the sale closed at";

/// Whether a REJECTED row's reason is the sale window's: the order was
/// decided outside it, and the same call later may be decided otherwise.
pub fn is_window_reason(reason: &str) -> bool {
    reason.starts_with(NOT_OPEN_REASON) || reason.starts_with(CLOSED_REASON)
}

/// What the reason of a given-up row starts with once an operator purged
/// its dead letter.
pub const PURGED_PREFIX: &str = "purged from the dead-letter queue: ";

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
    /// Over the user's limit: the SKU's own, or the cap of `sale`.
    UserLimit {
        live_units: i64,
        limit: u32,
        sale: Option<String>,
    },
    UnknownSku,
    /// Decided outside the SKU's sale window; nothing was written.
    OutsideWindow(WindowCheck),
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

/// What the database decided for a cart.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CartOutcome {
    /// Every line is HELD: the cart with its lines, and per line the SKU
    /// row's version the commit wrote.
    Committed {
        cart: Reservation,
        versions: Vec<i64>,
    },
    /// The cart's id, or its user's idempotency key, was used before:
    /// that reservation (a cart with its lines, or a single one).
    Existing(Reservation),
    /// Some line could not be filled and nothing was written. Per line,
    /// in order: `None` where the line would have been filled, else why
    /// not (sold out, a limit, the window, an unknown SKU, contention).
    Refused(Vec<Option<CommitOutcome>>),
}

/// Why a recorded order was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectCause {
    SoldOut,
    UserLimit,
    DuplicateKey,
    OutsideWindow,
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
pub enum HoldEnded {
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
    /// A cart's lines moved now (the cart, with its lines), and the units
    /// each released line gave back.
    CartChanged {
        cart: Reservation,
        restocks: Vec<(Reservation, Restock)>,
    },
}

/// What asking a hold to last longer did.
#[derive(Debug, Clone, PartialEq)]
pub enum HoldExtended {
    /// Its expiry moved to the time asked for.
    Extended(Reservation),
    /// It already lasted that long, or holds never expire; nothing changed.
    Unchanged(Reservation),
    NotFound,
    NotOwner,
    /// Not HELD.
    WrongState(Reservation),
    /// HELD, but its time has run out.
    HoldExpired(Reservation),
    /// The hold would last longer than allowed; `latest` is the latest
    /// expiry it may have. Nothing changed.
    Limit {
        latest: NaiveDateTime,
    },
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
    /// The join was decided outside the SKU's sale window.
    OutsideWindow(WindowCheck),
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
    statements: Statements,
}

/// Counts the statements a store's connections run, transaction control
/// included (diesel's instrumentation sees each one finish), so a test or
/// the bench can show what a batch costs the database.
#[derive(Clone, Default)]
struct Statements(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl diesel::connection::Instrumentation for Statements {
    fn on_connection_event(&mut self, event: diesel::connection::InstrumentationEvent<'_>) {
        if let diesel::connection::InstrumentationEvent::FinishQuery { .. } = event {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").finish_non_exhaustive()
    }
}

/// `ttl` after `now`, saturating (a huge configured TTL means "never").
pub(crate) fn after(now: NaiveDateTime, ttl: Duration) -> NaiveDateTime {
    now + chrono::TimeDelta::from_std(ttl).unwrap_or(chrono::TimeDelta::MAX)
}

const LIVE_STATES: [&str; 2] = ["held", "confirmed"];
const TOTALLED_STATES: [&str; 3] = ["held", "confirmed", "waitlisted"];
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

/// Runs `$f` from the query module matching the pool, on a pooled connection.
macro_rules! dispatch {
    ($self:ident . $f:ident ( $($arg:expr),* $(,)? )) => {
        match &*$self.pool {
            $crate::store::Pool::Pg(pool) => {
                let mut conn = pool
                    .get()
                    .await
                    .map_err(|e| $crate::store::StoreError::Connect(e.to_string()))?;
                $crate::store::pg::$f(&mut conn, $($arg),*)
                    .await
                    .map_err($crate::store::StoreError::from)
            }
            $crate::store::Pool::Sqlite(pool) => {
                let mut conn = pool
                    .get()
                    .await
                    .map_err(|e| $crate::store::StoreError::Connect(e.to_string()))?;
                $crate::store::sqlite::$f(&mut conn, $($arg),*)
                    .await
                    .map_err($crate::store::StoreError::from)
            }
        }
    };
}

#[macro_use]
mod commit;
#[macro_use]
mod holds;
#[macro_use]
mod stock;
#[macro_use]
mod sale;
#[macro_use]
mod carts;
mod dialect;
mod leases;
mod migrate;
mod tickets;
pub use carts::line_reason;
pub use dialect::SALE_LOCK_SPACE;
pub use leases::{LeaseSession, Members};
use sale::{sale_limit_reason, SaleCap};
pub use sale::{sale_user_key, SaleView, SaleWrite, SALE_LIMIT_REASON};
pub use tickets::LineProgress;
pub mod tls;

pub use migrate::MigrationHarnessAny;

/// One module of queries per connection type; `own` is that type's
/// statements the dialects write differently (`dialect.rs`).
macro_rules! dialect {
    ($name:ident, $Conn:ty) => {
        mod $name {
            use super::dialect::$name as own;
            use super::*;

            commit_queries!($Conn);
            holds_queries!($Conn);
            stock_queries!($Conn);
            sales_queries!($Conn);
            cart_queries!($Conn);
        }
    };
}

dialect!(pg, AsyncPgConnection);
dialect!(sqlite, SqliteConn);

impl Store {
    /// Builds the pool without connecting, so the server can start (and
    /// report NOT_SERVING) while the database is still coming up.
    pub fn connect(target: StoreBackend, config: &StoreConfig) -> Result<Self, StoreError> {
        Self::connect_with_password(target, config, None)
    }

    /// As [`Self::connect`], each new PostgreSQL connection logging in with
    /// the password `password` holds then (a rotated password file).
    pub fn connect_with_password(
        target: StoreBackend,
        config: &StoreConfig,
        password: Option<tokio::sync::watch::Receiver<String>>,
    ) -> Result<Self, StoreError> {
        let timeout = Duration::from_millis(config.acquire_timeout_ms);
        let statements = Statements::default();
        let pool = match &target {
            StoreBackend::Postgres(url) => {
                let tls = match tls::wanted(url) {
                    Some(_) => Some(tls::client_config(config).map_err(StoreError::Connect)?),
                    None => None,
                };
                let manager = pg_manager(url, password, tls, statements.clone());
                Pool::Pg(
                    bb8::Pool::builder()
                        .max_size(config.max_connections)
                        .connection_timeout(timeout)
                        .build_unchecked(manager),
                )
            }
            StoreBackend::Sqlite(path) => {
                let manager =
                    manager_running::<SqliteConn>(path, SQLITE_PRAGMAS, None, statements.clone());
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
            statements,
        })
    }

    /// Statements this store's connections have run so far, `BEGIN`,
    /// `COMMIT`, savepoints and the pool's check-out ping (`SELECT 1`)
    /// included.
    pub fn statements(&self) -> u64 {
        // `load` alone would be diesel's RunQueryDsl::load.
        std::sync::atomic::AtomicU64::load(&self.statements.0, std::sync::atomic::Ordering::Relaxed)
    }

    /// "postgres" or "sqlite", for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match &*self.pool {
            Pool::Pg(_) => "postgres",
            Pool::Sqlite(_) => "sqlite",
        }
    }

    /// A setting of a pooled connection's session (PostgreSQL only), as
    /// `SHOW` gives it: shows what `PG_SESSION` set.
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
}

/// `url` with the password `password` holds now, if it comes from a file.
fn with_current_password(
    url: &str,
    password: Option<&tokio::sync::watch::Receiver<String>>,
) -> String {
    password
        .and_then(|password| crate::config::secrets::with_password(url, &password.borrow()))
        .unwrap_or_else(|| url.to_owned())
}

/// PostgreSQL connections as [`manager_running`] makes them, over TLS
/// (`tls`) when the URL asks for it.
fn pg_manager(
    url: &str,
    password: Option<tokio::sync::watch::Receiver<String>>,
    tls: Option<(std::sync::Arc<rustls::ClientConfig>, String)>,
    statements: Statements,
) -> AsyncDieselConnectionManager<AsyncPgConnection> {
    let Some((tls, hint)) = tls else {
        return manager_running::<AsyncPgConnection>(url, PG_SESSION, password, statements);
    };
    let mut setup = ManagerConfig::default();
    setup.custom_setup = Box::new(move |url| {
        let url = with_current_password(url, password.as_ref());
        let tls = tls.clone();
        let hint = hint.clone();
        let statements = statements.clone();
        async move {
            let url = tls::wanted(&url).unwrap_or(url);
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new((*tls).clone());
            let (client, connection) =
                tokio_postgres::connect(&url, connector)
                    .await
                    .map_err(|e| {
                        diesel::ConnectionError::BadConnection(format!(
                            "{} ({hint})",
                            crate::error::DisplayChain(&e)
                        ))
                    })?;
            let mut conn =
                AsyncPgConnection::try_from_client_and_connection(client, connection).await?;
            conn.batch_execute(PG_SESSION)
                .await
                .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            conn.set_instrumentation(statements);
            Ok(conn)
        }
        .boxed()
    });
    AsyncDieselConnectionManager::new_with_config(url, setup)
}

/// A pool manager whose every new connection runs `session` (settings or
/// pragmas) before it is handed out; a connection that fails to is never
/// pooled.
fn manager_running<C>(
    url: &str,
    session: &'static str,
    password: Option<tokio::sync::watch::Receiver<String>>,
    statements: Statements,
) -> AsyncDieselConnectionManager<C>
where
    C: AsyncConnection + SimpleAsyncConnection + Send + 'static,
{
    let mut setup = ManagerConfig::default();
    setup.custom_setup = Box::new(move |url| {
        let url = with_current_password(url, password.as_ref());
        let statements = statements.clone();
        async move {
            let mut conn = C::establish(&url).await.map_err(|e| {
                let message = e.to_string();
                // PostgreSQL's pg_hba refusal of a plaintext connection.
                if message.contains("no encryption") {
                    diesel::ConnectionError::BadConnection(format!(
                        "{message} (backends.store, plaintext: the server takes only TLS; add sslmode=verify-full)"
                    ))
                } else {
                    e
                }
            })?;
            conn.batch_execute(session)
                .await
                .map_err(diesel::ConnectionError::CouldntSetupConfiguration)?;
            conn.set_instrumentation(statements);
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
