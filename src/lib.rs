//! stockgate: a flash-sale inventory reservation service.
//!
//! 50,000 buyers press "buy" for one unit; exactly one gets it, everyone
//! else hears "sold out" within milliseconds, and nothing is lost or sold
//! twice. A Reserve call crosses these layers, each switchable at start-up
//! ([`config`]) and at run time (AdminService):
//!
//! - [`gate`]: an atomic per-SKU counter that admits at most the stock and
//!   answers everyone else without touching the database;
//! - [`queue`]: admitted reservations wait in arrival order for the single
//!   order processor, so the database sees a steady load;
//! - [`store`]: the database, the truth and the last safety net: a
//!   conditional, versioned row update per order, orders unique by
//!   reservation id and idempotency key.
//!
//! [`reserve`] strings them together, [`grpc`] exposes them, and
//! [`server::run`] assembles everything for `main` and for the tests alike.
//! [`error`] holds the one mapping from domain errors to gRPC codes.

#![forbid(unsafe_code)]

mod batching;
pub mod check;
pub mod client;
pub mod config;
pub mod domain;
pub mod error;
pub mod fleet;
pub mod gate;
pub mod grpc;
pub mod metrics;
pub mod middleware;
mod processor;
pub mod queue;
mod redis_batch;
pub mod redis_client;
pub mod reserve;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tls;

pub use server::run;

/// The git revision this binary was built from (`unknown` without git).
pub const GIT_REVISION: &str = env!("BUILT_GIT_REVISION");

/// What `--version` prints: the package version and the git revision.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("BUILT_GIT_REVISION"),
    ")"
);

/// Code generated from `proto/stockgate/v1`.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("stockgate.v1");

    /// Descriptor set for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("stockgate_descriptor");
}
