//! The contract as clients we did not write see it, against the real
//! binary: a grpc-core client (Python grpcio, stubs generated from
//! `proto/` here) walks the documented status codes a caller can provoke
//! on demand, on every method, and reads the standard error details, and a raw HTTP/2 client (Python `h2`)
//! checks the framing of error answers. Run twice: dedup off, and dedup on
//! with the Redis store, because the dedup layer rebuilds every answer it
//! passes on.

use std::{process::Command, time::Duration};

use prost::Message as _;
use stockgate::{
    config::Config,
    middleware::{fingerprint, record_key, DedupStore, RedisDedup, DEDUP_PATH},
    pb::ReserveRequest,
};

use crate::harness::{
    config_for, free_port, python_grpc, python_stubs, redis_url, BinaryServer, Profile,
};

const TOKEN: &str = "conformance-token";
/// Long enough for every flow on a loaded 2-core machine to confirm its
/// hold; the expiry case waits it out.
const HOLD_TTL_SECS: u64 = 4;

/// Runs one of `clients/python/`'s scripts: whether every case passed,
/// and its whole output.
fn run_script(script: &str, pythonpath: &str, args: &[String]) -> (bool, String) {
    let root = crate::harness::ROOT;
    let output = Command::new("python3")
        .arg(format!("{root}/clients/python/{script}"))
        .args(args)
        .env("PYTHONPATH", pythonpath)
        .output()
        .unwrap();
    (
        output.status.success(),
        format!(
            "{script}:\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

/// The serving config both runs share: a small burst so the rate limit
/// is reachable, a short hold so expiry is, an admin token.
fn conformance_config(mut config: Config, dedup: bool) -> Config {
    config.admin.token = TOKEN.into();
    config.reservations.hold_ttl_secs = HOLD_TTL_SECS;
    // conformance.py extends holds by 60 s and asks for 1800 s past it.
    config.reservations.max_hold_secs = 1_800;
    config.layers.rate_limit.enabled = true;
    config.layers.rate_limit.per_user_burst = 2;
    config.layers.rate_limit.per_user_period_ms = 60_000;
    config.layers.dedup.enabled = dedup;
    if dedup {
        config.backends.dedup = redis_url();
        config.redis.key_prefix = format!("sg-conf-{}", uuid::Uuid::now_v7().simple());
        config.layers.dedup.wait_ms = 200;
    }
    config
}

/// Leaves an unanswered claim for (`user`, `key`) on the request the
/// script will send, as a replica that is still running that call would:
/// the one way to reach ABORTED from outside on demand.
async fn plant_in_flight_claim(config: &Config, user: &str, key: &str, sku: &str) {
    let message = ReserveRequest {
        sku: sku.into(),
        quantity: 1,
        ..Default::default()
    }
    .encode_to_vec();
    // The gRPC frame as grpcio sends it: uncompressed, 4-byte length.
    let mut framed = vec![0];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&message);
    let store = RedisDedup::new(
        &config.backends.dedup,
        &config.redis.key_prefix,
        Duration::from_secs(5),
    )
    .unwrap();
    let claim = store
        .claim(
            &record_key(user, key),
            &fingerprint(DEDUP_PATH, &framed),
            "planted",
            Duration::from_secs(120),
        )
        .await
        .unwrap();
    assert_eq!(claim, stockgate::middleware::Claim::Run);
}

async fn conformance(dedup: bool) {
    let deps = python_grpc();
    let stubs = python_stubs(&deps);
    let pythonpath = format!("{}:{deps}", stubs.path().display());

    let (config, _db, _data) = config_for(Profile::Embedded).await;
    let config = conformance_config(config, dedup);
    // The same server, but its stock gate is a Redis nothing answers for:
    // it never gets ready, and says why.
    let (mut stuck, _stuck_db, _stuck_data) = config_for(Profile::Embedded).await;
    stuck = conformance_config(stuck, dedup);
    stuck.redis.key_prefix = config.redis.key_prefix.clone();
    stuck.backends.gate = format!("redis://127.0.0.1:{}", free_port());
    stuck.redis.connect_timeout_ms = 200;
    stuck.redis.response_timeout_ms = 200;

    let server = BinaryServer::start(config.clone()).await;
    server.wait_serving().await;
    let not_ready = BinaryServer::start(stuck).await;

    let mode = if dedup { "redis" } else { "off" };
    let mut args = vec![
        "--target".into(),
        server.addr.to_string(),
        "--not-ready".into(),
        not_ready.addr.to_string(),
        "--token".into(),
        TOKEN.into(),
        "--dedup".into(),
        mode.into(),
        "--hold-ttl-secs".into(),
        HOLD_TTL_SECS.to_string(),
    ];
    if dedup {
        let (user, key, sku) = ("conf-aborted", "planted-key", "CONF-ABORTED");
        plant_in_flight_claim(&config, user, key, sku).await;
        args.extend(["--aborted".into(), user.into(), key.into(), sku.into()]);
    }
    let (calls_ok, calls) = run_script("conformance.py", &pythonpath, &args);
    let (frames_ok, frames) = run_script(
        "h2_frames.py",
        &pythonpath,
        &[
            "--target".into(),
            server.addr.to_string(),
            "--dedup".into(),
            mode.into(),
            "--token".into(),
            TOKEN.into(),
        ],
    );
    if dedup {
        crate::harness::wipe_redis_prefix(&config.redis.key_prefix).await;
    }
    println!("{calls}\n{frames}");
    assert!(calls_ok && frames_ok, "{calls}\n{frames}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_sees_the_contract_with_dedup_off() {
    conformance(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_sees_the_contract_with_dedup_on_redis() {
    conformance(true).await;
}
