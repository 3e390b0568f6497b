//! Host-side numeric kernels shared by the model's CPU path, the metrics and the loss: the
//! matmul (gemm 0.19, AVX-512 where the processor has it), a branch-free `exp` that the
//! compiler vectorises, and log-sum-exp over vocabulary-sized rows.
//!
//! Owns: accuracy and speed of these few loops (they dominate `projection_loss`, which takes
//! three log-sum-exps over the vocabulary per token and head). Must not: allocate per call or
//! know about models.
//!
//! The crate is built for baseline x86-64 (SSE2), so a plain loop here would run 4 lanes
//! wide. Each element-wise kernel is therefore written once as an `#[inline(always)]` body
//! and compiled again inside `#[target_feature]` copies (AVX-512, AVX2+FMA) that
//! `simd_dispatch!` picks at run time: 16 lanes where the processor has them, the same
//! binary everywhere (no `-C target-cpu` in the two set-up commands).

/// Defines `pub fn $name(args) -> ret` that runs `$body_fn(args)` compiled for AVX-512 or
/// AVX2+FMA when the running processor has them (checked per call: one cached atomic load),
/// else as built. `$name = $simd_fn / $plain_fn(args)` gives the fallback a body of its own
/// (e.g. an `exp` without fused multiply-adds).
macro_rules! simd_dispatch {
    ($(#[$meta:meta])* $name:ident = $body_fn:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        simd_dispatch!($(#[$meta])* $name = $body_fn / $body_fn($($arg: $ty),*) $(-> $ret)?);
    };
    ($(#[$meta:meta])* $name:ident = $body_fn:ident / $plain_fn:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)?) => {
        $(#[$meta])*
        #[inline]
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? {
                    $body_fn($($arg),*)
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? {
                    $body_fn($($arg),*)
                }
                if std::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the processor has the features v4 is compiled for.
                    return unsafe { v4($($arg),*) };
                }
                if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                    // SAFETY: as above, for v3.
                    return unsafe { v3($($arg),*) };
                }
            }
            $plain_fn($($arg),*)
        }
    };
}

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
    // Round x * log2(e) to the nearest integer with the 1.5 * 2^23 trick (no libm call):
    // y's low mantissa bits then hold n as an integer, read back with integer ops (an
    // `as i32` cast would be a saturating scalar conversion per element, not a vector op).
    const MAGIC: f32 = 12_582_912.0;
    let y = x * LOG2E + MAGIC;
    let n = y - MAGIC;
    let ni = (y.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = x - n * LN2_HI - n * LN2_LO;
    // Cephes expf polynomial for e^r on |r| <= ln2 / 2.
    let mut p = 1.987_569_2e-4;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    er * scale
}

/// [`exp`] with fused multiply-adds (18 vector operations instead of 29: Rust does not fuse
/// `a * b + c` by itself), for bodies compiled only where the processor has FMA: elsewhere
/// `mul_add` is a libm call.
#[inline(always)]
pub fn exp_fma(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    const MAGIC: f32 = 12_582_912.0;
    let y = x.mul_add(LOG2E, MAGIC);
    let n = y - MAGIC;
    let ni = (y.to_bits() as i32).wrapping_sub(0x4B40_0000);
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, x));
    let mut p = 1.987_569_2e-4f32;
    p = p.mul_add(r, 1.398_2e-3);
    p = p.mul_add(r, 8.333_452e-3);
    p = p.mul_add(r, 4.166_579_6e-2);
    p = p.mul_add(r, 1.666_666_5e-1);
    p = p.mul_add(r, 0.5);
    let er = (p * r).mul_add(r, r) + 1.0;
    let scale = f32::from_bits((ni.wrapping_add(127) as u32) << 23);
    er * scale
}

#[inline(always)]
fn max_body(x: &[f32]) -> f32 {
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

simd_dispatch!(
    /// Maximum of a slice (`-inf` when empty), with independent lanes so it vectorises.
    max = max_body(x: &[f32]) -> f32
);

#[inline(always)]
fn sum_exp_shifted_body(x: &[f32], m: f32) -> f64 {
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

simd_dispatch!(
    /// `sum(exp(x - m))`, accumulated in 16 lanes (f32) and summed in f64.
    sum_exp_shifted = sum_exp_shifted_body(x: &[f32], m: f32) -> f64
);

#[inline(always)]
fn softmax_causal_body(row: &mut [f32], q: usize) {
    let (live, masked) = row.split_at_mut(q + 1);
    masked.fill(0.0);
    let m = max_body(live);
    let mut sum = 0f32;
    for x in live.iter_mut() {
        *x = exp(*x - m);
        sum += *x;
    }
    let inv = 1.0 / sum;
    live.iter_mut().for_each(|x| *x *= inv);
}

simd_dispatch!(
    /// Softmax of attention row `q` in place: keys after `q` are masked and become exactly
    /// 0, as in TransformerLens.
    softmax_causal = softmax_causal_body(row: &mut [f32], q: usize)
);

#[inline(always)]
fn softmax_masked_body(row: &mut [f32]) {
    let m = max_body(row);
    let mut sum = 0f32;
    for x in row.iter_mut() {
        let e = if *x == f32::NEG_INFINITY {
            0.0
        } else {
            exp(*x - m)
        };
        *x = e;
        sum += e;
    }
    let inv = 1.0 / sum;
    row.iter_mut().for_each(|x| *x *= inv);
}

simd_dispatch!(
    /// Softmax of a row in place where `-inf` marks masked keys (scores a hook may have
    /// rewritten): those become exactly 0.
    softmax_masked = softmax_masked_body(row: &mut [f32])
);

/// `gelu_new`: `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, with
/// `tanh(u) = 1 - 2 / (exp(2u) + 1)` so it vectorises.
#[inline(always)]
pub fn gelu_new(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    let u = SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    let tanh = 1.0 - 2.0 / (exp(2.0 * u) + 1.0);
    0.5 * x * (1.0 + tanh)
}

#[inline(always)]
fn gelu_body(x: &mut [f32]) {
    x.iter_mut().for_each(|v| *v = gelu_new(*v));
}

simd_dispatch!(
    /// GPT-2's GELU (`gelu_new`) in place.
    gelu_slice = gelu_body(x: &mut [f32])
);

#[inline(always)]
fn center_row_body(x: &mut [f32], r: &[f32], eps: f32) -> f32 {
    let d = r.len() as f32;
    let mut lanes = [0f32; 16];
    for c in r.chunks(16) {
        for (a, &v) in lanes.iter_mut().zip(c) {
            *a += v;
        }
    }
    let mean = lanes.iter().sum::<f32>() / d;
    let mut var = [0f32; 16];
    for (xc, rc) in x.chunks_mut(16).zip(r.chunks(16)) {
        for ((x, &r), v) in xc.iter_mut().zip(rc).zip(var.iter_mut()) {
            *x = r - mean;
            *v += *x * *x;
        }
    }
    (var.iter().sum::<f32>() / d + eps).sqrt()
}

simd_dispatch!(
    /// LayerNorm(Pre)'s first half: `x = r - mean(r)`; returns TL's `hook_scale`,
    /// `sqrt(mean(x^2) + eps)`.
    center_row = center_row_body(x: &mut [f32], r: &[f32], eps: f32) -> f32
);

#[inline(always)]
fn scale_slice_body(x: &mut [f32], f: f32) {
    x.iter_mut().for_each(|v| *v *= f);
}

simd_dispatch!(
    /// `x *= f`.
    scale_slice = scale_slice_body(x: &mut [f32], f: f32)
);

/// projection_loss's three modified logits from a logit `l`, a head's `new @ W_U` (`n`) and
/// `orig @ W_U` (`o`), divided by the frozen final scale (`* inv`): keep only the projection
/// (`l + (new - orig)`), only the perpendicular part (`l - new`), or ablate the head's direct
/// effect (`l - orig`). The one definition both passes below and the target logit use, so
/// the target is exactly the value the log-sum-exp saw.
#[inline(always)]
pub fn three_variants(l: f32, n: f32, o: f32, inv: f32) -> [f32; 3] {
    [l + (n - o) * inv, l - n * inv, l - o * inv]
}

/// `a.max(b)` without `f32::max`'s NaN handling, so it is one vector instruction (a NaN
/// logit still reaches the sum of exps, and from there the loss).
#[inline(always)]
fn fmax(a: f32, b: f32) -> f32 {
    if b > a {
        b
    } else {
        a
    }
}

#[inline(always)]
fn max3_body(l: &[f32], n: &[f32], o: &[f32], inv: f32) -> [f32; 3] {
    let w = l.len();
    let (n, o) = (&n[..w], &o[..w]);
    let mut lanes = [[f32::NEG_INFINITY; 16]; 3];
    let (lc, nc, oc) = (l.chunks_exact(16), n.chunks_exact(16), o.chunks_exact(16));
    let tail = lc.remainder().len();
    for ((l, n), o) in lc.zip(nc).zip(oc) {
        for j in 0..16 {
            let v = three_variants(l[j], n[j], o[j], inv);
            for x in 0..3 {
                lanes[x][j] = fmax(lanes[x][j], v[x]);
            }
        }
    }
    let mut out = [f32::NEG_INFINITY; 3];
    for j in w - tail..w {
        let v = three_variants(l[j], n[j], o[j], inv);
        for x in 0..3 {
            out[x] = fmax(out[x], v[x]);
        }
    }
    for x in 0..3 {
        out[x] = lanes[x].iter().copied().fold(out[x], fmax);
    }
    out
}

simd_dispatch!(
    /// The maxima of projection_loss's three modified logit rows ([`three_variants`] of
    /// `l`, `n`, `o`), without writing the rows.
    max3 = max3_body(l: &[f32], n: &[f32], o: &[f32], inv: f32) -> [f32; 3]
);

#[inline(always)]
fn sum_exp3_body<const FMA: bool>(
    l: &[f32],
    n: &[f32],
    o: &[f32],
    inv: f32,
    m: [f32; 3],
) -> ([f64; 3], [f32; 3]) {
    let e = |x: f32| if FMA { exp_fma(x) } else { exp(x) };
    let w = l.len();
    let (n, o) = (&n[..w], &o[..w]);
    let mut lanes = [[0f32; 16]; 3];
    let mut maxes = [[f32::NEG_INFINITY; 16]; 3];
    let (lc, nc, oc) = (l.chunks_exact(16), n.chunks_exact(16), o.chunks_exact(16));
    let tail = lc.remainder().len();
    for ((l, n), o) in lc.zip(nc).zip(oc) {
        for j in 0..16 {
            let v = three_variants(l[j], n[j], o[j], inv);
            for x in 0..3 {
                lanes[x][j] += e(v[x] - m[x]);
                maxes[x][j] = fmax(maxes[x][j], v[x]);
            }
        }
    }
    let mut out = [0f64; 3];
    let mut mx = [f32::NEG_INFINITY; 3];
    for j in w - tail..w {
        let v = three_variants(l[j], n[j], o[j], inv);
        for x in 0..3 {
            out[x] += e(v[x] - m[x]) as f64;
            mx[x] = fmax(mx[x], v[x]);
        }
    }
    for x in 0..3 {
        out[x] += lanes[x].iter().map(|&s| s as f64).sum::<f64>();
        mx[x] = maxes[x].iter().copied().fold(mx[x], fmax);
    }
    (out, mx)
}

#[inline(always)]
fn sum_exp3_fma(l: &[f32], n: &[f32], o: &[f32], inv: f32, m: [f32; 3]) -> ([f64; 3], [f32; 3]) {
    sum_exp3_body::<true>(l, n, o, inv, m)
}

#[inline(always)]
fn sum_exp3_plain(l: &[f32], n: &[f32], o: &[f32], inv: f32, m: [f32; 3]) -> ([f64; 3], [f32; 3]) {
    sum_exp3_body::<false>(l, n, o, inv, m)
}

simd_dispatch!(
    /// `sum(exp(row - m))` for each of projection_loss's three modified logit rows
    /// ([`three_variants`]), and the rows' maxima, in one pass: the rows are recomputed from
    /// `l`, `n`, `o` rather than read back (three multiply-adds cost less than writing and
    /// re-reading three rows), and a caller that already holds a running max from earlier
    /// columns needs no separate max pass (see `projection_loss::chunked_losses`). The AVX
    /// copies use [`exp_fma`], the fallback [`exp`].
    sum_exp3 = sum_exp3_fma / sum_exp3_plain(l: &[f32], n: &[f32], o: &[f32], inv: f32, m: [f32; 3]) -> ([f64; 3], [f32; 3])
);

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

    /// The worst relative error of `f` against std's `exp` on [-80, 80).
    fn worst_exp_error(f: fn(f32) -> f32) -> f32 {
        let mut worst = 0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            worst = worst.max(((f(x) - x.exp()) / x.exp()).abs());
            x += 0.0137;
        }
        worst
    }

    #[test]
    fn exp_is_accurate() {
        let worst = worst_exp_error(exp);
        assert!(worst < 3e-7, "worst relative error {worst}");
        assert_eq!(exp(-200.0), (-87.0f32).exp().max(exp(-200.0)));
    }

    #[test]
    fn exp_fma_is_accurate() {
        let worst = worst_exp_error(exp_fma);
        assert!(worst < 3e-7, "worst relative error {worst}");
    }

    #[test]
    fn sum_exp3_matches_f64() {
        let w = 16 * 5 + 7;
        let f = |i: usize, a: f32| (i as f32 * a).sin() * 4.0;
        let (l, n, o): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            (0..w).map(|i| f(i, 0.3)).collect(),
            (0..w).map(|i| f(i, 0.7)).collect(),
            (0..w).map(|i| f(i, 1.1)).collect(),
        );
        let inv = 0.8;
        let m = max3(&l, &n, &o, inv);
        // Shifted by less than the max too (as after earlier columns with smaller values).
        let shift = [m[0], m[1] - 5.0, m[2] + 3.0];
        let (got, got_max) = sum_exp3(&l, &n, &o, inv, shift);
        assert_eq!(got_max, m);
        for x in 0..3 {
            let want: f64 = (0..w)
                .map(|j| ((three_variants(l[j], n[j], o[j], inv)[x] - shift[x]) as f64).exp())
                .sum();
            assert!((got[x] - want).abs() < 1e-6 * want, "{} vs {want}", got[x]);
        }
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
