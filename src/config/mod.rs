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
use secrets::Backend;

pub mod secrets;
mod sections;

/// Every section's type, at `config::` as before the split.
pub use sections::*;

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
    /// Distributed tracing.
    pub telemetry: TelemetryConfig,
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

/// One server, or a Redis Cluster by its seed nodes
/// (`redis+cluster://host:port,host:port`).
const REDIS_SCHEMES: &[&str] = &[
    "redis://",
    "rediss://",
    "redis+cluster://",
    "rediss+cluster://",
];

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
    } else if crate::redis_client::is_cluster_url(value)
        && crate::redis_client::cluster_seeds(value).is_none()
    {
        Err(invalid(
            key,
            "names no seed node: redis+cluster://host:port[,host:port…]",
        ))
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
        for (key, value) in [
            ("server.body_timeout_ms", self.server.body_timeout_ms),
            ("server.max_connections", self.server.max_connections as u64),
            (
                "server.handshake_timeout_ms",
                self.server.handshake_timeout_ms,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be above 0"));
            }
        }
        if self.server.max_reading_bytes < self.server.max_message_bytes.saturating_add(5) {
            return Err(invalid(
                "server.max_reading_bytes",
                "must be at least server.max_message_bytes + 5",
            ));
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
        let longest_hold = match self.reservations.hold_ttl_secs {
            0 => 0,
            ttl => ttl.max(self.reservations.max_hold_secs()),
        };
        if self.redis.record_ttl_secs <= longest_hold {
            return Err(invalid(
                "redis.record_ttl_secs",
                "must be longer than the longest hold (reservations.hold_ttl_secs, and max_hold_secs once extended)",
            ));
        }
        if !(0.0..=1.0).contains(&self.telemetry.sampling_ratio) {
            return Err(invalid(
                "telemetry.sampling_ratio",
                "must be between 0.0 and 1.0",
            ));
        }
        let endpoint = &self.telemetry.otlp_endpoint;
        let plain_or_tls = endpoint.starts_with("http://") || endpoint.starts_with("https://");
        if !(endpoint.is_empty() || plain_or_tls) {
            return Err(invalid(
                "telemetry.otlp_endpoint",
                "must be an http:// or https:// URL (OTLP over gRPC), or empty for off",
            ));
        }
        if self.telemetry.service_name.is_empty() {
            return Err(invalid("telemetry.service_name", "must not be empty"));
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
                let most = crate::queue::PUBLISH_BATCH_MAX;
                if !(1..=most).contains(&rabbit.publish_batch_max) {
                    let why = format!("must be 1 to {most}");
                    return Err(invalid("rabbitmq.publish_batch_max", why));
                }
                let most = crate::queue::MAX_PARTITIONS;
                if !(1..=most).contains(&rabbit.partitions) {
                    let why = format!("must be 1 to {most}");
                    return Err(invalid("rabbitmq.partitions", why));
                }
                if rabbit.lease_poll_ms == 0 {
                    return Err(invalid("rabbitmq.lease_poll_ms", "must be above 0"));
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
        if rate.max_tracked_users == 0 {
            return Err(invalid(
                "layers.rate_limit.max_tracked_users",
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
        if self.layers.dedup.memory_max_bytes < 1024 * 1024 {
            return Err(invalid(
                "layers.dedup.memory_max_bytes",
                "must be at least 1048576 (1 MiB)",
            ));
        }
        self.dedup_backend()?;
        self.rate_limit_backend()?;
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
        if !(1..=100).contains(&self.reservations.max_cart_lines) {
            return Err(invalid(
                "reservations.max_cart_lines",
                "must be between 1 and 100",
            ));
        }
        let reservations = &self.reservations;
        if reservations.max_hold_secs != 0
            && reservations.max_hold_secs < reservations.hold_ttl_secs
        {
            return Err(invalid(
                "reservations.max_hold_secs",
                "must be 0 (three times hold_ttl_secs) or at least reservations.hold_ttl_secs",
            ));
        }
        if self.reservations.waitlist_max == 0 {
            return Err(invalid("reservations.waitlist_max", "must be above 0"));
        }
        if self.reservations.waitlist_ttl_secs == 0 {
            return Err(invalid("reservations.waitlist_ttl_secs", "must be above 0"));
        }
        if self.reservations.max_watches == 0 || self.reservations.max_watches_per_user == 0 {
            return Err(invalid(
                "reservations.max_watches",
                "max_watches and max_watches_per_user must be above 0",
            ));
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
        if !tls.client_ca_path.is_empty() && tls.cert_path.is_empty() {
            return Err(invalid(
                "server.tls.client_ca_path",
                "mutual TLS needs the server's own cert_path and key_path",
            ));
        }
        if !tls.allowed_clients.is_empty() && tls.client_ca_path.is_empty() {
            return Err(invalid(
                "server.tls.allowed_clients",
                "an allow-list of calling identities needs client_ca_path (mutual TLS)",
            ));
        }
        let share = |percent: &u32| (1..=100).contains(percent);
        if !share(&tls.caller_share_percent) {
            return Err(invalid(
                "server.tls.caller_share_percent",
                "must be 1 to 100",
            ));
        }
        for (caller, percent) in &tls.caller_shares {
            if !share(percent) {
                return Err(invalid(
                    "server.tls.caller_shares",
                    "each share must be 1 to 100",
                ));
            }
            let named =
                caller.contains("://") || caller.starts_with("dns:") || caller.starts_with("cn:");
            if !named {
                return Err(invalid(
                    "server.tls.caller_shares",
                    "identities are a URI SAN (spiffe://…), dns:<name> or cn:<name>",
                ));
            }
            if !tls.allowed_clients.is_empty() && !tls.allowed_clients.contains(caller) {
                return Err(invalid(
                    "server.tls.caller_shares",
                    "names an identity that is not in server.tls.allowed_clients",
                ));
            }
        }
        if !tls.caller_shares.is_empty() && tls.client_ca_path.is_empty() {
            return Err(invalid(
                "server.tls.caller_shares",
                "calling services are known only with client_ca_path (mutual TLS)",
            ));
        }
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

    /// `server.health_listen` parsed; `None` when there is none.
    pub fn health_listen(&self) -> Result<Option<SocketAddr>, ConfigError> {
        optional_addr("server.health_listen", &self.server.health_listen)
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
            &Backend::Dedup.url(&self.backends)?,
            REDIS_SCHEMES,
            "a redis://, rediss://, redis+cluster:// or rediss+cluster://",
        )
    }

    /// Where the fleet-wide rate limits live: `None` for none (each
    /// replica limits on its own), `Some(url)` for Redis.
    pub fn rate_limit_backend(&self) -> Result<Option<String>, ConfigError> {
        server_url(
            "backends.rate_limit",
            &Backend::RateLimit.url(&self.backends)?,
            REDIS_SCHEMES,
            "a redis://, rediss://, redis+cluster:// or rediss+cluster://",
        )
    }

    pub fn queue_backend(&self) -> Result<QueueBackend, ConfigError> {
        let url = server_url(
            "backends.queue",
            &Backend::Queue.url(&self.backends)?,
            &["amqp://", "amqps://"],
            "an amqp:// or amqps://",
        )?;
        if let Some(url) = &url {
            // A cluster's nodes: `amqp://user:pass@host:port,host:port/vhost`.
            if secrets::hosts_of(url).iter().any(|host| host.is_empty()) {
                return Err(invalid(
                    "backends.queue",
                    "an empty entry in its list of brokers",
                ));
            }
            for (n, host) in secrets::per_host(url).iter().enumerate() {
                host.parse::<lapin::uri::AMQPUri>().map_err(|err| {
                    invalid(
                        "backends.queue",
                        format!("broker {} of the list: {err}", n + 1),
                    )
                })?;
            }
        }
        Ok(url.map_or(QueueBackend::Embedded, QueueBackend::Rabbit))
    }

    pub fn gate_backend(&self) -> Result<GateBackend, ConfigError> {
        let url = server_url(
            "backends.gate",
            &Backend::Gate.url(&self.backends)?,
            REDIS_SCHEMES,
            "a redis://, rediss://, redis+cluster:// or rediss+cluster://",
        )?;
        Ok(url.map_or(GateBackend::Embedded, GateBackend::Redis))
    }

    /// Which store `backends.store` selects.
    pub fn store_backend(&self) -> Result<StoreBackend, ConfigError> {
        let url = Backend::Store.url(&self.backends)?;
        let url = url.as_str();
        if url == EMBEDDED {
            if self.store.sqlite_path.is_empty() {
                return Err(invalid("store.sqlite_path", "must not be empty"));
            }
            Ok(StoreBackend::Sqlite(self.store.sqlite_path.clone()))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            // Several hosts are a primary and its standbys: any other host
            // choice could write to (or read the stock from) a standby.
            let several = secrets::hosts_of(url).len() > 1;
            if several && !url.contains("target_session_attrs=read-write") {
                return Err(invalid(
                    "backends.store",
                    "lists several hosts: add ?target_session_attrs=read-write so connections go to the primary",
                ));
            }
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

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`, and
/// `redis://host/?password=secret` → `redis://host/?password=***`, for logs.
pub fn redact_url(url: &str) -> String {
    let (url, query) = match url.split_once('?') {
        Some((head, query)) => (head, Some(query)),
        None => (url, None),
    };
    let mut redacted = redact_userinfo(url);
    if let Some(query) = query {
        redacted.push('?');
        let pairs: Vec<String> = query
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) if SECRET_PARAMS.contains(&name.to_ascii_lowercase().as_str()) => {
                    format!("{name}=***")
                }
                _ => pair.to_owned(),
            })
            .collect();
        redacted.push_str(&pairs.join("&"));
    }
    redacted
}

/// Query parameters that carry a secret in the URLs our drivers accept.
const SECRET_PARAMS: [&str; 6] = [
    "password",
    "passwd",
    "pass",
    "sslpassword",
    "token",
    "secret",
];

fn redact_userinfo(url: &str) -> String {
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
        assert_eq!(config.layers.rate_limit.methods, ["Reserve", "ReserveCart"]);
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
    fn the_longest_hold_defaults_to_three_hold_times() {
        let mut config = Config::default();
        assert_eq!(config.reservations.max_hold_secs(), 1_800);
        // A config from before extensions, with long holds, still starts.
        config.reservations.hold_ttl_secs = 3_600;
        config.validate().unwrap();
        assert_eq!(config.reservations.max_hold_secs(), 10_800);
        config.reservations.hold_ttl_secs = 0;
        assert_eq!(config.reservations.max_hold_secs(), u64::from(u32::MAX));
        config.reservations.hold_ttl_secs = 600;
        config.reservations.max_hold_secs = 599;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("reservations.max_hold_secs"), "{err}");
        // Redis records must outlive extended holds too.
        config.reservations.max_hold_secs = 0;
        config.redis.record_ttl_secs = 1_000;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("redis.record_ttl_secs"), "{err}");
    }

    #[test]
    fn a_queue_url_may_list_a_clusters_brokers_each_checked() {
        let mut config = Config::default();
        config.backends.store = "postgres://db/sale".into();
        config.backends.queue = "amqp://u:p@10.0.0.1:5672,10.0.0.2:5672/%2f".into();
        assert!(config.queue_backend().is_ok());
        config.backends.queue = "amqp://u:p@10.0.0.1:5672,10.0.0.2:notaport/%2f".into();
        let err = config.queue_backend().unwrap_err().to_string();
        assert!(
            err.contains("backends.queue") && err.contains("broker 2"),
            "{err}"
        );
        config.backends.queue = "amqp://10.0.0.1:5672,,10.0.0.2:5672".into();
        let err = config.queue_backend().unwrap_err().to_string();
        assert!(err.contains("empty entry"), "{err}");

        config.backends.store = "postgres://app@db-a:5432,db-b:5432/sale".into();
        let err = config.store_backend().unwrap_err().to_string();
        assert!(
            err.contains("backends.store") && err.contains("target_session_attrs"),
            "{err}"
        );
        config.backends.store += "?target_session_attrs=read-write";
        assert!(config.store_backend().is_ok());
    }

    #[test]
    fn cluster_urls_need_a_seed() {
        let mut config = Config::default();
        config.backends.gate = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001".into();
        assert!(config.gate_backend().is_ok());
        config.backends.gate = "redis+cluster:///0".into();
        let err = config.gate_backend().unwrap_err().to_string();
        assert!(
            err.contains("backends.gate") && err.contains("no seed"),
            "{err}"
        );
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

        for (ratio, endpoint, key) in [
            (1.5, "", "telemetry.sampling_ratio"),
            (-0.1, "", "telemetry.sampling_ratio"),
            (0.5, "otel:4317", "telemetry.otlp_endpoint"),
        ] {
            let mut config = Config::default();
            config.telemetry.sampling_ratio = ratio;
            config.telemetry.otlp_endpoint = endpoint.into();
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
        }
        let mut config = Config::default();
        config.telemetry.otlp_endpoint = "http://otel:4317".into();
        config.telemetry.sampling_ratio = 0.0;
        config.validate().unwrap();
    }

    #[test]
    fn rabbitmq_bounds_name_the_key() {
        let rabbit = || {
            let mut config = Config::default();
            config.backends.queue = "amqp://guest:guest@127.0.0.1:5672/%2f".into();
            config.backends.store = "postgres://postgres@127.0.0.1:5432/sg".into();
            config
        };
        rabbit().validate().unwrap();
        let most = crate::queue::MAX_PARTITIONS;
        type Change = fn(&mut Config);
        let cases: [(&str, Change); 8] = [
            ("rabbitmq.partitions", |c| c.rabbitmq.partitions = 0),
            ("rabbitmq.partitions", |c| {
                c.rabbitmq.partitions = crate::queue::MAX_PARTITIONS + 1
            }),
            ("rabbitmq.lease_poll_ms", |c| c.rabbitmq.lease_poll_ms = 0),
            ("rabbitmq.publish_batch_max", |c| {
                c.rabbitmq.publish_batch_max = 0
            }),
            ("rabbitmq.publish_batch_max", |c| {
                c.rabbitmq.publish_batch_max = crate::queue::PUBLISH_BATCH_MAX + 1
            }),
            ("rabbitmq.queue", |c| c.rabbitmq.queue = "q".repeat(201)),
            ("rabbitmq.prefetch", |c| {
                c.rabbitmq.prefetch = (c.layers.queue.batch_size - 1) as u16
            }),
            ("backends.queue", |c| c.backends.store = EMBEDDED.into()),
        ];
        for (key, change) in cases {
            let mut config = rabbit();
            change(&mut config);
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
        let mut config = rabbit();
        config.rabbitmq.partitions = most;
        config.rabbitmq.lease_poll_ms = 1;
        config.validate().unwrap();
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
        assert_eq!(
            redact_url("redis://r:6379/0?Password=hunter2&protocol=resp3"),
            "redis://r:6379/0?Password=***&protocol=resp3"
        );
        assert_eq!(
            redact_url("postgres://a:b@db/sg?sslmode=require&password=x"),
            "postgres://a:***@db/sg?sslmode=require&password=***"
        );
    }
}
