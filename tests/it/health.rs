//! Readiness, reflection and migrations.

use std::time::Duration;

use stockgate::{domain::Sku, pb::ReserveRequest};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;

use crate::harness::{config_for, open_store, with_user, Profile, TestApp};

#[tokio::test(flavor = "multi_thread")]
async fn not_serving_until_the_store_is_migrated() {
    let (mut config, db, dir) = config_for(Profile::Postgres).await;
    config.store.migrate_on_start = false;
    let app = TestApp::start(config.clone(), db, dir).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(app.health().await, ServingStatus::NotServing);
    let status = app
        .inventory()
        .reserve(with_user(
            ReserveRequest {
                sku: "A".into(),
                quantity: 1,
                ..Default::default()
            },
            "u1",
            None,
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

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

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
        ServerReflectionRequest,
    };
    let app = TestApp::spawn(Profile::Embedded).await;
    let mut client = ServerReflectionClient::new(crate::harness::connect(app.addr).await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected {response:?}");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in [
        "stockgate.v1.InventoryService",
        "stockgate.v1.AdminService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == expected), "{names:?}");
    }
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
