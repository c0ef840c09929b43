//! Publishing admitted orders: the orders waiting at a moment are numbered
//! by one statement and published together, their confirms awaited at once.
//!
//! Each published order needs a ticket from PostgreSQL's sequence (its
//! place in line) and the broker's confirm that it is stored. Taken per
//! call, each Reserve waited for a pooled connection and a round trip of
//! its own, and each message cost the broker its own work: storing it,
//! replicating it to the quorum, delivering it and taking its ack; on a
//! 2-core machine the broker became the largest CPU cost of an admitted
//! order (`docs/capacity.md`). The publisher gathers the waiting callers
//! ([`crate::batching`]), takes their tickets in one statement, and
//! publishes them in arrival order, up to `rabbitmq.publish_batch_max`
//! orders per message, every message before any confirm is awaited.
//!
//! A message of one order is a version 1 message, exactly as before
//! batching; a message of several is a version 2 batch whose `orders` are
//! version 1 orders. `rabbitmq.publish_batch_max = 1` publishes only
//! version 1, for a rolling upgrade (or rollback) across a release whose
//! processors do not read version 2 (`k8s/README.md`, Releases).

use std::{sync::Arc, time::Duration};

use arc_swap::ArcSwapOption;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::{
    sync::{oneshot, Mutex},
    time::Instant,
};

use super::{
    encode_wire, open, persistent_json, send_mandatory, with_traceparent, Link, QueueNames,
    WireOrder,
};
use crate::{
    batching::Limits,
    config::secrets::LiveUrl,
    queue::{QueueError, QueuedLine},
    store::{NewOrder, Store},
};

/// Most orders numbered by one statement and published together (in
/// messages of `rabbitmq.publish_batch_max`, at most this many).
pub(crate) const MAX_BATCH: usize = 256;

/// Two batches out at once, each keeping its slot until its confirms are
/// in: while they are out the next batch gathers, so batches grow with
/// the broker's confirm latency, and a slow broker slows publishing (at
/// most 512 orders per confirm round trip) instead of having unconfirmed
/// messages piled on it. Freeing the slot once a batch was sent made
/// batches smaller and cost the broker and PostgreSQL more per order
/// (docs/capacity.md).
pub(super) const LIMITS: Limits = Limits {
    max_batch: MAX_BATCH,
    in_flight: 2,
    queued: 8_192,
};

/// The version of a message carrying several orders.
pub(super) const BATCH_VERSION: u32 = 2;

/// One caller's order, waiting for a batch.
pub(super) struct Publish {
    pub order: NewOrder,
    pub gated: bool,
    /// A cart's lines after the first (`order`); `None` for an order.
    pub more_lines: Option<Vec<QueuedLine>>,
    /// The caller's trace, taken in its own task: the batch has none.
    pub traceparent: Option<String>,
    pub reply: oneshot::Sender<Result<u64, QueueError>>,
    /// When its caller stops waiting: no message of it is sent after, so
    /// a publish takes at most [`super::RabbitQueue::publish_bound`] from
    /// the call (processors count on it to pass failed tickets).
    pub deadline: Instant,
}

/// The publishing connection and what a batch needs.
pub(super) struct Publisher {
    pub uri: LiveUrl,
    pub names: QueueNames,
    pub store: Store,
    pub publish_timeout: Duration,
    /// Most orders in one message.
    pub per_message: usize,
    pub reconnect_delay: Duration,
    /// The longest a (re)connect takes, every listed broker tried.
    pub open_timeout: Duration,
    pub link: ArcSwapOption<Link>,
    /// Serialises reconnects; holds when the last attempt failed so callers
    /// during an outage are refused at once instead of each trying.
    pub reconnect: Mutex<Option<Instant>>,
}

impl Publisher {
    pub async fn channel(&self) -> Result<Channel, QueueError> {
        Ok(self.link().await?.channel.clone())
    }

    /// The publishing connection and channel, opened if there is none.
    pub(super) async fn link(&self) -> Result<Arc<Link>, QueueError> {
        if let Some(link) = self.link.load_full() {
            if link.channel.status().connected() {
                return Ok(link);
            }
        }
        let mut last_failure = self.reconnect.lock().await;
        // Another caller may have reconnected while we waited.
        if let Some(link) = self.link.load_full() {
            if link.channel.status().connected() {
                return Ok(link);
            }
        }
        if let Some(at) = *last_failure {
            if at.elapsed() < self.reconnect_delay {
                return Err(QueueError::Unavailable(
                    "the broker is unreachable; reconnecting".into(),
                ));
            }
        }
        match open(&self.uri, &self.names).await {
            Ok(link) => {
                let link = Arc::new(link);
                self.link.store(Some(Arc::clone(&link)));
                *last_failure = None;
                tracing::info!(queue = %self.names.orders, "connected to the order queue");
                Ok(link)
            }
            Err(err) => {
                *last_failure = Some(Instant::now());
                self.link.store(None);
                tracing::warn!(error = %err, "order queue unreachable");
                Err(QueueError::Unavailable(err))
            }
        }
    }

    /// Numbers and sends one batch and answers each caller once the
    /// broker has confirmed (or refused, or not answered in time).
    pub async fn publish(&self, mut batch: Vec<Publish>) {
        // A caller whose wait ran out has been answered as unconfirmed and
        // fences its reservation off; leaving its order out keeps the queue
        // free of orders nobody waits for.
        batch.retain(|publish| !publish.reply.is_closed());
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        let fail = |batch: Vec<Publish>, err: QueueError| {
            for publish in batch {
                let _ = publish.reply.send(Err(err.clone()));
            }
        };
        let link = match self.link().await {
            Ok(link) => link,
            Err(err) => return fail(batch, err),
        };
        let runs = self.route(&mut batch);
        let tickets = match self.number(&runs).await {
            Ok(tickets) if tickets.len() == n => tickets,
            Ok(tickets) => {
                let why = format!("no queue ticket: asked for {n}, got {}", tickets.len());
                return fail(batch, QueueError::Unavailable(why));
            }
            Err(err) => {
                let why = format!("no queue ticket: {err}");
                return fail(batch, QueueError::Unavailable(why));
            }
        };
        let sent = self.send(&link.channel, &batch, &runs, &tickets).await;
        let answers = confirms(sent, &tickets, self.publish_timeout).await;
        if answers
            .iter()
            .any(|answer| matches!(answer, Err(QueueError::Unconfirmed(_))))
        {
            self.discard(link);
        }
        for (publish, answer) in batch.into_iter().zip(answers) {
            let _ = publish.reply.send(answer);
        }
    }

    /// A channel whose publish was refused (nacked) or not confirmed in
    /// time is not used again: RabbitMQ 3.10 goes on nacking every publish
    /// on a channel whose quorum queue lost its leader, even once another
    /// node leads it (seen with the queue's leader killed). The next batch
    /// opens a new connection; this one is closed once no batch holds it
    /// (or after `open_timeout` plus twice `publish_timeout`, the longest
    /// a batch takes). A slow broker thus costs a reconnect per batch that
    /// timed out.
    pub(super) fn discard(&self, link: Arc<Link>) {
        let previous = self.link.compare_and_swap(&Some(Arc::clone(&link)), None);
        if !previous
            .as_ref()
            .is_some_and(|previous| Arc::ptr_eq(previous, &link))
        {
            // Already retired by another batch (which closes it), or
            // replaced after its channel closed.
            return;
        }
        tracing::warn!(queue = %self.names.orders, "a publish was not confirmed; the next goes on a new connection");
        let longest = self.open_timeout + self.publish_timeout * 2;
        tokio::spawn(async move {
            let until = Instant::now() + longest;
            while Arc::strong_count(&link) > 1 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            link.close().await;
        });
    }

    /// Puts the batch in the order it is sent: the one queue's, or by
    /// partition (each partition's orders in arrival order), with the runs
    /// of orders going to one queue.
    fn route(&self, batch: &mut [Publish]) -> Vec<Run> {
        if !self.names.is_partitioned() {
            return vec![Run {
                partition: None,
                orders: batch.len(),
            }];
        }
        let partitions = self.names.partitions;
        let partition_of =
            |publish: &Publish| crate::queue::partition_of(publish.order.sku.as_str(), partitions);
        // Stable: orders of one SKU keep their arrival order.
        batch.sort_by_key(partition_of);
        let mut runs: Vec<Run> = Vec::new();
        for publish in batch.iter() {
            let partition = Some(partition_of(publish));
            match runs.last_mut() {
                Some(run) if run.partition == partition => run.orders += 1,
                _ => runs.push(Run {
                    partition,
                    orders: 1,
                }),
            }
        }
        runs
    }

    /// Tickets for the runs' orders, in one statement.
    async fn number(&self, runs: &[Run]) -> Result<Vec<u64>, crate::store::StoreError> {
        if let [Run {
            partition: None,
            orders,
        }] = runs
        {
            return self.store.next_tickets(*orders).await;
        }
        let wanted: Vec<(u16, usize)> = runs
            .iter()
            .filter_map(|run| Some((run.partition?, run.orders)))
            .collect();
        let lasts = self.store.next_partition_tickets(&wanted).await?;
        let mut tickets = Vec::new();
        for (partition, orders) in wanted {
            let Some(&(_, last)) = lasts.iter().find(|(p, _)| *p == partition) else {
                continue;
            };
            let first = (last + 1).saturating_sub(orders as u64);
            tickets.extend((first..=last).map(|n| crate::queue::ticket(Some(partition), n)));
        }
        Ok(tickets)
    }

    /// Sends the batch, numbered, each run to its queue in messages of at
    /// most `per_message` orders: each message's order count and its
    /// pending confirm (or why it could not be sent).
    async fn send(
        &self,
        channel: &Channel,
        batch: &[Publish],
        runs: &[Run],
        tickets: &[u64],
    ) -> Vec<Sent> {
        let per_message = self.per_message.max(1);
        let mut sent = Vec::new();
        let mut start = 0;
        for run in runs {
            let end = start + run.orders;
            let queue = match run.partition {
                Some(partition) => self.names.partition_queue(partition),
                None => self.names.orders.clone(),
            };
            let (orders, numbers) = (&batch[start..end], &tickets[start..end]);
            start = end;
            for (orders, tickets) in orders.chunks(per_message).zip(numbers.chunks(per_message)) {
                sent.push(self.send_one(channel, &queue, orders, tickets).await);
            }
        }
        sent
    }

    /// Sends one message of `orders` to `queue`.
    async fn send_one(
        &self,
        channel: &Channel,
        queue: &str,
        orders: &[Publish],
        tickets: &[u64],
    ) -> Sent {
        if orders
            .iter()
            .any(|publish| Instant::now() >= publish.deadline)
        {
            let late = QueueError::Unavailable("its caller stopped waiting; not sent".into());
            return (tickets.len(), Err(late));
        }
        let (body, properties) = message(orders, tickets);
        let confirm = send_mandatory(channel, queue, &body, properties).await;
        (tickets.len(), confirm)
    }
}

/// Orders of a batch that go to one queue: a partition's, or the one
/// queue (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    partition: Option<u16>,
    orders: usize,
}

type Sent = (usize, Result<lapin::PublisherConfirm, QueueError>);

/// One answer per order, in the batch's order: each message's confirm (the
/// broker confirms many at a time) answers its own orders.
async fn confirms(
    sent: Vec<Sent>,
    tickets: &[u64],
    timeout: Duration,
) -> Vec<Result<u64, QueueError>> {
    let deadline = Instant::now() + timeout;
    let mut answers = Vec::with_capacity(tickets.len());
    let mut tickets = tickets.iter();
    for (orders, confirm) in sent {
        let confirmed = match confirm {
            Ok(confirm) => confirmed(tokio::time::timeout_at(deadline, confirm).await, timeout),
            Err(err) => Err(err),
        };
        for ticket in tickets.by_ref().take(orders) {
            answers.push(match &confirmed {
                Ok(()) => Ok(*ticket),
                Err(err) => Err(err.clone()),
            });
        }
    }
    answers
}

/// What a message's confirm (or its absence by the deadline) means for
/// its orders.
fn confirmed(
    confirm: Result<lapin::Result<Confirmation>, tokio::time::error::Elapsed>,
    timeout: Duration,
) -> Result<(), QueueError> {
    match confirm {
        Ok(Ok(Confirmation::Ack(None))) => Ok(()),
        // Returned: the queue does not exist, so nothing was stored.
        Ok(Ok(Confirmation::Ack(Some(returned)))) => Err(QueueError::Unavailable(format!(
            "the broker returned the order: {}",
            returned.reply_text
        ))),
        Ok(Ok(other)) => Err(QueueError::Unconfirmed(format!(
            "the broker did not confirm the order ({other:?})"
        ))),
        Ok(Err(err)) => Err(QueueError::Unconfirmed(err.to_string())),
        Err(_) => Err(QueueError::Unconfirmed(format!(
            "no confirm within {timeout:?}"
        ))),
    }
}

/// The message for a numbered batch: a version 1 order alone, or a
/// version 2 batch of them.
fn message(batch: &[Publish], tickets: &[u64]) -> (Vec<u8>, BasicProperties) {
    if let ([publish], [ticket]) = (batch, tickets) {
        let body = encode_wire(&wire(publish, *ticket, false));
        let properties = persistent_json(Some(publish.order.id.as_str()));
        return (
            body,
            with_traceparent(properties, publish.traceparent.clone()),
        );
    }
    let orders: Vec<WireOrder> = batch
        .iter()
        .zip(tickets)
        .map(|(publish, ticket)| wire(publish, *ticket, true))
        .collect();
    let body = serde_json::to_vec(&WireBatch {
        v: BATCH_VERSION,
        orders,
    })
    .expect("a batch always serialises");
    (body, persistent_json(None))
}

fn wire(publish: &Publish, ticket: u64, with_trace: bool) -> WireOrder {
    let mut wire = WireOrder::new(
        &publish.order,
        ticket,
        publish.gated,
        publish.more_lines.as_deref(),
    );
    // Alone, the trace travels in the message's header, as before.
    if with_trace {
        wire.traceparent = publish.traceparent.clone();
    }
    wire
}

/// A message carrying several orders.
#[derive(serde::Serialize)]
struct WireBatch {
    v: u32,
    orders: Vec<WireOrder>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ReservationId, Sku, UserId};

    fn publish(trace: Option<&str>) -> Publish {
        Publish {
            order: NewOrder {
                id: ReservationId::generate(),
                sku: Sku::parse("S").unwrap(),
                user: UserId::parse("u").unwrap(),
                quantity: 1,
                idempotency_key: None,
                created_at: crate::domain::now(),
            },
            gated: true,
            more_lines: None,
            traceparent: trace.map(str::to_owned),
            reply: oneshot::channel().0,
            deadline: Instant::now() + Duration::from_secs(60),
        }
    }

    const TRACE: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

    #[test]
    fn an_order_alone_is_a_version_one_message_with_its_trace_in_a_header() {
        let one = publish(Some(TRACE));
        let (body, properties) = message(std::slice::from_ref(&one), &[7]);
        let decoded = super::super::decode_message(&body);
        let order = decoded[0].as_ref().unwrap();
        assert_eq!((order.ticket, &order.order), (7, &one.order));
        assert_eq!(order.traceparent, None);
        assert_eq!(
            super::super::dead_letters::traceparent(&properties).as_deref(),
            Some(TRACE)
        );
        assert_eq!(
            properties.message_id().as_ref().map(|id| id.as_str()),
            Some(one.order.id.as_str())
        );
    }

    #[test]
    fn orders_together_carry_their_tickets_and_traces_in_order() {
        let batch = [publish(Some(TRACE)), publish(None), publish(Some(TRACE))];
        let (body, _) = message(&batch, &[3, 4, 5]);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["v"], 2);
        let decoded: Vec<_> = super::super::decode_message(&body)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(decoded.len(), 3);
        for ((order, publish), ticket) in decoded.iter().zip(&batch).zip([3, 4, 5]) {
            assert_eq!(order.ticket, ticket);
            assert_eq!(order.order, publish.order);
            assert_eq!(order.traceparent, publish.traceparent);
            assert!(order.gated);
        }
    }
}
