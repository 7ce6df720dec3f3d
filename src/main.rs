//! `oauth2mci`: the command line client. The daemon-side commands (`daemon`, `check-config`,
//! `providers`) run `oauth2mcid`, so that this binary holds only the socket client.
//!
//! No Rust `main`: std's start-up (a stack overflow handler placed through /proc/self/maps, an
//! alternate signal stack, a check of the standard descriptors) is 13 of the 42 system calls
//! of `oauth2mci token`, which a script may run for every request it makes. The arguments
//! still reach `std::env::args` (glibc hands them to std), and SIGPIPE stays as the shell set
//! it, which the client commands want anyway (`cli::main`).
// The test harness brings its own `main`.
#![cfg_attr(not(test), no_main)]

#[cfg(not(test))]
use std::ffi::{c_char, c_int};

#[cfg(not(test))]
#[unsafe(no_mangle)]
extern "C" fn main(_argc: c_int, _argv: *const *const c_char) -> c_int {
    let status = oauth2mci::cli::main(oauth2mci::cli::exec_daemon_binary);
    // Returning from C's main does not flush Rust's stdout; `process::exit` does.
    std::process::exit(c_int::from(status))
}
