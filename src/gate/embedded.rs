//! The in-process stock gate of the embedded profile: the same decision
//! table as the Redis script, under one mutex. Its counters live in memory
//! and are rebuilt from the database at start-up; the per-user units start
//! from zero after a restart, so until then the database alone enforces the
//! per-user limit for holds made before the restart.

use std::{
    collections::{HashMap, HashSet},
    sync::Mutex,
};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{
    draw::{draw_order, new_seed, Draw, DrawEntrant, DrawOutcome, DrawSummary, MAX_DRAW_ENTRANTS},
    GateDecision, GateEntry, GateError, SaleCap, SkuStock, StockGate, WindowMs,
};
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
    /// SKU → its latest draw.
    draws: HashMap<String, DrawState>,
}

impl DrawState {
    fn new(opens: i64, ends: i64) -> Self {
        Self {
            opens,
            ends,
            seed: new_seed(),
            entrants: Vec::new(),
            entered: HashSet::new(),
            users: HashSet::new(),
            drawn_at: None,
            stock_at_draw: 0,
            decided: HashMap::new(),
            overflow: 0,
            recorded: false,
        }
    }

    /// As operators read it.
    fn view(&self) -> Draw {
        let places: HashMap<&str, u32> = if self.drawn_at.is_some() {
            draw_order(&self.seed, self.entrants.iter().map(|(id, ..)| id.as_str()))
                .into_iter()
                .enumerate()
                .map(|(place, id)| (id, place as u32 + 1))
                .collect()
        } else {
            HashMap::new()
        };
        let entrants = self
            .entrants
            .iter()
            .enumerate()
            .map(|(arrival, (id, user, quantity))| DrawEntrant {
                id: id.clone(),
                user: user.clone(),
                quantity: *quantity,
                arrival: arrival as u32 + 1,
                drawn: places.get(id.as_str()).copied().unwrap_or(0),
                outcome: self.drawn_at.map(|_| match self.decided.get(id) {
                    Some((_, Some(GateDecision::Reserved { .. }))) => DrawOutcome::Admitted,
                    Some((_, Some(GateDecision::UserLimit { .. }))) => DrawOutcome::UserLimit,
                    Some((_, None)) => DrawOutcome::Withdrawn,
                    _ => DrawOutcome::SoldOut,
                }),
            })
            .collect();
        Draw {
            opens_at_ms: self.opens,
            ends_at_ms: self.ends,
            seed: self.seed.clone(),
            drawn_at_ms: self.drawn_at,
            stock_at_draw: self.stock_at_draw,
            entrants,
            overflow: self.overflow,
        }
    }
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

/// A SKU's draw for one opening.
#[derive(Debug)]
struct DrawState {
    opens: i64,
    ends: i64,
    seed: String,
    /// (id, user, quantity), in arrival order.
    entrants: Vec<(String, String, u32)>,
    entered: HashSet<String>,
    /// One entry per user.
    users: HashSet<String>,
    drawn_at: Option<i64>,
    stock_at_draw: i64,
    /// What the draw decided for the entrants it reached (place, answer;
    /// `None` for one withdrawn); those after the stock ran out are sold
    /// out.
    decided: HashMap<String, (u32, Option<GateDecision>)>,
    overflow: u32,
    /// Claimed for the audit trail.
    recorded: bool,
}

impl State {
    /// Decides one call at its SKU's counter, as reserve.lua's admission
    /// part does (and the sale's cap as sale_take.lua).
    fn admit(&mut self, sku: &str, id: &str, user: &str, quantity: u32) -> GateDecision {
        let State {
            counters,
            admitted,
            sales,
            ..
        } = self;
        let Some(counter) = counters.get_mut(sku) else {
            return GateDecision::UnknownSku;
        };
        let units = i64::from(quantity);
        if counter.available < units {
            return GateDecision::SoldOut {
                remaining: counter.available.max(0),
            };
        }
        let live = counter.users.get(user).copied().unwrap_or(0);
        if counter.max_per_user > 0 && live + units > i64::from(counter.max_per_user) {
            return GateDecision::UserLimit {
                live_units: live,
                limit: counter.max_per_user,
            };
        }
        if let Some(cap) = &counter.sale {
            let users = sales.entry(cap.sale_id.clone()).or_default();
            let in_sale = users.get(user).copied().unwrap_or(0);
            if in_sale + units > i64::from(cap.max_per_user) {
                return GateDecision::UserLimit {
                    live_units: in_sale,
                    limit: cap.max_per_user,
                };
            }
            users.insert(user.to_owned(), in_sale + units);
        }
        counter.available -= units;
        counter.users.insert(user.to_owned(), live + units);
        admitted.insert(
            id.to_owned(),
            Admitted {
                sku: sku.to_owned(),
                user: user.to_owned(),
                quantity,
                phase: Phase::InFlight,
                sale: counter.sale.as_ref().map(|cap| cap.sale_id.clone()),
                released: None,
            },
        );
        GateDecision::Reserved {
            remaining: counter.available,
        }
    }

    /// Enters a call in the SKU's draw for the opening `(opens, ends)`,
    /// starting the draw (and its seed) with its first entrant.
    fn enter(&mut self, sku: &str, (opens, ends): (i64, i64), request: &GateEntry) {
        let draw = self
            .draws
            .entry(sku.to_owned())
            .or_insert_with(|| DrawState::new(opens, ends));
        if draw.opens != opens {
            *draw = DrawState::new(opens, ends);
        }
        if draw.entered.contains(request.id.as_str()) {
            return;
        }
        if draw.entrants.len() >= MAX_DRAW_ENTRANTS as usize {
            draw.overflow += 1;
            return;
        }
        if !draw.users.insert(request.user.as_str().to_owned()) {
            return;
        }
        draw.entered.insert(request.id.as_str().to_owned());
        draw.entrants.push((
            request.id.as_str().to_owned(),
            request.user.as_str().to_owned(),
            request.quantity,
        ));
    }

    /// Runs the SKU's draw for the opening at `opens` once: every entrant
    /// in the draw's order, each decided as a call would be, until the
    /// stock runs out.
    fn run_draw(&mut self, sku: &str, opens: i64, now: i64) {
        let Some(draw) = self.draws.get_mut(sku) else {
            return;
        };
        if draw.opens != opens || draw.drawn_at.is_some() {
            return;
        }
        draw.drawn_at = Some(now);
        draw.stock_at_draw = self.counters.get(sku).map_or(0, |c| c.available);
        let by_id: HashMap<&str, (&str, u32)> = draw
            .entrants
            .iter()
            .map(|(id, user, quantity)| (id.as_str(), (user.as_str(), *quantity)))
            .collect();
        let order: Vec<(String, String, u32)> =
            draw_order(&draw.seed, draw.entrants.iter().map(|(id, ..)| id.as_str()))
                .into_iter()
                .map(|id| {
                    let (user, quantity) = by_id[id];
                    (id.to_owned(), user.to_owned(), quantity)
                })
                .collect();
        let mut decided = HashMap::new();
        for (place, (id, user, quantity)) in order.into_iter().enumerate() {
            if self.counters.get(sku).is_none_or(|c| c.available <= 0) {
                break;
            }
            // Decided before the draw came to it: skipped, nothing taken.
            let decision = if self.admitted.contains_key(&id) {
                None
            } else {
                Some(self.admit(sku, &id, &user, quantity))
            };
            decided.insert(id, (place as u32 + 1, decision));
        }
        if let Some(draw) = self.draws.get_mut(sku) {
            draw.decided = decided;
        }
    }

    /// The answer for an entrant the SKU's draw (for this window's
    /// opening) has run without admitting; `None` for any other call.
    fn refused_in_draw(
        &self,
        sku: &str,
        window: WindowMs,
        request: &GateEntry,
    ) -> Option<GateDecision> {
        let draw = self.draws.get(sku)?;
        if Some(draw.opens) != window.opens
            || draw.drawn_at.is_none()
            || !draw.entered.contains(request.id.as_str())
        {
            return None;
        }
        let counter = self.counters.get(sku)?;
        Some(match draw.decided.get(request.id.as_str()) {
            Some((_, Some(GateDecision::UserLimit { limit, .. }))) => GateDecision::UserLimit {
                live_units: counter
                    .users
                    .get(request.user.as_str())
                    .copied()
                    .unwrap_or(0),
                limit: *limit,
            },
            _ => GateDecision::SoldOut {
                remaining: counter.available.max(0),
            },
        })
    }

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
        let sku = request.sku.as_str();
        let Some(window) = state.counters.get(sku).map(|c| c.window) else {
            return Ok(GateDecision::UnknownSku);
        };
        let draw_ends = window.draw_ends_at();
        // The draw closes before anything else is decided: its entrants
        // go before every later call.
        if let (Some(ends), Some(opens)) = (draw_ends, window.opens) {
            if request.at_ms >= ends {
                state.run_draw(sku, opens, request.at_ms);
            }
        }
        // An id is decided once (an entrant asking again after the draw).
        if state
            .admitted
            .get(request.id.as_str())
            .is_some_and(|a| a.sku == sku)
        {
            let remaining = state.counters[sku].available.max(0);
            return Ok(GateDecision::Reserved { remaining });
        }
        if let Some(refused) = state.refused_in_draw(sku, window, request) {
            return Ok(refused);
        }
        match window {
            WindowMs {
                opens: Some(opens_at_ms),
                ..
            } if request.at_ms < opens_at_ms => return Ok(GateDecision::NotOpen { opens_at_ms }),
            WindowMs {
                closes: Some(closes_at_ms),
                ..
            } if request.at_ms >= closes_at_ms => return Ok(GateDecision::Closed { closes_at_ms }),
            _ => {}
        }
        if let (Some(draw_ends_at_ms), Some(opens)) = (draw_ends, window.opens) {
            // Once the draw has run (by a call whose clock was ahead), a
            // call is decided as any later one.
            let drawn = state
                .draws
                .get(sku)
                .is_some_and(|d| d.opens == opens && d.drawn_at.is_some());
            if request.at_ms < draw_ends_at_ms && !drawn {
                state.enter(sku, (opens, draw_ends_at_ms), request);
                return Ok(GateDecision::Entered { draw_ends_at_ms });
            }
        }
        Ok(state.admit(
            sku,
            request.id.as_str(),
            request.user.as_str(),
            request.quantity,
        ))
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

    async fn claim_draw_record(&self, sku: &Sku) -> Result<Option<DrawSummary>, GateError> {
        let mut state = self.lock();
        let opens = state
            .counters
            .get(sku.as_str())
            .and_then(|c| c.window.opens);
        let Some(draw) = state.draws.get_mut(sku.as_str()) else {
            return Ok(None);
        };
        if Some(draw.opens) != opens || draw.recorded {
            return Ok(None);
        }
        let Some(drawn_at_ms) = draw.drawn_at else {
            return Ok(None);
        };
        draw.recorded = true;
        let admitted = draw
            .decided
            .values()
            .filter(|(_, d)| matches!(d, Some(GateDecision::Reserved { .. })))
            .count();
        Ok(Some(DrawSummary {
            opens_at_ms: draw.opens,
            ends_at_ms: draw.ends,
            seed: draw.seed.clone(),
            drawn_at_ms,
            stock_at_draw: draw.stock_at_draw,
            entrants: draw.entrants.len() as u32,
            admitted: admitted as u32,
            overflow: draw.overflow,
        }))
    }

    async fn draw(&self, sku: &Sku) -> Result<Option<Draw>, GateError> {
        let state = self.lock();
        let opens = state
            .counters
            .get(sku.as_str())
            .and_then(|c| c.window.opens);
        Ok(state
            .draws
            .get(sku.as_str())
            .filter(|draw| Some(draw.opens) == opens)
            .map(DrawState::view))
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
    async fn a_fair_opening_is_drawn_once() {
        let gate = EmbeddedGate::new();
        decision_table::fair_opening(&gate, &gate).await;
    }

    /// A draw takes at most [`MAX_DRAW_ENTRANTS`]; later calls in its
    /// window are counted, wait for the close like entrants, and are then
    /// decided first come, first served after every entrant.
    #[tokio::test]
    async fn a_full_draw_leaves_later_calls_to_after_it() {
        use crate::gate::decision_table::AT;
        let (gate, sku) = loaded(EmbeddedGate::new(), 1, 0).await;
        let window = WindowMs::new(Some(AT), None).with_draw(10);
        gate.set_windows(&[(sku.clone(), window)]).await.unwrap();
        let entered = GateDecision::Entered {
            draw_ends_at_ms: AT + 10,
        };
        for i in 0..MAX_DRAW_ENTRANTS {
            let entry = request(&sku, &format!("u{i}"), 1);
            assert_eq!(gate.reserve(&entry).await.unwrap(), entered);
        }
        let beyond = request(&sku, "beyond", 1);
        assert_eq!(gate.reserve(&beyond).await.unwrap(), entered);
        let draw = gate.draw(&sku).await.unwrap().unwrap();
        assert_eq!(draw.entrants.len(), MAX_DRAW_ENTRANTS as usize);
        assert_eq!(draw.overflow, 1);
        // The draw gives the one unit to an entrant; the call beyond it
        // comes after and finds none.
        let after = beyond.decided_at(AT + 10);
        assert_eq!(
            gate.reserve(&after).await.unwrap(),
            GateDecision::SoldOut { remaining: 0 }
        );
        let draw = gate.draw(&sku).await.unwrap().unwrap();
        let admitted = draw
            .entrants
            .iter()
            .filter(|e| e.outcome == Some(DrawOutcome::Admitted))
            .count();
        assert_eq!(admitted, 1);
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
            window: WindowMs::OPEN,
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
