//! Per-calling-service shares of the replica's budgets (mutual TLS only):
//! while two or more calling services have called within
//! [`ACTIVE_WINDOW`], each may hold at most its share (a percentage, from
//! `server.tls.caller_share_percent` or its entry in
//! `server.tls.caller_shares`) of the in-flight slots and of the global
//! rate limit, so one service's flood cannot starve the others. A share is
//! a hard cap while another service calls, even a quiet one: the room left
//! is what lets that service in at once, since a slot or a token handed
//! out cannot be taken back. Size shares to the services' needs (90 and
//! 10, say) rather than leave everyone at the default. A service calling
//! alone may use the whole budget; a share of 100 or more is no cap.
//!
//! Identities come from verified client certificates, so the set is
//! bounded by the operators' CA; a service idle for [`FORGET_AFTER`] is
//! forgotten, and past [`MAX_CALLERS`] services known at once the rest
//! share one budget named [`OTHER_CALLERS`].

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, AtomicUsize, Ordering},
        Arc, RwLock,
    },
    time::{Duration, Instant},
};

use super::CallerIdentity;

/// A service counts as calling for this long after its last call.
pub const ACTIVE_WINDOW: Duration = Duration::from_secs(10);
/// Most calling services with budgets of their own at once.
pub const MAX_CALLERS: usize = 1024;
/// A service idle this long (and holding nothing) is forgotten.
pub const FORGET_AFTER: Duration = Duration::from_secs(60);
/// The budget shared by callers past [`MAX_CALLERS`].
pub const OTHER_CALLERS: &str = "(other callers)";
/// How stale the count of active callers may be.
const RECOUNT_EVERY: Duration = Duration::from_millis(200);

/// Each calling service's share, in percent of a budget.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallerShares {
    default_percent: u32,
    percents: HashMap<String, u32>,
}

impl CallerShares {
    pub fn new(default_percent: u32, percents: HashMap<String, u32>) -> Self {
        Self {
            default_percent,
            percents,
        }
    }

    /// From `server.tls`: `None` without mutual TLS (callers are not
    /// known, so they share one budget).
    pub fn from_config(tls: &crate::config::TlsConfig) -> Option<Arc<Self>> {
        let shares = Self::new(
            tls.caller_share_percent,
            tls.caller_shares.clone().into_iter().collect(),
        );
        (tls.mutual() && shares.any_cap()).then(|| Arc::new(shares))
    }

    pub fn percent(&self, caller: &str) -> u32 {
        self.percents
            .get(caller)
            .copied()
            .unwrap_or(self.default_percent)
    }

    /// Whether any share caps anyone.
    pub fn any_cap(&self) -> bool {
        self.default_percent < 100 || self.percents.values().any(|p| *p < 100)
    }

    /// `percent` of `total`, at least 1.
    pub fn of(percent: u32, total: u64) -> u64 {
        (total.saturating_mul(u64::from(percent)) / 100).max(1)
    }
}

/// One calling service's budget `T`.
#[derive(Debug)]
pub struct Share<T> {
    pub caller: Arc<str>,
    /// `None`: its share is 100 or more, no cap (it still counts as a
    /// calling service for the others).
    pub budget: Option<T>,
    last_seen_ms: AtomicU64,
}

/// Whether a budget may be forgotten (it holds nothing).
pub trait Forgettable {
    fn forgettable(&self) -> bool {
        true
    }
}

/// Budgets of type `T` per calling service, made on first sight.
#[derive(Debug)]
pub struct PerCaller<T> {
    shares: Arc<CallerShares>,
    entries: RwLock<HashMap<Arc<str>, Arc<Share<T>>>>,
    started: Instant,
    active: AtomicUsize,
    counted_at_ms: AtomicU64,
}

impl<T: Forgettable> PerCaller<T> {
    pub fn new(shares: Arc<CallerShares>) -> Self {
        Self {
            shares,
            entries: RwLock::new(HashMap::new()),
            started: Instant::now(),
            active: AtomicUsize::new(0),
            counted_at_ms: AtomicU64::new(0),
        }
    }

    /// The caller's budget (made by `make` from its share in percent), and
    /// whether its share applies now (another service is calling too).
    pub fn get(
        &self,
        caller: &CallerIdentity,
        make: impl FnOnce(u32) -> T,
    ) -> (Arc<Share<T>>, bool) {
        let now = self.started.elapsed().as_millis() as u64;
        let share = self.entry(&caller.0, make);
        share.last_seen_ms.store(now, Ordering::Relaxed);
        (share, self.active_callers(now) >= 2)
    }

    fn entry(&self, caller: &Arc<str>, make: impl FnOnce(u32) -> T) -> Arc<Share<T>> {
        if let Some(share) = self.read().get(caller) {
            return Arc::clone(share);
        }
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        let key: Arc<str> = if entries.len() < MAX_CALLERS || entries.contains_key(caller) {
            Arc::clone(caller)
        } else {
            OTHER_CALLERS.into()
        };
        let percent = self.shares.percent(&key);
        Arc::clone(entries.entry(Arc::clone(&key)).or_insert_with(|| {
            Arc::new(Share {
                caller: key,
                budget: (percent < 100).then(|| make(percent)),
                last_seen_ms: AtomicU64::new(0),
            })
        }))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<Arc<str>, Arc<Share<T>>>> {
        self.entries.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Services seen within [`ACTIVE_WINDOW`], recounted at most every
    /// [`RECOUNT_EVERY`] (one call does it; the others use the last count),
    /// forgetting those idle for [`FORGET_AFTER`] on the way.
    fn active_callers(&self, now_ms: u64) -> usize {
        let counted = self.counted_at_ms.load(Ordering::Relaxed);
        let due = now_ms.saturating_sub(counted) >= RECOUNT_EVERY.as_millis() as u64
            || self.active.load(Ordering::Relaxed) == 0;
        if due
            && self
                .counted_at_ms
                .compare_exchange(counted, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let idle_for = |share: &Share<T>| {
                now_ms.saturating_sub(share.last_seen_ms.load(Ordering::Relaxed))
            };
            let window = ACTIVE_WINDOW.as_millis() as u64;
            let forget_after = FORGET_AFTER.as_millis() as u64;
            let forgettable = |share: &Share<T>| {
                idle_for(share) > forget_after
                    && share.budget.as_ref().is_none_or(Forgettable::forgettable)
            };
            let (active, stale) = {
                let entries = self.read();
                let active = entries.values().filter(|s| idle_for(s) <= window).count();
                (active, entries.values().any(|s| forgettable(s)))
            };
            if stale {
                let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
                entries.retain(|_, share| !forgettable(share));
            }
            self.active.store(active, Ordering::Relaxed);
        }
        self.active.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(name: &str) -> CallerIdentity {
        CallerIdentity(name.into())
    }

    #[test]
    fn a_share_applies_only_while_another_service_calls() {
        let shares = Arc::new(CallerShares::new(
            50,
            [("spiffe://t/big".to_owned(), 80)].into_iter().collect(),
        ));
        let per = PerCaller::<u32>::new(shares);
        let (alone, applies) = per.get(&caller("spiffe://t/a"), |p| p);
        assert_eq!((alone.budget, applies), (Some(50), false));
        let (big, _) = per.get(&caller("spiffe://t/big"), |p| p);
        assert_eq!(big.budget, Some(80));
        // Two services now, once the count catches up.
        std::thread::sleep(RECOUNT_EVERY + Duration::from_millis(20));
        assert!(per.get(&caller("spiffe://t/a"), |p| p).1);
    }

    #[test]
    fn callers_past_the_bound_share_one_budget() {
        let per = PerCaller::<()>::new(Arc::new(CallerShares::new(50, HashMap::new())));
        for n in 0..MAX_CALLERS + 10 {
            per.get(&caller(&format!("spiffe://t/{n}")), |_| ());
        }
        let (late, _) = per.get(&caller("spiffe://t/late"), |_| ());
        assert_eq!(&*late.caller, OTHER_CALLERS);
        assert_eq!(per.read().len(), MAX_CALLERS + 1);
        // Callers known before the bound keep their own.
        let (early, _) = per.get(&caller("spiffe://t/3"), |_| ());
        assert_eq!(&*early.caller, "spiffe://t/3");
    }

    #[test]
    fn a_share_of_100_is_no_cap() {
        let shares = CallerShares::new(
            100,
            [("spiffe://t/small".to_owned(), 10)].into_iter().collect(),
        );
        assert!(shares.any_cap());
        let per = PerCaller::<u32>::new(Arc::new(shares));
        assert_eq!(per.get(&caller("spiffe://t/any"), |p| p).0.budget, None);
        assert_eq!(
            per.get(&caller("spiffe://t/small"), |p| p).0.budget,
            Some(10)
        );
        assert!(!CallerShares::new(100, HashMap::new()).any_cap());
    }

    impl Forgettable for u32 {}
    impl Forgettable for () {}
    impl Forgettable for bool {
        fn forgettable(&self) -> bool {
            !*self
        }
    }

    /// Idle services are forgotten, unless their budget still holds
    /// something (`true` here); active ones stay.
    #[test]
    fn idle_services_are_forgotten() {
        let per = PerCaller::<bool>::new(Arc::new(CallerShares::new(50, HashMap::new())));
        per.get(&caller("spiffe://t/idle"), |_| false);
        per.get(&caller("spiffe://t/holding"), |_| true);
        let later = (FORGET_AFTER + Duration::from_secs(1)).as_millis() as u64;
        per.entry(&"spiffe://t/active".into(), |_| false)
            .last_seen_ms
            .store(later, Ordering::Relaxed);
        assert_eq!(per.active_callers(later), 1);
        let mut left: Vec<_> = per.read().keys().map(|k| k.to_string()).collect();
        left.sort();
        assert_eq!(left, ["spiffe://t/active", "spiffe://t/holding"]);
    }

    #[test]
    fn a_share_is_at_least_one() {
        assert_eq!(CallerShares::of(50, 8), 4);
        assert_eq!(CallerShares::of(10, 3), 1);
        assert_eq!(CallerShares::of(100, 4096), 4096);
    }
}
