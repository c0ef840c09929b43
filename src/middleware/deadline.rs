//! Every call's deadline: the caller's `grpc-timeout`, capped by
//! `server.request_timeout_ms`. When it passes, the call's work is dropped
//! (every backend call made inside it ends with it) and the caller is
//! answered DEADLINE_EXCEEDED, as gRPC callers expect, with reason
//! DEADLINE_EXCEEDED and the budget in the message.
//!
//! tonic enforces a `grpc-timeout` by itself too, outside every layer, but
//! answers CANCELLED ("Timeout expired"). This layer's timer is set
//! [`AHEAD`] of the deadline so that its answer, not tonic's, is the one
//! sent; tonic's own server timeout is not set at all.
//!
//! Work the service hands to a task of its own so that a caller going away
//! cannot cut it in half (publishing an order and waiting for the broker's
//! confirm) outlives the call, bounded by its own timeout; its outcome is
//! found with the same idempotency key (`docs/architecture.md`,
//! "Deadlines").

use std::{
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use tower::{Layer, Service};

use crate::error::ReservationError;

/// How far ahead of the deadline the answer is sent: more than tokio's
/// timer resolution (1 ms), so this layer's timer fires before tonic's.
pub const AHEAD: Duration = Duration::from_millis(2);

/// Longest `grpc-timeout` value, in units: gRPC allows 8 digits.
const MAX_DIGITS: usize = 8;

/// The `grpc-timeout` header's duration; `None` if absent or malformed
/// (then the server's cap alone applies, as tonic does too).
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > MAX_DIGITS + 1 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    // tonic's own parser takes a leading '+' too; a value it honours must
    // not be one this layer ignores.
    let digits = digits.strip_prefix('+').unwrap_or(digits);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

#[derive(Clone)]
pub struct DeadlineLayer {
    cap: Duration,
}

impl DeadlineLayer {
    /// `cap`: `server.request_timeout_ms`, the deadline of calls that set
    /// none and the most any call gets.
    pub fn new(cap: Duration) -> Self {
        Self { cap }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            cap: self.cap,
        }
    }
}

#[derive(Clone)]
pub struct Deadline<S> {
    inner: S,
    cap: Duration,
}

type HttpRequest = http::Request<tonic::body::Body>;

impl<S> Service<HttpRequest> for Deadline<S>
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
        let budget = grpc_timeout(request.headers()).map_or(self.cap, |asked| asked.min(self.cap));
        // Fixed now, as tonic fixes its own, not when the task first runs.
        let answer_by = tokio::time::Instant::now() + budget.saturating_sub(AHEAD);
        let call = inner.call(request);
        Box::pin(async move {
            match tokio::time::timeout_at(answer_by, call).await {
                Ok(answer) => answer,
                Err(_) => {
                    crate::metrics::decision("deadline", "exceeded");
                    Ok(tonic::Status::from(ReservationError::DeadlineExceeded(budget)).into_http())
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(value: &str) -> Option<Duration> {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", value.parse().unwrap());
        grpc_timeout(&headers)
    }

    #[test]
    fn grpc_timeout_values_parse_as_the_spec_says() {
        assert_eq!(parse("150m"), Some(Duration::from_millis(150)));
        assert_eq!(parse("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse("99999999u"), Some(Duration::from_micros(99_999_999)));
        assert_eq!(parse("5n"), Some(Duration::from_nanos(5)));
        assert_eq!(parse("+5m"), Some(Duration::from_millis(5)));
        for bad in ["", "m", "+m", "123456789m", "10x", "-1m", "1.5S"] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }

    /// A call still running at its deadline is answered DEADLINE_EXCEEDED
    /// (before tonic's own timer would answer CANCELLED), and its work is
    /// dropped.
    #[tokio::test]
    async fn a_call_past_its_deadline_is_answered_deadline_exceeded() {
        let dropped = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        struct Flag(std::sync::Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let flag = dropped.clone();
        let never = tower::service_fn(move |_: HttpRequest| {
            let flag = Flag(flag.clone());
            async move {
                let _flag = flag;
                futures::future::pending::<
                    Result<http::Response<tonic::body::Body>, std::convert::Infallible>,
                >()
                .await
            }
        });
        let mut service = DeadlineLayer::new(Duration::from_secs(5)).layer(never);
        let request = http::Request::builder()
            .uri("/stockgate.v1.InventoryService/Reserve")
            .header("grpc-timeout", "50m")
            .body(tonic::body::Body::empty())
            .unwrap();
        let started = std::time::Instant::now();
        let answer = service.call(request).await.unwrap();
        let took = started.elapsed();
        assert_eq!(answer.headers()["grpc-status"], "4");
        assert!(
            took >= Duration::from_millis(45),
            "answered early: {took:?}"
        );
        assert!(took < Duration::from_secs(1), "answered late: {took:?}");
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
    }
}
