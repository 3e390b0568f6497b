//! Hook points: TransformerLens's names, which ones to cache, and hooks that rewrite them.
//!
//! Owns: the catalogue of hook point names for a model ([`hook_point_names`]), the filter
//! that decides which points a forward pass keeps ([`HookFilter`], TL's `names_filter`), the
//! [`ActivationCache`] those points land in, and write hooks that replace an activation in
//! flight. Must not: compute anything about the model; the forward pass calls
//! [`Hooks::visit_slice`] at each named point on host buffers (the CPU's kernels, in place),
//! or keeps a device tensor with [`ActivationCache::insert_device`] (the dfdx path), and this
//! module decides what happens there.
//!
//! On the host a cached point costs one copy into the cache; on a device it costs nothing (the
//! cache shares the tensor's buffer) and the metrics' ops run there
//! ([`ActivationCache::run`]); an activation crosses to the host only for a write hook or a
//! host reader (a plugin, `runner cache`), once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use globset::{Glob, GlobSet, GlobSetBuilder};
use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};
use crate::seam::{self, DeviceParams, DeviceStore, DeviceTensor, Op, SeamDevice};

/// Per-layer hook points, in forward order, relative to `blocks.L.`.
pub const BLOCK_HOOKS: &[&str] = &[
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "attn.hook_result",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
];

/// The logits are exposed like a hook point so `runner cache` and metrics can ask for them.
pub const LOGITS: &str = "logits";

/// Every hook point of an `n_layers` model, in forward order, plus `logits`.
pub fn hook_point_names(n_layers: usize) -> Vec<String> {
    let mut names = vec!["hook_embed".to_string(), "hook_pos_embed".to_string()];
    for l in 0..n_layers {
        names.extend(BLOCK_HOOKS.iter().map(|h| format!("blocks.{l}.{h}")));
    }
    names.push("ln_final.hook_scale".into());
    names.push("ln_final.hook_normalized".into());
    names.push(LOGITS.into());
    names
}

/// The TL name of a per-layer hook point, e.g. `block_hook(3, "attn.hook_v")`.
pub fn block_hook(layer: usize, hook: &str) -> String {
    format!("blocks.{layer}.{hook}")
}

/// Which hook points a forward pass caches: exact names and/or glob patterns.
#[derive(Debug, Clone, Default)]
pub struct HookFilter {
    exact: BTreeSet<String>,
    globs: Option<GlobSet>,
}

impl HookFilter {
    /// Caches nothing.
    pub fn none() -> Self {
        Self::default()
    }

    /// Caches exactly these names (not checked against the model; see [`Self::checked`]).
    pub fn names<I: IntoIterator<Item = S>, S: Into<String>>(names: I) -> Self {
        HookFilter {
            exact: names.into_iter().map(Into::into).collect(),
            globs: None,
        }
    }

    /// Builds a filter from names or globs (`blocks.*.attn.hook_pattern`), each of which
    /// must match at least one hook point of an `n_layers` model.
    pub fn checked(patterns: &[String], n_layers: usize) -> Result<Self> {
        let all = hook_point_names(n_layers);
        let mut exact = BTreeSet::new();
        let mut builder = GlobSetBuilder::new();
        let mut any_glob = false;
        for p in patterns {
            if p.contains(['*', '?', '[', '{']) {
                let glob = Glob::new(p).map_err(|e| Error::Hook {
                    name: p.clone(),
                    msg: format!("bad glob: {e}"),
                })?;
                let m = glob.compile_matcher();
                if !all.iter().any(|n| m.is_match(n)) {
                    return Err(Error::Hook {
                        name: p.clone(),
                        msg: "matches no hook point (see `runner list`)".into(),
                    });
                }
                builder.add(glob);
                any_glob = true;
            } else if all.iter().any(|n| n == p) {
                exact.insert(p.clone());
            } else {
                return Err(Error::Hook {
                    name: p.clone(),
                    msg: format!(
                        "no such hook point on a {n_layers}-layer model (see `runner list`)"
                    ),
                });
            }
        }
        let globs = if any_glob {
            Some(builder.build().map_err(|e| Error::Other(e.to_string()))?)
        } else {
            None
        };
        Ok(HookFilter { exact, globs })
    }

    /// Whether the point `name` is kept.
    pub fn wants(&self, name: &str) -> bool {
        self.exact.contains(name) || self.globs.as_ref().is_some_and(|g| g.is_match(name))
    }

    /// Adds the names of another filter (the union the hook graph needs).
    pub fn extend<I: IntoIterator<Item = String>>(&mut self, names: I) {
        self.exact.extend(names);
    }
}

/// Activations kept by a forward pass, by TL hook name, in TransformerLens's shapes (e.g.
/// `hook_pattern` is `[batch, head, query, key]`): host `f32` arrays when the pass ran on
/// host kernels, device tensors ([`DeviceStore`]) when it ran as dfdx tensor ops. Readers
/// on the host ([`Self::get`]) work either way (a device activation is copied once, on
/// first use); the built-in metrics run their math where the activations are ([`Self::run`]).
#[derive(Default)]
pub struct ActivationCache {
    map: BTreeMap<String, ArrayD<f32>>,
    device: Option<DeviceStore>,
}

impl std::fmt::Debug for ActivationCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivationCache")
            .field("names", &self.names())
            .field("on_device", &self.device.is_some())
            .finish()
    }
}

impl ActivationCache {
    /// The activation at `name` on the host, or an error naming the missing point.
    pub fn get(&self, name: &str) -> Result<&ArrayD<f32>> {
        if let Some(a) = self.map.get(name) {
            return Ok(a);
        }
        match &self.device {
            Some(d) if d.contains(name) => d.host(name),
            _ => Err(seam::missing(name)),
        }
    }

    /// Runs `op` where the activations are: its host body on host buffers, its device body
    /// on a device's (see [`crate::seam::Op`]).
    pub fn run<O: Op + ?Sized>(&self, op: &O) -> Result<O::Output> {
        match &self.device {
            Some(d) => d.run(op),
            None => op.host(),
        }
    }

    pub fn insert(&mut self, name: String, value: ArrayD<f32>) {
        self.map.insert(name, value);
    }

    /// Keeps a device tensor under `name` (no copy: the buffer is shared).
    pub fn insert_device<D: SeamDevice>(
        &mut self,
        dev: &D,
        params: &Arc<DeviceParams<D>>,
        name: String,
        value: DeviceTensor<D>,
    ) {
        D::acts(&mut self.device, dev, params).insert(name, value);
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name) || self.device.as_ref().is_some_and(|d| d.contains(name))
    }

    /// The names cached, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut out: Vec<String> = self.map.keys().cloned().collect();
        if let Some(d) = &self.device {
            out.extend(d.names());
        }
        out.sort();
        out.dedup();
        out
    }

    /// Names and host activations, sorted by name (device activations are copied).
    pub fn iter(&self) -> impl Iterator<Item = (String, &ArrayD<f32>)> {
        self.names().into_iter().map(move |n| {
            let a = self.get(&n).expect("listed by names()");
            (n, a)
        })
    }

    /// The activations on device `D`, when this cache holds them there: an op's device
    /// body reads a second cache (a patch's source run) through this. `None` for a host
    /// cache or another device's.
    pub fn device_acts<D: dfdx::tensor_ops::Device<f32> + 'static>(
        &self,
    ) -> Option<&seam::DeviceActs<D>> {
        self.device.as_ref().and_then(DeviceStore::acts_as::<D>)
    }

    /// Whether the activations are on a device (the pass ran as dfdx tensor ops).
    pub fn on_device(&self) -> bool {
        self.device.is_some()
    }

    /// How many device activations were copied to the host (0 for a host cache).
    pub fn downloads(&self) -> usize {
        self.device.as_ref().map_or(0, DeviceStore::downloads)
    }

    pub fn len(&self) -> usize {
        self.names().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A hook that rewrites an activation in place (TL's hook function returning a new value).
pub type WriteHook = Box<dyn FnMut(&mut ArrayD<f32>) + Send>;

/// What the forward pass does at each hook point: cache it, rewrite it, or nothing.
#[derive(Default)]
pub struct Hooks {
    filter: HookFilter,
    writers: BTreeMap<String, WriteHook>,
    /// Activations kept during the last pass.
    pub cache: ActivationCache,
}

impl Hooks {
    /// Caches the points `filter` selects.
    pub fn caching(filter: HookFilter) -> Self {
        Hooks {
            filter,
            ..Default::default()
        }
    }

    /// Registers a hook that replaces the activation at `name` (it must keep the shape).
    pub fn add_writer(&mut self, name: impl Into<String>, hook: WriteHook) {
        self.writers.insert(name.into(), hook);
    }

    /// Whether the point `name` needs to leave the device (cached or written).
    pub fn touches(&self, name: &str) -> bool {
        self.filter.wants(name) || self.writers.contains_key(name)
    }

    /// Whether the point `name` is cached.
    pub fn wants(&self, name: &str) -> bool {
        self.filter.wants(name)
    }

    /// Whether a write hook is registered at `name`.
    pub fn writes(&self, name: &str) -> bool {
        self.writers.contains_key(name)
    }

    /// Runs the hook point `name` on a host copy of an activation; returns the (possibly
    /// rewritten) value when a writer changed it. The value moves into the cache when only
    /// cached (no second copy).
    pub fn visit(&mut self, name: &str, mut value: ArrayD<f32>) -> Result<Option<ArrayD<f32>>> {
        if !self.writers.contains_key(name) {
            if self.filter.wants(name) {
                self.cache.insert(name.to_string(), value);
            }
            return Ok(None);
        }
        self.rewrite(name, &mut value)?;
        if self.filter.wants(name) {
            self.cache.insert(name.to_string(), value.clone());
        }
        Ok(Some(value))
    }

    /// Runs the hook point `name` on an activation held in a host buffer of `shape`
    /// (row-major), in place: a writer rewrites `data`, and the cache gets one copy.
    pub fn visit_slice(&mut self, name: &str, shape: &[usize], data: &mut [f32]) -> Result<()> {
        debug_assert_eq!(shape.iter().product::<usize>(), data.len());
        let wants = self.filter.wants(name);
        if !self.writers.contains_key(name) {
            if wants {
                let a = ArrayD::from_shape_vec(IxDyn(shape), data.to_vec())
                    .expect("shape matches the buffer");
                self.cache.insert(name.to_string(), a);
            }
            return Ok(());
        }
        let mut a =
            ArrayD::from_shape_vec(IxDyn(shape), data.to_vec()).expect("shape matches the buffer");
        self.rewrite(name, &mut a)?;
        for (d, v) in data.iter_mut().zip(a.iter()) {
            *d = *v;
        }
        if wants {
            self.cache.insert(name.to_string(), a);
        }
        Ok(())
    }

    /// Applies the writer at `name` (which must keep the shape) to a host copy: the
    /// device path's write hooks (a device activation comes to the host only to be written).
    pub fn rewrite(&mut self, name: &str, value: &mut ArrayD<f32>) -> Result<()> {
        let w = self.writers.get_mut(name).expect("checked by the caller");
        let shape = value.shape().to_vec();
        w(value);
        if value.shape() != shape.as_slice() {
            return Err(Error::Hook {
                name: name.to_string(),
                msg: format!(
                    "write hook changed the shape from {shape:?} to {:?}",
                    value.shape()
                ),
            });
        }
        Ok(())
    }

    /// Takes the cache out, leaving an empty one for the next pass.
    pub fn take_cache(&mut self) -> ActivationCache {
        std::mem::take(&mut self.cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_has_tl_names() {
        let names = hook_point_names(2);
        assert!(names.contains(&"blocks.1.attn.hook_pattern".to_string()));
        assert!(names.contains(&"ln_final.hook_scale".to_string()));
        assert_eq!(names.len(), 2 + 2 * BLOCK_HOOKS.len() + 3);
    }

    #[test]
    fn filter_takes_globs_and_rejects_unknown_names() {
        let f = HookFilter::checked(&["blocks.*.attn.hook_v".into(), "logits".into()], 3).unwrap();
        assert!(f.wants("blocks.2.attn.hook_v"));
        assert!(f.wants("logits"));
        assert!(!f.wants("blocks.2.attn.hook_q"));
        let err = HookFilter::checked(&["blocks.3.attn.hook_v".into()], 3).unwrap_err();
        assert!(err.to_string().contains("no such hook point"), "{err}");
        assert!(HookFilter::checked(&["blocks.*.nope".into()], 3).is_err());
    }

    #[test]
    fn writer_rewrites_and_cache_sees_the_new_value() {
        let mut hooks = Hooks::caching(HookFilter::names(["x"]));
        hooks.add_writer("x", Box::new(|a: &mut ArrayD<f32>| a.fill(2.0)));
        let out = hooks
            .visit("x", ArrayD::zeros(vec![2, 2]))
            .unwrap()
            .unwrap();
        assert_eq!(out.sum(), 8.0);
        assert_eq!(hooks.cache.get("x").unwrap().sum(), 8.0);
        let mut bad = Hooks::default();
        bad.add_writer(
            "y",
            Box::new(|a: &mut ArrayD<f32>| *a = ArrayD::zeros(vec![3])),
        );
        assert!(bad.visit("y", ArrayD::zeros(vec![2])).is_err());
    }
}
