//! The dead-letter queue as an operator meets it, against the real broker,
//! PostgreSQL and Redis: a poison order shows in the metrics and in
//! `dlq list`, is sent back once its cause is fixed and commits exactly
//! once; purge needs a reason; both are audited and refused without the
//! admin token.

use std::time::Duration;

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use lapin::{
    options::{BasicGetOptions, BasicNackOptions},
    types::{AMQPValue, FieldTable},
    BasicProperties,
};
use stockgate::{
    domain::{ReservationId, ReservationState},
    pb::{
        CheckInvariantsRequest, DeadLetterSelection, GetStockRequest, ListAuditEventsRequest,
        ListDeadLettersRequest, PurgeDeadLettersRequest, RedriveDeadLettersRequest, ReserveOutcome,
        SetStockRequest, StockView,
    },
    queue::QueueNames,
};
use tonic::{Code, Request};

use crate::{
    harness::{amqp_channel, open_store, publish, queue_depth, reserve, Profile, TestApp},
    ops::{scrape, sum},
};

const TOKEN: &str = "dlq-token";

fn authed<T>(body: T) -> Request<T> {
    let mut request = Request::new(body);
    let metadata = request.metadata_mut();
    metadata.insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    metadata.insert("x-operator", "carol".parse().unwrap());
    request
}

async fn spawn() -> TestApp {
    TestApp::spawn_with(Profile::Rabbit, |c| {
        c.layers.queue.max_attempts = 2;
        c.admin.token = TOKEN.into();
        c.metrics.listen = "127.0.0.1:0".into();
    })
    .await
}

async fn set_stock(app: &TestApp, sku: &str, stock: i64) {
    app.admin()
        .set_stock(authed(SetStockRequest {
            sku: sku.into(),
            stock,
            max_per_user: 0,
        }))
        .await
        .unwrap();
}

async fn stock(app: &TestApp, sku: &str) -> StockView {
    app.admin()
        .get_stock(authed(GetStockRequest { sku: sku.into() }))
        .await
        .unwrap()
        .into_inner()
        .stock
        .unwrap()
}

async fn db(app: &TestApp) -> AsyncPgConnection {
    AsyncPgConnection::establish(&app.config.backends.store)
        .await
        .unwrap()
}

/// Waits until the dead-letter queue holds `messages` ready ones.
async fn wait_depth(names: &QueueNames, messages: u32) {
    let mut depth = 0;
    for _ in 0..200 {
        depth = queue_depth(&names.dead_letters).await;
        if depth == messages {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("dead-letter queue at {depth}, expected {messages}");
}

/// Waits until a scrape shows `value` for the series.
async fn wait_metric(app: &TestApp, name: &str, labels: &[(&str, &str)], value: f64) {
    let mut seen = 0.0;
    // The depth gauge is sampled every 5 s.
    for _ in 0..120 {
        seen = sum(&scrape(app.metrics_addr.unwrap()).await, name, labels);
        if seen == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{name}{labels:?} at {seen}, expected {value}");
}

async fn wait_state(app: &TestApp, id: &ReservationId, state: ReservationState) -> String {
    let store = open_store(&app.config);
    let mut seen = None;
    for _ in 0..400 {
        seen = store.reservation(id).await.unwrap();
        if let Some(row) = seen.as_ref().filter(|r| r.state == state) {
            return row.reject_reason.clone().unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("reservation {id:?} at {seen:?}, expected {state:?}");
}

fn cli(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    crate::ops::admin_cli(app, TOKEN, "dave", args)
}

/// Runs `sql` on the test's database.
async fn execute(app: &TestApp, sql: &str) {
    db(app).await.batch_execute(sql).await.unwrap();
}

/// `stockgate admin dlq redrive --key ID --reason REASON`: one message
/// sent back.
fn redrive_one(app: &TestApp, id: &ReservationId, reason: &str) {
    let (ok, out, err) = cli(
        app,
        &["dlq", "redrive", "--key", id.as_str(), "--reason", reason],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("redrove 1 messages"), "{out}");
}

/// Publishes the dead letter `body` once more as a redriven copy (as a
/// crash between a redrive's publish and its removal leaves one), then a
/// Reserve of `sku` behind it, and returns once that order is HELD: the
/// copy was processed.
async fn redriven_copy_then_one_behind(
    app: &TestApp,
    names: &QueueNames,
    (body, properties): (&[u8], BasicProperties),
    client: &mut stockgate::pb::inventory_service_client::InventoryServiceClient<
        tonic::transport::Channel,
    >,
    (sku, user): (&str, &str),
) {
    let mut headers: FieldTable = properties.headers().clone().unwrap_or_default();
    headers.insert("x-stockgate-redriven".into(), AMQPValue::Boolean(true));
    publish(&names.orders, body, properties.with_headers(headers)).await;
    let behind = reserve(client, sku, 1, user).await.unwrap();
    let behind = ReservationId::parse(&behind.reservation.unwrap().reservation_id).unwrap();
    wait_state(app, &behind, ReservationState::Held).await;
}

/// The first dead letter's body and properties, put back at once.
async fn peek(names: &QueueNames) -> (Vec<u8>, BasicProperties) {
    let (_conn, channel) = amqp_channel().await;
    let message = channel
        .basic_get(
            names.dead_letters.as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .expect("a dead letter");
    let delivery = message.delivery;
    channel
        .basic_nack(
            delivery.delivery_tag,
            BasicNackOptions {
                requeue: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    (delivery.data, delivery.properties)
}

async fn audit_of(app: &TestApp, action: &str) -> Vec<stockgate::pb::AuditEvent> {
    app.admin()
        .list_audit_events(authed(ListAuditEventsRequest { limit: 50 }))
        .await
        .unwrap()
        .into_inner()
        .events
        .into_iter()
        .filter(|e| e.action == action)
        .collect()
}

/// An order the database refuses (a trigger standing in for a bug fixed
/// later) is given up: REJECTED, units back, one message in the
/// dead-letter queue, counted in the metrics and listed with its error.
/// Once the trigger is gone, `dlq redrive` sends it back and it commits as
/// a new order would: HELD, the stock and the gate charged once. A copy
/// redriven again (as a crash between publish and removal would leave)
/// changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_order_is_listed_redriven_once_fixed_and_committed_once() {
    let app = spawn().await;
    let names = QueueNames::new(&app.config.rabbitmq.queue);
    set_stock(&app, "DLQ-FIX", 5).await;
    execute(
        &app,
        "CREATE FUNCTION refuse_holds() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'the warehouse feed refuses %', NEW.sku; END $$;
             CREATE TRIGGER refuse_holds BEFORE INSERT ON reservations FOR EACH ROW
             WHEN (NEW.state = 'held') EXECUTE FUNCTION refuse_holds();",
    )
    .await;
    let mut client = app.inventory();
    let answer = reserve(&mut client, "DLQ-FIX", 2, "dana").await.unwrap();
    assert_eq!(answer.outcome(), ReserveOutcome::Queued);
    let id = ReservationId::parse(&answer.reservation.unwrap().reservation_id).unwrap();
    let reason = wait_state(&app, &id, ReservationState::Rejected).await;
    assert!(
        reason.starts_with("processing failed") && reason.contains("warehouse feed"),
        "{reason}"
    );
    wait_depth(&names, 1).await;
    wait_metric(
        &app,
        "stockgate_dlq_set_aside_total",
        &[("cause", "given_up")],
        1.0,
    )
    .await;
    wait_metric(&app, "stockgate_dlq_messages", &[], 1.0).await;
    assert_eq!(stock(&app, "DLQ-FIX").await.db_stock, 5);

    // Listed, and listing takes nothing away.
    let mut admin = app.admin();
    let refused = admin
        .list_dead_letters(ListDeadLettersRequest { limit: 10 })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let listed = admin
        .list_dead_letters(authed(ListDeadLettersRequest { limit: 10 }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.depth, 1);
    let letter = &listed.dead_letters[0];
    assert_eq!(
        (
            letter.key.as_str(),
            letter.reservation_id.as_str(),
            letter.sku.as_str(),
            letter.user_id.as_str(),
            letter.quantity
        ),
        (id.as_str(), id.as_str(), "DLQ-FIX", "dana", 2)
    );
    assert!(letter.error.contains("warehouse feed"), "{letter:?}");
    assert!(letter.dead_lettered_at.is_some() && letter.message_bytes > 0);
    // The listing's look puts the message back as its connection closes.
    wait_depth(&names, 1).await;
    let (ok, out, err) = cli(&app, &["dlq", "list"]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("1 in the dead-letter queue") && out.contains(id.as_str()),
        "{out}"
    );
    wait_depth(&names, 1).await;
    let (body, properties) = peek(&names).await;
    wait_depth(&names, 1).await;

    // No token, no redrive.
    let refused = admin
        .redrive_dead_letters(RedriveDeadLettersRequest {
            selection: Some(DeadLetterSelection {
                keys: vec![id.as_str().into()],
                ..Default::default()
            }),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    wait_depth(&names, 1).await;

    // The cause fixed, the order goes back and commits.
    execute(&app, "DROP TRIGGER refuse_holds ON reservations").await;
    redrive_one(&app, &id, "feed fixed");
    wait_state(&app, &id, ReservationState::Held).await;
    wait_depth(&names, 0).await;
    let view = stock(&app, "DLQ-FIX").await;
    assert_eq!((view.db_stock, view.held_units), (3, 2), "{view:?}");

    // A second copy, redriven as a crash mid-redrive would leave it, and
    // an order behind it so we know the copy was processed.
    redriven_copy_then_one_behind(
        &app,
        &names,
        (&body, properties),
        &mut client,
        ("DLQ-FIX", "erin"),
    )
    .await;
    let rows = open_store(&app.config)
        .reservations_of(&stockgate::domain::Sku::parse("DLQ-FIX").unwrap())
        .await
        .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    let view = stock(&app, "DLQ-FIX").await;
    assert_eq!((view.db_stock, view.held_units), (2, 3), "{view:?}");
    // The gate was charged for the redriven order, once.
    let mut gate = None;
    for _ in 0..100 {
        gate = stock(&app, "DLQ-FIX").await.gate_stock;
        if gate == Some(2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(gate, Some(2));
    // Its release gives the units back to the gate at once (the
    // reconciler's repair would take two passes, 10 s).
    crate::harness::release(&mut client, id.as_str(), "dana")
        .await
        .unwrap();
    let view = stock(&app, "DLQ-FIX").await;
    assert_eq!((view.db_stock, view.gate_stock), (4, Some(4)), "{view:?}");
    let report = app
        .admin()
        .check_invariants(authed(CheckInvariantsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(report.ok && report.gate_compared, "{report:?}");

    // Nothing left to send back; both calls are in the audit trail.
    let again = admin
        .redrive_dead_letters(authed(RedriveDeadLettersRequest {
            selection: Some(DeadLetterSelection {
                keys: vec![id.as_str().into()],
                ..Default::default()
            }),
            reason: "twice".into(),
        }))
        .await
        .unwrap()
        .into_inner()
        .moved
        .unwrap();
    assert!(again.keys.is_empty());
    assert_eq!(again.not_found, [id.as_str()]);
    let events = audit_of(&app, "dlq_redrive").await;
    assert_eq!(events.len(), 2, "{events:?}");
    let first = events.iter().find(|e| e.reason == "feed fixed").unwrap();
    assert_eq!(first.outcome, "applied");
    assert!(first.actor.starts_with("dave from"), "{first:?}");
    assert!(first.after.contains(id.as_str()), "{first:?}");
    wait_metric(
        &app,
        "stockgate_dlq_operator_messages_total",
        &[("action", "redrive")],
        1.0,
    )
    .await;
    wait_metric(&app, "stockgate_dlq_messages", &[], 0.0).await;
    app.stop().await;
}

/// Messages no processor can read (no reservation to name) are keyed by
/// their digest; a purge needs a reason, takes what it is asked for (by
/// key, or the first N) and nothing else, and is audited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_needs_a_reason_takes_what_it_is_asked_and_is_audited() {
    let app = spawn().await;
    let names = QueueNames::new(&app.config.rabbitmq.queue);
    for n in 0..3 {
        let body = format!("not an order {n}");
        publish(&names.orders, body.as_bytes(), BasicProperties::default()).await;
    }
    wait_depth(&names, 3).await;
    wait_metric(
        &app,
        "stockgate_dlq_set_aside_total",
        &[("cause", "unreadable")],
        3.0,
    )
    .await;
    let mut admin = app.admin();
    let listed = admin
        .list_dead_letters(authed(ListDeadLettersRequest { limit: 2 }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((listed.depth, listed.dead_letters.len()), (3, 2));
    let letter = &listed.dead_letters[0];
    assert!(letter.key.starts_with("sha256:"), "{letter:?}");
    assert!(letter.reservation_id.is_empty());
    assert!(letter.error.contains("undecodable"), "{letter:?}");
    assert!(letter.preview.starts_with("not an order"), "{letter:?}");
    let key = letter.key.clone();

    let by_key = |reason: &str| PurgeDeadLettersRequest {
        selection: Some(DeadLetterSelection {
            keys: vec![key.clone(), "sha256:0000000000000000".into()],
            ..Default::default()
        }),
        reason: reason.into(),
    };
    let refused = admin.purge_dead_letters(by_key("")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let refused = admin
        .purge_dead_letters(authed(by_key(" ")))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(crate::harness::error_reason(&refused), "INVALID_ARGUMENT");
    assert!(refused.message().contains("reason"), "{refused:?}");
    wait_depth(&names, 3).await;

    let purged = admin
        .purge_dead_letters(authed(by_key("test junk")))
        .await
        .unwrap()
        .into_inner()
        .moved
        .unwrap();
    assert_eq!(purged.keys, [key]);
    assert_eq!(purged.not_found, ["sha256:0000000000000000"]);
    assert_eq!(purged.remaining, 2);
    wait_depth(&names, 2).await;
    let first = |limit| PurgeDeadLettersRequest {
        selection: Some(DeadLetterSelection {
            all: true,
            limit,
            ..Default::default()
        }),
        reason: "test junk".into(),
    };
    let purged = admin
        .purge_dead_letters(authed(first(1)))
        .await
        .unwrap()
        .into_inner()
        .moved
        .unwrap();
    assert_eq!((purged.keys.len(), purged.remaining), (1, 1));
    wait_depth(&names, 1).await;
    let (ok, out, err) = cli(&app, &["dlq", "purge", "--all", "--reason", "last"]);
    assert!(ok, "{err}");
    assert!(out.starts_with("purged 1 messages"), "{out}");
    wait_depth(&names, 0).await;
    let (ok, _, err) = cli(&app, &["dlq", "purge", "--all"]);
    assert!(!ok, "purge without --reason ran");
    assert!(err.contains("--reason"), "{err}");

    let events = audit_of(&app, "dlq_purge").await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert!(
        events
            .iter()
            .all(|e| e.outcome == "applied" && !e.reason.is_empty()),
        "{events:?}"
    );
    wait_metric(
        &app,
        "stockgate_dlq_operator_messages_total",
        &[("action", "purge")],
        3.0,
    )
    .await;
    app.stop().await;
}

/// Waits until `sku`'s gate count is `units`.
async fn wait_gate(app: &TestApp, sku: &str, units: i64) {
    let mut gate = None;
    for _ in 0..100 {
        gate = stock(app, sku).await.gate_stock;
        if gate == Some(units) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{sku}: the gate holds {gate:?}, not {units}");
}

/// A queued cart the database refuses (a trigger on one of its SKUs) is
/// given up whole: every line REJECTED with the error, every line's gate
/// units back, one dead letter keyed by the cart. Redriven once the cause
/// is fixed, it commits whole and the gate is charged for every line;
/// a copy redriven again changes nothing. A cart message one of whose
/// lines cannot be read is recorded REJECTED for the lines that can, and
/// set aside.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_cart_is_given_up_whole_and_redriven_whole() {
    let app = spawn().await;
    let names = QueueNames::new(&app.config.rabbitmq.queue);
    set_stock(&app, "DLQC-A", 5).await;
    set_stock(&app, "DLQC-B", 5).await;
    execute(
        &app,
        "CREATE FUNCTION refuse_b() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN RAISE EXCEPTION 'the warehouse feed refuses %', NEW.sku; END $$;
             CREATE TRIGGER refuse_b BEFORE INSERT ON reservations FOR EACH ROW
             WHEN (NEW.state = 'held' AND NEW.sku = 'DLQC-B') EXECUTE FUNCTION refuse_b();",
    )
    .await;
    let mut client = app.inventory();
    let answer = crate::carts::cart(&mut client, "fay", None, &[("DLQC-A", 2), ("DLQC-B", 1)])
        .await
        .unwrap();
    assert_eq!(answer.outcome(), stockgate::pb::CartOutcome::Queued);
    let id = ReservationId::parse(&answer.reservation.unwrap().reservation_id).unwrap();
    let reason = wait_state(&app, &id, ReservationState::Rejected).await;
    assert!(
        reason.starts_with("processing failed") && reason.contains("warehouse feed"),
        "{reason}"
    );
    let cart = open_store(&app.config)
        .reservation(&id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(cart.lines.len(), 2, "{cart:?}");
    assert!(
        cart.lines
            .iter()
            .all(|l| l.reject_reason.as_deref() == Some(reason.as_str())),
        "every line given up alike: {cart:?}"
    );
    wait_depth(&names, 1).await;
    for sku in ["DLQC-A", "DLQC-B"] {
        assert_eq!(stock(&app, sku).await.db_stock, 5, "{sku}");
        wait_gate(&app, sku, 5).await;
    }
    let letter = app
        .admin()
        .list_dead_letters(authed(ListDeadLettersRequest { limit: 10 }))
        .await
        .unwrap()
        .into_inner()
        .dead_letters
        .remove(0);
    assert_eq!(
        (letter.key.as_str(), letter.sku.as_str(), letter.quantity),
        (id.as_str(), "DLQC-A", 2)
    );
    wait_depth(&names, 1).await;
    let (body, properties) = peek(&names).await;
    wait_depth(&names, 1).await;

    execute(&app, "DROP TRIGGER refuse_b ON reservations").await;
    redrive_one(&app, &id, "feed fixed");
    wait_state(&app, &id, ReservationState::Held).await;
    wait_depth(&names, 0).await;
    let held = open_store(&app.config)
        .reservation(&id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(held.lines.len(), 2, "{held:?}");
    for (sku, left) in [("DLQC-A", 3), ("DLQC-B", 4)] {
        let view = stock(&app, sku).await;
        assert_eq!(view.db_stock, left, "{sku}: {view:?}");
        // Charged for the redriven lines, once.
        wait_gate(&app, sku, left).await;
    }

    // A copy redriven again, and an order behind it.
    redriven_copy_then_one_behind(
        &app,
        &names,
        (&body, properties),
        &mut client,
        ("DLQC-B", "gus"),
    )
    .await;
    let store = open_store(&app.config);
    let rows = |sku: &'static str| {
        let store = store.clone();
        async move {
            store
                .reservations_of(&stockgate::domain::Sku::parse(sku).unwrap())
                .await
                .unwrap()
                .len()
        }
    };
    assert_eq!((rows("DLQC-A").await, rows("DLQC-B").await), (1, 2));
    assert_eq!(stock(&app, "DLQC-A").await.db_stock, 3);
    wait_gate(&app, "DLQC-A", 3).await;

    // Given up again, then redriven once B is sold out: decided afresh,
    // the cart is REJECTED for B, its given-up rows replaced.
    execute(
        &app,
        "CREATE TRIGGER refuse_b BEFORE INSERT ON reservations FOR EACH ROW
             WHEN (NEW.state = 'held' AND NEW.sku = 'DLQC-B') EXECUTE FUNCTION refuse_b();",
    )
    .await;
    let answer = crate::carts::cart(&mut client, "ivy", None, &[("DLQC-A", 1), ("DLQC-B", 1)])
        .await
        .unwrap();
    let again = ReservationId::parse(&answer.reservation.unwrap().reservation_id).unwrap();
    let reason = wait_state(&app, &again, ReservationState::Rejected).await;
    assert!(reason.starts_with("processing failed"), "{reason}");
    wait_depth(&names, 1).await;
    set_stock(&app, "DLQC-B", 0).await;
    execute(&app, "DROP TRIGGER refuse_b ON reservations").await;
    redrive_one(&app, &again, "retry");
    let mut decided = None;
    for _ in 0..200 {
        decided = store.reservation(&again).await.unwrap();
        if decided
            .as_ref()
            .and_then(|c| c.reject_reason.as_deref())
            .is_some_and(|r| !r.starts_with("processing failed"))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let decided = decided.unwrap();
    assert_eq!(decided.state, ReservationState::Rejected, "{decided:?}");
    assert!(
        decided
            .reject_reason
            .as_deref()
            .is_some_and(|r| r.starts_with("the cart was refused for DLQC-B (sold out")),
        "{decided:?}"
    );
    assert_eq!(decided.lines.len(), 2);
    wait_depth(&names, 0).await;
    assert_eq!(stock(&app, "DLQC-A").await.db_stock, 3);

    // A cart whose second line cannot be read.
    let (cart_id, third) = (
        uuid::Uuid::now_v7().to_string(),
        uuid::Uuid::now_v7().to_string(),
    );
    let broken = serde_json::json!({
        "v": 4, "ticket": 0, "id": cart_id, "sku": "DLQC-A", "user": "hal",
        "quantity": 1, "idempotency_key": null, "created_at": 1_700_000_000_000_000i64,
        "gated": false,
        "lines": [
            {"id": uuid::Uuid::now_v7().to_string(), "sku": "no spaces", "quantity": 1, "gated": false},
            {"id": third, "sku": "DLQC-B", "quantity": 1, "gated": false},
        ],
    });
    publish(
        &names.orders,
        &serde_json::to_vec(&broken).unwrap(),
        BasicProperties::default(),
    )
    .await;
    let cart_id = ReservationId::parse(&cart_id).unwrap();
    let reason = wait_state(&app, &cart_id, ReservationState::Rejected).await;
    assert!(reason.contains("lines[1].sku"), "{reason}");
    let salvaged = store.reservation(&cart_id).await.unwrap().unwrap();
    let skus: Vec<&str> = salvaged.lines.iter().map(|l| l.sku.as_str()).collect();
    assert_eq!(skus, ["DLQC-A", "DLQC-B"], "{salvaged:?}");
    wait_depth(&names, 1).await;
    assert_eq!(stock(&app, "DLQC-A").await.db_stock, 3);
    let report = app
        .admin()
        .check_invariants(authed(CheckInvariantsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(report.ok, "{report:?}");
    app.stop().await;
}
