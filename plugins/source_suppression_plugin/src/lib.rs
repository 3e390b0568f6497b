//! `hg_source_suppression`: the built-in `source_suppression` metric re-implemented as a
//! plugin, exactly as `docs/metrics.md` §1 defines it.
//!
//! Owns: nothing but this metric. Must not: differ from the built-in; the tests check both
//! against TransformerLens's goldens and against each other. It exists to show that a plugin
//! can compute what a built-in computes, from the same cache and weights, and as a template
//! for metrics that read `hook_v`, `hook_pattern`, `ln_final.hook_scale`, `W_O` and `W_U`.
//!
//! Per selected head (layer `L`, head `h`) and sequence `b`:
//!
//! ```text
//! c[k]     = (v[b, k, h, :] @ W_O[L, h]) . W_U[:, toks[b, k]]   (only_negative: c * (c < 0))
//! m[s]     = toks[b, s] != bos
//! a[q, k]  = pattern[b, h, q, k] * m[q] * m[k]
//! per_position[k] = sum_q c[k] * a[q, k] / scale[b, q]
//! w[k]     = sum_q a[q, k]
//! per_sequence    = sum_k per_position[k] * w[k] / sum_k w[k]
//! score           = mean over sequences of per_sequence (undefined ones left out)
//! ```
//!
//! A sequence with no non-BOS attention (`sum_k w[k] = 0`) has an undefined (0/0, NaN)
//! per-sequence value: it is reported as NaN in the per-sequence table and left out of the
//! score, as the built-in does (a head with no defined sequence scores NaN). Sums are
//! accumulated in f64; per-sequence values are kept so the score does not depend on the
//! batch size.

use hookgraph_plugin::serde_json::Value as Json;
use hookgraph_plugin::{export_plugin, BatchCtx, Ctx, Emitter, PluginMetric};

/// The per-head table (`layer`, `head`, `score`).
const TABLE: &str = "plugin_source_suppression";
/// One row per head and sequence (`layer`, `head`, `sequence`, `per_sequence`).
const TABLE_PER_SEQUENCE: &str = "plugin_source_suppression_per_sequence";

struct SourceSuppression {
    only_negative: bool,
    /// Per selected head, in `ctx.heads()` order: (sequence index, per_sequence value).
    per_sequence: Vec<Vec<(usize, f64)>>,
}

impl PluginMetric for SourceSuppression {
    fn new(options: &Json) -> Result<Self, String> {
        let only_negative = match options.get("only_negative") {
            None => false,
            Some(Json::Bool(b)) => *b,
            Some(other) => {
                return Err(format!(
                    "option only_negative must be true or false, not {other}"
                ))
            }
        };
        Ok(SourceSuppression {
            only_negative,
            per_sequence: Vec::new(),
        })
    }

    fn begin_dataset(&mut self, ctx: &Ctx) -> Result<(), String> {
        self.per_sequence = vec![Vec::new(); ctx.heads().len()];
        Ok(())
    }

    fn batch(&mut self, ctx: &BatchCtx) -> Result<(), String> {
        let toks = ctx.tokens();
        let &[batch, seq] = toks.shape() else {
            unreachable!("the safe layer checks tokens are 2-d")
        };
        let (n_heads, d_head, d_model) = (ctx.n_heads(), ctx.d_head(), ctx.d_model());
        let w_u = ctx.weight("unembed.W_U")?; // [d_model, d_vocab]
        w_u.expect_shape("unembed.W_U", &[d_model, ctx.d_vocab()])?;
        let scale = ctx.activation("ln_final.hook_scale")?; // [batch, pos, 1]
        scale.expect_shape("ln_final.hook_scale", &[batch, seq, 1])?;
        let not_bos: Vec<f64> = toks
            .data()
            .iter()
            .map(|&t| if t != ctx.bos() { 1.0 } else { 0.0 })
            .collect();
        if let Some(&t) = toks.data().iter().find(|&&t| t as usize >= ctx.d_vocab()) {
            return Err(format!(
                "token id {t} is outside the vocabulary (d_vocab {})",
                ctx.d_vocab()
            ));
        }
        for (slot, &(layer, head)) in ctx.heads().iter().enumerate() {
            let v = ctx.activation(&format!("blocks.{layer}.attn.hook_v"))?;
            v.expect_shape("hook_v", &[batch, seq, n_heads, d_head])?;
            let pattern = ctx.activation(&format!("blocks.{layer}.attn.hook_pattern"))?;
            pattern.expect_shape("hook_pattern", &[batch, n_heads, seq, seq])?;
            let w_o = ctx.weight(&format!("blocks.{layer}.attn.W_O"))?;
            w_o.expect_shape("W_O", &[n_heads, d_head, d_model])?;
            // W_O[L, h]: [d_head, d_model], contiguous.
            let w_oh = &w_o.data()[head * d_head * d_model..(head + 1) * d_head * d_model];
            let d_vocab = ctx.d_vocab();
            let mut r = vec![0.0f64; d_model];
            for b in 0..batch {
                let m = &not_bos[b * seq..(b + 1) * seq];
                // c[k]: the head's full-attention output at source k, r = v @ W_O, on the
                // source token's unembedding direction W_U[:, tok].
                let c: Vec<f64> = (0..seq)
                    .map(|k| {
                        let vk = v.lane(&[b, k, head]);
                        r.fill(0.0);
                        for (e, &ve) in vk.iter().enumerate() {
                            let row = &w_oh[e * d_model..(e + 1) * d_model];
                            for (rd, &w) in r.iter_mut().zip(row) {
                                *rd += ve as f64 * w as f64;
                            }
                        }
                        let tok = toks.at(&[b, k]) as usize;
                        let u = w_u.data()[tok..].iter().step_by(d_vocab);
                        let dot: f64 = r.iter().zip(u).map(|(rd, &ud)| rd * ud as f64).sum();
                        if self.only_negative && dot >= 0.0 {
                            0.0
                        } else {
                            dot
                        }
                    })
                    .collect();
                let mut per_position = vec![0.0f64; seq];
                let mut w = vec![0.0f64; seq];
                for q in 0..seq {
                    let row = pattern.lane(&[b, head, q]);
                    let s = scale.at(&[b, q, 0]) as f64;
                    for k in 0..seq {
                        let a = row[k] as f64 * m[q] * m[k];
                        per_position[k] += c[k] * a / s;
                        w[k] += a;
                    }
                }
                let num: f64 = per_position.iter().zip(&w).map(|(p, w)| p * w).sum();
                let den: f64 = w.iter().sum();
                self.per_sequence[slot].push((ctx.first_sequence() + b, num / den));
            }
        }
        Ok(())
    }

    fn finish(&mut self, ctx: &Ctx, out: &mut Emitter) -> Result<(), String> {
        for (&(layer, head), values) in ctx.heads().iter().zip(&self.per_sequence) {
            let defined: Vec<f64> = values
                .iter()
                .map(|&(_, x)| x)
                .filter(|x| x.is_finite())
                .collect();
            let score = defined.iter().sum::<f64>() / defined.len() as f64;
            out.row(TABLE, &[layer.into(), head.into(), score.into()])?;
        }
        for (&(layer, head), values) in ctx.heads().iter().zip(&self.per_sequence) {
            for &(sequence, x) in values {
                out.row(
                    TABLE_PER_SEQUENCE,
                    &[layer.into(), head.into(), sequence.into(), x.into()],
                )?;
            }
        }
        Ok(())
    }
}

export_plugin!(
    SourceSuppression,
    name = "hg_source_suppression",
    version = env!("CARGO_PKG_VERSION"),
    description = "source_suppression (metrics.md §1) as a plugin: per head, how much the head suppresses the logits of the source tokens it attends to",
    hooks = [
        "blocks.{layer}.attn.hook_v",
        "blocks.{layer}.attn.hook_pattern",
        "ln_final.hook_scale",
    ],
    tables = [
        { name = "plugin_source_suppression", columns = ["layer", "head", "score"], score = "score" },
        { name = "plugin_source_suppression_per_sequence", columns = ["layer", "head", "sequence", "per_sequence"] },
    ],
    options = [("only_negative", "bool, default false: keep only negative source coefficients")],
);
