//! The order queue between the request path and the single order processor.
//!
//! An admitted reservation is published here and answered QUEUED; one
//! processor takes orders in arrival order, commits them to the database in
//! batches ([`crate::reserve::Pipeline::process_batch`]), and only
//! then lets them go. The database sees a steady first-come-first-served
//! load however large the spike.

pub mod dead_letters;
mod embedded;
mod rabbit;

pub use dead_letters::DeadLetters;
pub use embedded::{EmbeddedQueue, EmbeddedSource};
/// Most orders one RabbitMQ message can carry (`rabbitmq.publish_batch_max`).
pub const PUBLISH_BATCH_MAX: usize = rabbit::PUBLISH_BATCH_MAX;

pub use rabbit::{
    decode, decode_message, delete_topology, encode, salvage, QueueNames, RabbitDeadLetters,
    RabbitQueue, RabbitSource,
};

use std::time::Duration;

use async_trait::async_trait;

use crate::{domain::ReservationId, store::NewOrder};

/// What travels through the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedOrder {
    /// Arrival sequence number, for queue positions.
    pub ticket: u64,
    pub order: NewOrder,
    /// Whether the stock gate admitted it (and so holds units for it that
    /// must be settled with the gate).
    pub gated: bool,
    /// Sent back from the dead-letter queue by an operator: a reservation
    /// the processor gave up on is decided again (see
    /// [`crate::store::GIVEN_UP_REASON`]). Never gated: giving up returned
    /// its gate units.
    pub redriven: bool,
    /// The W3C `traceparent` of the publish, when the call was traced: the
    /// processor's span for this order joins the buyer's trace.
    pub traceparent: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum QueueError {
    #[error("order queue is full ({0} waiting)")]
    Full(usize),
    #[error("order queue is closed for shutdown")]
    Closed,
    /// Definitely not enqueued (the broker is unreachable, or returned it).
    #[error("order queue unavailable: {0}")]
    Unavailable(String),
    /// Sent, but the broker never confirmed it: it may or may not be
    /// stored, so the reservation must be fenced off in the database.
    #[error("order not confirmed by the queue: {0}")]
    Unconfirmed(String),
}

/// One queue backend.
#[async_trait]
pub trait OrderQueue: Send + Sync + 'static {
    /// Enqueues durably (as durable as the backend is) and returns the
    /// ticket. An error means the order was not enqueued.
    async fn publish(&self, order: NewOrder, gated: bool) -> Result<u64, QueueError>;

    /// Orders ahead of `ticket` that are not done yet.
    async fn position(&self, ticket: u64) -> u64;

    /// Records that a batch was processed: every order up to `through` is
    /// done, and `ids` have their row (or were rejected).
    async fn processed(&self, through: u64, ids: &[ReservationId]);

    /// Orders waiting that this process cannot see (`None`: cannot tell
    /// now). The embedded queue answers 0: its orders are all in this
    /// process's memory.
    async fn backlog(&self) -> Option<u64>;

    /// Stops accepting orders; what is already queued is still delivered.
    fn close(&self);
}

/// A batch the processor took off the queue.
#[derive(Debug)]
pub struct TakenBatch {
    /// The orders read in full, in arrival order.
    pub orders: Vec<QueuedOrder>,
    /// Messages that could not be read.
    pub unreadable: Vec<Unreadable>,
    /// What acknowledging the batch takes (RabbitMQ: its last delivery tag).
    receipt: u64,
}

/// A message the processor cannot read in full.
#[derive(Debug)]
pub struct Unreadable {
    /// The message as the queue carries it.
    pub message: Vec<u8>,
    /// Why it cannot be read.
    pub reason: String,
    /// What could still be read of the order ([`salvage`]): enough to record
    /// it REJECTED and return its units.
    pub salvaged: Option<QueuedOrder>,
}

/// The processor's half of a queue backend: batches in arrival order, let
/// go only once done. One processor loop runs over either backend.
#[async_trait]
pub trait OrderSource: Send {
    /// Waits for orders, then takes up to `max` of them, lingering at most
    /// `linger` to fill the batch. A backend that can lose its connection
    /// reconnects inside. `None`: there will be no more (the embedded queue,
    /// closed and drained).
    async fn next_batch(&mut self, max: usize, linger: Duration) -> Option<TakenBatch>;

    /// Keeps a message the processor gave up on, with the reason, where
    /// operators can find it (RabbitMQ: the dead-letter queue).
    async fn set_aside(&mut self, message: &[u8], reason: &str) -> Result<(), String>;

    /// The batch is done: let it go. An error means it will be delivered
    /// again, and the database's idempotency absorbs the repeat.
    async fn acknowledge(&mut self, batch: &TakenBatch) -> Result<(), String>;

    /// The batch could not be fully processed: have it delivered again where
    /// the backend can.
    async fn hand_back(&mut self, batch: TakenBatch);

    /// Whether orders not yet acknowledged outlive this process (RabbitMQ).
    /// Such a source is left at once on stop; one without it (in memory) is
    /// drained to the end, since its orders exist nowhere else.
    fn redelivers(&self) -> bool;

    /// Stops consuming; what was not acknowledged stays queued.
    async fn close(&mut self);
}
