//! Partition leases: PostgreSQL advisory locks held by a processor's own
//! session, which spread the order queue's partitions over the running
//! processors ([`crate::processor`]).
//!
//! A session-level advisory lock lives exactly as long as the session: a
//! processor that dies loses its leases at once (its socket closes), one
//! that goes silent within about 11 s (the session's TCP keepalives), and
//! the others take them at their next look. The lock only places
//! partitions; the queue's single active consumer is what keeps two
//! processors from consuming one partition, even when a processor cut off
//! from the database still consumes for a while.

use std::{future::Future, time::Duration};

use diesel::QueryableByName;
use diesel_async::{AsyncPgConnection, RunQueryDsl, SimpleAsyncConnection};

use super::{Pool, Store, StoreError};

/// The second key of the lock every running processor shares, which
/// counts them; partitions use 0 to 63.
const MEMBER: i32 = 1_000_000;

/// Longest one lease step (connecting, one statement) may take; past it
/// the session counts as lost, and this processor stops consuming.
const STEP_TIMEOUT: Duration = Duration::from_secs(5);

/// A processor that goes silent without closing its connection (its node
/// lost, a network cut) must not keep its leases for the system's two
/// hours of TCP keepalive: PostgreSQL drops its session after about 11 s
/// (5 s idle, then 3 probes 2 s apart; 11 s for unacknowledged sends).
const KEEPALIVE: &str = "SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 2; \
     SET tcp_keepalives_count = 3; SET tcp_user_timeout = 11000;";

const JOIN: &str = "SELECT pg_try_advisory_lock_shared($1, $2) AS value";
const TAKE: &str = "SELECT pg_try_advisory_lock($1, $2) AS value";
const GIVE_UP: &str = "SELECT pg_advisory_unlock($1, $2) AS value";

#[derive(QueryableByName)]
struct Held {
    #[diesel(sql_type = diesel::sql_types::Bool)]
    value: bool,
}

#[derive(QueryableByName)]
struct Pid {
    #[diesel(sql_type = diesel::sql_types::Integer)]
    pid: i32,
}

/// One processor's lease session: a connection of its own, made as the
/// pool makes them but never pooled, so its locks end with it.
pub struct LeaseSession {
    conn: AsyncPgConnection,
    /// First key of every lock: the deployment's queue name, hashed.
    class: i32,
    pid: i32,
}

/// The running processors as the locks show them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Members {
    /// Processors holding the member lock.
    pub count: usize,
    /// This one's place among them (by session), which decides its share.
    pub rank: usize,
}

impl LeaseSession {
    /// Opens the session and joins the processors of `queue`.
    pub async fn open(store: &Store, queue: &str) -> Result<Self, StoreError> {
        let Pool::Pg(pool) = &*store.pool else {
            return Err(StoreError::Unsupported("partition leases need PostgreSQL"));
        };
        let mut conn = bounded(async {
            pool.dedicated_connection()
                .await
                .map_err(|e| StoreError::Connect(e.to_string()))
        })
        .await?;
        bounded(async { Ok(conn.batch_execute(KEEPALIVE).await?) }).await?;
        let pid: Pid = bounded(async {
            Ok(diesel::sql_query("SELECT pg_backend_pid() AS pid")
                .get_result(&mut conn)
                .await?)
        })
        .await?;
        let mut session = Self {
            conn,
            class: class_of(queue),
            pid: pid.pid,
        };
        if !session.lock(JOIN, MEMBER).await? {
            return Err(StoreError::Connect("the member lock was refused".into()));
        }
        Ok(session)
    }

    /// Who is running now. An error means the session is gone, and its
    /// leases with it.
    pub async fn members(&mut self) -> Result<Members, StoreError> {
        let query = diesel::sql_query(
            "SELECT pid FROM pg_locks \
             WHERE locktype = 'advisory' AND granted AND objsubid = 2 \
               AND classid::bigint = $1 AND objid::bigint = $2 \
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
             ORDER BY pid",
        )
        .bind::<diesel::sql_types::BigInt, _>(i64::from(self.class))
        .bind::<diesel::sql_types::BigInt, _>(i64::from(MEMBER));
        let pids: Vec<Pid> = bounded(async { Ok(query.load(&mut self.conn).await?) }).await?;
        let rank = pids
            .iter()
            .position(|p| p.pid == self.pid)
            .ok_or_else(|| StoreError::Connect("this processor's member lock is gone".into()))?;
        Ok(Members {
            count: pids.len(),
            rank,
        })
    }

    /// Takes partition `partition`'s lease if nobody holds it.
    pub async fn try_take(&mut self, partition: u16) -> Result<bool, StoreError> {
        self.lock(TAKE, i32::from(partition)).await
    }

    /// Gives partition `partition`'s lease up.
    pub async fn give_up(&mut self, partition: u16) -> Result<(), StoreError> {
        self.lock(GIVE_UP, i32::from(partition)).await.map(|_| ())
    }

    /// Gives every lease up and leaves (the connection closes after).
    pub async fn close(mut self) {
        let unlock = diesel::sql_query("SELECT pg_advisory_unlock_all()");
        let _ = bounded(async { Ok(unlock.execute(&mut self.conn).await?) }).await;
    }

    /// Runs one advisory-lock function on `(class, key)`.
    async fn lock(&mut self, sql: &'static str, key: i32) -> Result<bool, StoreError> {
        let query = diesel::sql_query(sql)
            .bind::<diesel::sql_types::Integer, _>(self.class)
            .bind::<diesel::sql_types::Integer, _>(key);
        let held: Held = bounded(async { Ok(query.get_result(&mut self.conn).await?) }).await?;
        Ok(held.value)
    }
}

/// `step`, failed once it has taken [`STEP_TIMEOUT`].
async fn bounded<T>(step: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    tokio::time::timeout(STEP_TIMEOUT, step)
        .await
        .unwrap_or_else(|_| {
            Err(StoreError::Connect(format!(
                "no answer from PostgreSQL within {STEP_TIMEOUT:?}"
            )))
        })
}

/// The first lock key of a queue name: FNV-1a folded to a non-negative
/// 32-bit integer, so that it reads the same in `pg_locks` (an `oid`).
fn class_of(queue: &str) -> i32 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in queue.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    i32::try_from(hash & 0x7fff_ffff).unwrap_or(0)
}
