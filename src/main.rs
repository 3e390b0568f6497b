//! The `runner` binary: see `hookgraph::cli`.
fn main() -> std::process::ExitCode {
    hookgraph::cli::main()
}
