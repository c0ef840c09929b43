//! `stockgate bench-queue`: committed orders per second through RabbitMQ,
//! the order processor and PostgreSQL, with group commit (orders of one SKU,
//! and spread over as many SKUs as a batch holds) and with batches of one,
//! next to `pgbench` running the same single-row update and insert one
//! transaction at a time against the same database, in the same run; and
//! the statements one batch costs the database on one SKU and on many.
//!
//! Each measurement fills a fresh queue with `orders` messages first (not
//! timed), then starts a real processor (`server::run` with role
//! `processor`, gate off) and times from its first committed order to its
//! last, read from the SKU's stock in the database. Two rows fill
//! `rabbitmq.partitions` queues instead, consumed by one processor and by
//! several in this process, which share the partitions out through their
//! leases as a fleet's processors do, next to one processor on one queue
//! over the same SKUs.

use std::{process::Command, sync::Arc, time::Duration};

use anyhow::{bail, Context};
use futures::{stream, StreamExt};
use tokio::{sync::oneshot, time::Instant};

use stockgate::{
    config::{Config, Role},
    domain::{now, ReservationId, Sku, UserId},
    queue::{OrderQueue, RabbitQueue},
    store::{NewOrder, Store},
};

#[derive(Debug, Clone)]
pub struct QueueBenchOptions {
    /// Orders per measurement.
    pub orders: usize,
    /// The group-commit batch size compared with batches of one.
    pub batch_size: usize,
    /// Interleaved rounds; the median round is reported.
    pub rounds: usize,
    /// A PostgreSQL database of the benchmark's own (migrated here).
    pub store: String,
    pub amqp: String,
    /// The partitioned row: queues (`rabbitmq.partitions`, at least 2) and
    /// the processors sharing them.
    pub partitions: u16,
    pub processors: usize,
}

#[derive(Debug, Clone)]
pub struct QueueMeasured {
    pub name: String,
    pub per_sec: f64,
    /// CPU per order over the timed window (the processor's; pgbench's
    /// row has none).
    pub cpu: Option<super::cpu::CpuPerCall>,
}

/// Statements one group-commit batch of `orders` cost the database.
#[derive(Debug, Clone)]
pub struct BatchStatements {
    pub orders: usize,
    pub on_one_sku: u64,
    pub on_many_skus: u64,
}

pub async fn run(
    options: QueueBenchOptions,
) -> anyhow::Result<(Vec<QueueMeasured>, BatchStatements)> {
    if options.batch_size == 0 || options.orders < 2 * options.batch_size {
        bail!("--batch-size must be at least 1 and --orders at least twice --batch-size (two orders per SKU)");
    }
    if !(2..=64).contains(&options.partitions) || options.processors == 0 {
        bail!("--partitions must be 2 to 64 and --processors at least 1");
    }
    let mut config = Config::default();
    // In-process servers side by side: no fixed metrics port.
    config.metrics.listen = String::new();
    config.backends.store = options.store.clone();
    config.backends.queue = options.amqp.clone();
    config.server.role = Role::Processor;
    config.layers.gate.enabled = false;
    config.layers.queue.linger_ms = 2;
    config.rabbitmq.prefetch = u16::try_from(options.batch_size * 4)
        .unwrap_or(u16::MAX)
        .max(512);
    config.validate()?;
    let store = Store::connect(config.store_backend()?, &config.store)?;
    store.migrate().await?;
    let statements = batch_statements(&store, options.batch_size).await?;

    let mut rounds = Vec::new();
    for round in 0..options.rounds.max(1) {
        let mut measured = vec![pgbench(&options.store, options.orders, &store).await?];
        let spread = options.batch_size;
        // One order per message isolates group commit; the last row fills
        // messages as the API publishes them under load.
        let split = (options.partitions, options.processors);
        for (batch, skus, per_message, (partitions, processors)) in [
            (options.batch_size, 1, 1, (1, 1)),
            (options.batch_size, spread, 1, (1, 1)),
            (options.batch_size, spread, 1, (options.partitions, 1)),
            (options.batch_size, spread, 1, split),
            (1, 1, 1, (1, 1)),
            (options.batch_size, 1, options.batch_size, (1, 1)),
        ] {
            let run = Run {
                batch,
                skus,
                per_message,
                partitions,
                processors,
                round,
            };
            let (per_sec, cpu) = processor_run(&config, &store, &options, run).await?;
            let over = if skus > 1 {
                format!(", {skus} SKUs")
            } else {
                String::new()
            };
            let packed = if per_message > 1 {
                format!(", {per_message} orders/message")
            } else {
                String::new()
            };
            let split = if partitions > 1 {
                let s = if processors == 1 { "" } else { "s" };
                format!(", {partitions} partitions, {processors} processor{s}")
            } else {
                String::new()
            };
            measured.push(QueueMeasured {
                name: format!("queue + processor, batch size {batch}{over}{packed}{split}"),
                per_sec,
                cpu: Some(cpu),
            });
        }
        rounds.push(measured);
    }
    let medians = (0..rounds[0].len())
        .map(|i| {
            let mut column: Vec<_> = rounds.iter().map(|r| r[i].clone()).collect();
            column.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
            column[column.len() / 2].clone()
        })
        .collect();
    Ok((medians, statements))
}

/// One batch of `orders` committed straight through the store, on one SKU
/// and spread over `orders` SKUs, counting the statements each costs.
async fn batch_statements(store: &Store, orders: usize) -> anyhow::Result<BatchStatements> {
    let tag = &uuid::Uuid::now_v7().simple().to_string()[20..];
    let mut costs = Vec::new();
    for skus in [1, orders] {
        let names: Vec<Sku> = (0..skus)
            .map(|k| Sku::parse(&format!("QS-{tag}-{skus}-{k}")))
            .collect::<Result<_, _>>()?;
        for sku in &names {
            store
                .set_stock(sku, i64::try_from(orders)?, 0, now(), None)
                .await?;
        }
        let batch: Vec<NewOrder> = (0..orders)
            .map(|i| bench_order(&names[i % skus], i))
            .collect();
        let params = stockgate::store::CommitParams {
            mode: stockgate::config::DbCheckMode::Optimistic,
            max_attempts: 8,
            hold_ttl: None,
            record_rejections: true,
            now: now(),
        };
        let before = store.statements();
        store.commit_batch(&batch, params).await?;
        costs.push(store.statements() - before);
    }
    Ok(BatchStatements {
        orders,
        on_one_sku: costs[0],
        on_many_skus: costs[1],
    })
}

fn bench_order(sku: &Sku, i: usize) -> NewOrder {
    NewOrder {
        id: ReservationId::generate(),
        sku: sku.clone(),
        user: UserId::parse(&format!("qb-{i}")).expect("valid user"),
        quantity: 1,
        idempotency_key: None,
        created_at: now(),
    }
}

/// One measurement's shape.
struct Run {
    /// The processor's batch size.
    batch: usize,
    /// SKUs the orders are spread over.
    skus: usize,
    /// Most orders per message (`rabbitmq.publish_batch_max`).
    per_message: usize,
    /// Queues (`rabbitmq.partitions`) and the processors consuming them.
    partitions: u16,
    processors: usize,
    round: usize,
}

/// Fills a queue with `orders` spread round-robin over `skus` SKUs, then
/// times a processor committing them, from its first commit to its last.
async fn processor_run(
    base: &Config,
    store: &Store,
    options: &QueueBenchOptions,
    run: Run,
) -> anyhow::Result<(f64, super::cpu::CpuPerCall)> {
    let Run {
        batch,
        skus,
        per_message,
        partitions,
        processors,
        round,
    } = run;
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let names: Vec<Sku> = (0..skus)
        .map(|k| {
            Sku::parse(&format!(
                "QB-{batch}-{skus}-{per_message}-{partitions}-{round}-{}-{k}",
                &tag[20..]
            ))
        })
        .collect::<Result<_, _>>()?;
    let orders = options.orders - options.orders % skus;
    let per_sku = i64::try_from(orders / skus)?;
    for sku in &names {
        store.set_stock(sku, per_sku, 0, now(), None).await?;
    }
    let mut config = base.clone();
    config.rabbitmq.queue = format!("sg-bench-{tag}");
    config.layers.queue.batch_size = batch;
    config.rabbitmq.publish_batch_max = per_message;
    config.rabbitmq.partitions = partitions;
    // Processors starting together share the partitions out within a
    // look or two (one that looked first holds them all until then); the
    // clock starts at the first commit, so that share-out is timed, as a
    // handicap of the partitioned rows.
    config.rabbitmq.lease_poll_ms = 100;

    // Fill the queue through the real publisher (confirms and all).
    let producer = Arc::new(RabbitQueue::new(
        &options.amqp,
        &config.rabbitmq,
        store.clone(),
    ));
    let results: Vec<_> = stream::iter(0..orders)
        .map(|i| {
            let producer = producer.clone();
            let order = bench_order(&names[i % skus], i);
            async move { producer.publish(order, false, None).await }
        })
        .buffer_unordered(128)
        .collect()
        .await;
    if let Some(Err(err)) = results.into_iter().find(|r| r.is_err()) {
        bail!("filling the queue: {err}");
    }

    let (mut stops, mut servers) = (Vec::new(), Vec::new());
    for _ in 0..processors {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (stop, stopped) = oneshot::channel::<()>();
        stops.push(stop);
        servers.push(stockgate::server::spawn(
            config.clone(),
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
    }
    // Polling one SKU at a time keeps the clock's reads off the database's
    // back: the first SKU shows that commits began (a batch or so late, as
    // publishing runs 128 at once), then the units left over all SKUs are
    // read once; the last SKU shows the end is near, and each SKU still
    // holding units is then waited for in turn.
    let left = |sku: &Sku| {
        let sku = sku.clone();
        async move {
            store
                .inventory(&sku)
                .await
                .ok()
                .flatten()
                .map_or(per_sku, |row| row.stock)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if left(&names[0]).await < per_sku {
            break;
        }
        if Instant::now() > deadline {
            bail!("the processor committed nothing");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let started = Instant::now();
    let mut meter = super::cpu::CpuMeter::without_redis();
    let cpu_from = meter.start().await?;
    let mut first_left = 0;
    for sku in &names {
        first_left += left(sku).await;
    }
    let mut finished = Instant::now();
    for sku in names.iter().rev() {
        let mut waited = false;
        while left(sku).await > 0 {
            if Instant::now() > deadline {
                bail!("the processor did not finish");
            }
            waited = true;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if waited || sku == names.last().expect("at least one SKU") {
            finished = Instant::now();
        }
    }
    let elapsed = finished.duration_since(started).as_secs_f64();
    let cpu = meter
        .finish(cpu_from, usize::try_from(first_left).unwrap_or(1))
        .await?;
    for stop in stops {
        let _ = stop.send(());
    }
    for server in servers {
        server.await??;
    }
    stockgate::queue::delete_topology(
        &options.amqp,
        &config.rabbitmq.queue,
        config.rabbitmq.partitions,
    )
    .await;
    Ok((first_left as f64 / elapsed, cpu))
}

/// The same single-row conditional update and order insert, one
/// transaction at a time, one client.
async fn pgbench(url: &str, orders: usize, store: &Store) -> anyhow::Result<QueueMeasured> {
    let sku = Sku::parse("PGBENCH")?;
    store.set_stock(&sku, 1_000_000_000, 0, now(), None).await?;
    let script = std::env::temp_dir().join(format!("stockgate-pgbench-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "BEGIN;\n\
         UPDATE inventory SET stock = stock - 1, version = version + 1 WHERE sku = 'PGBENCH' AND stock >= 1;\n\
         INSERT INTO reservations (reservation_id, sku, user_id, quantity, state, created_at, updated_at) \
         VALUES (gen_random_uuid()::text, 'PGBENCH', 'pgbench', 1, 'held', now(), now());\n\
         END;\n",
    )?;
    let output = Command::new("pgbench")
        .args(["-n", "-c", "1", "-j", "1", "-t", &orders.to_string(), "-f"])
        .arg(&script)
        .arg(url)
        .output()
        .context("running pgbench (Debian package postgresql-contrib / postgresql-15)")?;
    let _ = std::fs::remove_file(&script);
    if !output.status.success() {
        bail!(
            "pgbench failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(QueueMeasured {
        cpu: None,
        name: "pgbench, update + insert, 1 client".into(),
        per_sec: parse_pgbench_tps(&text)?,
    })
}

/// "tps = 1234.567890 (without initial connection time)".
fn parse_pgbench_tps(text: &str) -> anyhow::Result<f64> {
    let line = text
        .lines()
        .find(|l| l.starts_with("tps = "))
        .context("no tps line in pgbench output")?;
    let value = line["tps = ".len()..]
        .split_whitespace()
        .next()
        .context("empty tps line")?;
    Ok(value.parse()?)
}

pub fn render(
    results: &[QueueMeasured],
    statements: &BatchStatements,
    options: &QueueBenchOptions,
) -> String {
    let find = |prefix: &str| results.iter().find(|m| m.name.starts_with(prefix));
    let pgbench = find("pgbench").map(|m| m.per_sec);
    let single = results
        .iter()
        .find(|m| m.name.ends_with(", batch size 1"))
        .map(|m| m.per_sec);
    let mut out = format!(
        "orders={} rounds={} (median round shown)\n{:<72} {:>9} {:>9} {:>9} {}\n",
        options.orders,
        options.rounds,
        "measurement",
        "orders/s",
        "x pgbench",
        "x batch 1",
        super::cpu::headings()
    );
    for m in results {
        let ratio =
            |base: Option<f64>| base.map_or("-".into(), |b| format!("{:.2}", m.per_sec / b));
        out.push_str(&format!(
            "{:<72} {:>9.0} {:>9} {:>9} {}\n",
            m.name,
            m.per_sec,
            ratio(pgbench),
            ratio(single),
            super::cpu::columns(m.cpu)
        ));
    }
    let spread = results
        .iter()
        .find(|m| m.name.ends_with(&format!(", {} SKUs", statements.orders)));
    let partitioned = |processors: &str| {
        results
            .iter()
            .find(|m| m.name.contains("partitions") && m.name.ends_with(processors))
    };
    let one_processor = partitioned(", 1 processor");
    let shared = partitioned(&format!(", {} processors", options.processors));
    if let (Some(one), Some(alone), Some(shared)) = (spread, one_processor, shared) {
        out.push_str(&format!(
            "same SKUs, medians: {} partitions on 1 processor / one queue {:.2}x; shared by {} processors / one queue {:.2}x\n",
            options.partitions,
            alone.per_sec / one.per_sec,
            options.processors,
            shared.per_sec / one.per_sec
        ));
    }
    out.push_str(&format!(
        "statements per batch of {} orders (BEGIN, COMMIT and the pool's check-out ping included): {} on one SKU, {} on {} SKUs\n",
        statements.orders, statements.on_one_sku, statements.on_many_skus, statements.orders
    ));
    out.push_str("cpu/call: CPU µs per order committed, from the first commit to the last, on the whole machine; in proc: this process (the processor; the queue was filled before); rabbitmq, postgres: those servers' processes; from the round with the median orders/s\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgbench_tps() {
        let text = "transaction type: x.sql\nlatency average = 0.5 ms\ntps = 1987.654321 (without initial connection time)\n";
        assert_eq!(parse_pgbench_tps(text).unwrap(), 1987.654321);
        assert!(parse_pgbench_tps("nothing").is_err());
    }
}
