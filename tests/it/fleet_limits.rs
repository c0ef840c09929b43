//! Rate limits shared by the fleet (`backends.rate_limit` on the real
//! Redis): three API replicas over one database, gate and limit, hammered
//! at once; each replica's own limits alone would let three times as much
//! through.

use std::time::{Duration, Instant};

use futures::future::join_all;
use stockgate::{
    config::Config,
    pb::{GetLayersRequest, RateLimitSettings, SetLayersRequest},
};
use tonic::Code;

use crate::{
    harness::{redis_cluster_url, redis_url, reserve, Profile, TestApp},
    middleware::rate_limit_stats,
};

/// Three replicas sharing the first one's database, Redis prefix and
/// fleet-wide limits, with `rates` applied.
async fn three_replicas(rates: impl FnOnce(&mut Config)) -> Vec<TestApp> {
    three_replicas_on(Profile::Redis, redis_url(), rates).await
}

/// The same with the gate and the limits on `url`.
async fn three_replicas_on(
    profile: Profile,
    url: String,
    rates: impl FnOnce(&mut Config),
) -> Vec<TestApp> {
    let first = TestApp::spawn_with(profile, |c| {
        c.layers.rate_limit.enabled = true;
        c.backends.rate_limit = url;
        rates(c);
    })
    .await;
    first.set_stock("FLEET", 1_000_000, 0).await;
    let mut replicas = vec![];
    for _ in 0..2 {
        let twin = TestApp::start(first.config.clone(), None, tempfile::tempdir().unwrap()).await;
        twin.wait_serving().await;
        replicas.push(twin);
    }
    replicas.insert(0, first);
    replicas
}

async fn stop(replicas: Vec<TestApp>) {
    let prefix = replicas[0].config.redis.key_prefix.clone();
    let url = replicas[0].config.backends.rate_limit.clone();
    for app in replicas.into_iter().rev() {
        app.stop().await;
    }
    stockgate_tools::bench::cleanup(&url, &prefix)
        .await
        .unwrap();
}

/// Calls from every replica at once for `lasting`, from `user(replica, i)`;
/// the admitted count, the refused count and the time from the first call
/// to the last answer. Anything but an admission or RESOURCE_EXHAUSTED
/// (with a retry hint) fails the test.
async fn hammer(
    replicas: &[TestApp],
    lasting: Duration,
    user: fn(usize, usize) -> String,
) -> (usize, usize, Duration) {
    let start = Instant::now();
    let loops = replicas.iter().enumerate().map(|(r, app)| {
        let mut client = app.inventory();
        tokio::spawn(async move {
            let (mut admitted, mut refused) = (0, 0);
            let mut i = 0;
            while start.elapsed() < lasting {
                match reserve(&mut client, "FLEET", 1, &user(r, i)).await {
                    Ok(_) => admitted += 1,
                    Err(status) => {
                        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                        assert!(status.metadata().get("retry-after").is_some());
                        refused += 1;
                        // A client honouring the hint would wait longer;
                        // this one keeps the pressure on.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                i += 1;
            }
            (admitted, refused)
        })
    });
    let (mut admitted, mut refused) = (0, 0);
    for counts in join_all(loops).await {
        let (a, r) = counts.unwrap();
        admitted += a;
        refused += r;
    }
    (admitted, refused, start.elapsed())
}

async fn shadow_refused(replicas: &[TestApp]) -> u64 {
    let mut total = 0;
    for app in replicas {
        total += rate_limit_stats(app).await.shadow_refused;
    }
    total
}

/// One user calling all three replicas as fast as they answer gets at most
/// their burst plus one call per period over the whole run, not three
/// times that.
#[tokio::test(flavor = "multi_thread")]
async fn one_user_on_three_replicas_gets_the_limit_once() {
    let replicas = three_replicas(|c| {
        c.layers.rate_limit.per_user_period_ms = 200;
        c.layers.rate_limit.per_user_burst = 2;
    })
    .await;
    one_user_gets_the_limit_once(replicas).await;
}

/// The same with the limits (and the gate) on a Redis Cluster.
#[tokio::test(flavor = "multi_thread")]
async fn one_user_on_three_replicas_gets_the_limit_once_on_a_cluster() {
    let replicas = three_replicas_on(Profile::RedisCluster, redis_cluster_url(), |c| {
        c.layers.rate_limit.per_user_period_ms = 200;
        c.layers.rate_limit.per_user_burst = 2;
    })
    .await;
    one_user_gets_the_limit_once(replicas).await;
}

async fn one_user_gets_the_limit_once(replicas: Vec<TestApp>) {
    let (admitted, refused, took) =
        hammer(&replicas, Duration::from_secs(2), |_, _| "hammer".into()).await;
    let bound = 2 + (took.as_millis() / 200) as usize + 1;
    eprintln!("admitted {admitted}, refused {refused} in {took:?}; bound {bound}");
    assert!(
        admitted <= bound,
        "{admitted} admitted, the limit allows {bound}"
    );
    assert!(
        admitted >= 8,
        "the limit let too little through: {admitted}"
    );
    assert!(refused > 0);
    stop(replicas).await;
}

/// The global budget holds across the replicas: many users, each within
/// their own limit, together get at most the global rate.
#[tokio::test(flavor = "multi_thread")]
async fn the_global_limit_holds_across_replicas() {
    let replicas = three_replicas(|c| {
        c.layers.rate_limit.global_per_sec = 20;
        c.layers.rate_limit.global_burst = 5;
    })
    .await;
    let (admitted, refused, took) = hammer(&replicas, Duration::from_millis(1_500), |r, i| {
        format!("buyer-{r}-{i}")
    })
    .await;
    let bound = 5 + (took.as_secs_f64() * 20.0) as usize + 1;
    eprintln!("admitted {admitted}, refused {refused} in {took:?}; bound {bound}");
    assert!(
        admitted <= bound,
        "{admitted} admitted, the limit allows {bound}"
    );
    assert!(
        admitted >= 20,
        "the limit let too little through: {admitted}"
    );
    stop(replicas).await;
}

/// In shadow mode nothing is refused, and what the fleet's limit would
/// have refused is counted.
#[tokio::test(flavor = "multi_thread")]
async fn shadow_mode_counts_the_fleet_refusals_without_refusing() {
    let replicas = three_replicas(|c| {
        c.layers.rate_limit.shadow = true;
        c.layers.rate_limit.per_user_period_ms = 60_000;
        c.layers.rate_limit.per_user_burst = 1;
    })
    .await;
    // One call per replica by one user: each replica's own budget has
    // room, only the fleet's knows it is the third call.
    let mut calls = vec![];
    for app in &replicas {
        calls.push(reserve(&mut app.inventory(), "FLEET", 1, "shadowed").await);
    }
    assert!(calls.iter().all(Result::is_ok), "{calls:?}");
    assert_eq!(shadow_refused(&replicas).await, 2);
    stop(replicas).await;
}

/// With the fleet's Redis unreachable, each replica's own limits decide:
/// calls are not refused for want of Redis, nor let through past the
/// replica's budget.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_fleet_limit_leaves_the_replicas_own() {
    let app = TestApp::spawn_with(Profile::Postgres, |c| {
        c.layers.rate_limit.enabled = true;
        c.layers.rate_limit.per_user_period_ms = 60_000;
        c.layers.rate_limit.per_user_burst = 2;
        c.backends.rate_limit = "redis://127.0.0.1:1".into();
        c.redis.response_timeout_ms = 200;
    })
    .await;
    app.set_stock("FLEET", 100, 0).await;
    let mut client = app.inventory();
    let mut codes = vec![];
    let start = Instant::now();
    for _ in 0..5 {
        codes.push(
            reserve(&mut client, "FLEET", 1, "alone")
                .await
                .map_err(|s| s.code())
                .map(|_| ()),
        );
    }
    assert_eq!(
        codes,
        [
            Ok(()),
            Ok(()),
            Err(Code::ResourceExhausted),
            Err(Code::ResourceExhausted),
            Err(Code::ResourceExhausted)
        ]
    );
    // Each call waits for Redis at most `redis.response_timeout_ms`, not
    // through the connection's reconnection attempts.
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    app.stop().await;
}

/// Budgets spent under strict rates do not outlast a relaxation: once
/// operators loosen the rates, a user refused under the old ones gets
/// through within the new period, on any replica.
#[tokio::test(flavor = "multi_thread")]
async fn relaxed_rates_apply_to_budgets_spent_under_the_old_ones() {
    let replicas = three_replicas(|c| {
        c.layers.rate_limit.per_user_period_ms = 60_000;
        c.layers.rate_limit.per_user_burst = 1;
    })
    .await;
    let call = |app: &TestApp| {
        let mut client = app.inventory();
        async move { reserve(&mut client, "FLEET", 1, "patient").await }
    };
    call(&replicas[0]).await.unwrap();
    let refused = call(&replicas[1]).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);
    let relaxed = RateLimitSettings {
        per_user_period_ms: 100,
        per_user_burst: 1,
        global_per_sec: replicas[0].config.layers.rate_limit.global_per_sec,
        global_burst: replicas[0].config.layers.rate_limit.global_burst,
    };
    replicas[0]
        .admin()
        .set_layers(SetLayersRequest {
            rate_limits: Some(relaxed),
            ..Default::default()
        })
        .await
        .unwrap();
    // Every replica adopts the new rates within its switch poll.
    for app in &replicas {
        for _ in 0..100 {
            let layers = app
                .admin()
                .get_layers(GetLayersRequest {})
                .await
                .unwrap()
                .into_inner();
            if layers.layers.and_then(|l| l.rate_limits) == Some(relaxed) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    call(&replicas[2]).await.unwrap();
    stop(replicas).await;
}
