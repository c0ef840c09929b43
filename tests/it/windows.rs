//! Sale windows (#23, 3): Reserve admits from a SKU's opening until its
//! closing, to the millisecond, whichever layers are on; the server's clock
//! is injected, never slept on. Operators set windows (validated, audited,
//! shown with the stock); what a stale gate admits outside the window the
//! database refuses, and the reconciler brings the gate's copy back.

use std::time::Duration;

use chrono::{NaiveDateTime, TimeDelta};
use stockgate::{
    config::DbCheckMode,
    domain::{Clock, ReservationState, SaleWindow, Sku},
    pb::{ListAuditEventsRequest, ReserveOutcome, ReserveRequest, SetSaleWindowRequest, StockView},
};
use tonic::{Code, Status};

use crate::harness::{error_reason, is_admitted, open_store, with_user, Profile, TestApp};

/// A moment on a whole millisecond an hour from now: far from the real
/// clock, so no test passes by reading it.
fn an_opening() -> NaiveDateTime {
    let at = chrono::Utc::now() + TimeDelta::hours(1);
    chrono::DateTime::from_timestamp_millis(at.timestamp_millis())
        .unwrap()
        .naive_utc()
}

fn ts(at: NaiveDateTime) -> prost_types::Timestamp {
    let at = at.and_utc();
    prost_types::Timestamp {
        seconds: at.timestamp(),
        nanos: at.timestamp_subsec_nanos() as i32,
    }
}

/// As [`ts`], to the millisecond (what the server keeps).
fn ts_ms(at: NaiveDateTime) -> prost_types::Timestamp {
    ts(
        chrono::DateTime::from_timestamp_millis(at.and_utc().timestamp_millis())
            .unwrap()
            .naive_utc(),
    )
}

fn ms(n: i64) -> TimeDelta {
    TimeDelta::milliseconds(n)
}

async fn set_window(
    app: &TestApp,
    sku: &str,
    opens_at: Option<prost_types::Timestamp>,
    closes_at: Option<prost_types::Timestamp>,
    reason: &str,
) -> Result<StockView, Status> {
    app.admin()
        .set_sale_window(SetSaleWindowRequest {
            sku: sku.into(),
            opens_at,
            closes_at,
            reason: reason.into(),
            draw_window_ms: 0,
        })
        .await
        .map(|r| r.into_inner().stock.unwrap())
}

/// For every profile and every combination of the gate and the queue: a
/// call 1 ms before the opening hears NOT_OPEN with the opening, one at
/// the opening and one 1 ms before the closing are admitted, one at the
/// closing hears CLOSED with the closing; only the two admitted orders
/// take stock, and both end HELD.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserve_follows_the_window_to_the_millisecond_on_every_layer() {
    for profile in [
        Profile::Embedded,
        Profile::Postgres,
        Profile::Redis,
        Profile::Rabbit,
    ] {
        let opens = an_opening();
        let closes = opens + TimeDelta::minutes(30);
        let clock = Clock::manual(opens - ms(1));
        // No reconcile pass after start-up: one that read the rows before a
        // window change could write the older window back until the next.
        let app = TestApp::spawn_clocked(profile, clock.clone(), |config| {
            config.layers.gate.reconcile_interval_ms = 600_000;
        })
        .await;
        for (n, (gate, queue)) in [(true, true), (true, false), (false, true), (false, false)]
            .into_iter()
            .enumerate()
        {
            let case = format!("{profile:?}, gate {gate}, queue {queue}");
            app.set_layers(gate, queue, DbCheckMode::Optimistic).await;
            let sku = format!("WIN-{n}");
            app.set_stock(&sku, 10, 0).await;
            let view = set_window(&app, &sku, Some(ts(opens)), Some(ts(closes)), "launch")
                .await
                .unwrap();
            assert_eq!(view.opens_at, Some(ts(opens)), "{case}");
            assert_eq!(view.closes_at, Some(ts(closes)), "{case}");

            clock.set(opens - ms(1));
            let early = app.reserve_as(&sku, "early", None).await;
            assert_eq!(early.outcome(), ReserveOutcome::NotOpen, "{case}");
            assert_eq!(early.opens_at, Some(ts(opens)), "{case}");
            assert!(early.reservation.is_none(), "{case}");

            for (at, user) in [(opens, "first"), (closes - ms(1), "last")] {
                clock.set(at);
                let answer = app.reserve_as(&sku, user, None).await;
                assert!(is_admitted(answer.outcome()), "{case} {user}: {answer:?}");
            }

            clock.set(closes);
            let late = app.reserve_as(&sku, "late", None).await;
            assert_eq!(late.outcome(), ReserveOutcome::Closed, "{case}");
            assert_eq!(late.closes_at, Some(ts(closes)), "{case}");
            assert!(late.opens_at.is_none(), "{case}");

            app.drain(&sku).await;
            let rows = open_store(&app.config)
                .reservations_of(&Sku::parse(&sku).unwrap())
                .await
                .unwrap();
            let states: Vec<_> = rows.iter().map(|r| (r.user.as_str(), r.state)).collect();
            assert_eq!(rows.len(), 2, "{case}: {states:?}");
            assert!(
                rows.iter().all(|r| r.state == ReservationState::Held),
                "{case}: {states:?}"
            );
            assert_eq!(app.stock(&sku).await.db_stock, 8, "{case}");
        }
        app.stop().await;
    }
}

/// NOT_OPEN is not kept by the dedup layer: the buyer who pressed too
/// early and retries with the same key after the opening is decided again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_with_the_same_key_after_the_opening_is_decided_again() {
    let opens = an_opening();
    let clock = Clock::manual(opens - ms(1));
    let app = TestApp::spawn_clocked(Profile::Redis, clock.clone(), |config| {
        config.layers.dedup.enabled = true;
        config.backends.dedup = config.backends.gate.clone();
        config.layers.gate.reconcile_interval_ms = 600_000;
    })
    .await;
    app.set_stock("KEYED", 3, 0).await;
    set_window(&app, "KEYED", Some(ts(opens)), None, "launch")
        .await
        .unwrap();
    let first = app.reserve_as("KEYED", "u1", Some("press-1")).await;
    assert_eq!(first.outcome(), ReserveOutcome::NotOpen);
    clock.set(opens);
    let retry = app.reserve_as("KEYED", "u1", Some("press-1")).await;
    assert!(is_admitted(retry.outcome()), "{retry:?}");
    // The admission is kept as any other: a retry on another replica
    // sharing the dedup store gets it replayed (without the dedup layer it
    // would be a second order, refused later for the key).
    let mut config = app.config.clone();
    config.layers.gate.reconcile_interval_ms = 600_000;
    let other = TestApp::start(config, None, tempfile::tempdir().unwrap()).await;
    other.wait_serving().await;
    let again = other.reserve_as("KEYED", "u1", Some("press-1")).await;
    assert_eq!(
        again.reservation.unwrap().reservation_id,
        retry.reservation.unwrap().reservation_id
    );
    other.stop().await;
    app.stop().await;
}

/// A window written to the database behind the gate's back (as when the
/// gate was unreachable during SetSaleWindow): the gate admits, the order
/// processor refuses it with the window as the reason and the gate gets
/// the unit back. A reconcile pass (here another replica's) writes the
/// database's window into the shared gate, so later calls hear NOT_OPEN
/// from it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_database_refuses_what_a_stale_gate_admits_and_the_reconciler_repairs_it() {
    let opens = an_opening();
    let clock = Clock::manual(opens - ms(1));
    let app = TestApp::spawn_clocked(Profile::Rabbit, clock.clone(), |config| {
        config.layers.gate.reconcile_interval_ms = 60_000;
    })
    .await;
    app.set_stock("STALE", 5, 0).await;
    let store = open_store(&app.config);
    let sku = Sku::parse("STALE").unwrap();
    let window = SaleWindow {
        opens_at: Some(opens),
        closes_at: None,
        ..Default::default()
    };
    store
        .set_sale_window(&sku, window, stockgate::domain::now())
        .await
        .unwrap()
        .unwrap();
    let admitted = app.reserve_as("STALE", "u1", Some("stale-1")).await;
    assert_eq!(admitted.outcome(), ReserveOutcome::Queued, "{admitted:?}");
    app.drain("STALE").await;
    let id = admitted.reservation.unwrap().reservation_id;
    let row = store
        .reservation(&stockgate::domain::ReservationId::parse(&id).unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.state, ReservationState::Rejected);
    let reason = row.reject_reason.unwrap();
    assert!(reason.starts_with("the sale opens at "), "{reason}");
    let view = app.stock("STALE").await;
    assert_eq!((view.db_stock, view.gate_stock), (5, Some(5)));

    // Another replica on the same gate and database, whose reconciler runs
    // often. Its start-up load gives the gate the window it reads; a later
    // change behind the gate's back is written into the gate by its next
    // reconcile pass, and until then the stale window admits.
    let mut config = app.config.clone();
    config.layers.gate.reconcile_interval_ms = 200;
    let other = TestApp::start(config, None, tempfile::tempdir().unwrap()).await;
    other.wait_serving().await;
    let postponed = opens + TimeDelta::hours(1);
    let moved = SaleWindow {
        opens_at: Some(postponed),
        closes_at: None,
        ..Default::default()
    };
    store
        .set_sale_window(&sku, moved, stockgate::domain::now())
        .await
        .unwrap()
        .unwrap();
    clock.set(opens);
    let mut answers = Vec::new();
    for _ in 0..50 {
        let answer = app.reserve_as("STALE", "u2", None).await;
        let done = answer.outcome() == ReserveOutcome::NotOpen;
        answers.push(answer);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = answers.last().unwrap();
    assert_eq!(last.outcome(), ReserveOutcome::NotOpen, "{answers:?}");
    assert_eq!(last.opens_at, Some(ts(postponed)));
    app.drain("STALE").await;
    let view = app.stock("STALE").await;
    assert_eq!((view.db_stock, view.gate_stock), (5, Some(5)));

    // The first buyer's retry with its key, once the sale opens: the order
    // refused for the window used no key, so the retry is decided again
    // rather than answered with the refusal.
    clock.set(postponed);
    let retry = app.reserve_as("STALE", "u1", Some("stale-1")).await;
    assert_eq!(retry.outcome(), ReserveOutcome::Queued, "{retry:?}");
    app.drain("STALE").await;
    assert_eq!(app.stock("STALE").await.held_units, 1);
    other.stop().await;
    app.stop().await;
}

/// The waitlist keeps to the window: after the closing, units that come
/// back are not handed to a waiting entry (they stay in stock, which
/// nobody can reserve any more), and nobody joins; also not when the
/// gate's copy of the window is stale and it answers SOLD_OUT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waitlist_neither_serves_nor_takes_anyone_after_the_closing() {
    let app = TestApp::spawn_with(Profile::Postgres, |config| {
        config.layers.gate.reconcile_interval_ms = 600_000;
    })
    .await;
    let policy = |sku: &str| stockgate::pb::SetSoldOutPolicyRequest {
        sku: sku.into(),
        policy: stockgate::pb::SoldOutPolicy::Waitlist as i32,
        waitlist_limit: 0,
    };
    app.set_stock("LINE", 1, 0).await;
    app.admin()
        .set_sold_out_policy(policy("LINE"))
        .await
        .unwrap();
    let holder = app.reserve_as("LINE", "a", None).await;
    assert!(is_admitted(holder.outcome()), "{holder:?}");
    app.drain("LINE").await;
    let join = |user: &'static str, sku: &'static str| {
        let request = ReserveRequest {
            sku: sku.into(),
            quantity: 1,
            join_waitlist: true,
        };
        let mut client = app.inventory();
        async move {
            client
                .reserve(with_user(request, user, None))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let waiting = join("b", "LINE").await;
    assert_eq!(waiting.outcome(), ReserveOutcome::Waitlisted, "{waiting:?}");

    let closed_at = stockgate::domain::now() - TimeDelta::seconds(1);
    set_window(&app, "LINE", None, Some(ts_ms(closed_at)), "ends early")
        .await
        .unwrap();
    let id = holder.reservation.unwrap().reservation_id;
    crate::harness::release(&mut app.inventory(), &id, "a")
        .await
        .unwrap();
    let view = app.stock("LINE").await;
    assert_eq!((view.db_stock, view.waitlisted_units), (1, 1), "{view:?}");
    let late = join("c", "LINE").await;
    assert_eq!(late.outcome(), ReserveOutcome::Closed, "{late:?}");

    // Sold out in the gate, closed in the database only.
    app.set_stock("LINE-2", 0, 0).await;
    app.admin()
        .set_sold_out_policy(policy("LINE-2"))
        .await
        .unwrap();
    let closed = SaleWindow {
        opens_at: None,
        closes_at: Some(closed_at),
        ..Default::default()
    };
    let sku = Sku::parse("LINE-2").unwrap();
    let store = open_store(&app.config);
    store
        .set_sale_window(&sku, closed, stockgate::domain::now())
        .await
        .unwrap()
        .unwrap();
    let stale = join("d", "LINE-2").await;
    assert_eq!(stale.outcome(), ReserveOutcome::Closed, "{stale:?}");
    assert!(store.reservations_of(&sku).await.unwrap().is_empty());
    app.stop().await;
}

/// Bad windows are refused naming the field and change nothing; a good
/// one is kept to the millisecond, shown with the stock, audited with the
/// window before and after, and cleared by a call with neither side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_set_windows_checked_audited_and_shown_with_the_stock() {
    let app = TestApp::spawn(Profile::Postgres).await;
    app.set_stock("ADMIN-W", 5, 0).await;
    let opens = an_opening();
    let bad_nanos = prost_types::Timestamp {
        seconds: 1,
        nanos: 1_000_000_000,
    };
    let before_1970 = prost_types::Timestamp {
        seconds: -1,
        nanos: 0,
    };
    let cases: Vec<(&str, &str, _, _, &str, Code)> = vec![
        (
            "closing first",
            "ADMIN-W",
            Some(ts(opens)),
            Some(ts(opens - ms(1))),
            "r",
            Code::InvalidArgument,
        ),
        (
            "empty window",
            "ADMIN-W",
            Some(ts(opens)),
            Some(ts(opens)),
            "r",
            Code::InvalidArgument,
        ),
        (
            "bad nanos",
            "ADMIN-W",
            Some(bad_nanos),
            None,
            "r",
            Code::InvalidArgument,
        ),
        (
            "before 1970",
            "ADMIN-W",
            None,
            Some(before_1970),
            "r",
            Code::InvalidArgument,
        ),
        (
            "no reason",
            "ADMIN-W",
            Some(ts(opens)),
            None,
            " ",
            Code::InvalidArgument,
        ),
        (
            "bad sku",
            "A B",
            Some(ts(opens)),
            None,
            "r",
            Code::InvalidArgument,
        ),
        (
            "unknown sku",
            "NOPE",
            Some(ts(opens)),
            None,
            "r",
            Code::NotFound,
        ),
    ];
    let fields = [
        "closes_at",
        "closes_at",
        "opens_at",
        "closes_at",
        "reason",
        "sku",
        "",
    ];
    for ((name, sku, o, c, reason, code), field) in cases.into_iter().zip(fields) {
        let status = set_window(&app, sku, o, c, reason).await.unwrap_err();
        assert_eq!(status.code(), code, "{name}: {status:?}");
        if !field.is_empty() {
            assert!(
                status.message().contains(field),
                "{name}: {:?}",
                status.message()
            );
            assert_eq!(error_reason(&status), "INVALID_ARGUMENT", "{name}");
        }
        let view = app.stock("ADMIN-W").await;
        assert_eq!((view.opens_at, view.closes_at), (None, None), "{name}");
    }

    // Sub-millisecond parts are dropped: the gate counts in milliseconds.
    let mut fine = ts(opens);
    fine.nanos += 999_999;
    let closes = opens + TimeDelta::hours(2);
    let view = set_window(
        &app,
        "ADMIN-W",
        Some(fine),
        Some(ts(closes)),
        "launch at 18:00",
    )
    .await
    .unwrap();
    assert_eq!(view.opens_at, Some(ts(opens)));
    assert_eq!(app.stock("ADMIN-W").await.closes_at, Some(ts(closes)));
    let cleared = set_window(&app, "ADMIN-W", None, None, "postponed")
        .await
        .unwrap();
    assert_eq!((cleared.opens_at, cleared.closes_at), (None, None));

    let events: Vec<_> = app
        .admin()
        .list_audit_events(ListAuditEventsRequest { limit: 20 })
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .filter(|e| e.action == "set_sale_window")
        .collect();
    // Newest first; refused calls changed nothing and are not events, the
    // unknown SKU is (it reached the database).
    let summary: Vec<_> = events
        .iter()
        .map(|e| {
            (
                e.outcome.split(':').next().unwrap().to_owned(),
                e.reason.clone(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("applied".to_owned(), "postponed".to_owned()),
            ("applied".to_owned(), "launch at 18:00".to_owned()),
            ("failed".to_owned(), "r".to_owned()),
        ]
    );
    let opened: serde_json::Value = serde_json::from_str(&events[1].after).unwrap();
    let iso = |t: NaiveDateTime| {
        t.and_utc()
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    assert_eq!(opened["opens_at"], iso(opens));
    assert_eq!(opened["closes_at"], iso(closes));
    assert_eq!(opened["sku"], "ADMIN-W");
    let before: serde_json::Value = serde_json::from_str(&events[0].before).unwrap();
    assert_eq!(before["opens_at"], iso(opens));
    app.stop().await;
}
