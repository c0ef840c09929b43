//! Embedded migrations, run on a dedicated connection with diesel's
//! (blocking) harness, for either backend.

use diesel_async::{AsyncConnection, AsyncMigrationHarness, AsyncPgConnection};
use diesel_migrations::{EmbeddedMigrations, MigrationHarness};

use super::{SqliteConn, Store, StoreError, PG_MIGRATIONS, SQLITE_MIGRATIONS};
use crate::config::StoreBackend;

impl Store {
    /// Applies pending migrations on a dedicated connection; returns how
    /// many ran. Needs the multi-threaded runtime (diesel's harness blocks).
    pub async fn migrate(&self) -> Result<usize, StoreError> {
        self.with_harness(|harness, source| {
            harness
                .run_pending_migrations(source)
                .map(|done| done.len())
        })
        .await
    }

    /// How many migrations have not been applied yet.
    pub async fn pending_migrations(&self) -> Result<usize, StoreError> {
        self.with_harness(|harness, source| {
            harness.pending_migrations(source).map(|todo| todo.len())
        })
        .await
    }

    /// Reverts the latest migration (operators and the down.sql tests).
    pub async fn revert_last_migration(&self) -> Result<(), StoreError> {
        self.with_harness(|harness, source| harness.revert_last_migration(source).map(|_| 0))
            .await
            .map(|_| ())
    }

    async fn with_harness<F>(&self, run: F) -> Result<usize, StoreError>
    where
        F: FnOnce(
                &mut dyn MigrationHarnessAny,
                EmbeddedMigrations,
            ) -> diesel::migration::Result<usize>
            + Send,
    {
        let error = |e: &dyn std::fmt::Display| StoreError::Migration(e.to_string());
        match &*self.target {
            StoreBackend::Postgres(_) => {
                // Made as the pool makes its own (TLS, a rotated password),
                // but not taken from it.
                let super::Pool::Pg(pool) = &*self.pool else {
                    unreachable!("a PostgreSQL target has a PostgreSQL pool");
                };
                let conn = pool
                    .dedicated_connection()
                    .await
                    .map_err(|e| StoreError::Connect(e.to_string()))?;
                let mut harness = AsyncMigrationHarness::new(conn);
                tokio::task::block_in_place(|| run(&mut PgHarness(&mut harness), PG_MIGRATIONS))
                    .map_err(|e| error(&*e))
            }
            StoreBackend::Sqlite(path) => {
                let conn = SqliteConn::establish(path)
                    .await
                    .map_err(|e| StoreError::Connect(e.to_string()))?;
                let mut harness = AsyncMigrationHarness::new(conn);
                tokio::task::block_in_place(|| {
                    run(&mut SqliteHarness(&mut harness), SQLITE_MIGRATIONS)
                })
                .map_err(|e| error(&*e))
            }
        }
    }
}

/// The harness operations we use, object-safe so one closure serves both
/// backends.
pub trait MigrationHarnessAny {
    fn run_pending_migrations(
        &mut self,
        source: EmbeddedMigrations,
    ) -> diesel::migration::Result<Vec<String>>;
    fn pending_migrations(
        &mut self,
        source: EmbeddedMigrations,
    ) -> diesel::migration::Result<Vec<String>>;
    fn revert_last_migration(
        &mut self,
        source: EmbeddedMigrations,
    ) -> diesel::migration::Result<String>;
}

macro_rules! harness_any {
    ($name:ident, $Conn:ty) => {
        struct $name<'a>(&'a mut AsyncMigrationHarness<$Conn>);

        impl MigrationHarnessAny for $name<'_> {
            fn run_pending_migrations(
                &mut self,
                source: EmbeddedMigrations,
            ) -> diesel::migration::Result<Vec<String>> {
                MigrationHarness::run_pending_migrations(self.0, source)
                    .map(|done| done.iter().map(|v| v.to_string()).collect())
            }
            fn pending_migrations(
                &mut self,
                source: EmbeddedMigrations,
            ) -> diesel::migration::Result<Vec<String>> {
                MigrationHarness::pending_migrations(self.0, source)
                    .map(|todo| todo.iter().map(|m| m.name().to_string()).collect())
            }
            fn revert_last_migration(
                &mut self,
                source: EmbeddedMigrations,
            ) -> diesel::migration::Result<String> {
                MigrationHarness::revert_last_migration(self.0, source).map(|v| v.to_string())
            }
        }
    };
}

harness_any!(PgHarness, AsyncPgConnection);
harness_any!(SqliteHarness, SqliteConn);
