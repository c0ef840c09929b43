//! PostgreSQL failover: the store given a primary and its streaming
//! standby (`ci/pg-pair`, one pair per test) with
//! `target_session_attrs=read-write`; the primary crashes mid-sale and the
//! standby is promoted. Commits happen in the request path (queue layer
//! off), so a caller told RESERVED was told so after the commit.

use std::{
    collections::HashSet,
    time::{Duration, Instant},
};

use stockgate::domain::Sku;

use crate::harness::{
    assert_checked, assert_invariants, config_for, is_admitted, lost_admissions, open_store,
    replicated::{keyed_sale, KeyedTally, PgPair},
    Profile, StormTally, TestApp,
};

/// A service whose store is `pair`, committing in the request path.
async fn app_on(pair: &PgPair) -> TestApp {
    let (mut config, _, dir) = config_for(Profile::Embedded).await;
    config.backends.store = pair.store_url();
    config.store.max_connections = 8;
    // During the outage a call waits this long for a connection, then is
    // refused: short, so callers retry while it lasts.
    config.store.acquire_timeout_ms = 1_000;
    config.layers.queue.enabled = false;
    config.server.request_timeout_ms = 10_000;
    // The reconciler levels a gate that counted lost orders as sold after
    // two passes that agree: seconds after a promotion, so a check just
    // after it still sees the gate's count.
    config.layers.gate.reconcile_interval_ms = 1_000;
    config.metrics.listen = "127.0.0.1:0".into();
    let app = TestApp::start(config, None, dir).await;
    app.wait_serving().await;
    app
}

/// Synchronous replication: the primary acknowledges a commit once the
/// standby has flushed it. The primary crashes mid-sale and the standby
/// is promoted a second later. Calls meanwhile are refused (UNAVAILABLE)
/// and retried with their keys; the service finds the new primary; every
/// caller told RESERVED has exactly one order on it; an order whose
/// commit lost its answer in the crash was either found committed (and
/// answered RESERVED) or fenced off (and answered UNAVAILABLE), never
/// both; the checker agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_with_a_synchronous_standby_loses_no_acknowledged_order() {
    let pair = PgPair::start(true);
    let app = app_on(&pair).await;
    const STOCK: i64 = 100_000;
    app.set_stock("PG-SYNC", STOCK, 0).await;

    let (heard, after) = crash_mid_sale(&app, &pair, "PG-SYNC").await;

    let ordered = assert_invariants(&app, "PG-SYNC", STOCK, &heard.tally).await;
    assert_eq!(
        ordered,
        heard.tally.granted.len() as i64,
        "one order per caller told RESERVED"
    );
    assert_checked(&app).await;
    let fenced = fences(&app, "PG-SYNC").await;
    let metrics = crate::ops::scrape(app.metrics_addr.unwrap()).await;
    let resolved: f64 = ["commit_found", "commit_fenced"]
        .iter()
        .map(|decision| {
            crate::ops::sum(
                &metrics,
                stockgate::metrics::DECISIONS,
                &[("layer", "db"), ("decision", decision)],
            )
        })
        .sum();
    assert!(resolved > 0.0, "no commit lost its answer in the crash");
    eprintln!(
        "{ordered} orders, {after} after the promotion, {resolved} commits without an answer ({fenced} fenced off)"
    );
    app.stop().await;
}

/// Asynchronous replication (PostgreSQL's default): the primary
/// acknowledges a commit before the standby has it. Here the standby is
/// stopped, five more orders are acknowledged, then the primary crashes
/// and the standby is promoted: exactly those five are gone, and the
/// caller-side check names them lost. What was replicated is intact and
/// the promoted database is consistent (stock left = stock - units
/// ordered); the gate, which counted the lost five as sold, is levelled
/// by the reconciler.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_asynchronous_replication_a_crash_loses_exactly_the_commits_the_standby_lacked() {
    let pair = PgPair::start(false);
    let app = app_on(&pair).await;
    app.set_stock("PG-ASYNC", 100, 0).await;
    let mut replicated = StormTally::default();
    let mut late = StormTally::default();
    for (tally, prefix) in [(&mut replicated, "early"), (&mut late, "late")] {
        if prefix == "late" {
            // Everything so far replayed, then the standby stops where it is.
            wait_replayed(&pair);
            pair.ctl("standby", &["stop", "-m", "fast"]);
        }
        for i in 0..5 {
            let answer = app
                .reserve_as("PG-ASYNC", &format!("{prefix}-{i}"), None)
                .await;
            assert!(is_admitted(answer.outcome()), "{answer:?}");
            tally
                .granted
                .insert(answer.reservation.unwrap().reservation_id, 1);
        }
    }
    pair.crash_primary();
    pair.ctl("standby", &["start"]);
    pair.ctl("standby", &["promote"]);
    // The service's checker sees the gate's count of the lost five.
    let report = app.check().await;
    assert!(
        !report.ok && format!("{:?}", report.skus).contains("gate 90"),
        "{report:?}"
    );

    let mut all = StormTally::default();
    let late_ids: HashSet<String> = late.granted.keys().cloned().collect();
    all.absorb(replicated);
    all.absorb(late);
    let lost: HashSet<String> = lost_admissions(&app, "PG-ASYNC", &all)
        .await
        .into_iter()
        .collect();
    assert_eq!(lost, late_ids, "exactly the unreplicated commits are lost");

    let store = open_store(&app.config);
    let sku = Sku::parse("PG-ASYNC").unwrap();
    let left = store.inventory(&sku).await.unwrap().unwrap().stock;
    let rows = store.reservations_of(&sku).await.unwrap();
    assert_eq!(rows.len(), 5, "the replicated orders");
    assert_eq!(left, 95, "the promoted database is consistent");
    // The gate counted the lost five as sold, and the checker said so until
    // the reconciler levelled it: the five units sell again.
    assert_checked(&app).await;
    for i in 0..95 {
        let answer = app
            .reserve_as("PG-ASYNC", &format!("after-{i}"), None)
            .await;
        assert!(is_admitted(answer.outcome()), "{i}: {answer:?}");
    }
    app.stop().await;
}

/// Keyed buyers of `sku` (8 at a time, retrying refusals with their keys)
/// while the primary crashes and, a second later, the standby is
/// promoted; four seconds after that the sale stops. What they heard, and
/// how many were admitted after the promotion; fails unless the crash was
/// felt, every buyer's outcome settled and sales went on afterwards.
async fn crash_mid_sale(app: &TestApp, pair: &PgPair, sku: &str) -> (KeyedTally, usize) {
    let sale = keyed_sale(app.addr, &[sku], 8, Duration::from_secs(30));
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    pair.crash_primary();
    tokio::time::sleep(Duration::from_secs(1)).await;
    pair.ctl("standby", &["promote"]);
    let promoted = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let heard = sale.finish().await;
    assert!(heard.refusals > 0, "no caller felt the crash");
    heard.assert_resolved();
    let after = heard.admitted_after(promoted);
    assert!(after > 0, "nothing was sold on the promoted standby");
    (heard, after)
}

/// Waits until the standby has replayed all the primary has written.
fn wait_replayed(pair: &PgPair) {
    for _ in 0..200 {
        let caught_up = pair.psql(
            "primary",
            "SELECT replay_lsn >= pg_current_wal_lsn() FROM pg_stat_replication",
        );
        if caught_up == "t" {
            return;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("the standby did not catch up");
}

/// Reservations of `sku` fenced off after a commit lost its answer.
async fn fences(app: &TestApp, sku: &str) -> usize {
    let store = open_store(&app.config);
    store
        .reservations_of(&Sku::parse(sku).unwrap())
        .await
        .unwrap()
        .iter()
        .filter(|row| {
            row.reject_reason
                .as_deref()
                .is_some_and(|r| r.starts_with(stockgate::reserve::COMMIT_FENCE_REASON))
        })
        .count()
}

/// The same crash with the queue layer on (RabbitMQ, the Redis gate):
/// callers are told QUEUED once the broker confirms, and the processor
/// commits later. While no primary answers, Reserve is refused (queue
/// tickets come from the database) and the processor's batch commits
/// fail and are retried; after the promotion it commits them on the new
/// primary, a batch whose commit lost its answer found committed by its
/// reservation ids. Every caller told QUEUED has exactly one order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_primary_mid_sale_through_the_queue_loses_no_queued_order() {
    let pair = PgPair::start(true);
    let (mut config, db, dir) = config_for(Profile::Rabbit).await;
    config.backends.store = pair.store_url();
    config.store.acquire_timeout_ms = 1_000;
    config.server.request_timeout_ms = 10_000;
    // The test's queue goes when its (unused) machine database does.
    let app = TestApp::start(config, db, dir).await;
    app.wait_serving().await;
    app.set_stock("PG-QUEUE", 100_000, 0).await;

    let (heard, after) = crash_mid_sale(&app, &pair, "PG-QUEUE").await;
    app.drain("PG-QUEUE").await;
    let ordered = assert_invariants(&app, "PG-QUEUE", 100_000, &heard.tally).await;
    assert_eq!(
        ordered,
        heard.tally.granted.len() as i64,
        "one order per caller told QUEUED"
    );
    assert_checked(&app).await;
    eprintln!("{ordered} orders, {after} queued after the promotion");
    app.stop().await;
}
