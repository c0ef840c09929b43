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
        Arc, OnceLock,
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
    BasicProperties, Channel, Connection, ConnectionProperties, Consumer, ExchangeKind,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, Mutex};

use self::publish::{Publish, Publisher};
use super::{OrderQueue, QueueError, QueuedLine, QueuedOrder};
use crate::{
    batching,
    config::secrets::LiveUrl,
    config::RabbitConfig,
    domain::{IdempotencyKey, ReservationId, Sku, UserId},
    store::{NewOrder, Store},
};

mod dead_letters;
mod publish;
mod source;

pub(crate) use publish::MAX_BATCH as PUBLISH_BATCH_MAX;

pub use dead_letters::RabbitDeadLetters;
pub use source::RabbitSource;

/// Persistent delivery mode (survives a broker restart).
const PERSISTENT: u8 = 2;
/// Connecting to a broker that does not answer must not hold Reserve up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The queue, dead-letter queue and processed-batch exchange of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueNames {
    /// The one orders queue (with partitions, still drained: orders that
    /// replicas published before the move, and redriven dead letters).
    pub orders: String,
    pub dead_letters: String,
    /// The exchange announcing processed batches. Its name on the broker
    /// stays `<queue>.settled`: running fleets declare and bind it.
    pub processed: String,
    /// `rabbitmq.partitions`: above 1, orders go to `<queue>.p<N>`.
    pub partitions: u16,
}

impl QueueNames {
    pub fn new(queue: &str) -> Self {
        Self {
            orders: queue.to_owned(),
            dead_letters: format!("{queue}.dlq"),
            processed: format!("{queue}.settled"),
            partitions: 1,
        }
    }

    /// The names of a deployment with `partitions` order queues.
    pub fn partitioned(queue: &str, partitions: u16) -> Self {
        Self {
            partitions: partitions.max(1),
            ..Self::new(queue)
        }
    }

    /// Whether orders go to partitions rather than the one queue.
    pub fn is_partitioned(&self) -> bool {
        self.partitions > 1
    }

    /// The orders queue of partition `partition`.
    pub fn partition_queue(&self, partition: u16) -> String {
        format!("{}.p{partition}", self.orders)
    }

    /// The names one partition's consumer uses: its queue as the orders
    /// queue, the deployment's dead-letter queue and exchange.
    pub fn partition(&self, partition: u16) -> Self {
        Self {
            orders: self.partition_queue(partition),
            partitions: 1,
            ..self.clone()
        }
    }

    /// Every orders queue: the one queue, then the partitions.
    pub fn order_queues(&self) -> Vec<String> {
        let mut queues = vec![self.orders.clone()];
        if self.is_partitioned() {
            queues.extend((0..self.partitions).map(|p| self.partition_queue(p)));
        }
        queues
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
    /// The publishing call's W3C `traceparent`, inside a batch (a message
    /// of one order carries it as a header). Older readers ignore it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    traceparent: Option<String>,
    /// A cart's lines after the first (the fields above; none for a cart
    /// of one line); only in a version 4 message, which readers of version
    /// 1 refuse rather than take for a single order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lines: Option<Vec<WireLine>>,
}

/// A line of a cart after its first: the user, key and time are the cart's.
#[derive(Debug, Serialize, Deserialize)]
struct WireLine {
    id: String,
    sku: String,
    quantity: u32,
    gated: bool,
}

const WIRE_VERSION: u32 = 1;

/// The version of a cart's message: a version 1 order (its first line)
/// with `lines`. A processor of an earlier release cannot read it, and
/// [`salvage`] there records the first line REJECTED (see `docs/runbook.md`,
/// "Carts").
const CART_VERSION: u32 = 4;

impl WireOrder {
    fn new(order: &NewOrder, ticket: u64, gated: bool, more: Option<&[QueuedLine]>) -> Self {
        Self {
            v: if more.is_some() {
                CART_VERSION
            } else {
                WIRE_VERSION
            },
            ticket,
            id: order.id.as_str().to_owned(),
            sku: order.sku.as_str().to_owned(),
            user: order.user.as_str().to_owned(),
            quantity: order.quantity,
            idempotency_key: order
                .idempotency_key
                .as_ref()
                .map(|k| k.as_str().to_owned()),
            created_at: order.created_at.and_utc().timestamp_micros(),
            gated,
            traceparent: None,
            lines: more.map(|more| {
                more.iter()
                    .map(|line| WireLine {
                        id: line.order.id.as_str().to_owned(),
                        sku: line.order.sku.as_str().to_owned(),
                        quantity: line.order.quantity,
                        gated: line.gated,
                    })
                    .collect()
            }),
        }
    }
}

fn encode_wire(wire: &WireOrder) -> Vec<u8> {
    serde_json::to_vec(wire).expect("an order always serialises")
}

/// One order as a version 1 message, or a cart as a version 4 one (also
/// what the dead-letter queue keeps).
pub fn encode(queued: &QueuedOrder) -> Vec<u8> {
    encode_wire(&WireOrder::new(
        &queued.order,
        queued.ticket,
        queued.gated,
        queued.more_lines.as_deref(),
    ))
}

/// The version of a pass mark: no order, only the ticket its line's
/// progress may move to once it is delivered (see
/// [`RabbitQueue::publish_pass`]).
const PASS_VERSION: u32 = 3;

#[derive(Serialize, Deserialize)]
struct WirePass {
    v: u32,
    through: u64,
}

/// The ticket a pass mark carries, if the message is one.
pub(crate) fn decode_pass(body: &[u8]) -> Option<u64> {
    serde_json::from_slice::<WirePass>(body)
        .ok()
        .filter(|pass| pass.v == PASS_VERSION)
        .map(|pass| pass.through)
}

/// What a message's first fields say it is.
#[derive(Deserialize)]
struct Envelope<'a> {
    v: u32,
    #[serde(borrow, default)]
    orders: Option<Vec<&'a serde_json::value::RawValue>>,
}

/// The orders a message carries: one (version 1) or a batch (version 2),
/// each read on its own, so one bad order does not take the others with
/// it. An order that cannot be read comes with its own bytes (those of a
/// version 1 message, or the whole message when even its envelope cannot
/// be read) and the reason.
pub fn decode_message(body: &[u8]) -> Vec<Result<QueuedOrder, (Vec<u8>, String)>> {
    let unreadable = |bytes: &[u8], why: String| Err((bytes.to_vec(), why));
    match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope {
            v: publish::BATCH_VERSION,
            orders: Some(orders),
        }) => orders
            .into_iter()
            .map(|raw| {
                let bytes = raw.get().as_bytes();
                decode(bytes).or_else(|why| unreadable(bytes, why))
            })
            .collect(),
        _ => vec![decode(body).or_else(|why| unreadable(body, why))],
    }
}

/// Decodes a version 1 message body; the error says why it cannot be
/// processed.
pub fn decode(body: &[u8]) -> Result<QueuedOrder, String> {
    let wire: WireOrder =
        serde_json::from_slice(body).map_err(|e| format!("undecodable message: {e}"))?;
    match (wire.v, wire.lines.is_some()) {
        (WIRE_VERSION, false) | (CART_VERSION, true) => {}
        (WIRE_VERSION | CART_VERSION, _) => {
            return Err(format!("version {} with the wrong lines", wire.v))
        }
        (v, _) => return Err(format!("unknown message version {v}")),
    }
    let field = |name: &str, e: crate::error::ReservationError| format!("bad {name}: {e}");
    let created_at = DateTime::from_timestamp_micros(wire.created_at)
        .ok_or_else(|| format!("bad created_at: {}", wire.created_at))?
        .naive_utc();
    let order = NewOrder {
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
    };
    let more_lines = wire
        .lines
        .iter()
        .flatten()
        .enumerate()
        .map(|(n, line)| {
            // Numbered as the cart's lines are: the first is `lines[0]`.
            let field = |name: &str, e| field(&format!("lines[{}].{name}", n + 1), e);
            Ok(QueuedLine {
                order: NewOrder {
                    id: ReservationId::parse(&line.id).map_err(|e| field("id", e))?,
                    sku: Sku::parse(&line.sku).map_err(|e| field("sku", e))?,
                    quantity: line.quantity,
                    idempotency_key: None,
                    ..order.clone()
                },
                gated: line.gated,
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    // Each line is a row of its own: the same id twice could never be
    // recorded, and the same SKU twice is not a cart ReserveCart makes.
    let mut seen = std::collections::HashSet::from([order.id.as_str()]);
    let mut skus = std::collections::HashSet::from([order.sku.as_str()]);
    for (n, line) in more_lines.iter().enumerate() {
        if !seen.insert(line.order.id.as_str()) {
            return Err(format!("bad lines[{}].id: used by another line", n + 1));
        }
        if !skus.insert(line.order.sku.as_str()) {
            return Err(format!("bad lines[{}].sku: another line's SKU", n + 1));
        }
    }
    Ok(QueuedOrder {
        ticket: wire.ticket,
        gated: wire.gated,
        redriven: false,
        traceparent: wire.traceparent,
        order,
        more_lines: wire.lines.is_some().then_some(more_lines),
    })
}

/// From a message [`decode`] refused, what identifies the reservation (id,
/// sku, user, quantity, gated; a cart's further lines, those that can be
/// read), if that much can still be read: enough to record it REJECTED and
/// return its units, so a message from a newer or buggy producer does not
/// leave its caller QUEUED forever. The creation time is now and the key
/// is dropped.
pub fn salvage(body: &[u8]) -> Option<QueuedOrder> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    let first = salvage_line(&value)?;
    let first_id = first.0.clone();
    let user = UserId::parse(value.get("user")?.as_str()?).ok()?;
    let created_at = crate::domain::now();
    let order = |(id, sku, quantity)| NewOrder {
        id,
        sku,
        user: user.clone(),
        quantity,
        idempotency_key: None,
        created_at,
    };
    // A cart (version 4, or any message with lines) stays a cart with the
    // lines that can be read, even none.
    let is_cart = value.get("v").and_then(|v| v.as_u64()) == Some(u64::from(CART_VERSION))
        || value.get("lines").is_some_and(|lines| lines.is_array());
    let more_lines = is_cart.then(|| {
        value
            .get("lines")
            .and_then(|lines| lines.as_array())
            .into_iter()
            .flatten()
            .filter_map(|line| {
                Some(QueuedLine {
                    order: order(salvage_line(line)?),
                    gated: gated(line),
                })
            })
            // One row per id: a repeated id is left out.
            .fold(Vec::<QueuedLine>::new(), |mut kept, line| {
                let id = &line.order.id;
                if *id != first_id && kept.iter().all(|k| k.order.id != *id) {
                    kept.push(line);
                }
                kept
            })
    });
    Some(QueuedOrder {
        ticket: value.get("ticket").and_then(|t| t.as_u64()).unwrap_or(0),
        gated: gated(&value),
        redriven: false,
        traceparent: None,
        order: order(first),
        more_lines,
    })
}

/// The id, SKU and quantity of an order or a cart's line, if readable.
fn salvage_line(value: &serde_json::Value) -> Option<(ReservationId, Sku, u32)> {
    let text = |name: &str| value.get(name)?.as_str();
    Some((
        ReservationId::parse(text("id")?).ok()?,
        Sku::parse(text("sku")?).ok()?,
        u32::try_from(value.get("quantity")?.as_u64()?).ok()?,
    ))
}

fn gated(value: &serde_json::Value) -> bool {
    value
        .get("gated")
        .and_then(|g| g.as_bool())
        .unwrap_or(false)
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
    for queue in names.order_queues() {
        channel
            .queue_declare(queue.as_str().into(), durable, quorum_args(true))
            .await?;
    }
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
    async fn close(&self) {
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

/// Connects to the first broker of `url` that answers (a cluster's nodes
/// are listed `host:port,host:port`), from the one that answered last.
async fn open(url: &LiveUrl, names: &QueueNames) -> Result<Link, String> {
    let mut failures = Vec::new();
    for (index, uri) in url.hosts() {
        match open_one(url, &uri, names).await {
            Ok(link) => {
                url.answered(index);
                return Ok(link);
            }
            Err(err) => failures.push(err),
        }
    }
    Err(format!(
        "{} (RabbitMQ at {})",
        failures.join("; "),
        url.describe("backends.queue")
    ))
}

/// The longest [`open`] takes: each host in turn not answering.
fn open_timeout(url: &LiveUrl) -> Duration {
    CONNECT_TIMEOUT * u32::try_from(url.hosts().len()).unwrap_or(u32::MAX)
}

async fn open_one(url: &LiveUrl, uri: &str, names: &QueueNames) -> Result<Link, String> {
    let host = uri.rsplit_once('@').map_or(uri, |(_, host)| host);
    let host = host.split(['/', '?']).next().unwrap_or(host);
    let connect = async {
        let properties = ConnectionProperties::default();
        let connection = if url.is_tls() {
            let runtime = lapin::runtime::default_runtime()?;
            Connection::connect_with_config(uri, properties, tls_config(url), runtime).await?
        } else {
            Connection::connect(uri, properties).await?
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
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(err)) => Err(format!("{host}: {err}")),
        Err(_) => Err(format!("{host}: no answer within {CONNECT_TIMEOUT:?}")),
    }
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

/// Sends `body` to `queue` through the default exchange, returned if the
/// queue does not exist. lapin checks the channel before writing, so an
/// error means nothing reached the broker.
async fn send_mandatory(
    channel: &Channel,
    queue: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<lapin::PublisherConfirm, QueueError> {
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            },
            body,
            properties,
        )
        .await
        .map_err(|e| QueueError::Unavailable(e.to_string()))
}

/// Adds a `traceparent` header, when there is one.
fn with_traceparent(properties: BasicProperties, traceparent: Option<String>) -> BasicProperties {
    match traceparent {
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
    /// The connection, names and store, which the publishing task shares.
    publisher: Arc<Publisher>,
    /// Started on first use, so the queue can be built outside a runtime.
    jobs: OnceLock<mpsc::Sender<Publish>>,
    /// Per line (the one queue, then each partition: [`super::ticket_line`]),
    /// the ticket number its processor is done through.
    done: Box<[AtomicU64]>,
    closed: AtomicBool,
}

impl std::fmt::Debug for RabbitQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RabbitQueue")
            .field("names", &self.publisher.names)
            .finish_non_exhaustive()
    }
}

impl RabbitQueue {
    /// Connects lazily: the server starts (and refuses Reserve with
    /// UNAVAILABLE) while the broker is still coming up.
    pub fn new(uri: impl Into<LiveUrl>, config: &RabbitConfig, store: Store) -> Self {
        let uri: LiveUrl = uri.into();
        let publisher = Publisher {
            open_timeout: open_timeout(&uri),
            uri,
            names: QueueNames::partitioned(&config.queue, config.partitions),
            store,
            publish_timeout: Duration::from_millis(config.publish_timeout_ms),
            per_message: config.publish_batch_max,
            reconnect_delay: Duration::from_millis(config.reconnect_delay_ms),
            link: ArcSwapOption::empty(),
            reconnect: Mutex::new(None),
        };
        Self {
            publisher: Arc::new(publisher),
            jobs: OnceLock::new(),
            done: (0..super::LINES).map(|_| AtomicU64::new(0)).collect(),
            closed: AtomicBool::new(false),
        }
    }

    pub fn names(&self) -> &QueueNames {
        &self.publisher.names
    }

    /// Publishes a pass mark for `through` (a ticket) to `queue`, confirmed.
    /// Queues deliver in order, deliveries a dead consumer held going back
    /// ahead, so once the mark is delivered every order numbered up to it
    /// that was ever stored has been delivered before it: tickets whose
    /// publish failed are passed without counting on a later order.
    pub async fn publish_pass(&self, queue: &str, through: u64) -> Result<(), QueueError> {
        let body = serde_json::to_vec(&WirePass {
            v: PASS_VERSION,
            through,
        })
        .expect("a pass mark always serialises");
        let publish = async {
            let link = self.publisher.link().await?;
            let sent = async {
                let confirm =
                    send_mandatory(&link.channel, queue, &body, persistent_json(None)).await?;
                match confirm.await {
                    Ok(lapin::Confirmation::Ack(None)) => Ok(()),
                    other => Err(QueueError::Unconfirmed(format!("{other:?}"))),
                }
            };
            let sent = tokio::time::timeout(self.publisher.publish_timeout, sent)
                .await
                .unwrap_or_else(|_| Err(QueueError::Unconfirmed("no confirm in time".into())));
            if sent.is_err() {
                // As for orders: a channel refused once is refused again.
                self.publisher.discard(link);
            }
            sent
        };
        tokio::time::timeout(self.publish_bound(), publish)
            .await
            .unwrap_or_else(|_| Err(QueueError::Unconfirmed("no answer in time".into())))
    }

    /// The longest a publish takes from the call to the broker's answer,
    /// numbering included.
    pub fn publish_bound(&self) -> Duration {
        self.publisher.publish_timeout * 2 + self.publisher.open_timeout
    }

    async fn channel(&self) -> Result<Channel, QueueError> {
        self.publisher.channel().await
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
                self.publisher.names.processed.as_str().into(),
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
                                self.done_through(notice.through);
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
                _ = tokio::time::sleep(self.publisher.reconnect_delay) => {}
                _ = stop.changed() => return,
            }
        }
    }

    async fn open_follower(&self) -> Result<(Link, Consumer), String> {
        let link = open(&self.publisher.uri, &self.publisher.names).await?;
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
                    self.publisher.names.processed.as_str().into(),
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
    /// start from the progress the processors recorded.
    async fn catch_up(&self) {
        match self.publisher.store.queue_lines().await {
            Ok(lines) => {
                for line in lines {
                    self.done_through(super::ticket(line.partition, line.done_through));
                }
            }
            Err(err) => tracing::warn!(error = %err, "queue progress unknown"),
        }
    }

    /// Moves the line of `ticket` on to it.
    fn done_through(&self, ticket: u64) {
        let (line, number) = super::ticket_line(ticket);
        self.done[line].fetch_max(number, Ordering::AcqRel);
    }
}

#[async_trait]
impl OrderQueue for RabbitQueue {
    async fn publish(
        &self,
        order: NewOrder,
        gated: bool,
        more_lines: Option<Vec<QueuedLine>>,
    ) -> Result<u64, QueueError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(QueueError::Closed);
        }
        let jobs = self.jobs.get_or_init(|| {
            let publisher = Arc::clone(&self.publisher);
            batching::spawn(publish::LIMITS, move |batch| {
                let publisher = Arc::clone(&publisher);
                async move { publisher.publish(batch).await }
            })
        });
        let (reply, answer) = oneshot::channel();
        let bound = self.publish_bound();
        let publish = Publish {
            order,
            gated,
            more_lines,
            traceparent: crate::telemetry::trace::current_traceparent(),
            reply,
            deadline: tokio::time::Instant::now() + bound,
        };
        let gone = || QueueError::Unavailable("the publishing task has stopped".into());
        jobs.send(publish).await.map_err(|_| gone())?;
        // The batch bounds its own steps (connect, ticket statement,
        // confirm); this bounds the wait for a batch to start too. Past it
        // the order may still go out, so it counts as unconfirmed.
        match tokio::time::timeout(bound, answer).await {
            Ok(Ok(answer)) => answer,
            // The batch's task ended without an answer: its message may
            // have gone out.
            Ok(Err(_)) => Err(QueueError::Unconfirmed(
                "the publishing task stopped before the broker's answer".into(),
            )),
            Err(_) => Err(QueueError::Unconfirmed(format!(
                "no answer from the publisher within {bound:?}"
            ))),
        }
    }

    async fn position(&self, ticket: u64) -> u64 {
        // Only the orders of its own line are ahead of it: the other
        // partitions are processed beside it.
        let (line, number) = super::ticket_line(ticket);
        number.saturating_sub(self.done[line].load(Ordering::Acquire) + 1)
    }

    async fn processed(&self, through: u64, ids: &[ReservationId]) {
        self.done_through(through);
        let store = &self.publisher.store;
        let recorded = match super::ticket_line(through) {
            (0, number) => store.advance_queue(number).await,
            (line, number) => {
                let partition = u16::try_from(line - 1).unwrap_or(0);
                store.advance_partition(partition, number).await
            }
        };
        if let Err(err) = recorded {
            // Only positions suffer: replicas catch up at the next batch.
            tracing::warn!(error = %err, "queue progress not recorded");
        }
        self.announce(through, ids).await;
    }

    async fn backlog(&self) -> Option<u64> {
        let mut ready = 0;
        for queue in self.publisher.names.order_queues() {
            ready += self.count(&queue).await?;
        }
        // Orders numbered past what the processors are done with, over
        // every line. They count orders where the broker counts messages (a
        // message can carry several), and the deliveries a processor holds
        // unacked, which the broker's count leaves out; a failed publish's
        // ticket counts until its processor passes it.
        let numbered = async {
            let lines = self.publisher.store.queue_lines().await.ok()?;
            Some(
                lines
                    .iter()
                    .map(|line| line.last_ticket.saturating_sub(line.done_through))
                    .sum::<u64>(),
            )
        }
        .await;
        if ready == 0 {
            // Empty only once every ticket handed out is done with.
            return numbered;
        }
        Some(numbered.map_or(ready, |orders| orders.max(ready)))
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Release);
    }
}

/// Deletes a deployment's queues (`partitions` of them besides the one
/// queue) and exchange (benchmarks and tests that made their own;
/// operators retire a queue name the same way).
pub async fn delete_topology(uri: &str, queue: &str, partitions: u16) {
    let names = QueueNames::partitioned(queue, partitions);
    let Ok(link) = open(&uri.into(), &names).await else {
        return;
    };
    let mut queues = names.order_queues();
    queues.push(names.dead_letters.clone());
    for queue in &queues {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn order(n: u64) -> QueuedOrder {
        QueuedOrder {
            ticket: n,
            order: NewOrder {
                id: ReservationId::generate(),
                sku: Sku::parse("S").unwrap(),
                user: UserId::parse(&format!("u{n}")).unwrap(),
                quantity: 1,
                idempotency_key: None,
                created_at: DateTime::from_timestamp_micros(1_700_000_000_000_000)
                    .unwrap()
                    .naive_utc(),
            },
            gated: true,
            redriven: false,
            traceparent: None,
            more_lines: None,
        }
    }

    #[test]
    fn a_version_one_message_is_one_order() {
        let one = order(1);
        let decoded = decode_message(&encode(&one));
        assert_eq!(decoded.len(), 1);
        assert_eq!(decoded[0].as_ref().unwrap(), &one);
    }

    #[test]
    fn a_batch_reads_each_order_with_its_own_trace() {
        let (a, b) = (order(1), order(2));
        let mut traced = WireOrder::new(&b.order, b.ticket, b.gated, None);
        traced.traceparent = Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into());
        let body = serde_json::to_vec(&serde_json::json!({
            "v": 2,
            "orders": [serde_json::from_slice::<serde_json::Value>(&encode(&a)).unwrap(), traced],
        }))
        .unwrap();
        let decoded: Vec<_> = decode_message(&body)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(decoded[0], a);
        assert_eq!(decoded[1].order, b.order);
        assert_eq!(decoded[1].traceparent, traced.traceparent);
    }

    fn cart(n: u64) -> QueuedOrder {
        let mut cart = order(n);
        cart.more_lines = Some(
            ["T", "U"]
                .into_iter()
                .map(|sku| QueuedLine {
                    order: NewOrder {
                        id: ReservationId::generate(),
                        sku: Sku::parse(sku).unwrap(),
                        quantity: 2,
                        idempotency_key: None,
                        ..cart.order.clone()
                    },
                    gated: sku == "T",
                })
                .collect(),
        );
        cart.order.idempotency_key = Some(IdempotencyKey::parse("k").unwrap());
        cart
    }

    #[test]
    fn a_cart_is_one_version_four_message_read_whole_or_salvaged_line_by_line() {
        let whole = cart(3);
        let body = encode(&whole);
        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["v"], 4, "readers of version 1 must refuse it");
        assert_eq!(decode(&body).unwrap(), whole);
        assert_eq!(decode_message(&body)[0].as_ref().unwrap(), &whole);
        // In a batch beside a single order.
        let single = order(4);
        let batch = serde_json::to_vec(&serde_json::json!({
            "v": 2,
            "orders": [value, serde_json::from_slice::<serde_json::Value>(&encode(&single)).unwrap()],
        }))
        .unwrap();
        let decoded: Vec<_> = decode_message(&batch)
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(decoded, [whole.clone(), single]);
        // A version 1 message with lines, or a version 4 one without, is
        // neither an order nor a cart.
        let mut bad = value.clone();
        bad["v"] = 1.into();
        assert!(decode(&serde_json::to_vec(&bad).unwrap()).is_err());
        let mut bad = value.clone();
        bad.as_object_mut().unwrap().remove("lines");
        assert!(decode(&serde_json::to_vec(&bad).unwrap()).is_err());
        // A cart of one line is a cart still, not a single order.
        let mut one = order(5);
        one.more_lines = Some(Vec::new());
        let body = encode(&one);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&body).unwrap()["v"],
            4
        );
        assert_eq!(decode(&body).unwrap(), one);
        assert!(salvage(&body).unwrap().is_cart());
        // A line repeating another's id, or SKU, is unreadable (its rows
        // could never be written); salvage keeps one line per id.
        let mut twice = value.clone();
        twice["lines"][1]["id"] = twice["id"].clone();
        let twice = serde_json::to_vec(&twice).unwrap();
        let why = decode(&twice).unwrap_err();
        assert!(why.contains("lines[2].id"), "{why}");
        assert_eq!(salvage(&twice).unwrap().more_lines.unwrap().len(), 1);
        let mut same_sku = value.clone();
        same_sku["lines"][0]["sku"] = same_sku["sku"].clone();
        let why = decode(&serde_json::to_vec(&same_sku).unwrap()).unwrap_err();
        assert!(why.contains("lines[1].sku"), "{why}");
        // A line that cannot be read: the cart is unreadable, and salvage
        // keeps what identifies every readable line.
        let mut broken = value.clone();
        broken["lines"][1]["sku"] = "no spaces allowed".into();
        let broken = serde_json::to_vec(&broken).unwrap();
        let why = decode(&broken).unwrap_err();
        assert!(why.contains("lines[2].sku"), "{why}");
        let salvaged = salvage(&broken).unwrap();
        assert_eq!(salvaged.order.id, whole.order.id);
        let (salvaged, whole) = (
            salvaged.more_lines.unwrap(),
            whole.more_lines.as_deref().unwrap().to_vec(),
        );
        assert_eq!(salvaged.len(), 1);
        assert_eq!(salvaged[0].order.id, whole[0].order.id);
        assert!(salvaged[0].gated);
        assert_eq!(salvaged[0].order.user, whole[0].order.user);
    }

    #[test]
    fn what_cannot_be_read_comes_back_whole() {
        let garbage = b"\xff not json".to_vec();
        let decoded = decode_message(&garbage);
        assert_eq!(decoded.len(), 1);
        let (bytes, why) = decoded[0].as_ref().unwrap_err();
        assert_eq!(bytes, &garbage);
        assert!(why.contains("undecodable"), "{why}");
    }
}
