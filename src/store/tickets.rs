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

#[derive(QueryableByName)]
struct PartitionTicket {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    partition: i32,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    value: i64,
}

#[derive(QueryableByName)]
struct LineProgressRow {
    #[diesel(sql_type = diesel::sql_types::Nullable<diesel::sql_types::Integer>)]
    partition: Option<i32>,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    last_ticket: i64,
    #[diesel(sql_type = diesel::sql_types::BigInt)]
    done_through: i64,
}

/// How far one line of the order queue got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineProgress {
    /// `None`: the one queue.
    pub partition: Option<u16>,
    pub last_ticket: u64,
    pub done_through: u64,
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

    /// Records that the processor is done with every ticket up to `through`.
    pub async fn advance_queue(&self, through: u64) -> Result<(), StoreError> {
        let sql = "UPDATE queue_progress SET done_through = GREATEST(done_through, $1) \
                   WHERE id = 1 RETURNING done_through AS value";
        self.ticket_query(sql, Some(through)).await.map(|_| ())
    }

    /// Fresh ticket numbers for partitions of the order queue, in one
    /// round trip: for each `(partition, n)` (partitions ascending, so
    /// replicas lock the rows in one order), the last of its `n` new
    /// numbers; they run from that minus `n` plus 1.
    pub async fn next_partition_tickets(
        &self,
        wanted: &[(u16, usize)],
    ) -> Result<Vec<(u16, u64)>, StoreError> {
        let mut conn = self.pg_conn(TICKETS_NEED_PG).await?;
        let partitions: Vec<i32> = wanted.iter().map(|&(p, _)| i32::from(p)).collect();
        let counts: Vec<i64> = wanted
            .iter()
            .map(|&(_, n)| i64::try_from(n).unwrap_or(i64::MAX))
            .collect();
        let rows: Vec<PartitionTicket> = diesel::sql_query(
            "INSERT INTO queue_partitions AS q (partition, last_ticket) \
             SELECT * FROM unnest($1::int[], $2::bigint[]) \
             ON CONFLICT (partition) DO UPDATE SET last_ticket = q.last_ticket + excluded.last_ticket \
             RETURNING partition, last_ticket AS value",
        )
        .bind::<diesel::sql_types::Array<diesel::sql_types::Integer>, _>(partitions)
        .bind::<diesel::sql_types::Array<diesel::sql_types::BigInt>, _>(counts)
        .load(&mut *conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| {
                (
                    u16::try_from(row.partition).unwrap_or(0),
                    u64::try_from(row.value).unwrap_or(0),
                )
            })
            .collect())
    }

    /// Every line's last ticket number and the number its processor is
    /// done through, in one round trip: the one queue first, then each
    /// partition published to.
    pub async fn queue_lines(&self) -> Result<Vec<LineProgress>, StoreError> {
        let mut conn = self.pg_conn(TICKETS_NEED_PG).await?;
        let rows: Vec<LineProgressRow> = diesel::sql_query(
            "SELECT NULL::int AS partition, \
                    CASE WHEN is_called THEN last_value ELSE 0 END AS last_ticket, \
                    (SELECT done_through FROM queue_progress) AS done_through \
             FROM order_tickets \
             UNION ALL \
             SELECT partition, last_ticket, done_through FROM queue_partitions \
             ORDER BY partition NULLS FIRST",
        )
        .load(&mut *conn)
        .await?;
        Ok(rows
            .into_iter()
            .map(|row| LineProgress {
                partition: row.partition.map(|p| u16::try_from(p).unwrap_or(0)),
                last_ticket: u64::try_from(row.last_ticket).unwrap_or(0),
                done_through: u64::try_from(row.done_through).unwrap_or(0),
            })
            .collect())
    }

    /// Records that partition `partition`'s processor is done with every
    /// ticket number up to `through`.
    pub async fn advance_partition(&self, partition: u16, through: u64) -> Result<(), StoreError> {
        let mut conn = self.pg_conn(TICKETS_NEED_PG).await?;
        diesel::sql_query(
            "UPDATE queue_partitions SET done_through = GREATEST(done_through, $2) \
             WHERE partition = $1",
        )
        .bind::<diesel::sql_types::Integer, _>(i32::from(partition))
        .bind::<diesel::sql_types::BigInt, _>(i64::try_from(through).unwrap_or(i64::MAX))
        .execute(&mut *conn)
        .await?;
        Ok(())
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
