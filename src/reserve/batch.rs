//! The order processor's step: one batch committed in one transaction,
//! the outcome of each order, and the gate given back what the database
//! did not take.

use std::{sync::Arc, time::Duration};

use tracing::Instrument;

use crate::{
    domain::{now, Reservation, ReservationId, ReservationState, Sku},
    error::ReservationError,
    gate::{GateEntry, Settlement},
    metrics,
    queue::QueuedOrder,
    store::{
        line_reason, CartOutcome, CommitOutcome, NewOrder, RejectCause, GIVEN_UP_REASON,
        SOLD_OUT_REASON,
    },
    telemetry::trace,
};

use super::{count_outcome, gate_entry, Event, Pipeline, ReserveResult};

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

/// What the database's decision means for the units the gate admitted: the
/// order is in the database; or the database had less stock than the gate
/// believed (forget the reservation, return nothing: the gate over-counted);
/// or no order resulted for another reason (return the units).
pub(super) fn settlement(outcome: &CommitOutcome) -> Settlement {
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
        | CommitOutcome::OutsideWindow(_)
        | CommitOutcome::UserLimit { .. }
        | CommitOutcome::Contention { .. }
        | CommitOutcome::Rejected { .. } => Settlement::Released,
    }
}

impl Pipeline {
    /// Settles the gate for what the database decided, tells watchers, and
    /// turns the outcome into the caller's answer.
    pub(super) async fn settle(
        &self,
        order: &NewOrder,
        gated: bool,
        outcome: CommitOutcome,
    ) -> Result<ReserveResult, ReservationError> {
        if gated {
            let entry = self.settled_entry(order, &outcome).await;
            self.settle_gate(&[(settlement(&outcome), entry)]).await;
        }
        self.answer(order, outcome)
    }

    /// Tells watchers and turns the database's decision into the caller's
    /// answer.
    pub(super) fn answer(
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
                self.emit(Event::Changed(Box::new(reservation.clone())));
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
            CommitOutcome::OutsideWindow(check) => Ok(ReserveResult::OutsideWindow(check)),
            CommitOutcome::Rejected { reservation, .. } => {
                self.emit(Event::Changed(Box::new(reservation.clone())));
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
    pub(super) async fn stock_version(&self, sku: &Sku) -> Option<i64> {
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
    pub(super) async fn settle_gate(&self, entries: &[(Settlement, GateEntry)]) {
        if let Err(err) = self.gate.settle_batch(entries).await {
            tracing::warn!(reservations = entries.len(), error = %err, "could not settle the stock gate; retrying in the background");
            self.settle_later(entries.to_vec());
        }
    }

    pub(super) fn settle_later(&self, entries: Vec<(Settlement, GateEntry)>) {
        let gate = Arc::clone(&self.gate);
        tokio::spawn(async move {
            let mut pause = Duration::from_millis(100);
            // About a minute; after that the reconciler's checks take over.
            for _ in 0..70 {
                tokio::time::sleep(pause).await;
                if gate.settle_batch(&entries).await.is_ok() {
                    return;
                }
                pause = (pause * 2).min(Duration::from_secs(1));
            }
            tracing::warn!(
                reservations = entries.len(),
                "gave up settling the stock gate; the reconciler repairs it"
            );
        });
    }

    pub(super) async fn gate_release(&self, order: &NewOrder) {
        self.settle_gate(&[(Settlement::Released, gate_entry(order))])
            .await;
    }

    /// Commits one batch from the queue, in order. Returns only when every
    /// order in it is done; a database outage is retried, never dropped.
    /// An order the database keeps refusing with an error is given up after
    /// `layers.queue.max_attempts` tries: it is returned with the reason,
    /// recorded REJECTED and its units given back.
    pub async fn process_batch(&self, batch: &[QueuedOrder]) -> BatchOutcome {
        let traced = batch.iter().map(|queued| trace::Traced {
            traceparent: queued.traceparent.as_deref(),
            created_at: queued.order.created_at,
        });
        match trace::batch_spans(traced) {
            // The order spans end with the batch: they cover its commit.
            Some((span, _orders)) => self.commit_in_order(batch).instrument(span).await,
            None => self.commit_in_order(batch).await,
        }
    }

    async fn commit_in_order(&self, batch: &[QueuedOrder]) -> BatchOutcome {
        let started = std::time::Instant::now();
        ::metrics::histogram!("stockgate_processor_batch_size").record(batch.len() as f64);
        // A redriven order is as old as its first try: it says nothing of
        // how far behind the queue is.
        let fresh = batch.iter().filter(|q| !q.redriven);
        if let Some(oldest) = fresh.map(|q| q.order.created_at).min() {
            let lag = (now() - oldest).to_std().unwrap_or_default();
            ::metrics::gauge!("stockgate_processor_lag_seconds").set(lag.as_secs_f64());
        }
        let mut failed = Vec::new();
        let mut unfinished: Vec<ReservationId> = Vec::new();
        // Runs of single orders share a group commit; a cart commits on its
        // own between them, so the batch is decided in arrival order.
        let mut start = 0;
        for (index, queued) in batch.iter().enumerate() {
            if queued.is_cart() {
                self.commit_singles(&batch[start..index], &mut failed, &mut unfinished)
                    .await;
                self.commit_queued_cart(queued, &mut failed, &mut unfinished)
                    .await;
                start = index + 1;
            }
        }
        self.commit_singles(&batch[start..], &mut failed, &mut unfinished)
            .await;
        if unfinished.is_empty() {
            // One line per queue, except the one queue, which can carry
            // redriven orders numbered in a partition: each line moves on
            // by its own tickets.
            let mut lines: std::collections::BTreeMap<usize, (u64, Vec<ReservationId>)> =
                std::collections::BTreeMap::new();
            for queued in batch {
                let (line, _) = crate::queue::ticket_line(queued.ticket);
                let (last, ids) = lines.entry(line).or_default();
                *last = (*last).max(queued.ticket);
                ids.push(queued.order.id.clone());
            }
            for (last, ids) in lines.into_values() {
                self.queue.processed(last, &ids).await;
            }
        }
        self.emit(Event::QueueAdvanced);
        ::metrics::histogram!("stockgate_processor_commit_duration_seconds")
            .record(started.elapsed().as_secs_f64());
        tracing::debug!(
            orders = batch.len(),
            given_up = failed.len(),
            "batch committed"
        );
        BatchOutcome {
            given_up: failed,
            incomplete: !unfinished.is_empty(),
        }
    }

    /// Commits a run of single orders (the queue's group commit), order
    /// by order where the batch's transaction is refused, retrying those
    /// that lost a race.
    async fn commit_singles(
        &self,
        orders: &[QueuedOrder],
        failed: &mut Vec<(QueuedOrder, String)>,
        unfinished: &mut Vec<ReservationId>,
    ) {
        let mut todo: Vec<&QueuedOrder> = orders.iter().collect();
        let mut backoff = Duration::from_millis(10);
        while !todo.is_empty() {
            let orders: Vec<NewOrder> = todo.iter().map(|q| q.order.clone()).collect();
            let reopen: Vec<ReservationId> = todo
                .iter()
                .filter(|q| q.redriven)
                .map(|q| q.order.id.clone())
                .collect();
            let params = self.commit_params(self.layers().db_check, true);
            let outcomes = match self
                .store
                .commit_batch_reopening(&orders, params, &reopen)
                .instrument(trace::span("db.commit"))
                .await
            {
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
                                self.give_up_into(queued, reason, failed, unfinished).await;
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
            // One gate round trip for the batch, not one per order.
            let mut settlements = Vec::with_capacity(done.len());
            for (queued, outcome) in done.iter().filter(|(queued, _)| queued.gated) {
                let entry = self.settled_entry(&queued.order, outcome).await;
                settlements.push((settlement(outcome), entry));
            }
            if !settlements.is_empty() {
                self.settle_gate(&settlements).await;
            }
            for (queued, outcome) in done.iter().filter(|(queued, _)| queued.redriven) {
                self.redriven_took(&queued.order, outcome).await;
            }
            // Given up on an earlier delivery whose batch was not acked: its
            // dead letter may never have been written, so write it (again).
            for (queued, outcome) in &done {
                if let CommitOutcome::AlreadyCommitted(row) = outcome {
                    let given_up = row
                        .reject_reason
                        .as_deref()
                        .filter(|r| r.starts_with(GIVEN_UP_REASON));
                    if let (Some(reason), false) = (given_up, queued.redriven) {
                        failed.push(((*queued).clone(), reason.to_owned()));
                    }
                }
            }
            for (queued, outcome) in done {
                self.finish_queued(queued, outcome);
            }
            todo = again.into_iter().map(|(queued, _)| queued).collect();
        }
    }

    /// Commits a queued cart in one transaction, or records it REJECTED
    /// whole (each line with its own reason), and settles the gate line by
    /// line. A database outage is retried; an error past
    /// `layers.queue.max_attempts` tries gives the cart up.
    async fn commit_queued_cart(
        &self,
        queued: &QueuedOrder,
        failed: &mut Vec<(QueuedOrder, String)>,
        unfinished: &mut Vec<ReservationId>,
    ) {
        let lines = queued.lines();
        let gated = queued.gated_lines();
        let reopen = if queued.redriven {
            vec![queued.order.id.clone()]
        } else {
            Vec::new()
        };
        let mut attempts = 0;
        let mut backoff = Duration::from_millis(10);
        let outcome = loop {
            let params = self.commit_params(self.layers().db_check, true);
            let committed = self
                .store
                .commit_cart(&lines, params, &reopen)
                .instrument(trace::span("db.commit"))
                .await;
            match committed {
                Ok(CartOutcome::Refused(outcomes))
                    if outcomes
                        .iter()
                        .any(|o| matches!(o, Some(CommitOutcome::Contention { .. }))) =>
                {
                    metrics::decision("db", "contention");
                }
                Ok(outcome) => break outcome,
                Err(err) if err.is_unavailable() => {
                    metrics::decision("db", "retry");
                    tracing::error!(error = %err, reservation = queued.order.id.as_str(), "cart commit failed; retrying");
                }
                Err(err) => {
                    attempts += 1;
                    if attempts >= self.limits.max_order_attempts {
                        let reason = format!("failed {attempts} times: {err}");
                        self.give_up_into(queued, reason, failed, unfinished).await;
                        return;
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        };
        let cart = match outcome {
            CartOutcome::Committed { cart, versions } => {
                metrics::decision("cart", "reserved");
                // A redriven cart holds no gate units: its lines are charged.
                let (action, settled) = if queued.redriven {
                    (Settlement::Charged, vec![self.layers().gate; lines.len()])
                } else {
                    (Settlement::Committed, gated)
                };
                self.settle_lines(&lines, &settled, |index, line| {
                    (action, gate_entry(line).at_version(Some(versions[index])))
                })
                .await;
                cart
            }
            CartOutcome::Existing(cart) if cart.id == queued.order.id => {
                // A redelivery: settle as the first delivery decided (its
                // settlement may never have run), and write a dead letter
                // it may not have written.
                if let Some(reason) = cart
                    .reject_reason
                    .as_deref()
                    .filter(|r| r.starts_with(GIVEN_UP_REASON) && !queued.redriven)
                {
                    failed.push((queued.clone(), reason.to_owned()));
                }
                self.settle_recorded(&lines, &gated, &cart).await;
                cart
            }
            CartOutcome::Existing(holder) => {
                tracing::info!(
                    reservation = queued.order.id.as_str(),
                    holder = holder.id.as_str(),
                    "duplicate idempotency key in queue"
                );
                let reason = format!(
                    "duplicate idempotency key: reservation {} holds it",
                    holder.id.as_str()
                );
                let reasons = vec![reason; lines.len()];
                let rejected =
                    self.reject_cart(queued, &lines, &gated, &reasons, failed, unfinished);
                match rejected.await {
                    Some(cart) => cart,
                    None => return,
                }
            }
            CartOutcome::Refused(outcomes) => {
                let reasons: Vec<String> =
                    outcomes.iter().map(|o| line_reason(o.as_ref())).collect();
                let rejected =
                    self.reject_cart(queued, &lines, &gated, &reasons, failed, unfinished);
                match rejected.await {
                    Some(cart) => cart,
                    None => return,
                }
            }
        };
        self.pending().remove(&queued.order.id);
        self.emit(Event::Changed(Box::new(cart)));
    }

    /// Gives `queued` up (into `failed`, bound for the dead-letter queue),
    /// or, when not even that can be recorded, keeps it for a redelivery
    /// (`unfinished`).
    async fn give_up_into(
        &self,
        queued: &QueuedOrder,
        reason: String,
        failed: &mut Vec<(QueuedOrder, String)>,
        unfinished: &mut Vec<ReservationId>,
    ) {
        if self.give_up(queued, &reason).await {
            failed.push((queued.clone(), reason));
        } else {
            unfinished.push(queued.order.id.clone());
        }
    }

    /// Records `queued`, a cart the database would not take, REJECTED
    /// with `reasons` (one per line) and settles its lines by their rows
    /// (the first delivery's settlement may never have run); `lines` and
    /// `gated` are its lines and which of them the gate holds. `None` when
    /// it could not be recorded: it is then given up (`failed`) or, if not
    /// even that could be written, left for a redelivery (`unfinished`).
    async fn reject_cart(
        &self,
        queued: &QueuedOrder,
        lines: &[NewOrder],
        gated: &[bool],
        reasons: &[String],
        failed: &mut Vec<(QueuedOrder, String)>,
        unfinished: &mut Vec<ReservationId>,
    ) -> Option<Reservation> {
        metrics::decision("cart", "rejected");
        match self.record_cart(queued, lines, reasons).await {
            Ok(cart) => {
                self.settle_recorded(lines, gated, &cart).await;
                Some(cart)
            }
            Err(reason) => {
                self.give_up_into(queued, reason, failed, unfinished).await;
                None
            }
        }
    }

    /// Records `queued`, a cart of `lines`, REJECTED with a reason per line (its
    /// given-up rows replaced, if it was redriven), retrying while the
    /// database is unreachable and `layers.queue.max_attempts` times on an
    /// error; the error's reason past that. A cart whose id has rows
    /// already is answered with them.
    async fn record_cart(
        &self,
        queued: &QueuedOrder,
        lines: &[NewOrder],
        reasons: &[String],
    ) -> Result<Reservation, String> {
        self.with_retries(|| async move {
            self.store
                .record_cart_failed(lines, reasons, now(), queued.redriven)
                .await
        })
        .await
        .map_err(|why| format!("recording it {why}"))
    }

    /// Runs `attempt` until it answers: again while the database is
    /// unreachable (an outage does not count), and on any other error up
    /// to `layers.queue.max_attempts` times, whose last error is then the
    /// reason given.
    async fn with_retries<T, F>(&self, mut attempt: impl FnMut() -> F) -> Result<T, String>
    where
        F: std::future::Future<Output = Result<T, crate::store::StoreError>>,
    {
        let mut attempts = 0;
        let mut backoff = Duration::from_millis(100);
        loop {
            match attempt().await {
                Ok(answer) => return Ok(answer),
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

    /// Settles the `gated` lines of a cart the database holds as `cart`,
    /// each by its own row (a HELD line committed, a REJECTED one by its
    /// reason), as the processor settles a single order's redelivery.
    async fn settle_recorded(&self, lines: &[NewOrder], gated: &[bool], cart: &Reservation) {
        let mut settlements = Vec::new();
        let mut returned = Vec::new();
        for (line, _) in lines.iter().zip(gated).filter(|(_, gated)| **gated) {
            let outcome = CommitOutcome::AlreadyCommitted(cart.line_row(&line.id));
            let action = settlement(&outcome);
            let entry = self.settled_entry(line, &outcome).await;
            if action == Settlement::Released {
                returned.push(line.sku.as_str());
            }
            settlements.push((action, entry));
        }
        if !settlements.is_empty() {
            self.settle_gate(&settlements).await;
        }
        for sku in returned {
            self.restocked(sku);
        }
    }

    /// One order in its own transaction, retried on errors up to
    /// `layers.queue.max_attempts` times (an outage does not count).
    async fn commit_alone(&self, queued: &QueuedOrder) -> Result<CommitOutcome, String> {
        let reopen = if queued.redriven {
            std::slice::from_ref(&queued.order.id)
        } else {
            &[]
        };
        self.with_retries(|| async move {
            let params = self.commit_params(self.layers().db_check, true);
            self.store
                .commit_batch_reopening(std::slice::from_ref(&queued.order), params, reopen)
                .await
                .map(|mut outcomes| outcomes.remove(0))
        })
        .await
    }

    /// A redriven order holds no gate units (giving up returned them): its
    /// commit is charged to the gate ([`Settlement::Charged`]), which
    /// takes the units off the counter, counts them against the user, and
    /// keeps the reservation so that its release gives them back. Missed
    /// (gate off or unreachable past the retries), the reconciler repairs
    /// the counter; until then the gate admits too much, which the
    /// database check refuses.
    async fn redriven_took(&self, order: &NewOrder, outcome: &CommitOutcome) {
        let CommitOutcome::Committed { stock_version, .. } = outcome else {
            return;
        };
        tracing::info!(
            reservation = order.id.as_str(),
            sku = order.sku.as_str(),
            "redriven order committed"
        );
        if !self.layers().gate {
            return;
        }
        let entry = gate_entry(order).at_version(Some(*stock_version));
        self.settle_gate(&[(Settlement::Charged, entry)]).await;
    }

    /// Ends an order the database would not take: REJECTED row (with the
    /// time of failure, since the order's own data may be what fails),
    /// units back to the gate, watchers told, error logged. Returns false,
    /// changing nothing, when not even the REJECTED row can be written: the
    /// caller was told QUEUED, so the order must stay for a redelivery.
    async fn give_up(&self, queued: &QueuedOrder, reason: &str) -> bool {
        let order = &queued.order;
        tracing::error!(reservation = order.id.as_str(), sku = order.sku.as_str(), %reason, "order given up after repeated failures");
        let reason = format!("{GIVEN_UP_REASON}: {reason}");
        let mut backoff = Duration::from_millis(100);
        let lines = queued.lines();
        let recorded = loop {
            let recorded = if queued.is_cart() {
                // Stamped now, as `record_failed` stamps an order: the
                // cart's own time may be what the database refuses.
                let at = now();
                let stamped: Vec<NewOrder> = lines
                    .iter()
                    .map(|line| NewOrder {
                        created_at: at,
                        ..line.clone()
                    })
                    .collect();
                let reasons = vec![reason.clone(); lines.len()];
                self.store
                    .record_cart_failed(&stamped, &reasons, at, queued.redriven)
                    .await
            } else {
                self.store.record_failed(order, &reason, now()).await
            };
            match recorded {
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
        self.settle_recorded(&lines, &queued.gated_lines(), &reservation)
            .await;
        self.pending().remove(&order.id);
        self.emit(Event::Changed(Box::new(reservation)));
        true
    }

    /// A pass mark was delivered: its line is done through `through`.
    pub async fn pass_tickets(&self, through: u64) {
        self.queue.processed(through, &[]).await;
    }

    /// An order the processor cannot read in full (see
    /// [`crate::queue::salvage`]): recorded REJECTED with `reason`, units
    /// returned, replicas told. False when not even that could be written.
    pub async fn reject_unprocessable(&self, queued: &QueuedOrder, reason: &str) -> bool {
        let recorded = self.give_up(queued, reason).await;
        if recorded {
            self.queue
                .processed(queued.ticket, std::slice::from_ref(&queued.order.id))
                .await;
        }
        recorded
    }

    /// Another process (the order processor) processed these reservations:
    /// they have a row now, so stop answering them from memory.
    pub fn apply_processed(&self, ids: &[ReservationId]) {
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
        let mut processed = Vec::new();
        for id in old {
            if let Ok(Some(_)) = self.store.reservation(&id).await {
                processed.push(id);
            }
        }
        if !processed.is_empty() {
            self.apply_processed(&processed);
        }
        processed.len()
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
}
