//! `runner cache`: run a model once and save chosen activations as safetensors; or, with
//! `--effective-embeddings`, save the notebook's effective embeddings (`docs/metrics.md` §3:
//! `W_E`, `W_EE`, `W_EE0`, `W_EE0A`) instead.
//!
//! Owns: the `cache` subcommand's arguments, reading token files, tokenizing `--prompt`s,
//! and writing the activation file (chosen hook points + `logits` + `tokens`, with metadata
//! saying which model and processing produced them). Must not: compute anything about the
//! model itself; the forward pass and hook catalogue live in `model` and `hooks`, the
//! effective embeddings in `circuits`.
//!
//! The file is what TransformerLens's `run_with_cache` would give for the same names: f32
//! tensors in TL's shapes (exactly what [`ActivationCache`] holds), so Python can compare
//! with `safetensors.torch.load_file` directly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use ndarray::{Array2, ArrayD};
use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::device::{with_device, DeviceChoice, OnDevice};
use crate::error::{Error, Result};
use crate::hooks::{ActivationCache, HookFilter, Hooks, LOGITS};
use crate::model::{self, CheckpointFiles, ModelConfig, ModelSource, Processing};
use crate::output::write_atomic;
use crate::seam::SeamDevice;
use crate::tokenizer;

/// The name the input token ids are saved under (I64, `[batch, seq]`).
pub const TOKENS: &str = "tokens";

#[derive(clap::Args, Debug, Clone)]
pub struct CacheArgs {
    /// Checkpoint directory (HF layout) or hub id (`gpt2`, `gpt2-medium`, ...).
    #[arg(long)]
    pub model: String,
    /// JSON file with a list of equal-length token-id lists.
    #[arg(
        long,
        conflicts_with = "prompt",
        required_unless_present_any = ["prompt", "effective_embeddings"]
    )]
    pub tokens: Option<PathBuf>,
    /// Text to run (BOS prepended); repeat for a batch, right-padded like TL's `to_tokens`.
    #[arg(long)]
    pub prompt: Vec<String>,
    /// Hook point names or globs (`blocks.*.attn.hook_pattern`); `logits` is always saved.
    #[arg(long, num_args = 1.., required_unless_present = "effective_embeddings")]
    pub hooks: Vec<String>,
    /// Save the effective embeddings W_E, W_EE, W_EE0, W_EE0A ([d_vocab, d_model] each,
    /// docs/metrics.md §3) of the processed weights instead of activations; no forward pass.
    #[arg(long, conflicts_with_all = ["tokens", "prompt", "hooks"])]
    pub effective_embeddings: bool,
    /// Output file (`.safetensors`), written atomically. An existing file is replaced only
    /// with `--force`; the command's own inputs (checkpoint, tokenizer and token files) never.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` if it exists (never an input of this command, nor a non-regular file).
    #[arg(long)]
    pub force: bool,
    /// Directory with the tokenizer files, if not the checkpoint's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    /// Skip TL's fold_ln.
    #[arg(long)]
    pub no_fold_ln: bool,
    /// Skip TL's center_writing_weights.
    #[arg(long)]
    pub no_center_writing_weights: bool,
    /// Skip TL's center_unembed.
    #[arg(long)]
    pub no_center_unembed: bool,
    /// Skip TL's fold_value_biases.
    #[arg(long)]
    pub no_fold_value_biases: bool,
    /// Skip all four processing steps (TL's `from_pretrained_no_processing`).
    #[arg(long)]
    pub no_processing: bool,
    /// Where to run the model.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
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

/// Where the input tokens come from.
enum Input {
    /// Already read and checked against the config.
    Ids(Array2<u32>),
    /// Texts, tokenized once the model's tokenizer is loaded.
    Prompts(Vec<String>),
}

/// Everything the command reads, which `--out` must never be: the checkpoint directory's
/// files, the tokenizer directory's, and the token file.
fn inputs(args: &CacheArgs, files: &CheckpointFiles) -> Vec<PathBuf> {
    let mut v = vec![files.config.clone(), files.weights.clone()];
    for dir in [Some(files.dir.as_path()), args.tokenizer.as_deref()]
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
    if args.effective_embeddings {
        return effective_embeddings(args);
    }
    let files = ModelSource::parse(&args.model).resolve()?;
    crate::outdir::check_out_file(&args.out, &inputs(args, &files), args.force)?;
    // Everything the user typed is checked against the config before the (slow) load.
    let cfg = ModelConfig::from_file(&files.config)?;
    let mut filter = HookFilter::checked(&args.hooks, cfg.n_layers)?;
    filter.extend([LOGITS.to_string()]);
    let input = match &args.tokens {
        Some(path) => Input::Ids(read_token_file(path, &cfg)?),
        None => Input::Prompts(args.prompt.clone()),
    };
    let processing = args.processing();

    let (tokens, activations) = with_device(
        args.device.resolve()?,
        CacheRun {
            files: files.clone(),
            processing,
            args,
            input,
            filter,
        },
    )?;

    let metadata = metadata(args, &files, processing);
    let bytes = serialize(&tokens, &activations, metadata)?;
    write_atomic(&args.out, &bytes)?;
    print_summary(&args.out, &tokens, &activations);
    Ok(ExitCode::SUCCESS)
}

/// `--effective-embeddings`: the four matrices from the processed host weights (no device,
/// no forward pass), written atomically with the same metadata as an activation file.
fn effective_embeddings(args: &CacheArgs) -> Result<ExitCode> {
    let files = ModelSource::parse(&args.model).resolve()?;
    crate::outdir::check_out_file(&args.out, &inputs(args, &files), args.force)?;
    let cfg = ModelConfig::from_file(&files.config)?;
    let processing = args.processing();
    let mut params = model::checkpoint::load_params(&files.weights, &cfg)?;
    model::process::process(&mut params, processing);
    let emb = crate::circuits::effective_embeddings(&params, &cfg);
    let named = emb.into_named();
    let err = |e: safetensors::SafeTensorError| Error::Other(format!("safetensors: {e}"));
    let bytes: Vec<(&str, Vec<usize>, Vec<u8>)> = named
        .iter()
        .map(|(n, a)| {
            (
                *n,
                a.shape().to_vec(),
                a.iter().flat_map(|x| x.to_le_bytes()).collect(),
            )
        })
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
    let mut meta = metadata(args, &files, processing);
    meta.insert(
        "contents".into(),
        "effective embeddings (docs/metrics.md §3)".into(),
    );
    let out = safetensors::tensor::serialize(views, &Some(meta)).map_err(err)?;
    write_atomic(&args.out, &out)?;
    println!("wrote {} ({} tensors)", args.out.display(), named.len());
    for (n, a) in &named {
        println!("  {n:6}  f32 {:?}", a.shape());
    }
    Ok(ExitCode::SUCCESS)
}

/// The command's work, on whichever device was picked.
struct CacheRun<'a> {
    files: CheckpointFiles,
    processing: Processing,
    args: &'a CacheArgs,
    input: Input,
    filter: HookFilter,
}

impl OnDevice for CacheRun<'_> {
    type Output = (Array2<u32>, ActivationCache);
    fn run<D: SeamDevice>(self, dev: D) -> Result<Self::Output> {
        run_on(
            dev,
            self.files,
            self.processing,
            self.args,
            self.input,
            self.filter,
        )
    }
}

/// Loads the model on `dev`, tokenizes prompts if needed, and runs one forward pass.
fn run_on<D: SeamDevice>(
    dev: D,
    files: CheckpointFiles,
    processing: Processing,
    args: &CacheArgs,
    input: Input,
    filter: HookFilter,
) -> Result<(Array2<u32>, ActivationCache)> {
    let loaded = model::load(dev, files, processing, args.tokenizer.as_deref())?;
    let tokens = match input {
        Input::Ids(ids) => ids,
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
            tokenizer::batch_tokens(&encoded, Some(bos), bos, n_ctx)
        }
    };
    let mut hooks = Hooks::caching(filter);
    loaded.model.forward(&tokens, &mut hooks)?;
    Ok((tokens, hooks.take_cache()))
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

fn metadata(args: &CacheArgs, files: &CheckpointFiles, p: Processing) -> HashMap<String, String> {
    let flag = |b: bool| b.to_string();
    HashMap::from([
        // torch's loader does not need it, but HF tools expect the key.
        ("format".to_string(), "pt".to_string()),
        ("model".to_string(), args.model.clone()),
        // Absolute, so the file still says where it came from when moved.
        (
            "model_path".to_string(),
            std::fs::canonicalize(&files.dir)
                .unwrap_or_else(|_| files.dir.clone())
                .display()
                .to_string(),
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
    ])
}

fn f32_bytes(a: &ArrayD<f32>) -> Vec<u8> {
    // `iter` walks the logical (row-major) order whatever the memory layout.
    a.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The safetensors file: every cached activation (f32) plus `tokens` (i64).
fn serialize(
    tokens: &Array2<u32>,
    cache: &ActivationCache,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    let err = |e: safetensors::SafeTensorError| Error::Other(format!("safetensors: {e}"));
    let tok_bytes: Vec<u8> = tokens
        .iter()
        .flat_map(|&t| i64::from(t).to_le_bytes())
        .collect();
    let act_bytes: Vec<(String, Vec<usize>, Vec<u8>)> = cache
        .iter()
        .map(|(n, a)| (n.clone(), a.shape().to_vec(), f32_bytes(a)))
        .collect();
    let mut views = vec![(
        TOKENS.to_string(),
        TensorView::new(Dtype::I64, tokens.shape().to_vec(), &tok_bytes).map_err(err)?,
    )];
    for (name, shape, bytes) in &act_bytes {
        views.push((
            name.clone(),
            TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(err)?,
        ));
    }
    safetensors::tensor::serialize(views, &Some(metadata)).map_err(err)
}

fn print_summary(out: &Path, tokens: &Array2<u32>, cache: &ActivationCache) {
    println!(
        "wrote {} ({} tensors)",
        out.display(),
        cache.len() + 1 // + tokens
    );
    let width = cache
        .iter()
        .map(|(n, _)| n.len())
        .chain([TOKENS.len()])
        .max()
        .unwrap_or(0);
    println!("  {TOKENS:width$}  i64 {:?}", tokens.shape());
    for (name, a) in cache.iter() {
        println!("  {name:width$}  f32 {:?}", a.shape());
    }
}
