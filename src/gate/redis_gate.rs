//! The stock gate on a real Redis server or Redis Cluster: one Lua script
//! per decision, run with EVALSHA (redis::Script reloads it after
//! NOSCRIPT, e.g. after a restart, a failover or `SCRIPT FLUSH`).
//!
//! Key layout, with `P` = `redis.key_prefix` and every key of one SKU sharing
//! the hash tag `{SKU}`, so each script touches one hash slot and work over
//! many SKUs goes to a cluster as one pipeline per slot:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `P:{SKU}:inv` | hash | `stock` (units the gate will still admit), `cap` (per-user limit, 0 = none), `inflight` (admitted, not yet settled), `ver` (row version of the database read it was last rebuilt from), `seen` (newest row version of a change settled since), `opens`/`closes` (the sale window, Unix ms), `draw` (the window's draw, ms), `sale`/`scap` (the capped sale the SKU belongs to and its per-user cap) |
//! | `P:{SKU}:users` | hash | user id → live units (admitted and not released or refused) |
//! | `P:{SKU}:res:ID` | hash | one reservation: `user`, `qty`, `phase` (inflight → committed → done), `sale` (when counted against one); expires after `redis.record_ttl_secs` |
//! | `P:{SKU}:pending` | sorted set | reservation ids still in flight, scored by admission time (ms) |
//! | `P:{SKU}:adj:ID` | string | one adjustment call's mark (whether its units came back), so a resent call counts once; expires after ten minutes (longer with a response timeout over four minutes) |
//! | `P:sale:{SALE}:users` | hash | user id → live units admitted across the sale's SKUs |
//! | `P:sale:{SALE}:res:ID` | string | one admission's count against the sale: its units, then `done`; expires after `redis.record_ttl_secs` |
//! | `P:{SKU}:draw:OPENS` | hash | the fair opening's draw for the opening at `OPENS` (Unix ms): `seed`, `n` (entrants), `overflow`, `opens`, `ends`, `drawn` (ms it started), `stock` (units it could give), `at` (entrants decided so far), `admitted`, `done` (ms it finished); with `:who` (id → "arrival quantity user"), `:users` (user → id: one entry each), `:order` (sorted set of ids by draw key) and `:out` (id → what the draw decided: 1 admitted, 2 sold out, 3 over the limit, 4 withdrawn); expire a week after the first entrant or the draw |
//! | `P:loaded` | string | present once the counters were loaded from the database |
//! | channel `P:restock` | pub/sub (sharded on a cluster) | SKU names whose counter went up, so replicas drop their sold-out cache |
//!
//! A sale's keys share the hash tag `{SALE}`: on a cluster they sit in a
//! slot apart from its SKUs', so an admission in a capped sale is two
//! script runs, the SKU's (reserve.lua) and then the sale's
//! (sale_take.lua); a refusal by the second gives the first back, and a
//! process that dies between them leaves an admission in flight, which
//! the reconciler's sweep of stale admissions ends like any other.
//!
//! A missing `inv` hash means "not loaded" when `P:loaded` is missing too
//! (a restart or flush emptied Redis) and "unknown SKU" otherwise.

use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use redis::{AsyncCommands, ErrorKind, Script, ScriptInvocation, ServerErrorKind, Value};
use tokio::{sync::broadcast, task::JoinHandle};

use super::{
    draw::{
        new_seed, Draw, DrawEntrant, DrawOutcome, DrawSummary, DRAW_CHUNK, DRAW_KEEP_SECS,
        MAX_DRAW_ENTRANTS,
    },
    GateDecision, GateEntry, GateError, SaleCap, Settlement, SkuStock, StockGate, WindowMs,
    RESTOCK_ALL,
};
use crate::{
    config::RedisConfig,
    domain::Sku,
    redis_client::{RedisConn, Timeouts},
};

/// The reserve script's source, for tools that measure it on its own
/// (`stockgate bench` runs it under redis-benchmark as the raw reference).
pub const RESERVE_SCRIPT: &str = include_str!("scripts/reserve.lua");

/// How long an adjustment's mark outlives it: far longer than any resend
/// (the cluster client resends only within `redis.response_timeout_ms`),
/// and never shorter than twice that plus a minute however it is set.
fn adjust_mark_secs(response_timeout_ms: u64) -> u64 {
    (response_timeout_ms.saturating_mul(2) / 1_000)
        .saturating_add(60)
        .max(600)
}

pub struct RedisGate {
    conn: RedisConn,
    prefix: String,
    /// Which keys decide how connections are made, for errors.
    origin: String,
    record_ttl_secs: u64,
    /// See [`adjust_mark_secs`].
    adjust_mark_secs: u64,
    reserve: Script,
    settle: Script,
    set: Script,
    adjust: Script,
    fields: Script,
    sale_take: Script,
    sale_give: Script,
    draw_claim: Script,
    /// Entrants one script run decides ([`DRAW_CHUNK`]; tests set fewer).
    draw_chunk: u32,
    restocks: broadcast::Sender<String>,
    subscriber: JoinHandle<()>,
}

impl Drop for RedisGate {
    fn drop(&mut self) {
        self.subscriber.abort();
    }
}

/// One side of a sale window as a script argument: '' when open.
fn window_arg(ms: Option<i64>) -> String {
    ms.map(|ms| ms.to_string()).unwrap_or_default()
}

/// A window's draw as a script argument: '' for none.
fn draw_arg(window: &WindowMs) -> String {
    match window.draw_ms {
        0 => String::new(),
        ms => ms.to_string(),
    }
}

/// Errors of the connection (not of a command) name the keys that decide
/// how it is made: a TLS refusal is fixed there.
fn unavailable(err: redis::RedisError, origin: &str) -> GateError {
    if matches!(err.kind(), ErrorKind::Server(_)) {
        GateError::Unavailable(err.to_string())
    } else {
        GateError::Unavailable(format!("{err} (Redis at {origin})"))
    }
}

impl RedisGate {
    /// Connects lazily: the server may start before Redis answers, and the
    /// connection manager reconnects by itself after a loss.
    pub fn connect(
        url: impl Into<crate::config::secrets::LiveUrl>,
        config: &RedisConfig,
    ) -> Result<Self, GateError> {
        let timeouts = Timeouts {
            connect: Duration::from_millis(config.connect_timeout_ms),
            response: Duration::from_millis(config.response_timeout_ms),
            retries: Some(2),
        };
        let url = url.into();
        // Fails on a bad URL, so start-up does rather than every
        // subscription attempt.
        let origin = url.describe("backends.gate");
        let conn = RedisConn::connect(&url, timeouts).map_err(|e| unavailable(e, &origin))?;
        let (restocks, _) = broadcast::channel(1024);
        let channel = format!("{}:restock", config.key_prefix);
        let subscriber = if conn.is_cluster() {
            tokio::spawn(listen_on_cluster(url, timeouts, channel, restocks.clone()))
        } else {
            tokio::spawn(listen_for_restocks(url, channel, restocks.clone()))
        };
        Ok(Self {
            conn,
            origin,
            prefix: config.key_prefix.clone(),
            record_ttl_secs: config.record_ttl_secs,
            adjust_mark_secs: adjust_mark_secs(config.response_timeout_ms),
            reserve: Script::new(RESERVE_SCRIPT),
            settle: Script::new(include_str!("scripts/settle.lua")),
            set: Script::new(include_str!("scripts/set.lua")),
            adjust: Script::new(include_str!("scripts/adjust.lua")),
            fields: Script::new(include_str!("scripts/fields.lua")),
            sale_take: Script::new(include_str!("scripts/sale_take.lua")),
            sale_give: Script::new(include_str!("scripts/sale_give.lua")),
            draw_claim: Script::new(include_str!("scripts/draw_claim.lua")),
            draw_chunk: DRAW_CHUNK,
            restocks,
            subscriber,
        })
    }

    /// Runs a script, reloading it after NOSCRIPT more than once if need be:
    /// the client's own reload retries once, and a second `SCRIPT FLUSH`
    /// (or a failover) can land between its load and its retry.
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        invocation: &mut ScriptInvocation<'_>,
    ) -> Result<T, GateError> {
        let mut conn = self.conn.clone();
        let mut reloads = 0;
        loop {
            match invocation.invoke_async(&mut conn).await {
                Err(err)
                    if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
                        && reloads < 5 =>
                {
                    reloads += 1;
                }
                other => return other.map_err(|e| unavailable(e, &self.origin)),
            }
        }
    }

    /// One adjustment call, `call` naming it: sent again under the same
    /// name (as the cluster client does after a lost connection), it
    /// counts once.
    async fn adjust_once(
        &self,
        sku: &Sku,
        delta: i64,
        version: i64,
        call: &str,
    ) -> Result<(), GateError> {
        let (_, restocked) = self
            .invoke::<(i64, i64)>(
                self.adjust
                    .prepare_invoke()
                    .key(self.key(sku, "inv"))
                    .key(self.key(sku, &format!("adj:{call}")))
                    .arg(delta)
                    .arg(version)
                    .arg(self.adjust_mark_secs),
            )
            .await?;
        if restocked == 1 {
            self.announce([sku]).await;
        }
        Ok(())
    }

    fn key(&self, sku: &Sku, part: &str) -> String {
        format!("{}:{{{}}}:{part}", self.prefix, sku.as_str())
    }

    fn sale_key(&self, sale_id: &str, part: &str) -> String {
        format!("{}:sale:{{{sale_id}}}:{part}", self.prefix)
    }

    /// Counts an admission's units against its user's cap across its
    /// sale; over the cap, gives the admission back and answers so.
    async fn take_in_sale(
        &self,
        entry: &GateEntry,
        sale_id: &str,
        cap: i64,
        admitted: GateDecision,
    ) -> Result<GateDecision, GateError> {
        let reply: Vec<i64> = self
            .invoke(
                self.sale_take
                    .prepare_invoke()
                    .key(self.sale_key(sale_id, "users"))
                    .key(self.sale_key(sale_id, &format!("res:{}", entry.id.as_str())))
                    .arg(entry.user.as_str())
                    .arg(entry.quantity)
                    .arg(cap)
                    .arg(self.record_ttl_secs),
            )
            .await?;
        match reply.as_slice() {
            [1] => Ok(admitted),
            [0, live] => {
                self.settle_entries(&[(Settlement::Released, entry.clone())])
                    .await?;
                Ok(GateDecision::UserLimit {
                    live_units: *live,
                    limit: u32::try_from(cap).unwrap_or(u32::MAX),
                })
            }
            other => Err(GateError::Unavailable(format!(
                "unexpected sale script reply {other:?}"
            ))),
        }
    }

    /// Ends the counts of reservations that ended (see settle.lua's
    /// reply): one sale_give.lua run per sale, all in one pipeline.
    async fn give_in_sales(&self, ended: Vec<Ended>) -> Result<(), GateError> {
        if ended.is_empty() {
            return Ok(());
        }
        let mut by_sale: Vec<(String, Vec<Ended>)> = Vec::new();
        for end in ended {
            match by_sale.iter_mut().find(|(s, _)| *s == end.sale) {
                Some((_, group)) => group.push(end),
                None => by_sale.push((end.sale.clone(), vec![end])),
            }
        }
        let invocations: Vec<_> = by_sale
            .iter()
            .map(|(sale, group)| {
                let mut invocation = self.sale_give.prepare_invoke();
                invocation
                    .key(self.sale_key(sale, "users"))
                    .arg(self.record_ttl_secs);
                for end in group {
                    invocation
                        .key(self.sale_key(sale, &format!("res:{}", end.id)))
                        .arg(&end.user)
                        .arg(end.quantity);
                }
                invocation
            })
            .collect();
        let mut pipe = redis::pipe();
        for invocation in &invocations {
            pipe.invoke_script(invocation);
        }
        self.pipeline(&pipe, &self.sale_give).await.map(drop)
    }

    fn loaded_key(&self) -> String {
        format!("{}:loaded", self.prefix)
    }

    fn channel(&self) -> String {
        format!("{}:restock", self.prefix)
    }

    /// One settle-script run per SKU and action, covering all of that
    /// SKU's entries (a script may only touch keys of one hash slot), every
    /// run sent in one pipeline: one round trip per batch however many
    /// SKUs it holds.
    async fn settle_entries(&self, entries: &[(Settlement, GateEntry)]) -> Result<(), GateError> {
        let mut groups: Vec<(Settlement, &Sku, Vec<&GateEntry>)> = Vec::new();
        for (action, entry) in entries {
            match groups
                .iter_mut()
                .find(|(a, sku, _)| a == action && *sku == &entry.sku)
            {
                Some((_, _, group)) => group.push(entry),
                None => groups.push((*action, &entry.sku, vec![entry])),
            }
        }
        let mut invocations = Vec::with_capacity(groups.len());
        let mut skus = Vec::with_capacity(groups.len());
        for (action, sku, group) in groups {
            skus.push(sku);
            let mut invocation = self.settle.prepare_invoke();
            invocation
                .key(self.key(sku, "inv"))
                .key(self.key(sku, "users"))
                .key(self.key(sku, "pending"))
                .arg(action.as_script_arg())
                .arg(self.record_ttl_secs);
            for entry in group {
                invocation
                    .key(self.key(sku, &format!("res:{}", entry.id.as_str())))
                    .arg(entry.user.as_str())
                    .arg(entry.quantity)
                    .arg(entry.id.as_str())
                    .arg(entry.version.map(|v| v.to_string()).unwrap_or_default());
            }
            invocations.push(invocation);
        }
        let mut pipe = redis::pipe();
        for invocation in &invocations {
            pipe.invoke_script(invocation);
        }
        let replies = self.pipeline(&pipe, &self.settle).await?;
        let ended = replies.iter().flat_map(ended_in_sales).collect();
        let given = self.give_in_sales(ended).await;
        let restocked = skus
            .into_iter()
            .zip(&replies)
            .filter(|(_, reply)| second_is_one(reply))
            .map(|(sku, _)| sku);
        self.announce(restocked).await;
        given
    }

    /// Sends a pipeline of `script`'s runs and returns their replies. A
    /// pipeline's EVALSHA does not load the script itself: the runs that
    /// met NOSCRIPT (a restart, a failover, `SCRIPT FLUSH`, a cluster node
    /// that never ran it) are sent again once it is loaded; the others ran
    /// once.
    async fn pipeline(
        &self,
        pipe: &redis::Pipeline,
        script: &Script,
    ) -> Result<Vec<Value>, GateError> {
        let commands: Vec<&redis::Cmd> = pipe.cmd_iter().collect();
        let mut replies = vec![Value::Nil; commands.len()];
        let mut todo: Vec<usize> = (0..commands.len()).collect();
        let mut reloads = 0;
        while !todo.is_empty() {
            let mut sub = redis::pipe();
            for &index in &todo {
                sub.add_command(commands[index].clone());
            }
            let mut again = Vec::new();
            for (&index, reply) in todo.iter().zip(self.conn.query_each(sub).await) {
                match reply {
                    Err(err)
                        if err.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
                            && reloads < 5 =>
                    {
                        again.push(index);
                    }
                    Err(err) => return Err(unavailable(err, &self.origin)),
                    Ok(value) => replies[index] = value,
                }
            }
            if !again.is_empty() {
                reloads += 1;
                script
                    .load_async(&mut self.conn.clone())
                    .await
                    .map_err(|e| unavailable(e, &self.origin))?;
            }
            todo = again;
        }
        Ok(replies)
    }

    /// Tells every replica these SKUs' counters went up, so they drop their
    /// sold-out answers: PUBLISH on one server, SPUBLISH (the channel's own
    /// shard, not the whole cluster) on a cluster. A notice is a hint: one
    /// lost (a crash right after the script, a subscriber reconnecting)
    /// only lets a sold-out answer live out its `sold_out_cache_ms`.
    async fn announce<'a>(&self, skus: impl IntoIterator<Item = &'a Sku>) {
        let command = if self.conn.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        };
        let channel = self.channel();
        let mut pipe = redis::pipe();
        for sku in skus {
            pipe.cmd(command).arg(&channel).arg(sku.as_str());
        }
        if pipe.is_empty() {
            return;
        }
        if let Some(Err(err)) = self
            .conn
            .query_each(pipe)
            .await
            .into_iter()
            .find(Result::is_err)
        {
            tracing::warn!(error = %err, "restock notice not sent");
        }
    }
}

/// A reservation whose count against its sale is to end.
struct Ended {
    sale: String,
    id: String,
    user: String,
    quantity: i64,
}

/// What follows a settle script's `{changed, restocked}`: (sale, id,
/// user, qty) for each reservation whose count against its sale is to end.
fn ended_in_sales(reply: &Value) -> Vec<Ended> {
    let Value::Array(parts) = reply else {
        return Vec::new();
    };
    parts
        .get(2..)
        .unwrap_or_default()
        .chunks_exact(4)
        .filter_map(|four| {
            Some(Ended {
                sale: text(&four[0])?,
                id: text(&four[1])?,
                user: text(&four[2])?,
                quantity: int(&four[3])?,
            })
        })
        .collect()
}

fn text(value: &Value) -> Option<String> {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes.clone()).ok(),
        Value::SimpleString(text) => Some(text.clone()),
        _ => None,
    }
}

fn int(value: &Value) -> Option<i64> {
    match value {
        Value::Int(n) => Some(*n),
        _ => None,
    }
}

/// Whether a script's `{n, flag}` reply has its flag set.
fn second_is_one(reply: &Value) -> bool {
    matches!(reply, Value::Array(parts) if matches!(parts.get(1), Some(Value::Int(1))))
}

/// Forwards restock messages; after every (re)subscription it sends
/// [`RESTOCK_ALL`], since messages published while disconnected are lost.
async fn listen_for_restocks(
    url: crate::config::secrets::LiveUrl,
    channel: String,
    tx: broadcast::Sender<String>,
) {
    loop {
        // A client per attempt: the password may have been rotated.
        let client = match crate::redis_client::client(&url) {
            Ok(client) => client,
            Err(err) => {
                tracing::warn!(error = %err, "restock subscription: bad gate URL");
                tokio::time::sleep(Duration::from_secs(5)).await;
                continue;
            }
        };
        if let Ok(mut pubsub) = client.get_async_pubsub().await {
            // On one server a restock goes out with PUBLISH.
            if pubsub.subscribe(&channel).await.is_ok() {
                let _ = tx.send(RESTOCK_ALL.to_owned());
                let mut messages = pubsub.on_message();
                while let Some(message) = messages.next().await {
                    if let Ok(sku) = message.get_payload::<String>() {
                        let _ = tx.send(sku);
                    }
                }
                let _ = tx.send(RESTOCK_ALL.to_owned());
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The same on a cluster, where restocks go out with SPUBLISH (Redis 7):
/// the cluster client subscribes on the channel's shard; when that
/// connection is lost (a failover, a restart) the subscriber starts again
/// from the seeds. Each subscription and each loss is forwarded as
/// [`RESTOCK_ALL`].
async fn listen_on_cluster(
    url: crate::config::secrets::LiveUrl,
    timeouts: Timeouts,
    channel: String,
    tx: broadcast::Sender<String>,
) {
    loop {
        let (pushes, mut received) = tokio::sync::mpsc::unbounded_channel();
        let subscribed = async {
            let client = crate::redis_client::cluster_client(&url, timeouts, Some(pushes))?;
            let mut conn = client.get_async_connection().await?;
            conn.ssubscribe(&channel).await?;
            Ok::<_, redis::RedisError>(conn)
        }
        .await;
        match subscribed {
            Ok(_conn) => {
                // `_conn` keeps the subscription alive while pushes arrive.
                while let Some(push) = received.recv().await {
                    match push.kind {
                        redis::PushKind::SMessage => {
                            if let Some(Value::BulkString(sku)) = push.data.get(1) {
                                if let Ok(sku) = std::str::from_utf8(sku) {
                                    let _ = tx.send(sku.to_owned());
                                }
                            }
                        }
                        redis::PushKind::SSubscribe => {
                            let _ = tx.send(RESTOCK_ALL.to_owned());
                        }
                        // Its node is gone (a failover, a restart), or the
                        // node dropped the channel (its slot moved: a manual
                        // failover, a reshard): an idle subscriber would
                        // wait there, so start again from the seeds and the
                        // new map.
                        redis::PushKind::Disconnection | redis::PushKind::SUnsubscribe => break,
                        _ => {}
                    }
                }
            }
            Err(err) => tracing::warn!(error = %err, "restock subscription on the cluster failed"),
        }
        let _ = tx.send(RESTOCK_ALL.to_owned());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

impl RedisGate {
    /// fields.lua on each SKU's counter: one run per SKU (its own hash
    /// slot), all in one pipeline.
    ///
    /// Answers, per SKU, the first field's value before (`None`: no
    /// counter).
    async fn set_fields<const N: usize>(
        &self,
        fields: &[(&Sku, [(&str, String); N])],
    ) -> Result<Vec<Option<String>>, GateError> {
        let mut before = Vec::with_capacity(fields.len());
        for chunk in fields.chunks(512) {
            let invocations: Vec<_> = chunk
                .iter()
                .map(|(sku, pairs)| {
                    let mut invocation = self.fields.prepare_invoke();
                    invocation.key(self.key(sku, "inv"));
                    for (field, value) in pairs {
                        invocation.arg(*field).arg(value);
                    }
                    invocation
                })
                .collect();
            let mut pipe = redis::pipe();
            for invocation in &invocations {
                pipe.invoke_script(invocation);
            }
            let replies = self.pipeline(&pipe, &self.fields).await?;
            before.extend(replies.iter().map(|reply| match reply {
                Value::Array(parts) if parts.len() == 2 => text(&parts[1]),
                _ => None,
            }));
        }
        Ok(before)
    }

    /// set.lua on one SKU; `force` sets it from a read older than what
    /// the gate has applied ([`StockGate::reset`]).
    async fn set_counter(&self, stock: &SkuStock, force: bool) -> Result<bool, GateError> {
        let applied = self
            .invoke::<i64>(
                self.set
                    .prepare_invoke()
                    .key(self.key(&stock.sku, "inv"))
                    .arg(stock.db_stock)
                    .arg(stock.max_per_user)
                    .arg(stock.version)
                    .arg(window_arg(stock.window.opens))
                    .arg(window_arg(stock.window.closes))
                    .arg(if force { "1" } else { "" })
                    .arg(stock.sale.as_ref().map_or("", |cap| cap.sale_id.as_str()))
                    .arg(
                        stock
                            .sale
                            .as_ref()
                            .map(|cap| cap.max_per_user.to_string())
                            .unwrap_or_default(),
                    )
                    .arg(draw_arg(&stock.window)),
            )
            .await?
            == 1;
        if applied {
            self.announce([&stock.sku]).await;
        }
        Ok(applied)
    }
}

#[async_trait]
impl StockGate for RedisGate {
    async fn reserve(&self, entry: &GateEntry) -> Result<GateDecision, GateError> {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let reply: Vec<Value> = self
            .invoke(
                self.reserve
                    .prepare_invoke()
                    .key(self.key(&entry.sku, "inv"))
                    .key(self.key(&entry.sku, "users"))
                    .key(self.key(&entry.sku, &format!("res:{}", entry.id.as_str())))
                    .key(self.key(&entry.sku, "pending"))
                    .arg(entry.user.as_str())
                    .arg(entry.quantity)
                    .arg(self.record_ttl_secs)
                    .arg(now_ms)
                    .arg(entry.id.as_str())
                    .arg(entry.at_ms)
                    .arg(self.key(&entry.sku, ""))
                    .arg(new_seed())
                    .arg(MAX_DRAW_ENTRANTS)
                    .arg(DRAW_KEEP_SECS)
                    .arg(self.draw_chunk),
            )
            .await?;
        if let [code, remaining, sale, cap] = reply.as_slice() {
            if let (Some(1), Some(remaining), Some(sale), Some(cap)) =
                (int(code), int(remaining), text(sale), int(cap))
            {
                let admitted = GateDecision::Reserved { remaining };
                return self.take_in_sale(entry, &sale, cap, admitted).await;
            }
        }
        let codes: Option<Vec<i64>> = reply.iter().map(int).collect();
        Ok(match codes.unwrap_or_default().as_slice() {
            [1, remaining] => GateDecision::Reserved {
                remaining: *remaining,
            },
            [2, remaining] => GateDecision::SoldOut {
                remaining: *remaining,
            },
            [3, live, cap] => GateDecision::UserLimit {
                live_units: *live,
                limit: u32::try_from(*cap).unwrap_or(u32::MAX),
            },
            [4, opens_at_ms] => GateDecision::NotOpen {
                opens_at_ms: *opens_at_ms,
            },
            [5, closes_at_ms] => GateDecision::Closed {
                closes_at_ms: *closes_at_ms,
            },
            [6, draw_ends_at_ms] => GateDecision::Entered {
                draw_ends_at_ms: *draw_ends_at_ms,
            },
            [0] if self.is_loaded().await? => GateDecision::UnknownSku,
            [0] => GateDecision::NotReady,
            _ => {
                return Err(GateError::Unavailable(format!(
                    "unexpected reserve script reply {reply:?}"
                )))
            }
        })
    }

    async fn committed(&self, entry: &GateEntry) -> Result<(), GateError> {
        self.settle_entries(&[(Settlement::Committed, entry.clone())])
            .await
    }

    async fn rejected(&self, entry: &GateEntry) -> Result<(), GateError> {
        self.settle_entries(&[(Settlement::Rejected, entry.clone())])
            .await
    }

    async fn charged(&self, entry: &GateEntry) -> Result<(), GateError> {
        self.settle_entries(&[(Settlement::Charged, entry.clone())])
            .await
    }

    async fn release(&self, entry: &GateEntry) -> Result<(), GateError> {
        self.settle_entries(&[(Settlement::Released, entry.clone())])
            .await
    }

    async fn settle_batch(&self, entries: &[(Settlement, GateEntry)]) -> Result<(), GateError> {
        self.settle_entries(entries).await
    }

    async fn load(&self, stock: &[SkuStock]) -> Result<(), GateError> {
        for sku in stock {
            // A stale read keeps the counter settlements have kept current.
            self.set(sku).await?;
        }
        self.conn
            .clone()
            .set::<_, _, ()>(self.loaded_key(), 1)
            .await
            .map_err(|e| unavailable(e, &self.origin))
    }

    async fn set(&self, stock: &SkuStock) -> Result<bool, GateError> {
        self.set_counter(stock, false).await
    }

    async fn reset(&self, stock: &SkuStock) -> Result<(), GateError> {
        self.set_counter(stock, true).await.map(drop)
    }

    async fn forget_sale_counts(&self, sale_id: &str) -> Result<(), GateError> {
        self.conn
            .clone()
            .del::<_, ()>(self.sale_key(sale_id, "users"))
            .await
            .map_err(|e| unavailable(e, &self.origin))
    }

    async fn set_windows(&self, windows: &[(Sku, WindowMs)]) -> Result<(), GateError> {
        let fields: Vec<_> = windows
            .iter()
            .map(|(sku, window)| {
                (
                    sku,
                    [
                        ("opens", window_arg(window.opens)),
                        ("closes", window_arg(window.closes)),
                        ("draw", draw_arg(window)),
                    ],
                )
            })
            .collect();
        self.set_fields(&fields).await.map(drop)
    }

    async fn set_sales(&self, sales: &[(Sku, Option<SaleCap>)]) -> Result<(), GateError> {
        let fields: Vec<_> = sales
            .iter()
            .map(|(sku, sale)| {
                let (id, cap) = sale.as_ref().map_or((String::new(), String::new()), |cap| {
                    (cap.sale_id.clone(), cap.max_per_user.to_string())
                });
                (sku, [("sale", id), ("scap", cap)])
            })
            .collect();
        let before = self.set_fields(&fields).await?;
        let mut left: Vec<String> = Vec::new();
        for ((_, now), before) in sales.iter().zip(before) {
            let now = now.as_ref().map(|cap| cap.sale_id.as_str());
            if let Some(before) = before.filter(|b| !b.is_empty() && Some(b.as_str()) != now) {
                if !left.contains(&before) {
                    left.push(before);
                }
            }
        }
        for sale in left {
            self.forget_sale_counts(&sale).await?;
        }
        Ok(())
    }

    async fn adjust(&self, sku: &Sku, delta: i64, version: i64) -> Result<(), GateError> {
        let call = uuid::Uuid::now_v7().simple().to_string();
        self.adjust_once(sku, delta, version, &call).await
    }

    async fn available(&self, sku: &Sku) -> Result<Option<i64>, GateError> {
        self.conn
            .clone()
            .hget(self.key(sku, "inv"), "stock")
            .await
            .map_err(|e| unavailable(e, &self.origin))
    }

    async fn in_flight(&self, sku: &Sku) -> Result<i64, GateError> {
        let inflight: Option<i64> = self
            .conn
            .clone()
            .hget(self.key(sku, "inv"), "inflight")
            .await
            .map_err(|e| unavailable(e, &self.origin))?;
        Ok(inflight.unwrap_or(0))
    }

    async fn draw(&self, sku: &Sku) -> Result<Option<Draw>, GateError> {
        let mut conn = self.conn.clone();
        let failed = |e| unavailable(e, &self.origin);
        let (opens, draw_ms): (Option<i64>, Option<i64>) = redis::cmd("HMGET")
            .arg(self.key(sku, "inv"))
            .arg("opens")
            .arg("draw")
            .query_async(&mut conn)
            .await
            .map_err(failed)?;
        let (Some(opens), Some(_)) = (opens, draw_ms) else {
            return Ok(None);
        };
        let key = self.key(sku, &format!("draw:{opens}"));
        let head: std::collections::HashMap<String, String> =
            conn.hgetall(&key).await.map_err(failed)?;
        let Some(seed) = head.get("seed") else {
            return Ok(None);
        };
        let number = |field: &str| head.get(field).and_then(|v| v.parse::<i64>().ok());
        // Outcomes are complete once the draw is done (it may take
        // several script runs).
        let drawn_at_ms = number("done");
        let who: std::collections::HashMap<String, String> =
            conn.hgetall(format!("{key}:who")).await.map_err(failed)?;
        let out: std::collections::HashMap<String, String> =
            conn.hgetall(format!("{key}:out")).await.map_err(failed)?;
        let places: std::collections::HashMap<String, u32> = if drawn_at_ms.is_some() {
            let order: Vec<String> = conn
                .zrange(format!("{key}:order"), 0, -1)
                .await
                .map_err(failed)?;
            (1..).zip(order).map(|(place, id)| (id, place)).collect()
        } else {
            Default::default()
        };
        let mut entrants: Vec<DrawEntrant> = who
            .into_iter()
            .filter_map(|(id, entry)| {
                let mut parts = entry.splitn(3, ' ');
                let arrival = parts.next()?.parse().ok()?;
                let quantity = parts.next()?.parse().ok()?;
                let user = parts.next()?.to_owned();
                let outcome = drawn_at_ms.map(|_| {
                    out.get(&id)
                        .and_then(|code| code.parse().ok())
                        .and_then(DrawOutcome::from_code)
                        .unwrap_or(DrawOutcome::SoldOut)
                });
                Some(DrawEntrant {
                    drawn: places.get(&id).copied().unwrap_or(0),
                    id,
                    user,
                    quantity,
                    arrival,
                    outcome,
                })
            })
            .collect();
        entrants.sort_by_key(|e| e.arrival);
        Ok(Some(Draw {
            opens_at_ms: opens,
            ends_at_ms: number("ends").unwrap_or(opens),
            seed: seed.clone(),
            drawn_at_ms,
            stock_at_draw: number("stock").unwrap_or(0),
            entrants,
            overflow: number("overflow")
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
        }))
    }

    async fn claim_draw_record(&self, sku: &Sku) -> Result<Option<DrawSummary>, GateError> {
        let reply: Vec<String> = self
            .invoke(
                self.draw_claim
                    .prepare_invoke()
                    .key(self.key(sku, "inv"))
                    .arg(self.key(sku, ""))
                    .arg(DRAW_KEEP_SECS),
            )
            .await?;
        let number = |i: usize| {
            reply
                .get(i)
                .and_then(|v| v.parse::<i64>().ok())
                .unwrap_or(0)
        };
        let count = |i: usize| u32::try_from(number(i)).unwrap_or(0);
        Ok((reply.len() == 8).then(|| DrawSummary {
            seed: reply[0].clone(),
            opens_at_ms: number(1),
            ends_at_ms: number(2),
            drawn_at_ms: number(3),
            stock_at_draw: number(4),
            entrants: count(5),
            admitted: count(6),
            overflow: count(7),
        }))
    }

    async fn stale_in_flight(
        &self,
        sku: &Sku,
        admitted_before_ms: i64,
    ) -> Result<Vec<GateEntry>, GateError> {
        let mut conn = self.conn.clone();
        let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(self.key(sku, "pending"))
            .arg("-inf")
            .arg(admitted_before_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(500)
            .query_async(&mut conn)
            .await
            .map_err(|e| unavailable(e, &self.origin))?;
        let mut stale = Vec::with_capacity(ids.len());
        for id in ids {
            let record = self.key(sku, &format!("res:{id}"));
            let (user, qty): (Option<String>, Option<u32>) = redis::cmd("HMGET")
                .arg(&record)
                .arg("user")
                .arg("qty")
                .query_async(&mut conn)
                .await
                .map_err(|e| unavailable(e, &self.origin))?;
            let parsed = (user, qty, crate::domain::ReservationId::parse(&id));
            if let (Some(user), Some(quantity), Ok(id)) = parsed {
                stale.push(GateEntry::new(
                    id,
                    sku.clone(),
                    crate::domain::UserId::from_trusted(user),
                    quantity,
                ));
            }
        }
        Ok(stale)
    }

    async fn is_loaded(&self) -> Result<bool, GateError> {
        self.conn
            .clone()
            .exists(self.loaded_key())
            .await
            .map_err(|e| unavailable(e, &self.origin))
    }

    fn restocks(&self) -> broadcast::Receiver<String> {
        self.restocks.subscribe()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    //! Against the real Redis on 127.0.0.1:6379 (`STOCKGATE_TEST_REDIS_URL`
    //! overrides), each gate under a key prefix of its own.
    use super::*;
    use crate::gate::decision_table::{self, loaded, request};

    fn redis_url() -> String {
        std::env::var("STOCKGATE_TEST_REDIS_URL")
            .unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
    }

    fn fresh_gate() -> RedisGate {
        gate_on(&redis_url())
    }

    /// A gate on the test run's Redis Cluster (see [`cluster_url`]).
    fn cluster_gate() -> RedisGate {
        gate_on(&cluster_url())
    }

    fn gate_on(url: &str) -> RedisGate {
        let config = RedisConfig {
            key_prefix: format!("sg-unit-{}", uuid::Uuid::now_v7().simple()),
            ..RedisConfig::default()
        };
        RedisGate::connect(url, &config).unwrap()
    }

    /// The Redis Cluster nextest's setup script started for this run
    /// (`ci/redis-cluster`), or one this process starts for itself when run
    /// otherwise; either is removed when its owner exits.
    pub(crate) fn cluster_url() -> String {
        static URL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        URL.get_or_init(|| {
            std::env::var("STOCKGATE_TEST_REDIS_CLUSTER").unwrap_or_else(|_| {
                let script = concat!(env!("CARGO_MANIFEST_DIR"), "/ci/redis-cluster");
                let out = std::process::Command::new(script)
                    .arg(std::process::id().to_string())
                    .output()
                    .expect("ci/redis-cluster runs");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8(out.stdout)
                    .unwrap()
                    .lines()
                    .find_map(|line| line.strip_prefix("STOCKGATE_TEST_REDIS_CLUSTER="))
                    .expect("the cluster's URL")
                    .to_owned()
            })
        })
        .clone()
    }

    /// Each test on one server and on the cluster.
    macro_rules! on_both {
        ($($single:ident, $cluster:ident => $check:expr;)*) => {$(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $single() {
                ($check)(fresh_gate as fn() -> RedisGate).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $cluster() {
                ($check)(cluster_gate as fn() -> RedisGate).await;
            }
        )*};
    }

    on_both! {
        follows_the_decision_table, follows_the_decision_table_on_a_cluster =>
            decision_table::run;
        rebuilds_race_settlements_without_over_counting, rebuilds_race_settlements_on_a_cluster =>
            |make: fn() -> RedisGate| decision_table::rebuilds_race_settlements(make());
        a_redriven_order_is_charged_once_and_given_back, a_redriven_order_is_charged_once_on_a_cluster =>
            |make: fn() -> RedisGate| decision_table::charge_after_give_up(make());
        windows_move_without_touching_counters, windows_move_on_a_cluster =>
            |make: fn() -> RedisGate| decision_table::windows_move_without_touching_counters(make());
        sale_caps_span_skus, sale_caps_span_slots_on_a_cluster =>
            |make: fn() -> RedisGate| decision_table::sale_caps_span_skus(make());
        batch_settlement_spans_skus_and_counts_once, batch_settlement_spans_slots_on_a_cluster =>
            batch_settlement_spans_skus;
        restocks_are_published_to_every_gate_on_the_prefix, restocks_reach_every_gate_on_a_cluster =>
            restocks_reach_every_gate;
        a_reserve_sent_twice_admits_once_on_one_server, a_reserve_sent_twice_admits_once_on_a_cluster =>
            a_reserve_sent_twice_admits_once;
        an_adjustment_sent_twice_counts_once_on_one_server, an_adjustment_sent_twice_counts_once_on_a_cluster =>
            an_adjustment_sent_twice_counts_once;
        a_lost_sale_give_is_given_again_on_one_server, a_lost_sale_give_is_given_again_on_a_cluster =>
            a_lost_sale_give_is_given_again;
    }

    /// Two replicas' gates on one prefix, on one server and on the
    /// cluster.
    fn twin_gates(url: &str) -> (RedisGate, RedisGate) {
        let config = RedisConfig {
            key_prefix: format!("sg-unit-{}", uuid::Uuid::now_v7().simple()),
            ..RedisConfig::default()
        };
        // Two entrants a script run, so the test's draw takes several.
        let gate = || {
            let mut gate = RedisGate::connect(url, &config).unwrap();
            gate.draw_chunk = 2;
            gate
        };
        (gate(), gate())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fair_opening_is_drawn_once_for_every_replica() {
        let (gate, replica) = twin_gates(&redis_url());
        decision_table::fair_opening(&gate, &replica).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_fair_opening_is_drawn_once_on_a_cluster() {
        let (gate, replica) = twin_gates(&cluster_url());
        decision_table::fair_opening(&gate, &replica).await;
    }

    /// A settlement sent again because its sale's give was lost (a timeout
    /// after the settle script ran) still ends the sale's count: the
    /// settle script answers the records it had ended before.
    async fn a_lost_sale_give_is_given_again(make: fn() -> RedisGate) {
        let gate = make();
        let sku = Sku::parse("S").unwrap();
        let cap = SaleCap {
            sale_id: "S1".into(),
            max_per_user: 1,
        };
        gate.load(&[SkuStock {
            sku: sku.clone(),
            db_stock: 5,
            max_per_user: 0,
            version: 0,
            window: WindowMs::OPEN,
            sale: Some(cap),
        }])
        .await
        .unwrap();
        let first = request(&sku, "u1", 1);
        assert!(matches!(
            gate.reserve(&first).await.unwrap(),
            GateDecision::Reserved { .. }
        ));
        gate.release(&first).await.unwrap();
        // Undo the give, as if it never ran.
        let mark = gate.sale_key("S1", &format!("res:{}", first.id.as_str()));
        let mut conn = gate.conn.clone();
        let _: () = redis::pipe()
            .hincr(gate.sale_key("S1", "users"), "u1", 1)
            .ignore()
            .set(&mark, 1)
            .ignore()
            .query_async(&mut conn)
            .await
            .unwrap();
        let second = request(&sku, "u1", 1);
        assert!(matches!(
            gate.reserve(&second).await.unwrap(),
            GateDecision::UserLimit { live_units: 1, .. }
        ));
        gate.release(&first).await.unwrap();
        assert!(matches!(
            gate.reserve(&request(&sku, "u1", 1)).await.unwrap(),
            GateDecision::Reserved { .. }
        ));
    }

    /// The same for an adjustment: a call run twice (the same call id, as
    /// a resend carries) moves the counter once; another call moves it again.
    async fn an_adjustment_sent_twice_counts_once(make: fn() -> RedisGate) {
        let (gate, sku) = loaded(make(), 5, 0).await;
        for _ in 0..2 {
            gate.adjust_once(&sku, 3, 10, "c1").await.unwrap();
            assert_eq!(gate.available(&sku).await.unwrap(), Some(8));
        }
        for _ in 0..2 {
            gate.adjust_once(&sku, -2, 11, "c2").await.unwrap();
            assert_eq!(gate.available(&sku).await.unwrap(), Some(6));
        }
        gate.adjust(&sku, 1, 12).await.unwrap();
        gate.adjust(&sku, 1, 13).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(8));
        let lasts: i64 = redis::cmd("TTL")
            .arg(gate.key(&sku, "adj:c1"))
            .query_async(&mut gate.conn.clone())
            .await
            .unwrap();
        assert!((1..=600).contains(&lasts), "the mark lasts {lasts} s");
        assert_eq!(adjust_mark_secs(500), 600);
        assert_eq!(adjust_mark_secs(300_000), 660);
    }

    /// The cluster client sends a script again after a lost connection: a
    /// reserve run twice for one id admits it once.
    async fn a_reserve_sent_twice_admits_once(make: fn() -> RedisGate) {
        let (gate, sku) = loaded(make(), 5, 0).await;
        let r = request(&sku, "u1", 2);
        for _ in 0..2 {
            assert_eq!(
                gate.reserve(&r).await.unwrap(),
                GateDecision::Reserved { remaining: 3 }
            );
        }
        assert_eq!(gate.available(&sku).await.unwrap(), Some(3));
        assert_eq!(gate.in_flight(&sku).await.unwrap(), 2);
        gate.release(&r).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(5));
        assert_eq!(gate.in_flight(&sku).await.unwrap(), 0);
    }

    /// Random sales against a model of the decision table (48 cases).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_sales_follow_the_model() {
        decision_table::random_sales(fresh_gate, 48);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn random_sales_follow_the_model_on_a_cluster() {
        decision_table::random_sales(cluster_gate, 48);
    }

    #[tokio::test]
    async fn release_returns_units_once() {
        let (gate, sku) = loaded(fresh_gate(), 5, 0).await;
        let r = request(&sku, "u1", 3);
        gate.reserve(&r).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(2));
        assert_eq!(gate.in_flight(&sku).await.unwrap(), 3);
        gate.release(&r).await.unwrap();
        gate.release(&r).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(5));
        assert_eq!(gate.in_flight(&sku).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn rejection_frees_the_user_but_not_the_stock_and_commit_ends_in_flight() {
        let (gate, sku) = loaded(fresh_gate(), 4, 2).await;
        let r = request(&sku, "u1", 2);
        gate.reserve(&r).await.unwrap();
        gate.rejected(&r).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(2));
        let again = request(&sku, "u1", 2);
        assert_eq!(
            gate.reserve(&again).await.unwrap(),
            GateDecision::Reserved { remaining: 0 }
        );
        gate.committed(&again).await.unwrap();
        assert_eq!(gate.in_flight(&sku).await.unwrap(), 0);
        // A release after the rejection gives nothing back.
        gate.release(&r).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), Some(0));
    }

    /// Settles SKUs in different hash slots in one call (on a cluster, one
    /// pipeline per slot).
    async fn batch_settlement_spans_skus(make: fn() -> RedisGate) {
        let gate = make();
        let (a, b) = (Sku::parse("A").unwrap(), Sku::parse("B").unwrap());
        let stock = |sku: &Sku| SkuStock {
            sku: sku.clone(),
            db_stock: 10,
            max_per_user: 0,
            version: 0,
            window: WindowMs::OPEN,
            sale: None,
        };
        gate.load(&[stock(&a), stock(&b)]).await.unwrap();
        let entries = [
            request(&a, "u1", 2),
            request(&a, "u2", 3),
            request(&b, "u1", 4),
        ];
        for entry in &entries {
            gate.reserve(entry).await.unwrap();
        }
        let settle = |action: Settlement, entries: &[GateEntry]| {
            entries
                .iter()
                .map(|entry| (action, entry.clone()))
                .collect::<Vec<_>>()
        };
        gate.settle_batch(&settle(Settlement::Committed, &entries[..2]))
            .await
            .unwrap();
        assert_eq!(gate.in_flight(&a).await.unwrap(), 0);
        for _ in 0..2 {
            gate.settle_batch(&settle(Settlement::Released, &entries))
                .await
                .unwrap();
        }
        assert_eq!(gate.available(&a).await.unwrap(), Some(10));
        assert_eq!(gate.available(&b).await.unwrap(), Some(10));
        assert_eq!(gate.in_flight(&b).await.unwrap(), 0);
        // Mixed actions in one call, with the script flushed first: the
        // pipeline reloads it and still settles each entry once.
        let c = request(&b, "u3", 5);
        let d = request(&b, "u4", 1);
        gate.reserve(&c).await.unwrap();
        gate.reserve(&d).await.unwrap();
        redis::cmd("SCRIPT")
            .arg("FLUSH")
            .exec_async(&mut gate.conn.clone())
            .await
            .unwrap();
        let mixed = [(Settlement::Committed, c), (Settlement::Released, d)];
        gate.settle_batch(&mixed).await.unwrap();
        gate.settle_batch(&mixed).await.unwrap();
        assert_eq!(gate.in_flight(&b).await.unwrap(), 0);
        assert_eq!(gate.available(&b).await.unwrap(), Some(5));
    }

    #[tokio::test]
    async fn a_release_never_creates_a_counter_for_an_unloaded_sku() {
        let gate = fresh_gate();
        let sku = Sku::parse("GONE").unwrap();
        gate.release(&request(&sku, "u1", 1)).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), None);
        gate.adjust(&sku, 5, 1).await.unwrap();
        assert_eq!(gate.available(&sku).await.unwrap(), None);
    }

    async fn restocks_reach_every_gate(make: fn() -> RedisGate) {
        let (gate, sku) = loaded(make(), 1, 0).await;
        let url = if gate.conn.is_cluster() {
            cluster_url()
        } else {
            redis_url()
        };
        let other = RedisGate::connect(
            &url,
            &RedisConfig {
                key_prefix: gate.prefix.clone(),
                ..RedisConfig::default()
            },
        )
        .unwrap();
        let mut heard = other.restocks();
        let mut version = 0;
        // The subscription comes up in the background: restock until the
        // other gate hears the SKU (a message sent before it subscribed is
        // lost, which is what its catch-all message on subscribing covers).
        let heard_sku = async {
            loop {
                version += 1;
                gate.adjust(&sku, 1, version).await.unwrap();
                let wait = tokio::time::timeout(Duration::from_millis(200), heard.recv());
                if let Ok(Ok(message)) = wait.await {
                    if message == "S" {
                        return;
                    }
                    assert_eq!(message, RESTOCK_ALL);
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), heard_sku)
            .await
            .expect("restock heard within 5 s");
    }
}
