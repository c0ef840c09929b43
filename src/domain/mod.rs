//! Domain types: validated newtypes for everything a caller sends, the
//! reservation record, and the layer switches ([`switches`]). They depend
//! on no layer; the pipeline that runs a reservation through the layers
//! is [`crate::reserve`].

pub mod switches;

use chrono::NaiveDateTime;

use crate::error::ReservationError;

/// A stock-keeping unit: 1-64 characters from `A-Z a-z 0-9 . _ -`, so it is
/// safe inside Redis keys, queue messages and log lines.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sku(String);

/// A sale: SKUs grouped under one per-user cap. Spelt as a SKU is (1-64
/// characters from `A-Z a-z 0-9 . _ -`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SaleId(String);

/// The end user the caller acts for: 1-128 visible ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct UserId(String);

/// A caller-chosen retry key: 1-128 characters from `A-Z a-z 0-9 . _ : -`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// A server-assigned reservation id (UUIDv7, so ids sort by creation time).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReservationId(String);

/// Units in one request: 1 to the configured maximum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quantity(u32);

fn check_len(field: &'static str, value: &str, max: usize) -> Result<(), ReservationError> {
    if value.is_empty() {
        return Err(ReservationError::invalid(field, "must not be empty"));
    }
    if value.len() > max {
        return Err(ReservationError::invalid(
            field,
            format!("must be at most {max} characters, got {}", value.len()),
        ));
    }
    Ok(())
}

fn check_chars(
    field: &'static str,
    value: &str,
    allowed: impl Fn(char) -> bool,
    described: &str,
) -> Result<(), ReservationError> {
    match value.chars().find(|c| !allowed(*c)) {
        Some(bad) => Err(ReservationError::invalid(
            field,
            format!("character {bad:?} not allowed; use {described}"),
        )),
        None => Ok(()),
    }
}

/// A name safe inside Redis keys, queue messages and log lines: 1-64
/// characters from `A-Z a-z 0-9 . _ -` (SKUs and sales).
fn check_name(field: &'static str, value: &str) -> Result<(), ReservationError> {
    check_len(field, value, 64)?;
    check_chars(
        field,
        value,
        |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'),
        "A-Z a-z 0-9 . _ -",
    )
}

impl Sku {
    pub const MAX_LEN: usize = 64;

    pub fn parse(value: &str) -> Result<Self, ReservationError> {
        check_name("sku", value)?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl SaleId {
    pub fn parse(value: &str) -> Result<Self, ReservationError> {
        check_name("sale_id", value)?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl UserId {
    pub const MAX_LEN: usize = 128;
    pub const METADATA: &'static str = "x-user-id";

    pub fn parse(value: &str) -> Result<Self, ReservationError> {
        check_len(Self::METADATA, value, Self::MAX_LEN)?;
        check_chars(
            Self::METADATA,
            value,
            |c| c.is_ascii_graphic(),
            "visible ASCII",
        )?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl IdempotencyKey {
    pub const MAX_LEN: usize = 128;
    pub const METADATA: &'static str = "idempotency-key";

    pub fn parse(value: &str) -> Result<Self, ReservationError> {
        check_len(Self::METADATA, value, Self::MAX_LEN)?;
        check_chars(
            Self::METADATA,
            value,
            |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'),
            "A-Z a-z 0-9 . _ : -",
        )?;
        Ok(Self(value.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ReservationId {
    pub fn generate() -> Self {
        Self(uuid::Uuid::now_v7().to_string())
    }

    /// Accepts only the canonical hyphenated UUID form the server hands out.
    pub fn parse(value: &str) -> Result<Self, ReservationError> {
        if value.is_empty() {
            return Err(ReservationError::invalid(
                "reservation_id",
                "must not be empty",
            ));
        }
        match uuid::Uuid::try_parse(value) {
            Ok(id) if id.hyphenated().to_string() == value => Ok(Self(value.to_owned())),
            _ => Err(ReservationError::invalid(
                "reservation_id",
                "must be a reservation id returned by Reserve (a lowercase UUID)",
            )),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Quantity {
    pub fn parse(value: u32, max: u32) -> Result<Self, ReservationError> {
        if value == 0 {
            return Err(ReservationError::invalid("quantity", "must be at least 1"));
        }
        if value > max {
            return Err(ReservationError::invalid(
                "quantity",
                format!("must be at most {max}, got {value}"),
            ));
        }
        Ok(Self(value))
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

/// Where a reservation is in its lifecycle (see the proto for the diagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReservationState {
    /// In a SKU's waitlist: no units yet.
    Waitlisted,
    Queued,
    Held,
    Confirmed,
    Released,
    Expired,
    Rejected,
}

impl ReservationState {
    /// The spelling stored in the database's `state` column.
    pub fn as_db(self) -> &'static str {
        match self {
            Self::Waitlisted => "waitlisted",
            Self::Queued => "queued",
            Self::Held => "held",
            Self::Confirmed => "confirmed",
            Self::Released => "released",
            Self::Expired => "expired",
            Self::Rejected => "rejected",
        }
    }

    pub fn from_db(value: &str) -> Option<Self> {
        Some(match value {
            "waitlisted" => Self::Waitlisted,
            "queued" => Self::Queued,
            "held" => Self::Held,
            "confirmed" => Self::Confirmed,
            "released" => Self::Released,
            "expired" => Self::Expired,
            "rejected" => Self::Rejected,
            _ => return None,
        })
    }

    /// The reservation's units are taken from stock (held or sold).
    pub fn holds_units(self) -> bool {
        matches!(self, Self::Held | Self::Confirmed)
    }

    /// No transition leaves a final state.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Self::Confirmed | Self::Released | Self::Expired | Self::Rejected
        )
    }
}

/// What a SKU answers once it is sold out (per SKU, set by operators).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SoldOutPolicy {
    /// Sold out is the answer, at once.
    #[default]
    Instant,
    /// A caller who asks (`join_waitlist`) gets a place in line, and
    /// returned units go to the oldest entry first.
    Waitlist,
}

impl SoldOutPolicy {
    pub fn as_db(self) -> &'static str {
        match self {
            Self::Instant => "instant",
            Self::Waitlist => "waitlist",
        }
    }

    pub fn from_db(value: &str) -> Self {
        match value {
            "waitlist" => Self::Waitlist,
            _ => Self::Instant,
        }
    }
}

/// When a SKU sells: Reserve admits from `opens_at` (inclusive) until
/// `closes_at` (exclusive); `None` leaves that side open. With a
/// `draw_window_ms` above 0 the opening is fair: calls in its first
/// `draw_window_ms` are entered in a draw, which the stock gate holds
/// when it closes (see `docs/architecture.md`, "Fair opening").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SaleWindow {
    pub opens_at: Option<NaiveDateTime>,
    pub closes_at: Option<NaiveDateTime>,
    pub draw_window_ms: u32,
}

/// The longest draw a window may have: every entrant's call waits for
/// it, inside its deadline and the server's `server.request_timeout_ms`.
pub const MAX_DRAW_WINDOW_MS: u32 = 10_000;

/// Where a moment falls in a [`SaleWindow`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowCheck {
    Open,
    /// Before the opening, which is given.
    NotOpen(NaiveDateTime),
    /// At or after the closing, which is given.
    Closed(NaiveDateTime),
}

impl SaleWindow {
    pub fn check(&self, at: NaiveDateTime) -> WindowCheck {
        match (self.opens_at, self.closes_at) {
            (Some(opens), _) if at < opens => WindowCheck::NotOpen(opens),
            (_, Some(closes)) if at >= closes => WindowCheck::Closed(closes),
            _ => WindowCheck::Open,
        }
    }

    /// The window as Unix milliseconds, for the gate's copy.
    pub fn as_millis(&self) -> (Option<i64>, Option<i64>) {
        let ms = |t: Option<NaiveDateTime>| t.map(|t| t.and_utc().timestamp_millis());
        (ms(self.opens_at), ms(self.closes_at))
    }

    /// When the draw after the opening closes, for a window with one.
    pub fn draw_closes_at(&self) -> Option<NaiveDateTime> {
        let opens = self.opens_at.filter(|_| self.draw_window_ms > 0)?;
        Some(opens + chrono::TimeDelta::milliseconds(self.draw_window_ms.into()))
    }

    pub fn is_set(&self) -> bool {
        self.opens_at.is_some() || self.closes_at.is_some()
    }
}

/// The server's idea of now for deciding Reserve calls: the system clock,
/// or one a test sets, so that window edges are tested to the millisecond
/// without sleeping. Only the decision's moment follows it (an order's
/// `created_at`); timers, expiry and timeouts run on the system clock.
#[derive(Debug, Clone, Default)]
pub struct Clock(Option<std::sync::Arc<std::sync::atomic::AtomicI64>>);

impl Clock {
    /// A clock that reads `at` until it is set again.
    pub fn manual(at: NaiveDateTime) -> Self {
        let clock = Self(Some(Default::default()));
        clock.set(at);
        clock
    }

    /// Moves a manual clock to `at` (no effect on the system clock).
    pub fn set(&self, at: NaiveDateTime) {
        if let Some(micros) = &self.0 {
            micros.store(
                at.and_utc().timestamp_micros(),
                std::sync::atomic::Ordering::Release,
            );
        }
    }

    pub fn now(&self) -> NaiveDateTime {
        match &self.0 {
            None => now(),
            Some(micros) => chrono::DateTime::from_timestamp_micros(
                micros.load(std::sync::atomic::Ordering::Acquire),
            )
            .map_or_else(now, |t| t.naive_utc()),
        }
    }
}

/// A reservation as callers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub id: ReservationId,
    pub sku: Sku,
    pub user: UserId,
    pub quantity: u32,
    pub state: ReservationState,
    pub idempotency_key: Option<IdempotencyKey>,
    /// Orders ahead of it while queued.
    pub queue_position: Option<u64>,
    /// Entries ahead of it in the SKU's waitlist while waitlisted.
    pub waitlist_position: Option<u64>,
    pub reject_reason: Option<String>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    pub expires_at: Option<NaiveDateTime>,
    /// For a line of a cart: the cart's id (its first line's, so the
    /// cart's own row has its id here too).
    pub cart_id: Option<ReservationId>,
    /// For a cart as callers see it: every line, in the order asked for
    /// (the first is this reservation's own `sku` and `quantity`). Empty
    /// for a single reservation and for a line read on its own.
    pub lines: Vec<CartLine>,
}

/// One line of a cart: its own row, decided with the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartLine {
    pub id: ReservationId,
    pub sku: Sku,
    pub quantity: u32,
    pub reject_reason: Option<String>,
}

/// The REJECTED reason of a cart's line that could have been had: the
/// cart was refused for another of its lines.
pub const CART_LINE_REASON: &str = "the cart was refused for another line";

impl Reservation {
    /// A cart as callers see it, from its lines' reservations (the cart's
    /// own first): that one, carrying every line in order.
    pub fn cart_of(lines: Vec<Reservation>) -> Option<Reservation> {
        let mut cart = lines.first()?.clone();
        cart.lines = lines
            .into_iter()
            .map(|line| CartLine {
                id: line.id,
                sku: line.sku,
                quantity: line.quantity,
                reject_reason: line.reject_reason,
            })
            .collect();
        Some(cart)
    }

    /// Line `id` of this cart as its own row would read (its SKU,
    /// quantity and reason); itself when it is not a cart or has no such
    /// line.
    pub fn line_row(&self, id: &ReservationId) -> Reservation {
        let mut row = self.clone();
        if let Some(line) = self.lines.iter().find(|line| line.id == *id) {
            row.id = line.id.clone();
            row.sku = line.sku.clone();
            row.quantity = line.quantity;
            row.reject_reason = line.reject_reason.clone();
            row.lines = Vec::new();
        }
        row
    }

    /// Whether this is a cart's own row (or a cart as callers see it).
    pub fn is_cart(&self) -> bool {
        self.cart_id.as_ref() == Some(&self.id)
    }
}

/// Unix ms (the stock gate's unit) as a database time.
pub fn from_millis(ms: i64) -> NaiveDateTime {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .naive_utc()
}

/// UTC now, at the microsecond precision both databases store.
pub fn now() -> NaiveDateTime {
    let now = chrono::Utc::now().naive_utc();
    chrono::DurationRound::duration_trunc(now, chrono::TimeDelta::microseconds(1)).unwrap_or(now)
}

impl ReservationId {
    /// Wraps an id read back from our own storage, already validated on
    /// the way in.
    pub(crate) fn from_trusted(value: String) -> Self {
        Self(value)
    }
}

impl Sku {
    pub(crate) fn from_trusted(value: String) -> Self {
        Self(value)
    }
}

impl UserId {
    pub(crate) fn from_trusted(value: String) -> Self {
        Self(value)
    }
}

impl IdempotencyKey {
    pub(crate) fn from_trusted(value: String) -> Self {
        Self(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: ReservationError) -> &'static str {
        match err {
            ReservationError::InvalidArgument { field, .. } => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn sku_rules() {
        assert!(Sku::parse("SKU-1.a_b").is_ok());
        assert_eq!(field_of(Sku::parse("").unwrap_err()), "sku");
        assert_eq!(field_of(Sku::parse(&"x".repeat(65)).unwrap_err()), "sku");
        assert!(Sku::parse(&"x".repeat(64)).is_ok());
        assert_eq!(field_of(Sku::parse("a b").unwrap_err()), "sku");
        assert_eq!(field_of(Sku::parse("{x}").unwrap_err()), "sku");
        assert_eq!(field_of(Sku::parse("é").unwrap_err()), "sku");
    }

    #[test]
    fn user_and_key_rules() {
        assert!(UserId::parse("user@example.com").is_ok());
        assert_eq!(field_of(UserId::parse("").unwrap_err()), "x-user-id");
        assert_eq!(field_of(UserId::parse("a b").unwrap_err()), "x-user-id");
        assert_eq!(
            field_of(UserId::parse(&"u".repeat(129)).unwrap_err()),
            "x-user-id"
        );
        assert!(IdempotencyKey::parse("order:42-a.b_c").is_ok());
        assert_eq!(
            field_of(IdempotencyKey::parse("k/1").unwrap_err()),
            "idempotency-key"
        );
        assert_eq!(
            field_of(IdempotencyKey::parse(&"k".repeat(129)).unwrap_err()),
            "idempotency-key"
        );
    }

    #[test]
    fn quantity_rules() {
        assert_eq!(field_of(Quantity::parse(0, 10).unwrap_err()), "quantity");
        assert_eq!(Quantity::parse(1, 10).unwrap().get(), 1);
        assert_eq!(Quantity::parse(10, 10).unwrap().get(), 10);
        assert_eq!(field_of(Quantity::parse(11, 10).unwrap_err()), "quantity");
        assert_eq!(
            field_of(Quantity::parse(u32::MAX, 10).unwrap_err()),
            "quantity"
        );
    }

    #[test]
    fn reservation_id_rules() {
        let id = ReservationId::generate();
        assert_eq!(ReservationId::parse(id.as_str()).unwrap(), id);
        assert_eq!(
            field_of(ReservationId::parse("").unwrap_err()),
            "reservation_id"
        );
        assert_eq!(
            field_of(ReservationId::parse("not-a-uuid").unwrap_err()),
            "reservation_id"
        );
        let upper = id.as_str().to_uppercase();
        assert_eq!(
            field_of(ReservationId::parse(&upper).unwrap_err()),
            "reservation_id"
        );
    }

    #[test]
    fn states_round_trip_through_the_db_spelling() {
        use ReservationState::*;
        for state in [Queued, Held, Confirmed, Released, Expired, Rejected] {
            assert_eq!(ReservationState::from_db(state.as_db()), Some(state));
        }
        assert!(!Held.is_final() && !Queued.is_final());
        assert!(Confirmed.is_final() && Rejected.is_final());
    }

    mod hostile_input {
        //! Property tests: any string or number a caller can send is either
        //! accepted exactly when the documented grammar says so, or refused
        //! with an error naming its field; nothing panics.
        use proptest::prelude::*;

        use super::*;

        fn grammar(value: &str, max: usize, allowed: impl Fn(char) -> bool) -> bool {
            !value.is_empty() && value.len() <= max && value.chars().all(allowed)
        }

        fn any_text() -> impl Strategy<Value = String> {
            prop_oneof![
                // Anything, non-ASCII and control characters included.
                ".{0,200}",
                // Near the grammar: the allowed set plus a few wrong ones.
                "[A-Za-z0-9._:\\- é/{}\\x00]{0,140}",
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2_000))]

            #[test]
            fn skus(value in any_text()) {
                let ok = grammar(&value, Sku::MAX_LEN, |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
                match Sku::parse(&value) {
                    Ok(sku) => { prop_assert!(ok); prop_assert_eq!(sku.as_str(), value.as_str()); }
                    Err(err) => { prop_assert!(!ok); prop_assert_eq!(field_of(err), "sku"); }
                }
            }

            #[test]
            fn user_ids(value in any_text()) {
                let ok = grammar(&value, UserId::MAX_LEN, |c| c.is_ascii_graphic());
                match UserId::parse(&value) {
                    Ok(_) => prop_assert!(ok),
                    Err(err) => { prop_assert!(!ok); prop_assert_eq!(field_of(err), "x-user-id"); }
                }
            }

            #[test]
            fn idempotency_keys(value in any_text()) {
                let ok = grammar(&value, IdempotencyKey::MAX_LEN, |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-'));
                match IdempotencyKey::parse(&value) {
                    Ok(_) => prop_assert!(ok),
                    Err(err) => { prop_assert!(!ok); prop_assert_eq!(field_of(err), "idempotency-key"); }
                }
            }

            #[test]
            fn reservation_ids(value in any_text()) {
                // Only ids the server hands out: canonical lowercase UUIDs.
                let ok = uuid::Uuid::try_parse(&value).is_ok_and(|u| u.hyphenated().to_string() == value);
                match ReservationId::parse(&value) {
                    Ok(_) => prop_assert!(ok),
                    Err(err) => { prop_assert!(!ok); prop_assert_eq!(field_of(err), "reservation_id"); }
                }
            }

            #[test]
            fn quantities(value in prop_oneof![Just(0u32), Just(1), Just(u32::MAX), Just(u32::MAX - 1), any::<u32>(), 0u32..20], max in 1u32..10_000) {
                match Quantity::parse(value, max) {
                    Ok(q) => { prop_assert!((1..=max).contains(&value)); prop_assert_eq!(q.get(), value); }
                    Err(err) => { prop_assert!(!(1..=max).contains(&value)); prop_assert_eq!(field_of(err), "quantity"); }
                }
            }
        }
    }

    #[test]
    fn a_sale_window_opens_at_its_opening_and_closes_at_its_closing() {
        let t = |ms: i64| {
            chrono::DateTime::from_timestamp_millis(ms)
                .unwrap()
                .naive_utc()
        };
        let window = SaleWindow {
            opens_at: Some(t(1_000)),
            closes_at: Some(t(2_000)),
            ..Default::default()
        };
        assert_eq!(window.check(t(999)), WindowCheck::NotOpen(t(1_000)));
        assert_eq!(window.check(t(1_000)), WindowCheck::Open);
        assert_eq!(window.check(t(1_999)), WindowCheck::Open);
        assert_eq!(window.check(t(2_000)), WindowCheck::Closed(t(2_000)));
        assert_eq!(SaleWindow::default().check(t(0)), WindowCheck::Open);
        assert_eq!(window.as_millis(), (Some(1_000), Some(2_000)));
        let clock = Clock::manual(t(1_500));
        assert_eq!(clock.now(), t(1_500));
        clock.set(t(2_500));
        assert_eq!(clock.clone().now(), t(2_500));
    }
}
