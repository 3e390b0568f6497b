//! Datasets: token batches built from a spec's `[[dataset]]` tables.
//!
//! Owns: turning a [`DatasetSpec`] into a [`Dataset`] of right-padded token ids, for each kind:
//! `ioi` (generated in-process, [`ioi`]), `text` (a local corpus, [`text`]), `tokens` (a JSON
//! file of ids) and `prompts` (inline texts). Must not: run the model or know about metrics.

pub mod ioi;
pub mod text;

use std::path::Path;

use ndarray::Array2;

use crate::error::{Error, Result};
use crate::model::ModelConfig;
use crate::spec::DatasetSpec;
use crate::tokenizer::GptTokenizer;

pub use ioi::IoiPrompt;

/// A dataset ready to run: `[n_sequences, seq_len]` token ids, right-padded with BOS.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub name: String,
    pub tokens: Array2<u32>,
    /// Each sequence's length without right padding.
    pub lengths: Vec<usize>,
    /// For `ioi`: the positions and answer of each prompt.
    pub ioi: Option<Vec<IoiPrompt>>,
}

impl Dataset {
    pub fn n_sequences(&self) -> usize {
        self.tokens.nrows()
    }
    pub fn seq_len(&self) -> usize {
        self.tokens.ncols()
    }
    /// Whether position `pos` of sequence `seq` is right padding.
    pub fn is_pad(&self, seq: usize, pos: usize) -> bool {
        pos >= self.lengths[seq]
    }
}

/// What building a dataset may need from the run.
pub struct DataContext<'a> {
    pub tokenizer: Option<&'a GptTokenizer>,
    pub cfg: &'a ModelConfig,
    /// The spec's directory: relative dataset paths resolve against it.
    pub spec_dir: &'a Path,
}

impl DataContext<'_> {
    /// The tokenizer, or an error naming the dataset that needs one.
    pub fn tokenizer(&self, dataset: &str) -> Result<&GptTokenizer> {
        self.tokenizer.ok_or_else(|| Error::Data {
            dataset: dataset.to_string(),
            msg: "this dataset needs a tokenizer, and the model has none (add tokenizer files or set `tokenizer` under [model])".into(),
        })
    }
}

/// Lengths without right padding: everything after the last non-pad token (position 0, the
/// BOS, always counts).
pub fn unpadded_lengths(tokens: &Array2<u32>, pad: u32) -> Vec<usize> {
    tokens
        .rows()
        .into_iter()
        .map(|r| {
            r.iter()
                .rposition(|&t| t != pad)
                .map_or(1, |p| p + 1)
                .max(1)
        })
        .collect()
}

/// Builds one dataset.
pub fn build(spec: &DatasetSpec, ctx: &DataContext) -> Result<Dataset> {
    let _ = (spec, ctx);
    todo!("data::build")
}
