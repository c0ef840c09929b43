//! Carts (#23, 1): several SKUs held under one reservation, all or
//! nothing, through every layer: the gate's admissions for a refused
//! cart's lines go back, the database commits a cart's lines in one
//! transaction, and confirming, releasing, extending and expiring act on
//! the whole cart. Against PostgreSQL, the Redis gate and RabbitMQ, with
//! the gate and the queue off too, and a replica killed between lines.

use std::{collections::HashMap, time::Duration};

use chrono::TimeDelta;
use stockgate::{
    config::DbCheckMode,
    domain::CART_LINE_REASON,
    pb::{
        inventory_service_client::InventoryServiceClient, CartOutcome, ConfirmReservationRequest,
        ExtendReservationRequest, ReservationLine, ReservationState, ReserveCartRequest,
        ReserveCartResponse, ReserveOutcome, SetSaleWindowRequest,
    },
};
use tonic::{transport::Channel, Code};

use crate::{
    harness::{assert_checked, error_field, error_reason, open_store, with_user, Profile, TestApp},
    waitlist::{get, release},
};

type Inventory = InventoryServiceClient<Channel>;

pub(crate) async fn cart(
    client: &mut Inventory,
    user: &str,
    key: Option<&str>,
    lines: &[(&str, u32)],
) -> Result<ReserveCartResponse, tonic::Status> {
    let body = ReserveCartRequest {
        lines: lines
            .iter()
            .map(|(sku, quantity)| ReservationLine {
                sku: (*sku).into(),
                quantity: *quantity,
                ..Default::default()
            })
            .collect(),
    };
    client
        .reserve_cart(with_user(body, user, key))
        .await
        .map(|r| r.into_inner())
}

/// Opens `sku`'s sale window at `opens` with a draw of
/// `draw_ms` (0: none).
async fn open_at(app: &TestApp, sku: &str, opens: chrono::DateTime<chrono::Utc>, draw_ms: u32) {
    app.admin()
        .set_sale_window(SetSaleWindowRequest {
            sku: sku.into(),
            opens_at: Some(prost_types::Timestamp {
                seconds: opens.timestamp(),
                nanos: opens.timestamp_subsec_nanos() as i32,
            }),
            closes_at: None,
            reason: "a cart test's opening".into(),
            draw_window_ms: draw_ms,
        })
        .await
        .unwrap();
}

/// ConfirmReservation, ReleaseReservation and ExtendReservation as
/// `user`, their reservation or status.
async fn confirm(
    client: &mut Inventory,
    id: &str,
    user: &str,
) -> Result<stockgate::pb::Reservation, tonic::Status> {
    let body = ConfirmReservationRequest {
        reservation_id: id.into(),
    };
    let answer = client
        .confirm_reservation(with_user(body, user, None))
        .await?;
    Ok(answer.into_inner().reservation.unwrap())
}

async fn release_as(
    client: &mut Inventory,
    id: &str,
    user: &str,
) -> Result<stockgate::pb::Reservation, tonic::Status> {
    let body = stockgate::pb::ReleaseReservationRequest {
        reservation_id: id.into(),
    };
    let answer = client
        .release_reservation(with_user(body, user, None))
        .await?;
    Ok(answer.into_inner().reservation.unwrap())
}

async fn extend(
    client: &mut Inventory,
    id: &str,
    user: &str,
    hold_seconds: u32,
) -> Result<stockgate::pb::Reservation, tonic::Status> {
    let body = ExtendReservationRequest {
        reservation_id: id.into(),
        hold_seconds,
    };
    let answer = client
        .extend_reservation(with_user(body, user, None))
        .await?;
    Ok(answer.into_inner().reservation.unwrap())
}

/// A cart's answer as decided: with the queue off, RESERVED at once;
/// with it on, QUEUED (the cart with its lines, its position, no row yet)
/// and then followed until the processor decides it.
pub(crate) async fn decided(
    client: &mut Inventory,
    answer: ReserveCartResponse,
    user: &str,
    queue: bool,
) -> stockgate::pb::Reservation {
    let cart = answer.reservation.clone().expect("a cart");
    if !queue {
        assert_eq!(answer.outcome(), CartOutcome::Reserved, "{answer:?}");
        return cart;
    }
    assert_eq!(answer.outcome(), CartOutcome::Queued, "{answer:?}");
    assert_eq!(cart.state(), ReservationState::Queued, "{answer:?}");
    assert!(answer.queue_position.is_some(), "{answer:?}");
    assert_eq!(answer.queue_position, cart.queue_position);
    assert_eq!(cart.cart_id, cart.reservation_id);
    for _ in 0..200 {
        let now = get(client, &cart.reservation_id, user).await;
        assert_eq!(
            lines_of(&now),
            lines_of(&cart),
            "the same lines queued or not"
        );
        if now.state() != ReservationState::Queued {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("cart {} never left the queue", cart.reservation_id);
}

/// Waits for `sku`'s gate count to be `expected`.
async fn gate_settles(app: &TestApp, sku: &str, expected: Option<i64>) {
    let mut seen = None;
    for _ in 0..100 {
        seen = app.stock(sku).await.gate_stock;
        if seen == expected {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{sku}: the gate holds {seen:?}, not {expected:?}");
}

/// Each line's REJECTED reason, in the cart's order.
fn line_reasons(reservation: &stockgate::pb::Reservation) -> Vec<&str> {
    reservation
        .lines
        .iter()
        .map(|l| l.reject_reason.as_str())
        .collect()
}

fn lines_of(reservation: &stockgate::pb::Reservation) -> Vec<(String, u32)> {
    reservation
        .lines
        .iter()
        .map(|l| (l.sku.clone(), l.quantity))
        .collect()
}

/// On every profile and every combination of the gate and the queue: a
/// cart is held whole (one id, one expiry, its lines in the order asked
/// for) or not at all, a refused cart says which lines failed and why and
/// takes nothing from the database or the gate; a retry with the cart's
/// key gets the same cart; get, extend, confirm and release act on every
/// line; bad carts are refused naming `lines`; an unknown SKU is
/// NOT_FOUND and holds nothing. The invariant checker agrees after each
/// combination.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cart_is_held_whole_or_not_at_all_on_every_layer() {
    for profile in [Profile::Embedded, Profile::Postgres, Profile::Rabbit] {
        let app = TestApp::spawn(profile).await;
        let mut client = app.inventory();
        for (n, (gate, queue)) in [(true, true), (true, false), (false, true), (false, false)]
            .into_iter()
            .enumerate()
        {
            let case = format!("{profile:?}, gate {gate}, queue {queue}");
            app.set_layers(gate, queue, DbCheckMode::Optimistic).await;
            let [a, b, c] = ["A", "B", "C"].map(|s| format!("C{n}-{s}"));
            let key = format!("cart-{n}");
            let [u1, u2, u3, u4] = ["u1", "u2", "u3", "u4"].map(|u| format!("{u}-{n}"));
            let (u1, u2, u3, u4) = (u1.as_str(), u2.as_str(), u3.as_str(), u4.as_str());
            app.set_stock(&a, 5, 0).await;
            app.set_stock(&b, 1, 0).await;
            app.set_stock(&c, 3, 2).await;

            let held = cart(&mut client, u1, Some(key.as_str()), &[(&b, 1), (&a, 2)])
                .await
                .unwrap();
            let first = decided(&mut client, held, u1, queue).await;
            assert_eq!(first.state(), ReservationState::Held, "{case}");
            assert_eq!(
                lines_of(&first),
                [(b.clone(), 1), (a.clone(), 2)],
                "{case}: lines in the order asked for"
            );
            assert_eq!((first.sku.as_str(), first.quantity), (b.as_str(), 1));
            assert!(first.expires_at.is_some(), "{case}");
            assert_eq!(app.stock(&a).await.db_stock, 3, "{case}");
            assert_eq!(app.stock(&b).await.db_stock, 0, "{case}");

            // The same key: the same cart, nothing more taken.
            let again = cart(&mut client, u1, Some(key.as_str()), &[(&b, 1), (&a, 2)])
                .await
                .unwrap();
            assert_eq!(again.outcome(), CartOutcome::Reserved, "{case}");
            assert_eq!(
                again.reservation.unwrap().reservation_id,
                first.reservation_id,
                "{case}"
            );
            assert_eq!(app.stock(&a).await.db_stock, 3, "{case}");

            // C over its per-user limit of 2 and B sold out: refused, A
            // would have fitted, and nothing of A or C is taken. (The gate
            // stops at C and reports A and B by its counter; the database
            // decides all three: the same answer.)
            let gate_a = app.stock(&a).await.gate_stock;
            let refused = cart(&mut client, u2, None, &[(&c, 3), (&a, 1), (&b, 1)])
                .await
                .unwrap();
            assert_eq!(
                refused.outcome(),
                CartOutcome::Refused,
                "{case}: {refused:?}"
            );
            assert!(refused.reservation.is_none());
            let results: Vec<(String, ReserveOutcome)> = refused
                .line_results
                .iter()
                .map(|l| (l.sku.clone(), l.outcome()))
                .collect();
            // (With the queue on and the gate off, lines are compared
            // with their rows' stock alone before anything is queued:
            // C's limit is the processor's to find.)
            let c_answer = if queue && !gate {
                ReserveOutcome::Reserved
            } else {
                ReserveOutcome::UserLimitReached
            };
            assert_eq!(
                results,
                [
                    (c.clone(), c_answer),
                    (a.clone(), ReserveOutcome::Reserved),
                    (b.clone(), ReserveOutcome::SoldOut),
                ],
                "{case}"
            );
            assert_eq!(refused.line_results[2].remaining_stock, Some(0), "{case}");
            assert_eq!(app.stock(&a).await.db_stock, 3, "{case}");
            assert_eq!(app.stock(&c).await.db_stock, 3, "{case}");
            assert_eq!(
                app.stock(&a).await.gate_stock,
                gate_a,
                "{case}: gate units back"
            );
            assert_eq!(app.stock(&a).await.held_units, 2, "{case}");

            if queue && !gate {
                // Queued whole, then rejected whole by the processor: C's
                // line says why, A's that another line failed, the cart
                // names C; nothing taken.
                let answer = cart(&mut client, u2, None, &[(&a, 1), (&c, 3)])
                    .await
                    .unwrap();
                let rejected = decided(&mut client, answer, u2, queue).await;
                assert_eq!(rejected.state(), ReservationState::Rejected, "{case}");
                let reasons = line_reasons(&rejected);
                assert_eq!(reasons[0], CART_LINE_REASON, "{case}");
                assert_eq!(
                    reasons[1], "user limit: 0 of 2 units already held",
                    "{case}: {reasons:?}"
                );
                assert!(
                    rejected.reject_reason.contains(c.as_str())
                        && !rejected.reject_reason.contains(a.as_str()),
                    "{case}: {rejected:?}"
                );
                assert_eq!(app.stock(&a).await.db_stock, 3, "{case}");
                assert_eq!(app.stock(&c).await.db_stock, 3, "{case}");
            }

            // Read, extended and confirmed as one.
            let read = get(&mut client, &first.reservation_id, u1).await;
            assert_eq!(lines_of(&read), lines_of(&first), "{case}");
            let extended = extend(&mut client, &first.reservation_id, u1, 1_200)
                .await
                .unwrap();
            assert!(
                extended.expires_at.unwrap().seconds > first.expires_at.unwrap().seconds,
                "{case}"
            );
            assert_eq!(lines_of(&extended), lines_of(&first), "{case}");
            let too_long = extend(&mut client, &first.reservation_id, u1, 1_800)
                .await
                .unwrap_err();
            assert_eq!(too_long.code(), Code::FailedPrecondition, "{case}");
            assert_eq!(error_reason(&too_long), "HOLD_LIMIT", "{case}");
            let confirmed = confirm(&mut client, &first.reservation_id, u1)
                .await
                .unwrap();
            assert_eq!(confirmed.state(), ReservationState::Confirmed, "{case}");
            assert_eq!(app.stock(&a).await.confirmed_units, 2, "{case}");
            assert_eq!(app.stock(&b).await.confirmed_units, 1, "{case}");
            let denied = release_as(&mut client, &first.reservation_id, u1)
                .await
                .unwrap_err();
            assert_eq!(denied.code(), Code::FailedPrecondition, "{case}");
            assert_eq!(error_reason(&denied), "WRONG_STATE", "{case}");

            // Released as one: every line's units back.
            let second = cart(&mut client, u3, None, &[(&a, 3), (&c, 2)])
                .await
                .unwrap();
            let second = decided(&mut client, second, u3, queue).await;
            assert_eq!(second.state(), ReservationState::Held, "{case}");
            assert_eq!(app.stock(&a).await.db_stock, 0, "{case}");
            let other_user = release_as(&mut client, &second.reservation_id, u1)
                .await
                .unwrap_err();
            assert_eq!(other_user.code(), Code::PermissionDenied, "{case}");
            let released = release(&mut client, &second.reservation_id, u3).await;
            assert_eq!(released.state(), ReservationState::Released, "{case}");
            assert_eq!(lines_of(&released), [(a.clone(), 3), (c.clone(), 2)]);
            assert_eq!(app.stock(&a).await.db_stock, 3, "{case}");
            assert_eq!(app.stock(&c).await.db_stock, 3, "{case}");

            // Refused before anything is asked of a layer.
            for (lines, why) in [
                (vec![], "no line"),
                (vec![(a.as_str(), 1), (a.as_str(), 1)], "a SKU twice"),
                (vec![(a.as_str(), 0)], "no units"),
                (vec![(a.as_str(), 1), ("bad sku", 1)], "a bad SKU"),
            ] {
                let err = cart(&mut client, u4, None, &lines).await.unwrap_err();
                assert_eq!(err.code(), Code::InvalidArgument, "{case}: {why}");
                assert_eq!(error_field(&err), "lines", "{case}: {why}");
            }
            let too_many: Vec<(String, u32)> = (0..21).map(|i| (format!("{a}-{i}"), 1)).collect();
            let too_many: Vec<(&str, u32)> =
                too_many.iter().map(|(s, q)| (s.as_str(), *q)).collect();
            let err = cart(&mut client, u4, None, &too_many).await.unwrap_err();
            assert_eq!(error_field(&err), "lines", "{case}: 21 lines");
            assert!(err.message().contains("at most 20"), "{case}: {err:?}");
            let unknown = cart(&mut client, u4, None, &[(&a, 1), ("NO-SUCH", 1)])
                .await
                .unwrap_err();
            assert_eq!(unknown.code(), Code::NotFound, "{case}");
            // Also after a refused line (the gate asks no more of it).
            let unknown = cart(&mut client, u4, None, &[(&b, 1), ("NO-SUCH", 1)])
                .await
                .unwrap_err();
            assert_eq!(
                unknown.code(),
                Code::NotFound,
                "{case}: after a refused line"
            );
            assert_eq!(app.stock(&a).await.db_stock, 3, "{case}");
            assert_eq!(app.stock(&a).await.gate_stock, gate_a, "{case}");
            if gate {
                // Holds the gate never counted (made with it off) put u5
                // at C's limit: the gate admits both lines, the database
                // refuses C, and both lines' units go back to the gate.
                app.set_layers(false, queue, DbCheckMode::Optimistic).await;
                let u5 = format!("u5-{n}");
                crate::waitlist::take(&mut client, &c, &u5).await;
                crate::waitlist::take(&mut client, &c, &u5).await;
                app.set_layers(true, queue, DbCheckMode::Optimistic).await;
                let (gate_a, gate_c) = (
                    app.stock(&a).await.gate_stock,
                    app.stock(&c).await.gate_stock,
                );
                assert!(gate_a.is_some() && gate_c.is_some(), "{case}");
                let refused = cart(&mut client, &u5, None, &[(&a, 1), (&c, 1)])
                    .await
                    .unwrap();
                if queue {
                    // The processor's refusal: the cart REJECTED whole.
                    let rejected = decided(&mut client, refused, &u5, queue).await;
                    assert_eq!(rejected.state(), ReservationState::Rejected, "{case}");
                    assert_eq!(rejected.lines[0].reject_reason, CART_LINE_REASON);
                    assert!(
                        rejected.lines[1].reject_reason.starts_with("user limit"),
                        "{case}: {rejected:?}"
                    );
                } else {
                    let results: Vec<ReserveOutcome> =
                        refused.line_results.iter().map(|l| l.outcome()).collect();
                    assert_eq!(
                        results,
                        [ReserveOutcome::Reserved, ReserveOutcome::UserLimitReached],
                        "{case}: {refused:?}"
                    );
                }
                // (The processor settles the gate just after the rows.)
                gate_settles(&app, &a, gate_a).await;
                gate_settles(&app, &c, gate_c).await;
                assert_eq!(app.stock(&a).await.db_stock, 3, "{case}");
            }
            assert_checked(&app).await;
        }
        app.stop().await;
    }
}

/// A cart's hold expires as one: every line's units return together.
/// Confirming after the expiry is HOLD_EXPIRED for the cart, and no line
/// is confirmed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_carts_hold_expires_as_one() {
    let app = TestApp::spawn_with(Profile::Redis, |c| {
        c.reservations.hold_ttl_secs = 1;
        c.reservations.sweep_interval_ms = 100;
    })
    .await;
    let mut client = app.inventory();
    app.set_stock("EXP-A", 2, 0).await;
    app.set_stock("EXP-B", 2, 0).await;
    let held = cart(&mut client, "u1", None, &[("EXP-A", 2), ("EXP-B", 1)])
        .await
        .unwrap()
        .reservation
        .unwrap();
    let mut expired = None;
    for _ in 0..100 {
        let now = get(&mut client, &held.reservation_id, "u1").await;
        if now.state() == ReservationState::Expired {
            expired = Some(now);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let expired = expired.expect("the cart expired");
    assert_eq!(
        lines_of(&expired),
        [("EXP-A".into(), 2), ("EXP-B".into(), 1)]
    );
    let late = confirm(&mut client, &held.reservation_id, "u1")
        .await
        .unwrap_err();
    assert_eq!(error_reason(&late), "HOLD_EXPIRED");
    for sku in ["EXP-A", "EXP-B"] {
        let view = app.stock(sku).await;
        assert_eq!(view.db_stock, 2, "{sku}");
        assert_eq!(view.confirmed_units + view.held_units, 0, "{sku}");
    }
    assert_checked(&app).await;
    app.stop().await;
}

/// Many buyers at once, each asking for a cart of two or three of eight
/// SKUs that hold 6 units each, with the gate on and off and the queue on
/// and off, against PostgreSQL, the Redis gate and RabbitMQ: no SKU sells
/// more than it has, every cart in the database is whole (every line
/// HELD, or none), every RESERVED answer has its lines held, and every
/// unit is either held by a reserved cart or back in stock: no refused
/// cart leaks a unit, in the database or in the gate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_carts_never_hold_part_of_a_cart() {
    let app = TestApp::spawn(Profile::Rabbit).await;
    for (n, (gate, queue)) in [(true, true), (false, false), (true, false), (false, true)]
        .into_iter()
        .enumerate()
    {
        let case = format!("gate {gate}, queue {queue}");
        app.set_layers(gate, queue, DbCheckMode::Optimistic).await;
        let skus: Vec<String> = (0..8).map(|i| format!("OV{n}-{i}")).collect();
        for sku in &skus {
            app.set_stock(sku, 6, 0).await;
        }
        let mut buyers = Vec::new();
        for b in 0..160usize {
            let mut client = app.inventory();
            let skus = skus.clone();
            buyers.push(tokio::spawn(async move {
                // Two or three SKUs starting anywhere, wrapping round, so
                // carts overlap in every pair of neighbours.
                let size = 2 + b % 2;
                let lines: Vec<(&str, u32)> = (0..size)
                    .map(|i| {
                        (
                            skus[(b * 3 + i) % skus.len()].as_str(),
                            1 + (b % 3 == 0) as u32,
                        )
                    })
                    .collect();
                let user = format!("b{n}-{b}");
                let answer = cart(&mut client, &user, None, &lines).await.unwrap();
                let owned: Vec<(String, u32)> =
                    lines.iter().map(|(s, q)| (s.to_string(), *q)).collect();
                (answer, owned, user)
            }));
        }
        let mut client = app.inventory();
        let mut sold: HashMap<String, i64> = HashMap::new();
        let mut reserved = Vec::new();
        let mut rejected = Vec::new();
        for buyer in buyers {
            let (answer, lines, user) = buyer.await.unwrap();
            match answer.outcome() {
                CartOutcome::Reserved | CartOutcome::Queued => {
                    let held = decided(&mut client, answer, &user, queue).await;
                    assert_eq!(lines_of(&held), lines, "{case}");
                    if held.state() == ReservationState::Rejected {
                        // Queued, then refused by the processor: a line
                        // says why.
                        assert!(queue, "{case}");
                        assert!(
                            held.lines.iter().any(|l| !l.reject_reason.is_empty()
                                && l.reject_reason != CART_LINE_REASON),
                            "{case}: {held:?}"
                        );
                        rejected.push((held.reservation_id, lines.len()));
                        continue;
                    }
                    assert_eq!(held.state(), ReservationState::Held, "{case}");
                    for (sku, quantity) in &lines {
                        *sold.entry(sku.clone()).or_default() += i64::from(*quantity);
                    }
                    reserved.push((held.reservation_id, lines.len()));
                }
                CartOutcome::Refused => {
                    assert!(
                        answer
                            .line_results
                            .iter()
                            .any(|l| l.outcome() != ReserveOutcome::Reserved),
                        "{case}: a refused cart names a failed line"
                    );
                }
                other => panic!("{case}: {other:?}"),
            }
        }
        assert!(!reserved.is_empty(), "{case}: some carts were had");
        for sku in &skus {
            let view = app.stock(sku).await;
            let units = sold.get(sku).copied().unwrap_or(0);
            assert!(units <= 6, "{case}: {sku} sold {units} of 6");
            assert_eq!(view.held_units, units, "{case}: {sku} held as answered");
            assert_eq!(view.db_stock, 6 - units, "{case}: {sku} leaked units");
        }
        let store = open_store(&app.config);
        let mut carts: HashMap<String, Vec<ReservationState>> = HashMap::new();
        for sku in &skus {
            let rows = store
                .reservations_of(&stockgate::domain::Sku::parse(sku).unwrap())
                .await
                .unwrap();
            for row in rows {
                let cart = row.cart_id.clone().expect("only carts here");
                let state = stockgate::pb::Reservation::from(row).state();
                carts
                    .entry(cart.as_str().to_owned())
                    .or_default()
                    .push(state);
            }
        }
        for (carts_of, state) in [
            (&reserved, ReservationState::Held),
            (&rejected, ReservationState::Rejected),
        ] {
            for (id, lines) in carts_of {
                let states = carts.get(id.as_str()).expect("a decided cart has rows");
                assert!(
                    states.len() == *lines && states.iter().all(|s| *s == state),
                    "{case}: cart {id} of {lines} lines is {states:?}"
                );
            }
        }
        assert_eq!(
            carts.len(),
            reserved.len() + rejected.len(),
            "{case}: no cart refused at once has rows"
        );
        assert_checked(&app).await;
    }
    app.stop().await;
}

/// The real binary, sharing the Redis gate and PostgreSQL with a
/// survivor, is SIGKILLed while a cart's first line is admitted in the
/// gate and its second waits for a draw: nothing of the cart reaches the
/// database, and the survivor's reconciler returns the first line's units
/// to the gate (and any the draw gave the second), so the checker finds
/// the gate and the database agreeing and the units sell again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_killed_between_lines_holds_nothing() {
    let survivor = TestApp::spawn_with(Profile::Redis, |c| {
        c.server.request_timeout_ms = 5_000;
        c.layers.gate.in_flight_timeout_ms = 5_500;
        c.layers.gate.reconcile_interval_ms = 200;
    })
    .await;
    survivor.set_stock("KILL-A", 3, 0).await;
    survivor.set_stock("KILL-B", 3, 0).await;
    let opens = chrono::Utc::now() - TimeDelta::milliseconds(200);
    open_at(&survivor, "KILL-B", opens, 2_500).await;
    let mut api = crate::harness::BinaryServer::start(survivor.config.clone()).await;
    api.wait_serving().await;
    let mut client = InventoryServiceClient::new(crate::harness::connect(api.addr).await);
    let call = tokio::spawn(async move {
        cart(
            &mut client,
            "buyer",
            Some("k1"),
            &[("KILL-A", 2), ("KILL-B", 1)],
        )
        .await
    });
    // The first line is admitted at once; the second waits for the draw.
    let mut admitted = false;
    for _ in 0..100 {
        if survivor.stock("KILL-A").await.gate_stock == Some(1) {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(admitted, "the first line was admitted in the gate");
    api.kill();
    assert!(call.await.unwrap().is_err(), "the caller lost its replica");
    // Past the draw's close and the in-flight timeout, the survivor's
    // reconciler has found both admissions without a row.
    assert_checked(&survivor).await;
    for sku in ["KILL-A", "KILL-B"] {
        let view = survivor.stock(sku).await;
        assert_eq!(view.db_stock, 3, "{sku}");
        assert_eq!(view.held_units, 0, "{sku}");
    }
    for sku in ["KILL-A", "KILL-B"] {
        let mut returned = false;
        for _ in 0..150 {
            if survivor.stock(sku).await.gate_stock == Some(3) {
                returned = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(returned, "{:?}", survivor.stock(sku).await);
    }
    // Every unit sells again. The first call for B after the close runs
    // the draw, which gives the dead caller's entry a unit of B: that
    // admission too has no row, and is returned in its turn.
    let mut client = survivor.inventory();
    let mut last = None;
    for _ in 0..100 {
        let again = cart(
            &mut client,
            "buyer",
            Some("k1"),
            &[("KILL-A", 3), ("KILL-B", 3)],
        )
        .await
        .unwrap();
        if matches!(again.outcome(), CartOutcome::Reserved | CartOutcome::Queued) {
            last = None;
            break;
        }
        last = Some(again);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last.is_none(), "{last:?}");
    assert_checked(&survivor).await;
    survivor.stop().await;
}

/// Double clicks and the expiry sweep on carts whose lines are listed
/// against SKU order, on PostgreSQL: for each of 40 carts a confirm and a
/// release at once, near the moment its hold expires (holds of 1 s, the
/// sweep every 50 ms). Every call answers OK or FAILED_PRECONDITION
/// (never a deadlock's error), every cart ends whole (every line
/// confirmed, released or expired alike), and the checker agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirm_a_release_and_the_sweep_at_once_end_a_cart_whole() {
    let app = TestApp::spawn_with(Profile::Postgres, |c| {
        c.reservations.hold_ttl_secs = 1;
        c.reservations.sweep_interval_ms = 50;
    })
    .await;
    for sku in ["RACE-A", "RACE-B", "RACE-C"] {
        app.set_stock(sku, 100, 0).await;
    }
    let mut carts = Vec::new();
    for n in 0..40u64 {
        let mut client = app.inventory();
        carts.push(tokio::spawn(async move {
            let user = format!("racer-{n}");
            let lines = [("RACE-C", 1), ("RACE-B", 1), ("RACE-A", 1)];
            let held = cart(&mut client, &user, None, &lines).await.unwrap();
            let id = held.reservation.unwrap().reservation_id;
            // Spread over the last 100 ms before the expiry and just after.
            tokio::time::sleep(Duration::from_millis(900 + n * 4)).await;
            let (mut other, mut another) = (client.clone(), client.clone());
            let (confirmed, released) = tokio::join!(
                confirm(&mut other, &id, &user),
                release_as(&mut another, &id, &user),
            );
            for answer in [confirmed.map(|_| ()), released.map(|_| ())] {
                if let Err(err) = answer {
                    assert_eq!(err.code(), Code::FailedPrecondition, "{user}: {err:?}");
                }
            }
            (id, user)
        }));
    }
    let store = open_store(&app.config);
    let mut ends = HashMap::new();
    for handle in carts {
        let (id, user) = handle.await.unwrap();
        let mut client = app.inventory();
        let mut whole = None;
        // A sweep may still be on its way to an expired hold.
        for _ in 0..100 {
            let read = get(&mut client, &id, &user).await;
            if read.state() != ReservationState::Held {
                whole = Some(read.state());
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let state = whole.expect("every cart ended");
        *ends.entry(format!("{state:?}")).or_insert(0) += 1;
        let reservation = store
            .reservation(&stockgate::domain::ReservationId::parse(&id).unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reservation.lines.len(), 3);
        let rows = store
            .reservations_of(&stockgate::domain::Sku::parse("RACE-A").unwrap())
            .await
            .unwrap();
        assert!(rows
            .iter()
            .any(|r| r.cart_id.as_ref() == Some(&reservation.id)));
    }
    eprintln!("carts ended: {ends:?}");
    let mut by_cart: HashMap<String, Vec<String>> = HashMap::new();
    for sku in ["RACE-A", "RACE-B", "RACE-C"] {
        for row in store
            .reservations_of(&stockgate::domain::Sku::parse(sku).unwrap())
            .await
            .unwrap()
        {
            by_cart
                .entry(row.cart_id.clone().unwrap().as_str().to_owned())
                .or_default()
                .push(row.state.as_db().to_owned());
        }
    }
    assert_eq!(by_cart.len(), 40);
    for (cart, states) in &by_cart {
        assert!(
            states.len() == 3 && states.iter().all(|s| *s == states[0]),
            "cart {cart}: {states:?}"
        );
    }
    assert_checked(&app).await;
    app.stop().await;
}

/// The gate stops at a cart's first refused line: a later line whose SKU
/// opens with a draw is not entered in it (the answer comes at once, and
/// the draw has no entrant), and the line is reported by the gate's
/// counter (one unit left: it could have been had).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_line_stops_the_cart_before_a_draw() {
    let app = TestApp::spawn_with(Profile::Redis, |c| {
        c.server.request_timeout_ms = 5_000;
    })
    .await;
    app.set_stock("STOP-P", 0, 0).await;
    app.set_stock("STOP-Q", 1, 0).await;
    let opens = chrono::Utc::now() - TimeDelta::milliseconds(100);
    open_at(&app, "STOP-Q", opens, 2_500).await;
    let mut client = app.inventory();
    let started = std::time::Instant::now();
    let answer = cart(
        &mut client,
        "stopper",
        None,
        &[("STOP-P", 1), ("STOP-Q", 1)],
    )
    .await
    .unwrap();
    let took = started.elapsed();
    assert_eq!(answer.outcome(), CartOutcome::Refused, "{answer:?}");
    let results: Vec<ReserveOutcome> = answer.line_results.iter().map(|l| l.outcome()).collect();
    assert_eq!(results, [ReserveOutcome::SoldOut, ReserveOutcome::Reserved]);
    assert!(
        took < Duration::from_millis(1_500),
        "waited {took:?} for a draw"
    );
    let draw = app
        .admin()
        .get_draw(stockgate::pb::GetDrawRequest {
            sku: "STOP-Q".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(error_reason(&draw), "UNKNOWN_DRAW", "{draw:?}");
    app.stop().await;
}

/// A cart over its sale's per-user cap, queued with the gate off, is
/// rejected whole by the processor: the line that broke the cap names the
/// sale and its cap as a single order's row does, the line that fitted
/// says another line failed, the cart's reason names the first, and
/// nothing is taken. (The SKU's own limit keeps its own wording.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_cart_over_its_sales_cap_names_the_sale() {
    for profile in [Profile::Embedded, Profile::Postgres, Profile::Rabbit] {
        let app = TestApp::spawn(profile).await;
        app.set_layers(false, true, DbCheckMode::Optimistic).await;
        let [a, b] = ["CAP-A", "CAP-B"];
        app.set_stock(a, 5, 0).await;
        app.set_stock(b, 5, 0).await;
        crate::sales::set_sale(&app, "CART-SALE", 2, &[a, b])
            .await
            .unwrap();
        let mut client = app.inventory();
        let answer = cart(&mut client, "capped", None, &[(a, 1), (b, 2)])
            .await
            .unwrap();
        let rejected = decided(&mut client, answer, "capped", true).await;
        assert_eq!(rejected.state(), ReservationState::Rejected, "{profile:?}");
        let reasons = line_reasons(&rejected);
        assert_eq!(reasons[0], CART_LINE_REASON, "{profile:?}");
        assert_eq!(
            reasons[1], "sale limit: 1 of 2 units already held across sale CART-SALE",
            "{profile:?}"
        );
        assert!(
            rejected.reject_reason.contains(&format!("{b} (sale limit"))
                && !rejected.reject_reason.contains(a),
            "{profile:?}: {rejected:?}"
        );
        for sku in [a, b] {
            assert_eq!(app.stock(sku).await.db_stock, 5, "{profile:?} {sku}");
        }
        assert_checked(&app).await;
        app.stop().await;
    }
}

/// Twins of a keyed cart on one replica, with the dedup layer off: each
/// pair sent at once for the last unit of a SKU gets one cart, the same
/// for both (the twin waits for the first call's key, then finds its
/// cart), never a REFUSED twin of a cart that was held. Then, with the
/// dedup layer on, a cart refused before its SKU's opening is decided
/// again after it, not replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twins_of_a_keyed_cart_get_one_cart() {
    let app = TestApp::spawn_with(Profile::Redis, |c| {
        c.layers.dedup.enabled = false;
    })
    .await;
    for n in 0..20 {
        let sku = format!("TWIN-{n}");
        app.set_stock(&sku, 1, 0).await;
        let key = format!("twin-key-{n}");
        let (mut one, mut two) = (app.inventory(), app.inventory());
        let lines = [(sku.as_str(), 1)];
        let (first, second) = tokio::join!(
            cart(&mut one, "twin", Some(&key), &lines),
            cart(&mut two, "twin", Some(&key), &lines),
        );
        let (first, second) = (first.unwrap(), second.unwrap());
        // (The embedded queue is on: the call that took the key is
        // queued; its twin finds the cart queued, or held if the
        // processor was quicker.)
        for answer in [&first, &second] {
            assert!(
                matches!(
                    answer.outcome(),
                    CartOutcome::Queued | CartOutcome::Reserved
                ),
                "{n}: {answer:?}"
            );
        }
        assert!(
            [&first, &second]
                .iter()
                .any(|answer| answer.outcome() == CartOutcome::Queued),
            "{n}: {first:?} {second:?}"
        );
        let id = first.reservation.unwrap().reservation_id;
        assert_eq!(id, second.reservation.unwrap().reservation_id, "{n}");
        // A cart of one line is a cart once committed too.
        let mut held = get(&mut one, &id, "twin").await;
        for _ in 0..200 {
            if held.state() != ReservationState::Queued {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            held = get(&mut one, &id, "twin").await;
        }
        assert_eq!(held.state(), ReservationState::Held, "{n}: {held:?}");
        assert_eq!(
            (held.cart_id.as_str(), lines_of(&held)),
            (id.as_str(), vec![(sku.clone(), 1)]),
            "{n}"
        );
    }
    app.stop().await;

    let app = TestApp::spawn_with(Profile::Redis, |c| {
        c.layers.dedup.enabled = true;
    })
    .await;
    app.set_stock("LATER", 1, 0).await;
    let opens = chrono::Utc::now() + TimeDelta::milliseconds(800);
    open_at(&app, "LATER", opens, 0).await;
    let mut client = app.inventory();
    let early = cart(&mut client, "early", Some("k"), &[("LATER", 1)])
        .await
        .unwrap();
    assert_eq!(early.outcome(), CartOutcome::Refused);
    assert_eq!(early.line_results[0].outcome(), ReserveOutcome::NotOpen);
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let again = cart(&mut client, "early", Some("k"), &[("LATER", 1)])
        .await
        .unwrap();
    assert_eq!(again.outcome(), CartOutcome::Queued, "{again:?}");
    app.stop().await;
}

/// With the order queue in four partitions, carts whose lines fall in
/// different partitions are queued in their first line's and committed
/// whole; a cart's message delivered twice (as after a processor died
/// between its commit and its acknowledgement) commits once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_cart_commits_once_across_partitions() {
    use stockgate::{
        domain::{ReservationId, Sku, UserId},
        queue::{encode, partition_of, QueuedLine, QueuedOrder},
        store::NewOrder,
    };
    let app = TestApp::spawn_with(Profile::Rabbit, |c| c.rabbitmq.partitions = 4).await;
    let skus: Vec<String> = (1..=4).map(|i| format!("SKU-{i}")).collect();
    let mut partitions: Vec<u16> = skus.iter().map(|s| partition_of(s, 4)).collect();
    partitions.sort_unstable();
    assert_eq!(partitions, [0, 1, 2, 3], "one SKU per partition");
    for sku in &skus {
        app.set_stock(sku, 10, 0).await;
    }
    let mut client = app.inventory();
    for n in 0..skus.len() {
        let lines: Vec<(&str, u32)> = skus
            .iter()
            .cycle()
            .skip(n)
            .take(3)
            .map(|s| (s.as_str(), 1))
            .collect();
        let user = format!("p{n}");
        let answer = cart(&mut client, &user, None, &lines).await.unwrap();
        let held = decided(&mut client, answer, &user, true).await;
        assert_eq!(held.state(), ReservationState::Held, "{held:?}");
    }
    for sku in &skus {
        assert_eq!(app.stock(sku).await.db_stock, 7, "{sku}");
    }

    // The same message twice, then an order behind them in the same
    // queue: once it is held, both copies were processed.
    app.set_layers(false, true, DbCheckMode::Optimistic).await;
    let order = |sku: &str, user: &str| NewOrder {
        id: ReservationId::generate(),
        sku: Sku::parse(sku).unwrap(),
        user: UserId::parse(user).unwrap(),
        quantity: 2,
        idempotency_key: None,
        created_at: stockgate::domain::now(),
    };
    let message = |first: NewOrder, more: Option<Vec<NewOrder>>| {
        encode(&QueuedOrder {
            ticket: 0,
            order: first,
            gated: false,
            redriven: false,
            traceparent: None,
            more_lines: more.map(|more| {
                more.into_iter()
                    .map(|order| QueuedLine {
                        order,
                        gated: false,
                    })
                    .collect()
            }),
        })
    };
    let first = order(&skus[2], "twice");
    let id = first.id.as_str().to_owned();
    let twice = message(
        first,
        Some(vec![order(&skus[0], "twice"), order(&skus[3], "twice")]),
    );
    let last = order(&skus[1], "behind");
    let behind = last.id.as_str().to_owned();
    let queue = app.config.rabbitmq.queue.clone();
    for body in [&twice, &twice, &message(last, None)] {
        crate::harness::publish(&queue, body, lapin::BasicProperties::default()).await;
    }
    let store = open_store(&app.config);
    let behind = ReservationId::parse(&behind).unwrap();
    for _ in 0..200 {
        if store.reservation(&behind).await.unwrap().is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let behind = store
        .reservation(&behind)
        .await
        .unwrap()
        .expect("processed");
    assert_eq!(behind.state, stockgate::domain::ReservationState::Held);
    let held = get(&mut client, &id, "twice").await;
    assert_eq!(held.state(), ReservationState::Held, "{held:?}");
    assert_eq!(held.lines.len(), 3);
    for (sku, left) in [(&skus[0], 5), (&skus[1], 5), (&skus[2], 5), (&skus[3], 5)] {
        assert_eq!(app.stock(sku).await.db_stock, left, "{sku}: taken once");
        let rows = store
            .reservations_of(&Sku::parse(sku).unwrap())
            .await
            .unwrap();
        assert_eq!(rows.len(), 4, "{sku}: {rows:?}");
    }
    assert_checked(&app).await;
    app.stop().await;
}

/// Confirms that come too late (a 1 ms publish timeout, far below a
/// quorum queue's write): a cart whose confirm did not come in time is
/// answered UNAVAILABLE and fenced off whole, so its late delivery holds
/// nothing; every cart answered QUEUED ends held whole. Each SKU holds
/// exactly the answered carts' units and the gate ends level with the
/// database.
#[tokio::test(flavor = "multi_thread")]
async fn unconfirmed_carts_are_fenced_whole() {
    let app = TestApp::spawn_with(Profile::Rabbit, |c| c.rabbitmq.publish_timeout_ms = 1).await;
    let skus = ["FENCE-A", "FENCE-B"];
    for sku in skus {
        app.set_stock(sku, 2_000, 0).await;
    }
    let client = app.inventory();
    let mut granted = Vec::new();
    let mut unavailable = 0;
    // A burst whose confirms all come within the millisecond is possible
    // on an idle broker: another burst, then.
    for burst in 0..4 {
        let calls = (0..200).map(|i| {
            let mut client = client.clone();
            let user = format!("f{burst}-{i}");
            tokio::spawn(async move {
                let answer = cart(&mut client, &user, None, &[(skus[0], 1), (skus[1], 1)]).await;
                (user, answer)
            })
        });
        for call in futures::future::join_all(calls).await {
            let (user, answer) = call.unwrap();
            match answer {
                Ok(answer) => {
                    assert!(
                        matches!(
                            answer.outcome(),
                            CartOutcome::Queued | CartOutcome::Reserved
                        ),
                        "{answer:?}"
                    );
                    granted.push((user, answer.reservation.unwrap().reservation_id));
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
                    unavailable += 1;
                }
            }
        }
        if unavailable > 0 {
            break;
        }
    }
    assert!(unavailable > 0, "no publish timed out");
    let mut client = app.inventory();
    for (user, id) in &granted {
        let mut seen = get(&mut client, id, user).await;
        for _ in 0..400 {
            if seen.state() != ReservationState::Queued {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
            seen = get(&mut client, id, user).await;
        }
        assert_eq!(seen.state(), ReservationState::Held, "{seen:?}");
        assert_eq!(seen.lines.len(), 2, "{seen:?}");
    }
    // Late deliveries of the fenced carts, consumed too.
    for _ in 0..400 {
        if crate::harness::queue_depth(&app.config.rabbitmq.queue).await == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for sku in skus {
        let view = app.stock(sku).await;
        let held = granted.len() as i64;
        assert_eq!(
            (view.held_units, view.db_stock),
            (held, 2_000 - held),
            "{sku}: {view:?}"
        );
        gate_settles(&app, sku, Some(view.db_stock)).await;
    }
    assert_checked(&app).await;
    app.stop().await;
}
