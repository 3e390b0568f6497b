//! Host-side numeric kernels shared by the model's CPU path, the metrics and the loss: the
//! matmul (gemm 0.19, AVX-512 where the processor has it), a branch-free `exp` that the
//! compiler vectorises, and log-sum-exp over vocabulary-sized rows.
//!
//! Owns: accuracy and speed of these few loops (they dominate `projection_loss`, which takes
//! three log-sum-exps over the vocabulary per token and head). Must not: allocate per call or
//! know about models.

/// Row-major `[m, k] @ [k, n]` with gemm 0.19 on every core.
pub fn sgemm(m: usize, k: usize, n: usize, a: &[f32], b: &[f32]) -> Vec<f32> {
    assert!(a.len() == m * k && b.len() == k * n, "sgemm: operand sizes");
    let mut c = vec![0f32; m * n];
    // SAFETY: the three buffers have exactly the sizes the strides describe (checked above),
    // `c` is not aliased, and gemm with read_dst = false only writes `c`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(rayon::current_num_threads()),
        );
    }
    c
}

/// `a @ b` for host matrices, through [`sgemm`] (copies only operands that are not already
/// row-major and contiguous).
pub fn matmul(a: ndarray::ArrayView2<f32>, b: ndarray::ArrayView2<f32>) -> ndarray::Array2<f32> {
    let ((m, k), (k2, n)) = (a.dim(), b.dim());
    assert_eq!(k, k2, "matmul: inner dimensions");
    let a = a.as_standard_layout();
    let b = b.as_standard_layout();
    let c = sgemm(
        m,
        k,
        n,
        a.as_slice().expect("standard layout"),
        b.as_slice().expect("standard layout"),
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
