//! Floods a hostile caller can send cheaply, against the real binary: each
//! must cost the replica (and its backends) a bounded amount, whatever the
//! caller puts in its metadata.

use futures::StreamExt;
use stockgate::pb::ReserveRequest;
use tonic::{metadata::MetadataValue, transport::Channel, Code, Request};

use crate::harness::{config_for, connect, redis_url, BinaryServer, Profile};

const MIB: u64 = 1024 * 1024;

/// One Reserve with the given metadata; the status code of the answer.
async fn reserve_code(channel: Channel, sku: String, user: String, key: Option<String>) -> Code {
    let mut client = stockgate::pb::inventory_service_client::InventoryServiceClient::new(channel);
    let mut request = Request::new(ReserveRequest {
        sku,
        quantity: 1,
        ..Default::default()
    });
    let metadata = request.metadata_mut();
    metadata.insert("x-user-id", MetadataValue::try_from(&user).unwrap());
    if let Some(key) = key {
        metadata.insert("idempotency-key", MetadataValue::try_from(&key).unwrap());
    }
    match client.reserve(request).await {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}

/// Sends `calls` Reserves, 32 at a time, the n-th with the metadata
/// `call(n)` gives; counts the answers by code.
async fn flood(
    channel: &Channel,
    calls: usize,
    call: impl Fn(usize) -> (String, String, Option<String>),
) -> std::collections::HashMap<Code, usize> {
    let answers: Vec<Code> = futures::stream::iter(0..calls)
        .map(|n| {
            let (sku, user, key) = call(n);
            reserve_code(channel.clone(), sku, user, key)
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut counts = std::collections::HashMap::new();
    for code in answers {
        *counts.entry(code).or_default() += 1;
    }
    counts
}

fn unique(n: usize, len: usize) -> String {
    let mut text = format!("u{n}-");
    text.extend(std::iter::repeat_n('x', len - text.len()));
    text
}

/// Unique 15 KB user ids, 8,000-character keys, and well-formed keys on
/// malformed requests, with the rate limit and dedup (in-process) on: all
/// are refused INVALID_ARGUMENT, and the replica's memory grows by at most
/// 16 MiB (before the fix: hundreds of MiB that stayed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_unique_ids_and_keys_cost_bounded_memory() {
    let (mut config, _db, _dir) = config_for(Profile::Embedded).await;
    config.layers.rate_limit.enabled = true;
    config.layers.rate_limit.global_per_sec = 1_000_000;
    config.layers.rate_limit.global_burst = 1_000_000;
    config.layers.dedup.enabled = true;
    let server = BinaryServer::start(config).await;
    server.wait_serving().await;
    let channel = connect(server.addr).await;
    // Warm the allocator and the connection with honest calls first.
    let warm = flood(&channel, 2_000, |n| {
        (
            "NO-SUCH-SKU".into(),
            format!("warm-{n}"),
            Some(format!("k{n}")),
        )
    })
    .await;
    assert_eq!(warm.get(&Code::NotFound), Some(&2_000), "{warm:?}");
    let before = server.rss_bytes();

    let huge_users = flood(&channel, 10_000, |n| {
        ("NO-SUCH-SKU".into(), unique(n, 15_000), None)
    })
    .await;
    let huge_keys = flood(&channel, 5_000, |n| {
        (
            "NO-SUCH-SKU".into(),
            format!("m-{n}"),
            Some(unique(n, 8_000)),
        )
    })
    .await;
    let malformed = flood(&channel, 5_000, |n| {
        (
            "bad sku!".into(),
            format!("b-{n}"),
            Some(format!("key-{n}")),
        )
    })
    .await;
    for (name, counts, total) in [
        ("huge user ids", &huge_users, 10_000),
        ("huge keys", &huge_keys, 5_000),
        ("malformed requests", &malformed, 5_000),
    ] {
        assert_eq!(
            counts.get(&Code::InvalidArgument),
            Some(&total),
            "{name}: {counts:?}"
        );
    }
    let after = server.rss_bytes();
    let grown = after.saturating_sub(before);
    println!("rss before {} MiB, after {} MiB", before / MIB, after / MIB);
    assert!(
        grown <= 16 * MIB,
        "memory grew by {} MiB under the flood",
        grown / MIB
    );
}

/// Dedup in Redis keeps no record for a call refused as malformed: 2,000
/// calls with 8,000-character keys and 1,000 well-keyed malformed requests
/// leave no key under the replica's prefix (before the fix: 16.6 MB kept
/// for a day).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_calls_leave_nothing_in_the_dedup_redis() {
    let (mut config, _db, _dir) = config_for(Profile::Redis).await;
    config.layers.dedup.enabled = true;
    config.backends.dedup = redis_url();
    let prefix = config.redis.key_prefix.clone();
    let server = BinaryServer::start(config).await;
    server.wait_serving().await;
    let channel = connect(server.addr).await;
    let mut redis = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    // SCAN, not KEYS: the machine's Redis holds other tests' keys, and one
    // KEYS over many can outlast the client's response timeout.
    let mut dedup_keys = async || -> usize {
        let (mut cursor, mut found) = (0_u64, 0);
        loop {
            let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(format!("{prefix}:dedup:*"))
                .arg("COUNT")
                .arg(10_000)
                .query_async(&mut redis)
                .await
                .unwrap();
            found += keys.len();
            if next == 0 {
                return found;
            }
            cursor = next;
        }
    };
    assert_eq!(dedup_keys().await, 0);
    let huge_keys = flood(&channel, 2_000, |n| {
        (
            "NO-SUCH-SKU".into(),
            format!("m-{n}"),
            Some(unique(n, 8_000)),
        )
    })
    .await;
    let malformed = flood(&channel, 1_000, |n| {
        (
            "bad sku!".into(),
            format!("b-{n}"),
            Some(format!("key-{n}")),
        )
    })
    .await;
    assert_eq!(huge_keys.get(&Code::InvalidArgument), Some(&2_000));
    assert_eq!(malformed.get(&Code::InvalidArgument), Some(&1_000));
    assert_eq!(dedup_keys().await, 0, "records kept for refused calls");
    // A well-formed call still gets its record (the test can fail).
    let ok = flood(&channel, 1, |_| {
        ("NO-SUCH-SKU".into(), "honest".into(), Some("k1".into()))
    })
    .await;
    assert_eq!(ok.get(&Code::NotFound), Some(&1));
    assert_eq!(dedup_keys().await, 1);
    crate::harness::wipe_redis_prefix(&prefix).await;
}

/// The transactions PostgreSQL has finished in `database`.
fn transactions(database: &str) -> i64 {
    crate::harness::database_stat(database, "xact_commit + xact_rollback")
}

/// Transactions per second in `database` over `window`.
async fn transaction_rate(database: &str, window: std::time::Duration) -> f64 {
    let before = transactions(database);
    tokio::time::sleep(window).await;
    (transactions(database) - before) as f64 / window.as_secs_f64()
}

/// Opens a WatchReservation stream and waits for its first message.
async fn open_watch(
    channel: Channel,
    id: &str,
    user: &str,
) -> Result<tonic::Streaming<stockgate::pb::WatchReservationResponse>, tonic::Status> {
    let mut client = stockgate::pb::inventory_service_client::InventoryServiceClient::new(channel);
    let mut stream = client
        .watch_reservation(crate::harness::with_user(
            stockgate::pb::WatchReservationRequest {
                reservation_id: id.into(),
            },
            user,
            None,
        ))
        .await?
        .into_inner();
    let first = stream.message().await?.expect("a first message");
    assert_eq!(
        first.reservation.unwrap().state,
        stockgate::pb::ReservationState::Waitlisted as i32
    );
    Ok(stream)
}

/// 250 callers watch one WAITLISTED reservation and then hang up. While
/// they watch, the database sees at most one read per second for all of
/// them (before: one per watcher per second); two seconds after they leave
/// it is back to idle (before: the polling went on until the entry
/// expired). Watches beyond the per-user and per-replica caps are refused
/// RESOURCE_EXHAUSTED, and the slots come back when callers leave.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_watches_stop_costing_the_database() {
    use std::time::Duration;
    use stockgate::pb::{
        admin_service_client::AdminServiceClient, ReserveOutcome, SetSoldOutPolicyRequest,
        SoldOutPolicy,
    };

    let (mut config, db, _dir) = config_for(Profile::Postgres).await;
    config.reservations.max_watches_per_user = 250;
    config.reservations.max_watches = 260;
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", crate::harness::free_port())
        .parse()
        .unwrap();
    config.metrics.listen = metrics.to_string();
    let database = db.as_ref().unwrap().name.clone();
    let server = BinaryServer::start(config).await;
    server.wait_serving().await;
    let channel = connect(server.addr).await;
    server.set_stock("W", 0, 0).await;
    let mut admin = AdminServiceClient::new(channel.clone());
    admin
        .set_sold_out_policy(SetSoldOutPolicyRequest {
            sku: "W".into(),
            policy: SoldOutPolicy::Waitlist as i32,
            waitlist_limit: 10,
        })
        .await
        .unwrap();
    let mut waiting = Vec::new();
    for user in ["alice", "bob"] {
        let mut client =
            stockgate::pb::inventory_service_client::InventoryServiceClient::new(channel.clone());
        let answer = client
            .reserve(crate::harness::with_user(
                ReserveRequest {
                    sku: "W".into(),
                    quantity: 1,
                    join_waitlist: true,
                },
                user,
                None,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(answer.outcome, ReserveOutcome::Waitlisted as i32);
        waiting.push(answer.reservation.unwrap().reservation_id);
    }
    let idle = transaction_rate(&database, Duration::from_secs(3)).await;

    // 100 streams per connection at most: spread the watchers over four.
    let mut channels = Vec::new();
    for _ in 0..4 {
        channels.push(connect(server.addr).await);
    }
    let watchers = futures::future::join_all(
        (0..250).map(|n| open_watch(channels[n % 4].clone(), &waiting[0], "alice")),
    )
    .await;
    let watchers: Vec<_> = watchers.into_iter().map(Result::unwrap).collect();
    let status = open_watch(channels[0].clone(), &waiting[0], "alice")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("user limit"), "{status:?}");
    let mut bobs = Vec::new();
    for _ in 0..10 {
        bobs.push(
            open_watch(channels[1].clone(), &waiting[1], "bob")
                .await
                .unwrap(),
        );
    }
    let status = open_watch(channels[1].clone(), &waiting[1], "bob")
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("replica limit"), "{status:?}");

    // The watches' first reads (one each) reach pg_stat_database up to
    // about two seconds late; measure the steady state after them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let watching = transaction_rate(&database, Duration::from_secs(3)).await;
    let text = crate::ops::scrape(metrics).await;
    assert_eq!(crate::ops::sum(&text, "stockgate_open_watches", &[]), 260.0);
    assert_eq!(crate::ops::sum(&text, "stockgate_watch_feeds", &[]), 2.0);
    drop(watchers);
    drop(bobs);
    drop(channels);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Gone within those two seconds (the gauges are sampled each second).
    let text = crate::ops::scrape(metrics).await;
    assert_eq!(crate::ops::sum(&text, "stockgate_open_watches", &[]), 0.0);
    assert_eq!(crate::ops::sum(&text, "stockgate_watch_feeds", &[]), 0.0);
    let after = transaction_rate(&database, Duration::from_secs(3)).await;
    println!("transactions/s: idle {idle:.1}, 260 watching {watching:.1}, after {after:.1}");
    assert!(
        watching <= idle + 10.0,
        "260 watchers of two reservations cost {watching:.1} transactions/s (idle {idle:.1})"
    );
    assert!(
        after <= idle + 3.0,
        "after the watchers left: {after:.1} transactions/s (idle {idle:.1})"
    );
    // The slots came back.
    open_watch(channel.clone(), &waiting[0], "alice")
        .await
        .unwrap();
}

/// A flood of refusals writes a few log lines, not one per call: 2,000
/// admin calls with a wrong token and a 1,000-character `x-operator`, and
/// 1,000 Reserves answered UNAVAILABLE because the gate's Redis died, with
/// `RUST_BACKTRACE=1` as many images set. No backtrace is logged, the
/// caller's text is cut, and the log stays small (before: a WARN per call,
/// each with a stack trace).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusal_floods_log_samples_without_backtraces() {
    use stockgate::pb::{admin_service_client::AdminServiceClient, SetStockRequest};

    let port = crate::harness::free_port();
    let dir = tempfile::tempdir().unwrap();
    let mut redis = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server starts");
    let (mut config, _db, _dir) = config_for(Profile::Redis).await;
    config.backends.gate = format!("redis://127.0.0.1:{port}");
    config.redis.response_timeout_ms = 200;
    config.admin.token = "the-right-token".into();
    let log_path = dir.path().join("stockgate.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let server = BinaryServer::start_logging(
        config,
        &[("RUST_LOG", "info"), ("RUST_BACKTRACE", "1")],
        log,
    )
    .await;
    server.wait_serving().await;
    let channel = connect(server.addr).await;
    let mut request = Request::new(SetStockRequest {
        sku: "S".into(),
        stock: 10,
        max_per_user: 0,
    });
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::from_static("Bearer the-right-token"),
    );
    AdminServiceClient::new(channel.clone())
        .set_stock(request)
        .await
        .unwrap();
    let _ = redis.kill();
    let _ = redis.wait();
    let lines_before = std::fs::read_to_string(&log_path).unwrap().lines().count();

    let operator = "o".repeat(1_000);
    let refused: Vec<Code> = futures::stream::iter(0..2_000)
        .map(|_| {
            let mut admin = AdminServiceClient::new(channel.clone());
            let mut request = Request::new(stockgate::pb::GetLayersRequest::default());
            let metadata = request.metadata_mut();
            metadata.insert("authorization", MetadataValue::from_static("Bearer wrong"));
            metadata.insert("x-operator", MetadataValue::try_from(&operator).unwrap());
            async move {
                admin
                    .get_layers(request)
                    .await
                    .map_or_else(|s| s.code(), |_| Code::Ok)
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    assert!(refused.iter().all(|c| *c == Code::Unauthenticated));
    let unavailable = flood(&channel, 1_000, |n| ("S".into(), format!("u{n}"), None)).await;
    assert_eq!(
        unavailable.get(&Code::Unavailable),
        Some(&1_000),
        "{unavailable:?}"
    );
    drop(server);
    let text = std::fs::read_to_string(&log_path).unwrap();
    let flood_lines: Vec<&str> = text.lines().skip(lines_before).collect();
    assert!(
        flood_lines.len() <= 40,
        "3,000 refusals wrote {} log lines; the first: {:?}",
        flood_lines.len(),
        &flood_lines[..3.min(flood_lines.len())]
    );
    assert!(
        flood_lines.iter().any(|l| l.contains("admin call refused"))
            && flood_lines.iter().any(|l| l.contains("unavailable")),
        "refusals are still logged, as samples: {flood_lines:?}"
    );
    assert!(!text.contains("stack backtrace") && !text.contains("Stack backtrace"));
    assert!(!text.contains(&"o".repeat(100)), "x-operator logged whole");
    assert!(text.lines().all(|l| l.len() < 2_000), "a log line is huge");
}
