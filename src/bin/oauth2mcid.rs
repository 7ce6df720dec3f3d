//! `oauth2mcid`: the daemon. It takes the same command line as `oauth2mci` and runs every
//! command itself.
fn main() -> std::process::ExitCode {
    std::process::ExitCode::from(oauth2mci::cli::main(oauth2mci::cli::in_process))
}
