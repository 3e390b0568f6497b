//! The hook graph executor: runs a spec from model to files.
//!
//! Owns: the order of a run — check the output directory, resolve and load the model, select
//! heads, build datasets, build metrics and plan their table names, take the union of the
//! hook points they read, run **one** forward pass per batch caching only that union, hand
//! every metric the same cache, collect tables, fail the metrics whose tables hold NaN or
//! infinity, write CSVs, pictures and the manifest into a staging directory and swap it into
//! place, and summarise. Everything that can be checked without the forward pass is checked
//! before it (`validate` stops there). A metric that fails is reported and the others still
//! finish and are written ("nothing lost"); an error or a signal leaves the output directory
//! as it was ("nothing escapes"). Must not: implement metrics, model math or file formats;
//! those live in `metrics`, `model` and `output`.

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
use crate::interrupt;
use crate::metrics::{self, BatchView, Metric, RunContext};
use crate::model::{self, checkpoint, LoadedModel, ModelSource};
use crate::output::{self, NonFinite, Staging, Table, Target};
use crate::report;
use crate::spec::{check_name, LoadedSpec};

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
    /// How each metric's tables are named in the results (parallel to `metrics`).
    table_names: Vec<TableNames>,
    failures: Vec<Failure>,
}

/// The names a metric's tables get: a metric given its own `name` renames its tables, so
/// one metric (built-in or plugin) can run twice with different options. The table named
/// like the metric's first declared table becomes `name`, tables that start with it keep
/// their suffix (`source_suppression_per_position` -> `ss_neg_per_position`), and any other
/// table becomes `<name>_<table>`.
#[derive(Debug, Clone)]
struct TableNames {
    /// The metric's own name (built-in kind or plugin name).
    own: String,
    /// The name the spec gives it (its own unless `name` is set).
    given: String,
    /// The tables it declares, before renaming.
    declared: Vec<String>,
}

impl TableNames {
    fn rename(&self, table: &str) -> String {
        if self.given == self.own {
            return table.to_string();
        }
        let primary = self
            .declared
            .first()
            .map_or(self.own.as_str(), String::as_str);
        match table.strip_prefix(primary) {
            Some(rest) => format!("{}{rest}", self.given),
            None => format!("{}_{table}", self.given),
        }
    }

    fn planned(&self) -> Vec<String> {
        self.declared.iter().map(|t| self.rename(t)).collect()
    }
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
    let mut table_names = Vec::new();
    let mut failures = Vec::new();
    for (i, m) in spec.spec.metrics.iter().enumerate() {
        if let Some(kind) = &m.kind {
            // Unknown options are reported on their own line, not on `kind`'s.
            if let Some(info) = metrics::BUILTINS.iter().find(|b| b.name == kind.get_ref()) {
                if let Some(key) = m
                    .options
                    .keys()
                    .find(|k| !info.options.iter().any(|(o, _)| o == k))
                {
                    let known: Vec<&str> = info.options.iter().map(|(o, _)| *o).collect();
                    return Err(spec.metric_error(
                        i,
                        key,
                        format!(
                            "metric '{}': unknown option '{key}' (known: {})",
                            info.name,
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        ),
                    ));
                }
            }
            let metric = metrics::builtin(kind.get_ref(), &m.options)
                .map_err(|e| spec.error_at(kind.span(), e.to_string()))?;
            let declared = metrics::BUILTINS
                .iter()
                .find(|b| b.name == kind.get_ref())
                .map(|b| b.tables.iter().map(|t| t.to_string()).collect())
                .unwrap_or_default();
            let given = m.name.clone().unwrap_or_else(|| kind.get_ref().clone());
            table_names.push(TableNames {
                own: metric.name().to_string(),
                given: given.clone(),
                declared,
            });
            metrics.push((given, Some(metric)));
        } else if let Some(plugin) = &m.plugin {
            // A plugin that fails to load is a failed metric, not a failed run: the other
            // metrics are still computed and written.
            let fallback = m.name.clone().unwrap_or_else(|| plugin.get_ref().clone());
            match crate::plugin::PluginMetric::load(plugin.get_ref(), &dir, &m.options) {
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
                    table_names.push(TableNames {
                        own: info.name.clone(),
                        given: given.clone(),
                        declared: info.tables.clone(),
                    });
                    metrics.push((given, Some(Box::new(metric) as Box<dyn Metric>)));
                }
                Err(e) => {
                    failures.push(Failure {
                        metric: fallback.clone(),
                        dataset: None,
                        error: e.to_string(),
                    });
                    table_names.push(TableNames {
                        own: fallback.clone(),
                        given: fallback.clone(),
                        declared: Vec::new(),
                    });
                    metrics.push((fallback, None));
                }
            }
        }
    }
    for (i, (name, _)) in metrics.iter().enumerate() {
        if metrics[..i].iter().any(|(n, _)| n == name) {
            return Err(spec.metric_error(
                i,
                "name",
                format!(
                    "two [[metric]] entries are both named '{name}': give one a different `name`"
                ),
            ));
        }
    }
    // Every table name is known now: check them before the forward pass, not after.
    let mut owners: BTreeMap<String, usize> = BTreeMap::new();
    for (i, names) in table_names.iter().enumerate() {
        for t in names.planned() {
            if let Err(why) = check_name(&t) {
                return Err(spec.metric_error(
                    i,
                    "name",
                    format!("metric '{}': its table name {why}", names.given),
                ));
            }
            if let Some(&j) = owners.get(&t) {
                return Err(spec.metric_error(
                    i,
                    "name",
                    format!(
                        "metric '{}' and metric '{}' both write the table '{t}': give one of them a different `name`",
                        names.given, table_names[j].given
                    ),
                ));
            }
            owners.insert(t, i);
        }
    }
    Ok(Prepared {
        loaded,
        heads,
        datasets,
        metrics,
        table_names,
        failures,
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
    for ((name, _), tables) in p.metrics.iter().zip(&p.table_names) {
        out += &format!("  metric {name}: {}\n", tables.planned().join(", "));
    }
    out += &format!(
        "  output: {}{}\n",
        target.dir.display(),
        if target.exists {
            format!(
                " (a run moves the results there now to {})",
                target.prev.display()
            )
        } else {
            String::new()
        }
    );
    Ok(out)
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
    files: Vec<String>,
    failures: &'a [Failure],
    /// Metrics failed for NaN or infinity in their tables: where the first one is.
    non_finite: &'a [NonFiniteRecord],
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
    // The output directory first: a run that cannot write its results should not compute
    // them. Everything goes into `staging`; dropping it (any error, a signal) removes it.
    let staging = Staging::begin(&opts.output.clone().unwrap_or_else(|| spec.output_dir()))?;
    let Prepared {
        loaded,
        heads,
        datasets,
        mut metrics,
        table_names,
        mut failures,
    } = prepare(dev, spec, opts.quiet)?;
    interrupt::checkpoint("prepared")?;
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
    // tables[table name] = (index of the metric that made it, [(dataset, table)])
    let mut tables: BTreeMap<String, (usize, Vec<(String, Table)>)> = BTreeMap::new();
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
            interrupt::checkpoint("batch")?;
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
                            t.name = table_names[idx].rename(&t.name);
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
            let metric = metrics[*owner].0.clone();
            failures.push(Failure {
                metric: metric.clone(),
                dataset: Some(dataset.clone()),
                error: format!(
                    "{total} non-finite value(s) (NaN or infinity) in table '{table}'; the first is {}={} in row {csv_row} (dataset '{dataset}': {})",
                    found.column, found.value, found.row
                ),
            });
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

    // A metric that failed on any dataset writes nothing: a CSV missing a dataset would
    // read as complete.
    let failed: Vec<&str> = failures.iter().map(|f| f.metric.as_str()).collect();
    let failed_idx: Vec<bool> = metrics
        .iter()
        .map(|(n, _)| failed.contains(&n.as_str()))
        .collect();
    let out_dir = staging.path().to_path_buf();
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
        files: files
            .iter()
            .filter_map(|f| f.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect(),
        failures: &failures,
        non_finite: &non_finite,
        load_seconds,
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
    let committed = staging.commit()?;
    let files = files
        .iter()
        .filter_map(|f| f.file_name().map(|n| committed.dir.join(n)))
        .collect();

    Ok(RunReport {
        summary: summary(&written_tables),
        output_dir: committed.dir,
        previous: committed.previous,
        files,
        failures,
    })
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
        rows.sort_by(|a, b| a.0.total_cmp(&b.0));
        out += &format!(
            "{} / {} ({}), most negative heads:\n",
            t.name,
            dataset,
            t.head_score.as_deref().unwrap_or_default()
        );
        for (v, head) in rows.iter().take(5) {
            out += &format!("  {head:>6}  {v:>10.4}\n");
        }
    }
    out
}
