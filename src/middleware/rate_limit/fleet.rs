//! The rate limits of the whole fleet: budgets shared by every replica
//! (`backends.rate_limit`), so a user gets at most their limit however
//! many replicas their calls reach. Each replica's own limits (same rates)
//! stay in front as a filter that costs no round trip: calls one replica
//! alone sees over the rates are refused there. (A call the fleet refuses
//! has spent the replica's budget too, so the filter errs towards refusing
//! a little early, never towards letting more through.)

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use async_trait::async_trait;
use redis::{ErrorKind, ServerErrorKind, Value};
use tokio::sync::{mpsc, oneshot};

use crate::{
    batching::{self, Limits},
    domain::switches::RateSettings,
};

/// A fleet budget's refusal: which one, and when the call would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetOver {
    /// "user" or "global".
    pub scope: &'static str,
    pub retry_after: Duration,
}

/// Budgets kept for the whole fleet.
#[async_trait]
pub trait FleetLimits: Send + Sync {
    /// Spends one call of `user` from the user's and the global budget at
    /// `rates`, both or neither; `Ok(None)` when both had room. `Err` when
    /// the budgets cannot be reached (the caller decides what that means).
    async fn spend(&self, user: &str, rates: RateSettings) -> Result<Option<FleetOver>, String>;
}

/// At most 256 calls per script run: enough to amortise the round trip and
/// the script call, small enough that one run never holds Redis long; two
/// runs on the wire, as for [`crate::redis_batch`].
const LIMITS: Limits = Limits {
    max_batch: 256,
    in_flight: 2,
    queued: 8_192,
};
/// After a failure the fleet is not asked for this long (one call then
/// tries again), so an outage costs callers nothing but the replica's
/// own decision, not a timeout each.
const BACK_OFF: Duration = Duration::from_secs(1);

struct Job {
    user: String,
    rates: RateSettings,
    reply: oneshot::Sender<Result<Option<FleetOver>, String>>,
}

/// The fleet's budgets in Redis: the calls waiting at a moment are decided
/// together by one run of `fleet.lua` (one round trip, one script call,
/// one read and write of the global cell for all of them), each still
/// getting its own answer.
pub struct RedisFleetLimits {
    jobs: mpsc::Sender<Job>,
    origin: String,
    /// Longest a call waits for the fleet's answer, reconnecting included.
    timeout: Duration,
    /// Until when (ms since `started`) the fleet is not asked.
    skip_until_ms: AtomicU64,
    started: Instant,
}

impl RedisFleetLimits {
    /// Connects lazily, so the server starts while Redis is down; needs a
    /// Tokio runtime (the batching task, which ends with this value).
    pub fn new(
        url: impl Into<crate::config::secrets::LiveUrl>,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let url = url.into();
        let origin = url.describe("backends.rate_limit");
        let conn = crate::redis_client::connect_timed(&url, timeout, "backends.rate_limit")?;
        let runner = Arc::new(Runner {
            mark_ms: mark_ms(&conn, timeout),
            conn,
            script: redis::Script::new(include_str!("fleet.lua")),
            // One hash slot for every cell, as a script needs on a cluster;
            // the tag comes before the user id, so no id can choose it.
            prefix: format!("{prefix}:{{rl}}"),
            origin: origin.clone(),
        });
        let jobs = batching::spawn(LIMITS, move |batch| {
            let runner = Arc::clone(&runner);
            async move { runner.send(batch).await }
        });
        Ok(Self {
            jobs,
            origin,
            timeout,
            skip_until_ms: AtomicU64::new(0),
            started: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

#[async_trait]
impl FleetLimits for RedisFleetLimits {
    async fn spend(&self, user: &str, rates: RateSettings) -> Result<Option<FleetOver>, String> {
        let skip_until = self.skip_until_ms.load(Ordering::Relaxed);
        let now = self.now_ms();
        // Backing off: only the call that moves the mark on tries Redis.
        if now < skip_until
            || (skip_until > 0
                && self
                    .skip_until_ms
                    .compare_exchange(
                        skip_until,
                        now + ms(BACK_OFF),
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_err())
        {
            return Err(format!(
                "backing off after a failure (Redis at {})",
                self.origin
            ));
        }
        let (reply, answer) = oneshot::channel();
        let job = Job {
            user: user.to_owned(),
            rates,
            reply,
        };
        // The connection's own timeouts apply per attempt, and it retries a
        // lost connection several times: a call waits for one bound.
        let result = tokio::time::timeout(self.timeout, async {
            self.jobs.send(job).await.map_err(|_| gone())?;
            answer.await.map_err(|_| gone())?
        })
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer within {:?} (Redis at {})",
                self.timeout, self.origin
            ))
        });
        match &result {
            Ok(_) => self.skip_until_ms.store(0, Ordering::Relaxed),
            Err(_) => self
                .skip_until_ms
                .store(self.now_ms() + ms(BACK_OFF), Ordering::Relaxed),
        }
        result
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn gone() -> String {
    "the fleet rate limit task has stopped".into()
}

/// How long a batch's answers stay in Redis for a resend of it. The
/// cluster client sends a resend only while its caller waits, at most the
/// connection's overall response timeout (`timeout`, which also bounds
/// its retries); one sent just before then may still spend a while in TCP
/// retransmission or behind a stalled server, hence twice that plus five
/// seconds, while keeping few marks alive (one per batch). One server's
/// client never resends (a lost connection fails the command): no mark, 0.
fn mark_ms(conn: &crate::redis_client::RedisConn, timeout: Duration) -> u64 {
    if !conn.is_cluster() {
        return 0;
    }
    ms(timeout).saturating_mul(2).saturating_add(5_000)
}

/// The task that owns the connection and sends the batches.
struct Runner {
    conn: crate::redis_client::RedisConn,
    script: redis::Script,
    /// See [`mark_ms`].
    mark_ms: u64,
    /// `<redis.key_prefix>:{rl}`: one hash slot for every cell.
    prefix: String,
    origin: String,
}

impl Runner {
    /// One run of the script for a batch: `batch_id` names it, so a resend
    /// of the same run answers from the first one's mark.
    fn invocation<'a>(
        &'a self,
        rates: RateSettings,
        batch_id: &str,
        users: impl Iterator<Item = &'a str>,
    ) -> redis::ScriptInvocation<'a> {
        let per_user_us = rates.per_user_period_ms.max(1).saturating_mul(1_000);
        let global_us = 1_000_000.0 / f64::from(rates.global_per_sec.max(1));
        // The rates are part of the cells' names: new rates start every
        // budget full, as they do on each replica, and a cell is never read
        // at rates other than its own.
        let mut invocation = self.script.prepare_invoke();
        invocation
            .key(format!(
                "{}:g:{}x{}",
                self.prefix, rates.global_per_sec, rates.global_burst
            ))
            .key(format!("{}:b:{batch_id}", self.prefix));
        let user_prefix = format!(
            "{}:u:{}x{}:",
            self.prefix, rates.per_user_period_ms, rates.per_user_burst
        );
        for user in users {
            invocation.key(format!("{user_prefix}{user}"));
        }
        invocation
            .arg(per_user_us)
            .arg(rates.per_user_burst.max(1))
            .arg(global_us)
            .arg(rates.global_burst.max(1))
            .arg(self.mark_ms);
        invocation
    }

    async fn send(&self, mut batch: Vec<Job>) {
        // A caller that gave up (its timeout, a cancelled call) must not
        // spend the budget when Redis comes back.
        batch.retain(|job| !job.reply.is_closed());
        if batch.is_empty() {
            return;
        }
        // The rates in force when the batch leaves (a change of rates
        // reaches every caller within a batch or two).
        let rates = batch[batch.len() - 1].rates;
        let batch_id = uuid::Uuid::now_v7().simple().to_string();
        let users = batch.iter().map(|job| job.user.as_str());
        let invocation = self.invocation(rates, &batch_id, users);
        let mut conn = self.conn.clone();
        // invoke_async loads the script after NOSCRIPT (a restart, a SCRIPT
        // FLUSH) and sends it again; the run that failed changed nothing.
        let result = match invocation.invoke_async::<Value>(&mut conn).await {
            Err(err) if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                invocation.invoke_async::<Value>(&mut conn).await
            }
            other => other,
        };
        match result.map_err(|e| format!("{e} (Redis at {})", self.origin)) {
            Ok(reply) => match read_reply(&reply, batch.len()) {
                Ok(decisions) => {
                    for (job, decision) in batch.into_iter().zip(decisions) {
                        let _ = job.reply.send(Ok(decision));
                    }
                }
                Err(why) => fail_all(batch, &why),
            },
            Err(why) => fail_all(batch, &why),
        }
    }
}

fn fail_all(batch: Vec<Job>, why: &str) {
    for job in batch {
        let _ = job.reply.send(Err(why.to_owned()));
    }
}

/// The script's answer: two numbers per call, in the batch's order.
fn read_reply(reply: &Value, calls: usize) -> Result<Vec<Option<FleetOver>>, String> {
    let unexpected = || format!("unexpected rate limit reply {reply:?}");
    let Value::Array(parts) = reply else {
        return Err(unexpected());
    };
    if parts.len() != calls * 2 {
        return Err(unexpected());
    }
    parts
        .chunks(2)
        .map(|pair| {
            let (Value::Int(code), Value::Int(wait_us)) = (&pair[0], &pair[1]) else {
                return Err(unexpected());
            };
            let scope = match code {
                0 => return Ok(None),
                1 => "user",
                2 => "global",
                _ => return Err(unexpected()),
            };
            Ok(Some(FleetOver {
                scope,
                retry_after: Duration::from_micros(u64::try_from(*wait_us).unwrap_or(0)),
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_read_as_decisions() {
        let reply = Value::Array(
            [0, 0, 1, 250_000, 2, 7]
                .into_iter()
                .map(Value::Int)
                .collect(),
        );
        let decisions = read_reply(&reply, 3).unwrap();
        assert_eq!(decisions[0], None);
        assert_eq!(
            decisions[1],
            Some(FleetOver {
                scope: "user",
                retry_after: Duration::from_millis(250)
            })
        );
        assert_eq!(decisions[2].unwrap().scope, "global");
        assert!(
            read_reply(&reply, 2).is_err(),
            "a count that does not match"
        );
        let odd = Value::Array(vec![Value::Int(3), Value::Int(0)]);
        assert!(read_reply(&odd, 1).is_err());
        assert!(read_reply(&Value::Nil, 0).is_err());
    }

    fn test_runner(conn: crate::redis_client::RedisConn, timeout: Duration) -> Runner {
        let prefix = format!("sg-unit-{}", uuid::Uuid::now_v7().simple());
        Runner {
            mark_ms: mark_ms(&conn, timeout),
            conn,
            script: redis::Script::new(include_str!("fleet.lua")),
            prefix: format!("{prefix}:{{rl}}"),
            origin: "test".into(),
        }
    }

    /// One run of a batch of users u1 and u2 under `batch_id`, at one call
    /// per user per minute.
    async fn run(runner: &Runner, batch_id: &str) -> Vec<Option<FleetOver>> {
        let rates = RateSettings {
            per_user_period_ms: 60_000,
            per_user_burst: 1,
            global_per_sec: 1_000,
            global_burst: 1_000,
        };
        let reply: Value = runner
            .invocation(rates, batch_id, ["u1", "u2"].into_iter())
            .invoke_async(&mut runner.conn.clone())
            .await
            .unwrap();
        read_reply(&reply, 2).unwrap()
    }

    async fn pttl(runner: &Runner, batch_id: &str) -> i64 {
        redis::cmd("PTTL")
            .arg(format!("{}:b:{batch_id}", runner.prefix))
            .query_async(&mut runner.conn.clone())
            .await
            .unwrap()
    }

    fn all_over(decisions: &[Option<FleetOver>]) -> bool {
        decisions
            .iter()
            .all(|d| d.is_some_and(|over| over.scope == "user"))
    }

    /// The cluster client sends a script again after a lost connection: a
    /// batch run twice under its id spends once and answers the same, its
    /// mark expiring after its bound; the next batch finds the budget spent.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_sent_twice_spends_once_on_a_cluster() {
        let timeout = Duration::from_secs(2);
        let url = crate::gate::redis_gate::tests::cluster_url();
        let conn = crate::redis_client::connect_timed(&url.as_str().into(), timeout, "test");
        let runner = test_runner(conn.unwrap(), timeout);
        assert_eq!(runner.mark_ms, 9_000);
        let first = run(&runner, "b1").await;
        assert_eq!(first, vec![None, None], "a full budget admits both");
        assert_eq!(
            run(&runner, "b1").await,
            first,
            "the resend answers as the first"
        );
        let lasts = pttl(&runner, "b1").await;
        assert!((1..=9_000).contains(&lasts), "the mark lasts {lasts} ms");
        let next = run(&runner, "b2").await;
        assert!(
            all_over(&next),
            "the budget was spent once, by b1: {next:?}"
        );
    }

    /// One server's client never resends: its batches leave no mark, and a
    /// batch run twice is two batches.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_on_one_server_leave_no_mark() {
        let timeout = Duration::from_secs(2);
        let url = std::env::var("STOCKGATE_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        let conn = crate::redis_client::connect_timed(&url.as_str().into(), timeout, "test");
        let runner = test_runner(conn.unwrap(), timeout);
        assert_eq!(runner.mark_ms, 0);
        assert_eq!(run(&runner, "b1").await, vec![None, None]);
        assert_eq!(pttl(&runner, "b1").await, -2, "no mark key");
        assert!(all_over(&run(&runner, "b1").await));
    }
}
