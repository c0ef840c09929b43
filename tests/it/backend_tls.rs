//! TLS to all three backends (#27), against servers of the test's own that
//! take only TLS with a client certificate: a sale runs through them with
//! the invariants holding, and each wrong setting is refused with the keys
//! to fix named in the log.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use stockgate::pb::{inventory_service_client::InventoryServiceClient, ReserveRequest};

use crate::{
    backends::{rabbitmqctl, refused_and_logged, OwnPostgres, OwnRedis},
    harness::{
        assert_checked, assert_invariants, config_for, free_port, storm, with_user, BinaryServer,
        Profile, TestApp,
    },
};

/// A RabbitMQ node of the test's own beside the machine's (own node name,
/// distribution port and data directory) with one listener, AMQPS on
/// `port`, whose clients must present a certificate signed by `ca.pem`;
/// stopped and removed when dropped.
struct OwnRabbit {
    node: String,
    port: u16,
    _data: tempfile::TempDir,
}

impl OwnRabbit {
    fn start_tls(certs: &Path) -> Self {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path();
        for file in ["ca.pem", "server.pem", "server.key"] {
            std::fs::copy(certs.join(file), dir.join(file)).unwrap();
        }
        let port = free_port();
        let path = |name: &str| dir.join(name).display().to_string();
        let config = format!(
            "listeners.tcp = none\n\
             listeners.ssl.default = 127.0.0.1:{port}\n\
             ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = true\n\
             loopback_users = none\n",
            path("ca.pem"),
            path("server.pem"),
            path("server.key"),
        );
        std::fs::write(dir.join("rabbitmq.conf"), config).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        // The server drops to the rabbitmq user, and dies silently on
        // files it cannot read.
        let owned = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq", &dir.display().to_string()])
            .status()
            .unwrap();
        assert!(owned.success());
        let node = format!(
            "sg-tls-{}@localhost",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        );
        let started = Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &node)
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", path("mnesia"))
            .env("RABBITMQ_LOG_BASE", path("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins"))
            .stdout(Stdio::null())
            .status()
            .expect("rabbitmq-server is on the machine");
        assert!(started.success());
        let rabbit = Self {
            node,
            port,
            _data: data,
        };
        for _ in 0..120 {
            let up = Command::new("rabbitmqctl")
                .args(["-q", "-n", &rabbit.node, "await_startup", "--timeout", "30"])
                .output()
                .unwrap();
            if up.status.success() {
                return rabbit;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("RabbitMQ node {} did not start", rabbit.node);
    }

    fn ctl(&self, args: &[&str]) -> String {
        let mut all = vec!["-n", self.node.as_str()];
        all.extend_from_slice(args);
        rabbitmqctl(&all)
    }
}

impl Drop for OwnRabbit {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.node, "stop"])
            .output();
    }
}

/// The test's certificates: a CA and a rogue one, a server certificate for
/// 127.0.0.1 only (so `localhost` is the wrong host), and a client
/// certificate.
pub(crate) fn certificates() -> tempfile::TempDir {
    crate::mtls::pki_naming_server(
        "IP:127.0.0.1",
        &[("ca", "client", "spiffe://test/stockgate")],
    )
}

fn file(dir: &Path, name: &str) -> String {
    dir.join(name).display().to_string()
}

/// A sale through PostgreSQL (`sslmode=verify-full`), Redis (`rediss://`,
/// gate and dedup) and RabbitMQ (`amqps://`), each verified against the
/// test's CA and each checking the service's client certificate: 50 units, 200 buyers, the invariants against what callers
/// were told and the service's own checker; a retry with the same key
/// orders once; every connection the service holds is encrypted. Then
/// each wrong setting for Redis and RabbitMQ (unknown CA, wrong host,
/// plaintext URL, no client certificate) is refused, and the log names
/// the keys to fix (and, for a plaintext URL, warns that the TLS files set
/// go unused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_runs_over_tls_to_all_three_backends_and_wrong_settings_are_named() {
    let certs = certificates();
    let dir = certs.path();
    let postgres = OwnPostgres::start_with_tls(Some(dir), true);
    postgres
        .sql("CREATE ROLE sale LOGIN PASSWORD 'sale-pass'")
        .unwrap();
    postgres.sql("CREATE DATABASE sale OWNER sale").unwrap();
    let redis = OwnRedis::start_tls(dir);
    let rabbit = OwnRabbit::start_tls(dir);

    let (mut config, _db, scratch) = config_for(Profile::Embedded).await;
    config.backends.store = format!(
        "postgres://sale:sale-pass@127.0.0.1:{}/sale?sslmode=verify-full",
        postgres.port
    );
    config.store.tls_ca_file = file(dir, "ca.pem");
    config.store.tls_cert_file = file(dir, "client.pem");
    config.store.tls_key_file = file(dir, "client.key");
    config.store.max_connections = 8;
    config.backends.gate = format!("rediss://127.0.0.1:{}", redis.port);
    config.backends.dedup = config.backends.gate.clone();
    config.redis.tls_ca_file = file(dir, "ca.pem");
    config.redis.tls_cert_file = file(dir, "client.pem");
    config.redis.tls_key_file = file(dir, "client.key");
    config.redis.response_timeout_ms = 5_000;
    config.backends.queue = format!("amqps://guest:guest@127.0.0.1:{}/%2f", rabbit.port);
    config.rabbitmq.tls_ca_file = file(dir, "ca.pem");
    config.rabbitmq.tls_cert_file = file(dir, "client.pem");
    config.rabbitmq.tls_key_file = file(dir, "client.key");
    let good = config.clone();
    let app = TestApp::start(config, None, scratch).await;
    app.wait_serving().await;
    app.set_stock("TLSSALE", 50, 0).await;
    let tally = storm(app.addr, "TLSSALE", 200, 4, |_| 1).await;
    eprintln!(
        "callers saw {:?}, errors {:?}",
        tally.outcomes, tally.errors
    );
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(tally.admitted(), 50, "{:?}", tally.outcomes);
    app.drain("TLSSALE").await;
    assert_eq!(assert_invariants(&app, "TLSSALE", 50, &tally).await, 50);
    assert_checked(&app).await;

    // The same key twice: one order, the same reservation (dedup and the
    // pipeline over TLS).
    app.set_stock("TLSKEY", 5, 0).await;
    let mut client = InventoryServiceClient::new(crate::harness::connect(app.addr).await);
    let mut ids = Vec::new();
    for _ in 0..2 {
        let request = ReserveRequest {
            sku: "TLSKEY".into(),
            quantity: 1,
            ..Default::default()
        };
        let reply = client
            .reserve(with_user(request, "tls-retry", Some("tls-retry-key")))
            .await
            .unwrap()
            .into_inner();
        ids.push(reply.reservation.unwrap().reservation_id);
    }
    assert_eq!(ids[0], ids[1]);
    app.drain("TLSKEY").await;
    assert_eq!(app.stock("TLSKEY").await.db_stock, 4);

    // Every connection the service holds is encrypted. Redis and RabbitMQ
    // listen only for TLS; PostgreSQL would also take plaintext if asked.
    let sessions = |ssl: bool| {
        postgres
            .sql(&format!(
                "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
                 WHERE usename = 'sale' AND ssl = {ssl}"
            ))
            .unwrap()
    };
    assert_eq!(sessions(false), "0");
    assert_ne!(sessions(true), "0");
    let redis_clients = redis.cli("", &["CLIENT", "LIST"]).lines().count();
    assert!(
        redis_clients >= 3,
        "gate, dedup and the CLI: {redis_clients}"
    );
    let amqp = rabbit.ctl(&[
        "list_connections",
        "--no-table-headers",
        "ssl",
        "peer_cert_subject",
    ]);
    assert!(
        amqp.lines().count() >= 2
            && amqp
                .lines()
                .all(|line| line.starts_with("true") && line.contains("CN=client")),
        "publisher and processor, both over TLS with the client certificate: {amqp}"
    );
    drop(app);

    // Each wrong setting, one backend at a time (the others embedded, or
    // the good TLS store for RabbitMQ, which needs PostgreSQL): callers are
    // refused, and the log (the full cause, which callers are not shown)
    // names the keys to fix. (PostgreSQL's unknown CA, wrong host and
    // plaintext cases are in `backends`.)
    let rediss = |host: &str| format!("rediss://{host}:{}", redis.port);
    let amqps =
        |scheme: &str, host: &str| format!("{scheme}://guest:guest@{host}:{}/%2f", rabbit.port);
    type Tweak<'a> = Box<dyn Fn(&mut stockgate::config::Config) + 'a>;
    // (what, change, the keys named, the cause as rustls or the server reports it)
    let cases: Vec<(&str, Tweak<'_>, &str, &str)> = vec![
        (
            "PostgreSQL, no client certificate",
            Box::new(|c| {
                c.store.tls_cert_file.clear();
                c.store.tls_key_file.clear();
            }),
            "store.tls_cert_file",
            "requires a valid client certificate",
        ),
        (
            "Redis, unknown CA",
            Box::new(|c| c.redis.tls_ca_file = file(dir, "rogue-ca.pem")),
            "verified with CA from redis.tls_ca_file",
            "UnknownIssuer",
        ),
        (
            "Redis, wrong host",
            Box::new(|c| c.backends.gate = rediss("localhost")),
            "TLS per backends.gate",
            "not valid for name \"localhost\"",
        ),
        (
            "Redis, plaintext",
            Box::new(|c| c.backends.gate = format!("redis://127.0.0.1:{}", redis.port)),
            "backends.gate, plaintext",
            "",
        ),
        (
            "Redis, no client certificate",
            Box::new(|c| {
                c.redis.tls_cert_file.clear();
                c.redis.tls_key_file.clear();
            }),
            "no client certificate (redis.tls_cert_file unset)",
            "CertificateRequired",
        ),
        (
            "RabbitMQ, unknown CA",
            Box::new(|c| c.rabbitmq.tls_ca_file = file(dir, "rogue-ca.pem")),
            "verified with CA from rabbitmq.tls_ca_file",
            "UnknownIssuer",
        ),
        (
            "RabbitMQ, wrong host",
            Box::new(|c| c.backends.queue = amqps("amqps", "localhost")),
            "TLS per backends.queue",
            "not valid for name \"localhost\"",
        ),
        (
            "RabbitMQ, plaintext",
            Box::new(|c| c.backends.queue = amqps("amqp", "127.0.0.1")),
            "backends.queue, plaintext",
            "",
        ),
        (
            "RabbitMQ, no client certificate",
            Box::new(|c| {
                c.rabbitmq.tls_cert_file.clear();
                c.rabbitmq.tls_key_file.clear();
            }),
            "no client certificate (rabbitmq.tls_cert_file unset)",
            // TLS 1.3: the client may finish its side of the handshake
            // before the broker's refusal, which then arrives as a reset.
            "CertificateRequired|Connection reset",
        ),
    ];
    for (what, tweak, named, cause) in cases {
        let mut config = good.clone();
        config.redis.key_prefix = format!("sg-it-{}", uuid::Uuid::now_v7().simple());
        config.rabbitmq.queue = format!("sg-it-{}", uuid::Uuid::now_v7().simple());
        if what.starts_with("PostgreSQL") {
            config.backends.queue = "embedded".into();
            config.backends.gate = "embedded".into();
            config.backends.dedup = "embedded".into();
        } else if what.starts_with("Redis") {
            config.backends.queue = "embedded".into();
        } else {
            config.backends.gate = "embedded".into();
            config.backends.dedup = "embedded".into();
        }
        tweak(&mut config);
        let log_path: PathBuf = dir.join(format!("{}.log", what.replace([' ', ','], "-")));
        let server = BinaryServer::start_logging(
            config,
            &[("RUST_LOG", "warn")],
            std::fs::File::create(&log_path).unwrap(),
        )
        .await;
        if what.starts_with("RabbitMQ") {
            // Ready without the queue: the refusal comes from publishing.
            server.wait_serving().await;
            server.set_stock("ROTATE", 5, 0).await;
        }
        let line = refused_and_logged(&server, &log_path, named, what).await;
        assert!(
            cause.split('|').any(|cause| line.contains(cause)),
            "{what}: not the cause {cause:?}: {line}"
        );
        if what.ends_with("plaintext") {
            // The TLS files are still set: start-up warned that they go unused.
            let warned = crate::harness::log_line_naming(
                &log_path,
                "TLS files are set but the URL is plaintext",
                what,
            )
            .await;
            let url_key = if what.starts_with("Redis") {
                "backends.gate"
            } else {
                "backends.queue"
            };
            assert!(warned.contains(url_key), "{what}: {warned}");
        }
    }
}

/// `redis-cli` against one node of a cluster that takes TLS with a client
/// certificate from `certs` and the password `password`.
fn cluster_cli(certs: &Path, port: u16, password: &str, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["--tls", "--cacert", &file(certs, "ca.pem")])
        .args(["--cert", &file(certs, "client.pem")])
        .args(["--key", &file(certs, "client.key")])
        // -e: an error reply (a refused login too) fails the call.
        .args(["-e", "-a", password, "--no-auth-warning"])
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// A Redis Cluster as managed services run one: TLS only, with client
/// certificates checked (between its nodes too), and a password. The gate,
/// dedup and the fleet-wide rate limit run on it, the password read from a
/// file. A sale holds every invariant; a second replica refuses a user the
/// first one admitted (the fleet's budget, not its own). Then the password
/// changes on every node and in the file, the binary gets SIGHUP, and once
/// every connection is cut, the new ones (the sharded restock
/// subscription too) log in with the new password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_runs_on_a_redis_cluster_over_tls_with_a_rotated_password() {
    let certs = certificates();
    let dir = certs.path();
    let cluster = crate::harness::RedisCluster::start_with(
        5_000,
        &[
            "--tls",
            &dir.display().to_string(),
            "--password",
            "old-pass",
        ],
    );
    let url = cluster.url.replace(":old-pass@", "");
    assert!(
        url.starts_with("rediss+cluster://127.0.0.1:") && url != cluster.url,
        "{}",
        cluster.url
    );
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("redis-password");
    std::fs::write(&password_file, "old-pass\n").unwrap();
    let on_cluster = |config: &mut stockgate::config::Config| {
        let path = password_file.display().to_string();
        config.backends.gate = url.clone();
        config.backends.gate_password_file = path.clone();
        config.backends.dedup = url.clone();
        config.backends.dedup_password_file = path.clone();
        config.backends.rate_limit = url.clone();
        config.backends.rate_limit_password_file = path;
        config.redis.tls_ca_file = file(dir, "ca.pem");
        config.redis.tls_cert_file = file(dir, "client.pem");
        config.redis.tls_key_file = file(dir, "client.key");
        config.redis.response_timeout_ms = 5_000;
        config.layers.rate_limit.enabled = true;
        config.layers.rate_limit.per_user_period_ms = 60_000;
    };

    let (mut config, _db, scratch) = config_for(Profile::Embedded).await;
    on_cluster(&mut config);
    let app = TestApp::start(config, None, scratch).await;
    app.wait_serving().await;
    app.set_stock("TLSCLUSTER", 50, 0).await;
    let tally = storm(app.addr, "TLSCLUSTER", 200, 4, |_| 1).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(tally.admitted(), 50, "{:?}", tally.outcomes);
    app.drain("TLSCLUSTER").await;
    assert_eq!(assert_invariants(&app, "TLSCLUSTER", 50, &tally).await, 50);
    assert_checked(&app).await;

    // One user, one call per minute: admitted by the first replica, then
    // refused by a second whose own budget for them is still full.
    let twin = TestApp::start(app.config.clone(), None, tempfile::tempdir().unwrap()).await;
    twin.wait_serving().await;
    crate::harness::reserve(&mut app.inventory(), "TLSCLUSTER", 1, "fleet-user")
        .await
        .unwrap();
    let refused = crate::harness::reserve(&mut twin.inventory(), "TLSCLUSTER", 1, "fleet-user")
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        refused.message().starts_with("rate limited (user limit)"),
        "{refused:?}"
    );
    twin.stop().await;
    app.stop().await;

    // The binary, for SIGHUP.
    let (mut config, _db, _scratch) = config_for(Profile::Embedded).await;
    on_cluster(&mut config);
    let channel = format!("{}:restock", config.redis.key_prefix);
    let server = BinaryServer::start(config).await;
    server.wait_serving().await;
    server.set_stock("ROTATE", 100, 0).await;
    let mut client = InventoryServiceClient::new(crate::harness::connect(server.addr).await);
    crate::backends::reserve_within_10s(&mut client, "before").await;
    let subscribers = |password: &str| -> u64 {
        cluster
            .ports()
            .into_iter()
            .map(|port| {
                let out = cluster_cli(dir, port, password, &["PUBSUB", "SHARDNUMSUB", &channel]);
                out.lines()
                    .nth(1)
                    .unwrap_or("0")
                    .trim()
                    .parse::<u64>()
                    .unwrap()
            })
            .sum()
    };
    assert_eq!(
        subscribers("old-pass"),
        1,
        "the sharded restock subscription"
    );

    // Rotate: every node takes only the new password from now on (and
    // its replica logs in to its master with it), both set at once.
    for port in cluster.ports() {
        let both = [
            "CONFIG",
            "SET",
            "masterauth",
            "new-pass",
            "requirepass",
            "new-pass",
        ];
        cluster_cli(dir, port, "old-pass", &both);
    }
    std::fs::write(&password_file, "new-pass\n").unwrap();
    server.reload();
    tokio::time::sleep(Duration::from_millis(500)).await;
    crate::backends::reserve_within_10s(&mut client, "reloaded").await;

    // Every connection cut: the new ones must log in with the new password.
    // (The restock subscriber speaks RESP3, whose subscribed connections
    // Redis counts as "normal".)
    let killed: u64 = cluster
        .ports()
        .into_iter()
        .flat_map(|port| {
            ["normal", "pubsub"].map(|kind| {
                let out = cluster_cli(dir, port, "new-pass", &["CLIENT", "KILL", "TYPE", kind]);
                out.trim().parse::<u64>().unwrap()
            })
        })
        .sum();
    assert!(killed > 0, "no connection of the server's was cut");
    crate::backends::reserve_within_10s(&mut client, "after").await;
    let mut subscribed = false;
    for _ in 0..100 {
        if subscribers("new-pass") == 1 {
            subscribed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(subscribed, "the restock subscription did not come back");
}
