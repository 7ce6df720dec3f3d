//! The integration tests: one binary, a module per area, sharing the harness in `common`.
//!
//! One binary instead of one per area: the crate is linked once, and the areas' tests run in
//! parallel with each other instead of one binary after another.

mod common;

mod authorization;
mod bad_configs;
mod children;
mod config_limits;
mod config_reload;
mod crash;
mod device;
mod encryption;
mod faults;
mod follow_config;
mod hostile_tokens;
mod jwt;
mod leaks;
mod lifecycle;
mod notifications;
mod own_files;
mod partial_outage;
mod profiles;
mod provider_flows;
mod quirks;
mod retry;
mod revoke;
mod sleep;
mod socket;
mod socket_edges;
mod store_health;
