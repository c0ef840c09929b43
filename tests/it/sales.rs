//! Sales (#23, 4): SKUs grouped under one per-user cap. The database holds
//! a user to it across the sale's SKUs on every layer combination, under
//! concurrent orders in different SKUs, and when a waitlist's turn comes;
//! operators set sales through a validated, audited call.

use stockgate::{
    config::DbCheckMode,
    pb::{
        GetSaleRequest, ListAuditEventsRequest, ReservationState, ReserveOutcome, ReserveRequest,
        SetSaleRequest, SoldOutPolicy,
    },
};
use tonic::Code;

use crate::{
    harness::{
        assert_checked, error_field, error_reason, wipe_redis_prefix, with_user, OpenTransaction,
        Profile, TestApp,
    },
    waitlist::{get, release, reserve, set_policy, take, until_state},
};

pub(crate) async fn set_sale(
    app: &TestApp,
    sale: &str,
    cap: u32,
    skus: &[&str],
) -> Result<stockgate::pb::Sale, tonic::Status> {
    app.admin()
        .set_sale(SetSaleRequest {
            sale_id: sale.into(),
            max_per_user: cap,
            skus: skus.iter().map(|s| s.to_string()).collect(),
            reason: "launch".into(),
        })
        .await
        .map(|r| r.into_inner().sale.unwrap())
}

/// On every profile and every combination of the gate and the queue: a
/// user with a cap of 2 across three SKUs gets two units in two of them
/// and is refused the third while another user is not: USER_LIMIT_REACHED
/// from the gate or the database in the request path, and only with the
/// gate off a QUEUED reservation that ends REJECTED "sale limit"; the
/// refused order takes nothing from the database or the gate; a released
/// hold makes room again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sales_cap_holds_on_every_layer() {
    for profile in [Profile::Embedded, Profile::Postgres, Profile::Rabbit] {
        let app = TestApp::spawn(profile).await;
        let mut client = app.inventory();
        for (n, (gate, queue)) in [(true, true), (true, false), (false, true), (false, false)]
            .into_iter()
            .enumerate()
        {
            let case = format!("{profile:?}, gate {gate}, queue {queue}");
            app.set_layers(gate, queue, DbCheckMode::Optimistic).await;
            let skus: Vec<String> = ["A", "B", "C"]
                .iter()
                .map(|s| format!("S{n}-{s}"))
                .collect();
            for sku in &skus {
                app.set_stock(sku, 10, 0).await;
            }
            let names: Vec<&str> = skus.iter().map(String::as_str).collect();
            set_sale(&app, &format!("SALE-{n}"), 2, &names)
                .await
                .unwrap();
            // A stock change after the sale keeps the SKU bound in the gate.
            app.set_stock(&skus[2], 10, 0).await;

            let first = take(&mut client, &skus[0], "buyer").await;
            take(&mut client, &skus[1], "buyer").await;
            let over = reserve(&mut client, &skus[2], "buyer", false).await;
            if queue && !gate {
                assert_eq!(over.outcome(), ReserveOutcome::Queued, "{case}");
                let id = over.reservation.unwrap().reservation_id;
                let ended =
                    until_state(&mut client, &id, "buyer", ReservationState::Rejected).await;
                assert!(
                    ended.reject_reason.starts_with("sale limit: 2 of 2"),
                    "{case}: {}",
                    ended.reject_reason
                );
                app.drain(&skus[2]).await;
            } else {
                assert_eq!(over.outcome(), ReserveOutcome::UserLimitReached, "{case}");
                assert!(over.reservation.is_none(), "{case}");
            }
            // Nothing taken: the database's stock, and the gate's once the
            // refusal is settled.
            for _ in 0..100 {
                let view = app.stock(&skus[2]).await;
                if view.db_stock == 10 && (!gate || view.gate_stock == Some(10)) {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let view = app.stock(&skus[2]).await;
            assert_eq!(view.db_stock, 10, "{case}");
            if gate {
                assert_eq!(view.gate_stock, Some(10), "{case}");
            }
            assert_eq!(view.sale_id, format!("SALE-{n}"), "{case}");
            take(&mut client, &skus[2], "someone-else").await;

            release(&mut client, &first, "buyer").await;
            take(&mut client, &skus[2], "buyer").await;
        }
        assert_checked(&app).await;
        app.stop().await;
    }
}

/// The Redis gate, shared by replicas, checks a sale's cap itself: it
/// learns the sale from SetSale, learns it again when it reloads from the
/// database (its keys lost), and stops holding a SKU's units against the
/// sale once the SKU leaves it, where the database no longer counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_gate_follows_a_sales_skus() {
    let app = TestApp::spawn(Profile::Rabbit).await;
    let mut client = app.inventory();
    let skus = ["FOLLOW-A", "FOLLOW-B"];
    for sku in skus {
        app.set_stock(sku, 10, 0).await;
    }
    set_sale(&app, "FOLLOW", 1, &skus).await.unwrap();
    take(&mut client, skus[0], "first").await;
    let over = reserve(&mut client, skus[1], "first", false).await;
    assert_eq!(over.outcome(), ReserveOutcome::UserLimitReached);

    wipe_redis_prefix(&app.config.redis.key_prefix).await;
    let start = std::time::Instant::now();
    let second = loop {
        let request = with_user(
            ReserveRequest {
                sku: skus[0].into(),
                quantity: 1,
                join_waitlist: false,
            },
            "second",
            None,
        );
        match client.reserve(request).await {
            Ok(answer) => break answer.into_inner(),
            // Failing closed while the gate reloads.
            Err(status) if status.code() == Code::Unavailable => {
                assert!(start.elapsed() < std::time::Duration::from_secs(10));
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            Err(status) => panic!("{status:?}"),
        }
    };
    assert_eq!(second.outcome(), ReserveOutcome::Queued);
    let id = second.reservation.unwrap().reservation_id;
    until_state(&mut client, &id, "second", ReservationState::Held).await;
    let over = reserve(&mut client, skus[1], "second", false).await;
    assert_eq!(over.outcome(), ReserveOutcome::UserLimitReached);

    set_sale(&app, "FOLLOW", 1, &skus[1..]).await.unwrap();
    take(&mut client, skus[1], "second").await;
    let over = reserve(&mut client, skus[1], "second", false).await;
    assert_eq!(over.outcome(), ReserveOutcome::UserLimitReached);
    assert_checked(&app).await;
    app.stop().await;
}

/// Many users each fire orders at every SKU of a sale at once, the
/// database deciding each in the request path: no user ends above the
/// cap, and each reaches it (stock is plenty), so the cap is neither
/// passed nor over-enforced under the race the (sale, user) lock closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_in_a_sales_skus_never_pass_its_cap() {
    const USERS: usize = 25;
    const CAP: i64 = 3;
    let app = TestApp::spawn(Profile::Postgres).await;
    app.set_layers(false, false, DbCheckMode::Optimistic).await;
    let skus = ["RACE-A", "RACE-B", "RACE-C", "RACE-D"];
    for sku in skus {
        app.set_stock(sku, 1_000, 0).await;
    }
    set_sale(&app, "RACE", CAP as u32, &skus).await.unwrap();
    let mut calls = Vec::new();
    for u in 0..USERS {
        for sku in skus {
            for _ in 0..2 {
                let mut client = app.inventory();
                let user = format!("racer-{u}");
                calls.push(async move {
                    let answer = reserve(&mut client, sku, &user, false).await;
                    (user, answer.outcome())
                });
            }
        }
    }
    let answers = futures::future::join_all(calls).await;
    let mut held: std::collections::HashMap<String, i64> = Default::default();
    for (user, outcome) in &answers {
        match outcome {
            ReserveOutcome::Reserved => *held.entry(user.clone()).or_default() += 1,
            ReserveOutcome::UserLimitReached => {}
            other => panic!("{user}: {other:?}"),
        }
    }
    for u in 0..USERS {
        let user = format!("racer-{u}");
        assert_eq!(held.get(&user).copied().unwrap_or(0), CAP, "{user}");
    }
    let mut in_database = 0;
    for sku in skus {
        let view = app.stock(sku).await;
        in_database += view.held_units;
        assert_eq!(view.db_stock + view.held_units, 1_000, "{sku}");
    }
    assert_eq!(in_database, USERS as i64 * CAP);
    assert_checked(&app).await;
    app.stop().await;
}

/// Sale `name` with cap `cap` over `{name}-HOT` (one unit, held by
/// "holder", the waitlist policy, `line` waiting in that order) and
/// `{name}-OTHER` (10 units): a client, the hold's id and the entries' ids.
async fn a_sale_with_a_line(
    app: &TestApp,
    name: &str,
    cap: u32,
    line: [&str; 2],
) -> (crate::waitlist::Inventory, String, Vec<String>) {
    let (hot, other) = (format!("{name}-HOT"), format!("{name}-OTHER"));
    let mut client = app.inventory();
    app.set_stock(&hot, 1, 0).await;
    app.set_stock(&other, 10, 0).await;
    set_policy(app, &hot, SoldOutPolicy::Waitlist, 0).await;
    set_sale(app, name, cap, &[&hot, &other]).await.unwrap();
    let holder = take(&mut client, &hot, "holder").await;
    let mut waiting = Vec::new();
    for user in line {
        let answer = reserve(&mut client, &hot, user, true).await;
        assert_eq!(answer.outcome(), ReserveOutcome::Waitlisted, "{user}");
        waiting.push(answer.reservation.unwrap().reservation_id);
    }
    (client, holder, waiting)
}

/// A user at the sale's cap is not let into a waitlist; a waiting entry
/// whose turn comes while its user is at the cap (a hold taken in another
/// of the sale's SKUs since joining) is REJECTED with the sale's reason,
/// and the unit goes to the next in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waitlists_turn_respects_the_sales_cap() {
    let app = TestApp::spawn(Profile::Postgres).await;
    let (mut client, holder, waiting) = a_sale_with_a_line(&app, "WL", 1, ["capped", "next"]).await;
    take(&mut client, "WL-OTHER", "capped").await;
    // A user already at the cap is not let into the line.
    take(&mut client, "WL-OTHER", "full").await;
    let refused = reserve(&mut client, "WL-HOT", "full", true).await;
    assert_eq!(refused.outcome(), ReserveOutcome::UserLimitReached);
    release(&mut client, &holder, "holder").await;
    let skipped = get(&mut client, &waiting[0], "capped").await;
    assert_eq!(skipped.state(), ReservationState::Rejected);
    assert!(
        skipped.reject_reason.starts_with("sale limit: 1 of 1"),
        "{}",
        skipped.reject_reason
    );
    until_state(&mut client, &waiting[1], "next", ReservationState::Held).await;
    assert_checked(&app).await;
    app.stop().await;
}

/// A waiting entry whose user is committing in another of the sale's SKUs
/// at the moment its turn comes (its (sale, user) lock held elsewhere) is
/// passed over and keeps its place: the unit goes to the next in line, not
/// back on sale, and the entry is served at the next hand-off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_mid_commit_is_passed_over_and_keeps_their_place() {
    let app = TestApp::spawn(Profile::Postgres).await;
    let (mut client, holder, waiting) = a_sale_with_a_line(&app, "PASS", 2, ["busy", "next"]).await;
    // Another transaction holds busy's lock, as a commit of theirs would.
    let key = stockgate::store::sale_user_key("PASS", "busy");
    let other = OpenTransaction::begin(
        &app.config,
        &format!(
            "SELECT pg_advisory_xact_lock({}, {key})",
            stockgate::store::SALE_LOCK_SPACE
        ),
    )
    .await;
    release(&mut client, &holder, "holder").await;
    let next = until_state(&mut client, &waiting[1], "next", ReservationState::Held).await;
    let busy = get(&mut client, &waiting[0], "busy").await;
    assert_eq!(busy.state(), ReservationState::Waitlisted);
    assert_eq!(app.stock("PASS-HOT").await.db_stock, 0, "not back on sale");
    other.commit().await;

    release(&mut client, &next.reservation_id, "next").await;
    until_state(&mut client, &waiting[0], "busy", ReservationState::Held).await;
    assert_checked(&app).await;
    app.stop().await;
}

/// A SKU that joins a sale while a pessimistic commit waits for its row:
/// the commit looked the sale up before the row lock and found none, then
/// reads a row that names one; the cap is checked all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_set_while_a_commit_waits_for_the_row_still_binds_it() {
    let app = TestApp::spawn(Profile::Postgres).await;
    app.set_layers(false, false, DbCheckMode::Pessimistic).await;
    let mut client = app.inventory();
    app.set_stock("LATE-A", 10, 0).await;
    app.set_stock("LATE-B", 10, 0).await;
    set_sale(&app, "LATE", 1, &["LATE-A"]).await.unwrap();
    take(&mut client, "LATE-A", "buyer").await;
    // B joins the sale in a transaction that holds B's row until told.
    let other = OpenTransaction::begin(
        &app.config,
        "UPDATE inventory SET sale_id = 'LATE' WHERE sku = 'LATE-B'",
    )
    .await;
    let mut buyer = app.inventory();
    let call = tokio::spawn(async move { reserve(&mut buyer, "LATE-B", "buyer", false).await });
    // The call is waiting for B's row (its sale lookup found none).
    other.wait_for_waiters(1).await;
    other.commit().await;
    let answer = call.await.unwrap();
    assert_eq!(answer.outcome(), ReserveOutcome::UserLimitReached);
    assert_eq!(app.stock("LATE-B").await.db_stock, 10);
    app.stop().await;
}

/// SetSale checks every field and names it, refuses a SKU that is unknown
/// or in another sale without changing anything, moves SKUs in and out,
/// and leaves an audit event with the sale before and after; GetSale reads
/// it back, or NOT_FOUND.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_are_set_validated_and_audited() {
    let app = TestApp::spawn(Profile::Embedded).await;
    for sku in ["AD-1", "AD-2", "AD-3"] {
        app.set_stock(sku, 5, 0).await;
    }
    let sale = set_sale(&app, "AD", 2, &["AD-2", "AD-1"]).await.unwrap();
    assert_eq!(sale.skus, ["AD-1", "AD-2"]);
    assert_eq!(sale.max_per_user, 2);

    let invalid = |sale_id: &str, cap: u32, skus: Vec<String>, reason: &str| SetSaleRequest {
        sale_id: sale_id.into(),
        max_per_user: cap,
        skus,
        reason: reason.into(),
    };
    let many: Vec<String> = (0..1_001).map(|i| format!("X-{i}")).collect();
    for (request, field) in [
        (invalid("", 1, vec![], "r"), "sale_id"),
        (invalid("bad sale", 1, vec![], "r"), "sale_id"),
        (invalid("AD", 1, vec!["no spaces".into()], "r"), "skus"),
        (
            invalid("AD", 1, vec!["AD-1".into(), "AD-1".into()], "r"),
            "skus",
        ),
        (invalid("AD", 1, many, "r"), "skus"),
        (invalid("AD", u32::MAX, vec![], "r"), "max_per_user"),
        (invalid("AD", 1, vec![], " "), "reason"),
    ] {
        let err = app.admin().set_sale(request).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert_eq!(error_field(&err), field, "{err:?}");
    }
    let unknown = set_sale(&app, "AD", 2, &["AD-1", "NOPE"])
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::NotFound);
    assert_eq!(error_reason(&unknown), "UNKNOWN_SKU");
    let taken = set_sale(&app, "OTHER", 2, &["AD-3", "AD-1"])
        .await
        .unwrap_err();
    assert_eq!(taken.code(), Code::FailedPrecondition);
    assert_eq!(error_reason(&taken), "SKU_IN_OTHER_SALE");
    assert!(taken.message().contains("AD-1") && taken.message().contains("\"AD\""));
    assert_eq!(
        app.stock("AD-3").await.sale_id,
        "",
        "refused, nothing changed"
    );
    let missing = app
        .admin()
        .get_sale(GetSaleRequest {
            sale_id: "OTHER".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(error_reason(&missing), "UNKNOWN_SALE");

    let moved = set_sale(&app, "AD", 3, &["AD-3", "AD-2"]).await.unwrap();
    assert_eq!(moved.skus, ["AD-2", "AD-3"]);
    assert_eq!(app.stock("AD-1").await.sale_id, "");
    assert_eq!(app.stock("AD-3").await.sale_id, "AD");
    let read = app
        .admin()
        .get_sale(GetSaleRequest {
            sale_id: "AD".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .sale
        .unwrap();
    assert_eq!(read, moved);

    let events = app
        .admin()
        .list_audit_events(ListAuditEventsRequest { limit: 50 })
        .await
        .unwrap()
        .into_inner()
        .events;
    let sets: Vec<_> = events.iter().filter(|e| e.action == "set_sale").collect();
    let applied: Vec<_> = sets.iter().filter(|e| e.outcome == "applied").collect();
    assert_eq!(applied.len(), 2, "{sets:?}");
    let last = applied
        .iter()
        .find(|e| e.after.contains("AD-3"))
        .expect("the move is audited");
    assert!(last.before.contains("\"AD-1\"") && last.before.contains("\"max_per_user\":2"));
    assert!(last.after.contains("\"max_per_user\":3"));
    assert_eq!(last.reason, "launch");
    let failed = sets
        .iter()
        .filter(|e| e.outcome.starts_with("failed"))
        .count();
    assert_eq!(failed, 2, "the refused calls are audited too: {sets:?}");
    app.stop().await;
}
