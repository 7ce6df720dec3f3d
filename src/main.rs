fn main() -> std::process::ExitCode {
    oauth2mci::cli::main()
}
