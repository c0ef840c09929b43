//! Production connections to the backends (#27), against servers of the
//! test's own (the machine's shared ones trust loopback and speak
//! plaintext): a password file rotated and picked up on SIGHUP; TLS to
//! PostgreSQL, verified, and refused with the key to fix named.

use std::{
    process::{Child, Command, Stdio},
    time::Duration,
};

use stockgate::pb::{inventory_service_client::InventoryServiceClient, ReserveRequest};

use crate::harness::{config_for, free_port, with_user, BinaryServer, Profile};

/// A `redis-server` of the test's own, stopped when dropped.
pub(crate) struct OwnRedis {
    pub(crate) port: u16,
    child: Child,
    /// What `redis-cli` needs to reach it over TLS, if it speaks only TLS.
    tls_cli: Vec<String>,
}

impl OwnRedis {
    /// Plaintext, with `requirepass`.
    fn start(password: &str) -> Self {
        let port = free_port().to_string();
        let args = ["--port", &port, "--requirepass", password];
        Self::spawn(&args, Vec::new(), password)
    }

    /// TLS only (no plaintext port) with the certificates in `dir`
    /// (`server.pem` and `.key`, signed by `ca.pem`), and clients must
    /// present a certificate signed by `ca.pem` (`client.pem` for the CLI).
    pub(crate) fn start_tls(dir: &std::path::Path) -> Self {
        let file = |name: &str| dir.join(name).display().to_string();
        let port = free_port().to_string();
        let args = [
            "--port",
            "0",
            "--tls-port",
            &port,
            "--tls-cert-file",
            &file("server.pem"),
            "--tls-key-file",
            &file("server.key"),
            "--tls-ca-cert-file",
            &file("ca.pem"),
            "--tls-auth-clients",
            "yes",
        ];
        let cli = vec![
            "--tls".into(),
            "--cacert".into(),
            file("ca.pem"),
            "--cert".into(),
            file("client.pem"),
            "--key".into(),
            file("client.key"),
        ];
        Self::spawn(&args, cli, "")
    }

    fn spawn(args: &[&str], tls_cli: Vec<String>, password: &str) -> Self {
        let port: u16 = args
            .windows(2)
            .find(|pair| pair[0] == "--tls-port" || (pair[0] == "--port" && pair[1] != "0"))
            .map(|pair| pair[1].parse().unwrap())
            .unwrap();
        let child = Command::new("redis-server")
            .args(args)
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is on the machine");
        let redis = Self {
            port,
            child,
            tls_cli,
        };
        for _ in 0..100 {
            if redis.cli(password, &["PING"]).contains("PONG") {
                return redis;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server on {port} did not start");
    }

    /// Runs `redis-cli` with `args`, logging in with `password` if set.
    pub(crate) fn cli(&self, password: &str, args: &[&str]) -> String {
        let mut command = Command::new("redis-cli");
        command.args(["-p", &self.port.to_string()]);
        if !password.is_empty() {
            command.args(["--no-auth-warning", "-a", password]);
        }
        let output = command.args(&self.tls_cli).args(args).output().unwrap();
        String::from_utf8_lossy(&output.stdout).into_owned()
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn reserve(
    client: &mut InventoryServiceClient<tonic::transport::Channel>,
    user: &str,
) -> Result<(), tonic::Status> {
    let request = ReserveRequest {
        sku: "ROTATE".into(),
        quantity: 1,
        ..Default::default()
    };
    let mut request = with_user(request, user, Some(&format!("key-{user}")));
    request.set_timeout(Duration::from_secs(2));
    client.reserve(request).await.map(|_| ())
}

/// Retries Reserve (a new user and key each time, named after `tag`) until one succeeds; fails after
/// 10 s.
pub(crate) async fn reserve_within_10s(
    client: &mut InventoryServiceClient<tonic::transport::Channel>,
    tag: &str,
) {
    let started = std::time::Instant::now();
    let mut last = None;
    for attempt in 0.. {
        match reserve(client, &format!("{tag}-{attempt}")).await {
            Ok(()) => return,
            Err(status) => last = Some(status),
        }
        if started.elapsed() > Duration::from_secs(10) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no call succeeded within 10 s of the cut: {last:?}");
}

/// The gate's and the dedup store's Redis password comes from a file. The
/// password is changed in Redis and in the file, and the binary gets
/// SIGHUP: its open connections re-authenticate, and once every connection
/// is cut, the new ones (the restock subscription too) log in with the new
/// password and calls succeed. Without the reload they would fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_redis_password_is_picked_up_on_sighup() {
    let redis = OwnRedis::start("old-pass");
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("redis-password");
    std::fs::write(&password_file, "old-pass\n").unwrap();

    let (mut config, _db, _dir) = config_for(Profile::Embedded).await;
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let path = password_file.display().to_string();
    config.backends.gate = url.clone();
    config.backends.gate_password_file = path.clone();
    config.backends.dedup = url;
    config.backends.dedup_password_file = path;
    let prefix = config.redis.key_prefix.clone();
    let server = BinaryServer::start(config).await;
    server.wait_serving().await;
    server.set_stock("ROTATE", 100, 0).await;
    let mut client = InventoryServiceClient::new(crate::harness::connect(server.addr).await);
    reserve(&mut client, "before").await.unwrap();
    let channel = format!("{prefix}:restock");
    assert!(redis
        .cli("old-pass", &["PUBSUB", "NUMSUB", &channel])
        .ends_with("1\n"));

    // Rotate: Redis takes only the new password from now on.
    redis.cli("old-pass", &["CONFIG", "SET", "requirepass", "new-pass"]);
    std::fs::write(&password_file, "new-pass\n").unwrap();
    server.reload();
    tokio::time::sleep(Duration::from_millis(500)).await;
    reserve(&mut client, "reloaded").await.unwrap();

    // Every connection cut: the new ones must log in with the new password.
    for kind in ["normal", "pubsub"] {
        redis.cli("new-pass", &["CLIENT", "KILL", "TYPE", kind]);
    }
    reserve_within_10s(&mut client, "after").await;
    let mut subscribed = false;
    for _ in 0..50 {
        if redis
            .cli("new-pass", &["PUBSUB", "NUMSUB", &channel])
            .ends_with("1\n")
        {
            subscribed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(subscribed, "the restock subscription did not come back");
}

/// A PostgreSQL server of the test's own (`initdb` as user postgres), with
/// password (SCRAM) logins on loopback; stopped and removed when dropped.
pub(crate) struct OwnPostgres {
    pub(crate) port: u16,
    pgdata: String,
    _data: tempfile::TempDir,
}

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";
const PG_SUPERUSER_PASSWORD: &str = "super-secret";

impl OwnPostgres {
    fn start() -> Self {
        Self::start_with_tls(None, false)
    }

    /// With `tls` (a directory holding `server.pem` and `server.key`):
    /// `ssl = on`, and loopback logins only over TLS; with `client_certs`,
    /// only with a client certificate signed by the directory's `ca.pem`.
    pub(crate) fn start_with_tls(tls: Option<&std::path::Path>, client_certs: bool) -> Self {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().display().to_string();
        let pwfile = data.path().join("pwfile");
        std::fs::write(&pwfile, PG_SUPERUSER_PASSWORD).unwrap();
        let chown = Command::new("chown")
            .args(["-R", "postgres:postgres", &dir])
            .status()
            .unwrap();
        assert!(chown.success());
        let pgdata = format!("{dir}/pgdata");
        let initdb = Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{PG_BIN}/initdb")])
            .args(["-D", &pgdata, "--auth=scram-sha-256", "-U", "postgres"])
            .arg(format!("--pwfile={}", pwfile.display()))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(initdb.success(), "initdb failed");
        let port = free_port();
        let mut options = format!("-p {port} -k {dir} -c listen_addresses=127.0.0.1 -c fsync=off");
        if let Some(tls) = tls {
            for file in ["server.pem", "server.key", "ca.pem"] {
                std::fs::copy(tls.join(file), format!("{pgdata}/{file}")).unwrap();
            }
            let clientcert = if client_certs {
                " clientcert=verify-ca"
            } else {
                ""
            };
            let hba = format!(
                "local all all scram-sha-256\n\
                 hostssl all all 127.0.0.1/32 scram-sha-256{clientcert}\n\
                 hostnossl all all 127.0.0.1/32 reject\n"
            );
            std::fs::write(format!("{pgdata}/pg_hba.conf"), hba).unwrap();
            let owned = Command::new("chown")
                .args(["-R", "postgres:postgres", &pgdata])
                .status()
                .unwrap();
            assert!(owned.success());
            let private = Command::new("chmod")
                .args(["0600", &format!("{pgdata}/server.key")])
                .status()
                .unwrap();
            assert!(private.success());
            options.push_str(
                " -c ssl=on -c ssl_cert_file=server.pem -c ssl_key_file=server.key -c ssl_ca_file=ca.pem",
            );
        }
        let started = Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{PG_BIN}/pg_ctl")])
            .args([
                "-D",
                &pgdata,
                "-o",
                &options,
                "-l",
                &format!("{dir}/log"),
                "-w",
                "start",
            ])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(started.success(), "pg_ctl start failed");
        let postgres = Self {
            port,
            pgdata,
            _data: data,
        };
        for _ in 0..100 {
            if postgres.sql("SELECT 1").is_ok() {
                return postgres;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("postgres on {port} did not start");
    }

    /// Runs `sql` as the superuser, over the Unix socket with its password
    /// (TCP logins may need a client certificate).
    pub(crate) fn sql(&self, sql: &str) -> Result<String, String> {
        let socket_dir = self._data.path().display().to_string();
        let output = Command::new("psql")
            .args([
                "-h",
                &socket_dir,
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", "postgres", "-tAc", sql])
            .env("PGPASSWORD", PG_SUPERUSER_PASSWORD)
            .output()
            .unwrap();
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--", &format!("{PG_BIN}/pg_ctl")])
            .args(["-D", &self.pgdata, "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .status();
    }
}

/// The store's password comes from a file. The role's password is changed
/// in PostgreSQL and in the file, and the binary gets SIGHUP; then every
/// session of the role is terminated: the pool's new connections log in
/// with the new password and calls succeed. Without the reload they fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_postgres_password_is_picked_up_on_sighup() {
    let postgres = OwnPostgres::start();
    postgres
        .sql("CREATE ROLE sale LOGIN PASSWORD 'old-pass'")
        .unwrap();
    postgres.sql("CREATE DATABASE sale OWNER sale").unwrap();
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("pg-password");
    std::fs::write(&password_file, "old-pass\n").unwrap();

    let (mut config, _db, _dir) = config_for(Profile::Embedded).await;
    config.backends.store = format!("postgres://sale@127.0.0.1:{}/sale", postgres.port);
    config.backends.store_password_file = password_file.display().to_string();
    // Commits in the request path: every Reserve needs the database.
    config.layers.queue.enabled = false;
    // check-config shows the file's path, never the password.
    let file = secrets.path().join("stockgate.toml");
    std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
    let shown = Command::new(env!("CARGO_BIN_EXE_stockgate"))
        .args(["--config", file.to_str().unwrap(), "check-config"])
        .env_remove("STOCKGATE_CONFIG")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout).into_owned();
    assert!(shown.contains("store_password_file"), "{shown}");
    assert!(!shown.contains("old-pass"), "{shown}");
    let log_path = secrets.path().join("log");
    let server = BinaryServer::start_logging(
        config,
        &[("RUST_LOG", "info")],
        std::fs::File::create(&log_path).unwrap(),
    )
    .await;
    server.wait_serving().await;
    server.set_stock("ROTATE", 100, 0).await;
    let mut client = InventoryServiceClient::new(crate::harness::connect(server.addr).await);
    reserve(&mut client, "before").await.unwrap();

    postgres.sql("ALTER ROLE sale PASSWORD 'new-pass'").unwrap();
    std::fs::write(&password_file, "new-pass\n").unwrap();
    server.reload();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cut = postgres
        .sql("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE usename = 'sale'")
        .unwrap();
    assert_ne!(cut, "0", "the pool held no session to cut");
    reserve_within_10s(&mut client, "after").await;
    let sessions = postgres
        .sql("SELECT count(*) FROM pg_stat_activity WHERE usename = 'sale'")
        .unwrap();
    assert_ne!(sessions, "0");
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("password file changed"), "{log}");
    assert!(
        !log.contains("old-pass") && !log.contains("new-pass"),
        "{log}"
    );
}

pub(crate) fn rabbitmqctl(args: &[&str]) -> String {
    let output = Command::new("rabbitmqctl")
        .args(["-q"])
        .args(args)
        .output()
        .expect("rabbitmqctl is on the machine");
    assert!(output.status.success(), "rabbitmqctl {args:?}: {output:?}");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A RabbitMQ user of the test's own, deleted when dropped.
struct RabbitUser(String);

impl Drop for RabbitUser {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_user", &self.0])
            .output();
    }
}

/// The queue's password comes from a file. The user's password is changed
/// in RabbitMQ and in the file, and the binary gets SIGHUP; then the
/// user's connections are closed: the publisher and the processor
/// reconnect with the new password and calls succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_rabbitmq_password_is_picked_up_on_sighup() {
    crate::harness::use_shared_broker();
    let user = RabbitUser(format!("sg-rotate-{}", uuid::Uuid::now_v7().simple()));
    rabbitmqctl(&["add_user", &user.0, "old-pass"]);
    rabbitmqctl(&["set_permissions", "-p", "/", &user.0, ".*", ".*", ".*"]);
    let secrets = tempfile::tempdir().unwrap();
    let password_file = secrets.path().join("amqp-password");
    std::fs::write(&password_file, "old-pass\n").unwrap();

    let (mut config, _db, _dir) = config_for(Profile::Rabbit).await;
    config.backends.queue = format!("amqp://{}@127.0.0.1:5672/%2f", user.0);
    config.backends.queue_password_file = password_file.display().to_string();
    let queue_config = config.clone();
    let server = BinaryServer::start(config).await;
    server.wait_serving().await;
    server.set_stock("ROTATE", 100, 0).await;
    let mut client = InventoryServiceClient::new(crate::harness::connect(server.addr).await);
    reserve_within_10s(&mut client, "before").await;

    rabbitmqctl(&["change_password", &user.0, "new-pass"]);
    std::fs::write(&password_file, "new-pass\n").unwrap();
    server.reload();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let connections_of = |user: &str| -> Vec<String> {
        rabbitmqctl(&["list_connections", "user", "pid"])
            .lines()
            .filter_map(|line| line.split_once('\t'))
            .filter(|(who, _)| *who == user)
            .map(|(_, pid)| pid.to_owned())
            .collect()
    };
    let old = connections_of(&user.0);
    assert!(!old.is_empty(), "no connection of {} to close", user.0);
    for pid in &old {
        rabbitmqctl(&["close_connection", pid, "password rotated"]);
    }
    // Closing is asynchronous: a call racing it could still publish on
    // an old connection.
    for _ in 0..50 {
        if connections_of(&user.0).iter().all(|pid| !old.contains(pid)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    reserve_within_10s(&mut client, "after").await;
    let new = connections_of(&user.0);
    assert!(
        new.iter().any(|pid| !old.contains(pid)),
        "no new connection: {new:?}"
    );
    drop(server);
    crate::harness::delete_rabbit(&queue_config).await;
}

/// TLS to PostgreSQL (`ssl = on`, loopback logins only over TLS): with
/// `sslmode=verify-full` and the CA from `store.tls_ca_file` a sale runs
/// over TLS; an unknown CA, a host name the certificate does not name and a
/// plaintext URL are refused, and the service says which key to fix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_over_tls_is_verified_and_refusals_name_the_key() {
    // The server's names 127.0.0.1 only: `localhost` is the wrong host.
    let certs = crate::backend_tls::certificates();
    let dir = certs.path();
    let postgres = OwnPostgres::start_with_tls(Some(dir), false);
    postgres
        .sql("CREATE ROLE sale LOGIN PASSWORD 'sale-pass'")
        .unwrap();
    postgres.sql("CREATE DATABASE sale OWNER sale").unwrap();
    let url = |host: &str, mode: &str| {
        format!(
            "postgres://sale:sale-pass@{host}:{}/sale{mode}",
            postgres.port
        )
    };
    let ca = |name: &str| dir.join(format!("{name}.pem")).display().to_string();

    // Verified TLS: serving, a sale commits, the sessions are encrypted.
    let (mut config, _db, _dir) = config_for(Profile::Embedded).await;
    config.backends.store = url("127.0.0.1", "?sslmode=verify-full");
    config.store.tls_ca_file = ca("ca");
    config.layers.queue.enabled = false;
    let server = BinaryServer::start(config).await;
    server.wait_serving().await;
    server.set_stock("ROTATE", 10, 0).await;
    let mut client = InventoryServiceClient::new(crate::harness::connect(server.addr).await);
    reserve(&mut client, "over-tls").await.unwrap();
    let plaintext_sessions = postgres
        .sql("SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = 'sale' AND NOT ssl")
        .unwrap();
    let tls_sessions = postgres
        .sql("SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) WHERE usename = 'sale' AND ssl")
        .unwrap();
    assert_eq!(plaintext_sessions, "0");
    assert_ne!(tls_sessions, "0");
    drop(server);

    // Each wrong setting: callers are refused UNAVAILABLE, and the log
    // (the full cause, which callers are not shown) says what to fix.
    for (what, store, ca_file, named) in [
        (
            "unknown CA",
            url("127.0.0.1", "?sslmode=verify-full"),
            ca("rogue-ca"),
            "store.tls_ca_file",
        ),
        (
            "wrong host",
            url("localhost", "?sslmode=verify-full"),
            ca("ca"),
            "store.tls_ca_file",
        ),
        (
            "plaintext",
            url("127.0.0.1", ""),
            ca("ca"),
            "backends.store, plaintext",
        ),
    ] {
        let (mut config, _db, _dir) = config_for(Profile::Embedded).await;
        config.backends.store = store;
        config.store.tls_ca_file = ca_file;
        let log_path = certs.path().join(format!("{}.log", what.replace(' ', "-")));
        let server = BinaryServer::start_logging(
            config,
            &[("RUST_LOG", "warn")],
            std::fs::File::create(&log_path).unwrap(),
        )
        .await;
        refused_and_logged(&server, &log_path, named, what).await;
    }
}

/// A Reserve (SKU `ROTATE`) to `server` is refused UNAVAILABLE, and its log
/// (the full cause, which callers are not shown) names `named`: that line.
pub(crate) async fn refused_and_logged(
    server: &BinaryServer,
    log_path: &std::path::Path,
    named: &str,
    what: &str,
) -> String {
    let mut client = InventoryServiceClient::new(crate::harness::connect(server.addr).await);
    let refusal = reserve(&mut client, "refused").await.unwrap_err();
    assert_eq!(
        refusal.code(),
        tonic::Code::Unavailable,
        "{what}: {refusal:?}"
    );
    let line = crate::harness::log_line_naming(log_path, named, what).await;
    eprintln!("{what}: {line}");
    line
}
