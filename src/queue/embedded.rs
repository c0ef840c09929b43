//! The in-process queue of the embedded profile: a bounded channel feeding
//! the one processor task. It lives in memory, so a crash (not a graceful
//! stop, which drains it) loses orders still queued; their units were never
//! taken from the database, so nothing leaks, but callers told QUEUED will
//! find the reservation gone. Use RabbitMQ where that matters.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Mutex,
};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{OrderQueue, QueueError, QueuedOrder};
use crate::{domain::ReservationId, store::NewOrder};

/// The publishing side.
#[derive(Debug)]
pub struct EmbeddedQueue {
    /// Ticket assignment and send happen under this lock so tickets leave in
    /// the order they were issued; `None` once closed.
    sender: Mutex<Option<(u64, mpsc::Sender<QueuedOrder>)>>,
    capacity: usize,
    done: AtomicU64,
}

/// The consuming side, owned by the processor.
pub type EmbeddedReceiver = mpsc::Receiver<QueuedOrder>;

impl EmbeddedQueue {
    pub fn new(capacity: usize) -> (Self, EmbeddedReceiver) {
        let (tx, rx) = mpsc::channel(capacity);
        let queue = Self {
            sender: Mutex::new(Some((0, tx))),
            capacity,
            done: AtomicU64::new(0),
        };
        (queue, rx)
    }
}

#[async_trait]
impl OrderQueue for EmbeddedQueue {
    async fn publish(&self, order: NewOrder, gated: bool) -> Result<u64, QueueError> {
        let mut guard = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        let Some((last, tx)) = guard.as_mut() else {
            return Err(QueueError::Closed);
        };
        let ticket = *last + 1;
        match tx.try_send(QueuedOrder {
            ticket,
            order,
            gated,
        }) {
            Ok(()) => {
                *last = ticket;
                Ok(ticket)
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(QueueError::Full(self.capacity)),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(QueueError::Closed),
        }
    }

    async fn position(&self, ticket: u64) -> u64 {
        ticket.saturating_sub(self.done.load(Ordering::Acquire) + 1)
    }

    async fn settled(&self, through: u64, _ids: &[ReservationId]) {
        self.done.fetch_max(through, Ordering::AcqRel);
    }

    async fn backlog(&self) -> Option<u64> {
        Some(0)
    }

    fn close(&self) {
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{now, ReservationId, Sku, UserId};

    fn order() -> NewOrder {
        NewOrder {
            id: ReservationId::generate(),
            sku: Sku::parse("S").unwrap(),
            user: UserId::parse("u").unwrap(),
            quantity: 1,
            idempotency_key: None,
            created_at: now(),
        }
    }

    #[tokio::test]
    async fn tickets_positions_capacity_and_close() {
        let (queue, mut rx) = EmbeddedQueue::new(2);
        assert_eq!(queue.publish(order(), true).await.unwrap(), 1);
        assert_eq!(queue.publish(order(), false).await.unwrap(), 2);
        assert!(matches!(
            queue.publish(order(), true).await,
            Err(QueueError::Full(2))
        ));
        assert_eq!(queue.position(2).await, 1);
        assert_eq!(rx.recv().await.unwrap().ticket, 1);
        queue.settled(1, &[]).await;
        assert_eq!(queue.position(2).await, 0);
        queue.close();
        assert!(matches!(
            queue.publish(order(), true).await,
            Err(QueueError::Closed)
        ));
        // Closing still delivers what was queued, then ends.
        let last = rx.recv().await.unwrap();
        assert_eq!((last.ticket, last.gated), (2, false));
        assert!(rx.recv().await.is_none());
    }
}
