//! oauth2mci: a daemon that obtains OAuth 2.0 tokens once with the user and keeps them fresh.
//!
//! The binary (`src/main.rs`) is a thin shell over this library so that integration tests and
//! benchmarks can reach the same code.

pub mod api;
pub mod children;
pub mod cli;
pub mod config;
pub mod counters;
pub mod daemon;
pub mod descriptors;
pub mod device;
pub mod duration;
pub mod fast_path;
pub mod files;
pub mod heap;
pub mod jwt;
pub mod notify;
pub mod oauth;
pub mod provider;
pub mod queue;
pub mod random;
pub mod redirect;
pub mod registry;
pub mod scheduler;
pub mod seal;
pub mod secret;
pub mod sink;
pub mod store;
pub mod text;
pub mod token;
pub mod unix_conn;
pub mod watch;
pub mod wire;
