//! Configuration: built-in defaults, then an optional TOML file, then
//! `STOCKGATE_*` environment variables (`__` separates sections, e.g.
//! `STOCKGATE_LAYERS__GATE__ENABLED=false`). [`Config::validate`] rejects
//! impossible values with a message naming the key.

use std::{net::SocketAddr, path::Path, time::Duration};

use figment::{
    providers::{Env, Format, Serialized, Toml},
    Figment,
};
use serde::{Deserialize, Serialize};

/// The switch types config values are spelled in.
pub use crate::domain::switches::{DbCheckMode, GateFailureMode};
use crate::domain::switches::{Layers, RateSettings};

/// The whole service configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The gRPC listener and request handling.
    pub server: ServerConfig,
    /// Log format and filter.
    pub log: LogConfig,
    /// Where each backend lives: `embedded` or a server URL.
    pub backends: BackendsConfig,
    /// The database store.
    pub store: StoreConfig,
    /// Defense layers and their switches.
    pub layers: LayersConfig,
    /// The Redis stock gate, when `backends.gate` is a `redis://` URL.
    pub redis: RedisConfig,
    /// The RabbitMQ order queue, when `backends.queue` is an `amqp://` URL.
    pub rabbitmq: RabbitConfig,
    /// Request limits and the hold lifecycle.
    pub reservations: ReservationsConfig,
    /// The operator API: credentials, its own listener, switch propagation.
    pub admin: AdminConfig,
    /// The Prometheus scrape endpoint.
    pub metrics: MetricsConfig,
}

/// The operator API (AdminService).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token every admin call must carry (`authorization: Bearer
    /// <token>`); compared in constant time. Prefer `token_file` or the
    /// `STOCKGATE_ADMIN__TOKEN` variable over writing it in a file. Empty:
    /// no token, which the server accepts only when the admin listener is
    /// loopback-only (local development).
    pub token: String,
    /// A file holding the token (a mounted Kubernetes Secret); read at
    /// start-up and on SIGHUP; surrounding whitespace is ignored. Wins over
    /// `token`.
    pub token_file: String,
    /// A separate listener for AdminService (with health and reflection),
    /// e.g. `0.0.0.0:50052`, so network policy can keep callers off it.
    /// Empty: AdminService shares `server.listen`.
    pub listen: String,
    /// How often each replica reads the stored layer switches and reports
    /// its own, in milliseconds: a change reaches every replica within
    /// about this long.
    pub switch_poll_ms: u64,
}

/// The Prometheus endpoint (`GET /metrics`, plain HTTP).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the metrics listener; empty turns it off.
    pub listen: String,
}

/// TLS for the gRPC listeners (rustls). Both paths empty: plaintext.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_path: String,
    /// PEM private key.
    pub key_path: String,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_path.is_empty() || !self.key_path.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the gRPC server listens on. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Largest request or response message accepted, in bytes. Reserve
    /// messages are tiny; a low cap turns junk into OUT_OF_RANGE early.
    pub max_message_bytes: usize,
    /// Most concurrent calls (HTTP/2 streams) per client connection. It
    /// bounds the work one connection can queue, and it keeps a burst of
    /// small gRPC messages under h2's flood guard: h2 answers more than about
    /// 100 unread small DATA frames on one connection with GOAWAY
    /// (ENHANCE_YOUR_CALM), dropping every call on it. Keep it at or below 100.
    pub max_concurrent_streams: u32,
    /// Server-side cap on a call's duration, in milliseconds, applied even
    /// when the caller sets no deadline (gRPC has none by default).
    pub request_timeout_ms: u64,
    /// Most InventoryService calls one replica runs at once; the next is
    /// refused at once with RESOURCE_EXHAUSTED and `retry-after` (load
    /// shedding) rather than queued. 0 turns shedding off.
    pub max_in_flight: usize,
    /// How long a graceful shutdown waits for in-flight calls and the order
    /// processor's current batch, in milliseconds.
    pub shutdown_grace_ms: u64,
    /// What this process runs: `all` (the gRPC API and the order
    /// processor), `api` (callers and operators only) or `processor` (the
    /// order processor, with health on the listener). Split roles need the
    /// RabbitMQ queue, which connects them.
    pub role: Role,
    /// TLS on the gRPC listeners (caller and admin).
    pub tls: TlsConfig,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    All,
    Api,
    Processor,
}

impl Role {
    pub fn serves_api(self) -> bool {
        self != Role::Processor
    }

    pub fn processes_orders(self) -> bool {
        self != Role::Api
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` env-filter directive; `RUST_LOG` overrides it.
    pub filter: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BackendsConfig {
    /// `embedded` (SQLite file at `store.sqlite_path`) or a
    /// `postgres://` URL.
    pub store: String,
    /// `embedded` (in-process counters) or a `redis://` URL (one Lua script
    /// per decision, shared by every replica).
    pub gate: String,
    /// `embedded` (in-process map) or a `redis://` URL (Redis 7.0 or later;
    /// keys under `redis.key_prefix`, shared by every replica) for the
    /// dedup layer's stored answers.
    pub dedup: String,
    /// `embedded` (in-process channel; lost on a crash) or an `amqp://` URL
    /// (a durable RabbitMQ quorum queue shared by every replica; needs the
    /// PostgreSQL store).
    pub queue: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// SQLite database file used when `backends.store = "embedded"`.
    pub sqlite_path: String,
    /// Most PostgreSQL connections this process opens. Request-path commits
    /// (queue off) wait for a connection rather than piling onto the
    /// database, so this also bounds database concurrency.
    pub max_connections: u32,
    /// How long a request waits for a free connection, in milliseconds,
    /// before it is answered UNAVAILABLE.
    pub acquire_timeout_ms: u64,
    /// Apply pending migrations at start-up. Deployments that run
    /// `stockgate migrate` as a separate job set this to false.
    pub migrate_on_start: bool,
}

/// The defense layers, outermost first.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LayersConfig {
    /// Per-user and global rate limiting.
    pub rate_limit: RateLimitConfig,
    /// Idempotency-key deduplication of Reserve calls.
    pub dedup: DedupLayerConfig,
    /// The atomic stock gate in front of the database.
    pub gate: GateLayerConfig,
    /// The order queue and its single order processor.
    pub queue: QueueLayerConfig,
    /// The database check: the last line against overselling.
    pub db: DbLayerConfig,
    /// Accept switches that leave nothing able to stop an oversell (the
    /// database check `off` while the gate is off or bypassing), at start-up
    /// and on SIGHUP. For demonstrations only; the admin API asks for
    /// `force` per change instead.
    pub allow_unsafe: bool,
}

/// Rate limits apply per replica: with N API replicas behind a balancer,
/// callers get up to N times these rates, so size them as the wanted total
/// divided by N (per user, a user's calls usually spread over replicas too).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Whether the layer runs. Can be changed at run time via AdminService.
    pub enabled: bool,
    /// Count what would be refused without refusing (for tuning).
    pub shadow: bool,
    /// One Reserve call per user per this many milliseconds (1000 = 1/s).
    pub per_user_period_ms: u64,
    /// Calls a user may make at once before the period applies.
    pub per_user_burst: u32,
    /// Calls per second across all users, per replica.
    pub global_per_sec: u32,
    /// Calls at once across all users before the global rate applies.
    pub global_burst: u32,
    /// How often users idle long enough to have a full burst again are
    /// forgotten, in milliseconds (bounds memory with millions of users).
    pub sweep_interval_ms: u64,
    /// The InventoryService methods the limits count (names as in the
    /// proto, e.g. `["Reserve", "ConfirmReservation"]`). Only Reserve by
    /// default: a buyer's reserve → watch → confirm must not spend the
    /// budget meant for competing for stock. A method not listed is never
    /// counted nor refused by this layer.
    pub methods: Vec<String>,
}

/// InventoryService's methods, as `layers.rate_limit.methods` names them.
pub const INVENTORY_METHODS: [&str; 5] = [
    "Reserve",
    "GetReservation",
    "ConfirmReservation",
    "ReleaseReservation",
    "WatchReservation",
];

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            shadow: false,
            per_user_period_ms: 1_000,
            per_user_burst: 1,
            global_per_sec: 20_000,
            global_burst: 5_000,
            sweep_interval_ms: 10_000,
            methods: vec!["Reserve".into()],
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DedupLayerConfig {
    /// Whether the layer runs. Can be changed at run time via AdminService.
    pub enabled: bool,
    /// How long a Reserve's answer is replayed to retries with the same
    /// idempotency key, in seconds.
    pub ttl_secs: u64,
    /// How long a concurrent duplicate waits for the first call's answer,
    /// in milliseconds, before it is answered ABORTED.
    pub wait_ms: u64,
}

impl Default for DedupLayerConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl_secs: 24 * 3600,
            wait_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GateLayerConfig {
    /// Whether the gate runs. Can be changed at run time via AdminService.
    pub enabled: bool,
    /// What Reserve does while the gate backend is down or not loaded:
    /// `fail_closed` or `bypass`.
    pub failure_mode: GateFailureMode,
    /// How long this replica answers "sold out" for a SKU from memory after
    /// the gate said so, in milliseconds, unless a restock message clears it
    /// sooner. It bounds staleness when a restock message is missed. 0
    /// turns the fast path off.
    pub sold_out_cache_ms: u64,
    /// How often the reconciler compares the gate with the database (and
    /// reloads a gate that lost its counters), in milliseconds.
    pub reconcile_interval_ms: u64,
    /// A reservation the gate admitted that is, after this long (ms),
    /// neither queued in this process nor in the database was lost between
    /// admission and queueing (a crash); the reconciler returns its units.
    /// Keep it well above the queue's lag.
    pub in_flight_timeout_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Prefix of every key and channel, so several deployments (or test
    /// runs) can share one Redis.
    pub key_prefix: String,
    /// Most time one Redis call may take, in milliseconds, before Reserve
    /// treats the gate as down (see `layers.gate.failure_mode`).
    pub response_timeout_ms: u64,
    /// Most time one connection attempt may take, in milliseconds.
    pub connect_timeout_ms: u64,
    /// How long a reservation's record stays in Redis, in seconds. Releases
    /// within this time are recognised as repeats; it must outlive holds.
    pub record_ttl_secs: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueLayerConfig {
    /// Whether admitted reservations go through the queue (true) or are
    /// committed to the database in the request path (false).
    pub enabled: bool,
    /// Most orders the processor commits in one transaction.
    pub batch_size: usize,
    /// How long the processor waits to fill a batch, in milliseconds, once
    /// it has at least one order.
    pub linger_ms: u64,
    /// Most reservations waiting in the embedded queue; past it Reserve
    /// answers UNAVAILABLE instead of growing memory without bound.
    pub capacity: usize,
    /// How often the processor tries an order the database keeps refusing
    /// with an error (not an outage, which is retried until it ends) before
    /// it gives up: the reservation becomes REJECTED, its units go back,
    /// and with RabbitMQ the message is moved to the dead-letter queue.
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RabbitConfig {
    /// The durable quorum queue of orders (single active consumer). The
    /// dead-letter queue is `<queue>.dlq` and the fanout exchange telling
    /// API replicas which reservations were settled is `<queue>.settled`.
    pub queue: String,
    /// Most time Reserve waits for the broker to confirm a message, in
    /// milliseconds; past it the reservation is rolled back (UNAVAILABLE).
    pub publish_timeout_ms: u64,
    /// Most unacknowledged messages the processor holds; at least
    /// `layers.queue.batch_size` so a batch can fill.
    pub prefetch: u16,
    /// Pause between reconnection attempts after the broker was lost, in
    /// milliseconds.
    pub reconnect_delay_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DbLayerConfig {
    /// `optimistic`, `pessimistic` or `off` (naive; can oversell, accepted
    /// only with the gate on and fail-closed, or `layers.allow_unsafe`).
    pub check: DbCheckMode,
    /// Most optimistic attempts for one order before the call is answered
    /// ABORTED. Each lost race means another order was committed, so this
    /// only binds under extreme contention on one SKU.
    pub max_attempts: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReservationsConfig {
    /// Most units one Reserve call may ask for.
    pub max_quantity: u32,
    /// How long a hold lasts before it expires and its units return to
    /// stock, in seconds. 0 = holds never expire.
    pub hold_ttl_secs: u64,
    /// How often the expiry sweeper looks for lapsed holds, in milliseconds.
    pub sweep_interval_ms: u64,
    /// Waiting entries a SKU with the `waitlist` sold-out policy takes at
    /// once, unless the SKU sets its own limit (`SetSoldOutPolicy`).
    pub waitlist_max: u32,
    /// How long a waitlist entry waits for units before it expires, in
    /// seconds.
    pub waitlist_ttl_secs: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            max_message_bytes: 64 * 1024,
            max_concurrent_streams: 100,
            request_timeout_ms: 5_000,
            max_in_flight: 4_096,
            shutdown_grace_ms: 10_000,
            role: Role::All,
            tls: TlsConfig::default(),
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            token: String::new(),
            token_file: String::new(),
            listen: String::new(),
            switch_poll_ms: 1_000,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

impl Default for BackendsConfig {
    fn default() -> Self {
        Self {
            store: EMBEDDED.into(),
            gate: EMBEDDED.into(),
            queue: EMBEDDED.into(),
            dedup: EMBEDDED.into(),
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            sqlite_path: "stockgate.db".into(),
            max_connections: 16,
            acquire_timeout_ms: 5_000,
            migrate_on_start: true,
        }
    }
}

impl Default for GateLayerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            failure_mode: GateFailureMode::FailClosed,
            sold_out_cache_ms: 1_000,
            reconcile_interval_ms: 5_000,
            in_flight_timeout_ms: 60_000,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            key_prefix: "stockgate".into(),
            response_timeout_ms: 500,
            connect_timeout_ms: 1_000,
            record_ttl_secs: 7 * 24 * 3600,
        }
    }
}

impl Default for QueueLayerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            batch_size: 64,
            linger_ms: 2,
            capacity: 100_000,
            max_attempts: 5,
        }
    }
}

impl Default for RabbitConfig {
    fn default() -> Self {
        Self {
            queue: "stockgate.orders".into(),
            publish_timeout_ms: 2_000,
            prefetch: 512,
            reconnect_delay_ms: 500,
        }
    }
}

impl Default for DbLayerConfig {
    fn default() -> Self {
        Self {
            check: DbCheckMode::Optimistic,
            max_attempts: 64,
        }
    }
}

impl Default for ReservationsConfig {
    fn default() -> Self {
        Self {
            max_quantity: 10,
            hold_ttl_secs: 600,
            sweep_interval_ms: 1_000,
            waitlist_max: 10_000,
            waitlist_ttl_secs: 900,
        }
    }
}

/// The word that selects an in-process backend.
pub const EMBEDDED: &str = "embedded";

/// A backend chosen by `backends.*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    Sqlite(String),
    Postgres(String),
}

/// A queue chosen by `backends.queue`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueBackend {
    Embedded,
    Rabbit(String),
}

/// A gate chosen by `backends.gate`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateBackend {
    Embedded,
    Redis(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("could not load configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

const REDIS_SCHEMES: &[&str] = &["redis://", "rediss://"];

/// A `backends.*` value: `None` for "embedded", else the URL if it has one
/// of `schemes`; `a_url` names the accepted kind in the error.
fn server_url(
    key: &'static str,
    value: &str,
    schemes: &[&str],
    a_url: &str,
) -> Result<Option<String>, ConfigError> {
    if value == EMBEDDED {
        Ok(None)
    } else if schemes.iter().any(|scheme| value.starts_with(scheme)) {
        Ok(Some(value.to_owned()))
    } else {
        Err(invalid(key, format!("must be \"embedded\" or {a_url} URL")))
    }
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

/// The environment variable that sets a dotted config `key`
/// (`metrics.listen` → `STOCKGATE_METRICS__LISTEN`), for error messages
/// that tell an operator what to change.
pub fn env_name(key: &str) -> String {
    format!("STOCKGATE_{}", key.to_uppercase().replace('.', "__"))
}

impl Config {
    /// Defaults, then `file` if given, then `STOCKGATE_*` variables, then
    /// [`Config::validate`].
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(invalid(
                    "--config",
                    format!("file {} does not exist", file.display()),
                ));
            }
            figment = figment.merge(Toml::file(file));
        }
        let config: Config = figment
            // Variables of the command line itself, not config keys.
            .merge(
                Env::prefixed("STOCKGATE_")
                    .ignore(&["config", "admin_addr", "admin_token"])
                    .split("__"),
            )
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects values the service cannot run with.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.server.max_message_bytes < 1024 {
            return Err(invalid("server.max_message_bytes", "must be at least 1024"));
        }
        if !(1..=100).contains(&self.server.max_concurrent_streams) {
            return Err(invalid(
                "server.max_concurrent_streams",
                "must be between 1 and 100",
            ));
        }
        if self.server.request_timeout_ms == 0 {
            return Err(invalid("server.request_timeout_ms", "must be above 0"));
        }
        self.store_backend()?;
        self.gate_backend()?;
        if self.redis.key_prefix.is_empty() || self.redis.key_prefix.contains(['{', '}']) {
            return Err(invalid(
                "redis.key_prefix",
                "must be non-empty and free of { } (they mark hash tags)",
            ));
        }
        if self.redis.response_timeout_ms == 0 || self.redis.connect_timeout_ms == 0 {
            return Err(invalid(
                "redis.response_timeout_ms",
                "timeouts must be above 0",
            ));
        }
        if self.redis.record_ttl_secs <= self.reservations.hold_ttl_secs {
            return Err(invalid(
                "redis.record_ttl_secs",
                "must be longer than reservations.hold_ttl_secs",
            ));
        }
        if self.layers.gate.in_flight_timeout_ms <= self.server.request_timeout_ms {
            return Err(invalid(
                "layers.gate.in_flight_timeout_ms",
                "must be longer than server.request_timeout_ms (a request-path commit may take that long)",
            ));
        }
        if self.layers.gate.reconcile_interval_ms == 0 {
            return Err(invalid(
                "layers.gate.reconcile_interval_ms",
                "must be above 0",
            ));
        }
        match self.queue_backend()? {
            QueueBackend::Rabbit(_) => {
                if !matches!(self.store_backend()?, StoreBackend::Postgres(_)) {
                    return Err(invalid(
                        "backends.queue",
                        "an amqp:// queue needs a postgres:// store (replicas share tickets and orders through it)",
                    ));
                }
                let rabbit = &self.rabbitmq;
                if rabbit.queue.is_empty() || rabbit.queue.len() > 200 {
                    return Err(invalid("rabbitmq.queue", "must be 1 to 200 characters"));
                }
                if rabbit.publish_timeout_ms == 0 || rabbit.reconnect_delay_ms == 0 {
                    return Err(invalid(
                        "rabbitmq.publish_timeout_ms",
                        "publish_timeout_ms and reconnect_delay_ms must be above 0",
                    ));
                }
                if usize::from(rabbit.prefetch) < self.layers.queue.batch_size {
                    return Err(invalid(
                        "rabbitmq.prefetch",
                        "must be at least layers.queue.batch_size",
                    ));
                }
            }
            QueueBackend::Embedded if self.server.role != Role::All => {
                return Err(invalid(
                    "server.role",
                    "`api` and `processor` need an amqp:// backends.queue to connect them",
                ));
            }
            QueueBackend::Embedded => {}
        }
        if self.layers.queue.max_attempts == 0 {
            return Err(invalid("layers.queue.max_attempts", "must be above 0"));
        }
        if self.store.max_connections == 0 {
            return Err(invalid("store.max_connections", "must be above 0"));
        }
        if self.store.acquire_timeout_ms == 0 {
            return Err(invalid("store.acquire_timeout_ms", "must be above 0"));
        }
        let rate = &self.layers.rate_limit;
        if rate.per_user_period_ms == 0 || rate.per_user_burst == 0 {
            return Err(invalid(
                "layers.rate_limit.per_user_period_ms",
                "per_user_period_ms and per_user_burst must be above 0",
            ));
        }
        if rate.global_per_sec == 0 || rate.global_burst == 0 {
            return Err(invalid(
                "layers.rate_limit.global_per_sec",
                "global_per_sec and global_burst must be above 0",
            ));
        }
        if rate.sweep_interval_ms == 0 {
            return Err(invalid(
                "layers.rate_limit.sweep_interval_ms",
                "must be above 0",
            ));
        }
        if rate.methods.is_empty() {
            return Err(invalid(
                "layers.rate_limit.methods",
                "must name at least one InventoryService method; to count none, switch the layer off",
            ));
        }
        if let Some(unknown) = rate
            .methods
            .iter()
            .find(|m| !INVENTORY_METHODS.contains(&m.as_str()))
        {
            return Err(invalid(
                "layers.rate_limit.methods",
                format!(
                    "{unknown:?} is not an InventoryService method (one of {})",
                    INVENTORY_METHODS.join(", ")
                ),
            ));
        }
        if self.layers.dedup.ttl_secs == 0 || self.layers.dedup.wait_ms == 0 {
            return Err(invalid(
                "layers.dedup.ttl_secs",
                "ttl_secs and wait_ms must be above 0",
            ));
        }
        self.dedup_backend()?;
        if self.layers.queue.batch_size == 0 {
            return Err(invalid("layers.queue.batch_size", "must be above 0"));
        }
        if self.layers.queue.capacity == 0 {
            return Err(invalid("layers.queue.capacity", "must be above 0"));
        }
        if self.layers.db.max_attempts == 0 {
            return Err(invalid("layers.db.max_attempts", "must be above 0"));
        }
        if !(1..=10_000).contains(&self.reservations.max_quantity) {
            return Err(invalid(
                "reservations.max_quantity",
                "must be between 1 and 10000",
            ));
        }
        if self.reservations.waitlist_max == 0 {
            return Err(invalid("reservations.waitlist_max", "must be above 0"));
        }
        if self.reservations.waitlist_ttl_secs == 0 {
            return Err(invalid("reservations.waitlist_ttl_secs", "must be above 0"));
        }
        if self.reservations.sweep_interval_ms == 0 {
            return Err(invalid("reservations.sweep_interval_ms", "must be above 0"));
        }
        if self.admin.switch_poll_ms == 0 {
            return Err(invalid("admin.switch_poll_ms", "must be above 0"));
        }
        self.admin_listen()?;
        self.metrics_listen()?;
        let tls = &self.server.tls;
        if tls.enabled() && (tls.cert_path.is_empty() || tls.key_path.is_empty()) {
            return Err(invalid(
                "server.tls.cert_path",
                "cert_path and key_path must be set together",
            ));
        }
        let layers = &self.layers;
        if !layers.allow_unsafe && Layers::from_config(self).oversell_unguarded() {
            return Err(invalid(
                "layers.db.check",
                "`off` with the gate off or bypassing leaves nothing to stop an oversell; set layers.allow_unsafe = true to run it anyway",
            ));
        }
        Ok(())
    }

    /// `admin.listen` parsed; `None` when AdminService shares `server.listen`.
    pub fn admin_listen(&self) -> Result<Option<SocketAddr>, ConfigError> {
        optional_addr("admin.listen", &self.admin.listen)
    }

    /// `metrics.listen` parsed; `None` when metrics are off.
    pub fn metrics_listen(&self) -> Result<Option<SocketAddr>, ConfigError> {
        optional_addr("metrics.listen", &self.metrics.listen)
    }

    /// The admin token: `admin.token_file`'s content, else `admin.token`;
    /// `None` when neither is set.
    pub fn admin_token(&self) -> Result<Option<String>, ConfigError> {
        let token = if self.admin.token_file.is_empty() {
            self.admin.token.clone()
        } else {
            std::fs::read_to_string(&self.admin.token_file)
                .map_err(|e| invalid("admin.token_file", format!("cannot be read: {e}")))?
                .trim()
                .to_owned()
        };
        Ok((!token.is_empty()).then_some(token))
    }

    /// Which gate `backends.gate` selects.
    /// `None`: in-process; `Some(url)`: Redis.
    pub fn dedup_backend(&self) -> Result<Option<String>, ConfigError> {
        server_url(
            "backends.dedup",
            &self.backends.dedup,
            REDIS_SCHEMES,
            "a redis://",
        )
    }

    pub fn queue_backend(&self) -> Result<QueueBackend, ConfigError> {
        // amqps:// would need lapin's TLS stack, which is not built in.
        let url = server_url(
            "backends.queue",
            &self.backends.queue,
            &["amqp://"],
            "an amqp://",
        )?;
        Ok(url.map_or(QueueBackend::Embedded, QueueBackend::Rabbit))
    }

    pub fn gate_backend(&self) -> Result<GateBackend, ConfigError> {
        let url = server_url(
            "backends.gate",
            &self.backends.gate,
            REDIS_SCHEMES,
            "a redis://",
        )?;
        Ok(url.map_or(GateBackend::Embedded, GateBackend::Redis))
    }

    /// Which store `backends.store` selects.
    pub fn store_backend(&self) -> Result<StoreBackend, ConfigError> {
        let url = self.backends.store.as_str();
        if url == EMBEDDED {
            if self.store.sqlite_path.is_empty() {
                return Err(invalid("store.sqlite_path", "must not be empty"));
            }
            Ok(StoreBackend::Sqlite(self.store.sqlite_path.clone()))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(StoreBackend::Postgres(url.to_owned()))
        } else {
            Err(invalid(
                "backends.store",
                "must be \"embedded\" or a postgres:// URL",
            ))
        }
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.server.request_timeout_ms)
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.server.shutdown_grace_ms)
    }
}

fn optional_addr(field: &'static str, value: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if value.is_empty() {
        return Ok(None);
    }
    value.parse().map(Some).map_err(|_| {
        invalid(
            field,
            format!("`{value}` is not an address like 127.0.0.1:9464"),
        )
    })
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`, for logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!(
                    "{}{}:***{}",
                    &url[..scheme + 3],
                    &creds[..colon],
                    &url[at..]
                ),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// The switches a replica starts with, before the fleet's stored ones.
impl Layers {
    pub fn from_config(config: &Config) -> Self {
        let layers = &config.layers;
        Self {
            rate_limit: layers.rate_limit.enabled,
            rate_limit_shadow: layers.rate_limit.shadow,
            rate_limits: RateSettings::from_config(&layers.rate_limit),
            dedup: layers.dedup.enabled,
            gate: layers.gate.enabled,
            gate_failure: layers.gate.failure_mode,
            queue: layers.queue.enabled,
            db_check: layers.db.check,
        }
    }
}

impl RateSettings {
    pub fn from_config(config: &RateLimitConfig) -> Self {
        Self {
            per_user_period_ms: config.per_user_period_ms,
            per_user_burst: config.per_user_burst,
            global_per_sec: config.global_per_sec,
            global_burst: config.global_burst,
        }
    }
}

#[cfg(test)]
// figment's Jail returns its own large error type; not ours to shrink.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_embedded() {
        let config = Config::default();
        config.validate().unwrap();
        assert_eq!(
            config.store_backend().unwrap(),
            StoreBackend::Sqlite("stockgate.db".into())
        );
    }

    #[test]
    fn an_unguarded_database_check_needs_allow_unsafe() {
        let mut config = Config::default();
        config.layers.db.check = DbCheckMode::Off;
        config.validate().expect("the gate still guards");
        config.layers.gate.failure_mode = GateFailureMode::Bypass;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("layers.db.check"), "{err}");
        config.layers.gate.failure_mode = GateFailureMode::FailClosed;
        config.layers.gate.enabled = false;
        assert!(config.validate().is_err());
        config.layers.allow_unsafe = true;
        config.validate().unwrap();
    }

    #[test]
    fn rate_limit_methods_are_inventory_methods() {
        use prost::Message as _;
        let set = prost_types::FileDescriptorSet::decode(crate::pb::FILE_DESCRIPTOR_SET).unwrap();
        let proto: Vec<String> = set
            .file
            .iter()
            .flat_map(|f| &f.service)
            .filter(|s| s.name() == "InventoryService")
            .flat_map(|s| s.method.iter().map(|m| m.name().to_owned()))
            .collect();
        assert_eq!(proto, INVENTORY_METHODS);

        let mut config = Config::default();
        assert_eq!(config.layers.rate_limit.methods, ["Reserve"]);
        config.layers.rate_limit.methods = vec!["Reserve".into(), "Confirm".into()];
        let err = config.validate().unwrap_err().to_string();
        assert!(
            err.contains("layers.rate_limit.methods") && err.contains("\"Confirm\""),
            "{err}"
        );
        config.layers.rate_limit.methods.clear();
        assert!(config.validate().is_err());
        figment::Jail::expect_with(|jail| {
            jail.set_env(
                env_name("layers.rate_limit.methods"),
                "[Reserve,ConfirmReservation]",
            );
            let config = Config::load(None).unwrap();
            assert_eq!(
                config.layers.rate_limit.methods,
                ["Reserve", "ConfirmReservation"]
            );
            Ok(())
        });
    }

    #[test]
    fn env_names_follow_the_loader() {
        assert_eq!(env_name("metrics.listen"), "STOCKGATE_METRICS__LISTEN");
        assert_eq!(
            env_name("layers.rate_limit.methods"),
            "STOCKGATE_LAYERS__RATE_LIMIT__METHODS"
        );
        figment::Jail::expect_with(|jail| {
            jail.set_env(env_name("metrics.listen"), "127.0.0.1:9999");
            assert_eq!(Config::load(None).unwrap().metrics.listen, "127.0.0.1:9999");
            Ok(())
        });
    }

    #[test]
    fn cli_variables_are_not_config_keys() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("STOCKGATE_ADMIN_TOKEN", "x");
            jail.set_env("STOCKGATE_ADMIN_ADDR", "http://h:1");
            jail.set_env("STOCKGATE_ADMIN__SWITCH_POLL_MS", "250");
            let config = Config::load(None).unwrap();
            assert_eq!(config.admin.switch_poll_ms, 250);
            assert!(config.admin.token.is_empty());
            Ok(())
        });
    }

    #[test]
    fn file_then_env_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "sg.toml",
                "[layers.queue]\nbatch_size = 8\n[reservations]\nmax_quantity = 3\n",
            )?;
            jail.set_env("STOCKGATE_RESERVATIONS__MAX_QUANTITY", "5");
            let config = Config::load(Some(Path::new("sg.toml"))).unwrap();
            assert_eq!(config.layers.queue.batch_size, 8);
            assert_eq!(config.reservations.max_quantity, 5);
            Ok(())
        });
    }

    #[test]
    fn invalid_values_name_the_key() {
        let mut config = Config::default();
        config.reservations.max_quantity = 0;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("reservations.max_quantity"), "{err}");

        let mut config = Config::default();
        config.backends.store = "mysql://x".into();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("backends.store"), "{err}");
    }

    #[test]
    fn unknown_keys_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("sg.toml", "[layers.gate]\nenabeld = false\n")?;
            let err = Config::load(Some(Path::new("sg.toml"))).unwrap_err();
            assert!(err.to_string().contains("enabeld"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/sg"),
            "postgres://app:***@db:5432/sg"
        );
        assert_eq!(redact_url("postgres://db/sg"), "postgres://db/sg");
    }
}
