//! The dead-letter queue as operators see it: the orders the processor
//! gave up on, listed with why, sent back to the order queue once the
//! cause is fixed, or purged.

use async_trait::async_trait;
use chrono::NaiveDateTime;

use super::{QueueError, QueuedOrder};

/// Most messages one call looks at: a call costs one broker round trip per
/// message looked at, whatever the dead-letter queue holds.
pub const MAX_SCAN: usize = 10_000;

/// Most messages one call moves, and keys it may name: its answer stays far
/// below `server.max_message_bytes`' default.
pub const MAX_MOVE: usize = 200;

/// Most messages one listing shows (each at most about 1 KiB answered).
pub const MAX_LIST: usize = 50;

/// Bytes of a message body shown in a listing, and of its error.
pub const PREVIEW_BYTES: usize = 256;

/// One message in the dead-letter queue.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// What redrive and purge select it by: the reservation id, or
    /// `sha256:<16 hex digits>` of the body when no id can be read.
    pub key: String,
    /// The order, as far as it can still be read.
    pub order: Option<QueuedOrder>,
    /// Why the processor gave up (the `x-stockgate-error` header).
    pub error: String,
    /// When it was set aside; `None` for messages set aside by a version
    /// that did not stamp the time.
    pub dead_lettered_at: Option<NaiveDateTime>,
    /// Size of the body.
    pub body_bytes: usize,
    /// The start of the body as text (invalid UTF-8 replaced), at most
    /// [`PREVIEW_BYTES`] bytes.
    pub preview: String,
}

/// Which messages a redrive or purge takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    /// Every message (copies included) whose key is one of these, looked
    /// for among the first [`MAX_SCAN`].
    Keys(Vec<String>),
    /// The first this many, at most [`MAX_MOVE`].
    First(usize),
}

/// What a redrive or purge did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moved {
    /// Keys of the messages moved, in the order taken (a key twice when
    /// two copies were).
    pub keys: Vec<String>,
    /// Keys asked for that no message carried.
    pub not_found: Vec<String>,
    /// Messages left in the dead-letter queue afterwards.
    pub remaining: u64,
    /// Why the call stopped short of its selection (its time budget, the
    /// broker). What `keys` lists was moved; a redrive may also have put
    /// unconfirmed copies of others in the order queue, which the
    /// processor commits once at most.
    pub interrupted: Option<String>,
}

/// Where a queue backend keeps the orders its processor gave up on.
#[async_trait]
pub trait DeadLetters: Send + Sync + 'static {
    /// Messages in the dead-letter queue (those another operator's call is
    /// holding at that moment are not counted).
    async fn depth(&self) -> Result<u64, QueueError>;

    /// The first `limit` messages (at most [`MAX_LIST`]) and the depth.
    /// Reads only: every message goes back where it was.
    async fn list(&self, limit: usize) -> Result<(Vec<DeadLetter>, u64), QueueError>;

    /// Publishes the selected messages to the order queue (confirmed) and
    /// only then removes them from the dead-letter queue. A crash between
    /// the two leaves a copy in both; the processor commits a reservation
    /// id once, so redriving the copy changes nothing. Stops early, with
    /// what it did, when its time budget runs out.
    async fn redrive(&self, which: &Selection) -> Result<Moved, QueueError>;

    /// Removes the selected messages for good.
    async fn purge(&self, which: &Selection) -> Result<Moved, QueueError>;
}
