//! The `stockgate` command: parse flags, load config, start logging, hand
//! over to the library.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use stockgate::config::Config;

// The service allocates a little for every call on every worker thread;
// glibc malloc's arena locks showed up as futex wake-ups under a storm.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "stockgate", version = stockgate::VERSION, about = "Flash-sale inventory reservation service")]
struct Cli {
    /// TOML config file; defaults, then this file, then STOCKGATE_* env vars.
    #[arg(long, short, global = true, env = "STOCKGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC (the default).
    Serve {
        /// Listen address; overrides `server.listen`.
        #[arg(long)]
        listen: Option<SocketAddr>,
    },
    /// Apply pending database migrations and exit.
    Migrate {
        /// Revert the latest migration instead.
        #[arg(long)]
        revert: bool,
    },
    /// Validate the configuration, print it as TOML, and exit.
    CheckConfig,
    /// Operator commands against a running server's AdminService.
    Admin(stockgate_tools::admin_cli::AdminArgs),
    /// Reproduce a flash sale against a running server and check the
    /// invariants; exits non-zero when one is broken.
    Storm(StormArgs),
    /// Measure Reserve against same-run references (raw redis-benchmark on
    /// the gate script, a no-op RPC) on an in-process server.
    Bench {
        /// Calls per measurement.
        #[arg(long, default_value_t = 20_000)]
        requests: usize,
        /// Calls in flight at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// HTTP/2 connections.
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Interleaved rounds; the median round is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// The Redis gate and redis-benchmark's target.
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis: String,
        /// Store: `embedded` or a postgres:// URL.
        #[arg(long, default_value = "embedded")]
        store: String,
        /// Queue: `embedded` or an amqp:// URL (needs a postgres store).
        #[arg(long, default_value = "embedded")]
        queue: String,
        /// Measure the tower middleware instead: each layer's cost on the
        /// calls it lets through.
        #[arg(long)]
        middleware: bool,
        /// Measure the flash sale instead: `--requests` buyers for one unit
        /// with every layer on, next to a no-op RPC, invariants checked.
        #[arg(long, conflicts_with = "middleware")]
        storm: bool,
        /// With `--storm`: sell this many SKUs of `--sku-stock` units with
        /// Zipf popularity (`--zipf`), next to one SKU of all those units
        /// in the same round, and compare the rates the database committed
        /// orders at.
        #[arg(long, requires = "storm", default_value_t = 1)]
        skus: usize,
        #[arg(long, requires = "storm", default_value_t = 100)]
        sku_stock: i64,
        #[arg(long, requires = "storm", default_value_t = 1.0)]
        zipf: f64,
        /// Order queues through RabbitMQ (`rabbitmq.partitions`): above 1,
        /// orders are routed by SKU to that many queues, each consumed by
        /// its own loop in the in-process processor.
        #[arg(long, default_value_t = 1)]
        partitions: u16,
        /// Measure TLS to the backends instead: Reserve through a server
        /// with these TLS URLs (to the same servers as `--store`, `--redis`
        /// and `--queue`) next to one with those plaintext URLs.
        #[arg(long, requires_all = ["tls_redis", "tls_queue", "tls_ca"], conflicts_with_all = ["middleware", "storm"])]
        tls_store: Option<String>,
        #[arg(long, requires = "tls_store")]
        tls_redis: Option<String>,
        #[arg(long, requires = "tls_store")]
        tls_queue: Option<String>,
        /// The CA, client certificate and key for all three TLS backends.
        #[arg(long, requires = "tls_store")]
        tls_ca: Option<String>,
        #[arg(long, requires = "tls_store", default_value = "")]
        tls_cert: String,
        #[arg(long, requires = "tls_store", default_value = "")]
        tls_key: String,
        /// Also measure the sold-out path with every call traced (spans
        /// made, sampled and batched, then dropped: no collector needed).
        #[arg(long, conflicts_with_all = ["middleware", "storm", "tls_store"])]
        tracing: bool,
        /// Measure a Redis Cluster instead (`redis+cluster://host:port,…`):
        /// Reserve through a server with the gate and dedup on it next to
        /// one on `--redis`.
        #[arg(long, conflicts_with_all = ["middleware", "storm", "tls_store", "tracing"])]
        cluster: Option<String>,
        /// Measure a sale's per-user cap instead: Reserve through a server
        /// whose SKUs are in a capped sale next to one whose are not.
        #[arg(long, conflicts_with_all = ["middleware", "storm", "tls_store", "tracing", "cluster"])]
        sale: bool,
        /// Measure carts instead: ReserveCart of one unit of four SKUs next
        /// to Reserve of one unit, in units per second.
        #[arg(long, conflicts_with_all = ["middleware", "storm", "tls_store", "tracing", "cluster", "sale"])]
        cart: bool,
    },
    /// Measure committed orders per second through RabbitMQ, the order
    /// processor and PostgreSQL (group commit and batches of one) next to
    /// pgbench running the same update and insert one at a time.
    BenchQueue {
        /// Orders per measurement.
        #[arg(long, default_value_t = 10_000)]
        orders: usize,
        /// The group-commit batch size.
        #[arg(long, default_value_t = 64)]
        batch_size: usize,
        /// Interleaved rounds; the median round is reported.
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// A PostgreSQL database of the benchmark's own; it is migrated.
        #[arg(
            long,
            default_value = "postgres://postgres@127.0.0.1:5432/stockgate_bench"
        )]
        store: String,
        /// The broker; the benchmark makes and deletes its own queues.
        #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
        amqp: String,
        /// Queues of the partitioned row (`rabbitmq.partitions`).
        #[arg(long, default_value_t = 4)]
        partitions: u16,
        /// Processors sharing the partitioned row's queues.
        #[arg(long, default_value_t = 2)]
        processors: usize,
    },
}

#[derive(clap::Args)]
struct StormArgs {
    /// The caller endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    addr: String,
    /// The admin endpoint, when on its own port.
    #[arg(long)]
    admin_addr: Option<String>,
    /// The admin token.
    #[arg(long, env = "STOCKGATE_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The SKU to sell (set to `--stock` first), or with `--skus` the stem
    /// of their names (SKU-0000, …); default: a fresh name.
    #[arg(long)]
    sku: Option<String>,
    /// Units of each SKU.
    #[arg(long, default_value_t = 1)]
    stock: i64,
    /// SKUs on sale, each with `--stock` units; invariants checked per SKU.
    #[arg(long, default_value_t = 1)]
    skus: usize,
    /// Zipf exponent of SKU popularity: rank k draws calls in proportion to
    /// 1/k^zipf (0: evenly; about 1 in real sales).
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Seed of which SKU each call asks for (default: a fresh one, shown
    /// in the report).
    #[arg(long)]
    seed: Option<u64>,
    /// Reserve calls.
    #[arg(long, short = 'n', default_value_t = 50_000)]
    requests: usize,
    /// Distinct users (default: one per call).
    #[arg(long)]
    users: Option<usize>,
    /// Calls in flight at once.
    #[arg(long, default_value_t = 1_000)]
    concurrency: usize,
    /// HTTP/2 connections (each carries at most 100 calls at once).
    #[arg(long, default_value_t = 16)]
    connections: usize,
    #[arg(long, default_value_t = 1)]
    quantity: u32,
    /// Share of calls sent twice at once with the same idempotency key.
    #[arg(long, default_value_t = 0.0)]
    double_click: f64,
    /// Retries of UNAVAILABLE / ABORTED / RESOURCE_EXHAUSTED with the same key.
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// Per-call deadline in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// Also check the invariants in this PostgreSQL database directly
    /// (every order of the SKU must be this run's: leave `--sku` unset).
    #[arg(long)]
    store: Option<String>,
    /// The service's metrics endpoint, for database decisions per run.
    #[arg(long)]
    metrics: Option<String>,
    /// Open the sale this many milliseconds after the storm starts (a sale
    /// window on every SKU): early callers hear NOT_OPEN and call again at
    /// the opening; the report checks nothing was admitted before it.
    #[arg(long, default_value_t = 0)]
    opens_in_ms: u64,
    /// With `--opens-in-ms`: open with a draw of this many milliseconds
    /// (the fair opening): the calls in it are decided at its close in a
    /// random order; the report reads the hottest SKUs' draws back and
    /// re-runs them.
    #[arg(long, default_value_t = 0, requires = "opens_in_ms")]
    draw_ms: u32,
    /// Run once per layer configuration and compare (switches restored after).
    #[arg(long)]
    matrix: bool,
    /// Write the report(s) as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write an HTML report with SVG charts into this directory.
    #[arg(long)]
    report: Option<PathBuf>,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
}

async fn storm(args: StormArgs) -> anyhow::Result<bool> {
    use stockgate_tools::storm;
    let options = storm::StormOptions {
        admin_addr: args.admin_addr.unwrap_or_else(|| args.addr.clone()),
        addr: args.addr,
        token: args.token,
        sku: args.sku.unwrap_or_else(|| {
            format!("STORM-{}", &uuid::Uuid::now_v7().simple().to_string()[..12])
        }),
        stock: args.stock,
        skus: args.skus,
        zipf: args.zipf,
        seed: args.seed,
        requests: args.requests,
        users: args.users.unwrap_or(args.requests),
        concurrency: args.concurrency,
        connections: args.connections,
        quantity: args.quantity,
        double_click: args.double_click,
        retries: args.retries,
        timeout_ms: args.timeout_ms,
        progress: !args.quiet,
        store: args.store,
        metrics_url: args.metrics,
        opens_in_ms: args.opens_in_ms,
        draw_ms: args.draw_ms,
    };
    let reports = if args.matrix {
        let reports = storm::run_matrix(&options).await?;
        print!("{}", storm::render_matrix(&reports));
        reports
    } else {
        let report = storm::run(&options, "storm").await?;
        print!("{}", storm::render(&report));
        vec![report]
    };
    if let Some(path) = args.json {
        std::fs::write(&path, serde_json::to_string_pretty(&reports)?)
            .with_context(|| format!("--json {}", path.display()))?;
    }
    if let Some(dir) = args.report {
        std::fs::create_dir_all(&dir)?;
        let page = dir.join("index.html");
        std::fs::write(&page, storm::report::html(&reports))?;
        eprintln!("report: {}", page.display());
    }
    // The naive baseline is there to break; any other broken run fails.
    Ok(reports
        .iter()
        .filter(|r| !r.strategy.starts_with("NAIVE"))
        .all(|r| r.ok()))
}

fn main() -> anyhow::Result<()> {
    // Images often set RUST_BACKTRACE=1 for panics. Errors the service
    // expects (a backend down, under load) would then each capture a stack
    // trace; only panics keep theirs. Set before any thread starts.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Storm(args)) = cli.command {
        if !storm(args).await? {
            eprintln!("an invariant was broken");
            std::process::exit(2);
        }
        return Ok(());
    }
    if let Some(Command::Admin(args)) = cli.command {
        // A client: the server's config is not needed here.
        match stockgate_tools::admin_cli::run(args).await {
            Ok(out) => {
                print!("{out}");
                return Ok(());
            }
            Err(err) => {
                eprintln!("error: {err:#}");
                std::process::exit(1);
            }
        }
    }
    let mut config = Config::load(cli.config.as_deref())?;
    if matches!(
        cli.command,
        Some(Command::Bench { .. } | Command::BenchQueue { .. })
    ) {
        // The bench prints a table; keep the in-process server's logs out.
        config.log.filter = "error".into();
    }
    let tracing = match cli.command {
        Some(Command::Bench { tracing: true, .. }) => {
            Some(stockgate::telemetry::init_discarding(&config.log))
        }
        _ => stockgate::telemetry::init(&config.log, &config.telemetry)?,
    };
    let result = match cli.command.unwrap_or(Command::Serve { listen: None }) {
        Command::Serve { listen } => {
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            let listener = tokio::net::TcpListener::bind(config.server.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen on {} (server.listen): set --listen or {} to a free address",
                        config.server.listen,
                        stockgate::config::env_name("server.listen")
                    )
                })?;
            let extras = stockgate::server::Extras {
                reloads: Some(reload_on_sighup(cli.config.clone())),
                ..Default::default()
            };
            stockgate::server::run_with(config, listener, extras, shutdown_signal()).await
        }
        Command::Migrate { revert } => stockgate::server::migrate(&config, revert).await,
        Command::Bench {
            requests,
            concurrency,
            connections,
            rounds,
            redis,
            store,
            queue,
            middleware,
            storm,
            skus,
            sku_stock,
            zipf,
            partitions,
            tls_store,
            tls_redis,
            tls_queue,
            tls_ca,
            tls_cert,
            tls_key,
            tracing,
            cluster,
            sale,
            cart,
        } => {
            let options = stockgate_tools::bench::BenchOptions {
                requests,
                concurrency,
                connections,
                rounds,
                redis_url: redis,
                store,
                queue,
                tracing,
                partitions,
            };
            if partitions > 1 && !options.queue.starts_with("amqp") {
                anyhow::bail!("--partitions needs an amqp:// --queue");
            }
            if let (Some(store), Some(redis_url), Some(queue), Some(ca_file)) =
                (tls_store, tls_redis, tls_queue, tls_ca)
            {
                let tls = stockgate_tools::bench::tls::TlsBackends {
                    store,
                    redis_url,
                    queue,
                    ca_file,
                    cert_file: tls_cert,
                    key_file: tls_key,
                };
                let results =
                    stockgate_tools::bench::tls::run(options.clone(), tls.clone()).await?;
                print!(
                    "{}",
                    stockgate_tools::bench::tls::render(&results, &options, &tls)
                );
                return Ok(());
            }
            if let Some(cluster) = cluster {
                let results =
                    stockgate_tools::bench::cluster::run(options.clone(), &cluster).await?;
                print!(
                    "{}",
                    stockgate_tools::bench::cluster::render(&results, &options, &cluster)
                );
                return Ok(());
            }
            if cart {
                let results = stockgate_tools::bench::cart::run(options.clone()).await?;
                print!(
                    "{}",
                    stockgate_tools::bench::cart::render(&results, &options)
                );
                return Ok(());
            }
            if sale {
                let results = stockgate_tools::bench::sale::run(options.clone()).await?;
                print!(
                    "{}",
                    stockgate_tools::bench::sale::render(&results, &options)
                );
                return Ok(());
            }
            if storm && skus > 1 {
                use stockgate_tools::bench::storm::{self as bench_storm, ManySkus};
                let sale = ManySkus {
                    skus,
                    stock: sku_stock,
                    zipf,
                };
                let rounds = bench_storm::run_many_skus(options.clone(), sale).await?;
                print!("{}", bench_storm::render_many_skus(&rounds, &options, sale));
                if rounds
                    .iter()
                    .any(|r| !r.one.storm.ok() || !r.many.storm.ok())
                {
                    eprintln!("an invariant was broken");
                    std::process::exit(2);
                }
                return Ok(());
            }
            if storm {
                let rounds = stockgate_tools::bench::storm::run(options.clone()).await?;
                print!(
                    "{}",
                    stockgate_tools::bench::storm::render(&rounds, &options)
                );
                if rounds.iter().any(|r| !r.storm.ok()) {
                    eprintln!("an invariant was broken");
                    std::process::exit(2);
                }
                return Ok(());
            }
            if middleware {
                let results = stockgate_tools::bench::middleware::run(options.clone()).await?;
                print!(
                    "{}",
                    stockgate_tools::bench::middleware::render(&results, &options)
                );
                return Ok(());
            }
            let results = stockgate_tools::bench::run(options.clone()).await?;
            print!("{}", stockgate_tools::bench::render(&results, &options));
            Ok(())
        }
        Command::BenchQueue {
            orders,
            batch_size,
            rounds,
            store,
            amqp,
            partitions,
            processors,
        } => {
            let options = stockgate_tools::bench::queue::QueueBenchOptions {
                orders,
                batch_size,
                rounds,
                store,
                amqp,
                partitions,
                processors,
            };
            let (results, statements) = stockgate_tools::bench::queue::run(options.clone()).await?;
            print!(
                "{}",
                stockgate_tools::bench::queue::render(&results, &statements, &options)
            );
            Ok(())
        }
        Command::Admin(_) | Command::Storm(_) => unreachable!("handled above"),
        Command::CheckConfig => toml_of(&config).map(|toml| print!("{toml}")),
    };
    if let Some(tracing) = tracing {
        tracing.shutdown();
    }
    result
}

fn toml_of(config: &Config) -> anyhow::Result<String> {
    let mut config = config.clone();
    let backends = &mut config.backends;
    for url in [
        &mut backends.store,
        &mut backends.gate,
        &mut backends.queue,
        &mut backends.dedup,
    ] {
        *url = stockgate::config::redact_url(url);
    }
    if !config.admin.token.is_empty() {
        config.admin.token = "***".into();
    }
    Ok(toml::to_string_pretty(&config)?)
}

/// SIGHUP reloads the config (defaults, file, env, as at start-up) and hands
/// it to the server; a file that does not load or validate is logged and
/// ignored.
fn reload_on_sighup(file: Option<PathBuf>) -> tokio::sync::mpsc::Receiver<Config> {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    #[cfg(unix)]
    tokio::spawn(async move {
        let Ok(mut hangups) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot listen for SIGHUP; config reload disabled");
            return;
        };
        while hangups.recv().await.is_some() {
            match Config::load(file.as_deref()) {
                Ok(config) => {
                    tracing::info!("SIGHUP: config reloaded");
                    if tx.send(config).await.is_err() {
                        return;
                    }
                }
                Err(err) => tracing::error!(error = %err, "SIGHUP: config not reloaded"),
            }
        }
    });
    #[cfg(not(unix))]
    drop((tx, file));
    rx
}

/// SIGINT (Ctrl-C) or SIGTERM (Kubernetes) starts a graceful stop.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Clap checks its own consistency (duplicate flags…) only when asked.
    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
