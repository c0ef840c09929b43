//! The order processor: takes admitted orders off the queue in batches
//! and has the pipeline commit them, from the in-process queue or as
//! RabbitMQ's single active consumer (acking only what is settled).

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use crate::{
    queue::{decode, encode, salvage, EmbeddedReceiver, QueueNames, RabbitConsumer},
    reserve::Pipeline,
};

/// The single order processor: batches of up to `batch_size`, waiting at
/// most `linger` to fill one, until the queue is closed and empty.
pub(crate) async fn run_processor(
    pipeline: Arc<Pipeline>,
    mut receiver: EmbeddedReceiver,
    batch_size: usize,
    linger: Duration,
) {
    let mut batch = Vec::with_capacity(batch_size);
    loop {
        if receiver.recv_many(&mut batch, batch_size).await == 0 {
            return;
        }
        if batch.len() < batch_size && !linger.is_zero() {
            tokio::time::sleep(linger).await;
            while batch.len() < batch_size {
                match receiver.try_recv() {
                    Ok(order) => batch.push(order),
                    Err(_) => break,
                }
            }
        }
        let outcome = pipeline.process_batch(&batch).await;
        if outcome.incomplete {
            // In memory there is nothing to redeliver from; the orders stay
            // visible as QUEUED and the log says which.
            tracing::error!("an order could be neither committed nor recorded as failed");
        }
        batch.clear();
    }
}

/// Where the RabbitMQ processor consumes from.
pub(crate) struct RabbitSource {
    pub(crate) url: String,
    pub(crate) names: QueueNames,
    pub(crate) prefetch: u16,
    pub(crate) reconnect_delay: Duration,
}

/// The order processor on RabbitMQ: consumes (as the single active
/// consumer, or on standby), commits each batch, copies orders it gave up on
/// to the dead-letter queue, and only then acks, so a crash at any point
/// redelivers and the database's idempotency absorbs the repeat.
/// Reconnects after a broker loss; on `stop` it finishes the batch in hand.
pub(crate) async fn run_rabbit_processor(
    pipeline: Arc<Pipeline>,
    source: RabbitSource,
    batch_size: usize,
    linger: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let mut consumer =
            match RabbitConsumer::connect(&source.url, &source.names, source.prefetch).await {
                Ok(consumer) => consumer,
                Err(err) => {
                    tracing::warn!(error = %err, "order processor cannot reach the queue");
                    tokio::select! {
                        _ = tokio::time::sleep(source.reconnect_delay) => continue,
                        _ = stop.changed() => return,
                    }
                }
            };
        tracing::info!(queue = %source.names.orders, "order processor consuming (or on standby)");
        loop {
            let batch = tokio::select! {
                batch = consumer.next_batch(batch_size, linger) => batch,
                _ = stop.changed() => {
                    consumer.close().await;
                    return;
                }
            };
            let Some(deliveries) = batch else {
                tracing::warn!("order queue connection lost; reconnecting");
                break;
            };
            let Some(last_tag) = deliveries.iter().map(|d| d.delivery_tag).max() else {
                continue;
            };
            let mut orders = Vec::with_capacity(deliveries.len());
            let mut unsettled = false;
            for delivery in &deliveries {
                match decode(&delivery.data) {
                    Ok(order) => orders.push(order),
                    Err(reason) => {
                        tracing::error!(%reason, "undecodable order message; dead-lettering it");
                        let recorded = match salvage(&delivery.data) {
                            Some(order) => pipeline.reject_unprocessable(&order, &reason).await,
                            None => true,
                        };
                        unsettled |= !recorded
                            || consumer.dead_letter(&delivery.data, &reason).await.is_err();
                    }
                }
            }
            let outcome = pipeline.process_batch(&orders).await;
            unsettled |= outcome.incomplete;
            for (order, reason) in outcome.given_up {
                unsettled |= consumer
                    .dead_letter(&encode(&order), &reason)
                    .await
                    .is_err();
            }
            if unsettled {
                // Not acked: redelivered to whoever consumes next, and the
                // database's idempotency absorbs what was already done.
                tracing::warn!("batch not fully settled; leaving it unacked");
                tokio::time::sleep(source.reconnect_delay).await;
                break;
            }
            if let Err(err) = consumer.ack_through(last_tag).await {
                // Redelivered and found already committed.
                tracing::warn!(error = %err, "batch committed but not acked; it will be redelivered");
                break;
            }
        }
        consumer.close().await;
    }
}
