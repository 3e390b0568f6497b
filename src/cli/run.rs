//! `runner run` and `runner validate`: the command-line face of [`crate::runner`].
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

pub fn run(spec_path: &Path, args: &RunArgs) -> crate::Result<ExitCode> {
    let spec = LoadedSpec::from_file(spec_path)?;
    crate::interrupt::install()?;
    let output = args.output.clone().unwrap_or_else(|| spec.output_dir());
    let report = match runner::run(
        &spec,
        &RunOptions {
            device: args.device,
            output: Some(output.clone()),
            quiet: args.quiet,
        },
    ) {
        Ok(r) => r,
        Err(Error::Interrupted(why)) => {
            eprintln!("{why}: stopped; {}", kept(&output));
            return Ok(ExitCode::from(130));
        }
        Err(e) => {
            eprintln!("error: {e}");
            eprintln!("{}", kept(&output));
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

/// What a run that stopped left in its output directory: nothing of its own.
fn kept(output: &Path) -> String {
    let shown = output.display();
    if output.join("manifest.json").is_file() {
        format!("nothing was written; {shown} still holds the previous results, unchanged")
    } else if output.exists() {
        format!("nothing was written; {shown} is unchanged")
    } else {
        format!("nothing was written ({shown} was not created)")
    }
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
