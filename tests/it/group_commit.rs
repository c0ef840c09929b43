//! The processor's group commit (`Store::commit_batch` on the queue path),
//! on both dialects: one batch decides its orders in FIFO order exactly as
//! one-by-one commits would, and the cases it leaves to the per-order path
//! (the same id or idempotency key twice in a batch) end the same way.

use stockgate::{
    config::DbCheckMode,
    domain::{now, IdempotencyKey, ReservationId, SaleId, Sku, UserId},
    store::{CommitOutcome, CommitParams, NewOrder, SaleWrite, Store, SALE_LIMIT_REASON},
};

use crate::harness::{config_for, open_store, OpenTransaction, Profile};

fn order(sku: &str, user: &str, quantity: u32, key: Option<&str>) -> NewOrder {
    NewOrder {
        id: ReservationId::generate(),
        sku: Sku::parse(sku).unwrap(),
        user: UserId::parse(user).unwrap(),
        quantity,
        idempotency_key: key.map(|k| IdempotencyKey::parse(k).unwrap()),
        created_at: now(),
    }
}

fn params() -> CommitParams {
    CommitParams {
        mode: DbCheckMode::Optimistic,
        max_attempts: 8,
        hold_ttl: None,
        record_rejections: true,
        now: now(),
    }
}

/// A compact spelling of each outcome, so a whole batch compares at once.
fn shape(outcome: &CommitOutcome) -> String {
    match outcome {
        CommitOutcome::Committed { remaining, .. } => format!("held, {remaining} left"),
        CommitOutcome::AlreadyCommitted(r) => format!("already {:?}", r.state),
        CommitOutcome::Rejected { cause, .. } => format!("rejected {cause:?}"),
        CommitOutcome::UnknownSku => "unknown sku".into(),
        other => format!("{other:?}"),
    }
}

/// Commits `batch` as the processor does and spells each outcome.
async fn shapes_of(store: &Store, batch: &[NewOrder]) -> Vec<String> {
    let outcomes = store.commit_batch(batch, params()).await.unwrap();
    outcomes.iter().map(shape).collect()
}

async fn stock_of(store: &Store, sku: &str) -> i64 {
    row_of(store, sku).await.0
}

/// (stock, version): the version says how many conditional updates ran, so
/// one per SKU per batch shows the grouped path decided it.
async fn row_of(store: &Store, sku: &str) -> (i64, i64) {
    let row = store
        .inventory(&Sku::parse(sku).unwrap())
        .await
        .unwrap()
        .unwrap();
    (row.stock, row.version)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_decides_in_arrival_order_like_single_commits() {
    for profile in [Profile::Postgres, Profile::Embedded] {
        let (config, db, _dir) = config_for(profile).await;
        let store = open_store(&config);
        store.migrate().await.unwrap();
        store
            .set_stock(&Sku::parse("A").unwrap(), 3, 0, now(), None)
            .await
            .unwrap();
        store
            .set_stock(&Sku::parse("CAP").unwrap(), 10, 1, now(), None)
            .await
            .unwrap();
        let (_, version_a) = row_of(&store, "A").await;
        let (_, version_cap) = row_of(&store, "CAP").await;
        let first = order("A", "u1", 2, Some("k1"));
        let batch = vec![
            first.clone(),
            order("CAP", "u9", 1, None),
            order("A", "u2", 2, None),   // 1 left: sold out
            order("A", "u3", 1, None),   // fits the last unit
            order("CAP", "u9", 1, None), // over the per-user cap of 1
            order("NOPE", "u4", 1, None),
        ];
        let shapes = shapes_of(&store, &batch).await;
        assert_eq!(
            shapes,
            [
                "held, 1 left",
                "held, 9 left",
                "rejected SoldOut",
                "held, 0 left",
                "rejected UserLimit",
                "unknown sku"
            ],
            "{profile:?}"
        );
        assert_eq!(row_of(&store, "A").await, (0, version_a + 1), "{profile:?}");
        assert_eq!(
            row_of(&store, "CAP").await,
            (9, version_cap + 1),
            "{profile:?}"
        );

        // A redelivered batch changes nothing.
        let again = store.commit_batch(&batch[..4], params()).await.unwrap();
        assert!(
            again
                .iter()
                .all(|o| matches!(o, CommitOutcome::AlreadyCommitted(_))),
            "{profile:?}: {again:?}"
        );
        assert_eq!(stock_of(&store, "A").await, 0);

        // A key already held in the database, decided by the grouped path.
        store
            .set_stock(&Sku::parse("B").unwrap(), 11, 0, now(), None)
            .await
            .unwrap();
        let (_, version_b) = row_of(&store, "B").await;
        let reused = NewOrder {
            id: ReservationId::generate(),
            sku: Sku::parse("B").unwrap(),
            ..first.clone()
        };
        let shapes = shapes_of(&store, &[order("B", "u7", 1, None), reused]).await;
        assert_eq!(
            shapes,
            ["held, 10 left", "rejected DuplicateKey"],
            "{profile:?}"
        );
        assert_eq!(
            row_of(&store, "B").await,
            (10, version_b + 1),
            "{profile:?}"
        );

        // Keys belong to users: another user's "k1" and u1's new key are
        // fresh, though looked up in the same statement as u1's "k1".
        let shapes = shapes_of(
            &store,
            &[
                order("B", "u8", 1, Some("k1")),
                order("B", "u1", 1, Some("k8")),
                NewOrder {
                    id: ReservationId::generate(),
                    sku: Sku::parse("B").unwrap(),
                    ..first.clone()
                },
            ],
        )
        .await;
        assert_eq!(
            shapes,
            ["held, 9 left", "held, 8 left", "rejected DuplicateKey"],
            "{profile:?}"
        );

        // The same id twice, and one key twice within the batch, take the
        // per-order path: one order each, one update per order.
        let twice = order("B", "u5", 1, None);
        let keyed = order("B", "u6", 1, Some("k6"));
        let keyed_twin = NewOrder {
            id: ReservationId::generate(),
            ..keyed.clone()
        };
        let batch = vec![twice.clone(), twice, keyed, keyed_twin];
        let shapes = shapes_of(&store, &batch).await;
        assert_eq!(
            shapes,
            [
                "held, 7 left",
                "already Held",
                "held, 6 left",
                "rejected DuplicateKey"
            ],
            "{profile:?}"
        );
        assert_eq!(row_of(&store, "B").await, (6, version_b + 4), "{profile:?}");

        // More keys than one lookup statement takes: every one is found
        // again when the same keys come back under new ids.
        store
            .set_stock(&Sku::parse("MANY").unwrap(), 1_000, 0, now(), None)
            .await
            .unwrap();
        let keyed: Vec<NewOrder> = (0..250)
            .map(|i| order("MANY", &format!("m{i}"), 1, Some(&format!("mk{i}"))))
            .collect();
        let shapes = shapes_of(&store, &keyed).await;
        assert_eq!(shapes.last().unwrap(), "held, 750 left", "{profile:?}");
        let again: Vec<NewOrder> = keyed
            .iter()
            .map(|o| NewOrder {
                id: ReservationId::generate(),
                ..o.clone()
            })
            .collect();
        let shapes = shapes_of(&store, &again).await;
        assert!(
            shapes.iter().all(|s| s == "rejected DuplicateKey"),
            "{profile:?}: {shapes:?}"
        );
        assert_eq!(stock_of(&store, "MANY").await, 750, "{profile:?}");
        drop(store);
        if let Some(db) = db {
            db.drop_now().await;
        }
    }
}

/// Every pooled PostgreSQL connection plans each statement for the values
/// it runs with. A generic plan cached while `reservations` was nearly
/// empty kept the processor's lookups on sequential scans as a sale grew
/// the table: the bench's drains took PostgreSQL 6, 16, then 25 s at full
/// core (the store's `PG_SESSION` has the figures).
#[tokio::test(flavor = "multi_thread")]
async fn postgres_connections_plan_each_statement_for_its_values() {
    let (config, db, _dir) = config_for(Profile::Postgres).await;
    let store = open_store(&config);
    store.migrate().await.unwrap();
    assert_eq!(
        store.session_setting("plan_cache_mode").await.unwrap(),
        "force_custom_plan"
    );
    if let Some(db) = db {
        db.drop_now().await;
    }
}

/// The statements `batch` costs the store, and its outcomes.
async fn statements_of(store: &Store, batch: &[NewOrder]) -> (u64, Vec<String>) {
    let before = store.statements();
    let shapes = shapes_of(store, batch).await;
    (store.statements() - before, shapes)
}

/// A batch spread over 64 SKUs costs PostgreSQL the same statements as one
/// of the same size on one SKU: the units of every SKU are taken in one
/// conditional update, not one update per SKU.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_costs_the_same_statements_however_many_skus_it_spans() {
    let (config, db, _dir) = config_for(Profile::Postgres).await;
    let store = open_store(&config);
    store.migrate().await.unwrap();
    let skus: Vec<String> = (0..64).map(|i| format!("MANY-{i:02}")).collect();
    for sku in skus.iter().chain(["ONE".to_owned()].iter()) {
        // ONE: 64 and the warm-up's unit.
        store
            .set_stock(&Sku::parse(sku).unwrap(), 65, 0, now(), None)
            .await
            .unwrap();
    }
    let keyed =
        |sku: &str, i: usize| order(sku, &format!("u{i}"), 1, Some(&format!("k-{sku}-{i}")));
    let one: Vec<NewOrder> = (0..64).map(|i| keyed("ONE", i)).collect();
    let spread: Vec<NewOrder> = (0..64).map(|i| keyed(&skus[i], i)).collect();
    // Warm the pool so a connection's set-up is not counted.
    shapes_of(&store, &[keyed("ONE", 999)]).await;

    let (on_one, shapes) = statements_of(&store, &one).await;
    assert!(shapes.iter().all(|s| s.starts_with("held")), "{shapes:?}");
    let (on_many, shapes) = statements_of(&store, &spread).await;
    assert!(shapes.iter().all(|s| s.starts_with("held")), "{shapes:?}");
    println!("statements per batch of 64 orders: {on_one} on one SKU, {on_many} on 64 SKUs");
    assert_eq!(on_many, on_one, "statements grew with the SKUs in a batch");
    assert!(on_one <= 8, "{on_one} statements for one batch");
    assert_eq!(stock_of(&store, "ONE").await, 0);
    for sku in &skus {
        assert_eq!(stock_of(&store, sku).await, 64, "{sku}");
    }
    if let Some(db) = db {
        db.drop_now().await;
    }
}

/// Two processors (partitions to come) committing batches over the same
/// SKUs in shuffled order, two expiry sweepers (two replicas) returning
/// lapsed holds, and buyers releasing and confirming, all at once on
/// PostgreSQL: every multi-row writer locks inventory rows in SKU order,
/// so none of them ever waits on a cycle. The database sorts text by ICU
/// `en` (`a-1 < B-1`), unlike byte order (`B-1 < a-1`), so a lock taken in
/// the database's order and one in Rust's would cross; and one SKU is sold
/// out, so batches insert REJECTED rows for SKUs they never locked.
/// PostgreSQL counts deadlocks it broke; it must count none, no call may
/// fail, and every unit is where the rows say it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn processors_sweepers_and_buyers_never_deadlock_on_shared_skus() {
    use std::hash::BuildHasher;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;
    use stockgate::domain::ReservationState;

    let (mut config, db, _dir) = config_for(Profile::Postgres).await;
    db.expect("a database of the test's own").drop_now().await;
    let db = crate::harness::TestDb::create_with(
        "TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en' LOCALE 'C.UTF-8'",
    )
    .await;
    config.backends.store = db.url.clone();
    let store = open_store(&config);
    store.migrate().await.unwrap();
    let skus: Vec<String> = ["a-0", "B-1", "c-2", "D-3", "e-4", "F-5", "g-6", "H-7"]
        .map(String::from)
        .to_vec();
    const STOCK: i64 = 1_000_000;
    for sku in &skus {
        store
            .set_stock(&Sku::parse(sku).unwrap(), STOCK, 0, now(), None)
            .await
            .unwrap();
    }
    const SOLD: &str = "b-SOLD";
    store
        .set_stock(&Sku::parse(SOLD).unwrap(), 0, 0, now(), None)
        .await
        .unwrap();
    let ttl = Some(Duration::from_millis(30));
    let until = tokio::time::Instant::now() + Duration::from_secs(4);
    let errors = Arc::new(Mutex::new(Vec::<String>::new()));
    let held = Arc::new(Mutex::new(Vec::<(ReservationId, UserId)>::new()));
    let committed = Arc::new(Mutex::new(0usize));
    let mut tasks = Vec::new();
    for p in 0..2 {
        let (store, skus, errors, held, committed) = (
            store.clone(),
            skus.clone(),
            errors.clone(),
            held.clone(),
            committed.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut n = 0;
            while tokio::time::Instant::now() < until {
                // Each batch in an order of its own (a fresh hasher's).
                let order_of = std::collections::hash_map::RandomState::new();
                let mut picks: Vec<&str> =
                    skus.iter().map(String::as_str).cycle().take(24).collect();
                picks.push(SOLD);
                picks.sort_by_key(|sku| order_of.hash_one(sku));
                let batch: Vec<NewOrder> = picks
                    .iter()
                    .map(|sku| {
                        n += 1;
                        order(sku, &format!("p{p}-{n}"), 1, Some(&format!("k{n}")))
                    })
                    .collect();
                let params = CommitParams {
                    hold_ttl: ttl,
                    now: now(),
                    ..params()
                };
                match store.commit_batch(&batch, params).await {
                    Ok(outcomes) => {
                        for outcome in outcomes {
                            match outcome {
                                CommitOutcome::Committed { reservation, .. } => {
                                    *committed.lock().unwrap() += 1;
                                    held.lock()
                                        .unwrap()
                                        .push((reservation.id, reservation.user));
                                }
                                CommitOutcome::Rejected {
                                    reservation,
                                    cause: stockgate::store::RejectCause::SoldOut,
                                } if reservation.sku.as_str() == SOLD => {}
                                other => errors.lock().unwrap().push(format!("{other:?}")),
                            }
                        }
                    }
                    Err(err) => errors.lock().unwrap().push(format!("commit: {err}")),
                }
            }
        }));
    }
    for _ in 0..2 {
        let (store, errors) = (store.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < until {
                if let Err(err) = store.expire_due(now(), 64, ttl).await {
                    errors.lock().unwrap().push(format!("sweep: {err}"));
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    for b in 0..2 {
        let (store, errors, held) = (store.clone(), errors.clone(), held.clone());
        tasks.push(tokio::spawn(async move {
            while tokio::time::Instant::now() < until {
                let next = held.lock().unwrap().pop();
                let Some((id, user)) = next else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    continue;
                };
                let ended = if b == 0 {
                    store.release(&id, &user, now(), ttl).await
                } else {
                    store.confirm(&id, &user, now()).await
                };
                if let Err(err) = ended {
                    errors.lock().unwrap().push(format!("end hold: {err}"));
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Whatever is still held lapses and is swept.
    tokio::time::sleep(Duration::from_millis(50)).await;
    while !store
        .expire_due(now(), 1_000, ttl)
        .await
        .unwrap()
        .is_empty()
    {}

    let errors = errors.lock().unwrap().clone();
    assert!(
        errors.is_empty(),
        "{} failures, e.g. {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
    let committed = *committed.lock().unwrap();
    assert!(
        committed > 500,
        "only {committed} orders committed: no race to speak of"
    );
    let mut rows = 0;
    for sku in &skus {
        let reservations = store
            .reservations_of(&Sku::parse(sku).unwrap())
            .await
            .unwrap();
        let confirmed: i64 = reservations
            .iter()
            .filter(|r| r.state == ReservationState::Confirmed)
            .map(|r| i64::from(r.quantity))
            .sum();
        assert!(
            reservations.iter().all(|r| matches!(
                r.state,
                ReservationState::Confirmed
                    | ReservationState::Released
                    | ReservationState::Expired
            )),
            "{sku}: a hold survived the final sweep"
        );
        assert_eq!(stock_of(&store, sku).await, STOCK - confirmed, "{sku}");
        rows += reservations.len();
    }
    assert_eq!(rows, committed, "every committed order has its row, once");
    drop(store);
    // A backend reports its figures when it ends (the pool's connections,
    // dropped above) or within a second.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let deadlocks = crate::harness::database_stat(&db.name, "deadlocks");
    println!("{committed} orders committed; PostgreSQL broke {deadlocks} deadlocks");
    assert_eq!(deadlocks, 0, "PostgreSQL broke {deadlocks} deadlocks");
    db.drop_now().await;
}

/// The sale window is checked against each order's own decision time, on
/// the grouped path (a batch) and on the per-order path (one order, and
/// the commit in the request path): an order decided before the opening
/// or at the closing is refused with the window as its reason and takes
/// nothing; one decided inside it commits, however late the commit runs.
#[tokio::test(flavor = "multi_thread")]
async fn each_order_is_held_to_the_window_at_its_own_decision_time() {
    for profile in [Profile::Postgres, Profile::Embedded] {
        let (config, _db, _dir) = config_for(profile).await;
        let store = open_store(&config);
        store.migrate().await.unwrap();
        let sku = Sku::parse("W").unwrap();
        store.set_stock(&sku, 5, 0, now(), None).await.unwrap();
        let opens = now() - chrono::TimeDelta::minutes(10);
        let closes = opens + chrono::TimeDelta::minutes(5);
        let window = stockgate::domain::SaleWindow {
            opens_at: Some(opens),
            closes_at: Some(closes),
            ..Default::default()
        };
        store
            .set_sale_window(&sku, window, now())
            .await
            .unwrap()
            .unwrap();
        let at = |moment: chrono::NaiveDateTime| NewOrder {
            created_at: moment,
            ..order("W", "u1", 1, None)
        };
        let tick = chrono::TimeDelta::microseconds(1);
        let (_, version) = row_of(&store, "W").await;
        let batch = vec![at(opens - tick), at(opens), at(closes - tick), at(closes)];
        let shapes = shapes_of(&store, &batch).await;
        assert_eq!(
            shapes,
            [
                "rejected OutsideWindow",
                "held, 4 left",
                "held, 3 left",
                "rejected OutsideWindow"
            ],
            "{profile:?}"
        );
        // One conditional update: the grouped path decided the batch.
        assert_eq!(row_of(&store, "W").await, (3, version + 1), "{profile:?}");
        let outcomes = store.commit_batch(&[at(closes)], params()).await.unwrap();
        let CommitOutcome::Rejected { reservation, .. } = &outcomes[0] else {
            panic!("{profile:?}: {outcomes:?}");
        };
        let reason = reservation.reject_reason.clone().unwrap();
        assert!(reason.starts_with("the sale closed at "), "{reason}");
        let single = CommitParams {
            record_rejections: false,
            ..params()
        };
        let refused = store.commit_order(&at(opens - tick), single).await.unwrap();
        assert_eq!(
            refused,
            CommitOutcome::OutsideWindow(stockgate::domain::WindowCheck::NotOpen(opens)),
            "{profile:?}"
        );
        assert_eq!(stock_of(&store, "W").await, 3, "{profile:?}");
    }
}

/// A sale's cap binds a user across its SKUs on every commit path: the
/// grouped batch decides in arrival order with a running count, the
/// per-order path (the request path's commit, both check modes) reads the
/// sale's live units; other users, SKUs outside the sale and a sale with
/// no cap are untouched; a refused order takes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_sales_cap_binds_each_user_across_its_skus() {
    for profile in [Profile::Postgres, Profile::Embedded] {
        let (config, _db, _dir) = config_for(profile).await;
        let store = open_store(&config);
        store.migrate().await.unwrap();
        for name in ["SA", "SB", "SC", "OUT"] {
            let sku = Sku::parse(name).unwrap();
            store.set_stock(&sku, 10, 0, now(), None).await.unwrap();
        }
        let skus: Vec<Sku> = ["SA", "SB", "SC"]
            .iter()
            .map(|s| Sku::parse(s).unwrap())
            .collect();
        let sale = SaleId::parse("LAUNCH").unwrap();
        let written = store.set_sale(&sale, 3, &skus).await.unwrap();
        assert!(
            matches!(written, SaleWrite::Applied { before: None, .. }),
            "{written:?}"
        );

        let sb_version = row_of(&store, "SB").await.1;
        let batch = vec![
            order("SA", "u1", 2, None),
            order("SB", "u2", 3, None),
            order("SB", "u1", 1, None),
            order("OUT", "u1", 5, None),
            order("SC", "u1", 1, None),
            order("SC", "u2", 1, None),
        ];
        let outcomes = store.commit_batch(&batch, params()).await.unwrap();
        let shapes: Vec<String> = outcomes.iter().map(shape).collect();
        assert_eq!(
            shapes,
            [
                "held, 8 left",
                "held, 7 left",
                "held, 6 left",
                "held, 5 left",
                "rejected UserLimit",
                "rejected UserLimit"
            ],
            "{profile:?}"
        );
        let CommitOutcome::Rejected { reservation, .. } = &outcomes[4] else {
            unreachable!()
        };
        let reason = reservation.reject_reason.clone().unwrap();
        assert!(reason.starts_with(SALE_LIMIT_REASON), "{reason}");
        assert!(
            reason.contains("3 of 3") && reason.contains("LAUNCH"),
            "{reason}"
        );
        // One conditional update per SKU: the grouped path decided it.
        let sb = (6, sb_version + 1);
        assert_eq!(row_of(&store, "SB").await, sb, "{profile:?}");

        // The same id twice sends a batch order by order: the same cap.
        let twice = order("SA", "u3", 2, None);
        let fallback = vec![twice.clone(), twice, order("SB", "u3", 2, None)];
        let shapes: Vec<String> = store
            .commit_batch(&fallback, params())
            .await
            .unwrap()
            .iter()
            .map(shape)
            .collect();
        assert_eq!(
            shapes,
            ["held, 6 left", "already Held", "rejected UserLimit"],
            "{profile:?}"
        );
        assert_eq!(row_of(&store, "SB").await, sb, "{profile:?}");

        for mode in [DbCheckMode::Optimistic, DbCheckMode::Pessimistic] {
            let single = CommitParams {
                mode,
                record_rejections: false,
                ..params()
            };
            let refused = store
                .commit_order(&order("SC", "u1", 1, None), single)
                .await
                .unwrap();
            assert_eq!(
                refused,
                CommitOutcome::UserLimit {
                    live_units: 3,
                    limit: 3,
                    sale: Some("LAUNCH".into()),
                },
                "{profile:?} {mode:?}"
            );
            let fresh = format!("fresh-{mode:?}");
            let taken = store
                .commit_order(&order("SC", &fresh, 2, None), single)
                .await
                .unwrap();
            assert!(
                matches!(taken, CommitOutcome::Committed { .. }),
                "{profile:?} {mode:?}: {taken:?}"
            );
        }
        assert_eq!(stock_of(&store, "SC").await, 6, "{profile:?}");

        // A cap of 0 lifts it; a SKU taken out of the sale leaves it.
        store.set_sale(&sale, 0, &skus).await.unwrap();
        let lifted = store
            .commit_batch(&[order("SC", "u1", 1, None)], params())
            .await
            .unwrap();
        assert!(
            matches!(lifted[0], CommitOutcome::Committed { .. }),
            "{lifted:?}"
        );
        store.set_sale(&sale, 3, &skus[..2]).await.unwrap();
        let outside = store
            .commit_batch(&[order("SC", "u1", 1, None)], params())
            .await
            .unwrap();
        assert!(
            matches!(outside[0], CommitOutcome::Committed { .. }),
            "{outside:?}"
        );
        let view = store.sale(&sale).await.unwrap().unwrap();
        assert_eq!(view.skus, ["SA", "SB"], "{profile:?}");
        assert_eq!(view.max_per_user, 3, "{profile:?}");
        let other = SaleId::parse("OTHER").unwrap();
        assert_eq!(
            store.set_sale(&other, 1, &skus[..1]).await.unwrap(),
            SaleWrite::InOtherSale {
                sku: "SA".into(),
                sale_id: "LAUNCH".into()
            }
        );
        assert!(
            store.sale(&other).await.unwrap().is_none(),
            "refused, not created"
        );
    }
}

/// A SKU joins a sale while a grouped commit that read its row (in no sale
/// then) waits for another (sale, user) lock of the batch: the commit's
/// version check fails, and the order is decided again under the sale's
/// cap instead of slipping past it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sku_joining_a_sale_mid_commit_is_held_to_its_cap() {
    let (config, _db, _dir) = config_for(Profile::Postgres).await;
    let store = open_store(&config);
    store.migrate().await.unwrap();
    for name in ["JX", "JY", "JZ"] {
        let sku = Sku::parse(name).unwrap();
        store.set_stock(&sku, 10, 0, now(), None).await.unwrap();
    }
    let sku = |name: &str| Sku::parse(name).unwrap();
    let (s, t) = (SaleId::parse("S").unwrap(), SaleId::parse("T").unwrap());
    store.set_sale(&s, 1, &[sku("JZ")]).await.unwrap();
    store.set_sale(&t, 10, &[sku("JY")]).await.unwrap();
    // u1 is at S's cap.
    let first = store
        .commit_batch(&[order("JZ", "u1", 1, None)], params())
        .await
        .unwrap();
    assert_eq!(shape(&first[0]), "held, 9 left");

    // Another session holds (T, u1), so the batch waits after reading JX's
    // row and before taking any stock.
    let other = OpenTransaction::begin(
        &config,
        &format!(
            "SELECT pg_advisory_xact_lock({}, {})",
            stockgate::store::SALE_LOCK_SPACE,
            stockgate::store::sale_user_key("T", "u1")
        ),
    )
    .await;
    let batch = vec![order("JY", "u1", 1, None), order("JX", "u1", 1, None)];
    let committing = {
        let store = open_store(&config);
        tokio::spawn(async move { store.commit_batch(&batch, params()).await })
    };
    other.wait_for_waiters(1).await;
    store
        .set_sale(&s, 1, &[sku("JZ"), sku("JX")])
        .await
        .unwrap();
    other.commit().await;
    let outcomes = committing.await.unwrap().unwrap();
    let shapes: Vec<String> = outcomes.iter().map(shape).collect();
    assert_eq!(shapes, ["held, 9 left", "rejected UserLimit"]);
    assert_eq!(row_of(&store, "JX").await.0, 10);
}
