//! The reservation pipeline: one Reserve call through the layers that sit
//! behind the middleware (stock gate → order queue or request-path commit →
//! database check), plus the order processor's batch step, the lifecycle
//! (confirm, release, expiry) and the operator actions that must keep the
//! gate and the database consistent.
//!
//! The rule everywhere: the gate and the queue may only filter. Units the
//! gate took for a reservation go back to it exactly when the database did
//! not take them (`Pipeline::settle_gate`), and every decision the caller
//! heard as RESERVED or QUEUED ends as a database row.

mod batch;
mod cart;
mod lifecycle;
mod operator;
mod path;
mod pending;
mod reconcile;
mod watch;

pub use watch::WatchUpdate;
use watch::Watches;

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use tokio::sync::{broadcast, Notify};

use crate::{
    config::Config,
    domain::{
        switches::{GateFailureMode, Layers, Switches},
        Clock, IdempotencyKey, Quantity, Reservation, Sku, UserId, WindowCheck,
    },
    error::ReservationError,
    gate::{GateEntry, GateError, SaleCap, SkuStock, SoldOutCache, StockGate, WindowMs},
    metrics,
    queue::{OrderQueue, QueueError},
    store::{CommitOutcome, InventoryRow, NewOrder, RejectCause, Store, StoreError},
};

pub use batch::BatchOutcome;
pub use cart::{CartCommand, CartResult, LineRefusal};
pub use path::{COMMIT_FENCE_REASON, FENCE_REASON};
use pending::{KeyState, Pending, PendingBook};
pub use reconcile::ReconcileReport;

/// A validated Reserve call.
#[derive(Debug, Clone)]
pub struct ReserveCommand {
    pub sku: Sku,
    pub user: UserId,
    pub quantity: Quantity,
    pub idempotency_key: Option<IdempotencyKey>,
    /// On sold out, join the SKU's waitlist if its policy offers one.
    pub join_waitlist: bool,
}

/// How a Reserve call was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReserveResult {
    Reserved {
        reservation: Reservation,
        remaining: Option<i64>,
    },
    Queued {
        reservation: Reservation,
        position: u64,
        remaining: Option<i64>,
    },
    SoldOut {
        remaining: Option<i64>,
    },
    UserLimit,
    /// An earlier call with the same idempotency key made this one.
    Existing(Reservation),
    /// Sold out; the caller is in the SKU's waitlist (this reservation,
    /// WAITLISTED, with its position), or was already.
    Waitlisted(Reservation),
    /// Decided outside the SKU's sale window (never [`WindowCheck::Open`]).
    OutsideWindow(WindowCheck),
}

/// A SKU's stock as every layer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StockView {
    pub row: InventoryRow,
    pub gate_stock: Option<i64>,
    pub held_units: i64,
    pub confirmed_units: i64,
    pub queued_units: i64,
    pub waitlisted_units: i64,
}

/// What watchers hear about.
#[derive(Debug, Clone)]
pub enum Event {
    Changed(Box<Reservation>),
    /// The processor finished a batch: queued positions dropped.
    QueueAdvanced,
}

/// Fixed per-process limits from config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_quantity: u32,
    pub max_cart_lines: u32,
    pub hold_ttl: Option<Duration>,
    /// Longest a hold may last in all, extensions included.
    pub max_hold: Duration,
    pub max_attempts: u32,
    /// `None`: no sold-out fast path.
    pub sold_out_cache: Option<Duration>,
    pub in_flight_timeout: Duration,
    pub max_order_attempts: u32,
    pub waitlist_max: u32,
    pub waitlist_ttl: Duration,
    pub max_watches: usize,
    pub max_watches_per_user: usize,
}

impl Limits {
    pub fn from_config(config: &Config) -> Self {
        let ttl = config.reservations.hold_ttl_secs;
        Self {
            max_quantity: config.reservations.max_quantity,
            max_cart_lines: config.reservations.max_cart_lines,
            hold_ttl: (ttl > 0).then(|| Duration::from_secs(ttl)),
            max_hold: Duration::from_secs(config.reservations.max_hold_secs()),
            max_attempts: config.layers.db.max_attempts,
            sold_out_cache: (config.layers.gate.sold_out_cache_ms > 0)
                .then(|| Duration::from_millis(config.layers.gate.sold_out_cache_ms)),
            in_flight_timeout: Duration::from_millis(config.layers.gate.in_flight_timeout_ms),
            max_order_attempts: config.layers.queue.max_attempts,
            waitlist_max: config.reservations.waitlist_max,
            waitlist_ttl: Duration::from_secs(config.reservations.waitlist_ttl_secs),
            max_watches: config.reservations.max_watches,
            max_watches_per_user: config.reservations.max_watches_per_user,
        }
    }
}

pub struct Pipeline {
    store: Store,
    gate: Arc<dyn StockGate>,
    queue: Arc<dyn OrderQueue>,
    layers: Switches,
    limits: Limits,
    ready: AtomicBool,
    /// What callers are told while not ready: the cause start-up last met.
    not_ready: Mutex<String>,
    /// Reservations published and not yet processed by the processor, the
    /// only place a QUEUED reservation is visible before it has a row.
    pending: Mutex<PendingBook>,
    events: broadcast::Sender<Event>,
    /// The sold-out fast path.
    sold_out: SoldOutCache,
    /// Poked when the gate answered NotReady, so the reconciler reloads it
    /// now rather than at its next tick.
    reload_wanted: Notify,
    /// Drift per SKU seen by the previous reconcile pass.
    last_drift: Mutex<HashMap<Sku, i64>>,
    /// Sales whose counts the gate was to forget and could not (it was
    /// unreachable): the reconciler tries again every pass.
    sales_to_forget: Mutex<Vec<String>>,
    /// SKUs whose repair the gate refused last pass, with the database
    /// row version it refused (see [`Pipeline::reconcile`]).
    refused_repairs: Mutex<HashMap<Sku, i64>>,
    /// Open WatchReservation streams and their shared feeds.
    watches: Arc<Watches>,
    /// When a Reserve is decided (see [`Clock`]).
    clock: Clock,
}

pub(crate) fn store_error(err: StoreError) -> ReservationError {
    if err.is_unavailable() {
        ReservationError::unavailable("database", err)
    } else {
        ReservationError::Internal(err.into())
    }
}

fn gate_error(err: GateError) -> ReservationError {
    ReservationError::unavailable("stock gate", err)
}

pub(crate) fn queue_error(err: QueueError) -> ReservationError {
    ReservationError::unavailable("order queue", err)
}

impl Pipeline {
    pub fn new(
        store: Store,
        gate: Arc<dyn StockGate>,
        queue: Arc<dyn OrderQueue>,
        layers: Switches,
        limits: Limits,
    ) -> Self {
        let (events, _) = broadcast::channel(4096);
        Self {
            store,
            gate,
            queue,
            layers,
            limits,
            ready: AtomicBool::new(false),
            not_ready: Mutex::new("starting up: checking the store and the stock gate".into()),
            pending: Mutex::new(PendingBook::default()),
            events,
            sold_out: SoldOutCache::new(limits.sold_out_cache),
            reload_wanted: Notify::new(),
            last_drift: Mutex::new(HashMap::new()),
            sales_to_forget: Mutex::new(Vec::new()),
            refused_repairs: Mutex::new(HashMap::new()),
            watches: Arc::new(Watches::new(
                limits.max_watches,
                limits.max_watches_per_user,
            )),
            clock: Clock::default(),
        }
    }

    /// Decides Reserve calls by `clock` rather than the system clock.
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.clock = clock;
        self
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn layers(&self) -> Layers {
        **self.layers.load()
    }

    /// Orders waiting for the processor across the fleet (`None` when the
    /// queue cannot tell).
    pub async fn queue_depth(&self) -> Option<u64> {
        self.queue.backlog().await
    }

    /// Reservations this replica published and the processor has not
    /// processed yet.
    pub fn pending_count(&self) -> usize {
        self.pending().by_id.len()
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn ensure_ready(&self) -> Result<(), ReservationError> {
        if self.is_ready() {
            Ok(())
        } else {
            let reason = self.not_ready.lock().unwrap_or_else(|p| p.into_inner());
            Err(ReservationError::NotReady(reason.clone()))
        }
    }

    /// Records why start-up cannot finish yet, in words a caller may see
    /// (no addresses or credentials: those stay in the log).
    pub fn set_not_ready_reason(&self, reason: String) {
        *self.not_ready.lock().unwrap_or_else(|p| p.into_inner()) = reason;
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, PendingBook> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn emit(&self, event: Event) {
        // No watcher is not an error.
        let _ = self.events.send(event);
    }

    /// Loads the gate from the database and opens for traffic.
    pub async fn warm_up(&self) -> Result<(), ReservationError> {
        match self.reload_gate().await {
            Ok(()) => {}
            // With `bypass` the service can run on the later layers while the
            // gate is down; the reconciler loads it when it comes back.
            Err(err) if self.layers().gate_failure == GateFailureMode::Bypass => {
                tracing::warn!(error = %err, "stock gate not loaded; bypassing it until it is");
            }
            Err(err) => return Err(err),
        }
        self.ready.store(true, Ordering::Release);
        Ok(())
    }

    async fn reload_gate(&self) -> Result<(), ReservationError> {
        let caps = self.store.sale_caps().await.map_err(store_error)?;
        let rows = self.store.all_inventory().await.map_err(store_error)?;
        let stock: Vec<SkuStock> = rows.iter().map(|row| sku_stock(row, &caps)).collect();
        self.gate.load(&stock).await.map_err(gate_error)
    }
}

/// `row` as the gate loads it; `caps` are the sales' caps
/// ([`crate::store::Store::sale_caps`]).
fn sku_stock(row: &InventoryRow, caps: &HashMap<String, u32>) -> SkuStock {
    SkuStock {
        sku: Sku::from_trusted(row.sku.clone()),
        db_stock: row.stock,
        max_per_user: u32::try_from(row.max_per_user).unwrap_or(0),
        version: row.version,
        window: WindowMs::of(&row.window()),
        sale: sale_cap(row, caps),
    }
}

/// The capped sale `row`'s SKU belongs to, if any.
fn sale_cap(row: &InventoryRow, caps: &HashMap<String, u32>) -> Option<SaleCap> {
    let sale_id = row.sale_id.as_ref()?;
    let max_per_user = *caps.get(sale_id).filter(|cap| **cap > 0)?;
    Some(SaleCap {
        sale_id: sale_id.clone(),
        max_per_user,
    })
}

fn gate_entry(order: &NewOrder) -> GateEntry {
    GateEntry::new(
        order.id.clone(),
        order.sku.clone(),
        order.user.clone(),
        order.quantity,
    )
    .decided_at(order.created_at.and_utc().timestamp_millis())
}

/// Counts the database's decision for one order.
fn count_outcome(outcome: &CommitOutcome) {
    let decision = match outcome {
        CommitOutcome::Committed { .. } => "committed",
        CommitOutcome::SoldOut { .. }
        | CommitOutcome::Rejected {
            cause: RejectCause::SoldOut,
            ..
        } => "sold_out",
        CommitOutcome::UserLimit { .. }
        | CommitOutcome::Rejected {
            cause: RejectCause::UserLimit,
            ..
        } => "over_cap",
        CommitOutcome::Contention { .. } => "aborted",
        CommitOutcome::OutsideWindow(_)
        | CommitOutcome::Rejected {
            cause: RejectCause::OutsideWindow,
            ..
        } => "outside_window",
        CommitOutcome::Rejected { .. } | CommitOutcome::UnknownSku => "rejected",
        // A redelivery or a retried key: the first decision was counted.
        CommitOutcome::AlreadyCommitted(_) | CommitOutcome::DuplicateKey(_) => return,
    };
    metrics::decision("db", decision);
}
