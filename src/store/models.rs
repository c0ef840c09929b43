//! Rows as stored, and their conversion into domain types.

use chrono::NaiveDateTime;
use diesel::prelude::*;

use super::schema::{inventory, reservations};
use crate::domain::{IdempotencyKey, Reservation, ReservationId, ReservationState, Sku, UserId};

/// One SKU's stock row.
#[derive(Debug, Clone, PartialEq, Eq, Queryable, Selectable)]
#[diesel(table_name = inventory)]
pub struct InventoryRow {
    pub sku: String,
    /// Units available for new reservations.
    pub stock: i64,
    /// Bumped by every change; the optimistic check compares it.
    pub version: i64,
    pub max_per_user: i32,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    /// `instant` or `waitlist` (see [`crate::domain::SoldOutPolicy`]).
    pub sold_out_policy: String,
    /// Waiting entries allowed at once; 0 = `reservations.waitlist_max`.
    pub waitlist_limit: i32,
    /// The sale window's opening (Reserve admits from it), if any.
    pub opens_at: Option<NaiveDateTime>,
    /// The sale window's closing (Reserve admits until it), if any.
    pub closes_at: Option<NaiveDateTime>,
    /// The sale whose per-user cap also binds this SKU, if any.
    pub sale_id: Option<String>,
    /// The fair opening's draw after `opens_at`, in ms (0: none).
    pub draw_window_ms: i32,
}

impl InventoryRow {
    pub fn window(&self) -> crate::domain::SaleWindow {
        crate::domain::SaleWindow {
            opens_at: self.opens_at,
            closes_at: self.closes_at,
            draw_window_ms: u32::try_from(self.draw_window_ms).unwrap_or(0),
        }
    }
}

#[derive(Debug, Clone, Queryable, Selectable, Insertable)]
#[diesel(table_name = reservations)]
pub struct ReservationRow {
    pub reservation_id: String,
    pub sku: String,
    pub user_id: String,
    pub idempotency_key: Option<String>,
    pub quantity: i32,
    pub state: String,
    pub reject_reason: Option<String>,
    pub expires_at: Option<NaiveDateTime>,
    pub created_at: NaiveDateTime,
    pub updated_at: NaiveDateTime,
    /// The cart this row is a line of: its first line's id.
    pub cart_id: Option<String>,
}

impl ReservationRow {
    pub fn into_domain(self) -> Reservation {
        Reservation {
            id: ReservationId::from_trusted(self.reservation_id),
            sku: Sku::from_trusted(self.sku),
            user: UserId::from_trusted(self.user_id),
            quantity: u32::try_from(self.quantity).unwrap_or(0),
            // The CHECK constraint admits only spellings from_db knows.
            state: ReservationState::from_db(&self.state).unwrap_or(ReservationState::Rejected),
            idempotency_key: self.idempotency_key.map(IdempotencyKey::from_trusted),
            queue_position: None,
            waitlist_position: None,
            reject_reason: self.reject_reason,
            created_at: self.created_at,
            updated_at: self.updated_at,
            expires_at: self.expires_at,
            cart_id: self.cart_id.map(ReservationId::from_trusted),
            lines: Vec::new(),
        }
    }
}
