//! The partitioned order queue (`rabbitmq.partitions`) against the real
//! broker and PostgreSQL: orders routed by SKU, positions per partition,
//! partitions spread over processor processes through leases, taken over
//! when one is SIGKILLed or stopped with SIGTERM and handed back when it
//! returns, and the move from one queue to partitions mid-sale.

use std::time::Duration;

use stockgate::{
    config::{Config, Role},
    pb::ReserveOutcome,
    queue::{partition_of, OrderQueue, QueueNames, RabbitQueue},
};
use tokio::time::Instant;

use crate::harness::{
    assert_checked, assert_invariants, list_consumers, open_store, pg_admin_url, queue_depth,
    reserve, storm, BinaryServer, Profile, StormTally, TestApp,
};

const PARTITIONS: u16 = 4;

fn partitioned(config: &mut Config) {
    config.rabbitmq.partitions = PARTITIONS;
    config.rabbitmq.lease_poll_ms = 200;
}

/// An API-only replica with four partitions, owning the test's database,
/// gate and queues.
async fn partitioned_api() -> TestApp {
    TestApp::spawn_with(Profile::Rabbit, |c| {
        c.server.role = Role::Api;
        partitioned(c);
    })
    .await
}

/// As [`partitioned_api`], with publishes bounded by 2.6 s (300 ms
/// confirms), the wait before a line's pass mark.
async fn quick_publish_api() -> TestApp {
    TestApp::spawn_with(Profile::Rabbit, |c| {
        c.server.role = Role::Api;
        c.rabbitmq.publish_timeout_ms = 300;
        partitioned(c);
    })
    .await
}

/// A queue handle on the test's broker and database, for its backlog.
fn backlog_probe(app: &TestApp) -> RabbitQueue {
    RabbitQueue::new(
        &app.config.backends.queue,
        &app.config.rabbitmq,
        open_store(&app.config),
    )
}

fn processor_config(config: &Config) -> Config {
    let mut config = config.clone();
    config.server.role = Role::Processor;
    config.layers.queue.batch_size = 50;
    config.layers.queue.linger_ms = 0;
    config
}

/// Partition leases held in the test's database, per holder, ascending:
/// read from `pg_locks`, not from the service.
fn leases(config: &Config) -> Vec<u32> {
    let database = config
        .backends
        .store
        .rsplit('/')
        .next()
        .and_then(|tail| tail.split('?').next())
        .unwrap();
    let out = std::process::Command::new("psql")
        .arg(format!("{}/postgres", pg_admin_url()))
        .args(["-v", "ON_ERROR_STOP=1", "-tAc"])
        .arg(format!(
            "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
             WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 \
               AND l.objid < 1000000 AND d.datname = '{database}' \
             GROUP BY l.pid ORDER BY 1"
        ))
        .output()
        .expect("psql runs");
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| line.trim().parse().ok())
        .collect()
}

/// Each partition queue's consumers (active or not), from the broker.
fn consumers(names: &QueueNames) -> Vec<Vec<bool>> {
    (0..names.partitions)
        .map(|p| list_consumers(&names.partition_queue(p)))
        .collect()
}

/// Polls `check` until it holds; how long that took.
async fn wait_until(what: &str, within: Duration, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// Waits until two processors hold two partitions each (by `pg_locks`)
/// and every partition has one consumer, the active one (by the broker).
async fn wait_spread(config: &Config, names: &QueueNames, within: Duration) {
    wait_until("two processors holding two partitions each", within, || {
        leases(config) == [2, 2]
    })
    .await;
    wait_until("one active consumer per partition", within, || {
        consumers(names).iter().all(|c| c == &[true])
    })
    .await;
}

/// SKUs covering every partition, two each.
fn skus() -> Vec<String> {
    let mut per_partition = vec![Vec::new(); usize::from(PARTITIONS)];
    for i in 0.. {
        let sku = format!("PART-{i}");
        let list = &mut per_partition[usize::from(partition_of(&sku, PARTITIONS))];
        if list.len() < 2 {
            list.push(sku);
        }
        if per_partition.iter().all(|list| list.len() == 2) {
            break;
        }
    }
    per_partition.concat()
}

/// Every SKU's admitted orders committed (waited for: replicas other than
/// `app` published some), its invariants checked against its callers'
/// tally, and every queue empty.
async fn assert_all_committed(app: &TestApp, skus: &[String], stock: i64, tallies: &[StormTally]) {
    let store = open_store(&app.config);
    for (sku, tally) in skus.iter().zip(tallies) {
        let sku_id = stockgate::domain::Sku::parse(sku).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let rows = store.reservations_of(&sku_id).await.unwrap();
            let missing = tally
                .granted
                .keys()
                .filter(|id| !rows.iter().any(|row| row.id.as_str() == id.as_str()))
                .count();
            if missing == 0 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{sku}: {missing} admitted orders not committed"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        app.drain(sku).await;
        assert_invariants(app, sku, stock, tally).await;
    }
    let names = QueueNames::partitioned(&app.config.rabbitmq.queue, PARTITIONS);
    for queue in names.order_queues() {
        assert_eq!(queue_depth(&queue).await, 0, "{queue} drained");
    }
    assert_checked(app).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queued_callers_position_counts_only_its_own_partition() {
    let app = partitioned_api().await;
    let (a, b) = ("POS-A", "POS-B");
    assert_ne!(partition_of(a, PARTITIONS), partition_of(b, PARTITIONS));
    app.set_stock(a, 10, 0).await;
    app.set_stock(b, 10, 0).await;
    // No processor yet: every order waits.
    let mut client = app.inventory();
    let mut positions = Vec::new();
    for (i, sku) in [a, a, b, a, b].into_iter().enumerate() {
        let answer = reserve(&mut client, sku, 1, &format!("u{i}"))
            .await
            .unwrap();
        assert_eq!(answer.outcome(), ReserveOutcome::Queued);
        positions.push((sku, answer.queue_position()));
    }
    assert_eq!(
        positions,
        [(a, 0), (a, 1), (b, 0), (a, 2), (b, 1)],
        "orders ahead in the caller's own partition only"
    );
    let names = QueueNames::partitioned(&app.config.rabbitmq.queue, PARTITIONS);
    assert_eq!(
        queue_depth(&names.partition_queue(partition_of(a, PARTITIONS))).await,
        3
    );
    assert_eq!(
        queue_depth(&names.orders).await,
        0,
        "nothing in the one queue"
    );
    // A processor takes every partition and commits them; progress is
    // recorded per partition.
    let processor = BinaryServer::start(processor_config(&app.config)).await;
    for sku in [a, b] {
        app.drain(sku).await;
    }
    let progress = open_store(&app.config).queue_lines().await.unwrap();
    let done: Vec<(Option<u16>, u64, u64)> = progress
        .iter()
        .map(|row| (row.partition, row.last_ticket, row.done_through))
        .collect();
    let mut expected = vec![
        (Some(partition_of(a, PARTITIONS)), 3, 3),
        (Some(partition_of(b, PARTITIONS)), 2, 2),
    ];
    expected.sort();
    expected.insert(0, (None, 0, 0));
    assert_eq!(
        done, expected,
        "the one queue untouched, each partition done"
    );
    drop(processor);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn partitions_spread_over_processors_move_off_a_killed_one_and_come_back() {
    lose_a_processor_mid_sale(false).await;
}

/// As a rollout stops a pod: the processor drains what it holds, its
/// leases end with its sessions, and the survivor takes its partitions.
#[tokio::test(flavor = "multi_thread")]
async fn partitions_move_off_a_processor_stopped_with_sigterm() {
    lose_a_processor_mid_sale(true).await;
}

/// Two processors share four partitions; one is stopped (SIGTERM when
/// `gracefully`, else SIGKILL) once orders are being committed: the other
/// holds all four within the bound, every admitted order is committed once,
/// and a returning processor gets its share back.
async fn lose_a_processor_mid_sale(gracefully: bool) {
    let app = partitioned_api().await;
    let skus = skus();
    let stock = 300;
    for sku in &skus {
        app.set_stock(sku, stock, 0).await;
    }
    let config = processor_config(&app.config);
    let names = QueueNames::partitioned(&config.rabbitmq.queue, PARTITIONS);
    let mut first = BinaryServer::start(config.clone()).await;
    let _second = BinaryServer::start(config.clone()).await;
    let spread = Duration::from_secs(20);
    wait_spread(&config, &names, spread).await;

    // A sale over every partition; one processor stops once orders are
    // being committed.
    let store = open_store(&app.config);
    let storms =
        futures::future::join_all(skus.iter().map(|sku| storm(app.addr, sku, 400, 2, |_| 1)));
    // Owns `first`, to stop it on a blocking thread; borrows the rest.
    let stop = {
        let (skus, config, store) = (&skus, &config, &store);
        async move {
            let sku = stockgate::domain::Sku::parse(&skus[0]).unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            while store.reservations_of(&sku).await.unwrap().is_empty() {
                assert!(Instant::now() < deadline, "nothing committed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let stopped = Instant::now();
            if gracefully {
                let status = tokio::task::spawn_blocking(move || first.terminate())
                    .await
                    .unwrap();
                assert!(status.success(), "{status:?}");
            } else {
                first.kill();
            }
            let waited = wait_until("the survivor holding all four partitions", spread, || {
                leases(config) == [4]
            })
            .await;
            (waited, stopped.elapsed())
        }
    };
    let (tallies, (after_exit, takeover)) = tokio::join!(storms, stop);
    let signal = if gracefully { "SIGTERM" } else { "SIGKILL" };
    println!("partitions taken over {takeover:?} after {signal} ({after_exit:?} after the exit)");
    assert!(
        takeover < Duration::from_secs(5),
        "takeover took {takeover:?} with lease_poll_ms = 200 (gracefully: {gracefully})"
    );
    for tally in &tallies {
        assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    }
    assert_all_committed(&app, &skus, stock, &tallies).await;

    // Back: the returning processor gets its share again.
    let _third = BinaryServer::start(config.clone()).await;
    wait_spread(&config, &names, spread).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_move_from_one_queue_to_partitions_mid_sale_loses_nothing() {
    // Before: one queue, and its processor stopped (say, for the upgrade):
    // the orders taken meanwhile wait in it.
    let before = TestApp::spawn_with(Profile::Rabbit, |c| c.server.role = Role::Api).await;
    let skus = skus();
    let stock = 200;
    for sku in &skus {
        before.set_stock(sku, stock, 0).await;
    }
    let first_half = futures::future::join_all(
        skus.iter()
            .map(|sku| storm(before.addr, sku, 120, 2, |_| 1)),
    )
    .await;
    let waiting = queue_depth(&before.config.rabbitmq.queue).await;
    assert!(waiting > 0, "orders wait in the one queue");

    // After: replicas and processors with partitions. The API replicas
    // publish to the partitions at once; the processors drain the one
    // queue beside them.
    let mut config = before.config.clone();
    partitioned(&mut config);
    let _processor = BinaryServer::start(processor_config(&config)).await;
    let after = BinaryServer::start(config.clone()).await;
    after.wait_serving().await;
    let second_half =
        futures::future::join_all(skus.iter().map(|sku| storm(after.addr, sku, 300, 2, |_| 1)))
            .await;
    let tallies: Vec<StormTally> = first_half
        .into_iter()
        .zip(second_half)
        .map(|(mut first, second)| {
            first.absorb(second);
            first
        })
        .collect();
    for tally in &tallies {
        assert!(tally.errors.is_empty(), "{:?}", tally.errors);
        assert!(
            tally.count(ReserveOutcome::SoldOut) > 0,
            "every SKU sold out"
        );
    }
    let mut before = before;
    before.config.rabbitmq.partitions = PARTITIONS;
    assert_all_committed(&before, &skus, stock, &tallies).await;
    before.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tickets_whose_publish_failed_do_not_hold_the_backlog_up() {
    let app = quick_publish_api().await;
    let sku = "BURNT";
    app.set_stock(sku, 10, 0).await;
    let _processor = BinaryServer::start(processor_config(&app.config)).await;
    let mut client = app.inventory();
    let answer = reserve(&mut client, sku, 1, "alice").await.unwrap();
    assert_eq!(answer.outcome(), ReserveOutcome::Queued);
    app.drain(sku).await;
    let queue = backlog_probe(&app);
    // Tickets numbered for publishes that then failed, in the SKU's
    // partition and in the one queue: nothing will ever carry them.
    let store = open_store(&app.config);
    store
        .next_partition_tickets(&[(partition_of(sku, PARTITIONS), 2)])
        .await
        .unwrap();
    store.next_tickets(1).await.unwrap();
    assert_eq!(queue.backlog().await, Some(3));
    let start = Instant::now();
    while queue.backlog().await != Some(0) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "backlog still {:?}",
            queue.backlog().await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Once past them, a new order is numbered, processed and counted as
    // before.
    let answer = reserve(&mut client, sku, 1, "bob").await.unwrap();
    assert_eq!(answer.outcome(), ReserveOutcome::Queued);
    app.drain(sku).await;
    assert_eq!(queue.backlog().await, Some(0));
    app.stop().await;
}

/// The pass mark waits behind orders another consumer still holds: a
/// processor that took a partition over while its predecessor's connection
/// lingers (its node gone silent) is a standby with nothing in hand, and
/// must not count the predecessor's orders as done.
#[tokio::test(flavor = "multi_thread")]
async fn orders_a_lingering_consumer_holds_are_not_passed() {
    let app = quick_publish_api().await;
    let sku = "HELD";
    app.set_stock(sku, 10, 0).await;
    let mut client = app.inventory();
    for user in ["a", "b", "c"] {
        let answer = reserve(&mut client, sku, 1, user).await.unwrap();
        assert_eq!(answer.outcome(), ReserveOutcome::Queued);
    }
    // The predecessor: the partition's active consumer, holding the three
    // orders unacknowledged.
    let names = QueueNames::partitioned(&app.config.rabbitmq.queue, PARTITIONS);
    let (connection, channel) = crate::harness::amqp_channel().await;
    channel.basic_qos(10, Default::default()).await.unwrap();
    let mut held = channel
        .basic_consume(
            names
                .partition_queue(partition_of(sku, PARTITIONS))
                .as_str()
                .into(),
            "".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .unwrap();
    for _ in 0..3 {
        futures::StreamExt::next(&mut held).await.unwrap().unwrap();
    }
    let queue = backlog_probe(&app);
    let processor = BinaryServer::start(processor_config(&app.config)).await;
    // Longer than the publish bound (2.6 s) and a few lease looks.
    let watch_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < watch_until {
        let backlog = queue.backlog().await;
        assert_ne!(backlog, Some(0), "orders held elsewhere counted as done");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The predecessor's connection ends: its orders go back, the processor
    // becomes active and commits them, then the mark passes.
    drop(held);
    connection.close(200, "gone".into()).await.unwrap();
    let start = Instant::now();
    while queue.backlog().await != Some(0) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "backlog never drained"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rows = open_store(&app.config)
        .reservations_of(&stockgate::domain::Sku::parse(sku).unwrap())
        .await
        .unwrap();
    assert_eq!(rows.len(), 3, "every held order committed once");
    drop(processor);
    app.stop().await;
}
