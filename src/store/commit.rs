//! Committing orders: one order, or a batch with a constant number of
//! statements per SKU group; the optimistic (or pessimistic, or naive)
//! stock update, duplicate keys and ids, and rejected rows.

use chrono::NaiveDateTime;

use super::{CommitOutcome, CommitParams, NewOrder, Store, StoreError};
use crate::domain::{Reservation, ReservationId};

/// Commit queries, written once; `dialect!` in `mod.rs` expands
/// them into each connection type's module.
macro_rules! commit_queries {
    ($Conn:ty) => {
        type KeyPairMatch = Box<
            dyn BoxableExpression<
                reservations::table,
                <$Conn as diesel_async::AsyncConnectionCore>::Backend,
                SqlType = diesel::sql_types::Nullable<diesel::sql_types::Bool>,
            >,
        >;

        /// `(user_id = u AND idempotency_key = k) OR …` for `pairs`
        /// (not empty), as a balanced tree: SQLite's parser overflows
        /// on the left-deep chain `or_filter` builds from 100 pairs.
        fn any_key_pair(pairs: &[(&str, &str)]) -> KeyPairMatch {
            if let [(user, key)] = pairs {
                return Box::new(
                    reservations::user_id
                        .eq(user.to_string())
                        .and(reservations::idempotency_key.eq(key.to_string())),
                );
            }
            let (left, right) = pairs.split_at(pairs.len() / 2);
            Box::new(any_key_pair(left).or(any_key_pair(right)))
        }

        async fn find(conn: &mut $Conn, id: &str) -> QueryResult<Option<ReservationRow>> {
            reservations::table
                .find(id)
                .select(ReservationRow::as_select())
                .first(conn)
                .await
                .optional()
        }

        async fn insert_row(conn: &mut $Conn, row: &ReservationRow) -> QueryResult<()> {
            diesel::insert_into(reservations::table)
                .values(row)
                .execute(conn)
                .await
                .map(|_| ())
        }

        /// An unfillable order as a REJECTED row. The key is not stored:
        /// it belongs to whichever reservation holds it, or may be
        /// retried once stock comes back.
        fn rejected_row(order: &NewOrder, reason: String, now: NaiveDateTime) -> ReservationRow {
            let mut row = row_for(order, ReservationState::Rejected, now);
            row.idempotency_key = None;
            row.reject_reason = Some(reason);
            row
        }

        fn row_for(
            order: &NewOrder,
            state: ReservationState,
            now: NaiveDateTime,
        ) -> ReservationRow {
            ReservationRow {
                reservation_id: order.id.as_str().to_owned(),
                sku: order.sku.as_str().to_owned(),
                user_id: order.user.as_str().to_owned(),
                idempotency_key: order
                    .idempotency_key
                    .as_ref()
                    .map(|k| k.as_str().to_owned()),
                quantity: order.quantity as i32,
                state: state.as_db().to_owned(),
                reject_reason: None,
                expires_at: None,
                created_at: order.created_at,
                updated_at: now,
                cart_id: None,
            }
        }

        /// Stores an unfillable order as REJECTED.
        async fn reject(
            conn: &mut $Conn,
            order: &NewOrder,
            cause: RejectCause,
            reason: String,
            now: NaiveDateTime,
        ) -> QueryResult<CommitOutcome> {
            let row = rejected_row(order, reason, now);
            insert_row(conn, &row).await?;
            Ok(CommitOutcome::Rejected {
                reservation: row.into_domain(),
                cause,
            })
        }

        /// The queue path's group commit: the whole batch decided in
        /// FIFO order from a few set-based reads, then one statement
        /// taking every SKU's units (per row `WHERE version = $v AND
        /// stock >= $taken`, covering every order of that SKU in the
        /// batch) and one multi-row insert, so a batch costs the same
        /// handful of statements however many SKUs it spans (one key
        /// lookup per 100 keyed orders, one insert per 1,000 rows).
        /// `None`: a version moved or the batch holds a case this path
        /// leaves to `decide` (the same id or idempotency key twice); the
        /// caller rolls back and decides order by order.
        async fn decide_grouped(
            conn: &mut $Conn,
            orders: &[NewOrder],
            params: CommitParams,
        ) -> QueryResult<Option<Vec<CommitOutcome>>> {
            let ids: Vec<&str> = orders.iter().map(|o| o.id.as_str()).collect();
            let existing: HashMap<String, ReservationRow> = reservations::table
                .filter(reservations::reservation_id.eq_any(&ids))
                .select(ReservationRow::as_select())
                .load(conn)
                .await?
                .into_iter()
                .map(|row| (row.reservation_id.clone(), row))
                .collect();
            let keyed: Vec<(&str, &str)> = orders
                .iter()
                .filter_map(|o| {
                    o.idempotency_key
                        .as_ref()
                        .map(|k| (o.user.as_str(), k.as_str()))
                })
                .collect();
            let mut holders: HashMap<(String, String), ReservationRow> = HashMap::new();
            // One index probe per (user, key) pair. `user_id IN (..) AND
            // idempotency_key IN (..)` read the same rows, but PostgreSQL
            // 15 planned it as a scan of the whole table: 30 ms per batch
            // at 300,000 reservations, growing with every sale.
            for pairs in keyed.chunks(KEY_PAIRS_PER_QUERY) {
                let query = reservations::table
                    .filter(any_key_pair(pairs))
                    .select(ReservationRow::as_select());
                for row in query.load(conn).await? {
                    if let Some(key) = row.idempotency_key.clone() {
                        holders.insert((row.user_id.clone(), key), row);
                    }
                }
            }
            let skus: Vec<&str> = orders
                .iter()
                .map(|o| o.sku.as_str())
                .collect::<HashSet<_>>()
                .into_iter()
                .collect();
            // SKU → (row as read, units this batch takes).
            let mut stock: HashMap<String, (InventoryRow, i64)> = inventory::table
                .filter(inventory::sku.eq_any(&skus))
                .select(InventoryRow::as_select())
                .load(conn)
                .await?
                .into_iter()
                .map(|row| (row.sku.clone(), (row, 0)))
                .collect();
            let capped: Vec<&str> = stock
                .values()
                .filter(|(row, _)| row.max_per_user > 0)
                .map(|(row, _)| row.sku.as_str())
                .collect();
            // The sales' caps, under their (sale, user) locks: taken before
            // `take_stock` locks any row.
            let caps = row_caps(conn, stock.values().map(|(row, _)| row)).await?;
            let pairs = capped_pairs(orders, &caps);
            lock_sale_pairs(conn, &pairs).await?;
            let mut sale_units = sale_live(conn, &pairs).await?;
            let mut live: HashMap<(String, String), i64> = HashMap::new();
            if !capped.is_empty() {
                let users: Vec<&str> = orders.iter().map(|o| o.user.as_str()).collect();
                let sums: Vec<(String, String, Option<i64>)> = reservations::table
                    .filter(reservations::sku.eq_any(&capped))
                    .filter(reservations::user_id.eq_any(&users))
                    .filter(reservations::state.eq_any(LIVE_STATES))
                    .group_by((reservations::sku, reservations::user_id))
                    .select((
                        reservations::sku,
                        reservations::user_id,
                        diesel::dsl::sum(reservations::quantity),
                    ))
                    .load(conn)
                    .await?;
                for (sku, user, units) in sums {
                    live.insert((sku, user), units.unwrap_or(0));
                }
            }

            let mut seen_ids = HashSet::new();
            let mut seen_keys = HashSet::new();
            let mut outcomes = Vec::with_capacity(orders.len());
            let mut rows = Vec::with_capacity(orders.len());
            for order in orders {
                if let Some(row) = existing.get(order.id.as_str()) {
                    outcomes.push(CommitOutcome::AlreadyCommitted(row.clone().into_domain()));
                    continue;
                }
                if !seen_ids.insert(order.id.as_str()) {
                    return Ok(None);
                }
                if let Some(key) = &order.idempotency_key {
                    let slot = (order.user.as_str().to_owned(), key.as_str().to_owned());
                    if let Some(holder) = holders.get(&slot) {
                        let reason = format!(
                            "duplicate idempotency key: reservation {} holds it",
                            holder.reservation_id
                        );
                        let row = rejected_row(order, reason, params.now);
                        push_rejected(&mut outcomes, &mut rows, row, RejectCause::DuplicateKey);
                        continue;
                    }
                    if !seen_keys.insert(slot) {
                        return Ok(None);
                    }
                }
                let Some((current, taken)) = stock.get_mut(order.sku.as_str()) else {
                    outcomes.push(CommitOutcome::UnknownSku);
                    continue;
                };
                if let Some(reason) = window_reason(current.window().check(order.created_at)) {
                    let row = rejected_row(order, reason, params.now);
                    push_rejected(&mut outcomes, &mut rows, row, RejectCause::OutsideWindow);
                    continue;
                }
                let quantity = i64::from(order.quantity);
                let available = current.stock - *taken;
                let slot = (
                    order.sku.as_str().to_owned(),
                    order.user.as_str().to_owned(),
                );
                if current.max_per_user > 0 {
                    let units = live.get(&slot).copied().unwrap_or(0);
                    if units + quantity > i64::from(current.max_per_user) {
                        let reason = user_limit_reason(units, current.max_per_user);
                        let row = rejected_row(order, reason, params.now);
                        push_rejected(&mut outcomes, &mut rows, row, RejectCause::UserLimit);
                        continue;
                    }
                }
                let sale = caps
                    .get(order.sku.as_str())
                    .map(|cap| (cap, (cap.sale_id.clone(), order.user.as_str().to_owned())));
                if let Some((cap, pair)) = &sale {
                    let units = sale_units.get(pair).copied().unwrap_or(0);
                    if units + quantity > i64::from(cap.cap) {
                        let reason = sale_limit_reason(units, cap.cap, &cap.sale_id);
                        let row = rejected_row(order, reason, params.now);
                        push_rejected(&mut outcomes, &mut rows, row, RejectCause::UserLimit);
                        continue;
                    }
                }
                if available < quantity {
                    let reason = format!("{SOLD_OUT_REASON}: {available} units left");
                    let row = rejected_row(order, reason, params.now);
                    push_rejected(&mut outcomes, &mut rows, row, RejectCause::SoldOut);
                    continue;
                }
                *taken += quantity;
                *live.entry(slot).or_default() += quantity;
                if let Some((_, pair)) = sale {
                    *sale_units.entry(pair).or_default() += quantity;
                }
                let mut row = row_for(order, ReservationState::Held, params.now);
                row.expires_at = params.hold_ttl.map(|ttl| after(params.now, ttl));
                outcomes.push(CommitOutcome::Committed {
                    reservation: row.clone().into_domain(),
                    remaining: available - quantity,
                    // The one update below writes it, or the batch is
                    // decided again order by order.
                    stock_version: current.version + 1,
                });
                rows.push(row);
            }
            let mut takes: Vec<dialect::Take<'_>> = stock
                .values()
                .filter(|(_, taken)| *taken > 0)
                .map(|(current, taken)| dialect::Take {
                    sku: &current.sku,
                    version: current.version,
                    units: *taken,
                })
                .collect();
            takes.sort_unstable_by(|a, b| a.sku.cmp(b.sku));
            if !takes.is_empty() && own::take_stock(conn, &takes, params.now).await? != takes.len()
            {
                return Ok(None);
            }
            own::insert_rows(conn, &rows).await?;
            Ok(Some(outcomes))
        }

        /// `held`: this transaction may already hold `inventory` rows
        /// (the fallback locked its SKUs), so it must not wait for a
        /// (sale, user) lock (see `dialect.rs`).
        async fn decide(
            conn: &mut $Conn,
            order: &NewOrder,
            params: CommitParams,
            held: bool,
        ) -> QueryResult<CommitOutcome> {
            if let Some(row) = find(conn, order.id.as_str()).await? {
                return Ok(CommitOutcome::AlreadyCommitted(row.into_domain()));
            }
            if let Some(key) = &order.idempotency_key {
                let holder = reservations::table
                    .filter(reservations::user_id.eq(order.user.as_str()))
                    .filter(reservations::idempotency_key.eq(key.as_str()))
                    .select(ReservationRow::as_select())
                    .first(conn)
                    .await
                    .optional()?;
                if let Some(holder) = holder {
                    if params.record_rejections {
                        let reason = format!(
                            "duplicate idempotency key: reservation {} holds it",
                            holder.reservation_id
                        );
                        return reject(conn, order, RejectCause::DuplicateKey, reason, params.now)
                            .await;
                    }
                    return Ok(CommitOutcome::DuplicateKey(holder.into_domain()));
                }
            }
            let quantity = i64::from(order.quantity);
            // The SKU's capped sale, its (sale, user) lock held: `None`
            // until looked up. A pessimistic read locks the row, so the
            // lock must come first; otherwise only a SKU in a sale pays,
            // and may wait for the lock only before its first update
            // (a failed one can leave the row locked).
            let mut sale: Option<Option<SaleCap>> = None;
            if params.mode == DbCheckMode::Pessimistic {
                sale = Some(sale_of(conn, order, !held).await?);
            }
            for attempt in 0..params.max_attempts {
                let current = match params.mode {
                    DbCheckMode::Optimistic | DbCheckMode::Off => inventory::table
                        .find(order.sku.as_str())
                        .select(InventoryRow::as_select())
                        .first(conn)
                        .await
                        .optional()?,
                    DbCheckMode::Pessimistic => {
                        own::lock_inventory(conn, order.sku.as_str()).await?
                    }
                };
                let Some(current) = current else {
                    return Ok(CommitOutcome::UnknownSku);
                };
                // The moment the Reserve was decided, not this commit's: a
                // queued order accepted before the closing is still sold.
                let check = current.window().check(order.created_at);
                if let Some(reason) = window_reason(check) {
                    if params.record_rejections {
                        return reject(conn, order, RejectCause::OutsideWindow, reason, params.now)
                            .await;
                    }
                    return Ok(CommitOutcome::OutsideWindow(check));
                }
                if current.max_per_user > 0 {
                    let live: Option<i64> = reservations::table
                        .filter(reservations::sku.eq(order.sku.as_str()))
                        .filter(reservations::user_id.eq(order.user.as_str()))
                        .filter(reservations::state.eq_any(LIVE_STATES))
                        .select(diesel::dsl::sum(reservations::quantity))
                        .first(conn)
                        .await?;
                    let live = live.unwrap_or(0);
                    if live + quantity > i64::from(current.max_per_user) {
                        if params.record_rejections {
                            let reason = user_limit_reason(live, current.max_per_user);
                            return reject(conn, order, RejectCause::UserLimit, reason, params.now)
                                .await;
                        }
                        return Ok(CommitOutcome::UserLimit {
                            live_units: live,
                            limit: current.max_per_user as u32,
                            sale: None,
                        });
                    }
                }
                // Not looked up yet, or looked up before this read with
                // no cap found: a sale set since (under the row lock this
                // read may hold) is checked too.
                if current.sale_id.is_some() && !matches!(sale, Some(Some(_))) {
                    let wait = !held && attempt == 0 && sale.is_none();
                    sale = Some(sale_of(conn, order, wait).await?);
                }
                if let Some(Some(cap)) = &sale {
                    let live =
                        sale_live_of(conn, cap.sale_id.as_str(), order.user.as_str()).await?;
                    if live + quantity > i64::from(cap.cap) {
                        if params.record_rejections {
                            let reason = sale_limit_reason(live, cap.cap, &cap.sale_id);
                            return reject(conn, order, RejectCause::UserLimit, reason, params.now)
                                .await;
                        }
                        return Ok(CommitOutcome::UserLimit {
                            live_units: live,
                            limit: cap.cap as u32,
                            sale: Some(cap.sale_id.clone()),
                        });
                    }
                }
                if current.stock < quantity {
                    if params.record_rejections {
                        let reason = format!("{SOLD_OUT_REASON}: {} units left", current.stock);
                        return reject(conn, order, RejectCause::SoldOut, reason, params.now).await;
                    }
                    return Ok(CommitOutcome::SoldOut {
                        remaining: current.stock,
                    });
                }
                let updated = if params.mode == DbCheckMode::Off {
                    // The article's naive write: what was read, minus
                    // the order, whatever committed in between.
                    diesel::update(inventory::table.filter(inventory::sku.eq(order.sku.as_str())))
                        .set((
                            inventory::stock.eq(current.stock - quantity),
                            inventory::version.eq(current.version + 1),
                            inventory::updated_at.eq(params.now),
                        ))
                        .execute(conn)
                        .await?
                } else {
                    diesel::update(
                        inventory::table
                            .filter(inventory::sku.eq(order.sku.as_str()))
                            .filter(inventory::version.eq(current.version))
                            .filter(inventory::stock.ge(quantity)),
                    )
                    .set((
                        inventory::stock.eq(inventory::stock - quantity),
                        inventory::version.eq(inventory::version + 1),
                        inventory::updated_at.eq(params.now),
                    ))
                    .execute(conn)
                    .await?
                };
                if updated == 1 {
                    let mut row = row_for(order, ReservationState::Held, params.now);
                    row.expires_at = params.hold_ttl.map(|ttl| after(params.now, ttl));
                    insert_row(conn, &row).await?;
                    return Ok(CommitOutcome::Committed {
                        reservation: row.into_domain(),
                        remaining: current.stock - quantity,
                        stock_version: current.version + 1,
                    });
                }
                // Another writer committed since our read: back off a
                // little so the retries do not march in lock step.
                crate::metrics::decision("db", "conflict");
                let pause = rand::random_range(50..500);
                tokio::time::sleep(Duration::from_micros(pause)).await;
            }
            Ok(CommitOutcome::Contention {
                attempts: params.max_attempts,
            })
        }

        /// The order's SKU's capped sale, if any, with the order's
        /// (sale, user) lock taken: waited for when `wait`, else taken
        /// only if free (a holder always gets it again), and
        /// `RollbackTransaction` when it is not.
        async fn sale_of(
            conn: &mut $Conn,
            order: &NewOrder,
            wait: bool,
        ) -> QueryResult<Option<SaleCap>> {
            let cap = sale_caps(conn, &[order.sku.as_str()])
                .await?
                .remove(order.sku.as_str());
            if let Some(cap) = &cap {
                let pair = [(cap.sale_id.as_str(), order.user.as_str())];
                if wait {
                    lock_sale_pairs(conn, &pair).await?;
                } else {
                    let key = sale_user_key(&cap.sale_id, order.user.as_str());
                    if !own::try_lock_sale_user(conn, key).await? {
                        return Err(DieselError::RollbackTransaction);
                    }
                }
            }
            Ok(cap)
        }

        /// One order in its own (sub)transaction. A unique violation
        /// means a concurrent writer stored this id or key first and has
        /// committed by now, so one more pass finds its row.
        /// `held` as for `decide`.
        pub(super) async fn commit_one(
            conn: &mut $Conn,
            order: &NewOrder,
            params: CommitParams,
            held: bool,
        ) -> QueryResult<CommitOutcome> {
            let mut retried = false;
            loop {
                let result = conn
                    .transaction::<_, DieselError, _>(async |conn| {
                        decide(conn, order, params, held).await
                    })
                    .await;
                match result {
                    // Its sale appeared between two attempts and another
                    // transaction holds the user's lock: as a lost race.
                    Err(DieselError::RollbackTransaction) if !held => {
                        return Ok(CommitOutcome::Contention {
                            attempts: params.max_attempts,
                        });
                    }
                    Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _))
                        if !retried =>
                    {
                        retried = true;
                    }
                    other => return other,
                }
            }
        }

        /// The rows of `ids` (and of the carts with those ids) that
        /// record an order the processor gave up on: REJECTED, the reason
        /// starting with [`GIVEN_UP_REASON`].
        #[diesel::dsl::auto_type(no_type_alias)]
        fn given_up_rows<'a>(ids: &'a [&'a str]) -> _ {
            let pattern: String = format!("{GIVEN_UP_REASON}:%");
            let rejected: &'static str = ReservationState::Rejected.as_db();
            reservations::table
                .filter(
                    reservations::reservation_id
                        .eq_any(ids)
                        .nullable()
                        .or(reservations::cart_id.eq_any(ids)),
                )
                .filter(reservations::state.eq(rejected))
                .filter(reservations::reject_reason.like(pattern))
        }

        /// Deletes the rows of `ids` that record an order the processor
        /// gave up on, so that the commit after it, in the same
        /// transaction, decides those orders again (an operator's redrive
        /// from the dead-letter queue). Any other row stands.
        async fn reopen_given_up(conn: &mut $Conn, ids: &[&str]) -> QueryResult<()> {
            if ids.is_empty() {
                return Ok(());
            }
            diesel::delete(given_up_rows(ids))
                .execute(conn)
                .await
                .map(|_| ())
        }

        /// Marks the given-up rows of `ids` as purged by an operator: the
        /// reason no longer starts with [`GIVEN_UP_REASON`], so no
        /// redriven copy still on its way reopens them.
        pub(super) async fn close_given_up(
            conn: &mut $Conn,
            ids: &[&str],
            now: NaiveDateTime,
        ) -> QueryResult<usize> {
            if ids.is_empty() {
                return Ok(0);
            }
            diesel::update(given_up_rows(ids))
                .set((
                    reservations::reject_reason.eq(diesel::dsl::sql::<
                        diesel::sql_types::Nullable<diesel::sql_types::Text>,
                    >(&format!(
                        "'{PURGED_PREFIX}' || reject_reason"
                    ))),
                    reservations::updated_at.eq(now),
                ))
                .execute(conn)
                .await
        }

        pub(super) async fn commit_batch(
            conn: &mut $Conn,
            orders: &[NewOrder],
            params: CommitParams,
            reopen: &[&str],
        ) -> QueryResult<Vec<CommitOutcome>> {
            if orders.len() > 1
                && params.record_rejections
                && params.mode == DbCheckMode::Optimistic
            {
                let grouped = conn
                    .transaction::<_, DieselError, _>(async |conn| {
                        reopen_given_up(conn, reopen).await?;
                        decide_grouped(conn, orders, params)
                            .await?
                            .ok_or(DieselError::RollbackTransaction)
                    })
                    .await;
                match grouped {
                    Ok(outcomes) => return Ok(outcomes),
                    // A concurrent writer moved a version or stored a
                    // clashing row: decide order by order instead.
                    Err(DieselError::RollbackTransaction)
                    | Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _)) => {}
                    Err(other) => return Err(other),
                }
            }
            let mut tries = 0;
            loop {
                tries += 1;
                let result = conn
                    .transaction::<_, DieselError, _>(async |conn| {
                        reopen_given_up(conn, reopen).await?;
                        let mut skus: Vec<&str> = orders.iter().map(|o| o.sku.as_str()).collect();
                        skus.sort_unstable();
                        skus.dedup();
                        // Every (sale, user) lock before any row lock, as
                        // the grouped path takes them; each order takes its
                        // own again, which a holder always gets.
                        let caps = sale_caps(conn, &skus).await?;
                        let pairs: HashSet<(&str, &str)> =
                            capped_pairs(orders, &caps).into_iter().collect();
                        let listed: Vec<(&str, &str)> = pairs.iter().copied().collect();
                        lock_sale_pairs(conn, &listed).await?;
                        if params.mode != DbCheckMode::Off {
                            // The orders below lock their rows one by one
                            // in arrival order; taking them all first,
                            // sorted, keeps this from deadlocking with
                            // another multi-SKU writer. Off keeps the
                            // article's naive write, races and all.
                            own::lock_skus(conn, &skus).await?;
                            // Membership moves only under these row locks:
                            // a sale set since the read above means pairs
                            // not locked yet; take them from the start.
                            let now_caps = sale_caps(conn, &skus).await?;
                            if capped_pairs(orders, &now_caps)
                                .iter()
                                .any(|pair| !pairs.contains(pair))
                            {
                                return Err(DieselError::RollbackTransaction);
                            }
                        }
                        let mut outcomes = Vec::with_capacity(orders.len());
                        for order in orders {
                            // Nested: each order is a savepoint, so one
                            // conflict does not undo the batch.
                            outcomes.push(commit_one(conn, order, params, true).await?);
                        }
                        Ok(outcomes)
                    })
                    .await;
                match result {
                    Err(DieselError::RollbackTransaction) if tries < 5 => {}
                    other => return other,
                }
            }
        }

        /// Stores an order the processor gave up on (or whose publish
        /// was never confirmed) as REJECTED, so a late delivery of it
        /// finds the row and creates nothing. An existing row wins.
        /// `created_at` is `now`: the order's own may be what failed.
        pub(super) async fn record_failed(
            conn: &mut $Conn,
            order: &NewOrder,
            reason: &str,
            now: NaiveDateTime,
        ) -> QueryResult<Reservation> {
            if let Some(row) = find(conn, order.id.as_str()).await? {
                return Ok(row.into_domain());
            }
            let mut row = rejected_row(order, reason.to_owned(), now);
            row.created_at = now;
            match insert_row(conn, &row).await {
                Ok(()) => Ok(row.into_domain()),
                // The processor stored this id between our read and
                // our insert: its row wins and is the answer.
                Err(DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info)) => {
                    match find(conn, order.id.as_str()).await? {
                        Some(row) => Ok(row.into_domain()),
                        None => Err(DieselError::DatabaseError(
                            DatabaseErrorKind::UniqueViolation,
                            info,
                        )),
                    }
                }
                Err(err) => Err(err),
            }
        }

        pub(super) async fn position_of(conn: &mut $Conn, id: &str) -> QueryResult<Option<u64>> {
            match find(conn, id).await? {
                Some(row) if row.state == ReservationState::Waitlisted.as_db() => {
                    Ok(Some(waitlist_position(conn, &row).await?))
                }
                _ => Ok(None),
            }
        }

        pub(super) async fn get(conn: &mut $Conn, id: &str) -> QueryResult<Option<Reservation>> {
            match find(conn, id).await? {
                Some(row) => Ok(Some(as_seen(conn, row).await?)),
                None => Ok(None),
            }
        }
    };
}

impl Store {
    /// Commits one order in its own transaction (queue off).
    pub async fn commit_order(
        &self,
        order: &NewOrder,
        params: CommitParams,
    ) -> Result<CommitOutcome, StoreError> {
        dispatch!(self.commit_one(order, params, false))
    }

    /// Commits orders in one transaction, each behind its own savepoint and
    /// its own optimistic check, in the given order (the queue path).
    pub async fn commit_batch(
        &self,
        orders: &[NewOrder],
        params: CommitParams,
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        self.commit_batch_reopening(orders, params, &[]).await
    }

    /// As [`Self::commit_batch`], first deleting, in the same transaction,
    /// the given-up rows ([`super::GIVEN_UP_REASON`]) of `reopen`: those
    /// orders are decided again, and a failed commit leaves their rows.
    pub async fn commit_batch_reopening(
        &self,
        orders: &[NewOrder],
        params: CommitParams,
        reopen: &[ReservationId],
    ) -> Result<Vec<CommitOutcome>, StoreError> {
        let reopen: Vec<&str> = reopen.iter().map(ReservationId::as_str).collect();
        dispatch!(self.commit_batch(orders, params, &reopen))
    }

    /// Marks given-up reservations purged from the dead-letter queue, so
    /// that no redriven copy of them is decided again; returns how many.
    pub async fn close_given_up(&self, ids: &[ReservationId]) -> Result<usize, StoreError> {
        let ids: Vec<&str> = ids.iter().map(ReservationId::as_str).collect();
        dispatch!(self.close_given_up(&ids, crate::domain::now()))
    }

    /// See `record_failed` in the query module.
    pub async fn record_failed(
        &self,
        order: &NewOrder,
        reason: &str,
        now: NaiveDateTime,
    ) -> Result<Reservation, StoreError> {
        dispatch!(self.record_failed(order, reason, now))
    }

    pub async fn reservation(&self, id: &ReservationId) -> Result<Option<Reservation>, StoreError> {
        dispatch!(self.get(id.as_str()))
    }
}
