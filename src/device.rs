//! Choosing where the model runs: CPU, or CUDA when built with the `cuda` feature.
//!
//! Owns: the `cpu | cuda | auto` choice, the message saying what was picked, and the one
//! place that starts a device ([`with_device`]): the runner, `runner prompt` and `runner
//! cache` write their work once, generic over the device ([`OnDevice`]). Must not: know what
//! the work is.

use dfdx::prelude::Cpu;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::seam::SeamDevice;

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    Cpu,
    Cuda,
    #[default]
    Auto,
}

/// What the run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Cpu => "cpu",
            DeviceKind::Cuda => "cuda",
        })
    }
}

/// Whether this build can use CUDA and a GPU is visible.
pub fn cuda_available() -> bool {
    #[cfg(feature = "cuda")]
    {
        std::panic::catch_unwind(|| dfdx::tensor::Cuda::try_build(0, 0).is_ok()).unwrap_or(false)
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

impl DeviceChoice {
    /// Resolves `auto`; asking for CUDA in a build without it is an error, not a panic.
    pub fn resolve(self) -> Result<DeviceKind> {
        match self {
            DeviceChoice::Cpu => Ok(DeviceKind::Cpu),
            DeviceChoice::Cuda => {
                if !cfg!(feature = "cuda") {
                    Err(Error::Device(
                        "this runner was built without CUDA; rebuild with `cargo build --release --features cuda`".into(),
                    ))
                } else if !cuda_available() {
                    Err(Error::Device(
                        "built with CUDA, but no GPU is visible".into(),
                    ))
                } else {
                    Ok(DeviceKind::Cuda)
                }
            }
            DeviceChoice::Auto => Ok(if cuda_available() {
                DeviceKind::Cuda
            } else {
                DeviceKind::Cpu
            }),
        }
    }
}

/// Work written once for every device: `with_device` picks the device, `run` is generic over
/// it (a closure cannot be generic, hence a trait).
pub trait OnDevice {
    type Output;
    fn run<D: SeamDevice>(self, dev: D) -> Result<Self::Output>;
}

/// Starts the device `kind` names and runs `work` on it.
pub fn with_device<W: OnDevice>(kind: DeviceKind, work: W) -> Result<W::Output> {
    match kind {
        DeviceKind::Cpu => work.run(Cpu::default()),
        DeviceKind::Cuda => {
            #[cfg(feature = "cuda")]
            {
                // GPU 0; the seed (second argument) is unused: nothing on the device is random.
                let dev = dfdx::tensor::Cuda::try_build(0, 0)
                    .map_err(|e| Error::Device(format!("could not start CUDA: {e:?}")))?;
                work.run(dev)
            }
            #[cfg(not(feature = "cuda"))]
            {
                // `DeviceChoice::resolve` never picks CUDA in a build without it.
                let _ = work;
                Err(Error::Device("this runner was built without CUDA".into()))
            }
        }
    }
}
