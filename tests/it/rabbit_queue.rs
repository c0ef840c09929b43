//! The RabbitMQ order queue and the single order processor, against the
//! real broker on 127.0.0.1:5672, PostgreSQL and Redis. Each test has its
//! own queue names, database and key prefix.

use std::{process::Stdio, time::Duration};

use futures::StreamExt;
use stockgate::{
    config::{Config, Role},
    domain::{ReservationId, ReservationState as DomainState, Sku, UserId},
    gate::{GateDecision, GateEntry, RedisGate, StockGate},
    pb::{ReservationState, ReserveOutcome, WatchReservationRequest},
    queue::{OrderQueue, QueueNames, RabbitQueue},
    store::NewOrder,
};

use crate::{
    harness::{
        assert_invariants, config_for, confirm, error_reason, list_consumers, open_store,
        queue_depth, release, reserve, storm, with_user, Profile, StormTally, TestApp,
    },
    relay::Relay,
};

/// Waits until `sku` has `rows` reservation rows in the database.
async fn wait_rows(config: &Config, sku: &str, rows: usize, within: Duration) {
    let store = open_store(config);
    let sku = Sku::parse(sku).unwrap();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let found = store.reservations_of(&sku).await.unwrap().len();
        if found >= rows {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{found} of {rows} rows after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What giving up on an order ends with, waited for in the order it
/// happens: the reservation stored REJECTED with a reason containing
/// `reason`, the gate of its SKU admitting `units` again, and one message
/// in the dead-letter queue.
async fn wait_given_up(
    config: &Config,
    gate: &RedisGate,
    id: &ReservationId,
    reason: &str,
    units: i64,
) {
    let store = open_store(config);
    let mut row = None;
    for _ in 0..800 {
        row = store.reservation(id).await.unwrap();
        if row.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let row = row.expect("a row for the given-up order");
    assert_eq!(row.state, DomainState::Rejected);
    let stored = row.reject_reason.unwrap_or_default();
    assert!(stored.contains(reason), "{stored}");
    let sku = &row.sku;
    let names = QueueNames::new(&config.rabbitmq.queue);
    let mut seen = (None, 0);
    for _ in 0..200 {
        seen = (
            gate.available(sku).await.unwrap(),
            queue_depth(&names.dead_letters).await,
        );
        if seen == (Some(units), 1) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!(
        "gate and dead letters of {} ended at {seen:?}",
        sku.as_str()
    );
}

/// A processor-only replica sharing `config`'s database, gate and queue.
async fn processor(config: &Config, tweak: impl FnOnce(&mut Config)) -> TestApp {
    let mut config = config.clone();
    config.server.role = Role::Processor;
    tweak(&mut config);
    let app = TestApp::start(config, None, tempfile::tempdir().unwrap()).await;
    app.wait_serving().await;
    app
}

/// An API-only replica owning the test's database and queues.
async fn api_only() -> TestApp {
    TestApp::spawn_with(Profile::Rabbit, |c| c.server.role = Role::Api).await
}

#[tokio::test(flavor = "multi_thread")]
async fn ten_thousand_reservations_over_five_thousand_units_end_as_five_thousand_orders() {
    let app = TestApp::spawn(Profile::Rabbit).await;
    app.set_stock("TENK", 5_000, 0).await;
    let tally = storm(app.addr, "TENK", 10_000, 8, |_| 1).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    assert_eq!(tally.count(ReserveOutcome::Queued), 5_000);
    assert_eq!(tally.count(ReserveOutcome::SoldOut), 5_000);
    app.drain("TENK").await;
    let ordered = assert_invariants(&app, "TENK", 5_000, &tally).await;
    assert_eq!(ordered, 5_000);
    // Every order ends confirmed: none stays queued or held.
    let mut client = app.inventory();
    let store = open_store(&app.config);
    let rows = store
        .reservations_of(&Sku::parse("TENK").unwrap())
        .await
        .unwrap();
    for row in &rows {
        assert_eq!(row.state, DomainState::Held);
        let confirmed = confirm(&mut client, row.id.as_str(), row.user.as_str())
            .await
            .unwrap();
        assert_eq!(confirmed.state(), ReservationState::Confirmed);
    }
    assert_eq!(queue_depth(&app.config.rabbitmq.queue).await, 0);
    let view = app.stock("TENK").await;
    assert_eq!((view.db_stock, view.confirmed_units), (0, 5_000));
    crate::harness::assert_checked(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn only_one_processor_consumes_and_the_standby_takes_over() {
    let app = api_only().await;
    app.set_stock("SAC", 400, 0).await;
    let first = processor(&app.config, |_| {}).await;
    // Let the first register before the standby, so it is the active one.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = processor(&app.config, |_| {}).await;
    let consumers = list_consumers(&app.config.rabbitmq.queue);
    assert_eq!(consumers.len(), 2, "{consumers:?}");
    assert_eq!(
        consumers.iter().filter(|active| **active).count(),
        1,
        "exactly one active consumer: {consumers:?}"
    );
    let before = storm(app.addr, "SAC", 200, 4, |_| 1).await;
    app.drain("SAC").await;
    // The active one goes away; the standby must take over.
    first.stop().await;
    let after = storm_users(&app, "SAC", 200, 200).await;
    app.drain("SAC").await;
    let consumers = list_consumers(&app.config.rabbitmq.queue);
    assert_eq!(consumers, vec![true], "the standby is now active");
    let mut tally = before;
    tally.granted.extend(after);
    assert_eq!(assert_invariants(&app, "SAC", 400, &tally).await, 400);
    second.stop().await;
    app.stop().await;
}

/// Reserve calls from users `u{from}`.. that did not take part yet.
async fn storm_users(app: &TestApp, sku: &str, from: usize, n: usize) -> Vec<(String, u32)> {
    let mut client = app.inventory();
    let mut granted = Vec::new();
    for i in from..from + n {
        let response = reserve(&mut client, sku, 1, &format!("u{i}"))
            .await
            .unwrap();
        assert_eq!(response.outcome(), ReserveOutcome::Queued);
        granted.push((response.reservation.unwrap().reservation_id, 1));
    }
    granted
}

/// The processor as a real process, killed with SIGKILL while it commits,
/// twice: no order lost, none doubled, the queue drained by the next one.
#[tokio::test(flavor = "multi_thread")]
async fn processor_killed_mid_batch_loses_and_doubles_nothing() {
    let app = api_only().await;
    app.set_stock("KILL", 3_000, 0).await;
    let tally = storm(app.addr, "KILL", 3_000, 8, |_| 1).await;
    assert_eq!(tally.count(ReserveOutcome::Queued), 3_000);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("processor.toml");
    let mut config = app.config.clone();
    config.server.role = Role::Processor;
    config.layers.queue.batch_size = 100;
    config.layers.queue.linger_ms = 0;
    std::fs::write(&file, toml::to_string(&config).unwrap()).unwrap();
    let store = open_store(&app.config);
    let sku = Sku::parse("KILL").unwrap();
    let mut last = 0;
    for round in 0..2 {
        let mut child = spawn_processor(&file);
        // Kill once this process has committed something.
        loop {
            let rows = store.reservations_of(&sku).await.unwrap().len();
            if rows > last {
                last = rows;
                break;
            }
            assert!(child.try_wait().unwrap().is_none(), "processor exited");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(last < 3_000, "round {round}: killed too late to matter");
    }
    let mut child = spawn_processor(&file);
    app.drain("KILL").await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(assert_invariants(&app, "KILL", 3_000, &tally).await, 3_000);
    assert_eq!(queue_depth(&app.config.rabbitmq.queue).await, 0);
    crate::harness::assert_checked(&app).await;
    app.stop().await;
}

fn spawn_processor(config: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_stockgate"))
        .arg("--config")
        .arg(config)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("STOCKGATE_LOG__FILTER", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// An order the database keeps refusing (here: a creation time PostgreSQL
/// cannot store, as a buggy producer might send) is given up after the
/// configured attempts: REJECTED with the reason, units back in the gate,
/// the message in the dead-letter queue, and the queue moves on.
#[tokio::test(flavor = "multi_thread")]
async fn poison_order_lands_in_the_dead_letter_queue_with_its_units_returned() {
    let app = TestApp::spawn_with(Profile::Rabbit, |c| c.layers.queue.max_attempts = 3).await;
    app.set_stock("POISON", 5, 0).await;
    let gate = RedisGate::connect(&app.config.backends.gate, &app.config.redis).unwrap();
    let order = NewOrder {
        id: ReservationId::generate(),
        sku: Sku::parse("POISON").unwrap(),
        user: UserId::parse("mallory").unwrap(),
        quantity: 2,
        idempotency_key: None,
        created_at: chrono::NaiveDate::from_ymd_opt(-5000, 1, 1)
            .unwrap()
            .and_hms_opt(0, 0, 0)
            .unwrap(),
    };
    let remaining = admit(
        &gate,
        &order.id,
        order.sku.as_str(),
        order.user.as_str(),
        order.quantity,
    )
    .await;
    assert_eq!(remaining, 3);
    let producer = RabbitQueue::new(
        &app.config.backends.queue,
        &app.config.rabbitmq,
        open_store(&app.config),
    );
    producer.publish(order.clone(), true, None).await.unwrap();
    wait_given_up(&app.config, &gate, &order.id, "processing failed", 5).await;
    // The queue moved on: a good order behind it is committed.
    let mut client = app.inventory();
    let good = reserve(&mut client, "POISON", 1, "alice").await.unwrap();
    assert_eq!(good.outcome(), ReserveOutcome::Queued);
    wait_rows(&app.config, "POISON", 2, Duration::from_secs(10)).await;
    assert_eq!(app.stock("POISON").await.db_stock, 4);
    app.stop().await;
}

/// The queue's messages until they hold `orders` orders, and any that come
/// within a moment after: each message's orders (decoded as the processor
/// decodes them) and its version. Consumes them (a single-active-consumer
/// quorum queue allows no `basic.get`).
async fn drain_orders(
    queue: &str,
    orders: usize,
) -> Vec<(u64, Vec<stockgate::queue::QueuedOrder>)> {
    let (_conn, channel) = crate::harness::amqp_channel().await;
    let mut consumer = channel
        .basic_consume(
            queue.into(),
            "".into(),
            lapin::options::BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            Default::default(),
        )
        .await
        .unwrap();
    let mut messages = Vec::new();
    let mut seen = 0;
    loop {
        let wait = if seen < orders { 10_000 } else { 300 };
        let Ok(next) = tokio::time::timeout(Duration::from_millis(wait), consumer.next()).await
        else {
            assert!(seen >= orders, "{seen} of {orders} orders in the queue");
            return messages;
        };
        let body = next.unwrap().unwrap().data;
        let version: serde_json::Value = serde_json::from_slice(&body).unwrap();
        let decoded: Vec<_> = stockgate::queue::decode_message(&body)
            .into_iter()
            .map(|order| order.expect("every order published reads back"))
            .collect();
        seen += decoded.len();
        messages.push((version["v"].as_u64().unwrap(), decoded));
    }
}

/// 600 publishes at once from 600 callers, with `publish_batch_max`; the
/// tickets they were answered with, and the queue's messages.
async fn publish_at_once(
    app: &TestApp,
    publish_batch_max: usize,
) -> (
    Vec<(ReservationId, u64)>,
    Vec<(u64, Vec<stockgate::queue::QueuedOrder>)>,
) {
    let mut rabbit = app.config.rabbitmq.clone();
    rabbit.publish_batch_max = publish_batch_max;
    let producer = std::sync::Arc::new(RabbitQueue::new(
        &app.config.backends.queue,
        &rabbit,
        open_store(&app.config),
    ));
    let calls: Vec<_> = (0..600)
        .map(|i| {
            let producer = producer.clone();
            tokio::spawn(async move {
                let order = NewOrder {
                    id: ReservationId::generate(),
                    sku: Sku::parse("LINE").unwrap(),
                    user: UserId::parse(&format!("t{i}")).unwrap(),
                    quantity: 1,
                    idempotency_key: None,
                    created_at: stockgate::domain::now(),
                };
                let id = order.id.clone();
                (id, producer.publish(order, false, None).await.unwrap())
            })
        })
        .collect();
    let mut answered = Vec::new();
    for call in calls {
        answered.push(call.await.unwrap());
    }
    (answered, drain_orders(&producer.names().orders, 600).await)
}

/// Publishes made at once share ticket statements and messages, yet each
/// order gets a ticket of its own, none is skipped (the line has no holes
/// for positions to count), and each order is in the queue once, with the
/// ticket its caller was told.
#[tokio::test(flavor = "multi_thread")]
async fn concurrent_publishes_each_get_their_own_ticket() {
    let app = api_only().await;
    let (answered, messages) = publish_at_once(&app, 64).await;
    let mut tickets: Vec<u64> = answered.iter().map(|(_, t)| *t).collect();
    tickets.sort_unstable();
    tickets.dedup();
    assert_eq!(tickets.len(), 600, "a ticket was handed out twice");
    assert_eq!(tickets[599] - tickets[0], 599, "the line has holes");
    let queued: std::collections::HashMap<String, u64> = messages
        .iter()
        .flat_map(|(_, orders)| orders)
        .map(|q| (q.order.id.as_str().to_owned(), q.ticket))
        .collect();
    let told: std::collections::HashMap<String, u64> = answered
        .iter()
        .map(|(id, t)| (id.as_str().to_owned(), *t))
        .collect();
    assert_eq!(queued, told, "the queue holds each order once, as told");
    // 600 callers at once share messages, none over the limit, and a
    // message of several orders is a version 2 batch.
    assert!(messages.len() < 600, "{} messages", messages.len());
    for (version, orders) in &messages {
        assert!(orders.len() <= 64, "{} orders in one message", orders.len());
        assert_eq!(*version, if orders.len() == 1 { 1 } else { 2 });
    }
    app.stop().await;
}

/// `publish_batch_max = 1` publishes version 1 messages only, one order
/// each, as a processor from before batching reads them.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_limit_of_one_publishes_one_order_per_message() {
    let app = api_only().await;
    let (answered, messages) = publish_at_once(&app, 1).await;
    assert_eq!(answered.len(), 600);
    assert_eq!(messages.len(), 600);
    assert!(messages
        .iter()
        .all(|(v, orders)| *v == 1 && orders.len() == 1));
    app.stop().await;
}

/// With a backlog and a slow processor, the position a watcher sees only
/// falls, and the stream ends in the final state. Before any processor
/// runs, confirming or releasing is refused as STILL_QUEUED.
#[tokio::test(flavor = "multi_thread")]
async fn watched_positions_fall_monotonically_and_end_in_the_final_state() {
    let app = api_only().await;
    app.set_stock("POS", 60, 0).await;
    let mut client = app.inventory();
    let mut last_id = String::new();
    for i in 0..60 {
        let response = reserve(&mut client, "POS", 1, &format!("p{i}"))
            .await
            .unwrap();
        assert_eq!(response.outcome(), ReserveOutcome::Queued);
        let reservation = response.reservation.unwrap();
        assert_eq!(reservation.queue_position, Some(i));
        last_id = reservation.reservation_id;
    }
    // Nothing consumes yet: confirming or releasing it is refused with a reason of its
    // own, so the caller knows to watch it rather than give up on it.
    for status in [
        confirm(&mut client, &last_id, "p59").await.unwrap_err(),
        release(&mut client, &last_id, "p59").await.unwrap_err(),
    ] {
        assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
        assert_eq!(error_reason(&status), "STILL_QUEUED");
    }
    let mut watch = client
        .watch_reservation(with_user(
            WatchReservationRequest {
                reservation_id: last_id.clone(),
            },
            "p59",
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    let worker = processor(&app.config, |c| {
        c.layers.queue.batch_size = 5;
        c.layers.queue.linger_ms = 0;
    })
    .await;
    let mut positions = Vec::new();
    let mut last_state = ReservationState::Unspecified;
    while let Ok(Some(update)) = tokio::time::timeout(Duration::from_secs(20), watch.next()).await {
        let reservation = update.unwrap().reservation.unwrap();
        last_state = reservation.state();
        if let Some(position) = reservation.queue_position {
            positions.push(position);
        }
        // HELD is where the queue's part ends (confirm or release is the
        // caller's next step).
        if last_state != ReservationState::Queued {
            break;
        }
    }
    assert_eq!(last_state, ReservationState::Held, "{positions:?}");
    assert!(positions.len() >= 2, "{positions:?}");
    assert_eq!(positions[0], 59);
    assert!(
        positions.windows(2).all(|w| w[1] <= w[0]),
        "positions rose: {positions:?}"
    );
    worker.stop().await;
    app.stop().await;
}

/// Reserve with the broker unreachable: UNAVAILABLE, and the gate's units
/// come back (nothing admitted is left hanging).
#[tokio::test(flavor = "multi_thread")]
async fn unreachable_broker_answers_unavailable_and_returns_the_units() {
    let (mut config, db, dir) = config_for(Profile::Rabbit).await;
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    config.backends.queue = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let app = TestApp::start(config, db, dir).await;
    app.wait_serving().await;
    app.set_stock("NOMQ", 3, 0).await;
    let mut client = app.inventory();
    for i in 0..5 {
        let status = reserve(&mut client, "NOMQ", 1, &format!("n{i}"))
            .await
            .unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("queue"), "{status:?}");
    }
    let view = app.stock("NOMQ").await;
    assert_eq!((view.db_stock, view.gate_stock), (3, Some(3)));
    app.stop().await;
}

/// The broker goes away mid-sale (through a relay this test owns, so the
/// shared broker stays up for the tests beside it): Reserve answers
/// UNAVAILABLE while it is gone, publishing and processing resume on their
/// own, and nothing admitted is lost or left held in the gate.
#[tokio::test(flavor = "multi_thread")]
async fn broker_outage_mid_sale_refuses_then_recovers_losing_nothing() {
    let relay = Relay::start("127.0.0.1:5672".parse().unwrap()).await;
    let app = TestApp::spawn_with(Profile::Rabbit, |c| {
        c.backends.queue = format!("amqp://guest:guest@{}/%2f", relay.addr);
        c.rabbitmq.reconnect_delay_ms = 100;
    })
    .await;
    app.set_stock("OUTAGE", 1_000, 0).await;
    let client = app.inventory();
    let mut tally = StormTally::default();
    let call = |i: usize| {
        let mut client = client.clone();
        async move { reserve(&mut client, "OUTAGE", 1, &format!("o{i}")).await }
    };
    for i in 0..100 {
        record(&mut tally, call(i).await);
    }
    assert_eq!(tally.count(ReserveOutcome::Queued), 100);

    relay.set_up(false);
    for i in 100..200 {
        let status = call(i).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    }

    relay.set_up(true);
    reserve_until_queued(&mut tally, &call, 200, 200, Duration::from_secs(10)).await;
    app.drain("OUTAGE").await;
    assert_eq!(assert_invariants(&app, "OUTAGE", 1_000, &tally).await, 200);
    let view = app.stock("OUTAGE").await;
    assert_eq!(view.gate_stock, Some(view.db_stock), "{view:?}");
    let after = call(1_000_000).await.unwrap();
    assert_eq!(after.outcome(), ReserveOutcome::Queued);
    crate::harness::assert_checked(&app).await;
    app.stop().await;
}

/// After an outage ends: calls as users `from`, `from + 1`, … until
/// `tally` holds `queued` QUEUED answers. Every refusal meanwhile must be
/// UNAVAILABLE, and refusals must stop within `within` (publishing resumes
/// on its own).
async fn reserve_until_queued<F, Fut>(
    tally: &mut StormTally,
    call: F,
    from: usize,
    queued: usize,
    within: Duration,
) where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = Result<stockgate::pb::ReserveResponse, tonic::Status>>,
{
    let resumed = tokio::time::Instant::now();
    let mut i = from;
    while tally.count(ReserveOutcome::Queued) < queued {
        match call(i).await {
            Ok(response) => record(tally, Ok(response)),
            Err(status) => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                assert!(resumed.elapsed() < within, "publishing did not resume");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        i += 1;
    }
}

fn record(tally: &mut StormTally, result: Result<stockgate::pb::ReserveResponse, tonic::Status>) {
    let response = result.unwrap();
    let outcome = response.outcome();
    *tally.outcomes.entry(outcome).or_default() += 1;
    if crate::harness::is_admitted(outcome) {
        tally
            .granted
            .insert(response.reservation.unwrap().reservation_id, 1);
    }
}

/// `stockgate bench-queue` runs end to end (small N) against the real
/// broker, PostgreSQL and pgbench. Its figures are for the README, not
/// asserted.
#[tokio::test(flavor = "multi_thread")]
async fn bench_queue_runs_and_reports_every_measurement() {
    let db = crate::harness::TestDb::create().await;
    let options = stockgate_tools::bench::queue::QueueBenchOptions {
        orders: 300,
        batch_size: 16,
        rounds: 1,
        store: db.url.clone(),
        amqp: crate::harness::amqp_url(),
        partitions: 4,
        processors: 2,
    };
    let (results, statements) = stockgate_tools::bench::queue::run(options.clone())
        .await
        .unwrap();
    let names: Vec<_> = results.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "pgbench, update + insert, 1 client",
            "queue + processor, batch size 16",
            "queue + processor, batch size 16, 16 SKUs",
            "queue + processor, batch size 16, 16 SKUs, 4 partitions, 1 processor",
            "queue + processor, batch size 16, 16 SKUs, 4 partitions, 2 processors",
            "queue + processor, batch size 1",
            "queue + processor, batch size 16, 16 orders/message"
        ]
    );
    assert!(results.iter().all(|m| m.per_sec > 0.0), "{results:?}");
    // Measured, so only its shape is certain: one batch, a few statements.
    assert_eq!(statements.orders, 16);
    assert!((3..20).contains(&statements.on_one_sku), "{statements:?}");
    let table = stockgate_tools::bench::queue::render(&results, &statements, &options);
    assert!(table.contains("x batch 1"), "{table}");
    assert!(
        table.contains("4 partitions on 1 processor / one queue"),
        "{table}"
    );
    assert!(
        table.contains("statements per batch of 16 orders"),
        "{table}"
    );
    db.drop_now().await;
}

/// `stockgate bench` through PostgreSQL and RabbitMQ (small N): the row
/// publishing one order per message is there, and the CPU columns read
/// the broker's and the database's processes where admitted orders went.
#[tokio::test(flavor = "multi_thread")]
async fn bench_through_rabbitmq_reads_the_brokers_and_the_databases_cpu() {
    let db = crate::harness::TestDb::create().await;
    let options = stockgate_tools::bench::BenchOptions {
        // Enough work that the 10 ms ticks of /proc/<pid>/stat cannot miss
        // the broker's share (about 40 µs per order).
        requests: 2_000,
        concurrency: 16,
        connections: 2,
        rounds: 1,
        redis_url: crate::harness::redis_url(),
        store: db.url.clone(),
        queue: crate::harness::amqp_url(),
        tracing: false,
        partitions: 1,
    };
    let results = stockgate_tools::bench::run(options).await.unwrap();
    let names: Vec<_> = results.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(
        names[2..],
        [
            "Reserve, sold out",
            "Reserve, stock available",
            "Reserve, stock, 1 order/message"
        ]
    );
    for m in &results[1..] {
        assert_eq!(m.failures, 0, "{m:?}");
    }
    for m in &results[3..] {
        let cpu = m.cpu.expect("cpu per call");
        assert!(cpu.rabbitmq_us > 0.0 && cpu.postgres_us > 0.0, "{m:?}");
    }
    db.drop_now().await;
}

/// The many-SKU storm bench (small N) through PostgreSQL, Redis and
/// RabbitMQ: both sales of the round hold every invariant, the one-SKU
/// sale commits exactly its units, the many-SKU sale commits what it
/// admitted, each with a commit span to divide by, and the ratio is shown.
/// Its orders go through two partitioned queues (`--partitions 2`).
#[tokio::test(flavor = "multi_thread")]
async fn the_many_sku_bench_compares_commit_rates_in_one_round() {
    use stockgate_tools::bench::storm::{render_many_skus, run_many_skus, ManySkus};
    let db = crate::harness::TestDb::create().await;
    let options = stockgate_tools::bench::BenchOptions {
        requests: 600,
        concurrency: 32,
        connections: 2,
        rounds: 1,
        redis_url: crate::harness::redis_url(),
        store: db.url.clone(),
        queue: crate::harness::amqp_url(),
        tracing: false,
        partitions: 2,
    };
    let sale = ManySkus {
        skus: 20,
        stock: 10,
        zipf: 1.0,
    };
    let rounds = run_many_skus(options.clone(), sale).await.unwrap();
    let shown = render_many_skus(&rounds, &options, sale);
    let round = &rounds[0];
    for c in [&round.one, &round.many] {
        assert!(c.storm.ok(), "{shown}");
        assert_eq!(c.orders as usize, c.storm.admitted, "{shown}");
        assert!(c.span_secs > 0.0 && c.per_sec() > 0.0, "{shown}");
    }
    assert_eq!(round.one.orders, 200, "{shown}");
    assert!(round.many.orders <= 200, "{shown}");
    assert!(
        shown.contains("committed orders/s, many SKUs / 1 SKU: "),
        "{shown}"
    );
    assert!(shown.contains("partitions=2"), "{shown}");
    // The in-process processor consumed both queues during each sale.
    assert_eq!(
        (round.one.partitions_held, round.many.partitions_held),
        (2, 2),
        "{shown}"
    );
    db.drop_now().await;
}

/// Starts the broker again however the test ends, so a failure here does
/// not take RabbitMQ away from the rest of the suite.
struct BrokerRestart;

impl BrokerRestart {
    fn stop() -> Self {
        rabbitmqctl(&["stop_app"]);
        BrokerRestart
    }
}

impl Drop for BrokerRestart {
    fn drop(&mut self) {
        rabbitmqctl(&["start_app"]);
        rabbitmqctl(&["await_startup"]);
    }
}

fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl on this machine");
    assert!(out.status.success(), "rabbitmqctl {args:?}: {out:?}");
}

/// The real broker stopped and started again mid-sale (its app, not the
/// node, so it is back in seconds; the test owns the shared broker while it
/// runs, see [`crate::harness::own_shared_broker`]). Orders queued before
/// the stop survive in the quorum queue and are committed; Reserve answers
/// UNAVAILABLE while it is down and resumes on its own.
#[tokio::test(flavor = "multi_thread")]
async fn broker_restart_mid_sale_keeps_queued_orders_and_resumes() {
    crate::harness::own_shared_broker();
    let app = api_only().await;
    app.set_stock("RESTART", 1_000, 0).await;
    let client = app.inventory();
    let call = |i: usize| {
        let mut client = client.clone();
        async move { reserve(&mut client, "RESTART", 1, &format!("r{i}")).await }
    };
    let mut tally = StormTally::default();
    // Queued with no processor running: these wait in the broker.
    for i in 0..100 {
        record(&mut tally, call(i).await);
    }
    {
        let _down = BrokerRestart::stop();
        for i in 100..150 {
            let status = call(i).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        }
    }
    reserve_until_queued(&mut tally, &call, 150, 200, Duration::from_secs(30)).await;
    let worker = processor(&app.config, |_| {}).await;
    app.drain("RESTART").await;
    assert_eq!(assert_invariants(&app, "RESTART", 1_000, &tally).await, 200);
    let view = app.stock("RESTART").await;
    assert_eq!(view.gate_stock, Some(view.db_stock), "{view:?}");
    worker.stop().await;
    crate::harness::assert_checked(&app).await;
    app.stop().await;
}

/// Confirms that come too late (a 1 ms publish timeout, far below a quorum
/// queue's write): callers hear UNAVAILABLE, the broker still delivers the
/// orders, and each finds its fence (or, when the processor was faster than
/// the fence, the caller is answered with the order it made). No order
/// exists that no caller was told about, and the gate ends level with the
/// database.
#[tokio::test(flavor = "multi_thread")]
async fn unconfirmed_publishes_are_fenced_and_their_late_delivery_creates_nothing() {
    let app = TestApp::spawn_with(Profile::Rabbit, |c| c.rabbitmq.publish_timeout_ms = 1).await;
    app.set_stock("FENCE", 1_000, 0).await;
    let client = app.inventory();
    let mut tally = StormTally::default();
    let mut unavailable = 0;
    // A burst whose confirms all come within the millisecond is possible
    // on an idle broker: another burst, then.
    for burst in 0..4 {
        let calls = (0..200).map(|i| {
            let mut client = client.clone();
            let user = format!("f{burst}-{i}");
            tokio::spawn(async move { reserve(&mut client, "FENCE", 1, &user).await })
        });
        for call in futures::future::join_all(calls).await {
            match call.unwrap() {
                Ok(response) => record(&mut tally, Ok(response)),
                Err(status) => {
                    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                    unavailable += 1;
                }
            }
        }
        if unavailable > 0 {
            break;
        }
    }
    assert!(unavailable > 0, "no publish timed out");
    // Every message, fenced or not, is consumed.
    for _ in 0..400 {
        if queue_depth(&app.config.rabbitmq.queue).await == 0
            && app.stock("FENCE").await.queued_units == 0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let ordered = assert_invariants(&app, "FENCE", 1_000, &tally).await;
    assert_eq!(ordered as usize, tally.granted.len());
    let view = app.stock("FENCE").await;
    assert_eq!(view.gate_stock, Some(view.db_stock), "{view:?}");
    crate::harness::assert_checked(&app).await;
    app.stop().await;
}

/// Takes `quantity` units of `sku` at the gate for reservation `id`, as
/// an API replica does before publishing; the units left.
async fn admit(gate: &RedisGate, id: &ReservationId, sku: &str, user: &str, quantity: u32) -> i64 {
    let entry = GateEntry::new(
        id.clone(),
        Sku::parse(sku).unwrap(),
        UserId::parse(user).unwrap(),
        quantity,
    );
    match gate.reserve(&entry).await.unwrap() {
        GateDecision::Reserved { remaining } => remaining,
        other => panic!("the gate refused {sku}: {other:?}"),
    }
}

/// A message this processor cannot read (here: a newer wire version) whose
/// reservation can still be identified is recorded REJECTED with its units
/// back, as well as dead-lettered, so its caller is not left QUEUED.
#[tokio::test(flavor = "multi_thread")]
async fn unreadable_message_is_rejected_with_its_units_returned() {
    let app = TestApp::spawn(Profile::Rabbit).await;
    app.set_stock("UNREAD", 5, 0).await;
    let gate = RedisGate::connect(&app.config.backends.gate, &app.config.redis).unwrap();
    let id = ReservationId::generate();
    let remaining = admit(&gate, &id, "UNREAD", "mallory", 2).await;
    assert_eq!(remaining, 3);
    let body = serde_json::json!({
        "v": 99, "ticket": 1, "id": id.as_str(), "sku": "UNREAD", "user": "mallory",
        "quantity": 2, "gated": true, "created_at": 0, "something_new": [1, 2, 3]
    });
    crate::harness::publish(
        &app.config.rabbitmq.queue,
        &serde_json::to_vec(&body).unwrap(),
        Default::default(),
    )
    .await;
    wait_given_up(&app.config, &gate, &id, "unknown message version 99", 5).await;
    app.stop().await;
}

/// In a batch message, an order this processor cannot read is set aside on
/// its own: it is dead-lettered as a message of its own, recorded REJECTED
/// with its units back, and the batch's other orders are committed.
#[tokio::test(flavor = "multi_thread")]
async fn one_unreadable_order_in_a_batch_leaves_the_others_committed() {
    let app = TestApp::spawn(Profile::Rabbit).await;
    app.set_stock("MIXED", 5, 0).await;
    let gate = RedisGate::connect(&app.config.backends.gate, &app.config.redis).unwrap();
    let (good, bad) = (ReservationId::generate(), ReservationId::generate());
    for (id, user) in [(&good, "alice"), (&bad, "mallory")] {
        admit(&gate, id, "MIXED", user, 1).await;
    }
    let order = |v: u32, id: &ReservationId, user: &str, ticket: u64| {
        serde_json::json!({
            "v": v, "ticket": ticket, "id": id.as_str(), "sku": "MIXED", "user": user,
            "quantity": 1, "gated": true, "created_at": 1_700_000_000_000_000i64,
            "idempotency_key": null
        })
    };
    let body = serde_json::json!({
        "v": 2,
        "orders": [order(1, &good, "alice", 1), order(99, &bad, "mallory", 2)]
    });
    crate::harness::publish(
        &app.config.rabbitmq.queue,
        &serde_json::to_vec(&body).unwrap(),
        Default::default(),
    )
    .await;
    // One unit went back (the bad order's); the good order holds its own.
    wait_given_up(&app.config, &gate, &bad, "unknown message version 99", 4).await;
    let store = open_store(&app.config);
    let row = store
        .reservation(&good)
        .await
        .unwrap()
        .expect("the good order's row");
    assert_eq!(row.state, DomainState::Held);
    // The dead letter is the bad order alone, as the batch carried it.
    let names = QueueNames::new(&app.config.rabbitmq.queue);
    let (_conn, channel) = crate::harness::amqp_channel().await;
    let dead = channel
        .basic_get(
            names.dead_letters.as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .expect("a dead letter");
    let kept: serde_json::Value = serde_json::from_slice(&dead.delivery.data).unwrap();
    assert_eq!(kept, order(99, &bad, "mallory", 2));
    assert_eq!(app.stock("MIXED").await.db_stock, 4);
    app.stop().await;
}
