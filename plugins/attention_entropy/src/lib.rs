//! `hg_attention_entropy`: per head, the mean entropy of its attention pattern.
//!
//! Owns: nothing but this metric. Must not: read anything but `hook_pattern`. A small
//! example of a plugin with an option and a per-head table.
//!
//! For each selected head, sequence `b` and destination position `q`:
//! `H(q) = -sum_k p[q, k] ln p[q, k]` in nats (`0 ln 0 = 0`), over `k <= q` (the pattern is
//! causal). Which destinations count:
//! - right padding (`q >= length[b]`) never does;
//! - with `mask_bos = true` (the default), destinations holding the BOS token do not either:
//!   position 0 can only attend to itself, so its entropy is always 0 and would drag every
//!   head's mean towards 0 by `1 / length`.
//!
//! The per-sequence value is the mean over its counted destinations; the head's `entropy` is
//! the mean over sequences (so the batch size does not matter). Sequences with no counted
//! destination are skipped; a head with none at all gets NaN.

use hookgraph_plugin::serde_json::Value as Json;
use hookgraph_plugin::{export_plugin, BatchCtx, Ctx, Emitter, PluginMetric};

struct AttentionEntropy {
    mask_bos: bool,
    /// Per selected head, in `ctx.heads()` order: (sum of per-sequence means, sequences).
    sums: Vec<(f64, usize)>,
}

/// Entropy in nats of one attention row (`0 ln 0 = 0`).
fn entropy(row: &[f32]) -> f64 {
    row.iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| -(p as f64) * (p as f64).ln())
        .sum()
}

impl PluginMetric for AttentionEntropy {
    fn new(options: &Json) -> Result<Self, String> {
        let mask_bos = match options.get("mask_bos") {
            None => true,
            Some(Json::Bool(b)) => *b,
            Some(other) => {
                return Err(format!(
                    "option mask_bos must be true or false, not {other}"
                ))
            }
        };
        Ok(AttentionEntropy {
            mask_bos,
            sums: Vec::new(),
        })
    }

    fn begin_dataset(&mut self, ctx: &Ctx) -> Result<(), String> {
        self.sums = vec![(0.0, 0); ctx.heads().len()];
        Ok(())
    }

    fn batch(&mut self, ctx: &BatchCtx) -> Result<(), String> {
        let toks = ctx.tokens();
        let &[batch, seq] = toks.shape() else {
            unreachable!("the safe layer checks tokens are 2-d")
        };
        let lengths = ctx.batch_lengths();
        if lengths.len() != batch {
            return Err(format!("{} lengths for a batch of {batch}", lengths.len()));
        }
        for (slot, &(layer, head)) in ctx.heads().iter().enumerate() {
            let pattern = ctx.activation(&format!("blocks.{layer}.attn.hook_pattern"))?;
            pattern.expect_shape("hook_pattern", &[batch, ctx.n_heads(), seq, seq])?;
            for (b, &len) in lengths.iter().enumerate() {
                let (mut sum, mut n) = (0.0f64, 0usize);
                for q in 0..len.min(seq) {
                    if self.mask_bos && toks.at(&[b, q]) == ctx.bos() {
                        continue;
                    }
                    sum += entropy(&pattern.lane(&[b, head, q])[..=q]);
                    n += 1;
                }
                if n > 0 {
                    self.sums[slot].0 += sum / n as f64;
                    self.sums[slot].1 += 1;
                }
            }
        }
        Ok(())
    }

    // Sums and counts, not means: shards merge exactly (`runner run --shard`, `--resume`).
    const PARTIAL_STATE: bool = true;

    /// Per head: the sum as f64 bits and the count, 16 little-endian bytes.
    fn save_state(&self) -> Result<Vec<u8>, String> {
        Ok(self
            .sums
            .iter()
            .flat_map(|&(sum, n)| {
                let mut b = sum.to_bits().to_le_bytes().to_vec();
                b.extend((n as u64).to_le_bytes());
                b
            })
            .collect())
    }

    fn merge_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.len() != 16 * self.sums.len() {
            return Err(format!(
                "state of {} bytes for {} heads",
                state.len(),
                self.sums.len()
            ));
        }
        for (slot, c) in self.sums.iter_mut().zip(state.chunks_exact(16)) {
            let word = |i: usize| u64::from_le_bytes(c[i..i + 8].try_into().expect("8 bytes"));
            slot.0 += f64::from_bits(word(0));
            slot.1 += word(8) as usize;
        }
        Ok(())
    }

    fn finish(&mut self, ctx: &Ctx, out: &mut Emitter) -> Result<(), String> {
        for (&(layer, head), &(sum, n)) in ctx.heads().iter().zip(&self.sums) {
            let mean = if n == 0 { f64::NAN } else { sum / n as f64 };
            out.row(
                "attention_entropy",
                &[layer.into(), head.into(), mean.into()],
            )?;
        }
        Ok(())
    }
}

export_plugin!(
    AttentionEntropy,
    name = "hg_attention_entropy",
    version = env!("CARGO_PKG_VERSION"),
    description = "per head: mean entropy (nats) of the attention pattern over destination positions, padding excluded",
    hooks = ["blocks.{layer}.attn.hook_pattern"],
    tables = [{ name = "attention_entropy", columns = ["layer", "head", "entropy"], score = "entropy" }],
    options = [("mask_bos", "bool, default true: leave out destination positions holding BOS (always entropy 0)")],
);

#[cfg(test)]
mod tests {
    use super::entropy;

    #[test]
    fn entropy_of_uniform_and_one_hot() {
        assert_eq!(entropy(&[1.0, 0.0]), 0.0);
        assert!((entropy(&[0.25; 4]) - 4f64.ln()).abs() < 1e-12);
    }
}
