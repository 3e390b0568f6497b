//! What the compute step hands to the write phase, and the weight phase.
//!
//! Owns: [`Computed`] (every table with the metric that made it, per dataset, and the
//! timings the manifest records) and [`run_weight_metrics`] (metrics of the weights alone,
//! once per run; a merge runs it too). Must not: run the batch loop (that is
//! [`crate::engine`], driven by [`crate::shard::compute`]) or write files.

use std::collections::BTreeMap;
use std::time::Instant;

use serde::Serialize;

use crate::data::Dataset;
use crate::engine::{MetricSet, Timings};
use crate::error::{Error, Result};
use crate::interrupt;
use crate::metrics::{self, RunContext, WEIGHTS_DATASET};
use crate::output::Table;
use crate::shard;

use super::{bar, Failure, WeightEntry};

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

/// A weight metric's time and matmul work, for the manifest.
#[derive(Serialize)]
pub struct WeightRecord {
    name: String,
    seconds: f64,
    gflop: f64,
}

/// The owner index of a weight metric's tables in [`Computed`] (they are not in the
/// [`MetricSet`]; `weight_owners` names their metric).
pub(super) const WEIGHTS_OWNER: usize = usize::MAX;

/// What the compute phase produced, as the write phase takes it.
pub struct Computed {
    /// tables[table name] = (index of the metric that made it, [(dataset, table)])
    pub(super) tables: BTreeMap<String, (usize, Vec<(String, Table)>)>,
    pub(super) records: Vec<DatasetRecord>,
    /// Weight metrics: table name -> metric name, and their timings.
    pub(super) weight_owners: BTreeMap<String, String>,
    pub(super) weight_records: Vec<WeightRecord>,
    pub(super) hook_points: Vec<String>,
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
