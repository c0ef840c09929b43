//! The order processor: takes admitted orders off the queue in batches,
//! has the pipeline commit them, and lets them go only once done. One
//! loop for every backend ([`OrderSource`]); with a partitioned queue, one
//! per partition this processor holds ([`partitions`]).

mod partitions;

pub(crate) use partitions::{run_partitioned, Partitioned};

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use tokio::sync::watch;

use crate::{
    queue::{encode, OrderSource},
    reserve::Pipeline,
};

/// The single order processor: batches of up to `batch_size`, waiting at
/// most `linger` to fill one. Orders it gave up on are set aside (the
/// dead-letter queue) before the batch is acknowledged, so a crash at any
/// point delivers them again and the database's idempotency absorbs the
/// repeat. On `stop` a source that redelivers is left after the batch in
/// hand; one that does not (in memory) is drained to its end.
pub(crate) async fn run_processor(
    pipeline: Arc<Pipeline>,
    source: Box<dyn OrderSource>,
    batch_size: usize,
    linger: Duration,
    stop: watch::Receiver<bool>,
) {
    let activity = Arc::new(Activity::default());
    run_watched(pipeline, source, batch_size, linger, stop, activity).await;
}

/// What a processor loop shows of itself to the one that started it.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    /// Waiting for orders with none in hand (every batch taken so far is
    /// acknowledged or handed back).
    waiting: AtomicBool,
    /// Batches taken so far.
    batches: AtomicU64,
}

impl Activity {
    /// Batches taken so far, if the loop waits for orders with none in
    /// hand.
    pub(crate) fn idle_after(&self) -> Option<u64> {
        let batches = self.batches.load(Ordering::Acquire);
        self.waiting.load(Ordering::Acquire).then_some(batches)
    }
}

/// [`run_processor`], showing its [`Activity`].
pub(crate) async fn run_watched(
    pipeline: Arc<Pipeline>,
    mut source: Box<dyn OrderSource>,
    batch_size: usize,
    linger: Duration,
    mut stop: watch::Receiver<bool>,
    activity: Arc<Activity>,
) {
    let leave_on_stop = source.redelivers();
    loop {
        activity.waiting.store(true, Ordering::Release);
        let taken = if leave_on_stop {
            tokio::select! {
                taken = source.next_batch(batch_size, linger) => taken,
                _ = stop.wait_for(|stop| *stop) => None,
            }
        } else {
            source.next_batch(batch_size, linger).await
        };
        // Counted before `waiting` drops, so an observer that saw the
        // loop waiting twice with one count saw no batch in between.
        activity.batches.fetch_add(1, Ordering::AcqRel);
        activity.waiting.store(false, Ordering::Release);
        let Some(batch) = taken else {
            break;
        };
        let mut unfinished = false;
        for message in &batch.unreadable {
            tracing::error!(reason = %message.reason, "undecodable order message; setting it aside");
            let recorded = match &message.salvaged {
                Some(order) => pipeline.reject_unprocessable(order, &message.reason).await,
                None => true,
            };
            unfinished |= !recorded
                || !set_aside(
                    source.as_mut(),
                    &message.message,
                    &message.reason,
                    "unreadable",
                )
                .await;
        }
        let outcome = if batch.orders.is_empty() {
            Default::default()
        } else {
            pipeline.process_batch(&batch.orders).await
        };
        unfinished |= outcome.incomplete;
        for (order, reason) in outcome.given_up {
            unfinished |= !set_aside(source.as_mut(), &encode(&order), &reason, "given_up").await;
        }
        if unfinished {
            source.hand_back(batch).await;
            continue;
        }
        for &through in &batch.passes {
            pipeline.pass_tickets(through).await;
        }
        if let Err(err) = source.acknowledge(&batch).await {
            tracing::warn!(error = %err, "batch committed but not acknowledged; it will be delivered again");
        }
    }
    source.close().await;
}

/// Sets a message aside, counted by `cause`; false if it was not.
async fn set_aside(
    source: &mut dyn OrderSource,
    message: &[u8],
    reason: &str,
    cause: &'static str,
) -> bool {
    match source.set_aside(message, reason).await {
        Ok(()) => {
            crate::metrics::set_aside(cause);
            true
        }
        Err(err) => {
            tracing::error!(error = %err, "message not set aside; the batch will be delivered again");
            false
        }
    }
}
