//! Backends of several nodes on loopback, for the tests that take one of
//! their nodes away: a three-node RabbitMQ cluster (`ci/rabbit-cluster`)
//! and a PostgreSQL primary with a streaming standby (`ci/pg-pair`); and a
//! sale whose buyers retry a refusal with their key, as real callers do.

use std::{
    collections::HashMap,
    path::PathBuf,
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use stockgate::pb::{inventory_service_client::InventoryServiceClient, ReserveRequest};
use tonic::Code;

use super::{is_admitted, setup_script, with_user, StormTally};

/// The run's RabbitMQ cluster: three nodes on loopback, started once per
/// run by nextest's setup script (`ci/rabbit-cluster`, for the tests in
/// `rabbit_cluster`) or, run otherwise, by this process for itself.
/// Either is stopped and removed when its owner exits.
pub fn rabbit_cluster() -> &'static RabbitCluster {
    static CLUSTER: std::sync::OnceLock<RabbitCluster> = std::sync::OnceLock::new();
    CLUSTER.get_or_init(|| {
        match (
            std::env::var("STOCKGATE_TEST_RABBIT_CLUSTER"),
            std::env::var("STOCKGATE_TEST_RABBIT_CLUSTER_DIR"),
        ) {
            (Ok(url), Ok(dir)) => RabbitCluster {
                url,
                dir: dir.into(),
            },
            _ => {
                let var = setup_script("rabbit-cluster", &[]);
                RabbitCluster {
                    url: var("STOCKGATE_TEST_RABBIT_CLUSTER"),
                    dir: var("STOCKGATE_TEST_RABBIT_CLUSTER_DIR").into(),
                }
            }
        }
    })
}

/// A running test cluster: its `amqp://` URL listing the three nodes, and
/// the directory of their pid files, environments and network links.
pub struct RabbitCluster {
    pub url: String,
    pub dir: PathBuf,
}

/// One node as `ci/rabbit-cluster` wrote it: "NAME ADDRESS NETNS LINK".
struct Node {
    name: String,
    address: String,
    netns: String,
    link: String,
}

impl RabbitCluster {
    /// Empty if the file is gone: [`Self::heal`] runs in a `Drop` and
    /// must not panic.
    fn listed(&self) -> Vec<Node> {
        std::fs::read_to_string(self.dir.join("nodes"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split(' ').collect();
                Some(Node {
                    name: (*fields.first()?).to_owned(),
                    address: (*fields.get(1)?).to_owned(),
                    netns: (*fields.get(2)?).to_owned(),
                    link: (*fields.get(3)?).to_owned(),
                })
            })
            .collect()
    }

    fn node(&self, name: &str) -> Node {
        self.listed()
            .into_iter()
            .find(|node| node.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The nodes' short names (`sg1-…`, without `@address`).
    pub fn nodes(&self) -> Vec<String> {
        self.listed().into_iter().map(|node| node.name).collect()
    }

    /// `rabbitmqctl ARGS` against `node`, as the broker's user; its
    /// output, or `None` if it failed (the node is down or cut off, say).
    pub fn ctl(&self, node: &str, args: &[&str]) -> Option<String> {
        self.cli("rabbitmqctl", node, args)
    }

    /// Bounded: a call to a node cut off would otherwise wait out
    /// Erlang's connection set-up, and some commands then call on.
    fn cli(&self, tool: &str, node: &str, args: &[&str]) -> Option<String> {
        let address = self.listed().into_iter().find(|n| n.name == node)?.address;
        let out = Command::new("timeout")
            .args(["-k", "2", "20", "runuser", "-u", "rabbitmq", "--"])
            .args(["env", "HOME=/var/lib/rabbitmq"])
            .arg("RABBITMQ_USE_LONGNAME=true")
            .arg(format!("/usr/lib/rabbitmq/bin/{tool}"))
            .args(["-l", "-n", &format!("{node}@{address}")])
            .args(args)
            .output()
            .expect("runuser and the RabbitMQ CLI");
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `queue`'s leader and its members (short node names), as a node
    /// other than `skip` reports them.
    pub fn queue_nodes(&self, queue: &str, skip: Option<&str>) -> (String, Vec<String>) {
        let rows = self.queue_status(queue, skip);
        let leader = rows
            .iter()
            .find(|row| row.1 == "leader")
            .unwrap_or_else(|| panic!("{queue} has no leader: {rows:?}"));
        (
            leader.0.clone(),
            rows.iter().map(|row| row.0.clone()).collect(),
        )
    }

    /// `queue`'s members, each with its Raft state and commit index, as
    /// a node other than `skip` reports them (the first that names a
    /// leader within 20 s: an election may be under way).
    pub fn queue_status(&self, queue: &str, skip: Option<&str>) -> Vec<(String, String, u64)> {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = None;
        while Instant::now() < deadline {
            for node in self.nodes() {
                if Some(node.as_str()) == skip {
                    continue;
                }
                let args = ["quorum_status", queue, "--formatter", "json"];
                let Some(out) = self.cli("rabbitmq-queues", &node, &args) else {
                    continue;
                };
                let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
                let rows: Vec<(String, String, u64)> = rows
                    .iter()
                    .map(|row| {
                        let name = row["Node Name"].as_str().unwrap();
                        (
                            name.split('@').next().unwrap().to_owned(),
                            row["Raft State"].as_str().unwrap_or_default().to_owned(),
                            row["Commit Index"].as_u64().unwrap_or(0),
                        )
                    })
                    .collect();
                if rows.iter().any(|row| row.1 == "leader") {
                    return rows;
                }
                last = Some(rows);
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        panic!("no node names a leader of {queue}: {last:?}");
    }

    /// The nodes `node` holds a distribution connection to, as it sees
    /// them itself (`nodes()`, evaluated there: no call to another node).
    pub fn connected_to(&self, node: &str) -> Option<Vec<String>> {
        let out = self.ctl(node, &["eval", "nodes()."])?;
        let names = out.trim().trim_start_matches('[').trim_end_matches(']');
        let names = names.split(',').map(|name| {
            let name = name.trim().trim_matches('\'');
            name.split('@').next().unwrap_or_default().to_owned()
        });
        Some(names.filter(|name| !name.is_empty()).collect())
    }

    /// A policy placing the leader of the quorum queue `queue` on the node
    /// of the connection that declares it (3.10 may place it on another).
    pub fn lead_where_declared(&self, queue: &str) {
        let pattern = format!("^{}$", regex_escape(queue));
        self.ctl(
            &self.nodes()[0],
            &[
                "set_policy",
                "--apply-to",
                "queues",
                queue,
                &pattern,
                r#"{"queue-leader-locator":"client-local"}"#,
            ],
        )
        .expect("set_policy");
    }

    /// How many client connections `node` holds: established TCP
    /// connections to its AMQP port, counted in its namespace. (The CLI's
    /// `list_connections` hangs here: the other nodes stream their rows
    /// to the CLI's own Erlang node, which they cannot reach from their
    /// namespaces.)
    pub fn connections_on(&self, node: &str) -> usize {
        let netns = self.node(node).netns;
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "ss",
                "-Htn",
                "state",
                "established",
            ])
            .arg("( sport = :5672 )")
            .output()
            .expect("ip netns exec ss");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).lines().count()
    }

    /// The nodes `node` sees running, and whether it knows of a partition.
    pub fn view_of(&self, node: &str) -> Option<(Vec<String>, bool)> {
        let out = self.ctl(node, &["cluster_status", "--formatter", "json"])?;
        let status: serde_json::Value = serde_json::from_str(&out).ok()?;
        let running = status["running_nodes"].as_array()?.iter();
        let running = running.map(|name| {
            let name = name.as_str().unwrap_or_default();
            name.split('@').next().unwrap().to_owned()
        });
        let partitioned = status["partitions"]
            .as_object()
            .is_some_and(|partitions| !partitions.is_empty());
        Some((running.collect(), partitioned))
    }

    /// Whether every node runs, each sees all three and none a partition.
    pub fn whole(&self) -> bool {
        self.nodes().iter().all(|node| {
            self.view_of(node)
                .is_some_and(|(running, partitioned)| running.len() == 3 && !partitioned)
        })
    }

    /// Kills and starts again every node whose RabbitMQ is not running
    /// (its VM does not answer, or answers that the broker is down): for
    /// a node plugged back in that hangs while it boots after its pause
    /// (`ci/rabbit-cluster --restart`). Returns the nodes restarted.
    pub fn restart_hung(&self) -> Vec<String> {
        let hung: Vec<String> = self
            .nodes()
            .into_iter()
            .filter(|node| {
                let running = self.ctl(node, &["eval", "rabbit:is_running()."]);
                running.is_none_or(|answer| answer.trim() != "true")
            })
            .collect();
        for node in &hung {
            let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../ci/rabbit-cluster"))
                .arg("--restart")
                .arg(&self.dir)
                .arg(node)
                .status();
        }
        hung
    }

    /// Cuts `node` off the network (its cable's host end down): the
    /// other nodes and the service no longer reach it, nor it them.
    pub fn cut(&self, node: &str) {
        self.link(node, "down");
    }

    /// Plugs `node`'s cable back in.
    pub fn reconnect(&self, node: &str) {
        self.link(node, "up");
    }

    fn link(&self, node: &str, state: &str) {
        let link = self.node(node).link;
        let status = Command::new("ip")
            .args(["link", "set", &link, state])
            .status()
            .expect("ip");
        assert!(status.success(), "ip link set {link} {state}");
    }

    /// SIGKILLs the node's Erlang VM.
    pub fn kill(&self, node: &str) {
        self.signal(node, "KILL");
    }

    /// Sends `signal` (`KILL`, `STOP`, `CONT`) to the node's Erlang VM.
    pub fn signal(&self, node: &str, signal: &str) {
        let pid = std::fs::read_to_string(self.dir.join(format!("{node}.pid"))).unwrap();
        let status = Command::new("kill")
            .args([&format!("-{signal}"), pid.trim()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// The node as it was, whatever a test did to it: plugged in, resumed
    /// if frozen, started again if killed (it rejoins the cluster), and
    /// `policy` cleared; then up to a minute for the cluster to be whole
    /// again, so the next test finds three nodes. For a guard's `Drop`: it
    /// does not panic.
    pub fn heal(&self, node: &str, policy: Option<&str>) {
        let Some(listed) = self.listed().into_iter().find(|n| n.name == node) else {
            eprintln!("heal: no node {node} in {}", self.dir.display());
            return;
        };
        let _ = Command::new("ip")
            .args(["link", "set", &listed.link, "up"])
            .status();
        if let Ok(pid) = std::fs::read_to_string(self.dir.join(format!("{node}.pid"))) {
            let _ = Command::new("kill").args(["-CONT", pid.trim()]).status();
        }
        if self.ctl(node, &["status"]).is_none() {
            let _ = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../ci/rabbit-cluster"))
                .arg("--start")
                .arg(&self.dir)
                .arg(node)
                .status();
        }
        if let Some(policy) = policy {
            let _ = self.ctl(node, &["clear_policy", policy]);
        }
        if let Err(views) = self.await_whole() {
            eprintln!("heal: after {node}, {views}");
        }
    }

    /// Waits up to a minute for every node to run and see the other two;
    /// how long that took, or what each node saw. A node still not
    /// running after 20 s is restarted ([`Self::restart_hung`]), as an
    /// operator would: RabbitMQ 3.10 on Erlang 25.1 and later can hang
    /// booting after a pause (rabbitmq-server issue 6034), the broker's
    /// bug rather than what these tests are about.
    pub fn await_whole(&self) -> Result<Duration, String> {
        let back = Instant::now();
        let mut restarted = false;
        while !self.whole() {
            if !restarted && back.elapsed() > Duration::from_secs(20) {
                restarted = true;
                eprintln!(
                    "restarted {:?}: hung after being let back",
                    self.restart_hung()
                );
            }
            if back.elapsed() > Duration::from_secs(60) {
                let views: Vec<_> = self
                    .nodes()
                    .iter()
                    .map(|node| (node.clone(), self.view_of(node)))
                    .collect();
                return Err(format!(
                    "the cluster is not whole again within 60 s: {views:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        Ok(back.elapsed())
    }
}

/// `text` matched literally in a regular expression.
fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let escape = !c.is_ascii_alphanumeric() && c != '-' && c != '_';
            escape.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// A PostgreSQL primary and its streaming standby, of one test's own,
/// stopped and removed when the test process exits.
pub struct PgPair {
    /// `postgres://postgres@primary,standby`, without a database.
    pub hosts: String,
    pub dir: PathBuf,
}

impl PgPair {
    /// `synchronous`: the primary answers a commit once the standby has
    /// it; otherwise replication is asynchronous (PostgreSQL's default).
    pub fn start(synchronous: bool) -> Self {
        let var = setup_script("pg-pair", &[if synchronous { "sync" } else { "async" }]);
        let pair = Self {
            hosts: var("STOCKGATE_TEST_PG_PAIR"),
            dir: var("STOCKGATE_TEST_PG_PAIR_DIR").into(),
        };
        pair.psql("primary", "CREATE DATABASE stockgate");
        pair
    }

    /// The store URL a service is given: both hosts, the database, and
    /// "connect only to the one that takes writes".
    pub fn store_url(&self) -> String {
        format!("{}/stockgate?target_session_attrs=read-write", self.hosts)
    }

    /// The port of `node` (`primary` or `standby`).
    fn port(&self, node: &str) -> &str {
        let hosts = self.hosts.rsplit_once('@').unwrap().1;
        let (primary, standby) = hosts.split_once(',').unwrap();
        let host = if node == "primary" { primary } else { standby };
        host.rsplit_once(':').unwrap().1
    }

    /// Runs `sql` on `node`, as the superuser; its output.
    pub fn psql(&self, node: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .args(["-h", "127.0.0.1", "-p", self.port(node), "-U", "postgres"])
            .args(["-d", "postgres", "-tAc", sql])
            .output()
            .expect("psql runs");
        assert!(out.status.success(), "psql on {node}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// `pg_ctl ARGS` on `node`, as the server's user.
    pub fn ctl(&self, node: &str, args: &[&str]) {
        let out = Command::new(self.dir.join("ctl"))
            .arg(node)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl {args:?} on {node}: {out:?}");
    }

    /// A crash of the primary: every one of its processes gone at once,
    /// without a checkpoint (`pg_ctl stop -m immediate`).
    pub fn crash_primary(&self) {
        self.ctl("primary", &["stop", "-m", "immediate"]);
    }
}

/// What the buyers of [`keyed_sale`] heard: each buyer's last answer (a
/// refusal retried with the same key counts once, by how it ended).
#[derive(Debug, Default)]
pub struct KeyedTally {
    pub tally: StormTally,
    /// UNAVAILABLE answers that were retried.
    pub refusals: usize,
    /// Buyers still refused when the sale stopped: their outcome unknown
    /// to them (the service may still have their order).
    pub unresolved: Vec<String>,
    /// When each admission was answered.
    pub admitted_at: Vec<Instant>,
    /// Keys told UNAVAILABLE whose retry found the reservation the refused
    /// call had made (created before the refusal): told "failed" when it
    /// had not, which a caller without a key would never learn.
    pub refused_yet_made: Vec<String>,
    /// Each admitted reservation's SKU.
    pub sku_of: HashMap<String, String>,
}

impl KeyedTally {
    /// Every buyer's outcome settled: none still refused when the sale
    /// stopped, no error but the retried refusals, and none told
    /// UNAVAILABLE for an order that exists.
    pub fn assert_resolved(&self) {
        assert!(self.unresolved.is_empty(), "{:?}", self.unresolved);
        assert!(
            self.refused_yet_made.is_empty(),
            "told UNAVAILABLE, yet ordered: {:?}",
            self.refused_yet_made
        );
        assert!(self.tally.errors.is_empty(), "{:?}", self.tally.errors);
    }

    /// Admissions answered after `at`.
    pub fn admitted_after(&self, at: Instant) -> usize {
        self.admitted_at.iter().filter(|when| **when > at).count()
    }

    /// The admissions of `sku` alone, for its invariants.
    pub fn of_sku(&self, sku: &str) -> StormTally {
        let mut tally = StormTally::default();
        tally.granted = self
            .tally
            .granted
            .iter()
            .filter(|(id, _)| self.sku_of[*id] == sku)
            .map(|(id, units)| (id.clone(), *units))
            .collect();
        tally
    }
}

/// `workers` buyers at a time, each asking once for one unit of a SKU of
/// `skus` (worker `w` buys `skus[w % skus.len()]`) as user `w<worker>-<n>`
/// with idempotency key `k-<worker>-<n>`, until [`KeyedSale::finish`]. A
/// buyer told UNAVAILABLE asks again with the same key every 50 ms, for up
/// to `retry_for`, as a caller whose outcome is unknown must.
pub fn keyed_sale(
    addr: std::net::SocketAddr,
    skus: &[&str],
    workers: usize,
    retry_for: Duration,
) -> KeyedSale {
    let skus: Vec<String> = skus.iter().map(|sku| (*sku).to_owned()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let buyers = Arc::clone(&stop);
    let run = tokio::spawn(async move {
        let stop = buyers;
        let channel = super::connect(addr).await;
        let runs = (0..workers).map(|w| {
            let mut client = InventoryServiceClient::new(channel.clone());
            let sku = skus[w % skus.len()].clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut mine = KeyedTally::default();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    let (user, key) = (format!("w{w}-{n}"), format!("k-{w}-{n}"));
                    n += 1;
                    let give_up = Instant::now() + retry_for;
                    let mut first_refusal = None;
                    loop {
                        let request = ReserveRequest {
                            sku: sku.clone(),
                            quantity: 1,
                            ..Default::default()
                        };
                        match client.reserve(with_user(request, &user, Some(&key))).await {
                            Ok(answer) => {
                                let answer = answer.into_inner();
                                let outcome = answer.outcome();
                                *mine.tally.outcomes.entry(outcome).or_default() += 1;
                                if is_admitted(outcome) {
                                    let reservation = answer.reservation.unwrap();
                                    if let (Some(refused), Some(created)) =
                                        (first_refusal, &reservation.created_at)
                                    {
                                        let created = std::time::UNIX_EPOCH
                                            + Duration::new(
                                                created.seconds as u64,
                                                created.nanos as u32,
                                            );
                                        if created < refused {
                                            mine.refused_yet_made.push(key.clone());
                                        }
                                    }
                                    mine.sku_of
                                        .insert(reservation.reservation_id.clone(), sku.clone());
                                    mine.tally.granted.insert(reservation.reservation_id, 1);
                                    mine.admitted_at.push(Instant::now());
                                }
                                break;
                            }
                            Err(status)
                                if status.code() == Code::Unavailable
                                    && Instant::now() < give_up =>
                            {
                                mine.refusals += 1;
                                first_refusal.get_or_insert_with(std::time::SystemTime::now);
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            }
                            Err(status) => {
                                *mine.tally.errors.entry(status.code()).or_default() += 1;
                                if status.code() == Code::Unavailable {
                                    mine.unresolved.push(key);
                                } else {
                                    eprintln!("{key}: {status:?}");
                                }
                                break;
                            }
                        }
                    }
                }
                mine
            })
        });
        let mut all = KeyedTally::default();
        for run in futures::future::join_all(runs).await {
            let run = run.unwrap();
            all.tally.absorb(run.tally);
            all.refusals += run.refusals;
            all.unresolved.extend(run.unresolved);
            all.admitted_at.extend(run.admitted_at);
            all.refused_yet_made.extend(run.refused_yet_made);
            all.sku_of.extend(run.sku_of);
        }
        all
    });
    KeyedSale { stop, run }
}

/// A running [`keyed_sale`].
pub struct KeyedSale {
    stop: Arc<AtomicBool>,
    run: tokio::task::JoinHandle<KeyedTally>,
}

impl KeyedSale {
    /// No buyer starts another purchase (those under way finish).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops the sale and waits for its buyers: what they heard, also
    /// logged.
    pub async fn finish(self) -> KeyedTally {
        self.stop();
        let heard = self.run.await.unwrap();
        eprintln!("{}", describe(&heard));
        heard
    }
}

/// Counts per outcome, for the test's log.
pub fn describe(tally: &KeyedTally) -> String {
    let outcomes: HashMap<String, usize> = tally
        .tally
        .outcomes
        .iter()
        .map(|(outcome, n)| (format!("{outcome:?}"), *n))
        .collect();
    format!(
        "{outcomes:?}, {} refusals retried, {} unresolved, {} refused yet made, errors {:?}",
        tally.refusals,
        tally.unresolved.len(),
        tally.refused_yet_made.len(),
        tally.tally.errors
    )
}
