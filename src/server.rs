//! Assembly and lifecycle: builds the backends the config selects, serves
//! gRPC until `shutdown` resolves, then drains. [`run`] is what `main` and the
//! integration tests both call.

use std::{future::Future, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use governor::clock::DefaultClock;

use tokio::{
    net::TcpListener,
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{
    service::interceptor::InterceptedService,
    transport::{Identity, Server, ServerTlsConfig},
};
use tonic_health::{server::HealthReporter, ServingStatus};

use crate::{
    config::{redact_url, Config, GateBackend, QueueBackend, StoreBackend},
    domain::switches::{Layers, LayersChange, Switches},
    error::ReservationError,
    gate::{EmbeddedGate, RedisGate, StockGate},
    grpc::{token_digest, AdminApi, AdminAuth, AdminToken, InventoryApi},
    metrics::GrpcMetricsLayer,
    middleware::{
        DedupLayer, DedupStore, DedupTimes, InFlight, LoadShedLayer, MemoryDedup, RateLimitLayer,
        RateLimits,
    },
    ops::{ChangeRequest, SwitchBoard},
    pb::{
        self, admin_service_server::AdminServiceServer,
        inventory_service_server::InventoryServiceServer,
    },
    queue::{
        decode, encode, salvage, EmbeddedQueue, EmbeddedReceiver, OrderQueue, QueueNames,
        RabbitConsumer, RabbitQueue,
    },
    reserve::{Limits, Pipeline},
    store::Store,
};

/// Names under which health is reported: the whole server ("") and each
/// service.
const HEALTH_NAMES: [&str; 3] = [
    "",
    "stockgate.v1.InventoryService",
    "stockgate.v1.AdminService",
];

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
    Ok(Some(ServerTlsConfig::new().identity(identity)))
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
    let admin_addr = match &admin_listener {
        Some(admin) => admin.local_addr()?,
        None => listener.local_addr()?,
    };
    let admin_token: AdminToken = Arc::new(ArcSwap::from_pointee(
        config.admin_token()?.as_deref().map(token_digest),
    ));
    if admin_token.load().is_none() {
        if admin_addr.ip().is_loopback() {
            tracing::warn!(%admin_addr, "admin.token is not set: AdminService is open to anyone on this host");
        } else {
            tracing::warn!(%admin_addr, "admin.token is not set: AdminService refuses every call (set admin.token or admin.token_file)");
        }
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        revision = crate::GIT_REVISION,
        "stockgate starting"
    );
    let target = config.store_backend()?;
    match &target {
        StoreBackend::Postgres(url) => tracing::info!(store = %redact_url(url), "store: postgres"),
        StoreBackend::Sqlite(path) => tracing::info!(store = %path, "store: embedded sqlite"),
    }
    let store = Store::connect(target, &config.store)?;
    let role = config.server.role;
    let (queue, embedded_receiver, rabbit): (Arc<dyn OrderQueue>, _, _) = match config
        .queue_backend()?
    {
        QueueBackend::Embedded => {
            let (queue, receiver) = EmbeddedQueue::new(config.layers.queue.capacity);
            (Arc::new(queue), Some(receiver), None)
        }
        QueueBackend::Rabbit(url) => {
            tracing::info!(queue = %redact_url(&url), name = %config.rabbitmq.queue, ?role, "queue: rabbitmq");
            let queue = Arc::new(RabbitQueue::new(&url, &config.rabbitmq, store.clone()));
            (
                queue.clone() as Arc<dyn OrderQueue>,
                None,
                Some((queue, url)),
            )
        }
    };
    let gate: Arc<dyn StockGate> = match config.gate_backend()? {
        GateBackend::Embedded => Arc::new(EmbeddedGate::new()),
        GateBackend::Redis(url) => {
            tracing::info!(gate = %redact_url(&url), prefix = %config.redis.key_prefix, "gate: redis");
            Arc::new(RedisGate::connect(&url, &config.redis)?)
        }
    };
    let seed = Layers::from_config(&config);
    let switches: Switches = Arc::new(ArcSwap::from_pointee(seed));
    let rate_limits = Arc::new(RateLimits::new(
        &config.layers.rate_limit,
        DefaultClock::default(),
    ));
    let (dedup_store, memory_dedup): (Arc<dyn DedupStore>, _) = match config.dedup_backend()? {
        None => {
            let memory = Arc::new(MemoryDedup::default());
            (memory.clone(), Some(memory))
        }
        Some(url) => {
            tracing::info!(dedup = %redact_url(&url), "dedup store: redis");
            let store = crate::middleware::RedisDedup::new(
                &url,
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
    let pipeline = Arc::new(Pipeline::new(
        store,
        gate,
        queue.clone(),
        switches.clone(),
        Limits::from_config(&config),
    ));

    let board = Arc::new(SwitchBoard::new(
        pipeline.store().clone(),
        pipeline.clone(),
        rate_limits.clone(),
        seed,
    ));

    let (health, health_service) = tonic_health::server::health_reporter();
    set_health(&health, ServingStatus::NotServing).await;

    let (stop_tx, stop_rx) = watch::channel(false);
    let readiness = tokio::spawn(become_ready(
        pipeline.clone(),
        board.clone(),
        health.clone(),
        config.store.migrate_on_start,
        stop_rx.clone(),
    ));
    let switch_poller = tokio::spawn(crate::ops::run_poller(
        board.clone(),
        Duration::from_millis(config.admin.switch_poll_ms),
        stop_rx.clone(),
    ));
    let reloader = extras.reloads.map(|reloads| {
        tokio::spawn(apply_reloads(
            reloads,
            board.clone(),
            admin_token.clone(),
            config.layers.rate_limit.methods.clone(),
        ))
    });
    let metrics_server = metrics_listener.map(|listener| {
        tracing::info!(addr = ?listener.local_addr().ok(), "metrics on /metrics");
        tokio::spawn(crate::metrics::serve(
            listener,
            metrics_handle,
            stop_rx.clone(),
        ))
    });
    let batch_size = config.layers.queue.batch_size;
    let linger = Duration::from_millis(config.layers.queue.linger_ms);
    let processor = match (embedded_receiver, &rabbit) {
        (Some(receiver), _) => Some(tokio::spawn(run_processor(
            pipeline.clone(),
            receiver,
            batch_size,
            linger,
        ))),
        (None, Some((queue, url))) if role.processes_orders() => {
            Some(tokio::spawn(run_rabbit_processor(
                pipeline.clone(),
                RabbitSource {
                    url: url.clone(),
                    names: queue.names().clone(),
                    prefetch: config.rabbitmq.prefetch,
                    reconnect_delay: Duration::from_millis(config.rabbitmq.reconnect_delay_ms),
                },
                batch_size,
                linger,
                stop_rx.clone(),
            )))
        }
        _ => None,
    };
    // API replicas learn from the processor which queued reservations
    // now have a row.
    let follower = match &rabbit {
        Some((queue, _)) if role.serves_api() => {
            let settled = pipeline.clone();
            Some(tokio::spawn(queue.clone().follow_settled(
                move |ids| settled.apply_settled(&ids),
                stop_rx.clone(),
            )))
        }
        _ => None,
    };
    let restocks = tokio::spawn(forward_restocks(pipeline.clone()));
    let limiter_sweeper = tokio::spawn(sweep_rate_limits(
        rate_limits.clone(),
        memory_dedup,
        Duration::from_millis(config.layers.rate_limit.sweep_interval_ms),
    ));
    let reconciler = tokio::spawn(run_reconciler(
        pipeline.clone(),
        Duration::from_millis(config.layers.gate.reconcile_interval_ms),
        rabbit.is_some() && role.serves_api(),
        stop_rx.clone(),
    ));
    let sweeper = tokio::spawn(run_sweeper(
        pipeline.clone(),
        Duration::from_millis(config.reservations.sweep_interval_ms),
        stop_rx.clone(),
    ));

    let max = config.server.max_message_bytes;
    let inventory = InventoryServiceServer::new(InventoryApi::new(pipeline.clone()))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
    let in_flight = (config.server.max_in_flight > 0)
        .then(|| Arc::new(InFlight::new(config.server.max_in_flight)));
    let admin = InterceptedService::new(
        AdminServiceServer::new(AdminApi::new(
            pipeline.clone(),
            rate_limits.clone(),
            in_flight.clone(),
            board.clone(),
            // Three sweeps and a second: a hold older than that past its
            // expiry was missed.
            Duration::from_millis(config.reservations.sweep_interval_ms * 3 + 1_000),
        ))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max),
        AdminAuth {
            token: admin_token,
            open_without_token: admin_addr.ip().is_loopback(),
        },
    );
    let sampler = tokio::spawn(sample_gauges(
        pipeline.clone(),
        in_flight.clone(),
        stop_rx.clone(),
    ));

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
                .layer(GrpcMetricsLayer)
                .add_service(health_service.clone())
                .add_service(reflection.v1.clone())
                .add_service(reflection.v1alpha.clone())
                .add_service(admin)
                .serve_with_incoming_shutdown(TcpListenerStream::new(admin_listener), async move {
                    let _ = stop.wait_for(|stop| *stop).await;
                });
            Some(tokio::spawn(serve))
        }
        _ => None,
    };
    let serve = builder(&config, tls)?
        // Outermost first (tonic's own timeout, honouring the caller's
        // grpc-timeout when shorter, and its stream limit sit outside).
        // Metrics first, so every answer is counted, refusals included.
        .layer(GrpcMetricsLayer)
        // Shedding next: a spike must not queue in front of anything.
        .layer(tower::util::option_layer(in_flight.map(LoadShedLayer::new)))
        // Rate limiting runs before anything decodes a body, so a flood
        // costs a header lookup and a counter per call.
        .layer(RateLimitLayer::new(
            rate_limits,
            switches.clone(),
            &config.layers.rate_limit.methods,
        ))
        // Then dedup: after the rate limit, so a refused duplicate holds no
        // claim on its key; before the services, so a duplicate never runs
        // the stock logic (it may be asked for an at-once answer, which
        // changes nothing).
        .layer(DedupLayer::new(dedup_store, switches, dedup_times))
        .add_service(health_service)
        .add_service(reflection.v1)
        .add_service(reflection.v1alpha)
        .add_optional_service(role.serves_api().then_some(inventory))
        .add_optional_service(caller_admin.filter(|_| role.serves_api()))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
            shutdown.await;
            tracing::info!("shutdown requested; draining");
            // Readiness goes first so load balancers stop sending.
            set_health(&health_on_stop, ServingStatus::NotServing).await;
            let _ = stop_tx.send(true);
        });
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

    switch_poller.abort();
    sampler.abort();
    if let Some(reloader) = reloader {
        reloader.abort();
    }
    if let Some(metrics_server) = metrics_server {
        metrics_server.abort();
    }
    readiness.abort();
    sweeper.abort();
    reconciler.abort();
    restocks.abort();
    limiter_sweeper.abort();
    if let Some(follower) = follower {
        follower.abort();
    }
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
    Ok(builder
        .timeout(config.request_timeout())
        .max_concurrent_streams(Some(config.server.max_concurrent_streams)))
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

/// Applies reloaded configs: the file's switches to the whole fleet (as an
/// audited change by `sighup`), its admin token to this replica.
async fn apply_reloads(
    mut reloads: mpsc::Receiver<Config>,
    board: Arc<SwitchBoard>,
    admin_token: AdminToken,
    rate_limited_methods: Vec<String>,
) {
    while let Some(config) = reloads.recv().await {
        if config.layers.rate_limit.methods != rate_limited_methods {
            tracing::warn!(
                running = ?rate_limited_methods,
                file = ?config.layers.rate_limit.methods,
                "reload: layers.rate_limit.methods changes only at restart; keeping the running list"
            );
        }
        match config.admin_token() {
            Ok(token) => admin_token.store(Arc::new(token.as_deref().map(token_digest))),
            Err(err) => {
                tracing::error!(error = %err, "reload: admin token unreadable; keeping the old one")
            }
        }
        let request = ChangeRequest {
            change: LayersChange::to(Layers::from_config(&config)),
            actor: &format!("sighup via {}", board.replica()),
            force: config.layers.allow_unsafe,
            reason: "config file reloaded",
        };
        match board.change(request).await {
            Ok((layers, revision)) => {
                tracing::info!(revision, ?layers, "reload: layer switches applied")
            }
            Err(err) => tracing::error!(error = %err, "reload: layer switches not applied"),
        }
    }
}

/// Gauges that are read rather than counted: calls in flight, reservations
/// this replica waits on, the fleet's queue depth, readiness; and
/// histogram upkeep.
async fn sample_gauges(
    pipeline: Arc<Pipeline>,
    in_flight: Option<Arc<InFlight>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick: u64 = 0;
    loop {
        // The backlog asks the broker and the database: not every second.
        if tick % 5 == 0 {
            if let Some(depth) = pipeline.queue_depth().await {
                metrics::gauge!("stockgate_queue_depth").set(depth as f64);
            }
        }
        tick += 1;
        if let Some(limit) = &in_flight {
            metrics::gauge!("stockgate_in_flight_calls").set(limit.stats().in_flight as f64);
        }
        metrics::gauge!("stockgate_queue_pending").set(pipeline.pending_count() as f64);
        metrics::gauge!("stockgate_ready").set(if pipeline.is_ready() { 1.0 } else { 0.0 });
        crate::metrics::upkeep();
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for name in HEALTH_NAMES {
        health.set_service_status(name, status).await;
    }
}

/// Retries until the store is reachable and migrated (migrating it when
/// allowed), loads the gate, then reports SERVING.
async fn become_ready(
    pipeline: Arc<Pipeline>,
    board: Arc<SwitchBoard>,
    health: HealthReporter,
    migrate: bool,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_reason = String::new();
    loop {
        // The full cause for the log; a short one for callers.
        let (reason, told) = match check_store(&pipeline, migrate).await {
            // The fleet's switches first: they decide whether there is a
            // gate to warm up.
            Ok(()) => match async {
                board.sync().await?;
                pipeline.warm_up().await
            }
            .await
            {
                Ok(()) => {
                    set_health(&health, ServingStatus::Serving).await;
                    tracing::info!("ready: store migrated and reachable, gate loaded");
                    return;
                }
                Err(err) => (
                    format!("switches or gate warm-up failed: {err:#}"),
                    match &err {
                        ReservationError::Unavailable { what, .. } => {
                            format!("{what} unavailable; start-up retries until it answers")
                        }
                        _ => "start-up could not load the switches or the stock gate".into(),
                    },
                ),
            },
            Err(reason) => (
                reason,
                "the store is not migrated or not reachable yet".to_owned(),
            ),
        };
        pipeline.set_not_ready_reason(told);
        if reason != last_reason {
            tracing::warn!(%reason, "not ready");
            last_reason = reason;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            _ = stop.changed() => return,
        }
    }
}

async fn check_store(pipeline: &Pipeline, migrate: bool) -> Result<(), String> {
    let store = pipeline.store();
    if migrate {
        let applied = store.migrate().await.map_err(|e| e.to_string())?;
        if applied > 0 {
            tracing::info!(applied, "migrations applied");
        }
    } else {
        let pending = store
            .pending_migrations()
            .await
            .map_err(|e| e.to_string())?;
        if pending > 0 {
            return Err(format!(
                "{pending} migrations pending; run `stockgate migrate`"
            ));
        }
    }
    store.ping().await.map_err(|e| e.to_string())
}

/// The single order processor: batches of up to `batch_size`, waiting at
/// most `linger` to fill one, until the queue is closed and empty.
async fn run_processor(
    pipeline: Arc<Pipeline>,
    mut receiver: EmbeddedReceiver,
    batch_size: usize,
    linger: Duration,
) {
    let mut batch = Vec::with_capacity(batch_size);
    loop {
        if receiver.recv_many(&mut batch, batch_size).await == 0 {
            return;
        }
        if batch.len() < batch_size && !linger.is_zero() {
            tokio::time::sleep(linger).await;
            while batch.len() < batch_size {
                match receiver.try_recv() {
                    Ok(order) => batch.push(order),
                    Err(_) => break,
                }
            }
        }
        let outcome = pipeline.process_batch(&batch).await;
        if outcome.incomplete {
            // In memory there is nothing to redeliver from; the orders stay
            // visible as QUEUED and the log says which.
            tracing::error!("an order could be neither committed nor recorded as failed");
        }
        batch.clear();
    }
}

/// Where the RabbitMQ processor consumes from.
struct RabbitSource {
    url: String,
    names: QueueNames,
    prefetch: u16,
    reconnect_delay: Duration,
}

/// The order processor on RabbitMQ: consumes (as the single active
/// consumer, or on standby), commits each batch, copies orders it gave up on
/// to the dead-letter queue, and only then acks, so a crash at any point
/// redelivers and the database's idempotency absorbs the repeat.
/// Reconnects after a broker loss; on `stop` it finishes the batch in hand.
async fn run_rabbit_processor(
    pipeline: Arc<Pipeline>,
    source: RabbitSource,
    batch_size: usize,
    linger: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let mut consumer =
            match RabbitConsumer::connect(&source.url, &source.names, source.prefetch).await {
                Ok(consumer) => consumer,
                Err(err) => {
                    tracing::warn!(error = %err, "order processor cannot reach the queue");
                    tokio::select! {
                        _ = tokio::time::sleep(source.reconnect_delay) => continue,
                        _ = stop.changed() => return,
                    }
                }
            };
        tracing::info!(queue = %source.names.orders, "order processor consuming (or on standby)");
        loop {
            let batch = tokio::select! {
                batch = consumer.next_batch(batch_size, linger) => batch,
                _ = stop.changed() => {
                    consumer.close().await;
                    return;
                }
            };
            let Some(deliveries) = batch else {
                tracing::warn!("order queue connection lost; reconnecting");
                break;
            };
            let Some(last_tag) = deliveries.iter().map(|d| d.delivery_tag).max() else {
                continue;
            };
            let mut orders = Vec::with_capacity(deliveries.len());
            let mut unsettled = false;
            for delivery in &deliveries {
                match decode(&delivery.data) {
                    Ok(order) => orders.push(order),
                    Err(reason) => {
                        tracing::error!(%reason, "undecodable order message; dead-lettering it");
                        let recorded = match salvage(&delivery.data) {
                            Some(order) => pipeline.reject_unprocessable(&order, &reason).await,
                            None => true,
                        };
                        unsettled |= !recorded
                            || consumer.dead_letter(&delivery.data, &reason).await.is_err();
                    }
                }
            }
            let outcome = pipeline.process_batch(&orders).await;
            unsettled |= outcome.incomplete;
            for (order, reason) in outcome.given_up {
                unsettled |= consumer
                    .dead_letter(&encode(&order), &reason)
                    .await
                    .is_err();
            }
            if unsettled {
                // Not acked: redelivered to whoever consumes next, and the
                // database's idempotency absorbs what was already done.
                tracing::warn!("batch not fully settled; leaving it unacked");
                tokio::time::sleep(source.reconnect_delay).await;
                break;
            }
            if let Err(err) = consumer.ack_through(last_tag).await {
                // Redelivered and found already committed.
                tracing::warn!(error = %err, "batch committed but not acked; it will be redelivered");
                break;
            }
        }
        consumer.close().await;
    }
}

async fn run_sweeper(pipeline: Arc<Pipeline>, every: Duration, mut stop: watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        if !pipeline.is_ready() {
            continue;
        }
        match pipeline.expire_due().await {
            Ok(0) => {}
            Ok(expired) => tracing::info!(expired, "expired lapsed holds"),
            Err(err) => tracing::warn!(error = %err, "expiry sweep failed"),
        }
    }
}

/// Forgets users idle long enough to have a full burst again, and expired
/// in-process dedup answers, so memory stays bounded however many distinct
/// users and keys call.
async fn sweep_rate_limits(
    limits: Arc<RateLimits>,
    dedup: Option<Arc<MemoryDedup>>,
    every: Duration,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        limits.sweep();
        if let Some(dedup) = &dedup {
            dedup.sweep();
        }
    }
}

/// Drops the sold-out fast path's answer when any replica restocks a SKU.
async fn forward_restocks(pipeline: Arc<Pipeline>) {
    let mut restocks = pipeline.restocks();
    loop {
        match restocks.recv().await {
            Ok(sku) => pipeline.restocked(&sku),
            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                pipeline.restocked(crate::gate::RESTOCK_ALL)
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Compares the gate with the database every `every`, and at once when a
/// caller found the gate not loaded.
async fn run_reconciler(
    pipeline: Arc<Pipeline>,
    every: Duration,
    resync_queued: bool,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = pipeline.reload_wanted() => {}
            _ = stop.changed() => return,
        }
        if !pipeline.is_ready() {
            continue;
        }
        if resync_queued {
            // Notices from the processor can be missed across a broker
            // reconnect; the database has the answer.
            let dropped = pipeline.resync_pending(every, 256).await;
            if dropped > 0 {
                tracing::info!(dropped, "queued reservations found settled in the database");
            }
        }
        if let Err(err) = pipeline.reconcile().await {
            tracing::warn!(error = %err, "reconcile failed");
            // Don't spin on a down backend.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
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
