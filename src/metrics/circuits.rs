//! `ov_circuit` and `qk_circuit`: the Copy Suppression paper's weight-based evidence, per
//! head (`docs/metrics.md` §4 and §5).
//!
//! Owns: the two metrics' options, their per-head tables (`ov_circuit`, `qk_circuit`) and
//! per-token tables (`ov_circuit_per_token`, `qk_circuit_per_token`, only for the heads a
//! `[[view]]` asks about). They are [`WeightMetric`]s: computed once per run from the
//! processed weights, with no dataset and no forward pass. Must not: do the math (that is
//! `crate::circuits`) or write files.

use super::{RunContext, WeightInputs, WeightMetric};
use crate::circuits::{self, rank_stats, Embedding};
use crate::error::Result;
use crate::output::{Table, Value};

/// Which circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    Ov,
    Qk,
}

impl Circuit {
    pub fn name(self) -> &'static str {
        match self {
            Circuit::Ov => "ov_circuit",
            Circuit::Qk => "qk_circuit",
        }
    }
}

/// Rows per block when the spec does not say (memory per worker ~ block_rows x 1.8k floats).
pub const DEFAULT_BLOCK_ROWS: usize = 256;

/// The `ov_circuit` or `qk_circuit` metric.
pub struct CircuitMetric {
    circuit: Circuit,
    embedding: Embedding,
    block_rows: usize,
}

impl CircuitMetric {
    /// From checked options: `embedding` (`W_EE` default, or `W_E`, `W_EE0`, `W_EE0A`),
    /// `block_rows` (1 to 2^20).
    pub fn build(
        circuit: Circuit,
        o: &crate::metrics::Opts,
    ) -> std::result::Result<crate::metrics::Built, crate::metrics::OptionError> {
        use crate::metrics::OptionError;
        let s = o.str("embedding").unwrap_or("W_EE");
        let embedding = Embedding::parse(s).ok_or_else(|| {
            OptionError::at(
                "embedding",
                format!(
                    "metric '{}': option 'embedding' is '{s}'; use one of {}",
                    circuit.name(),
                    circuits::effective::NAMES.join(", ")
                ),
            )
        })?;
        let block_rows = match o.int("block_rows") {
            None => DEFAULT_BLOCK_ROWS,
            Some(n) if (1..=1 << 20).contains(&n) => n as usize,
            Some(n) => {
                return Err(OptionError::at(
                    "block_rows",
                    format!(
                        "metric '{}': option 'block_rows' must be an integer from 1 to 1048576, not {n}",
                        circuit.name()
                    ),
                ))
            }
        };
        Ok(crate::metrics::Built::Weights(Box::new(CircuitMetric {
            circuit,
            embedding,
            block_rows,
        })))
    }
}

impl WeightMetric for CircuitMetric {
    fn name(&self) -> &str {
        self.circuit.name()
    }

    fn work(&self, ctx: &RunContext) -> u64 {
        (ctx.heads.len() * ctx.cfg.d_vocab) as u64
    }

    fn flop(&self, ctx: &RunContext) -> f64 {
        ctx.heads.len() as f64 * circuits::head_flop(ctx.cfg)
    }

    fn compute(
        &mut self,
        ctx: &RunContext,
        shared: &WeightInputs,
        detail: &[(usize, usize)],
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<Vec<Table>> {
        let source = shared.effective(ctx).get(self.embedding);
        let v = ctx.cfg.d_vocab;
        let name = self.circuit.name();
        let (mut table, mut tokens) = match self.circuit {
            Circuit::Ov => (
                Table::new(
                    name,
                    &[
                        "layer",
                        "head",
                        "frac_neg_top10",
                        "frac_neg_top5pct",
                        "median_rank_neg",
                        "frac_pos_top10",
                        "frac_pos_top5pct",
                        "median_rank_pos",
                    ],
                )
                .per_head("frac_neg_top10"),
                Table::new(
                    format!("{name}_per_token"),
                    &["layer", "head", "token", "text", "rank_neg", "rank_pos"],
                ),
            ),
            Circuit::Qk => (
                Table::new(
                    name,
                    &["layer", "head", "frac_top1", "frac_top10", "median_rank"],
                )
                .per_head("frac_top1"),
                Table::new(
                    format!("{name}_per_token"),
                    &["layer", "head", "token", "text", "rank"],
                ),
            ),
        };
        // Token texts only when some head's per-token table is written (V decodes).
        let texts: Vec<String> = if detail.is_empty() {
            Vec::new()
        } else {
            (0..v as u32).map(|t| ctx.token_text(t)).collect()
        };
        let text = |t: usize| Value::Str(texts.get(t).cloned().unwrap_or_default());
        for (layer, heads) in ctx.heads_by_layer() {
            match self.circuit {
                Circuit::Ov => {
                    let ranks = circuits::ov_ranks(
                        ctx.params,
                        ctx.cfg,
                        source.view(),
                        layer,
                        &heads,
                        self.block_rows,
                        progress,
                    )?;
                    for (&h, r) in heads.iter().zip(&ranks) {
                        let (neg, pos) = (rank_stats(&r.rank_neg), rank_stats(&r.rank_pos));
                        table.push(vec![
                            layer.into(),
                            h.into(),
                            neg.frac_top10.into(),
                            neg.frac_top5pct.into(),
                            (neg.median as usize).into(),
                            pos.frac_top10.into(),
                            pos.frac_top5pct.into(),
                            (pos.median as usize).into(),
                        ]);
                        if detail.contains(&(layer, h)) {
                            for t in 0..v {
                                tokens.push(vec![
                                    layer.into(),
                                    h.into(),
                                    t.into(),
                                    text(t),
                                    r.rank_neg[t].into(),
                                    r.rank_pos[t].into(),
                                ]);
                            }
                        }
                    }
                }
                Circuit::Qk => {
                    let ranks = circuits::qk_ranks(
                        ctx.params,
                        ctx.cfg,
                        source.view(),
                        layer,
                        &heads,
                        self.block_rows,
                        progress,
                    )?;
                    for (&h, r) in heads.iter().zip(&ranks) {
                        let st = rank_stats(r);
                        table.push(vec![
                            layer.into(),
                            h.into(),
                            st.frac_top1.into(),
                            st.frac_top10.into(),
                            (st.median as usize).into(),
                        ]);
                        if detail.contains(&(layer, h)) {
                            for (t, &rank) in r.iter().enumerate() {
                                tokens.push(vec![
                                    layer.into(),
                                    h.into(),
                                    t.into(),
                                    text(t),
                                    rank.into(),
                                ]);
                            }
                        }
                    }
                }
            }
        }
        let mut out = vec![table];
        if !tokens.rows.is_empty() {
            out.push(tokens);
        }
        Ok(out)
    }
}
