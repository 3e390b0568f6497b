//! The hook graph executor: runs a spec from model to files, in three steps, one module each.
//!
//! - `plan`: the prepare step — check the output directory, resolve and load the model,
//!   select heads, build datasets, metrics and interventions, plan and check their table
//!   names and views: everything that can fail before the first forward pass. `validate`
//!   stops here.
//! - `compute`: what the compute step hands on ([`Computed`]) and the weight phase
//!   (`run_weight_metrics`: metrics of the weights alone such as `ov_circuit`, once per
//!   run, not per shard). The batch loop itself is [`crate::engine`]'s, driven through
//!   [`crate::shard::compute`] (shards, checkpoints, `--resume`).
//! - `write`: the one write phase ([`write_results`]): fail the metrics whose tables hold
//!   NaN or infinity, write CSVs, pictures and the manifest into a staging directory and swap
//!   it into place whole. A run and `runner merge` both end there, so they write the same
//!   files.
//!
//! This module owns the order of those steps for a run (`run_on`), the options and the
//! report, and the summary. A metric that fails is reported and the others still finish and
//! are written ("nothing lost"); an error or a signal leaves the output directory's results
//! as they were ("nothing escapes"). Must not: implement metrics, the batch loop, model math
//! or file formats; those live in `metrics`, `engine`, `model` and `output`.

mod compute;
mod plan;
mod write;

pub(crate) use compute::run_weight_metrics;
pub use compute::{Computed, DatasetRecord, WeightRecord};
use plan::run_inputs;
pub use plan::validate;
pub(crate) use plan::{prepare, Prepared, WeightEntry};
pub use write::{write_results, WriteInput};

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};

use crate::device::{with_device, DeviceChoice, DeviceKind, OnDevice};
use crate::engine::Engine;
use crate::error::Result;
use crate::interrupt;
use crate::metrics::RunContext;
use crate::model::{checkpoint, ModelSource};
use crate::output::{self, Table, Target};
use crate::seam::SeamDevice;
use crate::shard::checkpoint::Recorder;
use crate::shard::compute::ComputeOptions;
use crate::shard::{self, DatasetId, Identity, Shard, ShardDataset, ShardManifest};
use crate::spec::LoadedSpec;

/// Command-line overrides of a spec.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub device: Option<DeviceChoice>,
    pub output: Option<PathBuf>,
    pub quiet: bool,
    /// `--shard I/N`: run one slice and save its partial state for `runner merge`.
    pub shard: Option<Shard>,
    /// `--resume`: continue from this run's checkpoint, if it left one.
    pub resume: bool,
    /// `--checkpoint-every SECONDS`: write checkpoints at most this often (0: every batch).
    pub checkpoint_every: f64,
}

pub use crate::engine::Failure;

/// What a run did.
#[derive(Debug)]
pub struct RunReport {
    pub output_dir: PathBuf,
    /// Where the results the run replaced were moved (`<output_dir>.prev`), if any.
    pub previous: Option<PathBuf>,
    pub files: Vec<PathBuf>,
    pub failures: Vec<Failure>,
    pub summary: String,
}

/// The spec's model source, with relative paths resolved against the spec file.
pub fn model_source(spec: &LoadedSpec) -> ModelSource {
    match (&spec.spec.model.path, &spec.spec.model.name) {
        (Some(p), _) => ModelSource::Path(spec.resolve(p)),
        (None, Some(n)) => ModelSource::Hub(n.clone()),
        (None, None) => unreachable!("checked when the spec was parsed"),
    }
}

fn spinner(quiet: bool, msg: String) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new_spinner().with_message(msg);
    pb.enable_steady_tick(std::time::Duration::from_millis(120));
    pb
}

/// A progress bar over `len` steps (hidden when `quiet`); its prefix names the step
/// (`passes` for the batch loop), shared with sharded runs.
pub(crate) fn bar(quiet: bool, len: u64, msg: String) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len).with_message(msg);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg:28} [{bar:30}] {pos}/{len} {prefix} {elapsed_precise} eta {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    pb
}

/// Runs a spec on the device it (or the override) asks for.
pub fn run(spec: &LoadedSpec, opts: &RunOptions) -> Result<RunReport> {
    let kind = opts.device.unwrap_or(spec.spec.model.device).resolve()?;
    if !opts.quiet {
        eprintln!("device: {kind}");
    }
    with_device(kind, Run { kind, spec, opts })
}

/// A run's work, on whichever device was picked.
struct Run<'a> {
    kind: DeviceKind,
    spec: &'a LoadedSpec,
    opts: &'a RunOptions,
}

impl OnDevice for Run<'_> {
    type Output = RunReport;
    fn run<D: SeamDevice>(self, dev: D) -> Result<RunReport> {
        run_on(dev, self.kind, self.spec, self.opts)
    }
}

fn run_on<D: SeamDevice>(
    dev: D,
    kind: DeviceKind,
    spec: &LoadedSpec,
    opts: &RunOptions,
) -> Result<RunReport> {
    let t0 = Instant::now();
    // The output directory first: a run that cannot write its results should not compute
    // them. (The write phase swaps a staging directory into place; see `write_results`.)
    let out_dir = opts.output.clone().unwrap_or_else(|| spec.output_dir());
    // One writer per output directory, taken before anything is computed.
    let _lock = crate::outdir::lock_for_run(&out_dir, opts.shard)?;
    let Prepared {
        loaded,
        heads,
        datasets,
        mut metrics,
        mut weight_metrics,
        intervention_tables,
    } = prepare(dev, spec, opts.quiet)?;
    // No run writes over what it reads.
    crate::outdir::check_inputs_outside(&Target::check(&out_dir)?, &run_inputs(spec, &loaded))?;
    interrupt::checkpoint("prepared")?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let ctx = RunContext::of(&loaded, &heads);

    // The compute phase: every dataset's batches (a shard's slice of them) through the
    // model and the metrics, with a checkpoint after each batch when every metric can save
    // its state.
    let batch_size = spec.spec.model.batch_size;
    let engine = Engine::new(&loaded.model, &ctx, &metrics, batch_size)?;
    // The mean passes (mean ablations, metrics that subtract a mean): once per dataset
    // named, before any dataset's batches.
    engine.run_mean_passes(&mut metrics, &datasets)?;
    let weights_sha256 = checkpoint::sha256_file(&loaded.files.weights)?;
    let identity = Identity {
        runner_version: env!("CARGO_PKG_VERSION").to_string(),
        spec_path: std::fs::canonicalize(&spec.path).unwrap_or_else(|_| spec.path.clone()),
        spec_sha256: shard::text_hash(&spec.text),
        weights_sha256: weights_sha256.clone(),
        config_sha256: checkpoint::sha256_file(&loaded.files.config)?,
        processing: Some(loaded.processing),
        datasets: datasets.iter().map(DatasetId::of).collect(),
        metrics: metrics.names().map(str::to_string).collect(),
    };
    let stateless = (0..metrics.len())
        .filter_map(|i| metrics.get(i).map(|m| m.save_state()))
        .find_map(|r| r.err());
    let mut recorder = match stateless {
        Some(e) if opts.shard.is_some() || opts.resume => return Err(e),
        Some(_) => None,
        None => Some(
            Recorder::new(
                shard::checkpoint::path(&out_dir, opts.shard),
                identity.clone(),
                opts.shard.unwrap_or(Shard::WHOLE),
                batch_size,
            )
            .with_min_interval(opts.checkpoint_every),
        ),
    };
    let (outcomes, last) = shard::compute::run(
        &engine,
        &mut metrics,
        &datasets,
        recorder.as_mut(),
        &ComputeOptions {
            shard: opts.shard,
            resume: opts.resume,
            quiet: opts.quiet,
        },
    )?;

    if let (Some(s), Some(last)) = (opts.shard, last) {
        let dir = shard::shard_dir(&out_dir, s);
        let manifest = ShardManifest {
            identity,
            shard: s,
            spec_toml: spec.text.clone(),
            spec_path_given: spec.path.clone(),
            device: kind.to_string(),
            hook_points: engine.hook_points().to_vec(),
            datasets: datasets
                .iter()
                .zip(&outcomes)
                .map(|(d, o)| {
                    let r = s.range(d.n_sequences(), batch_size);
                    ShardDataset {
                        name: d.name.clone(),
                        sequences: [r.start, r.end],
                        timings: o.timings.clone(),
                    }
                })
                .collect(),
            failures: last.progress.failures.clone(),
            load_seconds,
            total_seconds: t0.elapsed().as_secs_f64(),
            state_sha256: shard::state_hashes(&dir)?,
        };
        let manifest_path = dir.join(shard::SHARD_MANIFEST);
        output::write_json(&manifest_path, &manifest)?;
        let seqs: usize = manifest
            .datasets
            .iter()
            .map(|d| d.sequences[1] - d.sequences[0])
            .sum();
        return Ok(RunReport {
            summary: format!(
                "shard {s}: {seqs} sequences of {} datasets; merge with `runner merge {}` once all {} shards are done\n",
                datasets.len(),
                out_dir.display(),
                s.count
            ),
            output_dir: dir.clone(),
            previous: None,
            files: vec![dir.join(shard::checkpoint::STATE_FILE), manifest_path],
            failures: metrics.failures().to_vec(),
        });
    }

    let mut computed = Computed::new(engine.hook_points().to_vec());
    for (dataset, o) in datasets.iter().zip(outcomes) {
        computed.add_dataset(dataset, o.tables, o.timings)?;
    }
    // The weight phase: once per run (a shard leaves it to the merge).
    run_weight_metrics(
        &ctx,
        &mut weight_metrics,
        &mut metrics,
        &mut computed,
        opts.quiet,
    )?;
    let report = write_results(
        &WriteInput {
            spec,
            out_dir: out_dir.clone(),
            kind,
            loaded: &loaded,
            heads: &heads,
            datasets: &datasets,
            intervention_tables: &intervention_tables,
            quiet: opts.quiet,
            t0,
            load_seconds,
            weights_sha256,
            merged_shards: None,
            identity,
        },
        &mut metrics,
        computed,
    )?;
    // The results are written: the checkpoint has served its purpose.
    if recorder.is_some() {
        let _ = std::fs::remove_dir_all(out_dir.join(shard::checkpoint::PARTIAL_DIR));
    }
    Ok(report)
}

/// The five most negative heads of every per-head table and dataset.
pub fn summary(tables: &[(String, Table)]) -> String {
    let mut out = String::new();
    for (dataset, t) in tables {
        let (Some(score), Some(l), Some(h)) = (
            t.head_score.as_deref().and_then(|c| t.col(c)),
            t.col("layer"),
            t.col("head"),
        ) else {
            continue;
        };
        let mut rows: Vec<(f64, String)> = t
            .rows
            .iter()
            .filter_map(|r| Some((r[score].as_f64()?, format!("{}.{}", r[l], r[h]))))
            .filter(|(v, _)| v.is_finite())
            .collect();
        // A `frac_*` headline is a share of tokens (the circuits): its highest heads are the
        // notable ones; every other headline is a suppression score, notable when negative.
        let score_name = t.head_score.as_deref().unwrap_or_default();
        let highest = score_name.starts_with("frac_");
        rows.sort_by(|a, b| {
            if highest {
                b.0.total_cmp(&a.0)
            } else {
                a.0.total_cmp(&b.0)
            }
        });
        out += &format!(
            "{} / {} ({score_name}), {} heads:\n",
            t.name,
            dataset,
            if highest { "highest" } else { "most negative" }
        );
        for (v, head) in rows.iter().take(5) {
            out += &format!("  {head:>6}  {v:>10.4}\n");
        }
    }
    out
}
