//! The tensor seam under the model and the metrics: where activations live, and how work
//! on them is written once for every device.
//!
//! Owns: [`SeamDevice`] (what a dfdx device brings to a run: whether its forward pass runs
//! on host kernels, and where its cached activations are kept), [`DeviceActs`] (a batch's
//! cached activations left on the device, with the weights the metrics read there), and
//! [`Op`], candle's `CustomOp` split: one op, a `host` body on host buffers (the CPU
//! backend, in place, no copies) and a `device` body in dfdx tensor ops (CUDA's, and dfdx's
//! CPU in the tests that check it against the goldens). A metric builds the op and hands it
//! to the cache ([`crate::hooks::ActivationCache::run`]); the cache picks the body, so no
//! metric and nothing above asks which device it runs on. Must not: know hook names,
//! metrics or layers.
//!
//! Only an op's result crosses to the host: on a device the per-head, per-sequence values
//! come back and the activations stay where the forward pass left them. A host reader (a
//! plugin, `runner cache`, the pictures) asking for a device activation gets a copy made
//! on first use and counted ([`DeviceActs::downloads`]), so the tests can show the built-in
//! metrics never make one.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use dfdx::prelude::*;
use ndarray::{ArrayD, IxDyn};

use crate::error::{Error, Result};

/// A device tensor of any rank: dfdx shapes are static tuples, so the cache keeps the flat
/// buffer and TransformerLens's shape, and an op reshapes (free on a contiguous buffer).
#[derive(Clone)]
pub struct DeviceTensor<D: Device<f32>> {
    pub data: Tensor<(usize,), f32, D>,
    pub shape: Vec<usize>,
}

impl<D: Device<f32>> DeviceTensor<D> {
    /// Keeps `t` under `shape` (same number of elements): TL shows a LayerNorm scale
    /// `[B, S]` as `[B, S, 1]`.
    pub fn with_shape<S: Shape>(t: &Tensor<S, f32, D>, shape: Vec<usize>) -> Self {
        let n = t.shape().num_elements();
        assert_eq!(
            n,
            shape.iter().product::<usize>(),
            "same number of elements"
        );
        DeviceTensor {
            data: t.clone().reshape_like(&(n,)),
            shape,
        }
    }

    /// The tensor as rank `S` (e.g. `(usize, usize, usize, usize)` for `hook_v`); an error
    /// when the ranks or sizes disagree.
    pub fn as_shape<S: Shape>(&self, name: &str, shape: S) -> Result<Tensor<S, f32, D>> {
        let want: Vec<usize> = shape.concrete().into_iter().collect();
        if want != self.shape {
            return Err(Error::Hook {
                name: name.to_string(),
                msg: format!("shape {:?}, expected {want:?}", self.shape),
            });
        }
        Ok(self.data.clone().reshape_like(&shape))
    }

    fn host(&self) -> ArrayD<f32> {
        ArrayD::from_shape_vec(IxDyn(&self.shape), self.data.as_vec())
            .expect("the buffer holds shape.product() values")
    }
}

/// The processed weights the built-in metrics read on the device, shared with the model
/// (the tensors' buffers are reference-counted: attaching them to a cache copies nothing).
#[derive(Clone)]
pub struct DeviceParams<D: Device<f32>> {
    /// `unembed.W_U` `[d_model, d_vocab]`.
    pub w_u: Tensor<(usize, usize), f32, D>,
    /// `W_U` transposed, `[d_vocab, d_model]`: a token's unembedding is a row to gather.
    pub w_u_rows: Tensor<(usize, usize), f32, D>,
    /// `blocks.L.attn.W_O` `[n_heads, d_head, d_model]`, by layer.
    pub w_o: Vec<Tensor<(usize, usize, usize), f32, D>>,
}

struct Entry<D: Device<f32>> {
    tensor: DeviceTensor<D>,
    /// The host copy, made when a host reader first asks.
    host: OnceLock<ArrayD<f32>>,
}

/// One batch's cached activations on device `D`, by hook name, and the weights ops read.
pub struct DeviceActs<D: Device<f32>> {
    dev: D,
    entries: BTreeMap<String, Entry<D>>,
    params: Arc<DeviceParams<D>>,
    downloads: AtomicUsize,
}

impl<D: Device<f32>> DeviceActs<D> {
    pub fn new(dev: D, params: Arc<DeviceParams<D>>) -> Self {
        DeviceActs {
            dev,
            entries: BTreeMap::new(),
            params,
            downloads: AtomicUsize::new(0),
        }
    }

    pub fn device(&self) -> &D {
        &self.dev
    }

    pub fn params(&self) -> &DeviceParams<D> {
        &self.params
    }

    pub fn insert(&mut self, name: String, tensor: DeviceTensor<D>) {
        self.entries.insert(
            name,
            Entry {
                tensor,
                host: OnceLock::new(),
            },
        );
    }

    /// The activation `name` as a device tensor.
    pub fn get(&self, name: &str) -> Result<&DeviceTensor<D>> {
        self.entries
            .get(name)
            .map(|e| &e.tensor)
            .ok_or_else(|| missing(name))
    }

    /// A host copy of `name`, made once (and counted) on first use.
    pub fn host(&self, name: &str) -> Result<&ArrayD<f32>> {
        let e = self.entries.get(name).ok_or_else(|| missing(name))?;
        Ok(e.host.get_or_init(|| {
            self.downloads.fetch_add(1, Ordering::Relaxed);
            e.tensor.host()
        }))
    }

    /// The names cached, sorted.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// How many activations were copied to the host so far.
    pub fn downloads(&self) -> usize {
        self.downloads.load(Ordering::Relaxed)
    }
}

/// The error for an activation that was not cached.
pub fn missing(name: &str) -> Error {
    Error::Hook {
        name: name.to_string(),
        msg: "not in the cache (was it requested?)".into(),
    }
}

/// Activations kept on a device, one variant per device this build has: the dispatch an op
/// goes through (candle's `Storage` enum). Built only through [`SeamDevice::acts`].
pub enum DeviceStore {
    /// dfdx's CPU device: the device-generic path run on the CPU (the tests).
    Cpu(DeviceActs<Cpu>),
    #[cfg(feature = "cuda")]
    Cuda(DeviceActs<dfdx::tensor::Cuda>),
}

impl DeviceStore {
    /// Runs `op`'s device body on the activations, whichever device holds them.
    pub fn run<O: Op + ?Sized>(&self, op: &O) -> Result<O::Output> {
        match self {
            DeviceStore::Cpu(a) => op.device(a),
            #[cfg(feature = "cuda")]
            DeviceStore::Cuda(a) => op.device(a),
        }
    }

    /// The activations as device `D`'s (`None` when they are another device's): dfdx
    /// shapes the device into the type, so the match is a type test.
    pub fn acts_as<D: Device<f32> + 'static>(&self) -> Option<&DeviceActs<D>> {
        #[allow(clippy::infallible_destructuring_match)] // one arm per device this build has
        let any: &dyn std::any::Any = match self {
            DeviceStore::Cpu(a) => a,
            #[cfg(feature = "cuda")]
            DeviceStore::Cuda(a) => a,
        };
        any.downcast_ref::<DeviceActs<D>>()
    }

    pub fn host(&self, name: &str) -> Result<&ArrayD<f32>> {
        match self {
            DeviceStore::Cpu(a) => a.host(name),
            #[cfg(feature = "cuda")]
            DeviceStore::Cuda(a) => a.host(name),
        }
    }

    pub fn names(&self) -> Vec<String> {
        match self {
            DeviceStore::Cpu(a) => a.names().cloned().collect(),
            #[cfg(feature = "cuda")]
            DeviceStore::Cuda(a) => a.names().cloned().collect(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match self {
            DeviceStore::Cpu(a) => a.contains(name),
            #[cfg(feature = "cuda")]
            DeviceStore::Cuda(a) => a.contains(name),
        }
    }

    pub fn downloads(&self) -> usize {
        match self {
            DeviceStore::Cpu(a) => a.downloads(),
            #[cfg(feature = "cuda")]
            DeviceStore::Cuda(a) => a.downloads(),
        }
    }
}

/// What a dfdx device brings to a run. Implemented for `Cpu` and (with the `cuda` feature)
/// `Cuda`; everything generic over the device (the model, the engine, the runner) is generic
/// over this, so the choice is made by the type, once, never by a runtime check.
pub trait SeamDevice: Device<f32> + 'static {
    /// Whether [`crate::model::HookedGpt2::new`] runs the forward pass on host kernels
    /// (`model::host`, the CPU's fast path) rather than as dfdx tensor ops.
    const HOST_KERNELS: bool;

    /// The activations this device keeps in `store`, made empty (for this device, with
    /// these weights) when `store` holds none or another device's.
    fn acts<'s>(
        store: &'s mut Option<DeviceStore>,
        dev: &Self,
        params: &Arc<DeviceParams<Self>>,
    ) -> &'s mut DeviceActs<Self>;
}

/// `SeamDevice` for a dfdx device type whose activations live in `DeviceStore::$variant`.
macro_rules! seam_device {
    ($dev:ty, $variant:ident, host_kernels = $host:expr) => {
        impl SeamDevice for $dev {
            const HOST_KERNELS: bool = $host;

            fn acts<'s>(
                store: &'s mut Option<DeviceStore>,
                dev: &Self,
                params: &Arc<DeviceParams<Self>>,
            ) -> &'s mut DeviceActs<Self> {
                // A store of another device, or of another model's weights, is replaced.
                let fresh = !matches!(
                    store,
                    Some(DeviceStore::$variant(a)) if Arc::ptr_eq(&a.params, params)
                );
                if fresh {
                    *store = Some(DeviceStore::$variant(DeviceActs::new(
                        dev.clone(),
                        params.clone(),
                    )));
                }
                match store {
                    Some(DeviceStore::$variant(a)) => a,
                    _ => unreachable!("just made"),
                }
            }
        }
    };
}

// The CPU runs its forward on host kernels; dfdx's `Cpu` tensors (and this store) serve the
// device-generic path the tests check.
seam_device!(Cpu, Cpu, host_kernels = true);
#[cfg(feature = "cuda")]
seam_device!(dfdx::tensor::Cuda, Cuda, host_kernels = false);

/// Work on a batch's cached activations, written once with a body per backend (candle's
/// `CustomOp`: `cpu_fwd` / `cuda_fwd`). The caller never picks one:
/// [`crate::hooks::ActivationCache::run`] runs `host` when the activations are host
/// buffers and `device` when they are on a device.
pub trait Op {
    /// What comes back to the host: per-head, per-sequence values, never activations. (An
    /// intervention's write is the one op whose output stays where it was made: the written
    /// residual stream, which the resumed pass takes on the same device.)
    type Output;
    /// The CPU backend: host buffers, read in place through the batch's cache.
    fn host(&self) -> Result<Self::Output>;
    /// The device backend, as dfdx tensor ops where the activations are.
    fn device<D: Device<f32> + 'static>(&self, acts: &DeviceActs<D>) -> Result<Self::Output>;
}
