//! The one domain error and its one conversion into a gRPC status.
//!
//! Every layer reports failures in its own terms; the pipeline turns them
//! into [`ReservationError`], and `From<ReservationError> for Status` is the
//! only place that chooses status codes, so the codes documented in the
//! proto stay true.

use tonic::{Code, Status};

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
    /// No reservation with this id.
    #[error("reservation {0:?} not found")]
    ReservationNotFound(String),
    /// The reservation is owned by another user.
    #[error("reservation {0:?} belongs to another user")]
    NotOwner(String),
    /// The reservation's state forbids the call.
    #[error("{0}")]
    WrongState(String),
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
    /// The replica is at `server.max_in_flight`; retry after the given time.
    #[error("server busy: too many calls in flight; retry in {retry_after:?}")]
    Shed { retry_after: std::time::Duration },
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
    /// Another operator changed the switches at the same moment.
    #[error("the layer switches were changed concurrently; read them again and retry")]
    ConcurrentChange,
    /// An admin call without a valid credential.
    #[error("{0}")]
    Unauthenticated(&'static str),
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

impl From<ReservationError> for Status {
    fn from(err: ReservationError) -> Self {
        // The caller gets a short message; the cause chain stays in our log.
        let code = match &err {
            ReservationError::InvalidArgument { .. } => Code::InvalidArgument,
            ReservationError::UnknownSku(_) | ReservationError::ReservationNotFound(_) => {
                Code::NotFound
            }
            ReservationError::NotOwner(_) => Code::PermissionDenied,
            ReservationError::WrongState(_)
            | ReservationError::InsufficientStock(_)
            | ReservationError::UnsafeChange(_) => Code::FailedPrecondition,
            ReservationError::Contention(_)
            | ReservationError::DuplicateInFlight
            | ReservationError::ConcurrentChange => Code::Aborted,
            ReservationError::Unauthenticated(_) => Code::Unauthenticated,
            ReservationError::RateLimited { .. } | ReservationError::Shed { .. } => {
                Code::ResourceExhausted
            }
            ReservationError::NotReady(_) | ReservationError::Unavailable { .. } => {
                Code::Unavailable
            }
            ReservationError::Internal(_) => Code::Internal,
        };
        match code {
            Code::Internal => {
                tracing::error!(error = ?err, "internal error");
                Status::internal("internal error")
            }
            Code::Unavailable => {
                tracing::warn!(error = ?err, "backend unavailable");
                Status::unavailable(err.to_string())
            }
            Code::ResourceExhausted => {
                let mut status = Status::new(code, err.to_string());
                if let ReservationError::RateLimited { retry_after, .. }
                | ReservationError::Shed { retry_after } = err
                {
                    // Whole seconds, rounded up, as HTTP's Retry-After.
                    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
                    status
                        .metadata_mut()
                        .insert(RETRY_AFTER, secs.max(1).into());
                }
                status
            }
            _ => Status::new(code, err.to_string()),
        }
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

    #[test]
    fn internal_details_stay_on_the_server() {
        let status = Status::from(ReservationError::Internal(anyhow::anyhow!("password=x")));
        assert!(!status.message().contains("password"));
    }
}
