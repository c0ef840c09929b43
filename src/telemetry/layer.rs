//! The outermost tower layer's tracing half: one server span per call,
//! continuing the caller's `traceparent`, entered while the layers below
//! decide and while the call runs, closed with the call's gRPC status.

use std::task::{Context, Poll};

use futures::future::{BoxFuture, Either};
use tower::{Layer, Service};
use tracing::Instrument;

use super::trace;

#[derive(Debug, Clone, Copy, Default)]
pub struct RpcSpanLayer;

impl<S> Layer<S> for RpcSpanLayer {
    type Service = RpcSpan<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RpcSpan { inner }
    }
}

#[derive(Debug, Clone)]
pub struct RpcSpan<S> {
    inner: S,
}

impl<S, B, R> Service<http::Request<B>> for RpcSpan<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if !trace::enabled() {
            return Either::Left(self.inner.call(request));
        }
        let (service, method) = crate::metrics::labels(request.uri().path());
        let Some(span) = trace::rpc_span(&format!("{service}/{method}"), request.headers()) else {
            return Either::Left(self.inner.call(request));
        };
        // Layers below may decide before their future is first polled.
        let future = span.in_scope(|| self.inner.call(request));
        let traced = async move {
            let result = future.await;
            let code = match &result {
                Ok(response) => crate::metrics::header_status(response),
                Err(_) => 2,
            };
            let span = tracing::Span::current();
            span.record("rpc.grpc.status_code", code);
            if code != 0 {
                span.record("otel.status_code", "ERROR");
            }
            result
        };
        Either::Right(Box::pin(traced.instrument(span)))
    }
}
