//! Rate limiting with governor: one GCRA cell budget per user (keyed by the
//! `x-user-id` metadata), with mutual TLS one per calling service (its
//! share of the global budget while another service calls, see
//! [`super::callers`]), and one for the whole replica. A refused call gets
//! RESOURCE_EXHAUSTED with `retry-after`; in shadow mode it is let through
//! and counted. Only the InventoryService methods named in
//! `layers.rate_limit.methods` (Reserve and ReserveCart by default) are counted:
//! operators, health checks, reflection and the rest of a buyer's calls
//! never are.
//!
//! Per-user state is kept only for a user id the handlers would accept (at
//! most `UserId::MAX_LEN` bytes, checked before the budget is looked up),
//! and for at most `layers.rate_limit.max_tracked_users` users. Past that
//! bound the users whose budget is full again are forgotten at once (as
//! the sweeper does); if the map is still over the bound, every per-user
//! budget starts over (the global budget stays). A flood of unique ids thus
//! costs at most the bound's memory, and all it can win is a fresh budget
//! for everyone, which the global budget still caps.
//!
//! With `backends.rate_limit` set, the per-user and global budgets hold
//! across the fleet ([`fleet`]): a call this replica's own budgets admit is
//! then spent from the shared ones too, and refused if they are spent.
//! When the shared budgets cannot be reached the replica's own decide
//! (the limit protects capacity, it is not what keeps stock correct), and
//! the call is counted as `fleet_unavailable`.

mod fleet;

pub use fleet::{FleetLimits, FleetOver, RedisFleetLimits};

use std::{
    num::NonZeroU32,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use governor::{
    clock::Clock,
    middleware::NoOpMiddleware,
    state::{keyed::DashMapStateStore, InMemoryState, NotKeyed},
    Quota, RateLimiter,
};
use tower::{Layer, Service};

use arc_swap::ArcSwap;

use super::{
    callers::{CallerShares, Forgettable, PerCaller},
    CallerIdentity,
};
use crate::{
    config::RateLimitConfig,
    domain::switches::{RateSettings, Switches},
    error::ReservationError,
};

/// A budget that had no room for a call, before shadow mode applies.
struct Over {
    scope: &'static str,
    retry_after: Duration,
    /// The calling service, when its share was the budget spent.
    caller: Option<Arc<str>>,
}

/// A limiter's decision for one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Admit,
    /// Over the `scope` ("user", "caller" or "global") limit.
    Refuse {
        scope: &'static str,
        retry_after: Duration,
    },
}

/// What the limiter has decided since start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateLimitStats {
    pub admitted: u64,
    pub refused: u64,
    /// Would have been refused, let through by shadow mode.
    pub shadow_refused: u64,
    /// Users currently tracked (bounded by the sweeper and
    /// `max_tracked_users`).
    pub tracked_users: u64,
    /// Times the per-user budgets started over because the map was full.
    pub restarts: u64,
}

type Keyed<C> =
    RateLimiter<String, DashMapStateStore<String>, C, NoOpMiddleware<<C as Clock>::Instant>>;
type Direct<C> = RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<<C as Clock>::Instant>>;

impl<C: Clock> Forgettable for Direct<C> {}

/// The budgets in force; replaced whole when operators change the rates.
struct Budgets<C: Clock> {
    per_user: Keyed<C>,
    /// Each calling service's share of the global budget (mutual TLS).
    per_caller: Option<Arc<PerCaller<Direct<C>>>>,
    global: Arc<Direct<C>>,
    settings: RateSettings,
}

/// The limits of one replica, on clock `C` (a fake clock in tests).
pub struct RateLimits<C: Clock = governor::clock::DefaultClock> {
    budgets: ArcSwap<Budgets<C>>,
    clock: C,
    shares: Option<Arc<CallerShares>>,
    shadow: AtomicBool,
    admitted: AtomicU64,
    refused: AtomicU64,
    shadow_refused: AtomicU64,
    max_tracked: usize,
    /// Calls since the map's size was last compared with `max_tracked`.
    since_size_check: AtomicU64,
    restarts: AtomicU64,
}

/// The map's size is compared with its bound once per this many calls
/// (counting a sharded map's entries takes every shard's lock), so it may
/// run over by at most this many users.
const SIZE_CHECK_EVERY: u64 = 256;

fn nonzero(n: u32) -> NonZeroU32 {
    NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)
}

impl<C: Clock + Clone> RateLimits<C> {
    /// `shares`: each calling service's share of the global budget
    /// (mutual TLS), or `None`.
    pub fn new(config: &RateLimitConfig, shares: Option<Arc<CallerShares>>, clock: C) -> Self {
        let settings = RateSettings::from_config(config);
        Self {
            budgets: ArcSwap::from_pointee(Self::budgets(settings, shares.as_ref(), &clock)),
            clock,
            shares,
            shadow: AtomicBool::new(config.shadow),
            admitted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            shadow_refused: AtomicU64::new(0),
            max_tracked: config.max_tracked_users.max(1),
            since_size_check: AtomicU64::new(0),
            restarts: AtomicU64::new(0),
        }
    }

    fn budgets(
        settings: RateSettings,
        shares: Option<&Arc<CallerShares>>,
        clock: &C,
    ) -> Budgets<C> {
        let global = Quota::per_second(nonzero(settings.global_per_sec))
            .allow_burst(nonzero(settings.global_burst));
        Budgets {
            per_user: Self::per_user(settings, clock),
            per_caller: shares.map(|shares| Arc::new(PerCaller::new(Arc::clone(shares)))),
            global: Arc::new(RateLimiter::direct_with_clock(global, clock.clone())),
            settings,
        }
    }

    /// `caller`'s share of the global budget, made on first sight.
    fn caller_budget(settings: RateSettings, clock: &C) -> impl FnOnce(u32) -> Direct<C> + '_ {
        move |percent| {
            let share = |total: u32| {
                let part = CallerShares::of(percent, u64::from(total));
                nonzero(u32::try_from(part).unwrap_or(u32::MAX))
            };
            let quota = Quota::per_second(share(settings.global_per_sec))
                .allow_burst(share(settings.global_burst));
            RateLimiter::direct_with_clock(quota, clock.clone())
        }
    }

    fn per_user(settings: RateSettings, clock: &C) -> Keyed<C> {
        let quota = Quota::with_period(Duration::from_millis(settings.per_user_period_ms.max(1)))
            .expect("a non-zero period")
            .allow_burst(nonzero(settings.per_user_burst));
        RateLimiter::dashmap_with_clock(quota, clock.clone())
    }

    /// Puts new rates and shadow mode in force. New rates start every user
    /// with a full budget (the old cells are dropped).
    pub fn configure(&self, settings: RateSettings, shadow: bool) {
        self.shadow.store(shadow, Ordering::Relaxed);
        if self.budgets.load().settings != settings {
            self.budgets.store(Arc::new(Self::budgets(
                settings,
                self.shares.as_ref(),
                &self.clock,
            )));
        }
    }

    /// Decides one call by `user` (an id `UserId::parse` accepted) from
    /// calling service `caller` (mutual TLS): the user's own budget first
    /// (so one hammering user cannot spend the global budget), then the
    /// calling service's share of the global one (so one service cannot),
    /// then the global one.
    pub fn check(&self, user: &str, caller: Option<&CallerIdentity>) -> Verdict {
        let over = self.local(user, caller);
        self.settle(over)
    }

    /// The rates in force, for the fleet's budgets.
    pub fn rates(&self) -> RateSettings {
        self.budgets.load().settings
    }

    /// This replica's budgets' decision, not yet counted: `None` when
    /// every budget had room.
    fn local(&self, user: &str, caller: Option<&CallerIdentity>) -> Option<Over> {
        self.keep_bound();
        let budgets = self.budgets.load();
        // The wait is measured from after the decision, so it never comes
        // out longer than the period itself.
        let wait =
            |not_until: governor::NotUntil<C::Instant>| not_until.wait_time_from(self.clock.now());
        let over = |scope, not_until, caller| Over {
            scope,
            retry_after: wait(not_until),
            caller,
        };
        if let Err(not_until) = budgets.per_user.check_key(&user.to_owned()) {
            Some(over("user", not_until, None))
        } else if let Some((not_until, caller)) = self.over_share(&budgets, caller) {
            Some(over("caller", not_until, Some(caller)))
        } else if let Err(not_until) = budgets.global.check() {
            Some(over("global", not_until, None))
        } else {
            None
        }
    }

    /// Counts a decision (`None`: every budget had room) and gives the
    /// verdict, shadow mode applied.
    fn settle(&self, over: Option<Over>) -> Verdict {
        match over {
            None => {
                self.admitted.fetch_add(1, Ordering::Relaxed);
                crate::metrics::decision("rate_limit", "admitted");
                Verdict::Admit
            }
            Some(_) if self.shadow.load(Ordering::Relaxed) => {
                self.shadow_refused.fetch_add(1, Ordering::Relaxed);
                crate::metrics::decision("rate_limit", "shadow_refused");
                Verdict::Admit
            }
            Some(Over {
                scope,
                retry_after,
                caller,
            }) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                crate::metrics::decision("rate_limit", "refused");
                if let Some(caller) = caller {
                    crate::metrics::caller_refused("rate_limit", &caller);
                }
                Verdict::Refuse { scope, retry_after }
            }
        }
    }

    /// Decides a call this replica's budgets admitted, from the fleet's
    /// answer; the replica's decision stands when the fleet's budgets
    /// could not be reached.
    async fn check_fleet(&self, fleet: &dyn FleetLimits, user: &str) -> Verdict {
        let over = match fleet.spend(user, self.rates()).await {
            Ok(over) => over.map(|FleetOver { scope, retry_after }| Over {
                scope,
                retry_after,
                caller: None,
            }),
            Err(error) => {
                crate::metrics::decision("rate_limit", "fleet_unavailable");
                tracing::debug!(%error, "fleet rate limits unreachable; this replica's decide");
                None
            }
        };
        self.settle(over)
    }

    /// `Some` (with the service's name) when `caller`'s share applies
    /// (another service is calling too) and is spent.
    fn over_share(
        &self,
        budgets: &Budgets<C>,
        caller: Option<&CallerIdentity>,
    ) -> Option<(governor::NotUntil<C::Instant>, Arc<str>)> {
        let (per_caller, caller) = (budgets.per_caller.as_ref()?, caller?);
        let (share, applies) =
            per_caller.get(caller, Self::caller_budget(budgets.settings, &self.clock));
        // Spent even while the share does not apply, so a service that had
        // the budget to itself does not start with a full burst on top. It
        // is checked before the global budget, so calls the global budget
        // then refuses spend it too: it caps what a service asks for, not
        // only what it gets.
        match share.budget.as_ref()?.check() {
            Err(not_until) if applies => Some((not_until, Arc::clone(&share.caller))),
            _ => None,
        }
    }

    /// Holds the per-user map to `max_tracked` users (see the module docs).
    fn keep_bound(&self) {
        if self.since_size_check.fetch_add(1, Ordering::Relaxed) % SIZE_CHECK_EVERY != 0 {
            return;
        }
        let budgets = self.budgets.load();
        if budgets.per_user.len() < self.max_tracked {
            return;
        }
        self.sweep();
        if budgets.per_user.len() < self.max_tracked {
            return;
        }
        self.restarts.fetch_add(1, Ordering::Relaxed);
        crate::metrics::decision("rate_limit", "budgets_restarted");
        tracing::warn!(
            max_tracked_users = self.max_tracked,
            "rate limit: more users than max_tracked_users within a budget period; per-user budgets start over"
        );
        // Only over the budgets looked at: rates an operator put in force
        // meanwhile (with fresh budgets of their own) must not be undone.
        let fresh = Arc::new(Budgets {
            per_user: Self::per_user(budgets.settings, &self.clock),
            per_caller: budgets.per_caller.clone(),
            global: Arc::clone(&budgets.global),
            settings: budgets.settings,
        });
        self.budgets.compare_and_swap(&budgets, fresh);
    }

    /// Forgets users whose budget is full again.
    pub fn sweep(&self) {
        let budgets = self.budgets.load();
        budgets.per_user.retain_recent();
        budgets.per_user.shrink_to_fit();
    }

    pub fn stats(&self) -> RateLimitStats {
        RateLimitStats {
            admitted: self.admitted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            shadow_refused: self.shadow_refused.load(Ordering::Relaxed),
            tracked_users: self.budgets.load().per_user.len() as u64,
            restarts: self.restarts.load(Ordering::Relaxed),
        }
    }
}

/// The tower layer; stays in the stack and reads its switch per call.
#[derive(Clone)]
pub struct RateLimitLayer {
    limits: Arc<RateLimits>,
    switches: Switches,
    /// The request paths the limits count.
    paths: Arc<[String]>,
    /// The fleet's budgets (`backends.rate_limit`), if shared.
    fleet: Option<Arc<dyn FleetLimits>>,
}

impl RateLimitLayer {
    /// Counts calls of `methods` (InventoryService method names) against
    /// `limits`, and then against `fleet` when the fleet shares budgets.
    pub fn new(
        limits: Arc<RateLimits>,
        fleet: Option<Arc<dyn FleetLimits>>,
        switches: Switches,
        methods: &[String],
    ) -> Self {
        let paths = methods
            .iter()
            .map(|method| format!("{}{method}", super::CALLER_PREFIX))
            .collect();
        Self {
            limits,
            switches,
            paths,
            fleet,
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RateLimit {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    layer: RateLimitLayer,
}

/// What the layer does with a call, before any round trip.
enum Step {
    Pass,
    Refuse(ReservationError),
    /// Admitted here; the fleet's budgets decide (for this user).
    AskFleet(Arc<dyn FleetLimits>, crate::domain::UserId),
}

fn refusal(verdict: Verdict) -> Option<ReservationError> {
    match verdict {
        Verdict::Admit => None,
        Verdict::Refuse { scope, retry_after } => {
            Some(ReservationError::RateLimited { scope, retry_after })
        }
    }
}

impl<S> RateLimit<S> {
    fn step<B>(&self, request: &http::Request<B>) -> Step {
        let layer = &self.layer;
        if !layer.switches.load().rate_limit {
            return Step::Pass;
        }
        let path = request.uri().path();
        if !layer.paths.iter().any(|counted| counted == path) {
            return Step::Pass;
        }
        // The handler's own check, so no state is kept for an id it would
        // refuse, and the refusal is the one the handler gives.
        let user = match crate::grpc::user_id_header(request.headers()) {
            Ok(user) => user,
            Err(refusal) => {
                crate::metrics::decision("rate_limit", "invalid_user");
                return Step::Refuse(refusal);
            }
        };
        let limits = &layer.limits;
        let over = limits.local(user.as_str(), request.extensions().get::<CallerIdentity>());
        match (&layer.fleet, over) {
            // Over here is over for the fleet too; in shadow mode it is
            // counted here and not asked again.
            (Some(fleet), None) => Step::AskFleet(Arc::clone(fleet), user),
            (_, over) => match refusal(limits.settle(over)) {
                Some(refused) => Step::Refuse(refused),
                None => Step::Pass,
            },
        }
    }
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for RateLimit<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    ReqBody: http_body::Body + Send + 'static,
    ReqBody::Data: Send,
    ReqBody::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let step = self.step(&request);
        if let Step::Refuse(refused) = step {
            let status = tonic::Status::from(refused);
            return Box::pin(async move { Ok(super::refuse_after_reading(request, status).await) });
        }
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        match step {
            Step::AskFleet(fleet, user) => {
                let limits = Arc::clone(&self.layer.limits);
                Box::pin(async move {
                    let verdict = limits.check_fleet(fleet.as_ref(), user.as_str()).await;
                    match refusal(verdict) {
                        Some(refused) => {
                            let status = tonic::Status::from(refused);
                            Ok(super::refuse_after_reading(request, status).await)
                        }
                        None => inner.call(request).await,
                    }
                })
            }
            _ => Box::pin(inner.call(request)),
        }
    }
}

#[cfg(test)]
mod tests {
    use governor::clock::FakeRelativeClock;

    use super::*;

    fn limits(shadow: bool) -> (RateLimits<FakeRelativeClock>, FakeRelativeClock) {
        let clock = FakeRelativeClock::default();
        let config = RateLimitConfig {
            enabled: true,
            shadow,
            per_user_period_ms: 1_000,
            per_user_burst: 1,
            global_per_sec: 1_000_000,
            global_burst: 1_000_000,
            sweep_interval_ms: 1_000,
            methods: vec!["Reserve".into()],
            max_tracked_users: 100_000,
        };
        (RateLimits::new(&config, None, clock.clone()), clock)
    }

    /// 10,000 users send 5 calls each within one second against 1/s with
    /// burst 1: each gets exactly one through, the rest a retry hint; a
    /// second later each gets one more.
    #[test]
    fn one_call_per_user_per_second() {
        let (limits, clock) = limits(false);
        let mut admitted = vec![0; 10_000];
        for round in 0..5 {
            for (user, count) in admitted.iter_mut().enumerate() {
                match limits.check(&format!("u{user}"), None) {
                    Verdict::Admit => *count += 1,
                    Verdict::Refuse { scope, retry_after } => {
                        assert_eq!(scope, "user");
                        assert!(
                            retry_after > Duration::ZERO && retry_after <= Duration::from_secs(1)
                        );
                    }
                }
            }
            clock.advance(Duration::from_millis(100 + round));
        }
        assert!(admitted.iter().all(|&n| n == 1));
        clock.advance(Duration::from_secs(1));
        assert!((0..10_000).all(|u| limits.check(&format!("u{u}"), None) == Verdict::Admit));
        let stats = limits.stats();
        assert_eq!((stats.admitted, stats.refused), (20_000, 40_000));
    }

    #[test]
    fn shadow_mode_admits_and_counts() {
        let (limits, _clock) = limits(true);
        for _ in 0..5 {
            for user in 0..100 {
                assert_eq!(limits.check(&format!("u{user}"), None), Verdict::Admit);
            }
        }
        let stats = limits.stats();
        assert_eq!(
            (stats.admitted, stats.refused, stats.shadow_refused),
            (100, 0, 400)
        );
    }

    #[test]
    fn the_global_budget_caps_everyone() {
        let clock = FakeRelativeClock::default();
        let config = RateLimitConfig {
            enabled: true,
            global_per_sec: 10,
            global_burst: 10,
            ..RateLimitConfig::default()
        };
        let limits = RateLimits::new(&config, None, clock);
        let verdicts: Vec<_> = (0..20)
            .map(|u| limits.check(&format!("u{u}"), None))
            .collect();
        assert_eq!(
            verdicts.iter().filter(|v| **v == Verdict::Admit).count(),
            10
        );
        assert!(matches!(
            verdicts[15],
            Verdict::Refuse {
                scope: "global",
                ..
            }
        ));
    }

    #[test]
    fn sweeping_forgets_idle_users() {
        let (limits, clock) = limits(false);
        for user in 0..1_000 {
            limits.check(&format!("u{user}"), None);
        }
        assert_eq!(limits.stats().tracked_users, 1_000);
        clock.advance(Duration::from_secs(2));
        limits.sweep();
        assert_eq!(limits.stats().tracked_users, 0);
    }

    /// More unique users within one period than the bound: the map never
    /// holds more than the bound plus one size-check interval, budgets
    /// start over rather than grow, and the global budget is untouched.
    #[test]
    fn the_per_user_map_stays_bounded() {
        let clock = FakeRelativeClock::default();
        let config = RateLimitConfig {
            enabled: true,
            max_tracked_users: 1_000,
            global_per_sec: 1_000_000,
            global_burst: 1_000_000,
            ..RateLimitConfig::default()
        };
        let limits = RateLimits::new(&config, None, clock);
        let mut most = 0;
        for user in 0..10_000 {
            assert_eq!(limits.check(&format!("u{user}"), None), Verdict::Admit);
            most = most.max(limits.stats().tracked_users);
        }
        assert!(most <= 1_000 + SIZE_CHECK_EVERY, "tracked {most}");
        assert!(limits.stats().restarts >= 8, "{:?}", limits.stats());
        assert_eq!(limits.stats().admitted, 10_000);
    }

    /// A global budget of 100/s (burst 100), 50% of it per calling service.
    fn shared_by_callers() -> RateLimits<FakeRelativeClock> {
        let config = RateLimitConfig {
            enabled: true,
            global_per_sec: 100,
            global_burst: 100,
            ..RateLimitConfig::default()
        };
        let shares = Arc::new(CallerShares::new(50, Default::default()));
        RateLimits::new(&config, Some(shares), FakeRelativeClock::default())
    }

    /// Two calling services: the one that floods gets its share of the
    /// global budget and no more, and the other still finds its own.
    #[test]
    fn a_calling_service_gets_its_share_of_the_global_budget() {
        let limits = shared_by_callers();
        let (greedy, honest) = (
            CallerIdentity("spiffe://t/greedy".into()),
            CallerIdentity("spiffe://t/honest".into()),
        );
        assert_eq!(limits.check("g0", Some(&greedy)), Verdict::Admit);
        assert_eq!(limits.check("h0", Some(&honest)), Verdict::Admit);
        // Both count as calling once the active callers are recounted.
        std::thread::sleep(Duration::from_millis(250));
        let greedy_admitted = (1..500)
            .filter(|u| limits.check(&format!("g{u}"), Some(&greedy)) == Verdict::Admit)
            .count();
        assert_eq!(greedy_admitted, 49);
        assert!(matches!(
            limits.check("g-late", Some(&greedy)),
            Verdict::Refuse {
                scope: "caller",
                ..
            }
        ));
        let honest_admitted = (1..40)
            .filter(|u| limits.check(&format!("h{u}"), Some(&honest)) == Verdict::Admit)
            .count();
        assert_eq!(honest_admitted, 39);
    }

    /// A service calling alone is held only by the global budget.
    #[test]
    fn a_lone_calling_service_may_use_the_whole_budget() {
        let limits = shared_by_callers();
        let alone = CallerIdentity("spiffe://t/alone".into());
        let admitted = (0..500)
            .filter(|u| limits.check(&format!("a{u}"), Some(&alone)) == Verdict::Admit)
            .count();
        assert_eq!(admitted, 100);
    }
}
