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
    let mut dedup_keys = async || -> usize {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:dedup:*"))
            .query_async(&mut redis)
            .await
            .unwrap();
        keys.len()
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
