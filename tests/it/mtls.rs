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
fn make_ca(dir: &std::path::Path, name: &str) {
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
fn make_leaf(dir: &std::path::Path, ca: &str, name: &str, ext: &str) {
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
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    make_ca(dir, "ca");
    make_ca(dir, "rogue-ca");
    make_leaf(
        dir,
        "ca",
        "server",
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth",
    );
    for (ca, name, uri) in [
        ("ca", "checkout", "spiffe://test/checkout"),
        ("ca", "intruder", "spiffe://test/intruder"),
        ("rogue-ca", "rogue", "spiffe://test/checkout"),
    ] {
        make_leaf(
            dir,
            ca,
            name,
            &format!("subjectAltName=URI:{uri}\nextendedKeyUsage=clientAuth"),
        );
    }
    let (mut config, _db, _dir) = config_for(Profile::Embedded).await;
    let path = |file: &str| dir.join(file).display().to_string();
    config.server.tls.cert_path = path("server.pem");
    config.server.tls.key_path = path("server.key");
    config.server.tls.client_ca_path = path("ca.pem");
    config.server.tls.allowed_clients = vec!["spiffe://test/checkout".into()];
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
