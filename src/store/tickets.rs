//! Queue tickets: the sequence that numbers published orders, so a
//! caller learns its place in line and the reconciler knows what is
//! processed.

use diesel::QueryableByName;
use diesel_async::RunQueryDsl;

use super::{Store, StoreError};

/// One value of the queue-ticket queries (tickets, progress).
#[derive(QueryableByName)]
struct Ticket {
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    value: i64,
}

const TICKETS_NEED_PG: &str = "queue tickets need PostgreSQL (backends.store)";

impl Store {
    /// `n` fresh tickets of the shared queue-position sequence, in one
    /// round trip, ascending (PostgreSQL only: replicas sharing RabbitMQ
    /// share the database).
    pub async fn next_tickets(&self, n: usize) -> Result<Vec<u64>, StoreError> {
        let mut conn = self.pg_conn(TICKETS_NEED_PG).await?;
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        let rows: Vec<Ticket> = diesel::sql_query(
            "SELECT nextval('order_tickets') AS value FROM generate_series(1, $1)",
        )
        .bind::<diesel::sql_types::BigInt, _>(n)
        .load(&mut *conn)
        .await?;
        // Row order is not promised; callers hand them out in arrival order.
        let mut tickets: Vec<u64> = rows
            .into_iter()
            .map(|t| u64::try_from(t.value).unwrap_or(0))
            .collect();
        tickets.sort_unstable();
        Ok(tickets)
    }

    /// The last ticket handed out, 0 before the first.
    pub async fn last_ticket(&self) -> Result<u64, StoreError> {
        let sql =
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END AS value FROM order_tickets";
        self.ticket_query(sql, None).await
    }

    /// The highest ticket the processor is done with.
    pub async fn queue_done_through(&self) -> Result<u64, StoreError> {
        self.ticket_query("SELECT done_through AS value FROM queue_progress", None)
            .await
    }

    /// Records that the processor is done with every ticket up to `through`.
    pub async fn advance_queue(&self, through: u64) -> Result<(), StoreError> {
        let sql = "UPDATE queue_progress SET done_through = GREATEST(done_through, $1) \
                   WHERE id = 1 RETURNING done_through AS value";
        self.ticket_query(sql, Some(through)).await.map(|_| ())
    }

    async fn ticket_query(&self, sql: &'static str, bind: Option<u64>) -> Result<u64, StoreError> {
        let mut conn = self.pg_conn(TICKETS_NEED_PG).await?;
        let query = diesel::sql_query(sql);
        let ticket: Ticket = match bind {
            Some(value) => {
                let value = i64::try_from(value).unwrap_or(i64::MAX);
                query
                    .bind::<diesel::sql_types::BigInt, _>(value)
                    .get_result(&mut *conn)
                    .await?
            }
            None => query.get_result(&mut *conn).await?,
        };
        Ok(u64::try_from(ticket.value).unwrap_or(0))
    }
}
