//! `hg_direct_logit_attribution`: the built-in `direct_logit_attribution`
//! (`docs/metrics.md` §9) as a plugin, written against the safe layer's contractions.
//!
//! Owns: nothing but this metric. Must not: read anything but `blocks.L.attn.hook_z` and
//! `ln_final.hook_scale`. An example of ABI version 3: token text for the per-position
//! table's `token` column, rows emitted per batch (the per-position and per-sequence
//! tables never sit in the plugin's state), the dataset's answers, and
//! [`Ctx::unembed_columns`] / [`OutProj::z_w_o`], which make the attribution itself
//! `dot(z @ W_O[h], centred(W_U[:, t])) / scale`.
//!
//! Tables (the built-in's columns; `tests/it/plugins.rs` checks they hold its values):
//! - `plugin_dla_per_position` (layer, head, seq, pos, token, value): the head's direct
//!   effect at `pos` on the logit of the next token (NaN at the last real position);
//! - `plugin_dla_per_sequence` (layer, head, seq, value, logit_diff): the mean over the
//!   sequence, and the effect on `logit[correct] − logit[wrong]` at its last real position
//!   (NaN without answers);
//! - `plugin_dla` (layer, head, dla, n_tokens, logit_diff): pooled over every token, and
//!   the mean logit difference over sequences. Its partial state is sums and counts.

use hookgraph_plugin::serde_json::Value as Json;
use hookgraph_plugin::{
    centred, dot, export_plugin, BatchCtx, Ctx, Emitter, OutProj, PluginMetric,
};

/// Per selected head (in `ctx.heads()` order): sums and counts, never means.
#[derive(Clone, Copy, Default)]
struct Sums {
    dla: f64,
    n_tokens: u64,
    logit_diff: f64,
    n_sequences: u64,
}

struct Dla {
    heads: Vec<Sums>,
}

/// One head's attribution of `z` (a `hook_z` lane) on the centred direction `u`.
fn attribution(w_o: &OutProj, head: usize, z: &[f32], u: &[f32], scale: f32) -> f32 {
    dot(&w_o.z_w_o(head, z), &centred(u)) / scale
}

impl PluginMetric for Dla {
    fn new(_options: &Json) -> Result<Self, String> {
        Ok(Dla { heads: Vec::new() })
    }

    fn begin_dataset(&mut self, ctx: &Ctx) -> Result<(), String> {
        self.heads = vec![Sums::default(); ctx.heads().len()];
        Ok(())
    }

    /// Rows go out sequence by sequence (every head's, then the next sequence's), so the
    /// tables do not depend on the batch size or on how a run is sharded.
    fn batch(&mut self, ctx: &BatchCtx) -> Result<(), String> {
        let (toks, scale) = (ctx.tokens(), ctx.activation("ln_final.hook_scale")?);
        let seq = toks.shape()[1];
        let mut heads = Vec::new();
        for &(layer, head) in ctx.heads() {
            heads.push((
                layer,
                head,
                ctx.activation(&format!("blocks.{layer}.attn.hook_z"))?,
                ctx.w_o(layer)?,
            ));
        }
        for (b, &len) in ctx.batch_lengths().iter().enumerate() {
            let (i, len) = (ctx.first_sequence() + b, len.min(seq));
            for (slot, (layer, head, z, w_o)) in heads.iter().enumerate() {
                let (layer, head) = (*layer, *head);
                let (mut sum, mut n) = (0f64, 0u64);
                for p in 0..len {
                    let value = if p + 1 < len {
                        let u = ctx.unembed_columns(&[toks.at(&[b, p + 1])])?;
                        let v = attribution(
                            w_o,
                            head,
                            z.lane(&[b, p, head]),
                            u.row(0),
                            scale.at(&[b, p, 0]),
                        );
                        (sum, n) = (sum + v as f64, n + 1);
                        v as f64
                    } else {
                        f64::NAN
                    };
                    let token = ctx.token_text(toks.at(&[b, p]))?;
                    ctx.row(
                        "plugin_dla_per_position",
                        &[
                            layer.into(),
                            head.into(),
                            i.into(),
                            p.into(),
                            token.into(),
                            value.into(),
                        ],
                    )?;
                }
                let ld = match ctx.answers() {
                    Some(a) if len > 0 => {
                        let u = ctx.unembed_columns(&a[i])?;
                        let diff: Vec<f32> =
                            u.row(0).iter().zip(u.row(1)).map(|(c, w)| c - w).collect();
                        attribution(
                            w_o,
                            head,
                            z.lane(&[b, len - 1, head]),
                            &diff,
                            scale.at(&[b, len - 1, 0]),
                        )
                    }
                    _ => f32::NAN,
                };
                let mean = if n == 0 { f64::NAN } else { sum / n as f64 };
                ctx.row(
                    "plugin_dla_per_sequence",
                    &[layer.into(), head.into(), i.into(), mean.into(), ld.into()],
                )?;
                let s = &mut self.heads[slot];
                (s.dla, s.n_tokens) = (s.dla + sum, s.n_tokens + n);
                (s.logit_diff, s.n_sequences) = (s.logit_diff + ld as f64, s.n_sequences + 1);
            }
        }
        Ok(())
    }

    fn finish(&mut self, ctx: &Ctx, out: &mut Emitter) -> Result<(), String> {
        for (&(layer, head), s) in ctx.heads().iter().zip(&self.heads) {
            let dla = if s.n_tokens == 0 {
                f64::NAN
            } else {
                s.dla / s.n_tokens as f64
            };
            let ld = match ctx.answers() {
                Some(_) => s.logit_diff / s.n_sequences.max(1) as f64,
                None => f64::NAN,
            };
            out.row(
                "plugin_dla",
                &[
                    layer.into(),
                    head.into(),
                    dla.into(),
                    (s.n_tokens as usize).into(),
                    ld.into(),
                ],
            )?;
        }
        Ok(())
    }

    // Sums and counts only: the rows went out per batch, and the runner keeps those exact
    // under `--shard` and `--resume` itself.
    const PARTIAL_STATE: bool = true;

    /// Per head: four little-endian words (dla sum bits, tokens, logit-diff sum bits,
    /// sequences).
    fn save_state(&self) -> Result<Vec<u8>, String> {
        let words = |s: &Sums| {
            [
                s.dla.to_bits(),
                s.n_tokens,
                s.logit_diff.to_bits(),
                s.n_sequences,
            ]
        };
        Ok(self
            .heads
            .iter()
            .flat_map(|s| words(s).into_iter().flat_map(u64::to_le_bytes))
            .collect())
    }

    fn merge_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.len() != 32 * self.heads.len() {
            return Err(format!(
                "state of {} bytes for {} heads",
                state.len(),
                self.heads.len()
            ));
        }
        for (s, c) in self.heads.iter_mut().zip(state.chunks_exact(32)) {
            let w = |i: usize| u64::from_le_bytes(c[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            s.dla += f64::from_bits(w(0));
            s.n_tokens += w(1);
            s.logit_diff += f64::from_bits(w(2));
            s.n_sequences += w(3);
        }
        Ok(())
    }
}

export_plugin!(
    Dla,
    name = "hg_direct_logit_attribution",
    version = env!("CARGO_PKG_VERSION"),
    description = "per head: direct logit attribution (the built-in direct_logit_attribution, as a plugin)",
    hooks = ["blocks.{layer}.attn.hook_z", "ln_final.hook_scale"],
    // NaN where the built-in has it: no answers (logit_diff), no next token (the last
    // position), a sequence of one token (its mean).
    tables = [
        { name = "plugin_dla", columns = ["layer", "head", "dla", "n_tokens", "logit_diff"], score = "dla", nan = ["logit_diff"] },
        { name = "plugin_dla_per_sequence", columns = ["layer", "head", "seq", "value", "logit_diff"], nan = ["value", "logit_diff"] },
        { name = "plugin_dla_per_position", columns = ["layer", "head", "seq", "pos", "token", "value"], nan = ["value"] },
    ],
    options = [],
);
