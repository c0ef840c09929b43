//! Runtime layer switches for the whole fleet, and their audit trail.
//!
//! The switches live in the database (`layer_switches`, one row with a
//! revision), the store every replica already shares, in the embedded
//! profile too. A change is a compare-and-set on the revision, applied on
//! the replica that took it at once and by every other replica at its next
//! poll (`admin.switch_poll_ms`), so the bound is one poll interval plus a
//! query. Each replica reports the revision it runs (`replicas` table), so
//! `GetLayers` shows the whole fleet. At start-up a replica adopts the
//! stored switches before it reports SERVING; the config file's switches
//! only seed the store on the very first start (and apply on SIGHUP).

use std::sync::{
    atomic::{AtomicU32, AtomicU64, Ordering},
    Arc,
};

use chrono::NaiveDateTime;

use crate::{
    domain::{
        now,
        switches::{Layers, LayersChange},
    },
    error::ReservationError,
    middleware::RateLimits,
    reserve::{store_error, Pipeline},
    store::{AuditRow, NewAudit, ReplicaRow, Store},
};

/// How long a replica that stopped reporting stays listed.
const REPLICA_TTL: chrono::TimeDelta = chrono::TimeDelta::seconds(60);

/// Longest `reason` kept in the audit trail.
pub const MAX_REASON: usize = 500;

/// A request to change the switches.
#[derive(Debug, Clone)]
pub struct ChangeRequest<'a> {
    pub change: LayersChange,
    /// Who: operator, peer, replica; or `sighup`.
    pub actor: &'a str,
    /// Apply even if it leaves nothing able to stop an oversell.
    pub force: bool,
    pub reason: &'a str,
}

/// What a replica reported.
#[derive(Debug, Clone)]
pub struct ReplicaState {
    pub replica: String,
    pub revision: u64,
    /// `None` if the stored JSON is from a newer version we cannot read.
    pub layers: Option<Layers>,
    pub seen_at: NaiveDateTime,
}

pub struct SwitchBoard {
    store: Store,
    pipeline: Arc<Pipeline>,
    rate_limits: Arc<RateLimits>,
    replica: String,
    /// The config file's switches: what the store is seeded with.
    seed: Layers,
    applied: AtomicU64,
    stored: AtomicU64,
    /// One application at a time, so a poll and a change cannot interleave
    /// a gate reload with another revision.
    apply_lock: tokio::sync::Mutex<()>,
}

/// `host-pid-n`: unique per server instance, readable in a pod list.
fn replica_name() -> String {
    static INSTANCE: AtomicU32 = AtomicU32::new(0);
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let n = INSTANCE.fetch_add(1, Ordering::Relaxed);
    let mut name = format!("{host}-{}-{n}", std::process::id());
    name.truncate(200);
    name
}

fn to_json(layers: &Layers) -> String {
    serde_json::to_string(layers).expect("switches serialise")
}

impl SwitchBoard {
    pub fn new(
        store: Store,
        pipeline: Arc<Pipeline>,
        rate_limits: Arc<RateLimits>,
        seed: Layers,
    ) -> Self {
        Self {
            store,
            pipeline,
            rate_limits,
            replica: replica_name(),
            seed,
            applied: AtomicU64::new(0),
            stored: AtomicU64::new(0),
            apply_lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// The revision this replica runs (0: none adopted yet).
    pub fn revision(&self) -> u64 {
        self.applied.load(Ordering::Acquire)
    }

    /// The newest revision this replica has seen in the store.
    pub fn stored_revision(&self) -> u64 {
        self.stored.load(Ordering::Acquire)
    }

    /// The stored switches and their revision; seeds the store from the
    /// config on the very first start.
    async fn current(&self) -> Result<(i64, Layers), ReservationError> {
        loop {
            if let Some(stored) = self.store.switches().await.map_err(store_error)? {
                let layers: Layers = serde_json::from_str(&stored.switches).map_err(|e| {
                    ReservationError::Internal(anyhow::anyhow!(
                        "stored layer switches (revision {}) unreadable: {e}",
                        stored.revision
                    ))
                })?;
                self.stored
                    .fetch_max(stored.revision as u64, Ordering::AcqRel);
                return Ok((stored.revision, layers));
            }
            let seeded = self
                .store
                .swap_switches(0, &to_json(&self.seed), "config file (first start)", now())
                .await
                .map_err(store_error)?;
            if seeded {
                tracing::info!(target: "stockgate::audit", layers = ?self.seed, "layer switches seeded from the config file");
            }
        }
    }

    /// Adopts the stored switches if they are newer than what runs here.
    pub async fn sync(&self) -> Result<(), ReservationError> {
        let (revision, layers) = self.current().await?;
        self.apply(revision as u64, layers).await
    }

    /// Tells the fleet which revision runs here.
    pub async fn report(&self) -> Result<(), ReservationError> {
        let row = ReplicaRow {
            replica: self.replica.clone(),
            revision: self.revision() as i64,
            switches: to_json(&self.pipeline.layers()),
            seen_at: now(),
        };
        self.store.report_replica(&row).await.map_err(store_error)
    }

    /// Every replica that reported within the last minute.
    pub async fn replicas(&self) -> Result<Vec<ReplicaState>, ReservationError> {
        let rows = self
            .store
            .replicas_since(now() - REPLICA_TTL)
            .await
            .map_err(store_error)?;
        Ok(rows
            .into_iter()
            .map(|row| ReplicaState {
                layers: serde_json::from_str(&row.switches).ok(),
                replica: row.replica,
                revision: row.revision.max(0) as u64,
                seen_at: row.seen_at,
            })
            .collect())
    }

    pub async fn audit_events(&self, limit: i64) -> Result<Vec<AuditRow>, ReservationError> {
        self.store.audit_events(limit).await.map_err(store_error)
    }

    /// Stores, applies here and audits a change; refuses (and audits) one
    /// that would newly leave nothing able to stop an oversell, unless
    /// forced. Returns the switches now in force here and their revision.
    pub async fn change(
        &self,
        request: ChangeRequest<'_>,
    ) -> Result<(Layers, u64), ReservationError> {
        // A lost compare-and-set means another change landed in between;
        // recompute from it rather than overwrite it.
        for _ in 0..5 {
            let (revision, before) = self.current().await?;
            let after = before.with(&request.change);
            let unguarded = after.oversell_unguarded() && !before.oversell_unguarded();
            if unguarded && !request.force {
                let why = "the database check would be off while the gate is off or bypassing, leaving nothing to stop an oversell";
                self.audit(&request, &format!("refused: {why}"), &before, &after)
                    .await;
                crate::metrics::switch_change("refused");
                return Err(ReservationError::UnsafeChange(why.into()));
            }
            let swapped = self
                .store
                .swap_switches(revision, &to_json(&after), request.actor, now())
                .await
                .map_err(store_error)?;
            if !swapped {
                continue;
            }
            let outcome = if unguarded { "forced" } else { "applied" };
            self.audit(&request, outcome, &before, &after).await;
            crate::metrics::switch_change(outcome);
            let revision = revision as u64 + 1;
            self.stored.fetch_max(revision, Ordering::AcqRel);
            // Stored: the fleet follows even if this replica cannot apply it
            // yet (a gate that cannot be rebuilt); its next poll retries.
            if let Err(err) = self.apply(revision, after).await {
                tracing::warn!(error = %err, revision, "stored switches not applied here yet");
            }
            return Ok((self.pipeline.layers(), revision));
        }
        Err(ReservationError::ConcurrentChange)
    }

    async fn audit(
        &self,
        request: &ChangeRequest<'_>,
        outcome: &str,
        before: &Layers,
        after: &Layers,
    ) {
        self.record(&NewAudit {
            at: now(),
            actor: request.actor,
            action: "set_layers",
            outcome,
            before: &to_json(before),
            after: &to_json(after),
            reason: request.reason,
        })
        .await;
    }

    /// Appends an operator action to the audit trail, and logs it first:
    /// the log line is the record that survives a database outage.
    pub async fn record(&self, event: &NewAudit<'_>) {
        tracing::warn!(
            target: "stockgate::audit",
            actor = event.actor,
            action = event.action,
            outcome = event.outcome,
            before = event.before,
            after = event.after,
            reason = event.reason,
            "operator action"
        );
        if let Err(err) = self.store.audit(event).await {
            tracing::error!(error = %err, "audit event not stored (it is in this log)");
        }
    }

    async fn apply(&self, revision: u64, layers: Layers) -> Result<(), ReservationError> {
        let _one_at_a_time = self.apply_lock.lock().await;
        if revision <= self.revision() {
            return Ok(());
        }
        let before = self.pipeline.layers();
        self.pipeline.apply_layers(layers).await?;
        self.rate_limits
            .configure(layers.rate_limits, layers.rate_limit_shadow);
        self.applied.store(revision, Ordering::Release);
        crate::metrics::layers(&layers, revision);
        if before != layers {
            tracing::info!(revision, ?before, after = ?layers, "layer switches in force");
        }
        Ok(())
    }
}

/// Polls the stored switches and reports this replica's, every `interval`,
/// until `stop`.
pub async fn run_poller(
    board: Arc<SwitchBoard>,
    interval: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        // Start-up adopts the switches itself (before SERVING), once the
        // store is migrated; polling before then only fails.
        if !board.pipeline.is_ready() {
            tokio::select! {
                _ = tokio::time::sleep(interval) => continue,
                _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
            }
        }
        let result = match board.sync().await {
            Ok(()) => board.report().await,
            Err(err) => Err(err),
        };
        match result {
            Err(err) if !failing => {
                tracing::warn!(error = %err, "cannot read or report layer switches; retrying");
                failing = true;
            }
            Ok(()) if failing => {
                tracing::info!("layer switches readable again");
                failing = false;
            }
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}
