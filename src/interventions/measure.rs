//! The measures of an intervened pass, per sequence: loss, KL from the unchanged run, and
//! the logit difference of the answers (definitions in `docs/metrics.md`).
//!
//! Owns: the unembedding of `ln_final`'s output in blocks of [`BLOCK`] rows (the non-padding
//! rows of every sequence of a stacked pass, so the matmul is large enough to run near the
//! sgemm peak, and at most `[BLOCK, d_vocab]` logits exist at once), or only the two answer
//! columns at the last position when the logit difference is all that is asked. Must not:
//! run passes.
//!
//! KL without the unchanged run's distributions. With `p` the unchanged run's next-token
//! distribution at a position, `x` its `ln_final` output and `x'` the intervened one's,
//! logits `x W_U + b_U`:
//!
//! `KL(p || p') = sum_j p_j (lp_j - lp'_j) = lse' - lse - (x' - x) . (W_U p)`
//!
//! (the `b_U` terms cancel, and `sum_j p_j = 1`). So the unchanged run leaves, per position,
//! its log-sum-exp and one `d_model` vector `W_U p` ([`CleanTerms`]): `d_model` floats where a
//! `[d_vocab]` log-probability row would be, and the KL of each intervened position costs a
//! `d_model` dot product beyond the log-sum-exp its loss needs anyway.

use rayon::prelude::*;

use crate::interventions::Measures;
use crate::kernels::{self, MatPtr, Par};

/// Rows of logits unembedded at once: large enough that the `[rows, d] @ [d, vocab]` matmul
/// runs near the sgemm peak (sgemm packs all of `W_U`, 154 MB for GPT-2, once per call: at
/// 128 rows that packing was 7% of a z sweep's time, measured with `perf`), small enough
/// that the block (`rows * vocab` floats, 103 MB for GPT-2) keeps a sweep's memory within
/// 1.5x a plain pass's (`runner bench` reports the peak).
pub const BLOCK: usize = 512;

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

/// What KL against the unchanged run needs of it, per (sequence, position) of the batch:
/// its log-sum-exp, its `ln_final` output and `W_U p` (module docs).
pub struct CleanTerms {
    s: usize,
    lse: Vec<f64>,
    /// Its per-position loss, `lse - logit[next token]` (0 at the last position).
    nll: Vec<f64>,
    x: Vec<f32>,
    /// `W_U p` (only when KL is measured).
    w_u_p: Vec<f32>,
}

/// The sequences of one (stacked) pass: `x` is `ln_final`'s output `[n_seq, s, d]`, and
/// sequence `k` is row `k % b` of the batch (`tokens` `[b, s]`, `lens`, `answers`).
#[derive(Clone, Copy)]
pub struct Rows<'a> {
    pub x: &'a [f32],
    pub n_seq: usize,
    pub s: usize,
    pub tokens: &'a [u32],
    pub lens: &'a [usize],
    pub answers: &'a [Option<[u32; 2]>],
    /// Per sequence, the first position the intervention can change (`None`: 0). By
    /// causality the positions before it are the unchanged run's: their loss is taken from
    /// [`CleanTerms`], their KL is 0, and they are not unembedded again.
    pub first_changed: Option<&'a [usize]>,
}

impl<'a> Rows<'a> {
    /// The same batch over another stack of final activations `x` (`d` wide): every
    /// sequence `i` of `x` is the batch's sequence `i % b`.
    pub fn over(self, x: &'a [f32], d: usize) -> Self {
        Rows {
            x,
            n_seq: x.len() / (self.s * d),
            ..self
        }
    }

    fn b(&self) -> usize {
        self.lens.len()
    }
}

/// Scores every sequence of `rows` (one [`SeqScore`] per sequence). `clean`: the unchanged
/// run's terms, for KL (`None` scores the unchanged run itself: its KL is 0 over its
/// positions). With `keep_terms`, also returns this run's [`CleanTerms`] (for the unchanged
/// run, so the intervened ones can be measured against it).
pub fn score(
    u: &Unembed,
    m: Measures,
    rows: &Rows,
    clean: Option<&CleanTerms>,
    keep_terms: bool,
) -> (Vec<SeqScore>, Option<CleanTerms>) {
    let (d, v, s, b) = (u.d, u.v, rows.s, rows.b());
    let mut out = vec![SeqScore::default(); rows.n_seq];
    let mut terms = (keep_terms && m.full_vocab()).then(|| CleanTerms {
        s,
        lse: vec![0.0; b * s],
        nll: vec![0.0; b * s],
        x: rows.x[..b * s * d].to_vec(),
        w_u_p: if m.kl {
            vec![0.0; b * s * d]
        } else {
            Vec::new()
        },
    });
    if m.full_vocab() {
        let first = |k: usize| rows.first_changed.map_or(0, |f| f[k]);
        // The positions before the first changed one are the unchanged run's (causality).
        for (k, o) in out.iter_mut().enumerate().filter(|(k, _)| first(*k) > 0) {
            let (i_b, len) = (k % b, rows.lens[k % b]);
            let c = clean.expect("a run from a later position has the unchanged run's terms");
            for p in 0..first(k).min(len) {
                if m.loss && p + 1 < len {
                    o.loss_sum += c.nll[i_b * s + p];
                    o.loss_n += 1;
                }
                if m.kl {
                    o.kl_n += 1;
                }
            }
        }
        // Every other non-padding (sequence, position), in order: each sequence's sums are
        // added position by position, whatever the blocks.
        let todo: Vec<(usize, usize)> = (0..rows.n_seq)
            .flat_map(|k| (first(k).min(rows.lens[k % b])..rows.lens[k % b]).map(move |p| (k, p)))
            .collect();
        let mut xb = vec![0f32; BLOCK * d];
        let mut logits = vec![0f32; BLOCK * v];
        let mut lse = vec![0f64; BLOCK];
        let mut target = vec![0f32; BLOCK];
        for blk in todo.chunks(BLOCK) {
            let r = blk.len();
            for (i, &(k, p)) in blk.iter().enumerate() {
                let at = (k * s + p) * d;
                xb[i * d..(i + 1) * d].copy_from_slice(&rows.x[at..at + d]);
            }
            let lg = &mut logits[..r * v];
            for row in lg.chunks_exact_mut(v) {
                row.copy_from_slice(u.b_u);
            }
            kernels::sgemm_into(r, d, v, &xb[..r * d], u.w_u, lg, true, Par::All);
            lg.par_chunks(v)
                .zip(lse[..r].par_iter_mut())
                .for_each(|(row, l)| {
                    let mx = kernels::max(row);
                    *l = mx as f64 + kernels::sum_exp_shifted(row, mx).ln();
                });
            for (i, &(k, p)) in blk.iter().enumerate() {
                let i_b = k % b;
                if p + 1 < rows.lens[i_b] {
                    target[i] = lg[i * v + rows.tokens[i_b * s + p + 1] as usize];
                }
            }
            for (i, &(k, p)) in blk.iter().enumerate() {
                let (i_b, o) = (k % b, &mut out[k]);
                if m.loss && p + 1 < rows.lens[i_b] {
                    o.loss_sum += lse[i] - target[i] as f64;
                    o.loss_n += 1;
                }
                if m.kl {
                    if let Some(c) = clean {
                        o.kl_sum += c.kl(i_b, p, lse[i], &xb[i * d..(i + 1) * d]);
                    }
                    o.kl_n += 1;
                }
            }
            if let Some(t) = terms.as_mut() {
                for (i, &(k, p)) in blk.iter().enumerate() {
                    if p + 1 < rows.lens[k % b] {
                        t.nll[k * s + p] = lse[i] - target[i] as f64;
                    }
                }
                t.add_block(u, blk, lg, &lse[..r], m.kl);
            }
        }
    }
    if m.logit_diff {
        for (k, o) in out.iter_mut().enumerate() {
            let i_b = k % b;
            if let Some([a, c]) = rows.answers[i_b] {
                let at = (k * s + rows.lens[i_b] - 1) * d;
                o.logit_diff = u.logit_diff(&rows.x[at..at + d], a, c);
            }
        }
    }
    (out, terms)
}

impl CleanTerms {
    /// KL(unchanged || intervened) at (`i`, `p`) from the intervened row's log-sum-exp and
    /// `ln_final` output `x` (module docs), in f64.
    fn kl(&self, i: usize, p: usize, lse: f64, x: &[f32]) -> f64 {
        let at = i * self.s + p;
        let d = x.len();
        let (xc, wp) = (
            &self.x[at * d..(at + 1) * d],
            &self.w_u_p[at * d..(at + 1) * d],
        );
        let dot: f64 = x
            .iter()
            .zip(xc)
            .zip(wp)
            .map(|((&a, &c), &w)| (a as f64 - c as f64) * w as f64)
            .sum();
        lse - self.lse[at] - dot
    }

    /// Records a block of the unchanged run: its log-sum-exps, and `W_U p` from its logits
    /// (turned into probabilities in place: the block is not read again).
    fn add_block(
        &mut self,
        u: &Unembed,
        blk: &[(usize, usize)],
        lg: &mut [f32],
        lse: &[f64],
        kl: bool,
    ) {
        let (d, v, r) = (u.d, u.v, blk.len());
        for (i, &(k, p)) in blk.iter().enumerate() {
            self.lse[k * self.s + p] = lse[i];
        }
        if !kl {
            return;
        }
        lg.par_chunks_mut(v).zip(lse).for_each(|(row, &l)| {
            for x in row.iter_mut() {
                *x = kernels::exp(*x - l as f32);
            }
        });
        let mut wp = vec![0f32; r * d];
        // [r, v] @ W_U^T: W_U is [d, v] row-major, so its transpose is read in place.
        // SAFETY: `lg` is [r, v], `w_u` is [d, v] (so [v, d] with row stride 1, column
        // stride v), `wp` is [r, d] and uniquely borrowed.
        unsafe {
            kernels::sgemm_strided(
                r,
                v,
                d,
                MatPtr::row_major(lg.as_ptr(), v),
                MatPtr {
                    ptr: u.w_u.as_ptr(),
                    rs: 1,
                    cs: v as isize,
                },
                wp.as_mut_ptr(),
                d as isize,
                1,
                false,
                1.0,
                Par::All,
            );
        }
        for (i, &(k, p)) in blk.iter().enumerate() {
            // The unchanged run is scored with one copy per sequence (k < b).
            let at = k * self.s + p;
            self.w_u_p[at * d..(at + 1) * d].copy_from_slice(&wp[i * d..(i + 1) * d]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The KL identity against the direct sum over the vocabulary, and the loss against
    /// log-softmax, on random logits large enough that the distributions differ.
    #[test]
    fn block_measures_equal_the_direct_sums() {
        use rand::{Rng, SeedableRng};
        let (d, v, s, b) = (8, 300, 5, 3);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut r =
            |n: usize, sc: f32| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-sc..sc)).collect() };
        let (w_u, b_u) = (r(d * v, 1.0), r(v, 0.5));
        let (x_clean, x_new) = (r(b * s * d, 2.0), r(2 * b * s * d, 2.0));
        let tokens: Vec<u32> = (0..b * s).map(|i| (i * 37 % v) as u32).collect();
        let lens = [5, 3, 1];
        let answers = [Some([1, 2]), None, Some([4, 0])];
        let u = Unembed {
            w_u: &w_u,
            b_u: &b_u,
            d,
            v,
        };
        let all = Measures {
            loss: true,
            kl: true,
            logit_diff: true,
        };
        let rows = |x| Rows {
            x,
            n_seq: x.len() / (s * d),
            s,
            tokens: &tokens,
            lens: &lens,
            answers: &answers,
            first_changed: None,
        };
        let (orig, terms) = score(&u, all, &rows(&x_clean), None, true);
        let (new, _) = score(&u, all, &rows(&x_new), terms.as_ref(), false);
        let log_probs = |x: &[f32]| -> Vec<f64> {
            let l: Vec<f64> = (0..v)
                .map(|j| {
                    b_u[j] as f64
                        + (0..d)
                            .map(|e| x[e] as f64 * w_u[e * v + j] as f64)
                            .sum::<f64>()
                })
                .collect();
            let m = l.iter().cloned().fold(f64::MIN, f64::max);
            let lse = m + l.iter().map(|a| (a - m).exp()).sum::<f64>().ln();
            l.iter().map(|a| a - lse).collect()
        };
        for k in 0..2 * b {
            let i = k % b;
            let (mut loss, mut kl) = (0f64, 0f64);
            for p in 0..lens[i] {
                let c = log_probs(&x_clean[(i * s + p) * d..][..d]);
                let n = log_probs(&x_new[(k * s + p) * d..][..d]);
                if p + 1 < lens[i] {
                    loss -= n[tokens[i * s + p + 1] as usize];
                }
                kl += c
                    .iter()
                    .zip(&n)
                    .map(|(a, b)| a.exp() * (a - b))
                    .sum::<f64>();
            }
            let got = new[k];
            assert!(
                (got.loss_sum - loss).abs() < 1e-4 * (1.0 + loss.abs()),
                "{k}: {got:?} {loss}"
            );
            assert!(
                (got.kl_sum - kl).abs() < 1e-4 * (1.0 + kl.abs()),
                "{k}: {got:?} {kl}"
            );
            assert!(kl > 0.1, "the test's distributions differ: {kl}");
            assert_eq!(got.kl_n, lens[i] as u64);
            assert_eq!(got.loss_n, lens[i] as u64 - 1);
        }
        // An intervention from position 2 on: earlier positions are the unchanged run's
        // (here x_new equals x_clean before position 2, as causality makes it).
        let mut x_pos = x_clean.clone();
        for i in 0..b {
            for p in 2..s {
                let at = (i * s + p) * d;
                x_pos[at..at + d].copy_from_slice(&x_new[at..at + d]);
            }
        }
        let firsts = [2usize; 3];
        let skip = Rows {
            first_changed: Some(&firsts),
            ..rows(&x_pos)
        };
        let (skipped, _) = score(&u, all, &skip, terms.as_ref(), false);
        let (full, _) = score(&u, all, &rows(&x_pos), terms.as_ref(), false);
        for (a, c) in skipped.iter().zip(&full) {
            assert!(
                (a.loss_sum - c.loss_sum).abs() < 1e-9 * (1.0 + c.loss_sum.abs()),
                "{a:?} {c:?}"
            );
            assert!((a.kl_sum - c.kl_sum).abs() < 1e-5, "{a:?} {c:?}");
            assert_eq!((a.loss_n, a.kl_n), (c.loss_n, c.kl_n));
        }
        assert_eq!(orig[0].kl_sum, 0.0);
        assert_eq!(orig[1].kl_n, 3);
        assert_eq!(new[1].logit_diff, 0.0);
        assert!(new[5].logit_diff != 0.0);
    }
}
