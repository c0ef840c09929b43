//! The processor's group commit (`Store::commit_batch` on the queue path),
//! on both dialects: one batch decides its orders in FIFO order exactly as
//! one-by-one commits would, and the cases it leaves to the per-order path
//! (the same id or idempotency key twice in a batch) end the same way.

use stockgate::{
    config::DbCheckMode,
    domain::{now, IdempotencyKey, ReservationId, Sku, UserId},
    store::{CommitOutcome, CommitParams, NewOrder, Store},
};

use crate::harness::{config_for, open_store, Profile};

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
