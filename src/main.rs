//! `oauth2mci`: the command line client. The daemon-side commands (`daemon`, `check-config`,
//! `providers`) run `oauth2mcid`, so that this binary holds only the socket client.
fn main() -> std::process::ExitCode {
    oauth2mci::cli::main(oauth2mci::cli::exec_daemon_binary)
}
