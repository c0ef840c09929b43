//! The invariant checker (`AdminService/CheckInvariants`, `stockgate admin
//! check`): quiet after a storm, and specific when something is broken.

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use stockgate::pb::{
    CheckInvariantsRequest, CheckInvariantsResponse, DbCheckMode, SetLayersRequest,
};

use crate::harness::{storm, Profile, TestApp};

async fn check(app: &TestApp, sku: &str) -> CheckInvariantsResponse {
    app.admin()
        .check_invariants(CheckInvariantsRequest { sku: sku.into() })
        .await
        .unwrap()
        .into_inner()
}

/// `stockgate admin check` (the server has no admin token): whether it
/// passed, and its stdout and stderr together.
fn cli_check(app: &TestApp) -> (bool, String) {
    let (ok, out, err) = crate::ops::admin_cli(app, "none", "check-test", &["check"]);
    (ok, out + &err)
}

/// After a storm through the Redis gate and the queue, every invariant
/// holds and the gate was compared; a gate counter moved behind the
/// service's back, then a database row, each show up by name; the CLI
/// exits non-zero and names the SKU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_holds_after_a_storm_and_names_what_breaks() {
    let app = TestApp::spawn(Profile::Redis).await;
    app.set_stock("CHECK", 100, 0).await;
    app.set_stock("OTHER", 5, 0).await;
    let tally = storm(app.addr, "CHECK", 2_000, 8, |i| 1 + (i % 3) as u32).await;
    assert!(tally.errors.is_empty());
    app.drain("CHECK").await;
    let report = check(&app, "").await;
    assert!(report.ok, "{report:?}");
    assert!(report.gate_compared);
    let sku = report.skus.iter().find(|s| s.sku == "CHECK").unwrap();
    assert_eq!(sku.supplied, 100);
    assert_eq!(sku.db_stock + sku.held_units + sku.confirmed_units, 100);
    assert_eq!(sku.gate_stock, Some(sku.db_stock));
    let (ok, out) = cli_check(&app);
    assert!(ok, "{out}");

    // Tampered with behind the service's back, as a stray script might.
    let mut redis = redis::Client::open(app.config.backends.gate.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let counter = format!("{}:{{OTHER}}:inv", app.config.redis.key_prefix);
    let tamper = |delta: i64| {
        redis::cmd("HINCRBY")
            .arg(&counter)
            .arg("stock")
            .arg(delta)
            .clone()
    };
    let _: i64 = tamper(3).query_async(&mut redis).await.unwrap();
    let report = check(&app, "OTHER").await;
    assert!(!report.ok);
    let problems = &report.skus[0].problems;
    assert!(problems[0].starts_with("gate 8 "), "{problems:?}");
    let _: i64 = tamper(-3).query_async(&mut redis).await.unwrap();
    assert!(check(&app, "OTHER").await.ok);

    let mut conn = AsyncPgConnection::establish(&app.config.backends.store)
        .await
        .unwrap();
    conn.batch_execute("UPDATE inventory SET stock = stock + 2 WHERE sku = 'CHECK'")
        .await
        .unwrap();
    let report = check(&app, "CHECK").await;
    assert!(!report.ok);
    assert!(
        report.skus[0]
            .problems
            .iter()
            .any(|p| p.starts_with("stock ")),
        "{report:?}"
    );
    let (ok, out) = cli_check(&app);
    assert!(!ok);
    assert!(
        out.contains("CHECK") && out.contains("invariants broken"),
        "{out}"
    );
    let unknown = app
        .admin()
        .check_invariants(CheckInvariantsRequest { sku: "NOPE".into() })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
    app.stop().await;
}

/// The naive read-then-write (forced: nothing else guards) oversells under
/// concurrency, and the checker says so from the database alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_catches_the_naive_oversell() {
    let app = TestApp::spawn(Profile::Postgres).await;
    app.set_stock("NAIVE", 20, 0).await;
    app.admin()
        .set_layers(SetLayersRequest {
            gate: Some(false),
            queue: Some(false),
            db_check: DbCheckMode::Off as i32,
            force: true,
            reason: "prove the checker".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let tally = storm(app.addr, "NAIVE", 1_000, 8, |_| 1).await;
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    let report = check(&app, "NAIVE").await;
    let sku = &report.skus[0];
    let ordered = sku.held_units + sku.confirmed_units;
    assert!(
        ordered > 20,
        "the naive write did not oversell this time ({ordered} of 20)"
    );
    assert!(!report.ok);
    assert!(
        sku.problems.iter().any(|p| p.starts_with("oversold")),
        "{report:?}"
    );
    app.stop().await;
}
