//! Queue tickets, handed out in batches.
//!
//! Every published order takes a ticket from a PostgreSQL sequence, so a
//! caller can be told its place in line and every replica counts from the
//! same line. Taken one per call, each Reserve waited for a pooled
//! connection and a round trip of its own: with 64 calls in flight that
//! wait (6–8 ms) outweighed the broker's confirm (3–4 ms). [`Tickets`]
//! takes whatever calls are waiting in one statement instead.

use std::sync::{Arc, OnceLock};

use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::store::Store;

/// Most tickets one statement takes.
const MAX_BATCH: usize = 512;
/// Statements running at once. With two, a batch can start while the
/// other is out; their tickets may interleave, so arrival order holds
/// within a batch only, which positions tolerate (see architecture.md).
const IN_FLIGHT: usize = 2;
/// Callers waiting for a batch; a full queue makes callers wait.
const QUEUED: usize = 8_192;

type Reply = oneshot::Sender<Result<u64, String>>;

pub struct Tickets {
    store: Store,
    /// Started on first use, so the queue can be built outside a runtime.
    jobs: OnceLock<mpsc::Sender<Reply>>,
}

impl Tickets {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            jobs: OnceLock::new(),
        }
    }

    /// The next ticket, taken together with every other caller's waiting
    /// now. Tickets in one batch follow the callers' arrival order.
    pub async fn next(&self) -> Result<u64, String> {
        let jobs = self.jobs.get_or_init(|| {
            let (jobs, queue) = mpsc::channel(QUEUED);
            tokio::spawn(run(self.store.clone(), queue));
            jobs
        });
        let (reply, answer) = oneshot::channel();
        jobs.send(reply).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

fn gone() -> String {
    "the ticket task has stopped".to_owned()
}

// Ends when the last `Tickets` handle is dropped.
async fn run(store: Store, mut queue: mpsc::Receiver<Reply>) {
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(MAX_BATCH);
        if queue.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return;
        }
        let store = store.clone();
        tokio::spawn(async move {
            hand_out(&store, batch).await;
            drop(permit);
        });
    }
}

async fn hand_out(store: &Store, batch: Vec<Reply>) {
    let failure = match store.next_tickets(batch.len()).await {
        Ok(tickets) if tickets.len() == batch.len() => {
            // A caller that gave up leaves a gap in the line; positions
            // only ever over-count by it.
            for (reply, ticket) in batch.into_iter().zip(tickets) {
                let _ = reply.send(Ok(ticket));
            }
            return;
        }
        Ok(tickets) => format!("asked for {} tickets, got {}", batch.len(), tickets.len()),
        Err(err) => err.to_string(),
    };
    for reply in batch {
        let _ = reply.send(Err(failure.clone()));
    }
}
