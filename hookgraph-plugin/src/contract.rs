//! The common contractions of attribution metrics, on the processed weights.
//!
//! Owns: [`Matrix`], [`Ctx::unembed_columns`] (a row of `W_U`'s columns for given tokens),
//! [`Ctx::w_o`] / [`OutProj`] (`z @ W_O[h]` and `W_O[h] @ u`), and the two vector helpers
//! every direct-path metric needs ([`dot`], [`centred`]). Must not: call the host other than
//! through [`Ctx::weight`], or cache anything across calls (views live for one call only).
//!
//! With these, a direct logit attribution is `dot(&w_o.z_w_o(h, z), &centred(u)) / scale`:
//! `z` a `hook_z` lane, `u` the target's `W_U` column, `scale` `ln_final.hook_scale`
//! (TransformerLens's `cache.apply_ln_to_stack`: the centring moved onto the direction).

use crate::{Ctx, TensorRef};

/// A dense row-major `f32` matrix owned by the plugin.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// Row `i`; panics when out of bounds.
    pub fn row(&self, i: usize) -> &[f32] {
        assert!(i < self.rows, "row {i} of a {}-row matrix", self.rows);
        &self.data[i * self.cols..(i + 1) * self.cols]
    }
}

/// `a · b`, accumulated in `f32` in index order; panics when the lengths differ.
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(
        a.len(),
        b.len(),
        "dot of vectors of lengths {} and {}",
        a.len(),
        b.len()
    );
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// `v − mean(v)` (mean in `f64`): a residual-stream direction with LayerNorm's centring
/// moved onto it, `(r − mean r) · u = r · (u − mean u)`.
pub fn centred(v: &[f32]) -> Vec<f32> {
    let m = v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64;
    v.iter().map(|&x| x - m as f32).collect()
}

/// One layer's `W_O`, `[n_heads, d_head, d_model]`, borrowed for the current call.
#[derive(Debug, Clone, Copy)]
pub struct OutProj<'a> {
    w: TensorRef<'a, f32>,
}

impl<'a> OutProj<'a> {
    pub fn d_head(&self) -> usize {
        self.w.shape()[1]
    }
    pub fn d_model(&self) -> usize {
        self.w.shape()[2]
    }

    /// `W_O[head]` as `d_head` rows of `d_model`.
    fn head(&self, head: usize) -> &'a [f32] {
        let (dh, d) = (self.d_head(), self.d_model());
        assert!(
            head < self.w.shape()[0],
            "head {head} of {}",
            self.w.shape()[0]
        );
        &self.w.data()[head * dh * d..(head + 1) * dh * d]
    }

    /// `z @ W_O[head]`: a head's output in the residual stream (`[d_model]`) from its
    /// `hook_z` lane (`[d_head]`).
    pub fn z_w_o(&self, head: usize, z: &[f32]) -> Vec<f32> {
        let d = self.d_model();
        assert_eq!(
            z.len(),
            self.d_head(),
            "z has {} entries, d_head is {}",
            z.len(),
            self.d_head()
        );
        let mut out = vec![0f32; d];
        for (&zi, row) in z.iter().zip(self.head(head).chunks_exact(d)) {
            for (o, &w) in out.iter_mut().zip(row) {
                *o += zi * w;
            }
        }
        out
    }

    /// `W_O[head] @ u`: a residual direction `u` (`[d_model]`) pulled back to the head's
    /// `z` space (`[d_head]`); `dot(z, w_o_u(h, u)) = dot(z_w_o(h, z), u)`, cheaper when one
    /// direction meets many positions.
    pub fn w_o_u(&self, head: usize, u: &[f32]) -> Vec<f32> {
        let d = self.d_model();
        assert_eq!(u.len(), d, "u has {} entries, d_model is {d}", u.len());
        self.head(head)
            .chunks_exact(d)
            .map(|row| dot(row, u))
            .collect()
    }
}

impl Ctx<'_> {
    /// `W_U[:, t]` for each `t` in `tokens`, as the rows of a `[tokens.len(), d_model]`
    /// matrix (`unembed.W_U` is `[d_model, d_vocab]`, so a column is strided; this gathers
    /// it once).
    pub fn unembed_columns(&self, tokens: &[u32]) -> Result<Matrix, String> {
        let w_u = self.weight("unembed.W_U")?;
        let &[d, v] = w_u.shape() else {
            return Err(format!("unembed.W_U has shape {:?}", w_u.shape()));
        };
        let mut data = Vec::with_capacity(tokens.len() * d);
        for &t in tokens {
            let t = t as usize;
            if t >= v {
                return Err(format!("token {t} is outside the vocabulary ({v})"));
            }
            data.extend((0..d).map(|i| w_u.data()[i * v + t]));
        }
        Ok(Matrix {
            rows: tokens.len(),
            cols: d,
            data,
        })
    }

    /// Layer `layer`'s `W_O` (`blocks.L.attn.W_O`), for [`OutProj::z_w_o`].
    pub fn w_o(&self, layer: usize) -> Result<OutProj<'_>, String> {
        let w = self.weight(&format!("blocks.{layer}.attn.W_O"))?;
        if w.ndim() != 3 {
            return Err(format!("blocks.{layer}.attn.W_O has shape {:?}", w.shape()));
        }
        Ok(OutProj { w })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn z_w_o_and_w_o_u_agree() {
        // 2 heads, d_head 2, d_model 3.
        let data: Vec<f32> = (0..12).map(|x| x as f32).collect();
        let shape = [2usize, 2, 3];
        let w = OutProj {
            w: TensorRef::from_parts(&shape, &data),
        };
        assert_eq!(
            w.z_w_o(1, &[1.0, 2.0]),
            vec![6.0 + 18.0, 7.0 + 20.0, 8.0 + 22.0]
        );
        let u = [1.0, -1.0, 2.0];
        assert_eq!(
            dot(&w.z_w_o(1, &[1.0, 2.0]), &u),
            dot(&[1.0, 2.0], &w.w_o_u(1, &u))
        );
        assert_eq!(centred(&[1.0, 2.0, 3.0]), vec![-1.0, 0.0, 1.0]);
    }
}
