//! The hook graph executor: runs a spec from model to files.
//!
//! Owns: the order of a run — the prepare phase (resolve and load the model, select heads,
//! build datasets and metrics), the weight phase (metrics of the weights alone, such as
//! `ov_circuit`, computed once before any dataset), the compute phase (handed to
//! [`crate::engine`], the one batch loop), and the write phase ([`write_results`]: CSVs, pictures, the manifest,
//! atomically; a merge of shards ends there too), and the summary. A metric that fails is
//! reported and the others still finish and are written ("nothing lost"). Must not:
//! implement metrics, the batch loop, model math or file formats; those live in `metrics`,
//! `engine`, `model` and `output`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use dfdx::prelude::{Cpu, Device};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::data::{self, DataContext, Dataset};
use crate::device::{with_device, DeviceChoice, DeviceKind, OnDevice};
use crate::engine::{Engine, LoopOptions, MetricSet, Timings};
use crate::error::{Error, Result};
use crate::metrics::{self, Metric, RunContext, WeightMetric, WEIGHTS_DATASET};
use crate::model::{self, checkpoint, LoadedModel, ModelSource};
use crate::output::{self, Table};
use crate::report;
use crate::spec::LoadedSpec;

/// Command-line overrides of a spec.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub device: Option<DeviceChoice>,
    pub output: Option<PathBuf>,
    pub quiet: bool,
}

pub use crate::engine::Failure;

/// What a run did.
#[derive(Debug)]
pub struct RunReport {
    pub output_dir: PathBuf,
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

fn bar(quiet: bool, len: u64, msg: String) -> ProgressBar {
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
    fn run<D: Device<f32>>(self, dev: D) -> Result<RunReport> {
        run_on(dev, self.kind, self.spec, self.opts)
    }
}

/// Everything a run prepares before its first forward pass; `validate` stops here.
struct Prepared<D: Device<f32>> {
    loaded: LoadedModel<D>,
    heads: Vec<(usize, usize)>,
    datasets: Vec<Dataset>,
    /// The metrics (a plugin that did not load is already a failure in it).
    metrics: MetricSet<'static>,
    /// Metrics of the weights alone, computed once before any dataset.
    weight_metrics: Vec<WeightEntry>,
}

/// A weight metric of the run: its name, the metric, and the heads whose per-token table
/// its `[[view]]`s ask for.
struct WeightEntry {
    name: String,
    metric: Box<dyn WeightMetric>,
    detail: Vec<(usize, usize)>,
}

fn prepare<D: Device<f32>>(dev: D, spec: &LoadedSpec, quiet: bool) -> Result<Prepared<D>> {
    let source = model_source(spec);
    let pb = spinner(quiet, format!("loading model {source:?}"));
    let files = source.resolve()?;
    let tok_dir = spec.spec.model.tokenizer.as_ref().map(|p| spec.resolve(p));
    let loaded = model::load(dev, files, spec.spec.model.processing(), tok_dir.as_deref())?;
    pb.finish_and_clear();
    let cfg = loaded.cfg().clone();
    let heads = spec.check_heads(cfg.n_layers, cfg.n_heads)?;
    report::check_views(spec, &heads, cfg.n_layers, cfg.n_heads)?;

    let dir = spec.dir();
    let ctx = DataContext {
        tokenizer: loaded.tokenizer.as_ref(),
        cfg: &cfg,
        spec_dir: &dir,
    };
    let datasets = spec
        .spec
        .datasets
        .iter()
        .map(|d| data::build(d, &ctx))
        .collect::<Result<Vec<_>>>()?;

    let mut metrics = MetricSet::new();
    let mut weight_metrics: Vec<WeightEntry> = Vec::new();
    for m in &spec.spec.metrics {
        let weight_kind = m
            .kind
            .as_ref()
            .filter(|k| metrics::is_weight_metric(k.get_ref()));
        if let Some(kind) = weight_kind {
            let metric = metrics::weight_builtin(kind.get_ref(), &m.options)
                .map_err(|e| spec.error_at(kind.span(), e.to_string()))?;
            let name = m.name.clone().unwrap_or_else(|| kind.get_ref().clone());
            let detail =
                report::views::weight_view_heads(spec, &name, &heads, cfg.n_layers, cfg.n_heads)?;
            weight_metrics.push(WeightEntry {
                name,
                metric,
                detail,
            });
        } else if let Some(kind) = &m.kind {
            let metric = metrics::builtin(kind.get_ref(), &m.options)
                .map_err(|e| spec.error_at(kind.span(), e.to_string()))?;
            metrics.add(
                m.name.clone().unwrap_or_else(|| kind.get_ref().clone()),
                metric,
            );
        } else if let Some(plugin) = &m.plugin {
            // A plugin that fails to load is a failed metric, not a failed run: the other
            // metrics are still computed and written.
            let fallback = m.name.clone().unwrap_or_else(|| plugin.get_ref().clone());
            match load_plugin(plugin.get_ref(), &dir, &m.options) {
                // Named after what the plugin calls itself, not its path.
                Ok(metric) => metrics.add(
                    m.name.clone().unwrap_or_else(|| metric.name().to_string()),
                    metric,
                ),
                Err(e) => metrics.add_failed(fallback, e.to_string()),
            }
        }
    }
    let names: Vec<&str> = metrics
        .names()
        .chain(weight_metrics.iter().map(|w| w.name.as_str()))
        .collect();
    for (i, name) in names.iter().enumerate() {
        if names[..i].contains(name) {
            return Err(spec.error(format!(
                "two [[metric]] entries are both named '{name}': give one a different `name`"
            )));
        }
    }
    Ok(Prepared {
        loaded,
        heads,
        datasets,
        metrics,
        weight_metrics,
    })
}

fn load_plugin(
    spec: &str,
    dir: &std::path::Path,
    options: &toml::Table,
) -> Result<Box<dyn Metric>> {
    crate::metrics::plugin::load_metric(spec, dir, options)
}

/// Checks a spec end to end without running a forward pass: the model loads, heads are in
/// range, datasets build, metrics and plugins load. Returns a short description.
pub fn validate(spec: &LoadedSpec, device: Option<DeviceChoice>) -> Result<String> {
    let _ = device.unwrap_or(spec.spec.model.device).resolve()?;
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
    for name in p.metrics.names() {
        out += &format!("  metric {name}\n");
    }
    for w in &p.weight_metrics {
        out += &format!("  metric {} (from the weights)\n", w.name);
    }
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
    hookgraph_version: &'static str,
    crate_versions: BTreeMap<&'static str, &'static str>,
    spec_path: String,
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
    load_seconds: f64,
    total_seconds: f64,
}

fn crate_versions() -> BTreeMap<&'static str, &'static str> {
    env!("HOOKGRAPH_DEP_VERSIONS")
        .split(',')
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

fn tokens_hash(d: &Dataset) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((d.n_sequences() as u64).to_le_bytes());
    h.update((d.seq_len() as u64).to_le_bytes());
    for t in d.tokens.iter() {
        h.update(t.to_le_bytes());
    }
    hex::encode(h.finalize())
}

fn run_on<D: Device<f32>>(
    dev: D,
    kind: DeviceKind,
    spec: &LoadedSpec,
    opts: &RunOptions,
) -> Result<RunReport> {
    let t0 = Instant::now();
    let Prepared {
        loaded,
        heads,
        datasets,
        mut metrics,
        mut weight_metrics,
    } = prepare(dev, spec, opts.quiet)?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let cfg = loaded.cfg().clone();
    let ctx = RunContext {
        cfg: &cfg,
        params: &loaded.params,
        heads: &heads,
        bos: cfg.bos_token_id,
        tokenizer: loaded.tokenizer.as_ref(),
    };

    // The compute phase: every dataset's batches through the model and the metrics.
    let engine = Engine::new(&loaded.model, &ctx, &metrics, spec.spec.model.batch_size)?;
    let mut computed = Computed::new(engine.hook_points().to_vec());
    // The weight phase: once per run, no forward pass.
    run_weight_metrics(
        &ctx,
        &mut weight_metrics,
        &mut metrics,
        &mut computed,
        opts.quiet,
    )?;
    for dataset in &datasets {
        let n = dataset.n_sequences();
        let pb = bar(
            opts.quiet,
            n as u64,
            format!("{} ({} seqs)", dataset.name, n),
        );
        let (tables, timings) = engine.run_dataset(
            &mut metrics,
            dataset,
            &mut LoopOptions {
                progress: Some(&pb),
                ..LoopOptions::default()
            },
        )?;
        pb.finish_and_clear();
        computed.add_dataset(dataset, tables, timings)?;
    }

    write_results(
        &WriteInput {
            spec,
            out_dir: opts.output.clone().unwrap_or_else(|| spec.output_dir()),
            kind,
            loaded: &loaded,
            heads: &heads,
            datasets: &datasets,
            quiet: opts.quiet,
            t0,
            load_seconds,
        },
        &mut metrics,
        computed,
    )
}

/// The owner index of a weight metric's tables in [`Computed`]: a weight metric that
/// fails adds no tables, so they are never held back for a failure.
const WEIGHTS_OWNER: usize = usize::MAX;

/// What the compute phase produced, as the write phase takes it.
pub struct Computed {
    /// tables[table name] = (index of the metric that made it, [(dataset, table)])
    tables: BTreeMap<String, (usize, Vec<(String, Table)>)>,
    records: Vec<DatasetRecord>,
    weight_records: Vec<WeightRecord>,
    hook_points: Vec<String>,
}

impl Computed {
    pub fn new(hook_points: Vec<String>) -> Self {
        Computed {
            tables: BTreeMap::new(),
            records: Vec::new(),
            weight_records: Vec::new(),
            hook_points,
        }
    }

    /// Adds a weight metric's tables (dataset [`WEIGHTS_DATASET`]) and its timing.
    fn add_weights(&mut self, tables: Vec<Table>, record: WeightRecord) -> Result<()> {
        for t in tables {
            if self.tables.contains_key(&t.name) {
                return Err(Error::Other(format!(
                    "two metrics write the table '{}': give one of them a `name`",
                    t.name
                )));
            }
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
            tokens_sha256: tokens_hash(dataset),
            forward_seconds: timings.forward_seconds,
            metric_seconds: timings.metric_seconds,
        });
        Ok(())
    }
}

/// What the write phase needs besides the computed tables.
pub struct WriteInput<'a, D: Device<f32>> {
    pub spec: &'a LoadedSpec,
    pub out_dir: PathBuf,
    pub kind: DeviceKind,
    pub loaded: &'a LoadedModel<D>,
    pub heads: &'a [(usize, usize)],
    pub datasets: &'a [Dataset],
    pub quiet: bool,
    /// When the run started, and how long loading took (for the manifest).
    pub t0: Instant,
    pub load_seconds: f64,
}

/// The write phase: CSVs, pictures and pages, the manifest. A run and a merge of shards
/// both end here, so they write the same files.
pub fn write_results<D: Device<f32>>(
    w: &WriteInput<D>,
    metrics: &mut MetricSet,
    computed: Computed,
) -> Result<RunReport> {
    let Computed {
        tables,
        records,
        weight_records,
        hook_points,
    } = computed;
    let (spec, loaded, heads, datasets, kind) = (w.spec, w.loaded, w.heads, w.datasets, w.kind);
    let cfg = loaded.cfg();
    let out_dir = w.out_dir.clone();
    let t0 = w.t0;
    let mut files = Vec::new();
    let pb = bar(w.quiet, tables.len() as u64, "writing results".into());
    let mut written_tables: Vec<(String, Table)> = Vec::new();
    let mut report_tables: Vec<(String, &Table)> = Vec::new();
    for (owner, parts) in tables.values() {
        // A metric that failed on any dataset writes nothing: a CSV missing a dataset would
        // read as complete.
        if *owner != WEIGHTS_OWNER && metrics.has_failed(*owner) {
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
        hookgraph_version: env!("CARGO_PKG_VERSION"),
        crate_versions: crate_versions(),
        spec_path: spec.path.display().to_string(),
        spec_toml: &spec.text,
        spec: &spec.spec,
        model_dir: loaded.files.dir.display().to_string(),
        weights_sha256: checkpoint::sha256_file(&loaded.files.weights)?,
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
        load_seconds: w.load_seconds,
        total_seconds: t0.elapsed().as_secs_f64(),
    };
    let manifest_path = out_dir.join("manifest.json");
    output::write_json(&manifest_path, &manifest)?;
    files.push(manifest_path);

    Ok(RunReport {
        summary: summary(&written_tables),
        output_dir: out_dir,
        files,
        failures: metrics.failures().to_vec(),
    })
}

/// The weight phase: runs every weight metric once with a progress bar, adding its tables
/// to `computed`; one that fails is recorded in `metrics`' failures and the others still run.
fn run_weight_metrics(
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
                computed.add_weights(tables, record)?;
            }
            Err(e) => metrics.push_failure(Failure {
                metric: w.name.clone(),
                dataset: None,
                error: e.to_string(),
            }),
        }
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
