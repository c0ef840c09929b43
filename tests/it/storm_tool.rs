//! `stockgate storm`, the load tool: its runs against a real server hold
//! the invariants it checks, its checker fails when they are broken, the
//! matrix compares the strategies, and the report renders.

use std::collections::HashMap;

use diesel_async::{AsyncConnection, AsyncPgConnection, SimpleAsyncConnection};
use stockgate_tools::storm::{self, StormOptions};

use crate::harness::{Profile, TestApp};

pub(crate) fn options(app: &TestApp, sku: &str, stock: i64, requests: usize) -> StormOptions {
    StormOptions {
        addr: format!("http://{}", app.addr),
        admin_addr: format!("http://{}", app.addr),
        token: None,
        sku: sku.into(),
        stock,
        skus: 1,
        zipf: 0.0,
        seed: None,
        requests,
        users: requests,
        concurrency: 200,
        connections: 4,
        quantity: 1,
        double_click: 0.1,
        retries: 2,
        timeout_ms: 30_000,
        progress: false,
        store: None,
        metrics_url: app.metrics_addr.map(|a| format!("http://{a}/metrics")),
        opens_in_ms: 0,
        draw_ms: 0,
    }
}

/// A sale that opens at a set time, with the RabbitMQ queue and the Redis
/// gate: the calls start 1.5 s early, every early caller hears NOT_OPEN
/// and comes back at the opening, exactly the stock is sold, every
/// invariant holds, and nothing was admitted before the opening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_opening_at_a_set_time_admits_nothing_before_it() {
    let app = TestApp::spawn(Profile::Rabbit).await;
    let options = StormOptions {
        opens_in_ms: 1_500,
        double_click: 0.0,
        concurrency: 100,
        ..options(&app, "OPENING", 20, 400)
    };
    let report = storm::run(&options, "storm").await.unwrap();
    let rendered = storm::render(&report);
    assert!(report.ok(), "{rendered}");
    assert_eq!(report.admitted, 20, "{rendered}");
    assert_eq!(report.units_ordered, 20, "{rendered}");
    // The first wave (the whole concurrency) came before the opening.
    assert!(report.not_open_answers >= 100, "{rendered}");
    assert_eq!(
        report.outcomes.get("RESERVE_OUTCOME_NOT_OPEN"),
        None,
        "{rendered}"
    );
    let check = report
        .checks
        .iter()
        .find(|c| c.name == "nothing admitted before the opening")
        .expect("the opening is checked");
    assert!(check.ok, "{rendered}");
    assert!(rendered.contains("the sale opened at "), "{rendered}");
    app.stop().await;
}

/// The same opening with a draw of 800 ms: the first wave comes back at
/// the opening and is entered in the draw, the stock goes to 20 of them,
/// the report reads the draw back, re-runs it to the same outcomes and
/// finds its winners spread over the entrants as a random draw's would
/// (the bound a random draw exceeds once in 1,000 runs: the stated
/// false-failure rate), and every invariant holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_opening_with_a_draw_reports_the_draw() {
    let app = TestApp::spawn(Profile::Rabbit).await;
    let options = StormOptions {
        opens_in_ms: 1_500,
        draw_ms: 800,
        double_click: 0.0,
        concurrency: 100,
        ..options(&app, "DRAWN", 20, 400)
    };
    let report = storm::run(&options, "storm").await.unwrap();
    let rendered = storm::render(&report);
    assert!(report.ok(), "{rendered}");
    assert_eq!(report.admitted, 20, "{rendered}");
    let [draw] = report.draws.as_slice() else {
        panic!("one draw: {rendered}");
    };
    assert!(draw.entrants >= 100, "{rendered}");
    assert_eq!(draw.admitted, 20, "{rendered}");
    assert!(draw.re_run_agrees, "{rendered}");
    let spread = draw.spread.expect("winners");
    assert!(spread < draw.spread_bound, "{rendered}");
    assert!(rendered.contains("draw of DRAWN: seed "), "{rendered}");
    app.stop().await;
}

/// 5,000 calls (and 500 double clicks) for 3 units: exactly 3 admitted and
/// confirmed, every check holds, every double click got one reservation.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_holds_every_invariant() {
    let app = TestApp::spawn_with(Profile::Embedded, |c| {
        c.metrics.listen = "127.0.0.1:0".into();
        c.layers.dedup.enabled = true;
    })
    .await;
    let report = storm::run(&options(&app, "TOOL", 3, 5_000), "storm")
        .await
        .unwrap();
    print!("{}", storm::render(&report));
    assert!(report.ok(), "{:?}", report.checks);
    assert_eq!(report.calls, 5_500);
    assert_eq!((report.admitted, report.confirmed), (3, 3));
    assert_eq!(report.units_ordered, 3);
    assert_eq!(report.oversold, 0);
    assert_eq!(report.outcomes.values().sum::<usize>(), 5_500);
    assert!(report.db_writes.is_some_and(|w| w >= 3));
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["units_ordered"], 3);
    let summed: u64 = json["outcomes"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(summed, 5_500, "the JSON's outcomes add up to the calls");
    app.stop().await;
}

/// The checker is not a formality: a database changed behind the storm's
/// back (stock bumped, an order nobody was told about) fails its checks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checker_finds_a_broken_database() {
    let app = TestApp::spawn(Profile::Postgres).await;
    let url = app.config.backends.store.clone();
    let mut opts = options(&app, "CHECKED", 5, 500);
    opts.store = Some(url.clone());
    let report = storm::run(&opts, "storm").await.unwrap();
    assert!(report.ok(), "{:?}", report.checks);
    assert!(report
        .checks
        .iter()
        .any(|c| c.name.starts_with("database:")));

    let mut conn = AsyncPgConnection::establish(&url).await.unwrap();
    conn.batch_execute("UPDATE inventory SET stock = stock + 1 WHERE sku = 'CHECKED'")
        .await
        .unwrap();
    let told_nobody = HashMap::new();
    let store = storm::open_database(&url).unwrap();
    let checks = storm::check_database(&store, "CHECKED", 5, &told_nobody)
        .await
        .unwrap();
    let failed: Vec<&str> = checks.iter().filter(|c| !c.ok).map(|c| c.name).collect();
    assert_eq!(
        failed,
        [
            "database: stock left = stock - units ordered",
            "database: no order a caller was not told about"
        ]
    );
    app.stop().await;
}

/// The matrix against the real backends (PostgreSQL, the Redis gate,
/// RabbitMQ), each run a sale of ten SKUs of five units with Zipf
/// popularity: every real configuration, every layer on and each off,
/// holds every invariant per SKU (the database's included) and sells
/// exactly the stock; the naive baseline oversells, so the per-SKU
/// detector is proven; the switches are restored; the HTML report has two
/// well-formed SVG charts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_matrix_compares_every_strategy() {
    let app = TestApp::spawn_with(Profile::Rabbit, |c| {
        c.metrics.listen = "127.0.0.1:0".into();
        c.admin.switch_poll_ms = 100;
    })
    .await;
    let before = app
        .admin()
        .get_layers(stockgate::pb::GetLayersRequest {})
        .await
        .unwrap()
        .into_inner()
        .layers;
    let mut opts = options(&app, "MATRIX", 5, 1_000);
    opts.double_click = 0.0;
    opts.skus = 10;
    opts.zipf = 1.0;
    opts.store = Some(app.config.backends.store.clone());
    let reports = storm::run_matrix(&opts).await.unwrap();
    let table = storm::render_matrix(&reports);
    print!("{table}");
    let names: Vec<&str> = reports.iter().map(|r| r.strategy.as_str()).collect();
    assert_eq!(names.len(), 8);
    assert!(names.last().unwrap().starts_with("NAIVE"));
    for report in &reports {
        if !report.strategy.starts_with("NAIVE") {
            assert!(report.ok(), "{}: {:?}", report.strategy, report.checks);
            assert_eq!(report.units_ordered, 50, "{}", report.strategy);
            assert!(
                report.checks.iter().any(|c| c.name.starts_with("database:")
                    && c.detail.contains("holds for each of 10 SKUs")),
                "{:?}",
                report.checks
            );
            let hottest = &report.hottest;
            assert_eq!(hottest.len(), 5);
            assert!(hottest[0].sku.ends_with("-0000"), "{hottest:?}");
            assert!(hottest[0].calls > 2 * hottest[4].calls, "{hottest:?}");
            assert!(
                hottest
                    .iter()
                    .all(|t| t.units_ordered == 5 && t.stock_left == 0),
                "{hottest:?}"
            );
        }
        assert_eq!(report.calls, 1_000);
    }
    let after = app
        .admin()
        .get_layers(stockgate::pb::GetLayersRequest {})
        .await
        .unwrap()
        .into_inner()
        .layers;
    assert_eq!(after, before, "the matrix restores the switches");
    let naive = reports.last().unwrap();
    assert!(
        naive.oversold > 0 && !naive.ok(),
        "the naive baseline did not oversell, so the detector is not proven: {:?}",
        naive.checks
    );
    let page = storm::report::html(&reports);
    assert_eq!(page.matches("<svg").count(), 2);
    assert!(page.contains("NAIVE read-then-write (broken)"));
    assert_svgs_well_formed(&page);
    app.stop().await;
}

/// Each inline SVG parses as XML (Python's parser; no XML crate needed).
fn assert_svgs_well_formed(page: &str) {
    let dir = tempfile::tempdir().unwrap();
    for (n, (start, _)) in page.match_indices("<svg").enumerate() {
        let end = page[start..].find("</svg>").unwrap() + start + "</svg>".len();
        let file = dir.path().join(format!("{n}.svg"));
        std::fs::write(&file, &page[start..end]).unwrap();
        let output = std::process::Command::new("python3")
            .args(["-c", "import sys, xml.etree.ElementTree as t; r = t.parse(sys.argv[1]).getroot(); assert r.tag.endswith('svg'), r.tag"])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "SVG {n} is not well-formed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}
