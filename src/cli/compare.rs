//! `runner compare NEW_DIR BASELINE_DIR`: the command-line face of [`crate::compare`].
//!
//! Owns: the tolerance flags, printing the report and mapping it to an exit code (0 match,
//! 4 drift, 5 missing/extra table or differing keys; 1 when a directory or CSV cannot be
//! read). Must not: compare anything itself.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use crate::compare::{compare_dirs, Tolerance};

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// The results directory to check (e.g. `results/smoke`).
    pub new: PathBuf,
    /// The directory of baseline CSVs it must match.
    pub baseline: PathBuf,
    /// Relative tolerance: a value passes when |new - base| <= atol + rtol * |base|.
    #[arg(long, default_value_t = Tolerance::default().rtol)]
    pub rtol: f64,
    /// Absolute tolerance (see --rtol).
    #[arg(long, default_value_t = Tolerance::default().atol)]
    pub atol: f64,
    /// How many of the largest differences to print per drifted table.
    #[arg(long, default_value_t = 5)]
    pub show: usize,
}

pub fn compare(args: &CompareArgs) -> crate::Result<ExitCode> {
    for (what, v) in [("--rtol", args.rtol), ("--atol", args.atol)] {
        if !(v >= 0.0 && v.is_finite()) {
            return Err(crate::Error::Other(format!(
                "{what} must be a finite number >= 0, got {v}"
            )));
        }
    }
    let tol = Tolerance {
        rtol: args.rtol,
        atol: args.atol,
    };
    let report = compare_dirs(&args.new, &args.baseline, tol)?;
    print!("{}", report.render(args.show));
    Ok(ExitCode::from(report.exit_code()))
}
