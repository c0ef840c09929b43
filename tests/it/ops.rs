//! Game-day operations: runtime switches shared by replicas, the refusal
//! of unsafe changes and the audit trail, admin credentials and listeners,
//! TLS, Prometheus metrics, the operators' CLI, and SIGHUP reloads.

use std::{
    collections::HashMap,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use stockgate::pb::{
    admin_service_client::AdminServiceClient, inventory_service_client::InventoryServiceClient,
    DbCheckMode, GetLayersRequest, GetStockRequest, ListAuditEventsRequest, ReserveOutcome,
    SetLayersRequest, SetStockRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::{transport::Channel, Code, Request};

use crate::harness::{assert_invariants, config_for, reserve, storm, with_user, Profile, TestApp};

fn with_token<T>(body: T, token: &str) -> Request<T> {
    let mut request = Request::new(body);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}

fn as_operator<T>(body: T, operator: &str) -> Request<T> {
    let mut request = Request::new(body);
    request
        .metadata_mut()
        .insert("x-operator", operator.parse().unwrap());
    request
}

async fn layers_of(admin: &mut AdminServiceClient<Channel>) -> stockgate::pb::GetLayersResponse {
    admin
        .get_layers(GetLayersRequest {})
        .await
        .unwrap()
        .into_inner()
}

/// Two replicas over one database and Redis: a switch flipped through one
/// is in force on the other within the poll bound (100 ms here; waited for
/// up to 5 s so a loaded machine does not fail it, and reported); a storm
/// split over both then still sells no more than the stock; and the switch
/// goes back on for both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_switch_reaches_every_replica_and_a_storm_still_holds() {
    let (mut config, db, dir) = config_for(Profile::Redis).await;
    config.admin.switch_poll_ms = 100;
    let a = TestApp::start(config.clone(), db, dir).await;
    a.wait_serving().await;
    let b = TestApp::start(config, None, tempfile::tempdir().unwrap()).await;
    b.wait_serving().await;
    a.set_stock("GAME", 100, 0).await;

    let wait_for = |app: &TestApp, gate: bool, revision: u64| {
        let mut admin = app.admin();
        async move {
            let started = Instant::now();
            loop {
                let answer = layers_of(&mut admin).await;
                if answer.layers.unwrap().gate == gate && answer.revision >= revision {
                    return (started.elapsed(), answer);
                }
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "replica still runs {answer:?}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };

    let changed = a
        .admin()
        .set_layers(SetLayersRequest {
            gate: Some(false),
            reason: "game day".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!changed.layers.unwrap().gate);
    let (took, on_b) = wait_for(&b, false, changed.revision).await;
    eprintln!("gate off reached the other replica in {took:?}");
    assert_eq!(on_b.revision, changed.revision);
    assert_eq!(on_b.stored_revision, changed.revision);
    // Each replica reports what it runs; both are on the new revision.
    let (_, on_a) = wait_for(&a, false, changed.revision).await;
    let fleet: HashMap<String, u64> = on_a
        .replicas
        .iter()
        .map(|r| (r.replica.clone(), r.revision))
        .collect();
    let both_reported = async {
        loop {
            let answer = layers_of(&mut a.admin()).await;
            let revisions: Vec<u64> = answer.replicas.iter().map(|r| r.revision).collect();
            if revisions.len() == 2 && revisions.iter().all(|r| *r == changed.revision) {
                return answer;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let answer = tokio::time::timeout(Duration::from_secs(5), both_reported)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "replicas did not both report revision {}: {fleet:?}",
                changed.revision
            )
        });
    assert!(answer.replicas.iter().any(|r| r.replica == on_b.replica));
    assert_ne!(on_a.replica, on_b.replica);

    // With the gate off, the queue and the database check decide.
    let (left, right) = tokio::join!(
        storm(a.addr, "GAME", 400, 4, |_| 1),
        storm(b.addr, "GAME", 400, 4, |_| 1),
    );
    assert!(left.errors.is_empty() && right.errors.is_empty());
    a.drain("GAME").await;
    b.drain("GAME").await;
    let mut tally = left;
    tally.absorb(right);
    let ordered = assert_invariants(&a, "GAME", 100, &tally).await;
    assert_eq!(ordered, 100, "stock 100, 800 buyers");

    let back = a
        .admin()
        .set_layers(SetLayersRequest {
            gate: Some(true),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let (took, _) = wait_for(&b, true, back.revision).await;
    eprintln!("gate on reached the other replica in {took:?}");
    // The gate came back rebuilt from the database: sold out.
    let mut client = b.inventory();
    let answer = reserve(&mut client, "GAME", 1, "late").await.unwrap();
    assert_eq!(answer.outcome(), ReserveOutcome::SoldOut);
    b.stop().await;
    a.stop().await;
}

/// Turning the database check off while the gate is off would leave
/// nothing to stop an oversell: refused, nothing changes; forced, it
/// applies; both are in the audit trail with who and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_change_is_refused_unless_forced_and_both_are_audited() {
    let app = TestApp::spawn(Profile::Embedded).await;
    let mut admin = app.admin();
    let before = layers_of(&mut admin).await;
    let unsafe_change = |force: bool| SetLayersRequest {
        gate: Some(false),
        db_check: DbCheckMode::Off as i32,
        force,
        reason: "prove the queue alone".into(),
        ..Default::default()
    };
    let refused = admin
        .set_layers(as_operator(unsafe_change(false), "alice"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("force"), "{}", refused.message());
    let after_refusal = layers_of(&mut admin).await;
    assert_eq!(after_refusal.layers, before.layers);
    assert_eq!(after_refusal.revision, before.revision);

    let forced = admin
        .set_layers(as_operator(unsafe_change(true), "alice"))
        .await
        .unwrap()
        .into_inner();
    let layers = forced.layers.unwrap();
    assert!(!layers.gate);
    assert_eq!(layers.db_check(), DbCheckMode::Off);
    assert_eq!(forced.revision, before.revision + 1);

    // Already unguarded: a further change needs no new force.
    admin
        .set_layers(SetLayersRequest {
            dedup: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();

    let events = admin
        .list_audit_events(ListAuditEventsRequest { limit: 10 })
        .await
        .unwrap()
        .into_inner()
        .events;
    let outcomes: Vec<&str> = events.iter().map(|e| e.outcome.as_str()).collect();
    assert_eq!(outcomes.len(), 3, "{outcomes:?}");
    assert_eq!(outcomes[0], "applied");
    assert_eq!(outcomes[1], "forced");
    assert!(outcomes[2].starts_with("refused"), "{outcomes:?}");
    for event in &events[1..] {
        assert!(
            event.actor.starts_with("alice from 127.0.0.1:"),
            "{}",
            event.actor
        );
        assert_eq!(event.reason, "prove the queue alone");
        assert!(
            event.before.contains("\"db_check\":\"optimistic\""),
            "{}",
            event.before
        );
        assert!(
            event.after.contains("\"db_check\":\"off\""),
            "{}",
            event.after
        );
    }

    // Bad input names the field and changes nothing.
    let bad = admin
        .set_layers(SetLayersRequest {
            db_check: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(bad.message().contains("db_check"));
    let bad = admin
        .set_layers(SetLayersRequest {
            rate_limits: Some(stockgate::pb::RateLimitSettings {
                per_user_period_ms: 1000,
                per_user_burst: 0,
                global_per_sec: 10,
                global_burst: 10,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("per_user_burst"),
        "{}",
        bad.message()
    );
    assert_eq!(layers_of(&mut admin).await.revision, forced.revision + 1);
    app.stop().await;
}

/// Rates and shadow mode change at run time: a tight budget refuses at
/// once, shadow lets the same calls through and counts them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_change_at_run_time() {
    let app = TestApp::spawn(Profile::Embedded).await;
    app.set_stock("RATE", 1_000, 0).await;
    let mut admin = app.admin();
    admin
        .set_layers(SetLayersRequest {
            rate_limit: Some(true),
            rate_limits: Some(stockgate::pb::RateLimitSettings {
                per_user_period_ms: 60_000,
                per_user_burst: 1,
                global_per_sec: 1_000,
                global_burst: 1_000,
            }),
            ..Default::default()
        })
        .await
        .unwrap();
    let mut client = app.inventory();
    assert!(reserve(&mut client, "RATE", 1, "u1").await.is_ok());
    let refused = reserve(&mut client, "RATE", 1, "u1").await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    admin
        .set_layers(SetLayersRequest {
            rate_limit_shadow: Some(true),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(reserve(&mut client, "RATE", 1, "u1").await.is_ok());
    let stats = layers_of(&mut admin).await.rate_limit_stats.unwrap();
    assert_eq!((stats.refused, stats.shadow_refused), (1, 1));
    app.stop().await;
}

/// With a token configured, admin calls without it or with a wrong one are
/// refused UNAUTHENTICATED and change nothing; on its own port, the admin
/// service is not reachable through the caller port and vice versa.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_service_needs_the_token_and_has_its_own_port() {
    let app = TestApp::spawn_with(Profile::Embedded, |c| {
        c.admin.token = "s3cret-token".into();
        c.admin.listen = "127.0.0.1:0".into();
    })
    .await;
    let admin_addr = app.admin_addr.expect("an admin listener");
    let mut admin = AdminServiceClient::new(crate::harness::connect(admin_addr).await);
    let set = || SetStockRequest {
        sku: "AUTH".into(),
        stock: 5,
        max_per_user: 0,
    };
    let missing = admin.set_stock(set()).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    let wrong = admin
        .set_stock(with_token(set(), "s3cret-tokem"))
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    let unchanged = admin
        .get_stock(with_token(
            GetStockRequest { sku: "AUTH".into() },
            "s3cret-token",
        ))
        .await
        .unwrap_err();
    assert_eq!(unchanged.code(), Code::NotFound, "nothing was created");
    admin
        .set_stock(with_token(set(), "s3cret-token"))
        .await
        .unwrap();

    // The caller port serves callers only; the admin port admins only.
    let on_caller_port = app
        .admin()
        .get_layers(with_token(GetLayersRequest {}, "s3cret-token"))
        .await
        .unwrap_err();
    assert_eq!(on_caller_port.code(), Code::Unimplemented);
    let mut client = app.inventory();
    let reserved = reserve(&mut client, "AUTH", 1, "u1").await.unwrap();
    assert!(crate::harness::is_admitted(reserved.outcome()));
    let mut wrong_port = InventoryServiceClient::new(crate::harness::connect(admin_addr).await);
    let refused = wrong_port
        .reserve(with_user(
            stockgate::pb::ReserveRequest {
                sku: "AUTH".into(),
                quantity: 1,
                ..Default::default()
            },
            "u2",
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unimplemented);
    app.stop().await;
}

pub(crate) fn openssl(args: &[&str]) {
    let status = Command::new("openssl")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl is installed");
    assert!(status.success(), "openssl {args:?}");
}

/// TLS on both listeners: a client trusting the test CA gets through, a
/// plaintext client does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_protects_both_listeners() {
    let certs = tempfile::tempdir().unwrap();
    let path = |name: &str| certs.path().join(name).display().to_string();
    // A CA and a server certificate it signed (rustls refuses a CA
    // certificate presented as the server's own).
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let (ca_key, ca, key, csr, cert, ext) = (
        path("ca.key"),
        path("ca.pem"),
        path("key.pem"),
        path("leaf.csr"),
        path("cert.pem"),
        path("ext.cnf"),
    );
    let ca_args = [
        "-days",
        "1",
        "-subj",
        "/CN=stockgate-test-ca",
        "-keyout",
        &ca_key,
        "-out",
        &ca,
    ];
    openssl(&[&["req", "-x509"][..], &ec, &ca_args].concat());
    let leaf_args = ["-subj", "/CN=localhost", "-keyout", &key, "-out", &csr];
    openssl(&[&["req"][..], &ec, &leaf_args].concat());
    std::fs::write(
        &ext,
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-days",
        "1",
        "-out",
        &cert,
        "-extfile",
        &ext,
    ]);
    let (mut config, db, dir) = config_for(Profile::Embedded).await;
    config.server.tls.cert_path = path("cert.pem");
    config.server.tls.key_path = path("key.pem");
    config.admin.listen = "127.0.0.1:0".into();
    let app = TestApp::start(config, db, dir).await;
    let ca = tonic::transport::Certificate::from_pem(std::fs::read(path("ca.pem")).unwrap());
    let secure = |addr: std::net::SocketAddr| {
        let ca = ca.clone();
        async move {
            tonic::transport::Endpoint::from_shared(format!("https://{addr}"))
                .unwrap()
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(ca)
                        .domain_name("localhost"),
                )
                .unwrap()
                .connect()
                .await
                .unwrap()
        }
    };
    let mut admin = AdminServiceClient::new(secure(app.admin_addr.unwrap()).await);
    let mut ready = false;
    for _ in 0..200 {
        if admin.get_layers(GetLayersRequest {}).await.is_ok() {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "admin over TLS");
    let mut health = tonic_health::pb::health_client::HealthClient::new(secure(app.addr).await);
    health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .unwrap();
    // Plaintext HTTP/2 to a TLS port fails.
    assert!(app
        .inventory()
        .get_reservation(with_user(
            stockgate::pb::GetReservationRequest {
                reservation_id: "x".into()
            },
            "u",
            None,
        ))
        .await
        .is_err());
    app.stop().await;
}

/// Plain `GET /metrics` over HTTP/1.0.
pub(crate) async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    body
}

/// Sum of a metric's samples whose labels include every `want` pair.
pub(crate) fn sum(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((metric, labels)) => (metric, labels.trim_end_matches('}')),
                None => (series, ""),
            };
            (metric == name
                && want
                    .iter()
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())
            .flatten()
        })
        .sum()
}

/// `stockgate_hot_sku_calls` names the `metrics.hot_skus` SKUs with the
/// most Reserve calls and sums every other under `(other)`: a sale over
/// many SKUs adds a bounded number of series, which add up to the calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hottest_skus_are_named_and_the_rest_summed() {
    let app = TestApp::spawn_with(Profile::Embedded, |c| {
        c.metrics.listen = "127.0.0.1:0".into();
        c.metrics.hot_skus = 3;
    })
    .await;
    let mut calls = Vec::new();
    for (sku, n) in [("HOT-A", 40), ("HOT-B", 25), ("HOT-C", 12)] {
        app.set_stock(sku, 5, 0).await;
        calls.extend(std::iter::repeat_n(sku.to_owned(), n));
    }
    for k in 0..30 {
        let sku = format!("TAIL-{k:02}");
        app.set_stock(&sku, 5, 0).await;
        calls.push(sku);
    }
    let mut client = app.inventory();
    for (i, sku) in calls.iter().enumerate() {
        let user = format!("hot-{i}");
        reserve(&mut client, sku, 1, &user).await.unwrap();
    }
    let text = scrape(app.metrics_addr.unwrap()).await;
    let series: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("stockgate_hot_sku_calls{"))
        .collect();
    assert_eq!(
        series,
        [
            "stockgate_hot_sku_calls{sku=\"HOT-A\"} 40",
            "stockgate_hot_sku_calls{sku=\"HOT-B\"} 25",
            "stockgate_hot_sku_calls{sku=\"HOT-C\"} 12",
            "stockgate_hot_sku_calls{sku=\"(other)\"} 30",
        ]
    );
    assert_eq!(
        sum(&text, "stockgate_hot_sku_calls", &[]),
        calls.len() as f64
    );
    app.stop().await;
}

/// After a storm, the counters add up to what was sent: every Reserve is
/// counted once per RPC and once at the gate; the gate admitted exactly
/// the stock and the database committed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_add_up_after_a_storm() {
    let app = TestApp::spawn_with(Profile::Embedded, |c| {
        c.metrics.listen = "127.0.0.1:0".into();
    })
    .await;
    app.set_stock("METER", 50, 0).await;
    let tally = storm(app.addr, "METER", 1_000, 4, |_| 1).await;
    assert!(tally.errors.is_empty());
    app.drain("METER").await;
    let text = scrape(app.metrics_addr.unwrap()).await;
    let reserve = [("method", "Reserve")];
    assert_eq!(
        sum(&text, "stockgate_grpc_requests_total", &reserve),
        1_000.0
    );
    assert_eq!(
        sum(
            &text,
            "stockgate_grpc_requests_total",
            &[("method", "Reserve"), ("code", "OK")]
        ),
        1_000.0
    );
    assert_eq!(
        sum(
            &text,
            "stockgate_grpc_request_duration_seconds_count",
            &reserve
        ),
        1_000.0
    );
    let gate = |decision: &str| {
        sum(
            &text,
            "stockgate_layer_decisions_total",
            &[("layer", "gate"), ("decision", decision)],
        )
    };
    assert_eq!(gate("admitted"), 50.0);
    assert_eq!(
        gate("admitted") + gate("sold_out") + gate("sold_out_fast_path"),
        1_000.0
    );
    assert_eq!(
        sum(
            &text,
            "stockgate_layer_decisions_total",
            &[("layer", "queue"), ("decision", "queued")]
        ),
        50.0
    );
    assert_eq!(
        sum(
            &text,
            "stockgate_layer_decisions_total",
            &[("layer", "db"), ("decision", "committed")]
        ),
        50.0
    );
    assert_eq!(
        sum(
            &text,
            "stockgate_layer_decisions_total",
            &[("layer", "shed"), ("decision", "admitted")]
        ),
        1_000.0
    );
    assert_eq!(
        sum(&text, "stockgate_layer_enabled", &[("layer", "gate")]),
        1.0
    );
    assert_eq!(
        sum(&text, "stockgate_layer_enabled", &[("layer", "rate_limit")]),
        0.0
    );
    assert!(text.contains("stockgate_build_info{"), "build info");
    // Everything exported is in the documented list.
    for line in text.lines().filter(|l| l.starts_with("stockgate_")) {
        let series = line.split(['{', ' ']).next().unwrap();
        let base = stockgate::metrics::base_name(series);
        assert!(
            stockgate::metrics::NAMES.contains(&base),
            "undocumented metric {series}"
        );
    }
    assert!(sum(&text, "stockgate_processor_batch_size_count", &[]) >= 1.0);
    app.stop().await;
}

fn cli(app: &TestApp, args: &[&str]) -> (bool, String, String) {
    admin_cli(app, "cli-token", "bob", args)
}

/// `stockgate admin …` against `app` as `operator` with `token`: whether it
/// succeeded, its stdout and its stderr.
pub(crate) fn admin_cli(
    app: &TestApp,
    token: &str,
    operator: &str,
    args: &[&str],
) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_stockgate"))
        .arg("admin")
        .args([
            "--addr",
            &format!("http://{}", app.admin_addr.unwrap_or(app.addr)),
        ])
        .args(["--token", token, "--operator", operator])
        .args(args)
        .env_remove("STOCKGATE_ADMIN_TOKEN")
        .env_remove("STOCKGATE_CONFIG")
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8(output.stdout).unwrap(),
        String::from_utf8(output.stderr).unwrap(),
    )
}

/// The operators' CLI against a running server: tables out, errors with
/// the status code and a non-zero exit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_drives_a_running_server() {
    let app = TestApp::spawn_with(Profile::Embedded, |c| c.admin.token = "cli-token".into()).await;
    let (ok, out, err) = cli(&app, &["stock", "set", "CLI-1", "7", "--max-per-user", "2"]);
    assert!(ok, "{err}");
    let row = out.lines().nth(1).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..3], ["CLI-1", "7", "7"], "{out}");
    assert!(out.starts_with("sku"), "{out}");

    let (ok, out, err) = cli(&app, &["stock", "adjust", "CLI-1", "-2"]);
    assert!(ok, "{err}");
    let cells: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(cells[..2], ["CLI-1", "5"], "{out}");

    let (ok, out, err) = cli(
        &app,
        &[
            "stock",
            "policy",
            "CLI-1",
            "waitlist",
            "--waitlist-limit",
            "3",
        ],
    );
    assert!(ok, "{err}");
    assert!(out.contains("waitlist (limit 3)"), "{out}");
    let (ok, _, err) = cli(&app, &["stock", "policy", "CLI-1", "later"]);
    assert!(!ok && err.contains("expected instant or waitlist"), "{err}");
    let (ok, out, err) = cli(&app, &["stock", "policy", "CLI-1", "instant"]);
    assert!(ok && out.contains("instant"), "{out}{err}");

    let (ok, _, err) = cli(&app, &["stock", "set", "CLI-W", "3"]);
    assert!(ok, "{err}");
    let window = |args: &[&str]| {
        let mut all = vec!["stock", "window", "CLI-W"];
        all.extend_from_slice(args);
        cli(&app, &all)
    };
    let (ok, out, err) = window(&[
        "--opens-at",
        "2030-01-01T10:00:00Z",
        "--closes-at",
        "2030-01-01T12:30:00+02:00",
        "--reason",
        "launch",
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("2030-01-01 10:00:00 to 2030-01-01 10:30:00"),
        "{out}"
    );
    let (ok, _, err) = window(&["--opens-at", "tomorrow", "--reason", "x"]);
    assert!(!ok && err.contains("not an RFC 3339 time"), "{err}");
    let (ok, _, err) = window(&["--opens-at", "2030-01-01T10:00:00Z"]);
    assert!(!ok && err.contains("--reason"), "{err}");
    let (ok, out, err) = window(&["--reason", "postponed"]);
    assert!(ok, "{err}");
    assert!(!out.contains("2030"), "{out}");

    let (ok, out, err) = cli(
        &app,
        &[
            "sale",
            "set",
            "CLI-SALE",
            "--max-per-user",
            "2",
            "--skus",
            "CLI-W,CLI-1",
            "--reason",
            "launch",
        ],
    );
    assert!(ok, "{err}");
    let cells: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(cells, ["CLI-SALE", "2", "CLI-1,CLI-W"], "{out}");
    let (ok, out, err) = cli(&app, &["sale", "show", "CLI-SALE"]);
    assert!(ok && out.contains("CLI-1,CLI-W"), "{out}{err}");
    let (ok, out, err) = cli(&app, &["stock", "get", "CLI-W"]);
    assert!(ok && out.contains("CLI-SALE"), "{out}{err}");
    let (ok, _, err) = cli(&app, &["sale", "show", "NO-SUCH-SALE"]);
    assert!(!ok && err.contains("NOT_FOUND"), "{err}");
    let (ok, out, err) = cli(
        &app,
        &[
            "sale",
            "set",
            "CLI-SALE",
            "--max-per-user",
            "0",
            "--skus",
            "",
            "--reason",
            "over",
        ],
    );
    assert!(ok, "{err}");
    let cells: Vec<&str> = out.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(cells, ["CLI-SALE", "none"], "emptied: {out}");

    let mut client = app.inventory();
    reserve(&mut client, "CLI-1", 1, "buyer").await.unwrap();
    // The order processor commits it shortly.
    let mut out = String::new();
    for _ in 0..100 {
        let (ok, listed, err) = cli(
            &app,
            &["reservations", "list", "--sku", "CLI-1", "--state", "held"],
        );
        assert!(ok, "{err}");
        out = listed;
        if out.lines().count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(out.lines().count(), 2, "{out}");
    assert!(out.contains("buyer") && out.contains("held"), "{out}");

    let (ok, out, err) = cli(
        &app,
        &["layers", "set", "gate=off", "dedup=on", "--reason", "drill"],
    );
    assert!(ok, "{err}");
    assert!(out.starts_with("revision "), "{out}");
    let (ok, out, _) = cli(&app, &["layers"]);
    assert!(ok);
    let gate_line = out.lines().find(|l| l.starts_with("gate ")).unwrap();
    assert!(gate_line.contains("off"), "{out}");
    let dedup_line = out.lines().find(|l| l.starts_with("dedup ")).unwrap();
    assert!(dedup_line.contains("on"), "{out}");
    assert!(
        out.contains("replica ") && out.contains("revision"),
        "{out}"
    );

    let (ok, _, err) = cli(&app, &["layers", "set", "db_check=off"]);
    assert!(!ok);
    assert!(err.contains("FAILED_PRECONDITION"), "{err}");
    let (ok, out, _) = cli(&app, &["audit", "--limit", "5"]);
    assert!(ok);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[1].contains("bob from") && lines[1].contains("refused"),
        "{out}"
    );
    assert!(
        lines[2].contains("applied") && lines[2].contains("drill"),
        "{out}"
    );

    let (ok, _, err) = cli(&app, &["layers", "set", "gate=maybe"]);
    assert!(!ok);
    assert!(err.contains("gate=maybe: expected on or off"), "{err}");
    let (ok, _, err) = cli(&app, &["stock", "get", "NOPE"]);
    assert!(!ok);
    assert!(err.contains("NOT_FOUND"), "{err}");
    let output = Command::new(env!("CARGO_BIN_EXE_stockgate"))
        .args(["admin", "--addr", &format!("http://{}", app.addr), "layers"])
        .args(["--token", "wrong"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("UNAUTHENTICATED"));
    app.stop().await;
}

/// The real binary reloads its config file on SIGHUP: the file's switches
/// become the fleet's (audited as `sighup`), and it still stops cleanly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_the_config_files_switches() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::harness::free_port();
    let file = dir.path().join("stockgate.toml");
    let write = |queue: bool| {
        std::fs::write(
            &file,
            format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n[store]\nsqlite_path = \"{}\"\n[metrics]\nlisten = \"\"\n[admin]\nswitch_poll_ms = 100\n[layers.queue]\nenabled = {queue}\n",
                dir.path().join("db.sqlite").display()
            ),
        )
        .unwrap();
    };
    write(true);
    let mut child = Command::new(env!("CARGO_BIN_EXE_stockgate"))
        .args(["--config", file.to_str().unwrap(), "serve"])
        .env_remove("STOCKGATE_CONFIG")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut admin = AdminServiceClient::new(crate::harness::connect(addr).await);
    let mut first = None;
    for _ in 0..200 {
        if let Ok(answer) = admin.get_layers(GetLayersRequest {}).await {
            if answer.get_ref().revision > 0 {
                first = Some(answer.into_inner());
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first = first.expect("the server answers");
    assert!(first.layers.unwrap().queue);

    write(false);
    let pid = child.id().to_string();
    assert!(Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let mut reloaded = false;
    for _ in 0..100 {
        let answer = layers_of(&mut admin).await;
        if !answer.layers.unwrap().queue {
            assert_eq!(answer.revision, first.revision + 1);
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "SIGHUP did not apply the file");
    let events = admin
        .list_audit_events(ListAuditEventsRequest { limit: 1 })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(events[0].actor.starts_with("sighup"), "{:?}", events[0]);
    assert_eq!(events[0].outcome, "applied");

    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
}

/// The dashboard, the alert rules and the runbook use only metrics the
/// service exports.
#[test]
fn dashboards_and_alerts_use_exported_metrics() {
    let root = crate::harness::ROOT;
    for file in [
        "deploy/grafana/stockgate-dashboard.json",
        "deploy/prometheus/stockgate-alerts.yaml",
        "docs/runbook.md",
    ] {
        let text = std::fs::read_to_string(format!("{root}/{file}")).unwrap();
        let mut used = 0;
        for (at, _) in text.match_indices("stockgate_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let base = stockgate::metrics::base_name(&name);
            assert!(
                stockgate::metrics::NAMES.contains(&base),
                "{file} uses {name}, which the service does not export"
            );
            used += 1;
        }
        assert!(used > 0, "{file} names no metric");
    }
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/deploy/grafana/stockgate-dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(dashboard["uid"], "stockgate");
}

/// Switches flipped back and forth while a storm runs: every call is
/// answered, none fails, and the stock holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipping_switches_mid_storm_drops_nothing() {
    let app = TestApp::spawn_with(Profile::Postgres, |c| {
        // With the gate and the queue off, every caller (up to 800 streams)
        // queues for one of 8 connections, as in storm.rs: let them wait
        // rather than be shed after the default 5 s.
        c.store.acquire_timeout_ms = 60_000;
    })
    .await;
    app.set_stock("FLIP", 300, 0).await;
    let flipping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let flipper = {
        let mut admin = app.admin();
        let flipping = flipping.clone();
        tokio::spawn(async move {
            let mut flips = 0;
            while flipping.load(std::sync::atomic::Ordering::Relaxed) {
                let on = flips % 2 == 1;
                admin
                    .set_layers(SetLayersRequest {
                        gate: Some(on),
                        queue: Some(flips % 3 != 0),
                        db_check: if flips % 4 < 2 {
                            DbCheckMode::Optimistic
                        } else {
                            DbCheckMode::Pessimistic
                        } as i32,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
                flips += 1;
            }
            flips
        })
    };
    let tally = storm(app.addr, "FLIP", 6_000, 8, |i| 1 + (i % 2) as u32).await;
    flipping.store(false, std::sync::atomic::Ordering::Relaxed);
    let flips = flipper.await.unwrap();
    eprintln!(
        "{flips} switch changes during the storm; outcomes {:?}",
        tally.outcomes
    );
    assert!(flips >= 3, "the switches changed during the storm");
    assert!(tally.errors.is_empty(), "{:?}", tally.errors);
    app.drain("FLIP").await;
    let ordered = assert_invariants(&app, "FLIP", 300, &tally).await;
    assert!(ordered <= 300);
    app.stop().await;
}

/// Every new admin field refuses bad values with INVALID_ARGUMENT naming
/// it, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_admin_fields_are_named_and_change_nothing() {
    let app = TestApp::spawn(Profile::Embedded).await;
    let mut admin = app.admin();
    let before = layers_of(&mut admin).await;
    let invalid = |status: tonic::Status, field: &str| {
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{field}: {status:?}");
    };
    let set = |request: SetLayersRequest| {
        let mut admin = app.admin();
        async move { admin.set_layers(request).await.unwrap_err() }
    };
    invalid(
        set(SetLayersRequest {
            gate_failure_mode: 9,
            ..Default::default()
        })
        .await,
        "gate_failure_mode",
    );
    invalid(
        set(SetLayersRequest {
            gate: Some(false),
            reason: "x".repeat(501),
            ..Default::default()
        })
        .await,
        "reason",
    );
    let after = layers_of(&mut admin).await;
    assert_eq!(
        (after.layers, after.revision),
        (before.layers, before.revision)
    );

    invalid(
        admin
            .list_audit_events(ListAuditEventsRequest { limit: 1_001 })
            .await
            .unwrap_err(),
        "limit",
    );
    let list = |sku: &str, state: i32, limit: u32| {
        let mut admin = app.admin();
        let request = stockgate::pb::ListReservationsRequest {
            sku: sku.into(),
            state,
            limit,
        };
        async move { admin.list_reservations(request).await.unwrap_err() }
    };
    invalid(list("bad sku!", 0, 10).await, "sku");
    invalid(
        list("", stockgate::pb::ReservationState::Queued as i32, 10).await,
        "state",
    );
    invalid(list("", 99, 10).await, "state");
    invalid(list("", 0, 5_000).await, "limit");
    invalid(
        admin
            .check_invariants(stockgate::pb::CheckInvariantsRequest { sku: "!".into() })
            .await
            .unwrap_err(),
        "sku",
    );
    assert!(admin
        .list_audit_events(ListAuditEventsRequest { limit: 10 })
        .await
        .unwrap()
        .into_inner()
        .events
        .is_empty());
    app.stop().await;
}
