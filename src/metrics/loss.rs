//! `loss`: per-token cross-entropy of the unmodified model, TL's
//! `lm_cross_entropy_loss(per_token=True)`.
//!
//! Owns: the `loss` table (one row per predicted token). Reads `logits`. Must not: run the
//! model or write files.

use super::state::{Array, State};
use super::{BatchView, Metric, RunContext};
use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::hooks::LOGITS;
use crate::output::Table;

/// One predicted token: (seq, pos, token, target, loss, is_pad).
type Row = (usize, usize, u32, u32, f32, bool);

/// The `loss` metric.
#[derive(Default)]
pub struct Loss {
    rows: Vec<Row>,
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
        let tokens = batch.tokens;
        let loss = batch.cache.run(&super::ops::PerTokenLoss(batch))?;
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

    /// Every row so far, column by column.
    fn save_state(&self) -> Result<State> {
        let col = |f: fn(&Row) -> u64| Array::U64(self.rows.iter().map(f).collect());
        let mut st = State::new();
        st.put("seq", col(|r| r.0 as u64))
            .put("pos", col(|r| r.1 as u64))
            .put("token", Array::U32(self.rows.iter().map(|r| r.2).collect()))
            .put(
                "target",
                Array::U32(self.rows.iter().map(|r| r.3).collect()),
            )
            .put("loss", Array::F32(self.rows.iter().map(|r| r.4).collect()))
            .put("is_pad", col(|r| r.5 as u64));
        Ok(st)
    }

    /// Appends the state's rows.
    fn merge_state(&mut self, ctx: &RunContext, dataset: &Dataset, st: &State) -> Result<()> {
        let name = self.name().to_string();
        let seq = st.u64(&name, "seq")?;
        let pos = st.u64(&name, "pos")?;
        let token = st.u32(&name, "token")?;
        let target = st.u32(&name, "target")?;
        let loss = st.f32(&name, "loss")?;
        let pad = st.u64(&name, "is_pad")?;
        let n = seq.len();
        if [pos.len(), token.len(), target.len(), loss.len(), pad.len()] != [n; 5] {
            return Err(Error::Metric {
                metric: name,
                msg: "saved state columns differ in length".into(),
            });
        }
        // Rows must name positions of this dataset and tokens of this vocabulary, and no
        // more of them than the dataset has positions.
        let (n_seq, seq_len, vocab) = (dataset.n_sequences(), dataset.seq_len(), ctx.cfg.d_vocab);
        let bad = (0..n).find(|&i| {
            seq[i] >= n_seq as u64
                || pos[i] >= seq_len as u64
                || token[i] as usize >= vocab
                || target[i] as usize >= vocab
        });
        if self.rows.len() + n > n_seq * seq_len || bad.is_some() {
            return Err(Error::Metric {
                metric: name,
                msg: match bad {
                    Some(i) => format!(
                        "saved state row {i} (sequence {}, position {}, tokens {} -> {}) is outside dataset '{}' ({n_seq} x {seq_len}, vocabulary {vocab})",
                        seq[i], pos[i], token[i], target[i], dataset.name
                    ),
                    None => format!(
                        "saved state has {} rows, more than dataset '{}' has positions ({})",
                        self.rows.len() + n,
                        dataset.name,
                        n_seq * seq_len
                    ),
                },
            });
        }
        for i in 0..n {
            self.rows.push((
                seq[i] as usize,
                pos[i] as usize,
                token[i],
                target[i],
                loss[i],
                pad[i] != 0,
            ));
        }
        Ok(())
    }
}
