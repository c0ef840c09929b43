//! CPU time per call, next to each throughput figure.
//!
//! Throughput on a shared 2-core machine moves by ±20% from run to run, and
//! a ratio to a same-run reference only says *that* a path is slower. The
//! CPU each call costs says *where*: this process (server and load
//! generator), the Redis server, the RabbitMQ broker, PostgreSQL, and the
//! rest of the machine (redis-benchmark, the kernel's own threads). When the cores are saturated, throughput is
//! cores divided by CPU per call, so these columns show what a target asks
//! of each part.

use anyhow::Context;
use redis::aio::MultiplexedConnection;

use super::Measured;

/// CPU time, in microseconds per call, between two snapshots.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuPerCall {
    /// Every process on the machine.
    pub machine_us: f64,
    /// This process: the server under test and the load generator.
    pub process_us: f64,
    /// The Redis server (its own `INFO cpu` figures).
    pub redis_us: f64,
    /// The RabbitMQ broker's processes on this machine.
    pub rabbitmq_us: f64,
    /// PostgreSQL's processes on this machine (every backend included).
    pub postgres_us: f64,
}

/// A measurement under way ([`CpuMeter::start`]).
pub struct Started(Snapshot);

/// Cumulative CPU times, in microseconds.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    machine_us: f64,
    process_us: f64,
    redis_us: f64,
    rabbitmq_us: f64,
    postgres_us: f64,
}

/// Reads the three clocks; keeps its Redis connection, so a snapshot
/// costs one `INFO` and no connect.
pub struct CpuMeter {
    /// None where the measured work uses no Redis (its figure stays 0).
    redis: Option<MultiplexedConnection>,
}

impl CpuMeter {
    pub async fn connect(redis_url: &str) -> anyhow::Result<Self> {
        let redis = redis::Client::open(redis_url)?
            .get_multiplexed_async_connection()
            .await
            .context("connect to Redis to read its CPU time")?;
        Ok(Self { redis: Some(redis) })
    }

    /// A meter for work that uses no Redis.
    pub fn without_redis() -> Self {
        Self { redis: None }
    }

    async fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        let redis_us = match &mut self.redis {
            Some(redis) => {
                let info: String = redis::cmd("INFO").arg("cpu").query_async(redis).await?;
                parse_redis_cpu_us(&info)?
            }
            None => 0.0,
        };
        Ok(Snapshot {
            machine_us: machine_busy_us()?,
            process_us: process_us(),
            redis_us,
            rabbitmq_us: processes_us(&["beam.smp", "erl_child_setup", "epmd"]),
            postgres_us: processes_us(&["postgres"]),
        })
    }

    /// Runs `work` (`calls` calls, and whatever must finish for them to be
    /// done) and sets its CPU per call.
    pub async fn measure(
        &mut self,
        calls: usize,
        work: impl std::future::Future<Output = anyhow::Result<Measured>>,
    ) -> anyhow::Result<Measured> {
        let before = self.snapshot().await?;
        let mut measured = work.await?;
        measured.cpu = Some(self.per_call(before, calls).await?);
        Ok(measured)
    }

    /// Starts a measurement whose end is found by the caller.
    pub async fn start(&mut self) -> anyhow::Result<Started> {
        Ok(Started(self.snapshot().await?))
    }

    /// Ends a measurement begun with [`CpuMeter::start`], over `calls`.
    pub async fn finish(&mut self, started: Started, calls: usize) -> anyhow::Result<CpuPerCall> {
        self.per_call(started.0, calls).await
    }

    /// CPU per call since `before`, for `calls` calls.
    async fn per_call(&mut self, before: Snapshot, calls: usize) -> anyhow::Result<CpuPerCall> {
        let after = self.snapshot().await?;
        let calls = calls.max(1) as f64;
        Ok(CpuPerCall {
            machine_us: (after.machine_us - before.machine_us) / calls,
            process_us: (after.process_us - before.process_us) / calls,
            redis_us: (after.redis_us - before.redis_us) / calls,
            rabbitmq_us: (after.rabbitmq_us - before.rabbitmq_us) / calls,
            postgres_us: (after.postgres_us - before.postgres_us) / calls,
        })
    }
}

/// The kernel's clock ticks in `/proc/stat`: USER_HZ, fixed at 100 in
/// Linux's user-space ABI whatever the kernel's own tick rate. Over a
/// measurement of a second on 2 cores that is 200 ticks, so the machine's
/// figure is good to about 1%.
const TICK_US: f64 = 10_000.0;

/// This process's CPU time, every thread's and the exited ones' too, to
/// the nanosecond: `/proc/self/stat` counts in 10 ms ticks, too coarse for
/// a test's few hundred calls.
fn process_us() -> f64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ProcessCPUTime);
    t.tv_sec as f64 * 1e6 + t.tv_nsec as f64 / 1e3
}

/// Busy time of all cores from `/proc/stat`: user, nice, system, irq and
/// softirq. Not idle or iowait; not steal either, which is the hypervisor
/// running someone else; guest time is already in user.
fn machine_busy_us() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("read /proc/stat")?;
    parse_proc_stat_busy_ticks(&stat).map(|ticks| ticks * TICK_US)
}

fn parse_proc_stat_busy_ticks(stat: &str) -> anyhow::Result<f64> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    let fields: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse::<f64>())
        .collect::<Result<_, _>>()
        .context("/proc/stat cpu line")?;
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    anyhow::ensure!(fields.len() >= 7, "short /proc/stat cpu line {line:?}");
    Ok(fields[0] + fields[1] + fields[2] + fields[5] + fields[6])
}

/// CPU time of every process running one of `names` (its `comm`), from
/// `/proc/<pid>/stat` in 10 ms ticks: coarse, but a benchmark row runs
/// for seconds. A process that exits between two snapshots takes its time
/// with it; PostgreSQL's backends live as long as the pool's connections.
fn processes_us(names: &[&str]) -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    entries
        .filter_map(|entry| {
            let name = entry.ok()?.file_name();
            name.to_str()?.parse::<u32>().ok()?;
            std::fs::read_to_string(format!("/proc/{}/stat", name.to_str()?)).ok()
        })
        .filter_map(|stat| parse_pid_stat(&stat))
        .filter(|(comm, _)| names.contains(&comm.as_str()))
        .map(|(_, ticks)| ticks * TICK_US)
        .sum()
}

/// A process's `comm` and its user plus system ticks. The name sits in
/// parentheses and may hold spaces and parentheses itself, so the fields
/// are counted from the last `)`.
fn parse_pid_stat(stat: &str) -> Option<(String, f64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    // After the name: state(3) ppid(4) ... utime(14) stime(15).
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

fn parse_redis_cpu_us(info: &str) -> anyhow::Result<f64> {
    let field = |name: &str| -> anyhow::Result<f64> {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .with_context(|| format!("no {name} in INFO cpu"))?
            .trim()
            .parse::<f64>()
            .with_context(|| format!("INFO cpu {name}"))
    };
    Ok((field("used_cpu_sys")? + field("used_cpu_user")?) * 1e6)
}

/// The round whose machine figure is the median, all figures from
/// it, so that they describe the same calls (None when nothing was
/// measured).
pub fn median(samples: &[CpuPerCall]) -> Option<CpuPerCall> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(|a, b| a.machine_us.total_cmp(&b.machine_us));
    sorted.get(sorted.len() / 2).copied()
}

/// The three columns, or dashes where nothing was measured.
pub fn columns(cpu: Option<CpuPerCall>) -> String {
    match cpu {
        Some(c) => format!(
            "{:>8.1} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
            c.machine_us, c.process_us, c.redis_us, c.rabbitmq_us, c.postgres_us
        ),
        None => format!("{:>8} {:>8} {:>8} {:>8} {:>8}", "-", "-", "-", "-", "-"),
    }
}

/// Headings for [`columns`].
pub fn headings() -> String {
    format!(
        "{:>8} {:>8} {:>8} {:>8} {:>8}",
        "cpu/call", "in proc", "redis", "rabbitmq", "postgres"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_median_round_gives_all_three_figures() {
        let cpu = |machine_us, process_us, redis_us| CpuPerCall {
            machine_us,
            process_us,
            redis_us,
            rabbitmq_us: 0.0,
            postgres_us: 0.0,
        };
        let rounds = [
            cpu(370.0, 150.0, 40.0),
            cpu(2500.0, 190.0, 39.0),
            cpu(365.0, 155.0, 44.0),
        ];
        // The 370 µs round, whole: not 155 from one round and 40 from another.
        assert_eq!(median(&rounds), Some(cpu(370.0, 150.0, 40.0)));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn busy_ticks_leave_out_idle_iowait_and_steal() {
        let stat = "cpu  100 2 30 5000 40 6 7 8 0 0\ncpu0 50 1 15 2500 20 3 3 4 0 0\n";
        assert_eq!(parse_proc_stat_busy_ticks(stat).unwrap(), 145.0);
    }

    #[test]
    fn a_process_stat_gives_its_name_and_ticks() {
        // A name with a space and a parenthesis, as `comm` can have.
        let stat =
            "4242 (beam (x) smp) S 1 4242 4242 0 -1 4194560 100 0 0 0 1234 56 0 0 20 0 30 0 99 0 0";
        assert_eq!(
            parse_pid_stat(stat),
            Some(("beam (x) smp".to_owned(), 1290.0))
        );
        assert_eq!(parse_pid_stat("garbage"), None);
    }

    #[test]
    fn this_process_is_found_by_its_name() {
        let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
        let started = std::time::Instant::now();
        let mut x = 0u64;
        // Ticks are 10 ms: spin until the reading moves, or fail.
        while processes_us(&[comm.trim()]) == 0.0 {
            assert!(started.elapsed() < std::time::Duration::from_secs(30));
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
    }

    #[test]
    fn redis_cpu_is_system_plus_user() {
        let info = "# CPU\r\nused_cpu_sys:1.500000\r\nused_cpu_user:2.250000\r\nused_cpu_sys_children:9.000000\r\nused_cpu_user_children:9.000000\r\n";
        assert_eq!(parse_redis_cpu_us(info).unwrap(), 3_750_000.0);
    }

    #[test]
    fn process_time_moves_with_work() {
        let before = process_us();
        let mut x = 0u64;
        let started = std::time::Instant::now();
        // Spins until the process time grows by 50 ms; a reading that never
        // moves fails on the deadline.
        while process_us() - before < 50_000.0 {
            assert!(started.elapsed() < std::time::Duration::from_secs(30));
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
    }
}
