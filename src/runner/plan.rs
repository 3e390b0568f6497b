//! The prepare step of a run: everything that can fail before the first forward pass.
//!
//! Owns: [`prepare`] (output directory checked, model resolved and loaded, heads selected,
//! datasets built, metrics, plugins and interventions planned, table and picture names
//! checked) and [`validate`], which stops there and describes the plan (its passes and
//! their cost). Must not: run a forward pass or write a file.

use std::collections::BTreeMap;
use std::path::PathBuf;

use dfdx::prelude::Cpu;

use crate::data::{self, DataContext, Dataset};
use crate::device::DeviceChoice;
use crate::engine::MetricSet;
use crate::error::{Error, Result};
use crate::metrics::{self, WeightMetric};
use crate::model::{self, LoadedModel};
use crate::output::{TableNames, Target};
use crate::report;
use crate::seam::SeamDevice;
use crate::spec::{check_name, LoadedSpec};

use super::{model_source, spinner};

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
    pub(super) name: String,
    pub(super) metric: Box<dyn WeightMetric>,
    pub(super) detail: Vec<(usize, usize)>,
    /// Its tables' names (planned, as the spec names them).
    pub(super) tables: Vec<String>,
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

/// The files a run reads: the spec, the checkpoint, the tokenizer directory, dataset files.
pub(super) fn run_inputs<D: SeamDevice>(
    spec: &LoadedSpec,
    loaded: &LoadedModel<D>,
) -> Vec<PathBuf> {
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
