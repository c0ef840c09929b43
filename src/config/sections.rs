//! The config file's sections, one struct each, with the defaults every
//! field documents; [`super::Config`] holds them and validates them
//! together.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::{DbCheckMode, GateFailureMode, EMBEDDED};

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
    /// Refuse every admin call without the token even when the admin
    /// listener is loopback-only (any process on the host could otherwise
    /// act as an operator). Off by default for local development; the
    /// Kubernetes config turns it on.
    pub require_token: bool,
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
    /// SKUs named in `stockgate_hot_sku_calls` (Reserve calls over the
    /// last 30-60 s), the hottest first; the rest are summed under
    /// `sku="(other)"`. 0 counts nothing.
    pub hot_skus: usize,
}

/// Distributed tracing (OpenTelemetry, OTLP over gRPC). Off unless an
/// endpoint is set; off, no span is made and nothing is sent.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// The OTLP/gRPC collector, e.g. `http://otel-collector:4317`; empty
    /// turns tracing off.
    pub otlp_endpoint: String,
    /// Share of new traces kept, 0.0 to 1.0. A call that arrives with a
    /// `traceparent` follows its caller's sampling decision instead.
    pub sampling_ratio: f64,
    /// `service.name` on every span.
    pub service_name: String,
}

/// TLS for the gRPC listeners (rustls). Both paths empty: plaintext.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert_path: String,
    /// PEM private key.
    pub key_path: String,
    /// PEM certificates of the CA(s) that sign calling services'
    /// certificates. Set: every connection must present a client
    /// certificate that chains to one (mutual TLS). Kubernetes gRPC probes
    /// present none: point them at `server.health_listen`.
    pub client_ca_path: String,
    /// Calling identities let in (mutual TLS only): a certificate's URI SAN
    /// as is (`spiffe://cluster.local/ns/shop/sa/checkout`), a DNS SAN as
    /// `dns:<name>`, or its subject CN as `cn:<name>`. Empty: any
    /// certificate the CA signed. Others get PERMISSION_DENIED
    /// (CALLER_NOT_ALLOWED) on every call but health checks.
    pub allowed_clients: Vec<String>,
    /// Mutual TLS only: while two or more calling services have called
    /// within the last 10 s, each may hold at most this percentage of
    /// `server.max_in_flight` and of the global rate limit
    /// (`layers.rate_limit.global_per_sec` and `global_burst`), so one
    /// service's flood cannot starve the others; past it, RESOURCE_EXHAUSTED
    /// with metadata `scope` "caller". A service calling alone may use the
    /// whole budget. 1 to 100; 100 turns shares off.
    pub caller_share_percent: u32,
    /// Shares for named calling identities (as in `allowed_clients`),
    /// overriding `caller_share_percent`, e.g.
    /// `{ "spiffe://cluster.local/ns/shop/sa/checkout" = 80 }`. Shares may add
    /// up to more than 100: each caps one service, and the whole budget
    /// still caps them all.
    pub caller_shares: std::collections::BTreeMap<String, u32>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            cert_path: String::new(),
            key_path: String::new(),
            client_ca_path: String::new(),
            allowed_clients: Vec::new(),
            caller_share_percent: 50,
            caller_shares: Default::default(),
        }
    }
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        !self.cert_path.is_empty() || !self.key_path.is_empty()
    }

    pub fn mutual(&self) -> bool {
        !self.client_ca_path.is_empty()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Address the gRPC server listens on. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// A plaintext listener serving only `grpc.health.v1` (the serving
    /// status, nothing else), for probes that cannot speak TLS, such as the
    /// kubelet's gRPC probes when `server.tls` is on. Empty: none.
    pub health_listen: String,
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
    /// How long an InventoryService call's request message may take to
    /// arrive after its headers, in milliseconds; then DEADLINE_EXCEEDED
    /// (REQUEST_TOO_SLOW). A call takes a load-shedding slot only once its
    /// message is here, so slow senders cannot hold the replica's budget.
    pub body_timeout_ms: u64,
    /// Request bytes being read at once across the replica (calls whose
    /// message has not fully arrived); a message that does not fit is
    /// refused at once with RESOURCE_EXHAUSTED (OVERLOADED). At least
    /// `max_message_bytes` + 5.
    pub max_reading_bytes: usize,
    /// Most client connections a listener holds at once; past it, new
    /// connections wait in the kernel's backlog until one closes. Keep it
    /// well below the process's open-file limit (the accept loop also backs
    /// off when the limit is hit anyway, rather than spin).
    pub max_connections: usize,
    /// A new connection must send its opening bytes (the HTTP/2 preface)
    /// within this many milliseconds, or is closed; with TLS the whole
    /// handshake must end within it too.
    pub handshake_timeout_ms: u64,
    /// HTTP/2 PING period on idle connections, in milliseconds (0 = off);
    /// a peer that does not answer within `http2_keepalive_timeout_ms` is
    /// dropped, so dead clients do not hold connections and streams.
    pub http2_keepalive_interval_ms: u64,
    pub http2_keepalive_timeout_ms: u64,
    /// TCP keepalive on accepted connections, in seconds (0 = off).
    pub tcp_keepalive_secs: u64,
    /// A connection older than this (milliseconds, 0 = no limit) is told to
    /// go away (HTTP/2 GOAWAY); calls on it finish, and it is cut
    /// `max_connection_age_grace_ms` later whatever still runs on it.
    /// Clients then reconnect, through the load balancer: this is how
    /// callers holding long-lived connections reach replicas the autoscaler
    /// added. Set it above the longest WatchReservation you expect, or
    /// expect watches to be re-opened.
    pub max_connection_age_ms: u64,
    pub max_connection_age_grace_ms: u64,
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
    /// PostgreSQL store). A cluster's nodes are listed in one URL,
    /// `amqp://user:pass@host:port,host:port/vhost`: each connection goes
    /// to the first that answers, from the one that answered last.
    pub queue: String,
    /// `embedded` (each replica limits on its own) or a `redis://` URL: the
    /// rate limits then hold across every replica sharing it (one GCRA
    /// script per call that passes the replica's own limits; keys
    /// `<redis.key_prefix>:rl:…`).
    pub rate_limit: String,
    /// Files holding a backend's whole URL (a mounted Secret), read at
    /// start-up; each wins over the URL key of the same name. Restart to
    /// change.
    pub store_file: String,
    pub gate_file: String,
    pub dedup_file: String,
    pub queue_file: String,
    pub rate_limit_file: String,
    /// Files holding a backend's password (a mounted Secret), put into its
    /// URL in place of any password there; surrounding whitespace is
    /// ignored. Re-read on SIGHUP: new connections use the new password,
    /// and Redis re-authenticates its open ones, so a rotation needs no
    /// restart (keep the old password valid until every replica reloaded).
    pub store_password_file: String,
    pub gate_password_file: String,
    pub dedup_password_file: String,
    pub queue_password_file: String,
    pub rate_limit_password_file: String,
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
    /// PEM certificates of the CA(s) that sign the PostgreSQL server's
    /// certificate; empty: the system's roots. Used when the store URL asks
    /// for TLS (`sslmode=require`, `verify-ca` or `verify-full`): the
    /// server's certificate and host name are always verified (as
    /// `verify-full`). Without `sslmode` the connection is plaintext.
    pub tls_ca_file: String,
    /// A client certificate chain and its key (PEM) to present, for servers
    /// that require one; both or neither.
    pub tls_cert_file: String,
    pub tls_key_file: String,
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
    /// proto, e.g. `["Reserve", "ConfirmReservation"]`). Only Reserve and
    /// ReserveCart by default: a buyer's reserve → watch → confirm must not spend the
    /// budget meant for competing for stock. A method not listed is never
    /// counted nor refused by this layer.
    pub methods: Vec<String>,
    /// Most users whose budget is kept at once (about 250 bytes each). Past
    /// it, users whose budget is full again are forgotten at once, and if
    /// that is not enough every per-user budget starts over (the global
    /// budget stays): a flood of unique user ids costs bounded memory.
    pub max_tracked_users: usize,
}

/// InventoryService's methods, as `layers.rate_limit.methods` names them.
pub const INVENTORY_METHODS: [&str; 7] = [
    "Reserve",
    "GetReservation",
    "ConfirmReservation",
    "ReleaseReservation",
    "ExtendReservation",
    "WatchReservation",
    "ReserveCart",
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
            methods: vec!["Reserve".into(), "ReserveCart".into()],
            max_tracked_users: 100_000,
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
    /// Most memory the in-process store (no `backends.dedup`) gives its
    /// records, in bytes. When full, expired records are dropped; if it is
    /// still full, a call runs without dedup (the database still keeps one
    /// order per user and key). A record is at most about 4.5 KiB (answers
    /// larger than 4 KiB are not kept), a typical one about 0.8 KiB.
    pub memory_max_bytes: usize,
}

impl Default for DedupLayerConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl_secs: 24 * 3600,
            wait_ms: 5_000,
            memory_max_bytes: 64 * 1024 * 1024,
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
    /// PEM certificates of the CA(s) that sign the Redis servers'
    /// certificates (gate and dedup); empty: the system's roots. Used for
    /// `rediss://` URLs, whose server certificate and host name are always
    /// verified; `redis://` is plaintext.
    pub tls_ca_file: String,
    /// A client certificate chain and its key (PEM), for servers started
    /// with `tls-auth-clients yes`; both or neither.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueLayerConfig {
    /// Whether admitted reservations go through the queue (true) or are
    /// committed to the database in the request path (false).
    pub enabled: bool,
    /// Most orders the processor commits in one transaction. A RabbitMQ
    /// message is taken whole, so a batch can exceed it by up to
    /// `rabbitmq.publish_batch_max - 1` orders.
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
    /// API replicas which reservations were processed is `<queue>.settled`.
    pub queue: String,
    /// Most time Reserve waits for the broker to confirm a message, in
    /// milliseconds; past it the reservation is rolled back (UNAVAILABLE).
    /// The whole publish, waiting for its batch and the ticket statement
    /// included, is bounded by twice this plus 2 s per listed broker.
    pub publish_timeout_ms: u64,
    /// Most orders one message carries. Reserve calls waiting at a moment
    /// are published together, numbered by one statement and confirmed
    /// once, which spares the broker most of its per-message work. 1
    /// publishes each order alone, as versions without batching did (a
    /// rolling upgrade keeps it at 1 until every processor reads batches).
    pub publish_batch_max: usize,
    /// Most unacknowledged messages the processor holds; at least
    /// `layers.queue.batch_size` so a batch can fill.
    pub prefetch: u16,
    /// Pause between reconnection attempts after the broker was lost, in
    /// milliseconds.
    pub reconnect_delay_ms: u64,
    /// Order queues (1 to 64). 1: the one queue `<queue>`. Above 1: the
    /// quorum queues `<queue>.p0` to `<queue>.p<N-1>`, each SKU's orders in
    /// one of them (a hash of the SKU), each consumed by one processor at a
    /// time; running processors share the partitions out between them
    /// through leases in PostgreSQL. Every replica of a deployment must
    /// use the same number; `<queue>` itself is still drained (the move
    /// from one queue, `docs/runbook.md`).
    pub partitions: u16,
    /// How often a processor looks at the partition leases (takes a free
    /// one, gives one up when others joined), in milliseconds: how long a
    /// dead processor's partitions wait for another once PostgreSQL has
    /// ended its session (at once for a crashed process, about 11 s for
    /// one gone silent).
    pub lease_poll_ms: u64,
    /// PEM certificates of the CA(s) that sign the broker's certificate,
    /// trusted besides the system's roots. Used for `amqps://` URLs, whose
    /// server certificate and host name are always verified; `amqp://` is
    /// plaintext.
    pub tls_ca_file: String,
    /// A client certificate chain and its key (PEM), for brokers that
    /// require one (`ssl_options.fail_if_no_peer_cert`); both or neither.
    pub tls_cert_file: String,
    pub tls_key_file: String,
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
    /// Most units one Reserve call may ask for (and one line of a cart).
    pub max_quantity: u32,
    /// Most lines one ReserveCart call may ask for (1 to 100): a cart's
    /// lines are decided one gate call each and committed in one
    /// transaction, so this bounds what one call may cost.
    pub max_cart_lines: u32,
    /// How long a hold lasts before it expires and its units return to
    /// stock, in seconds. 0 = holds never expire.
    pub hold_ttl_secs: u64,
    /// Longest a hold may last in all, from when it became HELD, once
    /// extended (ExtendReservation), in seconds; at least `hold_ttl_secs`.
    /// 0: three times `hold_ttl_secs` (unbounded where holds never expire).
    pub max_hold_secs: u64,
    /// How often the expiry sweeper looks for lapsed holds, in milliseconds.
    pub sweep_interval_ms: u64,
    /// Waiting entries a SKU with the `waitlist` sold-out policy takes at
    /// once, unless the SKU sets its own limit (`SetSoldOutPolicy`).
    pub waitlist_max: u32,
    /// How long a waitlist entry waits for units before it expires, in
    /// seconds.
    pub waitlist_ttl_secs: u64,
    /// Most WatchReservation streams open at once on a replica; beyond,
    /// RESOURCE_EXHAUSTED (TOO_MANY_WATCHES). Each costs a task-free
    /// receiver; the reservations they watch cost one reader each.
    pub max_watches: usize,
    /// Most WatchReservation streams one user (`x-user-id`) keeps open at
    /// once on a replica.
    pub max_watches_per_user: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            health_listen: String::new(),
            max_message_bytes: 64 * 1024,
            max_concurrent_streams: 100,
            request_timeout_ms: 5_000,
            max_in_flight: 4_096,
            shutdown_grace_ms: 10_000,
            role: Role::All,
            tls: TlsConfig::default(),
            body_timeout_ms: 2_000,
            max_reading_bytes: 64 * 1024 * 1024,
            max_connections: 10_000,
            handshake_timeout_ms: 5_000,
            http2_keepalive_interval_ms: 30_000,
            http2_keepalive_timeout_ms: 10_000,
            tcp_keepalive_secs: 60,
            max_connection_age_ms: 300_000,
            max_connection_age_grace_ms: 30_000,
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            token: String::new(),
            token_file: String::new(),
            require_token: false,
            listen: String::new(),
            switch_poll_ms: 1_000,
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:9464".into(),
            hot_skus: 10,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: String::new(),
            sampling_ratio: 1.0,
            service_name: "stockgate".into(),
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
            rate_limit: EMBEDDED.into(),
            store_file: String::new(),
            gate_file: String::new(),
            dedup_file: String::new(),
            queue_file: String::new(),
            rate_limit_file: String::new(),
            store_password_file: String::new(),
            gate_password_file: String::new(),
            dedup_password_file: String::new(),
            queue_password_file: String::new(),
            rate_limit_password_file: String::new(),
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
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
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
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
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
            publish_batch_max: 64,
            prefetch: 512,
            reconnect_delay_ms: 500,
            partitions: 1,
            lease_poll_ms: 1_000,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
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

impl ReservationsConfig {
    /// `max_hold_secs` in force, 0 resolved, at most `u32::MAX` (the
    /// largest `hold_seconds` a caller can ask for).
    pub fn max_hold_secs(&self) -> u64 {
        let secs = match (self.max_hold_secs, self.hold_ttl_secs) {
            (0, 0) => u64::MAX,
            (0, ttl) => ttl.saturating_mul(3),
            (secs, _) => secs,
        };
        secs.min(u64::from(u32::MAX))
    }
}

impl Default for ReservationsConfig {
    fn default() -> Self {
        Self {
            max_quantity: 10,
            max_cart_lines: 20,
            hold_ttl_secs: 600,
            max_hold_secs: 0,
            sweep_interval_ms: 1_000,
            waitlist_max: 10_000,
            waitlist_ttl_secs: 900,
            max_watches: 10_000,
            max_watches_per_user: 8,
        }
    }
}

macro_rules! tls_files {
    ($($section:ty => $name:literal),*) => {$(
        impl $section {
            /// This section's `tls_*` keys.
            pub fn tls_files(&self) -> crate::tls::TlsFiles<'_> {
                crate::tls::TlsFiles {
                    section: $name,
                    ca_file: &self.tls_ca_file,
                    cert_file: &self.tls_cert_file,
                    key_file: &self.tls_key_file,
                }
            }
        }
    )*};
}

tls_files!(StoreConfig => "store", RedisConfig => "redis", RabbitConfig => "rabbitmq");
