//! gRPC services: decode and validate, call the pipeline, encode. No SQL,
//! no gate or queue calls here.

mod admin;
mod inventory;

pub use admin::{
    layers_change, set_every_switch, token_digest, AdminApi, AdminAuth, AdminToken,
    OPERATOR_METADATA,
};
pub use inventory::{validate_reserve, InventoryApi, ReserveAtOnce};

use chrono::NaiveDateTime;
use tonic::metadata::MetadataMap;

use crate::{
    domain::{IdempotencyKey, Reservation, ReservationState, UserId},
    error::ReservationError,
    pb,
};

/// Reads a metadata value as text; a present but non-ASCII value is an
/// error naming the key, not "missing".
fn metadata_str<'a>(
    metadata: &'a http::HeaderMap,
    key: &'static str,
) -> Result<Option<&'a str>, ReservationError> {
    match metadata.get(key) {
        None => Ok(None),
        Some(value) => value
            .to_str()
            .map(Some)
            .map_err(|_| ReservationError::invalid(key, "must be visible ASCII")),
    }
}

pub(crate) fn user_id(metadata: &MetadataMap) -> Result<UserId, ReservationError> {
    user_id_header(metadata.as_ref())
}

/// The caller's user id from raw request headers, checked as the handlers
/// check it: the middleware keeps no per-user state for an id a handler
/// would refuse.
pub fn user_id_header(headers: &http::HeaderMap) -> Result<UserId, ReservationError> {
    match metadata_str(headers, UserId::METADATA)? {
        Some(value) => UserId::parse(value),
        None => Err(ReservationError::invalid(
            UserId::METADATA,
            "request metadata must carry the caller's user id",
        )),
    }
}

pub(crate) fn idempotency_key(
    metadata: &MetadataMap,
) -> Result<Option<IdempotencyKey>, ReservationError> {
    idempotency_key_header(metadata.as_ref())
}

/// The idempotency key from raw request headers, checked as Reserve checks it.
pub fn idempotency_key_header(
    headers: &http::HeaderMap,
) -> Result<Option<IdempotencyKey>, ReservationError> {
    metadata_str(headers, IdempotencyKey::METADATA)?
        .map(IdempotencyKey::parse)
        .transpose()
}

fn timestamp(at: NaiveDateTime) -> prost_types::Timestamp {
    let utc = at.and_utc();
    prost_types::Timestamp {
        seconds: utc.timestamp(),
        nanos: utc.timestamp_subsec_nanos() as i32,
    }
}

fn state(state: ReservationState) -> pb::ReservationState {
    match state {
        ReservationState::Waitlisted => pb::ReservationState::Waitlisted,
        ReservationState::Queued => pb::ReservationState::Queued,
        ReservationState::Held => pb::ReservationState::Held,
        ReservationState::Confirmed => pb::ReservationState::Confirmed,
        ReservationState::Released => pb::ReservationState::Released,
        ReservationState::Expired => pb::ReservationState::Expired,
        ReservationState::Rejected => pb::ReservationState::Rejected,
    }
}

impl From<Reservation> for pb::Reservation {
    fn from(r: Reservation) -> Self {
        // A hold's expiry, or a waitlist entry's.
        let held = matches!(
            r.state,
            ReservationState::Held | ReservationState::Waitlisted
        );
        pb::Reservation {
            reservation_id: r.id.as_str().to_owned(),
            sku: r.sku.as_str().to_owned(),
            user_id: r.user.as_str().to_owned(),
            quantity: r.quantity,
            state: state(r.state) as i32,
            queue_position: r.queue_position,
            waitlist_position: r.waitlist_position,
            reject_reason: r.reject_reason.unwrap_or_default(),
            created_at: Some(timestamp(r.created_at)),
            updated_at: Some(timestamp(r.updated_at)),
            expires_at: r.expires_at.filter(|_| held).map(timestamp),
            idempotency_key: r
                .idempotency_key
                .map(|k| k.as_str().to_owned())
                .unwrap_or_default(),
            cart_id: r
                .cart_id
                .map(|id| id.as_str().to_owned())
                .unwrap_or_default(),
            lines: r
                .lines
                .into_iter()
                .map(|line| pb::ReservationLine {
                    sku: line.sku.as_str().to_owned(),
                    quantity: line.quantity,
                    reject_reason: line.reject_reason.unwrap_or_default(),
                })
                .collect(),
        }
    }
}
