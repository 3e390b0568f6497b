//! `loss`: per-token cross-entropy of the unmodified model, TL's
//! `lm_cross_entropy_loss(per_token=True)`.
//!
//! Owns: the `loss` table (one row per predicted token). Reads `logits`. Must not: run the
//! model or write files.

use super::{BatchView, Metric, RunContext};
use crate::data::Dataset;
use crate::error::Result;
use crate::hooks::LOGITS;
use crate::output::Table;

/// The `loss` metric.
#[derive(Default)]
pub struct Loss {
    rows: Vec<(usize, usize, u32, u32, f32, bool)>,
}

impl Metric for Loss {
    fn name(&self) -> &str {
        "loss"
    }

    fn hooks(&self, _ctx: &RunContext) -> Vec<String> {
        vec![LOGITS.into()]
    }

    fn start_dataset(&mut self, _ctx: &RunContext, _dataset: &Dataset) -> Result<()> {
        self.rows.clear();
        Ok(())
    }

    fn batch(&mut self, _ctx: &RunContext, batch: &BatchView) -> Result<()> {
        let logits = batch.activation::<ndarray::Ix3>(LOGITS)?;
        let tokens = batch.tokens;
        let loss = super::ops::per_token_loss(logits, tokens);
        for ((i, q), &l) in loss.indexed_iter() {
            let seq = batch.start + i;
            let pad = batch.dataset.is_pad(seq, q + 1);
            self.rows
                .push((seq, q, tokens[[i, q]], tokens[[i, q + 1]], l, pad));
        }
        Ok(())
    }

    fn finish_dataset(&mut self, ctx: &RunContext, _dataset: &Dataset) -> Result<Vec<Table>> {
        let mut t = Table::new(
            "loss",
            &[
                "seq",
                "pos",
                "token",
                "target",
                "target_text",
                "loss",
                "is_pad",
            ],
        );
        let ids: Vec<u32> = self.rows.iter().map(|r| r.3).collect();
        let text = ctx.token_texts(&ids);
        for &(seq, pos, tok, target, loss, pad) in &self.rows {
            t.push(vec![
                seq.into(),
                pos.into(),
                tok.into(),
                target.into(),
                text[&target].as_str().into(),
                loss.into(),
                (pad as usize).into(),
            ]);
        }
        Ok(vec![t])
    }
}
