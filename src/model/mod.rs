//! GPT-2: configuration, checkpoint loading, weight processing and the hooked forward pass.
//!
//! Owns: everything from a checkpoint on disk to a [`HookedGpt2`] on a device. The
//! submodules follow the data: [`config`] reads `config.json`, [`hub`] finds the files,
//! [`checkpoint`] maps HF tensors to TransformerLens's layout, [`process`] applies TL's weight
//! processing, `pass` writes the forward pass once as steps,
//! `host` (the CPU's kernels) and [`gpt2`] (dfdx tensor ops, [`ops`]) give each step a body,
//! and [`HookedGpt2`] picks one by the device's type ([`crate::seam::SeamDevice`]).
//! Must not: know about experiments, datasets or metrics.

pub mod checkpoint;
pub mod config;
pub mod gpt2;
mod host;
pub mod hub;
pub mod ops;
mod pass;
pub mod process;

use std::path::{Path, PathBuf};

pub use checkpoint::{CheckpointFiles, Params};
pub use config::ModelConfig;
pub use gpt2::{HookedGpt2, Passes, Resid};
pub use pass::ResumeAt;
// The loss is a metric helper (it lives with the others); re-exported for existing callers.
pub use crate::metrics::ops::per_token_loss;
pub use process::Processing;

use crate::error::Result;
use crate::seam::SeamDevice;
use crate::tokenizer::GptTokenizer;

/// Where a model comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelSource {
    /// A checkpoint directory in HuggingFace layout.
    Path(PathBuf),
    /// A hub id (`gpt2`, `gpt2-medium`, ...), found in or downloaded to the HF cache.
    Hub(String),
}

impl ModelSource {
    /// A path if `s` names an existing directory or looks like a path, else a hub id.
    /// Hub ids are `name` or `owner/name`, so anything with two or more separators, or
    /// starting with `.`, `/` or `~`, is a path even when it does not exist: a mistyped
    /// directory must say "not found", not go looking on (or downloading from) the hub.
    pub fn parse(s: &str) -> Self {
        let p = Path::new(s);
        let looks_like_path = s.starts_with(['.', '/', '~'])
            || s.matches(['/', std::path::MAIN_SEPARATOR]).count() >= 2;
        if p.is_dir() || looks_like_path {
            ModelSource::Path(p.to_path_buf())
        } else {
            ModelSource::Hub(s.to_string())
        }
    }

    /// The checkpoint files, downloading into the HF cache if needed.
    pub fn resolve(&self) -> Result<CheckpointFiles> {
        match self {
            ModelSource::Path(p) => CheckpointFiles::in_dir(p),
            ModelSource::Hub(name) => hub::resolve_hub(name),
        }
    }
}

/// A loaded model: the device copy for forward passes, the processed host parameters that
/// metrics read (W_O, W_U, ...), and the tokenizer when the checkpoint has one.
pub struct LoadedModel<D: SeamDevice> {
    pub model: HookedGpt2<D>,
    pub params: Params,
    pub tokenizer: Option<GptTokenizer>,
    pub files: CheckpointFiles,
    pub processing: Processing,
}

impl<D: SeamDevice> LoadedModel<D> {
    pub fn cfg(&self) -> &ModelConfig {
        &self.model.cfg
    }

    /// The tokenizer, or an error saying where one was expected.
    pub fn tokenizer(&self) -> Result<&GptTokenizer> {
        self.tokenizer.as_ref().ok_or_else(|| {
            crate::error::Error::Tokenizer(format!(
                "{}: no tokenizer.json, nor vocab.json + merges.txt (set `tokenizer = \"DIR\"` under [model])",
                self.files.dir.display()
            ))
        })
    }
}

/// Loads config, weights (processed as asked) and tokenizer, and uploads to `dev`.
/// `tokenizer_dir` overrides where the tokenizer files are looked for.
pub fn load<D: SeamDevice>(
    dev: D,
    files: CheckpointFiles,
    processing: Processing,
    tokenizer_dir: Option<&Path>,
) -> Result<LoadedModel<D>> {
    let cfg = ModelConfig::from_file(&files.config)?;
    let mut params = checkpoint::load_params(&files.weights, &cfg)?;
    process::process(&mut params, processing);
    let model = HookedGpt2::new(dev, cfg, &params)?;
    let tok_dir = tokenizer_dir.unwrap_or(&files.dir);
    let tokenizer = if tokenizer_dir.is_some() || GptTokenizer::present_in(tok_dir) {
        Some(GptTokenizer::from_dir(tok_dir)?)
    } else {
        None
    };
    Ok(LoadedModel {
        model,
        params,
        tokenizer,
        files,
        processing,
    })
}
