//! The layer switches: what every replica runs with, changed at run time
//! for the whole fleet. Every layer reads them; they depend on nothing.

use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};

/// The rate limiter's budgets, switchable at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateSettings {
    pub per_user_period_ms: u64,
    pub per_user_burst: u32,
    pub global_per_sec: u32,
    pub global_burst: u32,
}

impl RateSettings {
    /// The first setting that is zero, named as SetLayersRequest's field.
    pub fn zero_field(&self) -> Option<&'static str> {
        if self.per_user_period_ms == 0 {
            Some("rate_limits.per_user_period_ms")
        } else if self.per_user_burst == 0 {
            Some("rate_limits.per_user_burst")
        } else if self.global_per_sec == 0 {
            Some("rate_limits.global_per_sec")
        } else if self.global_burst == 0 {
            Some("rate_limits.global_burst")
        } else {
            None
        }
    }
}

/// The layer switches in force; swapped whole at run time. Stored as JSON
/// (the fleet's switches), so fields are only ever added, with defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layers {
    pub rate_limit: bool,
    pub rate_limit_shadow: bool,
    pub rate_limits: RateSettings,
    pub dedup: bool,
    pub gate: bool,
    pub gate_failure: GateFailureMode,
    pub queue: bool,
    pub db_check: DbCheckMode,
}

impl Layers {
    /// True when nothing would stop an oversell: the database check is off
    /// (naive writes) and the gate is off or lets requests past it when its
    /// backend is down. The queue does not count: it serialises commits
    /// only while there is one processor, which a failover can break.
    pub fn oversell_unguarded(&self) -> bool {
        self.db_check == DbCheckMode::Off
            && (!self.gate || self.gate_failure == GateFailureMode::Bypass)
    }

    /// These switches with `change` applied.
    pub fn with(self, change: &LayersChange) -> Self {
        Self {
            rate_limit: change.rate_limit.unwrap_or(self.rate_limit),
            rate_limit_shadow: change.rate_limit_shadow.unwrap_or(self.rate_limit_shadow),
            rate_limits: change.rate_limits.unwrap_or(self.rate_limits),
            dedup: change.dedup.unwrap_or(self.dedup),
            gate: change.gate.unwrap_or(self.gate),
            gate_failure: change.gate_failure.unwrap_or(self.gate_failure),
            queue: change.queue.unwrap_or(self.queue),
            db_check: change.db_check.unwrap_or(self.db_check),
        }
    }
}

/// The switches in force, shared by the pipeline and the middleware; read
/// per request without locks, replaced whole when they change.
pub type Switches = Arc<ArcSwap<Layers>>;

/// A change to the switches; `None` keeps the current value.
#[derive(Debug, Clone, Copy, Default)]
pub struct LayersChange {
    pub rate_limit: Option<bool>,
    pub rate_limit_shadow: Option<bool>,
    pub rate_limits: Option<RateSettings>,
    pub dedup: Option<bool>,
    pub gate: Option<bool>,
    pub gate_failure: Option<GateFailureMode>,
    pub queue: Option<bool>,
    pub db_check: Option<DbCheckMode>,
}

impl LayersChange {
    /// The change that turns any switches into `target`.
    pub fn to(target: Layers) -> Self {
        Self {
            rate_limit: Some(target.rate_limit),
            rate_limit_shadow: Some(target.rate_limit_shadow),
            rate_limits: Some(target.rate_limits),
            dedup: Some(target.dedup),
            gate: Some(target.gate),
            gate_failure: Some(target.gate_failure),
            queue: Some(target.queue),
            db_check: Some(target.db_check),
        }
    }
}

/// What Reserve does while the gate's backend is down or not loaded.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GateFailureMode {
    /// The gate is down: answer UNAVAILABLE, admit nothing.
    FailClosed,
    /// The gate is down: skip it and let the queue and the database decide
    /// (the database check still prevents overselling).
    Bypass,
}

/// How the database check guards the stock row.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DbCheckMode {
    /// Conditional update on the row version; retried on a lost race.
    Optimistic,
    /// Row lock (`SELECT ... FOR UPDATE`) held while committing.
    Pessimistic,
    /// The naive approach: read the stock, write what was read minus the
    /// quantity, no version check. Concurrent commits overwrite each other
    /// and oversell; for game days and demonstrations, never production.
    Off,
}
