//! The in-process stock gate of the embedded profile: the same decision
//! table as the Redis script, under one mutex. Its counters live in memory
//! and are rebuilt from the database at start-up; the per-user units start
//! from zero after a restart, so until then the database alone enforces the
//! per-user limit for holds made before the restart.

use std::{collections::HashMap, sync::Mutex};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{GateDecision, GateEntry, GateError, SaleCap, SkuStock, StockGate, WindowMs};
use crate::domain::Sku;

#[derive(Debug, Default)]
struct Counter {
    available: i64,
    max_per_user: u32,
    /// Row version of the database read the counter was last set from,
    /// and the newest version of a change settled since (see
    /// [`GateEntry::version`]).
    base: i64,
    seen: i64,
    /// Live units per user (admitted and not released or refused).
    users: HashMap<String, i64>,
    window: WindowMs,
    sale: Option<SaleCap>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Admitted, not yet in the database.
    InFlight,
    /// Held or sold in the database.
    Committed,
    /// Released or refused: a tombstone so a second release returns nothing.
    Done,
}

#[derive(Debug)]
struct Admitted {
    sku: String,
    user: String,
    quantity: u32,
    phase: Phase,
    /// The sale whose per-user count this admission added to.
    sale: Option<String>,
    /// The newest database release seen for it (see `released` in
    /// settle.lua): a charge at or below it comes too late to count.
    released: Option<i64>,
}

#[derive(Debug, Default)]
struct State {
    ready: bool,
    counters: HashMap<String, Counter>,
    admitted: HashMap<String, Admitted>,
    /// Sale → user → live units admitted in the sale's SKUs.
    sales: HashMap<String, HashMap<String, i64>>,
}

/// Takes `quantity` off `user`'s live units, dropping the user at zero.
fn free_units(users: &mut HashMap<String, i64>, user: &str, quantity: u32) {
    if let Some(live) = users.get_mut(user) {
        *live -= i64::from(quantity);
        if *live <= 0 {
            users.remove(user);
        }
    }
}

impl State {
    fn in_flight(&self, sku: &str) -> i64 {
        self.admitted
            .values()
            .filter(|a| a.phase == Phase::InFlight && a.sku == sku)
            .map(|a| i64::from(a.quantity))
            .sum()
    }

    fn free_user_units(&mut self, sku: &str, user: &str, quantity: u32) {
        if let Some(counter) = self.counters.get_mut(sku) {
            free_units(&mut counter.users, user, quantity);
        }
    }

    /// Ends a reservation's count against its sale, if it had one.
    fn free_sale_units(&mut self, id: &str) {
        let Some(admitted) = self.admitted.get_mut(id) else {
            return;
        };
        let Some(sale) = admitted.sale.take() else {
            return;
        };
        if let Some(users) = self.sales.get_mut(&sale) {
            free_units(users, &admitted.user, admitted.quantity);
        }
    }

    /// False, changing nothing, for a read older than a settled change
    /// (unless `force`).
    fn set(&mut self, stock: &SkuStock, force: bool) -> bool {
        let in_flight = self.in_flight(stock.sku.as_str());
        let created = !self.counters.contains_key(stock.sku.as_str());
        let counter = self
            .counters
            .entry(stock.sku.as_str().to_owned())
            .or_insert_with(|| Counter {
                base: -1,
                seen: -1,
                ..Counter::default()
            });
        if stock.version < counter.seen && !force {
            return false;
        }
        // Not clamped at zero, as in set.lua.
        counter.available = stock.db_stock - in_flight;
        counter.max_per_user = stock.max_per_user;
        counter.window = stock.window;
        if created {
            counter.sale = stock.sale.clone();
        }
        counter.base = stock.version;
        counter.seen = stock.version;
        true
    }

    /// Notes a settled database change at `version`; whether the counter's
    /// last read already had it.
    fn saw(&mut self, sku: &str, version: Option<i64>) -> bool {
        match (self.counters.get_mut(sku), version) {
            (Some(counter), Some(version)) => {
                counter.seen = counter.seen.max(version);
                version <= counter.base
            }
            _ => false,
        }
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct EmbeddedGate {
    state: Mutex<State>,
    restocks: broadcast::Sender<String>,
}

impl Default for EmbeddedGate {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            restocks: broadcast::channel(1024).0,
        }
    }
}

impl EmbeddedGate {
    pub fn new() -> Self {
        Self::default()
    }

    fn restocked(&self, sku: &str) {
        // Nobody listening is fine.
        let _ = self.restocks.send(sku.to_owned());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave a half-applied
        // decision (every update is a few field writes), so keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl StockGate for EmbeddedGate {
    async fn reserve(&self, request: &GateEntry) -> Result<GateDecision, GateError> {
        let mut state = self.lock();
        if !state.ready {
            return Ok(GateDecision::NotReady);
        }
        let State {
            counters,
            admitted,
            sales,
            ..
        } = &mut *state;
        let Some(counter) = counters.get_mut(request.sku.as_str()) else {
            return Ok(GateDecision::UnknownSku);
        };
        match counter.window {
            (Some(opens_at_ms), _) if request.at_ms < opens_at_ms => {
                return Ok(GateDecision::NotOpen { opens_at_ms })
            }
            (_, Some(closes_at_ms)) if request.at_ms >= closes_at_ms => {
                return Ok(GateDecision::Closed { closes_at_ms })
            }
            _ => {}
        }
        let quantity = i64::from(request.quantity);
        if counter.available < quantity {
            return Ok(GateDecision::SoldOut {
                remaining: counter.available.max(0),
            });
        }
        let live = counter
            .users
            .get(request.user.as_str())
            .copied()
            .unwrap_or(0);
        if counter.max_per_user > 0 && live + quantity > i64::from(counter.max_per_user) {
            return Ok(GateDecision::UserLimit {
                live_units: live,
                limit: counter.max_per_user,
            });
        }
        let user = request.user.as_str();
        if let Some(cap) = &counter.sale {
            let users = sales.entry(cap.sale_id.clone()).or_default();
            let in_sale = users.get(user).copied().unwrap_or(0);
            if in_sale + quantity > i64::from(cap.max_per_user) {
                return Ok(GateDecision::UserLimit {
                    live_units: in_sale,
                    limit: cap.max_per_user,
                });
            }
            users.insert(user.to_owned(), in_sale + quantity);
        }
        counter.available -= quantity;
        let remaining = counter.available;
        counter.users.insert(user.to_owned(), live + quantity);
        admitted.insert(
            request.id.as_str().to_owned(),
            Admitted {
                sku: request.sku.as_str().to_owned(),
                user: request.user.as_str().to_owned(),
                quantity: request.quantity,
                phase: Phase::InFlight,
                sale: counter.sale.as_ref().map(|cap| cap.sale_id.clone()),
                released: None,
            },
        );
        Ok(GateDecision::Reserved { remaining })
    }

    async fn committed(&self, entry: &GateEntry) -> Result<(), GateError> {
        let mut state = self.lock();
        let counted_twice = state.saw(entry.sku.as_str(), entry.version);
        let Some(admitted) = state.admitted.get_mut(entry.id.as_str()) else {
            return Ok(());
        };
        if admitted.phase != Phase::InFlight {
            return Ok(());
        }
        admitted.phase = Phase::Committed;
        if counted_twice {
            // The last read had this commit and subtracted it as in flight.
            if let Some(counter) = state.counters.get_mut(entry.sku.as_str()) {
                counter.available += i64::from(entry.quantity);
            }
        }
        Ok(())
    }

    async fn charged(&self, entry: &GateEntry) -> Result<(), GateError> {
        let mut state = self.lock();
        let sku = entry.sku.as_str();
        let in_read = state.saw(sku, entry.version);
        let quantity = i64::from(entry.quantity);
        match state.admitted.get_mut(entry.id.as_str()) {
            Some(admitted) if admitted.phase == Phase::Committed => return Ok(()),
            // Released after this commit, before the charge arrived.
            Some(admitted) if admitted.released.is_some() && admitted.released >= entry.version => {
                return Ok(())
            }
            Some(admitted) if admitted.phase == Phase::InFlight => {
                // Admitted after all: the admission took its units.
                admitted.phase = Phase::Committed;
                if in_read {
                    if let Some(counter) = state.counters.get_mut(sku) {
                        counter.available += quantity;
                    }
                }
                return Ok(());
            }
            _ => {}
        }
        state.admitted.insert(
            entry.id.as_str().to_owned(),
            Admitted {
                sku: sku.to_owned(),
                user: entry.user.as_str().to_owned(),
                quantity: entry.quantity,
                phase: Phase::Committed,
                sale: None,
                released: None,
            },
        );
        if let Some(counter) = state.counters.get_mut(sku) {
            *counter
                .users
                .entry(entry.user.as_str().to_owned())
                .or_insert(0) += quantity;
            if !in_read {
                counter.available -= quantity;
            }
        }
        Ok(())
    }

    async fn rejected(&self, entry: &GateEntry) -> Result<(), GateError> {
        let mut state = self.lock();
        let Some(admitted) = state.admitted.get_mut(entry.id.as_str()) else {
            return Ok(());
        };
        if admitted.phase == Phase::Done {
            return Ok(());
        }
        admitted.phase = Phase::Done;
        let (sku, user, quantity) = (
            admitted.sku.clone(),
            admitted.user.clone(),
            admitted.quantity,
        );
        state.free_user_units(&sku, &user, quantity);
        state.free_sale_units(entry.id.as_str());
        Ok(())
    }

    async fn release(&self, release: &GateEntry) -> Result<(), GateError> {
        let mut state = self.lock();
        let sku = release.sku.as_str();
        let in_read = state.saw(sku, release.version);
        let known = match state.admitted.get_mut(release.id.as_str()) {
            Some(admitted) if admitted.phase == Phase::Done => {
                admitted.released = admitted.released.max(release.version);
                return Ok(());
            }
            Some(admitted) => {
                admitted.phase = Phase::Done;
                admitted.released = release.version;
                true
            }
            // Admitted before this process started: remember it so a second
            // release is a no-op.
            None => {
                state.admitted.insert(
                    release.id.as_str().to_owned(),
                    Admitted {
                        sku: sku.to_owned(),
                        user: release.user.as_str().to_owned(),
                        quantity: release.quantity,
                        phase: Phase::Done,
                        sale: None,
                        released: release.version,
                    },
                );
                false
            }
        };
        if known || release.version.is_some() {
            state.free_user_units(sku, release.user.as_str(), release.quantity);
        }
        state.free_sale_units(release.id.as_str());
        // The same rule as settle.lua: a database restock comes back unless
        // the last read had it; units the database never saw come back if
        // this counter took them.
        let give = match release.version {
            Some(_) => !in_read,
            None => known,
        };
        if let (true, Some(counter)) = (give, state.counters.get_mut(sku)) {
            counter.available += i64::from(release.quantity);
            drop(state);
            self.restocked(sku);
        }
        Ok(())
    }

    async fn load(&self, stock: &[SkuStock]) -> Result<(), GateError> {
        let mut state = self.lock();
        for sku in stock {
            // A stale read keeps the counter settlements have kept current.
            state.set(sku, false);
        }
        state.ready = true;
        Ok(())
    }

    async fn forget_sale_counts(&self, sale_id: &str) -> Result<(), GateError> {
        self.lock().sales.remove(sale_id);
        Ok(())
    }

    async fn set_sales(&self, sales: &[(Sku, Option<SaleCap>)]) -> Result<(), GateError> {
        let mut state = self.lock();
        for (sku, sale) in sales {
            let Some(counter) = state.counters.get_mut(sku.as_str()) else {
                continue;
            };
            let before = std::mem::replace(&mut counter.sale, sale.clone());
            if let Some(left) =
                before.filter(|b| Some(&b.sale_id) != sale.as_ref().map(|s| &s.sale_id))
            {
                state.sales.remove(&left.sale_id);
            }
        }
        Ok(())
    }

    async fn set_windows(&self, windows: &[(Sku, WindowMs)]) -> Result<(), GateError> {
        let mut state = self.lock();
        for (sku, window) in windows {
            if let Some(counter) = state.counters.get_mut(sku.as_str()) {
                counter.window = *window;
            }
        }
        Ok(())
    }

    async fn set(&self, stock: &SkuStock) -> Result<bool, GateError> {
        let applied = self.lock().set(stock, false);
        if applied {
            self.restocked(stock.sku.as_str());
        }
        Ok(applied)
    }

    async fn reset(&self, stock: &SkuStock) -> Result<(), GateError> {
        self.lock().set(stock, true);
        self.restocked(stock.sku.as_str());
        Ok(())
    }

    async fn adjust(&self, sku: &Sku, delta: i64, version: i64) -> Result<(), GateError> {
        let mut state = self.lock();
        if state.saw(sku.as_str(), Some(version)) {
            return Ok(());
        }
        if let Some(counter) = state.counters.get_mut(sku.as_str()) {
            // Not clamped at zero, as in adjust.lua.
            counter.available += delta;
        }
        drop(state);
        if delta > 0 {
            self.restocked(sku.as_str());
        }
        Ok(())
    }

    async fn available(&self, sku: &Sku) -> Result<Option<i64>, GateError> {
        Ok(self.lock().counters.get(sku.as_str()).map(|c| c.available))
    }

    async fn in_flight(&self, sku: &Sku) -> Result<i64, GateError> {
        Ok(self.lock().in_flight(sku.as_str()))
    }

    async fn is_loaded(&self) -> Result<bool, GateError> {
        Ok(self.lock().ready)
    }

    fn restocks(&self) -> broadcast::Receiver<String> {
        self.restocks.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        domain::{ReservationId, UserId},
        gate::decision_table::{self, loaded, request},
    };

    #[tokio::test]
    async fn follows_the_decision_table() {
        decision_table::run(EmbeddedGate::new).await;
    }

    #[tokio::test]
    async fn rebuilds_race_settlements_without_over_counting() {
        decision_table::rebuilds_race_settlements(EmbeddedGate::new()).await;
    }

    /// Random sales against a model of the decision table (256 cases).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_sales_follow_the_model() {
        decision_table::random_sales(EmbeddedGate::new, 256);
    }

    #[tokio::test]
    async fn a_redriven_order_is_charged_once_and_given_back() {
        decision_table::charge_after_give_up(EmbeddedGate::new()).await;
    }

    #[tokio::test]
    async fn windows_move_without_touching_counters() {
        decision_table::windows_move_without_touching_counters(EmbeddedGate::new()).await;
    }

    #[tokio::test]
    async fn sale_caps_span_skus() {
        decision_table::sale_caps_span_skus(EmbeddedGate::new()).await;
    }

    #[tokio::test]
    async fn release_returns_units_once() {
        let (gate, sku) = loaded(EmbeddedGate::new(), 5, 0).await;
        let r = request(&sku, "u1", 3);
        gate.reserve(&r).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(2));
        gate.release(&r).await.unwrap();
        gate.release(&r).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(5));
    }

    #[tokio::test]
    async fn release_of_a_hold_from_before_a_restart_counts_once() {
        let (gate, sku) = loaded(EmbeddedGate::new(), 2, 0).await;
        let earlier = GateEntry::new(
            ReservationId::generate(),
            sku.clone(),
            UserId::parse("u1").unwrap(),
            3,
        )
        .at_version(Some(1));
        gate.release(&earlier).await.unwrap();
        gate.release(&earlier).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(5));
    }

    #[tokio::test]
    async fn rejection_frees_the_user_but_not_the_stock() {
        let (gate, sku) = loaded(EmbeddedGate::new(), 4, 2).await;
        let r = request(&sku, "u1", 2);
        gate.reserve(&r).await.unwrap();
        gate.rejected(&r).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(2));
        let again = request(&sku, "u1", 2);
        assert_eq!(
            gate.reserve(&again).await.unwrap(),
            GateDecision::Reserved { remaining: 0 }
        );
        // A release after the rejection gives nothing back.
        gate.release(&r).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(0));
    }

    #[tokio::test]
    async fn reload_subtracts_units_still_in_flight() {
        let (gate, sku) = loaded(EmbeddedGate::new(), 10, 0).await;
        let in_flight = request(&sku, "u1", 3);
        gate.reserve(&in_flight).await.unwrap();
        let committed = request(&sku, "u2", 2);
        gate.reserve(&committed).await.unwrap();
        gate.committed(&committed).await.unwrap();
        assert_eq!(gate.in_flight(&sku).await.unwrap(), 3);
        // The database took the committed 2 out of its 10.
        gate.set(&SkuStock {
            version: 1,
            sku: sku.clone(),
            db_stock: 8,
            max_per_user: 0,
            window: (None, None),
            sale: None,
        })
        .await
        .unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(5));
    }

    #[tokio::test]
    async fn concurrent_reservations_never_oversell() {
        let (gate, sku) = loaded(EmbeddedGate::new(), 100, 0).await;
        let gate = std::sync::Arc::new(gate);
        let mut tasks = Vec::new();
        for i in 0..1_000 {
            let gate = gate.clone();
            let sku = sku.clone();
            tasks.push(tokio::spawn(async move {
                let user = format!("u{i}");
                let quantity = 1 + (i % 3) as u32;
                match gate.reserve(&request(&sku, &user, quantity)).await.unwrap() {
                    GateDecision::Reserved { .. } => i64::from(quantity),
                    _ => 0,
                }
            }));
        }
        let mut admitted = 0;
        for task in tasks {
            admitted += task.await.unwrap();
        }
        let left = gate.available(&sku).await.unwrap().unwrap();
        assert!(admitted <= 100);
        assert_eq!(admitted + left, 100);
    }
}
