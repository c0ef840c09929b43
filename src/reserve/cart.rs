//! ReserveCart: several SKUs held under one reservation, all or nothing.
//! Each line goes through the gate as an order of its own, until one is
//! refused: then the units the gate took for the lines before it go back
//! at once, and the lines after it are only compared with the gate's
//! counter. The database commits the lines in one transaction or none.

use std::sync::Arc;

use crate::{
    domain::{
        now, switches::Layers, IdempotencyKey, Quantity, Reservation, ReservationId, Sku, UserId,
        WindowCheck,
    },
    error::ReservationError,
    gate::{GateDecision, GateEntry, Settlement},
    metrics,
    queue::{QueueError, QueuedLine},
    store::{CartOutcome, CommitOutcome, NewOrder},
    telemetry::trace,
};

use tracing::Instrument;

use super::{
    batch::settlement,
    gate_entry,
    path::{queued_view, GatePass, FENCE_REASON},
    queue_error, store_error, Event, Pending, Pipeline,
};

/// A validated ReserveCart call: distinct SKUs, in the caller's order.
#[derive(Debug, Clone)]
pub struct CartCommand {
    pub user: UserId,
    pub lines: Vec<(Sku, Quantity)>,
    pub idempotency_key: Option<IdempotencyKey>,
}

/// Why one line of a cart was not had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineRefusal {
    SoldOut { remaining: Option<i64> },
    UserLimit,
    OutsideWindow(WindowCheck),
}

/// How a ReserveCart call was decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CartResult {
    /// Every line is held: the cart, with its lines.
    Reserved(Reservation),
    /// The order queue is on: the cart is queued whole (QUEUED, with its
    /// position), for the processor to commit or reject as one.
    Queued(Reservation),
    /// An earlier call with the same idempotency key made this one.
    Existing(Reservation),
    /// Nothing is held. Per line, in the caller's order: why it was not
    /// had, or `None` where it could have been.
    Refused(Vec<Option<LineRefusal>>),
}

impl Pipeline {
    /// Holds every line of `cmd` under one reservation, or none.
    pub async fn reserve_cart(
        self: &Arc<Self>,
        cmd: CartCommand,
    ) -> Result<CartResult, ReservationError> {
        self.ensure_ready()?;
        let mut claim = None;
        if let Some(key) = &cmd.idempotency_key {
            // The key for the whole call, as a Reserve's on the queue path:
            // a twin on this replica waits for this call to end, then
            // finds its cart. A Reserve still queued here under the key
            // answers; otherwise the row holding the key does.
            match self.claim_key(&cmd.user, key, false).await? {
                Ok(held) => claim = Some(held),
                Err(queued) => return Ok(CartResult::Existing(queued)),
            }
            let found = self
                .store
                .reservation_with_key(&cmd.user, key)
                .await
                .map_err(store_error)?;
            if let Some(existing) = found {
                return Ok(CartResult::Existing(existing));
            }
        }
        let created_at = self.clock.now();
        let lines: Vec<NewOrder> = cmd
            .lines
            .into_iter()
            .enumerate()
            .map(|(index, (sku, quantity))| NewOrder {
                id: ReservationId::generate(),
                sku,
                user: cmd.user.clone(),
                quantity: quantity.get(),
                idempotency_key: cmd.idempotency_key.clone().filter(|_| index == 0),
                created_at,
            })
            .collect();
        let layers = self.layers();
        // On a task of its own, as a Reserve's: a caller that gives up must
        // not leave the gate's admissions for the lines unsettled.
        let this = Arc::clone(self);
        tokio::spawn(trace::follow(async move {
            let decided = this.decide_cart(lines, layers).await;
            drop(claim);
            decided
        }))
        .await
        .unwrap_or_else(|err| Err(ReservationError::Internal(err.into())))
    }

    async fn decide_cart(
        &self,
        lines: Vec<NewOrder>,
        layers: Layers,
    ) -> Result<CartResult, ReservationError> {
        let budget = tokio::time::Instant::now() + self.limits.in_flight_timeout / 2;
        let mut gated = vec![false; lines.len()];
        let mut refusals: Vec<Option<LineRefusal>> = vec![None; lines.len()];
        if layers.gate {
            for (index, line) in lines.iter().enumerate() {
                if refusals.iter().any(Option::is_some) {
                    // The cart is refused: admitting more of it would take
                    // units other buyers' carts may need, for nothing. The
                    // line is told what the gate's counter says.
                    match self.gate.available(&line.sku).await {
                        Ok(Some(left)) if left < i64::from(line.quantity) => {
                            refusals[index] = Some(LineRefusal::SoldOut {
                                remaining: Some(left),
                            });
                        }
                        Ok(Some(_)) | Err(_) => {}
                        // No counter: an unknown SKU, which the contract
                        // answers NOT_FOUND whatever else the cart holds.
                        Ok(None) => {
                            let row = self.store.inventory(&line.sku).await.map_err(store_error);
                            if !matches!(row, Ok(Some(_))) {
                                self.release_lines(&lines, &gated).await;
                                row?;
                                return Err(ReservationError::UnknownSku(line.sku.as_str().into()));
                            }
                        }
                    }
                    continue;
                }
                let entry = gate_entry(line);
                let mut decision = self.ask_gate(&entry).await;
                if let Ok(GateDecision::Entered { draw_ends_at_ms }) = decision {
                    metrics::decision("gate", "entered");
                    // Lines wait for their draws one after the other: the
                    // whole cart's wait stays within the budget, so that
                    // the lines admitted first are settled before the
                    // reconciler would take them for lost.
                    let left = budget.saturating_duration_since(tokio::time::Instant::now());
                    decision = match tokio::time::timeout(
                        left,
                        self.await_draw(entry.clone(), draw_ends_at_ms),
                    )
                    .await
                    {
                        Ok(decision) => decision,
                        Err(_) => {
                            // Whatever the draw decides for this entry
                            // goes back now, or is found lost later.
                            let mut all = gated.clone();
                            all[index] = true;
                            self.release_lines(&lines, &all).await;
                            return Err(ReservationError::unavailable(
                                "stock gate",
                                anyhow::anyhow!(
                                    "the cart's draws did not all close within its time"
                                ),
                            ));
                        }
                    };
                }
                let pass = match self.gate_pass(decision, line, &layers) {
                    Ok(pass) => pass,
                    Err(err) => {
                        self.release_lines(&lines, &gated).await;
                        return Err(err);
                    }
                };
                match pass {
                    GatePass::Admitted { .. } => gated[index] = true,
                    GatePass::Bypassed => {}
                    GatePass::SoldOut { remaining } => {
                        refusals[index] = Some(LineRefusal::SoldOut {
                            remaining: Some(remaining),
                        })
                    }
                    GatePass::OverCap => refusals[index] = Some(LineRefusal::UserLimit),
                    GatePass::OutsideWindow(check) => {
                        refusals[index] = Some(LineRefusal::OutsideWindow(check))
                    }
                }
            }
            if refusals.iter().any(Option::is_some) {
                self.release_lines(&lines, &gated).await;
                metrics::decision("cart", "refused_at_gate");
                return Ok(CartResult::Refused(refusals));
            }
        }
        if layers.queue {
            return self.enqueue_cart(lines, gated).await;
        }
        let params = self.commit_params(layers.db_check, false);
        let committed = match self.store.commit_cart(&lines, params, &[]).await {
            Ok(outcome) => outcome,
            Err(err) => {
                // Whether the cart committed is unknown only if the
                // connection died during the commit: its lines' gate
                // admissions then stay in flight, and the reconciler
                // settles each by the row it finds (or returns its
                // units). Otherwise nothing was written.
                if !err.outcome_unknown() {
                    self.release_lines(&lines, &gated).await;
                }
                return Err(store_error(err));
            }
        };
        match committed {
            CartOutcome::Committed { cart, versions } => {
                self.settle_lines(&lines, &gated, |index, line| {
                    let entry = gate_entry(line).at_version(Some(versions[index]));
                    (Settlement::Committed, entry)
                })
                .await;
                metrics::decision("cart", "reserved");
                self.emit(Event::Changed(Box::new(cart.clone())));
                Ok(CartResult::Reserved(cart))
            }
            CartOutcome::Existing(existing) => {
                self.release_lines(&lines, &gated).await;
                Ok(CartResult::Existing(existing))
            }
            CartOutcome::Refused(outcomes) => {
                // A line the database found sold out: the gate counted
                // units the database did not have (`settlement`).
                self.settle_lines(&lines, &gated, |index, line| {
                    let action = outcomes[index]
                        .as_ref()
                        .map_or(Settlement::Released, settlement);
                    (action, gate_entry(line))
                })
                .await;
                let mut refusals = Vec::with_capacity(outcomes.len());
                for (line, outcome) in lines.iter().zip(outcomes) {
                    refusals.push(match outcome {
                        None => None,
                        Some(CommitOutcome::SoldOut { remaining }) => Some(LineRefusal::SoldOut {
                            remaining: Some(remaining),
                        }),
                        Some(CommitOutcome::UserLimit { .. }) => Some(LineRefusal::UserLimit),
                        Some(CommitOutcome::OutsideWindow(check)) => {
                            Some(LineRefusal::OutsideWindow(check))
                        }
                        Some(CommitOutcome::UnknownSku) => {
                            return Err(ReservationError::UnknownSku(line.sku.as_str().into()))
                        }
                        Some(CommitOutcome::Contention { attempts }) => {
                            return Err(ReservationError::Contention(attempts))
                        }
                        Some(other) => {
                            return Err(ReservationError::Internal(anyhow::anyhow!(
                                "unexpected outcome for a cart line: {other:?}"
                            )))
                        }
                    });
                }
                metrics::decision("cart", "refused_by_db");
                Ok(CartResult::Refused(refusals))
            }
        }
    }

    /// Publishes the cart as one message, its key's claim passing to the
    /// queued entry. Lines the gate did not admit (it is off, or failing
    /// open) are first compared with the database's rows, as a Reserve's
    /// order is: an unknown SKU, the window or too little stock refuses
    /// the cart before anything is queued.
    async fn enqueue_cart(
        &self,
        lines: Vec<NewOrder>,
        gated: Vec<bool>,
    ) -> Result<CartResult, ReservationError> {
        let mut refusals: Vec<Option<LineRefusal>> = vec![None; lines.len()];
        for (index, line) in lines.iter().enumerate() {
            if gated[index] {
                continue;
            }
            let row = match self.store.inventory(&line.sku).await {
                Ok(Some(row)) => row,
                found => {
                    self.release_lines(&lines, &gated).await;
                    found.map_err(store_error)?;
                    return Err(ReservationError::UnknownSku(line.sku.as_str().into()));
                }
            };
            let check = row.window().check(line.created_at);
            if check != WindowCheck::Open {
                refusals[index] = Some(LineRefusal::OutsideWindow(check));
            } else if row.stock < i64::from(line.quantity) {
                refusals[index] = Some(LineRefusal::SoldOut {
                    remaining: Some(row.stock),
                });
            }
        }
        if refusals.iter().any(Option::is_some) {
            self.release_lines(&lines, &gated).await;
            metrics::decision("cart", "refused_by_db");
            return Ok(CartResult::Refused(refusals));
        }
        let cart_id = lines[0].id.clone();
        let views = lines.iter().map(|line| Reservation {
            cart_id: Some(cart_id.clone()),
            ..queued_view(line)
        });
        let mut cart = Reservation::cart_of(views.collect()).expect("a cart has a line");
        // Visible before it is published, as a Reserve's order.
        self.pending().insert(Pending {
            reservation: cart.clone(),
            ticket: None,
        });
        let more_lines = lines
            .iter()
            .zip(&gated)
            .skip(1)
            .map(|(order, gated)| QueuedLine {
                order: order.clone(),
                gated: *gated,
            })
            .collect();
        let published = self
            .queue
            .publish(lines[0].clone(), gated[0], Some(more_lines))
            .instrument(trace::span("queue.publish"))
            .await;
        match published {
            Ok(ticket) => {
                metrics::decision("cart", "queued");
                self.pending().set_ticket(&cart_id, ticket);
                cart.queue_position = Some(self.queue.position(ticket).await);
                Ok(CartResult::Queued(cart))
            }
            Err(QueueError::Unconfirmed(why)) => {
                // The broker may hold the cart: REJECTED rows for its
                // lines make a late delivery a no-op, or show that the
                // processor got there first.
                let reason = format!("{FENCE_REASON}: {why}");
                let reasons = vec![reason.clone(); lines.len()];
                let fenced = self
                    .store
                    .record_cart_failed(&lines, &reasons, now(), false)
                    .await;
                match fenced {
                    Ok(row) if row.reject_reason.as_deref() == Some(reason.as_str()) => {
                        self.release_lines(&lines, &gated).await;
                        self.pending().forget(&cart_id);
                        self.emit(Event::Changed(Box::new(row)));
                    }
                    Ok(row) => {
                        self.pending().remove(&cart_id);
                        return Ok(CartResult::Existing(row));
                    }
                    Err(err) => {
                        tracing::error!(reservation = cart_id.as_str(), error = %err, "unconfirmed cart could not be fenced off; its outcome is left to the reconciler");
                        self.pending().forget(&cart_id);
                    }
                }
                Err(ReservationError::unavailable(
                    "order queue",
                    anyhow::anyhow!("the order queue did not confirm the cart: {why}"),
                ))
            }
            Err(err) => {
                self.release_lines(&lines, &gated).await;
                self.pending().forget(&cart_id);
                Err(queue_error(err))
            }
        }
    }

    /// Gives back the units the gate admitted for the `gated` lines.
    async fn release_lines(&self, lines: &[NewOrder], gated: &[bool]) {
        self.settle_lines(lines, gated, |_, line| {
            (Settlement::Released, gate_entry(line))
        })
        .await;
    }

    /// Settles with the gate each line it admitted (`gated`), as
    /// `settle` says for that line and its index.
    pub(super) async fn settle_lines(
        &self,
        lines: &[NewOrder],
        gated: &[bool],
        settle: impl Fn(usize, &NewOrder) -> (Settlement, GateEntry),
    ) {
        let entries: Vec<_> = lines
            .iter()
            .enumerate()
            .filter(|(index, _)| gated[*index])
            .map(|(index, line)| settle(index, line))
            .collect();
        if !entries.is_empty() {
            self.settle_gate(&entries).await;
        }
    }
}
