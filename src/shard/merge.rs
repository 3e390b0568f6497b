//! `runner merge results/<name>`: the shards' saved states, merged into exactly the tables,
//! pictures and manifest the unsharded run would have written.
//!
//! Owns: finding the shards (`shards/I-of-N/`), refusing an incomplete set or pieces of
//! different runs (spec, model weights and config, processing, datasets' tokens, runner
//! version: each difference named, with the shards it was found in), verifying each
//! shard's state file against the sha256 in its `shard.json` and its records against the
//! datasets' sizes, re-checking the weights, config and datasets the merge itself loads
//! against what the shards ran, and merging every metric's states in shard order (each
//! metric bounds the counts it reads by the dataset's sizes). Must not: compute anything from activations (no forward pass besides what the
//! report's pages need) or write files other than through [`runner::write_results`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use super::checkpoint::{Checkpoint, STATE_FILE};
use super::{shards_dir, DatasetId, Shard, ShardManifest, SHARD_MANIFEST, STATE_FILES};
use crate::data::Dataset;
use crate::device::{with_device, DeviceChoice, OnDevice};
use crate::engine::Timings;
use crate::error::{Error, Result};
use crate::metrics::RunContext;
use crate::model::checkpoint::sha256_file;
use crate::runner::{self, Computed, RunReport, WriteInput};
use crate::seam::SeamDevice;
use crate::spec::LoadedSpec;

/// `runner merge` options.
#[derive(Debug, Clone, Default)]
pub struct MergeOptions {
    /// Where the report's pages run the model (the spec's device unless overridden).
    pub device: Option<DeviceChoice>,
    pub quiet: bool,
}

/// One complete shard.
pub struct ShardResult {
    pub shard: Shard,
    pub dir: PathBuf,
    pub manifest: ShardManifest,
    pub checkpoint: Checkpoint,
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Other(format!("{}: {e}", path.display())))
}

/// Every shard of the run whose results go to `results_dir`, checked complete and alike.
pub fn find_shards(results_dir: &Path) -> Result<Vec<ShardResult>> {
    let dir = shards_dir(results_dir);
    let entries = std::fs::read_dir(&dir).map_err(|e| {
        Error::Other(format!(
            "{}: no shards to merge ({e}); run `runner run SPEC --shard I/N` for every I first",
            dir.display()
        ))
    })?;
    let mut found: Vec<Shard> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| Shard::from_dir_name(&e.file_name().to_string_lossy()))
        .collect();
    found.sort_by_key(|s| (s.count, s.index));
    let counts: BTreeSet<usize> = found.iter().map(|s| s.count).collect();
    let count = match counts.len() {
        0 => {
            return Err(Error::Other(format!(
                "{}: no shard directories (I-of-N) to merge",
                dir.display()
            )))
        }
        1 => *counts.first().expect("one"),
        _ => {
            return Err(Error::Other(format!(
                "{}: shards of different splits ({}); keep the directories of one split only",
                dir.display(),
                counts
                    .iter()
                    .map(|n| format!("N = {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )))
        }
    };
    // N comes from directory names: never enumerate (or allocate for) more shards than
    // there are directories. The first few missing ones are named.
    if found.len() < count {
        let missing: Vec<String> = (0..count)
            .filter(|&i| !found.iter().any(|s| s.index == i))
            .take(8)
            .map(|index| Shard { index, count }.dir_name())
            .collect();
        return Err(Error::Other(format!(
            "{}: {} of {count} shards missing ({}{}): their tasks did not run, or wrote elsewhere",
            dir.display(),
            count - found.len(),
            missing.join(", "),
            if count - found.len() > missing.len() {
                ", ..."
            } else {
                ""
            }
        )));
    }
    let mut out: Vec<ShardResult> = Vec::new();
    for shard in found {
        let sdir = dir.join(shard.dir_name());
        let incomplete = |why: &str| {
            Error::Other(format!(
                "shard {} is not complete ({why}): its task is still running or was stopped; rerun it with `runner run SPEC --shard {shard} --resume`",
                shard.dir_name()
            ))
        };
        let mpath = sdir.join(SHARD_MANIFEST);
        if !mpath.is_file() {
            return Err(incomplete("no shard.json yet"));
        }
        let manifest: ShardManifest = read_json(&mpath)?;
        verify_state_files(&sdir, shard, &manifest)?;
        let checkpoint = Checkpoint::read(&sdir.join(STATE_FILE))?;
        if !checkpoint.progress.complete {
            return Err(incomplete("its checkpoint is partial"));
        }
        if manifest.shard != shard || checkpoint.progress.shard != shard {
            return Err(Error::Other(format!(
                "{}: its files say shard {} / {} (moved from another directory?)",
                sdir.display(),
                manifest.shard,
                checkpoint.progress.shard
            )));
        }
        // Every piece must belong to the same run as shard 0.
        if let Some(first) = out.first() {
            let (a, b) = (first.shard.dir_name(), shard.dir_name());
            first.manifest.identity.check(
                &format!("shard {a}"),
                &manifest.identity,
                &format!("shard {b}"),
                "refusing to merge shards of different runs",
            )?;
        }
        manifest.identity.check(
            "its shard.json",
            &checkpoint.progress.identity,
            "its checkpoint",
            &format!("shard {}: its files disagree", shard.dir_name()),
        )?;
        out.push(ShardResult {
            shard,
            dir: sdir,
            manifest,
            checkpoint,
        });
    }
    Ok(out)
}

/// Checks every state file of a shard against the SHA-256 its `shard.json` records, naming
/// the shard and the file on a mismatch.
fn verify_state_files(sdir: &Path, shard: Shard, manifest: &ShardManifest) -> Result<()> {
    let name = shard.dir_name();
    for file in STATE_FILES {
        let Some(want) = manifest.state_sha256.get(*file) else {
            return Err(Error::Other(format!(
                "shard {name}: its shard.json records no sha256 for {file} (written by an older runner?); rerun the shard"
            )));
        };
        let path = sdir.join(file);
        let got = sha256_file(&path)?;
        if &got != want {
            return Err(Error::Other(format!(
                "shard {name}: {} does not match the sha256 its shard.json records ({} vs {}): it was changed after the shard finished; rerun the shard",
                path.display(),
                &got[..12],
                want.get(..12).unwrap_or(want)
            )));
        }
    }
    if let Some(other) = manifest
        .state_sha256
        .keys()
        .find(|k| !STATE_FILES.contains(&k.as_str()))
    {
        return Err(Error::Other(format!(
            "shard {name}: its shard.json hashes an unknown file '{other}'"
        )));
    }
    Ok(())
}

/// Merges the shards under `results_dir` and writes the results there.
pub fn merge(results_dir: &Path, opts: &MergeOptions) -> Result<RunReport> {
    // The only writer from here to the swap (no shard may be running); a missing directory
    // is `find_shards`' error, with nothing created for it.
    let _lock = (results_dir.is_dir() || crate::outdir::swap_parked(results_dir))
        .then(|| crate::outdir::Lock::acquire(results_dir, crate::outdir::LockMode::Exclusive))
        .transpose()?;
    let shards = find_shards(results_dir)?;
    let first = &shards[0].manifest;
    // The path as the shards were given it when it still names the same file from here
    // (so the manifest reads as the unsharded run's), else the absolute one they recorded.
    let same_file =
        std::fs::canonicalize(&first.spec_path_given).is_ok_and(|p| p == first.identity.spec_path);
    let path = if same_file {
        &first.spec_path_given
    } else {
        &first.identity.spec_path
    };
    let spec = LoadedSpec::from_str(&first.spec_toml, path)?;
    let kind = opts.device.unwrap_or(spec.spec.model.device).resolve()?;
    if !opts.quiet {
        eprintln!(
            "merging {} shards of '{}' (device {kind})",
            shards.len(),
            spec.spec.name
        );
    }
    with_device(
        kind,
        Merge {
            kind,
            spec: &spec,
            shards: &shards,
            out_dir: results_dir,
            quiet: opts.quiet,
        },
    )
}

struct Merge<'a> {
    kind: crate::device::DeviceKind,
    spec: &'a LoadedSpec,
    shards: &'a [ShardResult],
    out_dir: &'a Path,
    quiet: bool,
}

impl OnDevice for Merge<'_> {
    type Output = RunReport;
    fn run<D: SeamDevice>(self, dev: D) -> Result<RunReport> {
        let t0 = Instant::now();
        let Merge {
            kind,
            spec,
            shards,
            out_dir,
            quiet,
        } = self;
        let ident = &shards[0].manifest.identity;
        let runner::Prepared {
            loaded,
            heads,
            datasets,
            mut metrics,
            mut weight_metrics,
            intervention_tables,
        } = runner::prepare(dev, spec, quiet)?;
        let load_seconds = t0.elapsed().as_secs_f64();

        // What the merge loaded must be what the shards ran.
        let weights_sha256 = sha256_file(&loaded.files.weights)?;
        if weights_sha256 != ident.weights_sha256 {
            return Err(Error::Other(format!(
                "the model weights changed since the shards ran: {} has sha256 {}, the shards ran {}",
                loaded.files.weights.display(),
                weights_sha256,
                ident.weights_sha256
            )));
        }
        for (d, id) in datasets.iter().zip(&ident.datasets) {
            let now = DatasetId::of(d);
            if &now != id {
                return Err(Error::Other(format!(
                    "dataset '{}' changed since the shards ran: it now has {} x {} tokens (sha256 {}), the shards ran {} x {} (sha256 {})",
                    d.name, now.n_sequences, now.seq_len, now.tokens_sha256, id.n_sequences, id.seq_len, id.tokens_sha256
                )));
            }
        }
        let config_sha256 = sha256_file(&loaded.files.config)?;
        if config_sha256 != ident.config_sha256 {
            return Err(Error::Other(format!(
                "the model's config changed since the shards ran: {} has sha256 {}, the shards ran {}",
                loaded.files.config.display(),
                config_sha256,
                if ident.config_sha256.is_empty() {
                    "(not recorded)"
                } else {
                    &ident.config_sha256
                }
            )));
        }
        let names: Vec<String> = metrics.names().map(str::to_string).collect();
        if names != ident.metrics || datasets.len() != ident.datasets.len() {
            return Err(Error::Other(
                "the spec's metrics or datasets do not match the shards' records".into(),
            ));
        }
        // Each shard's records against the datasets' known sizes, before any state is read.
        let sizes: Vec<usize> = datasets.iter().map(Dataset::n_sequences).collect();
        let batch_size = spec.spec.model.batch_size;
        for s in shards {
            let label = format!("shard {}", s.shard.dir_name());
            s.shard
                .check_fits(&sizes)
                .map_err(|e| Error::Other(format!("{label}: {e}")))?;
            s.checkpoint.check_against(
                &format!("{label}: {}", s.dir.join(STATE_FILE).display()),
                &sizes,
                metrics.len(),
                s.shard,
                batch_size,
            )?;
            if s.checkpoint.progress.batch_size != batch_size {
                return Err(Error::Other(format!(
                    "{label}: it ran batch size {}, the spec says {batch_size}",
                    s.checkpoint.progress.batch_size
                )));
            }
            for (d, (rec, &n)) in s.manifest.datasets.iter().zip(&sizes).enumerate() {
                let r = s.shard.range(n, batch_size);
                if rec.name != datasets[d].name || rec.sequences != [r.start, r.end] {
                    return Err(Error::Other(format!(
                        "{label}: its shard.json says dataset '{}' sequences {}..{}, but shard {} of {n} sequences is '{}' {}..{}",
                        rec.name, rec.sequences[0], rec.sequences[1], s.shard, datasets[d].name, r.start, r.end
                    )));
                }
            }
            if s.manifest.datasets.len() != sizes.len() {
                return Err(Error::Other(format!(
                    "{label}: its shard.json lists {} datasets, the run has {}",
                    s.manifest.datasets.len(),
                    sizes.len()
                )));
            }
        }
        for s in shards {
            metrics.restore_failures(&s.checkpoint.progress.failures);
        }

        let ctx = RunContext::of(&loaded, &heads);
        let mut computed = Computed::new(shards[0].manifest.hook_points.clone());
        for (d, dataset) in datasets.iter().enumerate() {
            metrics.start_dataset(&ctx, dataset);
            let sources: Vec<(String, &Checkpoint)> = shards
                .iter()
                .map(|s| (format!("shard {}", s.shard.dir_name()), &s.checkpoint))
                .collect();
            super::compute::merge_states(&ctx, &mut metrics, dataset, d, &sources);
            let tables = metrics.finish_dataset(&ctx, dataset);
            // The run's time is the shards' time.
            let mut timings = Timings::default();
            for s in shards {
                if let Some(t) = s.checkpoint.progress.timings.get(d) {
                    timings.forward_seconds += t.forward_seconds;
                    timings.checkpoint_seconds += t.checkpoint_seconds;
                    for (k, v) in &t.metric_seconds {
                        *timings.metric_seconds.entry(k.clone()).or_default() += v;
                    }
                }
            }
            computed.add_dataset(dataset, tables, timings)?;
        }
        // Weight metrics are not sharded: the merge computes them, once.
        runner::run_weight_metrics(
            &ctx,
            &mut weight_metrics,
            &mut metrics,
            &mut computed,
            quiet,
        )?;
        runner::write_results(
            &WriteInput {
                spec,
                out_dir: out_dir.to_path_buf(),
                kind,
                loaded: &loaded,
                heads: &heads,
                datasets: &datasets,
                intervention_tables: &intervention_tables,
                quiet,
                t0,
                load_seconds,
                weights_sha256,
                merged_shards: Some(shards.len()),
                identity: ident.clone(),
            },
            &mut metrics,
            computed,
        )
    }
}
