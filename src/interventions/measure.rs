//! The measures of an intervened pass, per sequence: loss, KL from the unchanged run, and
//! the logit difference of the answers (definitions in `docs/metrics.md`).
//!
//! Owns: the unembedding of `ln_final`'s output, one sequence at a time (a `[seq, d_vocab]`
//! block, never more rows than a plain pass makes), or only the two answer columns at the
//! last position when the logit difference is all that is asked. Must not: run passes.

use crate::interventions::Measures;
use crate::kernels::{self, Par};

/// Per sequence: sums and counts (pooled at the end, in sequence order).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SeqScore {
    pub loss_sum: f64,
    pub loss_n: u64,
    pub kl_sum: f64,
    pub kl_n: u64,
    pub logit_diff: f64,
}

/// The unembedding: `W_U` `[d, vocab]` and `b_U`.
pub struct Unembed<'a> {
    pub w_u: &'a [f32],
    pub b_u: &'a [f32],
    pub d: usize,
    pub v: usize,
}

impl Unembed<'_> {
    /// Log-probabilities of the first `rows` rows of `x` (`[rows, d]`) into `out` `[rows, v]`.
    pub fn log_probs(&self, x: &[f32], rows: usize, out: &mut Vec<f32>) {
        let (d, v) = (self.d, self.v);
        out.resize(rows * v, 0.0);
        for r in out.chunks_exact_mut(v) {
            r.copy_from_slice(self.b_u);
        }
        kernels::sgemm_into(rows, d, v, &x[..rows * d], self.w_u, out, true, Par::All);
        for r in out.chunks_exact_mut(v) {
            let m = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let lse = r.iter().map(|&x| ((x - m) as f64).exp()).sum::<f64>().ln() as f32 + m;
            r.iter_mut().for_each(|x| *x -= lse);
        }
    }

    /// `logit[a] - logit[b]` of row `x` `[d]`.
    pub fn logit_diff(&self, x: &[f32], a: u32, b: u32) -> f64 {
        let (a, b) = (a as usize, b as usize);
        let mut s = self.b_u[a] as f64 - self.b_u[b] as f64;
        for (e, &xv) in x.iter().enumerate() {
            s += xv as f64 * (self.w_u[e * self.v + a] as f64 - self.w_u[e * self.v + b] as f64);
        }
        s
    }
}

/// Scores sequence `i` of a batch whose `ln_final` output is `x` (`[b, s, d]`).
/// `clean_lp`: the unchanged run's log-probabilities of this sequence `[len, v]` (for KL;
/// `None` scores the unchanged run itself). `scratch` holds the `[len, v]` block.
#[allow(clippy::too_many_arguments)]
pub fn score_seq(
    u: &Unembed,
    m: Measures,
    x: &[f32],
    i: usize,
    s: usize,
    tokens: &[u32],
    len: usize,
    answers: Option<[u32; 2]>,
    clean_lp: Option<&[f32]>,
    scratch: &mut Vec<f32>,
) -> SeqScore {
    let d = u.d;
    let xs = &x[i * s * d..(i + 1) * s * d];
    let mut out = SeqScore::default();
    if m.full_vocab() {
        u.log_probs(xs, len, scratch);
        let v = u.v;
        if m.loss {
            for p in 0..len.saturating_sub(1) {
                out.loss_sum -= scratch[p * v + tokens[p + 1] as usize] as f64;
                out.loss_n += 1;
            }
        }
        if m.kl {
            if let Some(c) = clean_lp {
                for p in 0..len {
                    let (cr, ir) = (&c[p * v..(p + 1) * v], &scratch[p * v..(p + 1) * v]);
                    let mut k = 0f64;
                    for (&a, &b) in cr.iter().zip(ir) {
                        k += (a as f64).exp() * (a as f64 - b as f64);
                    }
                    out.kl_sum += k;
                    out.kl_n += 1;
                }
            } else {
                out.kl_n = len as u64;
            }
        }
    }
    if let (true, Some([a, b])) = (m.logit_diff, answers) {
        out.logit_diff = u.logit_diff(&xs[(len - 1) * d..len * d], a, b);
    }
    out
}
