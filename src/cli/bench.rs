//! `runner bench`: prints the benchmark table (see [`crate::bench`]).
use std::path::PathBuf;
use std::process::ExitCode;

use crate::bench;
use crate::device::{DeviceChoice, DeviceKind};
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
    /// Each case is the best of this many runs (the projection_loss sweeps run once).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Run `bench/transformer_lens_baseline.py` with this Python first (torch,
    /// transformer_lens 2.x, transformers) and compare against what it writes: the PyTorch
    /// figures and ours then come from one run, side by side on the same machine.
    #[arg(long, conflicts_with = "baseline")]
    pub python: Option<PathBuf>,
    /// Only the intervention cases (zero ablation and patch of every head's `z`, the
    /// per-position `resid_pre` patch), and with `--python` only TransformerLens's
    /// `patching.py` peers of them.
    #[arg(long)]
    pub interventions: bool,
    /// Also write the cases as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Where the model runs: `cpu` (the host kernels), `cuda` (a build with `--features
    /// cuda`; adds the paper-scale source_suppression 500x1000 case), or `auto`.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Cpu)]
    pub device: DeviceChoice,
}

pub fn bench(args: &BenchArgs) -> crate::Result<ExitCode> {
    let dir = args.dir.clone().unwrap_or_else(bench::default_dir);
    // Resolved first: `--device cuda` in a build without CUDA fails here, before any work.
    let device = args.device.resolve()?;
    let mut baseline_path = args.baseline.clone();
    if let Some(py) = &args.python {
        if device != DeviceKind::Cpu {
            return Err(Error::Other(
                "--python times PyTorch on the CPU; on a GPU, scripts/gpu/torch_peer.py is the peer"
                    .into(),
            ));
        }
        // Checkpoint and tokens first: the script reads the same files.
        bench::prepare(&dir, &bench::shapes(device))?;
        let out = dir.join("baseline.json");
        let status = std::process::Command::new(py)
            .arg("bench/transformer_lens_baseline.py")
            .arg("--dir")
            .arg(&dir)
            .arg("--out")
            .arg(&out)
            .args(args.interventions.then_some("--patching"))
            // The same best-of-N and the same cases as ours, so the two sides match.
            .arg("--repeats")
            .arg(args.repeats.to_string())
            .args(args.only.iter().flat_map(|o| ["--only", o.as_str()]))
            .status()
            .map_err(|e| Error::Other(format!("{}: {e}", py.display())))?;
        if !status.success() {
            return Err(Error::Other(format!(
                "bench/transformer_lens_baseline.py failed ({status})"
            )));
        }
        baseline_path = Some(out);
    }
    let baseline: Option<bench::Baseline> = match &baseline_path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            Some(
                serde_json::from_str(&text)
                    .map_err(|e| Error::Other(format!("{}: {e}", p.display())))?,
            )
        }
        None => None,
    };
    let cases = bench::run(&bench::Options {
        dir: &dir,
        batch_size: args.batch_size.max(1),
        only: args.only.as_deref(),
        interventions_only: args.interventions,
        repeats: args.repeats,
        device,
    })?;
    print!("{}", bench::table(&cases, baseline.as_ref(), device));
    if let Some(p) = &args.json {
        crate::output::write_json(p, &cases)?;
    }
    Ok(ExitCode::SUCCESS)
}
