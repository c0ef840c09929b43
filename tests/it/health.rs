//! Readiness, reflection and migrations.

use std::time::Duration;

use stockgate::domain::Sku;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::{config_for, open_store, Profile, TestApp};

#[tokio::test(flavor = "multi_thread")]
async fn not_serving_until_the_store_is_migrated() {
    let (mut config, db, dir) = config_for(Profile::Postgres).await;
    config.store.migrate_on_start = false;
    let app = TestApp::start(config.clone(), db, dir).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(app.health().await, ServingStatus::NotServing);
    crate::harness::refusal_naming(&app, "not migrated").await;

    stockgate::server::migrate(&config, false).await.unwrap();
    app.wait_serving().await;
    app.set_stock("A", 1, 0).await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn not_serving_while_the_database_is_unreachable() {
    let (mut config, _db, dir) = config_for(Profile::Embedded).await;
    // Nothing listens on port 1.
    config.backends.store = "postgres://postgres@127.0.0.1:1/none".into();
    config.store.acquire_timeout_ms = 200;
    let app = TestApp::start(config, None, dir).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(app.health().await, ServingStatus::NotServing);
    app.stop().await;
}

/// Both reflection versions list the same services: `v1`, and `v1alpha`
/// for grpcio-reflection's client and older grpcurl builds.
#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_services_in_both_versions() {
    let app = TestApp::spawn(Profile::Embedded).await;
    let channel = crate::harness::connect(app.addr).await;
    macro_rules! list_services {
        ($version:ident) => {{
            use tonic_reflection::pb::$version::{
                server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse, ServerReflectionRequest,
            };
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let response = ServerReflectionClient::new(channel.clone())
                .server_reflection_info(tokio_stream::iter([request]))
                .await
                .unwrap()
                .into_inner()
                .message()
                .await
                .unwrap()
                .unwrap();
            let Some(MessageResponse::ListServicesResponse(list)) = response.message_response
            else {
                panic!("unexpected {response:?}");
            };
            let mut names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
            names.sort();
            names
        }};
    }
    let v1 = list_services!(v1);
    for expected in [
        "stockgate.v1.InventoryService",
        "stockgate.v1.AdminService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
        "grpc.reflection.v1alpha.ServerReflection",
    ] {
        assert!(v1.iter().any(|n| n == expected), "{v1:?}");
    }
    assert_eq!(list_services!(v1alpha), v1);
    app.stop().await;
}

/// Every down.sql works: up, down, up again, on both dialects.
#[tokio::test(flavor = "multi_thread")]
async fn migrations_revert_and_reapply() {
    for profile in [Profile::Embedded, Profile::Postgres] {
        let (config, db, _dir) = config_for(profile).await;
        let store = open_store(&config);
        let applied = store.migrate().await.unwrap();
        assert!(applied > 0);
        assert_eq!(store.pending_migrations().await.unwrap(), 0);
        for reverted in 1..=applied {
            store.revert_last_migration().await.unwrap();
            assert_eq!(store.pending_migrations().await.unwrap(), reverted);
        }
        assert!(store.inventory(&Sku::parse("A").unwrap()).await.is_err());
        assert_eq!(store.migrate().await.unwrap(), applied);
        assert!(store
            .inventory(&Sku::parse("A").unwrap())
            .await
            .unwrap()
            .is_none());
        if let Some(db) = db {
            drop(store);
            db.drop_now().await;
        }
    }
}

/// A second server on one host finds a port taken: it stops at once and
/// names the key (and variable) to change, for each listener.
#[tokio::test(flavor = "multi_thread")]
async fn a_taken_port_names_the_key_to_change() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("taken.db").display().to_string();
    let free = crate::harness::free_port();
    for (key, env, toml) in [
        (
            "metrics.listen",
            "STOCKGATE_METRICS__LISTEN",
            format!("[server]\nlisten = \"127.0.0.1:{free}\"\n[metrics]\nlisten = \"{busy}\"\n"),
        ),
        (
            "server.listen",
            "STOCKGATE_SERVER__LISTEN",
            format!("[server]\nlisten = \"{busy}\"\n[metrics]\nlisten = \"\"\n"),
        ),
    ] {
        let file = dir.path().join("taken.toml");
        std::fs::write(
            &file,
            format!("{toml}[store]\nsqlite_path = \"{sqlite}\"\n"),
        )
        .unwrap();
        let output = tokio::time::timeout(
            Duration::from_secs(30),
            tokio::process::Command::new(env!("CARGO_BIN_EXE_stockgate"))
                .args(["--config", file.to_str().unwrap(), "serve"])
                .env_remove("STOCKGATE_CONFIG")
                .output(),
        )
        .await
        .expect("a server that cannot listen stops")
        .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(
            stderr.contains(key) && stderr.contains(env) && stderr.contains(&busy),
            "{stderr}"
        );
    }
}
