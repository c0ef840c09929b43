//! `stockgate storm`: the flash sale reproduced against a running service.
//!
//! It sets a SKU's stock through AdminService, fires Reserve calls from many
//! users at a given concurrency over several HTTP/2 connections (with an
//! optional share of double clicks, the same idempotency key sent twice at
//! once, and retries of refused calls with the same key), confirms every
//! hold it got, waits for the queue to drain, and checks the invariants
//! against the service (and, given `--store`, the database itself): units
//! ordered ≤ stock; stock left = stock − units ordered; every admitted
//! reservation ended CONFIRMED or visibly REJECTED (nothing lost); one
//! reservation per idempotency key. With `--skus N` the sale spans N SKUs
//! of `--stock` units each, calls spread over them by a Zipf law
//! (`--zipf`), and every invariant is checked per SKU. With
//! `--opens-in-ms` the sale opens at a set time: the early callers hear
//! NOT_OPEN and come back at the opening all at once, and nothing may be
//! admitted before it. `--matrix` repeats
//! it under each layer configuration, the article's naive baseline
//! included.

mod check;
mod matrix;
pub mod report;
mod sale;

pub use check::{check_database, open_database};
pub use matrix::{matrix, render_matrix, run_matrix, Strategy};

use std::{
    collections::BTreeMap,
    io::IsTerminal,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use serde::Serialize;
use tonic::{
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
    Code, Request, Status,
};

use stockgate::pb::{
    admin_service_client::AdminServiceClient, inventory_service_client::InventoryServiceClient,
    ReserveOutcome, ReserveRequest, SetSaleWindowRequest, SetStockRequest,
};

/// What to run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StormOptions {
    /// The caller endpoint.
    pub addr: String,
    /// The admin endpoint (the caller endpoint when shared).
    pub admin_addr: String,
    #[serde(skip)]
    pub token: Option<String>,
    /// The SKU to sell, or with `skus` above 1 the stem of their names
    /// (`SKU-0000`, …, most popular first); a fresh name per run keeps
    /// runs apart.
    pub sku: String,
    /// Units of each SKU.
    pub stock: i64,
    /// SKUs on sale.
    pub skus: usize,
    /// Zipf exponent of SKU popularity: rank `k` draws calls in proportion
    /// to `1 / k^zipf` (0: evenly; about 1 in real sales).
    pub zipf: f64,
    /// Seeds which SKU each call asks for; `None`: a fresh one per run
    /// (the report says which, so a run can be repeated).
    pub seed: Option<u64>,
    /// Reserve calls (double clicks add their second call on top).
    pub requests: usize,
    /// Distinct users the calls come from (call `i` is user `i % users`).
    pub users: usize,
    /// Calls in flight at once.
    pub concurrency: usize,
    pub connections: usize,
    /// Units per call.
    pub quantity: u32,
    /// Share of calls (0–1) sent twice at once with the same key.
    pub double_click: f64,
    /// Retries of a refused call (UNAVAILABLE, ABORTED, RESOURCE_EXHAUSTED)
    /// with the same idempotency key.
    pub retries: u32,
    /// Per-call deadline.
    pub timeout_ms: u64,
    /// Show progress on a terminal.
    pub progress: bool,
    /// A database URL to check the invariants against directly.
    #[serde(skip)]
    pub store: Option<String>,
    /// The service's `/metrics` (for database writes attempted).
    pub metrics_url: Option<String>,
    /// When above 0, the sale opens this long after the storm starts: every
    /// SKU gets a sale window opening then, the calls start at once, and a
    /// caller told NOT_OPEN calls again at `opens_at` with the same key,
    /// as a shop's page would.
    pub opens_in_ms: u64,
    /// With `opens_in_ms`: the opening is a draw of this many ms (the
    /// fair opening): calls in it are entered and decided at its close,
    /// and the report reads every hot SKU's draw back.
    pub draw_ms: u32,
}

/// One SKU's draw as the storm read it back (AdminService GetDraw).
#[derive(Debug, Clone, Serialize)]
pub struct DrawTally {
    pub sku: String,
    pub seed: String,
    pub entrants: u32,
    pub overflow: u32,
    pub admitted: usize,
    /// Whether re-running it from its seed and entrants gives the gate's
    /// places and outcomes.
    pub re_run_agrees: bool,
    /// How evenly the winners' arrival ranks spread over the entrants
    /// ([`stockgate::gate::draw::rank_spread`]), and the bound a random
    /// draw keeps under but once in a thousand.
    pub spread: Option<f64>,
    pub spread_bound: f64,
}

/// One call's end.
#[derive(Debug, Clone)]
enum Answer {
    Outcome {
        outcome: ReserveOutcome,
        reservation: Option<String>,
    },
    Error(Code, String),
}

/// One call as made and answered: its index (the idempotency key), whether
/// it is the second half of a double click, the answer, milliseconds taken.
type Call = (usize, bool, Answer, f64);

/// SKUs listed in a report's hottest table.
pub const HOTTEST: usize = 5;

/// One SKU's part of a storm.
#[derive(Debug, Clone, Serialize)]
pub struct SkuTally {
    pub sku: String,
    pub calls: usize,
    pub admitted: usize,
    pub sold_out: usize,
    pub units_ordered: i64,
    pub stock_left: i64,
}

/// An invariant and whether it held.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Everything a run found; printed as a table and written as JSON.
#[derive(Debug, Clone, Serialize)]
pub struct StormReport {
    /// The configuration's name (`--matrix`), or "storm".
    pub strategy: String,
    pub options: StormOptions,
    pub calls: usize,
    /// Answers by outcome or error code.
    pub outcomes: BTreeMap<String, usize>,
    /// Calls told RESERVED or QUEUED with a reservation of their own.
    pub admitted: usize,
    /// Second calls of a double click answered with the first call's
    /// reservation.
    pub deduplicated: usize,
    /// Reservations confirmed at the end.
    pub confirmed: usize,
    /// Reservations that ended REJECTED (the database said no after the
    /// gate said yes, or with the gate off).
    pub rejected: usize,
    pub units_ordered: i64,
    /// The seed the calls' SKUs were drawn with (`--seed` repeats it).
    pub seed: u64,
    /// The SKUs that drew the most calls (at most [`HOTTEST`]).
    pub hottest: Vec<SkuTally>,
    /// Units sold beyond the stock (0 unless broken).
    pub oversold: i64,
    pub calls_per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// From the first call until the last caller had an answer.
    pub last_answer_ms: f64,
    /// Database writes attempted during the run (commits and conditional
    /// updates that lost a race; from /metrics), when known.
    pub db_writes: Option<u64>,
    /// With `opens_in_ms`: when the sale opened (RFC 3339, ms).
    pub opens_at: Option<String>,
    /// Calls told NOT_OPEN (each then called again at the opening).
    pub not_open_answers: usize,
    /// With `draw_ms`: the hottest SKUs' draws.
    pub draws: Vec<DrawTally>,
    pub checks: Vec<Check>,
    /// Latencies in ms, sorted, for the report's charts.
    #[serde(skip)]
    pub latencies_ms: Vec<f64>,
}

impl StormReport {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

fn metadata(value: &str, what: &str) -> anyhow::Result<MetadataValue<tonic::metadata::Ascii>> {
    MetadataValue::try_from(value).with_context(|| format!("{what} must be visible ASCII"))
}

async fn channel(addr: &str) -> anyhow::Result<Channel> {
    Endpoint::from_shared(addr.to_owned())
        .with_context(|| format!("bad address {addr}"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach {addr}"))
}

struct Admin {
    client: AdminServiceClient<Channel>,
    token: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl Admin {
    async fn connect(options: &StormOptions) -> anyhow::Result<Self> {
        let token = options
            .token
            .as_ref()
            .map(|t| metadata(&format!("Bearer {t}"), "--token"))
            .transpose()?;
        Ok(Self {
            client: AdminServiceClient::new(channel(&options.admin_addr).await?),
            token,
        })
    }

    fn request<T>(&self, body: T) -> Request<T> {
        let mut request = Request::new(body);
        if let Some(token) = &self.token {
            request
                .metadata_mut()
                .insert("authorization", token.clone());
        }
        request
            .metadata_mut()
            .insert("x-operator", MetadataValue::from_static("stockgate-storm"));
        request
    }
}

fn status(what: &str) -> impl Fn(Status) -> anyhow::Error + '_ {
    move |s| anyhow::anyhow!("{what}: {:?}: {}", s.code(), s.message())
}

/// Runs one storm and checks the invariants.
pub async fn run(options: &StormOptions, strategy: &str) -> anyhow::Result<StormReport> {
    if options.users == 0 || options.requests == 0 || options.concurrency == 0 {
        bail!("--requests, --users and --concurrency must be above 0");
    }
    if !(0.0..=1.0).contains(&options.double_click) {
        bail!("--double-click is a share between 0 and 1");
    }
    if options.draw_ms > 0 && options.opens_in_ms == 0 {
        bail!("--draw-ms needs --opens-in-ms: a draw follows an opening");
    }
    let run_uuid = uuid::Uuid::now_v7();
    let seed = options.seed.unwrap_or(run_uuid.as_u64_pair().1);
    let sale = Arc::new(sale::Sale::new(options, seed)?);
    let mut admin = Admin::connect(options).await?;
    // A reused SKU keeps its earlier orders: count only this run's.
    let earlier: Vec<i64> = sale
        .each_sku(|sku| {
            let (mut client, admin) = (admin.client.clone(), &admin);
            async move {
                let view = client
                    .set_stock(admin.request(SetStockRequest {
                        sku: sku.clone(),
                        stock: options.stock,
                        max_per_user: 0,
                    }))
                    .await
                    .map_err(status("SetStock"))?
                    .into_inner()
                    .stock;
                anyhow::Ok(view.map_or(0, |v| v.held_units + v.confirmed_units))
            }
        })
        .await?;
    let writes_before = check::db_writes(options).await;
    let opens_at = match options.opens_in_ms {
        0 => None,
        ms => Some(open_at(&admin, &sale, ms, options.draw_ms).await?),
    };
    let not_open = Arc::new(AtomicUsize::new(0));

    let mut channels = Vec::with_capacity(options.connections.max(1));
    for _ in 0..options.connections.max(1) {
        channels.push(channel(&options.addr).await?);
    }
    let run_id = run_uuid.simple().to_string();
    // Each entry: (key, user); a double click is the same entry twice.
    let doubles = (options.requests as f64 * options.double_click).round() as usize;
    let mut plan: Vec<(usize, bool)> = (0..options.requests).map(|i| (i, false)).collect();
    // Spread the double clicks over the run rather than at its start.
    if let Some(every) = options.requests.checked_div(doubles) {
        plan.extend((0..doubles).map(|d| (d * every, true)));
        plan.sort_by_key(|(i, second)| (*i, *second));
    }
    let plan = Arc::new(plan);
    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let answers: Arc<Mutex<Vec<Call>>> = Arc::new(Mutex::new(Vec::with_capacity(plan.len())));
    let started = Instant::now();
    let progress = (options.progress && std::io::stderr().is_terminal()).then(|| {
        let answered = answered.clone();
        let total = plan.len();
        tokio::spawn(async move {
            loop {
                let done = answered.load(Ordering::Relaxed);
                eprint!("\r  {done:>9} / {total} answered");
                if done >= total {
                    eprintln!();
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    });
    let workers: Vec<_> = (0..options.concurrency)
        .map(|w| {
            let mut client = InventoryServiceClient::new(channels[w % channels.len()].clone());
            let (plan, next, answered, answers) = (
                plan.clone(),
                next.clone(),
                answered.clone(),
                answers.clone(),
            );
            let (sale, run_id, options) = (sale.clone(), run_id.clone(), options.clone());
            let not_open = not_open.clone();
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(i, second)) = plan.get(n) else {
                        return;
                    };
                    let user = user_name(&options, i);
                    let key = format!("{run_id}-{i}");
                    let call_started = Instant::now();
                    let sku = sale.sku_of(i);
                    let answer = reserve(&mut client, sku, &user, &key, &options, &not_open).await;
                    let ms = call_started.elapsed().as_secs_f64() * 1e3;
                    answered.fetch_add(1, Ordering::Relaxed);
                    answers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((i, second, answer, ms));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await?;
    }
    let last_answer = started.elapsed();
    if let Some(progress) = progress {
        let _ = progress.await;
    }
    let answers = std::mem::take(&mut *answers.lock().unwrap_or_else(|p| p.into_inner()));

    let mut report = tally(options, strategy, &answers, last_answer);
    report.seed = seed;
    report.not_open_answers = not_open.load(Ordering::Relaxed);
    report.opens_at = opens_at.map(|at| at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    check::confirm_and_check(
        options,
        &sale,
        &mut admin,
        &channels[0],
        &answers,
        &earlier,
        &mut report,
    )
    .await?;
    if let (Some(before), Some(after)) = (writes_before, check::db_writes(options).await) {
        report.db_writes = Some(after.saturating_sub(before));
    }
    if options.draw_ms > 0 {
        let hot: Vec<String> = if report.hottest.is_empty() {
            vec![options.sku.clone()]
        } else {
            report.hottest.iter().map(|t| t.sku.clone()).collect()
        };
        for sku in hot {
            report.draws.push(read_draw(&admin, &sku).await?);
        }
        let differ: Vec<&str> = report
            .draws
            .iter()
            .filter(|d| !d.re_run_agrees)
            .map(|d| d.sku.as_str())
            .collect();
        report.checks.push(Check {
            name: "every draw re-runs from its record",
            ok: differ.is_empty(),
            detail: if differ.is_empty() {
                format!("{} draws read back and re-run", report.draws.len())
            } else {
                format!("re-runs differ for {}", differ.join(", "))
            },
        });
    }
    Ok(report)
}

/// One SKU's draw, every entrant read page by page, re-run here.
async fn read_draw(admin: &Admin, sku: &str) -> anyhow::Result<DrawTally> {
    use stockgate::{
        gate::{draw, DrawEntrant},
        pb::DrawOutcome as Outcome,
    };
    let mut client = admin.client.clone();
    let mut pages = crate::admin_cli::DrawPages::new(sku);
    while let Some(request) = pages.next() {
        let page = client.get_draw(admin.request(request)).await;
        pages
            .add(page.map_err(status("GetDraw"))?.into_inner())
            .map_err(status("GetDraw"))?;
    }
    let draw = pages.into_draw();
    let (seed, stock, overflow, entrants) =
        (draw.seed, draw.stock_at_draw, draw.overflow, draw.entrants);
    let mine: Vec<DrawEntrant> = entrants.iter().map(DrawEntrant::from).collect();
    // The storm's SKUs have no per-user limit.
    let re_run_agrees = draw::first_difference(&seed, stock, 0, &mine).is_none();
    let winners: Vec<u32> = entrants
        .iter()
        .filter(|e| e.outcome() == Outcome::Admitted)
        .map(|e| e.arrival)
        .collect();
    Ok(DrawTally {
        sku: sku.to_owned(),
        seed,
        entrants: entrants.len() as u32,
        overflow,
        admitted: winners.len(),
        re_run_agrees,
        spread: draw::rank_spread(&winners, entrants.len() as u32),
        spread_bound: draw::rank_spread_bound(winners.len()),
    })
}

/// Gives every SKU of the sale a window opening `in_ms` from now (to the
/// millisecond); returns the opening.
async fn open_at(
    admin: &Admin,
    sale: &sale::Sale,
    in_ms: u64,
    draw_ms: u32,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    let at = chrono::Utc::now() + chrono::TimeDelta::milliseconds(in_ms.min(86_400_000) as i64);
    let at = chrono::DateTime::from_timestamp_millis(at.timestamp_millis()).context("opening")?;
    sale.each_sku(|sku| {
        let (mut client, admin) = (admin.client.clone(), admin);
        async move {
            client
                .set_sale_window(admin.request(SetSaleWindowRequest {
                    sku: sku.clone(),
                    opens_at: Some(prost_types::Timestamp {
                        seconds: at.timestamp(),
                        nanos: at.timestamp_subsec_nanos() as i32,
                    }),
                    closes_at: None,
                    draw_window_ms: draw_ms,
                    reason: "stockgate storm: a sale opening at a set time".into(),
                }))
                .await
                .map_err(status("SetSaleWindow"))?;
            anyhow::Ok(())
        }
    })
    .await?;
    Ok(at)
}

/// Most NOT_OPEN answers one call waits out before it gives up (a server
/// whose clock runs behind the storm's would otherwise keep it waiting).
const NOT_OPEN_WAITS: u32 = 3;

async fn reserve(
    client: &mut InventoryServiceClient<Channel>,
    sku: &str,
    user: &str,
    key: &str,
    options: &StormOptions,
    not_open: &AtomicUsize,
) -> Answer {
    let mut attempt = 0;
    let mut waits = 0;
    loop {
        let mut request = Request::new(ReserveRequest {
            sku: sku.to_owned(),
            quantity: options.quantity,
            ..Default::default()
        });
        request.set_timeout(Duration::from_millis(options.timeout_ms));
        let metadata = request.metadata_mut();
        if let (Ok(user), Ok(key)) = (user.parse(), key.parse()) {
            metadata.insert("x-user-id", user);
            metadata.insert("idempotency-key", key);
        }
        match client.reserve(request).await {
            Ok(response) => {
                let response = response.into_inner();
                if let (ReserveOutcome::NotOpen, Some(opens)) =
                    (response.outcome(), &response.opens_at)
                {
                    not_open.fetch_add(1, Ordering::Relaxed);
                    if waits < NOT_OPEN_WAITS {
                        waits += 1;
                        let opens_ms = opens.seconds * 1_000 + i64::from(opens.nanos / 1_000_000);
                        let wait = opens_ms - chrono::Utc::now().timestamp_millis();
                        let wait = Duration::from_millis(wait.clamp(1, 60_000) as u64);
                        tokio::time::sleep(wait).await;
                        continue;
                    }
                }
                return Answer::Outcome {
                    outcome: response.outcome(),
                    reservation: response.reservation.map(|r| r.reservation_id),
                };
            }
            Err(s)
                if attempt < options.retries
                    && matches!(
                        s.code(),
                        Code::Unavailable | Code::Aborted | Code::ResourceExhausted
                    ) =>
            {
                attempt += 1;
                back_off(&s, Duration::from_millis(50)).await;
            }
            Err(s) => return Answer::Error(s.code(), s.message().to_owned()),
        }
    }
}

/// Call `i`'s user. Named after the SKU too: the per-user rate limit
/// remembers users for a second, and a run right after another (the
/// benchmark's rounds, each on a fresh SKU) must not inherit its pacing.
fn user_name(options: &StormOptions, i: usize) -> String {
    format!("storm-u{}@{}", i % options.users, options.sku)
}

/// Waits as a refusal's `retry-after` hint says (at most 2 s), or
/// `otherwise` when it gave none.
async fn back_off(refusal: &Status, otherwise: Duration) {
    let wait = refusal
        .metadata()
        .get(stockgate::error::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(otherwise, Duration::from_secs);
    tokio::time::sleep(wait.min(Duration::from_secs(2))).await;
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn code_name(code: Code) -> &'static str {
    stockgate::metrics::code_name(code as i32)
}

fn tally(
    options: &StormOptions,
    strategy: &str,
    answers: &[Call],
    last_answer: Duration,
) -> StormReport {
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for (_, _, answer, _) in answers {
        let name = match answer {
            Answer::Outcome { outcome, .. } => outcome
                .as_str_name()
                .trim_start_matches("RESERVE_OUTCOME_")
                .to_ascii_lowercase(),
            Answer::Error(code, message) if *code == Code::ResourceExhausted => {
                if message.contains("rate limited") {
                    "rate_limited".into()
                } else {
                    "shed".into()
                }
            }
            Answer::Error(code, _) => format!("error {}", code_name(*code)),
        };
        *outcomes.entry(name).or_default() += 1;
    }
    let mut latencies: Vec<f64> = answers.iter().map(|(_, _, _, ms)| *ms).collect();
    latencies.sort_by(f64::total_cmp);
    let secs = last_answer.as_secs_f64().max(1e-9);
    StormReport {
        strategy: strategy.to_owned(),
        options: options.clone(),
        calls: answers.len(),
        outcomes,
        admitted: 0,
        deduplicated: 0,
        confirmed: 0,
        rejected: 0,
        units_ordered: 0,
        seed: 0,
        hottest: Vec::new(),
        oversold: 0,
        calls_per_sec: answers.len() as f64 / secs,
        p50_ms: percentile(&latencies, 50.0),
        p90_ms: percentile(&latencies, 90.0),
        p99_ms: percentile(&latencies, 99.0),
        max_ms: latencies.last().copied().unwrap_or(0.0),
        last_answer_ms: last_answer.as_secs_f64() * 1e3,
        db_writes: None,
        opens_at: None,
        not_open_answers: 0,
        draws: Vec::new(),
        checks: Vec::new(),
        latencies_ms: latencies,
    }
}

/// The single run's table.
pub fn render(report: &StormReport) -> String {
    let o = &report.options;
    let what = if o.skus > 1 {
        format!(
            "{} units each of {} SKUs {}-0000… (Zipf s = {}, seed {})",
            o.stock, o.skus, o.sku, o.zipf, report.seed
        )
    } else {
        format!("{} units of {}", o.stock, o.sku)
    };
    let mut out = format!(
        "storm: {} calls ({} double clicks) from {} users for {what} at concurrency {} over {} connections\n\n",
        report.calls,
        report.calls - o.requests,
        o.users,
        o.concurrency,
        o.connections
    );
    out.push_str("outcome                          calls\n");
    for (name, n) in &report.outcomes {
        out.push_str(&format!("{name:<30} {n:>7}\n"));
    }
    out.push_str(&format!(
        "\nadmitted {}  deduplicated {}  confirmed {}  rejected {}  units ordered {}  oversold {}\n",
        report.admitted, report.deduplicated, report.confirmed, report.rejected, report.units_ordered, report.oversold
    ));
    out.push_str(&format!(
        "{:.0} calls/s  p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  last answer after {:.0} ms{}\n\n",
        report.calls_per_sec,
        report.p50_ms,
        report.p90_ms,
        report.p99_ms,
        report.max_ms,
        report.last_answer_ms,
        report
            .db_writes
            .map_or(String::new(), |w| format!("  database writes {w}"))
    ));
    if let Some(opens_at) = &report.opens_at {
        out.push_str(&format!(
            "the sale opened at {opens_at}: {} calls came early (NOT_OPEN) and called again then\n\n",
            report.not_open_answers
        ));
    }
    for d in &report.draws {
        out.push_str(&format!(
            "draw of {}: seed {}, {} entrants ({} more while full), {} admitted; winners' arrival spread D = {} (a random draw: under {:.3} but once in 1,000); re-run from the record {}\n",
            d.sku,
            d.seed,
            d.entrants,
            d.overflow,
            d.admitted,
            d.spread.map_or("-".to_owned(), |d| format!("{d:.3}")),
            d.spread_bound,
            if d.re_run_agrees { "agrees" } else { "DISAGREES" }
        ));
    }
    if !report.draws.is_empty() {
        out.push('\n');
    }
    if o.skus > 1 {
        let title = "hottest SKUs";
        let w = report
            .hottest
            .iter()
            .map(|t| t.sku.len())
            .fold(title.len(), usize::max);
        out.push_str(&format!(
            "{:<w$} {:>8} {:>9} {:>9} {:>8} {:>6}\n",
            title, "calls", "admitted", "sold out", "ordered", "left"
        ));
        for t in &report.hottest {
            out.push_str(&format!(
                "{:<w$} {:>8} {:>9} {:>9} {:>8} {:>6}\n",
                t.sku, t.calls, t.admitted, t.sold_out, t.units_ordered, t.stock_left
            ));
        }
        out.push('\n');
    }
    for check in &report.checks {
        out.push_str(&format!(
            "{} {:<50} {}\n",
            if check.ok { "ok  " } else { "FAIL" },
            check.name,
            check.detail
        ));
    }
    out
}
