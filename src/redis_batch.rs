//! Auto-pipelining for the per-call Redis commands.
//!
//! On a loaded server every Reserve sends Redis a small command or two.
//! [`Batcher`] queues them from every caller ([`crate::batching`]) and sends
//! whatever has gathered as one pipeline: one write and one read for the
//! lot, each caller still getting its own reply.
//!
//! A pipeline is not a transaction: each command stays atomic on its own,
//! as if sent alone, so callers need no new reasoning.

use futures::StreamExt;
use redis::{Cmd, RedisError, RedisResult, Value};
use tokio::sync::{mpsc, oneshot};

use crate::{
    batching::{self, Limits},
    redis_client::RedisConn,
};

/// Most commands in one pipeline: enough to amortise a round trip, small
/// enough that one batch's reply never holds Redis for long. Two batches on
/// the wire keep Redis busy while the previous batch's replies are handed
/// out; more would only make batches smaller.
const LIMITS: Limits = Limits {
    max_batch: 256,
    in_flight: 2,
    queued: 8_192,
};

struct Job {
    cmd: Cmd,
    reply: oneshot::Sender<RedisResult<Value>>,
    /// Not sent once its caller stopped waiting.
    wanted_only: bool,
}

/// A handle to the batching task; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    jobs: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the task that owns the batching (it ends when the last handle
    /// is dropped). `conn` reconnects by itself after a loss.
    pub fn spawn(conn: RedisConn) -> Self {
        let jobs = batching::spawn(LIMITS, move |batch| {
            let conn = conn.clone();
            async move { send(&conn, batch).await }
        });
        Self { jobs }
    }

    /// Sends `cmd` with whatever else is waiting and returns its own reply;
    /// a Redis error reply comes back as `Err`, as for a direct call.
    pub async fn query(&self, cmd: Cmd) -> RedisResult<Value> {
        self.send_job(cmd, false).await
    }

    /// As [`Batcher::query`], but not sent at all if its caller stopped
    /// waiting before its batch left (its own timeout, a cancelled call):
    /// for a command that must not take effect unseen, such as a dedup
    /// claim, which would hold its key for a call that went on without it.
    pub async fn query_if_awaited(&self, cmd: Cmd) -> RedisResult<Value> {
        self.send_job(cmd, true).await
    }

    async fn send_job(&self, cmd: Cmd, wanted_only: bool) -> RedisResult<Value> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job {
                cmd,
                reply,
                wanted_only,
            })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

fn gone() -> RedisError {
    RedisError::from(std::io::Error::other("the redis batching task has stopped"))
}

/// One pipeline for the batch (on a cluster, one per hash slot, all at
/// once).
async fn send(conn: &RedisConn, mut batch: Vec<Job>) {
    batch.retain(|job| !(job.wanted_only && job.reply.is_closed()));
    if batch.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    let mut replies = Vec::with_capacity(batch.len());
    for job in batch {
        pipe.add_command(job.cmd);
        replies.push(job.reply);
    }
    // Each caller hears as soon as its own group is answered. A caller
    // that gave up (deadline, cancel) has dropped its receiver; its reply
    // has nowhere to go.
    let mut replies: Vec<Option<_>> = replies.into_iter().map(Some).collect();
    let mut groups = conn.query_groups(pipe);
    while let Some(answered) = groups.next().await {
        for (index, result) in answered {
            if let Some(reply) = replies[index].take() {
                let _ = reply.send(result);
            }
        }
    }
}
