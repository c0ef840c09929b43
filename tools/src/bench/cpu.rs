//! CPU time per call, next to each throughput figure.
//!
//! Throughput on a shared 2-core machine moves by ±20% from run to run, and
//! a ratio to a same-run reference only says *that* a path is slower. The
//! CPU each call costs says *where*: this process (server and load
//! generator), the Redis server, and the rest of the machine (PostgreSQL,
//! RabbitMQ, redis-benchmark). When the cores are saturated, throughput is
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
}

/// Cumulative CPU times, in microseconds.
#[derive(Debug, Clone, Copy)]
struct Snapshot {
    machine_us: f64,
    process_us: f64,
    redis_us: f64,
}

/// Reads the three clocks; keeps its Redis connection, so a snapshot
/// costs one `INFO` and no connect.
pub struct CpuMeter {
    redis: MultiplexedConnection,
}

impl CpuMeter {
    pub async fn connect(redis_url: &str) -> anyhow::Result<Self> {
        let redis = redis::Client::open(redis_url)?
            .get_multiplexed_async_connection()
            .await
            .context("connect to Redis to read its CPU time")?;
        Ok(Self { redis })
    }

    async fn snapshot(&mut self) -> anyhow::Result<Snapshot> {
        let info: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(&mut self.redis)
            .await?;
        Ok(Snapshot {
            machine_us: machine_busy_us()?,
            process_us: process_us(),
            redis_us: parse_redis_cpu_us(&info)?,
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

    /// CPU per call since `before`, for `calls` calls.
    async fn per_call(&mut self, before: Snapshot, calls: usize) -> anyhow::Result<CpuPerCall> {
        let after = self.snapshot().await?;
        let calls = calls.max(1) as f64;
        Ok(CpuPerCall {
            machine_us: (after.machine_us - before.machine_us) / calls,
            process_us: (after.process_us - before.process_us) / calls,
            redis_us: (after.redis_us - before.redis_us) / calls,
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

/// The round whose machine figure is the median, all three figures from
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
            "{:>8.1} {:>8.1} {:>8.1}",
            c.machine_us, c.process_us, c.redis_us
        ),
        None => format!("{:>8} {:>8} {:>8}", "-", "-", "-"),
    }
}

/// Headings for [`columns`].
pub fn headings() -> String {
    format!("{:>8} {:>8} {:>8}", "cpu/call", "in proc", "redis")
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
