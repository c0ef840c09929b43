//! A reservation after Reserve: reading and watching it, confirming and
//! releasing a hold, expiring holds, and handing returned units to the
//! waitlist.

use crate::{
    domain::{now, Reservation, ReservationId, ReservationState, UserId},
    error::ReservationError,
    gate::{GateEntry, Settlement},
    metrics,
    store::{HoldEnded, HoldExtended, Restock},
};

use super::{store_error, Event, Pipeline};

impl Pipeline {
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

    pub(super) async fn find(&self, id: &ReservationId) -> Result<Reservation, ReservationError> {
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

    pub async fn confirm(
        &self,
        id: &ReservationId,
        user: &UserId,
    ) -> Result<Reservation, ReservationError> {
        self.ensure_ready()?;
        self.refuse_if_queued(id, user)?;
        let ended = self
            .store
            .confirm(id, user, now())
            .await
            .map_err(store_error)?;
        self.after_hold_ended(id, ended, "confirm").await
    }

    pub async fn release(
        &self,
        id: &ReservationId,
        user: &UserId,
    ) -> Result<Reservation, ReservationError> {
        self.ensure_ready()?;
        self.refuse_if_queued(id, user)?;
        let ended = self
            .store
            .release(id, user, now(), self.limits.hold_ttl)
            .await
            .map_err(store_error)?;
        match &ended {
            HoldEnded::Changed {
                reservation,
                restock: Some(restock),
            } => self.return_to_gate(reservation, restock).await,
            HoldEnded::CartChanged { restocks, .. } => {
                for (line, restock) in restocks {
                    self.return_to_gate(line, restock).await;
                }
            }
            _ => {}
        }
        self.after_hold_ended(id, ended, "release").await
    }

    /// Makes a HELD reservation's hold last at least `hold` from now,
    /// within `reservations.max_hold_secs` of when it became HELD.
    pub async fn extend(
        &self,
        id: &ReservationId,
        user: &UserId,
        hold: std::time::Duration,
    ) -> Result<Reservation, ReservationError> {
        self.ensure_ready()?;
        self.refuse_if_queued(id, user)?;
        let now = now();
        let until = crate::store::after(now, hold);
        let extended = self
            .store
            .extend_hold(id, user, until, self.limits.max_hold, now)
            .await
            .map_err(store_error)?;
        let id = id.as_str();
        match extended {
            HoldExtended::Extended(reservation) => {
                self.emit(Event::Changed(Box::new(reservation.clone())));
                Ok(reservation)
            }
            HoldExtended::Unchanged(reservation) => Ok(reservation),
            HoldExtended::NotFound => Err(ReservationError::ReservationNotFound(id.into())),
            HoldExtended::NotOwner => Err(ReservationError::NotOwner(id.into())),
            HoldExtended::WrongState(reservation)
                if reservation.state == ReservationState::Expired =>
            {
                Err(ReservationError::HoldExpired(format!(
                    "cannot extend reservation {id}: it has expired"
                )))
            }
            HoldExtended::WrongState(reservation) => Err(ReservationError::WrongState(format!(
                "cannot extend reservation {id} in state {}",
                reservation.state.as_db()
            ))),
            HoldExtended::HoldExpired(_) => Err(ReservationError::HoldExpired(format!(
                "cannot extend reservation {id}: the hold has expired"
            ))),
            HoldExtended::Limit { latest } => Err(ReservationError::HoldLimit {
                id: id.into(),
                latest,
                max_hold_secs: self.limits.max_hold.as_secs(),
            }),
        }
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

    async fn after_hold_ended(
        &self,
        id: &ReservationId,
        ended: HoldEnded,
        action: &str,
    ) -> Result<Reservation, ReservationError> {
        match ended {
            HoldEnded::Changed { reservation, .. }
            | HoldEnded::CartChanged {
                cart: reservation, ..
            } => {
                self.emit(Event::Changed(Box::new(reservation.clone())));
                Ok(reservation)
            }
            HoldEnded::Unchanged(reservation) => Ok(reservation),
            HoldEnded::NotFound => Err(ReservationError::ReservationNotFound(id.as_str().into())),
            HoldEnded::NotOwner => Err(ReservationError::NotOwner(id.as_str().into())),
            // Swept already: to the caller the same as a hold found expired
            // (a waitlist entry that waited out its time reads the same).
            HoldEnded::WrongState(reservation)
                if reservation.state == crate::domain::ReservationState::Expired =>
            {
                Err(ReservationError::HoldExpired(format!(
                    "cannot {action} reservation {}: it has expired",
                    id.as_str()
                )))
            }
            HoldEnded::WrongState(reservation) => Err(ReservationError::WrongState(format!(
                "cannot {action} reservation {} in state {}",
                id.as_str(),
                reservation.state.as_db()
            ))),
            HoldEnded::HoldExpired(_) => Err(ReservationError::HoldExpired(format!(
                "cannot {action} reservation {}: the hold has expired",
                id.as_str()
            ))),
        }
    }

    /// Gives a released hold's units back to the gate, as far as they
    /// reached stock: units handed on to the waitlist never do, so no
    /// newcomer can be admitted for them. Tells the new holders' watchers.
    async fn return_to_gate(&self, reservation: &Reservation, restock: &Restock) {
        let entry = released_entry(reservation, restock);
        let result = if restock.handed.is_empty() {
            self.settle_gate(&[(Settlement::Released, entry)]).await;
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
    pub(super) fn handed_on(&self, handed: &[Reservation]) {
        for reservation in handed {
            metrics::decision(
                "waitlist",
                if reservation.state == ReservationState::Held {
                    "handed_off"
                } else {
                    "skipped_over_cap"
                },
            );
            self.emit(Event::Changed(Box::new(reservation.clone())));
        }
    }

    /// Expires lapsed holds (the sweeper); returns how many.
    pub async fn expire_due(&self) -> Result<usize, ReservationError> {
        let expired = self
            .store
            .expire_due(now(), 500, self.limits.hold_ttl)
            .await
            .map_err(store_error)?;
        // Plain releases settle together, in one gate round trip; a hold
        // whose units went on to the waitlist needs two steps of its own.
        let mut released = Vec::new();
        for (reservation, restock) in &expired {
            match restock {
                Some(restock) if restock.handed.is_empty() => {
                    released.push((Settlement::Released, released_entry(reservation, restock)));
                }
                Some(restock) => self.return_to_gate(reservation, restock).await,
                None => {}
            }
        }
        if !released.is_empty() {
            self.settle_gate(&released).await;
        }
        for (reservation, restock) in &expired {
            if restock
                .as_ref()
                .is_some_and(|r| r.handed.is_empty() && r.returned > 0)
            {
                self.restocked(reservation.sku.as_str());
            }
            self.emit(Event::Changed(Box::new(reservation.clone())));
        }
        Ok(expired.len())
    }
}

/// The gate's view of a hold whose units went back to stock, at the row
/// version that change wrote.
fn released_entry(reservation: &Reservation, restock: &Restock) -> GateEntry {
    GateEntry::new(
        reservation.id.clone(),
        reservation.sku.clone(),
        reservation.user.clone(),
        reservation.quantity,
    )
    .at_version(Some(restock.stock_version))
}
