//! New replicas get traffic: a caller balancing with `round_robin` over a
//! DNS name, holding a connection to each of two replicas, reaches a third
//! one added to the name within the servers' connection age plus its
//! grace (GOAWAY makes grpc-core resolve the name again), and never does
//! while connections live for ever. Real replicas on their own loopback
//! addresses, a DNS server of the test's own, and Python's grpcio as the
//! caller (`clients/python/balanced.py`).

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::{TcpListener, UdpSocket},
};

use crate::harness::{config_for, python_grpc, python_stubs, Profile, TestApp, ROOT};

/// The name the replicas are found under.
const NAME: &str = "stockgate.test";
const AGE_MS: u64 = 2_000;
const GRACE_MS: u64 = 1_000;

/// Answers A queries for [`NAME`] with the addresses `addrs` holds at that
/// moment (1 s TTL); other types of the name get no records, other names
/// NXDOMAIN. Returns its UDP port.
async fn dns_server(addrs: Arc<Mutex<Vec<Ipv4Addr>>>) -> (u16, tokio::task::JoinHandle<()>) {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let port = socket.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        let mut buf = [0u8; 1_500];
        while let Ok((len, peer)) = socket.recv_from(&mut buf).await {
            let now: Vec<Ipv4Addr> = addrs.lock().unwrap().clone();
            if let Some(reply) = dns_answer(&buf[..len], &now) {
                let _ = socket.send_to(&reply, peer).await;
            }
        }
    });
    (port, task)
}

fn dns_answer(query: &[u8], addrs: &[Ipv4Addr]) -> Option<Vec<u8>> {
    let mut at = 12;
    let mut labels = Vec::new();
    while *query.get(at)? != 0 {
        let len = usize::from(query[at]);
        labels.push(String::from_utf8_lossy(query.get(at + 1..at + 1 + len)?).to_ascii_lowercase());
        at += 1 + len;
    }
    let qtype = u16::from_be_bytes([*query.get(at + 1)?, *query.get(at + 2)?]);
    let question = query.get(12..at + 5)?;
    let ours = labels.join(".") == NAME;
    let records = if ours && qtype == 1 { addrs } else { &[] };
    let mut reply = query[..2].to_vec();
    let rcode: u16 = if ours { 0 } else { 3 };
    reply.extend_from_slice(&(0x8180 | rcode).to_be_bytes());
    reply.extend_from_slice(&1u16.to_be_bytes());
    reply.extend_from_slice(&(records.len() as u16).to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    for addr in records {
        // Name: a pointer to the question's; type A, class IN, TTL 1 s.
        reply.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1, 0, 0, 0, 1, 0, 4]);
        reply.extend_from_slice(&addr.octets());
    }
    Some(reply)
}

fn epoch_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// What the caller saw: the answers it had before the third replica joined
/// the name, how long after it joined the third first answered (if ever),
/// and any answer none of the replicas gives.
struct Seen {
    before: std::collections::BTreeSet<String>,
    reached_after: Option<f64>,
    strange: Vec<String>,
}

/// Three replicas on 127.0.0.`first`…`first + 2`, one port: A without the
/// SKU (NOT_FOUND), B with none of it (SOLD_OUT), C with plenty; the name
/// lists A and B, and C once the caller has had answers from both. The
/// caller runs `run_for` seconds in all.
async fn scenario(first: u8, age_ms: u64, run_for: f64) -> Seen {
    let deps = python_grpc();
    let stubs = python_stubs(&deps);
    let addrs: Vec<Ipv4Addr> = (0..3)
        .map(|k| Ipv4Addr::new(127, 0, 0, first + k))
        .collect();
    let probe = TcpListener::bind((addrs[0], 0)).await.unwrap();
    let port = probe.local_addr().unwrap().port();
    let mut listeners = vec![probe];
    for addr in &addrs[1..] {
        listeners.push(TcpListener::bind((*addr, port)).await.unwrap());
    }
    let mut replicas = Vec::new();
    for listener in listeners {
        let (mut config, db, dir) = config_for(Profile::Embedded).await;
        config.server.max_connection_age_ms = age_ms;
        config.server.max_connection_age_grace_ms = GRACE_MS;
        let app = TestApp::start_on(listener, config, db, dir).await;
        app.wait_serving().await;
        replicas.push(app);
    }
    replicas[1].set_stock("BAL", 0, 0).await;
    replicas[2].set_stock("BAL", 1_000_000, 0).await;

    let listed = Arc::new(Mutex::new(addrs[..2].to_vec()));
    let (dns_port, dns) = dns_server(listed.clone()).await;
    let mut caller = tokio::process::Command::new("python3")
        .arg(format!("{ROOT}/clients/python/balanced.py"))
        .arg(format!("dns://127.0.0.1:{dns_port}/{NAME}:{port}"))
        .args(["BAL", &run_for.to_string()])
        .env("PYTHONPATH", format!("{}:{deps}", stubs.path().display()))
        // The c-ares resolver: the native one ignores a DNS server named
        // in the target.
        .env("GRPC_DNS_RESOLVER", "ares")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(caller.stdout.take().unwrap()).lines();
    let mut answers: Vec<(f64, String)> = Vec::new();
    // C joins the name once the caller is on both A and B, however long
    // grpcio took to start.
    let mut joined = None;
    while let Some(line) = lines.next_line().await.unwrap() {
        let (at, said) = line.split_once(' ').unwrap();
        answers.push((at.parse::<f64>().unwrap(), said.to_owned()));
        let on_both = ["NOT_FOUND", "OK:RESERVE_OUTCOME_SOLD_OUT"]
            .iter()
            .all(|want| answers.iter().any(|(_, said)| said == want));
        if joined.is_none() && on_both {
            listed.lock().unwrap().push(addrs[2]);
            joined = Some((answers.len(), epoch_secs()));
        }
    }
    assert!(caller.wait().await.unwrap().success(), "balanced.py failed");
    // Answers before C joined are told by their place in the output: their
    // printed times are rounded to the millisecond.
    let (answered_before, joined) = joined.expect("the caller never had answers from both A and B");
    dns.abort();
    for app in replicas {
        app.stop().await;
    }

    let from_c = |said: &str| said.starts_with("OK:") && !said.ends_with("SOLD_OUT");
    let known =
        |said: &str| said == "NOT_FOUND" || said == "OK:RESERVE_OUTCOME_SOLD_OUT" || from_c(said);
    Seen {
        before: answers[..answered_before]
            .iter()
            .map(|(_, said)| said.clone())
            .collect(),
        reached_after: answers[answered_before..]
            .iter()
            .find(|(_, said)| from_c(said))
            .map(|(at, _)| (at - joined).max(0.0)),
        strange: answers
            .iter()
            .filter(|(_, said)| !known(said))
            .map(|(_, said)| said.clone())
            .collect(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_holding_two_replicas_reaches_a_third_within_connection_age_and_grace() {
    // Age + grace, and a second for the resolution and the new connection.
    let bound = (AGE_MS + GRACE_MS) as f64 / 1e3 + 1.0;
    // The caller needs a second or two to start and reach A and B first.
    let aged = scenario(2, AGE_MS, bound + 3.0).await;
    assert_eq!(
        aged.before.iter().map(String::as_str).collect::<Vec<_>>(),
        ["NOT_FOUND", "OK:RESERVE_OUTCOME_SOLD_OUT"],
        "round_robin spread calls over both replicas"
    );
    assert!(
        aged.strange.is_empty(),
        "answers no replica gives: {:?}",
        aged.strange
    );
    let reached = aged
        .reached_after
        .unwrap_or_else(|| panic!("the new replica got no call within {bound} s"));
    println!("the new replica answered {reached:.2} s after joining the name (bound {bound} s)");
    assert!(reached <= bound, "{reached:.2} s");

    // The same with connections that never age: the caller stays on the
    // two replicas it found, so the bound above is the servers' doing.
    let forever = scenario(5, 0, bound + 3.0).await;
    assert!(forever.strange.is_empty(), "{:?}", forever.strange);
    assert_eq!(forever.before.len(), 2, "{:?}", forever.before);
    assert_eq!(
        forever.reached_after, None,
        "with no connection age the new replica was reached anyway"
    );
}
