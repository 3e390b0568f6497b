//! The `runner` command line: argument parsing and dispatch to one file per subcommand.
//!
//! Owns: clap definitions, exit codes and how errors are printed. Must not: contain
//! experiment logic; each subcommand calls into the library.
//!
//! Exit codes: 0 success; 1 an error stopped the command (a run leaves its output directory's
//! results as they were); 2 bad arguments (clap); 3 the run finished and wrote its results,
//! but at least one metric failed (an error, a panic, or NaN/infinity in its tables);
//! `runner compare` only: 4 a value drifted beyond the tolerance, 5 a table is missing or
//! extra, or its columns or row keys differ (see [`crate::compare`]); 130 Ctrl-C or SIGTERM
//! stopped a run or merge (its output directory's results as they were).

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
    /// Run slice I of N (from 0) of every dataset and save its exact partial state in
    /// `<output>/shards/I-of-N/` for `runner merge` (Slurm: `$SLURM_ARRAY_TASK_ID/N`).
    #[arg(long, value_name = "I/N")]
    pub shard: Option<crate::shard::Shard>,
    /// Continue from the checkpoint an interrupted run (or shard) left, if any.
    #[arg(long)]
    pub resume: bool,
    /// Write the resume checkpoint at most every SECONDS (default 0: after every batch).
    #[arg(long, value_name = "SECONDS", default_value_t = 0.0)]
    pub checkpoint_every: f64,
    /// Override a key of the spec without editing it (repeatable): `model.batch_size=4`,
    /// `heads="0.1"`, `dataset.0.n=5` (the first [[dataset]]); the manifest records the
    /// spec as run.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run an experiment spec (TOML) and write its results.
    Run {
        spec: PathBuf,
        #[command(flatten)]
        run: RunArgs,
    },
    /// Check a spec (output directory, model, heads, datasets, metrics, plugins) without
    /// running it or writing anything.
    Validate {
        spec: PathBuf,
        #[arg(long, value_enum)]
        device: Option<DeviceChoice>,
        /// The output directory the run would use (default: the spec's).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Override a key of the spec (as `runner run --set`).
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Merge the shards in RESULTS/shards/ into the results the unsharded run would write.
    Merge {
        /// The run's output directory (`results/<name>`), holding `shards/I-of-N/`.
        results: PathBuf,
        /// Where the report's pages run the model (default: the spec's device).
        #[arg(long, value_enum)]
        device: Option<DeviceChoice>,
        /// No progress bars.
        #[arg(long, short)]
        quiet: bool,
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
    // `runner list | head -1`: a closed pipe ends the process quietly, as for any Unix
    // filter, instead of `println!` panicking on EPIPE (Rust ignores SIGPIPE by default).
    #[cfg(unix)]
    // SAFETY: restoring the default disposition of a signal, before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let outcome = match cli.command {
        Some(Command::Run { spec, run }) => run::run(&spec, &run),
        Some(Command::Validate {
            spec,
            device,
            output,
            set,
        }) => run::validate(&spec, device, output, &set),
        Some(Command::Merge {
            results,
            device,
            quiet,
        }) => run::merge(&results, device, quiet),
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
