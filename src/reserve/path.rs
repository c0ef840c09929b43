//! The Reserve path: the sold-out fast path, the gate's decision, then
//! the order queue (publish, confirm, fence) or the commit in the request
//! path; and joining a waitlist when a SKU is sold out.

use std::{sync::Arc, time::Duration};

use tokio::sync::broadcast;
use tracing::Instrument;

use crate::{
    domain::{
        from_millis, now,
        switches::{DbCheckMode, GateFailureMode, Layers},
        IdempotencyKey, Reservation, ReservationId, ReservationState, UserId, WindowCheck,
    },
    error::ReservationError,
    gate::{GateDecision, GateEntry, GateError, Settlement},
    metrics,
    queue::QueueError,
    store::{is_window_reason, CommitParams, NewOrder, WaitlistJoin},
    telemetry::trace,
};

use super::{
    count_outcome, gate_entry, gate_error, queue_error, store_error, Event, KeyState, Pending,
    Pipeline, ReserveCommand, ReserveResult,
};

/// What the gate's step of the Reserve path decided.
pub(super) enum GatePass {
    /// Admitted; units left after this order.
    Admitted { remaining: i64 },
    /// Not asked: the gate is down or being rebuilt and fails open.
    Bypassed,
    /// Refused: sold out (units left, fewer than asked for).
    SoldOut { remaining: i64 },
    /// Refused: over the user's cap.
    OverCap,
    /// Refused: outside the SKU's sale window.
    OutsideWindow(WindowCheck),
}

/// How a fenced-off order's REJECTED row starts.
pub const FENCE_REASON: &str = "the order queue did not confirm the order";

/// How the REJECTED row starts that fences off an order whose commit in
/// the request path had no answer (the connection died with the database
/// server, say in a failover).
pub const COMMIT_FENCE_REASON: &str = "the database did not answer the commit";

/// How long a commit without an answer is looked for, fence write by fence
/// write, while the database is unreachable: about a managed failover's
/// promotion. Past it the outcome is left to the reconciler.
const COMMIT_RESOLVE_WITHIN: Duration = Duration::from_secs(30);

/// Longest a call waits on the first call with its user and key (a twin:
/// a double click the dedup layer did not catch) before answering
/// UNAVAILABLE; that call's gate decision and publish are bounded well
/// below it.
const TWIN_WAIT: Duration = Duration::from_secs(30);

/// How long a call entered in a draw waits for its outcome at most: the
/// longest draw window and then some, for replicas' clocks that differ.
/// The server's request timeout usually ends the call sooner.
const DRAW_WAIT_MOST: Duration =
    Duration::from_millis(crate::domain::MAX_DRAW_WINDOW_MS as u64 + 5_000);

/// How soon an entered call asks again after the close while the draw is
/// still being decided, or after a gate error.
const DRAW_POLL_MS: i64 = 5;

/// A call's hold on its idempotency key, from before the gate until its
/// order is queued (the claim passes to the queued entry) or the call ends
/// without queueing (dropped: the key is free for its twins again).
pub(super) struct KeyClaim {
    pipeline: Arc<Pipeline>,
    user: UserId,
    key: IdempotencyKey,
    token: u64,
}

impl Drop for KeyClaim {
    fn drop(&mut self) {
        self.pipeline
            .pending()
            .release_claim(&self.user, &self.key, self.token);
    }
}

/// `order` as callers see it while it is queued.
pub(super) fn queued_view(order: &NewOrder) -> Reservation {
    Reservation {
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
        cart_id: None,
        lines: Vec::new(),
    }
}

impl Pipeline {
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
    /// reservation with this key pending or recently processed in this
    /// process. `None`: run `reserve`.
    pub fn sold_out_now(&self, cmd: &ReserveCommand) -> Option<ReserveResult> {
        if cmd.join_waitlist || self.ensure_ready().is_err() || !self.layers().gate {
            return None;
        }
        if let Some(key) = &cmd.idempotency_key {
            let pending = self.pending();
            if pending.with_key(&cmd.user, key).is_some()
                || pending.recently_processed(&cmd.user, key).is_some()
            {
                return None;
            }
        }
        // Not counted here: the caller (the dedup layer) counts the answer
        // only if it is the one given.
        let left = self.sold_out.known(&cmd.sku, cmd.quantity.get())?;
        Some(ReserveResult::SoldOut {
            remaining: Some(left),
        })
    }

    /// Sold out and asked to wait: a place in the SKU's waitlist if its
    /// policy offers one, otherwise the sold-out answer stands. The line
    /// lives in the database, whose row lock orders joins and hand-offs.
    pub(super) async fn join_waitlist(
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
            created_at: self.clock.now(),
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
            WaitlistJoin::OutsideWindow(check) => Ok(ReserveResult::OutsideWindow(check)),
            // One more ordinary try; sold out again is the answer (no loop).
            WaitlistJoin::InStock => {
                self.restocked(cmd.sku.as_str());
                self.reserve_once(cmd).await
            }
        }
    }

    /// The Reserve path, top to bottom: ready, the key (an earlier
    /// reservation with it answers), the sold-out fast path, the gate, then
    /// the queue (publish) or the database (commit now).
    async fn reserve_once(
        self: &Arc<Self>,
        cmd: ReserveCommand,
    ) -> Result<ReserveResult, ReservationError> {
        self.ensure_ready()?;
        let layers = self.layers();
        let mut claim = None;
        if let Some(key) = &cmd.idempotency_key {
            if layers.queue {
                match self.claim_key(&cmd.user, key, true).await? {
                    Ok(held) => claim = Some(held),
                    Err(existing) => return Ok(ReserveResult::Existing(existing)),
                }
            } else if let Some(existing) = self.earlier_with_key(&cmd.user, key).await? {
                return Ok(ReserveResult::Existing(existing));
            }
        }
        // Before the order is built: the fast path answers most of a
        // storm, and an id, a clock read and three copies per call show.
        if layers.gate {
            if let Some(left) = self.sold_out.known(&cmd.sku, cmd.quantity.get()) {
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
            created_at: self.clock.now(),
        };
        // The rest on a task of its own: a caller that gives up (deadline,
        // cancel) drops this future, and a gate call, a draw's wait, a
        // publish or a commit abandoned half way would leave an admission
        // unsettled (its units held, the user's count up) until the
        // reconciler came by, or a draw's winner with nobody to place it.
        let this = Arc::clone(self);
        tokio::spawn(trace::follow(async move {
            this.decide(order, layers, claim).await
        }))
        .await
        .unwrap_or_else(|err| Err(ReservationError::Internal(err.into())))
    }

    /// The gate (waiting out a draw it entered the call in), then the
    /// queue or the database.
    async fn decide(
        self: &Arc<Self>,
        order: NewOrder,
        layers: Layers,
        claim: Option<KeyClaim>,
    ) -> Result<ReserveResult, ReservationError> {
        let (gated, remaining) = if layers.gate {
            let entry = gate_entry(&order);
            let mut decision = self.ask_gate(&entry).await;
            if let Ok(GateDecision::Entered { draw_ends_at_ms }) = decision {
                metrics::decision("gate", "entered");
                decision = self.await_draw(entry, draw_ends_at_ms).await;
            }
            match self.gate_pass(decision, &order, &layers)? {
                GatePass::Admitted { remaining } => (true, Some(remaining)),
                GatePass::Bypassed => (false, None),
                GatePass::SoldOut { remaining } => {
                    return Ok(ReserveResult::SoldOut {
                        remaining: Some(remaining),
                    })
                }
                GatePass::OverCap => return Ok(ReserveResult::UserLimit),
                GatePass::OutsideWindow(check) => return Ok(ReserveResult::OutsideWindow(check)),
            }
        } else {
            (false, None)
        };
        if layers.queue {
            self.enqueue(order, gated, remaining, claim).await
        } else {
            self.commit_now(order, layers.db_check, gated).await
        }
    }

    /// One gate call for `entry`.
    pub(super) async fn ask_gate(&self, entry: &GateEntry) -> Result<GateDecision, GateError> {
        self.gate
            .reserve(entry)
            .instrument(trace::span("gate.reserve"))
            .await
    }

    /// Asks the gate again for an entry it entered in a draw closing at
    /// `draw_ends_at_ms`: once the draw has closed by the clock that
    /// decides calls, then shortly after while the draw is still being
    /// run (in chunks, by whichever calls come), until the gate answers
    /// otherwise or [`DRAW_WAIT_MOST`] has passed. A gate error is asked
    /// again too: asking is safe to repeat for an entered call, and
    /// giving up would hand a winner's units back.
    pub(super) async fn await_draw(
        &self,
        mut entry: GateEntry,
        mut draw_ends_at_ms: i64,
    ) -> Result<GateDecision, GateError> {
        let give_up = tokio::time::Instant::now() + DRAW_WAIT_MOST;
        loop {
            let now_ms = self.clock.now().and_utc().timestamp_millis();
            let pause = Duration::from_millis((draw_ends_at_ms - now_ms).max(DRAW_POLL_MS) as u64);
            let left = give_up.saturating_duration_since(tokio::time::Instant::now());
            tokio::time::sleep(pause.min(left)).await;
            entry.at_ms = self.clock.now().and_utc().timestamp_millis();
            let decision = self.ask_gate(&entry).await;
            let again = tokio::time::Instant::now() < give_up;
            match decision {
                Ok(GateDecision::Entered {
                    draw_ends_at_ms: ends,
                }) if again => {
                    draw_ends_at_ms = ends;
                }
                Err(err) if again => {
                    tracing::debug!(error = %err, "asking about a draw again");
                }
                decision => return decision,
            }
        }
    }

    /// What the gate's `decision` on `order` means for the path: admitted,
    /// skipped (it is down or being rebuilt and `layers.gate.failure_mode`
    /// says bypass), refused, or an error (unknown SKU, the gate
    /// unavailable and failing closed).
    pub(super) fn gate_pass(
        &self,
        decision: Result<GateDecision, GateError>,
        order: &NewOrder,
        layers: &Layers,
    ) -> Result<GatePass, ReservationError> {
        match decision {
            Ok(GateDecision::Reserved { remaining }) => {
                metrics::decision("gate", "admitted");
                Ok(GatePass::Admitted { remaining })
            }
            Ok(GateDecision::SoldOut { remaining }) => {
                metrics::decision("gate", "sold_out");
                self.sold_out.remember(&order.sku, remaining);
                Ok(GatePass::SoldOut { remaining })
            }
            Ok(GateDecision::UserLimit { .. }) => {
                metrics::decision("gate", "over_cap");
                Ok(GatePass::OverCap)
            }
            Ok(GateDecision::NotOpen { opens_at_ms }) => {
                metrics::decision("gate", "not_open");
                Ok(GatePass::OutsideWindow(WindowCheck::NotOpen(from_millis(
                    opens_at_ms,
                ))))
            }
            Ok(GateDecision::Closed { closes_at_ms }) => {
                metrics::decision("gate", "closed");
                Ok(GatePass::OutsideWindow(WindowCheck::Closed(from_millis(
                    closes_at_ms,
                ))))
            }
            // Only after the loop gave up waiting for the draw.
            Ok(GateDecision::Entered { .. }) => Err(ReservationError::unavailable(
                "stock gate",
                anyhow::anyhow!("the draw that entered this call has not closed"),
            )),
            Ok(GateDecision::UnknownSku) => {
                metrics::decision("gate", "unknown_sku");
                Err(ReservationError::UnknownSku(order.sku.as_str().into()))
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
                Ok(GatePass::Bypassed)
            }
            Err(err) => {
                self.forget_admission(gate_entry(order));
                if layers.gate_failure == GateFailureMode::FailClosed {
                    metrics::decision("gate", "unavailable");
                    return Err(gate_error(err));
                }
                metrics::decision("gate", "bypassed");
                tracing::warn!(error = %err, "stock gate down; bypassing it");
                Ok(GatePass::Bypassed)
            }
        }
    }

    /// A gate call that failed may still have admitted (the script ran,
    /// its reply was lost with the connection). Returning those units at
    /// once, rather than after `layers.gate.in_flight_timeout_ms`, keeps a
    /// short outage from under-selling. Safe if nothing was admitted: a
    /// release of an admission the gate never recorded changes nothing.
    /// Retried in the background while the gate is unreachable.
    fn forget_admission(&self, entry: GateEntry) {
        self.settle_later(vec![(Settlement::Released, entry)]);
    }

    /// Forgets the fast path's answer for a SKU that was restocked
    /// ([`crate::gate::RESTOCK_ALL`]: for every SKU).
    pub fn restocked(&self, sku: &str) {
        self.sold_out.forget(sku);
    }

    /// Restock messages from the gate, for the listener task.
    pub fn restocks(&self) -> broadcast::Receiver<String> {
        self.gate.restocks()
    }

    /// Resolves when a caller found the gate not loaded.
    pub async fn reload_wanted(&self) {
        self.reload_wanted.notified().await
    }

    /// Publishes `order`, holding its key's `claim` (if any) until the
    /// order is visible as queued or the publish is given up.
    async fn enqueue(
        &self,
        order: NewOrder,
        gated: bool,
        mut remaining: Option<i64>,
        _claim: Option<KeyClaim>,
    ) -> Result<ReserveResult, ReservationError> {
        if !gated {
            // Without the gate, a read of the row still answers sold out and
            // unknown SKUs before anything is queued.
            let row = self
                .store
                .inventory(&order.sku)
                .await
                .map_err(store_error)?
                .ok_or_else(|| ReservationError::UnknownSku(order.sku.as_str().into()))?;
            let check = row.window().check(order.created_at);
            if check != WindowCheck::Open {
                metrics::decision("db", "outside_window");
                return Ok(ReserveResult::OutsideWindow(check));
            }
            if row.stock < i64::from(order.quantity) {
                return Ok(ReserveResult::SoldOut {
                    remaining: Some(row.stock),
                });
            }
            remaining = Some(row.stock - i64::from(order.quantity));
        }
        let mut reservation = queued_view(&order);
        // Visible before it is published, so the processor can never settle
        // it before we know about it.
        self.pending().insert(Pending {
            reservation: reservation.clone(),
            ticket: None,
        });
        let published = self
            .queue
            .publish(order.clone(), gated, None)
            .instrument(trace::span("queue.publish"))
            .await;
        match published {
            Ok(ticket) => {
                tracing::debug!(reservation = order.id.as_str(), ticket, "order queued");
                metrics::decision("queue", "queued");
                self.pending().set_ticket(&order.id, ticket);
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
                if let QueueError::Unconfirmed(why) = &err {
                    // Its key stays taken until the fence decides: the
                    // broker may hold the order, and a twin queueing its
                    // own meanwhile could be the one the database rejects.
                    let fenced = self
                        .fence_unconfirmed(&order, gated, why, err.to_string())
                        .await;
                    if let Ok(ReserveResult::Existing(_)) = &fenced {
                        // The processor's row won: the key was used.
                        self.pending().remove(&order.id);
                    } else {
                        self.pending().forget(&order.id);
                    }
                    return fenced;
                }
                // Units back before the key is free: a twin taking it next
                // must not meet this call's admission at the gate.
                if gated {
                    self.gate_release(&order).await;
                }
                self.pending().forget(&order.id);
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
                self.emit(Event::Changed(Box::new(row)));
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

    pub(super) fn commit_params(&self, mode: DbCheckMode, record_rejections: bool) -> CommitParams {
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
        let committed = self
            .store
            .commit_order(&order, params)
            .instrument(trace::span("db.commit"))
            .await;
        match committed {
            Ok(outcome) => {
                count_outcome(&outcome);
                self.settle(&order, gated, outcome).await
            }
            Err(err) if err.outcome_unknown() => self.resolve_commit(&order, gated, err).await,
            Err(err) => {
                if gated {
                    self.gate_release(&order).await;
                }
                Err(store_error(err))
            }
        }
    }

    /// A commit whose answer was lost (the connection died during it) may
    /// have committed, and a standby promoted since may hold it. A REJECTED
    /// row for its id, written once a primary answers, settles which: it
    /// goes in only if the order never committed, and then the order never
    /// will (its id is taken), so answering UNAVAILABLE and returning the
    /// units is true; otherwise the order's row is the answer. A commit
    /// still waiting for its standby's acknowledgement holds the id, and
    /// the fence's insert waits for it. If no primary answers in
    /// [`COMMIT_RESOLVE_WITHIN`] the outcome is indeterminate: the units
    /// stay with the admission, which the reconciler settles by what
    /// became of it, and the caller, told UNAVAILABLE (the one
    /// indeterminate UNAVAILABLE, as for an unconfirmed publish whose fence
    /// cannot be written), retries with its key. A caller whose deadline
    /// passes first hears DEADLINE_EXCEEDED; this goes on without it.
    async fn resolve_commit(
        &self,
        order: &NewOrder,
        gated: bool,
        err: crate::store::StoreError,
    ) -> Result<ReserveResult, ReservationError> {
        let reason = format!("{COMMIT_FENCE_REASON}: {err}");
        let give_up = tokio::time::Instant::now() + COMMIT_RESOLVE_WITHIN;
        let mut pause = Duration::from_millis(50);
        loop {
            // Bounded too: a fence insert waits on the order's id while a
            // backend still holding it (cut off, not dead) has not ended.
            let left = give_up.saturating_duration_since(tokio::time::Instant::now());
            let attempt =
                tokio::time::timeout(left, self.store.record_failed(order, &reason, now()))
                    .await
                    .unwrap_or_else(|_| {
                        Err(crate::store::StoreError::Connect(format!(
                            "no answer within {COMMIT_RESOLVE_WITHIN:?}"
                        )))
                    });
            match attempt {
                Ok(row) if row.reject_reason.as_deref() == Some(reason.as_str()) => {
                    tracing::warn!(reservation = order.id.as_str(), error = %err, "a commit without an answer did not commit; fenced off");
                    metrics::decision("db", "commit_fenced");
                    if gated {
                        self.gate_release(order).await;
                    }
                    self.emit(Event::Changed(Box::new(row)));
                    return Err(store_error(err));
                }
                Ok(row) => {
                    tracing::warn!(reservation = order.id.as_str(), error = %err, "a commit without an answer did commit");
                    metrics::decision("db", "commit_found");
                    return self
                        .settle(
                            order,
                            gated,
                            crate::store::CommitOutcome::AlreadyCommitted(row),
                        )
                        .await;
                }
                Err(db) if db.is_unavailable() && tokio::time::Instant::now() < give_up => {
                    tracing::debug!(reservation = order.id.as_str(), error = %db, "no primary to settle a commit without an answer yet");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
                Err(db) => {
                    tracing::error!(reservation = order.id.as_str(), error = %db, "a commit without an answer could not be settled; its outcome is left to the reconciler");
                    return Err(store_error(err));
                }
            }
        }
    }

    /// The reservation an earlier call with this key made, if this replica
    /// knows it: still queued (with its position), or processed recently
    /// (read back from the database).
    async fn earlier_with_key(
        &self,
        user: &UserId,
        key: &IdempotencyKey,
    ) -> Result<Option<Reservation>, ReservationError> {
        let (queued, processed) = {
            let pending = self.pending();
            match pending.with_key(user, key) {
                Some(found) => (Some((found.reservation.clone(), found.ticket)), None),
                None => (None, pending.recently_processed(user, key)),
            }
        };
        if let Some((mut reservation, ticket)) = queued {
            if let Some(ticket) = ticket {
                reservation.queue_position = Some(self.queue.position(ticket).await);
            }
            return Ok(Some(reservation));
        }
        match processed {
            Some(id) => self.processed_with_key(&id).await,
            None => Ok(None),
        }
    }

    /// The row of `id`, processed under a key a call uses again; `None`
    /// when the key was not used after all.
    async fn processed_with_key(
        &self,
        id: &ReservationId,
    ) -> Result<Option<Reservation>, ReservationError> {
        // Refused for the sale window: the same call later is decided
        // again (the window may have opened), as its key was not used.
        Ok(self
            .store
            .reservation(id)
            .await
            .map_err(store_error)?
            .filter(|row| !row.reject_reason.as_deref().is_some_and(is_window_reason)))
    }

    /// Takes `user`'s `key` for this call (the queue path): the claim, or
    /// the reservation the key already made here. A call finding the key
    /// taken by one still at the gate or publishing waits for it (at most
    /// [`TWIN_WAIT`]), then answers with its reservation, or takes the key
    /// if that call ended without queueing (refused, or its publish
    /// failed).
    /// `recent`: a reservation this replica processed with the key
    /// recently answers too (a cart, which consults the database instead,
    /// passes false).
    pub(super) async fn claim_key(
        self: &Arc<Self>,
        user: &UserId,
        key: &IdempotencyKey,
        recent: bool,
    ) -> Result<Result<KeyClaim, Reservation>, ReservationError> {
        let changed = Arc::clone(&self.pending().changed);
        let give_up = tokio::time::Instant::now() + TWIN_WAIT;
        let (mut recent, mut waited) = (recent, false);
        loop {
            let notified = changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let state = self.pending().try_claim(user, key, recent);
            let found = match state {
                Ok(token) => {
                    return Ok(Ok(KeyClaim {
                        pipeline: Arc::clone(self),
                        user: user.clone(),
                        key: key.clone(),
                        token,
                    }))
                }
                Err(KeyState::Queued {
                    mut reservation,
                    ticket: Some(ticket),
                }) => {
                    reservation.queue_position = Some(self.queue.position(ticket).await);
                    *reservation
                }
                Err(KeyState::Processed(id)) => match self.processed_with_key(&id).await? {
                    Some(row) => row,
                    None => {
                        recent = false;
                        continue;
                    }
                },
                Err(KeyState::Claimed | KeyState::Queued { ticket: None, .. }) => {
                    waited = true;
                    if tokio::time::timeout_at(give_up, notified).await.is_err() {
                        return Err(ReservationError::unavailable(
                            "order queue",
                            anyhow::anyhow!(
                                "the first call with this idempotency key is still undecided"
                            ),
                        ));
                    }
                    continue;
                }
            };
            if waited {
                metrics::decision("queue", "twin");
            }
            return Ok(Err(found));
        }
    }
}
