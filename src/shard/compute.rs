//! The compute phase of a run that records its progress: a shard's slice (or all) of every
//! dataset through [`Engine`], a checkpoint after every batch, and `--resume` from one.
//!
//! Owns: restoring a checkpoint into fresh metrics (final states of finished datasets, the
//! partial state of the current one, failures so far, timings) and skipping the batches it
//! covers, and deciding which datasets end in tables (unsharded) or in saved states (a
//! shard). Must not: run batches itself ([`Engine::run_batches`] does) or write tables.

use super::checkpoint::{Checkpoint, Recorder};
use super::Shard;
use crate::data::Dataset;
use crate::engine::{Engine, LoopOptions, MetricSet, Timings};
use crate::error::{Error, Result};
use crate::output::Table;
use crate::runner::bar;
use crate::seam::SeamDevice;

/// One dataset's outcome: its tables (none for a shard, which saves states instead) and
/// where its time went.
pub struct DatasetOutcome {
    pub tables: Vec<(usize, Table)>,
    pub timings: Timings,
}

/// What the phase needs besides the engine and the metrics.
pub struct ComputeOptions {
    /// `None`: the whole run, ending in tables.
    pub shard: Option<Shard>,
    /// Continue from the recorder's checkpoint when there is one.
    pub resume: bool,
    pub quiet: bool,
}

/// Restores dataset `d` of a checkpoint into metrics whose `start_dataset` was just called.
fn restore(
    engine_ctx: &crate::metrics::RunContext,
    metrics: &mut MetricSet,
    dataset: &Dataset,
    d: usize,
    ck: &Checkpoint,
) {
    merge_states(
        engine_ctx,
        metrics,
        dataset,
        d,
        &[("the checkpoint".to_string(), ck)],
    );
}

/// Merges dataset `d`'s saved states from `sources` (labelled for errors), in order, into
/// metrics whose `start_dataset` was just called: a resumed run's one checkpoint, or the
/// shards' in shard order (so per-sequence rows come out in sequence order). A metric that
/// failed on the dataset earlier is skipped; one whose state is missing or does not merge
/// fails there.
pub(super) fn merge_states(
    ctx: &crate::metrics::RunContext,
    metrics: &mut MetricSet,
    dataset: &Dataset,
    d: usize,
    sources: &[(String, &Checkpoint)],
) {
    for i in 0..metrics.len() {
        if !metrics.is_active(i) {
            continue;
        }
        if metrics.failed_on(i, &dataset.name) {
            metrics.deactivate(i);
            continue;
        }
        for (label, ck) in sources {
            let r = match ck.states.get(&(d, i)) {
                // Named after where the state came from (which shard, or the checkpoint).
                Some(st) => metrics
                    .get_mut(i)
                    .expect("active metrics are built")
                    .merge_state(ctx, dataset, st)
                    .map_err(|e| Error::Other(format!("{label}: {e}"))),
                None => Err(Error::Other(format!(
                    "{label} has no state for it on dataset '{}'",
                    dataset.name
                ))),
            };
            if let Err(e) = r {
                metrics.fail(i, Some(&dataset.name), e);
                break;
            }
        }
    }
}

/// Runs every dataset (the shard's slice of it), checkpointing through `recorder` when
/// there is one. Returns one outcome per dataset, and the final checkpoint for a shard.
pub fn run<D: SeamDevice>(
    engine: &Engine<D>,
    metrics: &mut MetricSet,
    datasets: &[Dataset],
    mut recorder: Option<&mut Recorder>,
    opts: &ComputeOptions,
) -> Result<(Vec<DatasetOutcome>, Option<Checkpoint>)> {
    let shard = opts.shard.unwrap_or(Shard::WHOLE);
    let sizes: Vec<usize> = datasets.iter().map(Dataset::n_sequences).collect();
    shard.check_fits(&sizes)?;
    let resumed = match (&recorder, opts.resume) {
        (Some(r), true) => r.existing()?,
        _ => None,
    };
    if let (Some(ck), Some(r)) = (&resumed, &recorder) {
        ck.check_against(
            &format!("the checkpoint {}", r.path().display()),
            &sizes,
            metrics.len(),
            shard,
            engine.batch_size(),
        )?;
    }
    if let Some(ck) = &resumed {
        if let Some(r) = recorder.as_mut() {
            r.adopt(ck);
        }
        metrics.restore_failures(&ck.progress.failures);
        if !opts.quiet {
            let p = &ck.progress;
            eprintln!(
                "resuming from {}: {} of {} datasets done{}",
                recorder
                    .as_ref()
                    .map_or("".into(), |r| r.path().display().to_string()),
                p.datasets_done.min(datasets.len()),
                datasets.len(),
                if p.complete {
                    String::new()
                } else {
                    format!(", next sequence {}", p.next_sequence)
                }
            );
        }
    }
    let ctx = engine.ctx();
    let batch_size = engine.batch_size();
    let mut out = Vec::with_capacity(datasets.len());
    for (d, dataset) in datasets.iter().enumerate() {
        let range = shard.range(dataset.n_sequences(), batch_size);
        metrics.start_dataset(ctx, dataset);
        let mut start = range.start;
        let mut timings = Timings::default();
        if let Some(ck) = &resumed {
            let p = &ck.progress;
            if d < p.datasets_done || (d == p.datasets_done && !p.complete) {
                restore(ctx, metrics, dataset, d, ck);
                timings = p.timings.get(d).cloned().unwrap_or_default();
                start = if d < p.datasets_done {
                    range.end
                } else {
                    p.next_sequence.clamp(range.start, range.end)
                };
            }
        }
        // The bar counts passes (the unchanged one and the metrics' own, per batch).
        let per_batch = metrics.passes_per_batch(ctx, dataset) as u64;
        let batches = |seqs: usize| seqs.div_ceil(batch_size) as u64;
        let pb = bar(
            opts.quiet,
            batches(range.len()) * per_batch,
            format!("{} ({} seqs)", dataset.name, range.len()),
        );
        pb.set_prefix("passes");
        pb.set_position(batches(start - range.start) * per_batch);
        {
            let mut checkpoint_seconds = timings.checkpoint_seconds;
            // Ctrl-C/SIGTERM stop after a batch, once its checkpoint is written (whatever
            // `--checkpoint-every` says): `--resume` continues from there; no results are
            // written (see `crate::interrupt`).
            let mut after = |m: &MetricSet, t: &Timings, next: usize| {
                crate::interrupt::pause_at("batch");
                if let Some(r) = recorder.as_mut() {
                    let t0 = std::time::Instant::now();
                    let mut t = t.clone();
                    t.checkpoint_seconds = checkpoint_seconds;
                    if crate::interrupt::requested() {
                        r.write_next();
                    }
                    r.after_batch(m, d, &t, next)?;
                    checkpoint_seconds += t0.elapsed().as_secs_f64();
                }
                crate::interrupt::stop_if_requested()
            };
            engine.run_batches(
                metrics,
                dataset,
                start..range.end,
                &mut timings,
                &mut LoopOptions {
                    progress: Some(&pb),
                    after_batch: Some(&mut after),
                },
            )?;
            timings.checkpoint_seconds = checkpoint_seconds;
        }
        pb.finish_and_clear();
        if let Some(r) = recorder.as_mut() {
            r.dataset_done(metrics, d, &timings)?;
        }
        let tables = match opts.shard {
            None => metrics.finish_dataset(ctx, dataset),
            Some(_) => Vec::new(),
        };
        out.push(DatasetOutcome { tables, timings });
    }
    let last = match (opts.shard, recorder) {
        (Some(_), Some(r)) => Some(r.complete(metrics)?),
        _ => None,
    };
    Ok((out, last))
}
