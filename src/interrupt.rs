//! Stopping a run cleanly on Ctrl-C or SIGTERM.
//!
//! Owns: the process-wide "stop requested" flag, the SIGINT/SIGTERM handler thread that sets
//! it ([`install`], called by the `runner run` command only), and [`checkpoint`], the one
//! call the runner makes between units of work (after loading, after each batch, before the
//! results are swapped into place) to stop with [`Error::Interrupted`]. A first signal asks
//! the run to stop at its next checkpoint, so nothing half-written is left (the staging
//! directory is dropped); a second one ends the process at once, after removing the staging
//! directories ([`crate::output::abandon_staging`]). Must not: write results or decide exit
//! codes (the CLI maps `Interrupted` to 130).
//!
//! Tests pause a run at a named checkpoint with `HOOKGRAPH_TEST_PAUSE_AT=<point>` or
//! `<point>#<k>` (its k-th visit): it prints `hookgraph: paused at <point>` to stderr and
//! waits, at most a minute, for a signal, so a signal can be sent at a known moment instead
//! of by timing.

use std::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// The signal that asked to stop, or 0.
static REQUESTED: AtomicI32 = AtomicI32::new(0);

/// The environment variable naming a checkpoint to pause at (tests only).
pub const PAUSE_ENV: &str = "HOOKGRAPH_TEST_PAUSE_AT";

/// Installs the SIGINT/SIGTERM handler thread. Idempotent enough for one binary: call once.
pub fn install() -> Result<()> {
    #[cfg(unix)]
    {
        use signal_hook::consts::{SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])
            .map_err(|e| Error::Other(format!("cannot install the signal handler: {e}")))?;
        std::thread::Builder::new()
            .name("hookgraph-signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    if REQUESTED.swap(sig, Ordering::SeqCst) != 0 {
                        // Second signal: the user means now.
                        // What the output directory holds depends on where the swap was.
                        let left = crate::output::abandon_staging();
                        eprintln!("\n{}: stopped at once; {left}", signal_name(sig));
                        std::process::exit(130);
                    }
                    eprintln!(
                        "\n{}: stopping after the current step (again to stop at once)",
                        signal_name(sig)
                    );
                }
            })
            .map_err(|e| Error::Other(format!("cannot start the signal thread: {e}")))?;
    }
    Ok(())
}

/// Whether a stop was requested.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst) != 0
}

/// Asks the run to stop, as a signal would (for callers embedding the library).
pub fn request(signal: i32) {
    REQUESTED.store(signal, Ordering::SeqCst);
}

fn signal_name(sig: i32) -> &'static str {
    #[cfg(unix)]
    {
        match sig {
            signal_hook::consts::SIGINT => return "interrupted (SIGINT)",
            signal_hook::consts::SIGTERM => return "terminated (SIGTERM)",
            _ => {}
        }
    }
    let _ = sig;
    "stopped"
}

/// Visits of the point named by [`PAUSE_ENV`] so far.
static PAUSE_VISITS: AtomicUsize = AtomicUsize::new(0);

/// The test pause of [`PAUSE_ENV`], if `point` (on this visit) is the one it names.
pub fn pause_at(point: &str) {
    let Ok(want) = std::env::var(PAUSE_ENV) else {
        return;
    };
    let (name, k) = match want.split_once('#') {
        Some((n, k)) => (n.to_string(), k.parse().unwrap_or(1)),
        None => (want, 1),
    };
    if name != point || PAUSE_VISITS.fetch_add(1, Ordering::SeqCst) + 1 != k {
        return;
    }
    eprintln!("hookgraph: paused at {point}");
    let t = Instant::now();
    while !requested() && t.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `Err(Interrupted)` when a stop was requested.
pub fn stop_if_requested() -> Result<()> {
    match REQUESTED.load(Ordering::SeqCst) {
        0 => Ok(()),
        sig => Err(Error::Interrupted(signal_name(sig).to_string())),
    }
}

/// Between two units of work: the test pause for `point`, then `Err(Interrupted)` when a
/// stop was requested.
pub fn checkpoint(point: &str) -> Result<()> {
    pause_at(point);
    stop_if_requested()
}
