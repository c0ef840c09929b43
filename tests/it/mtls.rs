//! Mutual TLS against the real binary: only calling services with a
//! certificate from the configured CA get a connection, only those on the
//! allow-list get an answer, and the audit trail names the service.

use std::time::Duration;

use stockgate::pb::{
    admin_service_client::AdminServiceClient, inventory_service_client::InventoryServiceClient,
    ListAuditEventsRequest, ReserveRequest, SetLayersRequest,
};
use tonic::{
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
    Code,
};

use crate::{
    harness::{config_for, error_reason, with_user, BinaryServer, Profile},
    ops::openssl,
};

/// A CA (key and certificate) under `dir`.
pub(crate) fn make_ca(dir: &std::path::Path, name: &str) {
    let key = dir.join(format!("{name}.key")).display().to_string();
    let cert = dir.join(format!("{name}.pem")).display().to_string();
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "1",
        "-subj",
        &format!("/CN={name}"),
        "-keyout",
        &key,
        "-out",
        &cert,
    ]);
}

/// A leaf `name` signed by CA `ca`, with the extensions `ext` (SANs, usage).
pub(crate) fn make_leaf(dir: &std::path::Path, ca: &str, name: &str, ext: &str) {
    let path = |file: String| dir.join(file).display().to_string();
    let (key, csr, cert, ext_file) = (
        path(format!("{name}.key")),
        path(format!("{name}.csr")),
        path(format!("{name}.pem")),
        path(format!("{name}.cnf")),
    );
    openssl(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        &format!("/CN={name}"),
        "-keyout",
        &key,
        "-out",
        &csr,
    ]);
    std::fs::write(&ext_file, format!("basicConstraints=CA:FALSE\n{ext}\n")).unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &path(format!("{ca}.pem")),
        "-CAkey",
        &path(format!("{ca}.key")),
        "-CAcreateserial",
        "-days",
        "1",
        "-out",
        &cert,
        "-extfile",
        &ext_file,
    ]);
}

/// A CA, a rogue CA, a server certificate for localhost, and a client
/// certificate per `(ca, name, URI SAN)`.
fn pki(clients: &[(&str, &str, &str)]) -> tempfile::TempDir {
    pki_naming_server("DNS:localhost,IP:127.0.0.1", clients)
}

/// As [`pki`], the server certificate naming `server_names` (SANs).
pub(crate) fn pki_naming_server(
    server_names: &str,
    clients: &[(&str, &str, &str)],
) -> tempfile::TempDir {
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    make_ca(dir, "ca");
    make_ca(dir, "rogue-ca");
    make_leaf(
        dir,
        "ca",
        "server",
        &format!("subjectAltName={server_names}\nextendedKeyUsage=serverAuth"),
    );
    for (ca, name, uri) in clients {
        make_leaf(
            dir,
            ca,
            name,
            &format!("subjectAltName=URI:{uri}\nextendedKeyUsage=clientAuth"),
        );
    }
    certs
}

/// Mutual TLS with the certificates [`pki`] made, letting in `allowed`.
fn mutual_tls(config: &mut stockgate::config::Config, dir: &std::path::Path, allowed: &[&str]) {
    let path = |file: &str| dir.join(file).display().to_string();
    config.server.tls.cert_path = path("server.pem");
    config.server.tls.key_path = path("server.key");
    config.server.tls.client_ca_path = path("ca.pem");
    config.server.tls.allowed_clients = allowed.iter().map(|id| (*id).to_owned()).collect();
}

/// A channel trusting `ca`, presenting client certificate `client` if any.
async fn channel(
    dir: &std::path::Path,
    addr: std::net::SocketAddr,
    client: Option<&str>,
) -> Result<Channel, tonic::transport::Error> {
    let read = |file: String| std::fs::read(dir.join(file)).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.pem".into())))
        .domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(Identity::from_pem(
            read(format!("{client}.pem")),
            read(format!("{client}.key")),
        ));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

async fn reserve(channel: Channel) -> Result<(), tonic::Status> {
    InventoryServiceClient::new(channel)
        .reserve(with_user(
            ReserveRequest {
                sku: "NONE".into(),
                quantity: 1,
                ..Default::default()
            },
            "u1",
            None,
        ))
        .await
        .map(|_| ())
}

/// No certificate, a certificate from another CA, and an identity not on
/// the list are refused; a stalled TLS handshake is closed; the allowed
/// service is answered and audited by its certificate's identity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_calling_services_get_in() {
    let certs = pki(&[
        ("ca", "checkout", "spiffe://test/checkout"),
        ("ca", "intruder", "spiffe://test/intruder"),
        ("rogue-ca", "rogue", "spiffe://test/checkout"),
    ]);
    let dir = certs.path();
    let (mut config, _db, _dir) = config_for(Profile::Embedded).await;
    mutual_tls(&mut config, dir, &["spiffe://test/checkout"]);
    config.server.handshake_timeout_ms = 1_000;
    let server = BinaryServer::start(config).await;

    // The allowed service, once the binary listens.
    let mut allowed = None;
    for _ in 0..200 {
        if let Ok(channel) = channel(dir, server.addr, Some("checkout")).await {
            let answered = match reserve(channel.clone()).await {
                Ok(()) => true,
                Err(status) => status.code() == Code::NotFound,
            };
            if answered {
                allowed = Some(channel);
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let allowed = allowed.expect("the allowed calling service is answered");

    // No certificate, or one from another CA: no connection, or every call
    // on it fails (rustls may refuse only after the handshake's end).
    for client in [None, Some("rogue")] {
        let refused = match channel(dir, server.addr, client).await {
            Err(_) => true,
            Ok(channel) => reserve(channel)
                .await
                .is_err_and(|s| s.code() != Code::NotFound && s.code() != Code::Ok),
        };
        assert!(refused, "{client:?} was let in");
    }
    // A valid certificate naming another service: PERMISSION_DENIED.
    let intruder = channel(dir, server.addr, Some("intruder")).await.unwrap();
    let status = reserve(intruder).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(error_reason(&status), "CALLER_NOT_ALLOWED");

    // A TLS handshake that stalls after a partial ClientHello (more than
    // the listener's opening bytes) is closed within the handshake timeout.
    let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let mut hello = vec![
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    hello.resize(64, 0);
    tokio::io::AsyncWriteExt::write_all(&mut stalled, &hello)
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(4), async {
        let mut buf = [0u8; 256];
        while let Ok(1..) = tokio::io::AsyncReadExt::read(&mut stalled, &mut buf).await {}
    })
    .await;
    assert!(closed.is_ok(), "a stalled TLS handshake was kept open");

    // The audit trail names the calling service.
    let mut admin = AdminServiceClient::new(allowed);
    admin
        .set_layers(SetLayersRequest {
            rate_limit: Some(false),
            reason: "mtls test".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let events = admin
        .list_audit_events(ListAuditEventsRequest { limit: 1 })
        .await
        .unwrap()
        .into_inner()
        .events;
    assert!(
        events[0].actor.contains("client spiffe://test/checkout"),
        "{}",
        events[0].actor
    );
}

/// The `scope` an OVERLOADED or RATE_LIMITED answer names.
fn error_scope(status: &tonic::Status) -> String {
    use tonic_types::StatusExt;
    status
        .get_details_error_info()
        .and_then(|info| info.metadata.get("scope").cloned())
        .unwrap_or_default()
}

/// A channel for calling service `client`, once the binary answers it.
async fn answered(dir: &std::path::Path, addr: std::net::SocketAddr, client: &str) -> Channel {
    for _ in 0..200 {
        if let Ok(channel) = channel(dir, addr, Some(client)).await {
            match reserve(channel.clone()).await {
                Ok(()) => return channel,
                Err(status) if status.code() == Code::NotFound => return channel,
                Err(status) => assert_ne!(status.code(), Code::PermissionDenied, "{status:?}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{client} is never answered");
}

/// Reserves one unit of `sku` for a new user per call from `tasks` tasks
/// until `until`, pausing `pause` between a task's calls; counts answers
/// as "ok" or "<code>/<reason>/<scope>".
async fn keep_reserving(
    channel: Channel,
    who: &str,
    tasks: usize,
    sku: &str,
    until: std::time::Instant,
    pause: Duration,
) -> std::collections::BTreeMap<String, usize> {
    let runs = (0..tasks).map(|task| {
        let mut client = InventoryServiceClient::new(channel.clone());
        let (who, sku) = (who.to_owned(), sku.to_owned());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut n = 0;
            while std::time::Instant::now() < until {
                n += 1;
                let request = ReserveRequest {
                    sku: sku.clone(),
                    quantity: 1,
                    ..Default::default()
                };
                let user = format!("{who}-{task}-{n}");
                seen.push(
                    match client.reserve(with_user(request, &user, None)).await {
                        Ok(_) => "ok".to_owned(),
                        Err(status) => format!(
                            "{:?}/{}/{}",
                            status.code(),
                            crate::harness::error_reason(&status),
                            error_scope(&status)
                        ),
                    },
                );
                tokio::time::sleep(pause).await;
            }
            seen
        })
    });
    let mut tally = std::collections::BTreeMap::new();
    for seen in futures::future::join_all(runs).await {
        for answer in seen.unwrap() {
            *tally.entry(answer).or_default() += 1;
        }
    }
    tally
}

/// Channels for the two calling services, once the binary answers them,
/// and SKU "FAIR" with plenty of stock.
async fn greedy_and_checkout(dir: &std::path::Path, server: &BinaryServer) -> (Channel, Channel) {
    let greedy = answered(dir, server.addr, "greedy").await;
    let checkout = answered(dir, server.addr, "checkout").await;
    AdminServiceClient::new(checkout.clone())
        .set_stock(stockgate::pb::SetStockRequest {
            sku: "FAIR".into(),
            stock: 1_000_000,
            max_per_user: 0,
        })
        .await
        .unwrap();
    (greedy, checkout)
}

/// With mutual TLS, a calling service that floods the replica holds at most
/// its share of the in-flight slots and of the global rate limit while
/// another service calls: the other one's calls all go through, and the
/// flooder is told it is over its own share (scope "caller").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_calling_service_cannot_starve_another() {
    let (greedy_id, checkout_id) = ("spiffe://test/greedy", "spiffe://test/checkout");
    let certs = pki(&[("ca", "greedy", greedy_id), ("ca", "checkout", checkout_id)]);
    let dir = certs.path();
    let over_share = "ResourceExhausted/OVERLOADED/caller";
    let over_rate = "ResourceExhausted/RATE_LIMITED/caller";

    // In-flight slots: 8, so 4 each; request-path commits on one SQLite
    // connection keep them full.
    let (mut config, _db, _dir) = config_for(Profile::Embedded).await;
    mutual_tls(&mut config, dir, &[greedy_id, checkout_id]);
    config.server.max_in_flight = 8;
    config.layers.queue.enabled = false;
    config.layers.gate.enabled = false;
    config.layers.rate_limit.enabled = false;
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", crate::harness::free_port())
        .parse()
        .unwrap();
    config.metrics.listen = metrics.to_string();
    let server = BinaryServer::start(config).await;
    let (greedy, checkout) = greedy_and_checkout(dir, &server).await;
    // Both have called: the count of calling services catches up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let until = std::time::Instant::now() + Duration::from_secs(3);
    let (flood, honest) = tokio::join!(
        keep_reserving(greedy, "g", 32, "FAIR", until, Duration::ZERO),
        keep_reserving(checkout, "c", 3, "FAIR", until, Duration::ZERO),
    );
    eprintln!("slots: flood {flood:?}, honest {honest:?}");
    assert!(flood.get(over_share).copied().unwrap_or(0) > 0, "{flood:?}");
    assert_eq!(honest.keys().collect::<Vec<_>>(), ["ok"], "{honest:?}");
    assert!(honest["ok"] >= 30, "{honest:?}");
    let text = crate::ops::scrape(metrics).await;
    assert!(
        text.lines()
            .any(|line| line.starts_with("stockgate_caller_refusals_total{")
                && line.contains(&format!("caller=\"{greedy_id}\""))
                && line.contains("layer=\"shed\"")),
        "{text}"
    );
    drop(server);

    // The global rate: 40/s with a burst of 40, so 20 each.
    let (mut config, _db, _dir) = config_for(Profile::Embedded).await;
    mutual_tls(&mut config, dir, &[greedy_id, checkout_id]);
    config.layers.rate_limit.enabled = true;
    config.layers.rate_limit.global_per_sec = 40;
    config.layers.rate_limit.global_burst = 40;
    let server = BinaryServer::start(config).await;
    let (greedy, checkout) = greedy_and_checkout(dir, &server).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let window = Duration::from_secs(2);
    let until = std::time::Instant::now() + window;
    let (flood, honest) = tokio::join!(
        keep_reserving(greedy, "g", 16, "FAIR", until, Duration::ZERO),
        keep_reserving(checkout, "c", 1, "FAIR", until, Duration::from_millis(100)),
    );
    eprintln!("rate: flood {flood:?}, honest {honest:?}");
    assert!(flood.get(over_rate).copied().unwrap_or(0) > 0, "{flood:?}");
    // Its share: a burst of 20 and 20/s over the window (and a call or
    // two of slack at its edges).
    let greedy_ok = flood.get("ok").copied().unwrap_or(0);
    assert!(greedy_ok <= 20 + 20 * 2 + 5, "{flood:?}");
    assert_eq!(honest.keys().collect::<Vec<_>>(), ["ok"], "{honest:?}");
    assert!(honest["ok"] >= 15, "{honest:?}");
}

/// Probes that cannot speak TLS (the kubelet's gRPC probes): with mutual TLS
/// on the main port, `server.health_listen` answers `grpc.health.v1` in
/// plaintext, to grpcio as to tonic, and nothing else; the main port still
/// refuses a client without a certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_health_listener_answers_probes_and_nothing_else() {
    let certs = pki(&[("ca", "checkout", "spiffe://test/checkout")]);
    let dir = certs.path();
    let (mut config, _db, _dir) = config_for(Profile::Embedded).await;
    mutual_tls(&mut config, dir, &["spiffe://test/checkout"]);
    let health_port = crate::harness::free_port();
    config.server.health_listen = format!("127.0.0.1:{health_port}");
    let server = BinaryServer::start(config).await;

    let plain = format!("http://127.0.0.1:{health_port}");
    let mut status = None;
    for _ in 0..200 {
        if let Ok(channel) = Endpoint::from_shared(plain.clone())
            .unwrap()
            .connect()
            .await
        {
            let answer = tonic_health::pb::health_client::HealthClient::new(channel)
                .check(tonic_health::pb::HealthCheckRequest::default())
                .await;
            if let Ok(answer) = answer {
                status = Some(answer.into_inner().status());
                if status == Some(tonic_health::pb::health_check_response::ServingStatus::Serving) {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        status,
        Some(tonic_health::pb::health_check_response::ServingStatus::Serving)
    );

    // A client we did not write: grpcio's own health stub, insecure channel.
    let script = format!(
        "import grpc\n\
         from grpc_health.v1 import health_pb2, health_pb2_grpc\n\
         channel = grpc.insecure_channel('127.0.0.1:{health_port}')\n\
         reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)\n\
         print(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))\n"
    );
    let output = std::process::Command::new("python3")
        .args(["-c", &script])
        .env("PYTHONPATH", crate::harness::python_grpc())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "SERVING");

    // Nothing but health: InventoryService is not there.
    let health_only = Endpoint::from_shared(plain)
        .unwrap()
        .connect()
        .await
        .unwrap();
    assert_eq!(
        reserve(health_only).await.unwrap_err().code(),
        Code::Unimplemented
    );
    // And the main port still wants a certificate.
    let refused = match channel(dir, server.addr, None).await {
        Err(_) => true,
        Ok(channel) => reserve(channel)
            .await
            .is_err_and(|s| s.code() != Code::NotFound),
    };
    assert!(
        refused,
        "the main port answered a client without a certificate"
    );
}
