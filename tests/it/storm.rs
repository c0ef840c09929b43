//! The storm invariant: many buyers at once, never more sold than stocked,
//! nothing admitted lost, across layer combinations.

use stockgate::{config::DbCheckMode, pb::ReserveOutcome};

use crate::harness::{assert_invariants, storm, Profile, TestApp};

/// Stock 1, 50,000 concurrent buyers: exactly one admitted, everyone else
/// sold out, one order, stock 0.
async fn one_unit_fifty_thousand_buyers(app: &TestApp) {
    app.set_stock("FLASH-1", 1, 0).await;
    let tally = storm(app.addr, "FLASH-1", 50_000, 16, |_| 1).await;
    assert!(tally.errors.is_empty(), "errors: {:?}", tally.errors);
    assert_eq!(tally.admitted(), 1, "{tally:?}");
    assert_eq!(tally.count(ReserveOutcome::SoldOut), 49_999);
    app.drain("FLASH-1").await;
    assert_eq!(assert_invariants(app, "FLASH-1", 1, &tally).await, 1);
    let view = app.stock("FLASH-1").await;
    assert_eq!((view.db_stock, view.held_units), (0, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_thousand_buyers_one_unit_embedded() {
    let app = TestApp::spawn(Profile::Embedded).await;
    one_unit_fifty_thousand_buyers(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_thousand_buyers_one_unit_postgres_alone() {
    let app = TestApp::spawn_with(Profile::Postgres, |c| {
        c.layers.gate.enabled = false;
        c.layers.queue.enabled = false;
        // With no layer in front, every caller queues for one of 8
        // connections; this test is about correctness, so let them wait
        // rather than be shed (shedding is the middleware's job).
        c.store.acquire_timeout_ms = 60_000;
    })
    .await;
    one_unit_fifty_thousand_buyers(&app).await;
    app.stop().await;
}

/// Stock 100, 2,000 buyers asking for 1-3 units each.
async fn hundred_units_two_thousand_buyers(app: &TestApp) {
    app.set_stock("FLASH-100", 100, 0).await;
    let tally = storm(app.addr, "FLASH-100", 2_000, 8, |i| 1 + (i % 3) as u32).await;
    assert!(tally.errors.is_empty(), "errors: {:?}", tally.errors);
    app.drain("FLASH-100").await;
    let ordered = assert_invariants(app, "FLASH-100", 100, &tally).await;
    // 2,000 buyers for 100 units: the units must all go (requests for 1
    // unit keep coming until the very end).
    assert_eq!(ordered, 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn hundred_units_embedded_all_layers() {
    let app = TestApp::spawn(Profile::Embedded).await;
    hundred_units_two_thousand_buyers(&app).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn hundred_units_embedded_database_alone() {
    let app = TestApp::spawn_with(Profile::Embedded, |c| {
        c.layers.gate.enabled = false;
        c.layers.queue.enabled = false;
    })
    .await;
    hundred_units_two_thousand_buyers(&app).await;
    app.stop().await;
}

/// Every layer combination on PostgreSQL, switched at run time through the
/// admin service on one server: the invariant must hold in each.
#[tokio::test(flavor = "multi_thread")]
async fn hundred_units_postgres_every_layer_combination() {
    let app = TestApp::spawn(Profile::Postgres).await;
    let combos = [
        (true, true, DbCheckMode::Optimistic),
        (false, true, DbCheckMode::Optimistic),
        (true, false, DbCheckMode::Optimistic),
        (false, false, DbCheckMode::Optimistic),
        (false, false, DbCheckMode::Pessimistic),
        (true, false, DbCheckMode::Pessimistic),
    ];
    for (i, (gate, queue, mode)) in combos.into_iter().enumerate() {
        app.set_layers(gate, queue, mode).await;
        let sku = format!("COMBO-{i}");
        app.set_stock(&sku, 100, 0).await;
        let tally = storm(app.addr, &sku, 2_000, 8, |i| 1 + (i % 3) as u32).await;
        assert!(
            tally.errors.is_empty(),
            "gate={gate} queue={queue} {mode:?}: {:?}",
            tally.errors
        );
        app.drain(&sku).await;
        let ordered = assert_invariants(&app, &sku, 100, &tally).await;
        assert_eq!(ordered, 100, "gate={gate} queue={queue} {mode:?}");
    }
    app.stop().await;
}

/// A per-user limit holds under a storm of one user's requests, with and
/// without the gate (the database enforces it alone when the gate is off).
#[tokio::test(flavor = "multi_thread")]
async fn per_user_limit_holds_under_concurrency() {
    let app = TestApp::spawn(Profile::Postgres).await;
    for gate in [true, false] {
        app.set_layers(gate, false, DbCheckMode::Optimistic).await;
        let sku = format!("CAPPED-{gate}");
        app.set_stock(&sku, 50, 2).await;
        let calls = (0..200).map(|_| {
            let mut client = app.inventory();
            let sku = sku.clone();
            tokio::spawn(
                async move { crate::harness::reserve(&mut client, &sku, 1, "hammer").await },
            )
        });
        let mut admitted = 0;
        for call in futures::future::join_all(calls).await {
            let response = call.unwrap().unwrap();
            match response.outcome() {
                ReserveOutcome::Reserved => admitted += 1,
                ReserveOutcome::UserLimitReached => {}
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(admitted, 2, "gate={gate}");
        let view = app.stock(&sku).await;
        assert_eq!((view.db_stock, view.held_units), (48, 2), "gate={gate}");
    }
    app.stop().await;
}

/// Double clicks the dedup layer does not catch (it is off here, as when
/// its store is down): each of 300 keys sent three times at once, through
/// the Redis gate and the queue, on a SKU without a per-user cap and on
/// one with a cap of one (where a twin reaching the gate would be refused,
/// the first call having taken the user's share). Every call with a key
/// gets the one reservation that key made, never a twin the database
/// would reject nor a refusal; the gate counts exactly the orders; one
/// order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_twins_of_a_key_share_one_reservation_without_dedup() {
    use std::collections::{HashMap, HashSet};
    let app = TestApp::spawn_with(Profile::Redis, |c| {
        c.metrics.listen = "127.0.0.1:0".into();
    })
    .await;
    assert!(!app.config.layers.dedup.enabled);
    let keys = 300;
    for (sku, cap) in [("TWINS", 0), ("TWINCAP", 1)] {
        app.set_stock(sku, 10_000, cap).await;
        let calls = futures::future::join_all((0..keys).flat_map(|k| {
            let app = &app;
            (0..3).map(move |_| async move {
                let user = format!("{sku}-user-{k}");
                let key = format!("{sku}-key-{k}");
                (k, app.reserve_as(sku, &user, Some(&key)).await)
            })
        }))
        .await;
        let mut ids: HashMap<usize, HashSet<String>> = HashMap::new();
        for (k, answer) in calls {
            assert!(
                crate::harness::is_admitted(answer.outcome()),
                "{sku}: {answer:?}"
            );
            ids.entry(k)
                .or_default()
                .insert(answer.reservation.unwrap().reservation_id);
        }
        let doubled: Vec<_> = ids.iter().filter(|(_, ids)| ids.len() > 1).collect();
        assert!(
            doubled.is_empty(),
            "{sku}: {} of {keys} keys with two reservations or more, e.g. {:?}",
            doubled.len(),
            doubled.first()
        );
        app.drain(sku).await;
        let view = app.stock(sku).await;
        let left = 10_000 - keys as i64;
        assert_eq!(view.db_stock, left, "{sku}: {view:?}");
        assert_eq!(view.gate_stock, Some(left), "{sku}: the twins' units back");
    }
    let metrics = crate::ops::scrape(app.metrics_addr.unwrap()).await;
    let twins = crate::ops::sum(
        &metrics,
        "stockgate_layer_decisions_total",
        &[("layer", "queue"), ("decision", "twin")],
    );
    eprintln!("{twins} calls answered with their twin");
    assert!(twins > 0.0, "no call met a twin");
    crate::harness::assert_checked(&app).await;
    app.stop().await;
}
