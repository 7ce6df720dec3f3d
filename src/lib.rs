//! oauth2mci: a daemon that obtains OAuth 2.0 tokens once with the user and keeps them fresh.
//!
//! The binaries (`src/main.rs`, the client; `src/bin/oauth2mcid.rs`, the daemon) are thin
//! shells over this library, so that the integration tests and the benchmarks reach the same
//! code. `docs/ARCHITECTURE.md` draws the boxes; here they are, top to bottom:
//!
//! - `daemon`: wiring: start-up, signals, file watches, shutdown.
//! - `api`: the Unix socket: accepting, the fast path, the routes.
//! - `cli`: the command line client of that socket.
//! - `registry`: every client's live state, its state machine and its effects.
//! - `oauth`: talking to authorization servers: the engine, the device flow, the redirect
//!   listener, each endpoint's queue.
//! - `store`: what survives a restart: SQLite, encryption at rest.
//! - `config`: the YAML file, read, bounded, resolved and checked.
//! - leaves that the boxes share: profiles (`provider`), keys (`jwt`), tokens, secrets,
//!   timers (`scheduler`), token files (`sink`), hooks (`notify`), child processes, files,
//!   durations, counters, the socket's messages (`wire`).

pub mod api;
pub(crate) mod children;
pub mod cli;
pub mod config;
pub(crate) mod counters;
pub mod daemon;
pub(crate) mod descriptors;
pub mod duration;
pub(crate) mod files;
pub(crate) mod heap;
pub(crate) mod jwt;
pub(crate) mod notify;
pub mod oauth;
pub mod provider;
pub(crate) mod random;
pub(crate) mod registry;
pub mod scheduler;
pub mod seal;
pub(crate) mod secret;
pub(crate) mod sink;
pub mod store;
pub(crate) mod text;
pub mod token;
pub mod wire;

pub use secret::Secret;
