//! The `stockgate` command: parse flags, load config, start logging, hand
//! over to the library.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use stockgate::config::Config;

#[derive(Parser)]
#[command(version = stockgate::VERSION, about = "Flash-sale inventory reservation service")]
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
    Admin(stockgate::admin_cli::AdminArgs),
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
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Some(Command::Admin(args)) = cli.command {
        // A client: the server's config is not needed here.
        match stockgate::admin_cli::run(args).await {
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
        config.log.filter = "warn".into();
    }
    stockgate::telemetry::init(&config.log);
    match cli.command.unwrap_or(Command::Serve { listen: None }) {
        Command::Serve { listen } => {
            if let Some(listen) = listen {
                config.server.listen = listen;
            }
            let listener = tokio::net::TcpListener::bind(config.server.listen)
                .await
                .with_context(|| format!("cannot listen on {}", config.server.listen))?;
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
        } => {
            let options = stockgate::bench::BenchOptions {
                requests,
                concurrency,
                connections,
                rounds,
                redis_url: redis,
                store,
                queue,
            };
            if middleware {
                let results = stockgate::bench::middleware::run(options.clone()).await?;
                print!(
                    "{}",
                    stockgate::bench::middleware::render(&results, &options)
                );
                return Ok(());
            }
            let results = stockgate::bench::run(options.clone()).await?;
            print!("{}", stockgate::bench::render(&results, &options));
            Ok(())
        }
        Command::BenchQueue {
            orders,
            batch_size,
            rounds,
            store,
            amqp,
        } => {
            let options = stockgate::bench::queue::QueueBenchOptions {
                orders,
                batch_size,
                rounds,
                store,
                amqp,
            };
            let results = stockgate::bench::queue::run(options.clone()).await?;
            print!("{}", stockgate::bench::queue::render(&results, &options));
            Ok(())
        }
        Command::Admin(_) => unreachable!("handled above"),
        Command::CheckConfig => {
            print!("{}", toml_of(&config)?);
            Ok(())
        }
    }
}

fn toml_of(config: &Config) -> anyhow::Result<String> {
    let mut config = config.clone();
    config.backends.store = stockgate::config::redact_url(&config.backends.store);
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
