//! Connections and slow callers, against the real binary: streams that
//! never send their message, connections that never finish the HTTP/2
//! preface, and a process at its open-file limit. Honest callers must go on
//! being answered, and nothing a slow caller opens may stay open forever.

use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use stockgate::pb::{
    inventory_service_client::InventoryServiceClient, ReserveOutcome, ReserveRequest,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::harness::{config_for, connect, with_user, BinaryServer, Profile};

/// `calls` sold-out Reserves, 8 at a time, on a connection of their own:
/// (answered OK, each call's latency).
async fn honest_calls(addr: std::net::SocketAddr, calls: usize) -> (usize, Vec<Duration>) {
    let channel = connect(addr).await;
    let results: Vec<(bool, Duration)> = futures::stream::iter(0..calls)
        .map(|n| {
            let mut client = InventoryServiceClient::new(channel.clone());
            async move {
                let started = Instant::now();
                let answer = client
                    .reserve(with_user(
                        ReserveRequest {
                            sku: "GONE".into(),
                            quantity: 1,
                            ..Default::default()
                        },
                        &format!("honest-{n}"),
                        None,
                    ))
                    .await;
                let ok =
                    answer.is_ok_and(|a| a.into_inner().outcome == ReserveOutcome::SoldOut as i32);
                (ok, started.elapsed())
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let ok = results.iter().filter(|(ok, _)| *ok).count();
    let mut latencies: Vec<Duration> = results.into_iter().map(|(_, d)| d).collect();
    latencies.sort();
    (ok, latencies)
}

/// One HTTP/2 connection with `streams` Reserve streams that send their
/// headers and never their message. Returns what keeps them open and the
/// streams' answers to come.
async fn slow_streams(
    addr: std::net::SocketAddr,
    streams: usize,
) -> (Vec<h2::SendStream<Bytes>>, Vec<h2::client::ResponseFuture>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut senders = Vec::new();
    let mut answers = Vec::new();
    for n in 0..streams {
        client = client.ready().await.unwrap();
        let request = http::Request::builder()
            .method("POST")
            .uri(format!(
                "http://{addr}/stockgate.v1.InventoryService/Reserve"
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-user-id", format!("slow-{n}"))
            .body(())
            .unwrap();
        let (answer, sender) = client.send_request(request, false).unwrap();
        senders.push(sender);
        answers.push(answer);
    }
    (senders, answers)
}

/// 45 connections × 100 streams that send headers and no message (more
/// streams than the replica's 4,096 in-flight slots), plus 500 connections
/// that send half the HTTP/2 preface and stop: an honest caller's 300
/// calls all succeed, with p99 under a second; the silent streams are
/// answered DEADLINE_EXCEEDED after `server.body_timeout_ms`, and the
/// half-open connections closed after `server.handshake_timeout_ms`.
/// (Before: 121 of 283 honest calls were shed, and both floods stayed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_callers_cannot_starve_honest_ones() {
    let (mut config, _db, _dir) = config_for(Profile::Embedded).await;
    config.server.body_timeout_ms = 3_000;
    config.server.handshake_timeout_ms = 1_000;
    let server = BinaryServer::start(config).await;
    server.wait_serving().await;
    server.set_stock("GONE", 0, 0).await;

    let mut half_open = Vec::new();
    for _ in 0..500 {
        let mut tcp = TcpStream::connect(server.addr).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        half_open.push(tcp);
    }
    let slow = futures::future::join_all((0..45).map(|_| slow_streams(server.addr, 100))).await;
    let (ok, latencies) = honest_calls(server.addr, 300).await;
    let p99 = latencies[latencies.len() * 99 / 100];
    println!("honest calls: {ok}/300 answered, p99 {p99:?}");
    assert_eq!(
        ok, 300,
        "honest calls failed while slow callers held streams"
    );
    assert!(p99 < Duration::from_secs(1), "honest p99 {p99:?}");

    // The half-open connections are closed by the server (EOF or reset),
    // after whatever it sent first (its SETTINGS).
    for tcp in &mut half_open {
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            let mut buf = [0u8; 256];
            while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                let _ = n;
            }
        })
        .await;
        assert!(closed.is_ok(), "a half-open connection was still open");
    }
    // The silent streams are answered, trailers-only, DEADLINE_EXCEEDED.
    let (_senders, answers): (Vec<_>, Vec<_>) = slow.into_iter().unzip();
    let mut answered = 0;
    for answer in answers.into_iter().flatten().take(50) {
        let answer = tokio::time::timeout(Duration::from_secs(10), answer)
            .await
            .expect("a silent stream is answered")
            .unwrap();
        assert_eq!(
            answer.headers().get("grpc-status").map(|v| v.as_bytes()),
            Some(&b"4"[..]),
            "{answer:?}"
        );
        answered += 1;
    }
    assert_eq!(answered, 50);
}

/// At its open-file limit the replica stays quiet and recovers: with 300
/// connections waiting beyond a 256-descriptor limit it uses under a
/// quarter of a core, and once they close honest calls are answered again.
/// (The reported 100% spin did not reproduce here with the old accept
/// stream either: this guards the back-off, it does not reproduce the bug.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_accept_loop_backs_off_at_the_descriptor_limit() {
    let (config, _db, _dir) = config_for(Profile::Embedded).await;
    let server = BinaryServer::start_wrapped(
        config,
        &[],
        std::process::Stdio::null(),
        &["prlimit", "--nofile=256:256", "--"],
    )
    .await;
    server.wait_serving().await;
    server.set_stock("GONE", 0, 0).await;
    let mut flood = Vec::new();
    for _ in 0..300 {
        // The kernel completes these from the backlog; the server cannot
        // take them all.
        flood.push(TcpStream::connect(server.addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let open = server.open_files();
    assert!(
        open >= 250,
        "the flood did not reach the limit: {open} files open"
    );
    let cpu_before = server.cpu_time();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = server.cpu_time() - cpu_before;
    println!("cpu used at the descriptor limit over 2 s: {used:?}");
    assert!(
        used < Duration::from_millis(500),
        "the replica spun at its descriptor limit: {used:?} of CPU in 2 s"
    );
    drop(flood);
    let (ok, _) = tokio::time::timeout(Duration::from_secs(20), honest_calls(server.addr, 10))
        .await
        .expect("an honest call is answered once the flood left");
    assert_eq!(ok, 10);
}

/// Connections are recycled: with `server.max_connection_age_ms` = 1 s and
/// a 1 s grace, an idle connection is sent GOAWAY (so a client reconnects,
/// through a load balancer, and reaches replicas added since) and closed;
/// one still holding a call is cut at age + grace. (Before: no limit; and
/// tonic's own grace option sends no GOAWAY at all.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_connections_are_closed_after_their_age_and_grace() {
    let (mut config, _db, _dir) = config_for(Profile::Embedded).await;
    config.server.max_connection_age_ms = 1_000;
    config.server.max_connection_age_grace_ms = 1_000;
    config.server.body_timeout_ms = 10_000;
    let server = BinaryServer::start(config).await;
    server.wait_serving().await;

    // Idle: frames read until the server closes, GOAWAY (type 7) among them.
    let started = Instant::now();
    let mut tcp = TcpStream::connect(server.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let mut received = Vec::new();
    let read_all = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = tcp.read(&mut buf).await {
            received.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read_all.is_ok(), "the idle connection outlived its age");
    let mut types = Vec::new();
    let mut at = 0;
    while at + 9 <= received.len() {
        let len = usize::from(received[at]) << 16
            | usize::from(received[at + 1]) << 8
            | usize::from(received[at + 2]);
        types.push(received[at + 3]);
        at += 9 + len;
    }
    assert!(
        types.contains(&7),
        "no GOAWAY before the close: frame types {types:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(4));

    // A call that never ends (its message never comes, the body timeout is
    // 10 s) does not hold the connection past age + grace.
    let started = Instant::now();
    let (_senders, answers) = slow_streams(server.addr, 1).await;
    let answer = tokio::time::timeout(Duration::from_secs(8), answers.into_iter().next().unwrap())
        .await
        .expect("the stream ended");
    let lived = started.elapsed();
    assert!(
        lived < Duration::from_millis(4_000),
        "the connection was cut only after {lived:?}: {answer:?}"
    );
}

/// The bytes of messages still arriving are bounded across the replica:
/// with `server.max_reading_bytes` = 100 KiB, a stream holding 60 KiB of an
/// unfinished message leaves no room for a second one, which is refused
/// at once RESOURCE_EXHAUSTED; once the first stream goes, there is room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_being_read_are_bounded_across_the_replica() {
    let (mut config, _db, _dir) = config_for(Profile::Embedded).await;
    config.server.max_reading_bytes = 100 * 1024;
    config.server.body_timeout_ms = 10_000;
    let server = BinaryServer::start(config).await;
    server.wait_serving().await;
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let partial = |client: h2::client::SendRequest<Bytes>| async move {
        let mut client = client.ready().await.unwrap();
        let request = http::Request::builder()
            .method("POST")
            .uri(format!(
                "http://{}/stockgate.v1.InventoryService/Reserve",
                server.addr
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .header("x-user-id", "big")
            .body(())
            .unwrap();
        let (answer, mut sender) = client.send_request(request, false).unwrap();
        // A frame header announcing 64,000 bytes, then 60 KiB of them.
        let mut data = vec![0, 0, 0, 0xfa, 0x00];
        data.resize(5 + 60 * 1024, 0);
        sender.send_data(Bytes::from(data), false).unwrap();
        (answer, sender)
    };
    let (mut first, first_sender) = partial(client.clone()).await;
    // The first is still reading: no answer yet.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut first)
            .await
            .is_err(),
        "the first stream was answered before its message ended"
    );
    let (second, _second_sender) = partial(client.clone()).await;
    let second = tokio::time::timeout(Duration::from_secs(2), second)
        .await
        .expect("the second stream is refused at once")
        .unwrap();
    assert_eq!(
        second.headers().get("grpc-status").map(|v| v.as_bytes()),
        Some(&b"8"[..]),
        "{second:?}"
    );
    // The first stream goes; its bytes are given back.
    drop(first_sender);
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (mut third, _third_sender) = partial(client).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut third)
            .await
            .is_err(),
        "room came back once the first stream left"
    );
}
