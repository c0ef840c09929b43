//! Whatever bytes arrive: decode them as each request message the server
//! accepts (as tonic's prost codec would), put the rest into caller
//! metadata, and run the server's own validation and error mapping. Any
//! panic is a bug; every refusal must become a status with a message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use stockgate::{
    domain::ReservationId,
    error::ReservationError,
    grpc::{layers_change, validate_reserve},
    pb,
};
use tonic::{metadata::MetadataValue, Status};

fn refuse(err: ReservationError) {
    let status = Status::from(err);
    assert!(!status.message().is_empty());
}

fuzz_target!(|data: &[u8]| {
    // The first bytes say where the body ends; the rest is metadata.
    let split = data.first().map_or(0, |b| usize::from(*b)).min(data.len());
    let (body, rest) = data.split_at(split);
    let (user, key) = rest.split_at(rest.len() / 2);
    let mut metadata = tonic::metadata::MetadataMap::new();
    if let Ok(user) = MetadataValue::try_from(user) {
        metadata.insert("x-user-id", user);
    }
    if let Ok(key) = MetadataValue::try_from(key) {
        metadata.insert("idempotency-key", key);
    }
    if let Ok(request) = pb::ReserveRequest::decode(body) {
        for max in [1, 10, 10_000] {
            match validate_reserve(&metadata, &request, max) {
                Ok(command) => assert!((1..=max).contains(&command.quantity.get())),
                Err(err) => refuse(err),
            }
        }
    }
    if let Ok(request) = pb::GetReservationRequest::decode(body) {
        if let Err(err) = ReservationId::parse(&request.reservation_id) {
            refuse(err);
        }
    }
    if let Ok(request) = pb::SetLayersRequest::decode(body) {
        if let Err(err) = layers_change(&request) {
            refuse(err);
        }
    }
});
