//! The compute phase: runs a dataset's batches through the model and a set of metrics.
//!
//! Owns: the one batch loop of the crate (the runner, `runner bench`, resumable and sharded
//! runs and the tests all call it), the union of the hook points the metrics read (the hook
//! graph: one forward pass per batch caches exactly that union, and every metric reads the
//! same cache), per-dataset timings, and failures: a metric that fails is recorded here,
//! skipped for the rest of that dataset, and the others go on ("nothing lost"). Must not:
//! load models or specs, build datasets, or write files; those are the runner's phases
//! around this one.
//!
//! Batches are `batch_size` consecutive sequences counted from the start of the range given,
//! so a range that starts on a multiple of `batch_size` (as shards and resumed runs do) sees
//! exactly the batches of a run over the whole dataset, and computes bit-identical values.

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Instant;

use indicatif::ProgressBar;
use serde::{Deserialize, Serialize};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::hooks::{HookFilter, Hooks};
use crate::metrics::{BatchView, Metric, RunContext};
use crate::model::{HookedGpt2, Passes};
use crate::output::Table;
use crate::seam::SeamDevice;

/// A metric that failed, and why.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Failure {
    pub metric: String,
    /// The dataset it failed on (none when it failed before any dataset, e.g. to load).
    pub dataset: Option<String>,
    pub error: String,
}

struct Entry<'m> {
    /// The name the spec gives it (its own name unless `name = ...` renames it).
    name: String,
    /// `None` when it could not be built (a plugin that did not load).
    metric: Option<Box<dyn Metric + 'm>>,
    /// How its tables are named in the results (`None`: the old prefix rule).
    tables: Option<crate::output::TableNames>,
    /// Still called on the current dataset (reset for every dataset).
    active: bool,
}

/// A run's metrics, under the names the spec gives them, and all of their failures.
/// (`'m`: how long the metrics live; `'static` except where a caller lends one.)
#[derive(Default)]
pub struct MetricSet<'m> {
    entries: Vec<Entry<'m>>,
    failures: Vec<Failure>,
    /// The first failure's error as it was raised (callers that stop at it want its kind).
    first_error: Option<Error>,
}

impl<'m> MetricSet<'m> {
    pub fn new() -> Self {
        MetricSet {
            entries: Vec::new(),
            failures: Vec::new(),
            first_error: None,
        }
    }

    /// Adds a metric under `name`.
    pub fn add(&mut self, name: impl Into<String>, metric: Box<dyn Metric + 'm>) {
        self.entries.push(Entry {
            name: name.into(),
            metric: Some(metric),
            tables: None,
            active: true,
        });
    }

    /// Adds a metric under `name` whose tables are named by `tables` (declared up front, so
    /// the runner can check every table name before the forward pass).
    pub fn add_named(
        &mut self,
        name: impl Into<String>,
        metric: Box<dyn Metric + 'm>,
        tables: crate::output::TableNames,
    ) {
        self.add(name, metric);
        self.entries.last_mut().expect("just added").tables = Some(tables);
    }

    /// The names of the tables the metric at `i` declared, as the results will have them.
    pub fn planned_tables(&self, i: usize) -> Vec<String> {
        self.entries[i]
            .tables
            .as_ref()
            .map(|t| t.planned())
            .unwrap_or_default()
    }

    /// Records a metric that could not be built: it is a failure, not a failed run.
    pub fn add_failed(&mut self, name: impl Into<String>, error: String) {
        let name = name.into();
        self.failures.push(Failure {
            metric: name.clone(),
            dataset: None,
            error,
        });
        self.entries.push(Entry {
            name,
            metric: None,
            tables: None,
            active: false,
        });
    }

    /// The metrics' names, in spec order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.name.as_str())
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The metric at `i` (in spec order), if it was built.
    pub fn get(&self, i: usize) -> Option<&dyn Metric> {
        self.entries[i].metric.as_deref()
    }

    /// The metric at `i`, if it was built.
    pub fn get_mut(&mut self, i: usize) -> Option<&mut (dyn Metric + 'm)> {
        self.entries[i].metric.as_deref_mut()
    }

    /// Whether the metric at `i` is still called on the current dataset.
    pub fn is_active(&self, i: usize) -> bool {
        self.entries[i].active && self.entries[i].metric.is_some()
    }

    /// The union of the hook points the built metrics read, sorted.
    pub fn hooks(&self, ctx: &RunContext) -> Vec<String> {
        let mut out: Vec<String> = self
            .entries
            .iter()
            .filter_map(|e| e.metric.as_ref())
            .flat_map(|m| m.hooks(ctx))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The means every built metric asks for (deduplicated, sorted).
    pub fn mean_requests(&self, ctx: &RunContext) -> Vec<crate::means::MeanRequest> {
        let mut out: Vec<_> = self
            .entries
            .iter()
            .filter_map(|e| e.metric.as_ref())
            .flat_map(|m| m.mean_requests(ctx))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// Hands `means` to every built metric; one that fails is recorded and not called again.
    pub fn set_means(&mut self, means: &crate::means::Means) {
        for i in 0..self.entries.len() {
            if let Some(m) = self.entries[i].metric.as_mut() {
                if let Err(e) = m.set_means(means) {
                    self.fail(i, None, e);
                }
            }
        }
    }

    /// Every failure so far, in the order they happened.
    pub fn failures(&self) -> &[Failure] {
        &self.failures
    }

    /// The first metric error, as raised, if any (taken: asking again gives `None`).
    pub fn take_first_error(&mut self) -> Option<Error> {
        self.first_error.take()
    }

    /// Failures recorded by an earlier process of this run (a resumed checkpoint, a
    /// shard's manifest): added as they are, without an error to raise.
    pub fn restore_failures(&mut self, failures: &[Failure]) {
        for f in failures {
            if !self.failures.contains(f) {
                self.failures.push(f.clone());
            }
        }
    }

    /// Whether the metric at `i` has a failure recorded on `dataset`.
    pub fn failed_on(&self, i: usize, dataset: &str) -> bool {
        let name = &self.entries[i].name;
        self.failures
            .iter()
            .any(|f| &f.metric == name && f.dataset.as_deref() == Some(dataset))
    }

    /// Stops calling the metric at `i` on the current dataset (it failed there earlier).
    pub fn deactivate(&mut self, i: usize) {
        self.entries[i].active = false;
    }

    /// Records a failure of something other than a metric's call (e.g. the report).
    pub fn push_failure(&mut self, f: Failure) {
        self.failures.push(f);
    }

    /// Records that the metric at `i` failed on `dataset` and stops calling it there.
    pub fn fail(&mut self, i: usize, dataset: Option<&str>, e: Error) {
        self.entries[i].active = false;
        self.failures.push(Failure {
            metric: self.entries[i].name.clone(),
            dataset: dataset.map(str::to_string),
            error: e.to_string(),
        });
        self.first_error.get_or_insert(e);
    }

    /// Whether the metric at `i` failed anywhere: such a metric writes nothing, since a CSV
    /// missing a dataset would read as complete.
    pub fn has_failed(&self, i: usize) -> bool {
        let name = &self.entries[i].name;
        self.failures.iter().any(|f| &f.metric == name)
    }

    /// Calls `start_dataset` on every built metric; all of them are active again.
    pub fn start_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) {
        for i in 0..self.entries.len() {
            let e = &mut self.entries[i];
            e.active = e.metric.is_some();
            if let Some(m) = e.metric.as_mut() {
                if let Err(err) = m.start_dataset(ctx, dataset) {
                    self.fail(i, Some(&dataset.name), err);
                }
            }
        }
    }

    /// The passes each batch of `dataset` runs: the unchanged one and every active metric's
    /// own ([`Metric::passes_per_batch`]). Progress bars count these.
    pub fn passes_per_batch(&self, ctx: &RunContext, dataset: &Dataset) -> usize {
        1 + (0..self.entries.len())
            .filter(|&i| self.is_active(i))
            .filter_map(|i| self.entries[i].metric.as_deref())
            .map(|m| m.passes_per_batch(ctx, dataset))
            .sum::<usize>()
    }

    /// Calls `f` on every active metric; a failure deactivates that metric for the dataset.
    /// Returns the seconds each call took, by metric index.
    pub fn for_each_active(
        &mut self,
        dataset: &Dataset,
        mut f: impl FnMut(usize, &mut (dyn Metric + 'm)) -> Result<()>,
    ) -> Vec<(usize, f64)> {
        let mut seconds = Vec::new();
        for i in 0..self.entries.len() {
            if !self.is_active(i) {
                continue;
            }
            let m = self.entries[i].metric.as_deref_mut().expect("active");
            let t = Instant::now();
            let r = f(i, m);
            seconds.push((i, t.elapsed().as_secs_f64()));
            if let Err(e) = r {
                self.fail(i, Some(&dataset.name), e);
            }
        }
        seconds
    }

    /// Calls `finish_dataset` on every active metric; returns their tables with the index of
    /// the metric that made each. A metric renamed by the spec prefixes its tables with its
    /// name, so one metric can run twice with different options.
    pub fn finish_dataset(&mut self, ctx: &RunContext, dataset: &Dataset) -> Vec<(usize, Table)> {
        let mut out = Vec::new();
        for i in 0..self.entries.len() {
            if !self.is_active(i) {
                continue;
            }
            let e = &mut self.entries[i];
            let m = e.metric.as_mut().expect("active");
            match m.finish_dataset(ctx, dataset) {
                Ok(tables) => {
                    for mut t in tables {
                        if let Some(names) = &e.tables {
                            t.name = names.rename(&t.name);
                        } else if e.name != m.name() {
                            t.name = t.name.replacen(m.name(), &e.name, 1);
                        }
                        out.push((i, t));
                    }
                }
                Err(err) => self.fail(i, Some(&dataset.name), err),
            }
        }
        out
    }
}

/// Where one dataset's time went.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Timings {
    /// The forward passes (caching the hook points).
    pub forward_seconds: f64,
    /// Each metric's `batch` calls, by the metric's name in the spec.
    pub metric_seconds: BTreeMap<String, f64>,
    /// Writing checkpoints after the batches (a resumable run's overhead).
    #[serde(default)]
    pub checkpoint_seconds: f64,
}

/// What happens around each batch besides the model and the metrics.
#[derive(Default)]
pub struct LoopOptions<'a> {
    /// Counts passes: one per batch for the unchanged pass, then one for every pass a
    /// metric runs through the model (a resumed pass carrying `k` interventions counts
    /// `k`), [`MetricSet::passes_per_batch`] in all per batch.
    pub progress: Option<&'a ProgressBar>,
    /// Called after every batch with the metrics, the dataset's timings so far and the index
    /// one past the batch's last sequence (a resumable run writes its checkpoint here). An
    /// error stops the loop.
    #[allow(clippy::type_complexity)]
    pub after_batch: Option<&'a mut dyn FnMut(&MetricSet, &Timings, usize) -> Result<()>>,
}

/// The model as a batch's metrics see it: every pass they run advances the progress bar
/// (a resumed pass over `k` stacked copies of the batch counts `k` passes; one resumed at
/// `ln_final`'s input runs no layer and counts none).
struct CountedPasses<'a> {
    model: &'a dyn Passes,
    /// The batch's sequences.
    rows: usize,
    progress: Option<&'a ProgressBar>,
}

impl CountedPasses<'_> {
    fn count(&self, sequences: usize) {
        if let Some(pb) = self.progress {
            pb.inc(sequences.div_ceil(self.rows.max(1)) as u64);
        }
    }
}

impl Passes for CountedPasses<'_> {
    fn config(&self) -> &crate::model::ModelConfig {
        self.model.config()
    }
    fn cache_pass(
        &self,
        tokens: &ndarray::Array2<u32>,
        hooks: &[String],
    ) -> Result<crate::hooks::ActivationCache> {
        let out = self.model.cache_pass(tokens, hooks)?;
        self.count(tokens.nrows());
        Ok(out)
    }
    fn resume_from(
        &self,
        s: usize,
        at: crate::model::ResumeAt,
        resid: crate::model::Resid,
        rows: Option<&[usize]>,
    ) -> Result<Vec<f32>> {
        let b = resid.sequences(s, self.model.config().d_model);
        let out = self.model.resume_from(s, at, resid, rows)?;
        if at.runs_layers(self.model.config().n_layers) {
            self.count(b);
        }
        Ok(out)
    }
}

/// The model, what every metric may read, and the cache filter: the same for a whole run.
pub struct Engine<'a, D: SeamDevice> {
    model: &'a HookedGpt2<D>,
    ctx: &'a RunContext<'a>,
    hook_points: Vec<String>,
    filter: HookFilter,
    batch_size: usize,
}

impl<'a, D: SeamDevice> Engine<'a, D> {
    /// An engine caching the union of what `metrics` read (checked against the model).
    pub fn new(
        model: &'a HookedGpt2<D>,
        ctx: &'a RunContext<'a>,
        metrics: &MetricSet<'_>,
        batch_size: usize,
    ) -> Result<Self> {
        if batch_size == 0 {
            return Err(Error::Other("batch_size must be at least 1".into()));
        }
        let hook_points = metrics.hooks(ctx);
        let filter = HookFilter::checked(&hook_points, ctx.cfg.n_layers)?;
        Ok(Engine {
            model,
            ctx,
            hook_points,
            filter,
            batch_size,
        })
    }

    /// The mean passes the metrics ask for ([`crate::means`]), run once over `datasets`
    /// before any dataset's batches, and handed to the metrics.
    pub fn run_mean_passes(&self, metrics: &mut MetricSet<'_>, datasets: &[Dataset]) -> Result<()> {
        let reqs = metrics.mean_requests(self.ctx);
        if reqs.is_empty() {
            return Ok(());
        }
        let means =
            crate::means::compute(self.model, datasets, &reqs, self.batch_size, self.ctx.bos)?;
        metrics.set_means(&means);
        Ok(())
    }

    /// The hook points cached for every batch (the union the metrics declared), sorted.
    pub fn hook_points(&self) -> &[String] {
        &self.hook_points
    }

    pub fn ctx(&self) -> &RunContext<'a> {
        self.ctx
    }

    pub fn batch_size(&self) -> usize {
        self.batch_size
    }

    /// Runs the sequences `range` of `dataset` in batches through the model and every active
    /// metric (whose `start_dataset` has been called). Metric failures are recorded in
    /// `metrics`; a model error or an `after_batch` error stops the loop and is returned.
    pub fn run_batches(
        &self,
        metrics: &mut MetricSet<'_>,
        dataset: &Dataset,
        range: Range<usize>,
        timings: &mut Timings,
        opts: &mut LoopOptions,
    ) -> Result<()> {
        let n = range.end.min(dataset.n_sequences());
        let per_batch = metrics.passes_per_batch(self.ctx, dataset) as u64;
        let first_pass = opts.progress.map_or(0, |pb| pb.position());
        let mut resync = false;
        for (done, start) in (range.start..n).step_by(self.batch_size).enumerate() {
            let end = (start + self.batch_size).min(n);
            let tokens = dataset.tokens.slice(ndarray::s![start..end, ..]).to_owned();
            let t = Instant::now();
            let mut hooks = Hooks::caching(self.filter.clone());
            self.model.run_hooks(&tokens, &mut hooks)?;
            let cache = hooks.take_cache();
            timings.forward_seconds += t.elapsed().as_secs_f64();
            if let Some(pb) = opts.progress {
                pb.inc(1);
            }
            let failed_before = metrics.failures().len();
            let counted = CountedPasses {
                model: self.model,
                rows: end - start,
                progress: opts.progress,
            };
            let view = BatchView {
                dataset,
                start,
                tokens: tokens.view(),
                cache: &cache,
                model: Some(&counted),
            };
            let ctx = self.ctx;
            let seconds = metrics.for_each_active(dataset, |_, m| m.batch(ctx, &view));
            for (i, s) in seconds {
                let name = metrics.entries[i].name.clone();
                *timings.metric_seconds.entry(name).or_default() += s;
            }
            if let Some(pb) = opts.progress {
                // A metric that failed left its passes uncounted (and runs no more this
                // dataset): from then on the bar is put where whole batches leave it.
                resync |= metrics.failures().len() > failed_before;
                if resync {
                    pb.set_position(first_pass + (done as u64 + 1) * per_batch);
                }
            }
            if let Some(f) = opts.after_batch.as_mut() {
                f(metrics, timings, end)?;
            }
        }
        Ok(())
    }

    /// A whole dataset: `start_dataset`, every batch, `finish_dataset`. Returns the tables
    /// (with the index of the metric that made each) and the timings.
    pub fn run_dataset(
        &self,
        metrics: &mut MetricSet<'_>,
        dataset: &Dataset,
        opts: &mut LoopOptions,
    ) -> Result<(Vec<(usize, Table)>, Timings)> {
        let mut timings = Timings::default();
        metrics.start_dataset(self.ctx, dataset);
        self.run_batches(
            metrics,
            dataset,
            0..dataset.n_sequences(),
            &mut timings,
            opts,
        )?;
        Ok((metrics.finish_dataset(self.ctx, dataset), timings))
    }
}

/// Runs one metric over a whole dataset in batches of `batch_size` (after the mean passes it
/// asks for, which may only name `dataset`; see [`run_metric_with_means`]) and returns its tables,
/// or its first error as raised (the bench and tests, where a failure is an error). The
/// metric is lent, so a caller can run it again.
pub fn run_metric<D: SeamDevice>(
    model: &HookedGpt2<D>,
    ctx: &RunContext,
    metric: &mut dyn Metric,
    dataset: &Dataset,
    batch_size: usize,
) -> Result<Vec<Table>> {
    run_metric_with_means(
        model,
        ctx,
        metric,
        dataset,
        std::slice::from_ref(dataset),
        batch_size,
    )
}

/// [`run_metric`] whose mean passes may name any of `datasets`.
pub fn run_metric_with_means<D: SeamDevice>(
    model: &HookedGpt2<D>,
    ctx: &RunContext,
    metric: &mut dyn Metric,
    dataset: &Dataset,
    datasets: &[Dataset],
    batch_size: usize,
) -> Result<Vec<Table>> {
    let name = metric.name().to_string();
    let mut set = MetricSet::new();
    set.add(name, Box::new(metric));
    let engine = Engine::new(model, ctx, &set, batch_size)?;
    engine.run_mean_passes(&mut set, datasets)?;
    if let Some(e) = set.take_first_error() {
        return Err(e);
    }
    let (tables, _) = engine.run_dataset(&mut set, dataset, &mut LoopOptions::default())?;
    match set.take_first_error() {
        Some(e) => Err(e),
        None => Ok(tables.into_iter().map(|(_, t)| t).collect()),
    }
}
