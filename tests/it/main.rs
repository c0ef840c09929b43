//! The one integration-test binary. Every test starts the real server
//! through `stockgate::run` (see `harness`) against the embedded profile or
//! a real PostgreSQL database of its own.

mod api;
mod backend_tls;
mod backends;
mod balancing;
mod carts;
mod check;
mod clients;
mod conformance;
mod connections;
mod dead_letters;
mod draws;
mod faults;
mod fleet_limits;
mod floods;
mod group_commit;
mod harness;
mod health;
mod hostile;
mod image;
mod middleware;
mod mtls;
mod ops;
mod partitions;
mod pg_failover;
mod rabbit_cluster;
mod rabbit_queue;
mod redis_cluster;
mod redis_gate;
mod relay;
mod rollout;
mod sales;
mod storm;
mod storm_tool;
mod traces;
mod waitlist;
mod windows;
