//! The order queue on a three-node RabbitMQ cluster (the run's, from
//! `ci/rabbit-cluster`): the quorum queue replicated to every node, and a
//! sale that loses the node leading it.

use std::{
    sync::{atomic::AtomicBool, Arc},
    time::{Duration, Instant},
};

use crate::harness::{
    assert_checked, assert_invariants,
    replicated::{describe, keyed_sale, rabbit_cluster, RabbitCluster},
    storm, Profile, TestApp,
};

/// Leaves the run's cluster as the test found it, pass or fail: the node
/// the test froze or killed running again, the test's policy cleared.
struct Heal<'a> {
    cluster: &'a RabbitCluster,
    node: String,
    policy: Option<String>,
}

impl Drop for Heal<'_> {
    fn drop(&mut self) {
        self.cluster.heal(&self.node, self.policy.as_deref());
    }
}

/// A sale through the cluster: the service connects with the list of the
/// three nodes, its quorum queue has a replica on each, and the sale's
/// invariants hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_through_a_rabbit_cluster_keeps_a_queue_replica_on_every_node() {
    let cluster = rabbit_cluster();
    let app = TestApp::spawn(Profile::RabbitCluster).await;
    app.set_stock("RQ-SALE", 50, 0).await;
    let tally = storm(app.addr, "RQ-SALE", 200, 4, |_| 1).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(tally.admitted(), 50);
    app.drain("RQ-SALE").await;
    assert_invariants(&app, "RQ-SALE", 50, &tally).await;

    let (leader, mut members) = cluster.queue_nodes(&app.config.rabbitmq.queue);
    members.sort();
    let mut nodes = cluster.nodes();
    nodes.sort();
    assert_eq!(members, nodes, "a replica of the queue on every node");
    assert!(nodes.contains(&leader));
    app.stop().await;
}

/// The node leading the quorum queue, which the service is connected to,
/// is SIGKILLed mid-sale. Publishes in flight are answered UNAVAILABLE and
/// their callers retry with their keys; the service reconnects to a
/// surviving node, the queue elects a new leader there, the processor
/// resumes, and every caller told QUEUED has exactly one order: the
/// invariants and the service's checker hold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_leader_killed_mid_sale_loses_no_confirmed_order() {
    let cluster = rabbit_cluster();
    let queue = format!("sg-it-{}", uuid::Uuid::now_v7().simple());
    cluster.lead_where_declared(&queue);
    let app = TestApp::spawn_with(Profile::RabbitCluster, |c| {
        c.rabbitmq.queue = queue.clone();
        c.rabbitmq.reconnect_delay_ms = 200;
        c.server.request_timeout_ms = 10_000;
    })
    .await;
    const STOCK: i64 = 100_000;
    app.set_stock("RQ-KILL", STOCK, 0).await;
    // Connected (publisher and processor both, to one node), and the queue
    // declared by the first of them: its leader is on that node.
    let probe = app.reserve_as("RQ-KILL", "first", None).await;
    assert!(crate::harness::is_admitted(probe.outcome()));
    let (leader, members) = cluster.queue_nodes(&queue);
    assert_eq!(members.len(), 3);
    let on: Vec<(String, usize)> = cluster
        .nodes()
        .into_iter()
        .map(|node| {
            let n = cluster.connections_on(&node);
            (node, n)
        })
        .collect();
    assert!(
        cluster.connections_on(&leader) >= 1,
        "the service is connected to the leader's node: leader {leader}, connections {on:?}"
    );

    let stop = Arc::new(AtomicBool::new(false));
    let sale = keyed_sale(
        app.addr,
        &["RQ-KILL"],
        8,
        Duration::from_secs(30),
        Arc::clone(&stop),
    );
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let heal = Heal {
        cluster,
        node: leader.clone(),
        policy: Some(queue.clone()),
    };
    cluster.kill(&leader);
    let killed = Instant::now();
    // The sale goes on through another node.
    tokio::time::sleep(Duration::from_secs(6)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let heard = sale.await.unwrap();
    eprintln!("{}", describe(&heard));

    let (new_leader, _) = cluster.queue_nodes(&queue);
    assert_ne!(new_leader, leader, "the queue has a new leader");
    assert!(heard.refusals > 0, "no caller felt the kill");
    heard.assert_resolved();
    let after_kill = heard.admitted_after(killed + Duration::from_secs(1));
    assert!(after_kill > 0, "nothing was admitted after the kill");

    app.drain("RQ-KILL").await;
    let mut all = heard.tally;
    all.granted
        .insert(probe.reservation.unwrap().reservation_id, 1);
    let ordered = assert_invariants(&app, "RQ-KILL", STOCK, &all).await;
    assert_eq!(
        ordered,
        all.granted.len() as i64,
        "one order per caller told QUEUED"
    );
    assert_checked(&app).await;
    eprintln!(
        "{ordered} orders; {after_kill} admitted more than 1 s after the kill; leader {leader} -> {new_leader}"
    );

    drop(heal);
    assert!(
        cluster.ctl(&leader, &["status"]).is_some(),
        "{leader} is back"
    );
    app.stop().await;
}

/// A node that is neither the queue's leader nor the service's frozen
/// (SIGSTOP) for four seconds mid-sale, as a minority node cut off from
/// the others looks to them: the leader and the other follower are a
/// majority and go on confirming. Callers see nothing: no refusal, no
/// error; every caller told QUEUED has its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_minority_node_changes_nothing_callers_see() {
    let cluster = rabbit_cluster();
    let app = TestApp::spawn(Profile::RabbitCluster).await;
    app.set_stock("RQ-FREEZE", 100_000, 0).await;
    let probe = app.reserve_as("RQ-FREEZE", "first", None).await;
    assert!(crate::harness::is_admitted(probe.outcome()));
    let (leader, members) = cluster.queue_nodes(&app.config.rabbitmq.queue);
    let minority = members
        .iter()
        .find(|node| **node != leader && cluster.connections_on(node) == 0)
        .expect("a follower the service is not connected to")
        .clone();

    let stop = Arc::new(AtomicBool::new(false));
    let sale = keyed_sale(
        app.addr,
        &["RQ-FREEZE"],
        8,
        Duration::from_secs(30),
        Arc::clone(&stop),
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _heal = Heal {
        cluster,
        node: minority.clone(),
        policy: None,
    };
    cluster.signal(&minority, "STOP");
    let frozen = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    cluster.signal(&minority, "CONT");
    let during = frozen.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let heard = sale.await.unwrap();
    eprintln!("{}", describe(&heard));

    assert_eq!(heard.refusals, 0, "a caller was refused");
    assert!(heard.tally.errors.is_empty(), "{:?}", heard.tally.errors);
    let while_frozen = heard
        .admitted_at
        .iter()
        .filter(|at| **at > frozen && **at < frozen + during)
        .count();
    assert!(
        while_frozen > 0,
        "nothing was admitted while {minority} was frozen"
    );
    app.drain("RQ-FREEZE").await;
    let mut all = heard.tally;
    all.granted
        .insert(probe.reservation.unwrap().reservation_id, 1);
    let ordered = assert_invariants(&app, "RQ-FREEZE", 100_000, &all).await;
    assert_eq!(ordered, all.granted.len() as i64);
    assert_checked(&app).await;
    eprintln!("{ordered} orders, {while_frozen} admitted while {minority} was frozen");
    app.stop().await;
}
