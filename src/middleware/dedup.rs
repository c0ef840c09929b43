//! Dedup by idempotency key: the first Reserve carrying a given
//! (`x-user-id`, `idempotency-key`) runs; a retry with the same key and the
//! same request gets the first answer replayed byte for byte (HTTP status,
//! headers, body and trailers); a concurrent duplicate waits for that answer
//! (up to `layers.dedup.wait_ms`, then ABORTED) instead of running twice;
//! the same key with a different request is refused with INVALID_ARGUMENT.
//!
//! Only Reserve is deduplicated (reads are not). Answers that a retry should
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
//! that it guards: the layer first sends the request marked
//! [`InstantOnly`], and if Reserve answers it (rather than [`NOT_INSTANT`])
//! stores that answer with `SET NX GET`, one round trip. If the key already
//! had a record, that record decides as it would for a claim (replay, wait
//! or mismatch) and the at-once answer is dropped; it changed nothing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use futures::future::BoxFuture;
use http_body::Frame;
use http_body_util::{BodyExt, Limited, StreamBody};
use sha2::{Digest, Sha256};
use tokio::{sync::Notify, time::Instant};
use tower::{Layer, Service};

use crate::{
    domain::{switches::Switches, IdempotencyKey, UserId},
    error::ReservationError,
    redis_batch::Batcher,
};

/// The one deduplicated call.
pub const DEDUP_PATH: &str = "/stockgate.v1.InventoryService/Reserve";
/// A Reserve request is tiny; anything larger is refused before hashing.
const MAX_BODY: usize = 64 * 1024;

/// The first call's whole answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredAnswer {
    pub status: u16,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, Vec<u8>)>,
}

fn pairs(map: &http::HeaderMap) -> Vec<(String, Vec<u8>)> {
    map.iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect()
}

/// Lengths are u32: a stored answer is a Reserve reply, far below that.
fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

fn put_pairs(out: &mut Vec<u8>, pairs: &[(String, Vec<u8>)]) {
    out.extend_from_slice(&u32::try_from(pairs.len()).unwrap_or(u32::MAX).to_be_bytes());
    for (name, value) in pairs {
        put_bytes(out, name.as_bytes());
        put_bytes(out, value);
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let (head, rest) = self
            .0
            .split_at_checked(n)
            .ok_or_else(|| "stored answer cut short".to_owned())?;
        self.0 = rest;
        Ok(head)
    }

    fn len(&mut self) -> Result<usize, String> {
        let raw: [u8; 4] = self.take(4)?.try_into().map_err(|_| "short length")?;
        Ok(u32::from_be_bytes(raw) as usize)
    }

    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.len()?;
        self.take(n)
    }

    fn pairs(&mut self) -> Result<Vec<(String, Vec<u8>)>, String> {
        let n = self.len()?;
        // Each pair takes at least 8 bytes: a corrupt count cannot make
        // this allocate more than the record's size.
        let mut pairs = Vec::with_capacity(n.min(self.0.len() / 8));
        for _ in 0..n {
            let name = std::str::from_utf8(self.bytes()?)
                .map_err(|_| "header name is not UTF-8".to_owned())?
                .to_owned();
            pairs.push((name, self.bytes()?.to_vec()));
        }
        Ok(pairs)
    }
}

fn header_map(pairs: &[(String, Vec<u8>)]) -> http::HeaderMap {
    let mut map = http::HeaderMap::new();
    for (name, value) in pairs {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

impl StoredAnswer {
    async fn capture(response: http::Response<tonic::body::Body>) -> Result<Self, String> {
        let (parts, body) = response.into_parts();
        let collected = body.collect().await.map_err(|e| e.to_string())?;
        let trailers = collected.trailers().map(pairs).unwrap_or_default();
        Ok(Self {
            status: parts.status.as_u16(),
            headers: pairs(&parts.headers),
            trailers,
            body: collected.to_bytes().to_vec(),
        })
    }

    pub fn to_response(&self) -> http::Response<tonic::body::Body> {
        let body = if self.body.is_empty() && self.trailers.is_empty() {
            // A trailers-only answer (every error): the body must say it is
            // over before it is polled, so that the status goes out in one
            // HEADERS frame with END_STREAM. A stream body cannot say so and
            // makes hyper send the headers and then an empty DATA frame with
            // END_STREAM, which grpc-core clients read as a stream with no
            // status (UNKNOWN "Stream removed").
            tonic::body::Body::empty()
        } else {
            let mut frames: Vec<Result<Frame<Bytes>, std::convert::Infallible>> = Vec::new();
            if !self.body.is_empty() {
                frames.push(Ok(Frame::data(Bytes::from(self.body.clone()))));
            }
            if !self.trailers.is_empty() {
                frames.push(Ok(Frame::trailers(header_map(&self.trailers))));
            }
            tonic::body::Body::new(StreamBody::new(futures::stream::iter(frames)))
        };
        let mut response = http::Response::new(body);
        *response.status_mut() =
            http::StatusCode::from_u16(self.status).unwrap_or(http::StatusCode::OK);
        *response.headers_mut() = header_map(&self.headers);
        response
    }

    /// Appends the answer in a compact binary form: the status, then each
    /// header list and the body, every list and field length-prefixed.
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.status.to_be_bytes());
        put_pairs(out, &self.headers);
        put_bytes(out, &self.body);
        put_pairs(out, &self.trailers);
    }

    fn decode(bytes: &[u8]) -> Result<Self, String> {
        let mut input = Reader(bytes);
        let status = u16::from_be_bytes(
            input
                .take(2)?
                .try_into()
                .map_err(|_| "short status".to_owned())?,
        );
        let headers = input.pairs()?;
        let body = input.bytes()?.to_vec();
        let trailers = input.pairs()?;
        if !input.0.is_empty() {
            return Err("trailing bytes after a stored answer".into());
        }
        Ok(Self {
            status,
            headers,
            body,
            trailers,
        })
    }

    /// The gRPC status code (trailers, or headers for a trailers-only
    /// answer).
    fn grpc_code(&self) -> Option<tonic::Code> {
        self.trailers
            .iter()
            .chain(&self.headers)
            .find(|(name, _)| name == "grpc-status")
            .and_then(|(_, value)| std::str::from_utf8(value).ok()?.parse::<i32>().ok())
            .map(tonic::Code::from)
    }

    /// Whether a retry should get this answer: a decision (OK, including
    /// "sold out" and "over the limit" outcomes) or a verdict on the request
    /// itself. Anything transient is left for the retry to run again.
    fn is_final(&self) -> bool {
        matches!(
            self.grpc_code(),
            Some(
                tonic::Code::Ok
                    | tonic::Code::InvalidArgument
                    | tonic::Code::OutOfRange
                    | tonic::Code::NotFound
                    | tonic::Code::FailedPrecondition
            )
        )
    }
}

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
    async fn settle(
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

struct Entry {
    fingerprint: String,
    token: String,
    answer: Option<StoredAnswer>,
    expires: Instant,
}

/// The embedded profile's store: one process, so a map and a notifier.
#[derive(Default)]
pub struct MemoryDedup {
    entries: Mutex<HashMap<String, Entry>>,
    notify: Notify,
}

impl MemoryDedup {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Inserts a record for `key` unless a live one is there, and says
    /// what the live one means for this request.
    fn put_new(
        &self,
        key: &str,
        fingerprint: &str,
        token: &str,
        answer: Option<StoredAnswer>,
        lasts: Duration,
    ) -> Claim {
        let now = Instant::now();
        let mut entries = self.entries();
        match entries.get(key) {
            Some(entry) if entry.expires > now => {
                if entry.fingerprint != fingerprint {
                    Claim::Mismatch
                } else if let Some(answer) = &entry.answer {
                    Claim::Done(answer.clone())
                } else {
                    Claim::InFlight
                }
            }
            _ => {
                entries.insert(
                    key.to_owned(),
                    Entry {
                        fingerprint: fingerprint.to_owned(),
                        token: token.to_owned(),
                        answer,
                        expires: now + lasts,
                    },
                );
                Claim::Run
            }
        }
    }

    /// Forgets lapsed claims and expired answers (bounded memory).
    pub fn sweep(&self) -> usize {
        let now = Instant::now();
        let mut entries = self.entries();
        entries.retain(|_, entry| entry.expires > now);
        entries.len()
    }
}

#[async_trait]
impl DedupStore for MemoryDedup {
    async fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        token: &str,
        in_flight: Duration,
    ) -> Result<Claim, String> {
        Ok(self.put_new(key, fingerprint, token, None, in_flight))
    }

    async fn settle(
        &self,
        key: &str,
        fingerprint: &str,
        answer: &StoredAnswer,
        ttl: Duration,
    ) -> Result<Claim, String> {
        let found = self.put_new(key, fingerprint, "", Some(answer.clone()), ttl);
        if found == Claim::Run {
            self.notify.notify_waiters();
        }
        Ok(found)
    }

    async fn complete(
        &self,
        key: &str,
        _fingerprint: &str,
        token: &str,
        answer: &StoredAnswer,
        ttl: Duration,
    ) -> Result<(), String> {
        if let Some(entry) = self.entries().get_mut(key) {
            if entry.token == token {
                entry.answer = Some(answer.clone());
                entry.expires = Instant::now() + ttl;
            }
        }
        self.notify.notify_waiters();
        Ok(())
    }

    async fn abandon(&self, key: &str, token: &str) -> Result<(), String> {
        {
            let mut entries = self.entries();
            if entries.get(key).is_some_and(|e| e.token == token) {
                entries.remove(key);
            }
        }
        self.notify.notify_waiters();
        Ok(())
    }

    async fn changed(&self) {
        // Bounded: a notification between the waiter's claim and this
        // call is missed, so look again soon anyway.
        let _ = tokio::time::timeout(Duration::from_millis(20), self.notify.notified()).await;
    }
}

/// The shared store: one Redis string per key, so the hot path needs no
/// script. A claim is `c`, the fingerprint and the token; an answer is `a`,
/// the fingerprint and the encoded answer. Claims (`SET NX GET`, Redis 7.0
/// or later) and answers go through the [`Batcher`], so under load a whole
/// batch of calls costs Redis one read and one write.
pub struct RedisDedup {
    conn: redis::aio::ConnectionManager,
    batch: Batcher,
    prefix: String,
    abandon: redis::Script,
}

/// Hex SHA-256.
const FINGERPRINT_LEN: usize = 64;

impl RedisDedup {
    /// Connects lazily, so the server starts while Redis is down; needs a
    /// Tokio runtime (the batching task).
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, String> {
        let client = redis::Client::open(url).map_err(|e| e.to_string())?;
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout));
        let conn = redis::aio::ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            batch: Batcher::spawn(conn.clone()),
            conn,
            prefix: prefix.to_owned(),
            abandon: redis::Script::new(include_str!("scripts/dedup_abandon.lua")),
        })
    }

    /// `v2`: the string layout; records of the earlier hash layout are
    /// never read as these (a retry across a rolling upgrade runs again and
    /// the pipeline's own idempotency answers it).
    fn record(&self, key: &str) -> String {
        format!("{}:dedup:v2:{key}", self.prefix)
    }

    /// `SET record NX GET`: one round trip that both writes a new record
    /// and reads the one that stopped it.
    async fn put_new(
        &self,
        key: &str,
        fingerprint: &str,
        record: Vec<u8>,
        lasts: Duration,
    ) -> Result<Claim, String> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.record(key))
            .arg(record)
            .arg("NX")
            .arg("PX")
            .arg(millis(lasts))
            .arg("GET");
        match self.batch.query(cmd).await.map_err(redis_error)? {
            redis::Value::Nil => Ok(Claim::Run),
            redis::Value::BulkString(found) => read_record(&found, fingerprint),
            other => Err(format!("unexpected dedup claim reply {other:?}")),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// The start of a record: its kind (`c` claim, `a` answer) and the
/// request's fingerprint; `rest` more bytes follow.
fn new_record(kind: u8, fingerprint: &str, rest: usize) -> Vec<u8> {
    let mut record = Vec::with_capacity(1 + fingerprint.len() + rest);
    record.push(kind);
    record.extend_from_slice(fingerprint.as_bytes());
    record
}

fn answer_record(fingerprint: &str, answer: &StoredAnswer) -> Vec<u8> {
    // The body plus room for the status, lengths and a few headers.
    let mut record = new_record(b'a', fingerprint, 64 + answer.body.len());
    answer.encode(&mut record);
    record
}

/// What a record found by a claim says to a request with `fingerprint`.
fn read_record(record: &[u8], fingerprint: &str) -> Result<Claim, String> {
    let Some((&kind, rest)) = record.split_first() else {
        return Err("empty dedup record".into());
    };
    let Some((found, rest)) = rest.split_at_checked(FINGERPRINT_LEN) else {
        return Err("dedup record too short".into());
    };
    if found != fingerprint.as_bytes() {
        return Ok(Claim::Mismatch);
    }
    match kind {
        b'c' => Ok(Claim::InFlight),
        b'a' => StoredAnswer::decode(rest).map(Claim::Done),
        other => Err(format!("unknown dedup record kind {other}")),
    }
}

fn redis_error(err: redis::RedisError) -> String {
    if err.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
        && err.to_string().contains("syntax error")
    {
        return format!("{err} (dedup needs Redis 7.0 or later: SET with NX and GET)");
    }
    err.to_string()
}

#[async_trait]
impl DedupStore for RedisDedup {
    async fn claim(
        &self,
        key: &str,
        fingerprint: &str,
        token: &str,
        in_flight: Duration,
    ) -> Result<Claim, String> {
        let mut claim = new_record(b'c', fingerprint, token.len());
        claim.extend_from_slice(token.as_bytes());
        self.put_new(key, fingerprint, claim, in_flight).await
    }

    async fn settle(
        &self,
        key: &str,
        fingerprint: &str,
        answer: &StoredAnswer,
        ttl: Duration,
    ) -> Result<Claim, String> {
        self.put_new(key, fingerprint, answer_record(fingerprint, answer), ttl)
            .await
    }

    /// Overwrites the claim without checking its token: the claim outlives
    /// the call by a margin (`DedupTimes::in_flight`) and the server's
    /// timeout ends the call first, so the claim is still this call's.
    async fn complete(
        &self,
        key: &str,
        fingerprint: &str,
        _token: &str,
        answer: &StoredAnswer,
        ttl: Duration,
    ) -> Result<(), String> {
        let mut cmd = redis::cmd("SET");
        cmd.arg(self.record(key))
            .arg(answer_record(fingerprint, answer))
            .arg("PX")
            .arg(millis(ttl));
        self.batch.query(cmd).await.map(|_| ()).map_err(redis_error)
    }

    /// Rare (transient answers only), so a script rather than the batch.
    async fn abandon(&self, key: &str, token: &str) -> Result<(), String> {
        let mut conn = self.conn.clone();
        self.abandon
            .key(self.record(key))
            .arg(token)
            .invoke_async::<i64>(&mut conn)
            .await
            .map(|_| ())
            .map_err(redis_error)
    }

    async fn changed(&self) {
        tokio::time::sleep(Duration::from_millis(5)).await;
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
}

impl DedupLayer {
    pub fn new(store: Arc<dyn DedupStore>, switches: Switches, times: DedupTimes) -> Self {
        Self {
            store,
            switches,
            times,
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
        let header = |name: &str| {
            request
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let key = match (header(UserId::METADATA), header(IdempotencyKey::METADATA)) {
            (Some(user), Some(key))
                if self.layer.switches.load().dedup && request.uri().path() == DEDUP_PATH =>
            {
                record_key(&user, &key)
            }
            // No key, another call, or switched off: nothing to dedup (the
            // handler validates missing metadata).
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
            if let Some(answer) = instant_answer(&mut inner, &parts, &body).await? {
                match store.settle(&key, &fingerprint, &answer, times.ttl).await {
                    Ok(Claim::Run) => {
                        crate::metrics::decision("dedup", "first");
                        crate::metrics::decision("gate", "sold_out_fast_path");
                        return Ok(answer.to_response());
                    }
                    Ok(claim) => found = Some(claim),
                    Err(err) => {
                        crate::metrics::decision("dedup", "store_unavailable");
                        crate::metrics::decision("gate", "sold_out_fast_path");
                        tracing::warn!(error = %err, "dedup store unreachable; answering without it");
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
                        let response = inner.call(rebuilt()).await?;
                        return Ok(
                            finish(&*store, &key, &fingerprint, &token, times, response).await
                        );
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
                        tracing::warn!(error = %err, "dedup store unreachable; running the call without it");
                        return inner.call(rebuilt()).await;
                    }
                }
            }
        })
    }
}

/// Marks a request the service should answer only if it can do so at
/// once and without changing anything; otherwise it answers with
/// [`NOT_INSTANT`] in the headers.
#[derive(Debug, Clone, Copy)]
pub struct InstantOnly;

/// The header of the answer to an [`InstantOnly`] request that needs a
/// real run. It never leaves the server: this layer consumes that answer.
pub const NOT_INSTANT: &str = "x-stockgate-not-instant";

/// The answer to an [`InstantOnly`] request that needs a real run.
pub fn not_instant() -> tonic::Status {
    let mut status = tonic::Status::unavailable("not answerable at once");
    status.metadata_mut().insert(
        NOT_INSTANT,
        tonic::metadata::MetadataValue::from_static("1"),
    );
    status
}

/// Asks `inner` for an at-once answer to the request (`parts`, `body`);
/// `None` when it needs a real run or the answer is not one to keep.
async fn instant_answer<S>(
    inner: &mut S,
    parts: &http::request::Parts,
    body: &Bytes,
) -> Result<Option<StoredAnswer>, S::Error>
where
    S: Service<HttpRequest, Response = http::Response<tonic::body::Body>> + Clone,
{
    let mut probe = http::Request::new(tonic::body::Body::new(http_body_util::Full::new(
        body.clone(),
    )));
    *probe.method_mut() = parts.method.clone();
    *probe.uri_mut() = parts.uri.clone();
    *probe.version_mut() = parts.version;
    *probe.headers_mut() = parts.headers.clone();
    *probe.extensions_mut() = parts.extensions.clone();
    probe.extensions_mut().insert(InstantOnly);
    // A clone of its own, polled ready: `inner` stays ready for the real
    // call that may follow.
    let mut service = inner.clone();
    let response = tower::ServiceExt::ready(&mut service)
        .await?
        .call(probe)
        .await?;
    if response.headers().contains_key(NOT_INSTANT) {
        return Ok(None);
    }
    Ok(StoredAnswer::capture(response)
        .await
        .ok()
        .filter(StoredAnswer::is_final))
}

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
    let stored = if answer.is_final() {
        store
            .complete(key, fingerprint, token, &answer, times.ttl)
            .await
    } else {
        store.abandon(key, token).await
    };
    if let Err(err) = stored {
        tracing::warn!(error = %err, "dedup answer not stored; a retry will run again");
    }
    answer.to_response()
}

#[cfg(test)]
mod tests {
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
            store.settle("k", "fp", &answer(0), long).await,
            Ok(Claim::Run)
        );
        assert_eq!(
            store.claim("k", "fp", "t1", long).await,
            Ok(Claim::Done(answer(0)))
        );
        // The first answer stays; another request is a mismatch.
        assert_eq!(
            store.settle("k", "fp", &answer(5), long).await,
            Ok(Claim::Done(answer(0)))
        );
        assert_eq!(
            store.settle("k", "other", &answer(5), long).await,
            Ok(Claim::Mismatch)
        );
        // A running call's claim is not overwritten.
        assert_eq!(store.claim("j", "fp", "t1", long).await, Ok(Claim::Run));
        assert_eq!(
            store.settle("j", "fp", &answer(0), long).await,
            Ok(Claim::InFlight)
        );
    }

    #[test]
    fn only_final_answers_are_kept_and_they_replay_identically() {
        assert!(answer(0).is_final());
        assert!(answer(3).is_final());
        assert!(!answer(14).is_final(), "UNAVAILABLE is retried");
        assert!(!answer(10).is_final(), "ABORTED is retried");
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
