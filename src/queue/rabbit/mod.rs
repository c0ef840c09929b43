//! The RabbitMQ order queue: a durable quorum queue with single active
//! consumer, so any number of processor replicas run and exactly one
//! consumes.
//!
//! Topology (all names from `rabbitmq.queue`, here `Q`):
//! - `Q`: quorum queue of orders, `x-single-active-consumer`; persistent
//!   JSON messages, published with `mandatory` and publisher confirms;
//! - `Q.dlq`: quorum queue of orders the processor gave up on, kept for
//!   operators (`rabbitmqctl list_queues name messages`);
//! - `Q.settled`: fanout exchange on which the processor announces each
//!   processed batch, so every API replica drops the reservations it was
//!   answering from memory and moves queue positions on. Best effort: a
//!   replica that missed one finds the rows in the database
//!   ([`crate::reserve::Pipeline::resync_pending`]).
//!
//! Every declaration carries identical arguments: the broker refuses a
//! redeclaration with different ones (406 PRECONDITION_FAILED).

use std::{
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use chrono::DateTime;
use futures::StreamExt;
use lapin::{
    options::{
        BasicConsumeOptions, BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
        QueueBindOptions, QueueDeclareOptions,
    },
    types::{AMQPValue, FieldTable},
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind,
};
use serde::{Deserialize, Serialize};
use tokio::{sync::Mutex, time::Instant};

use super::{tickets::Tickets, OrderQueue, QueueError, QueuedOrder};
use crate::{
    config::secrets::LiveUrl,
    config::RabbitConfig,
    domain::{IdempotencyKey, ReservationId, Sku, UserId},
    store::{NewOrder, Store},
};

mod dead_letters;
mod source;

pub use dead_letters::RabbitDeadLetters;
pub use source::RabbitSource;

/// Persistent delivery mode (survives a broker restart).
const PERSISTENT: u8 = 2;
/// Connecting to a broker that does not answer must not hold Reserve up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The queue, dead-letter queue and processed-batch exchange of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    pub orders: String,
    pub dead_letters: String,
    /// The exchange announcing processed batches. Its name on the broker
    /// stays `<queue>.settled`: running fleets declare and bind it.
    pub processed: String,
}

impl QueueNames {
    pub fn new(queue: &str) -> Self {
        Self {
            orders: queue.to_owned(),
            dead_letters: format!("{queue}.dlq"),
            processed: format!("{queue}.settled"),
        }
    }
}

/// An order as it travels; versioned so a processor can tell a message it
/// does not understand (dead-lettered) from one it does.
#[derive(Debug, Serialize, Deserialize)]
struct WireOrder {
    v: u32,
    ticket: u64,
    id: String,
    sku: String,
    user: String,
    quantity: u32,
    idempotency_key: Option<String>,
    /// Microseconds since the Unix epoch (UTC).
    created_at: i64,
    gated: bool,
}

const WIRE_VERSION: u32 = 1;

pub fn encode(queued: &QueuedOrder) -> Vec<u8> {
    let order = &queued.order;
    let wire = WireOrder {
        v: WIRE_VERSION,
        ticket: queued.ticket,
        id: order.id.as_str().to_owned(),
        sku: order.sku.as_str().to_owned(),
        user: order.user.as_str().to_owned(),
        quantity: order.quantity,
        idempotency_key: order
            .idempotency_key
            .as_ref()
            .map(|k| k.as_str().to_owned()),
        created_at: order.created_at.and_utc().timestamp_micros(),
        gated: queued.gated,
    };
    serde_json::to_vec(&wire).expect("an order always serialises")
}

/// Decodes a message body; the error says why it cannot be processed.
pub fn decode(body: &[u8]) -> Result<QueuedOrder, String> {
    let wire: WireOrder =
        serde_json::from_slice(body).map_err(|e| format!("undecodable message: {e}"))?;
    if wire.v != WIRE_VERSION {
        return Err(format!("unknown message version {}", wire.v));
    }
    let field = |name: &str, e: crate::error::ReservationError| format!("bad {name}: {e}");
    let created_at = DateTime::from_timestamp_micros(wire.created_at)
        .ok_or_else(|| format!("bad created_at: {}", wire.created_at))?
        .naive_utc();
    Ok(QueuedOrder {
        ticket: wire.ticket,
        gated: wire.gated,
        redriven: false,
        traceparent: None,
        order: NewOrder {
            id: ReservationId::parse(&wire.id).map_err(|e| field("id", e))?,
            sku: Sku::parse(&wire.sku).map_err(|e| field("sku", e))?,
            user: UserId::parse(&wire.user).map_err(|e| field("user", e))?,
            quantity: wire.quantity,
            idempotency_key: wire
                .idempotency_key
                .as_deref()
                .map(IdempotencyKey::parse)
                .transpose()
                .map_err(|e| field("idempotency_key", e))?,
            created_at,
        },
    })
}

/// From a message [`decode`] refused, what identifies the reservation (id,
/// sku, user, quantity, gated), if that much can still be read: enough to
/// record it REJECTED and return its units, so a message from a newer or
/// buggy producer does not leave its caller QUEUED forever. The creation
/// time is now and the key is dropped.
pub fn salvage(body: &[u8]) -> Option<QueuedOrder> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let text = |name: &str| value.get(name)?.as_str();
    Some(QueuedOrder {
        ticket: value.get("ticket").and_then(|t| t.as_u64()).unwrap_or(0),
        gated: value
            .get("gated")
            .and_then(|g| g.as_bool())
            .unwrap_or(false),
        redriven: false,
        traceparent: None,
        order: NewOrder {
            id: ReservationId::parse(text("id")?).ok()?,
            sku: Sku::parse(text("sku")?).ok()?,
            user: UserId::parse(text("user")?).ok()?,
            quantity: u32::try_from(value.get("quantity")?.as_u64()?).ok()?,
            idempotency_key: None,
            created_at: crate::domain::now(),
        },
    })
}

/// What the processor announces after each batch.
#[derive(Debug, Serialize, Deserialize)]
struct ProcessedNotice {
    through: u64,
    ids: Vec<String>,
}

fn quorum_args(single_active: bool) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    if single_active {
        args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
    }
    args
}

async fn declare(channel: &Channel, names: &QueueNames) -> lapin::Result<()> {
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(names.orders.as_str().into(), durable, quorum_args(true))
        .await?;
    channel
        .queue_declare(
            names.dead_letters.as_str().into(),
            durable,
            quorum_args(false),
        )
        .await?;
    channel
        .exchange_declare(
            names.processed.as_str().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await
}

/// A connection with one confirming channel and the topology declared.
struct Link {
    // Held so the connection lives as long as the channel is used.
    connection: Connection,
    channel: Channel,
}

impl Link {
    /// Closes the connection: whatever its channel holds unacknowledged
    /// goes back to its queue.
    async fn close(self) {
        let _ = self.channel.close(200, "done".into()).await;
        let _ = self.connection.close(200, "done".into()).await;
    }
}

/// The TLS material for an `amqps://` connection: the CA trusted besides
/// the system roots, and the client certificate if any.
fn tls_config(url: &LiveUrl) -> lapin::tcp::OwnedTLSConfig {
    let Some(tls) = url.tls() else {
        return Default::default();
    };
    lapin::tcp::OwnedTLSConfig {
        identity: tls
            .identity
            .as_ref()
            .map(|identity| lapin::tcp::OwnedIdentity::PKCS8 {
                pem: identity.0.clone(),
                key: identity.1.clone(),
            }),
        // Checked as PEM at start-up, so it is text.
        cert_chain: tls
            .ca
            .as_ref()
            .map(|ca| String::from_utf8_lossy(ca).into_owned()),
    }
}

async fn open(url: &LiveUrl, names: &QueueNames) -> Result<Link, String> {
    let connect = async {
        let uri = url.current();
        let properties = ConnectionProperties::default();
        let connection = if url.is_tls() {
            let runtime = lapin::runtime::default_runtime()?;
            Connection::connect_with_config(&uri, properties, tls_config(url), runtime).await?
        } else {
            Connection::connect(&uri, properties).await?
        };
        let channel = connection.create_channel().await?;
        declare(&channel, names).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        lapin::Result::Ok(Link {
            connection,
            channel,
        })
    };
    let failure = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(link)) => return Ok(link),
        Ok(Err(err)) => err.to_string(),
        Err(_) => format!("no answer within {CONNECT_TIMEOUT:?}"),
    };
    Err(format!(
        "{failure} (RabbitMQ at {})",
        url.describe("backends.queue")
    ))
}

fn persistent_json(id: Option<&str>) -> BasicProperties {
    let props = BasicProperties::default()
        .with_delivery_mode(PERSISTENT)
        .with_content_type("application/json".into());
    match id {
        Some(id) => props.with_message_id(id.into()),
        None => props,
    }
}

/// Ready messages in `queue` (those a consumer holds unacknowledged are
/// not counted), asked with a passive declare.
async fn ready_messages(channel: &Channel, queue: &str) -> lapin::Result<u64> {
    let queue = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(u64::from(queue.message_count()))
}

/// Adds the current trace's `traceparent` header, when there is one.
fn traced(properties: BasicProperties) -> BasicProperties {
    match crate::telemetry::trace::current_traceparent() {
        Some(traceparent) => {
            let mut headers = FieldTable::default();
            headers.insert(
                crate::telemetry::trace::TRACEPARENT.into(),
                AMQPValue::LongString(traceparent.into()),
            );
            properties.with_headers(headers)
        }
        None => properties,
    }
}

/// The publishing side, shared by every Reserve call of one replica.
pub struct RabbitQueue {
    uri: LiveUrl,
    names: QueueNames,
    store: Store,
    tickets: Tickets,
    publish_timeout: Duration,
    reconnect_delay: Duration,
    link: ArcSwapOption<Link>,
    /// Serialises reconnects; holds when the last attempt failed so callers
    /// during an outage are refused at once instead of each trying.
    reconnect: Mutex<Option<Instant>>,
    done: AtomicU64,
    closed: AtomicBool,
}

impl std::fmt::Debug for RabbitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitQueue")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl RabbitQueue {
    /// Connects lazily: the server starts (and refuses Reserve with
    /// UNAVAILABLE) while the broker is still coming up.
    pub fn new(uri: impl Into<LiveUrl>, config: &RabbitConfig, store: Store) -> Self {
        Self {
            uri: uri.into(),
            names: QueueNames::new(&config.queue),
            tickets: Tickets::new(store.clone()),
            store,
            publish_timeout: Duration::from_millis(config.publish_timeout_ms),
            reconnect_delay: Duration::from_millis(config.reconnect_delay_ms),
            link: ArcSwapOption::empty(),
            reconnect: Mutex::new(None),
            done: AtomicU64::new(0),
            closed: AtomicBool::new(false),
        }
    }

    pub fn names(&self) -> &QueueNames {
        &self.names
    }

    async fn channel(&self) -> Result<Channel, QueueError> {
        if let Some(link) = self.link.load_full() {
            if link.channel.status().connected() {
                return Ok(link.channel.clone());
            }
        }
        let mut last_failure = self.reconnect.lock().await;
        // Another caller may have reconnected while we waited.
        if let Some(link) = self.link.load_full() {
            if link.channel.status().connected() {
                return Ok(link.channel.clone());
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
                let channel = link.channel.clone();
                self.link.store(Some(Arc::new(link)));
                *last_failure = None;
                tracing::info!(queue = %self.names.orders, "connected to the order queue");
                Ok(channel)
            }
            Err(err) => {
                *last_failure = Some(Instant::now());
                self.link.store(None);
                tracing::warn!(error = %err, "order queue unreachable");
                Err(QueueError::Unavailable(err))
            }
        }
    }

    /// Ready messages in one of this deployment's queues, as the broker
    /// counts them, on the publishing connection.
    async fn count(&self, queue: &str) -> Option<u64> {
        let channel = self.channel().await.ok()?;
        ready_messages(&channel, queue).await.ok()
    }

    /// Tells API replicas that these reservations were processed.
    async fn announce(&self, through: u64, ids: &[ReservationId]) {
        let notice = ProcessedNotice {
            through,
            ids: ids.iter().map(|id| id.as_str().to_owned()).collect(),
        };
        let body = serde_json::to_vec(&notice).expect("a notice always serialises");
        let Ok(channel) = self.channel().await else {
            return;
        };
        // Not awaited for a confirm: a lost notice is repaired by the
        // replicas' database resync.
        if let Err(err) = channel
            .basic_publish(
                self.names.processed.as_str().into(),
                "".into(),
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default(),
            )
            .await
        {
            tracing::debug!(error = %err, "processed notice not sent");
        }
    }

    /// Follows the processed-batch exchange until `stop`: moves this replica's
    /// queue positions on and calls `on_processed` with the reservations
    /// that now have a row. Reconnects after a broker loss.
    pub async fn follow_processed(
        self: Arc<Self>,
        on_processed: impl Fn(Vec<ReservationId>) + Send + Sync,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            match self.open_follower().await {
                Ok((_link, mut consumer)) => {
                    self.catch_up().await;
                    loop {
                        let next = tokio::select! {
                            next = consumer.next() => next,
                            _ = stop.changed() => return,
                        };
                        let Some(Ok(delivery)) = next else { break };
                        match serde_json::from_slice::<ProcessedNotice>(&delivery.data) {
                            Ok(notice) => {
                                self.done.fetch_max(notice.through, Ordering::AcqRel);
                                on_processed(
                                    notice
                                        .ids
                                        .iter()
                                        .filter_map(|id| ReservationId::parse(id).ok())
                                        .collect(),
                                );
                            }
                            Err(err) => tracing::warn!(error = %err, "bad processed notice"),
                        }
                    }
                    tracing::warn!("processed notices interrupted; reconnecting");
                }
                Err(err) => tracing::warn!(error = %err, "cannot follow processed notices"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.reconnect_delay) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn open_follower(&self) -> Result<(Link, Consumer), String> {
        let link = open(&self.uri, &self.names).await?;
        let setup = async {
            let mine = link
                .channel
                .queue_declare(
                    "".into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        auto_delete: true,
                        ..QueueDeclareOptions::default()
                    },
                    FieldTable::default(),
                )
                .await?;
            link.channel
                .queue_bind(
                    mine.name().clone(),
                    self.names.processed.as_str().into(),
                    "".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;
            link.channel
                .basic_consume(
                    mine.name().clone(),
                    "".into(),
                    BasicConsumeOptions {
                        no_ack: true,
                        ..BasicConsumeOptions::default()
                    },
                    FieldTable::default(),
                )
                .await
        };
        let consumer = setup.await.map_err(|e| e.to_string())?;
        Ok((link, consumer))
    }

    /// A replica that starts (or reconnects) mid-sale has heard no notice:
    /// start from the progress the processor recorded.
    async fn catch_up(&self) {
        match self.store.queue_done_through().await {
            Ok(done) => {
                self.done.fetch_max(done, Ordering::AcqRel);
            }
            Err(err) => tracing::warn!(error = %err, "queue progress unknown"),
        }
    }
}

#[async_trait]
impl OrderQueue for RabbitQueue {
    async fn publish(&self, order: NewOrder, gated: bool) -> Result<u64, QueueError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        let channel = self.channel().await?;
        let ticket = self
            .tickets
            .next()
            .await
            .map_err(|e| QueueError::Unavailable(format!("no queue ticket: {e}")))?;
        let id = order.id.as_str().to_owned();
        let body = encode(&QueuedOrder {
            ticket,
            order,
            gated,
            redriven: false,
            traceparent: None,
        });
        // lapin checks the channel before writing, so an error here means
        // nothing reached the broker.
        let confirm = channel
            .basic_publish(
                "".into(),
                self.names.orders.as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                &body,
                traced(persistent_json(Some(&id))),
            )
            .await
            .map_err(|e| QueueError::Unavailable(e.to_string()))?;
        match tokio::time::timeout(self.publish_timeout, confirm).await {
            Ok(Ok(Confirmation::Ack(None))) => Ok(ticket),
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
                "no confirm within {:?}",
                self.publish_timeout
            ))),
        }
    }

    async fn position(&self, ticket: u64) -> u64 {
        ticket.saturating_sub(self.done.load(Ordering::Acquire) + 1)
    }

    async fn processed(&self, through: u64, ids: &[ReservationId]) {
        self.done.fetch_max(through, Ordering::AcqRel);
        if let Err(err) = self.store.advance_queue(through).await {
            // Only positions suffer: replicas catch up at the next batch.
            tracing::warn!(error = %err, "queue progress not recorded");
        }
        self.announce(through, ids).await;
    }

    async fn backlog(&self) -> Option<u64> {
        let ready = self.count(&self.names.orders).await?;
        if ready > 0 {
            return Some(ready);
        }
        // Nothing ready, but the processor may hold deliveries unacked (the
        // broker's count leaves them out): empty only once every ticket
        // handed out is at or below what the processor is done with.
        let issued = self.store.last_ticket().await.ok()?;
        let done = self.store.queue_done_through().await.ok()?;
        Some(issued.saturating_sub(done))
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// Deletes a deployment's queues and exchange (benchmarks and tests that
/// made their own; operators retire a queue name the same way).
pub async fn delete_topology(uri: &str, queue: &str) {
    let names = QueueNames::new(queue);
    let Ok(link) = open(&uri.into(), &names).await else {
        return;
    };
    for queue in [&names.orders, &names.dead_letters] {
        let _ = link
            .channel
            .queue_delete(queue.as_str().into(), Default::default())
            .await;
    }
    let _ = link
        .channel
        .exchange_delete(names.processed.as_str().into(), Default::default())
        .await;
}
