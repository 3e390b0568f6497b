//! The checkpoint file: a run's exact progress, written atomically after every batch, and a
//! shard's result once it is complete.
//!
//! Owns: the file's format (one safetensors file: every metric's [`State`] for every dataset
//! started, as `d<dataset>/m<metric>/<key>` tensors, with the [`Progress`] as JSON in its
//! metadata, so state and position can never disagree), writing it (temporary file, fsync,
//! rename: a kill leaves the previous checkpoint or the new one, never half of one), reading
//! and checking it, and the test hook that aborts a run after k batches. Must not: decide
//! when to checkpoint (the runner does, after each batch) or merge states (the metrics do).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Identity, Shard};
use crate::engine::{Failure, MetricSet, Timings};
use crate::error::{Error, Result};
use crate::metrics::state::Array;
use crate::metrics::State;

/// The checkpoint's file name, in the shard's directory or a run's `.partial/`.
pub const STATE_FILE: &str = "state.safetensors";
/// Where an unsharded run keeps its checkpoint, inside its output directory (removed once
/// the results are written).
pub const PARTIAL_DIR: &str = ".partial";
/// Test hook: abort the process (as a kill would) after this many checkpoints.
pub const ABORT_ENV: &str = "HOOKGRAPH_TEST_ABORT_AFTER_BATCHES";

const META_KEY: &str = "hookgraph_progress";
/// The SHA-256 of the progress record's text and every state tensor (name, dtype, bytes):
/// an edited progress record or state no longer matches it.
const DIGEST_KEY: &str = "hookgraph_digest";
const FORMAT: u32 = 1;

/// The digest stored under [`DIGEST_KEY`]: the progress JSON as stored, then each tensor in
/// name order as `name \0 dtype \0 length bytes`.
fn digest<'a>(
    meta: &str,
    tensors: impl IntoIterator<Item = (&'a str, String, &'a [u8])>,
) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((meta.len() as u64).to_le_bytes());
    h.update(meta.as_bytes());
    let mut tensors: Vec<_> = tensors.into_iter().collect();
    tensors.sort_by(|a, b| a.0.cmp(b.0));
    for (name, dtype, bytes) in tensors {
        h.update(name.as_bytes());
        h.update([0]);
        h.update(dtype.as_bytes());
        h.update([0]);
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    }
    hex::encode(h.finalize())
}

/// Where a run (`shard` given or not) whose results go to `out_dir` keeps its checkpoint.
pub fn path(out_dir: &Path, shard: Option<Shard>) -> PathBuf {
    match shard {
        Some(s) => super::shard_dir(out_dir, s).join(STATE_FILE),
        None => out_dir.join(PARTIAL_DIR).join(STATE_FILE),
    }
}

/// How far a run got.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Progress {
    pub format: u32,
    pub identity: Identity,
    pub shard: Shard,
    pub batch_size: usize,
    /// Datasets (in spec order) whose slice is done: their states are final.
    pub datasets_done: usize,
    /// In dataset `datasets_done`, the first sequence not yet run (absolute index).
    pub next_sequence: usize,
    /// Every dataset's slice is done.
    pub complete: bool,
    /// Metric failures so far (a failed metric has no state for that dataset).
    pub failures: Vec<Failure>,
    /// Timings of each dataset started so far.
    pub timings: Vec<Timings>,
}

/// A checkpoint: the progress and, by (dataset, metric) index, each metric's state.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    pub progress: Progress,
    pub states: BTreeMap<(usize, usize), State>,
}

impl Checkpoint {
    /// Writes the checkpoint atomically to `path`.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut bufs: Vec<(String, Vec<usize>, safetensors::Dtype, Vec<u8>)> = Vec::new();
        for ((d, m), st) in &self.states {
            for (key, a) in &st.arrays {
                let (shape, dtype) = a.shape_and_dtype();
                bufs.push((format!("d{d}/m{m}/{key}"), shape, dtype, a.to_bytes()));
            }
        }
        let err = |e: safetensors::SafeTensorError| Error::Other(format!("checkpoint: {e}"));
        let mut views = Vec::with_capacity(bufs.len());
        for (name, shape, dtype, bytes) in &bufs {
            views.push((
                name.clone(),
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), bytes).map_err(err)?,
            ));
        }
        let meta =
            serde_json::to_string(&self.progress).map_err(|e| Error::Other(e.to_string()))?;
        let sum = digest(
            &meta,
            bufs.iter()
                .map(|(n, _, dt, b)| (n.as_str(), format!("{dt:?}"), b.as_slice())),
        );
        let bytes = safetensors::tensor::serialize(
            views,
            &Some(HashMap::from([
                (META_KEY.to_string(), meta),
                (DIGEST_KEY.to_string(), sum),
            ])),
        )
        .map_err(err)?;
        crate::output::write_atomic(path, &bytes)
    }

    /// Reads a checkpoint written by [`Checkpoint::write`], refusing one whose progress
    /// record or states were changed since (their digest no longer matches).
    pub fn read(path: &Path) -> Result<Self> {
        Self::read_with(path, true)
    }

    /// Reads a checkpoint without checking its digest: for tests and repair tools that
    /// rewrite one on purpose. The runner never resumes or merges through this.
    pub fn read_unverified(path: &Path) -> Result<Self> {
        Self::read_with(path, false)
    }

    fn read_with(path: &Path, verify: bool) -> Result<Self> {
        let bad = |m: String| Error::Other(format!("checkpoint {}: {m}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
        let text = meta
            .metadata()
            .as_ref()
            .and_then(|m| m.get(META_KEY))
            .ok_or_else(|| bad("no progress record (not a hookgraph checkpoint)".into()))?;
        let progress: Progress =
            serde_json::from_str(text).map_err(|e| bad(format!("progress record: {e}")))?;
        if progress.format != FORMAT {
            return Err(bad(format!(
                "format {} (this runner reads format {FORMAT})",
                progress.format
            )));
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
        // The progress record and the states must be the ones written together.
        let stored = meta.metadata().as_ref().and_then(|m| m.get(DIGEST_KEY));
        let tensors = st.tensors();
        let now = digest(
            text,
            tensors
                .iter()
                .map(|(n, v)| (n.as_str(), format!("{:?}", v.dtype()), v.data())),
        );
        if verify && stored != Some(&now) {
            return Err(bad(format!(
                "its progress record or saved states were changed after it was written ({}); delete it and run again",
                if stored.is_some() {
                    "sha256 mismatch"
                } else {
                    "no digest"
                }
            )));
        }
        let mut states: BTreeMap<(usize, usize), State> = BTreeMap::new();
        for (name, view) in tensors {
            let parse = || -> Option<(usize, usize, String)> {
                let mut parts = name.splitn(3, '/');
                let d = parts.next()?.strip_prefix('d')?.parse().ok()?;
                let m = parts.next()?.strip_prefix('m')?.parse().ok()?;
                Some((d, m, parts.next()?.to_string()))
            };
            let (d, m, key) = parse().ok_or_else(|| bad(format!("tensor name '{name}'")))?;
            let a = Array::from_bytes(view.dtype(), view.data())?;
            states.entry((d, m)).or_default().arrays.insert(key, a);
        }
        Ok(Checkpoint { progress, states })
    }
}

impl Checkpoint {
    /// Checks the progress record against the run it is read back into: `sizes` is each
    /// dataset's number of sequences, `n_metrics` the metrics in spec order. A record that
    /// points past the datasets, between batches or outside the shard's slice, or states for
    /// datasets or metrics the record does not cover, are refused: `what` names the file.
    pub fn check_against(
        &self,
        what: &str,
        sizes: &[usize],
        n_metrics: usize,
        shard: Shard,
        batch_size: usize,
    ) -> Result<()> {
        let p = &self.progress;
        let bad = |m: String| {
            Err(Error::Other(format!(
                "{what}: {m}; delete it and run again"
            )))
        };
        let n = sizes.len();
        if p.datasets_done > n {
            return bad(format!(
                "its progress record says {} datasets are done, the run has {n}",
                p.datasets_done
            ));
        }
        if p.complete && p.datasets_done != n {
            return bad(format!(
                "its progress record says complete after {} of {n} datasets",
                p.datasets_done
            ));
        }
        if !p.complete && p.datasets_done < n {
            let r = shard.range(sizes[p.datasets_done], batch_size.max(1));
            let next = p.next_sequence;
            let aligned =
                next == r.end || (next >= r.start && (next - r.start) % batch_size.max(1) == 0);
            if next < r.start || next > r.end || !aligned {
                return bad(format!(
                    "its progress record says dataset {} continues at sequence {next}, which is not a batch boundary of this shard's sequences {}..{} (batch size {batch_size})",
                    p.datasets_done, r.start, r.end
                ));
            }
        }
        if p.timings.len() > n {
            return bad(format!(
                "it has timings for {} datasets, the run has {n}",
                p.timings.len()
            ));
        }
        for &(d, m) in self.states.keys() {
            let covered = d < p.datasets_done || (d == p.datasets_done && !p.complete);
            if d >= n || m >= n_metrics || !covered {
                return bad(format!(
                    "it holds a state for dataset {d}, metric {m}, which its progress record does not cover ({n} datasets, {n_metrics} metrics, {} done)",
                    p.datasets_done
                ));
            }
        }
        Ok(())
    }
}

/// Writes a run's checkpoints as it goes.
pub struct Recorder {
    path: PathBuf,
    progress: Progress,
    /// Final states of the datasets already done.
    done: BTreeMap<(usize, usize), State>,
    written: usize,
    abort_after: Option<usize>,
    /// Write at most this often (0: after every batch); the last write is remembered.
    min_interval: std::time::Duration,
    last_write: Option<std::time::Instant>,
}

impl Recorder {
    /// A recorder for a run of `identity` (shard `shard`) writing to `path`.
    pub fn new(path: PathBuf, identity: Identity, shard: Shard, batch_size: usize) -> Self {
        Recorder {
            path,
            progress: Progress {
                format: FORMAT,
                identity,
                shard,
                batch_size,
                datasets_done: 0,
                next_sequence: 0,
                complete: false,
                failures: Vec::new(),
                timings: Vec::new(),
            },
            done: BTreeMap::new(),
            written: 0,
            abort_after: std::env::var(ABORT_ENV).ok().and_then(|v| v.parse().ok()),
            min_interval: std::time::Duration::ZERO,
            last_write: None,
        }
    }

    /// Checkpoints at most every `seconds` (0, the default: after every batch). A run with a
    /// large state (per-position rows of many heads) on a fast device trades the work a
    /// resume repeats (at most `seconds`) for the time spent writing.
    pub fn with_min_interval(mut self, seconds: f64) -> Self {
        // Never a panic for a library caller: NaN or a negative is every batch, a value past
        // what a Duration holds is never (the CLI refuses both, and more than a day).
        self.min_interval = if seconds.is_nan() || seconds <= 0.0 {
            std::time::Duration::ZERO
        } else {
            std::time::Duration::try_from_secs_f64(seconds).unwrap_or(std::time::Duration::MAX)
        };
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checkpoint at this recorder's path, if there is one, after checking that it
    /// belongs to this very run (same identity, shard and batch size).
    pub fn existing(&self) -> Result<Option<Checkpoint>> {
        if !self.path.is_file() {
            return Ok(None);
        }
        let ck = Checkpoint::read(&self.path)?;
        let (p, q) = (&ck.progress, &self.progress);
        let what = format!(
            "the checkpoint {} is not this run's (delete it, or run without --resume)",
            self.path.display()
        );
        p.identity
            .check("the checkpoint", &q.identity, "this run", &what)?;
        if p.shard != q.shard || p.batch_size != q.batch_size {
            return Err(Error::Other(format!(
                "{what}: it is shard {} with batch size {}, this run is shard {} with batch size {}",
                p.shard, p.batch_size, q.shard, q.batch_size
            )));
        }
        Ok(Some(ck))
    }

    /// Takes over a checkpoint being resumed: its finished datasets' states and timings.
    pub fn adopt(&mut self, ck: &Checkpoint) {
        self.progress.failures = ck.progress.failures.clone();
        self.progress.timings = ck.progress.timings.clone();
        self.done = ck
            .states
            .iter()
            .filter(|((d, _), _)| *d < ck.progress.datasets_done)
            .map(|(k, v)| (*k, v.clone()))
            .collect();
    }

    /// The states of dataset `d`'s active metrics.
    fn states_of(metrics: &MetricSet, d: usize) -> Result<Vec<((usize, usize), State)>> {
        let mut out = Vec::new();
        for i in 0..metrics.len() {
            if metrics.is_active(i) {
                let m = metrics.get(i).expect("active metrics are built");
                out.push(((d, i), m.save_state()?));
            }
        }
        Ok(out)
    }

    fn set_timings(&mut self, d: usize, t: &Timings) {
        self.progress.timings.truncate(d);
        self.progress.timings.resize(d, Timings::default());
        self.progress.timings.push(t.clone());
    }

    /// Makes the next [`Recorder::after_batch`] write whatever the interval says (a run that
    /// is stopping by a signal keeps its latest batch).
    pub fn write_next(&mut self) {
        self.last_write = None;
    }

    /// Writes the checkpoint after a batch of dataset `d` that ended at sequence `next`.
    pub fn after_batch(
        &mut self,
        metrics: &MetricSet,
        d: usize,
        timings: &Timings,
        next: usize,
    ) -> Result<()> {
        if self
            .last_write
            .is_some_and(|t| t.elapsed() < self.min_interval)
        {
            return Ok(());
        }
        self.progress.datasets_done = d;
        self.progress.next_sequence = next;
        self.progress.failures = metrics.failures().to_vec();
        self.set_timings(d, timings);
        let mut states = self.done.clone();
        states.extend(Self::states_of(metrics, d)?);
        Checkpoint {
            progress: self.progress.clone(),
            states,
        }
        .write(&self.path)?;
        self.last_write = Some(std::time::Instant::now());
        self.written += 1;
        if self.abort_after == Some(self.written) {
            eprintln!("{ABORT_ENV}: aborting after {} checkpoints", self.written);
            std::process::abort();
        }
        Ok(())
    }

    /// Dataset `d`'s slice is done: its active metrics' states are final.
    pub fn dataset_done(&mut self, metrics: &MetricSet, d: usize, timings: &Timings) -> Result<()> {
        self.done.extend(Self::states_of(metrics, d)?);
        self.set_timings(d, timings);
        self.progress.datasets_done = d + 1;
        self.progress.next_sequence = 0;
        self.progress.failures = metrics.failures().to_vec();
        Ok(())
    }

    /// Writes the final checkpoint, marked complete (a shard's result); returns it.
    pub fn complete(&mut self, metrics: &MetricSet) -> Result<Checkpoint> {
        self.progress.complete = true;
        self.progress.failures = metrics.failures().to_vec();
        let ck = Checkpoint {
            progress: self.progress.clone(),
            states: self.done.clone(),
        };
        ck.write(&self.path)?;
        Ok(ck)
    }
}
