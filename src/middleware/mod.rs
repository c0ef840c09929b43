//! Tower middleware on the gRPC server, outermost first (the stack is built
//! in `server::run`):
//!
//! 1. the per-connection stream limit (tonic), then [`DeadlineLayer`]: the
//!    caller's `grpc-timeout` capped by `server.request_timeout_ms`,
//!    answered DEADLINE_EXCEEDED;
//! 2. [`IdentityLayer`] (mutual TLS only): the calling service's identity
//!    from its certificate, checked against `server.tls.allowed_clients`;
//! 3. [`BodyDeadlineLayer`]: the request message must arrive within
//!    `server.body_timeout_ms`; read whole before any slot is taken;
//! 4. [`LoadShedLayer`]: at most `server.max_in_flight` caller calls at
//!    once, refusing the rest at once, so nothing queues in front of the
//!    limits below; with mutual TLS, each calling service at most its
//!    share while others call ([`callers`]);
//! 5. [`RateLimitLayer`]: per-user, per-calling-service and global limits, before any body is
//!    decoded (the body deadline has only buffered it, within its byte
//!    budget), so a flood costs a header lookup and a counter per call;
//! 6. [`DedupLayer`]: idempotency keys, after the rate limit (a refused
//!    duplicate must not hold a claim on its key) and before the services
//!    (a duplicate never runs the stock logic; it may be asked for an
//!    at-once answer, which changes nothing). It first asks Reserve
//!    for an at-once answer ([`AnswerAtOnce`]: the sold-out fast path) and
//!    stores that in the same step that checks the key.
//!
//! Each layer reads its switch per request, so SREs can flip it at run time;
//! a switched-off layer costs one atomic load.

mod body;
pub mod callers;
mod deadline;
mod dedup;
mod identity;
mod rate_limit;
mod shed;

/// Calls the caller-facing layers apply to: operators, health checks and
/// reflection are never limited or shed.
const CALLER_PREFIX: &str = "/stockgate.v1.InventoryService/";

/// Most of a refused call's body read before answering; anything larger is
/// not a Reserve and is cut off.
const REFUSED_BODY_LIMIT: usize = 16 * 1024;
/// Longest a refusal waits for that body.
const REFUSED_BODY_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Answers `status` after reading the (tiny) request. Refusing with the
/// body unread leaves its DATA frames counted against h2's flood guard, and
/// a burst of refusals then makes h2 drop the whole connection (GOAWAY
/// ENHANCE_YOUR_CALM).
async fn refuse_after_reading<B>(
    request: http::Request<B>,
    status: tonic::Status,
) -> http::Response<tonic::body::Body>
where
    B: http_body::Body,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let body = http_body_util::Limited::new(request.into_body(), REFUSED_BODY_LIMIT);
    // A refused caller that never finishes its message is not waited for.
    let _ = tokio::time::timeout(REFUSED_BODY_WAIT, http_body_util::BodyExt::collect(body)).await;
    status.into_http()
}

pub use body::BodyDeadlineLayer;
pub use deadline::{grpc_timeout, DeadlineLayer};
pub use dedup::{
    fingerprint, record_key, AnswerAtOnce, Claim, DedupLayer, DedupStore, DedupTimes, MemoryDedup,
    Provisional, RedisDedup, StoredAnswer, CART_PATH, DEDUP_PATH,
};
pub use identity::{certificate_identities, CallerIdentity, IdentityLayer};
pub use rate_limit::{
    FleetLimits, FleetOver, RateLimitLayer, RateLimitStats, RateLimits, RedisFleetLimits, Verdict,
};
pub use shed::{InFlight, LoadShedLayer, LoadShedStats};
