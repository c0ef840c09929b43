//! The dedup store shared by every replica, on Redis.

use std::time::Duration;

use async_trait::async_trait;

use crate::redis_batch::Batcher;

use super::{Claim, DedupStore, StoredAnswer, FINGERPRINT_LEN};

/// Hash slots the records spread over on a cluster: enough to spread
/// them over the masters, few enough that a batch of claims is a handful
/// of pipelines.
const CLUSTER_BUCKETS: u16 = 16;

/// The shared store: one Redis string per key, so the hot path needs no
/// script. A claim is `c`, the fingerprint and the token; an answer is `a`,
/// the fingerprint and the encoded answer. Claims (`SET NX GET`, Redis 7.0
/// or later) and answers go through the `Batcher`, so under load a whole
/// batch of calls costs Redis one read and one write.
pub struct RedisDedup {
    conn: crate::redis_client::RedisConn,
    batch: Batcher,
    /// Which keys decide how connections are made, for errors.
    origin: String,
    prefix: String,
    abandon: redis::Script,
    /// Longest one store operation may take, reconnecting included.
    timeout: Duration,
}

impl RedisDedup {
    /// Connects lazily, so the server starts while Redis is down; needs a
    /// Tokio runtime (the batching task).
    pub fn new(
        url: impl Into<crate::config::secrets::LiveUrl>,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let url = url.into();
        let origin = url.describe("backends.dedup");
        let conn = crate::redis_client::connect_timed(&url, timeout, "backends.dedup")?;
        Ok(Self {
            origin,
            batch: Batcher::spawn(conn.clone()),
            conn,
            prefix: prefix.to_owned(),
            abandon: redis::Script::new(include_str!("abandon.lua")),
            timeout,
        })
    }

    /// Runs one store operation within `timeout`. The connection's own
    /// response timeout bounds an answer, not a reconnection: while Redis
    /// refuses connections a call would wait out the client's reconnection
    /// attempts (seconds), where it should run without the store instead.
    async fn bounded<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, String>>,
    ) -> Result<T, String> {
        tokio::time::timeout(self.timeout, op)
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer within {:?} (Redis at {})",
                    self.timeout, self.origin
                ))
            })
    }

    /// `v2`: the string layout; records of the earlier hash layout are
    /// never read as these (a retry across a rolling upgrade runs again and
    /// the pipeline's own idempotency answers it). On a cluster each record
    /// carries one of [`CLUSTER_BUCKETS`] hash tags: a batch of calls then
    /// goes as at most that many pipelines (one per slot), not one per key.
    fn record(&self, key: &str) -> String {
        if self.conn.is_cluster() {
            let bucket = crate::redis_client::key_slot(key.as_bytes()) % CLUSTER_BUCKETS;
            format!("{0}:dedup:v2:{{{0}:d{bucket}}}:{key}", self.prefix)
        } else {
            format!("{}:dedup:v2:{key}", self.prefix)
        }
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
            .arg(&record)
            .arg("NX")
            .arg("PX")
            .arg(millis(lasts))
            .arg("GET");
        let reply = self.bounded(async {
            self.batch
                .query_if_awaited(cmd)
                .await
                .map_err(|e| redis_error(e, &self.origin))
        });
        match reply.await? {
            redis::Value::Nil => Ok(Claim::Run),
            // This very claim, sent again after a lost connection (a
            // cluster client resends): a claim carries its call's token,
            // so only this call wrote these bytes. (Two calls can store
            // identical answers: those are replays.)
            redis::Value::BulkString(found) if found == record && found.first() == Some(&b'c') => {
                Ok(Claim::Run)
            }
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
pub(super) fn new_record(kind: u8, fingerprint: &str, rest: usize) -> Vec<u8> {
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
pub(super) fn read_record(record: &[u8], fingerprint: &str) -> Result<Claim, String> {
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

/// Errors of the connection (not of a command) name the keys that decide
/// how it is made.
fn redis_error(err: redis::RedisError, origin: &str) -> String {
    match err.kind() {
        redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError)
            if err.to_string().contains("syntax error") =>
        {
            format!("{err} (dedup needs Redis 7.0 or later: SET with NX and GET)")
        }
        redis::ErrorKind::Server(_) => err.to_string(),
        _ => format!("{err} (Redis at {origin})"),
    }
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

    async fn store_first(
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
        self.bounded(async {
            self.batch
                .query(cmd)
                .await
                .map(|_| ())
                .map_err(|e| redis_error(e, &self.origin))
        })
        .await
    }

    /// Rare (transient answers only), so a script rather than the batch.
    async fn abandon(&self, key: &str, token: &str) -> Result<(), String> {
        let mut conn = self.conn.clone();
        self.bounded(async {
            self.abandon
                .key(self.record(key))
                .arg(token)
                .invoke_async::<i64>(&mut conn)
                .await
                .map(|_| ())
                .map_err(|e| redis_error(e, &self.origin))
        })
        .await
    }

    async fn changed(&self) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[cfg(test)]
mod tests {
    //! Against the real Redis on 127.0.0.1:6379 (`STOCKGATE_TEST_REDIS_URL`
    //! overrides), under a key prefix of the test's own.
    use super::*;

    /// The cluster client sends a command again after a lost connection:
    /// a claim that finds the very record it wrote is still its own, and
    /// another call's claim on the key is not.
    #[tokio::test]
    async fn a_claim_sent_twice_is_still_its_own() {
        let url = std::env::var("STOCKGATE_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let prefix = format!("sg-unit-{}", uuid::Uuid::now_v7().simple());
        let dedup = RedisDedup::new(url.as_str(), &prefix, Duration::from_secs(5)).unwrap();
        let fingerprint = "f".repeat(FINGERPRINT_LEN);
        let lasts = Duration::from_secs(30);
        let first = dedup.claim("k", &fingerprint, "token-1", lasts).await;
        let again = dedup.claim("k", &fingerprint, "token-1", lasts).await;
        let other = dedup.claim("k", &fingerprint, "token-2", lasts).await;
        assert!(matches!(first, Ok(Claim::Run)), "{first:?}");
        assert!(matches!(again, Ok(Claim::Run)), "{again:?}");
        assert!(matches!(other, Ok(Claim::InFlight)), "{other:?}");
    }
}
