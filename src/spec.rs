//! The experiment spec: a TOML file that declares a whole run.
//!
//! Owns: the spec's schema (every key documented in the README), parsing with file:line:col
//! errors (unknown keys are rejected), and the checks that need only the spec and the model's
//! shape ([`LoadedSpec::check_heads`]). Must not: load models, read datasets or run anything.
//!
//! Paths inside a spec (model `path`, `tokenizer`, dataset `path`, `plugin`) are relative to
//! the spec file's directory; `output` is relative to the working directory, like
//! `results/<name>`, its default.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::model::Processing;

/// A whole experiment.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Names the run and its default output directory `results/<name>`.
    pub name: String,
    /// Output directory (relative to the working directory).
    pub output: Option<PathBuf>,
    /// Heads to study: `"all"`, `["9.9", "10.7"]`, whole layers `["10", "11"]` or `["10.*"]`.
    #[serde(default = "all_heads")]
    pub heads: Spanned<Heads>,
    pub model: ModelSpec,
    /// Optional when every metric is computed from the weights alone (`ov_circuit`, ...).
    #[serde(rename = "dataset", default)]
    pub datasets: Vec<DatasetSpec>,
    #[serde(rename = "metric", default)]
    pub metrics: Vec<MetricSpec>,
    /// Ablations and patches, each swept and measured (`docs/metrics.md` §interventions).
    #[serde(rename = "intervention", default)]
    pub interventions: Vec<InterventionSpec>,
    /// Per-token views of chosen heads (pictures).
    #[serde(rename = "view", default)]
    pub views: Vec<ViewSpec>,
}

fn all_heads() -> Spanned<Heads> {
    Spanned::new(0..0, Heads::All(AllHeads::All))
}

/// The literal `"all"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AllHeads {
    All,
}

/// Which heads a run studies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Heads {
    All(AllHeads),
    /// `"L.H"` for one head, `"L"` or `"L.*"` for a whole layer.
    List(Vec<String>),
}

/// By hand rather than `#[serde(untagged)]`: an untagged enum's only error is "data did not
/// match any variant of untagged enum Heads", which tells a user nothing about `heads = 3`.
impl<'de> Deserialize<'de> for Heads {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        use serde::de::{self, SeqAccess, Unexpected, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Heads;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str(r#""all" or a list of heads such as ["9.9", "10", "11.*"]"#)
            }
            fn visit_str<E: de::Error>(self, s: &str) -> std::result::Result<Heads, E> {
                if s == "all" {
                    Ok(Heads::All(AllHeads::All))
                } else {
                    Err(E::invalid_value(Unexpected::Str(s), &self))
                }
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Heads, A::Error> {
                let mut out = Vec::new();
                while let Some(item) = seq.next_element::<toml::Value>()? {
                    match item {
                        toml::Value::String(s) => out.push(s),
                        other => {
                            return Err(de::Error::custom(format!(
                                "heads: {other} is not a head; write heads as strings such as \"9.9\", \"10\" or \"11.*\""
                            )))
                        }
                    }
                }
                Ok(Heads::List(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// A hub id (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `distilgpt2`).
    pub name: Option<String>,
    /// A checkpoint directory in HuggingFace layout (instead of `name`).
    pub path: Option<PathBuf>,
    /// Where the tokenizer files are, if not in the checkpoint directory.
    pub tokenizer: Option<PathBuf>,
    #[serde(default)]
    pub device: DeviceChoice,
    /// Sequences per forward pass; memory grows with it, results do not change.
    #[serde(default = "default_batch")]
    pub batch_size: usize,
    #[serde(default = "yes")]
    pub fold_ln: bool,
    #[serde(default = "yes")]
    pub center_writing_weights: bool,
    #[serde(default = "yes")]
    pub center_unembed: bool,
    #[serde(default = "yes")]
    pub fold_value_biases: bool,
}

fn default_batch() -> usize {
    16
}
fn yes() -> bool {
    true
}

impl ModelSpec {
    pub fn processing(&self) -> Processing {
        Processing {
            fold_ln: self.fold_ln,
            center_writing_weights: self.center_writing_weights,
            center_unembed: self.center_unembed,
            fold_value_biases: self.fold_value_biases,
        }
    }
}

/// The kinds of dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// IOI prompts generated in-process.
    Ioi,
    /// A local corpus (`.jsonl` with a `text` field, or `.txt`).
    Text,
    /// A JSON file of token-id lists.
    Tokens,
    /// Inline texts.
    Prompts,
}

/// What to do with text documents shorter than `seq_len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ShortDocs {
    #[default]
    Drop,
    Pad,
}

/// `[[dataset]]`: one table for every kind; keys that do not apply to the kind are errors.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetSpec {
    /// Names the dataset in every CSV's `dataset` column.
    pub name: String,
    pub kind: DatasetKind,
    /// ioi: number of prompts (with `symmetric`, n/2 pairs); text: number of documents.
    pub n: Option<usize>,
    /// ioi and text (with `shuffle`): the random seed.
    pub seed: Option<u64>,
    /// ioi: pair each prompt with its name-swapped twin (default true).
    pub symmetric: Option<bool>,
    /// ioi: override the built-in lists.
    pub names: Option<Spanned<Vec<String>>>,
    pub places: Option<Vec<String>>,
    pub objects: Option<Vec<String>>,
    /// ioi: templates with `[A]`, `[B]`, `[PLACE]`, `[OBJECT]`; `[B]` must come first (BABA).
    pub templates: Option<Vec<String>>,
    /// text and tokens: the file (relative to the spec).
    pub path: Option<Spanned<PathBuf>>,
    /// text: tokens per sequence, BOS included.
    pub seq_len: Option<usize>,
    /// text: shuffle documents with `seed` before taking the first n.
    pub shuffle: Option<bool>,
    /// text: drop or pad documents shorter than `seq_len`.
    pub short: Option<ShortDocs>,
    /// prompts: the texts.
    pub prompts: Option<Vec<String>>,
    /// text and prompts: prepend BOS (default true, as TL's `to_tokens`).
    pub prepend_bos: Option<bool>,
    /// tokens: a JSON file of `[correct_id, wrong_id]` pairs, one per sequence (relative to
    /// the spec), the answers logit differences are taken between.
    pub answers: Option<Spanned<PathBuf>>,
    /// ioi: build this dataset as the corrupted counterpart of the named ioi dataset (its
    /// seed, templates, places, objects and names; its answers), changed as `corrupt` says.
    pub counterpart_of: Option<Spanned<String>>,
    /// ioi, with `counterpart_of`: how the counterpart is corrupted.
    pub corrupt: Option<Spanned<Corruption>>,
}

/// How a corrupted counterpart of an ioi dataset differs from its original. Both change only
/// the subject's second mention (S2), the token the IOI circuit reads to tell IO from S, so
/// every other token and every position stay the original's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Corruption {
    /// IO and S swap roles: S2 becomes the IO's name ("Then, John and Mary went to the store.
    /// Mary gave a drink to"), as the TransformerLens and ARENA IOI notebooks corrupt.
    Flip,
    /// S2 becomes a third name, distinct from IO and S ("Then, John and Mary went to the
    /// store. Kate gave a drink to"): the IOI paper's ABC distribution.
    Abc,
}

/// `[[metric]]`: a built-in `kind` or a `plugin`, with options.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct MetricSpec {
    /// A built-in metric (`source_suppression`, `projection_loss`, `loss`).
    pub kind: Option<Spanned<String>>,
    /// A plugin: a library path (relative to the spec) or a name on the plugin search path.
    pub plugin: Option<Spanned<String>>,
    /// Output table name (defaults to the metric's name).
    pub name: Option<String>,
    /// Every other key: the metric's options (checked by the metric).
    #[serde(flatten)]
    pub options: toml::Table,
}

/// `[[intervention]]`: an ablation or a patch, swept over heads, layers or positions. Every
/// key keeps its span: the plan (`crate::interventions::plan`) checks them against the model
/// and the datasets and points at the key.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct InterventionSpec {
    /// `ablate` or `patch`.
    pub kind: Spanned<String>,
    /// ablate: `zero`, `mean` or `mean_per_position`.
    pub value: Option<Spanned<String>>,
    /// `z`, `result`, `attn_out`, `mlp_out`, `resid_pre` or `resid_post`.
    pub hook: Spanned<String>,
    /// The run it changes (default: every dataset).
    pub dataset: Option<Spanned<String>>,
    /// ablate + mean: whose mean replaces (default: the dataset changed).
    pub mean_over: Option<Spanned<String>>,
    /// patch: whose activations are written in, row i into row i.
    pub source: Option<Spanned<String>>,
    /// One intervention per position as well.
    pub per_position: Option<Spanned<bool>>,
    /// z/result: the heads swept (default: the run's heads).
    pub heads: Option<Spanned<Vec<String>>>,
    /// z/result: all listed heads in one intervention.
    pub together: Option<Spanned<bool>>,
    /// Any of `loss`, `kl`, `logit_diff` (default: all, logit_diff when there are answers).
    pub measure: Option<Spanned<Vec<String>>>,
    /// The table's name (default `ablate_<value>_<hook>` / `patch_<hook>`).
    pub name: Option<Spanned<String>>,
}

/// `[[view]]`: a per-token picture of some heads on one metric.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ViewSpec {
    /// The metric whose per-position values are shown (default `source_suppression`).
    pub metric: Option<String>,
    pub heads: Vec<String>,
    /// Which dataset (default: the first).
    pub dataset: Option<String>,
    /// How many sequences to show (default 10).
    pub sequences: Option<usize>,
}

/// A parsed spec with where it came from, for errors and relative paths.
#[derive(Debug, Clone)]
pub struct LoadedSpec {
    pub spec: Spec,
    pub path: PathBuf,
    pub text: String,
    /// The `--set KEY=VALUE` overrides applied to the file's text (`text` is the result).
    pub overrides: Vec<String>,
}

/// The spec text with each `KEY=VALUE` set: `KEY` is a dotted path (`model.batch_size`,
/// `dataset.0.n` for the first `[[dataset]]`), `VALUE` a TOML value (`4`, `"cpu"`,
/// `["1.0"]`; a bare word is taken as a string). The result is re-serialized TOML, so
/// errors in what the overrides set point into it (the manifest records it as run).
pub fn apply_overrides(text: &str, overrides: &[String]) -> Result<String> {
    let bad = |s: &str, why: String| Error::Other(format!("--set {s}: {why}"));
    let mut doc: toml::Table =
        toml::from_str(text).map_err(|e| Error::Other(format!("spec: {}", e.message())))?;
    for s in overrides {
        let (key, raw) = s
            .split_once('=')
            .ok_or_else(|| bad(s, "expected KEY=VALUE".into()))?;
        let (key, raw) = (key.trim(), raw.trim());
        let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_string()));
        let parts: Vec<&str> = key.split('.').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(bad(s, format!("'{key}' is not a dotted key")));
        }
        let mut at: &mut toml::Value = doc
            .entry(parts[0])
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        for (i, p) in parts.iter().enumerate().skip(1) {
            let here = parts[..i].join(".");
            at = match at {
                toml::Value::Table(t) => t
                    .entry(*p)
                    .or_insert_with(|| toml::Value::Table(toml::Table::new())),
                toml::Value::Array(a) => {
                    let n = a.len();
                    let idx: usize = p
                        .parse()
                        .map_err(|_| bad(s, format!("'{here}' is a list: index it by number")))?;
                    a.get_mut(idx).ok_or_else(|| {
                        bad(s, format!("'{here}' has {n} entries, no index {idx}"))
                    })?
                }
                _ => return Err(bad(s, format!("'{here}' is not a table"))),
            };
        }
        *at = value;
    }
    toml::to_string(&doc).map_err(|e| Error::Other(format!("--set: {e}")))
}

/// 1-based line and column of a byte offset.
pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

impl LoadedSpec {
    /// Reads and parses a spec file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_str(&text, path)
    }

    /// Reads a spec file and applies `--set KEY=VALUE` overrides ([`apply_overrides`]).
    pub fn from_file_with(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        if overrides.is_empty() {
            return Self::from_str(&text, path);
        }
        // The file itself must parse: its errors point at its own lines.
        Self::from_str(&text, path)?;
        let mut loaded = Self::from_str(&apply_overrides(&text, overrides)?, path)?;
        loaded.overrides = overrides.to_vec();
        Ok(loaded)
    }

    /// Parses spec text; `path` is used for errors and relative paths.
    pub fn from_str(text: &str, path: &Path) -> Result<Self> {
        let spec: Spec = toml::from_str(text).map_err(|e| {
            let (line, col) = e.span().map(|s| line_col(text, s.start)).unzip();
            Error::Spec {
                path: path.to_path_buf(),
                line,
                col,
                msg: e.message().trim().to_string(),
            }
        })?;
        let loaded = LoadedSpec {
            spec,
            path: path.to_path_buf(),
            text: text.to_string(),
            overrides: Vec::new(),
        };
        loaded.check_shape()?;
        Ok(loaded)
    }

    /// An error at a span of the spec.
    pub fn error_at(&self, span: std::ops::Range<usize>, msg: impl Into<String>) -> Error {
        let (line, col) = if span.is_empty() && span.start == 0 {
            (None, None)
        } else {
            let (l, c) = line_col(&self.text, span.start);
            (Some(l), Some(c))
        };
        Error::Spec {
            path: self.path.clone(),
            line,
            col,
            msg: msg.into(),
        }
    }

    /// The span of a key: of `[model]` (`table` "model"), of the `i`-th `[[dataset]]`
    /// (`table` "dataset"), or at the top level (`table` ""); `0..0` when it is not written.
    pub fn key_span(&self, table: &str, index: usize, key: &str) -> std::ops::Range<usize> {
        type Keys = BTreeMap<Spanned<String>, serde::de::IgnoredAny>;
        let map = match table {
            "" => toml::from_str::<Keys>(&self.text).ok(),
            _ => toml::from_str::<TableSpans>(&self.text)
                .ok()
                .and_then(|t| match table {
                    "model" => Some(t.model),
                    _ => t.datasets.into_iter().nth(index),
                }),
        };
        map.and_then(|m| m.into_keys().find(|k| k.get_ref() == key).map(|k| k.span()))
            .unwrap_or(0..0)
    }

    /// An error on the line of `key` of the `i`-th `[[dataset]]` (its `name` if `key` is not
    /// written there).
    pub fn dataset_error(&self, index: usize, key: &str, msg: impl Into<String>) -> Error {
        let span = Some(self.key_span("dataset", index, key))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| self.key_span("dataset", index, "name"));
        self.error_at(span, msg)
    }

    /// An error about the spec with no precise location.
    pub fn error(&self, msg: impl Into<String>) -> Error {
        self.error_at(0..0, msg)
    }

    /// The spec file's directory, against which its relative paths resolve. `.` (never an
    /// empty path) for `runner spec.toml`: a library path without a directory part would be
    /// looked up by the dynamic loader's search path instead of next to the spec.
    pub fn dir(&self) -> PathBuf {
        self.path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// A path from the spec, relative to the spec file.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.dir().join(p)
        }
    }

    /// The output directory: `output` (a leading `~` expanded, checked when parsed), or
    /// `results/<name>`.
    pub fn output_dir(&self) -> PathBuf {
        self.spec
            .output
            .as_ref()
            .map(|o| crate::outdir::expand_tilde(o).unwrap_or_else(|_| o.clone()))
            .unwrap_or_else(|| PathBuf::from("results").join(&self.spec.name))
    }

    /// The spans of the keys of the `index`-th `[[metric]]` table (`kind`, `plugin`, `name`
    /// and every option), for errors that belong on one key's line. Re-parses the text: only
    /// error paths call this.
    pub fn metric_key_spans(&self, index: usize) -> BTreeMap<String, std::ops::Range<usize>> {
        toml::from_str::<KeySpans>(&self.text)
            .ok()
            .and_then(|k| k.metrics.into_iter().nth(index))
            .map(|t| {
                t.into_keys()
                    .map(|k| {
                        let span = k.span();
                        (k.into_inner(), span)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Where key `key` of the `index`-th `[[dataset]]` table is written, if it is. Re-parses
    /// the text: only error paths call this.
    pub fn dataset_key_span(&self, index: usize, key: &str) -> Option<std::ops::Range<usize>> {
        toml::from_str::<KeySpans>(&self.text)
            .ok()?
            .datasets
            .into_iter()
            .nth(index)?
            .into_keys()
            .find(|k| k.get_ref() == key)
            .map(|k| k.span())
    }

    /// An error on the line of key `key` of the `index`-th `[[metric]]` table (falling back to
    /// its `kind` or `plugin` key, then to no location).
    pub fn metric_error(&self, index: usize, key: &str, msg: impl Into<String>) -> Error {
        let spans = self.metric_key_spans(index);
        let span = [key, "kind", "plugin"]
            .iter()
            .find_map(|k| spans.get(*k).cloned())
            .or_else(|| spans.values().min_by_key(|s| s.start).cloned())
            .unwrap_or(0..0);
        self.error_at(span, msg)
    }

    /// Every name the spec gives (the run's, each dataset's, each metric's) must be a name,
    /// not a path: they become file and directory names of the results.
    fn check_names(&self) -> Result<()> {
        let spans: NameSpans = toml::from_str(&self.text).map_err(|e| self.error(e.to_string()))?;
        let mut named: Vec<(&str, Option<Spanned<String>>)> =
            vec![("the run's `name`", spans.name)];
        named.extend(
            spans
                .datasets
                .into_iter()
                .map(|d| ("a [[dataset]] `name`", d.name)),
        );
        named.extend(
            spans
                .metrics
                .into_iter()
                .map(|m| ("a [[metric]] `name`", m.name)),
        );
        for (what, name) in named {
            if let Some(name) = name {
                if let Err(why) = check_name(name.get_ref()) {
                    return Err(self.error_at(name.span(), format!("{what} {why}")));
                }
            }
        }
        Ok(())
    }

    /// Structural checks that need no model.
    fn check_shape(&self) -> Result<()> {
        let s = &self.spec;
        self.check_names()?;
        match (&s.model.name, &s.model.path) {
            (None, None) => {
                return Err(self
                    .error("[model] needs `name` (a hub id) or `path` (a checkpoint directory)"))
            }
            (Some(_), Some(_)) => {
                return Err(self.error_at(
                    self.key_span("model", 0, "path"),
                    "[model] takes `name` or `path`, not both",
                ))
            }
            _ => {}
        }
        if s.model.batch_size == 0 {
            return Err(self.error_at(
                self.key_span("model", 0, "batch_size"),
                "[model] batch_size must be at least 1",
            ));
        }
        if let Some(out) = &s.output {
            if let Err(why) = crate::outdir::expand_tilde(out) {
                return Err(self.error_at(self.key_span("", 0, "output"), why));
            }
        }
        for (i, d) in s.datasets.iter().enumerate() {
            if let Some(p) = d.prompts.iter().flatten().position(|p| p.trim().is_empty()) {
                return Err(self.dataset_error(
                    i,
                    "prompts",
                    format!(
                        "dataset '{}': prompt {} is empty; every prompt needs text",
                        d.name,
                        p + 1
                    ),
                ));
            }
        }
        // Weight metrics (ov_circuit, qk_circuit) read no activations; any other needs data.
        let needs_data = !s.interventions.is_empty()
            || s.metrics.iter().any(|m| {
                m.kind
                    .as_ref()
                    .map_or(true, |k| !crate::metrics::is_weight_metric(k.get_ref()))
            });
        if s.datasets.is_empty() && needs_data {
            // At the first table that reads activations: that is what needs the data.
            let msg = "at least one [[dataset]] is needed (only weight metrics such as ov_circuit and qk_circuit run without one)";
            let metric = s.metrics.iter().position(|m| {
                m.kind
                    .as_ref()
                    .map_or(true, |k| !crate::metrics::is_weight_metric(k.get_ref()))
            });
            return Err(match (metric, s.interventions.first()) {
                (Some(i), _) => self.metric_error(i, "kind", msg),
                (None, Some(iv)) => self.error_at(iv.kind.span(), msg),
                (None, None) => self.error(msg),
            });
        }
        let mut seen = BTreeSet::new();
        for (i, d) in s.datasets.iter().enumerate() {
            if !seen.insert(&d.name) {
                return Err(self.dataset_error(
                    i,
                    "name",
                    format!("two datasets are named '{}'", d.name),
                ));
            }
        }
        if s.metrics.is_empty() && s.interventions.is_empty() {
            // At the end of the file, where the missing table goes.
            let end = self.text.trim_end().len();
            let msg = "at least one [[metric]] or [[intervention]] is needed: add one below (`runner list` shows the kinds)";
            return Err(if end == 0 {
                self.error(msg)
            } else {
                self.error_at(end..end + 1, msg)
            });
        }
        for (i, m) in s.metrics.iter().enumerate() {
            match (&m.kind, &m.plugin) {
                (None, None) => {
                    return Err(self.metric_error(
                        i,
                        "name",
                        format!("[[metric]] #{} needs `kind` (built-in) or `plugin`", i + 1),
                    ))
                }
                (Some(k), Some(_)) => {
                    return Err(
                        self.error_at(k.span(), "a [[metric]] takes `kind` or `plugin`, not both")
                    )
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// The selected heads as (layer, head), checked against the model's shape.
    pub fn check_heads(&self, n_layers: usize, n_heads: usize) -> Result<Vec<(usize, usize)>> {
        let span = self.spec.heads.span();
        parse_heads(self.spec.heads.get_ref(), n_layers, n_heads)
            .map_err(|msg| self.error_at(span, msg))
    }
}

/// Where each name of a spec is written (a second, lenient parse of the same text: the typed
/// [`Spec`] keeps plain `String` names for everything downstream).
#[derive(Deserialize)]
struct NameSpans {
    name: Option<Spanned<String>>,
    #[serde(default, rename = "dataset")]
    datasets: Vec<NameSpan>,
    #[serde(default, rename = "metric")]
    metrics: Vec<NameSpan>,
}

#[derive(Deserialize)]
struct NameSpan {
    name: Option<Spanned<String>>,
}

/// The keys of `[model]`, the top level and each `[[dataset]]` with their spans, for errors
/// about values the typed [`Spec`] holds without a span.
#[derive(Deserialize)]
struct TableSpans {
    #[serde(default)]
    model: BTreeMap<Spanned<String>, serde::de::IgnoredAny>,
    #[serde(default, rename = "dataset")]
    datasets: Vec<BTreeMap<Spanned<String>, serde::de::IgnoredAny>>,
}

/// The keys of each `[[metric]]` and `[[dataset]]` table with their spans.
#[derive(Deserialize)]
struct KeySpans {
    #[serde(default, rename = "metric")]
    metrics: Vec<BTreeMap<Spanned<String>, serde::de::IgnoredAny>>,
    #[serde(default, rename = "dataset")]
    datasets: Vec<BTreeMap<Spanned<String>, serde::de::IgnoredAny>>,
}

/// Checks that `name` can be a file name on every platform and stays one path component:
/// ASCII letters, digits, `_`, `-` and `.`; not empty, not `.` or `..`, at most 100 bytes.
/// Returns why not, as the end of a sentence.
pub fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty() {
        return Err("is empty".into());
    }
    if name == "." || name == ".." {
        return Err(format!("'{name}' is not a name (it names a directory)"));
    }
    if name.len() > 100 {
        return Err(format!("is {} bytes long (at most 100)", name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "{name:?} has {c:?}: names may hold only letters, digits, '_', '-' and '.' (they become file names)"
        ));
    }
    Ok(())
}

/// Expands a head selection for an `n_layers` x `n_heads` model.
pub fn parse_heads(
    heads: &Heads,
    n_layers: usize,
    n_heads: usize,
) -> std::result::Result<Vec<(usize, usize)>, String> {
    // Found by fuzzing: the range messages below subtract 1 from each count.
    if n_layers == 0 || n_heads == 0 {
        return Err(format!(
            "the model has {n_layers} layers x {n_heads} heads: there is no head to study"
        ));
    }
    let all = || (0..n_layers).flat_map(|l| (0..n_heads).map(move |h| (l, h)));
    let list = match heads {
        Heads::All(_) => return Ok(all().collect()),
        Heads::List(l) => l,
    };
    if list.is_empty() {
        return Err("`heads` is empty".into());
    }
    let mut out = BTreeSet::new();
    for item in list {
        let bad = || format!("head '{item}' is not 'LAYER.HEAD', 'LAYER' or 'LAYER.*'");
        let (l, h) = match item.split_once('.') {
            Some((l, h)) => (l, Some(h)),
            None => (item.as_str(), None),
        };
        // Digits only: `usize::from_str` would also take "+1".
        let number = |s: &str| -> std::result::Result<usize, String> {
            let s = s.trim();
            if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad());
            }
            s.parse().map_err(|_| bad())
        };
        let layer = number(l)?;
        if layer >= n_layers {
            return Err(format!("head '{item}': layer {layer} is out of range (the model has {n_layers} layers, 0..{})", n_layers - 1));
        }
        match h.map(str::trim) {
            None | Some("*") => out.extend((0..n_heads).map(|h| (layer, h))),
            Some(h) => {
                let head = number(h)?;
                if head >= n_heads {
                    return Err(format!("head '{item}': head {head} is out of range (the model has {n_heads} heads per layer, 0..{})", n_heads - 1));
                }
                out.insert((layer, head));
            }
        }
    }
    Ok(out.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = r#"
name = "t"
heads = ["1.2", "0"]
[model]
path = "ckpt"
[[dataset]]
name = "d"
kind = "prompts"
prompts = ["hi"]
[[metric]]
kind = "loss"
"#;

    #[test]
    fn overrides_set_keys_tables_and_list_entries() {
        let sets = [
            "model.batch_size=4",
            "heads=[\"1.2\"]",
            "dataset.0.prompts=[\"a\", \"b\"]",
            "model.device=cpu",
        ]
        .map(String::from);
        let text = apply_overrides(OK, &sets).unwrap();
        let s = LoadedSpec::from_str(&text, Path::new("x.toml")).unwrap();
        assert_eq!(s.spec.model.batch_size, 4);
        assert_eq!(s.check_heads(2, 3).unwrap(), vec![(1, 2)]);
        assert_eq!(
            s.spec.datasets[0].prompts.as_deref(),
            Some(&["a".to_string(), "b".to_string()][..])
        );
        assert_eq!(s.spec.model.device, crate::device::DeviceChoice::Cpu);
        // Untouched keys stay.
        assert_eq!(s.spec.model.path.as_deref(), Some(Path::new("ckpt")));
    }

    #[test]
    fn bad_overrides_say_which_and_why() {
        let err = |set: &str| {
            apply_overrides(OK, &[set.to_string()])
                .unwrap_err()
                .to_string()
        };
        assert!(err("model.batch_size").contains("KEY=VALUE"));
        assert!(err("dataset.3.n=1").contains("has 1 entries, no index 3"));
        assert!(err("dataset.x.n=1").contains("index it by number"));
        assert!(err("name.x=1").contains("'name' is not a table"));
        // A key the spec does not know is the spec's usual error, after the override.
        let text = apply_overrides(OK, &["model.batchsize=2".to_string()]).unwrap();
        let e = LoadedSpec::from_str(&text, Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("batchsize"), "{e}");
    }

    #[test]
    fn parses_and_expands_heads() {
        let s = LoadedSpec::from_str(OK, Path::new("x.toml")).unwrap();
        assert_eq!(
            s.check_heads(2, 3).unwrap(),
            vec![(0, 0), (0, 1), (0, 2), (1, 2)]
        );
        let err = s.check_heads(1, 3).unwrap_err().to_string();
        assert!(err.starts_with("x.toml:3:9:"), "{err}");
    }

    /// The two "nothing to run" errors point at the table that needs what is missing, or
    /// at the end of the file where the missing table goes.
    #[test]
    fn missing_tables_are_located() {
        let err = |t: &str| {
            LoadedSpec::from_str(t, Path::new("x.toml"))
                .unwrap_err()
                .to_string()
        };
        // Without its dataset, OK's `kind = "loss"` is line 7; without its metric, line 9 ends it.
        let no_data = OK.replace(
            "[[dataset]]\nname = \"d\"\nkind = \"prompts\"\nprompts = [\"hi\"]\n",
            "",
        );
        assert_ne!(no_data, OK);
        let e = err(&no_data);
        assert!(e.starts_with("x.toml:7:1: at least one [[dataset]]"), "{e}");
        let no_metric = OK.replace("[[metric]]\nkind = \"loss\"\n", "");
        assert_ne!(no_metric, OK);
        let e = err(&no_metric);
        assert!(e.starts_with("x.toml:9:"), "{e}");
        assert!(
            e.contains("at least one [[metric]] or [[intervention]]"),
            "{e}"
        );
    }

    #[test]
    fn unknown_key_has_line_and_column() {
        let text = OK.replace("path = \"ckpt\"", "path = \"ckpt\"\nbatchsize = 3");
        let err = LoadedSpec::from_str(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("x.toml:6:1:"), "{err}");
        assert!(err.contains("batchsize"), "{err}");
    }

    #[test]
    fn names_must_be_names_and_are_located() {
        for bad in ["", ".", "..", "a/b", "/tmp/x", "../x", "a b", "é"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        for good in ["ioi", "ss_neg", "web-2", "v1.2", ".hidden-but-fine"] {
            check_name(good).unwrap();
        }
        let text = OK.replace("name = \"d\"", "name = \"../d\"");
        let err = LoadedSpec::from_str(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("x.toml:7:8:"), "{err}");
    }

    #[test]
    fn heads_errors_are_readable_and_numbers_are_digits() {
        let text = OK.replace("heads = [\"1.2\", \"0\"]", "heads = 3");
        let err = LoadedSpec::from_str(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("x.toml:3:9:") && err.contains("\"all\""),
            "{err}"
        );
        assert!(!err.contains("untagged"), "{err}");
        let text = OK.replace("heads = [\"1.2\", \"0\"]", "heads = [1]");
        let err = LoadedSpec::from_str(&text, Path::new("x.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("strings"), "{err}");
        for bad in ["+1.0", "1.+0", "-0", "1.2.3", "", "1.", " "] {
            assert!(
                parse_heads(&Heads::List(vec![bad.into()]), 4, 4).is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(
            parse_heads(&Heads::List(vec![" 1 . 2 ".into()]), 4, 4).unwrap(),
            vec![(1, 2)]
        );
    }

    #[test]
    fn metric_option_keys_have_spans() {
        let text = format!("{OK}only_negtive = true\n");
        let s = LoadedSpec::from_str(&text, Path::new("x.toml")).unwrap();
        let err = s.metric_error(0, "only_negtive", "bad").to_string();
        assert!(err.starts_with("x.toml:12:1:"), "{err}");
        // Unknown key: falls back to `kind`.
        let err = s.metric_error(0, "nope", "bad").to_string();
        assert!(err.starts_with("x.toml:11:1:"), "{err}");
    }

    #[test]
    fn a_spec_without_a_directory_resolves_against_dot() {
        let s = LoadedSpec::from_str(OK, Path::new("x.toml")).unwrap();
        assert_eq!(s.dir(), PathBuf::from("."));
    }
}
