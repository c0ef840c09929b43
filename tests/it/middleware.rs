//! The tower middleware through the real server.

use std::{sync::Arc, time::Duration};

use futures::future::join_all;
use prost::Message;
use stockgate::pb::{
    GetLayersRequest, RateLimitStats, ReserveOutcome, ReserveRequest, ReserveResponse,
    SetLayersRequest,
};
use tonic::Code;

use crate::{
    harness::{is_admitted, redis_url, reserve, wipe_redis_prefix, with_user, Profile, TestApp},
    ops::{scrape, sum},
};

pub async fn rate_limit_stats(app: &TestApp) -> RateLimitStats {
    app.admin()
        .get_layers(GetLayersRequest {})
        .await
        .unwrap()
        .into_inner()
        .rate_limit_stats
        .unwrap()
}

/// 2,000 users send 5 calls each at once: each gets exactly one through and
/// the rest RESOURCE_EXHAUSTED with a retry hint. (The period is a minute,
/// not a second, so a slow machine cannot let a second call through; the
/// per-second arithmetic is unit-tested on a fake clock.)
async fn five_calls_per_user(app: &TestApp) -> (usize, usize) {
    app.set_stock("LIMITED", 100_000, 0).await;
    let calls = (0..10_000).map(|i| {
        let mut client = app.inventory();
        tokio::spawn(async move {
            (
                i / 5,
                reserve(&mut client, "LIMITED", 1, &format!("u{}", i / 5)).await,
            )
        })
    });
    let mut through = vec![0; 2_000];
    let mut refused = 0;
    for call in join_all(calls).await {
        match call.unwrap() {
            (user, Ok(_)) => through[user] += 1,
            (_, Err(status)) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                let hint: u64 = status
                    .metadata()
                    .get("retry-after")
                    .unwrap()
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=60).contains(&hint), "retry-after {hint}");
                refused += 1;
            }
        }
    }
    (through.iter().filter(|&&n| n == 1).count(), refused)
}

#[tokio::test(flavor = "multi_thread")]
async fn rate_limit_lets_one_call_per_user_through() {
    let app = TestApp::spawn_with(Profile::Embedded, |c| {
        c.layers.rate_limit.enabled = true;
        c.layers.rate_limit.per_user_period_ms = 60_000;
    })
    .await;
    let (users_with_one, refused) = five_calls_per_user(&app).await;
    assert_eq!((users_with_one, refused), (2_000, 8_000));
    let stats = rate_limit_stats(&app).await;
    // One SetStock is not limited; the 10,000 calls are.
    assert_eq!(
        (stats.admitted, stats.refused, stats.shadow_refused),
        (2_000, 8_000, 0)
    );
    assert_eq!(stats.tracked_users, 2_000);
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shadow_mode_lets_everything_through_and_counts() {
    let app = TestApp::spawn_with(Profile::Embedded, |c| {
        c.layers.rate_limit.enabled = true;
        c.layers.rate_limit.shadow = true;
        c.layers.rate_limit.per_user_period_ms = 60_000;
    })
    .await;
    app.set_stock("LIMITED", 100_000, 0).await;
    let calls = (0..1_000).map(|i| {
        let mut client = app.inventory();
        tokio::spawn(
            async move { reserve(&mut client, "LIMITED", 1, &format!("u{}", i / 5)).await },
        )
    });
    for call in join_all(calls).await {
        call.unwrap().unwrap();
    }
    let stats = rate_limit_stats(&app).await;
    assert_eq!(
        (stats.admitted, stats.refused, stats.shadow_refused),
        (200, 0, 800)
    );
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn switched_at_run_time_and_only_for_callers() {
    let app = TestApp::spawn_with(Profile::Embedded, |c| {
        c.layers.rate_limit.per_user_period_ms = 60_000;
    })
    .await;
    app.set_stock("S", 100, 0).await;
    let mut client = app.inventory();
    for _ in 0..3 {
        reserve(&mut client, "S", 1, "eve").await.unwrap();
    }
    let switch = |on: bool| SetLayersRequest {
        rate_limit: Some(on),
        ..Default::default()
    };
    app.admin().set_layers(switch(true)).await.unwrap();
    reserve(&mut client, "S", 1, "eve").await.unwrap();
    let status = reserve(&mut client, "S", 1, "eve").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    // No user id: refused by the layer with the field named.
    let status = client
        .reserve(stockgate::pb::ReserveRequest {
            sku: "S".into(),
            quantity: 1,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("x-user-id"));
    // Operators and health checks are never limited.
    for _ in 0..50 {
        app.admin().get_layers(GetLayersRequest {}).await.unwrap();
        app.health().await;
    }
    app.admin().set_layers(switch(false)).await.unwrap();
    reserve(&mut client, "S", 1, "eve").await.unwrap();
    app.stop().await;
}

/// With one Reserve per user per minute, a buyer's whole flow (reserve,
/// read, watch until held, confirm) goes through: by default only Reserve
/// is counted. A method added to `layers.rate_limit.methods` is.
#[tokio::test(flavor = "multi_thread")]
async fn a_buyers_flow_spends_only_its_reserve_of_the_limit() {
    for methods in [vec!["Reserve"], vec!["Reserve", "ConfirmReservation"]] {
        let counted = methods.len();
        let app = TestApp::spawn_with(Profile::Embedded, |c| {
            c.layers.rate_limit.enabled = true;
            c.layers.rate_limit.per_user_burst = 1;
            c.layers.rate_limit.per_user_period_ms = 60_000;
            c.layers.rate_limit.methods = methods.iter().map(|m| (*m).to_owned()).collect();
        })
        .await;
        app.set_stock("FLOW", 10, 0).await;
        let mut buyer =
            stockgate::client::Client::new(crate::harness::connect(app.addr).await, "flo").unwrap();
        let id = buyer
            .reserve("FLOW", 1, "flow-1")
            .await
            .unwrap()
            .reservation
            .unwrap()
            .reservation_id;
        let held = buyer.wait_until_decided(&id).await.unwrap();
        assert_eq!(held.state(), stockgate::pb::ReservationState::Held);
        buyer.get(&id).await.unwrap();
        let confirmed = buyer.confirm(&id).await;
        let again = buyer.reserve("FLOW", 1, "flow-2").await.unwrap_err();
        assert_eq!(again.code(), Code::ResourceExhausted);
        if counted == 1 {
            assert_eq!(
                confirmed.unwrap().state(),
                stockgate::pb::ReservationState::Confirmed
            );
        } else {
            assert_eq!(confirmed.unwrap_err().code(), Code::ResourceExhausted);
        }
        let stats = rate_limit_stats(&app).await;
        assert_eq!((stats.admitted, stats.refused), (1, counted as u64));
        app.stop().await;
    }
}

/// The same idempotency key sent 100 times at once: one reservation and
/// 100 identical answers; sent again afterwards: the identical answer; on
/// another replica sharing Redis: the same; the same key for another SKU:
/// refused, naming the key.
#[tokio::test(flavor = "multi_thread")]
async fn one_idempotency_key_gives_one_reservation_and_identical_answers() {
    for profile in [Profile::Embedded, Profile::Redis] {
        let app = TestApp::spawn_with(profile, |c| {
            c.layers.dedup.enabled = true;
            if profile == Profile::Redis {
                c.backends.dedup = c.backends.gate.clone();
            }
        })
        .await;
        app.set_stock("DEDUP", 10, 0).await;
        app.set_stock("OTHER", 10, 0).await;
        let calls = (0..100).map(|_| {
            let mut client = app.inventory();
            tokio::spawn(async move { keyed_reserve(&mut client, "DEDUP", "cart-1").await })
        });
        let answers: Vec<ReserveResponse> = join_all(calls)
            .await
            .into_iter()
            .map(|r| r.unwrap().unwrap())
            .collect();
        let first = answers[0].clone();
        assert!(is_admitted(first.outcome()), "{profile:?}: {first:?}");
        for answer in &answers {
            assert_eq!(answer.encode_to_vec(), first.encode_to_vec(), "{profile:?}");
        }
        let mut client = app.inventory();
        let again = keyed_reserve(&mut client, "DEDUP", "cart-1").await.unwrap();
        assert_eq!(again.encode_to_vec(), first.encode_to_vec(), "{profile:?}");
        if profile == Profile::Redis {
            let twin = TestApp::start(app.config.clone(), None, tempfile::tempdir().unwrap()).await;
            twin.wait_serving().await;
            let elsewhere = keyed_reserve(&mut twin.inventory(), "DEDUP", "cart-1")
                .await
                .unwrap();
            assert_eq!(elsewhere.encode_to_vec(), first.encode_to_vec());
            twin.stop().await;
        }
        let status = keyed_reserve(&mut client, "OTHER", "cart-1")
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("idempotency-key"), "{status:?}");
        app.drain("DEDUP").await;
        let view = app.stock("DEDUP").await;
        assert_eq!(view.db_stock, 9, "{profile:?}: one unit taken");
        assert_eq!(app.stock("OTHER").await.db_stock, 10, "{profile:?}");
        app.stop().await;
    }
}

/// Sold-out answers from the fast path are stored in the same step that
/// checks their key: a retry replays them byte for byte, and a key
/// answered before the sell-out replays its own first answer, also on a
/// replica that has never seen the key (Redis profile).
#[tokio::test(flavor = "multi_thread")]
async fn sold_out_answers_are_kept_in_one_step_and_earlier_answers_win() {
    for profile in [Profile::Embedded, Profile::Redis] {
        let app = TestApp::spawn_with(profile, |c| {
            c.layers.dedup.enabled = true;
            // Long enough that the fast path still knows between calls.
            c.layers.gate.sold_out_cache_ms = 60_000;
            c.metrics.listen = "127.0.0.1:0".into();
            if profile == Profile::Redis {
                c.backends.dedup = c.backends.gate.clone();
            }
        })
        .await;
        app.set_stock("LAST", 1, 0).await;
        let mut client = app.inventory();
        let won = keyed_reserve(&mut client, "LAST", "buy-1").await.unwrap();
        assert!(is_admitted(won.outcome()), "{profile:?}: {won:?}");
        // The gate says sold out once; the fast path answers after that.
        let mut answers = vec![("buy-1", won.clone())];
        for key in ["buy-2", "buy-3", "buy-4"] {
            let answer = keyed_reserve(&mut client, "LAST", key).await.unwrap();
            assert_eq!(answer.outcome(), ReserveOutcome::SoldOut, "{profile:?}");
            answers.push((key, answer));
        }
        let fast_path = |text: &str| {
            sum(
                text,
                "stockgate_layer_decisions_total",
                &[("layer", "gate"), ("decision", "sold_out_fast_path")],
            )
        };
        let before = fast_path(&scrape(app.metrics_addr.unwrap()).await);
        assert!(before >= 2.0, "{profile:?}: fast path used {before} times");
        for (key, first) in &answers {
            let again = keyed_reserve(&mut client, "LAST", key).await.unwrap();
            assert_eq!(
                again.encode_to_vec(),
                first.encode_to_vec(),
                "{profile:?}: {key}"
            );
        }
        // The answer given at once is the answer a run gives, headers and
        // trailers too: the same request without a key is not deduplicated
        // and runs the handler.
        let sold_out_for = |key: Option<&'static str>| {
            let mut client = app.inventory();
            async move {
                let request = ReserveRequest {
                    sku: "LAST".into(),
                    quantity: 1,
                    ..Default::default()
                };
                let answer = client
                    .reserve(with_user(request, "erin", key))
                    .await
                    .unwrap();
                let mut headers: Vec<(String, String)> = answer
                    .metadata()
                    .clone()
                    .into_headers()
                    .iter()
                    .filter(|(name, _)| *name != "date")
                    .map(|(name, value)| (name.to_string(), format!("{value:?}")))
                    .collect();
                headers.sort();
                (headers, answer.into_inner().encode_to_vec())
            }
        };
        let before_run = fast_path(&scrape(app.metrics_addr.unwrap()).await);
        let run = sold_out_for(None).await;
        let at_once = sold_out_for(Some("buy-5")).await;
        assert_eq!(at_once, run, "{profile:?}");
        let after_run = fast_path(&scrape(app.metrics_addr.unwrap()).await);
        assert_eq!(
            after_run,
            before_run + 2.0,
            "{profile:?}: both on the fast path"
        );
        let before = after_run;
        // Replays are not gate decisions, though each asked the fast path.
        let after_replays = fast_path(&scrape(app.metrics_addr.unwrap()).await);
        assert_eq!(after_replays, before, "{profile:?}: replays counted");
        // Still sold out for 2 units, so answered at once, but the key
        // holds another request's answer: refused.
        let status = client
            .reserve(with_user(
                ReserveRequest {
                    sku: "LAST".into(),
                    quantity: 2,
                    ..Default::default()
                },
                "dana",
                Some("buy-3"),
            ))
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains("idempotency-key"), "{status:?}");
        if profile == Profile::Redis {
            let twin = TestApp::start(app.config.clone(), None, tempfile::tempdir().unwrap()).await;
            twin.wait_serving().await;
            let mut elsewhere = twin.inventory();
            // The twin learns "sold out" from the gate, then answers from
            // its fast path; the keys it never saw still replay.
            let own = keyed_reserve(&mut elsewhere, "LAST", "twin-1")
                .await
                .unwrap();
            assert_eq!(own.outcome(), ReserveOutcome::SoldOut);
            for (key, first) in &answers {
                let again = keyed_reserve(&mut elsewhere, "LAST", key).await.unwrap();
                assert_eq!(again.encode_to_vec(), first.encode_to_vec(), "twin: {key}");
            }
            twin.stop().await;
        }
        app.drain("LAST").await;
        let view = app.stock("LAST").await;
        assert_eq!(view.db_stock, 0, "{profile:?}: the one unit, once");
        app.stop().await;
    }
}

async fn keyed_reserve(
    client: &mut stockgate::pb::inventory_service_client::InventoryServiceClient<
        tonic::transport::Channel,
    >,
    sku: &str,
    key: &str,
) -> Result<ReserveResponse, tonic::Status> {
    client
        .reserve(with_user(
            ReserveRequest {
                sku: sku.into(),
                quantity: 1,
                ..Default::default()
            },
            "dana",
            Some(key),
        ))
        .await
        .map(|r| r.into_inner())
}

/// A flood far above `server.max_in_flight`: the excess is refused at once
/// with RESOURCE_EXHAUSTED and a retry hint, every call let in is decided
/// normally, and nothing is oversold.
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_above_the_in_flight_limit_is_shed_and_the_rest_succeed() {
    let app = TestApp::spawn_with(Profile::Embedded, |c| {
        c.server.max_in_flight = 8;
        // Request-path commits on one SQLite connection: calls pile up.
        c.layers.queue.enabled = false;
        c.layers.gate.enabled = false;
    })
    .await;
    app.set_stock("FLOOD", 500, 0).await;
    let tally = crate::harness::storm(app.addr, "FLOOD", 3_000, 4, |_| 1).await;
    let shed = tally
        .errors
        .get(&Code::ResourceExhausted)
        .copied()
        .unwrap_or(0);
    assert!(shed > 0, "nothing shed: {:?}", tally.outcomes);
    assert_eq!(
        tally.errors.len(),
        1,
        "only shedding refuses: {:?}",
        tally.errors
    );
    let decided: usize = tally.outcomes.values().sum();
    assert_eq!(decided + shed, 3_000);
    // The bound held: never more than 8 calls running (so memory held by
    // calls is bounded too), and the replica counted every refusal.
    let stats = app
        .admin()
        .get_layers(GetLayersRequest {})
        .await
        .unwrap()
        .into_inner()
        .load_shed_stats
        .unwrap();
    assert_eq!(stats.max_in_flight, 8);
    assert!(
        (1..=8).contains(&stats.peak_in_flight),
        "peak {}",
        stats.peak_in_flight
    );
    assert_eq!(stats.shed as usize, shed);
    assert_eq!(stats.in_flight, 0);
    let ordered = crate::harness::assert_invariants(&app, "FLOOD", 500, &tally).await;
    assert_eq!(ordered as usize, tally.granted.len());
    // Health and operators are never shed.
    assert_eq!(app.stock("FLOOD").await.db_stock, 500 - ordered);
    app.stop().await;
}

/// The Redis dedup store on a real server: claims from many calls at once
/// share pipelines yet each gets its own verdict, an error reply reaches
/// only its own caller, answers come back byte for byte, only the claiming
/// call's token abandons, and an unanswered claim lapses.
#[tokio::test(flavor = "multi_thread")]
async fn redis_dedup_store_keeps_each_call_apart_in_a_batch() {
    use stockgate::middleware::{Claim, DedupStore, RedisDedup, StoredAnswer};
    let prefix = format!("sg-test-dedup-{}", uuid::Uuid::now_v7().simple());
    let store = Arc::new(RedisDedup::new(&redis_url(), &prefix, Duration::from_secs(2)).unwrap());
    let long = Duration::from_secs(30);
    // A key Redis holds as another type: its claim fails, alone.
    let mut conn = redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("HSET")
        .arg(format!("{prefix}:dedup:v2:k7"))
        .arg("f")
        .arg("v")
        .query_async(&mut conn)
        .await
        .unwrap();
    let claims = (0..300).map(|i| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .claim(&format!("k{i}"), &"f".repeat(64), "t", long)
                .await
        })
    });
    let verdicts: Vec<_> = join_all(claims)
        .await
        .into_iter()
        .map(|r| r.unwrap())
        .collect();
    for (i, verdict) in verdicts.iter().enumerate() {
        if i == 7 {
            assert!(verdict.is_err(), "{verdict:?}");
        } else {
            assert_eq!(verdict, &Ok(Claim::Run), "k{i}");
        }
    }
    let fp = "a".repeat(64);
    let answer = StoredAnswer {
        status: 200,
        headers: vec![("content-type".into(), b"application/grpc".to_vec())],
        body: vec![0, 0, 0, 0, 3, 8, 1, 16],
        trailers: vec![("grpc-status".into(), b"0".to_vec())],
    };
    assert_eq!(store.claim("one", &fp, "t1", long).await, Ok(Claim::Run));
    assert_eq!(
        store.claim("one", &fp, "t2", long).await,
        Ok(Claim::InFlight)
    );
    assert_eq!(
        store.claim("one", &"b".repeat(64), "t2", long).await,
        Ok(Claim::Mismatch)
    );
    store.abandon("one", "t2").await.unwrap();
    assert_eq!(
        store.claim("one", &fp, "t3", long).await,
        Ok(Claim::InFlight)
    );
    store.abandon("one", "t1").await.unwrap();
    assert_eq!(store.claim("one", &fp, "t4", long).await, Ok(Claim::Run));
    store
        .complete("one", &fp, "t4", &answer, long)
        .await
        .unwrap();
    assert_eq!(
        store.claim("one", &fp, "t5", long).await,
        Ok(Claim::Done(answer.clone()))
    );
    // An answer is not a claim: abandoning it changes nothing.
    store.abandon("one", "t4").await.unwrap();
    assert_eq!(
        store.claim("one", &fp, "t6", long).await,
        Ok(Claim::Done(answer.clone()))
    );
    // An at-once answer is kept in one step, only for a key with no record.
    let other = StoredAnswer {
        body: vec![0, 0, 0, 0, 2, 8, 2],
        ..answer.clone()
    };
    assert_eq!(
        store.store_first("fast", &fp, &answer, long).await,
        Ok(Claim::Run)
    );
    assert_eq!(
        store.store_first("fast", &fp, &other, long).await,
        Ok(Claim::Done(answer.clone()))
    );
    assert_eq!(
        store
            .store_first("fast", &"b".repeat(64), &other, long)
            .await,
        Ok(Claim::Mismatch)
    );
    assert_eq!(
        store.store_first("one", &fp, &other, long).await,
        Ok(Claim::Done(answer.clone()))
    );
    assert_eq!(store.claim("busy", &fp, "t1", long).await, Ok(Claim::Run));
    assert_eq!(
        store.store_first("busy", &fp, &answer, long).await,
        Ok(Claim::InFlight)
    );
    let short = Duration::from_millis(50);
    assert_eq!(store.claim("lapse", &fp, "t1", short).await, Ok(Claim::Run));
    tokio::time::sleep(Duration::from_millis(120)).await;
    assert_eq!(store.claim("lapse", &fp, "t2", short).await, Ok(Claim::Run));
    wipe_redis_prefix(&prefix).await;
}
