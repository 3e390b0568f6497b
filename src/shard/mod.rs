//! Beyond one machine: shards of a run, their exact merge, and resumable runs.
//!
//! Owns: what a shard is ([`Shard`], `--shard I/N`: a contiguous, batch-aligned slice of
//! every dataset's sequences), what makes two pieces of work parts of the same run
//! ([`Identity`]: spec text, model weights and config, processing, datasets' tokens, runner
//! version — each
//! difference named in the error), the checkpoint file that a run writes after every batch
//! and a shard leaves as its result ([`checkpoint`]), and `runner merge` ([`merge`]). Must
//! not: run the batch loop (that is [`crate::engine`]) or write tables (a merge writes
//! through [`crate::runner::write_results`], exactly as an unsharded run does).
//!
//! Slices are whole batches, so every batch of a shard is the batch the unsharded run would
//! see: per-sequence values are bit-identical, and the only difference a merge can show is
//! the order of f64 additions in the sums (relative 1e-15, far inside 1e-12).

pub mod checkpoint;
pub mod compute;
pub mod merge;

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::engine::{Failure, Timings};
use crate::error::{Error, Result};

/// The most shards `--shard I/N` accepts before looking at the data.
pub const MAX_SHARDS: usize = 1 << 20;

/// `--shard I/N`: the I-th (from 0) of N slices of the work. Every way in (the command
/// line, a directory name, a shard's `shard.json`) goes through [`Shard::new`], so a value
/// of this type always has `0 <= index < count <= MAX_SHARDS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawShard")]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// A shard as a file spells it, before [`Shard::new`] has checked it.
#[derive(Deserialize)]
struct RawShard {
    index: usize,
    count: usize,
}

impl TryFrom<RawShard> for Shard {
    type Error = String;
    fn try_from(raw: RawShard) -> std::result::Result<Self, String> {
        Shard::new(raw.index, raw.count)
    }
}

impl Shard {
    /// The whole run as one shard.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// `I/N` with `0 <= I < N <= MAX_SHARDS`. Before anything is touched: no run has a
    /// million shards, and a count near `usize::MAX` would make a merge enumerate (and
    /// allocate for) every missing shard. The data's own bound comes at planning
    /// ([`Shard::check_fits`]).
    pub fn new(index: usize, count: usize) -> std::result::Result<Shard, String> {
        if count == 0 || index >= count {
            return Err(format!(
                "shard {index}/{count}: expected I/N with 0 <= I < N, e.g. --shard 0/4"
            ));
        }
        if count > MAX_SHARDS {
            return Err(format!(
                "shard {index}/{count}: N = {count} shards is more than hookgraph accepts ({MAX_SHARDS}); a shard gets at least one sequence"
            ));
        }
        Ok(Shard { index, count })
    }

    /// Sequences `[start, end)` of a dataset of `n` sequences that this shard runs: whole
    /// batches of `batch_size`, N contiguous slices as even as batches allow (a shard may be
    /// empty when there are fewer batches than shards).
    pub fn range(&self, n: usize, batch_size: usize) -> Range<usize> {
        // In u128: index * batches cannot overflow for any usize inputs, so the slice is
        // exact even for counts that [`Shard::new`] would refuse.
        let batches = n.div_ceil(batch_size.max(1)) as u128;
        let (index, count) = (self.index as u128, self.count.max(1) as u128);
        let bs = batch_size as u128;
        let at = |k: u128| (k * batches / count * bs).min(n as u128) as usize;
        at(index)..at(index + 1)
    }

    /// `I-of-N`, the shard's directory name under `shards/`.
    pub fn dir_name(&self) -> String {
        format!("{}-of-{}", self.index, self.count)
    }

    /// Parses a directory name made by [`Shard::dir_name`].
    pub fn from_dir_name(s: &str) -> Option<Shard> {
        let (i, n) = s.split_once("-of-")?;
        Shard::new(i.parse().ok()?, n.parse().ok()?).ok()
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    /// `I/N` with `0 <= I < N` (Slurm's `$SLURM_ARRAY_TASK_ID/N`, Kubernetes'
    /// `$JOB_COMPLETION_INDEX/N`).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("'{s}': expected I/N with 0 <= I < N, e.g. --shard 0/4");
        let (i, n) = s.split_once('/').ok_or_else(bad)?;
        let index: usize = i.trim().parse().map_err(|_| bad())?;
        let count: usize = n.trim().parse().map_err(|_| bad())?;
        if count == 0 || index >= count {
            return Err(bad());
        }
        Shard::new(index, count).map_err(|e| format!("'{s}': {e}"))
    }
}

/// Where the shards of a run whose results go to `out_dir` write theirs.
pub fn shards_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("shards")
}

/// A shard's own directory: `<out_dir>/shards/I-of-N/`.
pub fn shard_dir(out_dir: &Path, shard: Shard) -> PathBuf {
    shards_dir(out_dir).join(shard.dir_name())
}

/// A shard's manifest entry, beside its checkpoint: what `runner merge` reads first.
pub const SHARD_MANIFEST: &str = "shard.json";

/// What a shard ran, for the merge and for people.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardManifest {
    pub identity: Identity,
    pub shard: Shard,
    /// The spec's text, so the merge can rebuild the run without the spec file.
    pub spec_toml: String,
    /// The spec path as the shard's command line gave it (the merge's manifest shows it
    /// when it names the same file from the merge's directory).
    pub spec_path_given: PathBuf,
    pub device: String,
    pub hook_points: Vec<String>,
    pub datasets: Vec<ShardDataset>,
    pub failures: Vec<Failure>,
    pub load_seconds: f64,
    pub total_seconds: f64,
    /// SHA-256 of each state file in the shard's directory (by file name), checked by the
    /// merge before it reads them. Empty in shards written before it was recorded, which
    /// the merge refuses.
    #[serde(default)]
    pub state_sha256: std::collections::BTreeMap<String, String>,
}

/// The state files of a shard's directory that its `shard.json` hashes.
pub const STATE_FILES: &[&str] = &[checkpoint::STATE_FILE];

/// [`ShardManifest::state_sha256`] for the shard directory `dir`.
pub fn state_hashes(dir: &Path) -> Result<std::collections::BTreeMap<String, String>> {
    STATE_FILES
        .iter()
        .map(|f| {
            Ok((
                f.to_string(),
                crate::model::checkpoint::sha256_file(&dir.join(f))?,
            ))
        })
        .collect()
}

impl Shard {
    /// Refuses more shards than the largest dataset has sequences: such a split only makes
    /// empty shards, and a count near `usize::MAX` overflows the slice arithmetic and makes
    /// the merge enumerate (and allocate for) every missing shard.
    pub fn check_fits(&self, sizes: &[usize]) -> Result<()> {
        let most = sizes.iter().copied().max().unwrap_or(0).max(1);
        if self.count > most {
            return Err(Error::Other(format!(
                "--shard {self}: {} shards for at most {most} sequences per dataset; use N <= {most}",
                self.count
            )));
        }
        Ok(())
    }
}

/// One dataset's slice in a shard.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardDataset {
    pub name: String,
    /// Sequences `[start, end)` this shard ran.
    pub sequences: [usize; 2],
    pub timings: Timings,
}

/// A dataset as a merge checks it: its name, shape and the hash of its tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetId {
    pub name: String,
    pub n_sequences: usize,
    pub seq_len: usize,
    pub tokens_sha256: String,
}

impl DatasetId {
    pub fn of(d: &Dataset) -> Self {
        DatasetId {
            name: d.name.clone(),
            n_sequences: d.n_sequences(),
            seq_len: d.seq_len(),
            tokens_sha256: tokens_hash(d),
        }
    }
}

/// SHA-256 of a dataset's shape and token ids.
pub fn tokens_hash(d: &Dataset) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((d.n_sequences() as u64).to_le_bytes());
    h.update((d.seq_len() as u64).to_le_bytes());
    for t in d.tokens.iter() {
        h.update(t.to_le_bytes());
    }
    hex::encode(h.finalize())
}

/// SHA-256 of a spec's text.
pub fn text_hash(text: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// What makes a checkpoint or a shard part of a given run. Two pieces of work merge (or a
/// checkpoint resumes) only when every field is equal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub runner_version: String,
    /// The spec file as the run read it (absolute), and its text's SHA-256.
    pub spec_path: PathBuf,
    pub spec_sha256: String,
    pub weights_sha256: String,
    /// `config.json`'s SHA-256: the same weights under another config are another model.
    /// (Empty in files written before it was recorded; they never match a run.)
    #[serde(default)]
    pub config_sha256: String,
    /// The processing switches the weights were loaded with (also in the spec's text, but
    /// named on their own so a difference reads as one).
    #[serde(default)]
    pub processing: Option<crate::model::Processing>,
    pub datasets: Vec<DatasetId>,
    /// The metrics' names in spec order (state is stored by index).
    pub metrics: Vec<String>,
}

impl Identity {
    /// What differs between `self` (from `a`) and `other` (from `b`), in words; `None` when
    /// they are the same run.
    pub fn differences(&self, a: &str, other: &Identity, b: &str) -> Option<String> {
        let mut out = Vec::new();
        if self.runner_version != other.runner_version {
            out.push(format!(
                "runner version: {} in {a}, {} in {b}",
                self.runner_version, other.runner_version
            ));
        }
        if self.spec_sha256 != other.spec_sha256 {
            out.push(format!(
                "spec: {} (sha256 {}) in {a}, {} (sha256 {}) in {b}",
                self.spec_path.display(),
                short(&self.spec_sha256),
                other.spec_path.display(),
                short(&other.spec_sha256)
            ));
        }
        if self.weights_sha256 != other.weights_sha256 {
            out.push(format!(
                "model weights: sha256 {} in {a}, {} in {b}",
                short(&self.weights_sha256),
                short(&other.weights_sha256)
            ));
        }
        if self.config_sha256 != other.config_sha256 {
            out.push(format!(
                "config.json: sha256 {} in {a}, {} in {b}",
                short_or_none(&self.config_sha256),
                short_or_none(&other.config_sha256)
            ));
        }
        if self.processing != other.processing {
            let show = |p: &Option<crate::model::Processing>| match p {
                Some(p) => format!("{p:?}"),
                None => "(not recorded)".to_string(),
            };
            out.push(format!(
                "processing: {} in {a}, {} in {b}",
                show(&self.processing),
                show(&other.processing)
            ));
        }
        let names = |ids: &[DatasetId]| ids.iter().map(|d| d.name.clone()).collect::<Vec<_>>();
        if names(&self.datasets) != names(&other.datasets) {
            out.push(format!(
                "datasets: [{}] in {a}, [{}] in {b}",
                names(&self.datasets).join(", "),
                names(&other.datasets).join(", ")
            ));
        } else {
            for (x, y) in self.datasets.iter().zip(&other.datasets) {
                if x != y {
                    out.push(format!(
                        "dataset '{}': {} x {} tokens (sha256 {}) in {a}, {} x {} tokens (sha256 {}) in {b}",
                        x.name,
                        x.n_sequences,
                        x.seq_len,
                        short(&x.tokens_sha256),
                        y.n_sequences,
                        y.seq_len,
                        short(&y.tokens_sha256)
                    ));
                }
            }
        }
        if self.metrics != other.metrics {
            out.push(format!(
                "metrics: [{}] in {a}, [{}] in {b}",
                self.metrics.join(", "),
                other.metrics.join(", ")
            ));
        }
        (!out.is_empty()).then(|| out.join("; "))
    }

    /// An error if `other` is not the same run.
    pub fn check(&self, a: &str, other: &Identity, b: &str, what: &str) -> Result<()> {
        match self.differences(a, other, b) {
            None => Ok(()),
            Some(d) => Err(Error::Other(format!("{what}: they differ in {d}"))),
        }
    }
}

/// The first 12 hex digits of a hash: enough to tell two apart in a message.
fn short(h: &str) -> &str {
    // `get`: an edited file may hold any text, and a byte index inside a character panics.
    h.get(..12).unwrap_or(h)
}

/// [`short`], or "(not recorded)" for a field an older file lacks.
fn short_or_none(h: &str) -> &str {
    if h.is_empty() {
        "(not recorded)"
    } else {
        short(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_batch_once_in_order() {
        for n in [0usize, 1, 7, 10, 24, 25] {
            for bs in [1usize, 3, 8] {
                for count in 1..6 {
                    let ranges: Vec<_> = (0..count)
                        .map(|index| Shard { index, count }.range(n, bs))
                        .collect();
                    let mut next = 0;
                    for r in &ranges {
                        assert_eq!(r.start, next, "n {n} bs {bs} N {count}: {ranges:?}");
                        assert!(r.start % bs == 0 || r.start == n, "batch-aligned");
                        next = r.end;
                    }
                    assert_eq!(next, n);
                }
            }
        }
    }

    #[test]
    fn shard_argument_is_checked() {
        assert_eq!("2/3".parse::<Shard>(), Ok(Shard { index: 2, count: 3 }));
        assert!("3/3".parse::<Shard>().is_err());
        assert!("1/0".parse::<Shard>().is_err());
        assert!("x".parse::<Shard>().is_err());
        assert!("0/18446744073709551615".parse::<Shard>().is_err());
        assert!("0/1048576".parse::<Shard>().is_ok());
        assert_eq!(
            Shard::from_dir_name("1-of-4"),
            Some(Shard { index: 1, count: 4 })
        );
        assert_eq!(Shard::from_dir_name("4-of-4"), None);
        assert_eq!(Shard::from_dir_name("0-of-18446744073709551615"), None);
    }

    /// A `shard.json` is read back through the same checks as `--shard`: an edited count
    /// near `usize::MAX` (the fuzzer's find) is refused, not multiplied.
    #[test]
    fn shard_read_from_a_file_is_checked() {
        let read = |t: &str| serde_json::from_str::<Shard>(t);
        assert_eq!(
            read(r#"{"index":1,"count":2}"#).unwrap(),
            Shard { index: 1, count: 2 }
        );
        for bad in [
            r#"{"index":2,"count":2}"#,
            r#"{"index":0,"count":0}"#,
            r#"{"index":9799832789158199296,"count":18446744073709551615}"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        // And the slice arithmetic itself cannot overflow, whatever the values.
        let huge = Shard {
            index: 9799832789158199296,
            count: 18446744073709551615,
        };
        let r = huge.range(usize::MAX, 1);
        assert!(r.start <= r.end);
    }
}
