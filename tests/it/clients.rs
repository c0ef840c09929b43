//! The contract works for callers: the Rust client helper, and stubs
//! generated for Python from `proto/` by grpcio-tools, each doing a real
//! round trip (reserve, the same key again, watch until HELD, extend,
//! confirm, a cart).

use std::process::Command;

use stockgate::{client::Client, pb::ReservationState};

use crate::harness::{Profile, TestApp};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_client_reserves_watches_and_confirms() {
    let app = TestApp::spawn(Profile::Embedded).await;
    app.set_stock("CLIENT-RS", 2, 0).await;
    let channel = crate::harness::connect(app.addr).await;
    let mut client = Client::new(channel, "alice").unwrap();
    let first = client.reserve("CLIENT-RS", 1, "cart-1").await.unwrap();
    let again = client.reserve("CLIENT-RS", 1, "cart-1").await.unwrap();
    let id = first.reservation.unwrap().reservation_id;
    assert_eq!(
        again.reservation.unwrap().reservation_id,
        id,
        "one reservation per key"
    );
    let held = client.wait_until_decided(&id).await.unwrap();
    assert_eq!(held.state(), ReservationState::Held);
    let extended = client.extend(&id, 900).await.unwrap();
    assert!(extended.expires_at.unwrap().seconds > held.expires_at.unwrap().seconds);
    let confirmed = client.confirm(&id).await.unwrap();
    assert_eq!(confirmed.state(), ReservationState::Confirmed);
    let bad = client
        .reserve("CLIENT-RS", 1, "not ascii: é")
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    assert_eq!(app.stock("CLIENT-RS").await.confirmed_units, 1);
    // A cart of both SKUs under one key: held whole, the same cart again.
    app.set_stock("CLIENT-RS-2", 1, 0).await;
    let lines = [("CLIENT-RS", 1), ("CLIENT-RS-2", 1)];
    // Queued (the embedded queue is on), then held whole.
    let cart = client.reserve_cart(&lines, "cart-2").await.unwrap();
    assert_eq!(cart.outcome(), stockgate::pb::CartOutcome::Queued);
    let cart = cart.reservation.unwrap();
    assert_eq!(cart.lines.len(), 2);
    let held = client
        .wait_until_decided(&cart.reservation_id)
        .await
        .unwrap();
    assert_eq!(held.state(), ReservationState::Held);
    assert_eq!(held.lines.len(), 2);
    let again = client.reserve_cart(&lines, "cart-2").await.unwrap();
    assert_eq!(
        again.reservation.unwrap().reservation_id,
        cart.reservation_id
    );
    let confirmed = client.confirm(&cart.reservation_id).await.unwrap();
    assert_eq!(confirmed.state(), ReservationState::Confirmed);
    assert_eq!(app.stock("CLIENT-RS-2").await.confirmed_units, 1);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_round_trip() {
    let deps = crate::harness::python_grpc();
    let stubs = crate::harness::python_stubs(&deps);
    let out = stubs.path().display().to_string();
    let root = crate::harness::ROOT;

    let app = TestApp::spawn_with(Profile::Embedded, |c| {
        c.admin.token = "py-token".into();
        // A reconcile pass that read the rows before a window change could
        // write the older window back (until the next pass).
        c.layers.gate.reconcile_interval_ms = 600_000;
    })
    .await;
    let output = Command::new("python3")
        .arg(format!("{root}/clients/python/roundtrip.py"))
        .args([app.addr.to_string(), "CLIENT-PY".into(), "py-token".into()])
        .env("PYTHONPATH", format!("{out}:{deps}"))
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "roundtrip.py: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["same_key_same_reservation"], true);
    assert_eq!(result["watched_state"], "RESERVATION_STATE_HELD");
    assert_eq!(result["confirmed_state"], "RESERVATION_STATE_CONFIRMED");
    assert_eq!(result["invalid_quantity"]["code"], "INVALID_ARGUMENT");
    assert!(result["invalid_quantity"]["details"]
        .as_str()
        .unwrap()
        .contains("quantity"));
    assert_eq!(result["confirmed_units"], 1);
    assert_eq!(result["db_stock"], 2);
    // ExtendReservation: a hold of 600 s (the default) made to last 1200 s
    // from now; asking for less changes nothing; past 1800 s from when it
    // became HELD is refused with the latest expiry; out of range names the
    // field; a confirmed reservation has no hold to extend.
    let time = |key: &str| {
        chrono::DateTime::parse_from_rfc3339(result[key].as_str().unwrap())
            .unwrap()
            .with_timezone(&chrono::Utc)
    };
    let (held, extended) = (time("held_expires_at"), time("extended_expires_at"));
    assert_eq!(result["extended_state"], "RESERVATION_STATE_HELD");
    let gained = (extended - held).num_milliseconds();
    assert!((599_000..=610_000).contains(&gained), "gained {gained} ms");
    assert_eq!(time("shorter_expires_at"), extended);
    assert_eq!(time("after_refusals_expires_at"), extended);
    let past = &result["past_limit"];
    assert_eq!(past["code"], "FAILED_PRECONDITION");
    assert_eq!(past["reason"], "HOLD_LIMIT");
    let latest = chrono::DateTime::parse_from_rfc3339(
        past["metadata"]["latest_expires_at"].as_str().unwrap(),
    )
    .unwrap();
    // The hold began 600 s before its first expiry; it may last 1800 s.
    let latest_after_held = (latest.with_timezone(&chrono::Utc) - held).num_milliseconds();
    assert!(
        (1_199_000..=1_201_000).contains(&latest_after_held),
        "{latest_after_held} ms"
    );
    let too_long = &result["too_long"];
    assert_eq!(too_long["code"], "INVALID_ARGUMENT");
    assert_eq!(too_long["metadata"]["field"], "hold_seconds");
    assert_eq!(result["extend_after_confirm"]["reason"], "WRONG_STATE");
    // A sale window, seen by a grpc-core client: the new outcomes, their
    // times (on the server's clock), no reservation, a bad window refused.
    let now = result["window_now"].as_i64().unwrap();
    let iso = |secs: i64| {
        chrono::DateTime::from_timestamp(secs, 0)
            .unwrap()
            .format("%Y-%m-%dT%H:%M:%SZ")
            .to_string()
    };
    let not_open = &result["not_open"];
    assert_eq!(not_open["outcome"], "RESERVE_OUTCOME_NOT_OPEN");
    assert_eq!(not_open["opens_at"], iso(now + 3600));
    assert_eq!(not_open["closes_at"], serde_json::Value::Null);
    assert_eq!(not_open["has_reservation"], false);
    let closed = &result["closed"];
    assert_eq!(closed["outcome"], "RESERVE_OUTCOME_CLOSED");
    assert_eq!(closed["closes_at"], iso(now - 3600));
    assert_eq!(closed["opens_at"], serde_json::Value::Null);
    let backwards = &result["backwards_window"];
    assert_eq!(backwards["code"], "INVALID_ARGUMENT");
    assert!(backwards["details"].as_str().unwrap().contains("closes_at"));
    assert_eq!(result["windowed_db_stock"], 5);
    // A fair opening seen by a grpc-core client: three buyers in a draw,
    // each waiting for its close; one unit, one winner; the draw reads
    // back with its seed; a SKU without one has no draw (by reason).
    assert_eq!(
        result["draw_outcomes"],
        serde_json::json!([
            "ADMITTED",
            "RESERVE_OUTCOME_SOLD_OUT",
            "RESERVE_OUTCOME_SOLD_OUT"
        ])
    );
    assert_eq!(result["draw_heard_after_close"], true);
    let draw = &result["draw"];
    assert_eq!(draw["entrant_count"], 3);
    assert_eq!(draw["seed_digits"], 16);
    assert_eq!(draw["drawn"], true);
    assert_eq!(
        draw["outcomes"],
        serde_json::json!([
            "DRAW_OUTCOME_ADMITTED",
            "DRAW_OUTCOME_SOLD_OUT",
            "DRAW_OUTCOME_SOLD_OUT"
        ])
    );
    assert_eq!(result["no_draw"]["code"], "NOT_FOUND");
    assert_eq!(result["no_draw"]["reason"], "UNKNOWN_DRAW");
    // A sale of two SKUs with a cap of 1: the second order is refused,
    // synchronously or as the queued reservation's end.
    let members = serde_json::json!(["CLIENT-PY-S1", "CLIENT-PY-S2"]);
    assert_eq!(result["sale"]["skus"], members);
    assert_eq!(result["sale"]["max_per_user"], 1);
    assert_eq!(result["sale_read_back"], members);
    assert_eq!(result["sale_of_member"], "CLIENT-PY-SALE");
    let outcomes = &result["sale_outcomes"];
    assert!(
        ["RESERVE_OUTCOME_RESERVED", "RESERVE_OUTCOME_QUEUED"]
            .contains(&outcomes[0].as_str().unwrap()),
        "{outcomes}"
    );
    match outcomes[1].as_str().unwrap() {
        "RESERVE_OUTCOME_USER_LIMIT_REACHED" => {}
        "RESERVE_OUTCOME_QUEUED" => {
            let end = &result["sale_second_state"];
            assert_eq!(end["state"], "RESERVATION_STATE_REJECTED", "{end}");
            assert!(
                end["reason"].as_str().unwrap().starts_with("sale limit"),
                "{end}"
            );
        }
        other => panic!("second order in the sale: {other}"),
    }
    assert_eq!(result["in_other_sale"]["code"], "FAILED_PRECONDITION");
    assert_eq!(result["in_other_sale"]["reason"], "SKU_IN_OTHER_SALE");
    // A cart seen by a grpc-core client: held whole and read back with
    // its lines; the next buyer's cart refused naming the sold-out line,
    // holding nothing; released whole; a SKU twice names `lines`.
    let cart = &result["cart"];
    // (The embedded profile's order queue is on: queued, then held.)
    assert_eq!(cart["outcome"], "CART_OUTCOME_QUEUED");
    assert_eq!(cart["queue_position"], true);
    assert_eq!(cart["state"], "RESERVATION_STATE_HELD");
    assert_eq!(
        cart["lines"],
        serde_json::json!([["CLIENT-PY-C1", 2], ["CLIENT-PY-C2", 1]])
    );
    assert_eq!(cart["refused"], "CART_OUTCOME_REFUSED");
    assert_eq!(
        cart["line_results"],
        serde_json::json!([
            ["CLIENT-PY-C1", "RESERVE_OUTCOME_RESERVED"],
            ["CLIENT-PY-C2", "RESERVE_OUTCOME_SOLD_OUT"]
        ])
    );
    assert_eq!(cart["released"], "RESERVATION_STATE_RELEASED");
    assert_eq!(cart["db_stock"], serde_json::json!([4, 1]));
    assert_eq!(cart["bad"]["code"], "INVALID_ARGUMENT");
    assert_eq!(cart["bad"]["field"], "lines");
    app.stop().await;
}
