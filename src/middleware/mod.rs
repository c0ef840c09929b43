//! Tower middleware on the gRPC server, outermost first (the stack is built
//! in `server::run`):
//!
//! 1. the server's own timeout and per-connection stream limit (tonic);
//! 2. [`RateLimitLayer`]: per-user and global limits, before any body is
//!    decoded, so a flood costs a header lookup and a counter per call.
//!
//! Each layer reads its switch per request, so SREs can flip it at run time;
//! a switched-off layer costs one atomic load.

mod rate_limit;

pub use rate_limit::{RateLimitLayer, RateLimitStats, RateLimits, Verdict};
