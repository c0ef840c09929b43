//! The request body's deadline: an InventoryService call's one request
//! message must arrive within `server.body_timeout_ms` of its headers, or
//! the call is answered DEADLINE_EXCEEDED (REQUEST_TOO_SLOW) and dropped.
//! This layer sits outside load shedding, so a call holds an in-flight slot
//! only once its whole request is here: callers that open streams and send
//! no body (45 connections × 100 streams held every slot before) cost a
//! stream on their own connection and a timer, never another caller's slot.

use std::{
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use http_body_util::{BodyExt, Full, Limited};
use tower::{Layer, Service};

use crate::error::ReservationError;

#[derive(Clone)]
pub struct BodyDeadlineLayer {
    timeout: Duration,
    /// Largest body read: the message limit plus gRPC's 5-byte frame
    /// header; a larger one is OUT_OF_RANGE, as the decoder would say.
    max_bytes: usize,
}

impl BodyDeadlineLayer {
    pub fn new(timeout: Duration, max_message_bytes: usize) -> Self {
        Self {
            timeout,
            max_bytes: max_message_bytes.saturating_add(5),
        }
    }
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
        let BodyDeadlineLayer { timeout, max_bytes } = self.layer;
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let read = tokio::time::timeout(timeout, Limited::new(body, max_bytes).collect());
            let body = match read.await {
                Ok(Ok(collected)) => collected.to_bytes(),
                Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
                    crate::metrics::decision("body", "too_large");
                    return Ok(tonic::Status::out_of_range(format!(
                        "request larger than {max_bytes} bytes"
                    ))
                    .into_http());
                }
                // The caller reset the stream or the connection broke: no
                // one is left to answer.
                Ok(Err(_)) => {
                    crate::metrics::decision("body", "broken");
                    return Ok(tonic::Status::cancelled("request body broken off").into_http());
                }
                Err(_) => {
                    crate::metrics::decision("body", "too_slow");
                    return Ok(
                        tonic::Status::from(ReservationError::RequestTooSlow(timeout)).into_http(),
                    );
                }
            };
            let request = http::Request::from_parts(parts, tonic::body::Body::new(Full::new(body)));
            inner.call(request).await
        })
    }
}
