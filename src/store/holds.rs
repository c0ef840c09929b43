//! After an order: ending holds (confirm, release, expiry) and the
//! waitlist that returned units go to first.

use std::time::Duration;

use chrono::NaiveDateTime;

use super::{
    HoldEnded, HoldExtended, InventoryRow, NewOrder, Restock, Store, StoreError, WaitlistJoin,
};
use crate::domain::{Reservation, ReservationId, ReservationState, Sku, SoldOutPolicy, UserId};

/// Holds queries, written once; `dialect!` in `mod.rs` expands
/// them into each connection type's module.
macro_rules! holds_queries {
    ($Conn:ty) => {
        async fn restock(
            conn: &mut $Conn,
            sku: &str,
            quantity: i32,
            now: NaiveDateTime,
        ) -> QueryResult<i64> {
            diesel::update(inventory::table.find(sku))
                .set((
                    inventory::stock.eq(inventory::stock + i64::from(quantity)),
                    inventory::version.eq(inventory::version + 1),
                    inventory::updated_at.eq(now),
                ))
                .returning(inventory::version)
                .get_result(conn)
                .await
        }

        /// Moves a HELD reservation to `to`, returning its units to stock
        /// unless it is being confirmed. The `state = 'held'` condition
        /// makes the move happen once however often it is asked for.
        async fn transition(
            conn: &mut $Conn,
            row: &ReservationRow,
            to: ReservationState,
            now: NaiveDateTime,
            hold_ttl: Option<Duration>,
        ) -> QueryResult<Transition> {
            if !leave_held(conn, row, to, now).await? {
                return Ok(Transition::Refused);
            }
            if to == ReservationState::Confirmed {
                return Ok(Transition::Moved { restock: None });
            }
            Ok(Transition::Moved {
                restock: Some(give_back(conn, row, now, hold_ttl).await?),
            })
        }

        /// Moves a HELD reservation to `to`; false if it was no longer
        /// HELD (or, to be confirmed, had lapsed; or, to be expired, had
        /// been extended since the sweep read it).
        async fn leave_held(
            conn: &mut $Conn,
            row: &ReservationRow,
            to: ReservationState,
            now: NaiveDateTime,
        ) -> QueryResult<bool> {
            let target = reservations::table
                .filter(reservations::reservation_id.eq(&row.reservation_id))
                .filter(reservations::state.eq(ReservationState::Held.as_db()));
            let changes = (
                reservations::state.eq(to.as_db()),
                reservations::updated_at.eq(now),
            );
            let moved = if to == ReservationState::Confirmed {
                // A lapsed hold cannot be confirmed even if the sweeper
                // has not reached it yet.
                let unexpired = reservations::expires_at
                    .is_null()
                    .or(reservations::expires_at.gt(now));
                diesel::update(target.filter(unexpired))
                    .set(changes)
                    .execute(conn)
                    .await?
            } else if to == ReservationState::Expired {
                let lapsed = reservations::expires_at.le(now);
                diesel::update(target.filter(lapsed))
                    .set(changes)
                    .execute(conn)
                    .await?
            } else {
                diesel::update(target).set(changes).execute(conn).await?
            };
            Ok(moved == 1)
        }

        /// Returns the units of a hold that has left HELD (not confirmed)
        /// to stock, and on to the SKU's waitlist.
        async fn give_back(
            conn: &mut $Conn,
            row: &ReservationRow,
            now: NaiveDateTime,
            hold_ttl: Option<Duration>,
        ) -> QueryResult<Restock> {
            let version = restock(conn, &row.sku, row.quantity, now).await?;
            let (handed, units, filled) = fill_waitlist(conn, &row.sku, now, hold_ttl).await?;
            Ok(Restock {
                stock_version: filled.unwrap_or(version),
                returned: i64::from(row.quantity) - units,
                handed,
            })
        }

        /// Hands available units to the SKU's waitlist, oldest entry
        /// first, inside the caller's transaction (after the change that
        /// made them available, which locked the row): each entry that
        /// fits becomes HELD with a hold of its own. First come, first
        /// served: an entry that does not fit stops the hand-off rather
        /// than letting a later, smaller one pass it. An entry whose
        /// user is at the per-user limit (the SKU's or its sale's) is
        /// rejected and skipped. One whose user is committing in another
        /// SKU of the sale at this instant is passed over this time and
        /// keeps its place, so the units still go to the line.
        /// Returns the reservations handed units, the units, and the
        /// row version the stock update wrote (None when none moved).
        async fn fill_waitlist(
            conn: &mut $Conn,
            sku: &str,
            now: NaiveDateTime,
            hold_ttl: Option<Duration>,
        ) -> QueryResult<(Vec<Reservation>, i64, Option<i64>)> {
            let Some(current) = inventory(conn, sku).await? else {
                return Ok((Vec::new(), 0, None));
            };
            if SoldOutPolicy::from_db(&current.sold_out_policy) != SoldOutPolicy::Waitlist {
                return Ok((Vec::new(), 0, None));
            }
            // After the closing nothing more is sold: returned units stay
            // in stock, and waiting entries lapse at their expiry.
            if current.closes_at.is_some_and(|closes| now >= closes) {
                return Ok((Vec::new(), 0, None));
            }
            let sale = row_caps(conn, std::iter::once(&current)).await?.remove(sku);
            let mut stock = current.stock;
            let mut handed = Vec::new();
            let mut units = 0;
            // Entries passed over this time (see the sale check below).
            let mut passed: HashSet<String> = HashSet::new();
            while stock > 0 {
                let waiting: Vec<ReservationRow> = reservations::table
                    .filter(reservations::sku.eq(sku))
                    .filter(reservations::state.eq(ReservationState::Waitlisted.as_db()))
                    .filter(
                        reservations::expires_at
                            .is_null()
                            .or(reservations::expires_at.gt(now)),
                    )
                    .order((
                        reservations::created_at.asc(),
                        reservations::reservation_id.asc(),
                    ))
                    .limit(64 + passed.len() as i64)
                    .select(ReservationRow::as_select())
                    .load(conn)
                    .await?;
                let waiting: Vec<ReservationRow> = waiting
                    .into_iter()
                    .filter(|entry| !passed.contains(&entry.reservation_id))
                    .collect();
                if waiting.is_empty() {
                    break;
                }
                let mut blocked = false;
                for entry in waiting {
                    let quantity = i64::from(entry.quantity);
                    if quantity > stock {
                        blocked = true;
                        break;
                    }
                    let mut reason = None;
                    if current.max_per_user > 0 {
                        let live = live_units(conn, sku, &entry.user_id).await?;
                        if live + quantity > i64::from(current.max_per_user) {
                            let held = user_limit_reason(live, current.max_per_user);
                            reason = Some(format!("{held} when the waitlist's turn came"));
                        }
                    }
                    if let (None, Some(cap)) = (&reason, &sale) {
                        // This transaction holds the SKU's row, so it may
                        // not wait for a (sale, user) lock (see
                        // `dialect.rs`): a user committing in another of
                        // the sale's SKUs at this moment is passed over.
                        let key = sale_user_key(&cap.sale_id, &entry.user_id);
                        if !own::try_lock_sale_user(conn, key).await? {
                            passed.insert(entry.reservation_id);
                            continue;
                        }
                        let live = sale_live_of(conn, cap.sale_id.as_str(), entry.user_id.as_str())
                            .await?;
                        if live + quantity > i64::from(cap.cap) {
                            reason = Some(sale_limit_reason(live, cap.cap, &cap.sale_id));
                        }
                    }
                    let next_state = match reason {
                        Some(_) => ReservationState::Rejected,
                        None => ReservationState::Held,
                    };
                    let expires_at = match next_state {
                        ReservationState::Held => hold_ttl.map(|ttl| after(now, ttl)),
                        _ => None,
                    };
                    let moved = diesel::update(
                        reservations::table
                            .filter(reservations::reservation_id.eq(&entry.reservation_id))
                            .filter(reservations::state.eq(ReservationState::Waitlisted.as_db())),
                    )
                    .set((
                        reservations::state.eq(next_state.as_db()),
                        reservations::expires_at.eq(expires_at),
                        reservations::reject_reason.eq(reason),
                        reservations::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
                    // The entry left the line (its user, or a sweep) after
                    // the read above: nothing to hand it.
                    if moved == 0 {
                        continue;
                    }
                    let mut reservation = entry.into_domain();
                    reservation.state = next_state;
                    reservation.expires_at = expires_at;
                    reservation.updated_at = now;
                    if next_state == ReservationState::Held {
                        stock -= quantity;
                        units += quantity;
                    }
                    handed.push(reservation);
                    if stock == 0 {
                        break;
                    }
                }
                if blocked {
                    break;
                }
            }
            if units == 0 {
                return Ok((handed, 0, None));
            }
            let version = diesel::update(inventory::table.find(sku))
                .set((
                    inventory::stock.eq(inventory::stock - units),
                    inventory::version.eq(inventory::version + 1),
                    inventory::updated_at.eq(now),
                ))
                .returning(inventory::version)
                .get_result(conn)
                .await?;
            Ok((handed, units, Some(version)))
        }

        async fn live_units(conn: &mut $Conn, sku: &str, user: &str) -> QueryResult<i64> {
            let live: Option<i64> = reservations::table
                .filter(reservations::sku.eq(sku))
                .filter(reservations::user_id.eq(user))
                .filter(reservations::state.eq_any(LIVE_STATES))
                .select(diesel::dsl::sum(reservations::quantity))
                .first(conn)
                .await?;
            Ok(live.unwrap_or(0))
        }

        /// Up to `limit` reservations in `state` whose `expires_at` has
        /// passed, the longest lapsed first.
        async fn lapsed(
            conn: &mut $Conn,
            state: ReservationState,
            now: NaiveDateTime,
            limit: i64,
        ) -> QueryResult<Vec<ReservationRow>> {
            reservations::table
                .filter(reservations::state.eq(state.as_db()))
                .filter(reservations::expires_at.le(now))
                .order((
                    reservations::expires_at.asc(),
                    reservations::reservation_id.asc(),
                ))
                .limit(limit)
                .select(ReservationRow::as_select())
                .load(conn)
                .await
        }

        /// Moves a WAITLISTED reservation to `to` (it leaves the line;
        /// no units involved); false if it was no longer waiting.
        async fn leave_line(
            conn: &mut $Conn,
            id: &str,
            to: ReservationState,
            now: NaiveDateTime,
        ) -> QueryResult<bool> {
            let moved = diesel::update(
                reservations::table
                    .filter(reservations::reservation_id.eq(id))
                    .filter(reservations::state.eq(ReservationState::Waitlisted.as_db())),
            )
            .set((
                reservations::state.eq(to.as_db()),
                reservations::updated_at.eq(now),
            ))
            .execute(conn)
            .await?;
            Ok(moved == 1)
        }

        /// Entries ahead of `row` in its SKU's waitlist.
        async fn waitlist_position(conn: &mut $Conn, row: &ReservationRow) -> QueryResult<u64> {
            let ahead: i64 = reservations::table
                .filter(reservations::sku.eq(&row.sku))
                .filter(reservations::state.eq(ReservationState::Waitlisted.as_db()))
                .filter(
                    reservations::created_at
                        .lt(row.created_at)
                        .or(reservations::created_at
                            .eq(row.created_at)
                            .and(reservations::reservation_id.lt(&row.reservation_id))),
                )
                .count()
                .get_result(conn)
                .await?;
            Ok(u64::try_from(ahead).unwrap_or(0))
        }

        /// Puts `order` in its SKU's waitlist (see [`WaitlistJoin`]).
        pub(super) async fn join_waitlist(
            conn: &mut $Conn,
            order: &NewOrder,
            default_limit: u32,
            ttl: Duration,
            now: NaiveDateTime,
            stock_check: bool,
        ) -> QueryResult<WaitlistJoin> {
            conn.transaction::<_, DieselError, _>(async |conn| {
                // Serialises joins with the hand-off, which runs under
                // the same row lock.
                let Some(current) = own::lock_inventory(conn, order.sku.as_str()).await? else {
                    return Ok(WaitlistJoin::UnknownSku);
                };
                // A sold-out answer from the fast path or a stale gate copy
                // can come after the closing.
                let check = current.window().check(order.created_at);
                if check != WindowCheck::Open {
                    return Ok(WaitlistJoin::OutsideWindow(check));
                }
                if SoldOutPolicy::from_db(&current.sold_out_policy) != SoldOutPolicy::Waitlist {
                    return Ok(WaitlistJoin::NotOffered);
                }
                let sku = order.sku.as_str();
                let user = order.user.as_str();
                let mine: Option<ReservationRow> = reservations::table
                    .filter(reservations::sku.eq(sku))
                    .filter(reservations::user_id.eq(user))
                    .filter(reservations::state.eq(ReservationState::Waitlisted.as_db()))
                    .select(ReservationRow::as_select())
                    .first(conn)
                    .await
                    .optional()?;
                if let Some(row) = mine {
                    let position = waitlist_position(conn, &row).await?;
                    let mut reservation = row.into_domain();
                    reservation.waitlist_position = Some(position);
                    return Ok(WaitlistJoin::Waiting(reservation));
                }
                if let Some(key) = &order.idempotency_key {
                    let used: Option<ReservationRow> = reservations::table
                        .filter(reservations::user_id.eq(user))
                        .filter(reservations::idempotency_key.eq(key.as_str()))
                        .select(ReservationRow::as_select())
                        .first(conn)
                        .await
                        .optional()?;
                    if let Some(row) = used {
                        return Ok(WaitlistJoin::KeyUsed(row.into_domain()));
                    }
                }
                if stock_check && current.stock >= i64::from(order.quantity) {
                    return Ok(WaitlistJoin::InStock);
                }
                let quantity = i64::from(order.quantity);
                if current.max_per_user > 0 {
                    let live = live_units(conn, sku, user).await?;
                    if live + quantity > i64::from(current.max_per_user) {
                        return Ok(WaitlistJoin::UserLimit {
                            live_units: live,
                            limit: current.max_per_user as u32,
                        });
                    }
                }
                // Without the (sale, user) lock: joining takes no units,
                // and the hand-off checks the cap again under it.
                if let Some(cap) = row_caps(conn, std::iter::once(&current)).await?.remove(sku) {
                    let live = sale_live_of(conn, cap.sale_id.as_str(), user).await?;
                    if live + quantity > i64::from(cap.cap) {
                        return Ok(WaitlistJoin::UserLimit {
                            live_units: live,
                            limit: cap.cap as u32,
                        });
                    }
                }
                let limit = match current.waitlist_limit {
                    0 => default_limit,
                    own => own as u32,
                };
                let waiting: i64 = reservations::table
                    .filter(reservations::sku.eq(sku))
                    .filter(reservations::state.eq(ReservationState::Waitlisted.as_db()))
                    .count()
                    .get_result(conn)
                    .await?;
                if waiting >= i64::from(limit) {
                    return Ok(WaitlistJoin::Full { limit });
                }
                let mut row = row_for(order, ReservationState::Waitlisted, now);
                row.expires_at = Some(after(now, ttl));
                insert_row(conn, &row).await?;
                let mut reservation = row.into_domain();
                reservation.waitlist_position = Some(u64::try_from(waiting).unwrap_or(0));
                Ok(WaitlistJoin::Waiting(reservation))
            })
            .await
        }

        /// Sets a SKU's sold-out policy and waitlist limit. Switching to
        /// `instant` ends every waiting entry (EXPIRED, with the reason),
        /// since nothing would ever hand them units. Returns the row and
        /// the entries it ended.
        pub(super) async fn set_sold_out_policy(
            conn: &mut $Conn,
            sku: &str,
            policy: SoldOutPolicy,
            waitlist_limit: i32,
            now: NaiveDateTime,
        ) -> QueryResult<Option<(InventoryRow, Vec<Reservation>)>> {
            conn.transaction::<_, DieselError, _>(async |conn| {
                let updated = diesel::update(inventory::table.find(sku))
                    .set((
                        inventory::sold_out_policy.eq(policy.as_db()),
                        inventory::waitlist_limit.eq(waitlist_limit),
                        inventory::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
                if updated == 0 {
                    return Ok(None);
                }
                let mut ended = Vec::new();
                if policy == SoldOutPolicy::Instant {
                    // The rows this update changed, not a read before it:
                    // an entry can leave the line (its user) meanwhile, and
                    // must not be announced as ended by the closing.
                    let waiting: Vec<ReservationRow> = diesel::update(
                        reservations::table
                            .filter(reservations::sku.eq(sku))
                            .filter(reservations::state.eq(ReservationState::Waitlisted.as_db())),
                    )
                    .set((
                        reservations::state.eq(ReservationState::Expired.as_db()),
                        reservations::reject_reason.eq("the waitlist was closed"),
                        reservations::updated_at.eq(now),
                    ))
                    .returning(ReservationRow::as_returning())
                    .get_results(conn)
                    .await?;
                    ended = waiting
                        .into_iter()
                        .map(ReservationRow::into_domain)
                        .collect();
                }
                let row = inventory(conn, sku)
                    .await?
                    .expect("updated in this transaction");
                Ok(Some((row, ended)))
            })
            .await
        }

        pub(super) async fn end_hold(
            conn: &mut $Conn,
            id: &str,
            user: &str,
            to: ReservationState,
            now: NaiveDateTime,
            hold_ttl: Option<Duration>,
        ) -> QueryResult<HoldEnded> {
            conn.transaction::<_, DieselError, _>(async |conn| {
                let Some(mut row) = find(conn, id).await? else {
                    return Ok(HoldEnded::NotFound);
                };
                if row.user_id != user {
                    return Ok(HoldEnded::NotOwner);
                }
                if let Some(cart) = row.cart_id.clone() {
                    return end_cart(conn, &cart, to, now, hold_ttl).await;
                }
                let mut state = ReservationState::from_db(&row.state);
                if state == Some(to) {
                    return Ok(HoldEnded::Unchanged(row.into_domain()));
                }
                if state == Some(ReservationState::Waitlisted) && to == ReservationState::Released {
                    // Leaving the line: no units to return.
                    let moved = leave_line(conn, id, to, now).await?;
                    row = find(conn, id).await?.expect("rows are never deleted");
                    state = ReservationState::from_db(&row.state);
                    if moved {
                        return Ok(HoldEnded::Changed {
                            reservation: row.into_domain(),
                            restock: None,
                        });
                    }
                    // A hand-off gave the entry units between the read and
                    // the update: the caller who asked to leave is released
                    // from the hold instead, below, and the units go back.
                    if state != Some(ReservationState::Held) {
                        return Ok(HoldEnded::Unchanged(row.into_domain()));
                    }
                }
                if state != Some(ReservationState::Held) {
                    // Releasing something no longer held is a no-op;
                    // confirming it is an error.
                    return Ok(
                        if to == ReservationState::Released
                            && state != Some(ReservationState::Confirmed)
                        {
                            HoldEnded::Unchanged(row.into_domain())
                        } else {
                            HoldEnded::WrongState(row.into_domain())
                        },
                    );
                }
                if let Transition::Moved { restock } =
                    transition(conn, &row, to, now, hold_ttl).await?
                {
                    let row = find(conn, id)
                        .await?
                        .expect("row updated in this transaction");
                    return Ok(HoldEnded::Changed {
                        reservation: row.into_domain(),
                        restock,
                    });
                }
                let row = find(conn, id).await?.expect("rows are never deleted");
                Ok(
                    if ReservationState::from_db(&row.state) == Some(ReservationState::Held) {
                        HoldEnded::HoldExpired(row.into_domain())
                    } else {
                        HoldEnded::WrongState(row.into_domain())
                    },
                )
            })
            .await
        }

        /// The extension's one conditional update: a HELD row with an
        /// unexpired expiry earlier than `until` moves to `until`. Rows
        /// moved (0 or 1).
        async fn extend_row(
            conn: &mut $Conn,
            id: &str,
            until: NaiveDateTime,
            now: NaiveDateTime,
        ) -> QueryResult<usize> {
            diesel::update(
                reservations::table
                    .filter(reservations::reservation_id.eq(id))
                    .filter(reservations::state.eq(ReservationState::Held.as_db()))
                    .filter(reservations::expires_at.gt(now))
                    .filter(reservations::expires_at.lt(until)),
            )
            .set(reservations::expires_at.eq(until))
            .execute(conn)
            .await
        }

        /// Moves a HELD reservation's expiry to `until` if that is later,
        /// within `max_hold` of when it became HELD. One row, one
        /// conditional update on an unexpired, earlier expiry; the
        /// sweeper's update asks for a lapsed one, so the two never both
        /// win, and of two extensions at once the later expiry stays.
        pub(super) async fn extend_hold(
            conn: &mut $Conn,
            id: &str,
            user: &str,
            until: NaiveDateTime,
            max_hold: Duration,
            now: NaiveDateTime,
        ) -> QueryResult<HoldExtended> {
            let Some(row) = find(conn, id).await? else {
                return Ok(HoldExtended::NotFound);
            };
            if row.user_id != user {
                return Ok(HoldExtended::NotOwner);
            }
            if ReservationState::from_db(&row.state) != Some(ReservationState::Held) {
                return Ok(HoldExtended::WrongState(as_seen(conn, row).await?));
            }
            let Some(expires_at) = row.expires_at else {
                // Holds that never expire need no more time.
                return Ok(HoldExtended::Unchanged(as_seen(conn, row).await?));
            };
            if expires_at <= now {
                return Ok(HoldExtended::HoldExpired(as_seen(conn, row).await?));
            }
            if until <= expires_at {
                return Ok(HoldExtended::Unchanged(as_seen(conn, row).await?));
            }
            // A HELD row's `updated_at` is when it became HELD: nothing
            // else writes a HELD row, and an extension moves only its
            // expiry (its state did not change).
            let latest = after(row.updated_at, max_hold);
            if until > latest {
                return Ok(HoldExtended::Limit { latest });
            }
            if let Some(cart) = row.cart_id.clone() {
                // All lines or none; the checks above, made on this line,
                // hold for every line (they became HELD and lapse
                // together) unless another call moved some meanwhile.
                if let Some(extended) = extend_cart(conn, &cart, until, now).await? {
                    return Ok(HoldExtended::Extended(extended));
                }
                let rows = cart_rows(conn, &cart).await?;
                let live = rows.iter().all(|row| {
                    row.state == ReservationState::Held.as_db()
                        && row.expires_at.is_some_and(|at| at > now)
                });
                return Ok(match cart_lapsed(rows, now) {
                    (true, cart) => HoldExtended::HoldExpired(cart),
                    // Another extension got there first.
                    (false, cart) if live => HoldExtended::Unchanged(cart),
                    (false, cart) => HoldExtended::WrongState(cart),
                });
            }
            let moved = extend_row(conn, id, until, now).await?;
            let row = find(conn, id).await?.expect("rows are never deleted");
            let held = ReservationState::from_db(&row.state) == Some(ReservationState::Held);
            Ok(match row.expires_at {
                _ if moved == 1 => HoldExtended::Extended(row.into_domain()),
                // Another extension reached as far meanwhile.
                Some(expiry) if held && expiry >= until => {
                    HoldExtended::Unchanged(row.into_domain())
                }
                // Lapsed between the read and the update.
                _ if held => HoldExtended::HoldExpired(row.into_domain()),
                // Released, confirmed or swept meanwhile.
                _ => HoldExtended::WrongState(row.into_domain()),
            })
        }

        pub(super) async fn expire_due(
            conn: &mut $Conn,
            now: NaiveDateTime,
            limit: i64,
            hold_ttl: Option<Duration>,
        ) -> QueryResult<Vec<(Reservation, Option<Restock>)>> {
            // Waitlist entries past their time leave the line first, so a
            // hold expiring below does not hand them units. Each in a
            // statement of its own, committed at once: a hand-off or a
            // policy change locks the SKU's row and then its entries (in
            // an order of their own), so a sweep holding one entry while it
            // waits for another entry or a row could close a cycle.
            let mut expired = Vec::new();
            for row in lapsed(conn, ReservationState::Waitlisted, now, limit).await? {
                if leave_line(conn, &row.reservation_id, ReservationState::Expired, now).await? {
                    let mut reservation = row.into_domain();
                    reservation.state = ReservationState::Expired;
                    reservation.updated_at = now;
                    expired.push((reservation, None));
                }
            }
            let held = conn
                .transaction::<_, DieselError, _>(async |conn| {
                    // Every hold leaves HELD before any units go back, and the
                    // units go back in SKU order (byte order, as the group
                    // commit locks): held rows first, then inventory rows
                    // sorted, as a release and the group commit take them, so
                    // this sweep deadlocks with neither.
                    let mut expired = Vec::new();
                    let mut due = lapsed(conn, ReservationState::Held, now, limit).await?;
                    due.sort_by(|a, b| {
                        (&a.sku, a.expires_at, &a.reservation_id).cmp(&(
                            &b.sku,
                            b.expires_at,
                            &b.reservation_id,
                        ))
                    });
                    let mut moved = Vec::with_capacity(due.len());
                    for row in due {
                        if leave_held(conn, &row, ReservationState::Expired, now).await? {
                            moved.push(row);
                        }
                    }
                    for row in moved {
                        let restock = give_back(conn, &row, now, hold_ttl).await?;
                        let mut reservation = row.into_domain();
                        reservation.state = ReservationState::Expired;
                        reservation.updated_at = now;
                        expired.push((reservation, Some(restock)));
                    }
                    Ok(expired)
                })
                .await?;
            expired.extend(held);
            Ok(expired)
        }
    };
}

impl Store {
    pub async fn confirm(
        &self,
        id: &ReservationId,
        user: &UserId,
        now: NaiveDateTime,
    ) -> Result<HoldEnded, StoreError> {
        dispatch!(self.end_hold(
            id.as_str(),
            user.as_str(),
            ReservationState::Confirmed,
            now,
            None
        ))
    }

    /// Makes a HELD reservation's hold last until at least `until`, within
    /// `max_hold` of when it became HELD ([`HoldExtended`]).
    pub async fn extend_hold(
        &self,
        id: &ReservationId,
        user: &UserId,
        until: NaiveDateTime,
        max_hold: Duration,
        now: NaiveDateTime,
    ) -> Result<HoldExtended, StoreError> {
        dispatch!(self.extend_hold(id.as_str(), user.as_str(), until, max_hold, now))
    }

    /// Releases a hold and returns its units to stock (or to the oldest
    /// waitlist entries, which get holds of `hold_ttl`), once. A waitlisted
    /// reservation leaves the line.
    pub async fn release(
        &self,
        id: &ReservationId,
        user: &UserId,
        now: NaiveDateTime,
        hold_ttl: Option<Duration>,
    ) -> Result<HoldEnded, StoreError> {
        dispatch!(self.end_hold(
            id.as_str(),
            user.as_str(),
            ReservationState::Released,
            now,
            hold_ttl
        ))
    }

    /// Expires lapsed waitlist entries, then up to `limit` lapsed holds,
    /// whose units return as [`Store::release`]'s do.
    pub async fn expire_due(
        &self,
        now: NaiveDateTime,
        limit: i64,
        hold_ttl: Option<Duration>,
    ) -> Result<Vec<(Reservation, Option<Restock>)>, StoreError> {
        dispatch!(self.expire_due(now, limit, hold_ttl))
    }

    /// See [`WaitlistJoin`]; `default_limit` applies where the SKU sets
    /// none, `ttl` is how long the entry waits. `stock_check`: answer
    /// `InStock` when the row has the units, which is right only where no
    /// admitted order is still on its way to the database.
    pub async fn join_waitlist(
        &self,
        order: &NewOrder,
        default_limit: u32,
        ttl: Duration,
        now: NaiveDateTime,
        stock_check: bool,
    ) -> Result<WaitlistJoin, StoreError> {
        match dispatch!(self.join_waitlist(order, default_limit, ttl, now, stock_check)) {
            // The key check reads without a lock: an order with the same
            // (user, key) in another SKU can be stored between it and the
            // insert. Run again, the check finds that order (KeyUsed).
            Err(StoreError::Query(diesel::result::Error::DatabaseError(
                diesel::result::DatabaseErrorKind::UniqueViolation,
                _,
            ))) => dispatch!(self.join_waitlist(order, default_limit, ttl, now, stock_check)),
            answer => answer,
        }
    }

    /// Sets a SKU's sold-out policy; `None` for an unknown SKU.
    pub async fn set_sold_out_policy(
        &self,
        sku: &Sku,
        policy: SoldOutPolicy,
        waitlist_limit: u32,
        now: NaiveDateTime,
    ) -> Result<Option<(InventoryRow, Vec<Reservation>)>, StoreError> {
        let limit = i32::try_from(waitlist_limit).unwrap_or(i32::MAX);
        dispatch!(self.set_sold_out_policy(sku.as_str(), policy, limit, now))
    }

    /// A waitlisted reservation with its current position.
    pub async fn with_waitlist_position(
        &self,
        reservation: Reservation,
    ) -> Result<Reservation, StoreError> {
        if reservation.state != ReservationState::Waitlisted {
            return Ok(reservation);
        }
        let id = reservation.id.clone();
        let position = dispatch!(self.position_of(id.as_str()))?;
        Ok(Reservation {
            waitlist_position: position,
            ..reservation
        })
    }
}
