//! The reservations this replica published and the processor has not
//! processed yet: the only place a QUEUED reservation is visible before it
//! has a row, and the keys of those processed recently.

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::{sync::Notify, time::Instant};

use crate::domain::{IdempotencyKey, Reservation, ReservationId, UserId};

pub(super) struct Pending {
    pub(super) reservation: Reservation,
    pub(super) ticket: Option<u64>,
}

/// Queued reservations by id, and by (user, idempotency key) so a retry
/// finds its queued twin without scanning the queue; and the keys of
/// reservations processed recently, so a retry that arrives just after the
/// processor committed the first call still gets that reservation (not a
/// new one the database would reject as a duplicate). Older retries are
/// the dedup layer's job (`layers.dedup`, shared through Redis).
#[derive(Default)]
pub(super) struct PendingBook {
    pub(super) by_id: HashMap<ReservationId, Pending>,
    /// A queued cart's lines after its first, each to the cart's id: the
    /// gate and the reconciler know the lines by their own ids.
    pub(super) lines: HashMap<ReservationId, ReservationId>,
    pub(super) by_key: HashMap<(UserId, IdempotencyKey), ReservationId>,
    pub(super) recent: HashMap<(UserId, IdempotencyKey), ReservationId>,
    pub(super) recent_order: std::collections::VecDeque<((UserId, IdempotencyKey), Instant)>,
    /// Keys a call has taken before the gate and not yet queued under (see
    /// [`PendingBook::try_claim`]), each with its claim's token.
    pub(super) claims: HashMap<(UserId, IdempotencyKey), u64>,
    pub(super) next_claim: u64,
    /// Woken whenever a claim ends, a publish ends (its ticket set, or
    /// forgotten) or a reservation is processed: what a call waiting on
    /// its key's first call waits for.
    pub(super) changed: Arc<Notify>,
}

/// Where a (user, idempotency key) stands in this replica.
#[derive(Debug)]
pub(super) enum KeyState {
    /// Another call holds it and has not queued yet (it is at the gate).
    Claimed,
    /// Queued under this reservation; `ticket` once the publish was
    /// confirmed.
    Queued {
        reservation: Box<Reservation>,
        ticket: Option<u64>,
    },
    /// Processed recently as this reservation.
    Processed(ReservationId),
}

/// How many processed keys a replica remembers, and for how long.
pub(super) const RECENT_KEYS: usize = 100_000;

pub(super) const RECENT_FOR: Duration = Duration::from_secs(600);

impl PendingBook {
    /// The queued reservation `id`, or the queued cart it is a line of.
    pub(super) fn get(&self, id: &ReservationId) -> Option<&Pending> {
        let id = self.lines.get(id).unwrap_or(id);
        self.by_id.get(id)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Pending> {
        self.by_id.values()
    }

    pub(super) fn with_key(&self, user: &UserId, key: &IdempotencyKey) -> Option<&Pending> {
        let id = self.by_key.get(&(user.clone(), key.clone()))?;
        self.by_id.get(id)
    }

    /// Takes `user`'s `key` for one call, before the gate: the token of
    /// the claim, or where the key stands when another call has it (a
    /// processed one only when `recent` is asked). Concurrent twins of a
    /// call (a double click the dedup layer did not catch) thus never
    /// reach the gate, and never queue a second order that the database
    /// would reject.
    pub(super) fn try_claim(
        &mut self,
        user: &UserId,
        key: &IdempotencyKey,
        recent: bool,
    ) -> Result<u64, KeyState> {
        let slot = (user.clone(), key.clone());
        if let Some(pending) = self.by_key.get(&slot).and_then(|id| self.by_id.get(id)) {
            return Err(KeyState::Queued {
                reservation: Box::new(pending.reservation.clone()),
                ticket: pending.ticket,
            });
        }
        if self.claims.contains_key(&slot) {
            return Err(KeyState::Claimed);
        }
        if recent {
            if let Some(id) = self.recent.get(&slot) {
                return Err(KeyState::Processed(id.clone()));
            }
        }
        self.next_claim += 1;
        self.claims.insert(slot, self.next_claim);
        Ok(self.next_claim)
    }

    /// The call holding claim `token` on the key ended without queueing.
    pub(super) fn release_claim(&mut self, user: &UserId, key: &IdempotencyKey, token: u64) {
        let slot = (user.clone(), key.clone());
        if self.claims.get(&slot) == Some(&token) {
            self.claims.remove(&slot);
            self.changed.notify_waiters();
        }
    }

    /// `id`'s publish was confirmed as `ticket`.
    pub(super) fn set_ticket(&mut self, id: &ReservationId, ticket: u64) {
        if let Some(pending) = self.by_id.get_mut(id) {
            pending.ticket = Some(ticket);
        }
        self.changed.notify_waiters();
    }

    /// Queues `pending`, its key's claim (if any) passing to it.
    pub(super) fn insert(&mut self, pending: Pending) {
        let reservation = &pending.reservation;
        if let Some(key) = &reservation.idempotency_key {
            self.claims.remove(&(reservation.user.clone(), key.clone()));
            // The first holder keeps the key: it is queued ahead of any twin,
            // so its order is the one the database will keep.
            self.by_key
                .entry((reservation.user.clone(), key.clone()))
                .or_insert_with(|| reservation.id.clone());
        }
        for line in reservation.lines.iter().skip(1) {
            self.lines.insert(line.id.clone(), reservation.id.clone());
        }
        self.by_id.insert(reservation.id.clone(), pending);
    }

    /// The processor is done with `id`: forget it, remembering its key.
    pub(super) fn remove(&mut self, id: &ReservationId) {
        self.take(id, true);
    }

    /// `id` was never queued (its publish failed): forget it entirely, so a
    /// retry with its key runs afresh.
    pub(super) fn forget(&mut self, id: &ReservationId) {
        self.take(id, false);
    }

    pub(super) fn take(&mut self, id: &ReservationId, remember: bool) {
        let Some(pending) = self.by_id.remove(id) else {
            return;
        };
        self.changed.notify_waiters();
        let reservation = pending.reservation;
        for line in &reservation.lines {
            self.lines.remove(&line.id);
        }
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

    pub(super) fn remember(&mut self, slot: (UserId, IdempotencyKey), id: ReservationId) {
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

    pub(super) fn recently_processed(
        &self,
        user: &UserId,
        key: &IdempotencyKey,
    ) -> Option<ReservationId> {
        self.recent.get(&(user.clone(), key.clone())).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{now, ReservationState, Sku};

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
                cart_id: None,
                lines: Vec::new(),
            },
            ticket: None,
        }
    }

    #[test]
    fn a_claimed_key_is_held_until_queued_or_released() {
        let mut book = PendingBook::default();
        let user = UserId::parse("u1").unwrap();
        let key = IdempotencyKey::parse("k").unwrap();
        let token = book.try_claim(&user, &key, true).unwrap();
        assert!(matches!(
            book.try_claim(&user, &key, true),
            Err(KeyState::Claimed)
        ));
        // Queued: the claim passes to the entry, and a late release of it
        // changes nothing.
        let first = queued("u1", Some("k"));
        let id = first.reservation.id.clone();
        book.insert(first);
        book.release_claim(&user, &key, token);
        assert!(matches!(
            book.try_claim(&user, &key, true),
            Err(KeyState::Queued { ticket: None, .. })
        ));
        book.set_ticket(&id, 7);
        assert!(matches!(
            book.try_claim(&user, &key, true),
            Err(KeyState::Queued {
                ticket: Some(7),
                ..
            })
        ));
        // Processed: remembered, unless the caller asks past it.
        book.remove(&id);
        assert!(matches!(
            book.try_claim(&user, &key, true),
            Err(KeyState::Processed(found)) if found == id
        ));
        let second = book.try_claim(&user, &key, false).unwrap();
        // Released without queueing: free again.
        book.release_claim(&user, &key, second);
        assert!(book.try_claim(&user, &key, false).is_ok());
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
        // Processing the twin leaves the holder findable.
        book.remove(&twin_id);
        assert_eq!(
            book.with_key(&user, &key).unwrap().reservation.id,
            holder_id
        );
        book.remove(&holder_id);
        assert!(book.with_key(&user, &key).is_none());
        assert!(book.with_key(&UserId::parse("u2").unwrap(), &key).is_some());
        assert_eq!(book.values().count(), 1);
        // A processed holder's key is remembered for retries; the twin's not.
        assert_eq!(book.recently_processed(&user, &key), Some(holder_id));
    }

    #[test]
    fn a_queued_carts_lines_find_the_cart_until_it_is_processed() {
        let mut book = PendingBook::default();
        let mut cart = queued("u1", Some("k"));
        let id = cart.reservation.id.clone();
        cart.reservation.cart_id = Some(id.clone());
        cart.reservation.lines = (0..3)
            .map(|n| crate::domain::CartLine {
                id: if n == 0 {
                    id.clone()
                } else {
                    ReservationId::generate()
                },
                sku: Sku::parse(&format!("S{n}")).unwrap(),
                quantity: 1,
                reject_reason: None,
            })
            .collect();
        let line = cart.reservation.lines[2].id.clone();
        book.insert(cart);
        assert_eq!(book.get(&line).unwrap().reservation.id, id);
        assert_eq!(book.get(&id).unwrap().reservation.id, id);
        book.remove(&id);
        assert!(book.get(&line).is_none());
        assert!(book.lines.is_empty());
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
        assert_eq!(book.recently_processed(&user, &key), None);
    }
}
