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
                let limit = self.limit.clone();
                crate::metrics::decision("shed", "admitted");
                let running = limit.running.fetch_add(1, Ordering::Relaxed) + 1;
                limit.peak.fetch_max(running, Ordering::Relaxed);
                Box::pin(async move {
                    let response = inner.call(request).await;
                    limit.running.fetch_sub(1, Ordering::Relaxed);
                    drop(permit);
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
