//! `runner run`, `runner merge` and `runner validate`: the command-line face of
//! [`crate::runner`] and [`crate::shard::merge`].
//!
//! Owns: printing the summary, the files written and any metric failures, and choosing the
//! exit code (3 when some metric failed but the others were written). Must not: run
//! anything itself.

use std::path::Path;
use std::process::ExitCode;

use super::RunArgs;
use crate::device::DeviceChoice;
use crate::runner::{self, RunOptions};
use crate::spec::LoadedSpec;

pub fn run(spec_path: &Path, args: &RunArgs) -> crate::Result<ExitCode> {
    let spec = LoadedSpec::from_file(spec_path)?;
    let report = runner::run(
        &spec,
        &RunOptions {
            device: args.device,
            output: args.output.clone(),
            quiet: args.quiet,
            shard: args.shard,
            resume: args.resume,
        },
    )?;
    finish(report)
}

/// `runner merge RESULTS`.
pub fn merge(results: &Path, device: Option<DeviceChoice>, quiet: bool) -> crate::Result<ExitCode> {
    let report = crate::shard::merge::merge(
        results,
        &crate::shard::merge::MergeOptions { device, quiet },
    )?;
    finish(report)
}

/// Prints a run's (or merge's) summary, files and failures; exit code 3 if any failed.
fn finish(report: runner::RunReport) -> crate::Result<ExitCode> {
    print!("{}", report.summary);
    println!(
        "wrote {} files to {}",
        report.files.len(),
        report.output_dir.display()
    );
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

pub fn validate(spec_path: &Path, device: Option<DeviceChoice>) -> crate::Result<ExitCode> {
    let spec = LoadedSpec::from_file(spec_path)?;
    print!("{}", runner::validate(&spec, device)?);
    Ok(ExitCode::SUCCESS)
}
