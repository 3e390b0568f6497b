//! The crate's one error type.
//!
//! Owns: every failure a user can cause (bad spec, bad checkpoint, bad tokenizer, bad data,
//! bad plugin) as a variant that names *where* the problem is (a file, a line and column, a
//! hook point, a plugin). Must not: format for the terminal or decide exit codes; `main`
//! does that.

use std::path::PathBuf;

/// Result alias used across the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong, each with enough context for a one-line message.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is missing a field, malformed, or describes a model that is not GPT-2.
    #[error("{}: {msg}", path.display())]
    Config { path: PathBuf, msg: String },
    /// `model.safetensors` is malformed, truncated, or disagrees with `config.json`.
    #[error("{}: {msg}", path.display())]
    Checkpoint { path: PathBuf, msg: String },
    /// The model could not be found locally or downloaded.
    #[error("{0}")]
    ModelNotFound(String),
    /// The tokenizer files are missing or malformed, or a text does not tokenize as required.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The experiment spec is malformed; `line`/`col` are 1-based when known.
    #[error("{}{}: {msg}", path.display(), location(*line, *col))]
    Spec {
        path: PathBuf,
        line: Option<usize>,
        col: Option<usize>,
        msg: String,
    },
    /// A dataset could not be built (missing file, empty, bad token ids, ...).
    #[error("dataset '{dataset}': {msg}")]
    Data { dataset: String, msg: String },
    /// A hook point name or activation is not what the caller expected.
    #[error("hook point '{name}': {msg}")]
    Hook { name: String, msg: String },
    /// A metric failed while computing.
    #[error("metric '{metric}': {msg}")]
    Metric { metric: String, msg: String },
    /// A plugin could not be loaded, failed its ABI checks, or returned an error.
    #[error("plugin '{plugin}': {msg}")]
    Plugin { plugin: String, msg: String },
    /// The requested device is unavailable (e.g. CUDA without the `cuda` feature).
    #[error("device: {0}")]
    Device(String),
    /// The run was asked to stop (Ctrl-C, SIGTERM) and stopped before writing anything.
    #[error("{0}")]
    Interrupted(String),
    /// Anything else worth a sentence (invalid arguments, shape errors).
    #[error("{0}")]
    Other(String),
}

fn location(line: Option<usize>, col: Option<usize>) -> String {
    match (line, col) {
        (Some(l), Some(c)) => format!(":{l}:{c}"),
        (Some(l), None) => format!(":{l}"),
        _ => String::new(),
    }
}

impl Error {
    /// Wraps an I/O error with the path it concerns.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}
