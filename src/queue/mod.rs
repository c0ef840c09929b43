//! The order queue between the request path and the single order processor.
//!
//! An admitted reservation is published here and answered QUEUED; one
//! processor takes orders in arrival order, commits them to the database in
//! batches ([`crate::domain::pipeline::Pipeline::process_batch`]), and only
//! then lets them go. The database sees a steady first-come-first-served
//! load however large the spike.

mod embedded;

pub use embedded::{EmbeddedQueue, EmbeddedReceiver};

use async_trait::async_trait;

use crate::store::NewOrder;

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
}

/// One queue backend.
#[async_trait]
pub trait OrderQueue: Send + Sync + 'static {
    /// Enqueues durably (as durable as the backend is) and returns the
    /// ticket. An error means the order was not enqueued.
    async fn publish(&self, order: NewOrder, gated: bool) -> Result<u64, QueueError>;

    /// Orders ahead of `ticket` that are not done yet.
    async fn position(&self, ticket: u64) -> u64;

    /// Records that every order up to `ticket` is done.
    async fn done_through(&self, ticket: u64);

    /// Stops accepting orders; what is already queued is still delivered.
    fn close(&self);
}
