//! A test harness for plugin authors: run a plugin (or a built-in, to compare) on a small
//! checkpoint and get its tables back, in a few lines, as the runner would compute them.
//!
//! Owns: [`Harness`] (a loaded checkpoint, a dataset made from texts or token ids, the
//! selected heads and the batch size) and [`Tables`] (a run's tables by name). Must not:
//! write files, or differ from a run: it uses the runner's own loading, processing,
//! `RunContext` and batch loop ([`crate::engine::run_metric`]), so a table here is the
//! table `runner run` writes for the same dataset (less the `dataset` column).
//!
//! ```no_run
//! use hookgraph::plugin::testing::Harness;
//! let h = Harness::tiny().unwrap().texts(&["Hello world", "The cat sat"]).unwrap();
//! let tables = h.run_plugin("target/debug/libhg_attention_entropy.so", "").unwrap();
//! let entropy = tables.get("attention_entropy").unwrap();
//! assert_eq!(entropy.rows.len(), 2 * 4);
//! ```

use std::path::{Path, PathBuf};

use dfdx::prelude::Cpu;

use crate::data::{unpadded_lengths, Dataset};
use crate::error::{Error, Result};
use crate::metrics::{Metric, RunContext};
use crate::model::{self, CheckpointFiles, LoadedModel, Processing};
use crate::output::Table;

/// A checkpoint and a dataset to run metrics on (CPU, TransformerLens's processing).
pub struct Harness {
    model: LoadedModel<Cpu>,
    heads: Vec<(usize, usize)>,
    dataset: Dataset,
    batch_size: usize,
}

/// The tables of one run, in the order the metric returned them.
#[derive(Debug, Clone)]
pub struct Tables(pub Vec<Table>);

impl Tables {
    /// The table named `name` (its file stem).
    pub fn get(&self, name: &str) -> Result<&Table> {
        self.0
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::Metric {
                metric: name.to_string(),
                msg: format!(
                    "no table '{name}' (tables: {})",
                    self.0
                        .iter()
                        .map(|t| t.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
    }
}

impl Harness {
    /// The repository's tiny GPT-2 (`experiments/checkpoints/tiny-gpt2`: 2 layers, 4 heads,
    /// GPT-2's tokenizer), every head selected, with a two-sequence default dataset.
    pub fn tiny() -> Result<Self> {
        Self::new(&Self::tiny_dir())?.texts(&[
            "When Mary and John went to the store, John gave a drink to",
            "The quick brown fox jumps over the lazy dog",
        ])
    }

    /// Where [`Harness::tiny`]'s checkpoint lives.
    pub fn tiny_dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("experiments/checkpoints/tiny-gpt2")
    }

    /// A checkpoint directory (config, weights, tokenizer if any), every head selected,
    /// batches of 2, and an empty dataset until [`Harness::texts`] or [`Harness::tokens`].
    pub fn new(checkpoint: &Path) -> Result<Self> {
        let files = CheckpointFiles::in_dir(checkpoint)?;
        let model = model::load(Cpu::default(), files, Processing::ALL, None)?;
        let cfg = model.cfg();
        let heads = (0..cfg.n_layers)
            .flat_map(|l| (0..cfg.n_heads).map(move |h| (l, h)))
            .collect();
        let dataset = Dataset {
            name: "test".into(),
            tokens: ndarray::Array2::zeros((0, 0)),
            lengths: Vec::new(),
            ioi: None,
            answers: None,
        };
        Ok(Harness {
            model,
            heads,
            dataset,
            batch_size: 2,
        })
    }

    /// The dataset: `texts` encoded with the checkpoint's tokenizer, BOS first, right-padded
    /// with BOS (TransformerLens's `to_tokens`).
    pub fn texts(self, texts: &[&str]) -> Result<Self> {
        let tok = self.model.tokenizer()?;
        let encoded = texts
            .iter()
            .map(|t| tok.encode(t))
            .collect::<Result<Vec<_>>>()?;
        let bos = self.model.cfg().bos_token_id;
        let max = self.model.cfg().n_ctx;
        Ok(self.tokens(crate::tokenizer::batch_tokens(
            &encoded,
            Some(bos),
            bos,
            max,
        )))
    }

    /// The dataset as token ids `[sequences, seq_len]` (BOS-padded on the right).
    pub fn tokens(mut self, tokens: ndarray::Array2<u32>) -> Self {
        self.dataset.lengths = unpadded_lengths(&tokens, self.model.cfg().bos_token_id);
        self.dataset.tokens = tokens;
        self
    }

    /// `[correct, wrong]` per sequence, for metrics with logit differences.
    pub fn answers(mut self, answers: Vec<[u32; 2]>) -> Self {
        self.dataset.answers = Some(answers);
        self
    }

    /// Sequences per forward pass (default 2).
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch_size = n.max(1);
        self
    }

    /// Only these (layer, head)s (sorted here).
    pub fn heads(mut self, mut heads: Vec<(usize, usize)>) -> Self {
        heads.sort_unstable();
        heads.dedup();
        self.heads = heads;
        self
    }

    /// The dataset the metrics run on.
    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// Loads the plugin library at `library` with `options` (the `[[metric]]` keys, as TOML
    /// text) and runs it over the dataset.
    pub fn run_plugin(&self, library: impl AsRef<Path>, options: &str) -> Result<Tables> {
        let mut m = super::load_metric(
            &library.as_ref().to_string_lossy(),
            Path::new("."),
            &parse(options)?,
        )?;
        self.run(m.as_mut())
    }

    /// Runs the built-in metric `kind` with `options` (TOML text), to compare a plugin with.
    pub fn run_builtin(&self, kind: &str, options: &str) -> Result<Tables> {
        let mut m = crate::metrics::builtin(kind, &parse(options)?)?;
        self.run(m.as_mut())
    }

    /// Runs any metric over the dataset.
    pub fn run(&self, metric: &mut dyn Metric) -> Result<Tables> {
        let cfg = self.model.cfg();
        let ctx = RunContext {
            cfg,
            params: &self.model.params,
            heads: &self.heads,
            bos: cfg.bos_token_id,
            tokenizer: self.model.tokenizer.as_ref(),
        };
        crate::engine::run_metric(
            &self.model.model,
            &ctx,
            metric,
            &self.dataset,
            self.batch_size,
        )
        .map(Tables)
    }
}

fn parse(options: &str) -> Result<toml::Table> {
    toml::from_str(options).map_err(|e| Error::Metric {
        metric: "harness".into(),
        msg: format!("options are not TOML: {e}"),
    })
}
