//! The `runner` command line: argument parsing and dispatch to one file per subcommand.
//!
//! Owns: clap definitions, exit codes and how errors are printed. Must not: contain
//! experiment logic; each subcommand calls into the library.
//!
//! Exit codes: 0 success; 1 an error stopped the command; 2 bad arguments (clap);
//! 3 the run finished and wrote its results, but at least one metric failed;
//! `runner compare` only: 4 a value drifted beyond the tolerance, 5 a table is missing or
//! extra, or its columns or row keys differ (see [`crate::compare`]).

pub mod bench;
pub mod cache;
pub mod compare;
pub mod list;
pub mod prompt;
pub mod run;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::device::DeviceChoice;

#[derive(Parser, Debug)]
#[command(
    name = "runner",
    version,
    about = "Run hookgraph experiments on GPT-2",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Shorthand for `runner run SPEC`.
    pub spec: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunArgs,
}

/// Options of a run.
#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// Override the spec's `[model] device`.
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    /// Override the spec's output directory.
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// No progress bars.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run an experiment spec (TOML) and write its results.
    Run {
        spec: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Check a spec (model, heads, datasets, metrics, plugins) without running it.
    Validate {
        spec: PathBuf,
        #[arg(long, value_enum)]
        device: Option<DeviceChoice>,
    },
    /// List built-in metrics, plugins found, and hook point names.
    List(list::ListArgs),
    /// Run a model on tokens or a prompt and save chosen activations as safetensors.
    Cache(cache::CacheArgs),
    /// Time the forward pass and the 144-head sweeps on a GPT-2-small-shaped checkpoint.
    Bench(bench::BenchArgs),
    /// TransformerLens's `test_prompt`: the answer's rank, logit and probability, and the top k.
    Prompt(prompt::PromptArgs),
    /// Compare a results directory's CSV tables with a baseline's (the CI gate).
    Compare(compare::CompareArgs),
}

/// Parses arguments, runs, and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Some(Command::Run { spec, run }) => run::run(&spec, &run),
        Some(Command::Validate { spec, device }) => run::validate(&spec, device),
        Some(Command::List(args)) => list::list(&args),
        Some(Command::Cache(args)) => cache::cache(&args),
        Some(Command::Bench(args)) => bench::bench(&args),
        Some(Command::Prompt(args)) => prompt::prompt(&args),
        Some(Command::Compare(args)) => compare::compare(&args),
        None => match cli.spec {
            Some(spec) => run::run(&spec, &cli.run),
            None => {
                eprintln!("usage: runner SPEC.toml  (or `runner --help`)");
                return ExitCode::from(2);
            }
        },
    };
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
