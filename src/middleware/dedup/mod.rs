//! Dedup by idempotency key: the first Reserve (or ReserveCart) carrying a given
//! (`x-user-id`, `idempotency-key`) runs; a retry with the same key and the
//! same request gets the first answer replayed byte for byte (HTTP status,
//! headers, body and trailers); a concurrent duplicate waits for that answer
//! (up to `layers.dedup.wait_ms`, then ABORTED) instead of running twice;
//! the same key with a different request is refused with INVALID_ARGUMENT.
//!
//! Only Reserve and ReserveCart are deduplicated (reads are not). Answers that a retry should
//! not inherit (UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED, RESOURCE_EXHAUSTED,
//! INTERNAL, …) are not stored: the claim is dropped so the retry runs. The
//! store is Redis when `backends.dedup` is a `redis://` URL (every replica
//! sees every key) and in-process otherwise. When the store is unreachable
//! the call runs without dedup: the pipeline's own idempotency (queued keys
//! in memory, the database's unique (user, key)) still stands behind it.
//!
//! A claim and a stored answer are two round trips to the store. A call
//! the service can answer at once without changing anything (the sold-out
//! fast path, most of a flash sale) needs neither the claim nor the run
//! that it guards: the layer first asks the service behind it
//! ([`AnswerAtOnce`]), and if it has an answer stores that answer with
//! `SET NX GET`, one round trip. If the key already had a record, that
//! record decides as it would for a claim (replay, wait or mismatch) and the
//! at-once answer is dropped; it changed nothing.

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use async_trait::async_trait;
use futures::future::BoxFuture;
use http_body_util::{BodyExt, Limited};
use sha2::{Digest, Sha256};
use tokio::time::Instant;
use tower::{Layer, Service};

use crate::{
    domain::{switches::Switches, IdempotencyKey},
    error::ReservationError,
};

mod answer;
mod memory;
mod redis;

pub use answer::StoredAnswer;
pub use memory::MemoryDedup;
pub use redis::RedisDedup;

/// The deduplicated calls: Reserve, and ReserveCart (whose key names the
/// whole cart). The fingerprint includes the path, so a key used for one
/// is "another request" for the other.
pub const DEDUP_PATH: &str = "/stockgate.v1.InventoryService/Reserve";
pub const CART_PATH: &str = "/stockgate.v1.InventoryService/ReserveCart";
/// As the server's default message limit; anything larger is refused
/// before hashing.
const MAX_BODY: usize = 64 * 1024;

/// Hex SHA-256.
const FINGERPRINT_LEN: usize = 64;

/// Largest answer kept for replay, in bytes (headers, body and trailers).
/// A Reserve answer is a few hundred bytes; a larger one is passed on but
/// not kept, so no record can be made large.
const MAX_KEPT_ANSWER: usize = 4 * 1024;

/// A store that is down (or full) under a flood would otherwise log once
/// per call.
static STORE_DOWN: crate::telemetry::Sampled = crate::telemetry::Sampled::new();

/// What a claim on a key found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Nobody had it: this call runs, then completes or abandons it.
    Run,
    /// Answered before: replay.
    Done(StoredAnswer),
    /// Another call with this key is running.
    InFlight,
    /// The key was used with a different request.
    Mismatch,
}

/// Where claims and answers live.
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    /// Claims `key` for a request with `fingerprint` under `token`; a claim
    /// lapses after `in_flight` if never completed (a crashed replica).
    async fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        token: &str,
        in_flight: Duration,
    ) -> Result<Claim, String>;
    /// Stores the answer of the call that claimed `key` with
    /// `fingerprint` and `token`, for `ttl`.
    async fn complete(
        &self,
        key: &str,
        fingerprint: &str,
        token: &str,
        answer: &StoredAnswer,
        ttl: Duration,
    ) -> Result<(), String>;
    /// Stores `answer` as the first answer for `key` unless the key has a
    /// record already, in one step: [`Claim::Run`] means it was stored,
    /// anything else is what the existing record says.
    async fn store_first(
        &self,
        key: &str,
        fingerprint: &str,
        answer: &StoredAnswer,
        ttl: Duration,
    ) -> Result<Claim, String>;
    /// Drops the claim (if `token` still holds it) so a retry runs.
    async fn abandon(&self, key: &str, token: &str) -> Result<(), String>;
    /// Waits a little for any claim to change.
    async fn changed(&self);
}

/// A claim held by a running call; dropped with the call's future (its
/// deadline passed, its caller left), it is given up in the background.
/// `abandon` checks the token, so it never undoes a stored answer.
struct ClaimHeld {
    store: Arc<dyn DedupStore>,
    key: String,
    token: String,
    /// Cleared once the call's answer has been handled.
    held: bool,
}

impl Drop for ClaimHeld {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        let store = Arc::clone(&self.store);
        let (key, token) = (
            std::mem::take(&mut self.key),
            std::mem::take(&mut self.token),
        );
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let _ = store.abandon(&key, &token).await;
            });
        }
    }
}

/// Timing of the layer.
#[derive(Debug, Clone, Copy)]
pub struct DedupTimes {
    /// How long a stored answer is replayed.
    pub ttl: Duration,
    /// How long a concurrent duplicate waits for the first call's answer.
    pub wait: Duration,
    /// How long an unanswered claim holds the key (a crashed replica's
    /// claim must not block the key for the whole ttl).
    pub in_flight: Duration,
}

/// The tower layer; stays in the stack and reads its switch per call.
#[derive(Clone)]
pub struct DedupLayer {
    store: Arc<dyn DedupStore>,
    switches: Switches,
    times: DedupTimes,
    at_once: Arc<dyn AnswerAtOnce>,
}

impl DedupLayer {
    pub fn new(
        store: Arc<dyn DedupStore>,
        switches: Switches,
        times: DedupTimes,
        at_once: Arc<dyn AnswerAtOnce>,
    ) -> Self {
        Self {
            store,
            switches,
            times,
            at_once,
        }
    }
}

impl<S> Layer<S> for DedupLayer {
    type Service = Dedup<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Dedup {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Dedup<S> {
    inner: S,
    layer: DedupLayer,
}

/// The record key of (user, idempotency key): length-prefixed so no two
/// pairs spell the same key.
pub fn record_key(user: &str, key: &str) -> String {
    format!("{}:{user}:{key}", user.len())
}

/// What makes two requests "the same request" for a key: the method and
/// the request's bytes as framed on the wire.
pub fn fingerprint(path: &str, body: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hash = Sha256::new();
    hash.update(path.as_bytes());
    hash.update([0]);
    hash.update(body);
    let mut hex = String::with_capacity(FINGERPRINT_LEN);
    for byte in hash.finalize() {
        hex.push(char::from(HEX[usize::from(byte >> 4)]));
        hex.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    hex
}

fn refusal(err: ReservationError) -> http::Response<tonic::body::Body> {
    tonic::Status::from(err).into_http()
}

type HttpRequest = http::Request<tonic::body::Body>;

impl<S> Service<HttpRequest> for Dedup<S>
where
    S: Service<HttpRequest, Response = http::Response<tonic::body::Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequest) -> Self::Future {
        // The clone that was polled ready serves this call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let path = request.uri().path();
        if !(self.layer.switches.load().dedup && (path == DEDUP_PATH || path == CART_PATH)) {
            return Box::pin(inner.call(request));
        }
        let headers = request.headers();
        let key = match (
            crate::grpc::user_id_header(headers),
            crate::grpc::idempotency_key_header(headers),
        ) {
            (Ok(user), Ok(Some(key))) => record_key(user.as_str(), key.as_str()),
            // No key, or metadata the handler refuses: nothing to dedup, and
            // nothing is claimed or kept for it (the handler answers).
            _ => return Box::pin(inner.call(request)),
        };
        let layer = self.layer.clone();
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let body = match Limited::new(body, MAX_BODY).collect().await {
                Ok(collected) => collected.to_bytes(),
                Err(_) => {
                    return Ok(tonic::Status::out_of_range(format!(
                        "request larger than {MAX_BODY} bytes"
                    ))
                    .into_http())
                }
            };
            let fingerprint = fingerprint(parts.uri.path(), &body);
            let store = layer.store.clone();
            let times = layer.times;
            // A call the service can answer at once without changing
            // anything (sold out on the fast path) is stored and answered
            // in one round trip; the record it finds instead is answered
            // like a claim's.
            let mut found = None;
            let at_once = (parts.uri.path() == DEDUP_PATH)
                .then(|| layer.at_once.answer_at_once(&parts.headers, &body))
                .flatten()
                .filter(StoredAnswer::worth_keeping);
            if let Some(answer) = at_once {
                match store
                    .store_first(&key, &fingerprint, &answer, times.ttl)
                    .await
                {
                    Ok(Claim::Run) => {
                        crate::metrics::decision("dedup", "first");
                        crate::metrics::decision("gate", "sold_out_fast_path");
                        return Ok(answer.to_response());
                    }
                    Ok(claim) => found = Some(claim),
                    Err(err) => {
                        crate::metrics::decision("dedup", "store_unavailable");
                        crate::metrics::decision("gate", "sold_out_fast_path");
                        if let Some(left_out) = STORE_DOWN.admit() {
                            tracing::warn!(error = %err, left_out, "dedup store unusable; answering without it");
                        }
                        return Ok(answer.to_response());
                    }
                }
            }
            let token = uuid::Uuid::now_v7().simple().to_string();
            let rebuilt = move || {
                http::Request::from_parts(
                    parts,
                    tonic::body::Body::new(http_body_util::Full::new(body)),
                )
            };
            let waiting_since = Instant::now();
            let mut waited = false;
            loop {
                let claim = match found.take() {
                    Some(claim) => Ok(claim),
                    None => {
                        store
                            .claim(&key, &fingerprint, &token, times.in_flight)
                            .await
                    }
                };
                match claim {
                    Ok(Claim::Run) => {
                        crate::metrics::decision("dedup", "first");
                        // A call dropped at its deadline gives its claim up,
                        // so a retry with the key runs (and finds the order
                        // if one was taken) rather than wait it out.
                        let mut claimed = ClaimHeld {
                            store,
                            key,
                            token,
                            held: true,
                        };
                        let response = inner.call(rebuilt()).await?;
                        let ClaimHeld {
                            store, key, token, ..
                        } = &claimed;
                        let answer =
                            finish(&**store, key, &fingerprint, token, times, response).await;
                        claimed.held = false;
                        return Ok(answer);
                    }
                    Ok(Claim::Done(answer)) => {
                        let how = if waited { "waited" } else { "replayed" };
                        crate::metrics::decision("dedup", how);
                        return Ok(answer.to_response());
                    }
                    Ok(Claim::Mismatch) => {
                        crate::metrics::decision("dedup", "key_conflict");
                        return Ok(refusal(ReservationError::invalid(
                            IdempotencyKey::METADATA,
                            "this idempotency key was already used with a different request",
                        )));
                    }
                    Ok(Claim::InFlight) if waiting_since.elapsed() >= times.wait => {
                        crate::metrics::decision("dedup", "busy");
                        return Ok(refusal(ReservationError::DuplicateInFlight));
                    }
                    Ok(Claim::InFlight) => {
                        waited = true;
                        store.changed().await
                    }
                    Err(err) => {
                        crate::metrics::decision("dedup", "store_unavailable");
                        if let Some(left_out) = STORE_DOWN.admit() {
                            tracing::warn!(error = %err, left_out, "dedup store unusable; running the call without it");
                        }
                        return inner.call(rebuilt()).await;
                    }
                }
            }
        })
    }
}

/// What the dedup layer needs from the service behind it: the answer to a
/// deduplicated call when it can be given at once, with no I/O and no change
/// (the sold-out fast path). Such a call needs no claim on its key: its
/// answer is stored in the same round trip that checks the key.
pub trait AnswerAtOnce: Send + Sync + 'static {
    /// The whole answer to the request with these `headers` and `body` (the
    /// gRPC message as framed on the wire), exactly as a run would give it;
    /// `None` when it needs a run.
    fn answer_at_once(&self, headers: &http::HeaderMap, body: &[u8]) -> Option<StoredAnswer>;
}

/// Marks a response (in its extensions, never on the wire) whose decision
/// a retry with the same key must not inherit though it is OK: a Reserve
/// outside the sale window, which may open or move.
#[derive(Debug, Clone, Copy)]
pub struct Provisional;

/// Stores a final answer (and hands back the stored copy, so the first
/// caller and every replay get the same bytes) or drops the claim.
async fn finish(
    store: &dyn DedupStore,
    key: &str,
    fingerprint: &str,
    token: &str,
    times: DedupTimes,
    response: http::Response<tonic::body::Body>,
) -> http::Response<tonic::body::Body> {
    let provisional = response.extensions().get::<Provisional>().is_some();
    let answer = match StoredAnswer::capture(response).await {
        Ok(answer) => answer,
        Err(err) => {
            let _ = store.abandon(key, token).await;
            // Logged with the cause; the caller hears "internal error" only.
            return refusal(ReservationError::Internal(anyhow::anyhow!(
                "dedup: the response body failed while being read: {err}"
            )));
        }
    };
    let stored = if answer.worth_keeping() && !provisional {
        store
            .complete(key, fingerprint, token, &answer, times.ttl)
            .await
    } else {
        store.abandon(key, token).await
    };
    if let Err(err) = stored {
        if let Some(left_out) = STORE_DOWN.admit() {
            tracing::warn!(error = %err, left_out, "dedup answer not stored; a retry will run again");
        }
    }
    answer.to_response()
}

#[cfg(test)]
mod tests {
    use super::redis::{new_record, read_record};
    use super::*;

    fn answer(code: i32) -> StoredAnswer {
        StoredAnswer {
            status: 200,
            headers: vec![("content-type".into(), b"application/grpc".to_vec())],
            body: vec![0, 0, 0, 0, 2, 8, 1],
            trailers: vec![("grpc-status".into(), code.to_string().into_bytes())],
        }
    }

    /// hyper sends HEADERS with END_STREAM only for a body that is over
    /// before it is polled; anything else gets an empty DATA frame after
    /// the status, which grpc-core clients reject.
    #[test]
    fn an_error_answer_is_replayed_trailers_only() {
        use http_body::Body as _;
        let error = StoredAnswer {
            status: 200,
            headers: vec![
                ("content-type".into(), b"application/grpc".to_vec()),
                ("grpc-status".into(), b"5".to_vec()),
            ],
            body: vec![],
            trailers: vec![],
        };
        assert!(error.to_response().body().is_end_stream());
        assert!(!answer(0).to_response().body().is_end_stream());
    }

    #[tokio::test]
    async fn claims_replays_mismatches_and_lapses() {
        let store = MemoryDedup::default();
        let short = Duration::from_millis(30);
        assert_eq!(store.claim("k", "fp", "t1", short).await, Ok(Claim::Run));
        assert_eq!(
            store.claim("k", "fp", "t2", short).await,
            Ok(Claim::InFlight)
        );
        assert_eq!(
            store.claim("k", "other", "t2", short).await,
            Ok(Claim::Mismatch)
        );
        // Only the holder's token completes.
        store
            .complete("k", "fp", "t2", &answer(0), short)
            .await
            .unwrap();
        assert_eq!(
            store.claim("k", "fp", "t3", short).await,
            Ok(Claim::InFlight)
        );
        store
            .complete("k", "fp", "t1", &answer(0), Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            store.claim("k", "fp", "t4", short).await,
            Ok(Claim::Done(answer(0)))
        );
        // An unanswered claim lapses; an abandoned one frees the key.
        assert_eq!(store.claim("j", "fp", "t1", short).await, Ok(Claim::Run));
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(store.claim("j", "fp", "t2", short).await, Ok(Claim::Run));
        store.abandon("j", "t2").await.unwrap();
        assert_eq!(store.claim("j", "fp", "t3", short).await, Ok(Claim::Run));
        assert_eq!(store.sweep(), 2);
    }

    #[tokio::test]
    async fn an_at_once_answer_is_kept_only_for_a_new_key() {
        let store = MemoryDedup::default();
        let long = Duration::from_secs(60);
        assert_eq!(
            store.store_first("k", "fp", &answer(0), long).await,
            Ok(Claim::Run)
        );
        assert_eq!(
            store.claim("k", "fp", "t1", long).await,
            Ok(Claim::Done(answer(0)))
        );
        // The first answer stays; another request is a mismatch.
        assert_eq!(
            store.store_first("k", "fp", &answer(5), long).await,
            Ok(Claim::Done(answer(0)))
        );
        assert_eq!(
            store.store_first("k", "other", &answer(5), long).await,
            Ok(Claim::Mismatch)
        );
        // A running call's claim is not overwritten.
        assert_eq!(store.claim("j", "fp", "t1", long).await, Ok(Claim::Run));
        assert_eq!(
            store.store_first("j", "fp", &answer(0), long).await,
            Ok(Claim::InFlight)
        );
    }

    #[test]
    fn only_final_answers_are_kept_and_they_replay_identically() {
        assert!(answer(0).worth_keeping());
        assert!(answer(5).worth_keeping(), "NOT_FOUND stands");
        assert!(
            !answer(3).worth_keeping(),
            "a malformed request keeps nothing"
        );
        assert!(!answer(11).worth_keeping(), "so does one out of range");
        assert!(!answer(14).worth_keeping(), "UNAVAILABLE is retried");
        assert!(!answer(10).worth_keeping(), "ABORTED is retried");
        let mut huge = answer(0);
        huge.headers
            .push(("x-big".into(), vec![b'x'; MAX_KEPT_ANSWER]));
        assert!(!huge.worth_keeping(), "no record is made large");
        assert_ne!(record_key("ab", "c"), record_key("a", "bc"));
        assert_ne!(fingerprint("/p", b"x"), fingerprint("/p", b"y"));
    }

    #[test]
    fn records_encode_and_decode_exactly() {
        let mut original = answer(0);
        original.headers.push(("x-empty".into(), Vec::new()));
        let fp = fingerprint("/p", b"x");
        let mut record = new_record(b'a', &fp, 0);
        original.encode(&mut record);
        assert_eq!(read_record(&record, &fp), Ok(Claim::Done(original.clone())));
        assert_eq!(
            read_record(&record, &fingerprint("/p", b"y")),
            Ok(Claim::Mismatch)
        );
        // Every truncation and any extra byte is an error, never a
        // different answer.
        for cut in 1 + FINGERPRINT_LEN..record.len() {
            assert!(read_record(&record[..cut], &fp).is_err(), "cut at {cut}");
        }
        record.push(0);
        assert!(read_record(&record, &fp).is_err());
        let mut claim = new_record(b'c', &fp, 5);
        claim.extend_from_slice(b"token");
        assert_eq!(read_record(&claim, &fp), Ok(Claim::InFlight));
        assert!(read_record(b"", &fp).is_err());
        assert!(read_record(b"c123", &fp).is_err());
    }

    #[tokio::test]
    async fn a_stored_answer_rebuilds_to_the_same_answer() {
        let original = answer(0);
        let again = StoredAnswer::capture(original.to_response()).await.unwrap();
        assert_eq!(again, original);
    }
}
