//! The rate limits of the whole fleet: budgets shared by every replica
//! (`backends.rate_limit`), so a user gets at most their limit however
//! many replicas their calls reach. Each replica's own limits (same rates)
//! stay in front as a filter that costs no round trip: a call one replica
//! alone finds over budget is over the fleet's too.

use std::time::Duration;

use async_trait::async_trait;
use redis::{ErrorKind, ServerErrorKind, Value};

use crate::{domain::switches::RateSettings, redis_batch::Batcher};

/// A fleet budget's refusal: which one, and when the call would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetOver {
    /// "user" or "global".
    pub scope: &'static str,
    pub retry_after: Duration,
}

/// Budgets kept for the whole fleet.
#[async_trait]
pub trait FleetLimits: Send + Sync {
    /// Spends one call of `user` from the user's and the global budget at
    /// `rates`, both or neither; `Ok(None)` when both had room. `Err` when
    /// the budgets cannot be reached (the caller decides what that means).
    async fn spend(&self, user: &str, rates: RateSettings) -> Result<Option<FleetOver>, String>;
}

/// The fleet's budgets in Redis: one GCRA script per call (`fleet.lua`),
/// sent through the [`Batcher`], so under load a whole batch of calls
/// costs Redis one read and one write.
pub struct RedisFleetLimits {
    conn: redis::aio::ConnectionManager,
    batch: Batcher,
    script: redis::Script,
    origin: String,
    prefix: String,
    /// Longest a call waits for the fleet's answer, reconnecting included.
    timeout: Duration,
}

impl RedisFleetLimits {
    /// Connects lazily, so the server starts while Redis is down; needs a
    /// Tokio runtime (the batching task).
    pub fn new(
        url: impl Into<crate::config::secrets::LiveUrl>,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, String> {
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(timeout));
        let url = url.into();
        let origin = url.describe("backends.rate_limit");
        let conn = crate::redis_client::connect(&url, config)
            .map_err(|e| format!("{e} (Redis at {origin})"))?;
        Ok(Self {
            batch: Batcher::spawn(conn.clone()),
            conn,
            script: redis::Script::new(include_str!("fleet.lua")),
            origin,
            prefix: prefix.to_owned(),
            timeout,
        })
    }

    fn command(&self, user: &str, rates: RateSettings) -> redis::Cmd {
        let per_user_us = rates.per_user_period_ms.max(1).saturating_mul(1_000);
        let global_us = 1_000_000.0 / f64::from(rates.global_per_sec.max(1));
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(self.script.get_hash())
            .arg(2)
            .arg(format!("{}:rl:u:{user}", self.prefix))
            .arg(format!("{}:rl:global", self.prefix))
            .arg(per_user_us)
            .arg(rates.per_user_burst.max(1))
            .arg(global_us)
            .arg(rates.global_burst.max(1));
        cmd
    }
}

#[async_trait]
impl FleetLimits for RedisFleetLimits {
    async fn spend(&self, user: &str, rates: RateSettings) -> Result<Option<FleetOver>, String> {
        // The connection's own timeouts apply per attempt, and it retries
        // a lost connection several times: a call waits for one bound.
        tokio::time::timeout(self.timeout, self.spend_once(user, rates))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer within {:?} (Redis at {})",
                    self.timeout, self.origin
                ))
            })
    }
}

impl RedisFleetLimits {
    async fn spend_once(
        &self,
        user: &str,
        rates: RateSettings,
    ) -> Result<Option<FleetOver>, String> {
        // A pipeline's EVALSHA does not load the script: after a restart or
        // a SCRIPT FLUSH, load it and send the call again (the script
        // changed nothing when it was missing).
        let mut reloads = 0;
        let reply = loop {
            match self.batch.query(self.command(user, rates)).await {
                Err(err)
                    if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
                        && reloads < 3 =>
                {
                    reloads += 1;
                    let mut conn = self.conn.clone();
                    self.script
                        .load_async(&mut conn)
                        .await
                        .map_err(|e| format!("{e} (Redis at {})", self.origin))?;
                }
                other => break other.map_err(|e| format!("{e} (Redis at {})", self.origin))?,
            }
        };
        read_reply(&reply)
    }
}

fn read_reply(reply: &Value) -> Result<Option<FleetOver>, String> {
    let unexpected = || format!("unexpected rate limit reply {reply:?}");
    let Value::Array(parts) = reply else {
        return Err(unexpected());
    };
    let number = |i: usize| match parts.get(i) {
        Some(Value::Int(n)) => Ok(*n),
        _ => Err(unexpected()),
    };
    let scope = match number(0)? {
        0 => return Ok(None),
        1 => "user",
        2 => "global",
        _ => return Err(unexpected()),
    };
    let wait_us = u64::try_from(number(1)?).unwrap_or(0);
    Ok(Some(FleetOver {
        scope,
        retry_after: Duration::from_micros(wait_us),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_read_as_decisions() {
        let reply = |scope, wait| Value::Array(vec![Value::Int(scope), Value::Int(wait)]);
        assert_eq!(read_reply(&reply(0, 0)), Ok(None));
        assert_eq!(
            read_reply(&reply(1, 250_000)),
            Ok(Some(FleetOver {
                scope: "user",
                retry_after: Duration::from_millis(250)
            }))
        );
        assert_eq!(read_reply(&reply(2, 7)).unwrap().unwrap().scope, "global");
        assert!(read_reply(&reply(3, 0)).is_err());
        assert!(read_reply(&Value::Nil).is_err());
    }
}
