//! The tools that load stockgate from outside, as callers and operators do:
//!
//! - [`storm`]: the flash sale reproduced against a running service, with
//!   the invariants checked afterwards;
//! - [`bench`](mod@bench): Reserve throughput and latency beside same-run references;
//! - [`admin_cli`]: `stockgate admin …`, the operators' AdminService client.
//!
//! They use only the service library's public API; the `stockgate` binary
//! (`src/main.rs`) offers them as subcommands beside `serve` and `migrate`.

#![forbid(unsafe_code)]

pub mod admin_cli;
pub mod bench;
pub mod storm;
