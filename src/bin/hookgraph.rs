//! The `hookgraph` command of the Python wheel: the same CLI as `runner` (`hookgraph
//! spec.toml`, `hookgraph list`, ...), under the package's name, as ruff ships `ruff`.
//! Built only with the `python-cli` feature (python/pyproject.toml turns it on), so a plain
//! `cargo build` links one binary.
fn main() -> std::process::ExitCode {
    hookgraph::cli::main()
}
