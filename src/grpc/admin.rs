//! `stockgate.v1.AdminService`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

use crate::{
    config::{DbCheckMode, GateFailureMode},
    domain::{
        switches::{Layers, LayersChange, RateSettings},
        ReservationId, ReservationState, SaleId, SaleWindow, Sku, SoldOutPolicy,
        MAX_DRAW_WINDOW_MS,
    },
    error::ReservationError,
    fleet::{ChangeRequest, SwitchBoard, MAX_REASON},
    middleware::{InFlight, RateLimits},
    pb::{self, admin_service_server::AdminService},
    queue::{
        dead_letters::{DeadLetter, Moved, Selection, MAX_LIST, MAX_MOVE},
        DeadLetters,
    },
    reserve::{queue_error, store_error, Pipeline, StockView},
    store::{NewAudit, ReservationFilter, SaleView},
};

use super::{metadata_str, state, timestamp};

pub struct AdminApi {
    pipeline: Arc<Pipeline>,
    /// `None` for the embedded queue, which keeps none.
    dead_letters: Option<Arc<dyn DeadLetters>>,
    rate_limits: Arc<RateLimits>,
    in_flight: Option<Arc<InFlight>>,
    board: Arc<SwitchBoard>,
    /// How long past its expiry a hold may wait for the sweeper before the
    /// checker calls it stuck.
    hold_grace: std::time::Duration,
    /// The server's `server.request_timeout_ms`: a draw window must end
    /// well inside it, or its first entrants' calls time out.
    request_timeout: std::time::Duration,
}

impl AdminApi {
    pub fn new(
        pipeline: Arc<Pipeline>,
        rate_limits: Arc<RateLimits>,
        in_flight: Option<Arc<InFlight>>,
        board: Arc<SwitchBoard>,
        hold_grace: std::time::Duration,
        dead_letters: Option<Arc<dyn DeadLetters>>,
    ) -> Self {
        Self {
            pipeline,
            dead_letters,
            rate_limits,
            in_flight,
            board,
            hold_grace,
            request_timeout: std::time::Duration::from_secs(5),
        }
    }

    /// The server's request timeout, which bounds a draw window.
    pub fn with_request_timeout(mut self, request_timeout: std::time::Duration) -> Self {
        self.request_timeout = request_timeout;
        self
    }
}

/// What a draw window leaves of the request timeout for deciding the
/// draw (about 1.3 s for 100,000 entrants on Redis) and the call's own
/// path after it.
const DRAW_MARGIN_MS: u64 = 2_000;

/// The admin credential, swappable on SIGHUP: the SHA-256 of the token, so
/// the comparison takes the same time whatever the length or content of
/// what a caller sends.
pub type AdminToken = Arc<ArcSwap<Option<[u8; 32]>>>;

pub fn token_digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Checks `authorization: Bearer <token>` on every admin call.
#[derive(Clone)]
pub struct AdminAuth {
    pub token: AdminToken,
    /// With no token configured: let calls through (a loopback-only admin
    /// listener, local development) or refuse them all.
    pub open_without_token: bool,
}

/// Who is calling, for the audit trail: `x-operator` (or "unknown") and
/// the peer address.
pub const OPERATOR_METADATA: &str = "x-operator";

/// How an admin call was let in, for the audit trail: which token (by
/// the start of its SHA-256, never the token), or none on loopback. Set by
/// [`AdminAuth`]; `x-operator` is only what the caller says.
#[derive(Debug, Clone)]
struct AdminIdentity(String);

/// A caller without the token can send refusals at will: the audit log
/// keeps samples, the metric counts every one.
static REFUSAL_LOGS: crate::telemetry::Sampled = crate::telemetry::Sampled::new();

impl tonic::service::Interceptor for AdminAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let refuse = |why: &'static str, request: &Request<()>| {
            crate::metrics::admin_auth_failure();
            if let Some(left_out) = REFUSAL_LOGS.admit() {
                let operator = request
                    .metadata()
                    .get(OPERATOR_METADATA)
                    .and_then(|v| v.to_str().ok())
                    .map(|op| crate::telemetry::truncated(op, 64).into_owned());
                tracing::warn!(
                    target: "stockgate::audit",
                    peer = ?request.remote_addr(),
                    operator,
                    why,
                    left_out,
                    "admin call refused"
                );
            }
            Err(ReservationError::Unauthenticated(why).into())
        };
        let Some(expected) = **self.token.load() else {
            if self.open_without_token {
                request
                    .extensions_mut()
                    .insert(AdminIdentity("no token (loopback listener)".into()));
                return Ok(request);
            }
            return refuse(
                "admin.token is not set and the admin listener is not loopback-only; the admin API is closed",
                &request,
            );
        };
        let presented = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let Some(presented) = presented else {
            return refuse("missing `authorization: Bearer <token>` metadata", &request);
        };
        let digest = token_digest(presented);
        let difference = digest
            .iter()
            .zip(expected.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if difference != 0 {
            return refuse("wrong admin token", &request);
        }
        let id: String = expected[..4].iter().map(|b| format!("{b:02x}")).collect();
        request
            .extensions_mut()
            .insert(AdminIdentity(format!("token sha256:{id}")));
        Ok(request)
    }
}

fn actor<T>(request: &Request<T>, replica: &str) -> Result<String, ReservationError> {
    let operator =
        metadata_str(request.metadata().as_ref(), OPERATOR_METADATA)?.unwrap_or("unknown");
    let operator = crate::telemetry::truncated(operator, 100);
    let peer = request
        .remote_addr()
        .map_or_else(|| "unknown peer".to_owned(), |a| a.to_string());
    let identity = request
        .extensions()
        .get::<AdminIdentity>()
        .map_or("no credential checked", |id| id.0.as_str());
    let caller = request
        .extensions()
        .get::<crate::middleware::CallerIdentity>()
        .map(|caller| format!(", client {}", caller.0))
        .unwrap_or_default();
    Ok(format!(
        "{operator} from {peer} via {replica} ({identity}{caller})"
    ))
}

/// A count a caller may leave at 0 for `default`, else 1 to `max`.
fn count_within(
    field: &'static str,
    value: u32,
    default: usize,
    max: usize,
) -> Result<usize, ReservationError> {
    match value as usize {
        0 => Ok(default),
        n if n <= max => Ok(n),
        _ => Err(ReservationError::invalid(
            field,
            format!("must be between 0 and {max}, got {value}"),
        )),
    }
}

fn limit(value: u32) -> Result<i64, ReservationError> {
    count_within("limit", value, 50, 1000).map(|n| n as i64)
}

/// Longest key a dead-letter selection may name (reservation ids and body
/// digests are shorter).
const MAX_KEY: usize = 64;

/// Which dead letters a redrive or purge takes, validated field by field.
fn selection(body: Option<&pb::DeadLetterSelection>) -> Result<Selection, ReservationError> {
    let none = || ReservationError::invalid("selection", "name `keys` or set `all`");
    let body = body.ok_or_else(none)?;
    match (body.keys.is_empty(), body.all) {
        (true, false) => Err(none()),
        (false, true) => Err(ReservationError::invalid(
            "selection",
            "`keys` or `all`, not both",
        )),
        (true, true) => {
            count_within("selection.limit", body.limit, 100, MAX_MOVE).map(Selection::First)
        }
        (false, false) => {
            if body.limit != 0 {
                return Err(ReservationError::invalid(
                    "selection.limit",
                    "applies only with `all`",
                ));
            }
            if body.keys.len() > MAX_MOVE {
                return Err(ReservationError::invalid(
                    "selection.keys",
                    format!("at most {MAX_MOVE} keys, got {}", body.keys.len()),
                ));
            }
            if let Some(bad) = body
                .keys
                .iter()
                .find(|k| k.is_empty() || k.chars().count() > MAX_KEY)
            {
                return Err(ReservationError::invalid(
                    "selection.keys",
                    format!(
                        "each key 1-{MAX_KEY} characters, got one of {}",
                        bad.chars().count()
                    ),
                ));
            }
            let mut keys = body.keys.clone();
            keys.sort_unstable();
            keys.dedup();
            Ok(Selection::Keys(keys))
        }
    }
}

fn reason(text: &str, required: bool) -> Result<&str, ReservationError> {
    if required && text.trim().is_empty() {
        return Err(ReservationError::invalid(
            "reason",
            "required: say why, for the audit trail",
        ));
    }
    if text.chars().count() > MAX_REASON {
        return Err(ReservationError::invalid(
            "reason",
            format!("at most {MAX_REASON} characters"),
        ));
    }
    Ok(text)
}

fn dead_letter(letter: DeadLetter) -> pb::DeadLetter {
    let (reservation_id, sku, user_id, quantity) = match letter.order {
        Some(queued) => {
            let order = queued.order;
            (
                order.id.as_str().to_owned(),
                order.sku.as_str().to_owned(),
                order.user.as_str().to_owned(),
                order.quantity,
            )
        }
        None => Default::default(),
    };
    pb::DeadLetter {
        key: letter.key,
        reservation_id,
        sku,
        user_id,
        quantity,
        error: letter.error,
        dead_lettered_at: letter.dead_lettered_at.map(timestamp),
        message_bytes: letter.body_bytes as u64,
        preview: letter.preview,
    }
}

fn moved(moved: &Moved) -> pb::DeadLettersMoved {
    pb::DeadLettersMoved {
        keys: moved.keys.clone(),
        not_found: moved.not_found.clone(),
        remaining: moved.remaining,
    }
}

/// What an audit event keeps of a selection and of what it moved: the
/// keys, cut short past this many.
const AUDITED_KEYS: usize = 100;

fn keys_json(keys: &[String]) -> serde_json::Value {
    let shown: Vec<&String> = keys.iter().take(AUDITED_KEYS).collect();
    serde_json::json!({ "count": keys.len(), "keys": shown })
}

/// The two ways out of the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    Redrive,
    Purge,
}

impl Way {
    /// The audit event's action.
    fn action(self) -> &'static str {
        match self {
            Self::Redrive => "dlq_redrive",
            Self::Purge => "dlq_purge",
        }
    }

    /// The metric's `action` label.
    fn label(self) -> &'static str {
        match self {
            Self::Redrive => "redrive",
            Self::Purge => "purge",
        }
    }
}

impl AdminApi {
    fn dead_letters(&self) -> Result<&Arc<dyn DeadLetters>, ReservationError> {
        self.dead_letters
            .as_ref()
            .ok_or(ReservationError::NoDeadLetterQueue("embedded"))
    }

    /// Runs a redrive or purge and audits it, whatever came of it. The work
    /// runs on a task of its own: a caller that gives up (its deadline)
    /// does not stop it half way, and it is audited all the same.
    async fn move_dead_letters<T>(
        &self,
        request: Request<T>,
        way: Way,
        parts: impl FnOnce(&T) -> (Option<&pb::DeadLetterSelection>, &str),
    ) -> Result<Moved, ReservationError> {
        let actor = actor(&request, self.board.replica())?;
        let body = request.into_inner();
        let (asked, why) = parts(&body);
        let which = selection(asked)?;
        // Purged messages are gone: the trail must say why.
        let why = reason(why, way == Way::Purge)?.to_owned();
        let dead_letters = Arc::clone(self.dead_letters()?);
        let board = Arc::clone(&self.board);
        let store = self.pipeline.store().clone();
        let work = async move {
            let before = match &which {
                Selection::Keys(keys) => keys_json(keys),
                Selection::First(n) => serde_json::json!({ "first": n }),
            };
            // A copy of a purged order still in the order queue (a redrive
            // interrupted earlier) must not bring it back: its row is
            // marked first when the keys are known, else right after.
            let ids = |keys: &[String]| -> Vec<ReservationId> {
                keys.iter()
                    .filter_map(|key| ReservationId::parse(key).ok())
                    .collect()
            };
            let result = match (way, &which) {
                (Way::Redrive, _) => dead_letters.redrive(&which).await.map_err(queue_error),
                (Way::Purge, Selection::Keys(keys)) => match store.close_given_up(&ids(keys)).await
                {
                    Ok(_) => dead_letters.purge(&which).await.map_err(queue_error),
                    Err(err) => Err(store_error(err)),
                },
                (Way::Purge, Selection::First(_)) => {
                    match dead_letters.purge(&which).await.map_err(queue_error) {
                        Ok(moved) => match store.close_given_up(&ids(&moved.keys)).await {
                            Ok(_) => Ok(moved),
                            Err(err) => Ok(Moved {
                                interrupted: Some(format!(
                                    "purged, but their reservations not marked: {err}"
                                )),
                                ..moved
                            }),
                        },
                        Err(err) => Err(err),
                    }
                }
            };
            let (outcome, after) = match &result {
                Ok(moved) => {
                    let mut after = keys_json(&moved.keys);
                    after["not_found"] = keys_json(&moved.not_found);
                    after["remaining"] = moved.remaining.into();
                    let outcome = match &moved.interrupted {
                        None => "applied".to_owned(),
                        Some(why) => format!("interrupted: {why}"),
                    };
                    (outcome, after)
                }
                Err(err) => (format!("failed: {err}"), serde_json::json!({})),
            };
            board
                .record(&NewAudit {
                    at: crate::domain::now(),
                    actor: &actor,
                    action: way.action(),
                    outcome: &outcome,
                    before: &before.to_string(),
                    after: &after.to_string(),
                    reason: &why,
                })
                .await;
            if let Ok(moved) = &result {
                crate::metrics::dead_letters_moved(way.label(), moved.keys.len());
            }
            result
        };
        let moved = tokio::spawn(work)
            .await
            .map_err(|err| ReservationError::Internal(err.into()))??;
        if let Some(why) = &moved.interrupted {
            return Err(ReservationError::unavailable(
                "order queue",
                anyhow::anyhow!("stopped after moving {} messages: {why}", moved.keys.len()),
            ));
        }
        Ok(moved)
    }
}

/// Most SKUs one sale may list: bounds one SetSale's work and audit row.
const MAX_SALE_SKUS: usize = 1_000;

fn sale_message(view: SaleView) -> pb::Sale {
    pb::Sale {
        sale_id: view.sale_id,
        max_per_user: view.max_per_user,
        skus: view.skus,
    }
}

fn sale_json(view: &SaleView) -> serde_json::Value {
    serde_json::json!({
        "sale_id": view.sale_id,
        "max_per_user": view.max_per_user,
        "skus": view.skus,
    })
}

/// Largest stock one SKU may be set to; far above any sale, far below
/// overflow in every sum we take.
const MAX_STOCK: i64 = 1_000_000_000_000;

fn stock_view(view: StockView) -> pb::StockView {
    pb::StockView {
        sku: view.row.sku,
        db_stock: view.row.stock,
        db_version: view.row.version,
        gate_stock: view.gate_stock,
        held_units: view.held_units,
        confirmed_units: view.confirmed_units,
        queued_units: view.queued_units,
        max_per_user: u32::try_from(view.row.max_per_user).unwrap_or(0),
        sold_out_policy: match SoldOutPolicy::from_db(&view.row.sold_out_policy) {
            SoldOutPolicy::Instant => pb::SoldOutPolicy::Instant,
            SoldOutPolicy::Waitlist => pb::SoldOutPolicy::Waitlist,
        } as i32,
        waitlist_limit: u32::try_from(view.row.waitlist_limit).unwrap_or(0),
        waitlisted_units: view.waitlisted_units,
        opens_at: view.row.opens_at.map(timestamp),
        closes_at: view.row.closes_at.map(timestamp),
        sale_id: view.row.sale_id.unwrap_or_default(),
        draw_window_ms: u32::try_from(view.row.draw_window_ms).unwrap_or(0),
    }
}

/// Last second of 9999-12-31, the latest time a window may name.
const LATEST_SECOND: i64 = 253_402_300_799;

/// One side of a sale window, kept to the millisecond (the gate's unit).
fn window_time(
    field: &'static str,
    at: Option<&prost_types::Timestamp>,
) -> Result<Option<chrono::NaiveDateTime>, ReservationError> {
    let Some(at) = at else {
        return Ok(None);
    };
    if !(0..=LATEST_SECOND).contains(&at.seconds) || !(0..1_000_000_000).contains(&at.nanos) {
        return Err(ReservationError::invalid(
            field,
            "must be a time between 1970-01-01 and 9999-12-31 (nanos 0 to 999,999,999)",
        ));
    }
    let millis = at.seconds * 1_000 + i64::from(at.nanos / 1_000_000);
    Ok(chrono::DateTime::from_timestamp_millis(millis).map(|t| t.naive_utc()))
}

/// A window as the audit trail keeps it.
fn window_json(window: SaleWindow) -> serde_json::Value {
    let side = |t: Option<chrono::NaiveDateTime>| t.as_ref().map(crate::error::rfc3339_ms);
    serde_json::json!({
        "opens_at": side(window.opens_at),
        "closes_at": side(window.closes_at),
        "draw_window_ms": window.draw_window_ms,
    })
}

/// Unix ms as a protobuf time.
fn timestamp_ms(ms: i64) -> prost_types::Timestamp {
    timestamp(crate::domain::from_millis(ms))
}

/// An entrant as GetDraw lists it, back as the gate's, for re-running a
/// draw from its record ([`crate::gate::draw::replay`]).
impl From<&pb::DrawEntrant> for crate::gate::DrawEntrant {
    fn from(e: &pb::DrawEntrant) -> Self {
        use crate::gate::DrawOutcome;
        Self {
            id: e.reservation_id.clone(),
            user: e.user_id.clone(),
            quantity: e.quantity,
            arrival: e.arrival,
            drawn: e.drawn,
            outcome: match e.outcome() {
                pb::DrawOutcome::Admitted => Some(DrawOutcome::Admitted),
                pb::DrawOutcome::SoldOut => Some(DrawOutcome::SoldOut),
                pb::DrawOutcome::UserLimitReached => Some(DrawOutcome::UserLimit),
                pb::DrawOutcome::Withdrawn => Some(DrawOutcome::Withdrawn),
                pb::DrawOutcome::Unspecified => None,
            },
        }
    }
}

/// Entrants one GetDraw answer carries when the caller sets no `limit`,
/// and at most: a page stays well under gRPC's usual 4 MiB message limit.
const DRAW_PAGE: u32 = 1_000;
const DRAW_PAGE_MOST: u32 = 10_000;

/// The draw as GetDraw answers it: its entrants from arrival `offset`,
/// at most `limit` of them.
fn draw_message(
    sku: &Sku,
    draw: crate::gate::Draw,
    offset: u32,
    limit: u32,
) -> pb::GetDrawResponse {
    use crate::gate::DrawOutcome;
    let entrant_count = u32::try_from(draw.entrants.len()).unwrap_or(u32::MAX);
    pb::GetDrawResponse {
        entrant_count,
        sku: sku.as_str().to_owned(),
        opens_at: Some(timestamp_ms(draw.opens_at_ms)),
        closes_at: Some(timestamp_ms(draw.ends_at_ms)),
        seed: draw.seed,
        drawn_at: draw.drawn_at_ms.map(timestamp_ms),
        stock_at_draw: draw.stock_at_draw,
        entrants: draw
            .entrants
            .into_iter()
            .skip(offset as usize)
            .take(limit as usize)
            .map(|e| pb::DrawEntrant {
                reservation_id: e.id,
                user_id: e.user,
                quantity: e.quantity,
                arrival: e.arrival,
                drawn: e.drawn,
                outcome: match e.outcome {
                    None => pb::DrawOutcome::Unspecified,
                    Some(DrawOutcome::Admitted) => pb::DrawOutcome::Admitted,
                    Some(DrawOutcome::SoldOut) => pb::DrawOutcome::SoldOut,
                    Some(DrawOutcome::UserLimit) => pb::DrawOutcome::UserLimitReached,
                    Some(DrawOutcome::Withdrawn) => pb::DrawOutcome::Withdrawn,
                } as i32,
            })
            .collect(),
        overflow: draw.overflow,
    }
}

/// Most entries one SKU's waitlist may be set to hold.
const MAX_WAITLIST: u32 = 1_000_000;

fn db_check(mode: DbCheckMode) -> pb::DbCheckMode {
    match mode {
        DbCheckMode::Optimistic => pb::DbCheckMode::Optimistic,
        DbCheckMode::Pessimistic => pb::DbCheckMode::Pessimistic,
        DbCheckMode::Off => pb::DbCheckMode::Off,
    }
}

fn gate_failure(mode: GateFailureMode) -> pb::GateFailureMode {
    match mode {
        GateFailureMode::FailClosed => pb::GateFailureMode::FailClosed,
        GateFailureMode::Bypass => pb::GateFailureMode::Bypass,
    }
}

fn layers(layers: Layers) -> pb::Layers {
    let rates = layers.rate_limits;
    pb::Layers {
        rate_limit: layers.rate_limit,
        dedup: layers.dedup,
        gate: layers.gate,
        queue: layers.queue,
        db_check: db_check(layers.db_check) as i32,
        rate_limit_shadow: layers.rate_limit_shadow,
        rate_limits: Some(pb::RateLimitSettings {
            per_user_period_ms: rates.per_user_period_ms,
            per_user_burst: rates.per_user_burst,
            global_per_sec: rates.global_per_sec,
            global_burst: rates.global_burst,
        }),
        gate_failure_mode: gate_failure(layers.gate_failure) as i32,
    }
}

/// A SetLayers request that sets every switch to `target`, for tools that
/// must not inherit the switches stored in the database (the benchmarks).
pub fn set_every_switch(target: Layers, reason: &str) -> pb::SetLayersRequest {
    let view = layers(target);
    pb::SetLayersRequest {
        rate_limit: Some(view.rate_limit),
        rate_limit_shadow: Some(view.rate_limit_shadow),
        rate_limits: view.rate_limits,
        dedup: Some(view.dedup),
        gate: Some(view.gate),
        gate_failure_mode: view.gate_failure_mode,
        queue: Some(view.queue),
        db_check: view.db_check,
        force: false,
        reason: reason.into(),
    }
}

/// The change a SetLayers request asks for, validated field by field.
pub fn layers_change(body: &pb::SetLayersRequest) -> Result<LayersChange, ReservationError> {
    let db_check = match pb::DbCheckMode::try_from(body.db_check) {
        Ok(pb::DbCheckMode::Unspecified) => None,
        Ok(pb::DbCheckMode::Optimistic) => Some(DbCheckMode::Optimistic),
        Ok(pb::DbCheckMode::Pessimistic) => Some(DbCheckMode::Pessimistic),
        Ok(pb::DbCheckMode::Off) => Some(DbCheckMode::Off),
        Err(_) => {
            return Err(ReservationError::invalid(
                "db_check",
                format!("unknown mode {}", body.db_check),
            ))
        }
    };
    let gate_failure = match pb::GateFailureMode::try_from(body.gate_failure_mode) {
        Ok(pb::GateFailureMode::Unspecified) => None,
        Ok(pb::GateFailureMode::FailClosed) => Some(GateFailureMode::FailClosed),
        Ok(pb::GateFailureMode::Bypass) => Some(GateFailureMode::Bypass),
        Err(_) => {
            return Err(ReservationError::invalid(
                "gate_failure_mode",
                format!("unknown mode {}", body.gate_failure_mode),
            ))
        }
    };
    let rate_limits = match &body.rate_limits {
        None => None,
        Some(rates) => {
            let settings = RateSettings {
                per_user_period_ms: rates.per_user_period_ms,
                per_user_burst: rates.per_user_burst,
                global_per_sec: rates.global_per_sec,
                global_burst: rates.global_burst,
            };
            if let Some(field) = settings.zero_field() {
                return Err(ReservationError::invalid(field, "must be 1 or more"));
            }
            if settings.per_user_period_ms > 86_400_000 {
                return Err(ReservationError::invalid(
                    "rate_limits.per_user_period_ms",
                    "must be at most one day",
                ));
            }
            Some(settings)
        }
    };
    reason(&body.reason, false)?;
    Ok(LayersChange {
        rate_limit: body.rate_limit,
        rate_limit_shadow: body.rate_limit_shadow,
        rate_limits,
        dedup: body.dedup,
        gate: body.gate,
        gate_failure,
        queue: body.queue,
        db_check,
    })
}

#[tonic::async_trait]
impl AdminService for AdminApi {
    async fn set_stock(
        &self,
        request: Request<pb::SetStockRequest>,
    ) -> Result<Response<pb::SetStockResponse>, Status> {
        let body = request.into_inner();
        let sku = Sku::parse(&body.sku)?;
        if !(0..=MAX_STOCK).contains(&body.stock) {
            return Err(ReservationError::invalid(
                "stock",
                format!("must be between 0 and {MAX_STOCK}, got {}", body.stock),
            )
            .into());
        }
        if body.max_per_user > i32::MAX as u32 {
            return Err(ReservationError::invalid("max_per_user", "too large").into());
        }
        let view = self
            .pipeline
            .set_stock(&sku, body.stock, body.max_per_user)
            .await?;
        Ok(Response::new(pb::SetStockResponse {
            stock: Some(stock_view(view)),
        }))
    }

    async fn adjust_stock(
        &self,
        request: Request<pb::AdjustStockRequest>,
    ) -> Result<Response<pb::AdjustStockResponse>, Status> {
        let body = request.into_inner();
        let sku = Sku::parse(&body.sku)?;
        if body.delta == 0 || body.delta.abs() > MAX_STOCK {
            return Err(ReservationError::invalid(
                "delta",
                format!("must be non-zero and at most {MAX_STOCK} in size"),
            )
            .into());
        }
        let view = self.pipeline.adjust_stock(&sku, body.delta).await?;
        Ok(Response::new(pb::AdjustStockResponse {
            stock: Some(stock_view(view)),
        }))
    }

    async fn set_sold_out_policy(
        &self,
        request: Request<pb::SetSoldOutPolicyRequest>,
    ) -> Result<Response<pb::SetSoldOutPolicyResponse>, Status> {
        let body = request.into_inner();
        let sku = Sku::parse(&body.sku)?;
        let policy = match pb::SoldOutPolicy::try_from(body.policy) {
            Ok(pb::SoldOutPolicy::Instant) => SoldOutPolicy::Instant,
            Ok(pb::SoldOutPolicy::Waitlist) => SoldOutPolicy::Waitlist,
            _ => {
                return Err(ReservationError::invalid(
                    "policy",
                    format!(
                        "must be SOLD_OUT_POLICY_INSTANT or SOLD_OUT_POLICY_WAITLIST, got {}",
                        body.policy
                    ),
                )
                .into())
            }
        };
        if body.waitlist_limit > MAX_WAITLIST {
            return Err(ReservationError::invalid(
                "waitlist_limit",
                format!(
                    "must be at most {MAX_WAITLIST} (0 = the server's default), got {}",
                    body.waitlist_limit
                ),
            )
            .into());
        }
        let view = self
            .pipeline
            .set_sold_out_policy(&sku, policy, body.waitlist_limit)
            .await?;
        Ok(Response::new(pb::SetSoldOutPolicyResponse {
            stock: Some(stock_view(view)),
        }))
    }

    async fn set_sale_window(
        &self,
        request: Request<pb::SetSaleWindowRequest>,
    ) -> Result<Response<pb::SetSaleWindowResponse>, Status> {
        let actor = actor(&request, self.board.replica())?;
        let body = request.into_inner();
        let sku = Sku::parse(&body.sku)?;
        let window = SaleWindow {
            opens_at: window_time("opens_at", body.opens_at.as_ref())?,
            closes_at: window_time("closes_at", body.closes_at.as_ref())?,
            draw_window_ms: body.draw_window_ms,
        };
        if window.draw_window_ms > 0 {
            if window.draw_window_ms > MAX_DRAW_WINDOW_MS {
                return Err(ReservationError::invalid("draw_window_ms", "at most 10,000").into());
            }
            let most = (self.request_timeout.as_millis() as u64).saturating_sub(DRAW_MARGIN_MS);
            if u64::from(window.draw_window_ms) > most {
                return Err(ReservationError::invalid(
                    "draw_window_ms",
                    format!(
                        "at most {most} with this server's server.request_timeout_ms (the draw's first entrants wait all of it); raise that first"
                    ),
                )
                .into());
            }
            let Some(draw_closes) = window.draw_closes_at() else {
                return Err(ReservationError::invalid(
                    "draw_window_ms",
                    "needs opens_at: a draw follows the opening",
                )
                .into());
            };
            if window.closes_at.is_some_and(|closes| closes < draw_closes) {
                return Err(ReservationError::invalid(
                    "draw_window_ms",
                    "the draw must close no later than closes_at",
                )
                .into());
            }
        }
        if let (Some(opens), Some(closes)) = (window.opens_at, window.closes_at) {
            if closes <= opens {
                return Err(ReservationError::invalid(
                    "closes_at",
                    "must be after opens_at (to the millisecond)",
                )
                .into());
            }
        }
        let why = reason(&body.reason, true)?;
        let result = self.pipeline.set_sale_window(&sku, window).await;
        let (outcome, before) = match &result {
            Ok((before, _)) => ("applied".to_owned(), window_json(before.window())),
            Err(err) => (format!("failed: {err}"), serde_json::json!({})),
        };
        let mut after = window_json(window);
        after["sku"] = sku.as_str().into();
        self.board
            .record(&NewAudit {
                at: crate::domain::now(),
                actor: &actor,
                action: "set_sale_window",
                outcome: &outcome,
                before: &before.to_string(),
                after: &after.to_string(),
                reason: why,
            })
            .await;
        let (_, view) = result?;
        Ok(Response::new(pb::SetSaleWindowResponse {
            stock: Some(stock_view(view)),
        }))
    }

    async fn set_sale(
        &self,
        request: Request<pb::SetSaleRequest>,
    ) -> Result<Response<pb::SetSaleResponse>, Status> {
        let actor = actor(&request, self.board.replica())?;
        let body = request.into_inner();
        let sale = SaleId::parse(&body.sale_id)?;
        if body.max_per_user > i32::MAX as u32 {
            return Err(ReservationError::invalid("max_per_user", "at most 2,147,483,647").into());
        }
        if body.skus.len() > MAX_SALE_SKUS {
            return Err(ReservationError::invalid(
                "skus",
                format!("at most {MAX_SALE_SKUS} SKUs, got {}", body.skus.len()),
            )
            .into());
        }
        let mut skus = Vec::with_capacity(body.skus.len());
        for sku in &body.skus {
            let sku = Sku::parse(sku).map_err(|err| match err {
                ReservationError::InvalidArgument { reason, .. } => {
                    ReservationError::invalid("skus", reason)
                }
                other => other,
            })?;
            if skus.contains(&sku) {
                return Err(ReservationError::invalid(
                    "skus",
                    format!("{:?} is listed twice", sku.as_str()),
                )
                .into());
            }
            skus.push(sku);
        }
        let why = reason(&body.reason, true)?;
        let result = self
            .pipeline
            .set_sale(&sale, body.max_per_user, &skus)
            .await;
        // Applied: the sale as stored; refused: what was asked.
        let (outcome, before, after) = match &result {
            Ok((before, after)) => (
                "applied".to_owned(),
                before.as_ref().map_or(serde_json::json!({}), sale_json),
                sale_json(after),
            ),
            Err(err) => (
                format!("failed: {err}"),
                serde_json::json!({}),
                serde_json::json!({
                    "sale_id": sale.as_str(),
                    "max_per_user": body.max_per_user,
                    "skus": body.skus,
                }),
            ),
        };
        self.board
            .record(&NewAudit {
                at: crate::domain::now(),
                actor: &actor,
                action: "set_sale",
                outcome: &outcome,
                before: &before.to_string(),
                after: &after.to_string(),
                reason: why,
            })
            .await;
        let (_, after) = result?;
        Ok(Response::new(pb::SetSaleResponse {
            sale: Some(sale_message(after)),
        }))
    }

    async fn get_sale(
        &self,
        request: Request<pb::GetSaleRequest>,
    ) -> Result<Response<pb::GetSaleResponse>, Status> {
        let sale = SaleId::parse(&request.get_ref().sale_id)?;
        let view = self.pipeline.sale(&sale).await?;
        Ok(Response::new(pb::GetSaleResponse {
            sale: Some(sale_message(view)),
        }))
    }

    async fn get_draw(
        &self,
        request: Request<pb::GetDrawRequest>,
    ) -> Result<Response<pb::GetDrawResponse>, Status> {
        let body = request.into_inner();
        let sku = Sku::parse(&body.sku)?;
        let limit = match body.limit {
            0 => DRAW_PAGE,
            n if n <= DRAW_PAGE_MOST => n,
            _ => return Err(ReservationError::invalid("limit", "at most 10,000").into()),
        };
        let draw = self.pipeline.draw(&sku).await?;
        Ok(Response::new(draw_message(&sku, draw, body.offset, limit)))
    }

    async fn get_stock(
        &self,
        request: Request<pb::GetStockRequest>,
    ) -> Result<Response<pb::GetStockResponse>, Status> {
        let sku = Sku::parse(&request.get_ref().sku)?;
        let view = self.pipeline.stock(&sku).await?;
        Ok(Response::new(pb::GetStockResponse {
            stock: Some(stock_view(view)),
        }))
    }

    async fn get_layers(
        &self,
        _request: Request<pb::GetLayersRequest>,
    ) -> Result<Response<pb::GetLayersResponse>, Status> {
        let stats = self.rate_limits.stats();
        // The fleet view needs the database; this replica's own view not.
        let replicas = match self.board.replicas().await {
            Ok(replicas) => replicas,
            Err(err) => {
                tracing::warn!(error = %err, "replica list unavailable");
                Vec::new()
            }
        };
        Ok(Response::new(pb::GetLayersResponse {
            layers: Some(layers(self.pipeline.layers())),
            rate_limit_stats: Some(pb::RateLimitStats {
                admitted: stats.admitted,
                refused: stats.refused,
                shadow_refused: stats.shadow_refused,
                tracked_users: stats.tracked_users,
            }),
            load_shed_stats: self.in_flight.as_ref().map(|limit| {
                let stats = limit.stats();
                pb::LoadShedStats {
                    max_in_flight: stats.max_in_flight,
                    in_flight: stats.in_flight,
                    peak_in_flight: stats.peak_in_flight,
                    shed: stats.shed,
                }
            }),
            replica: self.board.replica().to_owned(),
            revision: self.board.revision(),
            stored_revision: self.board.stored_revision(),
            replicas: replicas
                .into_iter()
                .map(|r| pb::ReplicaLayers {
                    replica: r.replica,
                    revision: r.revision,
                    layers: r.layers.map(layers),
                    seen_at: Some(timestamp(r.seen_at)),
                })
                .collect(),
        }))
    }

    async fn set_layers(
        &self,
        request: Request<pb::SetLayersRequest>,
    ) -> Result<Response<pb::SetLayersResponse>, Status> {
        let actor = actor(&request, self.board.replica())?;
        let body = request.into_inner();
        let change = layers_change(&body)?;
        let (after, revision) = self
            .board
            .change(ChangeRequest {
                change,
                actor: &actor,
                force: body.force,
                reason: &body.reason,
            })
            .await?;
        Ok(Response::new(pb::SetLayersResponse {
            layers: Some(layers(after)),
            revision,
        }))
    }

    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        let limit = limit(request.get_ref().limit)?;
        let events = self.board.audit_events(limit).await?;
        Ok(Response::new(pb::ListAuditEventsResponse {
            events: events
                .into_iter()
                .map(|e| pb::AuditEvent {
                    id: e.id,
                    at: Some(timestamp(e.at)),
                    actor: e.actor,
                    action: e.action,
                    outcome: e.outcome,
                    before: e.before,
                    after: e.after,
                    reason: e.reason,
                })
                .collect(),
        }))
    }

    async fn check_invariants(
        &self,
        request: Request<pb::CheckInvariantsRequest>,
    ) -> Result<Response<pb::CheckInvariantsResponse>, Status> {
        let body = request.into_inner();
        let sku = if body.sku.is_empty() {
            None
        } else {
            Some(Sku::parse(&body.sku)?)
        };
        let report = crate::check::run(&self.pipeline, sku.as_ref(), self.hold_grace).await?;
        Ok(Response::new(pb::CheckInvariantsResponse {
            ok: report.ok(),
            skus: report
                .skus
                .into_iter()
                .map(|s| pb::SkuInvariants {
                    sku: s.sku,
                    supplied: s.supplied,
                    db_stock: s.stock,
                    held_units: s.held,
                    confirmed_units: s.confirmed,
                    gate_stock: s.gate_stock,
                    gate_in_flight: s.gate_in_flight,
                    problems: s.problems,
                    notes: s.notes,
                })
                .collect(),
            problems: report.problems,
            queue_backlog: report.queue_backlog,
            gate_compared: report.gate_compared,
        }))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let limit = count_within("limit", request.get_ref().limit, 20, MAX_LIST)?;
        let (letters, depth) = self
            .dead_letters()?
            .list(limit)
            .await
            .map_err(queue_error)?;
        ::metrics::gauge!("stockgate_dlq_messages").set(depth as f64);
        Ok(Response::new(pb::ListDeadLettersResponse {
            dead_letters: letters.into_iter().map(dead_letter).collect(),
            depth,
        }))
    }

    async fn redrive_dead_letters(
        &self,
        request: Request<pb::RedriveDeadLettersRequest>,
    ) -> Result<Response<pb::RedriveDeadLettersResponse>, Status> {
        let done = self
            .move_dead_letters(request, Way::Redrive, |body| {
                (body.selection.as_ref(), body.reason.as_str())
            })
            .await?;
        Ok(Response::new(pb::RedriveDeadLettersResponse {
            moved: Some(moved(&done)),
        }))
    }

    async fn purge_dead_letters(
        &self,
        request: Request<pb::PurgeDeadLettersRequest>,
    ) -> Result<Response<pb::PurgeDeadLettersResponse>, Status> {
        let done = self
            .move_dead_letters(request, Way::Purge, |body| {
                (body.selection.as_ref(), body.reason.as_str())
            })
            .await?;
        Ok(Response::new(pb::PurgeDeadLettersResponse {
            moved: Some(moved(&done)),
        }))
    }

    async fn list_reservations(
        &self,
        request: Request<pb::ListReservationsRequest>,
    ) -> Result<Response<pb::ListReservationsResponse>, Status> {
        let body = request.into_inner();
        let sku = if body.sku.is_empty() {
            None
        } else {
            Some(Sku::parse(&body.sku)?.as_str().to_owned())
        };
        let wanted = match pb::ReservationState::try_from(body.state) {
            Ok(pb::ReservationState::Unspecified) => None,
            Ok(pb::ReservationState::Queued) => {
                return Err(ReservationError::invalid(
                    "state",
                    "QUEUED reservations have no database row yet; use GetStock's queued_units",
                )
                .into())
            }
            Ok(wanted) => [
                ReservationState::Waitlisted,
                ReservationState::Held,
                ReservationState::Confirmed,
                ReservationState::Released,
                ReservationState::Expired,
                ReservationState::Rejected,
            ]
            .into_iter()
            .find(|s| state(*s) == wanted),
            Err(_) => {
                return Err(ReservationError::invalid(
                    "state",
                    format!("unknown state {}", body.state),
                )
                .into())
            }
        };
        let filter = ReservationFilter {
            sku,
            state: wanted.map(ReservationState::as_db),
            limit: limit(body.limit)?,
        };
        let rows = self.pipeline.list_reservations(&filter).await?;
        Ok(Response::new(pb::ListReservationsResponse {
            reservations: rows.into_iter().map(pb::Reservation::from).collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use tonic::service::Interceptor;

    use super::*;

    fn call(auth: &mut AdminAuth, bearer: Option<&str>) -> Result<(), tonic::Code> {
        let mut request = Request::new(());
        if let Some(bearer) = bearer {
            request
                .metadata_mut()
                .insert("authorization", bearer.parse().unwrap());
        }
        auth.call(request).map(drop).map_err(|s| s.code())
    }

    #[test]
    fn the_token_is_required_and_compared_whole() {
        let mut auth = AdminAuth {
            token: Arc::new(ArcSwap::from_pointee(Some(token_digest("tok")))),
            open_without_token: true,
        };
        assert_eq!(call(&mut auth, Some("Bearer tok")), Ok(()));
        for bad in [
            None,
            Some("Bearer to"),
            Some("Bearer tokk"),
            Some("tok"),
            Some("Basic tok"),
        ] {
            assert_eq!(
                call(&mut auth, bad),
                Err(tonic::Code::Unauthenticated),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn without_a_token_only_a_loopback_listener_is_open() {
        let none: AdminToken = Arc::new(ArcSwap::from_pointee(None));
        let mut open = AdminAuth {
            token: none.clone(),
            open_without_token: true,
        };
        assert_eq!(call(&mut open, None), Ok(()));
        let mut closed = AdminAuth {
            token: none,
            open_without_token: false,
        };
        assert_eq!(call(&mut closed, None), Err(tonic::Code::Unauthenticated));
        assert_eq!(
            call(&mut closed, Some("Bearer anything")),
            Err(tonic::Code::Unauthenticated)
        );
    }
}
