//! The reservation pipeline: one Reserve call through the layers that sit
//! behind the middleware (stock gate → order queue or request-path commit →
//! database check), plus the order processor's batch step, the lifecycle
//! (confirm, release, expiry) and the operator actions that must keep the
//! gate and the database consistent.
//!
//! The rule everywhere: the gate and the queue may only filter. Units the
//! gate took for a reservation go back to it exactly when the database did
//! not take them ([`Pipeline::settle_gate`]), and every decision the caller
//! heard as RESERVED or QUEUED ends as a database row.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::{
    sync::{broadcast, mpsc, Notify},
    time::Instant,
};

use super::{
    now, IdempotencyKey, Quantity, Reservation, ReservationId, ReservationState, Sku,
    SoldOutPolicy, UserId,
};
use crate::{
    config::{Config, DbCheckMode, GateFailureMode, RateLimitConfig},
    error::ReservationError,
    gate::{GateDecision, GateEntry, GateError, Settlement, SkuStock, StockGate, RESTOCK_ALL},
    metrics,
    queue::{OrderQueue, QueueError, QueuedOrder},
    store::{
        Adjusted, CommitOutcome, CommitParams, InventoryRow, NewOrder, RejectCause,
        ReservationFilter, Restock, Settled, Store, StoreError, WaitlistJoin, SOLD_OUT_REASON,
    },
};

/// The rate limiter's budgets, switchable at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateSettings {
    pub per_user_period_ms: u64,
    pub per_user_burst: u32,
    pub global_per_sec: u32,
    pub global_burst: u32,
}

impl RateSettings {
    pub fn from_config(config: &RateLimitConfig) -> Self {
        Self {
            per_user_period_ms: config.per_user_period_ms,
            per_user_burst: config.per_user_burst,
            global_per_sec: config.global_per_sec,
            global_burst: config.global_burst,
        }
    }

    /// The first field that is zero, for the error message.
    /// The first setting that is zero, named as SetLayersRequest's field.
    pub fn zero_field(&self) -> Option<&'static str> {
        if self.per_user_period_ms == 0 {
            Some("rate_limits.per_user_period_ms")
        } else if self.per_user_burst == 0 {
            Some("rate_limits.per_user_burst")
        } else if self.global_per_sec == 0 {
            Some("rate_limits.global_per_sec")
        } else if self.global_burst == 0 {
            Some("rate_limits.global_burst")
        } else {
            None
        }
    }
}

/// The layer switches in force; swapped whole at run time. Stored as JSON
/// (the fleet's switches), so fields are only ever added, with defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layers {
    pub rate_limit: bool,
    pub rate_limit_shadow: bool,
    pub rate_limits: RateSettings,
    pub dedup: bool,
    pub gate: bool,
    pub gate_failure: GateFailureMode,
    pub queue: bool,
    pub db_check: DbCheckMode,
}

impl Layers {
    pub fn from_config(config: &Config) -> Self {
        let layers = &config.layers;
        Self {
            rate_limit: layers.rate_limit.enabled,
            rate_limit_shadow: layers.rate_limit.shadow,
            rate_limits: RateSettings::from_config(&layers.rate_limit),
            dedup: layers.dedup.enabled,
            gate: layers.gate.enabled,
            gate_failure: layers.gate.failure_mode,
            queue: layers.queue.enabled,
            db_check: layers.db.check,
        }
    }

    /// True when nothing would stop an oversell: the database check is off
    /// (naive writes) and the gate is off or lets requests past it when its
    /// backend is down. The queue does not count: it serialises commits
    /// only while there is one processor, which a failover can break.
    pub fn oversell_unguarded(&self) -> bool {
        self.db_check == DbCheckMode::Off
            && (!self.gate || self.gate_failure == GateFailureMode::Bypass)
    }

    /// These switches with `change` applied.
    pub fn with(self, change: &LayersChange) -> Self {
        Self {
            rate_limit: change.rate_limit.unwrap_or(self.rate_limit),
            rate_limit_shadow: change.rate_limit_shadow.unwrap_or(self.rate_limit_shadow),
            rate_limits: change.rate_limits.unwrap_or(self.rate_limits),
            dedup: change.dedup.unwrap_or(self.dedup),
            gate: change.gate.unwrap_or(self.gate),
            gate_failure: change.gate_failure.unwrap_or(self.gate_failure),
            queue: change.queue.unwrap_or(self.queue),
            db_check: change.db_check.unwrap_or(self.db_check),
        }
    }
}

/// The switches in force, shared by the pipeline and the middleware; read
/// per request without locks, replaced whole when they change.
pub type Switches = Arc<ArcSwap<Layers>>;

/// A change to the switches; `None` keeps the current value.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayersChange {
    pub rate_limit: Option<bool>,
    pub rate_limit_shadow: Option<bool>,
    pub rate_limits: Option<RateSettings>,
    pub dedup: Option<bool>,
    pub gate: Option<bool>,
    pub gate_failure: Option<GateFailureMode>,
    pub queue: Option<bool>,
    pub db_check: Option<DbCheckMode>,
}

impl LayersChange {
    /// The change that turns any switches into `target`.
    pub fn to(target: Layers) -> Self {
        Self {
            rate_limit: Some(target.rate_limit),
            rate_limit_shadow: Some(target.rate_limit_shadow),
            rate_limits: Some(target.rate_limits),
            dedup: Some(target.dedup),
            gate: Some(target.gate),
            gate_failure: Some(target.gate_failure),
            queue: Some(target.queue),
            db_check: Some(target.db_check),
        }
    }
}

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
    Changed(Reservation),
    /// The processor finished a batch: queued positions dropped.
    QueueAdvanced,
}

struct Pending {
    reservation: Reservation,
    ticket: Option<u64>,
}

/// Queued reservations by id, and by (user, idempotency key) so a retry
/// finds its queued twin without scanning the queue; and the keys of
/// reservations settled recently, so a retry that arrives just after the
/// processor committed the first call still gets that reservation (not a
/// new one the database would reject as a duplicate). Older retries are
/// the dedup layer's job (`layers.dedup`, shared through Redis).
#[derive(Default)]
struct PendingBook {
    by_id: HashMap<ReservationId, Pending>,
    by_key: HashMap<(UserId, IdempotencyKey), ReservationId>,
    recent: HashMap<(UserId, IdempotencyKey), ReservationId>,
    recent_order: std::collections::VecDeque<((UserId, IdempotencyKey), Instant)>,
}

/// How many settled keys a replica remembers, and for how long.
const RECENT_KEYS: usize = 100_000;
const RECENT_FOR: Duration = Duration::from_secs(600);

impl PendingBook {
    fn get(&self, id: &ReservationId) -> Option<&Pending> {
        self.by_id.get(id)
    }

    fn get_mut(&mut self, id: &ReservationId) -> Option<&mut Pending> {
        self.by_id.get_mut(id)
    }

    fn values(&self) -> impl Iterator<Item = &Pending> {
        self.by_id.values()
    }

    fn with_key(&self, user: &UserId, key: &IdempotencyKey) -> Option<&Pending> {
        let id = self.by_key.get(&(user.clone(), key.clone()))?;
        self.by_id.get(id)
    }

    fn insert(&mut self, pending: Pending) {
        let reservation = &pending.reservation;
        if let Some(key) = &reservation.idempotency_key {
            // The first holder keeps the key: it is queued ahead of any twin,
            // so its order is the one the database will keep.
            self.by_key
                .entry((reservation.user.clone(), key.clone()))
                .or_insert_with(|| reservation.id.clone());
        }
        self.by_id.insert(reservation.id.clone(), pending);
    }

    /// The processor settled `id`: forget it, remembering its key.
    fn remove(&mut self, id: &ReservationId) {
        self.take(id, true);
    }

    /// `id` was never queued (its publish failed): forget it entirely, so a
    /// retry with its key runs afresh.
    fn forget(&mut self, id: &ReservationId) {
        self.take(id, false);
    }

    fn take(&mut self, id: &ReservationId, remember: bool) {
        let Some(pending) = self.by_id.remove(id) else {
            return;
        };
        let reservation = pending.reservation;
        if let Some(key) = reservation.idempotency_key {
            let slot = (reservation.user, key);
            // A twin's removal must not drop the holder's entry.
            if self.by_key.get(&slot) == Some(id) {
                self.by_key.remove(&slot);
                if remember {
                    self.remember(slot, id.clone());
                }
            }
        }
    }

    fn remember(&mut self, slot: (UserId, IdempotencyKey), id: ReservationId) {
        let now = Instant::now();
        while let Some((oldest, at)) = self.recent_order.front() {
            if self.recent_order.len() < RECENT_KEYS && now.duration_since(*at) < RECENT_FOR {
                break;
            }
            self.recent.remove(oldest);
            self.recent_order.pop_front();
        }
        if self.recent.insert(slot.clone(), id).is_none() {
            self.recent_order.push_back((slot, now));
        }
    }

    fn recently_settled(&self, user: &UserId, key: &IdempotencyKey) -> Option<ReservationId> {
        self.recent.get(&(user.clone(), key.clone())).cloned()
    }
}

/// Fixed per-process limits from config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_quantity: u32,
    pub hold_ttl: Option<Duration>,
    pub max_attempts: u32,
    /// `None`: no sold-out fast path.
    pub sold_out_cache: Option<Duration>,
    pub in_flight_timeout: Duration,
    pub max_order_attempts: u32,
    pub waitlist_max: u32,
    pub waitlist_ttl: Duration,
}

impl Limits {
    pub fn from_config(config: &Config) -> Self {
        let ttl = config.reservations.hold_ttl_secs;
        Self {
            max_quantity: config.reservations.max_quantity,
            hold_ttl: (ttl > 0).then(|| Duration::from_secs(ttl)),
            max_attempts: config.layers.db.max_attempts,
            sold_out_cache: (config.layers.gate.sold_out_cache_ms > 0)
                .then(|| Duration::from_millis(config.layers.gate.sold_out_cache_ms)),
            in_flight_timeout: Duration::from_millis(config.layers.gate.in_flight_timeout_ms),
            max_order_attempts: config.layers.queue.max_attempts,
            waitlist_max: config.reservations.waitlist_max,
            waitlist_ttl: Duration::from_secs(config.reservations.waitlist_ttl_secs),
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
    /// Reservations published and not yet settled by the processor, the
    /// only place a QUEUED reservation is visible before it has a row.
    pending: Mutex<PendingBook>,
    events: broadcast::Sender<Event>,
    /// The sold-out fast path: SKU → (units the gate last said were left,
    /// until when to believe it). It may only ever say "no".
    sold_out: Mutex<HashMap<Sku, (i64, Instant)>>,
    /// Poked when the gate answered NotReady, so the reconciler reloads it
    /// now rather than at its next tick.
    reload_wanted: Notify,
    /// Drift per SKU seen by the previous reconcile pass.
    last_drift: Mutex<HashMap<Sku, i64>>,
}

/// What became of a batch the processor took.
#[derive(Debug, Default)]
pub struct BatchOutcome {
    /// Orders given up after repeated database errors, with the reason;
    /// recorded REJECTED with their units returned.
    pub given_up: Vec<(QueuedOrder, String)>,
    /// Some order could not even be recorded as given up: do not
    /// acknowledge the batch, so it is delivered again.
    pub incomplete: bool,
}

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

fn queue_error(err: QueueError) -> ReservationError {
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
            not_ready: Mutex::new("the store is not migrated or not reachable yet".into()),
            pending: Mutex::new(PendingBook::default()),
            events,
            sold_out: Mutex::new(HashMap::new()),
            reload_wanted: Notify::new(),
            last_drift: Mutex::new(HashMap::new()),
        }
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
    /// settled yet.
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
        let rows = self.store.all_inventory().await.map_err(store_error)?;
        let stock: Vec<SkuStock> = rows.iter().map(sku_stock).collect();
        self.gate.load(&stock).await.map_err(gate_error)
    }

    // ---- Reserve -------------------------------------------------------

    pub async fn reserve(
        self: &Arc<Self>,
        cmd: ReserveCommand,
    ) -> Result<ReserveResult, ReservationError> {
        let join = cmd.join_waitlist.then(|| cmd.clone());
        match (self.reserve_once(cmd).await?, join) {
            (ReserveResult::SoldOut { remaining }, Some(cmd)) => {
                self.join_waitlist(cmd, remaining).await
            }
            (result, _) => Ok(result),
        }
    }

    /// What `reserve` would answer when the sold-out fast path decides it
    /// with no I/O and no change: serving, gate on, no waitlist to join, no
    /// reservation with this key pending or recently settled in this
    /// process. `None`: run `reserve`.
    pub fn sold_out_now(&self, cmd: &ReserveCommand) -> Option<ReserveResult> {
        if cmd.join_waitlist || self.ensure_ready().is_err() || !self.layers().gate {
            return None;
        }
        if let Some(key) = &cmd.idempotency_key {
            let pending = self.pending();
            if pending.with_key(&cmd.user, key).is_some()
                || pending.recently_settled(&cmd.user, key).is_some()
            {
                return None;
            }
        }
        // Not counted here: the caller (the dedup layer) counts the answer
        // only if it is the one given.
        let left = self.known_sold_out(&cmd.sku, cmd.quantity.get())?;
        Some(ReserveResult::SoldOut {
            remaining: Some(left),
        })
    }

    /// Sold out and asked to wait: a place in the SKU's waitlist if its
    /// policy offers one, otherwise the sold-out answer stands. The line
    /// lives in the database, whose row lock orders joins and hand-offs.
    async fn join_waitlist(
        self: &Arc<Self>,
        cmd: ReserveCommand,
        remaining: Option<i64>,
    ) -> Result<ReserveResult, ReservationError> {
        let layers = self.layers();
        // Units may have come back since the answer. The gate knows what
        // is admissible; the database's stock is the whole truth only when
        // no admitted order can still be on its way to it (gate and queue
        // off), since queued orders are not in it yet.
        if layers.gate {
            let available = self.gate.available(&cmd.sku).await.ok().flatten();
            if available.is_some_and(|a| a >= i64::from(cmd.quantity.get())) {
                self.restocked(cmd.sku.as_str());
                return self.reserve_once(cmd).await;
            }
        }
        let stock_check = !layers.gate && !layers.queue;
        let order = NewOrder {
            id: ReservationId::generate(),
            sku: cmd.sku.clone(),
            user: cmd.user.clone(),
            quantity: cmd.quantity.get(),
            idempotency_key: cmd.idempotency_key.clone(),
            created_at: now(),
        };
        let joined = self
            .store
            .join_waitlist(
                &order,
                self.limits.waitlist_max,
                self.limits.waitlist_ttl,
                now(),
                stock_check,
            )
            .await
            .map_err(store_error)?;
        match joined {
            WaitlistJoin::Waiting(reservation) => {
                metrics::decision("waitlist", "joined");
                Ok(ReserveResult::Waitlisted(reservation))
            }
            WaitlistJoin::KeyUsed(reservation) => Ok(ReserveResult::Existing(reservation)),
            WaitlistJoin::NotOffered => Ok(ReserveResult::SoldOut { remaining }),
            WaitlistJoin::Full { limit } => {
                metrics::decision("waitlist", "full");
                tracing::debug!(sku = cmd.sku.as_str(), limit, "waitlist full");
                Ok(ReserveResult::SoldOut { remaining })
            }
            WaitlistJoin::UserLimit { .. } => Ok(ReserveResult::UserLimit),
            WaitlistJoin::UnknownSku => Err(ReservationError::UnknownSku(cmd.sku.as_str().into())),
            // One more ordinary try; sold out again is the answer (no loop).
            WaitlistJoin::InStock => {
                self.restocked(cmd.sku.as_str());
                self.reserve_once(cmd).await
            }
        }
    }

    async fn reserve_once(
        self: &Arc<Self>,
        cmd: ReserveCommand,
    ) -> Result<ReserveResult, ReservationError> {
        self.ensure_ready()?;
        let layers = self.layers();
        if let Some(key) = &cmd.idempotency_key {
            if let Some(existing) = self.earlier_with_key(&cmd.user, key).await? {
                return Ok(ReserveResult::Existing(existing));
            }
        }
        // Before the order is built: the fast path answers most of a
        // storm, and an id, a clock read and three copies per call show.
        if layers.gate {
            if let Some(left) = self.known_sold_out(&cmd.sku, cmd.quantity.get()) {
                metrics::decision("gate", "sold_out_fast_path");
                return Ok(ReserveResult::SoldOut {
                    remaining: Some(left),
                });
            }
        }
        let order = NewOrder {
            id: ReservationId::generate(),
            sku: cmd.sku,
            user: cmd.user,
            quantity: cmd.quantity.get(),
            idempotency_key: cmd.idempotency_key,
            created_at: now(),
        };
        let mut remaining = None;
        let mut gated = false;
        if layers.gate {
            match self.gate.reserve(&gate_entry(&order)).await {
                Ok(GateDecision::Reserved { remaining: left }) => {
                    metrics::decision("gate", "admitted");
                    remaining = Some(left);
                    gated = true;
                }
                Ok(GateDecision::SoldOut { remaining }) => {
                    metrics::decision("gate", "sold_out");
                    self.remember_sold_out(&order.sku, remaining);
                    return Ok(ReserveResult::SoldOut {
                        remaining: Some(remaining),
                    });
                }
                Ok(GateDecision::UserLimit { .. }) => {
                    metrics::decision("gate", "over_cap");
                    return Ok(ReserveResult::UserLimit);
                }
                Ok(GateDecision::UnknownSku) => {
                    metrics::decision("gate", "unknown_sku");
                    return Err(ReservationError::UnknownSku(order.sku.as_str().into()));
                }
                Ok(GateDecision::NotReady) => {
                    self.reload_wanted.notify_one();
                    if layers.gate_failure == GateFailureMode::FailClosed {
                        metrics::decision("gate", "unavailable");
                        return Err(ReservationError::NotReady(
                            "the stock gate is being rebuilt from the database".into(),
                        ));
                    }
                    metrics::decision("gate", "bypassed");
                }
                Err(err) => {
                    self.forget_admission(gate_entry(&order));
                    if layers.gate_failure == GateFailureMode::FailClosed {
                        metrics::decision("gate", "unavailable");
                        return Err(gate_error(err));
                    }
                    metrics::decision("gate", "bypassed");
                    tracing::warn!(error = %err, "stock gate down; bypassing it");
                }
            }
        }
        if layers.queue {
            // On its own task: a caller that gives up (deadline, cancel)
            // drops this future, and a publish abandoned half way would
            // leave the reservation pending and its units held forever.
            let this = Arc::clone(self);
            tokio::spawn(async move { this.enqueue(order, gated, remaining).await })
                .await
                .unwrap_or_else(|err| Err(ReservationError::Internal(err.into())))
        } else {
            self.commit_now(order, layers.db_check, gated).await
        }
    }

    /// A gate call that failed may still have admitted (the script ran,
    /// its reply was lost with the connection). Returning those units at
    /// once, rather than after `layers.gate.in_flight_timeout_ms`, keeps a
    /// short outage from under-selling. Safe if nothing was admitted: a
    /// release of an admission the gate never recorded changes nothing.
    /// Retried in the background while the gate is unreachable.
    fn forget_admission(&self, entry: GateEntry) {
        self.settle_later(Settlement::Released, vec![entry]);
    }

    fn known_sold_out(&self, sku: &Sku, quantity: u32) -> Option<i64> {
        let cache = self.sold_out.lock().unwrap_or_else(|p| p.into_inner());
        match cache.get(sku) {
            Some(&(left, until)) if Instant::now() < until && left < i64::from(quantity) => {
                Some(left)
            }
            _ => None,
        }
    }

    fn remember_sold_out(&self, sku: &Sku, left: i64) {
        if let Some(ttl) = self.limits.sold_out_cache {
            self.sold_out
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(sku.clone(), (left, Instant::now() + ttl));
        }
    }

    /// Forgets the fast path's answer for a SKU that was restocked
    /// ([`RESTOCK_ALL`]: for every SKU).
    pub fn restocked(&self, sku: &str) {
        let mut cache = self.sold_out.lock().unwrap_or_else(|p| p.into_inner());
        if sku == RESTOCK_ALL {
            cache.clear();
        } else {
            cache.remove(&Sku::from_trusted(sku.to_owned()));
        }
    }

    /// Restock messages from the gate, for the listener task.
    pub fn restocks(&self) -> broadcast::Receiver<String> {
        self.gate.restocks()
    }

    /// Resolves when a caller found the gate not loaded.
    pub async fn reload_wanted(&self) {
        self.reload_wanted.notified().await
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
        let rows = self.store.all_inventory().await.map_err(store_error)?;
        let mut seen = HashMap::new();
        for row in &rows {
            let sku = Sku::from_trusted(row.sku.clone());
            report
                .lost_admissions
                .extend(self.settle_stale_in_flight(&sku).await?);
            let Some(admissible) = self.gate.available(&sku).await.map_err(gate_error)? else {
                // A SKU created while this gate was off or unreachable.
                self.gate.set(&sku_stock(row)).await.map_err(gate_error)?;
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
                        .set(&sku_stock(&fresh))
                        .await
                        .map_err(gate_error)?
                    {
                        report.repaired.push(sku.clone());
                    }
                }
            } else {
                seen.insert(sku, drift);
            }
        }
        *self.last_drift.lock().unwrap_or_else(|p| p.into_inner()) = seen;
        let units: i64 = report.drift.iter().map(|(_, d)| d.abs()).sum();
        ::metrics::gauge!("stockgate_gate_drift_units").set(units as f64);
        ::metrics::gauge!("stockgate_gate_drift_skus").set(report.drift.len() as f64);
        if !report.drift.is_empty() {
            tracing::warn!(drift = ?report.drift, repaired = ?report.repaired, "gate and database disagree");
        }
        Ok(report)
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
                Some(row) if row.state == ReservationState::Rejected => {
                    (Settlement::Rejected, None)
                }
                Some(_) => (Settlement::Committed, self.stock_version(sku).await),
                None if waiting != Some(0) => continue,
                None => {
                    lost.push(entry.id.clone());
                    (Settlement::Released, None)
                }
            };
            let entry = entry.at_version(version);
            self.settle_gate(action, std::slice::from_ref(&entry)).await;
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

    /// The reservation an earlier call with this key made, if this replica
    /// knows it: still queued (with its position), or settled recently
    /// (read back from the database).
    async fn earlier_with_key(
        &self,
        user: &UserId,
        key: &IdempotencyKey,
    ) -> Result<Option<Reservation>, ReservationError> {
        let (queued, settled) = {
            let pending = self.pending();
            match pending.with_key(user, key) {
                Some(found) => (Some((found.reservation.clone(), found.ticket)), None),
                None => (None, pending.recently_settled(user, key)),
            }
        };
        if let Some((mut reservation, ticket)) = queued {
            if let Some(ticket) = ticket {
                reservation.queue_position = Some(self.queue.position(ticket).await);
            }
            return Ok(Some(reservation));
        }
        match settled {
            Some(id) => self.store.reservation(&id).await.map_err(store_error),
            None => Ok(None),
        }
    }

    async fn enqueue(
        &self,
        order: NewOrder,
        gated: bool,
        mut remaining: Option<i64>,
    ) -> Result<ReserveResult, ReservationError> {
        if !gated {
            // Without the gate, a read of the row still answers sold out and
            // unknown SKUs before anything is queued.
            match self
                .store
                .inventory(&order.sku)
                .await
                .map_err(store_error)?
            {
                None => return Err(ReservationError::UnknownSku(order.sku.as_str().into())),
                Some(row) if row.stock < i64::from(order.quantity) => {
                    return Ok(ReserveResult::SoldOut {
                        remaining: Some(row.stock),
                    })
                }
                Some(row) => remaining = Some(row.stock - i64::from(order.quantity)),
            }
        }
        let mut reservation = Reservation {
            id: order.id.clone(),
            sku: order.sku.clone(),
            user: order.user.clone(),
            quantity: order.quantity,
            state: ReservationState::Queued,
            idempotency_key: order.idempotency_key.clone(),
            queue_position: None,
            waitlist_position: None,
            reject_reason: None,
            created_at: order.created_at,
            updated_at: order.created_at,
            expires_at: None,
        };
        // Visible before it is published, so the processor can never settle
        // it before we know about it.
        self.pending().insert(Pending {
            reservation: reservation.clone(),
            ticket: None,
        });
        match self.queue.publish(order.clone(), gated).await {
            Ok(ticket) => {
                metrics::decision("queue", "queued");
                if let Some(pending) = self.pending().get_mut(&order.id) {
                    pending.ticket = Some(ticket);
                }
                let position = self.queue.position(ticket).await;
                reservation.queue_position = Some(position);
                Ok(ReserveResult::Queued {
                    reservation,
                    position,
                    remaining,
                })
            }
            Err(err) => {
                metrics::decision("queue", "refused");
                self.pending().forget(&order.id);
                if let QueueError::Unconfirmed(why) = &err {
                    return self
                        .fence_unconfirmed(&order, gated, why, err.to_string())
                        .await;
                }
                if gated {
                    self.gate_release(&order).await;
                }
                Err(queue_error(err))
            }
        }
    }

    /// The broker may hold an order it never confirmed. A REJECTED row for
    /// its id makes a late delivery a no-op, so answering UNAVAILABLE and
    /// returning the units is then true. If the processor got there first,
    /// its row is the answer (and it settled the gate). If the fence cannot
    /// be written the outcome is indeterminate: the units stay with the
    /// admission, which the reconciler settles by what became of it.
    async fn fence_unconfirmed(
        &self,
        order: &NewOrder,
        gated: bool,
        why: &str,
        error: String,
    ) -> Result<ReserveResult, ReservationError> {
        let reason = format!("{FENCE_REASON}: {why}");
        match self.store.record_failed(order, &reason, now()).await {
            Ok(row) if row.reject_reason.as_deref() == Some(reason.as_str()) => {
                if gated {
                    self.gate_release(order).await;
                }
                self.emit(Event::Changed(row));
                Err(ReservationError::unavailable(
                    "order queue",
                    anyhow::anyhow!(error),
                ))
            }
            Ok(row) => Ok(ReserveResult::Existing(row)),
            Err(db) => {
                tracing::error!(reservation = order.id.as_str(), error = %db, "unconfirmed order could not be fenced off; its outcome is left to the reconciler");
                Err(ReservationError::unavailable(
                    "order queue",
                    anyhow::anyhow!(error),
                ))
            }
        }
    }

    fn commit_params(&self, mode: DbCheckMode, record_rejections: bool) -> CommitParams {
        CommitParams {
            mode,
            max_attempts: self.limits.max_attempts,
            hold_ttl: self.limits.hold_ttl,
            record_rejections,
            now: now(),
        }
    }

    async fn commit_now(
        &self,
        order: NewOrder,
        mode: DbCheckMode,
        gated: bool,
    ) -> Result<ReserveResult, ReservationError> {
        let params = self.commit_params(mode, false);
        match self.store.commit_order(&order, params).await {
            Ok(outcome) => {
                count_outcome(&outcome);
                self.settle(&order, gated, outcome).await
            }
            Err(err) => {
                if gated {
                    self.gate_release(&order).await;
                }
                Err(store_error(err))
            }
        }
    }

    /// Settles the gate for what the database decided, tells watchers, and
    /// turns the outcome into the caller's answer.
    async fn settle(
        &self,
        order: &NewOrder,
        gated: bool,
        outcome: CommitOutcome,
    ) -> Result<ReserveResult, ReservationError> {
        if gated {
            let entry = self.settled_entry(order, &outcome).await;
            self.settle_gate(settlement(&outcome), &[entry]).await;
        }
        self.answer(order, outcome)
    }

    /// Tells watchers and turns the database's decision into the caller's
    /// answer.
    fn answer(
        &self,
        order: &NewOrder,
        outcome: CommitOutcome,
    ) -> Result<ReserveResult, ReservationError> {
        match outcome {
            CommitOutcome::Committed {
                reservation,
                remaining,
                ..
            } => {
                self.emit(Event::Changed(reservation.clone()));
                Ok(ReserveResult::Reserved {
                    reservation,
                    remaining: Some(remaining),
                })
            }
            CommitOutcome::AlreadyCommitted(existing) | CommitOutcome::DuplicateKey(existing) => {
                Ok(ReserveResult::Existing(existing))
            }
            CommitOutcome::SoldOut { remaining } => Ok(ReserveResult::SoldOut {
                remaining: Some(remaining),
            }),
            CommitOutcome::UserLimit { .. } => Ok(ReserveResult::UserLimit),
            CommitOutcome::UnknownSku => {
                Err(ReservationError::UnknownSku(order.sku.as_str().into()))
            }
            CommitOutcome::Contention { attempts } => Err(ReservationError::Contention(attempts)),
            CommitOutcome::Rejected { reservation, .. } => {
                self.emit(Event::Changed(reservation.clone()));
                Ok(ReserveResult::Existing(reservation))
            }
        }
    }

    /// The gate's view of an order the database decided, with the stock
    /// version of the commit (see [`GateEntry::version`]). A redelivery's
    /// row does not say at which version it was committed; the row's
    /// current version bounds it, which can only leave the gate lower.
    async fn settled_entry(&self, order: &NewOrder, outcome: &CommitOutcome) -> GateEntry {
        let version = match outcome {
            CommitOutcome::Committed { stock_version, .. } => Some(*stock_version),
            CommitOutcome::AlreadyCommitted(_) if settlement(outcome) == Settlement::Committed => {
                self.stock_version(&order.sku).await
            }
            _ => None,
        };
        gate_entry(order).at_version(version)
    }

    /// The SKU row's version now; `None` if it cannot be read, which
    /// leaves a settlement unversioned (it then never adds units).
    async fn stock_version(&self, sku: &Sku) -> Option<i64> {
        match self.store.inventory(sku).await {
            Ok(row) => row.map(|row| row.version),
            Err(err) => {
                tracing::warn!(sku = sku.as_str(), error = %err, "stock version not read; settling the gate without it");
                None
            }
        }
    }

    /// Settles now, or keeps trying in the background while the gate is
    /// unreachable: a settlement that never arrives leaves units counted
    /// in flight, and a rebuild meanwhile counts them twice (see
    /// [`GateEntry::version`]). Settling is idempotent per reservation, so
    /// a retry after a lost reply changes nothing.
    async fn settle_gate(&self, action: Settlement, entries: &[GateEntry]) {
        if let Err(err) = self.gate.settle_batch(action, entries).await {
            tracing::warn!(?action, reservations = entries.len(), error = %err, "could not settle the stock gate; retrying in the background");
            self.settle_later(action, entries.to_vec());
        }
    }

    fn settle_later(&self, action: Settlement, entries: Vec<GateEntry>) {
        let gate = Arc::clone(&self.gate);
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            // About a minute; after that the reconciler's checks take over.
            for _ in 0..70 {
                tokio::time::sleep(pause).await;
                if gate.settle_batch(action, &entries).await.is_ok() {
                    return;
                }
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            tracing::warn!(
                ?action,
                reservations = entries.len(),
                "gave up settling the stock gate; the reconciler repairs it"
            );
        });
    }

    async fn gate_release(&self, order: &NewOrder) {
        self.settle_gate(Settlement::Released, &[gate_entry(order)])
            .await;
    }

    // ---- The order processor's step -------------------------------------

    /// Commits one batch from the queue, in order. Returns only when every
    /// order in it is settled; a database outage is retried, never dropped.
    /// An order the database keeps refusing with an error is given up after
    /// `layers.queue.max_attempts` tries: it is returned with the reason,
    /// recorded REJECTED and its units given back.
    pub async fn process_batch(&self, batch: &[QueuedOrder]) -> BatchOutcome {
        let started = std::time::Instant::now();
        ::metrics::histogram!("stockgate_processor_batch_size").record(batch.len() as f64);
        if let Some(oldest) = batch.iter().map(|q| q.order.created_at).min() {
            let lag = (now() - oldest).to_std().unwrap_or_default();
            ::metrics::gauge!("stockgate_processor_lag_seconds").set(lag.as_secs_f64());
        }
        let mut todo: Vec<&QueuedOrder> = batch.iter().collect();
        let mut failed = Vec::new();
        let mut unsettled: Vec<ReservationId> = Vec::new();
        let mut backoff = Duration::from_millis(10);
        while !todo.is_empty() {
            let orders: Vec<NewOrder> = todo.iter().map(|q| q.order.clone()).collect();
            let params = self.commit_params(self.layers().db_check, true);
            let outcomes = match self.store.commit_batch(&orders, params).await {
                Ok(outcomes) => outcomes,
                Err(err) if err.is_unavailable() => {
                    metrics::decision("db", "retry");
                    tracing::error!(error = %err, orders = orders.len(), "order batch failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
                Err(err) => {
                    // One order can poison a whole transaction: find it by
                    // committing one at a time.
                    tracing::warn!(error = %err, orders = orders.len(), "order batch refused; committing one by one");
                    let mut outcomes = Vec::with_capacity(todo.len());
                    for queued in &todo {
                        match self.commit_alone(queued).await {
                            Ok(outcome) => outcomes.push(Some(outcome)),
                            Err(reason) => {
                                if self.give_up(queued, &reason).await {
                                    failed.push(((*queued).clone(), reason));
                                } else {
                                    unsettled.push(queued.order.id.clone());
                                }
                                outcomes.push(None);
                            }
                        }
                    }
                    let (kept, outcomes): (Vec<_>, Vec<_>) = todo
                        .into_iter()
                        .zip(outcomes)
                        .filter_map(|(queued, outcome)| outcome.map(|o| (queued, o)))
                        .unzip();
                    todo = kept;
                    outcomes
                }
            };
            outcomes.iter().for_each(count_outcome);
            let (again, done): (Vec<_>, Vec<_>) = todo
                .into_iter()
                .zip(outcomes)
                .partition(|(_, outcome)| matches!(outcome, CommitOutcome::Contention { .. }));
            // One gate round trip per kind of settlement, not one per order.
            let mut settlements: HashMap<Settlement, Vec<GateEntry>> = HashMap::new();
            for (queued, outcome) in done.iter().filter(|(queued, _)| queued.gated) {
                settlements
                    .entry(settlement(outcome))
                    .or_default()
                    .push(self.settled_entry(&queued.order, outcome).await);
            }
            for (action, entries) in settlements {
                self.settle_gate(action, &entries).await;
            }
            for (queued, outcome) in done {
                self.finish_queued(queued, outcome);
            }
            todo = again.into_iter().map(|(queued, _)| queued).collect();
        }
        if unsettled.is_empty() {
            if let Some(last) = batch.iter().map(|q| q.ticket).max() {
                let ids: Vec<ReservationId> = batch.iter().map(|q| q.order.id.clone()).collect();
                self.queue.settled(last, &ids).await;
            }
        }
        self.emit(Event::QueueAdvanced);
        ::metrics::histogram!("stockgate_processor_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        BatchOutcome {
            given_up: failed,
            incomplete: !unsettled.is_empty(),
        }
    }

    /// One order in its own transaction, retried on errors up to
    /// `layers.queue.max_attempts` times (an outage does not count).
    async fn commit_alone(&self, queued: &QueuedOrder) -> Result<CommitOutcome, String> {
        let mut attempts = 0;
        let mut backoff = Duration::from_millis(100);
        loop {
            let params = self.commit_params(self.layers().db_check, true);
            match self
                .store
                .commit_batch(std::slice::from_ref(&queued.order), params)
                .await
            {
                Ok(mut outcomes) => return Ok(outcomes.remove(0)),
                Err(err) if err.is_unavailable() => {}
                Err(err) => {
                    attempts += 1;
                    if attempts >= self.limits.max_order_attempts {
                        return Err(format!("failed {attempts} times: {err}"));
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Ends an order the database would not take: REJECTED row (with the
    /// time of failure, since the order's own data may be what fails),
    /// units back to the gate, watchers told, error logged. Returns false,
    /// changing nothing, when not even the REJECTED row can be written: the
    /// caller was told QUEUED, so the order must stay for a redelivery.
    async fn give_up(&self, queued: &QueuedOrder, reason: &str) -> bool {
        let order = &queued.order;
        tracing::error!(reservation = order.id.as_str(), sku = order.sku.as_str(), %reason, "order given up after repeated failures");
        let reason = format!("processing failed: {reason}");
        let mut backoff = Duration::from_millis(100);
        let recorded = loop {
            match self.store.record_failed(order, &reason, now()).await {
                Err(err) if err.is_unavailable() => {
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
                other => break other,
            }
        };
        let reservation = match recorded {
            Ok(reservation) => reservation,
            Err(err) => {
                tracing::error!(reservation = order.id.as_str(), error = %err, "failed order could not be recorded; leaving it queued");
                return false;
            }
        };
        if queued.gated {
            let action = settlement(&CommitOutcome::AlreadyCommitted(reservation.clone()));
            self.settle_gate(action, &[gate_entry(order)]).await;
            self.restocked(order.sku.as_str());
        }
        self.pending().remove(&order.id);
        self.emit(Event::Changed(reservation));
        true
    }

    /// An order the processor cannot read in full (see
    /// [`crate::queue::salvage`]): recorded REJECTED with `reason`, units
    /// returned, replicas told. False when not even that could be written.
    pub async fn reject_unprocessable(&self, queued: &QueuedOrder, reason: &str) -> bool {
        let recorded = self.give_up(queued, reason).await;
        if recorded {
            self.queue
                .settled(queued.ticket, std::slice::from_ref(&queued.order.id))
                .await;
        }
        recorded
    }

    /// Another process (the order processor) settled these reservations:
    /// they have a row now, so stop answering them from memory.
    pub fn apply_settled(&self, ids: &[ReservationId]) {
        {
            let mut pending = self.pending();
            for id in ids {
                pending.remove(id);
            }
        }
        self.emit(Event::QueueAdvanced);
    }

    /// Drops queued reservations older than `older_than` that already have
    /// a row: the processor's notice about them was missed (a broker
    /// reconnect). Checks at most `limit` per call; returns how many it
    /// dropped.
    pub async fn resync_pending(&self, older_than: Duration, limit: usize) -> usize {
        let cutoff =
            now() - chrono::TimeDelta::from_std(older_than).unwrap_or(chrono::TimeDelta::MAX);
        let old: Vec<ReservationId> = self
            .pending()
            .values()
            .filter(|p| p.ticket.is_some() && p.reservation.created_at < cutoff)
            .map(|p| p.reservation.id.clone())
            .take(limit)
            .collect();
        let mut settled = Vec::new();
        for id in old {
            if let Ok(Some(_)) = self.store.reservation(&id).await {
                settled.push(id);
            }
        }
        if !settled.is_empty() {
            self.apply_settled(&settled);
        }
        settled.len()
    }

    fn finish_queued(&self, queued: &QueuedOrder, outcome: CommitOutcome) {
        let order = &queued.order;
        let result = self.answer(order, outcome);
        // The row exists now (or never will): stop answering from memory.
        self.pending().remove(&order.id);
        match result {
            Ok(ReserveResult::Existing(existing)) if existing.id != order.id => {
                tracing::info!(
                    reservation = order.id.as_str(),
                    holder = existing.id.as_str(),
                    "duplicate idempotency key in queue"
                );
            }
            Ok(_) => {}
            Err(err) => {
                tracing::error!(reservation = order.id.as_str(), error = %err, "queued order could not be committed");
            }
        }
    }

    // ---- Reads and the lifecycle ----------------------------------------

    /// The reservation, from memory while queued, else from the database.
    pub async fn get(
        &self,
        id: &ReservationId,
        user: &UserId,
    ) -> Result<Reservation, ReservationError> {
        self.ensure_ready()?;
        let reservation = self.find(id).await?;
        if reservation.user != *user {
            return Err(ReservationError::NotOwner(id.as_str().into()));
        }
        Ok(reservation)
    }

    async fn find(&self, id: &ReservationId) -> Result<Reservation, ReservationError> {
        let queued = self
            .pending()
            .get(id)
            .map(|p| (p.reservation.clone(), p.ticket));
        if let Some((mut reservation, ticket)) = queued {
            if let Some(ticket) = ticket {
                reservation.queue_position = Some(self.queue.position(ticket).await);
            }
            return Ok(reservation);
        }
        let reservation = self
            .store
            .reservation(id)
            .await
            .map_err(store_error)?
            .ok_or_else(|| ReservationError::ReservationNotFound(id.as_str().into()))?;
        self.store
            .with_waitlist_position(reservation)
            .await
            .map_err(store_error)
    }

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
            self.emit(Event::Changed(reservation));
        }
        self.view(row).await
    }

    pub async fn confirm(
        &self,
        id: &ReservationId,
        user: &UserId,
    ) -> Result<Reservation, ReservationError> {
        self.ensure_ready()?;
        self.refuse_if_queued(id, user)?;
        let settled = self
            .store
            .confirm(id, user, now())
            .await
            .map_err(store_error)?;
        self.after_settle(id, settled, "confirm").await
    }

    pub async fn release(
        &self,
        id: &ReservationId,
        user: &UserId,
    ) -> Result<Reservation, ReservationError> {
        self.ensure_ready()?;
        self.refuse_if_queued(id, user)?;
        let settled = self
            .store
            .release(id, user, now(), self.limits.hold_ttl)
            .await
            .map_err(store_error)?;
        if let Settled::Changed {
            reservation,
            restock: Some(restock),
        } = &settled
        {
            self.return_to_gate(reservation, restock).await;
        }
        self.after_settle(id, settled, "release").await
    }

    fn refuse_if_queued(&self, id: &ReservationId, user: &UserId) -> Result<(), ReservationError> {
        match self.pending().get(id) {
            Some(p) if p.reservation.user != *user => {
                Err(ReservationError::NotOwner(id.as_str().into()))
            }
            Some(_) => Err(ReservationError::StillQueued(format!(
                "reservation {} is still queued; watch it until it is held",
                id.as_str()
            ))),
            None => Ok(()),
        }
    }

    async fn after_settle(
        &self,
        id: &ReservationId,
        settled: Settled,
        action: &str,
    ) -> Result<Reservation, ReservationError> {
        match settled {
            Settled::Changed { reservation, .. } => {
                self.emit(Event::Changed(reservation.clone()));
                Ok(reservation)
            }
            Settled::Unchanged(reservation) => Ok(reservation),
            Settled::NotFound => Err(ReservationError::ReservationNotFound(id.as_str().into())),
            Settled::NotOwner => Err(ReservationError::NotOwner(id.as_str().into())),
            // Swept already: to the caller the same as a hold found expired.
            Settled::WrongState(reservation)
                if reservation.state == crate::domain::ReservationState::Expired =>
            {
                Err(ReservationError::HoldExpired(format!(
                    "cannot {action} reservation {}: the hold has expired",
                    id.as_str()
                )))
            }
            Settled::WrongState(reservation) => Err(ReservationError::WrongState(format!(
                "cannot {action} reservation {} in state {}",
                id.as_str(),
                reservation.state.as_db()
            ))),
            Settled::HoldExpired(_) => Err(ReservationError::HoldExpired(format!(
                "cannot {action} reservation {}: the hold has expired",
                id.as_str()
            ))),
        }
    }

    /// Gives a released hold's units back to the gate, as far as they
    /// reached stock: units handed on to the waitlist never do, so no
    /// newcomer can be admitted for them. Tells the new holders' watchers.
    async fn return_to_gate(&self, reservation: &Reservation, restock: &Restock) {
        let entry = GateEntry::new(
            reservation.id.clone(),
            reservation.sku.clone(),
            reservation.user.clone(),
            reservation.quantity,
        )
        .at_version(Some(restock.stock_version));
        let result = if restock.handed.is_empty() {
            self.settle_gate(Settlement::Released, std::slice::from_ref(&entry))
                .await;
            Ok(())
        } else {
            // Forget the hold (its user's units) without returning stock,
            // then add what stayed in stock.
            match self.gate.rejected(&entry).await {
                Ok(()) if restock.returned != 0 => {
                    self.gate
                        .adjust(&reservation.sku, restock.returned, restock.stock_version)
                        .await
                }
                other => other,
            }
        };
        if let Err(err) = result {
            tracing::warn!(reservation = reservation.id.as_str(), error = %err, "could not return units to the stock gate; a reload will repair it");
        }
        if restock.returned > 0 {
            self.restocked(reservation.sku.as_str());
        }
        self.handed_on(&restock.handed);
    }

    /// Waitlist entries the database just served: their watchers hear it.
    fn handed_on(&self, handed: &[Reservation]) {
        for reservation in handed {
            metrics::decision(
                "waitlist",
                if reservation.state == ReservationState::Held {
                    "handed_off"
                } else {
                    "skipped_over_cap"
                },
            );
            self.emit(Event::Changed(reservation.clone()));
        }
    }

    /// Expires lapsed holds (the sweeper); returns how many.
    pub async fn expire_due(&self) -> Result<usize, ReservationError> {
        let expired = self
            .store
            .expire_due(now(), 500, self.limits.hold_ttl)
            .await
            .map_err(store_error)?;
        for (reservation, restock) in &expired {
            if let Some(restock) = restock {
                self.return_to_gate(reservation, restock).await;
            }
            self.emit(Event::Changed(reservation.clone()));
        }
        Ok(expired.len())
    }

    /// Streams the reservation until it reaches a final state or the
    /// receiver is dropped.
    pub async fn watch(
        self: &Arc<Self>,
        id: ReservationId,
        user: UserId,
    ) -> Result<mpsc::Receiver<Result<Reservation, ReservationError>>, ReservationError> {
        // Subscribe before the first read so no change falls in between.
        let mut events = self.events.subscribe();
        let first = self.get(&id, &user).await?;
        let (tx, rx) = mpsc::channel(16);
        let pipeline = Arc::clone(self);
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() || last.state.is_final() {
                return;
            }
            // A waitlist hand-off may happen on another replica (whose
            // events this one never hears): read waiting entries again now
            // and then.
            let mut poll = tokio::time::interval(WAITLIST_WATCH_POLL);
            poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let event = tokio::select! {
                    event = events.recv() => event,
                    _ = poll.tick(), if last.state == ReservationState::Waitlisted => {
                        Err(broadcast::error::RecvError::Lagged(0))
                    }
                };
                let next = match event {
                    Ok(Event::Changed(reservation)) if reservation.id == id => reservation,
                    Ok(Event::Changed(_)) => continue,
                    Ok(Event::QueueAdvanced) if last.state != ReservationState::Queued => continue,
                    // Missed events, a queue move or a waitlist poll: read
                    // the truth again.
                    Ok(Event::QueueAdvanced) | Err(broadcast::error::RecvError::Lagged(_)) => {
                        match pipeline.find(&id).await {
                            Ok(current) => current,
                            Err(err) => {
                                let _ = tx.send(Err(err)).await;
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                };
                if next == last {
                    continue;
                }
                last = next;
                if tx.send(Ok(last.clone())).await.is_err() || last.state.is_final() {
                    return;
                }
            }
        });
        Ok(rx)
    }

    // ---- Operators -------------------------------------------------------

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
        for _ in 0..5 {
            match self.gate.set(&sku_stock(&row)).await {
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

    async fn view(&self, row: InventoryRow) -> Result<StockView, ReservationError> {
        let sku = Sku::from_trusted(row.sku.clone());
        let totals = self.store.unit_totals(&sku).await.map_err(store_error)?;
        let gate_stock = if self.layers().gate {
            // An unreachable gate shows as "no counter", not as an error:
            // operators need the database's view most when the gate is down.
            self.gate.available(&sku).await.ok().flatten()
        } else {
            None
        };
        let queued_units = self
            .pending()
            .values()
            .filter(|p| p.reservation.sku == sku)
            .map(|p| i64::from(p.reservation.quantity))
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
        CommitOutcome::Rejected { .. } | CommitOutcome::UnknownSku => "rejected",
        // A redelivery or a retried key: the first decision was counted.
        CommitOutcome::AlreadyCommitted(_) | CommitOutcome::DuplicateKey(_) => return,
    };
    metrics::decision("db", decision);
}

/// How often a watcher of a WAITLISTED reservation reads it again.
const WAITLIST_WATCH_POLL: Duration = Duration::from_secs(1);

/// How a fenced-off order's REJECTED row starts.
pub const FENCE_REASON: &str = "the order queue did not confirm the order";

fn sku_stock(row: &InventoryRow) -> SkuStock {
    SkuStock {
        sku: Sku::from_trusted(row.sku.clone()),
        db_stock: row.stock,
        max_per_user: u32::try_from(row.max_per_user).unwrap_or(0),
        version: row.version,
    }
}

/// What the database's decision means for the units the gate admitted: the
/// order is in the database; or the database had less stock than the gate
/// believed (forget the reservation, return nothing: the gate over-counted);
/// or no order resulted for another reason (return the units).
fn settlement(outcome: &CommitOutcome) -> Settlement {
    match outcome {
        CommitOutcome::Committed { .. } => Settlement::Committed,
        // A redelivery finds the row the first delivery wrote; settle as
        // that decision was (the first settlement may never have run).
        CommitOutcome::AlreadyCommitted(row) => match row.state {
            ReservationState::Rejected
                if row
                    .reject_reason
                    .as_deref()
                    .is_some_and(|r| r.starts_with(SOLD_OUT_REASON)) =>
            {
                Settlement::Rejected
            }
            ReservationState::Rejected => Settlement::Released,
            _ => Settlement::Committed,
        },
        CommitOutcome::SoldOut { .. }
        | CommitOutcome::UnknownSku
        | CommitOutcome::Rejected {
            cause: RejectCause::SoldOut,
            ..
        } => Settlement::Rejected,
        CommitOutcome::DuplicateKey(_)
        | CommitOutcome::UserLimit { .. }
        | CommitOutcome::Contention { .. }
        | CommitOutcome::Rejected { .. } => Settlement::Released,
    }
}

fn gate_entry(order: &NewOrder) -> GateEntry {
    GateEntry::new(
        order.id.clone(),
        order.sku.clone(),
        order.user.clone(),
        order.quantity,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(user: &str, key: Option<&str>) -> Pending {
        let at = now();
        Pending {
            reservation: Reservation {
                id: ReservationId::generate(),
                sku: Sku::parse("S").unwrap(),
                user: UserId::parse(user).unwrap(),
                quantity: 1,
                state: ReservationState::Queued,
                idempotency_key: key.map(|k| IdempotencyKey::parse(k).unwrap()),
                queue_position: None,
                waitlist_position: None,
                reject_reason: None,
                created_at: at,
                updated_at: at,
                expires_at: None,
            },
            ticket: None,
        }
    }

    #[test]
    fn pending_book_finds_the_first_holder_of_a_key() {
        let mut book = PendingBook::default();
        let holder = queued("u1", Some("k"));
        let twin = queued("u1", Some("k"));
        let other_user = queued("u2", Some("k"));
        let (holder_id, twin_id) = (holder.reservation.id.clone(), twin.reservation.id.clone());
        book.insert(holder);
        book.insert(twin);
        book.insert(other_user);
        let user = UserId::parse("u1").unwrap();
        let key = IdempotencyKey::parse("k").unwrap();
        assert_eq!(
            book.with_key(&user, &key).unwrap().reservation.id,
            holder_id
        );
        // Settling the twin leaves the holder findable.
        book.remove(&twin_id);
        assert_eq!(
            book.with_key(&user, &key).unwrap().reservation.id,
            holder_id
        );
        book.remove(&holder_id);
        assert!(book.with_key(&user, &key).is_none());
        assert!(book.with_key(&UserId::parse("u2").unwrap(), &key).is_some());
        assert_eq!(book.values().count(), 1);
        // A settled holder's key is remembered for retries; the twin's not.
        assert_eq!(book.recently_settled(&user, &key), Some(holder_id));
    }

    #[test]
    fn an_unpublished_reservation_leaves_its_key_free() {
        let mut book = PendingBook::default();
        let failed = queued("u1", Some("k"));
        let id = failed.reservation.id.clone();
        book.insert(failed);
        book.forget(&id);
        let (user, key) = (
            UserId::parse("u1").unwrap(),
            IdempotencyKey::parse("k").unwrap(),
        );
        assert!(book.with_key(&user, &key).is_none());
        assert_eq!(book.recently_settled(&user, &key), None);
    }
}
