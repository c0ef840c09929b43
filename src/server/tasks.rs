//! The replica's background tasks: readiness, config reloads, gauges,
//! the expiry sweeper, the limiter sweeper, restock notices and the
//! reconciler; and [`Background`], which starts and stops them together.

use std::{future::Future, sync::Arc, time::Duration};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tonic_health::{server::HealthReporter, ServingStatus};

use crate::{
    config::Config,
    domain::switches::{Layers, LayersChange},
    error::ReservationError,
    fleet::{ChangeRequest, SwitchBoard},
    grpc::{token_digest, AdminToken},
    middleware::{InFlight, MemoryDedup, RateLimits},
    queue::DeadLetters,
    reserve::Pipeline,
};

/// Names under which health is reported: the whole server ("") and each
/// service.
const HEALTH_NAMES: [&str; 3] = [
    "",
    "stockgate.v1.InventoryService",
    "stockgate.v1.AdminService",
];

/// The replica's background tasks, started with the server and stopped
/// together on one path. Each holds no promise a caller waits on (the
/// order processor, which does, is drained on its own); a task that
/// panicked is reported when they stop. Dropped without `stop` (start-up
/// failed after they began), it still aborts them.
#[derive(Default)]
pub(super) struct Background {
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Background {
    pub(super) fn spawn(
        &mut self,
        name: &'static str,
        task: impl Future<Output = ()> + Send + 'static,
    ) {
        self.tasks.push((name, tokio::spawn(task)));
    }

    /// Aborts every task at once, then waits up to `within` for them to
    /// end. An abort lands at a task's next await, so a task inside
    /// blocking work (a migration under `block_in_place`) may outlive the
    /// wait; it is named and left behind rather than holding the stop.
    pub(super) async fn stop(mut self, within: Duration) {
        for (_, task) in &self.tasks {
            task.abort();
        }
        let ended = tokio::time::timeout(within, async {
            for (name, task) in self.tasks.iter_mut() {
                if let Err(err) = task.await {
                    if err.is_panic() {
                        tracing::error!(task = *name, "background task panicked");
                    }
                }
            }
        })
        .await;
        if ended.is_err() {
            let running: Vec<_> = self
                .tasks
                .iter()
                .filter(|(_, task)| !task.is_finished())
                .map(|(name, _)| *name)
                .collect();
            tracing::warn!(
                ?running,
                "background tasks still running after the grace period"
            );
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        for (_, task) in &self.tasks {
            task.abort();
        }
    }
}

/// Applies reloaded configs: the file's switches to the whole fleet (as an
/// audited change by `sighup`), its admin token and backend password files
/// to this replica.
pub(super) async fn apply_reloads(
    mut reloads: mpsc::Receiver<Config>,
    board: Arc<SwitchBoard>,
    admin_token: AdminToken,
    passwords: Arc<crate::config::secrets::Passwords>,
    rate_limited_methods: Vec<String>,
) {
    while let Some(config) = reloads.recv().await {
        passwords.reload(&config.backends);
        if config.layers.rate_limit.methods != rate_limited_methods {
            tracing::warn!(
                running = ?rate_limited_methods,
                file = ?config.layers.rate_limit.methods,
                "reload: layers.rate_limit.methods changes only at restart; keeping the running list"
            );
        }
        match config.admin_token() {
            Ok(token) => admin_token.store(Arc::new(token.as_deref().map(token_digest))),
            Err(err) => {
                tracing::error!(error = %err, "reload: admin token unreadable; keeping the old one")
            }
        }
        let request = ChangeRequest {
            change: LayersChange::to(Layers::from_config(&config)),
            actor: &format!("sighup via {}", board.replica()),
            force: config.layers.allow_unsafe,
            reason: "config file reloaded",
        };
        match board.change(request).await {
            Ok((layers, revision)) => {
                tracing::info!(revision, ?layers, "reload: layer switches applied")
            }
            Err(err) => tracing::error!(error = %err, "reload: layer switches not applied"),
        }
    }
}

/// Gauges that are read rather than counted: calls in flight, reservations
/// this replica waits on, open watches and their shared feeds, the fleet's
/// queue depth and dead letters, readiness; and
/// histogram upkeep.
pub(super) async fn sample_gauges(
    pipeline: Arc<Pipeline>,
    in_flight: Option<Arc<InFlight>>,
    dead_letters: Option<Arc<dyn DeadLetters>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick: u64 = 0;
    loop {
        // The backlog asks the broker and the database: not every second.
        if tick % 5 == 0 {
            if let Some(depth) = pipeline.queue_depth().await {
                metrics::gauge!("stockgate_queue_depth").set(depth as f64);
            }
            if let Some(dead_letters) = &dead_letters {
                match dead_letters.depth().await {
                    Ok(depth) => metrics::gauge!("stockgate_dlq_messages").set(depth as f64),
                    Err(err) => tracing::debug!(error = %err, "dead-letter depth unknown"),
                }
            }
        }
        tick += 1;
        if let Some(limit) = &in_flight {
            metrics::gauge!("stockgate_in_flight_calls").set(limit.stats().in_flight as f64);
        }
        metrics::gauge!("stockgate_queue_pending").set(pipeline.pending_count() as f64);
        let (watches, feeds) = pipeline.watch_counts();
        metrics::gauge!("stockgate_open_watches").set(watches as f64);
        metrics::gauge!("stockgate_watch_feeds").set(feeds as f64);
        metrics::gauge!("stockgate_ready").set(if pipeline.is_ready() { 1.0 } else { 0.0 });
        crate::metrics::upkeep();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

pub(super) async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for name in HEALTH_NAMES {
        health.set_service_status(name, status).await;
    }
}

/// Retries until the store is reachable and migrated (migrating it when
/// allowed), loads the gate, then reports SERVING.
pub(super) async fn become_ready(
    pipeline: Arc<Pipeline>,
    board: Arc<SwitchBoard>,
    health: HealthReporter,
    migrate: bool,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_reason = String::new();
    loop {
        // The full cause for the log; a short one for callers.
        let (reason, told) = match check_store(&pipeline, migrate).await {
            // The fleet's switches first: they decide whether there is a
            // gate to warm up.
            Ok(()) => match async {
                board.sync().await?;
                pipeline.warm_up().await
            }
            .await
            {
                Ok(()) => {
                    set_health(&health, ServingStatus::Serving).await;
                    tracing::info!("ready: store migrated and reachable, gate loaded");
                    return;
                }
                Err(err) => (
                    format!(
                        "switches or gate warm-up failed: {}",
                        crate::error::DisplayChain(&err)
                    ),
                    match &err {
                        ReservationError::Unavailable { what, .. } => {
                            format!("{what} unavailable; start-up retries until it answers")
                        }
                        _ => "start-up could not load the switches or the stock gate".into(),
                    },
                ),
            },
            Err(reason) => (
                reason,
                "the store is not migrated or not reachable yet".to_owned(),
            ),
        };
        pipeline.set_not_ready_reason(told);
        if reason != last_reason {
            tracing::warn!(%reason, "not ready");
            last_reason = reason;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn check_store(pipeline: &Pipeline, migrate: bool) -> Result<(), String> {
    let store = pipeline.store();
    if migrate {
        let applied = store.migrate().await.map_err(|e| e.to_string())?;
        if applied > 0 {
            tracing::info!(applied, "migrations applied");
        }
    } else {
        let pending = store
            .pending_migrations()
            .await
            .map_err(|e| e.to_string())?;
        if pending > 0 {
            return Err(format!(
                "{pending} migrations pending; run `stockgate migrate`"
            ));
        }
    }
    store.ping().await.map_err(|e| e.to_string())
}

pub(super) async fn run_sweeper(
    pipeline: Arc<Pipeline>,
    every: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !pipeline.is_ready() {
            continue;
        }
        match pipeline.expire_due().await {
            Ok(0) => {}
            Ok(expired) => tracing::info!(expired, "expired lapsed holds"),
            Err(err) => tracing::warn!(error = %err, "expiry sweep failed"),
        }
    }
}

/// Forgets users idle long enough to have a full burst again, and expired
/// in-process dedup answers, so memory stays bounded however many distinct
/// users and keys call.
pub(super) async fn sweep_rate_limits(
    limits: Arc<RateLimits>,
    dedup: Option<Arc<MemoryDedup>>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        limits.sweep();
        if let Some(dedup) = &dedup {
            dedup.sweep();
        }
    }
}

/// Drops the sold-out fast path's answer when any replica restocks a SKU.
pub(super) async fn forward_restocks(pipeline: Arc<Pipeline>) {
    let mut restocks = pipeline.restocks();
    loop {
        match restocks.recv().await {
            Ok(sku) => pipeline.restocked(&sku),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                pipeline.restocked(crate::gate::RESTOCK_ALL)
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Compares the gate with the database every `every`, and at once when a
/// caller found the gate not loaded.
pub(super) async fn run_reconciler(
    pipeline: Arc<Pipeline>,
    every: Duration,
    resync_queued: bool,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = pipeline.reload_wanted() => {}
            _ = stop.changed() => return,
        }
        if !pipeline.is_ready() {
            continue;
        }
        if resync_queued {
            // Notices from the processor can be missed across a broker
            // reconnect; the database has the answer.
            let dropped = pipeline.resync_pending(every, 256).await;
            if dropped > 0 {
                tracing::info!(
                    dropped,
                    "queued reservations found processed in the database"
                );
            }
        }
        if let Err(err) = pipeline.reconcile().await {
            tracing::warn!(error = %err, "reconcile failed");
            // Don't spin on a down backend.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As a migration under `block_in_place` does: an abort cannot land
    /// until the blocking work returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_task_stuck_in_blocking_work_does_not_hold_the_stop() {
        let mut background = Background::default();
        background.spawn("blocking", async {
            std::thread::sleep(Duration::from_secs(3));
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let started = std::time::Instant::now();
        background.stop(Duration::from_millis(100)).await;
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn stopping_ends_every_task_even_after_one_panicked() {
        let alive = Arc::new(());
        let mut background = Background::default();
        let held = alive.clone();
        background.spawn("forever", async move {
            let _held = held;
            std::future::pending::<()>().await
        });
        background.spawn("panics", async { panic!("a bug in a background task") });
        tokio::task::yield_now().await;
        background.stop(Duration::from_secs(5)).await;
        assert_eq!(
            Arc::strong_count(&alive),
            1,
            "the stopped task let go of its state"
        );
    }
}
