//! `runner bench`: prints the benchmark table (see [`crate::bench`]).
use std::path::PathBuf;
use std::process::ExitCode;

use crate::bench;
use crate::error::Error;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Checkpoint directory (created with random GPT-2-small weights if missing).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// A JSON baseline from `bench/transformer_lens_baseline.py` (case name -> seconds).
    #[arg(long)]
    pub baseline: Option<PathBuf>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 20)]
    pub batch_size: usize,
    /// Only the cases whose name contains this (e.g. `forward`, `10x30`).
    #[arg(long)]
    pub only: Option<String>,
    /// Also write the cases as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn bench(args: &BenchArgs) -> crate::Result<ExitCode> {
    let dir = args.dir.clone().unwrap_or_else(bench::default_dir);
    let baseline: Option<bench::Baseline> = match &args.baseline {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| Error::Other(format!("{}: {e}", p.display())))?,
            )
        }
        None => None,
    };
    let cases = bench::run(&dir, args.batch_size.max(1), args.only.as_deref())?;
    print!("{}", bench::table(&cases, baseline.as_ref()));
    if let Some(p) = &args.json {
        crate::output::write_json(p, &cases)?;
    }
    Ok(ExitCode::SUCCESS)
}
