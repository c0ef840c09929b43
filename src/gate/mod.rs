//! The stock gate: an atomic counter per SKU in front of the database, so
//! that of 50,000 buyers for one unit exactly one is admitted and the rest
//! are answered without touching the database.
//!
//! The gate is a filter, not the truth: the database check still decides.
//! A gate that admits too much costs a database rejection; a gate that
//! admits too little costs a sale until it is reloaded from the database.
//! It must never be empty-and-open: a gate without counters answers
//! [`GateDecision::NotReady`], never "sold out" and never "admitted".

pub mod draw;
mod embedded;
pub(crate) mod redis_gate;
mod sold_out;

pub use draw::{Draw, DrawEntrant, DrawOutcome, DrawSummary};
pub use embedded::EmbeddedGate;
pub use redis_gate::{RedisGate, RESERVE_SCRIPT};
pub use sold_out::SoldOutCache;

use async_trait::async_trait;
use tokio::sync::broadcast;

use crate::domain::{ReservationId, Sku, UserId};

/// One reservation as the gate sees it: what to admit, and later what to
/// settle or give back.
#[derive(Debug, Clone)]
pub struct GateEntry {
    pub id: ReservationId,
    pub sku: Sku,
    pub user: UserId,
    pub quantity: u32,
    /// For a settlement that mirrors a database change (a commit, a
    /// release's restock): the SKU row's version that change wrote, or an
    /// upper bound of it. `None` for admissions and for settlements the
    /// database never saw (a publish that failed, a refusal).
    ///
    /// A counter is rebuilt from a database read at some version `V`
    /// ([`SkuStock::version`]), while settlements keep arriving, each a
    /// moment after its database change. Comparing versions tells whether
    /// that read already saw the change: a commit at or below `V` was
    /// subtracted twice (in the read and as in flight) and its units come
    /// back; a release at or below `V` is already in the read and returns
    /// nothing more. Without this, a rebuild racing the order processor
    /// counted a just-settled batch as available again.
    pub version: Option<i64>,
    /// For an admission: when its Reserve was decided (Unix ms), which the
    /// SKU's sale window is checked against.
    pub at_ms: i64,
}

/// A sale window as the gate keeps it: opening and closing in Unix ms,
/// `None` leaving that side open, and the fair opening's draw (see
/// [`crate::domain::SaleWindow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowMs {
    pub opens: Option<i64>,
    pub closes: Option<i64>,
    /// The draw after the opening, in ms (0: first come first served from
    /// the opening). Calls decided in `[opens, opens + draw_ms)` are
    /// entered in the SKU's draw, not admitted on arrival.
    pub draw_ms: u32,
}

impl WindowMs {
    /// Open on both sides, no draw.
    pub const OPEN: Self = Self::new(None, None);

    pub const fn new(opens: Option<i64>, closes: Option<i64>) -> Self {
        Self {
            opens,
            closes,
            draw_ms: 0,
        }
    }

    /// The same window with a draw of `draw_ms` after its opening.
    pub const fn with_draw(mut self, draw_ms: u32) -> Self {
        self.draw_ms = draw_ms;
        self
    }

    /// The gate's copy of a SKU's window.
    pub fn of(window: &crate::domain::SaleWindow) -> Self {
        let (opens, closes) = window.as_millis();
        Self::new(opens, closes).with_draw(window.draw_window_ms)
    }

    /// When the draw closes (Unix ms), for a window with one.
    pub fn draw_ends_at(&self) -> Option<i64> {
        match self.opens {
            Some(opens) if self.draw_ms > 0 => Some(opens + i64::from(self.draw_ms)),
            _ => None,
        }
    }
}

impl GateEntry {
    /// An admission, or a settlement the database never saw.
    pub fn new(id: ReservationId, sku: Sku, user: UserId, quantity: u32) -> Self {
        Self {
            id,
            sku,
            user,
            quantity,
            version: None,
            at_ms: 0,
        }
    }

    /// The same admission, decided at `at_ms` (Unix ms).
    pub fn decided_at(mut self, at_ms: i64) -> Self {
        self.at_ms = at_ms;
        self
    }

    /// The same reservation settled by a database change at `version`.
    pub fn at_version(mut self, version: Option<i64>) -> Self {
        self.version = version;
        self
    }
}

/// The gate's answer; one row of the decision table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateDecision {
    /// Units taken from the counter; `remaining` are left.
    Reserved { remaining: i64 },
    /// Fewer than the requested units are left.
    SoldOut { remaining: i64 },
    /// The user's live units plus this request exceed the SKU's limit, or
    /// those across the SKU's sale exceed the sale's (then `limit` is the
    /// sale's cap and `live_units` the user's units across the sale).
    UserLimit { live_units: i64, limit: u32 },
    /// The gate is loaded and has no such SKU.
    UnknownSku,
    /// Decided before the SKU's sale window opens (at this Unix ms).
    NotOpen { opens_at_ms: i64 },
    /// Decided at or after the SKU's sale window closed (at this Unix ms).
    Closed { closes_at_ms: i64 },
    /// Decided during the SKU's draw: entered in it (or, with the draw
    /// full, to be decided first come first served after it). Ask again
    /// with the same entry at or after `draw_ends_at_ms` for the outcome.
    Entered { draw_ends_at_ms: i64 },
    /// The gate has not been loaded from the database (start-up, or the
    /// counters were lost); admit nothing.
    NotReady,
}

/// What the database's decision means for the gate's units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Settlement {
    /// The order is in the database: stop counting it as in flight.
    Committed,
    /// The database had less stock than the gate admitted: forget the
    /// reservation without returning its units.
    Rejected,
    /// No order resulted (or it ended): give the units back.
    Released,
    /// The database took stock for a reservation the gate did not admit
    /// (an order redriven from the dead-letter queue): take its units off
    /// the counter unless the last rebuild's read had them, count them
    /// against the user, and keep it as committed, so that its later
    /// release gives them back.
    Charged,
}

impl Settlement {
    /// The action name the Redis settle script takes.
    pub fn as_script_arg(self) -> &'static str {
        match self {
            Self::Committed => "committed",
            Self::Rejected => "rejected",
            Self::Released => "release",
            Self::Charged => "charged",
        }
    }
}

/// A SKU's counter as loaded from the database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkuStock {
    pub sku: Sku,
    /// Units available in the database.
    pub db_stock: i64,
    pub max_per_user: u32,
    /// The row's version when it was read (see [`GateEntry::version`]).
    pub version: i64,
    /// The SKU's sale window.
    pub window: WindowMs,
    /// The capped sale the SKU belongs to, if any: taken by a counter
    /// the gate creates from this read; an existing counter changes sales
    /// only through [`StockGate::set_sales`].
    pub sale: Option<SaleCap>,
}

/// A sale's per-user cap across all of its SKUs, as the gate checks it.
///
/// The gate counts a user's units per sale from the admissions it made for
/// the sale's SKUs, and gives them back as those end (refused, released).
/// The count may fall short of the database's (a hold made before the SKU
/// joined, a count dropped by [`StockGate::forget_sale_counts`], a restart
/// or flush) but is never above it for long, so the gate only refuses an
/// order the database would refuse too; the database's check stands
/// behind it for the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleCap {
    pub sale_id: String,
    /// Units per user across the sale; above 0.
    pub max_per_user: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("stock gate backend unavailable: {0}")]
    Unavailable(String),
}

/// One stock gate backend.
#[async_trait]
pub trait StockGate: Send + Sync + 'static {
    /// Decides atomically and, when admitted, records the reservation as in
    /// flight (admitted, not yet in the database).
    async fn reserve(&self, request: &GateEntry) -> Result<GateDecision, GateError>;

    /// The reservation reached the database as a hold; it no longer counts
    /// as in flight but still counts towards the user's limit.
    async fn committed(&self, entry: &GateEntry) -> Result<(), GateError>;

    /// The database refused the reservation: forget it and free the user's
    /// units, but do not return stock, because the database has less than
    /// the gate believed (the drift is repaired by a reload).
    async fn rejected(&self, entry: &GateEntry) -> Result<(), GateError>;

    /// Returns the units of one reservation, at most once per reservation id
    /// however often it is called.
    async fn release(&self, release: &GateEntry) -> Result<(), GateError>;

    /// See [`Settlement::Charged`]; once per reservation id.
    async fn charged(&self, entry: &GateEntry) -> Result<(), GateError>;

    /// Applies each reservation's settlement (the processor's batch): the
    /// same as calling the single method for each, in fewer round trips
    /// where the backend can (Redis: one).
    async fn settle_batch(&self, entries: &[(Settlement, GateEntry)]) -> Result<(), GateError> {
        for (action, entry) in entries {
            match action {
                Settlement::Committed => self.committed(entry).await?,
                Settlement::Rejected => self.rejected(entry).await?,
                Settlement::Released => self.release(entry).await?,
                Settlement::Charged => self.charged(entry).await?,
            }
        }
        Ok(())
    }

    /// Rebuilds every counter from the database: available = database
    /// stock minus units in flight. Marks the gate ready. A SKU whose read
    /// is older than a settlement the gate already applied keeps its
    /// counter (see [`StockGate::set`]).
    async fn load(&self, stock: &[SkuStock]) -> Result<(), GateError>;

    /// Overwrites one SKU's counter by the same rule. `Ok(false)`, changing
    /// nothing, when the gate has already applied a settlement newer than
    /// the read (`stock.version`): the read is stale; read again.
    async fn set(&self, stock: &SkuStock) -> Result<bool, GateError>;

    /// As [`Self::set`], even from a read older than what the gate has
    /// applied: for a database that went back in time (a failover onto a
    /// standby that lacked the latest commits), whose versions the gate
    /// would otherwise refuse until they caught up. The read's version
    /// becomes the newest the gate has seen.
    async fn reset(&self, stock: &SkuStock) -> Result<(), GateError>;

    /// Drops the gate's per-user counts of a sale whose SKUs changed: a
    /// SKU that left took its users' units out of the sale, which the
    /// counts cannot tell apart. Until new admissions count again, the
    /// database alone holds users to the cap.
    async fn forget_sale_counts(&self, sale_id: &str) -> Result<(), GateError>;

    /// Sets the capped sale (or none) of SKUs on the counters the gate
    /// has, as [`Self::set_windows`] does windows, and forgets the counts
    /// of each sale a SKU left here (see [`Self::forget_sale_counts`]).
    async fn set_sales(&self, sales: &[(Sku, Option<SaleCap>)]) -> Result<(), GateError>;

    /// Sets SKUs' sale windows on the counters the gate has (a SKU without
    /// one gets its window with its counter). Not versioned: a window is
    /// written whole, and the reconciler writes every SKU's again.
    async fn set_windows(&self, windows: &[(Sku, WindowMs)]) -> Result<(), GateError>;

    /// Adds `delta` to a SKU's counter (admin adjust) unless the counter
    /// was rebuilt from a read that already saw the adjustment (`version`,
    /// the row version it wrote).
    async fn adjust(&self, sku: &Sku, delta: i64, version: i64) -> Result<(), GateError>;

    /// The counter, or `None` when the gate has none for the SKU.
    async fn available(&self, sku: &Sku) -> Result<Option<i64>, GateError>;

    /// Units admitted for the SKU and not yet committed or refused.
    async fn in_flight(&self, sku: &Sku) -> Result<i64, GateError>;

    /// Reservations admitted before `admitted_before_ms` (Unix ms) and still
    /// in flight: candidates for a crash between admission and queueing.
    /// Backends that lose their records with the process return none.
    async fn stale_in_flight(
        &self,
        _sku: &Sku,
        _admitted_before_ms: i64,
    ) -> Result<Vec<GateEntry>, GateError> {
        Ok(Vec::new())
    }

    /// The SKU's draw for its current opening (see [`draw`]), `None`
    /// when the gate holds none: no draw window, no entrant yet, or (on
    /// Redis) expired.
    async fn draw(&self, sku: &Sku) -> Result<Option<Draw>, GateError>;

    /// The SKU's draw for its current opening once it is done, to the
    /// first caller only (across replicas sharing the gate): who records
    /// it in the audit trail.
    async fn claim_draw_record(&self, sku: &Sku) -> Result<Option<DrawSummary>, GateError>;

    /// Whether the counters are loaded; false after the backend lost them
    /// (a Redis restart or flush), which calls for a reload.
    async fn is_loaded(&self) -> Result<bool, GateError>;

    /// SKU names whose counter went up (release, restock) on any replica
    /// sharing this gate, or [`RESTOCK_ALL`] when some may have been missed.
    fn restocks(&self) -> broadcast::Receiver<String>;
}

/// A restock message meaning "any SKU may have been restocked".
pub const RESTOCK_ALL: &str = "*";

#[cfg(test)]
pub(crate) mod decision_table {
    //! The decision table every backend must implement identically.
    use std::collections::HashMap;

    use super::*;

    pub struct Case {
        pub name: &'static str,
        pub stock: Option<(i64, u32)>,
        /// The SKU's sale window; every request is decided at [`AT`].
        pub window: WindowMs,
        /// (user, quantity) reservations made before the checked one.
        pub before: &'static [(&'static str, u32)],
        pub user: &'static str,
        pub quantity: u32,
        pub expect: GateDecision,
    }

    /// When every request of the table is decided (Unix ms).
    pub const AT: i64 = 1_700_000_000_000;

    pub const CASES: &[Case] = &[
        Case {
            name: "plenty",
            stock: Some((10, 0)),
            window: WindowMs::OPEN,
            before: &[],
            user: "u1",
            quantity: 3,
            expect: GateDecision::Reserved { remaining: 7 },
        },
        Case {
            name: "exactly the last units",
            stock: Some((3, 0)),
            window: WindowMs::OPEN,
            before: &[],
            user: "u1",
            quantity: 3,
            expect: GateDecision::Reserved { remaining: 0 },
        },
        Case {
            name: "one short",
            stock: Some((2, 0)),
            window: WindowMs::OPEN,
            before: &[],
            user: "u1",
            quantity: 3,
            expect: GateDecision::SoldOut { remaining: 2 },
        },
        Case {
            name: "empty",
            stock: Some((0, 0)),
            window: WindowMs::OPEN,
            before: &[],
            user: "u1",
            quantity: 1,
            expect: GateDecision::SoldOut { remaining: 0 },
        },
        Case {
            name: "after others took it",
            stock: Some((10, 0)),
            window: WindowMs::OPEN,
            before: &[("a", 3), ("b", 3), ("c", 3)],
            user: "u1",
            quantity: 3,
            expect: GateDecision::SoldOut { remaining: 1 },
        },
        Case {
            name: "within the user limit",
            stock: Some((10, 2)),
            window: WindowMs::OPEN,
            before: &[("u1", 1)],
            user: "u1",
            quantity: 1,
            expect: GateDecision::Reserved { remaining: 8 },
        },
        Case {
            name: "over the user limit",
            stock: Some((10, 2)),
            window: WindowMs::OPEN,
            before: &[("u1", 2)],
            user: "u1",
            quantity: 1,
            expect: GateDecision::UserLimit {
                live_units: 2,
                limit: 2,
            },
        },
        Case {
            name: "limit is per user",
            stock: Some((10, 2)),
            window: WindowMs::OPEN,
            before: &[("u2", 2)],
            user: "u1",
            quantity: 2,
            expect: GateDecision::Reserved { remaining: 6 },
        },
        Case {
            name: "sold out wins over the user limit",
            stock: Some((2, 2)),
            window: WindowMs::OPEN,
            before: &[("u1", 2)],
            user: "u1",
            quantity: 1,
            expect: GateDecision::SoldOut { remaining: 0 },
        },
        Case {
            name: "unknown sku",
            stock: None,
            window: WindowMs::OPEN,
            before: &[],
            user: "u1",
            quantity: 1,
            expect: GateDecision::UnknownSku,
        },
        Case {
            name: "before the opening",
            stock: Some((10, 0)),
            window: WindowMs::new(Some(AT + 1), None),
            before: &[],
            user: "u1",
            quantity: 1,
            expect: GateDecision::NotOpen {
                opens_at_ms: AT + 1,
            },
        },
        Case {
            name: "at the opening",
            stock: Some((10, 0)),
            window: WindowMs::new(Some(AT), Some(AT + 1)),
            before: &[],
            user: "u1",
            quantity: 1,
            expect: GateDecision::Reserved { remaining: 9 },
        },
        Case {
            name: "at the closing",
            stock: Some((10, 0)),
            window: WindowMs::new(Some(AT - 1), Some(AT)),
            before: &[],
            user: "u1",
            quantity: 1,
            expect: GateDecision::Closed { closes_at_ms: AT },
        },
        Case {
            name: "closed wins over sold out",
            stock: Some((0, 0)),
            window: WindowMs::new(None, Some(AT)),
            before: &[],
            user: "u1",
            quantity: 1,
            expect: GateDecision::Closed { closes_at_ms: AT },
        },
        Case {
            name: "not open wins over the user limit",
            stock: Some((10, 1)),
            window: WindowMs::new(Some(AT + 1), None),
            before: &[],
            user: "u1",
            quantity: 2,
            expect: GateDecision::NotOpen {
                opens_at_ms: AT + 1,
            },
        },
    ];

    /// Runs every case against fresh gates made by `make`.
    pub async fn run<G: StockGate>(mut make: impl FnMut() -> G) {
        for case in CASES {
            let gate = make();
            let sku = Sku::parse("SKU-T").unwrap();
            let loaded: Vec<SkuStock> = case
                .stock
                .iter()
                .map(|&(db_stock, max_per_user)| SkuStock {
                    version: 0,
                    window: case.window,
                    sale: None,
                    sku: sku.clone(),
                    db_stock,
                    max_per_user,
                })
                .collect();
            gate.load(&loaded).await.unwrap();
            for &(user, quantity) in case.before {
                let before = request(&sku, user, quantity);
                gate.reserve(&before).await.unwrap();
            }
            let got = gate
                .reserve(&request(&sku, case.user, case.quantity))
                .await
                .unwrap();
            assert_eq!(got, case.expect, "case {:?}", case.name);
        }
        // And before any load: not ready, whatever the request.
        let gate = make();
        let sku = Sku::parse("SKU-T").unwrap();
        assert_eq!(
            gate.reserve(&request(&sku, "u1", 1)).await.unwrap(),
            GateDecision::NotReady
        );
    }

    /// `gate` loaded with one SKU "S".
    pub async fn loaded<G: StockGate>(gate: G, stock: i64, max_per_user: u32) -> (G, Sku) {
        let sku = Sku::parse("S").unwrap();
        gate.load(&[SkuStock {
            sku: sku.clone(),
            db_stock: stock,
            max_per_user,
            version: 0,
            window: WindowMs::OPEN,
            sale: None,
        }])
        .await
        .unwrap();
        (gate, sku)
    }

    pub fn request(sku: &Sku, user: &str, quantity: u32) -> GateEntry {
        GateEntry::new(
            ReservationId::generate(),
            sku.clone(),
            UserId::parse(user).unwrap(),
            quantity,
        )
        .decided_at(AT)
    }

    /// An order given up (its admission released), then redriven and
    /// committed: charged once (stock and the user's units), and its
    /// release gives both back. A charge the last rebuild already read
    /// takes no stock.
    pub async fn charge_after_give_up<G: StockGate>(gate: G) {
        let (gate, sku) = loaded(gate, 5, 3).await;
        let order = request(&sku, "u1", 2);
        gate.reserve(&order).await.unwrap();
        gate.release(&order).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(5));
        let charged = order.clone().at_version(Some(10));
        gate.charged(&charged).await.unwrap();
        gate.charged(&charged).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(3));
        assert!(matches!(
            gate.reserve(&request(&sku, "u1", 2)).await.unwrap(),
            GateDecision::UserLimit { live_units: 2, .. }
        ));
        gate.release(&order.clone().at_version(Some(11)))
            .await
            .unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(5));
        let after = request(&sku, "u1", 3);
        assert!(matches!(
            gate.reserve(&after).await.unwrap(),
            GateDecision::Reserved { remaining: 2 }
        ));
        gate.committed(&after.at_version(Some(12))).await.unwrap();
        // A hold released before its charge arrives (a charge retried in
        // the background): the late charge takes nothing.
        let raced = request(&sku, "u3", 1);
        gate.reserve(&raced).await.unwrap();
        gate.release(&raced).await.unwrap();
        let before = gate.available(&sku).await.unwrap();
        gate.release(&raced.clone().at_version(Some(14)))
            .await
            .unwrap();
        gate.charged(&raced.clone().at_version(Some(13)))
            .await
            .unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), before);
        // ... nor counts against the user.
        let next = request(&sku, "u3", 2);
        assert_eq!(
            gate.reserve(&next).await.unwrap(),
            GateDecision::Reserved { remaining: 0 }
        );
        gate.committed(&next.at_version(Some(15))).await.unwrap();
        // Rebuilt from a read at version 20, which had the commit.
        gate.set(&read(&sku, 1, 20)).await.unwrap();
        let late = request(&sku, "u2", 1).at_version(Some(20));
        gate.charged(&late).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(1));
    }

    /// A window set on a loaded SKU decides its next calls and leaves its
    /// counter alone; one for a SKU the gate has no counter for creates
    /// none; a later set from a read carries the read's window.
    pub async fn windows_move_without_touching_counters<G: StockGate>(gate: G) {
        let (gate, sku) = loaded(gate, 5, 0).await;
        gate.reserve(&request(&sku, "u1", 2)).await.unwrap();
        gate.set_windows(&[(sku.clone(), WindowMs::new(Some(AT + 10), Some(AT + 20)))])
            .await
            .unwrap();
        assert_eq!(
            gate.reserve(&request(&sku, "u2", 1)).await.unwrap(),
            GateDecision::NotOpen {
                opens_at_ms: AT + 10
            }
        );
        assert_eq!(gate.available(&sku).await.unwrap(), Some(3));
        let later = request(&sku, "u2", 1).decided_at(AT + 10);
        assert_eq!(
            gate.reserve(&later).await.unwrap(),
            GateDecision::Reserved { remaining: 2 }
        );
        let after = request(&sku, "u2", 1).decided_at(AT + 20);
        assert_eq!(
            gate.reserve(&after).await.unwrap(),
            GateDecision::Closed {
                closes_at_ms: AT + 20
            }
        );
        gate.set_windows(&[(sku.clone(), WindowMs::OPEN)])
            .await
            .unwrap();
        assert!(matches!(
            gate.reserve(&after).await.unwrap(),
            GateDecision::Reserved { remaining: 1 }
        ));
        let unknown = Sku::parse("NOT-LOADED").unwrap();
        gate.set_windows(&[(unknown.clone(), WindowMs::new(Some(AT), None))])
            .await
            .unwrap();
        assert_eq!(gate.available(&unknown).await.unwrap(), None);
        assert_eq!(
            gate.reserve(&request(&unknown, "u1", 1)).await.unwrap(),
            GateDecision::UnknownSku
        );
        let mut windowed = read(&sku, 5, 0);
        windowed.window = WindowMs::new(None, Some(AT));
        assert!(gate.set(&windowed).await.unwrap());
        assert!(matches!(
            gate.reserve(&request(&sku, "u3", 1)).await.unwrap(),
            GateDecision::Closed { .. }
        ));
    }

    /// A fair opening (see [`draw`]): calls in the draw window are
    /// entered, not admitted, and the counter is untouched; the first call
    /// at or after the close runs the draw, once, for every replica on the
    /// gate (`gate` and `replica` share it); its winners are admitted in
    /// the seed's order as calls would be (stock, the user's limit), its
    /// record re-runs to the same places and outcomes, each entrant asking
    /// again hears its own outcome, and a late caller comes after every
    /// entrant.
    pub async fn fair_opening<G: StockGate>(gate: &G, replica: &G) {
        let sku = Sku::parse("DRAWN").unwrap();
        let window = WindowMs::new(Some(AT + 100), None).with_draw(1_000);
        gate.load(&[SkuStock {
            window,
            ..read(&sku, 3, 0)
        }])
        .await
        .unwrap();
        let mut max_one = read(&sku, 3, 0);
        max_one.max_per_user = 1;
        max_one.window = window;
        assert!(gate.set(&max_one).await.unwrap());
        let ends = AT + 1_100;
        assert_eq!(
            gate.reserve(&request(&sku, "early", 1)).await.unwrap(),
            GateDecision::NotOpen {
                opens_at_ms: AT + 100
            }
        );
        // 20 users, one of them (u7) calling twice: one entry per user,
        // its second call waits like the others and is then decided after
        // the draw.
        let mut entrants = Vec::new();
        for i in 0..21u32 {
            let user = if i == 20 {
                "u7".to_owned()
            } else {
                format!("u{i}")
            };
            let entry = request(&sku, &user, 1).decided_at(AT + 100 + i64::from(i) * 45);
            let on = if i % 2 == 0 { gate } else { replica };
            assert_eq!(
                on.reserve(&entry).await.unwrap(),
                GateDecision::Entered {
                    draw_ends_at_ms: ends
                }
            );
            entrants.push(entry);
        }
        // Asking again before the close: still entered, entered once.
        let again = entrants[3].clone().decided_at(ends - 1);
        assert_eq!(
            replica.reserve(&again).await.unwrap(),
            GateDecision::Entered {
                draw_ends_at_ms: ends
            }
        );
        assert_eq!(gate.available(&sku).await.unwrap(), Some(3));
        let before = gate
            .draw(&sku)
            .await
            .unwrap()
            .expect("a draw with entrants");
        assert_eq!(before.entrants.len(), 20);
        assert_eq!(before.drawn_at_ms, None);
        assert_eq!(
            gate.claim_draw_record(&sku).await.unwrap(),
            None,
            "not done"
        );
        assert!(before
            .entrants
            .iter()
            .all(|e| e.outcome.is_none() && e.drawn == 0));
        // A late caller at the close runs the draw first (on Redis a chunk
        // of entrants per call: it is told to come back until the draw is
        // done), then is decided.
        let late = request(&sku, "late", 1).decided_at(ends);
        let entered = GateDecision::Entered {
            draw_ends_at_ms: ends,
        };
        let mut heard = replica.reserve(&late).await.unwrap();
        // A call decided just before the close that reaches the gate once
        // the draw has started (a lagging replica) must not take stock
        // ahead of undecided entrants: it waits, or finds none left.
        let lagging = request(&sku, "lagging", 1).decided_at(ends - 1);
        let lagged = gate.reserve(&lagging).await.unwrap();
        assert!(
            matches!(
                lagged,
                GateDecision::Entered { .. } | GateDecision::SoldOut { .. }
            ),
            "{lagged:?}"
        );
        for _ in 0..50 {
            if heard != entered {
                break;
            }
            heard = gate.reserve(&late).await.unwrap();
        }
        assert_eq!(heard, GateDecision::SoldOut { remaining: 0 });
        let record = gate.draw(&sku).await.unwrap().unwrap();
        assert_eq!(record, replica.draw(&sku).await.unwrap().unwrap());
        assert_eq!(record.seed.len(), 16);
        assert_eq!((record.opens_at_ms, record.ends_at_ms), (AT + 100, ends));
        assert_eq!(record.stock_at_draw, 3);
        assert!(record.drawn_at_ms.is_some());
        let arrivals: Vec<u32> = record.entrants.iter().map(|e| e.arrival).collect();
        assert_eq!(arrivals, (1..=20).collect::<Vec<_>>());
        let ids: Vec<&str> = record.entrants.iter().map(|e| e.id.as_str()).collect();
        let expected: Vec<&str> = entrants[..20].iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, expected, "entrants in arrival order");
        let again = draw::replay(&record.seed, 3, 1, &record.entrants);
        let gates: Vec<(u32, DrawOutcome)> = record
            .entrants
            .iter()
            .map(|e| (e.drawn, e.outcome.unwrap()))
            .collect();
        assert_eq!(gates, again, "the record re-runs to the gate's draw");
        let winners: Vec<&DrawEntrant> = record
            .entrants
            .iter()
            .filter(|e| e.outcome == Some(DrawOutcome::Admitted))
            .collect();
        assert_eq!(winners.len(), 3);
        assert_eq!(gate.available(&sku).await.unwrap(), Some(0));
        assert_eq!(gate.in_flight(&sku).await.unwrap(), 3);
        // Every entrant hears its own outcome, from either replica, as
        // often as it asks.
        for (i, entry) in entrants.iter().enumerate() {
            let asked = entry.clone().decided_at(ends + 5);
            let on = if i % 2 == 0 { replica } else { gate };
            let heard = on.reserve(&asked).await.unwrap();
            let expect = match record.entrants.get(i).and_then(|e| e.outcome) {
                Some(DrawOutcome::Admitted) => GateDecision::Reserved { remaining: 0 },
                Some(DrawOutcome::UserLimit) => GateDecision::UserLimit {
                    live_units: 1,
                    limit: 1,
                },
                // Sold out, and u7's second call, decided after the draw
                // when none were left.
                _ => GateDecision::SoldOut { remaining: 0 },
            };
            assert_eq!(heard, expect, "entrant {i}");
            assert_eq!(
                on.reserve(&asked).await.unwrap(),
                expect,
                "entrant {i} again"
            );
        }
        assert_eq!(gate.in_flight(&sku).await.unwrap(), 3, "admitted once each");
        // The record goes to the audit trail once, from either replica.
        let summary = replica.claim_draw_record(&sku).await.unwrap().unwrap();
        assert_eq!(gate.claim_draw_record(&sku).await.unwrap(), None);
        assert_eq!(replica.claim_draw_record(&sku).await.unwrap(), None);
        assert_eq!(
            (
                summary.seed.as_str(),
                summary.entrants,
                summary.admitted,
                summary.stock_at_draw
            ),
            (record.seed.as_str(), 20, 3, 3)
        );
        assert_eq!(summary.ends_at_ms, ends);
        // A winner's units come back as any admission's do.
        let winner = entrants
            .iter()
            .find(|e| e.id.as_str() == winners[0].id)
            .unwrap();
        gate.release(winner).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(1));
        let next = request(&sku, "next", 1).decided_at(ends + 10);
        assert_eq!(
            replica.reserve(&next).await.unwrap(),
            GateDecision::Reserved { remaining: 0 }
        );
    }

    /// `S` as the database holds it: `stock` units at row `version`.
    fn read(sku: &Sku, stock: i64, version: i64) -> SkuStock {
        SkuStock {
            sku: sku.clone(),
            db_stock: stock,
            max_per_user: 0,
            version,
            window: WindowMs::OPEN,
            sale: None,
        }
    }

    /// Rebuilds from a database read race the settlements that follow each
    /// database change. Every step is one interleaving the order processor
    /// and a rebuilding replica produce; the database's stock (`db`) and
    /// row version move as the store's would. The gate must end where the
    /// database is, never above it.
    pub async fn rebuilds_race_settlements<G: StockGate>(gate: G) {
        let (gate, sku) = loaded(gate, 10, 0).await;
        let available = async |gate: &G| gate.available(&sku).await.unwrap();
        // A read taken before a commit that was settled before the rebuild
        // ran: refused, the counter stays right.
        let first = request(&sku, "u1", 2);
        gate.reserve(&first).await.unwrap();
        let stale = read(&sku, 10, 0);
        let (db, version) = (8, 1);
        gate.committed(&first.clone().at_version(Some(version)))
            .await
            .unwrap();
        assert!(!gate.set(&stale).await.unwrap(), "stale read applied");
        assert_eq!(available(&gate).await, Some(db));
        assert!(gate.set(&read(&sku, db, version)).await.unwrap());
        assert_eq!(available(&gate).await, Some(db));

        // A rebuild between a commit and its settlement subtracts the order
        // twice; its settlement gives the units back.
        let second = request(&sku, "u2", 3);
        gate.reserve(&second).await.unwrap();
        let (db, version) = (5, 2);
        assert!(gate.set(&read(&sku, db, version)).await.unwrap());
        assert_eq!(available(&gate).await, Some(2));
        gate.committed(&second.clone().at_version(Some(version)))
            .await
            .unwrap();
        assert_eq!(available(&gate).await, Some(db));

        // A release the rebuild's read already had gives nothing more; one
        // after the read gives its units back, once.
        let (db, version) = (8, 3);
        assert!(gate.set(&read(&sku, db, version)).await.unwrap());
        gate.release(&second.clone().at_version(Some(version)))
            .await
            .unwrap();
        assert_eq!(available(&gate).await, Some(db));
        let (db, version) = (10, 4);
        for _ in 0..2 {
            gate.release(&first.clone().at_version(Some(version)))
                .await
                .unwrap();
        }
        assert_eq!(available(&gate).await, Some(db));

        // The same for an adjustment.
        let (db, version) = (15, 5);
        assert!(gate.set(&read(&sku, db, version)).await.unwrap());
        gate.adjust(&sku, 5, version).await.unwrap();
        assert_eq!(available(&gate).await, Some(db));
        let (db, version) = (12, 6);
        gate.adjust(&sku, -3, version).await.unwrap();
        assert_eq!(available(&gate).await, Some(db));

        // A release the database never saw, of an admission a rebuild does
        // not know (its record went with the counters): nothing comes back.
        gate.release(&request(&sku, "u3", 4)).await.unwrap();
        assert_eq!(available(&gate).await, Some(db));

        // The database goes back in time (a failover lost versions 5 and 6,
        // the adjustments): `set` refuses its reads, `reset` takes them,
        // and settlements after it count from there.
        let (db, version) = (10, 4);
        assert!(!gate.set(&read(&sku, db, version)).await.unwrap());
        gate.reset(&read(&sku, db, version)).await.unwrap();
        assert_eq!(available(&gate).await, Some(db));
        let third = request(&sku, "u4", 1);
        gate.reserve(&third).await.unwrap();
        gate.committed(&third.at_version(Some(5))).await.unwrap();
        assert_eq!(available(&gate).await, Some(db - 1));
        assert!(gate.set(&read(&sku, db - 1, 5)).await.unwrap());
        assert_eq!(available(&gate).await, Some(db - 1));
    }

    /// `sku` read at `version` with `stock` units, in `sale` (if any).
    fn in_sale(sku: &Sku, stock: i64, version: i64, sale: Option<&str>) -> SkuStock {
        SkuStock {
            sale: sale.map(|sale_id| SaleCap {
                sale_id: sale_id.to_owned(),
                max_per_user: 3,
            }),
            ..read(sku, stock, version)
        }
    }

    /// Two SKUs of a sale capped at 3 units per user: the cap counts a
    /// user's units across both; a refusal by it leaves the SKU's counter
    /// as it was, and its resend is refused too; units that end (refused,
    /// released) stop counting, once however often they are settled, and
    /// committed ones keep counting; a SKU that leaves the sale, and a
    /// sale whose counts were forgotten, no longer refuse what the
    /// database may allow.
    pub async fn sale_caps_span_skus<G: StockGate>(gate: G) {
        let (a, b, apart) = (
            Sku::parse("SA").unwrap(),
            Sku::parse("SB").unwrap(),
            Sku::parse("SC").unwrap(),
        );
        let sale = Some("S1");
        gate.load(&[
            in_sale(&a, 10, 0, sale),
            in_sale(&b, 10, 0, sale),
            read(&apart, 10, 0),
        ])
        .await
        .unwrap();
        let over = |live_units| GateDecision::UserLimit {
            live_units,
            limit: 3,
        };
        let first = request(&a, "u1", 2);
        assert_eq!(
            gate.reserve(&first).await.unwrap(),
            GateDecision::Reserved { remaining: 8 }
        );
        gate.committed(&first.clone().at_version(Some(1)))
            .await
            .unwrap();
        assert_eq!(gate.reserve(&request(&b, "u1", 2)).await.unwrap(), over(2));
        assert_eq!(gate.available(&b).await.unwrap(), Some(10));
        assert_eq!(gate.in_flight(&b).await.unwrap(), 0);
        // Other users, and SKUs outside the sale, are not held to it.
        assert_eq!(
            gate.reserve(&request(&b, "u2", 3)).await.unwrap(),
            GateDecision::Reserved { remaining: 7 }
        );
        assert_eq!(
            gate.reserve(&request(&apart, "u1", 5)).await.unwrap(),
            GateDecision::Reserved { remaining: 5 }
        );
        let second = request(&b, "u1", 1);
        assert_eq!(
            gate.reserve(&second).await.unwrap(),
            GateDecision::Reserved { remaining: 6 }
        );
        assert_eq!(gate.reserve(&request(&a, "u1", 1)).await.unwrap(), over(3));
        for _ in 0..2 {
            gate.rejected(&second).await.unwrap();
        }
        let third = request(&a, "u1", 1);
        assert_eq!(
            gate.reserve(&third).await.unwrap(),
            GateDecision::Reserved { remaining: 7 }
        );
        assert_eq!(gate.reserve(&request(&b, "u1", 1)).await.unwrap(), over(3));
        // The first hold ends in the database (an expiry): its 2 units
        // stop counting, once.
        for _ in 0..2 {
            gate.release(&first.clone().at_version(Some(2)))
                .await
                .unwrap();
        }
        let fourth = request(&b, "u1", 2);
        assert_eq!(
            gate.reserve(&fourth).await.unwrap(),
            GateDecision::Reserved { remaining: 4 }
        );
        assert_eq!(gate.reserve(&request(&b, "u1", 1)).await.unwrap(), over(3));
        // A set from a read keeps the sale the counter has: only
        // `set_sales`, which drops the counts as a SKU leaves, moves it.
        assert!(gate.set(&in_sale(&a, 7, 3, None)).await.unwrap());
        assert_eq!(gate.reserve(&request(&a, "u1", 1)).await.unwrap(), over(3));
        // A SKU unbound by `set_sales` is no longer held to the cap, and
        // the sale's counts are dropped: its units left the sale in the
        // database.
        gate.set_sales(&[(a.clone(), None)]).await.unwrap();
        assert!(matches!(
            gate.reserve(&request(&a, "u1", 2)).await.unwrap(),
            GateDecision::Reserved { .. }
        ));
        assert_eq!(
            gate.reserve(&request(&b, "u1", 3)).await.unwrap(),
            GateDecision::Reserved { remaining: 1 }
        );
        let in_flight = gate.in_flight(&b).await.unwrap();
        let refused = request(&b, "u1", 1);
        for _ in 0..2 {
            assert_eq!(gate.reserve(&refused).await.unwrap(), over(3));
        }
        assert_eq!(gate.in_flight(&b).await.unwrap(), in_flight);
        assert_eq!(gate.available(&b).await.unwrap(), Some(1));
        gate.forget_sale_counts("S1").await.unwrap();
        assert_eq!(
            gate.reserve(&request(&b, "u1", 1)).await.unwrap(),
            GateDecision::Reserved { remaining: 0 }
        );
        // The SKU's own limit still applies next to the sale's.
        let mut limited = in_sale(&a, 10, 4, sale);
        limited.max_per_user = 1;
        assert!(gate.set(&limited).await.unwrap());
        assert!(matches!(
            gate.reserve(&request(&a, "u3", 2)).await.unwrap(),
            GateDecision::UserLimit { limit: 1, .. }
        ));
    }

    /// One step of a random sale.
    #[derive(Debug, Clone)]
    pub enum Op {
        Reserve {
            user: u8,
            quantity: u32,
        },
        /// Release the `pick`-th reservation made so far (modulo their
        /// number), whether or not it was released already.
        Release {
            pick: usize,
        },
    }

    /// Random sales: stock, per-user limit, steps.
    pub fn sales() -> impl proptest::strategy::Strategy<Value = (i64, u32, Vec<Op>)> {
        use proptest::prelude::*;
        let op = prop_oneof![
            3 => (0u8..4, 1u32..5).prop_map(|(user, quantity)| Op::Reserve { user, quantity }),
            1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        ];
        (0i64..20, 0u32..6, proptest::collection::vec(op, 1..40))
    }

    /// Plays `cases` random sales, each on a fresh gate from `make`, next
    /// to the model (see [`follows_the_model`]); shrinks and panics on the
    /// first disagreement. Needs the multi-threaded runtime.
    pub fn random_sales<G: StockGate>(make: impl Fn() -> G, cases: u32) {
        use proptest::test_runner::{Config, TestCaseError, TestRunner};
        let handle = tokio::runtime::Handle::current();
        let mut runner = TestRunner::new(Config {
            cases,
            ..Config::default()
        });
        let result = runner.run(&sales(), |sale| {
            tokio::task::block_in_place(|| handle.block_on(follows_the_model(make(), sale)))
                .map_err(TestCaseError::fail)
        });
        if let Err(err) = result {
            panic!("{err}");
        }
    }

    /// Plays a random sale on `gate` next to a model of the decision table:
    /// every decision and the counter after every step must match, the
    /// counter never goes below zero, and a release gives units back once.
    pub async fn follows_the_model<G: StockGate>(
        gate: G,
        (stock, max_per_user, ops): (i64, u32, Vec<Op>),
    ) -> Result<(), String> {
        let (gate, sku) = loaded(gate, stock, max_per_user).await;
        let mut available = stock;
        let mut live: HashMap<u8, i64> = HashMap::new();
        // Reservations made: entry, user, still held.
        let mut made: Vec<(GateEntry, u8, bool)> = Vec::new();
        for (step, op) in ops.iter().enumerate() {
            match op {
                Op::Reserve { user, quantity } => {
                    let entry = request(&sku, &format!("u{user}"), *quantity);
                    let q = i64::from(*quantity);
                    let held = live.get(user).copied().unwrap_or(0);
                    let expect = if available < q {
                        GateDecision::SoldOut {
                            remaining: available,
                        }
                    } else if max_per_user > 0 && held + q > i64::from(max_per_user) {
                        GateDecision::UserLimit {
                            live_units: held,
                            limit: max_per_user,
                        }
                    } else {
                        available -= q;
                        *live.entry(*user).or_default() += q;
                        made.push((entry.clone(), *user, true));
                        GateDecision::Reserved {
                            remaining: available,
                        }
                    };
                    let got = gate.reserve(&entry).await.map_err(|e| e.to_string())?;
                    if got != expect {
                        return Err(format!("step {step} {op:?}: got {got:?}, model {expect:?}"));
                    }
                }
                Op::Release { pick } => {
                    if made.is_empty() {
                        continue;
                    }
                    let n = pick % made.len();
                    let (entry, user, held) = &mut made[n];
                    if *held {
                        available += i64::from(entry.quantity);
                        *live.entry(*user).or_default() -= i64::from(entry.quantity);
                        *held = false;
                    }
                    gate.release(entry).await.map_err(|e| e.to_string())?;
                }
            }
            let counter = gate.available(&sku).await.map_err(|e| e.to_string())?;
            if counter != Some(available) || available < 0 {
                return Err(format!(
                    "after step {step} {op:?}: gate {counter:?}, model {available}"
                ));
            }
        }
        Ok(())
    }
}
