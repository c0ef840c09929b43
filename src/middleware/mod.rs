//! Tower middleware on the gRPC server, outermost first (the stack is built
//! in `server::run`):
//!
//! 1. the server's own timeout and per-connection stream limit (tonic);
//! 2. [`LoadShedLayer`]: at most `server.max_in_flight` caller calls at
//!    once, refusing the rest at once, so nothing queues in front of the
//!    limits below;
//! 3. [`RateLimitLayer`]: per-user and global limits, before any body is
//!    decoded, so a flood costs a header lookup and a counter per call;
//! 4. [`DedupLayer`]: idempotency keys, after the rate limit (a refused
//!    duplicate must not hold a claim on its key) and before the services
//!    (a duplicate never reaches the stock logic).
//!
//! Each layer reads its switch per request, so SREs can flip it at run time;
//! a switched-off layer costs one atomic load.

mod dedup;
mod rate_limit;
mod shed;

pub use dedup::{
    Claim, DedupLayer, DedupStore, DedupTimes, MemoryDedup, RedisDedup, StoredAnswer, DEDUP_PATH,
};
pub use rate_limit::{RateLimitLayer, RateLimitStats, RateLimits, Verdict};
pub use shed::{InFlight, LoadShedLayer, LoadShedStats};
