//! Load shedding: at most `server.max_in_flight` InventoryService calls run
//! at once on a replica; the next one is refused at once with
//! RESOURCE_EXHAUSTED and `retry-after`, instead of queueing. A spike then
//! degrades into fast refusals, never into a pile of waiting tasks and
//! growing memory. Operators, health checks and reflection are never shed.

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

use crate::error::ReservationError;

/// The replica's budget of calls in flight.
#[derive(Debug)]
pub struct InFlight {
    max: usize,
    permits: Arc<Semaphore>,
    running: AtomicU64,
    peak: AtomicU64,
    shed: AtomicU64,
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
    pub fn new(max: usize) -> Self {
        Self {
            max,
            permits: Arc::new(Semaphore::new(max)),
            running: AtomicU64::new(0),
            peak: AtomicU64::new(0),
            shed: AtomicU64::new(0),
        }
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
}

impl Running {
    fn start(limit: &Arc<InFlight>, permit: tokio::sync::OwnedSemaphorePermit) -> Self {
        let running = limit.running.fetch_add(1, Ordering::Relaxed) + 1;
        limit.peak.fetch_max(running, Ordering::Relaxed);
        Self {
            limit: Arc::clone(limit),
            _permit: permit,
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
        match self.limit.permits.clone().try_acquire_owned() {
            Ok(permit) => {
                crate::metrics::decision("shed", "admitted");
                let running = Running::start(&self.limit, permit);
                Box::pin(async move {
                    let response = inner.call(request).await;
                    drop(running);
                    response
                })
            }
            Err(_) => {
                self.limit.shed.fetch_add(1, Ordering::Relaxed);
                crate::metrics::decision("shed", "shed");
                let status = tonic::Status::from(ReservationError::Shed {
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
        let limit = Arc::new(InFlight::new(2));
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
}
