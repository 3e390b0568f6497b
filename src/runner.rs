//! The hook graph executor: runs a spec from model to files.
//!
//! Owns: the order of a run — resolve and load the model, select heads, build datasets,
//! build metrics, take the union of the hook points they read, run **one** forward pass per
//! batch caching only that union, hand every metric the same cache, collect tables, write
//! CSVs and the manifest atomically, and summarise. A metric that fails is reported and the
//! others still finish and are written ("nothing lost"). Must not: implement metrics, model
//! math or file formats; those live in `metrics`, `model` and `output`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use dfdx::prelude::{Cpu, Device};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::data::{self, DataContext, Dataset};
use crate::device::{DeviceChoice, DeviceKind};
use crate::error::{Error, Result};
use crate::hooks::{HookFilter, Hooks};
use crate::metrics::{self, BatchView, Metric, RunContext, WeightMetric, WEIGHTS_DATASET};
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

/// A metric that failed, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub metric: String,
    pub dataset: Option<String>,
    pub error: String,
}

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
    match kind {
        DeviceKind::Cpu => run_on(Cpu::default(), kind, spec, opts),
        DeviceKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                let dev = dfdx::tensor::Cuda::try_build(0, 0)
                    .map_err(|e| Error::Device(format!("{e:?}")))?;
                run_on(dev, kind, spec, opts)
            }
            #[cfg(not(feature = "cuda"))]
            unreachable!("DeviceChoice::resolve refuses CUDA without the feature")
        }
    }
}

/// Everything a run prepares before its first forward pass; `validate` stops here.
struct Prepared<D: Device<f32>> {
    loaded: LoadedModel<D>,
    heads: Vec<(usize, usize)>,
    datasets: Vec<Dataset>,
    metrics: Vec<(String, Option<Box<dyn Metric>>)>,
    /// Metrics of the weights alone, with the heads their `[[view]]`s ask details of.
    weight_metrics: Vec<WeightEntry>,
    failures: Vec<Failure>,
}

/// A weight metric of the run: its name, the metric, and its per-token heads.
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

    let mut metrics: Vec<(String, Option<Box<dyn Metric>>)> = Vec::new();
    let mut weight_metrics: Vec<WeightEntry> = Vec::new();
    let mut failures = Vec::new();
    for m in &spec.spec.metrics {
        if let Some(kind) = m
            .kind
            .as_ref()
            .filter(|k| metrics::is_weight_metric(k.get_ref()))
        {
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
            metrics.push((
                m.name.clone().unwrap_or_else(|| kind.get_ref().clone()),
                Some(metric),
            ));
        } else if let Some(plugin) = &m.plugin {
            // A plugin that fails to load is a failed metric, not a failed run: the other
            // metrics are still computed and written.
            let fallback = m.name.clone().unwrap_or_else(|| plugin.get_ref().clone());
            match load_plugin(plugin.get_ref(), &dir, &m.options) {
                // Named after what the plugin calls itself, not its path.
                Ok(metric) => metrics.push((
                    m.name.clone().unwrap_or_else(|| metric.name().to_string()),
                    Some(metric),
                )),
                Err(e) => {
                    failures.push(Failure {
                        metric: fallback.clone(),
                        dataset: None,
                        error: e.to_string(),
                    });
                    metrics.push((fallback, None));
                }
            }
        }
    }
    let names: Vec<&String> = metrics
        .iter()
        .map(|(n, _)| n)
        .chain(weight_metrics.iter().map(|w| &w.name))
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
        failures,
    })
}

fn load_plugin(
    spec: &str,
    dir: &std::path::Path,
    options: &toml::Table,
) -> Result<Box<dyn Metric>> {
    crate::plugin::load_metric(spec, dir, options)
}

/// Checks a spec end to end without running a forward pass: the model loads, heads are in
/// range, datasets build, metrics and plugins load. Returns a short description.
pub fn validate(spec: &LoadedSpec, device: Option<DeviceChoice>) -> Result<String> {
    let _ = device.unwrap_or(spec.spec.model.device).resolve()?;
    let p = prepare(Cpu::default(), spec, true)?;
    if let Some(f) = p.failures.first() {
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
    for (name, _) in &p.metrics {
        out += &format!("  metric {name}\n");
    }
    for w in &p.weight_metrics {
        out += &format!("  metric {} (from the weights)\n", w.name);
    }
    Ok(out)
}

#[derive(Serialize)]
struct DatasetRecord {
    name: String,
    n_sequences: usize,
    seq_len: usize,
    tokens_sha256: String,
    forward_seconds: f64,
    metric_seconds: BTreeMap<String, f64>,
}

#[derive(Serialize)]
struct WeightRecord {
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
        mut failures,
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

    // The hook graph: one cache filter, the union of what every metric reads.
    let mut hook_points: Vec<String> = metrics
        .iter()
        .filter_map(|(_, m)| m.as_ref())
        .flat_map(|m| m.hooks(&ctx))
        .collect();
    hook_points.sort();
    hook_points.dedup();
    let filter = HookFilter::checked(&hook_points, cfg.n_layers)?;

    let batch_size = spec.spec.model.batch_size;
    // tables[table name] = (index of the metric that made it, [(dataset, table)]); weight
    // metrics are numbered after the activation metrics.
    let mut tables: BTreeMap<String, (usize, Vec<(String, Table)>)> = BTreeMap::new();

    // Weight metrics first: once per run, no forward pass.
    let weight_records = run_weight_metrics(
        &ctx,
        &mut weight_metrics,
        metrics.len(),
        &mut tables,
        &mut failures,
        opts.quiet,
    )?;
    let mut records = Vec::new();
    for dataset in &datasets {
        let mut metric_seconds: BTreeMap<String, f64> = BTreeMap::new();
        let mut forward_seconds = 0.0;
        let fail = |failures: &mut Vec<Failure>, name: &str, e: Error| {
            failures.push(Failure {
                metric: name.to_string(),
                dataset: Some(dataset.name.clone()),
                error: e.to_string(),
            })
        };
        let mut active: Vec<bool> = metrics.iter().map(|(_, m)| m.is_some()).collect();
        for ((name, m), on) in metrics.iter_mut().zip(active.iter_mut()) {
            if let Some(m) = m.as_mut() {
                if let Err(e) = m.start_dataset(&ctx, dataset) {
                    fail(&mut failures, name, e);
                    *on = false;
                }
            }
        }
        let n = dataset.n_sequences();
        let pb = bar(
            opts.quiet,
            n as u64,
            format!("{} ({} seqs)", dataset.name, n),
        );
        for start in (0..n).step_by(batch_size) {
            let end = (start + batch_size).min(n);
            let tokens = dataset.tokens.slice(ndarray::s![start..end, ..]).to_owned();
            let t = Instant::now();
            let mut hooks = Hooks::caching(filter.clone());
            loaded.model.run_hooks(&tokens, &mut hooks)?;
            let cache = hooks.take_cache();
            forward_seconds += t.elapsed().as_secs_f64();
            let view = BatchView {
                dataset,
                start,
                tokens: tokens.view(),
                cache: &cache,
            };
            for ((name, m), on) in metrics.iter_mut().zip(active.iter_mut()) {
                if let (Some(m), true) = (m.as_mut(), *on) {
                    let t = Instant::now();
                    if let Err(e) = m.batch(&ctx, &view) {
                        fail(&mut failures, name, e);
                        *on = false;
                    }
                    *metric_seconds.entry(name.clone()).or_default() += t.elapsed().as_secs_f64();
                }
            }
            pb.inc((end - start) as u64);
        }
        pb.finish_and_clear();
        for (idx, ((name, m), on)) in metrics.iter_mut().zip(active.iter()).enumerate() {
            if let (Some(m), true) = (m.as_mut(), *on) {
                match m.finish_dataset(&ctx, dataset) {
                    Ok(ts) => {
                        for mut t in ts {
                            // A metric given its own `name` prefixes its tables with it, so
                            // one metric can run twice with different options.
                            if name != m.name() {
                                t.name = t.name.replacen(m.name(), name, 1);
                            }
                            let entry = tables.entry(t.name.clone()).or_insert((idx, Vec::new()));
                            if entry.0 != idx {
                                return Err(Error::Other(format!(
                                    "two metrics write the table '{}': give one of them a `name`",
                                    t.name
                                )));
                            }
                            entry.1.push((dataset.name.clone(), t));
                        }
                    }
                    Err(e) => fail(&mut failures, name, e),
                }
            }
        }
        records.push(DatasetRecord {
            name: dataset.name.clone(),
            n_sequences: n,
            seq_len: dataset.seq_len(),
            tokens_sha256: tokens_hash(dataset),
            forward_seconds,
            metric_seconds,
        });
    }

    // A metric that failed on any dataset writes nothing: a CSV missing a dataset would
    // read as complete.
    let failed: Vec<&str> = failures.iter().map(|f| f.metric.as_str()).collect();
    let failed_idx: Vec<bool> = metrics
        .iter()
        .map(|(n, _)| n)
        .chain(weight_metrics.iter().map(|w| &w.name))
        .map(|n| failed.contains(&n.as_str()))
        .collect();
    let out_dir = opts.output.clone().unwrap_or_else(|| spec.output_dir());
    let mut files = Vec::new();
    let pb = bar(opts.quiet, tables.len() as u64, "writing results".into());
    let mut written_tables: Vec<(String, Table)> = Vec::new();
    let mut report_tables: Vec<(String, &Table)> = Vec::new();
    for (owner, parts) in tables.values() {
        if failed_idx[*owner] {
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
        loaded: &loaded,
        heads: &heads,
        datasets: &datasets,
        tables: &report_tables,
        csv_files: &files,
        device: kind.to_string(),
        seconds: t0.elapsed().as_secs_f64(),
    });
    files.extend(pictures.files);
    failures.extend(pictures.problems.into_iter().map(|error| Failure {
        metric: "report".into(),
        dataset: None,
        error,
    }));

    let manifest = Manifest {
        hookgraph_version: env!("CARGO_PKG_VERSION"),
        crate_versions: crate_versions(),
        spec_path: spec.path.display().to_string(),
        spec_toml: &spec.text,
        spec: &spec.spec,
        model_dir: loaded.files.dir.display().to_string(),
        weights_sha256: checkpoint::sha256_file(&loaded.files.weights)?,
        config: &cfg,
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
        failures: &failures,
        load_seconds,
        total_seconds: t0.elapsed().as_secs_f64(),
    };
    let manifest_path = out_dir.join("manifest.json");
    output::write_json(&manifest_path, &manifest)?;
    files.push(manifest_path);

    Ok(RunReport {
        summary: summary(&written_tables),
        output_dir: out_dir,
        files,
        failures,
    })
}

/// Table name -> (index of the metric that made it, [(dataset, table)]).
type TablesByName = BTreeMap<String, (usize, Vec<(String, Table)>)>;

/// Runs every weight metric once, adding its tables (dataset [`WEIGHTS_DATASET`]) to
/// `tables` under owner index `first_index + i`; a metric that fails is recorded and the
/// others still run.
fn run_weight_metrics(
    ctx: &RunContext,
    weight_metrics: &mut [WeightEntry],
    first_index: usize,
    tables: &mut TablesByName,
    failures: &mut Vec<Failure>,
    quiet: bool,
) -> Result<Vec<WeightRecord>> {
    let mut records = Vec::new();
    for (i, w) in weight_metrics.iter_mut().enumerate() {
        let heads = ctx.heads.len();
        let pb = bar(
            quiet,
            w.metric.work(ctx),
            format!("{} ({heads} heads)", w.name),
        );
        let t = Instant::now();
        let result = w.metric.compute(ctx, &w.detail, &|k| pb.inc(k));
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
        records.push(WeightRecord {
            name: w.name.clone(),
            seconds,
            gflop,
        });
        match result {
            Ok(ts) => {
                for mut t in ts {
                    if w.name != w.metric.name() {
                        t.name = t.name.replacen(w.metric.name(), &w.name, 1);
                    }
                    if tables.contains_key(&t.name) {
                        return Err(Error::Other(format!(
                            "two metrics write the table '{}': give one of them a `name`",
                            t.name
                        )));
                    }
                    tables.insert(
                        t.name.clone(),
                        (first_index + i, vec![(WEIGHTS_DATASET.to_string(), t)]),
                    );
                }
            }
            Err(e) => failures.push(Failure {
                metric: w.name.clone(),
                dataset: None,
                error: e.to_string(),
            }),
        }
    }
    Ok(records)
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
