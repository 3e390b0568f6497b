//! Reading a GPT-2 checkpoint (`model.safetensors`) into TransformerLens-layout parameters.
//!
//! Owns: the mapping from HuggingFace's GPT-2 tensor names (`wte`, `h.N.attn.c_attn`, ...,
//! with or without the `transformer.` prefix) to TransformerLens's state-dict layout
//! ([`Params`]), dtype conversion (F32, and F16/BF16/F64 converted on load), and shape checks
//! against `config.json`. Must not: process weights (see `process`) or touch a device.
//!
//! Every error names the file and the problem in one line: a truncated file, a missing
//! tensor and a shape that disagrees with the config are user errors, never panics.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ndarray::{Array1, ArrayD, ArrayViewD, IxDyn};
use safetensors::{Dtype, SafeTensors};

use super::config::ModelConfig;
use crate::error::{Error, Result};

/// Parameter arrays are reference-counted so the model's CPU linear layers can read the
/// same buffers the metrics read, instead of holding a second copy.
pub type W1 = ndarray::ArcArray1<f32>;
pub type W2 = ndarray::ArcArray2<f32>;
pub type W3 = ndarray::ArcArray<f32, ndarray::Ix3>;

/// A LayerNorm's affine part (`w`, `b`), present until `fold_ln` folds it away.
#[derive(Debug, Clone)]
pub struct LayerNormParams {
    /// TL `w` (HF `ln_*.weight`), `[d_model]`.
    pub w: W1,
    /// TL `b` (HF `ln_*.bias`), `[d_model]`.
    pub b: W1,
}

/// One attention layer, split per head as TransformerLens stores it.
#[derive(Debug, Clone)]
pub struct AttnParams {
    /// TL `W_Q` `[n_heads, d_model, d_head]` (HF `c_attn.weight[:, :D]`).
    pub w_q: W3,
    pub w_k: W3,
    pub w_v: W3,
    /// TL `b_Q` `[n_heads, d_head]` (HF `c_attn.bias[:D]`).
    pub b_q: W2,
    pub b_k: W2,
    pub b_v: W2,
    /// TL `W_O` `[n_heads, d_head, d_model]` (HF `attn.c_proj.weight`).
    pub w_o: W3,
    /// TL `b_O` `[d_model]` (HF `attn.c_proj.bias`).
    pub b_o: W1,
}

/// One MLP layer.
#[derive(Debug, Clone)]
pub struct MlpParams {
    /// TL `W_in` `[d_model, d_mlp]` (HF `mlp.c_fc.weight`).
    pub w_in: W2,
    pub b_in: W1,
    /// TL `W_out` `[d_mlp, d_model]` (HF `mlp.c_proj.weight`).
    pub w_out: W2,
    pub b_out: W1,
}

/// One transformer block (`blocks.L` in TL, `h.L` in HF).
#[derive(Debug, Clone)]
pub struct BlockParams {
    /// `None` once folded (TL's LayerNormPre).
    pub ln1: Option<LayerNormParams>,
    pub attn: AttnParams,
    pub ln2: Option<LayerNormParams>,
    pub mlp: MlpParams,
}

/// All of GPT-2's parameters on the host, in TransformerLens's layout and naming.
#[derive(Debug, Clone)]
pub struct Params {
    /// TL `embed.W_E` `[d_vocab, d_model]` (HF `wte.weight`).
    pub w_e: W2,
    /// TL `pos_embed.W_pos` `[n_ctx, d_model]` (HF `wpe.weight`).
    pub w_pos: W2,
    pub blocks: Vec<BlockParams>,
    /// TL `ln_final` (HF `ln_f`); `None` once folded.
    pub ln_final: Option<LayerNormParams>,
    /// TL `unembed.W_U` `[d_model, d_vocab]` (HF `lm_head.weight`ᵀ, tied to `wte`).
    pub w_u: W2,
    /// TL `unembed.b_U` `[d_vocab]` (zero in GPT-2 until processing).
    pub b_u: W1,
}

impl Params {
    /// Every parameter under its TransformerLens state-dict name, for comparisons and export.
    pub fn named(&self) -> Vec<(String, ArrayViewD<'_, f32>)> {
        let mut out: Vec<(String, ArrayViewD<'_, f32>)> = vec![
            ("embed.W_E".into(), self.w_e.view().into_dyn()),
            ("pos_embed.W_pos".into(), self.w_pos.view().into_dyn()),
        ];
        for (l, b) in self.blocks.iter().enumerate() {
            let p = |s: &str| format!("blocks.{l}.{s}");
            if let Some(ln) = &b.ln1 {
                out.push((p("ln1.w"), ln.w.view().into_dyn()));
                out.push((p("ln1.b"), ln.b.view().into_dyn()));
            }
            let a = &b.attn;
            out.push((p("attn.W_Q"), a.w_q.view().into_dyn()));
            out.push((p("attn.W_K"), a.w_k.view().into_dyn()));
            out.push((p("attn.W_V"), a.w_v.view().into_dyn()));
            out.push((p("attn.W_O"), a.w_o.view().into_dyn()));
            out.push((p("attn.b_Q"), a.b_q.view().into_dyn()));
            out.push((p("attn.b_K"), a.b_k.view().into_dyn()));
            out.push((p("attn.b_V"), a.b_v.view().into_dyn()));
            out.push((p("attn.b_O"), a.b_o.view().into_dyn()));
            if let Some(ln) = &b.ln2 {
                out.push((p("ln2.w"), ln.w.view().into_dyn()));
                out.push((p("ln2.b"), ln.b.view().into_dyn()));
            }
            out.push((p("mlp.W_in"), b.mlp.w_in.view().into_dyn()));
            out.push((p("mlp.b_in"), b.mlp.b_in.view().into_dyn()));
            out.push((p("mlp.W_out"), b.mlp.w_out.view().into_dyn()));
            out.push((p("mlp.b_out"), b.mlp.b_out.view().into_dyn()));
        }
        if let Some(ln) = &self.ln_final {
            out.push(("ln_final.w".into(), ln.w.view().into_dyn()));
            out.push(("ln_final.b".into(), ln.b.view().into_dyn()));
        }
        out.push(("unembed.W_U".into(), self.w_u.view().into_dyn()));
        out.push(("unembed.b_U".into(), self.b_u.view().into_dyn()));
        out
    }
}

/// Reads `model.safetensors` and converts it to [`Params`], checking every shape.
pub fn load_params(path: &Path, cfg: &ModelConfig) -> Result<Params> {
    // Read, not memory-mapped: a mapped file that shrinks underneath us (another process
    // rewriting it, a download restarting) kills the process with SIGBUS on the next page
    // touched, with no message. A read sees whatever length the file has and safetensors
    // then reports a truncated file. The cost is one copy from the page cache (measured on
    // a GPT-2-small-sized file in the verify note: docs in README "Guarantees").
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    // Test hook: a test shrinks the file here (a mapped file would now kill the process).
    crate::interrupt::pause_at("weights");
    params_from_bytes(&bytes, cfg).map_err(|msg| Error::Checkpoint {
        path: path.to_path_buf(),
        msg,
    })
}

/// The tensors of a safetensors file by HF name, with the `transformer.` prefix removed.
struct HfTensors<'a> {
    st: SafeTensors<'a>,
    names: HashMap<String, String>,
}

impl<'a> HfTensors<'a> {
    fn new(bytes: &'a [u8]) -> std::result::Result<Self, String> {
        let st = SafeTensors::deserialize(bytes).map_err(describe)?;
        let names = st
            .names()
            .into_iter()
            .map(|n| {
                (
                    n.strip_prefix("transformer.").unwrap_or(n).to_string(),
                    n.clone(),
                )
            })
            .collect();
        Ok(HfTensors { st, names })
    }

    /// Refuses tensors that GPT-2 with `n_layers` layers does not have (`h.7.*` on a
    /// 2-layer config, a value head, a misspelt name), naming them: silently ignoring them
    /// would hide a checkpoint that does not match its config. HF's causal-mask buffers
    /// (`h.N.attn.bias`, `h.N.attn.masked_bias`) of existing layers are GPT-2's own.
    fn check_no_strays(&self, n_layers: usize) -> std::result::Result<(), String> {
        const BLOCK: &[&str] = &[
            "ln_1.weight",
            "ln_1.bias",
            "attn.c_attn.weight",
            "attn.c_attn.bias",
            "attn.c_proj.weight",
            "attn.c_proj.bias",
            "ln_2.weight",
            "ln_2.bias",
            "mlp.c_fc.weight",
            "mlp.c_fc.bias",
            "mlp.c_proj.weight",
            "mlp.c_proj.bias",
            "attn.bias",
            "attn.masked_bias",
        ];
        const TOP: &[&str] = &[
            "wte.weight",
            "wpe.weight",
            "ln_f.weight",
            "ln_f.bias",
            "lm_head.weight",
        ];
        let known = |n: &str| {
            if TOP.contains(&n) {
                return true;
            }
            let Some(rest) = n.strip_prefix("h.") else {
                return false;
            };
            let Some((l, field)) = rest.split_once('.') else {
                return false;
            };
            // Canonical layer numbers only: `h.01.*` is not layer 1.
            l.parse::<usize>().is_ok_and(|l| {
                l < n_layers && l.to_string() == rest[..rest.len() - field.len() - 1]
            }) && BLOCK.contains(&field)
        };
        let mut strays: Vec<&String> = self
            .names
            .values()
            .filter(|full| {
                let n = full.strip_prefix("transformer.").unwrap_or(full);
                !known(n)
            })
            .collect();
        if strays.is_empty() {
            return Ok(());
        }
        strays.sort();
        let shown: Vec<&str> = strays.iter().take(8).map(|s| s.as_str()).collect();
        Err(format!(
            "{} tensor(s) that a GPT-2 of config.json's n_layer = {n_layers} does not have: {}{} (a checkpoint for another config, or extra heads: remove them from the file)",
            strays.len(),
            shown.join(", "),
            if strays.len() > shown.len() { ", ..." } else { "" }
        ))
    }

    fn has(&self, name: &str) -> bool {
        self.names.contains_key(name)
    }

    /// Reads tensor `name` as f32 and checks it has `shape`.
    fn get(&self, name: &str, shape: &[usize]) -> std::result::Result<ArrayD<f32>, String> {
        let full = self
            .names
            .get(name)
            .ok_or_else(|| format!("missing tensor '{name}'"))?;
        let view = self
            .st
            .tensor(full)
            .map_err(|e| format!("tensor '{name}': {e}"))?;
        if view.shape() != shape {
            return Err(format!(
                "tensor '{name}' has shape {:?} but config.json implies {:?}",
                view.shape(),
                shape
            ));
        }
        let data =
            to_f32(view.dtype(), view.data()).map_err(|e| format!("tensor '{name}': {e}"))?;
        ArrayD::from_shape_vec(IxDyn(shape), data).map_err(|e| format!("tensor '{name}': {e}"))
    }
}

/// A one-line reason for a file safetensors cannot read; its own messages are bare enum
/// names (`MetadataIncompleteBuffer`) that do not tell a user their download was cut short.
fn describe(e: safetensors::SafeTensorError) -> String {
    use safetensors::SafeTensorError as E;
    let why = match &e {
        E::HeaderTooSmall | E::InvalidHeaderLength => {
            "the file is shorter than its header says (truncated?)"
        }
        E::MetadataIncompleteBuffer => {
            "the tensor data is not the size the header says (truncated or corrupted?)"
        }
        E::InvalidHeader
        | E::InvalidHeaderStart
        | E::InvalidHeaderDeserialization
        | E::HeaderTooLarge
        | E::JsonError(_) => "the header is not safetensors JSON (corrupted, or another format?)",
        _ => "its header is inconsistent",
    };
    format!("not a valid safetensors file: {why} ({e})")
}

/// Little-endian bytes of `dtype` to f32.
fn to_f32(dtype: Dtype, bytes: &[u8]) -> std::result::Result<Vec<f32>, String> {
    Ok(match dtype {
        Dtype::F32 => bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => bytes
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => bytes
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::F64 => bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("chunk of 8")) as f32)
            .collect(),
        other => return Err(format!("dtype {other:?} is not a float type")),
    })
}

fn dim<const N: usize>(a: ArrayD<f32>) -> ndarray::ArcArray<f32, ndarray::Dim<[usize; N]>>
where
    ndarray::Dim<[usize; N]>: ndarray::Dimension,
{
    a.into_dimensionality()
        .expect("shape was checked on load")
        .into_shared()
}

/// Converts the HF tensors to TL layout. Errors are one-line messages without the path.
pub fn params_from_bytes(bytes: &[u8], cfg: &ModelConfig) -> std::result::Result<Params, String> {
    let t = HfTensors::new(bytes)?;
    let (d, h, dh, m, v) = (cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_mlp, cfg.d_vocab);
    let ln = |name: &str| -> std::result::Result<LayerNormParams, String> {
        Ok(LayerNormParams {
            w: dim(t.get(&format!("{name}.weight"), &[d])?),
            b: dim(t.get(&format!("{name}.bias"), &[d])?),
        })
    };
    let w_e: W2 = dim(t.get("wte.weight", &[v, d])?);
    let w_pos: W2 = dim(t.get("wpe.weight", &[cfg.n_ctx, d])?);
    let mut blocks = Vec::with_capacity(cfg.n_layers);
    for l in 0..cfg.n_layers {
        let p = |s: &str| format!("h.{l}.{s}");
        // Conv1D c_attn: [d_model, 3 * d_model] = Q | K | V along the last axis, each
        // split into heads as [d_model, n_heads, d_head]; TL wants [n_heads, d_model, d_head].
        let c_attn: W2 = dim(t.get(&p("attn.c_attn.weight"), &[d, 3 * d])?);
        let c_attn_b: W1 = dim(t.get(&p("attn.c_attn.bias"), &[3 * d])?);
        let split_w = |i: usize| -> W3 {
            let part = c_attn.slice(ndarray::s![.., i * d..(i + 1) * d]).to_owned();
            let per_head = part.into_shape_with_order((d, h, dh)).expect("d = h * dh");
            per_head
                .permuted_axes([1, 0, 2])
                .as_standard_layout()
                .to_owned()
                .into_shared()
        };
        let split_b = |i: usize| -> W2 {
            let part = c_attn_b.slice(ndarray::s![i * d..(i + 1) * d]).to_owned();
            part.into_shape_with_order((h, dh))
                .expect("d = h * dh")
                .into_shared()
        };
        let c_proj: W2 = dim(t.get(&p("attn.c_proj.weight"), &[d, d])?);
        blocks.push(BlockParams {
            ln1: Some(ln(&p("ln_1"))?),
            attn: AttnParams {
                w_q: split_w(0),
                w_k: split_w(1),
                w_v: split_w(2),
                b_q: split_b(0),
                b_k: split_b(1),
                b_v: split_b(2),
                // c_proj's input axis is the concatenation of heads: (n_heads d_head).
                w_o: c_proj
                    .into_shape_with_order((h, dh, d))
                    .expect("d = h * dh"),
                b_o: dim(t.get(&p("attn.c_proj.bias"), &[d])?),
            },
            ln2: Some(ln(&p("ln_2"))?),
            mlp: MlpParams {
                w_in: dim(t.get(&p("mlp.c_fc.weight"), &[d, m])?),
                b_in: dim(t.get(&p("mlp.c_fc.bias"), &[m])?),
                w_out: dim(t.get(&p("mlp.c_proj.weight"), &[m, d])?),
                b_out: dim(t.get(&p("mlp.c_proj.bias"), &[d])?),
            },
        });
    }
    if t.has(&format!("h.{}.ln_1.weight", cfg.n_layers)) {
        return Err(format!(
            "checkpoint has more layers than config.json's n_layer = {}",
            cfg.n_layers
        ));
    }
    t.check_no_strays(cfg.n_layers)?;
    // lm_head is tied to wte in every released GPT-2; a separate one is honoured.
    let w_u = if t.has("lm_head.weight") {
        let lm: W2 = dim(t.get("lm_head.weight", &[v, d])?);
        lm.reversed_axes()
            .as_standard_layout()
            .to_owned()
            .into_shared()
    } else {
        w_e.t().as_standard_layout().to_owned().into_shared()
    };
    Ok(Params {
        w_e,
        w_pos,
        blocks,
        ln_final: Some(ln("ln_f")?),
        w_u,
        b_u: Array1::zeros(v).into_shared(),
    })
}

/// The sha256 of a file, hex-encoded (for the run manifest).
pub fn sha256_file(path: &Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| Error::io(path, e))?;
    Ok(hex::encode(h.finalize()))
}

/// The files of a checkpoint directory in HuggingFace layout.
#[derive(Debug, Clone)]
pub struct CheckpointFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: PathBuf,
}

impl CheckpointFiles {
    /// Points at `dir/config.json` and `dir/model.safetensors`, checking both exist.
    pub fn in_dir(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::ModelNotFound(format!(
                "{}: no such directory (expected a GPT-2 checkpoint directory with config.json and model.safetensors)",
                dir.display()
            )));
        }
        let files = CheckpointFiles {
            dir: dir.to_path_buf(),
            config: dir.join("config.json"),
            weights: dir.join("model.safetensors"),
        };
        for f in [&files.config, &files.weights] {
            if !f.is_file() {
                return Err(Error::ModelNotFound(format!(
                    "{}: not found (a GPT-2 checkpoint directory needs config.json and model.safetensors)",
                    f.display()
                )));
            }
        }
        Ok(files)
    }
}
