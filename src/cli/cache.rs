//! `runner cache`: run a model once and save chosen activations as safetensors; with
//! `--spec SPEC --dataset NAME`, exactly the batches a run of that spec sees; with
//! `--weights`, the processed parameters under TransformerLens state-dict names; or, with
//! `--effective-embeddings`, the notebook's effective embeddings (`docs/metrics.md` §3:
//! `W_E`, `W_EE`, `W_EE0`, `W_EE0A`).
//!
//! Owns: the `cache` subcommand's arguments, reading token files, tokenizing `--prompt`s,
//! and writing the file (chosen hook points + `logits` + `tokens`, `lengths` and `mask`,
//! with a `__metadata__` saying which model, which processing and which spec and dataset
//! produced them). Must not: compute anything about the model itself; the forward pass and
//! hook catalogue live in `model` and `hooks`, datasets in `data`, the effective embeddings
//! in `circuits`.
//!
//! The file is what TransformerLens's `run_with_cache` would give for the same names: f32
//! tensors in TL's shapes (exactly what [`ActivationCache`] holds), so Python can compare
//! with `safetensors.torch.load_file` directly. GPT-2 right-pads with BOS, so a padding
//! position looks like a real BOS in `tokens`: `lengths` (I64 `[batch]`) and `mask` (BOOL
//! `[batch, seq]`, true on real tokens) say which positions are padding.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ndarray::{Array2, ArrayD, Axis};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::data::{self, DataContext};
use crate::device::{with_device, DeviceChoice, OnDevice};
use crate::error::{Error, Result};
use crate::hooks::{ActivationCache, HookFilter, Hooks, LOGITS};
use crate::model::{self, CheckpointFiles, ModelConfig, ModelSource, Processing};
use crate::output::write_atomic;
use crate::seam::SeamDevice;
use crate::spec::LoadedSpec;
use crate::tokenizer;

/// The name the input token ids are saved under (I64, `[batch, seq]`).
pub const TOKENS: &str = "tokens";
/// Each sequence's length without right padding (I64, `[batch]`).
pub const LENGTHS: &str = "lengths";
/// True on real tokens, false on right padding (BOOL, `[batch, seq]`).
pub const MASK: &str = "mask";

#[derive(clap::Args, Debug, Clone)]
pub struct CacheArgs {
    /// Checkpoint directory (HF layout) or hub id (`gpt2`, `gpt2-medium`, ...).
    #[arg(long, required_unless_present = "spec", conflicts_with = "spec")]
    pub model: Option<String>,
    /// An experiment spec: its [model] (checkpoint, processing, tokenizer, batch size)
    /// instead of --model and the processing switches; with --dataset, one of its datasets.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// Override a key of --spec (as `runner run --set`).
    #[arg(long = "set", value_name = "KEY=VALUE", requires = "spec")]
    pub set: Vec<String>,
    /// A `[[dataset]]` of `--spec`, by name: cache exactly the batches a run of the spec sees.
    #[arg(long, requires = "spec", conflicts_with_all = ["tokens", "prompt"])]
    pub dataset: Option<String>,
    /// JSON file with a list of equal-length token-id lists.
    #[arg(
        long,
        conflicts_with = "prompt",
        required_unless_present_any = ["prompt", "effective_embeddings", "dataset", "weights"]
    )]
    pub tokens: Option<PathBuf>,
    /// Text to run (BOS prepended); repeat for a batch, right-padded like TL's `to_tokens`.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// Hook point names or globs (`blocks.*.attn.hook_pattern`); `logits` is always saved.
    #[arg(long, num_args = 1.., required_unless_present_any = ["effective_embeddings", "weights"])]
    pub hooks: Vec<String>,
    /// Save the effective embeddings W_E, W_EE, W_EE0, W_EE0A ([d_vocab, d_model] each,
    /// docs/metrics.md §3) of the processed weights instead of activations; no forward pass.
    #[arg(long, conflicts_with_all = ["tokens", "prompt", "hooks", "dataset"])]
    pub effective_embeddings: bool,
    /// Save the processed parameters under TransformerLens state-dict names
    /// (`blocks.0.attn.W_O`, `unembed.W_U`, ...) instead of activations; no forward pass.
    #[arg(long, conflicts_with_all = ["tokens", "prompt", "hooks", "dataset", "effective_embeddings"])]
    pub weights: bool,
    /// Output file (`.safetensors`), written atomically. An existing file is replaced only
    /// with `--force`; the command's own inputs (checkpoint, tokenizer and token files) never.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` if it exists (never an input of this command, nor a non-regular file).
    #[arg(long)]
    pub force: bool,
    /// Directory with the tokenizer files, if not the checkpoint's own.
    #[arg(long, conflicts_with = "spec")]
    pub tokenizer: Option<PathBuf>,
    /// Skip TL's fold_ln.
    #[arg(long, conflicts_with = "spec")]
    pub no_fold_ln: bool,
    /// Skip TL's center_writing_weights.
    #[arg(long, conflicts_with = "spec")]
    pub no_center_writing_weights: bool,
    /// Skip TL's center_unembed.
    #[arg(long, conflicts_with = "spec")]
    pub no_center_unembed: bool,
    /// Skip TL's fold_value_biases.
    #[arg(long, conflicts_with = "spec")]
    pub no_fold_value_biases: bool,
    /// Skip all four processing steps (TL's `from_pretrained_no_processing`).
    #[arg(long, conflicts_with = "spec")]
    pub no_processing: bool,
    /// Where to run the model (default: the spec's device, else auto).
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
}

impl CacheArgs {
    /// The processing the switches ask for; TL's `from_pretrained` defaults otherwise.
    pub fn processing(&self) -> Processing {
        if self.no_processing {
            return Processing::NONE;
        }
        Processing {
            fold_ln: !self.no_fold_ln,
            center_writing_weights: !self.no_center_writing_weights,
            center_unembed: !self.no_center_unembed,
            fold_value_biases: !self.no_fold_value_biases,
        }
    }
}

/// Where the model, its processing and (with `--spec`) the dataset come from.
struct Source {
    /// What the user named: the hub id or directory, or the spec's model.
    label: String,
    files: CheckpointFiles,
    processing: Processing,
    tokenizer: Option<PathBuf>,
    device: DeviceChoice,
    spec: Option<LoadedSpec>,
}

impl Source {
    fn of(args: &CacheArgs) -> Result<Self> {
        match (&args.spec, &args.model) {
            (Some(path), _) => {
                let spec = LoadedSpec::from_file_with(path, &args.set)?;
                if let Some(name) = &args.dataset {
                    if !spec.spec.datasets.iter().any(|d| &d.name == name) {
                        let known: Vec<&str> =
                            spec.spec.datasets.iter().map(|d| d.name.as_str()).collect();
                        return Err(spec.error(format!(
                            "--dataset {name}: the spec has no such [[dataset]] (it has: {})",
                            if known.is_empty() {
                                "none".to_string()
                            } else {
                                known.join(", ")
                            }
                        )));
                    }
                }
                let source = crate::runner::model_source(&spec);
                let m = &spec.spec.model;
                Ok(Source {
                    label: match &source {
                        ModelSource::Path(p) => p.display().to_string(),
                        ModelSource::Hub(n) => n.clone(),
                    },
                    files: source.resolve()?,
                    processing: m.processing(),
                    tokenizer: m.tokenizer.as_ref().map(|p| spec.resolve(p)),
                    device: args.device.unwrap_or(m.device),
                    spec: Some(spec),
                })
            }
            (None, Some(model)) => Ok(Source {
                label: model.clone(),
                files: ModelSource::parse(model).resolve()?,
                processing: args.processing(),
                tokenizer: args.tokenizer.clone(),
                device: args.device.unwrap_or_default(),
                spec: None,
            }),
            (None, None) => unreachable!("clap requires --model or --spec"),
        }
    }
}

/// Where the input tokens come from.
enum Input {
    /// Already read and checked against the config.
    Ids(Array2<u32>),
    /// Texts, tokenized once the model's tokenizer is loaded.
    Prompts(Vec<String>),
    /// A dataset of the spec, by name, built once the model's tokenizer is loaded.
    Dataset(String),
}

/// The tokens a cache ran, with each sequence's unpadded length.
struct Batch {
    tokens: Array2<u32>,
    lengths: Vec<usize>,
}

/// Everything the command reads, which `--out` must never be: the checkpoint directory's
/// files, the tokenizer directory's, and the token file.
fn inputs(args: &CacheArgs, src: &Source) -> Vec<PathBuf> {
    let files = &src.files;
    let mut v = vec![files.config.clone(), files.weights.clone()];
    v.extend(args.spec.iter().cloned());
    for dir in [Some(files.dir.as_path()), src.tokenizer.as_deref()]
        .into_iter()
        .flatten()
    {
        if let Ok(entries) = std::fs::read_dir(dir) {
            v.extend(entries.flatten().map(|e| e.path()));
        }
    }
    v.extend(args.tokens.iter().cloned());
    v
}

pub fn cache(args: &CacheArgs) -> Result<ExitCode> {
    if args.dataset.is_some() && args.spec.is_none() {
        return Err(Error::Other(
            "--dataset names a [[dataset]] of a spec: give the spec with --spec SPEC".into(),
        ));
    }
    let src = Source::of(args)?;
    crate::outdir::check_out_file(&args.out, &inputs(args, &src), args.force)?;
    if args.effective_embeddings || args.weights {
        return weights(args, &src);
    }
    // Everything the user typed is checked against the config before the (slow) load.
    let cfg = ModelConfig::from_file(&src.files.config)?;
    let mut filter = HookFilter::checked(&args.hooks, cfg.n_layers)?;
    filter.extend([LOGITS.to_string()]);
    let input = match (&args.tokens, &args.dataset) {
        (Some(path), _) => Input::Ids(read_token_file(path, &cfg)?),
        (None, Some(name)) => Input::Dataset(name.clone()),
        (None, None) => Input::Prompts(args.prompt.clone()),
    };

    let (batch, activations) = with_device(
        src.device.resolve()?,
        CacheRun {
            src: &src,
            input,
            filter,
        },
    )?;

    let mut metadata = metadata(&src)?;
    metadata.insert("contents".into(), "activations".into());
    if let Some(d) = &args.dataset {
        metadata.insert("dataset".into(), d.clone());
    }
    let bytes = serialize(&batch, &activations, metadata)?;
    write_atomic(&args.out, &bytes)?;
    print_summary(&args.out, &batch, &activations);
    Ok(ExitCode::SUCCESS)
}

/// `--weights` or `--effective-embeddings`: from the processed host weights (no device, no
/// forward pass), written atomically with the same metadata as an activation file.
fn weights(args: &CacheArgs, src: &Source) -> Result<ExitCode> {
    let cfg = ModelConfig::from_file(&src.files.config)?;
    let mut params = model::checkpoint::load_params(&src.files.weights, &cfg)?;
    model::process::process(&mut params, src.processing);
    let (named, contents): (Vec<(String, ArrayD<f32>)>, &str) = if args.weights {
        let named = params
            .named()
            .into_iter()
            .map(|(n, a)| (n, a.to_owned()))
            .collect();
        (
            named,
            "processed weights (TransformerLens state-dict names)",
        )
    } else {
        let emb = crate::circuits::effective_embeddings(&params, &cfg);
        let named = emb
            .into_named()
            .into_iter()
            .map(|(n, a)| (n.to_string(), a.into_dyn()))
            .collect();
        (named, "effective embeddings (docs/metrics.md §3)")
    };
    let err = |e: safetensors::SafeTensorError| Error::Other(format!("safetensors: {e}"));
    let bytes: Vec<(&str, Vec<usize>, Vec<u8>)> = named
        .iter()
        .map(|(n, a)| (n.as_str(), a.shape().to_vec(), f32_bytes(a)))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, shape, b)| {
            Ok((
                n.to_string(),
                TensorView::new(Dtype::F32, shape.clone(), b).map_err(err)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut meta = metadata(src)?;
    meta.insert("contents".into(), contents.into());
    let out = safetensors::tensor::serialize(views, &Some(meta)).map_err(err)?;
    write_atomic(&args.out, &out)?;
    println!("wrote {} ({} tensors)", args.out.display(), named.len());
    let width = named.iter().map(|(n, _)| n.len()).max().unwrap_or(0);
    for (n, a) in &named {
        println!("  {n:width$}  f32 {:?}", a.shape());
    }
    Ok(ExitCode::SUCCESS)
}

/// The command's work, on whichever device was picked.
struct CacheRun<'a> {
    src: &'a Source,
    input: Input,
    filter: HookFilter,
}

impl OnDevice for CacheRun<'_> {
    type Output = (Batch, ActivationCache);
    fn run<D: SeamDevice>(self, dev: D) -> Result<Self::Output> {
        run_on(dev, self.src, self.input, self.filter)
    }
}

/// Loads the model on `dev`, makes the input tokens, and runs them: one forward pass, or a
/// spec's dataset in the spec's batches (concatenated along the batch axis).
fn run_on<D: SeamDevice>(
    dev: D,
    src: &Source,
    input: Input,
    filter: HookFilter,
) -> Result<(Batch, ActivationCache)> {
    let loaded = model::load(
        dev,
        src.files.clone(),
        src.processing,
        src.tokenizer.as_deref(),
    )?;
    let batch = match input {
        Input::Ids(tokens) => Batch {
            lengths: vec![tokens.ncols(); tokens.nrows()],
            tokens,
        },
        Input::Prompts(texts) => {
            let tok = loaded.tokenizer()?;
            let encoded = texts
                .iter()
                .map(|t| tok.encode(t))
                .collect::<Result<Vec<_>>>()?;
            let bos = loaded.cfg().bos_token_id;
            let n_ctx = loaded.cfg().n_ctx;
            if let Some(t) = encoded.iter().position(|e| e.len() + 1 > n_ctx) {
                return Err(Error::Other(format!(
                    "--prompt #{}: {} tokens with BOS exceed the model's context n_ctx = {n_ctx}",
                    t + 1,
                    encoded[t].len() + 1
                )));
            }
            Batch {
                lengths: encoded.iter().map(|e| e.len() + 1).collect(),
                tokens: tokenizer::batch_tokens(&encoded, Some(bos), bos, n_ctx),
            }
        }
        Input::Dataset(name) => {
            let spec = src.spec.as_ref().expect("--dataset requires --spec");
            let d = spec
                .spec
                .datasets
                .iter()
                .find(|d| d.name == name)
                .expect("checked in Source::of");
            let dir = spec.dir();
            let ctx = DataContext {
                tokenizer: loaded.tokenizer.as_ref(),
                cfg: loaded.cfg(),
                spec_dir: &dir,
            };
            let ds = data::build(d, &ctx)?;
            let batch_size = spec.spec.model.batch_size;
            let mut parts: Vec<ActivationCache> = Vec::new();
            for start in (0..ds.n_sequences()).step_by(batch_size) {
                let end = (start + batch_size).min(ds.n_sequences());
                let tokens = ds.tokens.slice(ndarray::s![start..end, ..]).to_owned();
                let mut hooks = Hooks::caching(filter.clone());
                loaded.model.forward(&tokens, &mut hooks)?;
                parts.push(hooks.take_cache());
            }
            let cache = concat_batches(parts)?;
            return Ok((
                Batch {
                    tokens: ds.tokens,
                    lengths: ds.lengths,
                },
                cache,
            ));
        }
    };
    let mut hooks = Hooks::caching(filter);
    loaded.model.forward(&batch.tokens, &mut hooks)?;
    Ok((batch, hooks.take_cache()))
}

/// One cache from per-batch caches: every point concatenated along the batch axis (all
/// batches of a dataset share its padded width, so only that axis differs).
fn concat_batches(parts: Vec<ActivationCache>) -> Result<ActivationCache> {
    let mut out = ActivationCache::default();
    let Some(first) = parts.first() else {
        return Ok(out);
    };
    for name in first.names() {
        let arrays: Vec<ArrayD<f32>> = parts
            .iter()
            .map(|p| p.get(&name).cloned())
            .collect::<Result<_>>()?;
        let views: Vec<_> = arrays.iter().map(|a| a.view()).collect();
        let joined = ndarray::concatenate(Axis(0), &views)
            .map_err(|e| Error::Other(format!("internal error: joining batches of {name}: {e}")))?;
        out.insert(name, joined);
    }
    Ok(out)
}

/// Reads a JSON list of equal-length token-id lists and checks it against the model.
pub fn read_token_file(path: &Path, cfg: &ModelConfig) -> Result<Array2<u32>> {
    let bad = |msg: String| Error::Other(format!("{}: {msg}", path.display()));
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    // i64 first, so a negative id gets our message rather than serde's.
    let rows: Vec<Vec<i64>> = serde_json::from_str(&text)
        .map_err(|e| bad(format!("expected a JSON list of token-id lists ({e})")))?;
    let width = rows.first().map(Vec::len).unwrap_or(0);
    if width == 0 {
        return Err(bad(
            "no tokens (expected a non-empty list of non-empty lists)".into(),
        ));
    }
    if let Some((i, r)) = rows.iter().enumerate().find(|(_, r)| r.len() != width) {
        return Err(bad(format!(
            "row {i} has {} tokens but row 0 has {width}; rows must have equal length (pad them)",
            r.len()
        )));
    }
    if width > cfg.n_ctx {
        return Err(bad(format!(
            "rows have {width} tokens, more than the model's context n_ctx = {}",
            cfg.n_ctx
        )));
    }
    let mut ids = Vec::with_capacity(rows.len() * width);
    for (i, r) in rows.iter().enumerate() {
        for (j, &t) in r.iter().enumerate() {
            if t < 0 || t as u64 >= cfg.d_vocab as u64 {
                return Err(bad(format!(
                    "token id {t} at row {i}, position {j} is outside the vocabulary (d_vocab = {})",
                    cfg.d_vocab
                )));
            }
            ids.push(t as u32);
        }
    }
    Ok(Array2::from_shape_vec((rows.len(), width), ids).expect("rows checked equal length"))
}

/// The `__metadata__` entry: which model (and its sha256), which processing switches, and
/// with `--spec`, which spec and batch size.
fn metadata(src: &Source) -> Result<HashMap<String, String>> {
    let p = src.processing;
    let flag = |b: bool| b.to_string();
    let mut m = HashMap::from([
        // torch's loader does not need it, but HF tools expect the key.
        ("format".to_string(), "pt".to_string()),
        ("model".to_string(), src.label.clone()),
        // Absolute, so the file still says where it came from when moved.
        (
            "model_path".to_string(),
            std::fs::canonicalize(&src.files.dir)
                .unwrap_or_else(|_| src.files.dir.clone())
                .display()
                .to_string(),
        ),
        (
            "weights_sha256".to_string(),
            model::checkpoint::sha256_file(&src.files.weights)?,
        ),
        ("fold_ln".to_string(), flag(p.fold_ln)),
        (
            "center_writing_weights".to_string(),
            flag(p.center_writing_weights),
        ),
        ("center_unembed".to_string(), flag(p.center_unembed)),
        ("fold_value_biases".to_string(), flag(p.fold_value_biases)),
        (
            "hookgraph_version".to_string(),
            env!("CARGO_PKG_VERSION").to_string(),
        ),
    ]);
    if let Some(spec) = &src.spec {
        m.insert(
            "spec".into(),
            std::fs::canonicalize(&spec.path)
                .unwrap_or_else(|_| spec.path.clone())
                .display()
                .to_string(),
        );
        m.insert("batch_size".into(), spec.spec.model.batch_size.to_string());
    }
    Ok(m)
}

fn f32_bytes(a: &ArrayD<f32>) -> Vec<u8> {
    // `iter` walks the logical (row-major) order whatever the memory layout.
    a.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The safetensors file: every cached activation (f32) plus `tokens` and `lengths` (i64)
/// and `mask` (bool).
fn serialize(
    batch: &Batch,
    cache: &ActivationCache,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let err = |e: safetensors::SafeTensorError| Error::Other(format!("safetensors: {e}"));
    let tokens = &batch.tokens;
    let tok_bytes: Vec<u8> = tokens
        .iter()
        .flat_map(|&t| i64::from(t).to_le_bytes())
        .collect();
    let len_bytes: Vec<u8> = batch
        .lengths
        .iter()
        .flat_map(|&l| (l as i64).to_le_bytes())
        .collect();
    let mask_bytes: Vec<u8> = tokens
        .indexed_iter()
        .map(|((s, p), _)| u8::from(p < batch.lengths[s]))
        .collect();
    let act_bytes: Vec<(String, Vec<usize>, Vec<u8>)> = cache
        .iter()
        .map(|(n, a)| (n.clone(), a.shape().to_vec(), f32_bytes(a)))
        .collect();
    let mut views = vec![
        (
            TOKENS.to_string(),
            TensorView::new(Dtype::I64, tokens.shape().to_vec(), &tok_bytes).map_err(err)?,
        ),
        (
            LENGTHS.to_string(),
            TensorView::new(Dtype::I64, vec![batch.lengths.len()], &len_bytes).map_err(err)?,
        ),
        (
            MASK.to_string(),
            TensorView::new(Dtype::BOOL, tokens.shape().to_vec(), &mask_bytes).map_err(err)?,
        ),
    ];
    for (name, shape, bytes) in &act_bytes {
        views.push((
            name.clone(),
            TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(err)?,
        ));
    }
    safetensors::tensor::serialize(views, &Some(metadata)).map_err(err)
}

fn print_summary(out: &Path, batch: &Batch, cache: &ActivationCache) {
    println!(
        "wrote {} ({} tensors)",
        out.display(),
        cache.len() + 3 // + tokens, lengths, mask
    );
    let width = cache
        .iter()
        .map(|(n, _)| n.len())
        .chain([TOKENS.len()])
        .max()
        .unwrap_or(0);
    let shape = batch.tokens.shape();
    println!("  {TOKENS:width$}  i64 {shape:?}");
    println!("  {LENGTHS:width$}  i64 [{}]", shape[0]);
    println!("  {MASK:width$}  bool {shape:?}");
    for (name, a) in cache.iter() {
        println!("  {name:width$}  f32 {:?}", a.shape());
    }
}
