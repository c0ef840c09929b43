//! The order queue between the request path and the single order processor.
//!
//! An admitted reservation is published here and answered QUEUED; one
//! processor takes orders in arrival order, commits them to the database in
//! batches ([`crate::reserve::Pipeline::process_batch`]), and only
//! then lets them go. The database sees a steady first-come-first-served
//! load however large the spike.

mod embedded;
mod rabbit;
mod tickets;

pub use embedded::{EmbeddedQueue, EmbeddedReceiver};
pub use rabbit::{
    decode, delete_topology, encode, salvage, QueueNames, RabbitConsumer, RabbitQueue,
};

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
}

#[derive(Debug, thiserror::Error)]
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

    /// Records that a batch was settled: every order up to `through` is
    /// done, and `ids` have their row (or were rejected).
    async fn settled(&self, through: u64, ids: &[ReservationId]);

    /// Orders waiting that this process cannot see (`None`: cannot tell
    /// now). The embedded queue answers 0: its orders are all in this
    /// process's memory.
    async fn backlog(&self) -> Option<u64>;

    /// Stops accepting orders; what is already queued is still delivered.
    fn close(&self);
}
