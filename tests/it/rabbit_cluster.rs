//! The order queue on a three-node RabbitMQ cluster (the run's, from
//! `ci/rabbit-cluster`, each node in a network namespace of its own): the
//! quorum queue replicated to every node, a sale that loses the node
//! leading it, and one whose minority node stalls or is cut off.

use std::time::{Duration, Instant};

use crate::harness::{
    assert_checked, assert_invariants,
    replicated::{keyed_sale, rabbit_cluster, KeyedSale, RabbitCluster},
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

    let (leader, mut members) = cluster.queue_nodes(&app.config.rabbitmq.queue, None);
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
    leader_out("RQ-KILL", LeaderOut::Kill).await;
}

/// The node leading the quorum queue, which holds all the service's
/// connections, cut off the network mid-sale: no reset reaches the
/// service, its publishes there go unanswered until their bound, and its
/// consumer hears nothing. Callers are refused (UNAVAILABLE) until the
/// service has reconnected to a survivor, where the majority has elected
/// a new leader; then sales go on while the node is still cut off. Every
/// caller told QUEUED has exactly one order once the node is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_queue_leader_cut_off_with_the_services_connections_loses_no_confirmed_order() {
    leader_out("RQ-CUTLEAD", LeaderOut::Cut).await;
}

async fn leader_out(sku: &str, fault: LeaderOut) {
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
    app.set_stock(sku, STOCK, 0).await;
    // Connected (publisher and processor both, to one node), and the queue
    // declared by the first of them: its leader is on that node.
    let probe = app.reserve_as(sku, "first", None).await;
    assert!(crate::harness::is_admitted(probe.outcome()));
    let (leader, members) = cluster.queue_nodes(&queue, None);
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
        on.iter().all(|(node, n)| (*node == leader) == (*n > 0)),
        "the service is connected to the leader's node alone: leader {leader}, connections {on:?}"
    );

    let sale = keyed_sale(app.addr, &[sku], 8, Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let heal = Heal {
        cluster,
        node: leader.clone(),
        policy: Some(queue.clone()),
    };
    let killed = Instant::now();
    let (new_leader, back) = match fault {
        LeaderOut::Kill => {
            cluster.kill(&leader);
            // The sale goes on through another node.
            tokio::time::sleep(Duration::from_secs(6)).await;
            (cluster.queue_nodes(&queue, Some(&leader)).0, None)
        }
        LeaderOut::Cut => {
            cluster.cut(&leader);
            // The sale goes on through the majority, the node still out.
            tokio::time::sleep(Duration::from_secs(8)).await;
            let new_leader =
                tokio::task::block_in_place(|| cluster.queue_nodes(&queue, Some(&leader)).0);
            let back = Instant::now();
            cluster.reconnect(&leader);
            await_whole(cluster, &sale);
            (new_leader, Some(back))
        }
    };
    let heard = sale.finish().await;

    assert_ne!(new_leader, leader, "the queue has a new leader");
    assert!(heard.refusals > 0, "no caller felt the fault");
    heard.assert_resolved();
    let after_kill = heard.admitted_after(killed + Duration::from_secs(1));
    assert!(after_kill > 0, "nothing was admitted after the fault");
    if let Some(back) = back {
        let while_cut = after_kill - heard.admitted_after(back);
        assert!(
            while_cut > 0,
            "nothing was admitted while {leader} was cut off"
        );
        eprintln!("{while_cut} admitted while {leader} was cut off");
    }

    app.drain(sku).await;
    let mut all = heard.tally;
    all.granted
        .insert(probe.reservation.unwrap().reservation_id, 1);
    let ordered = assert_invariants(&app, sku, STOCK, &all).await;
    assert_eq!(
        ordered,
        all.granted.len() as i64,
        "one order per caller told QUEUED"
    );
    assert_checked(&app).await;
    eprintln!(
        "{ordered} orders; {after_kill} admitted more than 1 s after the fault; leader {leader} -> {new_leader}"
    );

    drop(heal);
    assert!(
        cluster.ctl(&leader, &["status"]).is_some(),
        "{leader} is back"
    );
    app.stop().await;
}

/// A node that is neither the queue's leader nor the service's frozen
/// (SIGSTOP) for four seconds mid-sale, as a stalled node (a long pause)
/// looks to the others: the leader and the other follower are a majority
/// and go on confirming. Callers see nothing: no refusal, no error; every
/// caller told QUEUED has its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_minority_node_changes_nothing_callers_see() {
    minority_out("RQ-FREEZE", MinorityOut::Freeze, Duration::from_secs(4)).await;
}

/// A node that is neither the queue's leader nor the service's cut off
/// the network (its namespace's cable unplugged) for ten seconds mid-sale:
/// the leader's node drops it within `net_ticktime`, and once plugged
/// back in it rejoins and catches up. Callers see nothing: no refusal, no error; every caller told QUEUED
/// has its order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minority_node_partitioned_away_changes_nothing_callers_see() {
    minority_out("RQ-CUT", MinorityOut::Cut, Duration::from_secs(10)).await;
}

/// What happens to the node leading the queue.
enum LeaderOut {
    Kill,
    Cut,
}

/// What happens to a follower holding none of the service's connections.
enum MinorityOut {
    Freeze,
    Cut,
}

/// A sale during which a follower of the queue holding none of the
/// service's connections is frozen or cut off for `hold`, then let back.
async fn minority_out(sku: &str, fault: MinorityOut, hold: Duration) {
    const STOCK: i64 = 100_000;
    let cluster = rabbit_cluster();
    let app = TestApp::spawn(Profile::RabbitCluster).await;
    app.set_stock(sku, STOCK, 0).await;
    let probe = app.reserve_as(sku, "first", None).await;
    assert!(crate::harness::is_admitted(probe.outcome()));
    let queue = &app.config.rabbitmq.queue;
    let (leader, members) = cluster.queue_nodes(queue, None);
    let minority = members
        .iter()
        .find(|node| **node != leader && cluster.connections_on(node) == 0)
        .expect("a follower the service is not connected to")
        .clone();

    let sale = keyed_sale(app.addr, &[sku], 8, Duration::from_secs(30));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let _heal = Heal {
        cluster,
        node: minority.clone(),
        policy: None,
    };
    let out = Instant::now();
    let mut noticed = None;
    match fault {
        MinorityOut::Freeze => {
            cluster.signal(&minority, "STOP");
            tokio::time::sleep(hold).await;
            cluster.signal(&minority, "CONT");
        }
        MinorityOut::Cut => {
            cluster.cut(&minority);
            // The cut is real when the leader's node has dropped its
            // connection to the minority (within `net_ticktime`, 4 s).
            while out.elapsed() < hold
                || (noticed.is_none() && out.elapsed() < Duration::from_secs(30))
            {
                let peers = tokio::task::block_in_place(|| cluster.connected_to(&leader));
                if noticed.is_none() && peers.is_some_and(|peers| !peers.contains(&minority)) {
                    noticed = Some(out.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            cluster.reconnect(&minority);
        }
    }
    let during = out.elapsed();
    let rejoined = await_whole(cluster, &sale);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let heard = sale.finish().await;

    if let MinorityOut::Cut = fault {
        let noticed = noticed.expect("the leader's node never saw the minority go");
        eprintln!(
            "{minority} cut for {during:?}: declared down after {noticed:?}, whole again {rejoined:?} after the cable went back"
        );
    }
    assert_eq!(heard.refusals, 0, "a caller was refused");
    assert!(heard.tally.errors.is_empty(), "{:?}", heard.tally.errors);
    let while_out = heard
        .admitted_at
        .iter()
        .filter(|at| **at > out && **at < out + during)
        .count();
    assert!(
        while_out > 0,
        "nothing was admitted while {minority} was out"
    );
    app.drain(sku).await;
    let mut all = heard.tally;
    all.granted
        .insert(probe.reservation.unwrap().reservation_id, 1);
    let ordered = assert_invariants(&app, sku, STOCK, &all).await;
    assert_eq!(ordered, all.granted.len() as i64);
    assert_checked(&app).await;
    // The node that was out is a follower again with the whole log.
    let caught_up = tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let rows = cluster.queue_status(queue, None);
            let index = |node: &str| rows.iter().find(|row| row.0 == node).map(|row| row.2);
            let state = rows.iter().find(|row| row.0 == minority).map(|row| &row.1);
            if state.is_some_and(|state| state == "follower") && index(&minority) == index(&leader)
            {
                return true;
            }
            if Instant::now() > deadline {
                eprintln!("{minority} behind: {rows:?}");
                return false;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    });
    assert!(caught_up, "{minority} did not catch up with the leader");
    eprintln!("{ordered} orders, {while_out} admitted while {minority} was out; the cluster whole again {rejoined:?} after");
    app.stop().await;
}

/// [`RabbitCluster::await_whole`], the sale going on meanwhile (stopped
/// if the cluster never is whole, so the panic is not kept waiting).
fn await_whole(cluster: &RabbitCluster, sale: &KeyedSale) -> Duration {
    tokio::task::block_in_place(|| cluster.await_whole()).unwrap_or_else(|views| {
        sale.stop();
        panic!("{views}")
    })
}
