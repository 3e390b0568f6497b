//! Means of activations over a dataset: the mean passes a run makes once per dataset, before
//! the datasets' batches, for mean ablations and for metrics that subtract a mean.
//!
//! Owns: [`MeanRequest`] (which dataset, which hook point, per position or not), [`Means`]
//! (the results, looked up by request) and [`compute`] (one pass per requested dataset
//! caching every requested hook of it). Must not: know interventions or metrics, or write
//! files. The mean is over every non-padding (sequence, position): position `p` of
//! sequence `i` counts when `p < len_i`, where `len_i` is the first position `p >= 1`
//! holding BOS, else the sequence length (`docs/metrics.md`). Sums are in `f64`, in
//! sequence order, so the result does not depend on the batch size.

use std::collections::BTreeMap;

use ndarray::{ArrayD, IxDyn};

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::hooks::{HookFilter, Hooks};
use crate::model::HookedGpt2;
use crate::seam::SeamDevice;

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

/// `len_i` of every sequence: the first position `p >= 1` holding `bos`, else the length.
pub fn seq_lens(tokens: ndarray::ArrayView2<u32>, bos: u32) -> Vec<usize> {
    tokens
        .rows()
        .into_iter()
        .map(|r| {
            r.iter()
                .skip(1)
                .position(|&t| t == bos)
                .map_or(r.len(), |p| p + 1)
        })
        .collect()
}

/// Sums and counts of one request while its dataset's batches run.
struct Acc {
    /// `[pos, rest]` per position, `[rest]` otherwise, flattened.
    sum: Vec<f64>,
    count: Vec<u64>,
    rest: Vec<usize>,
}

/// Runs the mean passes for `requests` (deduplicated) over `datasets` with batches of
/// `batch_size`: one pass per batch of each dataset named, caching every requested hook of
/// that dataset at once.
pub fn compute<D: SeamDevice>(
    model: &HookedGpt2<D>,
    datasets: &[Dataset],
    requests: &[MeanRequest],
    batch_size: usize,
    bos: u32,
) -> Result<Means> {
    let mut means = Means::default();
    let mut by_data: BTreeMap<(&str, Option<usize>), Vec<&MeanRequest>> = BTreeMap::new();
    for r in requests {
        if means.map.contains_key(r) {
            continue;
        }
        means.map.insert(r.clone(), ArrayD::zeros(IxDyn(&[0])));
        by_data
            .entry((r.dataset.as_str(), r.max_sequences))
            .or_default()
            .push(r);
    }
    for ((name, max), reqs) in by_data {
        let ds = datasets
            .iter()
            .find(|d| d.name == name)
            .ok_or_else(|| Error::Other(format!("mean over `{name}`: no such dataset")))?;
        let hooks_wanted: Vec<String> = reqs.iter().map(|r| r.hook.clone()).collect();
        let filter = HookFilter::checked(&hooks_wanted, model.cfg.n_layers)?;
        let n = max.map_or(ds.n_sequences(), |m| m.min(ds.n_sequences()));
        let s = ds.seq_len();
        let mut accs: Vec<Option<Acc>> = reqs.iter().map(|_| None).collect();
        for start in (0..n).step_by(batch_size.max(1)) {
            let end = (start + batch_size).min(n);
            let tokens = ds.tokens.slice(ndarray::s![start..end, ..]).to_owned();
            let lens = seq_lens(tokens.view(), bos);
            let mut hooks = Hooks::caching(filter.clone());
            model.run_hooks(&tokens, &mut hooks)?;
            let cache = hooks.take_cache();
            for (r, acc) in reqs.iter().zip(accs.iter_mut()) {
                let a = cache.get(&r.hook)?;
                let rest: Vec<usize> = a.shape()[2..].to_vec();
                let k: usize = rest.iter().product();
                let acc = acc.get_or_insert_with(|| Acc {
                    sum: vec![0.0; if r.per_position { s * k } else { k }],
                    count: vec![0; if r.per_position { s } else { 1 }],
                    rest: rest.clone(),
                });
                let a = a.as_standard_layout();
                let flat = a.as_slice().expect("standard layout");
                for (i, &len) in lens.iter().enumerate() {
                    for p in 0..len {
                        let row = &flat[(i * s + p) * k..(i * s + p + 1) * k];
                        let (off, c) = if r.per_position { (p * k, p) } else { (0, 0) };
                        for (acc_v, &v) in acc.sum[off..off + k].iter_mut().zip(row) {
                            *acc_v += v as f64;
                        }
                        acc.count[c] += 1;
                    }
                }
            }
        }
        for (r, acc) in reqs.iter().zip(accs) {
            let acc = acc.ok_or_else(|| Error::Data {
                dataset: name.to_string(),
                msg: "a mean over no sequences".into(),
            })?;
            let k: usize = acc.rest.iter().product();
            let mut shape = acc.rest.clone();
            if r.per_position {
                shape.insert(0, s);
            }
            let vals: Vec<f32> = acc
                .sum
                .iter()
                .enumerate()
                .map(|(j, &v)| {
                    let c = if r.per_position {
                        acc.count[j / k]
                    } else {
                        acc.count[0]
                    };
                    if c == 0 {
                        0.0
                    } else {
                        (v / c as f64) as f32
                    }
                })
                .collect();
            let mean = ArrayD::from_shape_vec(IxDyn(&shape), vals).expect("sized above");
            means.map.insert((*r).clone(), mean);
        }
    }
    Ok(means)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lens_stop_at_the_first_bos_after_position_zero() {
        let t = ndarray::array![[9, 1, 2, 9, 9], [9, 1, 2, 3, 4]];
        assert_eq!(seq_lens(t.view(), 9), vec![3, 5]);
    }
}
