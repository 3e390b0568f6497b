//! The one write phase: a run and `runner merge` both end in [`write_results`].
//!
//! Owns: failing the metrics whose tables hold NaN or infinity, the CSVs, pictures and
//! pages, the manifest, all written into a staging directory that is swapped into place
//! whole. Must not: compute (it takes [`Computed`] as it is) or plan names again (the
//! planned names come in [`WriteInput`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use crate::data::Dataset;
use crate::device::DeviceKind;
use crate::engine::MetricSet;
use crate::error::{Error, Result};
use crate::interrupt;
use crate::model::{self, LoadedModel};
use crate::output::{self, NonFinite, Staging, Table};
use crate::report;
use crate::seam::SeamDevice;
use crate::shard::{self, Identity};
use crate::spec::LoadedSpec;

use super::compute::{Computed, DatasetRecord, WeightRecord, WEIGHTS_OWNER};
use super::{bar, summary, Failure, RunReport};

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
