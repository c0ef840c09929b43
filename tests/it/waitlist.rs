//! The `waitlist` sold-out policy: who waits, who is handed returned units,
//! and that a unit handed to the line is never also sold to a newcomer.

use std::time::Duration;

use stockgate::pb::{
    ConfirmReservationRequest, GetReservationRequest, ReleaseReservationRequest, Reservation,
    ReservationState, ReserveOutcome, ReserveRequest, ReserveResponse, SetSoldOutPolicyRequest,
    SoldOutPolicy, StockView, WatchReservationRequest,
};
use tonic::transport::Channel;

use crate::harness::{assert_checked, with_user, OpenTransaction, Profile, StormTally, TestApp};

pub(crate) type Inventory =
    stockgate::pb::inventory_service_client::InventoryServiceClient<Channel>;

pub(crate) async fn set_policy(
    app: &TestApp,
    sku: &str,
    policy: SoldOutPolicy,
    limit: u32,
) -> StockView {
    app.admin()
        .set_sold_out_policy(SetSoldOutPolicyRequest {
            sku: sku.into(),
            policy: policy as i32,
            waitlist_limit: limit,
        })
        .await
        .unwrap()
        .into_inner()
        .stock
        .unwrap()
}

pub(crate) async fn reserve(
    client: &mut Inventory,
    sku: &str,
    user: &str,
    join: bool,
) -> ReserveResponse {
    client
        .reserve(with_user(
            ReserveRequest {
                sku: sku.into(),
                quantity: 1,
                join_waitlist: join,
            },
            user,
            None,
        ))
        .await
        .unwrap()
        .into_inner()
}

pub(crate) async fn get(client: &mut Inventory, id: &str, user: &str) -> Reservation {
    client
        .get_reservation(with_user(
            GetReservationRequest {
                reservation_id: id.into(),
            },
            user,
            None,
        ))
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap()
}

/// Polls until the reservation is in `state` (10 s at most).
pub(crate) async fn until_state(
    client: &mut Inventory,
    id: &str,
    user: &str,
    state: ReservationState,
) -> Reservation {
    for _ in 0..200 {
        let reservation = get(client, id, user).await;
        if reservation.state() == state {
            return reservation;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{id} of {user} never reached {state:?}");
}

/// A hold for `user` (through the queue when the profile has one).
pub(crate) async fn take(client: &mut Inventory, sku: &str, user: &str) -> String {
    let answer = reserve(client, sku, user, false).await;
    assert!(
        crate::harness::is_admitted(answer.outcome()),
        "{user}: {answer:?}"
    );
    let id = answer.reservation.unwrap().reservation_id;
    until_state(client, &id, user, ReservationState::Held).await;
    id
}

pub(crate) async fn release(client: &mut Inventory, id: &str, user: &str) -> Reservation {
    client
        .release_reservation(with_user(
            ReleaseReservationRequest {
                reservation_id: id.into(),
            },
            user,
            None,
        ))
        .await
        .unwrap()
        .into_inner()
        .reservation
        .unwrap()
}

/// A waiting entry whose turn comes while its user holds more than the
/// SKU's per-user limit (lowered since they joined) is REJECTED saying how
/// many units they hold and the limit, and the unit stays on sale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_past_the_skus_limit_says_what_is_held() {
    for profile in [Profile::Embedded, Profile::Postgres] {
        let app = TestApp::spawn(profile).await;
        let mut client = app.inventory();
        app.set_stock("TURN", 3, 3).await;
        take(&mut client, "TURN", "keen").await;
        take(&mut client, "TURN", "keen").await;
        let holder = take(&mut client, "TURN", "holder").await;
        set_policy(&app, "TURN", SoldOutPolicy::Waitlist, 0).await;
        let joined = reserve(&mut client, "TURN", "keen", true).await;
        assert_eq!(joined.outcome(), ReserveOutcome::Waitlisted, "{profile:?}");
        let waiting = joined.reservation.unwrap().reservation_id;
        app.set_stock("TURN", 0, 1).await;
        release(&mut client, &holder, "holder").await;
        let ended = until_state(&mut client, &waiting, "keen", ReservationState::Rejected).await;
        assert_eq!(
            ended.reject_reason,
            "user limit: 2 of 1 units already held when the waitlist's turn came",
            "{profile:?}"
        );
        assert_eq!(app.stock("TURN").await.db_stock, 1, "{profile:?}");
        assert_checked(&app).await;
        app.stop().await;
    }
}

/// The scenario: stock 1, ten in line; the holder releases and the
/// first in line is handed a hold (told through WatchReservation); it
/// expires and the second gets it; newcomers meanwhile hear sold out or
/// queue up behind. Then: leaving the line, a restock serving two, closing
/// the line. The checker agrees at the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returned_units_go_to_the_line_in_order() {
    for profile in [Profile::Embedded, Profile::Postgres] {
        let app = TestApp::spawn_with(profile, |c| c.reservations.hold_ttl_secs = 2).await;
        app.set_stock("WL", 1, 0).await;
        let view = set_policy(&app, "WL", SoldOutPolicy::Waitlist, 0).await;
        assert_eq!(view.sold_out_policy(), SoldOutPolicy::Waitlist);
        let mut client = app.inventory();
        let holder = take(&mut client, "WL", "holder").await;

        // Ten join, in order; asking without join_waitlist is sold out.
        let mut line = Vec::new();
        for i in 0..10 {
            let user = format!("w{i}");
            let answer = reserve(&mut client, "WL", &user, true).await;
            assert_eq!(answer.outcome(), ReserveOutcome::Waitlisted, "{answer:?}");
            assert_eq!(answer.waitlist_position, Some(i), "{profile:?}");
            let entry = answer.reservation.unwrap();
            assert_eq!(entry.state(), ReservationState::Waitlisted);
            assert!(entry.expires_at.is_some());
            line.push((user, entry.reservation_id));
        }
        let plain = reserve(&mut client, "WL", "plain", false).await;
        assert_eq!(plain.outcome(), ReserveOutcome::SoldOut);
        // One entry per user: joining again is the same entry.
        let again = reserve(&mut client, "WL", "w3", true).await;
        assert_eq!(again.reservation.unwrap().reservation_id, line[3].1);
        assert_eq!(again.waitlist_position, Some(3));
        assert_eq!(app.stock("WL").await.waitlisted_units, 10);

        // The first in line watches, and hears the hand-off.
        let (first_user, first_id) = line[0].clone();
        let mut watch = client
            .watch_reservation(with_user(
                WatchReservationRequest {
                    reservation_id: first_id.clone(),
                },
                &first_user,
                None,
            ))
            .await
            .unwrap()
            .into_inner();
        let seen = watch.message().await.unwrap().unwrap().reservation.unwrap();
        assert_eq!(seen.state(), ReservationState::Waitlisted);
        assert_eq!(seen.waitlist_position, Some(0));
        release(&mut client, &holder, "holder").await;
        let handed = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let next = watch.message().await.unwrap().unwrap().reservation.unwrap();
                if next.state() != ReservationState::Waitlisted {
                    return next;
                }
            }
        })
        .await
        .expect("the first in line heard of its hold");
        assert_eq!(handed.state(), ReservationState::Held, "{profile:?}");
        assert!(handed.expires_at.is_some());
        // The unit went to the line, not to stock: a newcomer hears sold
        // out, or joins at the back.
        let view = app.stock("WL").await;
        assert_eq!((view.db_stock, view.held_units), (0, 1), "{view:?}");
        assert_ne!(view.gate_stock, Some(1), "{view:?}");
        let newcomer = reserve(&mut client, "WL", "newcomer", false).await;
        assert_eq!(newcomer.outcome(), ReserveOutcome::SoldOut);
        let back = reserve(&mut client, "WL", "late", true).await;
        assert_eq!(back.outcome(), ReserveOutcome::Waitlisted);
        assert_eq!(back.waitlist_position, Some(9));
        assert_eq!(
            get(&mut client, &line[1].1, &line[1].0)
                .await
                .waitlist_position,
            Some(0)
        );

        // The first does not confirm: its hold expires, the second gets it.
        until_state(
            &mut client,
            &first_id,
            &first_user,
            ReservationState::Expired,
        )
        .await;
        let (second_user, second_id) = line[1].clone();
        until_state(
            &mut client,
            &second_id,
            &second_user,
            ReservationState::Held,
        )
        .await;
        client
            .confirm_reservation(with_user(
                ConfirmReservationRequest {
                    reservation_id: second_id.clone(),
                },
                &second_user,
                None,
            ))
            .await
            .unwrap();

        // Leaving the line moves everyone behind up.
        let left = release(&mut client, &line[2].1, &line[2].0).await;
        assert_eq!(left.state(), ReservationState::Released);
        assert_eq!(
            get(&mut client, &line[3].1, &line[3].0)
                .await
                .waitlist_position,
            Some(0)
        );
        // Two units restocked go to the next two in line, none to stock.
        let view = app
            .admin()
            .adjust_stock(stockgate::pb::AdjustStockRequest {
                sku: "WL".into(),
                delta: 2,
            })
            .await
            .unwrap()
            .into_inner()
            .stock
            .unwrap();
        assert_eq!((view.db_stock, view.held_units), (0, 2), "{view:?}");
        for (user, id) in &line[3..5] {
            until_state(&mut client, id, user, ReservationState::Held).await;
        }
        assert_eq!(
            get(&mut client, &line[5].1, &line[5].0).await.state(),
            ReservationState::Waitlisted
        );
        // Closing the line ends every entry still in it.
        let view = set_policy(&app, "WL", SoldOutPolicy::Instant, 0).await;
        assert_eq!(view.waitlisted_units, 0);
        let closed = get(&mut client, &line[9].1, &line[9].0).await;
        assert_eq!(closed.state(), ReservationState::Expired);
        assert_eq!(closed.reject_reason, "the waitlist was closed");
        assert_eq!(
            reserve(&mut client, "WL", "after", true).await.outcome(),
            ReserveOutcome::SoldOut
        );
        assert_checked(&app).await;
        app.stop().await;
    }
}

/// A full line, a SKU without the policy, bad policy fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_line_has_a_limit_and_bad_fields_are_named() {
    let app = TestApp::spawn(Profile::Embedded).await;
    app.set_stock("FULL", 0, 0).await;
    let mut client = app.inventory();
    // Policy instant (the default): joining is just sold out.
    assert_eq!(
        reserve(&mut client, "FULL", "a", true).await.outcome(),
        ReserveOutcome::SoldOut
    );
    set_policy(&app, "FULL", SoldOutPolicy::Waitlist, 2).await;
    for user in ["a", "b"] {
        assert_eq!(
            reserve(&mut client, "FULL", user, true).await.outcome(),
            ReserveOutcome::Waitlisted
        );
    }
    assert_eq!(
        reserve(&mut client, "FULL", "c", true).await.outcome(),
        ReserveOutcome::SoldOut,
        "a third entry in a line of two"
    );
    let before = app.stock("FULL").await;
    for (policy, limit, field) in [
        (SoldOutPolicy::Unspecified as i32, 0, "policy"),
        (7, 0, "policy"),
        (SoldOutPolicy::Waitlist as i32, 1_000_001, "waitlist_limit"),
    ] {
        let err = app
            .admin()
            .set_sold_out_policy(SetSoldOutPolicyRequest {
                sku: "FULL".into(),
                policy,
                waitlist_limit: limit,
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains(field), "{err:?}");
    }
    let err = app
        .admin()
        .set_sold_out_policy(SetSoldOutPolicyRequest {
            sku: "NOPE".into(),
            policy: SoldOutPolicy::Waitlist as i32,
            waitlist_limit: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    assert_eq!(
        app.stock("FULL").await,
        before,
        "a refused call changed nothing"
    );
    app.stop().await;
}

/// Every real layer (Redis gate, RabbitMQ, PostgreSQL): a storm sells 20
/// units and puts the rest in line; then holders release and stock is
/// added while newcomers storm in. Every returned unit goes to the line,
/// oldest first: no newcomer is admitted while the line is longer than the
/// units that came back, nothing is oversold, and the gate ends level with
/// the database.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_line_and_a_storm_never_oversell() {
    let app = TestApp::spawn(Profile::Rabbit).await;
    app.set_stock("WLS", 20, 0).await;
    set_policy(&app, "WLS", SoldOutPolicy::Waitlist, 0).await;
    let client = app.inventory();
    let wave = |prefix: &'static str, n: usize, join: bool| {
        let client = client.clone();
        async move {
            let calls = (0..n).map(|i| {
                let mut client = client.clone();
                tokio::spawn(async move {
                    let user = format!("{prefix}{i}");
                    let answer = reserve(&mut client, "WLS", &user, join).await;
                    (user, answer)
                })
            });
            futures::future::join_all(calls)
                .await
                .into_iter()
                .map(Result::unwrap)
                .collect::<Vec<_>>()
        }
    };
    let first = wave("a", 300, true).await;
    let mut tally = StormTally::default();
    let mut holders = Vec::new();
    let mut waiting = 0;
    for (user, answer) in &first {
        *tally.outcomes.entry(answer.outcome()).or_default() += 1;
        match answer.outcome() {
            ReserveOutcome::Queued | ReserveOutcome::Reserved => {
                holders.push((user.clone(), answer.reservation.clone().unwrap()))
            }
            ReserveOutcome::Waitlisted => waiting += 1,
            other => panic!("{user}: {other:?}"),
        }
    }
    assert_eq!(holders.len(), 20, "{tally:?}");
    assert_eq!(waiting, 280);
    app.drain("WLS").await;

    // Ten holders release while 200 newcomers storm in and 10 units are
    // added: 20 units come back, all to the 280 in line.
    let mut sessions = client.clone();
    let releases = async {
        for (user, reservation) in holders.iter().take(10) {
            until_state(
                &mut sessions,
                &reservation.reservation_id,
                user,
                ReservationState::Held,
            )
            .await;
            release(&mut sessions, &reservation.reservation_id, user).await;
        }
    };
    let restock = async {
        app.admin()
            .adjust_stock(stockgate::pb::AdjustStockRequest {
                sku: "WLS".into(),
                delta: 10,
            })
            .await
            .unwrap();
    };
    let (newcomers, (), ()) = tokio::join!(wave("n", 200, false), releases, restock);
    for (user, answer) in &newcomers {
        assert_eq!(
            answer.outcome(),
            ReserveOutcome::SoldOut,
            "{user}: {answer:?}"
        );
    }
    app.drain("WLS").await;

    let store = crate::harness::open_store(&app.config);
    let sku = stockgate::domain::Sku::parse("WLS").unwrap();
    let rows = store.reservations_of(&sku).await.unwrap();
    use stockgate::domain::ReservationState as S;
    let from_line: Vec<_> = rows
        .iter()
        .filter(|r| r.user.as_str().starts_with('a'))
        .filter(|r| !holders.iter().any(|(user, _)| user == r.user.as_str()))
        .collect();
    let served: Vec<_> = from_line.iter().filter(|r| r.state == S::Held).collect();
    let still: Vec<_> = from_line
        .iter()
        .filter(|r| r.state == S::Waitlisted)
        .collect();
    assert_eq!((served.len(), still.len()), (20, 260));
    // Oldest first.
    let last_served = served.iter().map(|r| (r.created_at, r.id.as_str())).max();
    let first_waiting = still.iter().map(|r| (r.created_at, r.id.as_str())).min();
    assert!(last_served < first_waiting);
    let view = app.stock("WLS").await;
    assert_eq!(view.db_stock, 0, "{view:?}");
    assert_eq!(view.held_units, 30, "{view:?}");
    assert_eq!(view.gate_stock, Some(0), "{view:?}");
    assert_checked(&app).await;
    app.stop().await;
}

/// A SKU with its one unit held by "holder" and `waiter` in line: a client,
/// the hold's id and the entry's.
async fn one_held_one_waiting(
    app: &TestApp,
    sku: &str,
    waiter: &str,
) -> (Inventory, String, String) {
    app.set_stock(sku, 1, 0).await;
    set_policy(app, sku, SoldOutPolicy::Waitlist, 0).await;
    let mut client = app.inventory();
    let hold = take(&mut client, sku, "holder").await;
    let entry = reserve(&mut client, sku, waiter, true).await;
    assert_eq!(entry.outcome(), ReserveOutcome::Waitlisted, "{entry:?}");
    (client, hold, entry.reservation.unwrap().reservation_id)
}

/// Releases `id` as `user` on a task of its own, for a call that will wait.
fn release_in_background(
    app: &TestApp,
    id: &str,
    user: &str,
) -> tokio::task::JoinHandle<Reservation> {
    let mut client = app.inventory();
    let (id, user) = (id.to_owned(), user.to_owned());
    tokio::spawn(async move { release(&mut client, &id, &user).await })
}

/// An entry that leaves the line just as its turn comes (another session
/// has changed it, not yet committed, when the hand-off's update reaches
/// it): the hand-off finds it gone and the unit goes back on sale, rather
/// than being counted as handed with no hold behind it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_leaving_as_its_turn_comes_leaves_the_unit_in_stock() {
    let app = TestApp::spawn(Profile::Postgres).await;
    let (mut client, holder, entry_id) = one_held_one_waiting(&app, "LEAVE", "leaver").await;

    let other = OpenTransaction::begin(
        &app.config,
        &format!("UPDATE reservations SET state = 'released' WHERE reservation_id = '{entry_id}'"),
    )
    .await;
    let call = release_in_background(&app, &holder, "holder");
    // The hand-off read the entry as waiting and now waits for its row.
    other.wait_for_waiters(1).await;
    other.commit().await;
    assert_eq!(call.await.unwrap().state(), ReservationState::Released);

    let view = app.stock("LEAVE").await;
    assert_eq!((view.db_stock, view.held_units), (1, 0), "{view:?}");
    let left = get(&mut client, &entry_id, "leaver").await;
    assert_eq!(left.state(), ReservationState::Released);
    // The unit is on sale again.
    take(&mut client, "LEAVE", "newcomer").await;
    assert_checked(&app).await;
    app.stop().await;
}

/// An expiry sweep with a lapsed entry and a lapsed hold of the same SKU,
/// beside a change that locks the SKU's row and then ends its entries
/// (switching the policy to `instant`): neither waits for the other in a
/// cycle, so neither fails with a deadlock. The sweep is made to stop
/// between the two steps by another session holding the hold's row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expiry_sweep_and_closing_the_line_do_not_deadlock() {
    let app = TestApp::spawn(Profile::Postgres).await;
    // The test sweeps itself, through the store: no gate to settle.
    app.set_layers(false, false, stockgate::config::DbCheckMode::Optimistic)
        .await;
    let (_, hold, _) = one_held_one_waiting(&app, "SWEEP", "waiter").await;

    let other = OpenTransaction::begin(
        &app.config,
        &format!("SELECT 1 FROM reservations WHERE reservation_id = '{hold}' FOR UPDATE"),
    )
    .await;
    let store = crate::harness::open_store(&app.config);
    let later = chrono::Utc::now().naive_utc() + chrono::Duration::days(1);
    let sweep = tokio::spawn(async move { store.expire_due(later, 100, None).await });
    // The sweep has dealt with the entry and waits for the hold's row.
    other.wait_for_waiters(1).await;
    // Closing the line (it panics on an error) while the sweep still
    // waits, which is let go after a moment.
    let release_the_hold = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        other.commit().await;
    };
    tokio::join!(
        set_policy(&app, "SWEEP", SoldOutPolicy::Instant, 0),
        release_the_hold
    );
    let swept = sweep.await.unwrap().expect("the sweep");
    assert_eq!(swept.len(), 2, "{swept:?}");
    let view = app.stock("SWEEP").await;
    assert_eq!((view.db_stock, view.held_units), (1, 0), "{view:?}");
    assert_eq!(view.sold_out_policy(), SoldOutPolicy::Instant);
    app.stop().await;
}

/// A caller leaves the line just as a hand-off gives their entry units
/// (the hand-off's update reaches the entry first, the leave's second,
/// both made to wait by another session holding the entry's row): the
/// leave releases the new hold, rather than answering as if nothing
/// changed and leaving units with someone who asked to go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_the_line_as_the_units_arrive_gives_them_back() {
    let app = TestApp::spawn(Profile::Postgres).await;
    let (_, holder, entry_id) = one_held_one_waiting(&app, "GO", "leaver").await;

    let other = OpenTransaction::begin(
        &app.config,
        &format!("SELECT 1 FROM reservations WHERE reservation_id = '{entry_id}' FOR UPDATE"),
    )
    .await;
    let hand_off = release_in_background(&app, &holder, "holder");
    // The hand-off waits for the entry first, then the leave.
    other.wait_for_waiters(1).await;
    let leave = release_in_background(&app, &entry_id, "leaver");
    other.wait_for_waiters(2).await;
    other.commit().await;

    assert_eq!(hand_off.await.unwrap().state(), ReservationState::Released);
    let left = leave.await.unwrap();
    assert_eq!(left.state(), ReservationState::Released, "{left:?}");
    let view = app.stock("GO").await;
    assert_eq!((view.db_stock, view.held_units), (1, 0), "{view:?}");
    assert_checked(&app).await;
    app.stop().await;
}

/// Closing the line while one user leaves it (their change not yet
/// committed when the closing reaches their entry): the closing reports
/// only the entries it ended, so the leaver is not announced as EXPIRED.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closing_the_line_reports_only_the_entries_it_ended() {
    let app = TestApp::spawn(Profile::Postgres).await;
    let (mut client, _, leaver) = one_held_one_waiting(&app, "SHUT", "leaver").await;
    let stayer = reserve(&mut client, "SHUT", "stayer", true).await;
    let stayer = stayer.reservation.unwrap().reservation_id;
    let other = OpenTransaction::begin(
        &app.config,
        &format!("UPDATE reservations SET state = 'released' WHERE reservation_id = '{leaver}'"),
    )
    .await;
    let store = crate::harness::open_store(&app.config);
    let closing = tokio::spawn(async move {
        let sku = stockgate::domain::Sku::parse("SHUT").unwrap();
        let instant = stockgate::domain::SoldOutPolicy::Instant;
        let at = stockgate::domain::now();
        store.set_sold_out_policy(&sku, instant, 0, at).await
    });
    other.wait_for_waiters(1).await;
    other.commit().await;
    let (_, ended) = closing.await.unwrap().unwrap().expect("a known SKU");
    let ended: Vec<&str> = ended.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ended, [stayer.as_str()]);
    app.stop().await;
}

/// A join whose idempotency key another order (in another SKU) stores at
/// the same moment: the insert meets the other row (committed after the
/// join's key check read nothing), and the join answers with that order
/// rather than failing on the unique key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_racing_an_order_with_its_key_answers_that_order() {
    use stockgate::{
        domain::{IdempotencyKey, ReservationId, Sku, UserId},
        store::{NewOrder, WaitlistJoin},
    };
    let app = TestApp::spawn(Profile::Postgres).await;
    one_held_one_waiting(&app, "KEYED", "waiter").await;
    app.set_stock("OTHER", 5, 0).await;
    let theirs = ReservationId::generate();
    let other = OpenTransaction::begin(
        &app.config,
        &format!(
            "INSERT INTO reservations (reservation_id, sku, user_id, idempotency_key, quantity, \
             state, created_at, updated_at) \
             VALUES ('{}', 'OTHER', 'racer', 'k-1', 1, 'confirmed', now(), now())",
            theirs.as_str()
        ),
    )
    .await;
    let store = crate::harness::open_store(&app.config);
    let joining = tokio::spawn(async move {
        let order = NewOrder {
            id: ReservationId::generate(),
            sku: Sku::parse("KEYED").unwrap(),
            user: UserId::parse("racer").unwrap(),
            quantity: 1,
            idempotency_key: Some(IdempotencyKey::parse("k-1").unwrap()),
            created_at: stockgate::domain::now(),
        };
        let ttl = Duration::from_secs(60);
        store
            .join_waitlist(&order, 100, ttl, order.created_at, false)
            .await
    });
    other.wait_for_waiters(1).await;
    other.commit().await;
    match joining.await.unwrap().expect("no unique-key error") {
        WaitlistJoin::KeyUsed(found) => assert_eq!(found.id, theirs),
        answer => panic!("{answer:?}"),
    }
    app.stop().await;
}
