//! Assembly and lifecycle: builds the backends the config selects, serves
//! gRPC until `shutdown` resolves, then drains. [`run`] is what `main` and the
//! integration tests both call.

mod listener;
mod tasks;

use tasks::{
    apply_reloads, become_ready, forward_restocks, run_reconciler, run_sweeper, sample_gauges,
    set_health, sweep_rate_limits, Background,
};

use std::{future::Future, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use governor::clock::DefaultClock;

use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Identity, Server, ServerTlsConfig},
};
use tonic_health::ServingStatus;

use crate::{
    config::{
        redact_url,
        secrets::{Backend, LiveUrl, Passwords},
        Config, GateBackend, QueueBackend, StoreBackend,
    },
    domain::switches::{Layers, Switches},
    fleet::SwitchBoard,
    gate::{EmbeddedGate, RedisGate, StockGate},
    grpc::{token_digest, AdminApi, AdminAuth, AdminToken, InventoryApi, ReserveAtOnce},
    metrics::GrpcMetricsLayer,
    middleware::{
        callers::CallerShares, BodyDeadlineLayer, DeadlineLayer, DedupLayer, DedupStore,
        DedupTimes, FleetLimits, IdentityLayer, InFlight, LoadShedLayer, MemoryDedup,
        RateLimitLayer, RateLimits, RedisFleetLimits,
    },
    pb::{
        self, admin_service_server::AdminServiceServer,
        inventory_service_server::InventoryServiceServer,
    },
    queue::{
        DeadLetters, EmbeddedQueue, OrderQueue, OrderSource, RabbitDeadLetters, RabbitQueue,
        RabbitSource,
    },
    reserve::{Limits, Pipeline},
    store::Store,
    telemetry::layer::RpcSpanLayer,
};

/// What a server runs with beyond its caller listener. Listeners left unset
/// are bound from the config (`admin.listen`, `metrics.listen`); tests pass
/// their own on port 0.
#[derive(Default)]
pub struct Extras {
    /// AdminService's own listener (only used when `admin.listen` is set).
    pub admin: Option<TcpListener>,
    /// The `/metrics` listener (only used when `metrics.listen` is set).
    pub metrics: Option<TcpListener>,
    /// Reloaded configs (SIGHUP): their layer switches are applied to the
    /// fleet as a change by `sighup`, their admin token here.
    pub reloads: Option<mpsc::Receiver<Config>>,
    /// When Reserve calls are decided: the system clock unless a test sets
    /// its own (sale window edges to the millisecond).
    pub clock: crate::domain::Clock,
}

/// Serves until `shutdown` resolves, then stops accepting calls, lets
/// in-flight calls and the order processor finish (bounded by
/// `server.shutdown_grace_ms`), and returns.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    run_with(config, listener, Extras::default(), shutdown).await
}

/// Binds `key`'s address unless the caller passed a listener. A second
/// server on one host meets a taken port here first, so the error names the
/// key (and its environment variable) to change.
async fn bind_unless_given(
    given: Option<TcpListener>,
    wanted: Option<std::net::SocketAddr>,
    key: &str,
) -> anyhow::Result<Option<TcpListener>> {
    match (given, wanted) {
        (_, None) => Ok(None),
        (Some(listener), Some(_)) => Ok(Some(listener)),
        (None, Some(addr)) => TcpListener::bind(addr).await.map(Some).map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {addr} ({key}): {e}; set {key} (env {}) to a free \
                 address, or to \"\" to turn that listener off",
                crate::config::env_name(key)
            )
        }),
    }
}

fn tls_config(config: &Config) -> anyhow::Result<Option<ServerTlsConfig>> {
    let tls = &config.server.tls;
    if !tls.enabled() {
        return Ok(None);
    }
    let read = |path: &str, field: &str| {
        std::fs::read(path).map_err(|e| anyhow::anyhow!("{field} {path}: {e}"))
    };
    let identity = Identity::from_pem(
        read(&tls.cert_path, "server.tls.cert_path")?,
        read(&tls.key_path, "server.tls.key_path")?,
    );
    // A handshake that stalls after the ClientHello would otherwise hold
    // its connection slot for ever (the connection age starts after it).
    let mut server = ServerTlsConfig::new()
        .identity(identity)
        .timeout(Duration::from_millis(config.server.handshake_timeout_ms));
    if tls.mutual() {
        let ca = read(&tls.client_ca_path, "server.tls.client_ca_path")?;
        server = server
            .client_ca_root(tonic::transport::Certificate::from_pem(ca))
            .client_auth_optional(false);
    }
    Ok(Some(server))
}

/// [`run`] with extra listeners and config reloads (what `main` uses).
pub async fn run_with(
    config: Config,
    listener: TcpListener,
    extras: Extras,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    config.validate()?;
    let metrics_handle = crate::metrics::install();
    let tls = tls_config(&config)?;
    let admin_listener =
        bind_unless_given(extras.admin, config.admin_listen()?, "admin.listen").await?;
    let metrics_listener =
        bind_unless_given(extras.metrics, config.metrics_listen()?, "metrics.listen").await?;
    crate::metrics::hot_skus::configure(config.metrics.hot_skus);
    let health_listener =
        bind_unless_given(None, config.health_listen()?, "server.health_listen").await?;
    let admin_addr = match &admin_listener {
        Some(admin) => admin.local_addr()?,
        None => listener.local_addr()?,
    };
    let admin_token: AdminToken = Arc::new(ArcSwap::from_pointee(
        config.admin_token()?.as_deref().map(token_digest),
    ));
    let open_without_token = admin_addr.ip().is_loopback() && !config.admin.require_token;
    if admin_token.load().is_none() {
        if open_without_token {
            tracing::warn!(%admin_addr, "admin.token is not set: AdminService is open to anyone on this host");
        } else {
            tracing::warn!(%admin_addr, "admin.token is not set: AdminService refuses every call (set admin.token or admin.token_file; admin.require_token or a non-loopback listener needs one)");
        }
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        revision = crate::GIT_REVISION,
        "stockgate starting"
    );
    let target = config.store_backend()?;
    match &target {
        StoreBackend::Postgres(url) => {
            tracing::info!(store = %redact_url(url), "store: postgres");
            if config.store.tls_files().any() && crate::store::tls::wanted(url).is_none() {
                warn_tls_unused("store", "backends.store (no sslmode)");
            }
        }
        StoreBackend::Sqlite(path) => tracing::info!(store = %path, "store: embedded sqlite"),
    }
    let passwords = Arc::new(Passwords::from_config(&config.backends)?);
    let store =
        Store::connect_with_password(target, &config.store, passwords.watch(Backend::Store))?;
    let role = config.server.role;
    // The partition leases' sessions come from the same settings.
    let processor_store = store.clone();
    let (queue, embedded_source, rabbit): (Arc<dyn OrderQueue>, _, _) = match config
        .queue_backend()?
    {
        QueueBackend::Embedded => {
            let (queue, receiver) = EmbeddedQueue::new(config.layers.queue.capacity);
            (Arc::new(queue), Some(receiver), None)
        }
        QueueBackend::Rabbit(url) => {
            tracing::info!(queue = %redact_url(&url), name = %config.rabbitmq.queue, ?role, "queue: rabbitmq");
            let tls = config
                .rabbitmq
                .tls_files()
                .read()
                .map_err(anyhow::Error::msg)?;
            let url = LiveUrl::new(&url, passwords.watch(Backend::Queue)).with_tls(tls);
            warn_if_plaintext_with_tls(&url, "backends.queue");
            let queue = Arc::new(RabbitQueue::new(
                url.clone(),
                &config.rabbitmq,
                store.clone(),
            ));
            (
                queue.clone() as Arc<dyn OrderQueue>,
                None,
                Some((queue, url)),
            )
        }
    };
    // Gate and dedup share redis.tls_*: read once, and only if Redis is used.
    let redis_tls_read = std::sync::OnceLock::<crate::tls::TlsPem>::new();
    let redis_tls = || -> anyhow::Result<crate::tls::TlsPem> {
        if let Some(tls) = redis_tls_read.get() {
            return Ok(tls.clone());
        }
        let tls = config
            .redis
            .tls_files()
            .read()
            .map_err(anyhow::Error::msg)?;
        Ok(redis_tls_read.get_or_init(|| tls).clone())
    };
    let gate: Arc<dyn StockGate> = match config.gate_backend()? {
        GateBackend::Embedded => Arc::new(EmbeddedGate::new()),
        GateBackend::Redis(url) => {
            tracing::info!(gate = %redact_url(&url), prefix = %config.redis.key_prefix, "gate: redis");
            let url = LiveUrl::new(&url, passwords.watch(Backend::Gate)).with_tls(redis_tls()?);
            warn_if_plaintext_with_tls(&url, "backends.gate");
            Arc::new(RedisGate::connect(url, &config.redis)?)
        }
    };
    let seed = Layers::from_config(&config);
    let switches: Switches = Arc::new(ArcSwap::from_pointee(seed));
    let caller_shares = CallerShares::from_config(&config.server.tls);
    let rate_limits = Arc::new(RateLimits::new(
        &config.layers.rate_limit,
        caller_shares.clone(),
        DefaultClock::default(),
    ));
    let fleet_limits: Option<Arc<dyn FleetLimits>> = match config.rate_limit_backend()? {
        None => None,
        Some(url) => {
            tracing::info!(rate_limit = %redact_url(&url), "rate limits: shared by the fleet in redis");
            let url =
                LiveUrl::new(&url, passwords.watch(Backend::RateLimit)).with_tls(redis_tls()?);
            warn_if_plaintext_with_tls(&url, "backends.rate_limit");
            Some(Arc::new(
                RedisFleetLimits::new(
                    url,
                    &config.redis.key_prefix,
                    Duration::from_millis(config.redis.response_timeout_ms),
                )
                .map_err(anyhow::Error::msg)?,
            ))
        }
    };
    let (dedup_store, memory_dedup): (Arc<dyn DedupStore>, _) = match config.dedup_backend()? {
        None => {
            let memory = Arc::new(MemoryDedup::new(config.layers.dedup.memory_max_bytes));
            (memory.clone(), Some(memory))
        }
        Some(url) => {
            tracing::info!(dedup = %redact_url(&url), "dedup store: redis");
            let url = LiveUrl::new(&url, passwords.watch(Backend::Dedup)).with_tls(redis_tls()?);
            warn_if_plaintext_with_tls(&url, "backends.dedup");
            let store = crate::middleware::RedisDedup::new(
                url,
                &config.redis.key_prefix,
                Duration::from_millis(config.redis.response_timeout_ms),
            )
            .map_err(anyhow::Error::msg)?;
            (Arc::new(store), None)
        }
    };
    let dedup_times = DedupTimes {
        ttl: Duration::from_secs(config.layers.dedup.ttl_secs),
        wait: Duration::from_millis(config.layers.dedup.wait_ms),
        // A claim outlives the call that made it by a margin, then lapses.
        in_flight: config.request_timeout() + Duration::from_secs(1),
    };
    let pipeline = Arc::new(
        Pipeline::new(
            store,
            gate,
            queue.clone(),
            switches.clone(),
            Limits::from_config(&config),
        )
        .with_clock(extras.clock.clone()),
    );

    let board = Arc::new(SwitchBoard::new(
        pipeline.store().clone(),
        pipeline.clone(),
        rate_limits.clone(),
        seed,
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut background = Background::default();
    background.spawn(
        "readiness",
        become_ready(
            pipeline.clone(),
            board.clone(),
            health.clone(),
            config.store.migrate_on_start,
            stop_rx.clone(),
        ),
    );
    background.spawn(
        "switch poller",
        crate::fleet::run_poller(
            board.clone(),
            Duration::from_millis(config.admin.switch_poll_ms),
            stop_rx.clone(),
        ),
    );
    if let Some(reloads) = extras.reloads {
        background.spawn(
            "config reloads",
            apply_reloads(
                reloads,
                board.clone(),
                admin_token.clone(),
                passwords.clone(),
                config.layers.rate_limit.methods.clone(),
            ),
        );
    }
    if let Some(listener) = health_listener {
        tracing::info!(addr = ?listener.local_addr().ok(), "plaintext health checks (grpc.health.v1 only)");
        let mut stop = stop_rx.clone();
        // No TLS and no other service: it tells probes the serving status
        // and nothing else, so it needs no caller's certificate.
        let serve = Server::builder()
            .add_service(health_service.clone())
            .serve_with_incoming_shutdown(
                listener::incoming(listener, listener_limits(&config)),
                async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                },
            );
        background.spawn("health listener", async move {
            if let Err(err) = serve.await {
                tracing::warn!(error = %err, "health listener failed");
            }
        });
    }
    if let Some(listener) = metrics_listener {
        tracing::info!(addr = ?listener.local_addr().ok(), "metrics on /metrics");
        background.spawn(
            "metrics endpoint",
            crate::metrics::serve(listener, metrics_handle, stop_rx.clone()),
        );
    }
    let batch_size = config.layers.queue.batch_size;
    let linger = Duration::from_millis(config.layers.queue.linger_ms);
    let reconnect_delay = Duration::from_millis(config.rabbitmq.reconnect_delay_ms);
    let processor = match (embedded_source, &rabbit) {
        (Some(source), _) => Some(tokio::spawn(crate::processor::run_processor(
            pipeline.clone(),
            Box::new(source),
            batch_size,
            linger,
            stop_rx.clone(),
        ))),
        (None, Some((queue, url))) if role.processes_orders() && queue.names().is_partitioned() => {
            let settings = crate::processor::Partitioned {
                store: processor_store,
                uri: url.clone(),
                names: queue.names().clone(),
                prefetch: config.rabbitmq.prefetch,
                reconnect_delay,
                batch_size,
                linger,
                lease_poll: Duration::from_millis(config.rabbitmq.lease_poll_ms),
                publish_bound: queue.publish_bound(),
                queue: Arc::clone(queue),
            };
            Some(tokio::spawn(crate::processor::run_partitioned(
                pipeline.clone(),
                settings,
                stop_rx.clone(),
            )))
        }
        (None, Some((queue, url))) if role.processes_orders() => {
            let source: Box<dyn OrderSource> = Box::new(RabbitSource::new(
                url.clone(),
                queue.names(),
                config.rabbitmq.prefetch,
                reconnect_delay,
            ));
            Some(tokio::spawn(crate::processor::run_processor(
                pipeline.clone(),
                source,
                batch_size,
                linger,
                stop_rx.clone(),
            )))
        }
        _ => None,
    };
    // API replicas learn from the processor which queued reservations
    // now have a row.
    if let Some((queue, _)) = rabbit.as_ref().filter(|_| role.serves_api()) {
        let processed = pipeline.clone();
        background.spawn(
            "processed-notice follower",
            queue
                .clone()
                .follow_processed(move |ids| processed.apply_processed(&ids), stop_rx.clone()),
        );
    }
    background.spawn("restock notices", forward_restocks(pipeline.clone()));
    background.spawn(
        "limiter sweeper",
        sweep_rate_limits(
            rate_limits.clone(),
            memory_dedup,
            Duration::from_millis(config.layers.rate_limit.sweep_interval_ms),
        ),
    );
    background.spawn(
        "reconciler",
        run_reconciler(
            pipeline.clone(),
            Duration::from_millis(config.layers.gate.reconcile_interval_ms),
            rabbit.is_some() && role.serves_api(),
            stop_rx.clone(),
        ),
    );
    background.spawn(
        "expiry sweeper",
        run_sweeper(
            pipeline.clone(),
            Duration::from_millis(config.reservations.sweep_interval_ms),
            stop_rx.clone(),
        ),
    );

    // An operator's call stops taking messages well before its deadline,
    // so its answer can say what it did.
    let dead_letter_budget = config.request_timeout().mul_f64(0.6);
    let dead_letters = rabbit.as_ref().map(|(queue, _)| {
        Arc::new(RabbitDeadLetters::new(queue.clone(), dead_letter_budget)) as Arc<dyn DeadLetters>
    });
    let max = config.server.max_message_bytes;
    let inventory = InventoryServiceServer::new(InventoryApi::new(pipeline.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let in_flight = (config.server.max_in_flight > 0)
        .then(|| Arc::new(InFlight::new(config.server.max_in_flight, caller_shares)));
    let admin = InterceptedService::new(
        AdminServiceServer::new(
            AdminApi::new(
                pipeline.clone(),
                rate_limits.clone(),
                in_flight.clone(),
                board.clone(),
                // Three sweeps and a second: a hold older than that past its
                // expiry was missed.
                Duration::from_millis(config.reservations.sweep_interval_ms * 3 + 1_000),
                dead_letters.clone(),
            )
            .with_request_timeout(config.request_timeout()),
        )
        .max_decoding_message_size(max)
        .max_encoding_message_size(max),
        AdminAuth {
            token: admin_token,
            open_without_token,
        },
    );
    background.spawn(
        "gauge sampler",
        sample_gauges(
            pipeline.clone(),
            in_flight.clone(),
            dead_letters,
            stop_rx.clone(),
        ),
    );

    tracing::info!(addr = %listener.local_addr()?, %admin_addr, tls = tls.is_some(), layers = ?pipeline.layers(), "serving");
    let grace = config.shutdown_grace();
    let mut draining = stop_rx.clone();
    let health_on_stop = health.clone();
    let (caller_admin, own_admin) = match admin_listener {
        Some(admin_listener) => (None, Some((admin, admin_listener))),
        None => (Some(admin), None),
    };
    let reflection = reflection_services()?;
    let admin_server = match own_admin {
        Some((admin, admin_listener)) if role.serves_api() => {
            let mut stop = stop_rx.clone();
            let serve = builder(&config, tls.clone())?
                .layer(RpcSpanLayer)
                .layer(GrpcMetricsLayer)
                .layer(DeadlineLayer::new(config.request_timeout()))
                .layer(tower::util::option_layer(identity_layer(&config)))
                .add_service(health_service.clone())
                .add_service(reflection.v1.clone())
                .add_service(reflection.v1alpha.clone())
                .add_service(admin)
                .serve_with_incoming_shutdown(
                    listener::incoming(admin_listener, listener_limits(&config)),
                    async move {
                        let _ = stop.wait_for(|stop| *stop).await;
                    },
                );
            Some(tokio::spawn(serve))
        }
        _ => None,
    };
    let serve = builder(&config, tls)?
        // Outermost first (tonic's stream limit sits outside). Metrics
        // first, so every answer is counted, refusals included.
        .layer(RpcSpanLayer)
        .layer(GrpcMetricsLayer)
        // The call's deadline covers everything below, body included.
        .layer(DeadlineLayer::new(config.request_timeout()))
        // With mutual TLS, who is calling (and whether they may) first.
        .layer(tower::util::option_layer(identity_layer(&config)))
        // The request message must arrive in time, and is read whole
        // before a shedding slot is taken: a slow sender holds no slot.
        .layer(BodyDeadlineLayer::new(
            Duration::from_millis(config.server.body_timeout_ms),
            config.server.max_message_bytes,
            config.server.max_reading_bytes,
        ))
        // Shedding next: a spike must not queue in front of anything.
        .layer(tower::util::option_layer(in_flight.map(LoadShedLayer::new)))
        // Rate limiting runs before anything decodes a body, so a flood
        // costs a header lookup and a counter per call.
        .layer(RateLimitLayer::new(
            rate_limits,
            fleet_limits,
            switches.clone(),
            &config.layers.rate_limit.methods,
        ))
        // Then dedup: after the rate limit, so a refused duplicate holds no
        // claim on its key; before the services, so a duplicate never runs
        // the stock logic (it may be asked for an at-once answer, which
        // changes nothing).
        .layer(DedupLayer::new(
            dedup_store,
            switches,
            dedup_times,
            Arc::new(ReserveAtOnce::new(
                pipeline.clone(),
                config.server.max_message_bytes,
            )),
        ))
        .add_service(health_service)
        .add_service(reflection.v1)
        .add_service(reflection.v1alpha)
        .add_optional_service(role.serves_api().then_some(inventory))
        .add_optional_service(caller_admin.filter(|_| role.serves_api()))
        .serve_with_incoming_shutdown(
            listener::incoming(listener, listener_limits(&config)),
            async move {
                shutdown.await;
                tracing::info!("shutdown requested; draining");
                // Readiness goes first so load balancers stop sending.
                set_health(&health_on_stop, ServingStatus::NotServing).await;
                let _ = stop_tx.send(true);
            },
        );
    // Long-lived calls (watch streams) would hold a graceful stop open
    // forever; give them the grace period, then stop anyway.
    let result = tokio::select! {
        result = serve => result.map_err(anyhow::Error::from),
        _ = async {
            let _ = draining.wait_for(|stop| *stop).await;
            tokio::time::sleep(grace).await;
        } => {
            tracing::warn!(?grace, "in-flight calls outlived the shutdown grace period");
            Ok(())
        }
    };
    if let Some(admin_server) = admin_server {
        match tokio::time::timeout(grace, admin_server).await {
            Ok(Ok(Err(err))) => tracing::warn!(error = %err, "admin listener failed"),
            Err(_) => tracing::warn!("admin calls outlived the shutdown grace period"),
            _ => {}
        }
    }

    background.stop(grace).await;
    // Queued orders were promised a decision: let the embedded processor
    // drain them (a RabbitMQ processor finishes its batch; the rest stays
    // queued for the next one).
    queue.close();
    if let Some(processor) = processor {
        if tokio::time::timeout(grace, processor).await.is_err() {
            tracing::error!("order processor did not drain within the grace period");
        }
    }
    tracing::info!("stopped");
    result
}

fn builder(config: &Config, tls: Option<ServerTlsConfig>) -> anyhow::Result<Server> {
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let server = &config.server;
    let millis = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
    // No tonic timeout: the DeadlineLayer answers DEADLINE_EXCEEDED where
    // tonic would answer CANCELLED.
    let mut builder = builder
        .max_concurrent_streams(Some(server.max_concurrent_streams))
        .http2_keepalive_interval(millis(server.http2_keepalive_interval_ms))
        .http2_keepalive_timeout(millis(server.http2_keepalive_timeout_ms));
    // Only the age: tonic sends GOAWAY at it. With its grace option set as
    // well, tonic sends no GOAWAY at all and cuts the connection at age +
    // grace, failing calls in flight; the accept loop's connections end
    // themselves at age + grace instead.
    if let Some(age) = millis(server.max_connection_age_ms) {
        builder = builder.max_connection_age(age);
    }
    Ok(builder)
}

fn identity_layer(config: &Config) -> Option<IdentityLayer> {
    let tls = &config.server.tls;
    tls.mutual()
        .then(|| IdentityLayer::new(&tls.allowed_clients))
}

fn listener_limits(config: &Config) -> listener::ListenerLimits {
    let server = &config.server;
    listener::ListenerLimits {
        max_connections: server.max_connections,
        handshake_timeout: Duration::from_millis(server.handshake_timeout_ms),
        tcp_keepalive: (server.tcp_keepalive_secs > 0)
            .then(|| Duration::from_secs(server.tcp_keepalive_secs)),
        lifetime: (server.max_connection_age_ms > 0).then(|| {
            Duration::from_millis(server.max_connection_age_ms + server.max_connection_age_grace_ms)
        }),
    }
}

/// Server reflection, in both versions: `v1`, and `v1alpha`, which
/// grpcio-reflection's client and older grpcurl builds still speak. Each
/// lists both, so a client finds whichever it knows.
struct Reflection<V1, V1Alpha> {
    v1: tonic_reflection::server::v1::ServerReflectionServer<V1>,
    v1alpha: tonic_reflection::server::v1alpha::ServerReflectionServer<V1Alpha>,
}

fn reflection_services() -> anyhow::Result<
    Reflection<
        impl tonic_reflection::server::v1::ServerReflection,
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
> {
    let builder = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(
                tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
            )
            .include_reflection_service(false)
    };
    Ok(Reflection {
        v1: builder().build_v1()?,
        v1alpha: builder().build_v1alpha()?,
    })
}

/// Runs `stockgate migrate`: applies (or, with `revert`, reverts the latest)
/// migrations against the configured store.
pub async fn migrate(config: &Config, revert: bool) -> anyhow::Result<()> {
    let store = Store::connect(config.store_backend()?, &config.store)?;
    if revert {
        store.revert_last_migration().await?;
        tracing::info!("reverted the latest migration");
    } else {
        let applied = store.migrate().await?;
        tracing::info!(applied, "migrations applied");
    }
    Ok(())
}

/// Spawned helper for tests and embedding: `run` on its own task.
pub fn spawn(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> JoinHandle<anyhow::Result<()>> {
    tokio::spawn(run(config, listener, shutdown))
}

/// TLS files configured for a backend whose URL is plaintext: the operator
/// meant TLS, and the connection (with its password) is not encrypted.
fn warn_if_plaintext_with_tls(url: &LiveUrl, url_key: &str) {
    if let Some(tls) = url.tls().filter(|tls| tls.is_set() && !url.is_tls()) {
        warn_tls_unused(tls.section, url_key);
    }
}

fn warn_tls_unused(section: &str, url_key: &str) {
    tracing::warn!(
        section,
        url = url_key,
        "TLS files are set but the URL is plaintext: this connection is not encrypted"
    );
}
