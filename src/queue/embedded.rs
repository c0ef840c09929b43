//! The in-process queue of the embedded profile: a bounded channel feeding
//! the one processor task. It lives in memory, so a crash (not a graceful
//! stop, which drains it) loses orders still queued; their units were never
//! taken from the database, so nothing leaks, but callers told QUEUED will
//! find the reservation gone. Use RabbitMQ where that matters.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Mutex,
    },
    time::Duration,
};

use async_trait::async_trait;
use tokio::sync::mpsc;

use super::{OrderQueue, OrderSource, QueueError, QueuedLine, QueuedOrder, TakenBatch};
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
#[derive(Debug)]
pub struct EmbeddedSource {
    receiver: mpsc::Receiver<QueuedOrder>,
}

impl EmbeddedQueue {
    pub fn new(capacity: usize) -> (Self, EmbeddedSource) {
        let (tx, rx) = mpsc::channel(capacity);
        let queue = Self {
            sender: Mutex::new(Some((0, tx))),
            capacity,
            done: AtomicU64::new(0),
        };
        (queue, EmbeddedSource { receiver: rx })
    }
}

#[async_trait]
impl OrderQueue for EmbeddedQueue {
    async fn publish(
        &self,
        order: NewOrder,
        gated: bool,
        more_lines: Option<Vec<QueuedLine>>,
    ) -> Result<u64, QueueError> {
        let mut guard = self.sender.lock().unwrap_or_else(|p| p.into_inner());
        let Some((last, tx)) = guard.as_mut() else {
            return Err(QueueError::Closed);
        };
        let ticket = *last + 1;
        match tx.try_send(QueuedOrder {
            ticket,
            order,
            gated,
            redriven: false,
            traceparent: crate::telemetry::trace::current_traceparent(),
            more_lines,
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

    async fn processed(&self, through: u64, _ids: &[ReservationId]) {
        self.done.fetch_max(through, Ordering::AcqRel);
    }

    async fn backlog(&self) -> Option<u64> {
        Some(0)
    }

    fn close(&self) {
        self.sender.lock().unwrap_or_else(|p| p.into_inner()).take();
    }
}

#[async_trait]
impl OrderSource for EmbeddedSource {
    async fn next_batch(&mut self, max: usize, linger: Duration) -> Option<TakenBatch> {
        let mut orders = Vec::with_capacity(max);
        if self.receiver.recv_many(&mut orders, max).await == 0 {
            return None;
        }
        if orders.len() < max && !linger.is_zero() {
            tokio::time::sleep(linger).await;
            while orders.len() < max {
                match self.receiver.try_recv() {
                    Ok(order) => orders.push(order),
                    Err(_) => break,
                }
            }
        }
        Some(TakenBatch {
            passes: Vec::new(),
            orders,
            unreadable: Vec::new(),
            receipt: 0,
        })
    }

    async fn set_aside(&mut self, _message: &[u8], reason: &str) -> Result<(), String> {
        // No dead-letter queue in memory: the order is recorded REJECTED
        // with this reason, which is where operators find it.
        tracing::warn!(%reason, "order given up");
        Ok(())
    }

    async fn acknowledge(&mut self, _batch: &TakenBatch) -> Result<(), String> {
        Ok(())
    }

    async fn hand_back(&mut self, batch: TakenBatch) {
        // Nothing to deliver it again from: the orders stay visible as
        // QUEUED and the log says which.
        let ids: Vec<String> = batch
            .orders
            .iter()
            .map(|q| q.order.id.as_str().to_owned())
            .collect();
        tracing::error!(
            ?ids,
            "an order could be neither committed nor recorded as failed"
        );
    }

    fn redelivers(&self) -> bool {
        false
    }

    async fn close(&mut self) {}
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
        let (queue, mut source) = EmbeddedQueue::new(2);
        assert_eq!(queue.publish(order(), true, None).await.unwrap(), 1);
        assert_eq!(queue.publish(order(), false, None).await.unwrap(), 2);
        assert!(matches!(
            queue.publish(order(), true, None).await,
            Err(QueueError::Full(2))
        ));
        assert_eq!(queue.position(2).await, 1);
        let first = source.next_batch(1, Duration::ZERO).await.unwrap();
        assert_eq!(first.orders[0].ticket, 1);
        queue.processed(1, &[]).await;
        assert_eq!(queue.position(2).await, 0);
        queue.close();
        assert!(matches!(
            queue.publish(order(), true, None).await,
            Err(QueueError::Closed)
        ));
        // Closing still delivers what was queued, then ends.
        let last = source.next_batch(8, Duration::ZERO).await.unwrap();
        assert_eq!(last.orders.len(), 1);
        assert_eq!((last.orders[0].ticket, last.orders[0].gated), (2, false));
        assert!(source.next_batch(8, Duration::ZERO).await.is_none());
    }
}
