//! A small client for calling services: the generated InventoryService
//! client with the caller metadata (`x-user-id`, `idempotency-key`) set for
//! you. The generated clients themselves are `stockgate::pb::
//! inventory_service_client::InventoryServiceClient` and `stockgate::pb::
//! admin_service_client::AdminServiceClient`.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use stockgate::client::Client;
//! let mut client = Client::connect("http://127.0.0.1:50051", "user-42").await?;
//! let answer = client.reserve("TSHIRT-RED-M", 1, "cart-42-line-1").await?;
//! if let Some(reservation) = answer.reservation {
//!     let held = client.wait_until_decided(&reservation.reservation_id).await?;
//!     client.confirm(&held.reservation_id).await?;
//! }
//! # Ok(())
//! # }
//! ```

use tonic::{
    metadata::{Ascii, MetadataValue},
    transport::{Channel, Endpoint},
    Request, Status,
};

use crate::pb::{
    inventory_service_client::InventoryServiceClient, ConfirmReservationRequest,
    ExtendReservationRequest, GetReservationRequest, ReleaseReservationRequest, Reservation,
    ReservationLine, ReservationState, ReserveCartRequest, ReserveCartResponse, ReserveRequest,
    ReserveResponse, WatchReservationRequest,
};

/// InventoryService on behalf of one end user.
#[derive(Clone)]
pub struct Client {
    inner: InventoryServiceClient<Channel>,
    user: MetadataValue<Ascii>,
}

fn ascii(value: &str, field: &'static str) -> Result<MetadataValue<Ascii>, Status> {
    MetadataValue::try_from(value)
        .map_err(|_| Status::invalid_argument(format!("{field} must be visible ASCII")))
}

impl Client {
    /// Connects to `addr` (e.g. `http://127.0.0.1:50051`) for `user`.
    pub async fn connect(addr: &str, user: &str) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(addr.to_owned())?.connect().await?;
        Ok(Self::new(channel, user)?)
    }

    /// A client for `user` over an existing channel (channels are cheap to
    /// clone; share one per process).
    pub fn new(channel: Channel, user: &str) -> Result<Self, Status> {
        Ok(Self {
            inner: InventoryServiceClient::new(channel),
            user: ascii(user, "user")?,
        })
    }

    fn request<T>(&self, body: T) -> Request<T> {
        let mut request = Request::new(body);
        request
            .metadata_mut()
            .insert("x-user-id", self.user.clone());
        request
    }

    /// Reserves `quantity` units. `idempotency_key` identifies the attempt:
    /// retry a failed or timed-out call with the same key and you get the
    /// first call's reservation, never a second one.
    pub async fn reserve(
        &mut self,
        sku: &str,
        quantity: u32,
        idempotency_key: &str,
    ) -> Result<ReserveResponse, Status> {
        let mut request = self.request(ReserveRequest {
            sku: sku.to_owned(),
            quantity,
            ..Default::default()
        });
        request.metadata_mut().insert(
            "idempotency-key",
            ascii(idempotency_key, "idempotency key")?,
        );
        Ok(self.inner.reserve(request).await?.into_inner())
    }

    /// Reserves every `(sku, quantity)` line under one reservation, or
    /// none (a cart; see the proto's "Carts"). `idempotency_key` names the
    /// whole cart, as for [`Self::reserve`].
    pub async fn reserve_cart(
        &mut self,
        lines: &[(&str, u32)],
        idempotency_key: &str,
    ) -> Result<ReserveCartResponse, Status> {
        let mut request = self.request(ReserveCartRequest {
            lines: lines
                .iter()
                .map(|(sku, quantity)| ReservationLine {
                    sku: (*sku).to_owned(),
                    quantity: *quantity,
                    ..Default::default()
                })
                .collect(),
        });
        request.metadata_mut().insert(
            "idempotency-key",
            ascii(idempotency_key, "idempotency key")?,
        );
        Ok(self.inner.reserve_cart(request).await?.into_inner())
    }

    pub async fn get(&mut self, reservation_id: &str) -> Result<Reservation, Status> {
        let request = self.request(GetReservationRequest {
            reservation_id: reservation_id.to_owned(),
        });
        reservation(
            self.inner
                .get_reservation(request)
                .await?
                .into_inner()
                .reservation,
        )
    }

    /// Follows a reservation until it leaves QUEUED (HELD, or REJECTED when
    /// the database had no stock left after all) and returns it.
    pub async fn wait_until_decided(
        &mut self,
        reservation_id: &str,
    ) -> Result<Reservation, Status> {
        let request = self.request(WatchReservationRequest {
            reservation_id: reservation_id.to_owned(),
        });
        let mut stream = self.inner.watch_reservation(request).await?.into_inner();
        while let Some(update) = stream.message().await? {
            let current = reservation(update.reservation)?;
            if current.state() != ReservationState::Queued {
                return Ok(current);
            }
        }
        // The stream ended (server stopping): ask once more.
        self.get(reservation_id).await
    }

    pub async fn confirm(&mut self, reservation_id: &str) -> Result<Reservation, Status> {
        let request = self.request(ConfirmReservationRequest {
            reservation_id: reservation_id.to_owned(),
        });
        reservation(
            self.inner
                .confirm_reservation(request)
                .await?
                .into_inner()
                .reservation,
        )
    }

    /// Makes a held reservation's hold last at least `hold_seconds` from
    /// now (within the server's `reservations.max_hold_secs` of when it
    /// became HELD). Safe to retry: a retry moves the expiry by no more than
    /// the time between the calls.
    pub async fn extend(
        &mut self,
        reservation_id: &str,
        hold_seconds: u32,
    ) -> Result<Reservation, Status> {
        let request = self.request(ExtendReservationRequest {
            reservation_id: reservation_id.to_owned(),
            hold_seconds,
        });
        reservation(
            self.inner
                .extend_reservation(request)
                .await?
                .into_inner()
                .reservation,
        )
    }

    pub async fn release(&mut self, reservation_id: &str) -> Result<Reservation, Status> {
        let request = self.request(ReleaseReservationRequest {
            reservation_id: reservation_id.to_owned(),
        });
        reservation(
            self.inner
                .release_reservation(request)
                .await?
                .into_inner()
                .reservation,
        )
    }
}

fn reservation(found: Option<Reservation>) -> Result<Reservation, Status> {
    found.ok_or_else(|| Status::internal("the server answered without a reservation"))
}
