//! Carts: several SKUs held under one reservation. Each line is a row of
//! its own (so stock, limits, expiry and the invariant checks count it as
//! they count a single order), committed with the others in one
//! transaction or not at all; confirming, releasing and extending act on
//! every line at once.

use chrono::NaiveDateTime;
use diesel::result::{DatabaseErrorKind, Error as DieselError};

use super::{CartOutcome, CommitOutcome, CommitParams, NewOrder, Store, StoreError};
use crate::domain::{IdempotencyKey, Reservation, ReservationId, UserId, CART_LINE_REASON};

/// The reason a cart refused for some of its lines gives as its own: each
/// refused line's SKU and reason. `None` when no line was refused on its
/// own: a cart given up, fenced or refused for its key as a whole keeps
/// the reason all its lines share.
pub(super) fn named_refusal(cart: &Reservation) -> Option<String> {
    let refused: Vec<String> = cart
        .lines
        .iter()
        .filter_map(|line| {
            let reason = line.reject_reason.as_deref()?;
            is_line_refusal(reason).then(|| format!("{} ({reason})", line.sku.as_str()))
        })
        .collect();
    (!refused.is_empty()).then(|| format!("the cart was refused for {}", refused.join("; ")))
}

/// Whether a line's REJECTED reason is one [`line_reason`] writes for the
/// line itself (not [`CART_LINE_REASON`], the cart's).
fn is_line_refusal(reason: &str) -> bool {
    [
        super::SOLD_OUT_REASON,
        super::USER_LIMIT_REASON,
        super::SALE_LIMIT_REASON,
        super::NOT_OPEN_REASON,
        super::CLOSED_REASON,
        UNKNOWN_SKU_REASON,
        NOT_FILLED_REASON,
    ]
    .iter()
    .any(|start| reason.starts_with(start))
}

const UNKNOWN_SKU_REASON: &str = "unknown SKU";
const NOT_FILLED_REASON: &str = "not filled";

/// The REJECTED reason of a cart's line the database refused for
/// `outcome`, as a single order's row would say it; `None` (a line that
/// could have been had) says the cart was refused for another line.
pub fn line_reason(outcome: Option<&CommitOutcome>) -> String {
    match outcome {
        None => CART_LINE_REASON.to_owned(),
        Some(CommitOutcome::SoldOut { remaining }) => {
            format!("{}: {remaining} units left", super::SOLD_OUT_REASON)
        }
        Some(CommitOutcome::UserLimit {
            live_units,
            limit,
            sale: None,
        }) => super::user_limit_reason(*live_units, limit),
        Some(CommitOutcome::UserLimit {
            live_units,
            limit,
            sale: Some(sale),
        }) => super::sale_limit_reason(*live_units, limit, sale),
        Some(CommitOutcome::OutsideWindow(check)) => super::window_reason(*check)
            .unwrap_or_else(|| format!("{NOT_FILLED_REASON}: outside the sale window")),
        Some(CommitOutcome::UnknownSku) => UNKNOWN_SKU_REASON.to_owned(),
        Some(other) => format!("{NOT_FILLED_REASON}: {other:?}"),
    }
}

/// Cart queries, written once; `dialect!` in `mod.rs` expands them into
/// each connection type's module.
macro_rules! cart_queries {
    ($Conn:ty) => {
        /// Why a cart's transaction was rolled back.
        enum CartAbort {
            Db(DieselError),
            /// Some line could not be filled: each line's outcome.
            Refused(Vec<CommitOutcome>),
            /// The cart's id, or its key, was used before: that
            /// reservation (rolled back, so a reopening stands undone).
            Existing(Box<Reservation>),
        }

        impl From<DieselError> for CartAbort {
            fn from(err: DieselError) -> Self {
                Self::Db(err)
            }
        }

        /// Every row of cart `cart`, in the order its lines were asked
        /// for (line ids are UUIDv7s made in that order).
        async fn cart_rows(conn: &mut $Conn, cart: &str) -> QueryResult<Vec<ReservationRow>> {
            let mut rows: Vec<ReservationRow> = reservations::table
                .filter(reservations::cart_id.eq(cart))
                .order(reservations::reservation_id.asc())
                .select(ReservationRow::as_select())
                .load(conn)
                .await?;
            // The cart's own row first, whatever its id sorts as.
            if let Some(own) = rows.iter().position(|row| row.reservation_id == cart) {
                rows[..=own].rotate_right(1);
            }
            Ok(rows)
        }

        /// `row` as callers see it: a cart's row (or any of its lines)
        /// reads as the cart, with every line.
        async fn as_seen(conn: &mut $Conn, row: ReservationRow) -> QueryResult<Reservation> {
            match row.cart_id.clone() {
                Some(cart) => Ok(
                    assemble(cart_rows(conn, &cart).await?).unwrap_or_else(|| row.into_domain())
                ),
                None => Ok(row.into_domain()),
            }
        }

        /// A cart from its rows (the cart's own row first): that row,
        /// carrying every line; a cart refused for some of its lines gives
        /// those lines and their reasons as its own (`named_refusal`).
        fn assemble(rows: Vec<ReservationRow>) -> Option<Reservation> {
            let mut cart =
                Reservation::cart_of(rows.into_iter().map(ReservationRow::into_domain).collect())?;
            if let Some(reason) = super::carts::named_refusal(&cart) {
                cart.reject_reason = Some(reason);
            }
            Some(cart)
        }

        pub(super) async fn with_key(
            conn: &mut $Conn,
            user: &str,
            key: &str,
        ) -> QueryResult<Option<Reservation>> {
            let row = reservations::table
                .filter(reservations::user_id.eq(user))
                .filter(reservations::idempotency_key.eq(key))
                .select(ReservationRow::as_select())
                .first(conn)
                .await
                .optional()?;
            match row {
                Some(row) => Ok(Some(as_seen(conn, row).await?)),
                None => Ok(None),
            }
        }

        /// Carts (up to 100) some of whose lines are held and others
        /// sold, or some live (held or sold) and others ended, leaving out
        /// those changed since `settled_before`: the expiry sweep moves a
        /// cart's rows in one transaction, but a sweep's limit may cut
        /// between two of them until its next pass. Lines ended in
        /// different ways (one expired, one released after it) are not
        /// split: no unit is held for either.
        pub(super) async fn split_carts(
            conn: &mut $Conn,
            settled_before: NaiveDateTime,
        ) -> QueryResult<Vec<String>> {
            use diesel::dsl::{case_when, max, min};
            let class = || {
                case_when::<_, _, diesel::sql_types::Integer>(
                    reservations::state.eq(ReservationState::Held.as_db()),
                    1,
                )
                .when(
                    reservations::state.eq(ReservationState::Confirmed.as_db()),
                    2,
                )
                .otherwise(3)
            };
            let carts: Vec<Option<String>> = reservations::table
                .filter(reservations::cart_id.is_not_null())
                .group_by(reservations::cart_id)
                .having(
                    min(class())
                        .ne(max(class()))
                        .and(max(reservations::updated_at).lt(settled_before)),
                )
                .select(reservations::cart_id)
                .limit(100)
                .load(conn)
                .await?;
            Ok(carts.into_iter().flatten().collect())
        }

        /// Commits every line of a cart (the first line's id is the
        /// cart's, and only it carries the idempotency key) in one
        /// transaction, or none: the same checks as a single order
        /// (window, the SKU's and the sale's per-user limits, stock),
        /// each line seeing the lines before it, under the same locks
        /// the group commit takes (every (sale, user) pair, then every
        /// SKU row in byte order).
        /// `reopen`: the given-up rows of these ids (or of carts with
        /// these ids) are deleted first, so the cart is decided again (an
        /// operator's redrive).
        pub(super) async fn commit_cart(
            conn: &mut $Conn,
            lines: &[NewOrder],
            params: CommitParams,
            reopen: &[&str],
        ) -> QueryResult<CartOutcome> {
            let each = CommitParams {
                record_rejections: false,
                ..params
            };
            let result = conn
                .transaction::<_, CartAbort, _>(async |conn| {
                    reopen_given_up(conn, reopen).await?;
                    let mut skus: Vec<&str> = lines.iter().map(|o| o.sku.as_str()).collect();
                    skus.sort_unstable();
                    skus.dedup();
                    let caps = sale_caps(conn, &skus).await?;
                    let pairs: Vec<(&str, &str)> = capped_pairs(lines, &caps);
                    lock_sale_pairs(conn, &pairs).await?;
                    if params.mode != DbCheckMode::Off {
                        own::lock_skus(conn, &skus).await?;
                        let now_caps = sale_caps(conn, &skus).await?;
                        if capped_pairs(lines, &now_caps)
                            .iter()
                            .any(|pair| !pairs.contains(pair))
                        {
                            return Err(DieselError::RollbackTransaction.into());
                        }
                    }
                    if params.mode == DbCheckMode::Optimistic && lines.len() > 1 {
                        // The group commit's few set-based statements for
                        // every line, kept (a savepoint) only if every
                        // line is had; otherwise the lines are decided one
                        // by one below, for each line's own outcome.
                        let grouped = conn
                            .transaction::<_, DieselError, _>(async |conn| {
                                match decide_grouped(conn, lines, params).await? {
                                    Some(outcomes)
                                        if outcomes.iter().all(|o| {
                                            matches!(o, CommitOutcome::Committed { .. })
                                        }) =>
                                    {
                                        Ok(outcomes)
                                    }
                                    _ => Err(DieselError::RollbackTransaction),
                                }
                            })
                            .await;
                        match grouped {
                            Ok(outcomes) => {
                                mark_cart(conn, lines).await?;
                                return Ok(outcomes);
                            }
                            Err(DieselError::RollbackTransaction)
                            | Err(DieselError::DatabaseError(
                                DatabaseErrorKind::UniqueViolation,
                                _,
                            )) => {}
                            Err(err) => return Err(err.into()),
                        }
                    }
                    let mut outcomes = Vec::with_capacity(lines.len());
                    for (index, line) in lines.iter().enumerate() {
                        let outcome = decide(conn, line, each, true).await?;
                        if index == 0 {
                            if let CommitOutcome::AlreadyCommitted(row)
                            | CommitOutcome::DuplicateKey(row) = outcome
                            {
                                // Nothing written yet: the earlier
                                // reservation is the answer.
                                return Err(CartAbort::Existing(Box::new(row)));
                            }
                        }
                        outcomes.push(outcome);
                    }
                    if !outcomes
                        .iter()
                        .all(|o| matches!(o, CommitOutcome::Committed { .. }))
                    {
                        return Err(CartAbort::Refused(outcomes));
                    }
                    mark_cart(conn, lines).await?;
                    Ok(outcomes)
                })
                .await;
            let outcomes = match result {
                Ok(outcomes) => outcomes,
                Err(CartAbort::Refused(outcomes)) => {
                    return Ok(CartOutcome::Refused(
                        outcomes
                            .into_iter()
                            .map(|o| (!matches!(o, CommitOutcome::Committed { .. })).then_some(o))
                            .collect(),
                    ))
                }
                Err(CartAbort::Existing(row)) => {
                    let id = row.cart_id.clone().unwrap_or_else(|| row.id.clone());
                    let rows = cart_rows(conn, id.as_str()).await?;
                    return Ok(CartOutcome::Existing(assemble(rows).unwrap_or(*row)));
                }
                Err(CartAbort::Db(err)) => return Err(err),
            };
            let mut versions = Vec::with_capacity(outcomes.len());
            let mut rows = Vec::with_capacity(outcomes.len());
            for outcome in outcomes {
                if let CommitOutcome::Committed {
                    mut reservation,
                    stock_version,
                    ..
                } = outcome
                {
                    reservation.cart_id = Some(lines[0].id.clone());
                    versions.push(stock_version);
                    rows.push(reservation);
                }
            }
            let cart = Reservation::cart_of(rows).expect("a cart has at least one line");
            Ok(CartOutcome::Committed { cart, versions })
        }

        /// Sets every line's `cart_id` to the first line's id.
        async fn mark_cart(conn: &mut $Conn, lines: &[NewOrder]) -> QueryResult<()> {
            let ids: Vec<&str> = lines.iter().map(|o| o.id.as_str()).collect();
            diesel::update(reservations::table.filter(reservations::reservation_id.eq_any(&ids)))
                .set(reservations::cart_id.eq(ids[0]))
                .execute(conn)
                .await
                .map(|_| ())
        }

        /// Stores a cart the processor could not fill (or gave up on, or
        /// whose publish was never confirmed) as REJECTED rows, one per
        /// line with its own reason, all or none, so a late delivery finds
        /// them and creates nothing. An existing row of the cart's id wins
        /// and is the answer. `reopen`: the cart's given-up rows are
        /// deleted first (a redriven cart decided again records its new
        /// outcome).
        pub(super) async fn record_cart_failed(
            conn: &mut $Conn,
            lines: &[NewOrder],
            reasons: &[String],
            now: NaiveDateTime,
            reopen: bool,
        ) -> QueryResult<Reservation> {
            let cart = lines[0].id.as_str();
            let written = conn
                .transaction::<_, DieselError, _>(async |conn| {
                    if reopen {
                        reopen_given_up(conn, &[cart]).await?;
                    }
                    if let Some(row) = find(conn, cart).await? {
                        return Ok(Some(row));
                    }
                    let rows: Vec<ReservationRow> = lines
                        .iter()
                        .zip(reasons)
                        .map(|(line, reason)| {
                            let mut row = rejected_row(line, reason.clone(), now);
                            row.cart_id = Some(cart.to_owned());
                            row
                        })
                        .collect();
                    own::insert_rows(conn, &rows).await?;
                    Ok(None)
                })
                .await;
            match written {
                Ok(Some(row)) => as_seen(conn, row).await,
                Ok(None) => Ok(seen(cart_rows(conn, cart).await?)),
                // The processor stored the cart between our read and our
                // insert: its rows win and are the answer.
                Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info)) => {
                    match find(conn, cart).await? {
                        Some(row) => as_seen(conn, row).await,
                        None => Err(DieselError::DatabaseError(
                            DatabaseErrorKind::UniqueViolation,
                            info,
                        )),
                    }
                }
                Err(err) => Err(err),
            }
        }

        /// Confirms or releases every line of `cart` (inside
        /// `end_hold`'s transaction, which found a line of it). Rows are
        /// changed one by one in SKU order (byte order), then units go
        /// back in that order: the expiry sweep's lock order, so neither
        /// waits on the other in a cycle. Confirming is all or nothing:
        /// every line HELD and unexpired, else none moves.
        async fn end_cart(
            conn: &mut $Conn,
            cart: &str,
            to: ReservationState,
            now: NaiveDateTime,
            hold_ttl: Option<Duration>,
        ) -> QueryResult<HoldEnded> {
            let mut rows = cart_rows(conn, cart).await?;
            if rows.iter().all(|row| row.state == to.as_db()) {
                return Ok(HoldEnded::Unchanged(seen(rows)));
            }
            rows.sort_by(|a, b| a.sku.cmp(&b.sku));
            if to == ReservationState::Confirmed {
                // A savepoint: a line that lapsed or ended since the read
                // leaves every line as it was.
                let confirmed = conn
                    .transaction::<_, DieselError, _>(async |conn| {
                        for row in &rows {
                            if !leave_held(conn, row, to, now).await? {
                                return Err(DieselError::RollbackTransaction);
                            }
                        }
                        Ok(())
                    })
                    .await;
                return match confirmed {
                    Ok(()) => Ok(HoldEnded::CartChanged {
                        cart: seen(cart_rows(conn, cart).await?),
                        restocks: Vec::new(),
                    }),
                    Err(DieselError::RollbackTransaction) => {
                        Ok(match cart_lapsed(cart_rows(conn, cart).await?, now) {
                            (true, cart) => HoldEnded::HoldExpired(cart),
                            (false, cart) => HoldEnded::WrongState(cart),
                        })
                    }
                    Err(err) => Err(err),
                };
            }
            let mut moved = Vec::with_capacity(rows.len());
            for row in rows {
                if row.state == ReservationState::Held.as_db()
                    && leave_held(conn, &row, to, now).await?
                {
                    moved.push(row);
                }
            }
            if moved.is_empty() {
                // Nothing was held (or a confirm got there first).
                let rows = cart_rows(conn, cart).await?;
                let sold = rows
                    .iter()
                    .any(|row| row.state == ReservationState::Confirmed.as_db());
                return Ok(if sold {
                    HoldEnded::WrongState(seen(rows))
                } else {
                    HoldEnded::Unchanged(seen(rows))
                });
            }
            let mut restocks = Vec::with_capacity(moved.len());
            for row in moved {
                let restock = give_back(conn, &row, now, hold_ttl).await?;
                let mut line = row.into_domain();
                line.state = to;
                line.updated_at = now;
                restocks.push((line, restock));
            }
            Ok(HoldEnded::CartChanged {
                cart: seen(cart_rows(conn, cart).await?),
                restocks,
            })
        }

        /// Why a cart could not be confirmed or extended, from its rows
        /// as they are: true when a line expired, or is HELD past its
        /// expiry (an expired hold), false for any other reason; with the
        /// cart.
        fn cart_lapsed(rows: Vec<ReservationRow>, now: NaiveDateTime) -> (bool, Reservation) {
            let lapsed = rows.iter().any(|row| {
                row.state == ReservationState::Expired.as_db()
                    || (row.state == ReservationState::Held.as_db()
                        && row.expires_at.is_some_and(|at| at <= now))
            });
            (lapsed, seen(rows))
        }

        /// As `assemble`, for rows that exist (a cart has at least one).
        fn seen(rows: Vec<ReservationRow>) -> Reservation {
            assemble(rows).expect("a cart has at least one line")
        }

        /// Moves the expiry of every line of `cart` to `until`, all or
        /// none, row by row in SKU order (as `end_cart`), each update the
        /// one `extend_hold` makes for one hold. `None`: some line was
        /// not HELD with an earlier, unexpired expiry (nothing moved).
        async fn extend_cart(
            conn: &mut $Conn,
            cart: &str,
            until: NaiveDateTime,
            now: NaiveDateTime,
        ) -> QueryResult<Option<Reservation>> {
            let mut rows = cart_rows(conn, cart).await?;
            rows.sort_by(|a, b| a.sku.cmp(&b.sku));
            let extended = conn
                .transaction::<_, DieselError, _>(async |conn| {
                    for row in &rows {
                        if extend_row(conn, &row.reservation_id, until, now).await? != 1 {
                            return Err(DieselError::RollbackTransaction);
                        }
                    }
                    Ok(())
                })
                .await;
            match extended {
                Ok(()) => Ok(Some(seen(cart_rows(conn, cart).await?))),
                Err(DieselError::RollbackTransaction) => Ok(None),
                Err(err) => Err(err),
            }
        }
    };
}

impl Store {
    /// Commits a cart's lines ([`NewOrder`]s, the first one's id being the
    /// cart's and only it carrying the idempotency key) in one
    /// transaction, all or nothing ([`CartOutcome`]).
    /// `reopen`: the given-up rows of these carts are deleted in the same
    /// transaction and the carts decided again (a redrive).
    pub async fn commit_cart(
        &self,
        lines: &[NewOrder],
        params: CommitParams,
        reopen: &[ReservationId],
    ) -> Result<CartOutcome, StoreError> {
        const TRIES: u32 = 5;
        let reopen: Vec<&str> = reopen.iter().map(ReservationId::as_str).collect();
        let mut twin_seen = false;
        for _ in 0..TRIES {
            match dispatch!(self.commit_cart(lines, params, &reopen)) {
                // A twin with the same key stored its reservation between
                // the key check and the insert, and has committed: run
                // again, the check finds it.
                Err(StoreError::Query(DieselError::DatabaseError(
                    DatabaseErrorKind::UniqueViolation,
                    _,
                ))) if !twin_seen => twin_seen = true,
                // A SKU's sale changed under the commit's locks: the
                // (sale, user) pairs it took are not the ones it needs.
                Err(StoreError::Query(DieselError::RollbackTransaction)) => {}
                answer => return answer,
            }
        }
        Ok(CartOutcome::Refused(
            lines
                .iter()
                .map(|_| Some(CommitOutcome::Contention { attempts: TRIES }))
                .collect(),
        ))
    }

    /// See `record_cart_failed` in the query module: `reasons` per line;
    /// `reopen` for a redriven cart.
    pub async fn record_cart_failed(
        &self,
        lines: &[NewOrder],
        reasons: &[String],
        now: NaiveDateTime,
        reopen: bool,
    ) -> Result<Reservation, StoreError> {
        dispatch!(self.record_cart_failed(lines, reasons, now, reopen))
    }

    /// Carts whose lines are in different states, as the invariant
    /// checker reports them (see `split_carts` in the query module).
    pub async fn split_carts(
        &self,
        settled_before: NaiveDateTime,
    ) -> Result<Vec<String>, StoreError> {
        dispatch!(self.split_carts(settled_before))
    }

    /// The reservation (a cart with its lines, or a single one) that holds
    /// `user`'s idempotency `key`.
    pub async fn reservation_with_key(
        &self,
        user: &UserId,
        key: &IdempotencyKey,
    ) -> Result<Option<Reservation>, StoreError> {
        dispatch!(self.with_key(user.as_str(), key.as_str()))
    }
}
