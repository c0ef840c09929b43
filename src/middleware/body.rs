//! The request body's deadline: an InventoryService call's one request
//! message must arrive within `server.body_timeout_ms` of its headers, or
//! the call is answered DEADLINE_EXCEEDED (REQUEST_TOO_SLOW) and dropped.
//! This layer sits outside load shedding, so a call holds an in-flight slot
//! only once its whole request is here: callers that open streams and send
//! no body (45 connections × 100 streams held every slot before) cost a
//! stream on their own connection and a timer, never another caller's slot.
//! The bytes being read are counted against `server.max_reading_bytes`
//! across the replica: a message that does not fit is refused at once
//! (RESOURCE_EXHAUSTED, OVERLOADED), so many streams each sending most of a
//! large message cannot make the replica buffer without bound.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tower::{Layer, Service};

use crate::error::ReservationError;

#[derive(Clone)]
pub struct BodyDeadlineLayer {
    timeout: Duration,
    /// Largest body read: the message limit plus gRPC's 5-byte frame
    /// header; a larger one is OUT_OF_RANGE, as the decoder would say.
    max_bytes: usize,
    /// Bytes being read across the replica, one permit per byte.
    reading: Arc<Semaphore>,
}

impl BodyDeadlineLayer {
    pub fn new(timeout: Duration, max_message_bytes: usize, max_reading_bytes: usize) -> Self {
        Self {
            timeout,
            max_bytes: max_message_bytes.saturating_add(5),
            reading: Arc::new(Semaphore::new(
                max_reading_bytes.min(Semaphore::MAX_PERMITS),
            )),
        }
    }
}

/// Why a body was not read whole.
enum Unread {
    TooLarge,
    /// The replica's reading budget is spent.
    Busy,
    /// The caller reset the stream or the connection broke.
    Broken,
}

/// Reads `body` whole, holding a permit per byte until it is read.
async fn read_within(
    body: tonic::body::Body,
    max_bytes: usize,
    reading: &Arc<Semaphore>,
) -> Result<Bytes, Unread> {
    let mut body = std::pin::pin!(body);
    let mut read = BytesMut::new();
    let mut held: Option<OwnedSemaphorePermit> = None;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(|_| Unread::Broken)?.into_data() else {
            continue;
        };
        if read.len() + data.len() > max_bytes {
            return Err(Unread::TooLarge);
        }
        let bytes = u32::try_from(data.len()).map_err(|_| Unread::TooLarge)?;
        let permit = Arc::clone(reading)
            .try_acquire_many_owned(bytes)
            .map_err(|_| Unread::Busy)?;
        match &mut held {
            Some(held) => held.merge(permit),
            None => held = Some(permit),
        }
        read.extend_from_slice(&data);
    }
    Ok(read.freeze())
}

impl<S> Layer<S> for BodyDeadlineLayer {
    type Service = BodyDeadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BodyDeadline {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct BodyDeadline<S> {
    inner: S,
    layer: BodyDeadlineLayer,
}

type HttpRequest = http::Request<tonic::body::Body>;

impl<S> Service<HttpRequest> for BodyDeadline<S>
where
    S: Service<HttpRequest, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if !request.uri().path().starts_with(super::CALLER_PREFIX) {
            return Box::pin(inner.call(request));
        }
        let BodyDeadlineLayer {
            timeout,
            max_bytes,
            reading,
        } = self.layer.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let read = tokio::time::timeout(timeout, read_within(body, max_bytes, &reading));
            let refusal = match read.await {
                Ok(Ok(body)) => {
                    let request =
                        http::Request::from_parts(parts, tonic::body::Body::new(Full::new(body)));
                    return inner.call(request).await;
                }
                Ok(Err(Unread::TooLarge)) => {
                    crate::metrics::decision("body", "too_large");
                    tonic::Status::out_of_range(format!("request larger than {max_bytes} bytes"))
                }
                Ok(Err(Unread::Busy)) => {
                    crate::metrics::decision("body", "reading_budget_spent");
                    tonic::Status::from(ReservationError::Shed {
                        scope: "reading",
                        retry_after: Duration::from_secs(1),
                    })
                }
                // No one is left to answer.
                Ok(Err(Unread::Broken)) => {
                    crate::metrics::decision("body", "broken");
                    tonic::Status::cancelled("request body broken off")
                }
                Err(_) => {
                    crate::metrics::decision("body", "too_slow");
                    tonic::Status::from(ReservationError::RequestTooSlow(timeout))
                }
            };
            Ok(refusal.into_http())
        })
    }
}
