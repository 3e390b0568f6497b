//! GPT-2's `config.json`, read and validated.
//!
//! Owns: turning a HuggingFace GPT-2 config into [`ModelConfig`], the shape facts every
//! other module reads (never constants: every GPT-2 size loads). Must not: touch weights.
//! Checkpoints whose switches would change the forward pass away from GPT-2's are rejected
//! here, so nothing downstream computes something else silently.

use std::path::Path;

use serde::Deserialize;

use crate::error::{Error, Result};

/// The fields of HF's `GPT2Config` that shape the forward pass.
#[derive(Debug, Clone, Deserialize)]
struct HfGpt2Config {
    model_type: Option<String>,
    n_layer: Option<usize>,
    n_head: Option<usize>,
    n_embd: Option<usize>,
    n_positions: Option<usize>,
    /// Older files name the context length `n_ctx`.
    n_ctx: Option<usize>,
    vocab_size: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    activation_function: Option<String>,
    /// `null` means 4 * n_embd.
    n_inner: Option<usize>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    reorder_and_upcast_attn: bool,
    #[serde(default = "yes")]
    scale_attn_weights: bool,
}

fn yes() -> bool {
    true
}

/// Shapes and constants of a GPT-2-family model, in TransformerLens's names.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelConfig {
    pub n_layers: usize,
    pub n_heads: usize,
    pub d_model: usize,
    pub d_head: usize,
    pub d_mlp: usize,
    pub d_vocab: usize,
    pub n_ctx: usize,
    /// LayerNorm epsilon.
    pub eps: f64,
    /// BOS id; GPT-2 also pads with it.
    pub bos_token_id: u32,
}

impl ModelConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|msg| Error::Config {
            path: path.to_path_buf(),
            msg,
        })
    }

    /// Parses a config from JSON text; the error is a one-line message.
    pub fn from_json(text: &str) -> std::result::Result<Self, String> {
        let hf: HfGpt2Config =
            serde_json::from_str(text).map_err(|e| format!("malformed JSON: {e}"))?;
        if let Some(t) = &hf.model_type {
            if t != "gpt2" {
                return Err(format!(
                    "model_type is '{t}', hookgraph supports GPT-2 ('gpt2') only"
                ));
            }
        }
        let need =
            |v: Option<usize>, name: &str| v.ok_or_else(|| format!("missing field '{name}'"));
        let n_layers = need(hf.n_layer, "n_layer")?;
        let n_heads = need(hf.n_head, "n_head")?;
        let d_model = need(hf.n_embd, "n_embd")?;
        let n_ctx = hf
            .n_positions
            .or(hf.n_ctx)
            .ok_or_else(|| "missing field 'n_positions'".to_string())?;
        let d_vocab = need(hf.vocab_size, "vocab_size")?;
        let eps = hf
            .layer_norm_epsilon
            .ok_or_else(|| "missing field 'layer_norm_epsilon'".to_string())?;
        match hf.activation_function.as_deref() {
            Some("gelu_new") | None => {}
            Some(other) => {
                return Err(format!(
                    "activation_function is '{other}'; GPT-2 uses 'gelu_new' (tanh GELU)"
                ))
            }
        }
        if hf.scale_attn_by_inverse_layer_idx {
            return Err("scale_attn_by_inverse_layer_idx = true is not GPT-2's attention".into());
        }
        if hf.reorder_and_upcast_attn {
            return Err("reorder_and_upcast_attn = true is not supported".into());
        }
        if !hf.scale_attn_weights {
            return Err("scale_attn_weights = false is not GPT-2's attention".into());
        }
        if n_layers == 0 || n_heads == 0 || d_model == 0 || d_vocab == 0 || n_ctx == 0 {
            return Err("n_layer, n_head, n_embd, vocab_size and n_positions must be > 0".into());
        }
        // Found by fuzzing: n_layer = 2^64-1 overflowed a capacity in the loader. Far above
        // any GPT-2 (XL: 48 layers, 25 heads, 1600 wide, 1024 positions, 50257 tokens), far
        // below sizes whose products overflow.
        for (name, v, max) in [
            ("n_layer", n_layers, 1 << 10),
            ("n_head", n_heads, 1 << 10),
            ("n_embd", d_model, 1 << 16),
            ("n_positions", n_ctx, 1 << 20),
            ("vocab_size", d_vocab, 1 << 22),
            ("n_inner", hf.n_inner.unwrap_or(0), 1 << 18),
        ] {
            if v > max {
                return Err(format!(
                    "{name} = {v} is larger than hookgraph accepts ({max})"
                ));
            }
        }
        // ε only keeps LayerNorm's division away from zero: GPT-2 uses 1e-5. A value near or
        // above the activations' variance (>= 1) flattens every LayerNorm (1e300 gives ln V
        // everywhere), a negative one makes NaN; neither is a model anyone trained.
        if !(eps.is_finite() && (0.0..1.0).contains(&eps)) {
            return Err(format!(
                "layer_norm_epsilon = {eps} is outside what GPT-2 can mean (0 <= eps < 1; GPT-2 uses 1e-5)"
            ));
        }
        if hf.n_inner == Some(0) {
            return Err("n_inner = 0: the MLP would have no hidden units".into());
        }
        if d_model % n_heads != 0 {
            return Err(format!(
                "n_embd ({d_model}) is not a multiple of n_head ({n_heads})"
            ));
        }
        let bos_token_id = hf
            .bos_token_id
            .or(hf.eos_token_id)
            .unwrap_or(50256.min(d_vocab as u32 - 1));
        if bos_token_id as usize >= d_vocab {
            return Err(format!(
                "bos_token_id {bos_token_id} >= vocab_size {d_vocab}"
            ));
        }
        Ok(ModelConfig {
            n_layers,
            n_heads,
            d_model,
            d_head: d_model / n_heads,
            d_mlp: hf.n_inner.unwrap_or(4 * d_model),
            d_vocab,
            n_ctx,
            eps,
            bos_token_id,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPT2: &str = r#"{"model_type":"gpt2","n_layer":12,"n_head":12,"n_embd":768,
        "n_positions":1024,"vocab_size":50257,"layer_norm_epsilon":1e-5,
        "activation_function":"gelu_new","n_inner":null,"bos_token_id":50256,"eos_token_id":50256}"#;

    #[test]
    fn reads_gpt2_small() {
        let c = ModelConfig::from_json(GPT2).unwrap();
        assert_eq!(
            (c.n_layers, c.n_heads, c.d_head, c.d_mlp),
            (12, 12, 64, 3072)
        );
        assert_eq!(c.bos_token_id, 50256);
    }

    #[test]
    fn missing_field_is_named() {
        let text = GPT2.replace("\"n_head\":12,", "");
        let err = ModelConfig::from_json(&text).unwrap_err();
        assert!(err.contains("'n_head'"), "{err}");
    }

    #[test]
    fn rejects_non_gpt2_switches() {
        let text = GPT2.replace(
            "\"n_inner\":null",
            "\"scale_attn_by_inverse_layer_idx\":true",
        );
        assert!(ModelConfig::from_json(&text)
            .unwrap_err()
            .contains("inverse_layer_idx"));
        let text = GPT2.replace("gelu_new", "relu");
        assert!(ModelConfig::from_json(&text).unwrap_err().contains("relu"));
    }
}
