//! The statements PostgreSQL and SQLite write differently: row locks,
//! multi-row inserts, and taking stock from many SKUs at once. Each
//! dialect's query module (`dialect!` in `mod.rs`) calls its own as `own`.
//!
//! Every transaction that locks more than one `inventory` row locks them in
//! SKU order, so two of them wait for each other instead of deadlocking:
//! the group commit (`take_stock`), the per-order fallback (`lock_skus`
//! first) and the expiry sweeper (units returned SKU by SKU, sorted). SKU
//! order is byte order everywhere: Rust's `str` order, and `COLLATE "C"`
//! in SQL, whatever collation the database was created with.
//!
//! A transaction that checks a sale's per-user cap takes the lock of each
//! (sale, user) it checks, sorted, before any `inventory` row lock; the
//! waitlist hand-off, which already holds its SKU's row, only tries (see
//! `sale.rs`).
//!
//! The row locks are `FOR NO KEY UPDATE`, the lock an UPDATE of non-key
//! columns takes anyway: it leaves `FOR KEY SHARE` free, which inserting a
//! reservation takes on its SKU's row (the foreign key). A batch inserting a
//! REJECTED row for a SKU it took nothing from then never waits on a row
//! another batch has locked.

/// Units a batch takes from one SKU row, valid only at the version the
/// batch decided from.
pub(super) struct Take<'a> {
    pub sku: &'a str,
    pub version: i64,
    pub units: i64,
}

/// The first key of every (sale, user) advisory lock: "SALE".
pub const SALE_LOCK_SPACE: i32 = 0x5341_4c45;

pub(super) mod pg {
    use super::super::*;
    use super::{Take, SALE_LOCK_SPACE};
    use diesel::sql_types::{Array, BigInt, Text, Timestamp};

    /// Takes each row's units where its version is still the one read and
    /// its stock covers them. A row reaches the update only through the
    /// semi-join on `locked`, whose rows are locked one by one in the
    /// sorted order it produces them (`ORDER BY` below the lock), so
    /// whatever plan the update gets, it never holds a row while waiting
    /// for one sorted before it.
    const TAKE_STOCK: &str = "\
        WITH locked AS MATERIALIZED ( \
            SELECT sku FROM inventory WHERE sku = ANY($1) \
            ORDER BY sku COLLATE \"C\" FOR NO KEY UPDATE) \
        UPDATE inventory AS i \
        SET stock = i.stock - t.units, version = i.version + 1, updated_at = $4 \
        FROM unnest($1::varchar[], $2::int8[], $3::int8[]) AS t(sku, version, units) \
        WHERE i.sku = t.sku AND i.sku IN (SELECT sku FROM locked) \
          AND i.version = t.version AND i.stock >= t.units";

    pub(in crate::store) fn lock_inventory<'a>(
        conn: &'a mut AsyncPgConnection,
        sku: &'a str,
    ) -> impl std::future::Future<Output = QueryResult<Option<InventoryRow>>> + Send + 'a {
        inventory::table
            .find(sku)
            .select(InventoryRow::as_select())
            .for_no_key_update()
            .first(conn)
            .map(|r| r.optional())
    }

    /// Transaction-scoped advisory locks in their own key space (two
    /// 32-bit keys; the processor leases use one 64-bit key, a space that
    /// never overlaps), taken in the order given.
    const LOCK_SALE_USERS: &str = "\
        SELECT count(pg_advisory_xact_lock($1, k)) AS value \
        FROM (SELECT k FROM unnest($2::int4[]) WITH ORDINALITY AS t(k, o) ORDER BY o) AS s";

    #[derive(QueryableByName)]
    struct Granted {
        #[diesel(sql_type = diesel::sql_types::Bool)]
        value: bool,
    }

    /// Waits for each of `keys` (sorted by the caller) in turn.
    pub(in crate::store) async fn lock_sale_users(
        conn: &mut AsyncPgConnection,
        keys: &[i32],
    ) -> QueryResult<()> {
        if keys.is_empty() {
            return Ok(());
        }
        diesel::sql_query(LOCK_SALE_USERS)
            .bind::<diesel::sql_types::Integer, _>(SALE_LOCK_SPACE)
            .bind::<Array<diesel::sql_types::Integer>, _>(keys)
            .execute(conn)
            .await
            .map(|_| ())
    }

    /// Takes `key` if no other transaction holds it; never waits.
    pub(in crate::store) async fn try_lock_sale_user(
        conn: &mut AsyncPgConnection,
        key: i32,
    ) -> QueryResult<bool> {
        diesel::sql_query("SELECT pg_try_advisory_xact_lock($1, $2) AS value")
            .bind::<diesel::sql_types::Integer, _>(SALE_LOCK_SPACE)
            .bind::<diesel::sql_types::Integer, _>(key)
            .get_result::<Granted>(conn)
            .await
            .map(|g| g.value)
    }

    /// Locks these SKUs' rows in SKU order.
    pub(in crate::store) async fn lock_skus(
        conn: &mut AsyncPgConnection,
        skus: &[&str],
    ) -> QueryResult<()> {
        inventory::table
            .filter(inventory::sku.eq_any(skus))
            .order(diesel::dsl::sql::<Text>("sku COLLATE \"C\""))
            .select(inventory::sku)
            .for_no_key_update()
            .load::<String>(conn)
            .await
            .map(|_| ())
    }

    /// All of `takes` in one statement; the rows it changed (fewer than
    /// `takes` when a version moved or stock fell short).
    pub(in crate::store) async fn take_stock(
        conn: &mut AsyncPgConnection,
        takes: &[Take<'_>],
        now: NaiveDateTime,
    ) -> QueryResult<usize> {
        let skus: Vec<String> = takes.iter().map(|t| t.sku.to_owned()).collect();
        let versions: Vec<i64> = takes.iter().map(|t| t.version).collect();
        let units: Vec<i64> = takes.iter().map(|t| t.units).collect();
        diesel::sql_query(TAKE_STOCK)
            .bind::<Array<Text>, _>(skus)
            .bind::<Array<BigInt>, _>(versions)
            .bind::<Array<BigInt>, _>(units)
            .bind::<Timestamp, _>(now)
            .execute(conn)
            .await
    }

    /// One multi-row INSERT per chunk (bounded so a huge batch stays under
    /// the protocol's parameter limit).
    pub(in crate::store) async fn insert_rows(
        conn: &mut AsyncPgConnection,
        rows: &[ReservationRow],
    ) -> QueryResult<()> {
        for chunk in rows.chunks(1_000) {
            diesel::insert_into(reservations::table)
                .values(chunk)
                .execute(conn)
                .await?;
        }
        Ok(())
    }
}

/// SQLite has no row locks; the embedded pool has a single connection, so
/// every transaction is already serialised, and an in-process database has
/// no round trips to save.
pub(super) mod sqlite {
    use super::super::*;
    use super::Take;

    pub(in crate::store) fn lock_inventory<'a>(
        conn: &'a mut SqliteConn,
        sku: &'a str,
    ) -> impl std::future::Future<Output = QueryResult<Option<InventoryRow>>> + Send + 'a {
        inventory::table
            .find(sku)
            .select(InventoryRow::as_select())
            .first(conn)
            .map(|r| r.optional())
    }

    pub(in crate::store) async fn lock_sale_users(
        _conn: &mut SqliteConn,
        _keys: &[i32],
    ) -> QueryResult<()> {
        Ok(())
    }

    pub(in crate::store) async fn try_lock_sale_user(
        _conn: &mut SqliteConn,
        _key: i32,
    ) -> QueryResult<bool> {
        Ok(true)
    }

    pub(in crate::store) async fn lock_skus(
        _conn: &mut SqliteConn,
        _skus: &[&str],
    ) -> QueryResult<()> {
        Ok(())
    }

    pub(in crate::store) async fn take_stock(
        conn: &mut SqliteConn,
        takes: &[Take<'_>],
        now: NaiveDateTime,
    ) -> QueryResult<usize> {
        let mut changed = 0;
        for take in takes {
            changed += diesel::update(
                inventory::table
                    .filter(inventory::sku.eq(take.sku))
                    .filter(inventory::version.eq(take.version))
                    .filter(inventory::stock.ge(take.units)),
            )
            .set((
                inventory::stock.eq(inventory::stock - take.units),
                inventory::version.eq(inventory::version + 1),
                inventory::updated_at.eq(now),
            ))
            .execute(conn)
            .await?;
        }
        Ok(changed)
    }

    /// Row by row: diesel cannot batch rows with optional columns on SQLite.
    pub(in crate::store) async fn insert_rows(
        conn: &mut SqliteConn,
        rows: &[ReservationRow],
    ) -> QueryResult<()> {
        for row in rows {
            diesel::insert_into(reservations::table)
                .values(row)
                .execute(conn)
                .await?;
        }
        Ok(())
    }
}
