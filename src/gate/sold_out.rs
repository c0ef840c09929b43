//! The sold-out fast path: what the gate last said about a SKU it refused,
//! believed for `layers.gate.sold_out_cache_ms`, so that most of a storm is
//! answered from memory without a round trip. It may only ever say "no": a
//! restock notice ([`super::RESTOCK_ALL`] for every SKU) forgets it at once,
//! and it never admits anyone.

use std::{collections::HashMap, sync::Mutex, time::Duration};

use tokio::time::Instant;

use super::RESTOCK_ALL;
use crate::domain::Sku;

/// SKU → (units the gate last said were left, until when to believe it).
/// Only SKUs the gate refused get an entry, so its size is bounded by the
/// catalogue, not by what callers send.
#[derive(Debug)]
pub struct SoldOutCache {
    ttl: Option<Duration>,
    entries: Mutex<HashMap<Sku, (i64, Instant)>>,
}

impl SoldOutCache {
    /// `None`: the fast path is off and nothing is remembered.
    pub fn new(ttl: Option<Duration>) -> Self {
        Self {
            ttl,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Sku, (i64, Instant)>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The units left, when the gate said recently that fewer than
    /// `quantity` are left.
    pub fn known(&self, sku: &Sku, quantity: u32) -> Option<i64> {
        match self.entries().get(sku) {
            Some(&(left, until)) if Instant::now() < until && left < i64::from(quantity) => {
                Some(left)
            }
            _ => None,
        }
    }

    /// The gate refused `sku` with `left` units left.
    pub fn remember(&self, sku: &Sku, left: i64) {
        if let Some(ttl) = self.ttl {
            self.entries()
                .insert(sku.clone(), (left, Instant::now() + ttl));
        }
    }

    /// `sku` was restocked ([`RESTOCK_ALL`]: every SKU).
    pub fn forget(&self, sku: &str) {
        let mut entries = self.entries();
        if sku == RESTOCK_ALL {
            entries.clear();
        } else {
            entries.remove(&Sku::from_trusted(sku.to_owned()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_no_only_while_fresh_and_until_restocked() {
        let cache = SoldOutCache::new(Some(Duration::from_secs(60)));
        let (a, b) = (Sku::parse("A").unwrap(), Sku::parse("B").unwrap());
        cache.remember(&a, 1);
        cache.remember(&b, 0);
        assert_eq!(cache.known(&a, 2), Some(1));
        assert_eq!(cache.known(&a, 1), None, "one unit left covers one");
        cache.forget("A");
        assert_eq!(cache.known(&a, 2), None);
        assert_eq!(cache.known(&b, 1), Some(0));
        cache.forget(RESTOCK_ALL);
        assert_eq!(cache.known(&b, 1), None);
        let off = SoldOutCache::new(None);
        off.remember(&a, 0);
        assert_eq!(off.known(&a, 1), None);
        // Sleeping only guarantees that at least this much time passed,
        // which is all staleness needs.
        let brief = SoldOutCache::new(Some(Duration::from_millis(20)));
        brief.remember(&a, 0);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(brief.known(&a, 1), None, "stale");
    }
}
