//! `stockgate.v1.InventoryService`.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use prost::Message;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::{idempotency_key, user_id};
use crate::{
    domain::{Quantity, ReservationId, ReservationState, Sku, WindowCheck},
    error::ReservationError,
    middleware::{AnswerAtOnce, Provisional, StoredAnswer},
    pb::{self, inventory_service_server::InventoryService},
    reserve::{CartCommand, CartResult, LineRefusal, Pipeline, ReserveCommand, ReserveResult},
};

pub struct InventoryApi {
    pipeline: Arc<Pipeline>,
}

impl InventoryApi {
    pub fn new(pipeline: Arc<Pipeline>) -> Self {
        Self { pipeline }
    }
}

/// The sold-out fast path for the dedup layer: a valid Reserve the pipeline
/// can answer without I/O gets the answer `reserve` would give, framed as
/// this server frames it. It keeps the server's message limit, so an
/// oversized request runs and is refused as tonic refuses it.
pub struct ReserveAtOnce {
    pipeline: Arc<Pipeline>,
    max_message_bytes: usize,
}

impl ReserveAtOnce {
    pub fn new(pipeline: Arc<Pipeline>, max_message_bytes: usize) -> Self {
        Self {
            pipeline,
            max_message_bytes,
        }
    }
}

impl AnswerAtOnce for ReserveAtOnce {
    fn answer_at_once(&self, headers: &http::HeaderMap, body: &[u8]) -> Option<StoredAnswer> {
        let message = StoredAnswer::unframe(body).filter(|m| m.len() <= self.max_message_bytes)?;
        let request = pb::ReserveRequest::decode(message).ok()?;
        let metadata = tonic::metadata::MetadataMap::from_headers(headers.clone());
        let command =
            validate_reserve(&metadata, &request, self.pipeline.limits().max_quantity).ok()?;
        let result = self.pipeline.sold_out_now(&command)?;
        Some(StoredAnswer::grpc_ok(
            &reserve_response(result).encode_to_vec(),
        ))
    }
}

/// A Reserve call's metadata and body as a validated command, or the
/// error naming the first bad field. Public for the fuzz target, which
/// feeds it whatever a decoder lets through.
pub fn validate_reserve(
    metadata: &tonic::metadata::MetadataMap,
    body: &pb::ReserveRequest,
    max_quantity: u32,
) -> Result<ReserveCommand, ReservationError> {
    Ok(ReserveCommand {
        user: user_id(metadata)?,
        idempotency_key: idempotency_key(metadata)?,
        sku: Sku::parse(&body.sku)?,
        quantity: Quantity::parse(body.quantity, max_quantity)?,
        join_waitlist: body.join_waitlist,
    })
}

fn reserve_response(result: ReserveResult) -> pb::ReserveResponse {
    use pb::ReserveOutcome as O;
    let waitlist_position = match &result {
        ReserveResult::Waitlisted(reservation) | ReserveResult::Existing(reservation) => {
            reservation.waitlist_position
        }
        _ => None,
    };
    let (opens_at, closes_at) = match &result {
        ReserveResult::OutsideWindow(WindowCheck::NotOpen(at)) => {
            (Some(super::timestamp(*at)), None)
        }
        ReserveResult::OutsideWindow(WindowCheck::Closed(at)) => {
            (None, Some(super::timestamp(*at)))
        }
        _ => (None, None),
    };
    let (outcome, reservation, remaining, position) = match result {
        ReserveResult::Reserved {
            reservation,
            remaining,
        } => (O::Reserved, Some(reservation), remaining, None),
        ReserveResult::Queued {
            reservation,
            position,
            remaining,
        } => (O::Queued, Some(reservation), remaining, Some(position)),
        ReserveResult::SoldOut { remaining } => (O::SoldOut, None, remaining, None),
        ReserveResult::UserLimit => (O::UserLimitReached, None, None, None),
        ReserveResult::Waitlisted(reservation) => (O::Waitlisted, Some(reservation), None, None),
        ReserveResult::OutsideWindow(WindowCheck::Closed(_)) => (O::Closed, None, None, None),
        ReserveResult::OutsideWindow(_) => (O::NotOpen, None, None, None),
        ReserveResult::Existing(reservation) => {
            let outcome = match reservation.state {
                ReservationState::Queued => O::Queued,
                ReservationState::Waitlisted => O::Waitlisted,
                ReservationState::Rejected => O::SoldOut,
                _ => O::Reserved,
            };
            let position = reservation.queue_position;
            (outcome, Some(reservation), None, position)
        }
    };
    pb::ReserveResponse {
        outcome: outcome as i32,
        reservation: reservation.map(Into::into),
        remaining_stock: remaining,
        queue_position: position,
        waitlist_position,
        opens_at,
        closes_at,
    }
}

/// A ReserveCart call as a validated command: 1 to `max_lines` lines,
/// each a different, valid SKU with a valid quantity. Bad lines are
/// named in the message (`lines[i].sku`), the field being `lines`.
pub fn validate_cart(
    metadata: &tonic::metadata::MetadataMap,
    body: &pb::ReserveCartRequest,
    max_lines: u32,
    max_quantity: u32,
) -> Result<CartCommand, ReservationError> {
    let user = user_id(metadata)?;
    let idempotency_key = idempotency_key(metadata)?;
    let count = body.lines.len();
    if count == 0 {
        return Err(ReservationError::invalid(
            "lines",
            "must hold at least one line",
        ));
    }
    if count > max_lines as usize {
        return Err(ReservationError::invalid(
            "lines",
            format!(
                "must hold at most {max_lines} lines (reservations.max_cart_lines), got {count}"
            ),
        ));
    }
    let mut lines: Vec<(Sku, Quantity)> = Vec::with_capacity(count);
    for (index, line) in body.lines.iter().enumerate() {
        let named = |err: ReservationError| match err {
            ReservationError::InvalidArgument { field, reason } => {
                ReservationError::invalid("lines", format!("lines[{index}].{field}: {reason}"))
            }
            other => other,
        };
        let sku = Sku::parse(&line.sku).map_err(named)?;
        let quantity = Quantity::parse(line.quantity, max_quantity).map_err(named)?;
        if let Some(first) = lines.iter().position(|(seen, _)| *seen == sku) {
            return Err(ReservationError::invalid(
                "lines",
                format!(
                    "lines[{index}].sku: {} is also lines[{first}]; one line per SKU",
                    sku.as_str()
                ),
            ));
        }
        lines.push((sku, quantity));
    }
    Ok(CartCommand {
        user,
        lines,
        idempotency_key,
    })
}

fn cart_response(result: CartResult, skus: &[Sku]) -> pb::ReserveCartResponse {
    use pb::ReserveOutcome as O;
    match result {
        CartResult::Reserved(cart) | CartResult::Queued(cart) | CartResult::Existing(cart) => {
            let outcome = match cart.state {
                ReservationState::Queued => pb::CartOutcome::Queued,
                ReservationState::Rejected => pb::CartOutcome::Rejected,
                _ => pb::CartOutcome::Reserved,
            };
            pb::ReserveCartResponse {
                outcome: outcome as i32,
                queue_position: cart.queue_position,
                reservation: Some(cart.into()),
                line_results: Vec::new(),
            }
        }
        CartResult::Refused(refusals) => pb::ReserveCartResponse {
            outcome: pb::CartOutcome::Refused as i32,
            reservation: None,
            queue_position: None,
            line_results: skus
                .iter()
                .zip(refusals)
                .map(|(sku, refusal)| {
                    let mut line = pb::CartLineResult {
                        sku: sku.as_str().to_owned(),
                        outcome: O::Reserved as i32,
                        ..Default::default()
                    };
                    match refusal {
                        None => {}
                        Some(LineRefusal::SoldOut { remaining }) => {
                            line.outcome = O::SoldOut as i32;
                            line.remaining_stock = remaining;
                        }
                        Some(LineRefusal::UserLimit) => line.outcome = O::UserLimitReached as i32,
                        Some(LineRefusal::OutsideWindow(WindowCheck::NotOpen(at))) => {
                            line.outcome = O::NotOpen as i32;
                            line.opens_at = Some(super::timestamp(at));
                        }
                        Some(LineRefusal::OutsideWindow(WindowCheck::Closed(at))) => {
                            line.outcome = O::Closed as i32;
                            line.closes_at = Some(super::timestamp(at));
                        }
                        Some(LineRefusal::OutsideWindow(WindowCheck::Open)) => {}
                    }
                    line
                })
                .collect(),
        },
    }
}

type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchReservationResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl InventoryService for InventoryApi {
    async fn reserve(
        &self,
        request: Request<pb::ReserveRequest>,
    ) -> Result<Response<pb::ReserveResponse>, Status> {
        let command = validate_reserve(
            request.metadata(),
            request.get_ref(),
            self.pipeline.limits().max_quantity,
        );
        let command = command?;
        crate::metrics::hot_skus::record(command.sku.as_str());
        let result = self.pipeline.reserve(command).await?;
        let provisional = matches!(result, ReserveResult::OutsideWindow(_));
        let mut response = Response::new(reserve_response(result));
        if provisional {
            // The window may open (or be moved): a retry with the same key
            // must be decided again, not answered from the dedup record.
            response.extensions_mut().insert(Provisional);
        }
        Ok(response)
    }

    async fn get_reservation(
        &self,
        request: Request<pb::GetReservationRequest>,
    ) -> Result<Response<pb::GetReservationResponse>, Status> {
        let user = user_id(request.metadata())?;
        let id = ReservationId::parse(&request.get_ref().reservation_id)?;
        let reservation = self.pipeline.get(&id, &user).await?;
        Ok(Response::new(pb::GetReservationResponse {
            reservation: Some(reservation.into()),
        }))
    }

    async fn confirm_reservation(
        &self,
        request: Request<pb::ConfirmReservationRequest>,
    ) -> Result<Response<pb::ConfirmReservationResponse>, Status> {
        let user = user_id(request.metadata())?;
        let id = ReservationId::parse(&request.get_ref().reservation_id)?;
        let reservation = self.pipeline.confirm(&id, &user).await?;
        Ok(Response::new(pb::ConfirmReservationResponse {
            reservation: Some(reservation.into()),
        }))
    }

    async fn release_reservation(
        &self,
        request: Request<pb::ReleaseReservationRequest>,
    ) -> Result<Response<pb::ReleaseReservationResponse>, Status> {
        let user = user_id(request.metadata())?;
        let id = ReservationId::parse(&request.get_ref().reservation_id)?;
        let reservation = self.pipeline.release(&id, &user).await?;
        Ok(Response::new(pb::ReleaseReservationResponse {
            reservation: Some(reservation.into()),
        }))
    }

    async fn extend_reservation(
        &self,
        request: Request<pb::ExtendReservationRequest>,
    ) -> Result<Response<pb::ExtendReservationResponse>, Status> {
        let user = user_id(request.metadata())?;
        let body = request.get_ref();
        let id = ReservationId::parse(&body.reservation_id)?;
        let max = self.pipeline.limits().max_hold;
        let hold = std::time::Duration::from_secs(u64::from(body.hold_seconds));
        if hold.is_zero() || hold > max {
            return Err(ReservationError::invalid(
                "hold_seconds",
                format!(
                    "must be 1 to {} (reservations.max_hold_secs)",
                    max.as_secs()
                ),
            )
            .into());
        }
        let reservation = self.pipeline.extend(&id, &user, hold).await?;
        Ok(Response::new(pb::ExtendReservationResponse {
            reservation: Some(reservation.into()),
        }))
    }

    type WatchReservationStream = WatchStream;

    async fn watch_reservation(
        &self,
        request: Request<pb::WatchReservationRequest>,
    ) -> Result<Response<Self::WatchReservationStream>, Status> {
        let user = user_id(request.metadata())?;
        let id = ReservationId::parse(&request.get_ref().reservation_id)?;
        let updates = self.pipeline.watch(id, user).await?;
        let stream = updates.map(|update| {
            update
                .map(|reservation| pb::WatchReservationResponse {
                    reservation: Some(reservation.into()),
                })
                .map_err(|err| Status::from(&*err))
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn reserve_cart(
        &self,
        request: Request<pb::ReserveCartRequest>,
    ) -> Result<Response<pb::ReserveCartResponse>, Status> {
        let limits = self.pipeline.limits();
        let command = validate_cart(
            request.metadata(),
            request.get_ref(),
            limits.max_cart_lines,
            limits.max_quantity,
        )?;
        let skus: Vec<Sku> = command.lines.iter().map(|(sku, _)| sku.clone()).collect();
        for sku in &skus {
            crate::metrics::hot_skus::record(sku.as_str());
        }
        let result = self.pipeline.reserve_cart(command).await?;
        let provisional = matches!(&result, CartResult::Refused(lines)
            if lines.iter().any(|l| matches!(l, Some(LineRefusal::OutsideWindow(_)))));
        let mut response = Response::new(cart_response(result, &skus));
        if provisional {
            // As Reserve's NOT_OPEN and CLOSED: decided again on a retry.
            response.extensions_mut().insert(Provisional);
        }
        Ok(response)
    }
}
