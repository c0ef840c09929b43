//! The caller and operator API: bad input, the reservation lifecycle,
//! idempotency, watching, expiry and draining on shutdown.

use std::time::Duration;

use stockgate::{
    domain::Sku,
    pb::{
        AdjustStockRequest, ExtendReservationRequest, ReservationState, ReserveOutcome,
        ReserveRequest, SetLayersRequest, SetStockRequest, WatchReservationRequest,
    },
};
use tokio_stream::StreamExt;
use tonic::{Code, Request};

use crate::harness::{
    confirm, error_reason, get, is_admitted, open_store, release, reserve, with_user, Profile,
    TestApp,
};

const PROFILES: [Profile; 2] = [Profile::Embedded, Profile::Postgres];

fn reserve_req(sku: &str, quantity: u32) -> ReserveRequest {
    ReserveRequest {
        sku: sku.into(),
        quantity,
        ..Default::default()
    }
}

/// Everything the database holds about a SKU, to prove bad input changed
/// nothing.
async fn snapshot(app: &TestApp, sku: &str) -> String {
    let store = open_store(&app.config);
    let sku = Sku::parse(sku).unwrap();
    let row = store.inventory(&sku).await.unwrap();
    let rows = store.reservations_of(&sku).await.unwrap();
    format!("{row:?} {rows:?}")
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_the_documented_code_naming_the_field_and_changes_nothing() {
    for profile in PROFILES {
        let app = TestApp::spawn(profile).await;
        app.set_stock("GOOD", 5, 0).await;
        let before = snapshot(&app, "GOOD").await;
        let mut client = app.inventory();
        let long_sku = "S".repeat(65);
        let long_user = "u".repeat(129);
        let long_key = "k".repeat(129);
        let cases: Vec<(&str, Request<ReserveRequest>, Code, &str)> = vec![
            (
                "empty sku",
                with_user(reserve_req("", 1), "u1", None),
                Code::InvalidArgument,
                "sku",
            ),
            (
                "long sku",
                with_user(reserve_req(&long_sku, 1), "u1", None),
                Code::InvalidArgument,
                "sku",
            ),
            (
                "bad sku chars",
                with_user(reserve_req("GO OD", 1), "u1", None),
                Code::InvalidArgument,
                "sku",
            ),
            (
                "quantity 0",
                with_user(reserve_req("GOOD", 0), "u1", None),
                Code::InvalidArgument,
                "quantity",
            ),
            (
                "quantity over max",
                with_user(reserve_req("GOOD", 11), "u1", None),
                Code::InvalidArgument,
                "quantity",
            ),
            (
                "quantity u32::MAX",
                with_user(reserve_req("GOOD", u32::MAX), "u1", None),
                Code::InvalidArgument,
                "quantity",
            ),
            (
                "missing user",
                Request::new(reserve_req("GOOD", 1)),
                Code::InvalidArgument,
                "x-user-id",
            ),
            (
                "long user",
                with_user(reserve_req("GOOD", 1), &long_user, None),
                Code::InvalidArgument,
                "x-user-id",
            ),
            (
                "malformed key",
                with_user(reserve_req("GOOD", 1), "u1", Some("a/b")),
                Code::InvalidArgument,
                "idempotency-key",
            ),
            (
                "long key",
                with_user(reserve_req("GOOD", 1), "u1", Some(&long_key)),
                Code::InvalidArgument,
                "idempotency-key",
            ),
            (
                "unknown sku",
                with_user(reserve_req("NOPE", 1), "u1", None),
                Code::NotFound,
                "NOPE",
            ),
        ];
        for (name, request, code, field) in cases {
            let status = client.reserve(request).await.unwrap_err();
            assert_eq!(status.code(), code, "{profile:?} {name}: {status:?}");
            assert!(
                status.message().contains(field),
                "{profile:?} {name}: {}",
                status.message()
            );
        }
        // Reservation-id calls.
        for id in ["", "not-a-uuid", "0192A3B4-0000-7000-8000-000000000000"] {
            let status = confirm(&mut client, id, "u1").await.unwrap_err();
            assert_eq!(status.code(), Code::InvalidArgument, "{id:?}");
            assert!(status.message().contains("reservation_id"));
        }
        let unknown = uuid::Uuid::now_v7().to_string();
        let status = release(&mut client, &unknown, "u1").await.unwrap_err();
        assert_eq!(status.code(), Code::NotFound);
        // Admin.
        let mut admin = app.admin();
        let status = admin
            .set_stock(SetStockRequest {
                sku: "GOOD".into(),
                stock: -1,
                max_per_user: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("stock"));
        let status = admin
            .adjust_stock(AdjustStockRequest {
                sku: "GOOD".into(),
                delta: 0,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("delta"));
        let status = admin
            .adjust_stock(AdjustStockRequest {
                sku: "GOOD".into(),
                delta: -6,
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        let status = admin
            .set_layers(SetLayersRequest {
                db_check: 9,
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("db_check"));
        assert_eq!(snapshot(&app, "GOOD").await, before, "{profile:?}");
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_messages_are_refused() {
    let app = TestApp::spawn(Profile::Embedded).await;
    let mut client = app.inventory();
    let huge = "S".repeat(100 * 1024);
    let status = client
        .reserve(with_user(reserve_req(&huge, 1), "u1", None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    app.stop().await;
}

/// Reserve and wait until the reservation is HELD (it may be queued first).
async fn reserve_held(app: &TestApp, sku: &str, quantity: u32, user: &str) -> String {
    let mut client = app.inventory();
    let response = reserve(&mut client, sku, quantity, user).await.unwrap();
    assert!(is_admitted(response.outcome()), "{response:?}");
    let id = response.reservation.unwrap().reservation_id;
    let mut watch = client
        .watch_reservation(with_user(
            WatchReservationRequest {
                reservation_id: id.clone(),
            },
            user,
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    while let Some(update) = watch.next().await {
        if update.unwrap().reservation.unwrap().state() == ReservationState::Held {
            return id;
        }
    }
    panic!("reservation {id} never became HELD");
}

#[tokio::test(flavor = "multi_thread")]
async fn confirm_and_release_are_idempotent_and_release_restocks() {
    for profile in PROFILES {
        let app = TestApp::spawn(profile).await;
        app.set_stock("LIFE", 5, 0).await;
        let mut client = app.inventory();

        let kept = reserve_held(&app, "LIFE", 2, "alice").await;
        for _ in 0..2 {
            let confirmed = confirm(&mut client, &kept, "alice").await.unwrap();
            assert_eq!(confirmed.state(), ReservationState::Confirmed);
        }
        // Someone else's reservation.
        let status = confirm(&mut client, &kept, "mallory").await.unwrap_err();
        assert_eq!(status.code(), Code::PermissionDenied);
        // A confirmed sale cannot be released.
        let status = release(&mut client, &kept, "alice").await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);

        let dropped = reserve_held(&app, "LIFE", 3, "bob").await;
        assert_eq!(app.stock("LIFE").await.db_stock, 0);
        for _ in 0..2 {
            let released = release(&mut client, &dropped, "bob").await.unwrap();
            assert_eq!(released.state(), ReservationState::Released);
        }
        let view = app.stock("LIFE").await;
        assert_eq!(
            (
                view.db_stock,
                view.held_units,
                view.confirmed_units,
                view.gate_stock
            ),
            (3, 0, 2, Some(3)),
            "{profile:?}: released units return once, to the database and the gate"
        );
        // Released cannot be confirmed.
        let status = confirm(&mut client, &dropped, "bob").await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(error_reason(&status), "WRONG_STATE");
        // The released units sell again.
        let again = reserve(&mut client, "LIFE", 3, "carol").await.unwrap();
        assert!(is_admitted(again.outcome()));
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn same_idempotency_key_gives_one_reservation_with_every_layer_combination() {
    let app = TestApp::spawn(Profile::Postgres).await;
    app.set_stock("IDEM", 100, 0).await;
    let mut client = app.inventory();
    for (i, (gate, queue)) in [(true, true), (true, false), (false, true), (false, false)]
        .into_iter()
        .enumerate()
    {
        app.admin()
            .set_layers(SetLayersRequest {
                gate: Some(gate),
                queue: Some(queue),
                ..Default::default()
            })
            .await
            .unwrap();
        let key = format!("order-{i}");
        let mut ids = Vec::new();
        for _ in 0..3 {
            let response = client
                .reserve(with_user(reserve_req("IDEM", 1), "dora", Some(&key)))
                .await
                .unwrap()
                .into_inner();
            ids.push(response.reservation.unwrap().reservation_id);
            app.drain("IDEM").await;
        }
        // Whatever each call was told, the database holds one order for
        // the key: later calls get that reservation back, or (queue on, the
        // dedup layer off, the first already committed) a reservation that
        // ends REJECTED naming the one that holds the key.
        let store = open_store(&app.config);
        let rows = store
            .reservations_of(&Sku::parse("IDEM").unwrap())
            .await
            .unwrap();
        for id in &ids[1..] {
            if *id == ids[0] {
                continue;
            }
            assert!(queue, "gate={gate} queue={queue}: {ids:?}");
            let row = rows.iter().find(|r| r.id.as_str() == id).unwrap();
            assert_eq!(row.state, stockgate::domain::ReservationState::Rejected);
            assert!(row.reject_reason.as_deref().unwrap().contains(&ids[0]));
        }
        let live = rows
            .iter()
            .filter(|r| r.idempotency_key.as_ref().map(|k| k.as_str()) == Some(key.as_str()))
            .count();
        assert_eq!(live, 1, "gate={gate} queue={queue}");
    }
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_streams_queue_and_final_state_then_ends() {
    let app = TestApp::spawn(Profile::Embedded).await;
    app.set_stock("WATCH", 1, 0).await;
    let mut client = app.inventory();
    let id = reserve_held(&app, "WATCH", 1, "erin").await;
    let mut watch = client
        .watch_reservation(with_user(
            WatchReservationRequest {
                reservation_id: id.clone(),
            },
            "erin",
            None,
        ))
        .await
        .unwrap()
        .into_inner();
    let first = watch.next().await.unwrap().unwrap().reservation.unwrap();
    assert_eq!(first.state(), ReservationState::Held);
    assert!(first.expires_at.is_some());
    confirm(&mut client, &id, "erin").await.unwrap();
    let last = tokio::time::timeout(Duration::from_secs(5), watch.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap()
        .reservation
        .unwrap();
    assert_eq!(last.state(), ReservationState::Confirmed);
    assert!(
        tokio::time::timeout(Duration::from_secs(5), watch.next())
            .await
            .unwrap()
            .is_none(),
        "stream ends after the final state"
    );
    app.stop().await;
}

/// The reservation's state once it is EXPIRED, or after 5 s of asking.
async fn expired_within_5s(
    client: &mut stockgate::pb::inventory_service_client::InventoryServiceClient<
        tonic::transport::Channel,
    >,
    id: &str,
    user: &str,
) -> ReservationState {
    let mut state = ReservationState::Held;
    for _ in 0..100 {
        state = get(client, id, user).await.unwrap().state();
        if state == ReservationState::Expired {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    state
}

#[tokio::test(flavor = "multi_thread")]
async fn unconfirmed_holds_expire_and_their_units_sell_again() {
    for profile in [Profile::Embedded, Profile::Postgres, Profile::Rabbit] {
        let app = TestApp::spawn_with(profile, |c| c.reservations.hold_ttl_secs = 1).await;
        app.set_stock("EXPIRE", 1, 0).await;
        // A second SKU's hold lapses in the same sweep: the sweep settles
        // both with the gate at once.
        app.set_stock("EXPIRE-2", 1, 0).await;
        let mut client = app.inventory();
        let id = reserve_held(&app, "EXPIRE", 1, "frank").await;
        reserve_held(&app, "EXPIRE-2", 1, "frank").await;
        let sold_out = reserve(&mut client, "EXPIRE", 1, "grace").await.unwrap();
        assert_eq!(sold_out.outcome(), ReserveOutcome::SoldOut);
        let state = expired_within_5s(&mut client, &id, "frank").await;
        assert_eq!(state, ReservationState::Expired, "{profile:?}");
        let status = confirm(&mut client, &id, "frank").await.unwrap_err();
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(error_reason(&status), "HOLD_EXPIRED");
        let resold = reserve(&mut client, "EXPIRE", 1, "grace").await.unwrap();
        assert!(is_admitted(resold.outcome()));
        let mut resold = reserve(&mut client, "EXPIRE-2", 1, "grace").await.unwrap();
        // The second hold may lapse a sweep later than the first.
        for _ in 0..40 {
            if is_admitted(resold.outcome()) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
            resold = reserve(&mut client, "EXPIRE-2", 1, "grace").await.unwrap();
        }
        assert!(is_admitted(resold.outcome()), "{profile:?}");
        app.stop().await;
    }
}

async fn extend(
    client: &mut stockgate::pb::inventory_service_client::InventoryServiceClient<
        tonic::transport::Channel,
    >,
    id: &str,
    user: &str,
    hold_seconds: u32,
) -> Result<stockgate::pb::Reservation, tonic::Status> {
    let request = ExtendReservationRequest {
        reservation_id: id.into(),
        hold_seconds,
    };
    let response = client
        .extend_reservation(with_user(request, user, None))
        .await?;
    Ok(response.into_inner().reservation.unwrap())
}

/// ExtendReservation on every store and through the queue: an extended
/// hold outlives its first expiry and then expires at the new one, with
/// its units back; only the owner's HELD, unexpired reservation is
/// extended, never past `max_hold_secs` from when it became HELD; a hold
/// that never expires is left as it is.
#[tokio::test(flavor = "multi_thread")]
async fn an_extended_hold_outlives_its_first_expiry_within_the_limit() {
    for profile in [Profile::Embedded, Profile::Postgres, Profile::Rabbit] {
        let app = TestApp::spawn_with(profile, |c| {
            // Long enough that the calls before the extension fit in the
            // first hold on a loaded machine.
            c.reservations.hold_ttl_secs = 5;
            c.reservations.max_hold_secs = 15;
        })
        .await;
        app.set_stock("EXTEND", 2, 0).await;
        let mut client = app.inventory();
        let id = reserve_held(&app, "EXTEND", 1, "heidi").await;
        let held = get(&mut client, &id, "heidi").await.unwrap();
        let first_expiry = held.expires_at.unwrap().seconds;

        let status = extend(&mut client, &id, "mallory", 4).await.unwrap_err();
        assert_eq!(error_reason(&status), "NOT_OWNER");
        let status = extend(&mut client, &id, "heidi", 0).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("hold_seconds"), "{status:?}");
        let status = extend(&mut client, &id, "heidi", 16).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument);
        // 15 s from now is past 15 s from when it became HELD.
        let status = extend(&mut client, &id, "heidi", 15).await.unwrap_err();
        assert_eq!(
            (status.code(), error_reason(&status).as_str()),
            (Code::FailedPrecondition, "HOLD_LIMIT")
        );
        let extended = extend(&mut client, &id, "heidi", 8).await.unwrap();
        assert_eq!(extended.state(), ReservationState::Held);
        let new_expiry = extended.expires_at.unwrap().seconds;
        assert!(new_expiry > first_expiry, "{first_expiry} -> {new_expiry}");
        // A shorter ask (a retry, say) changes nothing.
        let again = extend(&mut client, &id, "heidi", 1).await.unwrap();
        assert_eq!(again.expires_at.unwrap().seconds, new_expiry);

        // Past the first expiry (5 s) and a few sweeps, still held.
        let first = chrono::DateTime::from_timestamp(first_expiry, 0).unwrap();
        let until_first = (first - chrono::Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(until_first + Duration::from_millis(1_500)).await;
        let state = get(&mut client, &id, "heidi").await.unwrap().state();
        assert_eq!(state, ReservationState::Held, "{profile:?}");
        // Then it expires at the new time, and its unit comes back.
        let state = expired_within_5s(&mut client, &id, "heidi").await;
        assert_eq!(state, ReservationState::Expired, "{profile:?}");
        let status = extend(&mut client, &id, "heidi", 8).await.unwrap_err();
        assert_eq!(error_reason(&status), "HOLD_EXPIRED");
        assert_eq!(app.stock("EXTEND").await.db_stock, 2, "{profile:?}");

        // Released: nothing to extend.
        let released = reserve_held(&app, "EXTEND", 1, "ivan").await;
        release(&mut client, &released, "ivan").await.unwrap();
        let status = extend(&mut client, &released, "ivan", 8).await.unwrap_err();
        assert_eq!(error_reason(&status), "WRONG_STATE");
        app.stop().await;
    }

    // Holds that never expire are left as they are.
    let app = TestApp::spawn_with(Profile::Embedded, |c| c.reservations.hold_ttl_secs = 0).await;
    app.set_stock("FOREVER", 1, 0).await;
    let mut client = app.inventory();
    let id = reserve_held(&app, "FOREVER", 1, "judy").await;
    let kept = extend(&mut client, &id, "judy", 60).await.unwrap();
    assert_eq!(
        (kept.state(), kept.expires_at),
        (ReservationState::Held, None)
    );
    app.stop().await;
}

/// A graceful stop right after a burst of QUEUED answers still commits
/// every queued order: nothing the callers were told is lost.
#[tokio::test(flavor = "multi_thread")]
async fn graceful_stop_drains_the_queue() {
    let mut app = TestApp::spawn_with(Profile::Postgres, |c| {
        // A slow processor, so orders are still queued when the stop comes.
        c.layers.queue.batch_size = 1;
        c.layers.queue.linger_ms = 5;
    })
    .await;
    app.set_stock("DRAIN", 1_000, 0).await;
    let tally = crate::harness::storm(app.addr, "DRAIN", 300, 4, |_| 1).await;
    assert_eq!(tally.count(ReserveOutcome::Queued), 300);
    assert!(
        app.stock("DRAIN").await.queued_units > 0,
        "stop must come while orders wait"
    );
    app.stop_server().await;
    let store = open_store(&app.config);
    let rows = store
        .reservations_of(&Sku::parse("DRAIN").unwrap())
        .await
        .unwrap();
    assert_eq!(rows.len(), 300);
    assert_eq!(
        store
            .inventory(&Sku::parse("DRAIN").unwrap())
            .await
            .unwrap()
            .unwrap()
            .stock,
        700
    );
    app.stop().await;
}
