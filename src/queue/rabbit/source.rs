//! The processor's half of the RabbitMQ queue: the orders queue consumed
//! as the single active consumer, batches taken, given-up orders copied to
//! the dead-letter queue, and acks only for what is done.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use lapin::{
    message::Delivery,
    options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions},
    types::FieldTable,
    Confirmation, Consumer,
};
use tokio::time::Instant;

use super::{
    dead_letters::{dead_letter_properties, is_redriven, traceparent},
    decode_message, open, salvage, Link, QueueNames, CONNECT_TIMEOUT,
};
use crate::{
    config::secrets::LiveUrl,
    queue::{OrderSource, TakenBatch, Unreadable},
};

/// The processor's source: the orders queue, consumed as the single active
/// consumer (or on standby until the active one goes), reconnecting after a
/// broker loss. Unacknowledged deliveries go back to the queue whenever the
/// consumer does, so a crash at any point redelivers.
pub struct RabbitSource {
    uri: LiveUrl,
    names: QueueNames,
    prefetch: u16,
    reconnect_delay: Duration,
    consumer: Option<RabbitConsumer>,
}

impl RabbitSource {
    pub fn new(
        uri: impl Into<LiveUrl>,
        names: &QueueNames,
        prefetch: u16,
        reconnect_delay: Duration,
    ) -> Self {
        Self {
            uri: uri.into(),
            names: names.clone(),
            prefetch,
            reconnect_delay,
            consumer: None,
        }
    }

    /// Leaves the queue, so that what was not acked is delivered again.
    async fn drop_consumer(&mut self) {
        if let Some(consumer) = self.consumer.take() {
            consumer.close().await;
        }
    }
}

#[async_trait]
impl OrderSource for RabbitSource {
    async fn next_batch(&mut self, max: usize, linger: Duration) -> Option<TakenBatch> {
        loop {
            let consumer = match &mut self.consumer {
                Some(consumer) => consumer,
                None => {
                    match RabbitConsumer::connect(&self.uri, &self.names, self.prefetch).await {
                        Ok(consumer) => {
                            tracing::info!(
                                queue = %self.names.orders,
                                "order processor consuming (or on standby)"
                            );
                            self.consumer.insert(consumer)
                        }
                        Err(err) => {
                            tracing::warn!(error = %err, "order processor cannot reach the queue");
                            tokio::time::sleep(self.reconnect_delay).await;
                            continue;
                        }
                    }
                }
            };
            let Some(batch) = consumer.next_batch(max, linger).await else {
                tracing::warn!("order queue connection lost; reconnecting");
                self.drop_consumer().await;
                continue;
            };
            return Some(batch);
        }
    }

    async fn set_aside(&mut self, message: &[u8], reason: &str) -> Result<(), String> {
        match &self.consumer {
            Some(consumer) => consumer.dead_letter(message, reason).await,
            None => Err("not connected to the queue".into()),
        }
    }

    async fn acknowledge(&mut self, batch: &TakenBatch) -> Result<(), String> {
        let Some(consumer) = &self.consumer else {
            return Err("not connected to the queue".into());
        };
        let acked = consumer.ack_through(batch.receipt).await;
        if acked.is_err() {
            self.drop_consumer().await;
        }
        acked
    }

    async fn hand_back(&mut self, _batch: TakenBatch) {
        // Not acked: redelivered to whoever consumes next.
        tracing::warn!("batch not fully processed; leaving it unacked");
        self.drop_consumer().await;
        tokio::time::sleep(self.reconnect_delay).await;
    }

    fn redelivers(&self) -> bool {
        true
    }

    async fn close(&mut self) {
        self.drop_consumer().await;
    }
}

/// Adds a delivery's orders to `batch`: the ones read in full, and the
/// ones that cannot be, with what [`salvage`] still reads of them.
fn read(delivery: Delivery, batch: &mut TakenBatch) {
    batch.receipt = batch.receipt.max(delivery.delivery_tag);
    if let Some(through) = super::decode_pass(&delivery.data) {
        batch.passes.push(through);
        return;
    }
    let redriven = is_redriven(&delivery.properties);
    let header_trace = traceparent(&delivery.properties);
    for item in decode_message(&delivery.data) {
        match item {
            Ok(mut order) => {
                if redriven {
                    order.mark_redriven();
                }
                if order.traceparent.is_none() {
                    order.traceparent = header_trace.clone();
                }
                batch.orders.push(order)
            }
            Err((message, reason)) => batch.unreadable.push(Unreadable {
                salvaged: salvage(&message),
                message,
                reason,
            }),
        }
    }
}

/// One consumer on the orders queue. With single active consumer the broker
/// delivers to one processor replica at a time and hands over to a standby
/// when its connection goes.
struct RabbitConsumer {
    link: Link,
    consumer: Consumer,
    names: QueueNames,
}

impl RabbitConsumer {
    async fn connect(uri: &LiveUrl, names: &QueueNames, prefetch: u16) -> Result<Self, String> {
        let link = open(uri, names).await?;
        let setup = async {
            link.channel
                .basic_qos(prefetch, BasicQosOptions::default())
                .await?;
            link.channel
                .basic_consume(
                    names.orders.as_str().into(),
                    "".into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
        };
        let consumer = setup.await.map_err(|e| e.to_string())?;
        Ok(Self {
            link,
            consumer,
            names: names.clone(),
        })
    }

    /// Waits for a delivery, then takes more within `linger` until the
    /// batch holds `max` orders (a message of several orders is taken
    /// whole, so a batch can exceed `max` by one message's worth).
    /// `None`: the consumer or its connection ended.
    async fn next_batch(&mut self, max: usize, linger: Duration) -> Option<TakenBatch> {
        let first = self.consumer.next().await?.ok()?;
        let mut batch = TakenBatch {
            passes: Vec::new(),
            orders: Vec::with_capacity(max),
            unreadable: Vec::new(),
            receipt: 0,
        };
        read(first, &mut batch);
        let deadline = Instant::now() + linger;
        while batch.orders.len() + batch.unreadable.len() < max {
            match tokio::time::timeout_at(deadline, self.consumer.next()).await {
                Ok(Some(Ok(delivery))) => read(delivery, &mut batch),
                // The connection dropped mid-batch: the broker redelivers
                // what was not acked, so what we hold can still be
                // committed (idempotently) before reconnecting.
                Ok(_) | Err(_) => break,
            }
        }
        Some(batch)
    }

    /// Copies a message to the dead-letter queue (confirmed), with the
    /// reason in a header.
    async fn dead_letter(&self, body: &[u8], reason: &str) -> Result<(), String> {
        let confirm = self
            .link
            .channel
            .basic_publish(
                "".into(),
                self.names.dead_letters.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                dead_letter_properties(body, reason),
            )
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(CONNECT_TIMEOUT * 5, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => Ok(()),
            Ok(Ok(other)) => Err(format!("dead-letter publish not confirmed: {other:?}")),
            Ok(Err(err)) => Err(err.to_string()),
            Err(_) => Err("dead-letter publish not confirmed in time".into()),
        }
    }

    /// Acknowledges every delivery up to and including `tag`.
    async fn ack_through(&self, tag: u64) -> Result<(), String> {
        self.link
            .channel
            .basic_ack(tag, BasicAckOptions { multiple: true })
            .await
            .map_err(|e| e.to_string())
    }

    /// Leaves the queue; unacked deliveries go back to it.
    async fn close(self) {
        let _ = self
            .link
            .channel
            .close(200, "processor stopping".into())
            .await;
    }
}
