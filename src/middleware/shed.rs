//! Load shedding: at most `server.max_in_flight` InventoryService calls run
//! at once on a replica; the next one is refused at once with
//! RESOURCE_EXHAUSTED and `retry-after`, instead of queueing. A spike then
//! degrades into fast refusals, never into a pile of waiting tasks and
//! growing memory. Operators, health checks and reflection are never shed.
//!
//! With mutual TLS each calling service also holds at most its share of
//! the slots while another service is calling ([`super::callers`]): past
//! it, that service alone is shed (metadata `scope` "caller").

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use tokio::sync::Semaphore;
use tower::{Layer, Service};

use super::{
    callers::{CallerShares, Forgettable, PerCaller, Share},
    CallerIdentity,
};
use crate::error::ReservationError;

/// The replica's budget of calls in flight.
#[derive(Debug)]
pub struct InFlight {
    max: usize,
    permits: Arc<Semaphore>,
    running: AtomicU64,
    peak: AtomicU64,
    shed: AtomicU64,
    callers: Option<PerCaller<CallerSlots>>,
}

/// One calling service's slots.
#[derive(Debug)]
struct CallerSlots {
    cap: u64,
    held: AtomicU64,
}

impl Forgettable for CallerSlots {
    fn forgettable(&self) -> bool {
        self.held.load(Ordering::Relaxed) == 0
    }
}

/// One slot a calling service holds, given back when dropped.
struct CallerSlot(Arc<Share<CallerSlots>>);

impl CallerSlot {
    fn slots(&self) -> &CallerSlots {
        self.0
            .budget
            .as_ref()
            .expect("only capped services hold slots")
    }
}

impl Drop for CallerSlot {
    fn drop(&mut self) {
        self.slots().held.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the layer has seen since start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadShedStats {
    pub max_in_flight: u64,
    pub in_flight: u64,
    pub peak_in_flight: u64,
    pub shed: u64,
}

impl InFlight {
    /// `shares`: per-calling-service caps (mutual TLS), or `None`.
    pub fn new(max: usize, shares: Option<Arc<CallerShares>>) -> Self {
        Self {
            max,
            permits: Arc::new(Semaphore::new(max)),
            running: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            callers: shares.map(PerCaller::new),
        }
    }

    /// Takes one of `caller`'s slots, unless its share applies and is
    /// used up (`Err`).
    fn caller_slot(&self, caller: Option<&CallerIdentity>) -> Result<Option<CallerSlot>, ()> {
        let (Some(callers), Some(caller)) = (&self.callers, caller) else {
            return Ok(None);
        };
        let (share, applies) = callers.get(caller, |percent| CallerSlots {
            cap: CallerShares::of(percent, self.max as u64),
            held: AtomicU64::new(0),
        });
        let Some(slots) = &share.budget else {
            return Ok(None);
        };
        // Counted even while the share does not apply, so the count is
        // right when another service starts calling.
        let held = slots.held.fetch_add(1, Ordering::Relaxed) + 1;
        let slot = CallerSlot(Arc::clone(&share));
        if applies && held > slots.cap {
            crate::metrics::caller_refused("shed", &share.caller);
            return Err(());
        }
        Ok(Some(slot))
    }

    pub fn stats(&self) -> LoadShedStats {
        LoadShedStats {
            max_in_flight: self.max as u64,
            in_flight: self.running.load(Ordering::Relaxed),
            peak_in_flight: self.peak.load(Ordering::Relaxed),
            shed: self.shed.load(Ordering::Relaxed),
        }
    }
}

/// One admitted call: counted while it lives, so a call that times out or
/// whose caller goes away (its future dropped mid-await) is uncounted too.
struct Running {
    limit: Arc<InFlight>,
    _permit: tokio::sync::OwnedSemaphorePermit,
    _caller: Option<CallerSlot>,
}

impl Running {
    fn start(
        limit: &Arc<InFlight>,
        permit: tokio::sync::OwnedSemaphorePermit,
        caller: Option<CallerSlot>,
    ) -> Self {
        let running = limit.running.fetch_add(1, Ordering::Relaxed) + 1;
        limit.peak.fetch_max(running, Ordering::Relaxed);
        Self {
            limit: Arc::clone(limit),
            _permit: permit,
            _caller: caller,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.limit.running.fetch_sub(1, Ordering::Relaxed);
    }
}

#[derive(Clone)]
pub struct LoadShedLayer {
    limit: Arc<InFlight>,
}

impl LoadShedLayer {
    pub fn new(limit: Arc<InFlight>) -> Self {
        Self { limit }
    }
}

impl<S> Layer<S> for LoadShedLayer {
    type Service = LoadShed<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LoadShed {
            inner,
            limit: self.limit.clone(),
        }
    }
}

#[derive(Clone)]
pub struct LoadShed<S> {
    inner: S,
    limit: Arc<InFlight>,
}

impl<S, ReqBody> Service<http::Request<ReqBody>> for LoadShed<S>
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
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !request.uri().path().starts_with(super::CALLER_PREFIX) {
            return Box::pin(inner.call(request));
        }
        let admitted = self
            .limit
            .caller_slot(request.extensions().get::<CallerIdentity>())
            .map_err(|()| "caller")
            .and_then(|caller| {
                // A slot of the caller's own that finds the replica full is
                // given back when `caller` drops here.
                let permit = self.limit.permits.clone().try_acquire_owned();
                let permit = permit.map_err(|_| "replica")?;
                Ok(Running::start(&self.limit, permit, caller))
            });
        match admitted {
            Ok(running) => {
                crate::metrics::decision("shed", "admitted");
                Box::pin(async move {
                    let response = inner.call(request).await;
                    drop(running);
                    response
                })
            }
            Err(scope) => {
                self.limit.shed.fetch_add(1, Ordering::Relaxed);
                crate::metrics::decision("shed", "shed");
                let status = tonic::Status::from(ReservationError::Shed {
                    scope,
                    retry_after: Duration::from_secs(1),
                });
                Box::pin(async move { Ok(super::refuse_after_reading(request, status).await) })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A call whose future is dropped before it ends (a server timeout, a
    /// caller gone) gives its slot and its count back.
    #[tokio::test]
    async fn a_dropped_call_is_uncounted() {
        let limit = Arc::new(InFlight::new(2, None));
        let never = tower::service_fn(|_: http::Request<tonic::body::Body>| {
            futures::future::pending::<
                Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
            >()
        });
        let mut shed = LoadShedLayer::new(limit.clone()).layer(never);
        let request = || {
            http::Request::builder()
                .uri(format!("{}Reserve", super::super::CALLER_PREFIX))
                .body(tonic::body::Body::empty())
                .unwrap()
        };
        let first = shed.call(request());
        let second = shed.call(request());
        assert_eq!(limit.stats().in_flight, 2);
        drop(first);
        drop(second);
        assert_eq!(limit.stats().in_flight, 0);
        assert_eq!(limit.permits.available_permits(), 2);
    }

    /// While two services call, each holds at most its share of the slots
    /// (the excess is shed with scope "caller" and gives nothing back it
    /// did not take); alone, one may hold them all.
    #[tokio::test]
    async fn each_calling_service_holds_at_most_its_share() {
        let shares = Arc::new(CallerShares::new(50, Default::default()));
        let limit = Arc::new(InFlight::new(8, Some(shares)));
        let never = tower::service_fn(|_: http::Request<tonic::body::Body>| {
            futures::future::pending::<
                Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
            >()
        });
        let mut shed = LoadShedLayer::new(limit.clone()).layer(never);
        let request = |caller: &str| {
            let mut request = http::Request::builder()
                .uri(format!("{}Reserve", super::super::CALLER_PREFIX))
                .body(tonic::body::Body::empty())
                .unwrap();
            request
                .extensions_mut()
                .insert(CallerIdentity(caller.into()));
            request
        };
        // Alone, the greedy service takes 6 of 8.
        let mut held: Vec<_> = (0..6).map(|_| shed.call(request("greedy"))).collect();
        assert_eq!(limit.stats().in_flight, 6);
        held.push(shed.call(request("honest")));
        tokio::time::sleep(Duration::from_millis(250)).await;
        // Now both call: greedy is over its 4 and is refused at once;
        // honest takes the last free slot.
        let refused = shed.call(request("greedy")).await.unwrap();
        assert_eq!(refused.headers()["grpc-status"], "8");
        held.push(shed.call(request("honest")));
        assert_eq!(limit.stats().in_flight, 8);
        assert_eq!(limit.stats().shed, 1);
        // Greedy's calls end; it gets back to 4 and no further.
        held.drain(..4);
        assert_eq!(limit.stats().in_flight, 4);
        for _ in 0..2 {
            held.push(shed.call(request("greedy")));
        }
        let refused = shed.call(request("greedy")).await.unwrap();
        assert_eq!(refused.headers()["grpc-status"], "8");
        assert_eq!(limit.stats().in_flight, 6);
        drop(held);
        assert_eq!(limit.stats().in_flight, 0);
        assert_eq!(limit.permits.available_permits(), 8);
    }
}
