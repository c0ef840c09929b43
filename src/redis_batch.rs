//! Auto-pipelining for the per-call Redis commands.
//!
//! On a loaded server every Reserve sends Redis a small command or two.
//! [`Batcher`] queues them from every caller ([`crate::batching`]) and sends
//! whatever has gathered as one pipeline: one write and one read for the
//! lot, each caller still getting its own reply.
//!
//! A pipeline is not a transaction: each command stays atomic on its own,
//! as if sent alone, so callers need no new reasoning.

use redis::{aio::ConnectionManager, Cmd, RedisError, RedisResult, Value};
use tokio::sync::{mpsc, oneshot};

use crate::batching::{self, Limits};

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
}

/// A handle to the batching task; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    jobs: mpsc::Sender<Job>,
}

impl Batcher {
    /// Starts the task that owns the batching (it ends when the last handle
    /// is dropped). `conn` reconnects by itself after a loss.
    pub fn spawn(conn: ConnectionManager) -> Self {
        let jobs = batching::spawn(LIMITS, move |batch| {
            let mut conn = conn.clone();
            async move { send(&mut conn, batch).await }
        });
        Self { jobs }
    }

    /// Sends `cmd` with whatever else is waiting and returns its own reply;
    /// a Redis error reply comes back as `Err`, as for a direct call.
    pub async fn query(&self, cmd: Cmd) -> RedisResult<Value> {
        let (reply, answer) = oneshot::channel();
        self.jobs
            .send(Job { cmd, reply })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

fn gone() -> RedisError {
    RedisError::from(std::io::Error::other("the redis batching task has stopped"))
}

async fn send(conn: &mut ConnectionManager, batch: Vec<Job>) {
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut replies = Vec::with_capacity(batch.len());
    for job in batch {
        pipe.add_command(job.cmd);
        replies.push(job.reply);
    }
    match pipe.query_async::<Vec<Value>>(conn).await {
        Ok(values) if values.len() == replies.len() => {
            for (reply, value) in replies.into_iter().zip(values) {
                let result = match value {
                    Value::ServerError(err) => Err(RedisError::from(err)),
                    value => Ok(value),
                };
                // A caller that gave up (deadline, cancel) has dropped its
                // receiver; its reply has nowhere to go.
                let _ = reply.send(result);
            }
        }
        Ok(values) => {
            let why = format!(
                "redis answered {} replies to {} commands",
                values.len(),
                replies.len()
            );
            fail_all(replies, &why)
        }
        // The whole pipeline failed (connection lost, timeout): every
        // command in it gets the error; which ran is unknown, exactly as
        // for a direct call whose reply was lost.
        Err(err) => fail_all(replies, &err.to_string()),
    }
}

fn fail_all(replies: Vec<oneshot::Sender<RedisResult<Value>>>, why: &str) {
    for reply in replies {
        let _ = reply.send(Err(RedisError::from(std::io::Error::other(why.to_owned()))));
    }
}
