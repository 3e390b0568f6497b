//! The hook graph executor: runs a spec from model to files.
//!
//! Owns: the order of a run — the prepare phase (check the output directory, resolve and
//! load the model, select heads, build datasets and metrics, plan and check their table
//! names: everything that can fail before the forward pass, where `validate` stops), the
//! compute phase (handed to [`crate::engine`], the one batch loop), the weight phase
//! (`run_weight_metrics`: metrics of the weights alone such as `ov_circuit`, once per run,
//! not per shard; a merge runs it), and the write phase
//! ([`write_results`]: fail the metrics whose tables hold NaN or infinity, write CSVs,
//! pictures and the manifest into a staging directory and swap it into place whole; a merge
//! of shards ends there too), and the summary. A metric that fails is reported and the
//! others still finish and are written ("nothing lost"); an error or a signal leaves the
//! output directory's results as they were ("nothing escapes"). Must not: implement
//! metrics, the batch loop, model math or file formats; those live in `metrics`, `engine`,
//! `model` and `output`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use dfdx::prelude::Cpu;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::data::{self, DataContext, Dataset};
use crate::device::{with_device, DeviceChoice, DeviceKind, OnDevice};
use crate::engine::{Engine, MetricSet, Timings};
use crate::error::{Error, Result};
use crate::interrupt;
use crate::metrics::{self, RunContext, WeightMetric, WEIGHTS_DATASET};
use crate::model::{self, checkpoint, LoadedModel, ModelSource};
use crate::output::{self, NonFinite, Staging, Table, TableNames, Target};
use crate::report;
use crate::seam::SeamDevice;
use crate::shard::checkpoint::Recorder;
use crate::shard::compute::ComputeOptions;
use crate::shard::{self, DatasetId, Identity, Shard, ShardDataset, ShardManifest};
use crate::spec::{check_name, LoadedSpec};

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

/// A progress bar over `len` sequences (hidden when `quiet`), shared with sharded runs.
pub(crate) fn bar(quiet: bool, len: u64, msg: String) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len).with_message(msg);
    pb.set_style(
        ProgressStyle::with_template("{msg:28} [{bar:30}] {pos}/{len} {elapsed_precise} eta {eta}")
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

/// Everything a run prepares before its first forward pass; `validate` stops here.
pub(crate) struct Prepared<D: SeamDevice> {
    pub loaded: LoadedModel<D>,
    pub heads: Vec<(usize, usize)>,
    pub datasets: Vec<Dataset>,
    /// The metrics (a plugin that did not load is already a failure in it).
    pub metrics: MetricSet<'static>,
    /// Metrics of the weights alone (`ov_circuit`, ...), computed once per run.
    pub weight_metrics: Vec<WeightEntry>,
    /// The `[[intervention]]` tables as planned (their pictures are the intervention
    /// heatmaps; the write phase takes the names from here, never planning again).
    pub intervention_tables: Vec<String>,
}

/// A weight metric of the run: its name, the metric, and the heads whose per-token table
/// its `[[view]]`s ask for.
pub(crate) struct WeightEntry {
    name: String,
    metric: Box<dyn WeightMetric>,
    detail: Vec<(usize, usize)>,
    /// Its tables' names (planned, as the spec names them).
    tables: Vec<String>,
}

pub(crate) fn prepare<D: SeamDevice>(
    dev: D,
    spec: &LoadedSpec,
    quiet: bool,
) -> Result<Prepared<D>> {
    let source = model_source(spec);
    let pb = spinner(quiet, format!("loading model {source:?}"));
    let files = source.resolve()?;
    let tok_dir = spec.spec.model.tokenizer.as_ref().map(|p| spec.resolve(p));
    let loaded = model::load(dev, files, spec.spec.model.processing(), tok_dir.as_deref())?;
    pb.finish_and_clear();
    let cfg = loaded.cfg().clone();
    let heads = spec.check_heads(cfg.n_layers, cfg.n_heads)?;
    let views = report::check_views(spec, &heads, cfg.n_layers, cfg.n_heads)?;

    let dir = spec.dir();
    let ctx = DataContext {
        tokenizer: loaded.tokenizer.as_ref(),
        cfg: &cfg,
        spec_dir: &dir,
    };
    let datasets = data::build_all(spec, &ctx)?;

    let shapes: Vec<metrics::registry::DatasetShape> = datasets
        .iter()
        .map(|d| metrics::registry::DatasetShape {
            name: &d.name,
            n_sequences: d.n_sequences(),
            seq_len: d.seq_len(),
        })
        .collect();
    let build_ctx = metrics::BuildCtx {
        cfg: Some(&cfg),
        datasets: Some(&shapes),
        spec_dir: Some(&dir),
    };
    let mut metrics = MetricSet::new();
    let mut weight_metrics: Vec<WeightEntry> = Vec::new();
    // Spec index of each entry of `metrics`, then of `weight_metrics` (for errors).
    let (mut spec_index, mut weight_index) = (Vec::new(), Vec::new());
    for (i, m) in spec.spec.metrics.iter().enumerate() {
        if let Some(kind) = &m.kind {
            let Some(def) = metrics::registry::find(kind.get_ref()) else {
                let e = metrics::registry::unknown(kind.get_ref());
                return Err(spec.error_at(kind.span(), e.to_string()));
            };
            // Option errors (unknown key, wrong type, bad value) go on the option's own line.
            let built = def
                .build(&build_ctx, &m.options)
                .map_err(|e| spec.metric_error(i, e.key.as_deref().unwrap_or("kind"), e.msg))?;
            let metric = match built {
                metrics::Built::Weights(metric) => {
                    let name = m.name.clone().unwrap_or_else(|| kind.get_ref().clone());
                    let detail = report::views::weight_view_heads(
                        spec,
                        &name,
                        &heads,
                        cfg.n_layers,
                        cfg.n_heads,
                    )?;
                    let tables = def
                        .tables
                        .iter()
                        .map(|t| t.replacen(def.name, &name, 1))
                        .collect();
                    weight_metrics.push(WeightEntry {
                        name,
                        metric,
                        detail,
                        tables,
                    });
                    weight_index.push(i);
                    continue;
                }
                metrics::Built::Metric(metric) => metric,
            };
            let given = m.name.clone().unwrap_or_else(|| kind.get_ref().clone());
            let names = TableNames {
                own: metric.name().to_string(),
                given: given.clone(),
                declared: def.tables.iter().map(|t| t.to_string()).collect(),
            };
            metrics.add_named(given, metric, names);
            spec_index.push(i);
        } else if let Some(plugin) = &m.plugin {
            // A plugin that fails to load is a failed metric, not a failed run: the other
            // metrics are still computed and written.
            let fallback = m.name.clone().unwrap_or_else(|| plugin.get_ref().clone());
            // Its descriptor is read here, at planning: options it does not declare (or that
            // its `create` refuses) are the spec's error, at their line, before any compute.
            use crate::metrics::plugin::{PlanError, PluginAdapter};
            match PluginAdapter::load_planned(plugin.get_ref(), &dir, &m.options) {
                // Named after what the plugin calls itself, not its path.
                Ok(metric) => {
                    let info = metric.info();
                    let given = m.name.clone().unwrap_or_else(|| info.name.clone());
                    if let Err(why) = check_name(&given) {
                        return Err(spec.metric_error(
                            i,
                            "plugin",
                            format!("the plugin's name {why}: give this [[metric]] a `name`"),
                        ));
                    }
                    let names = TableNames {
                        own: info.name.clone(),
                        given: given.clone(),
                        declared: info.tables.clone(),
                    };
                    metrics.add_named(given, Box::new(metric), names);
                }
                Err(PlanError::Option { key, error }) => {
                    return Err(spec.metric_error(
                        i,
                        key.as_deref().unwrap_or("plugin"),
                        error.to_string(),
                    ))
                }
                Err(PlanError::Load(e)) => metrics.add_failed(fallback, e.to_string()),
            }
            spec_index.push(i);
        }
    }
    spec_index.extend(weight_index);
    let names: Vec<&str> = metrics
        .names()
        .chain(weight_metrics.iter().map(|w| w.name.as_str()))
        .collect();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(spec.metric_error(
                spec_index[i],
                "name",
                format!(
                    "two [[metric]] entries are both named '{name}': give one a different `name`"
                ),
            ));
        }
    }
    // Every table name is known now: check them before the forward pass, not after.
    let mut owners: BTreeMap<String, usize> = BTreeMap::new();
    let planned = |i: usize| match i.checked_sub(metrics.len()) {
        None => metrics.planned_tables(i),
        Some(w) => weight_metrics[w].tables.clone(),
    };
    for i in 0..names.len() {
        for t in planned(i) {
            if let Err(why) = check_name(&t) {
                return Err(spec.metric_error(
                    spec_index[i],
                    "name",
                    format!("metric '{}': its table name {why}", names[i]),
                ));
            }
            if let Some(&j) = owners.get(&t) {
                return Err(spec.metric_error(
                    spec_index[i],
                    "name",
                    format!(
                        "metric '{}' and metric '{}' both write the table '{t}': give one of them a different `name`",
                        names[i], names[j]
                    ),
                ));
            }
            owners.insert(t, i);
        }
    }
    // Pictures are named from tables and views: clashes are found here, not by a file
    // written over another after the run.
    let view_files = report::views::planned_view_files(spec, &views);
    for (t, &i) in &owners {
        if let Some(why) = report::views::picture_clash(t, &view_files) {
            return Err(spec.metric_error(
                spec_index[i],
                "name",
                format!("metric '{}': {why}", names[i]),
            ));
        }
    }
    // The interventions: planned (checked against the model and the datasets) now, run as
    // metrics whose batches resume the unchanged pass.
    let plans = crate::interventions::plan(spec, &cfg, &heads, &datasets)?;
    let owner_names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let seq_len = datasets.iter().map(Dataset::seq_len).max().unwrap_or(1);
    let intervention_tables: Vec<String> = plans.iter().map(|p| p.name.clone()).collect();
    for p in plans {
        let iv = &spec.spec.interventions[p.index];
        let span = iv.name.as_ref().map_or(iv.kind.span(), |n| n.span());
        if let Some(&j) = owners.get(&p.name) {
            return Err(spec.error_at(
                span,
                format!(
                    "[[intervention]] table '{}' is also written by metric '{}': give the intervention a different `name`",
                    p.name, owner_names[j]
                ),
            ));
        }
        let name = p.name.clone();
        let sweep = crate::interventions::sweep::Sweep::new(
            p,
            &datasets,
            spec.spec.model.batch_size,
            seq_len,
            &cfg,
        );
        metrics.add_named(
            name.clone(),
            Box::new(sweep),
            TableNames {
                own: name.clone(),
                given: name.clone(),
                declared: vec![name],
            },
        );
    }
    Ok(Prepared {
        loaded,
        heads,
        datasets,
        metrics,
        weight_metrics,
        intervention_tables,
    })
}

/// Checks a spec end to end without running a forward pass and without writing anything:
/// the output directory can be replaced, the model loads, heads are in range, datasets build
/// and fit in memory, metrics and plugins load and their tables have distinct names. Returns
/// a short description.
pub fn validate(
    spec: &LoadedSpec,
    device: Option<DeviceChoice>,
    output: Option<&std::path::Path>,
) -> Result<String> {
    let _ = device.unwrap_or(spec.spec.model.device).resolve()?;
    let target = Target::check(output.unwrap_or(&spec.output_dir()))?;
    let p = prepare(Cpu::default(), spec, true)?;
    if let Some(f) = p.metrics.failures().first() {
        return Err(Error::Metric {
            metric: f.metric.clone(),
            msg: f.error.clone(),
        });
    }
    let cfg = p.loaded.cfg();
    let mut out = format!(
        "{}: ok\n  model: {} ({} layers x {} heads, d_model {}, vocab {})\n  heads: {}\n",
        spec.path.display(),
        p.loaded.files.dir.display(),
        cfg.n_layers,
        cfg.n_heads,
        cfg.d_model,
        cfg.d_vocab,
        p.heads.len()
    );
    for d in &p.datasets {
        out += &format!(
            "  dataset {}: {} sequences x {} tokens\n",
            d.name,
            d.n_sequences(),
            d.seq_len()
        );
    }
    for (i, name) in p.metrics.names().enumerate() {
        out += &format!(
            "  metric {name}: {}\n",
            p.metrics.planned_tables(i).join(", ")
        );
    }
    for plan in crate::interventions::plan(spec, cfg, &p.heads, &p.datasets)? {
        for d in p
            .datasets
            .iter()
            .filter(|d| plan.datasets.contains(&d.name))
        {
            let c = plan.cost(cfg, d.n_sequences(), d.seq_len());
            out += &format!(
                "  intervention {} on {}: {} interventions, {} passes, {:.3} GFLOP (one full pass per intervention: {:.3} GFLOP)\n",
                plan.name,
                d.name,
                c.units,
                c.passes,
                c.flop / 1e9,
                c.flop_full_passes / 1e9
            );
        }
    }
    for w in &p.weight_metrics {
        out += &format!(
            "  metric {} (from the weights): {}\n",
            w.name,
            w.tables.join(", ")
        );
    }
    out += &format!(
        "  output: {}{}\n",
        target.dir.display(),
        if target.exists {
            format!(
                " (a run moves what is there now to {})",
                target.prev.display()
            )
        } else {
            String::new()
        }
    );
    Ok(out)
}

#[derive(Serialize)]
pub struct DatasetRecord {
    name: String,
    n_sequences: usize,
    seq_len: usize,
    tokens_sha256: String,
    forward_seconds: f64,
    metric_seconds: BTreeMap<String, f64>,
    checkpoint_seconds: f64,
}

#[derive(Serialize)]
struct NonFiniteRecord {
    metric: String,
    table: String,
    /// The dataset of the first non-finite cell, and its 1-based data row in `<table>.csv`.
    dataset: String,
    csv_row: usize,
    #[serde(flatten)]
    found: NonFinite,
}

/// A weight metric's time and matmul work, for the manifest.
#[derive(Serialize)]
pub struct WeightRecord {
    name: String,
    seconds: f64,
    gflop: f64,
}

#[derive(Serialize)]
struct Manifest<'a> {
    /// [`crate::outdir::FORMAT`]: what marks a directory as hookgraph's results.
    format: &'static str,
    format_version: u32,
    /// The run these results are of (what a resume or a merge checks).
    identity: &'a Identity,
    hookgraph_version: &'static str,
    crate_versions: BTreeMap<&'static str, String>,
    spec_path: String,
    /// `--set KEY=VALUE` overrides applied to the spec file (`spec_toml` is the result).
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    spec_overrides: &'a [String],
    /// The runner's git commit (`git describe --always --dirty` when it was built), if known.
    git_commit: &'static str,
    spec_toml: &'a str,
    spec: &'a crate::spec::Spec,
    model_dir: String,
    weights_sha256: String,
    config: &'a model::ModelConfig,
    processing: model::Processing,
    device: DeviceKind,
    heads: usize,
    hook_points: Vec<String>,
    datasets: Vec<DatasetRecord>,
    weight_metrics: Vec<WeightRecord>,
    files: Vec<String>,
    failures: &'a [Failure],
    /// Metrics failed for NaN or infinity in their tables: where the first one is.
    non_finite: &'a [NonFiniteRecord],
    load_seconds: f64,
    total_seconds: f64,
    /// Set when `runner merge` wrote these results from this many shards.
    #[serde(skip_serializing_if = "Option::is_none")]
    merged_shards: Option<usize>,
}

/// The files a run reads: the spec, the checkpoint, the tokenizer directory, dataset files.
fn run_inputs<D: SeamDevice>(spec: &LoadedSpec, loaded: &LoadedModel<D>) -> Vec<PathBuf> {
    let mut v = vec![
        spec.path.clone(),
        loaded.files.config.clone(),
        loaded.files.weights.clone(),
    ];
    v.extend(spec.spec.model.tokenizer.iter().map(|t| spec.resolve(t)));
    v.extend(
        spec.spec
            .datasets
            .iter()
            .filter_map(|d| d.path.as_ref().map(|p| spec.resolve(p.get_ref()))),
    );
    v
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

/// The owner index of a weight metric's tables in [`Computed`] (they are not in the
/// [`MetricSet`]; `weight_owners` names their metric).
const WEIGHTS_OWNER: usize = usize::MAX;

/// What the compute phase produced, as the write phase takes it.
pub struct Computed {
    /// tables[table name] = (index of the metric that made it, [(dataset, table)])
    tables: BTreeMap<String, (usize, Vec<(String, Table)>)>,
    records: Vec<DatasetRecord>,
    /// Weight metrics: table name -> metric name, and their timings.
    weight_owners: BTreeMap<String, String>,
    weight_records: Vec<WeightRecord>,
    hook_points: Vec<String>,
}

impl Computed {
    pub fn new(hook_points: Vec<String>) -> Self {
        Computed {
            tables: BTreeMap::new(),
            records: Vec::new(),
            weight_owners: BTreeMap::new(),
            weight_records: Vec::new(),
            hook_points,
        }
    }

    /// Adds a weight metric's tables (dataset [`WEIGHTS_DATASET`]) and its timing.
    fn add_weights(
        &mut self,
        metric: &str,
        tables: Vec<Table>,
        record: WeightRecord,
    ) -> Result<()> {
        for t in tables {
            if self.tables.contains_key(&t.name) {
                return Err(Error::Other(format!(
                    "two metrics write the table '{}': give one of them a `name`",
                    t.name
                )));
            }
            self.weight_owners
                .insert(t.name.clone(), metric.to_string());
            self.tables.insert(
                t.name.clone(),
                (WEIGHTS_OWNER, vec![(WEIGHTS_DATASET.to_string(), t)]),
            );
        }
        self.weight_records.push(record);
        Ok(())
    }

    /// Adds a dataset's tables (with the index of the metric that made each) and timings.
    pub fn add_dataset(
        &mut self,
        dataset: &Dataset,
        tables: Vec<(usize, Table)>,
        timings: Timings,
    ) -> Result<()> {
        for (idx, t) in tables {
            let entry = self
                .tables
                .entry(t.name.clone())
                .or_insert((idx, Vec::new()));
            if entry.0 != idx {
                return Err(Error::Other(format!(
                    "two metrics write the table '{}': give one of them a `name`",
                    t.name
                )));
            }
            entry.1.push((dataset.name.clone(), t));
        }
        self.records.push(DatasetRecord {
            name: dataset.name.clone(),
            n_sequences: dataset.n_sequences(),
            seq_len: dataset.seq_len(),
            tokens_sha256: shard::tokens_hash(dataset),
            forward_seconds: timings.forward_seconds,
            metric_seconds: timings.metric_seconds,
            checkpoint_seconds: timings.checkpoint_seconds,
        });
        Ok(())
    }
}

/// What the write phase needs besides the computed tables.
pub struct WriteInput<'a, D: SeamDevice> {
    pub spec: &'a LoadedSpec,
    pub out_dir: PathBuf,
    pub kind: DeviceKind,
    pub loaded: &'a LoadedModel<D>,
    pub heads: &'a [(usize, usize)],
    pub datasets: &'a [Dataset],
    /// The `[[intervention]]` tables (`Prepared::intervention_tables`).
    pub intervention_tables: &'a [String],
    pub quiet: bool,
    /// When the run started, and how long loading took (for the manifest).
    pub t0: Instant,
    pub load_seconds: f64,
    /// Of the weights file (hashed once per run).
    pub weights_sha256: String,
    /// How many shards a merge combined (`None` for a run).
    pub merged_shards: Option<usize>,
    /// The run's identity, recorded in the manifest.
    pub identity: Identity,
}

/// The write phase: CSVs, pictures and pages, the manifest. A run and a merge of shards
/// both end here, so they write the same files.
pub fn write_results<D: SeamDevice>(
    w: &WriteInput<D>,
    metrics: &mut MetricSet,
    computed: Computed,
) -> Result<RunReport> {
    let Computed {
        tables,
        records,
        weight_owners,
        weight_records,
        hook_points,
    } = computed;
    let (spec, loaded, heads, datasets, kind) = (w.spec, w.loaded, w.heads, w.datasets, w.kind);
    let cfg = loaded.cfg();
    let t0 = w.t0;

    // NaN or infinity in a table is a failed metric, never a silent result (NaN where the
    // table marks an undefined, counted sequence excepted).
    let mut non_finite = Vec::new();
    for (table, (owner, parts)) in &tables {
        let mut total = 0;
        let mut first = None;
        let mut rows_before = 0;
        for (dataset, t) in parts {
            if let Some(f) = t.non_finite() {
                total += f.count;
                if first.is_none() {
                    first = Some((dataset.clone(), rows_before + f.first_row + 1, f));
                }
            }
            rows_before += t.rows.len();
        }
        if let Some((dataset, csv_row, found)) = first {
            let error = format!(
                "{total} non-finite value(s) (NaN or infinity) in table '{table}'; the first is {}={} in row {csv_row} (dataset '{dataset}': {})",
                found.column, found.value, found.row
            );
            let metric = if *owner == WEIGHTS_OWNER {
                let metric = weight_owners.get(table).cloned().unwrap_or_default();
                metrics.push_failure(Failure {
                    metric: metric.clone(),
                    dataset: Some(dataset.clone()),
                    error,
                });
                metric
            } else {
                metrics.fail(*owner, Some(&dataset), Error::Other(error));
                metrics.names().nth(*owner).unwrap_or("?").to_string()
            };
            non_finite.push(NonFiniteRecord {
                metric,
                table: table.clone(),
                dataset,
                csv_row,
                found: NonFinite {
                    count: total,
                    ..found
                },
            });
        }
    }

    // Every file goes into a fresh staging directory beside the output directory; dropping
    // it (an error, a signal) removes it, and the output directory changes only at the end.
    let staging = Staging::begin(&w.out_dir)?;
    let out_dir = staging.path().to_path_buf();
    let mut files = Vec::new();
    let pb = bar(w.quiet, tables.len() as u64, "writing results".into());
    let mut written_tables: Vec<(String, Table)> = Vec::new();
    let mut report_tables: Vec<(String, &Table)> = Vec::new();
    for (name, (owner, parts)) in &tables {
        // A metric that failed on any dataset writes nothing: a CSV missing a dataset would
        // read as complete.
        let failed = match *owner {
            WEIGHTS_OWNER => metrics
                .failures()
                .iter()
                .any(|f| Some(&f.metric) == weight_owners.get(name)),
            i => metrics.has_failed(i),
        };
        if failed {
            continue;
        }
        let refs: Vec<(String, &Table)> = parts.iter().map(|(d, t)| (d.clone(), t)).collect();
        files.push(output::write_csv(&out_dir, &refs)?);
        report_tables.extend(refs);
        for (d, t) in parts {
            if t.head_score.is_some() {
                written_tables.push((d.clone(), t.clone()));
            }
        }
        pb.inc(1);
    }
    pb.finish_and_clear();

    // Pictures and pages; one that cannot be drawn is a failure, the CSVs stay.
    let pictures = report::write_all(&report::ReportInput {
        out_dir: &out_dir,
        spec,
        loaded,
        heads,
        datasets,
        intervention_tables: w.intervention_tables,
        tables: &report_tables,
        csv_files: &files,
        device: kind.to_string(),
        seconds: t0.elapsed().as_secs_f64(),
    });
    files.extend(pictures.files);
    for error in pictures.problems {
        metrics.push_failure(Failure {
            metric: "report".into(),
            dataset: None,
            error,
        });
    }

    let manifest = Manifest {
        format: crate::outdir::FORMAT,
        format_version: crate::outdir::FORMAT_VERSION,
        identity: &w.identity,
        hookgraph_version: env!("CARGO_PKG_VERSION"),
        crate_versions: crate::build_info::crate_versions(),
        spec_path: spec.path.display().to_string(),
        spec_overrides: &spec.overrides,
        git_commit: crate::build_info::GIT_COMMIT,
        spec_toml: &spec.text,
        spec: &spec.spec,
        model_dir: loaded.files.dir.display().to_string(),
        weights_sha256: w.weights_sha256.clone(),
        merged_shards: w.merged_shards,
        config: cfg,
        processing: loaded.processing,
        device: kind,
        heads: heads.len(),
        hook_points,
        datasets: records,
        weight_metrics: weight_records,
        files: files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect(),
        failures: metrics.failures(),
        non_finite: &non_finite,
        load_seconds: w.load_seconds,
        total_seconds: t0.elapsed().as_secs_f64(),
    };
    let manifest_path = output::file_in(&out_dir, "manifest.json")?;
    output::write_json(&manifest_path, &manifest)?;
    files.push(manifest_path);

    // Nothing escapes: every file written lies directly in the staging directory.
    if let Some(f) = files.iter().find(|f| f.parent() != Some(out_dir.as_path())) {
        return Err(Error::Other(format!(
            "internal error: {} was written outside the run's directory",
            f.display()
        )));
    }
    interrupt::checkpoint("write")?;
    // The shards' directories outlive any one set of results (a merge reads them again);
    // the run's own resume checkpoint has served its purpose once the results are whole.
    let committed = staging.commit(&["shards"], &[shard::checkpoint::PARTIAL_DIR])?;
    let files = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| committed.dir.join(n)))
        .collect();

    Ok(RunReport {
        summary: summary(&written_tables),
        output_dir: committed.dir,
        previous: committed.previous,
        files,
        failures: metrics.failures().to_vec(),
    })
}

/// The weight phase: runs every weight metric once with a progress bar, adding its tables
/// to `computed`; one that fails is recorded in `metrics`' failures and the others still run.
pub(crate) fn run_weight_metrics(
    ctx: &RunContext,
    weight_metrics: &mut [WeightEntry],
    metrics: &mut MetricSet,
    computed: &mut Computed,
    quiet: bool,
) -> Result<()> {
    let shared = metrics::WeightInputs::new();
    for w in weight_metrics.iter_mut() {
        let heads = ctx.heads.len();
        let pb = bar(
            quiet,
            w.metric.work(ctx),
            format!("{} ({heads} heads)", w.name),
        );
        let t = Instant::now();
        let result = w.metric.compute(ctx, &shared, &w.detail, &|k| pb.inc(k));
        pb.finish_and_clear();
        let seconds = t.elapsed().as_secs_f64();
        let gflop = w.metric.flop(ctx) / 1e9;
        if !quiet {
            eprintln!(
                "{}: {heads} heads in {seconds:.1} s ({:.1} GFLOP/s of matmul)",
                w.name,
                gflop / seconds
            );
        }
        let record = WeightRecord {
            name: w.name.clone(),
            seconds,
            gflop,
        };
        match result {
            Ok(mut tables) => {
                for t in &mut tables {
                    // A metric given its own `name` prefixes its tables with it.
                    if w.name != w.metric.name() {
                        t.name = t.name.replacen(w.metric.name(), &w.name, 1);
                    }
                }
                computed.add_weights(&w.name, tables, record)?;
            }
            Err(e) => metrics.push_failure(Failure {
                metric: w.name.clone(),
                dataset: None,
                error: e.to_string(),
            }),
        }
        interrupt::checkpoint("weight metric")?;
    }
    Ok(())
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
