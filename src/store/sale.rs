//! Sales: SKUs grouped under one per-user cap across all of them. Every
//! path that gives a user units (the commits, the waitlist hand-off) checks
//! the cap of the SKU's sale next to the SKU's own limit.
//!
//! Two commits for one user in two SKUs of a sale do not meet on a row, so
//! the optimistic check cannot order them. PostgreSQL orders them with a
//! transaction-scoped advisory lock per (sale, user), taken before any
//! `inventory` row lock (see `dialect.rs`); the embedded SQLite store runs
//! one transaction at a time.

use std::collections::HashMap;

use super::{Store, StoreError};
use crate::domain::{SaleId, Sku};

/// A sale as stored: its cap and its SKUs (sorted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SaleView {
    pub sale_id: String,
    pub max_per_user: u32,
    pub skus: Vec<String>,
}

/// What [`Store::set_sale`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SaleWrite {
    /// The sale before (`None`: new) and after.
    Applied {
        before: Option<SaleView>,
        after: SaleView,
    },
    /// No such SKU; nothing changed.
    UnknownSku(String),
    /// The SKU belongs to another sale; nothing changed.
    InOtherSale { sku: String, sale_id: String },
}

/// The capped sale a SKU belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SaleCap {
    pub sale_id: String,
    pub cap: i32,
}

/// The start of a REJECTED reason for an order over its sale's cap.
pub const SALE_LIMIT_REASON: &str = "sale limit";

/// The REJECTED reason of an order over sale `sale_id`'s per-user `cap`,
/// with `live` units held across the sale.
pub(super) fn sale_limit_reason(live: i64, cap: impl std::fmt::Display, sale_id: &str) -> String {
    format!("{SALE_LIMIT_REASON}: {live} of {cap} units already held across sale {sale_id}")
}

/// The advisory lock key of one (sale, user): FNV-1a over both. Two pairs
/// sharing a key only wait for each other. PostgreSQL's lock is
/// `pg_advisory_xact_lock(SALE_LOCK_SPACE, key)`.
pub fn sale_user_key(sale: &str, user: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in sale.bytes().chain([0]).chain(user.bytes()) {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    hash as i32
}

/// Sale queries, written once; `dialect!` in `mod.rs` expands them into
/// each connection type's module.
macro_rules! sales_queries {
    ($Conn:ty) => {
        /// SKU → its sale, for those of `skus` in a sale with a cap.
        async fn sale_caps(
            conn: &mut $Conn,
            skus: &[&str],
        ) -> QueryResult<HashMap<String, SaleCap>> {
            if skus.is_empty() {
                return Ok(HashMap::new());
            }
            let rows: Vec<(String, String, i32)> = inventory::table
                .inner_join(sales::table)
                .filter(inventory::sku.eq_any(skus))
                .filter(sales::max_per_user.gt(0))
                .select((inventory::sku, sales::sale_id, sales::max_per_user))
                .load(conn)
                .await?;
            Ok(rows
                .into_iter()
                .map(|(sku, sale_id, cap)| (sku, SaleCap { sale_id, cap }))
                .collect())
        }

        /// SKU → its sale, for those of `rows` in a sale with a cap; no
        /// statement when none is in a sale.
        async fn row_caps<'a>(
            conn: &mut $Conn,
            rows: impl Iterator<Item = &'a InventoryRow>,
        ) -> QueryResult<HashMap<String, SaleCap>> {
            let members: Vec<(&str, &str)> = rows
                .filter_map(|row| Some((row.sku.as_str(), row.sale_id.as_deref()?)))
                .collect();
            if members.is_empty() {
                return Ok(HashMap::new());
            }
            let ids: Vec<&str> = members.iter().map(|m| m.1).collect();
            let caps: HashMap<String, i32> = sales::table
                .filter(sales::sale_id.eq_any(&ids))
                .filter(sales::max_per_user.gt(0))
                .select((sales::sale_id, sales::max_per_user))
                .load::<(String, i32)>(conn)
                .await?
                .into_iter()
                .collect();
            Ok(members
                .into_iter()
                .filter_map(|(sku, sale)| {
                    let cap = *caps.get(sale)?;
                    Some((
                        sku.to_owned(),
                        SaleCap {
                            sale_id: sale.to_owned(),
                            cap,
                        },
                    ))
                })
                .collect())
        }

        /// Live units (held or confirmed) per (sale, user) of `pairs`.
        async fn sale_live(
            conn: &mut $Conn,
            pairs: &[(&str, &str)],
        ) -> QueryResult<HashMap<(String, String), i64>> {
            if pairs.is_empty() {
                return Ok(HashMap::new());
            }
            let sales: HashSet<&str> = pairs.iter().map(|p| p.0).collect();
            let users: HashSet<&str> = pairs.iter().map(|p| p.1).collect();
            let sales: Vec<&str> = sales.into_iter().collect();
            let users: Vec<&str> = users.into_iter().collect();
            let sums: Vec<(Option<String>, String, Option<i64>)> = reservations::table
                .inner_join(inventory::table)
                .filter(inventory::sale_id.eq_any(&sales))
                .filter(reservations::user_id.eq_any(&users))
                .filter(reservations::state.eq_any(LIVE_STATES))
                .group_by((inventory::sale_id, reservations::user_id))
                .select((
                    inventory::sale_id,
                    reservations::user_id,
                    diesel::dsl::sum(reservations::quantity),
                ))
                .load(conn)
                .await?;
            Ok(sums
                .into_iter()
                .filter_map(|(sale, user, units)| Some(((sale?, user), units.unwrap_or(0))))
                .collect())
        }

        /// One user's live units across one sale's SKUs.
        async fn sale_live_of(conn: &mut $Conn, sale: &str, user: &str) -> QueryResult<i64> {
            Ok(sale_live(conn, &[(sale, user)])
                .await?
                .into_values()
                .next()
                .unwrap_or(0))
        }

        /// Waits for the locks of `pairs`, in key order, before the caller
        /// locks any `inventory` row.
        async fn lock_sale_pairs(conn: &mut $Conn, pairs: &[(&str, &str)]) -> QueryResult<()> {
            let mut keys: Vec<i32> = pairs
                .iter()
                .map(|(sale, user)| sale_user_key(sale, user))
                .collect();
            keys.sort_unstable();
            keys.dedup();
            own::lock_sale_users(conn, &keys).await
        }

        /// The (sale, user) pairs of `orders` whose SKU is in `caps`.
        fn capped_pairs<'a>(
            orders: &'a [NewOrder],
            caps: &'a HashMap<String, SaleCap>,
        ) -> Vec<(&'a str, &'a str)> {
            orders
                .iter()
                .filter_map(|o| {
                    caps.get(o.sku.as_str())
                        .map(|cap| (cap.sale_id.as_str(), o.user.as_str()))
                })
                .collect()
        }

        async fn sale_view(conn: &mut $Conn, sale_id: &str) -> QueryResult<Option<SaleView>> {
            let Some(cap) = sales::table
                .find(sale_id)
                .select(sales::max_per_user)
                .first::<i32>(conn)
                .await
                .optional()?
            else {
                return Ok(None);
            };
            let mut skus: Vec<String> = inventory::table
                .filter(inventory::sale_id.eq(sale_id))
                .select(inventory::sku)
                .load(conn)
                .await?;
            skus.sort_unstable();
            Ok(Some(SaleView {
                sale_id: sale_id.to_owned(),
                max_per_user: u32::try_from(cap).unwrap_or(0),
                skus,
            }))
        }

        /// Creates or changes a sale: its cap, and its SKUs (those listed
        /// join it, its others leave it).
        pub(super) async fn set_sale(
            conn: &mut $Conn,
            sale_id: &str,
            max_per_user: i32,
            skus: &[&str],
            now: NaiveDateTime,
        ) -> QueryResult<SaleWrite> {
            conn.transaction::<_, DieselError, _>(async |conn| {
                // One SetSale of a sale at a time, so the SKUs read below
                // are the ones to lock; an advisory lock, taken (as every
                // one is) before any row lock.
                own::lock_sale_users(conn, &[sale_user_key(sale_id, "")]).await?;
                let before = sale_view(conn, sale_id).await?;
                let mut touched: Vec<&str> = skus.to_vec();
                if let Some(before) = &before {
                    touched.extend(before.skus.iter().map(String::as_str));
                }
                touched.sort_unstable();
                touched.dedup();
                // Sorted, as every multi-row writer locks them.
                own::lock_skus(conn, &touched).await?;
                let rows: Vec<(String, Option<String>)> = inventory::table
                    .filter(inventory::sku.eq_any(skus))
                    .select((inventory::sku, inventory::sale_id))
                    .load(conn)
                    .await?;
                let found: HashMap<String, Option<String>> = rows.into_iter().collect();
                for sku in skus {
                    match found.get(*sku) {
                        None => return Ok(SaleWrite::UnknownSku((*sku).to_owned())),
                        Some(Some(other)) if other != sale_id => {
                            return Ok(SaleWrite::InOtherSale {
                                sku: (*sku).to_owned(),
                                sale_id: other.clone(),
                            })
                        }
                        Some(_) => {}
                    }
                }
                diesel::insert_into(sales::table)
                    .values((
                        sales::sale_id.eq(sale_id),
                        sales::max_per_user.eq(max_per_user),
                        sales::created_at.eq(now),
                        sales::updated_at.eq(now),
                    ))
                    .on_conflict(sales::sale_id)
                    .do_update()
                    .set((
                        sales::max_per_user.eq(max_per_user),
                        sales::updated_at.eq(now),
                    ))
                    .execute(conn)
                    .await?;
                // A SKU whose membership changes gets a new row version:
                // a commit that read the row before (the grouped one, the
                // optimistic one) and decided without this sale's cap then
                // fails its version check and decides again.
                diesel::update(
                    inventory::table
                        .filter(inventory::sale_id.eq(sale_id))
                        .filter(inventory::sku.ne_all(skus)),
                )
                .set((
                    inventory::sale_id.eq(None::<String>),
                    inventory::version.eq(inventory::version + 1),
                ))
                .execute(conn)
                .await?;
                diesel::update(
                    inventory::table
                        .filter(inventory::sku.eq_any(skus))
                        .filter(inventory::sale_id.is_null()),
                )
                .set((
                    inventory::sale_id.eq(sale_id),
                    inventory::version.eq(inventory::version + 1),
                ))
                .execute(conn)
                .await?;
                let after = sale_view(conn, sale_id).await?.expect("upserted above");
                Ok(SaleWrite::Applied { before, after })
            })
            .await
        }

        /// Every sale with a cap: its id and cap.
        pub(super) async fn capped_sales(conn: &mut $Conn) -> QueryResult<Vec<(String, i32)>> {
            sales::table
                .filter(sales::max_per_user.gt(0))
                .select((sales::sale_id, sales::max_per_user))
                .load(conn)
                .await
        }

        pub(super) async fn get_sale(
            conn: &mut $Conn,
            sale_id: &str,
        ) -> QueryResult<Option<SaleView>> {
            sale_view(conn, sale_id).await
        }
    };
}

impl Store {
    /// Creates or changes a sale (see `set_sale` in the query module).
    /// Holds already over a lowered cap stand; later orders are refused.
    pub async fn set_sale(
        &self,
        sale: &SaleId,
        max_per_user: u32,
        skus: &[Sku],
    ) -> Result<SaleWrite, StoreError> {
        let skus: Vec<&str> = skus.iter().map(Sku::as_str).collect();
        let cap = i32::try_from(max_per_user).unwrap_or(i32::MAX);
        dispatch!(self.set_sale(sale.as_str(), cap, &skus, crate::domain::now()))
    }

    /// Sale id → per-user cap, for every sale with a cap.
    pub async fn sale_caps(&self) -> Result<HashMap<String, u32>, StoreError> {
        let rows: Vec<(String, i32)> = dispatch!(self.capped_sales())?;
        Ok(rows
            .into_iter()
            .map(|(sale, cap)| (sale, u32::try_from(cap).unwrap_or(0)))
            .collect())
    }

    pub async fn sale(&self, sale: &SaleId) -> Result<Option<SaleView>, StoreError> {
        dispatch!(self.get_sale(sale.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_separate_sale_from_user() {
        assert_ne!(sale_user_key("ab", "c"), sale_user_key("a", "bc"));
        assert_eq!(sale_user_key("s", "u"), sale_user_key("s", "u"));
    }
}
