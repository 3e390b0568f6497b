//! Host-side numeric kernels shared by the model's CPU path, the metrics and the loss: the
//! matmul (gemm 0.19, AVX-512 where the processor has it), a branch-free `exp` that the
//! compiler vectorises, and log-sum-exp over vocabulary-sized rows.
//!
//! Owns: accuracy and speed of these few loops (they dominate `projection_loss`, which takes
//! three log-sum-exps over the vocabulary per token and head). Must not: allocate per call or
//! know about models.

/// Row-major `[m, k] @ [k, n]` with gemm 0.19 on every core.
pub fn sgemm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut c = vec![0f32; m * n];
    sgemm_into(m, k, n, a, b, &mut c, false, Par::All);
    c
}

/// How many threads one matmul may use: all of rayon's, or one (the caller is already
/// running on every core, e.g. one matmul per head inside a parallel loop; nesting gemm's
/// own rayon split inside those tasks only adds hand-offs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Par {
    All,
    One,
}

impl Par {
    fn gemm(self) -> gemm::Parallelism {
        match self {
            Par::All if rayon::current_num_threads() > 1 => {
                gemm::Parallelism::Rayon(rayon::current_num_threads())
            }
            _ => gemm::Parallelism::None,
        }
    }
}

/// Row-major `c (+)= a @ b` (`[m, k] @ [k, n]`): `accumulate` adds to what `c` holds (a
/// bias or a residual stream written there first), else `c` is overwritten.
#[allow(clippy::too_many_arguments)]
pub fn sgemm_into(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    b: &[f32],
    c: &mut [f32],
    accumulate: bool,
    par: Par,
) {
    assert!(
        a.len() == m * k && b.len() == k * n && c.len() == m * n,
        "sgemm: operand sizes"
    );
    // SAFETY: the three buffers have exactly the sizes the strides describe (checked above)
    // and `c` is a unique borrow.
    unsafe {
        sgemm_strided(
            m,
            k,
            n,
            MatPtr::row_major(a.as_ptr(), k),
            MatPtr::row_major(b.as_ptr(), n),
            c.as_mut_ptr(),
            n as isize,
            1,
            accumulate,
            1.0,
            par,
        )
    }
}

/// A read-only matrix operand by pointer and strides (elements), so a head's slice of a
/// fused `[tokens, 3 * heads * d_head]` buffer, or its transpose, is read in place.
#[derive(Clone, Copy)]
pub struct MatPtr {
    pub ptr: *const f32,
    /// Stride between rows.
    pub rs: isize,
    /// Stride between columns.
    pub cs: isize,
}

impl MatPtr {
    pub fn row_major(ptr: *const f32, cols: usize) -> Self {
        MatPtr {
            ptr,
            rs: cols as isize,
            cs: 1,
        }
    }
}

/// `c = (accumulate ? c : 0) + scale * (a @ b)`, `a`: `[m, k]`, `b`: `[k, n]`, `c`: `[m, n]`
/// with row stride `c_rs` and column stride `c_cs`.
///
/// # Safety
/// Every element the strides address must be in bounds; `c`'s elements must not be read or
/// written by anyone else during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm_strided(
    m: usize,
    k: usize,
    n: usize,
    a: MatPtr,
    b: MatPtr,
    c: *mut f32,
    c_rs: isize,
    c_cs: isize,
    accumulate: bool,
    scale: f32,
    par: Par,
) {
    gemm::gemm(
        m,
        n,
        k,
        c,
        c_cs,
        c_rs,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        1.0,
        scale,
        false,
        false,
        false,
        par.gemm(),
    );
}

/// `a @ b` for host matrices, through [`sgemm`] (copies only operands that are not already
/// row-major and contiguous).
pub fn matmul(a: ndarray::ArrayView2<f32>, b: ndarray::ArrayView2<f32>) -> ndarray::Array2<f32> {
    matmul_par(a, b, Par::All)
}

/// [`matmul`] with a choice of [`Par`].
pub fn matmul_par(
    a: ndarray::ArrayView2<f32>,
    b: ndarray::ArrayView2<f32>,
    par: Par,
) -> ndarray::Array2<f32> {
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    assert_eq!(k, k2, "matmul: inner dimensions");
    let a = a.as_standard_layout();
    let b = b.as_standard_layout();
    let mut c = vec![0f32; m * n];
    sgemm_into(
        m,
        k,
        n,
        a.as_slice().expect("standard layout"),
        b.as_slice().expect("standard layout"),
        &mut c,
        false,
        par,
    );
    ndarray::Array2::from_shape_vec((m, n), c).expect("m * n values")
}

const LOG2E: f32 = std::f32::consts::LOG2_E;
// ln 2 split in two so that n * LN2_HI is exact for |n| < 2^9 (Cody-Waite reduction).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x` for f32, ~1 ulp on the range that matters here (arguments <= 0 after the max shift),
/// with no branches or calls so loops over slices vectorise.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round x * log2(e) to the nearest integer with the 1.5 * 2^23 trick (no libm call).
    const MAGIC: f32 = 12_582_912.0;
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    // Cephes expf polynomial for e^r on |r| <= ln2 / 2.
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    er * scale
}

/// Maximum of a slice (`-inf` when empty), with independent lanes so it vectorises.
#[inline]
pub fn max(x: &[f32]) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l = l.max(v);
        }
    }
    rest.iter().copied().fold(
        lanes.iter().copied().fold(f32::NEG_INFINITY, f32::max),
        f32::max,
    )
}

/// `sum(exp(x - m))`, accumulated in 16 lanes (f32) and summed in f64.
#[inline]
pub fn sum_exp_shifted(x: &[f32], m: f32) -> f64 {
    let mut lanes = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &v) in lanes.iter_mut().zip(c) {
            *l += exp(v - m);
        }
    }
    let tail: f64 = rest.iter().map(|&v| exp(v - m) as f64).sum();
    lanes.iter().map(|&l| l as f64).sum::<f64>() + tail
}

/// `log(sum(exp(x)))`, shifted by the max for stability.
#[inline]
pub fn log_sum_exp(x: &[f32]) -> f32 {
    let m = max(x);
    if m == f32::NEG_INFINITY {
        return m;
    }
    m + sum_exp_shifted(x, m).ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_accurate() {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let rel = ((exp(x) - x.exp()) / x.exp()).abs();
            worst = worst.max(rel);
            x += 0.0137;
        }
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(-200.0), (-87.0f32).exp().max(exp(-200.0)));
    }

    #[test]
    fn log_sum_exp_matches_f64() {
        let x: Vec<f32> = (0..1001)
            .map(|i| ((i * 37) % 101) as f32 * 0.1 - 3.0)
            .collect();
        let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let want = m + x.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
        assert!((log_sum_exp(&x) as f64 - want).abs() < 1e-5 * want.abs());
        assert_eq!(log_sum_exp(&[]), f32::NEG_INFINITY);
    }
}
