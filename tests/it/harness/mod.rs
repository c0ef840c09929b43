//! Starts the real server through `stockgate::run` on 127.0.0.1:0 with
//! isolated resources per test: its own SQLite file (embedded profile) or
//! its own PostgreSQL database, created here and dropped afterwards.

use std::{collections::HashMap, sync::Arc, time::Duration};

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use futures::future::join_all;
use stockgate::{
    config::{Config, DbCheckMode},
    pb::{
        admin_service_client::AdminServiceClient, inventory_service_client::InventoryServiceClient,
        ReserveOutcome, ReserveRequest, ReserveResponse, SetLayersRequest, SetStockRequest,
        StockView,
    },
};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    transport::{Channel, Endpoint},
    Code, Request, Status,
};
use tonic_health::pb::{
    health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest,
};

/// Where the test PostgreSQL lives; trust auth on this machine kind.
pub fn pg_admin_url() -> String {
    std::env::var("STOCKGATE_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// SQLite, embedded gate and queue: `stockgate serve` with no config.
    Embedded,
    /// A real PostgreSQL database of the test's own.
    Postgres,
    /// PostgreSQL plus the Redis gate under a key prefix of the test's own.
    Redis,
    /// PostgreSQL, the Redis gate and the RabbitMQ queue, with a queue
    /// name of the test's own (deleted when the test stops the app).
    Rabbit,
    /// PostgreSQL plus the gate and the dedup store on the run's Redis
    /// Cluster ([`redis_cluster_url`]), under a key prefix of the test's own.
    RedisCluster,
    /// As [`Profile::Rabbit`], the queue on the run's three-node RabbitMQ
    /// cluster ([`replicated::rabbit_cluster`]).
    RabbitCluster,
}

pub mod replicated;

/// One test stops and starts the shared broker. Every test process that
/// uses the broker holds a shared lock on one file from its first use to
/// its exit (nextest runs each test in a process of its own), and that test
/// holds the lock exclusively, so no other test sees the broker go away,
/// whatever group or name it has.
static BROKER_LOCK: std::sync::OnceLock<(std::fs::File, bool)> = std::sync::OnceLock::new();

/// Whether this process holds the broker exclusively.
fn hold_broker(exclusive: bool) -> bool {
    BROKER_LOCK
        .get_or_init(|| {
            let path = std::env::temp_dir().join("stockgate-it-shared-broker.lock");
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let mode = if exclusive {
                rustix::fs::FlockOperation::LockExclusive
            } else {
                rustix::fs::FlockOperation::LockShared
            };
            rustix::fs::flock(&file, mode)
                .unwrap_or_else(|e| panic!("lock {}: {e}", path.display()));
            (file, exclusive)
        })
        .1
}

/// Waits until no other test process uses the shared broker, and keeps it
/// so until this process exits. Call it before anything else in the test
/// touches the broker.
pub fn own_shared_broker() {
    assert!(
        hold_broker(true),
        "own_shared_broker called after this test already used the broker"
    );
}

/// Keeps the shared broker up for this test (a shared hold, see
/// [`BROKER_LOCK`]); [`amqp_url`] takes it, so only a test that reaches the
/// broker some other way first (`rabbitmqctl`) needs to call this.
pub fn use_shared_broker() {
    hold_broker(false);
}

pub fn amqp_url() -> String {
    use_shared_broker();
    std::env::var("STOCKGATE_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub async fn amqp_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("RabbitMQ on 127.0.0.1:5672 (start it with .ci/run's service step)");
    let channel = conn.create_channel().await.unwrap();
    (conn, channel)
}

/// Publishes `body` to `queue` as a producer we did not write would, and
/// waits for the broker's confirm.
pub async fn publish(queue: &str, body: &[u8], properties: lapin::BasicProperties) {
    let (_conn, channel) = amqp_channel().await;
    channel.confirm_select(Default::default()).await.unwrap();
    channel
        .basic_publish(
            "".into(),
            queue.into(),
            Default::default(),
            body,
            properties,
        )
        .await
        .unwrap()
        .await
        .unwrap();
}

/// Messages ready in a queue, as the broker counts them.
pub async fn queue_depth(queue: &str) -> u32 {
    let (_conn, channel) = amqp_channel().await;
    channel
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap()
        .message_count()
}

/// Deletes a test's queues and exchange.
pub async fn delete_rabbit(config: &Config) {
    // As guest, who may do so (a test's own broker user may be gone):
    // on the run's cluster when the queue lives there.
    let broker = if config.backends.queue.contains(',') {
        config.backends.queue.clone()
    } else {
        amqp_url()
    };
    stockgate::queue::delete_topology(&broker, &config.rabbitmq.queue, config.rabbitmq.partitions)
        .await;
}

/// The workspace root: the tests belong to `tools/` (the package that
/// builds the binary), the files they read (proto, clients, k8s) live here.
pub const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");

pub fn redis_url() -> String {
    std::env::var("STOCKGATE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The run's Redis Cluster: three masters and three replicas on loopback,
/// started once per run by nextest's setup script (`ci/redis-cluster`, for
/// tests with "cluster" in their name) or, run otherwise, by this process
/// for itself. Either is stopped and removed when its owner exits.
pub fn redis_cluster() -> &'static RedisCluster {
    static CLUSTER: std::sync::OnceLock<RedisCluster> = std::sync::OnceLock::new();
    CLUSTER.get_or_init(|| {
        match (
            std::env::var("STOCKGATE_TEST_REDIS_CLUSTER"),
            std::env::var("STOCKGATE_TEST_REDIS_CLUSTER_DIR"),
        ) {
            (Ok(url), Ok(dir)) => RedisCluster {
                url,
                dir: dir.into(),
            },
            _ => RedisCluster::start(5_000),
        }
    })
}

pub fn redis_cluster_url() -> String {
    redis_cluster().url.clone()
}

/// A running test cluster: its `redis+cluster://` URL and the directory
/// holding its ports and one pid file per node.
pub struct RedisCluster {
    pub url: String,
    pub dir: std::path::PathBuf,
}

impl RedisCluster {
    /// A cluster of this test's own (for tests that kill its nodes), gone
    /// when the test process exits; a master that does not answer for
    /// `node_timeout_ms` is failed over.
    pub fn start(node_timeout_ms: u64) -> Self {
        Self::start_with(node_timeout_ms, &[])
    }

    /// As [`RedisCluster::start`], with `ci/redis-cluster`'s options
    /// (`--tls DIR`, `--password PW`).
    pub fn start_with(node_timeout_ms: u64, options: &[&str]) -> Self {
        let node_timeout = node_timeout_ms.to_string();
        let mut args = vec![node_timeout.as_str()];
        args.extend_from_slice(options);
        let var = setup_script("redis-cluster", &args);
        Self {
            url: var("STOCKGATE_TEST_REDIS_CLUSTER"),
            dir: var("STOCKGATE_TEST_REDIS_CLUSTER_DIR").into(),
        }
    }

    /// The ports of the masters now.
    pub async fn masters(&self) -> Vec<u16> {
        let mut masters = Vec::new();
        for port in self.ports() {
            let Some(mut conn) = self.try_node(port).await else {
                continue;
            };
            let role: Result<Vec<redis::Value>, _> =
                redis::cmd("ROLE").query_async(&mut conn).await;
            if matches!(role.as_deref(), Ok([redis::Value::BulkString(r), ..]) if r == b"master") {
                masters.push(port);
            }
        }
        masters
    }

    /// The port of the master serving `key`'s hash slot now.
    pub async fn master_of(&self, key: &str) -> u16 {
        let masters = self.masters().await;
        let mut conn = self.node(masters[0]).await;
        let slot: i64 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(key)
            .query_async(&mut conn)
            .await
            .unwrap();
        let nodes: String = redis::cmd("CLUSTER")
            .arg("NODES")
            .query_async(&mut conn)
            .await
            .unwrap();
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            if !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| {
                let (low, high) = range.split_once('-').unwrap_or((range, range));
                match (low.parse::<i64>(), high.parse::<i64>()) {
                    (Ok(low), Ok(high)) => (low..=high).contains(&slot),
                    _ => false,
                }
            });
            if serves {
                let addr = fields[1].split('@').next().unwrap();
                return addr.rsplit(':').next().unwrap().parse().unwrap();
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// SIGKILLs the node on `port`.
    pub fn kill(&self, port: u16) {
        let pid = std::fs::read_to_string(self.dir.join(format!("{port}.pid"))).unwrap();
        let status = std::process::Command::new("kill")
            .args(["-9", pid.trim()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Starts the node on `port` again with its settings and cluster
    /// state: it rejoins, as a replica if its slots were failed over.
    pub fn restart(&self, port: u16) {
        let status = std::process::Command::new("redis-server")
            .arg(self.dir.join(port.to_string()).join("redis.conf"))
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits until a replica has taken over from the dead master on
    /// `victim` and the cluster is up again.
    pub async fn wait_failed_over(&self, victim: u16, within: std::time::Duration) {
        let start = std::time::Instant::now();
        loop {
            let masters = self.masters().await;
            if masters.len() == 3 && !masters.contains(&victim) {
                break;
            }
            assert!(
                start.elapsed() < within,
                "no replica took over within {within:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        self.wait_healthy(within.saturating_sub(start.elapsed()))
            .await;
    }

    /// Waits until every node that answers reports the cluster up with
    /// all slots served.
    pub async fn wait_healthy(&self, within: std::time::Duration) {
        let start = std::time::Instant::now();
        'poll: loop {
            assert!(
                start.elapsed() < within,
                "the cluster did not heal within {within:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            for port in self.ports() {
                let Some(mut conn) = self.try_node(port).await else {
                    continue;
                };
                let info: String = match redis::cmd("CLUSTER")
                    .arg("INFO")
                    .query_async(&mut conn)
                    .await
                {
                    Ok(info) => info,
                    Err(_) => continue 'poll,
                };
                if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                    continue 'poll;
                }
            }
            return;
        }
    }

    /// The six nodes' ports.
    pub fn ports(&self) -> Vec<u16> {
        std::fs::read_to_string(self.dir.join("ports"))
            .unwrap()
            .lines()
            .map(|port| port.parse().unwrap())
            .collect()
    }

    /// A client to one node (not cluster-aware), for inspecting it.
    pub async fn node(&self, port: u16) -> redis::aio::MultiplexedConnection {
        self.try_node(port).await.expect("the node answers")
    }

    /// The same, or `None` when the node is down.
    async fn try_node(&self, port: u16) -> Option<redis::aio::MultiplexedConnection> {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()
    }
}

/// Runs `ci/<script> <this process's pid> <args>`, which starts servers
/// that live until this process exits, and gives the `NAME=value` lines
/// it prints, by name.
pub fn setup_script(script: &str, args: &[&str]) -> impl Fn(&str) -> String {
    let path = format!("{}/../ci/{script}", env!("CARGO_MANIFEST_DIR"));
    let out = std::process::Command::new(&path)
        .arg(std::process::id().to_string())
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("ci/{script} runs: {e}"));
    assert!(
        out.status.success(),
        "ci/{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = String::from_utf8(out.stdout).unwrap();
    let script = script.to_owned();
    move |name: &str| {
        out.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("{name} from ci/{script}"))
            .to_owned()
    }
}

/// Deletes every key under `prefix`: what a Redis restart or FLUSHALL does
/// to this test, without touching the keys of tests running beside it.
pub async fn wipe_redis_prefix(prefix: &str) {
    stockgate_tools::bench::cleanup(&redis_url(), prefix)
        .await
        .unwrap();
}

/// A database of one test's own, dropped when the test ends: by
/// [`TestDb::drop_now`] (as [`TestApp::stop`] does), or else when the value
/// is dropped, so a test that never stops its app, or fails, leaves no
/// database behind on a machine whose runs add up.
pub struct TestDb {
    pub name: String,
    pub url: String,
    dropped: std::sync::atomic::AtomicBool,
}

impl TestDb {
    pub async fn create() -> Self {
        Self::create_with("").await
    }

    /// With `options` after `CREATE DATABASE name` (a collation, say).
    pub async fn create_with(options: &str) -> Self {
        let name = format!("sg_it_{}", uuid::Uuid::now_v7().simple());
        let mut admin = AsyncPgConnection::establish(&format!("{}/postgres", pg_admin_url()))
            .await
            .expect("PostgreSQL on 127.0.0.1:5432 (start it with .ci/run's service step)");
        admin
            .batch_execute(&format!("CREATE DATABASE {name} {options}"))
            .await
            .unwrap();
        let url = format!("{}/{name}", pg_admin_url());
        Self {
            name,
            url,
            dropped: std::sync::atomic::AtomicBool::new(false),
        }
    }

    fn drop_statement(&self) -> String {
        format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)
    }

    pub async fn drop_now(&self) {
        if let Ok(mut admin) =
            AsyncPgConnection::establish(&format!("{}/postgres", pg_admin_url())).await
        {
            let dropped = admin.batch_execute(&self.drop_statement()).await;
            if dropped.is_ok() {
                self.dropped
                    .store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.dropped.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        // Drop may run inside the test's runtime, where nothing can be
        // awaited: psql, as `psql_number` runs it.
        let _ = std::process::Command::new("psql")
            .arg(format!("{}/postgres", pg_admin_url()))
            .args(["-qc", &self.drop_statement()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// `figure` of `database`'s row in `pg_stat_database`: PostgreSQL's own
/// statistics, read from outside the service.
pub fn database_stat(database: &str, figure: &str) -> i64 {
    psql_number(&format!(
        "SELECT {figure} FROM pg_stat_database WHERE datname = '{database}'"
    ))
}

/// The one number `sql` answers, asked as the administrator through psql
/// (from outside the service's sessions and their snapshots).
fn psql_number(sql: &str) -> i64 {
    let out = std::process::Command::new("psql")
        .arg(format!("{}/postgres", pg_admin_url()))
        .args(["-tAc", sql])
        .output()
        .expect("psql runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("psql said {out:?}"))
}

pub struct TestApp {
    pub addr: std::net::SocketAddr,
    /// AdminService's own listener, when the config asked for one
    /// (`admin.listen = "127.0.0.1:0"`).
    pub admin_addr: Option<std::net::SocketAddr>,
    /// The `/metrics` listener, when `metrics.listen = "127.0.0.1:0"`.
    pub metrics_addr: Option<std::net::SocketAddr>,
    pub config: Config,
    channel: Channel,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<anyhow::Result<()>>>,
    pub db: Option<TestDb>,
    _dir: tempfile::TempDir,
}

/// Config for a profile; tests adjust it further.
pub async fn config_for(profile: Profile) -> (Config, Option<TestDb>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    // Storms queue many calls client-side; don't let the server cap them.
    config.server.request_timeout_ms = 60_000;
    config.layers.gate.in_flight_timeout_ms = 120_000;
    config.server.shutdown_grace_ms = 5_000;
    config.store.sqlite_path = dir.path().join("stockgate.db").display().to_string();
    config.reservations.sweep_interval_ms = 100;
    // Tests that scrape metrics ask for a listener of their own.
    config.metrics.listen = String::new();
    let db = match profile {
        Profile::Embedded => None,
        Profile::Postgres
        | Profile::Redis
        | Profile::Rabbit
        | Profile::RedisCluster
        | Profile::RabbitCluster => {
            let db = TestDb::create().await;
            config.backends.store = db.url.clone();
            config.store.max_connections = 8;
            Some(db)
        }
    };
    let redis = match profile {
        Profile::Redis | Profile::Rabbit | Profile::RabbitCluster => Some(redis_url()),
        Profile::RedisCluster => Some(redis_cluster_url()),
        Profile::Embedded | Profile::Postgres => None,
    };
    if let Some(url) = redis {
        if profile == Profile::RedisCluster {
            config.backends.dedup = url.clone();
        }
        config.backends.gate = url;
        config.redis.key_prefix = format!("sg-it-{}", uuid::Uuid::now_v7().simple());
        // The suite runs storms side by side on two cores; these tests are
        // about correctness, so a slow Redis answer must not count as down.
        config.redis.response_timeout_ms = 5_000;
    }
    if matches!(profile, Profile::Rabbit | Profile::RabbitCluster) {
        config.backends.queue = match profile {
            Profile::RabbitCluster => replicated::rabbit_cluster().url.clone(),
            _ => amqp_url(),
        };
        config.rabbitmq.queue = format!("sg-it-{}", uuid::Uuid::now_v7().simple());
    }
    (config, db, dir)
}

impl TestApp {
    pub async fn spawn(profile: Profile) -> Self {
        Self::spawn_with(profile, |_| {}).await
    }

    pub async fn spawn_with(profile: Profile, tweak: impl FnOnce(&mut Config)) -> Self {
        let (mut config, db, dir) = config_for(profile).await;
        tweak(&mut config);
        let app = Self::start(config, db, dir).await;
        app.wait_serving().await;
        app
    }

    /// Starts without waiting for readiness.
    pub async fn start(config: Config, db: Option<TestDb>, dir: tempfile::TempDir) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener, config, db, dir).await
    }

    /// As [`Self::spawn_with`], deciding Reserve calls by `clock`.
    pub async fn spawn_clocked(
        profile: Profile,
        clock: stockgate::domain::Clock,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let (mut config, db, dir) = config_for(profile).await;
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = Self::start_clocked(listener, config, db, dir, clock).await;
        app.wait_serving().await;
        app
    }

    /// Starts on `listener` (an address of the test's choosing), without
    /// waiting for readiness.
    pub async fn start_on(
        listener: TcpListener,
        config: Config,
        db: Option<TestDb>,
        dir: tempfile::TempDir,
    ) -> Self {
        Self::start_clocked(listener, config, db, dir, Default::default()).await
    }

    async fn start_clocked(
        listener: TcpListener,
        config: Config,
        db: Option<TestDb>,
        dir: tempfile::TempDir,
        clock: stockgate::domain::Clock,
    ) -> Self {
        // A config the server would refuse shows here, not as "connection
        // refused" later.
        config.validate().expect("test config must be valid");
        // Server logs only when asked for (RUST_LOG=...), to keep runs quiet.
        if std::env::var_os("RUST_LOG").is_some() {
            let _ = stockgate::telemetry::init(&config.log, &Default::default());
        }
        let addr = listener.local_addr().unwrap();
        let bind = |wanted: Option<std::net::SocketAddr>| async move {
            match wanted {
                Some(wanted) => Some(TcpListener::bind(wanted).await.unwrap()),
                None => None,
            }
        };
        let admin = bind(config.admin_listen().unwrap()).await;
        let metrics = bind(config.metrics_listen().unwrap()).await;
        let admin_addr = admin.as_ref().map(|l| l.local_addr().unwrap());
        let metrics_addr = metrics.as_ref().map(|l| l.local_addr().unwrap());
        let (tx, rx) = oneshot::channel::<()>();
        let extras = stockgate::server::Extras {
            admin,
            metrics,
            reloads: None,
            clock,
        };
        let handle = tokio::spawn(stockgate::server::run_with(
            config.clone(),
            listener,
            extras,
            async move {
                let _ = rx.await;
            },
        ));
        let channel = connect(addr).await;
        Self {
            addr,
            admin_addr,
            metrics_addr,
            config,
            channel,
            shutdown: Some(tx),
            handle: Some(handle),
            db,
            _dir: dir,
        }
    }

    pub fn inventory(&self) -> InventoryServiceClient<Channel> {
        InventoryServiceClient::new(self.channel.clone())
    }

    pub fn admin(&self) -> AdminServiceClient<Channel> {
        AdminServiceClient::new(self.channel.clone())
    }

    pub async fn health(&self) -> ServingStatus {
        let response = HealthClient::new(self.channel.clone())
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap();
        ServingStatus::try_from(response.into_inner().status).unwrap()
    }

    pub async fn wait_serving(&self) {
        assert!(
            health_answers(self.channel.clone(), true).await,
            "server did not become SERVING within 20 s"
        );
    }

    /// Graceful stop; the server must exit cleanly.
    pub async fn stop(mut self) {
        self.stop_server().await;
        // The app that owns the database owns the test's queues and Redis
        // keys too. The keys would otherwise outlive the test by their TTL
        // (a week for reservation records): a storm leaves tens of
        // thousands on the machine's Redis, and runs add up.
        if let Some(db) = &self.db {
            db.drop_now().await;
            if self.config.backends.queue.starts_with("amqp") {
                delete_rabbit(&self.config).await;
            }
            let backends = &self.config.backends;
            let mut redis: Vec<&str> = [&backends.gate, &backends.dedup, &backends.rate_limit]
                .into_iter()
                .filter(|url| url.starts_with("redis"))
                .map(String::as_str)
                .collect();
            redis.dedup();
            for url in redis {
                let prefix = &self.config.redis.key_prefix;
                if let Err(err) = stockgate_tools::bench::cleanup(url, prefix).await {
                    eprintln!("could not remove the keys under {prefix}: {err:#}");
                }
            }
        }
    }

    /// Stops the server but keeps its database for inspection.
    pub async fn stop_server(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(handle) = self.handle.take() {
            handle.await.unwrap().unwrap();
        }
    }

    /// One unit of `sku` for `user`, with idempotency key `key` if any.
    pub async fn reserve_as(
        &self,
        sku: &str,
        user: &str,
        key: Option<&str>,
    ) -> stockgate::pb::ReserveResponse {
        let request = ReserveRequest {
            sku: sku.into(),
            quantity: 1,
            ..Default::default()
        };
        self.inventory()
            .reserve(with_user(request, user, key))
            .await
            .unwrap()
            .into_inner()
    }

    /// Calls as `user` for one unit of `sku` every 10 ms until admitted,
    /// hearing only SOLD_OUT meanwhile; fails after `within`.
    pub async fn admits_within(&self, sku: &str, user: &str, within: Duration) {
        let start = std::time::Instant::now();
        loop {
            let outcome = self.reserve_as(sku, user, None).await.outcome();
            if is_admitted(outcome) {
                return;
            }
            assert_eq!(outcome, ReserveOutcome::SoldOut);
            assert!(
                start.elapsed() < within,
                "{sku} still sold out for {user} after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Adds `delta` units to `sku` through AdjustStock.
    pub async fn restock(&self, sku: &str, delta: i64) {
        self.admin()
            .adjust_stock(stockgate::pb::AdjustStockRequest {
                sku: sku.into(),
                delta,
            })
            .await
            .unwrap();
    }

    pub async fn set_stock(&self, sku: &str, stock: i64, max_per_user: u32) -> StockView {
        self.admin()
            .set_stock(SetStockRequest {
                sku: sku.into(),
                stock,
                max_per_user,
            })
            .await
            .unwrap()
            .into_inner()
            .stock
            .unwrap()
    }

    pub async fn stock(&self, sku: &str) -> StockView {
        self.admin()
            .get_stock(stockgate::pb::GetStockRequest { sku: sku.into() })
            .await
            .unwrap()
            .into_inner()
            .stock
            .unwrap()
    }

    pub async fn set_layers(&self, gate: bool, queue: bool, db_check: DbCheckMode) {
        let mode = match db_check {
            DbCheckMode::Optimistic => stockgate::pb::DbCheckMode::Optimistic,
            DbCheckMode::Pessimistic => stockgate::pb::DbCheckMode::Pessimistic,
            DbCheckMode::Off => stockgate::pb::DbCheckMode::Off,
        };
        self.admin()
            .set_layers(SetLayersRequest {
                gate: Some(gate),
                queue: Some(queue),
                db_check: mode as i32,
                ..Default::default()
            })
            .await
            .unwrap();
    }

    /// Waits until nothing is queued for `sku`.
    pub async fn drain(&self, sku: &str) {
        for _ in 0..600 {
            if self.stock(sku).await.queued_units == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("queue for {sku} did not drain within 30 s");
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(handle) = self.handle.take() {
            handle.abort();
        }
    }
}

pub async fn connect(addr: std::net::SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy()
}

/// A request carrying the caller metadata.
pub fn with_user<T>(body: T, user: &str, key: Option<&str>) -> Request<T> {
    let mut request = Request::new(body);
    request
        .metadata_mut()
        .insert("x-user-id", user.parse().unwrap());
    if let Some(key) = key {
        request
            .metadata_mut()
            .insert("idempotency-key", key.parse().unwrap());
    }
    request
}

pub async fn reserve(
    client: &mut InventoryServiceClient<Channel>,
    sku: &str,
    quantity: u32,
    user: &str,
) -> Result<ReserveResponse, Status> {
    client
        .reserve(with_user(
            ReserveRequest {
                sku: sku.into(),
                quantity,
                ..Default::default()
            },
            user,
            None,
        ))
        .await
        .map(|r| r.into_inner())
}

/// Whether the caller was told it got the units: a hold now, or a place in
/// the queue that ends in a hold or a visible rejection.
pub fn is_admitted(outcome: ReserveOutcome) -> bool {
    matches!(outcome, ReserveOutcome::Reserved | ReserveOutcome::Queued)
}

/// What a storm's callers heard.
#[derive(Debug, Default)]
pub struct StormTally {
    pub outcomes: HashMap<ReserveOutcome, usize>,
    pub errors: HashMap<Code, usize>,
    /// Units granted, by reservation id, as the callers were told.
    pub granted: HashMap<String, u32>,
}

impl StormTally {
    /// Adds `other`'s answers to these.
    pub fn absorb(&mut self, other: StormTally) {
        for (outcome, n) in other.outcomes {
            *self.outcomes.entry(outcome).or_default() += n;
        }
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        self.granted.extend(other.granted);
    }

    pub fn count(&self, outcome: ReserveOutcome) -> usize {
        self.outcomes.get(&outcome).copied().unwrap_or(0)
    }

    pub fn admitted(&self) -> usize {
        self.count(ReserveOutcome::Reserved) + self.count(ReserveOutcome::Queued)
    }
}

/// Fires `buyers` concurrent Reserve calls over `connections` HTTP/2
/// connections; buyer `i` asks for `quantity(i)` units as user `u{i}`.
pub async fn storm(
    addr: std::net::SocketAddr,
    sku: &str,
    buyers: usize,
    connections: usize,
    quantity: impl Fn(usize) -> u32,
) -> StormTally {
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(
            Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect()
                .await
                .unwrap(),
        );
    }
    let start = Arc::new(tokio::sync::Barrier::new(buyers));
    let calls = (0..buyers).map(|i| {
        let mut client = InventoryServiceClient::new(channels[i % connections].clone());
        let sku = sku.to_owned();
        let wanted = quantity(i);
        let start = start.clone();
        tokio::spawn(async move {
            start.wait().await;
            (
                wanted,
                reserve(&mut client, &sku, wanted, &format!("u{i}")).await,
            )
        })
    });
    let mut tally = StormTally::default();
    for result in join_all(calls).await {
        match result.unwrap() {
            (wanted, Ok(response)) => {
                let outcome = response.outcome();
                *tally.outcomes.entry(outcome).or_default() += 1;
                if is_admitted(outcome) {
                    let id = response.reservation.unwrap().reservation_id;
                    assert!(
                        tally.granted.insert(id, wanted).is_none(),
                        "id handed out twice"
                    );
                }
            }
            (_, Err(status)) => {
                if tally.errors.is_empty() {
                    eprintln!("first storm error: {status:?}");
                }
                *tally.errors.entry(status.code()).or_default() += 1
            }
        }
    }
    tally
}

/// The store the server uses, opened beside it for checks.
pub fn open_store(config: &Config) -> stockgate::store::Store {
    stockgate::store::Store::connect(config.store_backend().unwrap(), &config.store).unwrap()
}

/// Checks the database against what the callers were told, after the queue
/// has drained: units ordered never exceed the stock, the stock left is the
/// stock minus the units ordered, every admitted reservation has a row (held
/// or visibly rejected), and no order exists that no caller was told about.
/// Returns the units ordered.
pub async fn assert_invariants(app: &TestApp, sku: &str, initial: i64, tally: &StormTally) -> i64 {
    use stockgate::domain::{ReservationState, Sku};
    let store = open_store(&app.config);
    let sku_id = Sku::parse(sku).unwrap();
    let rows = store.reservations_of(&sku_id).await.unwrap();
    let left = store.inventory(&sku_id).await.unwrap().unwrap().stock;
    let ordered: i64 = rows
        .iter()
        .filter(|r| r.state.holds_units())
        .map(|r| i64::from(r.quantity))
        .sum();
    assert!(
        ordered <= initial,
        "oversold: {ordered} units ordered of {initial}"
    );
    assert_eq!(
        left,
        initial - ordered,
        "stock left != stock - units ordered"
    );
    assert!(left >= 0);
    let lost = lost_in(&rows, tally);
    assert!(lost.is_empty(), "admitted reservations lost: {lost:?}");
    let by_id: HashMap<&str, _> = rows.iter().map(|r| (r.id.as_str(), r)).collect();
    for (id, wanted) in &tally.granted {
        let row = by_id[id.as_str()];
        assert_eq!(row.quantity, *wanted);
        assert!(
            matches!(
                row.state,
                ReservationState::Held | ReservationState::Rejected
            ),
            "unexpected state {:?}",
            row.state
        );
    }
    for row in &rows {
        // A caller told UNAVAILABLE may have left a fence (an order the
        // broker never confirmed, or whose commit lost its answer, stored
        // REJECTED), never an order.
        let fence = row.state == ReservationState::Rejected
            && row.reject_reason.as_deref().is_some_and(|r| {
                r.starts_with(stockgate::reserve::FENCE_REASON)
                    || r.starts_with(stockgate::reserve::COMMIT_FENCE_REASON)
            });
        assert!(
            tally.granted.contains_key(row.id.as_str()) || fence,
            "order {} ({:?}) that no caller was told about",
            row.id.as_str(),
            row.state
        );
    }
    ordered
}

/// The reservations callers were told they got (`tally`) that `sku` has
/// no row for: what the caller-side check calls lost.
pub async fn lost_admissions(app: &TestApp, sku: &str, tally: &StormTally) -> Vec<String> {
    let store = open_store(&app.config);
    let sku = stockgate::domain::Sku::parse(sku).unwrap();
    lost_in(&store.reservations_of(&sku).await.unwrap(), tally)
}

fn lost_in(rows: &[stockgate::domain::Reservation], tally: &StormTally) -> Vec<String> {
    let ids: std::collections::HashSet<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let mut lost: Vec<String> = tally
        .granted
        .keys()
        .filter(|id| !ids.contains(id.as_str()))
        .cloned()
        .collect();
    lost.sort();
    lost
}

macro_rules! by_id_call {
    ($name:ident, $method:ident, $Request:ident, $field:ident) => {
        /// Calls the RPC as `user` and returns the reservation it answers.
        pub async fn $name(
            client: &mut InventoryServiceClient<Channel>,
            id: &str,
            user: &str,
        ) -> Result<stockgate::pb::Reservation, Status> {
            let request = stockgate::pb::$Request {
                reservation_id: id.to_owned(),
            };
            let response = client.$method(with_user(request, user, None)).await?;
            Ok(response
                .into_inner()
                .$field
                .expect("reservation in response"))
        }
    };
}

by_id_call!(
    confirm,
    confirm_reservation,
    ConfirmReservationRequest,
    reservation
);
by_id_call!(
    release,
    release_reservation,
    ReleaseReservationRequest,
    reservation
);
by_id_call!(get, get_reservation, GetReservationRequest, reservation);

/// Another session on a PostgreSQL test's database, inside a transaction
/// that ran `sql` and stays open until [`OpenTransaction::commit`]: the
/// rows it changed and the locks it took are held from the service's
/// sessions meanwhile, as a concurrent caller's would be.
pub struct OpenTransaction {
    session: AsyncPgConnection,
    database: String,
}

impl OpenTransaction {
    pub async fn begin(config: &Config, sql: &str) -> Self {
        let url = &config.backends.store;
        let mut session = AsyncPgConnection::establish(url)
            .await
            .expect("a PostgreSQL profile's database");
        session
            .batch_execute(&format!("BEGIN; {sql}"))
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let path = url.split('?').next().unwrap_or(url);
        let database = path.rsplit('/').next().unwrap_or_default().to_owned();
        Self { session, database }
    }

    /// Waits until `sessions` sessions of the database wait for a lock (a
    /// row's or an advisory one), by PostgreSQL's own `pg_stat_activity`:
    /// the calls a test started have reached the point it holds them at,
    /// however slow the machine.
    pub async fn wait_for_waiters(&self, sessions: i64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let waiting = psql_number(&format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = '{}' AND wait_event_type = 'Lock'",
                self.database
            ));
            if waiting >= sessions {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{waiting} of {sessions} sessions waiting for a lock after 20 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub async fn commit(mut self) {
        self.session.batch_execute("COMMIT").await.unwrap();
    }
}

/// The service's invariant checker agrees, once the queue has drained and
/// the reconciler has had a few passes: polled up to 20 s, then fails with
/// everything it reported.
pub async fn assert_checked(app: &TestApp) {
    let mut last = None;
    for _ in 0..200 {
        let report = app.check().await;
        if report.ok && (report.gate_compared || !app.gate_enabled().await) {
            return;
        }
        last = Some(report);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the invariant checker disagrees: {last:?}");
}

impl TestApp {
    /// The service's invariant checker's report now.
    pub async fn check(&self) -> stockgate::pb::CheckInvariantsResponse {
        self.admin()
            .check_invariants(stockgate::pb::CheckInvariantsRequest::default())
            .await
            .unwrap()
            .into_inner()
    }

    async fn gate_enabled(&self) -> bool {
        self.admin()
            .get_layers(stockgate::pb::GetLayersRequest {})
            .await
            .unwrap()
            .into_inner()
            .layers
            .unwrap()
            .gate
    }
}

/// A port nothing listens on right now, for a server started as a separate
/// process (which binds it itself).
pub fn free_port() -> u16 {
    let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    probe.local_addr().unwrap().port()
}

/// The first line of the log at `path` that names `named`, waiting up to
/// 10 s for the server to write it; fails with the whole log.
pub async fn log_line_naming(path: &std::path::Path, named: &str, what: &str) -> String {
    let mut log = String::new();
    for _ in 0..100 {
        log = std::fs::read_to_string(path).unwrap();
        if let Some(line) = log.lines().find(|line| line.contains(named)) {
            return line.to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: the log never names {named}:\n{log}");
}

/// `binary` from Debian's `package`: the machine's own if on the PATH, or
/// the package downloaded (`apt-get download`) and unpacked (`dpkg -x`)
/// under the test's scratch space, nothing installed.
pub fn debian_binary(package: &str, binary: &str) -> String {
    if std::process::Command::new(binary)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
    {
        return binary.to_owned();
    }
    let target = format!("{}/deb-{package}", env!("CARGO_TARGET_TMPDIR"));
    let path = format!("{target}/usr/bin/{binary}");
    if std::path::Path::new(&path).exists() {
        return path;
    }
    // As python_packages: unpacked aside, then renamed into place.
    let staging = format!("{target}.{}", uuid::Uuid::now_v7().simple());
    std::fs::create_dir_all(&staging).unwrap();
    let download = std::process::Command::new("apt-get")
        .args(["download", "-q", package])
        .current_dir(&staging)
        .status()
        .expect("apt-get runs");
    assert!(download.success(), "apt-get download {package}");
    let deb = std::fs::read_dir(&staging)
        .unwrap()
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .find(|path| path.extension().is_some_and(|e| e == "deb"))
        .expect("a .deb downloaded");
    let unpack = std::process::Command::new("dpkg")
        .args(["-x", deb.to_str().unwrap(), &staging])
        .status()
        .unwrap();
    assert!(unpack.success(), "dpkg -x {}", deb.display());
    if std::fs::rename(&staging, &target).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    assert!(
        std::path::Path::new(&path).exists(),
        "{path} not in {package}"
    );
    path
}

/// A directory under the test's scratch space (nothing outside `target/`
/// is written) where `import` works from python3: the machine's own
/// packages, or `packages` installed there with pip when they lack it.
pub fn python_packages(dir: &str, import: &str, packages: &[&str]) -> String {
    let target = format!("{}/{dir}", env!("CARGO_TARGET_TMPDIR"));
    let importable = |path: &str| {
        std::process::Command::new("python3")
            .args(["-c", &format!("import {import}")])
            .env("PYTHONPATH", path)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !importable(&target) {
        // Tests run as separate processes side by side: each installs into
        // a folder of its own and renames it into place, so no test ever
        // imports from a half-written folder.
        let staging = format!("{target}.{}", uuid::Uuid::now_v7().simple());
        let status = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(["--target", &staging])
            .args(packages)
            .status()
            .expect("python3 runs");
        assert!(status.success(), "pip install {packages:?}");
        if std::fs::rename(&staging, &target).is_err() {
            if importable(&target) {
                // Another test put its copy in place first: use that one.
                let _ = std::fs::remove_dir_all(&staging);
            } else {
                // A broken leftover (an interrupted run): replace it.
                let _ = std::fs::remove_dir_all(&target);
                std::fs::rename(&staging, &target).unwrap();
            }
        }
        assert!(importable(&target), "{import} after pip install");
    }
    target
}

/// The `ErrorInfo.reason` of an error answer: what a caller branches on.
pub fn error_reason(status: &Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .unwrap_or_else(|| panic!("no ErrorInfo in {status:?}"))
        .reason
}

/// The field an INVALID_ARGUMENT names in its `BadRequest`.
pub fn error_field(status: &Status) -> String {
    use tonic_types::StatusExt;
    let bad = status
        .get_details_bad_request()
        .unwrap_or_else(|| panic!("no BadRequest in {status:?}"));
    bad.field_violations[0].field.clone()
}

/// The UNAVAILABLE a not-ready server answers Reserve with, once its
/// message names `cause` (start-up reports what it met after its first
/// attempt); fails after 10 s.
pub async fn refusal_naming(app: &TestApp, cause: &str) -> Status {
    let mut client = app.inventory();
    let mut last = None;
    for _ in 0..100 {
        let status = reserve(&mut client, "ANY", 1, "u1").await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        if status.message().contains(cause) {
            return status;
        }
        last = Some(status);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no UNAVAILABLE naming {cause:?}; last {last:?}");
}

/// Whether the server on `channel` answers health checks (SERVING, if
/// `serving`) within 20 s.
pub async fn health_answers(channel: Channel, serving: bool) -> bool {
    let mut health = HealthClient::new(channel);
    for _ in 0..400 {
        let answer = health.check(HealthCheckRequest::default()).await;
        if answer.is_ok_and(|a| !serving || a.into_inner().status == ServingStatus::Serving as i32)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

/// grpcio and the packages that read its rich errors, reflection and
/// health, plus the `h2` state machine for raw frames; pinned.
pub fn python_grpc() -> String {
    python_packages(
        "python-grpc",
        "grpc, grpc_tools, grpc_status, grpc_health, grpc_reflection, h2",
        &[
            "grpcio==1.85.1",
            "grpcio-tools==1.85.1",
            "grpcio-status==1.85.1",
            "grpcio-health-checking==1.85.1",
            "grpcio-reflection==1.85.1",
            "h2==4.4.1",
        ],
    )
}

/// Python stubs generated from our proto by grpcio-tools (`deps`), in a
/// folder that lives as long as the returned handle.
pub fn python_stubs(deps: &str) -> tempfile::TempDir {
    let root = ROOT;
    let out = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("python3")
        .args(["-m", "grpc_tools.protoc", &format!("-I{root}/proto")])
        .arg(format!("--python_out={}", out.path().display()))
        .arg(format!("--grpc_python_out={}", out.path().display()))
        .arg(format!("{root}/proto/stockgate/v1/inventory.proto"))
        .arg(format!("{root}/proto/stockgate/v1/admin.proto"))
        .env("PYTHONPATH", deps)
        .status()
        .unwrap();
    assert!(status.success(), "grpc_tools.protoc");
    out
}

/// The real `stockgate` binary as a separate process, as operators run it:
/// `config` written to a file, `serve`, killed when dropped.
pub struct BinaryServer {
    pub addr: std::net::SocketAddr,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl BinaryServer {
    /// Starts it on a free port and waits until the port answers gRPC
    /// (health SERVING or not: a server that cannot get ready is a case too).
    pub async fn start(config: Config) -> Self {
        Self::start_logging(config, &[], std::process::Stdio::null()).await
    }

    /// As [`Self::start`], with extra environment (e.g. `RUST_LOG`) and the
    /// process's stdout (its log) sent to `log`.
    pub async fn start_logging(
        config: Config,
        env: &[(&str, &str)],
        log: impl Into<std::process::Stdio>,
    ) -> Self {
        Self::start_wrapped(config, env, log, &[]).await
    }

    /// As [`Self::start_logging`], run through `wrapper` (a command that
    /// runs the rest of its arguments, e.g. `prlimit --nofile=256 --`).
    pub async fn start_wrapped(
        mut config: Config,
        env: &[(&str, &str)],
        log: impl Into<std::process::Stdio>,
        wrapper: &[&str],
    ) -> Self {
        let port = free_port();
        config.server.listen = format!("127.0.0.1:{port}").parse().unwrap();
        config.validate().expect("test config must be valid");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("stockgate.toml");
        std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
        let binary = env!("CARGO_BIN_EXE_stockgate");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = std::process::Command::new(program);
                command.args(args).arg(binary);
                command
            }
            None => std::process::Command::new(binary),
        };
        // The binary reads `STOCKGATE_*` as settings: the harness's own
        // variables (the run's clusters) would be refused as unknown keys.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("STOCKGATE_TEST_") {
                command.env_remove(name);
            }
        }
        let child = command
            .args(["--config", file.to_str().unwrap(), "serve"])
            .env_remove("STOCKGATE_CONFIG")
            .env("RUST_LOG", "error")
            .envs(env.iter().copied())
            .stdout(log)
            .spawn()
            .unwrap();
        let server = Self {
            addr: config.server.listen,
            child,
            _dir: dir,
        };
        if !config.server.tls.enabled() {
            assert!(
                health_answers(connect(server.addr).await, false).await,
                "the stockgate binary did not start on {}",
                server.addr
            );
        }
        server
    }

    /// Waits for health SERVING.
    pub async fn wait_serving(&self) {
        assert!(
            health_answers(connect(self.addr).await, true).await,
            "the stockgate binary on {} never became SERVING",
            self.addr
        );
    }

    /// Sets a SKU's stock through AdminService (loopback, no token), as
    /// [`TestApp::set_stock`] does in process.
    pub async fn set_stock(&self, sku: &str, stock: i64, max_per_user: u32) {
        stockgate::pb::admin_service_client::AdminServiceClient::new(connect(self.addr).await)
            .set_stock(SetStockRequest {
                sku: sku.into(),
                stock,
                max_per_user,
            })
            .await
            .unwrap();
    }

    /// The process's resident memory, in bytes (Linux).
    pub fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/<pid>/status");
        kib * 1024
    }

    /// Descriptors the process has open.
    pub fn open_files(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id())).map_or(0, Iterator::count)
    }

    /// CPU time the process has used so far (user + system).
    pub fn cpu_time(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // USER_HZ is 100 on Linux.
        Duration::from_millis(ticks * 10)
    }

    /// SIGKILL, as a crash: no drain, no goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as Kubernetes stops a pod; waits for the process to end.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        self.child.wait().unwrap()
    }

    /// SIGHUP: the binary reloads its config file.
    pub fn reload(&self) {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether each consumer of `queue` is the active one, from the broker.
pub fn list_consumers(queue: &str) -> Vec<bool> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_consumers", "-q", "queue_name", "active"])
        .output()
        .expect("rabbitmqctl on this machine");
    assert!(out.status.success(), "{out:?}");
    let mut active: Vec<bool> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let mut cols = line.split_whitespace();
            (cols.next() == Some(queue)).then(|| cols.next() == Some("true"))
        })
        .collect();
    active.sort();
    active
}
