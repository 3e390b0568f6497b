//! `runner run`, `runner merge` and `runner validate`: the command-line face of
//! [`crate::runner`] and [`crate::shard::merge`].
//!
//! Owns: installing the Ctrl-C/SIGTERM handler for a run, printing the summary, the files
//! written, where earlier results went and any metric failures, and choosing the exit code
//! (3 when some metric failed but the others were written, 130 when a signal stopped the
//! run). Must not: run anything itself.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use super::RunArgs;
use crate::device::DeviceChoice;
use crate::error::Error;
use crate::runner::{self, RunOptions};
use crate::spec::LoadedSpec;

pub fn run(spec_path: &Path, args: &RunArgs, quiet: bool) -> crate::Result<ExitCode> {
    let spec = LoadedSpec::from_file(spec_path)?;
    crate::interrupt::install()?;
    let output = args.output.clone().unwrap_or_else(|| spec.output_dir());
    let result = runner::run(
        &spec,
        &RunOptions {
            device: args.device,
            output: Some(output.clone()),
            quiet,
            shard: args.shard,
            resume: args.resume,
            checkpoint_every: args.checkpoint_every,
        },
    );
    finish(result, &output)
}

/// `runner merge RESULTS`.
pub fn merge(results: &Path, device: Option<DeviceChoice>, quiet: bool) -> crate::Result<ExitCode> {
    crate::interrupt::install()?;
    let result = crate::shard::merge::merge(
        results,
        &crate::shard::merge::MergeOptions { device, quiet },
    );
    finish(result, results)
}

/// Prints a run's (or merge's) summary, files and failures, or what a stopped one left;
/// exit code 3 if a metric failed, 130 if a signal stopped it.
fn finish(result: crate::Result<runner::RunReport>, output: &Path) -> crate::Result<ExitCode> {
    let report = match result {
        Ok(r) => r,
        Err(Error::Interrupted(why)) => {
            eprintln!("{why}: stopped; {}", kept(output));
            return Ok(ExitCode::from(130));
        }
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("{}", kept(output));
            return Ok(ExitCode::FAILURE);
        }
    };
    print!("{}", report.summary);
    println!(
        "wrote {} files to {}",
        report.files.len(),
        report.output_dir.display()
    );
    if let Some(p) = &report.previous {
        println!("the previous results are now in {}", p.display());
    }
    for f in &report.failures {
        let on = f
            .dataset
            .as_deref()
            .map(|d| format!(" on dataset '{d}'"))
            .unwrap_or_default();
        eprintln!("error: metric '{}' failed{on}: {}", f.metric, f.error);
    }
    Ok(if report.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// What a run that stopped left in its output directory: no results of its own, at most
/// its resume checkpoint.
fn kept(output: &Path) -> String {
    let shown = output.display();
    let mut out = if output.join("manifest.json").is_file() {
        format!("no results were written; {shown} still holds the previous results, unchanged")
    } else if output.exists() {
        format!("no results were written to {shown}")
    } else {
        format!("nothing was written ({shown} was not created)")
    };
    let partial = output.join(crate::shard::checkpoint::PARTIAL_DIR);
    if partial.is_dir() {
        out += &format!(
            "; the checkpoint in {} lets `runner run --resume` continue",
            partial.display()
        );
    }
    out
}

pub fn validate(
    spec_path: &Path,
    device: Option<DeviceChoice>,
    output: Option<PathBuf>,
) -> crate::Result<ExitCode> {
    let spec = LoadedSpec::from_file(spec_path)?;
    print!("{}", runner::validate(&spec, device, output.as_deref())?);
    Ok(ExitCode::SUCCESS)
}
