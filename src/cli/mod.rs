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
#[command(name = "runner", version, about = "Run hookgraph experiments on GPT-2")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Shorthand for `runner run SPEC`.
    pub spec: Option<PathBuf>,
    #[command(flatten)]
    pub run: RunArgs,
    /// No progress bars (before or after the subcommand: `runner -q merge DIR`).
    #[arg(long, short, global = true)]
    pub quiet: bool,
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
    /// Run slice I of N (from 0) of every dataset and save its exact partial state in
    /// `<output>/shards/I-of-N/` for `runner merge` (Slurm: `$SLURM_ARRAY_TASK_ID/N`).
    #[arg(long, value_name = "I/N")]
    pub shard: Option<crate::shard::Shard>,
    /// Continue from the checkpoint an interrupted run (or shard) left, if any.
    #[arg(long)]
    pub resume: bool,
    /// Write the resume checkpoint at most every SECONDS (default 0: after every batch;
    /// at most 86400, a day).
    #[arg(
        long,
        value_name = "SECONDS",
        default_value_t = 0.0,
        value_parser = seconds_up_to_a_day,
        allow_negative_numbers = true
    )]
    pub checkpoint_every: f64,
    /// Override a key of the spec without editing it (repeatable): `model.batch_size=4`,
    /// `heads="0.1"`, `dataset.0.n=5` (the first `[[dataset]]`); the manifest records the
    /// spec as run.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

impl RunArgs {
    /// Whether no option was given.
    fn is_empty(&self) -> bool {
        self.only_device_output() && self.device.is_none() && self.output.is_none()
    }

    /// Whether at most `--device` and `--output` were given.
    fn only_device_output(&self) -> bool {
        self.shard.is_none() && !self.resume && self.checkpoint_every == 0.0 && self.set.is_empty()
    }

    /// Options given after the subcommand win; those given before fill the rest.
    fn fill_from(&mut self, before: RunArgs) {
        self.device = self.device.or(before.device);
        self.output = self.output.take().or(before.output);
        self.shard = self.shard.or(before.shard);
        self.resume |= before.resume;
        if self.checkpoint_every == 0.0 {
            self.checkpoint_every = before.checkpoint_every;
        }
        if self.set.is_empty() {
            self.set = before.set;
        }
    }
}

/// The longest `--checkpoint-every`: a day (longer is no checkpoint at all for a run).
pub const MAX_CHECKPOINT_EVERY: f64 = 86_400.0;

/// `--checkpoint-every`: finite, non-negative seconds, at most a day (clap exits 2 otherwise).
fn seconds_up_to_a_day(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=MAX_CHECKPOINT_EVERY).contains(&v) {
        return Err(format!(
            "{s} seconds: expected a finite number from 0 to {MAX_CHECKPOINT_EVERY} (a day)"
        ));
    }
    Ok(v)
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
    let mut cli = Cli::parse();
    let quiet = cli.quiet;
    // Run options before the subcommand (`runner --device cpu run SPEC`) are the run's; with
    // any other subcommand they would be silently ignored, so they are an error.
    if let Some(cmd) = &mut cli.command {
        let top = std::mem::take(&mut cli.run);
        match cmd {
            Command::Run { run, .. } => run.fill_from(top),
            Command::Validate { device, output, .. } if top.only_device_output() => {
                *device = device.or(top.device);
                *output = output.take().or(top.output);
            }
            Command::Merge { device, .. } if top.only_device_output() && top.output.is_none() => {
                *device = device.or(top.device);
            }
            _ if top.is_empty() => {}
            _ => {
                use clap::CommandFactory;
                Cli::command()
                    .error(
                        clap::error::ErrorKind::ArgumentConflict,
                        "run options (--device, --output, --shard, --resume, --checkpoint-every, --set) before this subcommand do not apply to it; put them after it if it takes them",
                    )
                    .exit();
            }
        }
    }
    let outcome = match cli.command {
        Some(Command::Run { spec, run }) => run::run(&spec, &run, quiet),
        Some(Command::Validate {
            spec,
            device,
            output,
            set,
        }) => run::validate(&spec, device, output, &set),
        Some(Command::Merge { results, device }) => run::merge(&results, device, quiet),
        Some(Command::List(args)) => list::list(&args),
        Some(Command::Cache(args)) => cache::cache(&args),
        Some(Command::Bench(args)) => bench::bench(&args),
        Some(Command::Prompt(args)) => prompt::prompt(&args),
        Some(Command::Compare(args)) => compare::compare(&args),
        None => match cli.spec {
            Some(spec) => run::run(&spec, &cli.run, quiet),
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
