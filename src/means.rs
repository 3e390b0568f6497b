//! Means of activations over a dataset: the mean passes a run makes once per dataset, before
//! the datasets' batches, for mean ablations and for metrics that subtract a mean.
//!
//! Owns: [`MeanRequest`] (which dataset, which hook point, per position or not) and
//! [`Means`] (the results, looked up by request). The mean passes themselves are the
//! `interv` branch's (`compute`, run by the engine before the datasets); this is the
//! interface the metrics are written against until it lands. Must not: know interventions
//! or metrics, or write files. The mean is over every non-padding (sequence, position): position `p` of
//! sequence `i` counts when `p < len_i`, where `len_i` is the first position `p >= 1`
//! holding BOS, else the sequence length (`docs/metrics.md`). Sums are in `f64`, in
//! sequence order, so the result does not depend on the batch size.

use std::collections::BTreeMap;

use ndarray::ArrayD;

/// One mean a metric or an intervention needs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MeanRequest {
    /// The dataset whose activations are averaged.
    pub dataset: String,
    /// The TL hook name, e.g. `blocks.3.attn.hook_z`.
    pub hook: String,
    /// One mean per position (over the sequences that reach it) instead of one in all.
    pub per_position: bool,
    /// Only the first this many sequences (`None`: all).
    pub max_sequences: Option<usize>,
}

/// The means of a run, by request.
#[derive(Debug, Default, Clone)]
pub struct Means {
    map: BTreeMap<MeanRequest, ArrayD<f32>>,
}

impl Means {
    /// The mean asked for by `req`: `[pos, ...]` per position, else the hook's shape without
    /// its batch and position axes.
    pub fn get(&self, req: &MeanRequest) -> Option<&ndarray::ArrayD<f32>> {
        self.map.get(req)
    }

    pub fn insert(&mut self, req: MeanRequest, mean: ArrayD<f32>) {
        self.map.insert(req, mean);
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}
