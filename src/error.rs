//! The one domain error and its one conversion into a gRPC status.
//!
//! Every layer reports failures in its own terms; the pipeline turns them
//! into [`ReservationError`], and `From<ReservationError> for Status` is the
//! only place that chooses status codes, so the codes documented in the
//! proto stay true.

use std::{collections::HashMap, time::Duration};

use tonic::{metadata::MetadataMap, Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// Why a call could not be decided.
#[derive(Debug, thiserror::Error)]
pub enum ReservationError {
    /// A request field or metadata value is malformed. `field` is the name
    /// the caller used (`sku`, `x-user-id`, ...).
    #[error("invalid {field}: {reason}")]
    InvalidArgument { field: &'static str, reason: String },
    /// The SKU does not exist.
    #[error("unknown sku {0:?}")]
    UnknownSku(String),
    /// No sale with this id.
    #[error("unknown sale {0:?}")]
    UnknownSale(String),
    /// The gate holds no draw for the SKU's opening.
    #[error(
        "no draw for sku {0:?}: it has no draw window, nobody entered yet, or the draw expired"
    )]
    UnknownDraw(String),
    /// A SKU's window cannot change while its draw is open or being
    /// decided.
    #[error("{0}")]
    DrawInProgress(String),
    /// A SKU named for a sale belongs to another one.
    #[error("sku {sku:?} belongs to sale {sale:?}; take it out of that sale first")]
    SkuInOtherSale { sku: String, sale: String },
    /// No reservation with this id.
    #[error("reservation {0:?} not found")]
    ReservationNotFound(String),
    /// The reservation is owned by another user.
    #[error("reservation {0:?} belongs to another user")]
    NotOwner(String),
    /// The reservation's state forbids the call.
    #[error("{0}")]
    WrongState(String),
    /// The hold's time ran out before the call (it is EXPIRED, or about
    /// to be swept).
    #[error("{0}")]
    HoldExpired(String),
    /// The reservation is still QUEUED: there is no hold to confirm or release yet.
    #[error("{0}")]
    StillQueued(String),
    /// An extension would make the hold last longer than the server allows;
    /// `latest` is the latest expiry it may have.
    #[error(
        "reservation {id} can be held until {} at the latest (reservations.max_hold_secs = {max_hold_secs})",
        rfc3339_ms(latest)
    )]
    HoldLimit {
        id: String,
        latest: chrono::NaiveDateTime,
        max_hold_secs: u64,
    },
    /// An adjustment would take stock below zero.
    #[error("{0}")]
    InsufficientStock(String),
    /// The optimistic check lost every attempt; nothing was written.
    #[error("stock row changed {0} times in a row; nothing reserved, retry")]
    Contention(u32),
    /// Another call with the same idempotency key is still running and did
    /// not answer within `layers.dedup.wait_ms`.
    #[error("a call with this idempotency key is still running; retry it")]
    DuplicateInFlight,
    /// Over a rate limit; retry after the given time.
    #[error("rate limited ({scope} limit); retry in {retry_after:?}")]
    RateLimited {
        scope: &'static str,
        retry_after: std::time::Duration,
    },
    /// The replica is at `server.max_in_flight` (`scope` "replica"), the
    /// calling service holds its share of it ("caller"), or the request
    /// bytes being read are at `server.max_reading_bytes` ("reading");
    /// retry after the given time.
    #[error("server busy ({scope} limit); retry in {retry_after:?}")]
    Shed {
        scope: &'static str,
        retry_after: std::time::Duration,
    },
    /// The replica (`scope` "replica") or this user ("user") has `max`
    /// WatchReservation streams open already.
    #[error("too many open watches ({scope} limit of {max}); close one first")]
    TooManyWatches { scope: &'static str, max: usize },
    /// The request message did not arrive within the server's body
    /// timeout after its headers.
    #[error("the request message did not arrive within {0:?} of its headers")]
    RequestTooSlow(Duration),
    /// The call's deadline (the caller's `grpc-timeout`, capped by
    /// `server.request_timeout_ms`) passed before it was decided; whether
    /// an order was taken is unknown until the caller asks again with the
    /// same idempotency key.
    #[error("the call's deadline of {0:?} passed before it was decided; retry with the same idempotency key to learn the outcome")]
    DeadlineExceeded(Duration),
    /// Start-up has not finished (store not migrated or reachable).
    #[error("service not ready: {0}")]
    NotReady(String),
    /// A backend refused or did not answer; nothing was reserved.
    #[error("{what} unavailable")]
    Unavailable {
        what: &'static str,
        #[source]
        source: anyhow::Error,
    },
    /// A switch change would leave nothing able to stop an oversell, and
    /// the operator did not force it.
    #[error("refused: {0}; set force to apply it anyway")]
    UnsafeChange(String),
    /// Dead-letter operations with a queue that keeps no dead letters
    /// (embedded).
    #[error("the {0} order queue keeps no dead-letter queue; given-up orders are the REJECTED reservations whose reason starts \"processing failed\"")]
    NoDeadLetterQueue(&'static str),
    /// Another operator changed the switches at the same moment.
    #[error("the layer switches were changed concurrently; read them again and retry")]
    ConcurrentChange,
    /// An admin call without a valid credential.
    #[error("{0}")]
    Unauthenticated(&'static str),
    /// The calling service's certificate names no identity in
    /// `server.tls.allowed_clients` (the first one it names).
    #[error("calling identity {0:?} is not allowed")]
    CallerNotAllowed(String),
    /// A bug or an unexpected backend answer.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl ReservationError {
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::InvalidArgument {
            field,
            reason: reason.into(),
        }
    }

    pub fn unavailable(what: &'static str, source: impl Into<anyhow::Error>) -> Self {
        Self::Unavailable {
            what,
            source: source.into(),
        }
    }
}

/// Response metadata telling a refused caller how many seconds to wait.
pub const RETRY_AFTER: &str = "retry-after";

/// A UTC time as callers read it in messages and error details.
pub(crate) fn rfc3339_ms(time: &chrono::NaiveDateTime) -> String {
    time.and_utc()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// `google.rpc.ErrorInfo.domain` of every error the service itself gives.
pub const ERROR_DOMAIN: &str = "stockgate.v1";

/// How long an UNAVAILABLE caller is asked to wait: start-up retries and
/// backend reconnects run on about this period.
const UNAVAILABLE_RETRY: Duration = Duration::from_secs(1);

impl ReservationError {
    /// The gRPC code and the stable `ErrorInfo.reason` of each error, in
    /// one table. Reasons are documented in inventory.proto ("Error
    /// details") and never renamed.
    fn code_and_reason(&self) -> (Code, &'static str) {
        match self {
            Self::InvalidArgument { .. } => (Code::InvalidArgument, "INVALID_ARGUMENT"),
            Self::UnknownSku(_) => (Code::NotFound, "UNKNOWN_SKU"),
            Self::UnknownSale(_) => (Code::NotFound, "UNKNOWN_SALE"),
            Self::UnknownDraw(_) => (Code::NotFound, "UNKNOWN_DRAW"),
            Self::DrawInProgress(_) => (Code::FailedPrecondition, "DRAW_IN_PROGRESS"),
            Self::SkuInOtherSale { .. } => (Code::FailedPrecondition, "SKU_IN_OTHER_SALE"),
            Self::ReservationNotFound(_) => (Code::NotFound, "RESERVATION_NOT_FOUND"),
            Self::NotOwner(_) => (Code::PermissionDenied, "NOT_OWNER"),
            Self::WrongState(_) => (Code::FailedPrecondition, "WRONG_STATE"),
            Self::HoldExpired(_) => (Code::FailedPrecondition, "HOLD_EXPIRED"),
            Self::StillQueued(_) => (Code::FailedPrecondition, "STILL_QUEUED"),
            Self::HoldLimit { .. } => (Code::FailedPrecondition, "HOLD_LIMIT"),
            Self::InsufficientStock(_) => (Code::FailedPrecondition, "STOCK_BELOW_ZERO"),
            Self::Contention(_) => (Code::Aborted, "CONTENTION"),
            Self::DuplicateInFlight => (Code::Aborted, "DUPLICATE_IN_FLIGHT"),
            Self::RateLimited { .. } => (Code::ResourceExhausted, "RATE_LIMITED"),
            Self::Shed { .. } => (Code::ResourceExhausted, "OVERLOADED"),
            Self::TooManyWatches { .. } => (Code::ResourceExhausted, "TOO_MANY_WATCHES"),
            Self::RequestTooSlow(_) => (Code::DeadlineExceeded, "REQUEST_TOO_SLOW"),
            Self::DeadlineExceeded(_) => (Code::DeadlineExceeded, "DEADLINE_EXCEEDED"),
            Self::NotReady(_) => (Code::Unavailable, "NOT_READY"),
            Self::Unavailable { .. } => (Code::Unavailable, "BACKEND_UNAVAILABLE"),
            Self::UnsafeChange(_) => (Code::FailedPrecondition, "UNSAFE_LAYER_CHANGE"),
            Self::NoDeadLetterQueue(_) => (Code::FailedPrecondition, "NO_DEAD_LETTER_QUEUE"),
            Self::ConcurrentChange => (Code::Aborted, "CONCURRENT_CHANGE"),
            Self::Unauthenticated(_) => (Code::Unauthenticated, "UNAUTHENTICATED"),
            Self::CallerNotAllowed(_) => (Code::PermissionDenied, "CALLER_NOT_ALLOWED"),
            Self::Internal(_) => (Code::Internal, "INTERNAL"),
        }
    }

    /// The stable `ErrorInfo.reason` a caller can branch on.
    pub fn reason(&self) -> &'static str {
        self.code_and_reason().1
    }

    /// How long a caller should wait before retrying, where waiting helps.
    fn retry_delay(&self) -> Option<Duration> {
        match self {
            Self::RateLimited { retry_after, .. } | Self::Shed { retry_after, .. } => {
                Some(*retry_after)
            }
            Self::NotReady(_) | Self::Unavailable { .. } => Some(UNAVAILABLE_RETRY),
            _ => None,
        }
    }

    /// The standard error details (`google.rpc.Status.details`): an
    /// `ErrorInfo` always, a `BadRequest` naming the field for
    /// INVALID_ARGUMENT, a `RetryInfo` when `retry` says waiting helps.
    fn details(&self, reason: &'static str, retry: Option<Duration>) -> ErrorDetails {
        let mut details = ErrorDetails::new();
        let mut about = HashMap::new();
        match self {
            Self::InvalidArgument { field, reason } => {
                details.add_bad_request_violation(*field, reason.clone());
                about.insert("field".to_owned(), (*field).to_owned());
            }
            Self::RateLimited { scope, .. }
            | Self::Shed { scope, .. }
            | Self::TooManyWatches { scope, .. } => {
                about.insert("scope".to_owned(), (*scope).to_owned());
            }
            Self::Unavailable { what, .. } => {
                about.insert("backend".to_owned(), (*what).to_owned());
            }
            Self::HoldLimit { latest, .. } => {
                about.insert("latest_expires_at".to_owned(), rfc3339_ms(latest));
            }
            _ => {}
        }
        details.set_error_info(reason, ERROR_DOMAIN, about);
        if retry.is_some() {
            details.set_retry_info(retry);
        }
        details
    }
}

/// Backend outages and bugs can come once per call under load: logged as
/// samples (metrics count every call).
static UNAVAILABLE_LOGS: crate::telemetry::Sampled = crate::telemetry::Sampled::new();
static INTERNAL_LOGS: crate::telemetry::Sampled = crate::telemetry::Sampled::new();

impl From<ReservationError> for Status {
    fn from(err: ReservationError) -> Self {
        Status::from(&err)
    }
}

impl From<&ReservationError> for Status {
    fn from(err: &ReservationError) -> Self {
        // The caller gets a short message; the cause chain stays in our log
        // (its text only: a backtrace an error captured is not logged).
        let (code, reason) = err.code_and_reason();
        match code {
            Code::Internal => {
                if let Some(left_out) = INTERNAL_LOGS.admit() {
                    tracing::error!(error = %DisplayChain(err), left_out, "internal error");
                }
                return Status::internal("internal error");
            }
            Code::Unavailable => {
                if let Some(left_out) = UNAVAILABLE_LOGS.admit() {
                    tracing::warn!(error = %DisplayChain(err), left_out, "backend unavailable");
                }
            }
            _ => {}
        }
        let retry = err.retry_delay();
        let mut metadata = MetadataMap::new();
        if let Some(delay) = retry {
            // Whole seconds, rounded up, as HTTP's Retry-After.
            let secs = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
            metadata.insert(RETRY_AFTER, secs.max(1).into());
        }
        let details = err.details(reason, retry);
        Status::with_error_details_and_metadata(code, err.to_string(), details, metadata)
    }
}

/// An error and its causes on one line, without any captured backtrace.
pub(crate) struct DisplayChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for DisplayChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_match_the_contract() {
        let cases = [
            (
                ReservationError::invalid("sku", "empty"),
                Code::InvalidArgument,
            ),
            (ReservationError::UnknownSku("x".into()), Code::NotFound),
            (
                ReservationError::ReservationNotFound("x".into()),
                Code::NotFound,
            ),
            (
                ReservationError::NotOwner("x".into()),
                Code::PermissionDenied,
            ),
            (
                ReservationError::WrongState("x".into()),
                Code::FailedPrecondition,
            ),
            (
                ReservationError::HoldExpired("x".into()),
                Code::FailedPrecondition,
            ),
            (
                ReservationError::StillQueued("x".into()),
                Code::FailedPrecondition,
            ),
            (ReservationError::Contention(3), Code::Aborted),
            (ReservationError::DuplicateInFlight, Code::Aborted),
            (ReservationError::ConcurrentChange, Code::Aborted),
            (
                ReservationError::UnsafeChange("x".into()),
                Code::FailedPrecondition,
            ),
            (
                ReservationError::Unauthenticated("x"),
                Code::Unauthenticated,
            ),
            (
                ReservationError::Shed {
                    scope: "replica",
                    retry_after: std::time::Duration::from_secs(1),
                },
                Code::ResourceExhausted,
            ),
            (
                ReservationError::RateLimited {
                    scope: "user",
                    retry_after: std::time::Duration::from_millis(1),
                },
                Code::ResourceExhausted,
            ),
            (ReservationError::NotReady("x".into()), Code::Unavailable),
            (
                ReservationError::unavailable("store", anyhow::anyhow!("down")),
                Code::Unavailable,
            ),
            (
                ReservationError::Internal(anyhow::anyhow!("bug")),
                Code::Internal,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
    }

    #[test]
    fn invalid_argument_names_the_field() {
        let status = Status::from(ReservationError::invalid("quantity", "must be at least 1"));
        assert_eq!(status.message(), "invalid quantity: must be at least 1");
    }

    #[test]
    fn rate_limited_carries_a_retry_hint_in_whole_seconds() {
        let status = Status::from(ReservationError::RateLimited {
            scope: "user",
            retry_after: std::time::Duration::from_millis(1_200),
        });
        assert_eq!(status.metadata().get(RETRY_AFTER).unwrap(), "2");
    }

    /// The reasons are part of the contract (inventory.proto, "Error
    /// details"): renaming one breaks callers that branch on it.
    #[test]
    fn reasons_are_the_documented_ones() {
        let secs = std::time::Duration::from_secs(1);
        let cases = [
            (ReservationError::invalid("sku", "x"), "INVALID_ARGUMENT"),
            (ReservationError::UnknownSku("x".into()), "UNKNOWN_SKU"),
            (
                ReservationError::ReservationNotFound("x".into()),
                "RESERVATION_NOT_FOUND",
            ),
            (ReservationError::NotOwner("x".into()), "NOT_OWNER"),
            (ReservationError::WrongState("x".into()), "WRONG_STATE"),
            (ReservationError::HoldExpired("x".into()), "HOLD_EXPIRED"),
            (ReservationError::StillQueued("x".into()), "STILL_QUEUED"),
            (
                ReservationError::HoldLimit {
                    id: "x".into(),
                    latest: chrono::NaiveDateTime::default(),
                    max_hold_secs: 1,
                },
                "HOLD_LIMIT",
            ),
            (
                ReservationError::InsufficientStock("x".into()),
                "STOCK_BELOW_ZERO",
            ),
            (ReservationError::Contention(3), "CONTENTION"),
            (ReservationError::DuplicateInFlight, "DUPLICATE_IN_FLIGHT"),
            (
                ReservationError::RateLimited {
                    scope: "global",
                    retry_after: secs,
                },
                "RATE_LIMITED",
            ),
            (
                ReservationError::Shed {
                    scope: "caller",
                    retry_after: secs,
                },
                "OVERLOADED",
            ),
            (
                ReservationError::TooManyWatches {
                    scope: "user",
                    max: 8,
                },
                "TOO_MANY_WATCHES",
            ),
            (
                ReservationError::RequestTooSlow(Duration::from_secs(1)),
                "REQUEST_TOO_SLOW",
            ),
            (
                ReservationError::DeadlineExceeded(Duration::from_millis(150)),
                "DEADLINE_EXCEEDED",
            ),
            (ReservationError::NotReady("x".into()), "NOT_READY"),
            (
                ReservationError::unavailable("database", anyhow::anyhow!("x")),
                "BACKEND_UNAVAILABLE",
            ),
            (
                ReservationError::UnsafeChange("x".into()),
                "UNSAFE_LAYER_CHANGE",
            ),
            (
                ReservationError::NoDeadLetterQueue("embedded"),
                "NO_DEAD_LETTER_QUEUE",
            ),
            (ReservationError::ConcurrentChange, "CONCURRENT_CHANGE"),
            (ReservationError::Unauthenticated("x"), "UNAUTHENTICATED"),
            (
                ReservationError::CallerNotAllowed("x".into()),
                "CALLER_NOT_ALLOWED",
            ),
        ];
        let proto = include_str!("../proto/stockgate/v1/inventory.proto");
        for (err, reason) in cases {
            assert!(proto.contains(reason), "{reason} is not documented");
            let status = Status::from(err);
            let info = status.get_details_error_info().unwrap();
            assert_eq!(
                (info.reason.as_str(), info.domain.as_str()),
                (reason, ERROR_DOMAIN)
            );
        }
    }

    #[test]
    fn every_error_carries_a_stable_reason_and_what_helps() {
        let status = Status::from(ReservationError::invalid("quantity", "must be at least 1"));
        let details = status.get_error_details();
        let field = &details.bad_request().unwrap().field_violations[0];
        assert_eq!(
            (field.field.as_str(), field.description.as_str()),
            ("quantity", "must be at least 1")
        );
        let info = details.error_info().unwrap();
        assert_eq!(
            (info.reason.as_str(), info.domain.as_str()),
            ("INVALID_ARGUMENT", ERROR_DOMAIN)
        );
        assert_eq!(info.metadata["field"], "quantity");
        assert!(details.retry_info().is_none());

        let status = Status::from(ReservationError::HoldExpired("gone".into()));
        assert_eq!(status.code(), Code::FailedPrecondition);
        let info = status.get_details_error_info().unwrap();
        assert_eq!(info.reason, "HOLD_EXPIRED");

        for (err, secs) in [
            (
                ReservationError::RateLimited {
                    scope: "user",
                    retry_after: std::time::Duration::from_millis(2_500),
                },
                3,
            ),
            (
                ReservationError::unavailable("stock gate", anyhow::anyhow!("refused")),
                1,
            ),
            (ReservationError::NotReady("starting".into()), 1),
        ] {
            let status = Status::from(err);
            let retry = status.get_details_retry_info().unwrap();
            assert!(retry.retry_delay.is_some_and(|d| !d.is_zero()));
            assert_eq!(
                status.metadata().get(RETRY_AFTER).unwrap(),
                secs.to_string().as_str()
            );
        }
        let status = Status::from(ReservationError::unavailable(
            "stock gate",
            anyhow::anyhow!("x"),
        ));
        let info = status.get_details_error_info().unwrap();
        assert_eq!(
            (info.reason.as_str(), info.metadata["backend"].as_str()),
            ("BACKEND_UNAVAILABLE", "stock gate")
        );
    }

    #[test]
    fn internal_details_stay_on_the_server() {
        let status = Status::from(ReservationError::Internal(anyhow::anyhow!("password=x")));
        assert!(!status.message().contains("password"));
        assert!(status.details().is_empty());
    }
}
