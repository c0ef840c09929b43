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
//! reservation per idempotency key. `--matrix` repeats it under each layer
//! configuration, the article's naive baseline included.

pub mod report;

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    io::IsTerminal,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::{bail, Context};
use futures::StreamExt;
use serde::Serialize;
use tonic::{
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
    Code, Request, Status,
};

use stockgate::{
    domain::Sku,
    pb::{
        admin_service_client::AdminServiceClient, inventory_service_client::InventoryServiceClient,
        ConfirmReservationRequest, DbCheckMode, GetReservationRequest, GetStockRequest,
        ReservationState as PbState, ReserveOutcome, ReserveRequest, SetLayersRequest,
        SetStockRequest,
    },
};

/// What to run.
#[derive(Debug, Clone, Serialize)]
pub struct StormOptions {
    /// The caller endpoint.
    pub addr: String,
    /// The admin endpoint (the caller endpoint when shared).
    pub admin_addr: String,
    #[serde(skip)]
    pub token: Option<String>,
    /// The SKU to sell; a fresh name per run keeps runs apart.
    pub sku: String,
    pub stock: i64,
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
    let mut admin = Admin::connect(options).await?;
    // A reused SKU keeps its earlier orders: count only this run's.
    let earlier = admin
        .client
        .set_stock(admin.request(SetStockRequest {
            sku: options.sku.clone(),
            stock: options.stock,
            max_per_user: 0,
        }))
        .await
        .map_err(status("SetStock"))?
        .into_inner()
        .stock
        .map_or(0, |v| v.held_units + v.confirmed_units);
    let writes_before = db_writes(options).await;

    let mut channels = Vec::with_capacity(options.connections.max(1));
    for _ in 0..options.connections.max(1) {
        channels.push(channel(&options.addr).await?);
    }
    let run_id = uuid::Uuid::now_v7().simple().to_string();
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
            let (sku, run_id, options) = (options.sku.clone(), run_id.clone(), options.clone());
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(i, second)) = plan.get(n) else {
                        return;
                    };
                    let user = user_name(&options, i);
                    let key = format!("{run_id}-{i}");
                    let call_started = Instant::now();
                    let answer = reserve(&mut client, &sku, &user, &key, &options).await;
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
    settle_and_check(
        options,
        &mut admin,
        &channels[0],
        &answers,
        earlier,
        &mut report,
    )
    .await?;
    if let (Some(before), Some(after)) = (writes_before, db_writes(options).await) {
        report.db_writes = Some(after.saturating_sub(before));
    }
    Ok(report)
}

async fn reserve(
    client: &mut InventoryServiceClient<Channel>,
    sku: &str,
    user: &str,
    key: &str,
    options: &StormOptions,
) -> Answer {
    let mut attempt = 0;
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
        oversold: 0,
        calls_per_sec: answers.len() as f64 / secs,
        p50_ms: percentile(&latencies, 50.0),
        p90_ms: percentile(&latencies, 90.0),
        p99_ms: percentile(&latencies, 99.0),
        max_ms: latencies.last().copied().unwrap_or(0.0),
        last_answer_ms: last_answer.as_secs_f64() * 1e3,
        db_writes: None,
        checks: Vec::new(),
        latencies_ms: latencies,
    }
}

/// Confirms the holds, waits for the queue, then checks the invariants.
async fn settle_and_check(
    options: &StormOptions,
    admin: &mut Admin,
    channel: &Channel,
    answers: &[Call],
    earlier: i64,
    report: &mut StormReport,
) -> anyhow::Result<()> {
    // Reservations by idempotency key (call index): a double click must
    // come back with one reservation.
    let mut by_key: HashMap<usize, HashSet<&str>> = HashMap::new();
    for (i, _, answer, _) in answers {
        if let Answer::Outcome {
            outcome: ReserveOutcome::Reserved | ReserveOutcome::Queued,
            reservation: Some(id),
        } = answer
        {
            by_key.entry(*i).or_default().insert(id.as_str());
        }
    }
    let doubled_keys: Vec<usize> = by_key
        .iter()
        .filter(|(_, ids)| ids.len() > 1)
        .map(|(i, _)| *i)
        .collect();
    let pairs: HashSet<usize> = answers
        .iter()
        .filter(|(_, second, _, _)| *second)
        .map(|(i, _, _, _)| *i)
        .collect();
    report.deduplicated = pairs
        .iter()
        .filter(|i| by_key.get(i).is_some_and(|ids| ids.len() == 1))
        .filter(|i| {
            answers
                .iter()
                .filter(|(j, _, a, _)| {
                    j == *i
                        && matches!(
                            a,
                            Answer::Outcome {
                                reservation: Some(_),
                                ..
                            }
                        )
                })
                .count()
                == 2
        })
        .count();
    let owners: HashMap<&str, usize> = by_key
        .iter()
        .flat_map(|(i, ids)| ids.iter().map(move |id| (*id, *i)))
        .collect();
    report.admitted = owners.len();

    // Settle: wait for every admitted reservation to leave QUEUED, confirm
    // the holds. Anything still QUEUED after the wait was lost. Many at
    // once: with rate limiting on, each user's calls are paced.
    let inventory = InventoryServiceClient::new(channel.clone());
    let deadline = Instant::now() + Duration::from_secs(120);
    let settled: Vec<anyhow::Result<(String, PbState, u32)>> =
        futures::stream::iter(owners.iter().map(|(id, i)| {
            let user = user_name(options, *i);
            settle_one(inventory.clone(), (*id).to_owned(), user, deadline)
        }))
        .buffer_unordered(64)
        .collect()
        .await;
    let mut lost = Vec::new();
    let mut units_confirmed: i64 = 0;
    for result in settled {
        let (id, state, quantity) = result?;
        match state {
            PbState::Confirmed => {
                report.confirmed += 1;
                units_confirmed += i64::from(quantity);
            }
            PbState::Rejected => report.rejected += 1,
            other => lost.push(format!("{id}: {other:?}")),
        }
    }
    let view = loop {
        let view = admin
            .client
            .get_stock(admin.request(GetStockRequest {
                sku: options.sku.clone(),
            }))
            .await
            .map_err(status("GetStock"))?
            .into_inner()
            .stock
            .context("GetStock without stock")?;
        if view.queued_units == 0 || Instant::now() > deadline {
            break view;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ordered = view.held_units + view.confirmed_units - earlier;
    report.units_ordered = ordered;
    report.oversold = (ordered - options.stock).max(0);
    let mut checks = vec![
        Check {
            name: "units ordered <= stock",
            ok: ordered <= options.stock,
            detail: format!("{ordered} ordered of {}", options.stock),
        },
        Check {
            name: "stock left = stock - units ordered",
            ok: view.db_stock == options.stock - ordered,
            detail: format!(
                "{} left, {} - {ordered} = {}",
                view.db_stock,
                options.stock,
                options.stock - ordered
            ),
        },
        Check {
            name: "every admitted reservation confirmed or rejected",
            ok: lost.is_empty() && report.confirmed + report.rejected == report.admitted,
            detail: if lost.is_empty() {
                format!(
                    "{} admitted: {} confirmed, {} rejected",
                    report.admitted, report.confirmed, report.rejected
                )
            } else {
                format!("not settled: {}", lost.join(", "))
            },
        },
        Check {
            name: "callers' confirmed units = units ordered",
            ok: units_confirmed == ordered,
            detail: format!("{units_confirmed} confirmed by callers, {ordered} in the database"),
        },
        Check {
            name: "one reservation per idempotency key",
            ok: doubled_keys.is_empty(),
            detail: if doubled_keys.is_empty() {
                format!(
                    "{} double clicks, {} answered with one reservation",
                    pairs.len(),
                    report.deduplicated
                )
            } else {
                format!("{} keys got two reservations", doubled_keys.len())
            },
        },
    ];
    if let Some(gate) = view.gate_stock {
        checks.push(Check {
            name: "gate agrees with the database",
            ok: gate == view.db_stock,
            detail: format!("gate {gate}, database {}", view.db_stock),
        });
    }
    let checked = admin
        .client
        .check_invariants(admin.request(stockgate::pb::CheckInvariantsRequest {
            sku: options.sku.clone(),
        }))
        .await
        .map_err(status("CheckInvariants"))?
        .into_inner();
    let problems: Vec<String> = checked
        .skus
        .into_iter()
        .flat_map(|s| s.problems)
        .chain(checked.problems)
        .collect();
    checks.push(Check {
        name: "the service's invariant checker",
        ok: checked.ok,
        detail: if problems.is_empty() {
            format!(
                "nothing disagrees (gate compared: {})",
                if checked.gate_compared { "yes" } else { "no" }
            )
        } else {
            problems.join("; ")
        },
    });
    if let Some(url) = &options.store {
        checks.extend(check_database(url, options, &owners).await?);
    }
    report.checks = checks;
    Ok(())
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

/// Retries a call refused by the rate limiter or the shedder, after the
/// hint it came with.
async fn paced<T, F, Fut>(mut call: F) -> Result<T, Status>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    loop {
        match call().await {
            Err(s) if s.code() == Code::ResourceExhausted => {
                back_off(&s, Duration::from_millis(100)).await;
            }
            other => return other,
        }
    }
}

/// Waits for one reservation to leave QUEUED and confirms it if HELD;
/// returns its final state and units.
async fn settle_one(
    client: InventoryServiceClient<Channel>,
    id: String,
    user: String,
    deadline: Instant,
) -> anyhow::Result<(String, PbState, u32)> {
    let user = metadata(&user, "user")?;
    fn as_user<T>(body: T, user: &MetadataValue<tonic::metadata::Ascii>) -> Request<T> {
        let mut request = Request::new(body);
        request.metadata_mut().insert("x-user-id", user.clone());
        request
    }
    let reservation = loop {
        let got = paced(|| {
            let mut client = client.clone();
            let request = as_user(
                GetReservationRequest {
                    reservation_id: id.clone(),
                },
                &user,
            );
            async move { client.get_reservation(request).await }
        })
        .await
        .map_err(status("GetReservation"))?
        .into_inner()
        .reservation
        .context("GetReservation without a reservation")?;
        if got.state() != PbState::Queued || Instant::now() > deadline {
            break got;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if reservation.state() != PbState::Held {
        return Ok((id, reservation.state(), reservation.quantity));
    }
    let confirmed = paced(|| {
        let mut client = client.clone();
        let request = as_user(
            ConfirmReservationRequest {
                reservation_id: id.clone(),
            },
            &user,
        );
        async move { client.confirm_reservation(request).await }
    })
    .await
    .map_err(status("ConfirmReservation"))?
    .into_inner()
    .reservation
    .context("ConfirmReservation without a reservation")?;
    Ok((id, confirmed.state(), confirmed.quantity))
}

/// The same invariants read from the database itself; `owners` are the
/// reservations callers were told about.
pub async fn check_database(
    url: &str,
    options: &StormOptions,
    owners: &HashMap<&str, usize>,
) -> anyhow::Result<Vec<Check>> {
    // `owners` maps reservation id to the call that got it.
    let target = stockgate::config::StoreBackend::Postgres(url.to_owned());
    let store =
        stockgate::store::Store::connect(target, &stockgate::config::StoreConfig::default())?;
    let sku = Sku::parse(&options.sku).map_err(|e| anyhow::anyhow!("--sku: {e}"))?;
    let rows = store.reservations_of(&sku).await?;
    let left = store
        .inventory(&sku)
        .await?
        .map(|row| row.stock)
        .context("the SKU is not in the database")?;
    let ordered: i64 = rows
        .iter()
        .filter(|r| r.state.holds_units())
        .map(|r| i64::from(r.quantity))
        .sum();
    let unknown: Vec<&str> = rows
        .iter()
        .map(|r| r.id.as_str())
        .filter(|id| !owners.contains_key(id))
        .collect();
    Ok(vec![
        Check {
            name: "database: units ordered <= stock",
            ok: ordered <= options.stock,
            detail: format!("{ordered} ordered in {} rows", rows.len()),
        },
        Check {
            name: "database: stock left = stock - units ordered",
            ok: left == options.stock - ordered,
            detail: format!("{left} left"),
        },
        Check {
            name: "database: no order a caller was not told about",
            ok: unknown.is_empty(),
            detail: format!("{} unknown rows", unknown.len()),
        },
    ])
}

/// Database writes the service attempted so far, from `/metrics`.
async fn db_writes(options: &StormOptions) -> Option<u64> {
    let url = options.metrics_url.as_deref()?;
    let text = fetch(url).await.ok()?;
    let total: f64 = text
        .lines()
        .filter(|l| l.starts_with(stockgate::metrics::DECISIONS) && l.contains("layer=\"db\""))
        // A write attempted: a commit, or a conditional update that lost
        // its race. Sold out and over cap are decided by the read.
        .filter(|l| l.contains("decision=\"committed\"") || l.contains("decision=\"conflict\""))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum();
    Some(total as u64)
}

/// A plain HTTP/1.0 GET (the metrics endpoint is plain HTTP).
async fn fetch(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .context("--metrics must be an http:// URL")?;
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let mut stream = tokio::net::TcpStream::connect(host).await?;
    stream
        .write_all(format!("GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
        .await?;
    let mut body = String::new();
    stream.read_to_string(&mut body).await?;
    Ok(body)
}

/// One configuration of the matrix: its name and the switches it sets.
pub struct Strategy {
    pub name: &'static str,
    pub layers: SetLayersRequest,
}

/// The matrix: every layer on, each off in turn, the database alone in
/// both modes, and the naive baseline (which oversells: that is the point).
pub fn matrix() -> Vec<Strategy> {
    let all = SetLayersRequest {
        rate_limit: Some(true),
        dedup: Some(true),
        gate: Some(true),
        queue: Some(true),
        db_check: DbCheckMode::Optimistic as i32,
        ..Default::default()
    };
    let with = |name: &'static str, change: fn(&mut SetLayersRequest)| {
        let mut layers = all.clone();
        change(&mut layers);
        Strategy { name, layers }
    };
    let alone = |mode: DbCheckMode| SetLayersRequest {
        rate_limit: Some(false),
        dedup: Some(false),
        gate: Some(false),
        queue: Some(false),
        db_check: mode as i32,
        force: mode == DbCheckMode::Off,
        reason: "stockgate storm --matrix".into(),
        ..Default::default()
    };
    vec![
        with("all layers", |_| {}),
        with("rate limit off", |l| l.rate_limit = Some(false)),
        with("dedup off", |l| l.dedup = Some(false)),
        with("gate off", |l| l.gate = Some(false)),
        with("queue off", |l| l.queue = Some(false)),
        Strategy {
            name: "database alone, optimistic",
            layers: alone(DbCheckMode::Optimistic),
        },
        Strategy {
            name: "database alone, pessimistic",
            layers: alone(DbCheckMode::Pessimistic),
        },
        Strategy {
            name: "NAIVE read-then-write (broken)",
            layers: alone(DbCheckMode::Off),
        },
    ]
}

/// Runs the storm once per strategy (each on a fresh SKU), restoring the
/// switches found at the start afterwards.
pub async fn run_matrix(options: &StormOptions) -> anyhow::Result<Vec<StormReport>> {
    let mut admin = Admin::connect(options).await?;
    let before = admin
        .client
        .get_layers(admin.request(stockgate::pb::GetLayersRequest {}))
        .await
        .map_err(status("GetLayers"))?
        .into_inner()
        .layers
        .context("GetLayers without layers")?;
    let mut reports = Vec::new();
    let mut result = Ok(());
    for (n, strategy) in matrix().into_iter().enumerate() {
        let mut layers = strategy.layers.clone();
        layers.reason = format!("stockgate storm --matrix: {}", strategy.name);
        if let Err(err) = admin
            .client
            .set_layers(admin.request(layers))
            .await
            .map_err(status("SetLayers"))
        {
            result = Err(err);
            break;
        }
        // Replicas follow within their poll interval; wait for it.
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        let mut this_run = options.clone();
        this_run.sku = format!("{}-{n}", options.sku);
        match run(&this_run, strategy.name).await {
            Ok(report) => reports.push(report),
            Err(err) => {
                result = Err(err);
                break;
            }
        }
    }
    let restore = SetLayersRequest {
        rate_limit: Some(before.rate_limit),
        dedup: Some(before.dedup),
        gate: Some(before.gate),
        queue: Some(before.queue),
        db_check: before.db_check,
        rate_limit_shadow: Some(before.rate_limit_shadow),
        gate_failure_mode: before.gate_failure_mode,
        force: true,
        reason: "stockgate storm --matrix: restore".into(),
        ..Default::default()
    };
    admin
        .client
        .set_layers(admin.request(restore))
        .await
        .map_err(status("SetLayers (restore)"))?;
    result.map(|()| reports)
}

/// The single run's table.
pub fn render(report: &StormReport) -> String {
    let o = &report.options;
    let mut out = format!(
        "storm: {} calls ({} double clicks) from {} users for {} units of {} at concurrency {} over {} connections\n\n",
        report.calls,
        report.calls - o.requests,
        o.users,
        o.stock,
        o.sku,
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

/// The matrix's comparison table.
pub fn render_matrix(reports: &[StormReport]) -> String {
    let mut out = format!(
        "{:<32} {:>8} {:>9} {:>10} {:>10} {:>9} {:>10}  {}\n",
        "strategy", "orders", "oversold", "db writes", "calls/s", "p99 ms", "last ms", "invariants"
    );
    for r in reports {
        out.push_str(&format!(
            "{:<32} {:>8} {:>9} {:>10} {:>10.0} {:>9.2} {:>10.0}  {}\n",
            r.strategy,
            r.units_ordered,
            r.oversold,
            r.db_writes.map_or("-".into(), |w| w.to_string()),
            r.calls_per_sec,
            r.p99_ms,
            r.last_answer_ms,
            if r.ok() { "hold" } else { "BROKEN" }
        ));
    }
    out
}
