//! Everything that uses Redis, on a real Redis Cluster: three masters and
//! three replicas on loopback, one per test run (`harness::redis_cluster`),
//! a key prefix per test. The gate's decision tables run on it too, in the
//! gate's own tests (`src/gate/redis_gate.rs`).

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use stockgate::{config::Config, pb::ReserveOutcome};
use stockgate_tools::storm::{self, StormOptions};
use tonic::Code;

use crate::harness::{
    amqp_url, assert_invariants, is_admitted, redis_cluster, redis_cluster_url, release, reserve,
    Profile, RedisCluster, StormTally, TestApp,
};

/// How many keys under `prefix` each master holds (each node holds only
/// its own slots' keys).
async fn keys_per_master(prefix: &str) -> Vec<usize> {
    let cluster = redis_cluster();
    let mut counts = Vec::new();
    for port in cluster.masters().await {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut cluster.node(port).await)
            .await
            .unwrap();
        counts.push(keys.len());
    }
    counts
}

/// A storm over 24 SKUs of 5 units (Zipf popularity, double clicks, every
/// layer on, the dedup store on the cluster as well): every invariant the
/// storm tool checks holds per SKU and in total, everything is sold, and
/// the SKUs' keys really are spread over all three masters.
async fn many_sku_storm(app: &TestApp) {
    assert_eq!(redis_cluster().masters().await.len(), 3);
    let options = StormOptions {
        skus: 24,
        zipf: 1.0,
        seed: Some(7),
        concurrency: 100,
        ..crate::storm_tool::options(app, "CL", 5, 2_000)
    };
    let report = storm::run(&options, "storm").await.unwrap();
    let rendered = storm::render(&report);
    assert!(report.ok(), "{rendered}");
    assert_eq!(report.units_ordered, 24 * 5, "{rendered}");
    assert_eq!(report.oversold, 0, "{rendered}");
    let spread = keys_per_master(&app.config.redis.key_prefix).await;
    assert!(spread.iter().all(|&n| n > 0), "keys per master: {spread:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_many_sku_storm_on_a_cluster_holds_every_invariant() {
    let app = TestApp::spawn_with(Profile::RedisCluster, |c| {
        c.layers.dedup.enabled = true;
    })
    .await;
    many_sku_storm(&app).await;
    app.stop().await;
}

/// The same with the RabbitMQ queue and its order processor, whose batches
/// settle many SKUs (many slots) at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_many_sku_storm_through_rabbitmq_on_a_cluster_holds_every_invariant() {
    let app = TestApp::spawn_with(Profile::RedisCluster, |c| {
        c.layers.dedup.enabled = true;
        c.backends.queue = amqp_url();
        c.rabbitmq.queue = format!("sg-it-{}", uuid::Uuid::now_v7().simple());
    })
    .await;
    many_sku_storm(&app).await;
    app.stop().await;
}

/// Two replicas on one cluster. A keyed retry on the other replica is
/// answered from the dedup store on the cluster. A SKU sold out on replica
/// B (which then answers from its sold-out cache, here kept a minute)
/// reopens there within moments of a restock on replica A: the notice
/// travels by sharded pub/sub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_dedup_and_restock_notices_on_a_cluster() {
    let configure = |c: &mut Config| {
        c.layers.dedup.enabled = true;
        c.layers.gate.sold_out_cache_ms = 60_000;
        c.layers.gate.reconcile_interval_ms = 600_000;
    };
    let a = TestApp::spawn_with(Profile::RedisCluster, configure).await;
    let b = TestApp::start(a.config.clone(), None, tempfile::tempdir().unwrap()).await;
    b.wait_serving().await;
    a.set_stock("RESTOCKED", 1, 0).await;

    let first = a.reserve_as("RESTOCKED", "u1", Some("press-1")).await;
    assert!(is_admitted(first.outcome()), "{first:?}");
    let first_id = first.reservation.unwrap().reservation_id;
    let retry = b.reserve_as("RESTOCKED", "u1", Some("press-1")).await;
    assert_eq!(
        retry.reservation.unwrap().reservation_id,
        first_id,
        "the retry on the other replica is the same reservation"
    );

    let sold_out = b.reserve_as("RESTOCKED", "u2", None).await;
    assert_eq!(sold_out.outcome(), ReserveOutcome::SoldOut);
    a.restock("RESTOCKED", 1).await;
    b.admits_within("RESTOCKED", "u2", Duration::from_secs(5))
        .await;
    // Sold out again; a hold released on A (its units back through the
    // settle script, whose flag the gate announces) reopens B too.
    let sold_out = b.reserve_as("RESTOCKED", "u3", None).await;
    assert_eq!(sold_out.outcome(), ReserveOutcome::SoldOut);
    a.drain("RESTOCKED").await;
    release(&mut a.inventory(), &first_id, "u1").await.unwrap();
    b.admits_within("RESTOCKED", "u3", Duration::from_secs(5))
        .await;
    b.stop().await;
    a.stop().await;
}

/// The cluster URL's seeds need not include every node, nor a live one
/// first: the client learns the rest from the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_first_seed_still_reaches_the_cluster() {
    let live = redis_cluster_url();
    let one_seed = live.split(',').next().unwrap().to_owned();
    let url = one_seed.replace("redis+cluster://", "redis+cluster://127.0.0.1:1,");
    let app = TestApp::spawn_with(Profile::RedisCluster, |c| {
        c.backends.gate = url.clone();
        c.backends.dedup = url.clone();
    })
    .await;
    app.set_stock("SEEDS", 3, 0).await;
    let answer = app.reserve_as("SEEDS", "u1", Some("k")).await;
    assert!(is_admitted(answer.outcome()), "{answer:?}");
    assert_eq!(app.stock("SEEDS").await.gate_stock, Some(2));
    app.stop().await;
}

/// A master SIGKILLed mid-sale, on a cluster of the test's own: the one
/// serving the restock channel and a third of the SKUs. Until its replica
/// is promoted (a few seconds at the node timeout of 2 s) calls for its
/// SKUs follow `layers.gate.failure_mode` (here failing closed:
/// UNAVAILABLE, nothing reserved) while the other SKUs sell on. Writes the old master acknowledged but had not replicated die
/// with it: the database's checks stand (nothing oversold, every admitted
/// reservation stored once, no order nobody was told about), the
/// reconciler rebuilds the counters, and the service's checker ends clean.
/// The restock notices find the channel's new master, the killed node
/// comes back as a replica, and every SKU sells again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_mid_sale_fails_over_on_a_private_cluster() {
    const STOCK: i64 = 400;
    let cluster = RedisCluster::start(2_000);
    let url = cluster.url.clone();
    let a = TestApp::spawn_with(Profile::RedisCluster, |c| {
        c.backends.gate = url.clone();
        c.backends.dedup = url;
        c.layers.gate.reconcile_interval_ms = 300;
        c.layers.gate.sold_out_cache_ms = 60_000;
        c.redis.response_timeout_ms = 1_000;
    })
    .await;
    let prefix = a.config.redis.key_prefix.clone();
    let victim = cluster.master_of(&format!("{prefix}:restock")).await;
    // Four SKUs on the victim, eight elsewhere.
    let (mut doomed, mut spared) = (Vec::new(), Vec::new());
    for k in 0.. {
        let sku = format!("FO-{k}");
        if cluster.master_of(&sku).await == victim {
            if doomed.len() < 4 {
                doomed.push(sku);
            }
        } else if spared.len() < 8 {
            spared.push(sku);
        }
        if doomed.len() == 4 && spared.len() == 8 {
            break;
        }
    }
    let skus: Vec<String> = doomed.iter().chain(&spared).cloned().collect();
    for sku in &skus {
        a.set_stock(sku, STOCK, 0).await;
    }
    // A second replica, whose sold-out answers only a restock notice ends.
    let b = TestApp::start(a.config.clone(), None, tempfile::tempdir().unwrap()).await;
    b.wait_serving().await;
    a.set_stock("FO-LAST", 1, 0).await;

    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..8)
        .map(|w| {
            let mut client = a.inventory();
            let skus = skus.clone();
            let stop = Arc::clone(&stop);
            tokio::spawn(async move {
                let mut tallies: HashMap<String, StormTally> = HashMap::new();
                let mut i = 0;
                while !stop.load(Ordering::Relaxed) {
                    let sku = &skus[(w + i) % skus.len()];
                    let tally = tallies.entry(sku.clone()).or_default();
                    match reserve(&mut client, sku, 1, &format!("w{w}-{i}")).await {
                        Ok(response) => {
                            let outcome = response.outcome();
                            if is_admitted(outcome) {
                                let id = response.reservation.unwrap().reservation_id;
                                tally.granted.insert(id, 1);
                            }
                            *tally.outcomes.entry(outcome).or_default() += 1;
                        }
                        Err(status) => *tally.errors.entry(status.code()).or_default() += 1,
                    }
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                tallies
            })
        })
        .collect();

    tokio::time::sleep(Duration::from_millis(700)).await;
    cluster.kill(victim);
    let killed_at = Instant::now();
    cluster
        .wait_failed_over(victim, Duration::from_secs(30))
        .await;
    let failover = killed_at.elapsed();
    // The sale goes on after the promotion.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::Relaxed);
    let mut tallies: HashMap<String, StormTally> = HashMap::new();
    for worker in workers {
        for (sku, tally) in worker.await.unwrap() {
            tallies.entry(sku).or_default().absorb(tally);
        }
    }
    let unavailable = |sku: &String| {
        tallies[sku]
            .errors
            .get(&Code::Unavailable)
            .copied()
            .unwrap_or(0)
    };
    for (sku, tally) in &tallies {
        let codes: Vec<_> = tally.errors.keys().collect();
        assert!(
            codes.iter().all(|code| **code == Code::Unavailable),
            "{sku}: {:?}",
            tally.errors
        );
    }
    // The other SKUs sell on; while the cluster client rebuilds its slot
    // map a few of their calls are refused too (0 to 5 seen, against 30
    // to 40 for the dead master's SKUs, which get a third of the calls).
    let refused: usize = doomed.iter().map(unavailable).sum();
    let spared_refused: usize = spared.iter().map(unavailable).sum();
    assert!(
        refused > 0,
        "no call for the dead master's SKUs was refused"
    );
    assert!(
        spared_refused * 4 <= refused,
        "{spared_refused} refusals for SKUs on live masters, {refused} for the dead one's"
    );

    // Restock notices reach B through the channel's new master.
    assert!(is_admitted(
        a.reserve_as("FO-LAST", "first", None).await.outcome()
    ));
    a.drain("FO-LAST").await;
    assert_eq!(
        b.reserve_as("FO-LAST", "second", None).await.outcome(),
        ReserveOutcome::SoldOut
    );
    a.restock("FO-LAST", 1).await;
    b.admits_within("FO-LAST", "second", Duration::from_secs(10))
        .await;

    cluster.restart(victim);
    cluster.wait_healthy(Duration::from_secs(30)).await;
    for sku in &skus {
        assert_invariants(&a, sku, STOCK, &tallies[sku]).await;
    }
    crate::harness::assert_checked(&a).await;
    // Every SKU sells again, the failed-over ones included.
    for sku in &skus {
        let answer = a.reserve_as(sku, "after-heal", None).await;
        assert!(is_admitted(answer.outcome()), "{sku}: {answer:?}");
    }
    let admitted: usize = tallies.values().map(StormTally::admitted).sum();
    eprintln!(
        "admitted {admitted}; UNAVAILABLE {refused} for the dead master's SKUs, {spared_refused} for the others; failed over in {failover:?}"
    );
    b.stop().await;
    a.stop().await;
}

/// What a failover can lose, done to the gate by hand (loopback replicas
/// never lag, so a real failover here loses nothing): two admissions and
/// their settlements gone (the counter two units too high), and one
/// settlement gone (a reservation left in flight). The database refuses
/// what the high counter over-admits, the in-flight sweep settles the
/// stranded reservation, and the reconciler levels the counter: nothing
/// oversold, no unit left in flight, the gate equal to the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_a_failover_loses_neither_oversell_nor_leak_units_on_a_cluster() {
    let app = TestApp::spawn_with(Profile::RedisCluster, |c| {
        // Rare enough that the late buyers below meet the damaged counter
        // (a pass in between would mend it first and hide the refusals).
        c.layers.gate.reconcile_interval_ms = 5_000;
        c.server.request_timeout_ms = 1_000;
        c.layers.gate.in_flight_timeout_ms = 1_500;
    })
    .await;
    app.set_stock("LOST", 10, 0).await;
    let mut client = app.inventory();
    let mut tally = StormTally::default();
    let mut ids = Vec::new();
    for i in 0..6 {
        let answer = reserve(&mut client, "LOST", 1, &format!("early-{i}"))
            .await
            .unwrap();
        let id = answer.reservation.unwrap().reservation_id;
        tally.granted.insert(id.clone(), 1);
        ids.push(id);
    }
    app.drain("LOST").await;
    assert_eq!(app.stock("LOST").await.gate_stock, Some(4));

    let seeds = stockgate::redis_client::cluster_seeds(&redis_cluster_url()).unwrap();
    let mut redis = redis::cluster::ClusterClient::new(seeds)
        .unwrap()
        .get_async_connection()
        .await
        .unwrap();
    let key = |part: &str| format!("{}:{{LOST}}:{part}", app.config.redis.key_prefix);
    // Two admissions never happened, as far as Redis knows.
    for (i, id) in ids[..2].iter().enumerate() {
        let () = redis::pipe()
            .atomic()
            .del(key(&format!("res:{id}")))
            .zrem(key("pending"), id)
            .hincr(key("inv"), "stock", 1)
            .hdel(key("users"), format!("early-{i}"))
            .query_async(&mut redis)
            .await
            .unwrap();
    }
    // One admission's settlement never happened: still in flight.
    let stranded = &ids[2];
    let () = redis::pipe()
        .atomic()
        .hset(key(&format!("res:{stranded}")), "phase", "inflight")
        .zadd(key("pending"), stranded, 1)
        .hincr(key("inv"), "inflight", 1)
        .query_async(&mut redis)
        .await
        .unwrap();

    // The counter says 6 left; the database has 4.
    for i in 0..20 {
        let answer = reserve(&mut client, "LOST", 1, &format!("late-{i}"))
            .await
            .unwrap();
        if is_admitted(answer.outcome()) {
            tally
                .granted
                .insert(answer.reservation.unwrap().reservation_id, 1);
        }
    }
    app.drain("LOST").await;
    assert_eq!(assert_invariants(&app, "LOST", 10, &tally).await, 10);
    let store = crate::harness::open_store(&app.config);
    let rows = store
        .reservations_of(&stockgate::domain::Sku::parse("LOST").unwrap())
        .await
        .unwrap();
    let refused = rows
        .iter()
        .filter(|r| r.state == stockgate::domain::ReservationState::Rejected)
        .count();
    assert_eq!(
        refused, 2,
        "the database refused what the gate over-admitted"
    );
    crate::harness::assert_checked(&app).await;
    let start = Instant::now();
    loop {
        let report = app
            .admin()
            .check_invariants(stockgate::pb::CheckInvariantsRequest { sku: "LOST".into() })
            .await
            .unwrap()
            .into_inner();
        let sku = &report.skus[0];
        if sku.gate_stock == Some(0) && sku.gate_in_flight == Some(0) && sku.db_stock == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the gate never settled: {sku:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    app.stop().await;
}
