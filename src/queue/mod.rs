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

/// Most partitions of the RabbitMQ order queue (`rabbitmq.partitions`).
pub const MAX_PARTITIONS: u16 = 64;

/// The low bits of a ticket number an order within its line; the bits
/// above say which line: 0 the one queue, `p + 1` partition `p`. Tickets
/// of different lines thus never collide, and a replica that follows
/// several lines tells them apart by the ticket alone.
const LINE_SHIFT: u32 = 48;
const NUMBER_MASK: u64 = (1 << LINE_SHIFT) - 1;

/// Lines a ticket can belong to: the one queue and every partition.
pub const LINES: usize = MAX_PARTITIONS as usize + 1;

/// The ticket of order `number` in partition `partition` (`None`: the one
/// queue).
pub fn ticket(partition: Option<u16>, number: u64) -> u64 {
    let line = partition.map_or(0, |p| u64::from(p) + 1);
    (line << LINE_SHIFT) | (number & NUMBER_MASK)
}

/// Which line a ticket belongs to (0: the one queue, `p + 1`: partition
/// `p`), and its number within that line. A line past [`LINES`] (a
/// corrupt ticket) reads as the one queue's.
pub fn ticket_line(ticket: u64) -> (usize, u64) {
    let line = usize::try_from(ticket >> LINE_SHIFT).unwrap_or(0);
    let line = if line < LINES { line } else { 0 };
    (line, ticket & NUMBER_MASK)
}

/// The partition of a SKU's orders: FNV-1a of its bytes, so that every
/// replica and every release route a SKU alike (std's hasher is seeded
/// per process).
pub fn partition_of(sku: &str, partitions: u16) -> u16 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in sku.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    u16::try_from(hash % u64::from(partitions.max(1))).unwrap_or(0)
}

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
    /// `Some` for a cart (`order` is its first line, whose id is the
    /// cart's): its lines after the first, committed with it in one
    /// transaction (none for a cart of one line). `None`: a single order.
    pub more_lines: Option<Vec<QueuedLine>>,
}

/// A line of a queued cart after its first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedLine {
    pub order: NewOrder,
    /// Whether the gate admitted this line.
    pub gated: bool,
}

impl QueuedOrder {
    /// Whether this is a cart (several lines committed as one).
    pub fn is_cart(&self) -> bool {
        self.more_lines.is_some()
    }

    /// Every line, the first (`order`) included, in the order asked for.
    pub fn lines(&self) -> Vec<NewOrder> {
        std::iter::once(self.order.clone())
            .chain(
                self.more_lines
                    .iter()
                    .flatten()
                    .map(|line| line.order.clone()),
            )
            .collect()
    }

    /// Sent back from the dead-letter queue: decided again, holding no
    /// gate units for any line (giving up returned them).
    pub fn mark_redriven(&mut self) {
        self.redriven = true;
        self.gated = false;
        for line in self.more_lines.iter_mut().flatten() {
            line.gated = false;
        }
    }

    /// Per line (as [`Self::lines`]), whether the gate admitted it.
    pub fn gated_lines(&self) -> Vec<bool> {
        std::iter::once(self.gated)
            .chain(self.more_lines.iter().flatten().map(|line| line.gated))
            .collect()
    }
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
    /// ticket. An error means the order was not enqueued. A cart is its
    /// first line as `order` and the others as `more_lines` (`Some`, empty
    /// for a cart of one line): one message, one ticket.
    async fn publish(
        &self,
        order: NewOrder,
        gated: bool,
        more_lines: Option<Vec<QueuedLine>>,
    ) -> Result<u64, QueueError>;

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
    /// Pass marks taken (RabbitMQ partitions): every ticket of its line
    /// up to each is delivered, and those not in this or an earlier batch
    /// will never be (their publish failed).
    pub passes: Vec<u64>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tickets_of_different_lines_never_collide() {
        assert_eq!(ticket(None, 7), 7, "the one queue's tickets are unchanged");
        assert_eq!(ticket_line(ticket(None, 7)), (0, 7));
        assert_eq!(ticket_line(ticket(Some(0), 7)), (1, 7));
        assert_eq!(ticket_line(ticket(Some(63), 7)), (64, 7));
        assert_ne!(ticket(Some(0), 7), ticket(Some(1), 7));
        assert_eq!(
            ticket_line(u64::MAX).0,
            0,
            "a corrupt line reads as the one queue"
        );
    }

    #[test]
    fn a_sku_always_lands_in_the_same_partition_and_skus_spread() {
        // Fixed values: a change of hash would move SKUs between
        // partitions under a running sale.
        let routed: Vec<u16> = (1..=5)
            .map(|i| partition_of(&format!("SKU-{i}"), 4))
            .collect();
        assert_eq!(routed, [0, 1, 2, 3, 0]);
        assert_eq!(partition_of("A", 16), 12);
        assert_eq!(partition_of("anything", 1), 0);
        let mut per_partition = [0usize; 4];
        for i in 0..4_000 {
            per_partition[usize::from(partition_of(&format!("SKU-{i}"), 4))] += 1;
        }
        for count in per_partition {
            assert!((800..1_200).contains(&count), "{per_partition:?}");
        }
    }
}
