//! One task gathering many callers' small requests into batches.
//!
//! Several parts of the request path send a backend a little work per
//! call: Redis commands, fleet rate-limit cells, orders for RabbitMQ. Sent
//! one by one, each costs a round trip, a few syscalls and a wake-up on
//! both sides, and on a small machine those, not the backend's work, bound
//! throughput. [`spawn`] starts a task that takes whatever jobs are waiting
//! and hands them to one run of a handler; with no load a batch is a single
//! job and costs one channel hop more than a direct call.

use std::{future::Future, sync::Arc};

use tokio::sync::{mpsc, Semaphore};

/// How a batching task gathers.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most jobs handed to one handler run.
    pub max_batch: usize,
    /// Handler runs at once. The next batch starts gathering only when a
    /// run finishes, so with the backend busy, jobs pile up into a larger
    /// batch rather than into more round trips.
    pub in_flight: usize,
    /// Jobs waiting for a batch; a full queue makes callers wait (the load
    /// shedding layer bounds how many calls can be waiting at all).
    pub queued: usize,
}

/// Starts the task (it ends when the last sender is dropped) and returns
/// the sender callers queue their jobs on. `handle` answers every job of
/// its batch, each through whatever reply channel the job carries.
pub fn spawn<J, H, F>(limits: Limits, handle: H) -> mpsc::Sender<J>
where
    J: Send + 'static,
    H: Fn(Vec<J>) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let (jobs, queue) = mpsc::channel(limits.queued.max(1));
    tokio::spawn(run(limits, queue, handle));
    jobs
}

async fn run<J, H, F>(limits: Limits, mut queue: mpsc::Receiver<J>, handle: H)
where
    J: Send + 'static,
    H: Fn(Vec<J>) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let max_batch = limits.max_batch.max(1);
    let permits = Arc::new(Semaphore::new(limits.in_flight.max(1)));
    loop {
        // A permit first: jobs gather while the batches already out are.
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let mut batch = Vec::with_capacity(max_batch);
        if queue.recv_many(&mut batch, max_batch).await == 0 {
            return;
        }
        let work = handle(batch);
        tokio::spawn(async move {
            work.await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tokio::sync::{oneshot, Notify};

    use super::*;

    #[tokio::test]
    async fn jobs_waiting_while_a_batch_is_out_go_together_in_the_next() {
        let release = Arc::new(Notify::new());
        let runs = Arc::new(AtomicUsize::new(0));
        let limits = Limits {
            max_batch: 100,
            in_flight: 1,
            queued: 100,
        };
        let jobs = spawn(limits, {
            let (release, runs) = (release.clone(), runs.clone());
            move |batch: Vec<(u32, oneshot::Sender<usize>)>| {
                let (release, runs) = (release.clone(), runs.clone());
                async move {
                    // The first run holds until released, so the rest gather.
                    if runs.fetch_add(1, Ordering::SeqCst) == 0 {
                        release.notified().await;
                    }
                    let size = batch.len();
                    for (_, reply) in batch {
                        let _ = reply.send(size);
                    }
                }
            }
        });
        let (first, first_size) = oneshot::channel();
        jobs.send((0, first)).await.unwrap();
        // The first batch is out (alone) before the others arrive.
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let mut sizes = Vec::new();
        for n in 1..=10 {
            let (reply, size) = oneshot::channel();
            jobs.send((n, reply)).await.unwrap();
            sizes.push(size);
        }
        release.notify_one();
        assert_eq!(first_size.await.unwrap(), 1);
        for size in sizes {
            assert_eq!(size.await.unwrap(), 10);
        }
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_batch_holds_at_most_max_batch_jobs() {
        let limits = Limits {
            max_batch: 3,
            in_flight: 1,
            queued: 100,
        };
        let jobs = spawn(limits, |batch: Vec<oneshot::Sender<usize>>| async move {
            let size = batch.len();
            for reply in batch {
                let _ = reply.send(size);
            }
        });
        let mut sizes = Vec::new();
        for _ in 0..10 {
            let (reply, size) = oneshot::channel();
            jobs.send(reply).await.unwrap();
            sizes.push(size);
        }
        for size in sizes {
            assert!(size.await.unwrap() <= 3);
        }
    }
}
