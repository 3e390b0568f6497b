//! The diagonal-rank engine behind both circuits: for a square `[n, n]` matrix given as a
//! product of thin factors, per head, how many entries of each row lie strictly below and
//! strictly above the row's diagonal entry, without ever holding the matrix.
//!
//! Owns: blocking, the matmuls (gemm 0.19, single-threaded per block, blocks spread over the
//! cores with rayon) and the counting pass. Must not: know what the factors mean (OV, QK)
//! or make tables.
//!
//! Shape of the work, per head `h` of one layer: `M_h = (X @ W_h) @ R_h` with `X` `[n, d]`
//! (e.g. `LN(W_EE)`), `W_h` `[d, dh]` (e.g. `W_V[h]`) and `R_h` `[dh, n]` (e.g.
//! `W_O[h] @ W_U`). Rows are taken [`Options::block_rows`] at a time: one matmul gives the
//! block's left factors for every head (`X[rows] @ [W_1 | W_2 | ...]`), then for each head
//! the block's diagonal tile (columns = the block's own rows) is made first, so each row's
//! diagonal value comes from the same gemm that makes the rest of the row, then the other
//! columns [`COLS`] at a time; each `[rows, COLS]` tile stays in the core's L2 cache and is
//! counted as soon as it is made. Memory per worker: `block_rows x (heads * dh + COLS)`
//! floats; nothing of size `n x n`.
//!
//! Counting is exact: `below[i] = #{j : M[i, j] < M[i, i]}`, `above[i] = #{j : M[i, j] >
//! M[i, i]}` over the float32 values gemm produced (ties count in neither). A non-finite
//! diagonal value is an error, never a silent rank.

use ndarray::{s, ArrayView2, ArrayView3};
use rayon::prelude::*;

use crate::error::{Error, Result};

/// Columns per tile: a `[256, 1024]` f32 tile is 1 MiB, within a 2 MiB L2.
pub const COLS: usize = 1024;

/// Blocking knobs.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Rows per block (the unit of parallel work and of progress).
    pub block_rows: usize,
    /// Count entries above the diagonal too (the OV circuit needs both sides; QK only above).
    pub below: bool,
}

/// One head's counts, indexed by row.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counts {
    /// `#{j : M[i, j] < M[i, i]}` (empty unless [`Options::below`]).
    pub below: Vec<u32>,
    /// `#{j : M[i, j] > M[i, i]}`.
    pub above: Vec<u32>,
}

/// The factors of one layer's heads.
pub struct Factors<'a> {
    /// `X`, `[n, d]`.
    pub x: ArrayView2<'a, f32>,
    /// `[W_1 | W_2 | ...]`, `[d, heads * dh]`.
    pub w: ArrayView2<'a, f32>,
    /// `R_h` stacked, `[heads, dh, n]`.
    pub r: ArrayView3<'a, f32>,
}

/// `dst[m, n] = a[m, k] @ b[k, n]` on this thread, any strides (in elements).
///
/// SAFETY (callers): every index `i * rs + j * cs` the shapes describe is inside the buffer
/// the pointer points into, and `dst` is not aliased by `a` or `b`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_seq(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: isize,
    a: *const f32,
    a_rs: isize,
    a_cs: isize,
    b: *const f32,
    b_rs: isize,
    b_cs: isize,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs,
        false,
        a,
        a_cs,
        a_rs,
        b,
        b_cs,
        b_rs,
        0.0,
        1.0,
        false,
        false,
        false,
        gemm::Parallelism::None,
    );
}

/// `(#{x < d}, #{x > d})` over `row`, in 16 independent lanes so it vectorises.
#[inline(always)]
fn count_generic<const BELOW: bool>(row: &[f32], d: f32) -> (u32, u32) {
    let mut lt = [0u32; 16];
    let mut gt = [0u32; 16];
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        for j in 0..16 {
            if BELOW {
                lt[j] += (c[j] < d) as u32;
            }
            gt[j] += (c[j] > d) as u32;
        }
    }
    let mut below: u32 = lt.iter().sum();
    let mut above: u32 = gt.iter().sum();
    for &x in rest {
        if BELOW {
            below += (x < d) as u32;
        }
        above += (x > d) as u32;
    }
    (below, above)
}

/// AVX2 counting: a lane's compare result is all ones (-1) when true, so subtracting it
/// from a lane counter adds 1; two independent 8-lane counters per side.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn count_avx2<const BELOW: bool>(row: &[f32], d: f32) -> (u32, u32) {
    use std::arch::x86_64::*;
    let dv = _mm256_set1_ps(d);
    let (mut lt0, mut lt1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let (mut gt0, mut gt1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
    let chunks = row.chunks_exact(16);
    let rest = chunks.remainder();
    for c in chunks {
        let a = _mm256_loadu_ps(c.as_ptr());
        let b = _mm256_loadu_ps(c.as_ptr().add(8));
        gt0 = _mm256_sub_epi32(gt0, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(a, dv)));
        gt1 = _mm256_sub_epi32(gt1, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_GT_OQ>(b, dv)));
        if BELOW {
            lt0 = _mm256_sub_epi32(lt0, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(a, dv)));
            lt1 = _mm256_sub_epi32(lt1, _mm256_castps_si256(_mm256_cmp_ps::<_CMP_LT_OQ>(b, dv)));
        }
    }
    let sum = |v: __m256i| -> u32 {
        let mut lanes = [0u32; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr().cast(), v);
        lanes.iter().sum()
    };
    let (tail_lt, tail_gt) = count_generic::<BELOW>(rest, d);
    (
        sum(_mm256_add_epi32(lt0, lt1)) + tail_lt,
        sum(_mm256_add_epi32(gt0, gt1)) + tail_gt,
    )
}

/// Adds each row's counts of one `[rows, width]` tile (row-major) against `diag`.
fn count_tile(tile: &[f32], width: usize, diag: &[f32], below: &mut [u32], above: &mut [u32]) {
    let with_below = !below.is_empty();
    // The crate is built for baseline x86-64 (SSE2); the counting pass is picked for the
    // processor at run time, like gemm's kernels.
    #[cfg(target_arch = "x86_64")]
    let avx2 = is_x86_feature_detected!("avx2");
    for (i, (row, &d)) in tile.chunks_exact(width).zip(diag).enumerate() {
        let count = |row: &[f32]| -> (u32, u32) {
            #[cfg(target_arch = "x86_64")]
            {
                // SAFETY: AVX2 was detected on this processor just above.
                unsafe {
                    if avx2 {
                        return if with_below {
                            count_avx2::<true>(row, d)
                        } else {
                            count_avx2::<false>(row, d)
                        };
                    }
                }
            }
            if with_below {
                count_generic::<true>(row, d)
            } else {
                count_generic::<false>(row, d)
            }
        };
        let (b, a) = count(row);
        if with_below {
            below[i] += b;
        }
        above[i] += a;
    }
}

/// Column ranges of the tiles of row block `[r0, r1)` out of `n` columns: the diagonal tile
/// `[r0, r1)` first, then the rest in pieces of at most [`COLS`].
fn column_tiles(r0: usize, r1: usize, n: usize) -> Vec<(usize, usize)> {
    let mut out = vec![(r0, r1)];
    for (a, b) in [(0, r0), (r1, n)] {
        let mut c = a;
        while c < b {
            let e = (c + COLS).min(b);
            out.push((c, e));
            c = e;
        }
    }
    out
}

/// Counts of one block of rows `[r0, r1)` for every head: `out[head]`.
fn block_counts(f: &Factors, r0: usize, r1: usize, opts: Options) -> Result<Vec<Counts>> {
    let (n, d) = f.x.dim();
    let (heads, dh, _) = f.r.dim();
    let rows = r1 - r0;
    let hw = heads * dh;
    let x = f.x.slice(s![r0..r1, ..]);
    let x = x.as_standard_layout();
    let w = f.w.as_standard_layout();
    let r = f.r.as_standard_layout();
    let (x, w, r) = (
        x.as_slice().expect("standard layout"),
        w.as_slice().expect("standard layout"),
        r.as_slice().expect("standard layout"),
    );
    // The block's left factors for every head: [rows, heads * dh].
    let mut left = vec![0f32; rows * hw];
    // SAFETY: x is [rows, d], w is [d, hw], left is [rows, hw], all row-major and distinct.
    unsafe {
        gemm_seq(
            rows,
            hw,
            d,
            left.as_mut_ptr(),
            hw as isize,
            x.as_ptr(),
            d as isize,
            1,
            w.as_ptr(),
            hw as isize,
            1,
        );
    }
    let tiles = column_tiles(r0, r1, n);
    let mut tile = vec![0f32; rows * COLS.max(rows)];
    let mut out = Vec::with_capacity(heads);
    for h in 0..heads {
        let mut c = Counts {
            below: if opts.below {
                vec![0; rows]
            } else {
                Vec::new()
            },
            above: vec![0; rows],
        };
        let mut diag = vec![0f32; rows];
        for (t, &(c0, c1)) in tiles.iter().enumerate() {
            let width = c1 - c0;
            // SAFETY: left[.., h*dh..(h+1)*dh] is [rows, dh] with row stride hw; r[h, .., c0..c1]
            // is [dh, width] with row stride n; tile holds rows * width <= its length.
            unsafe {
                gemm_seq(
                    rows,
                    width,
                    dh,
                    tile.as_mut_ptr(),
                    width as isize,
                    left.as_ptr().add(h * dh),
                    hw as isize,
                    1,
                    r.as_ptr().add(h * dh * n + c0),
                    n as isize,
                    1,
                );
            }
            let tile = &tile[..rows * width];
            if t == 0 {
                for (i, dv) in diag.iter_mut().enumerate() {
                    *dv = tile[i * width + i];
                    if !dv.is_finite() {
                        return Err(Error::Other(format!(
                            "circuit: the diagonal entry of row {} (head #{h} of the layer) is {dv}; the weights hold non-finite values",
                            r0 + i
                        )));
                    }
                }
            }
            count_tile(tile, width, &diag, &mut c.below, &mut c.above);
        }
        out.push(c);
    }
    Ok(out)
}

/// Counts below and above the diagonal of every row of every head's `M_h = X @ W_h @ R_h`.
/// `progress(k)` is called as each block finishes, with `k` = its rows x heads.
pub fn diagonal_counts(
    f: &Factors,
    opts: Options,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<Counts>> {
    let (n, d) = f.x.dim();
    let (heads, dh, n_cols) = f.r.dim();
    if n_cols != n || f.w.dim() != (d, heads * dh) {
        return Err(Error::Other(format!(
            "circuit: factor shapes X {:?}, W {:?}, R {:?} do not make a square matrix per head",
            f.x.dim(),
            f.w.dim(),
            f.r.dim()
        )));
    }
    let block = opts.block_rows.max(1);
    let starts: Vec<usize> = (0..n).step_by(block).collect();
    let blocks: Vec<Vec<Counts>> = starts
        .par_iter()
        .map(|&r0| {
            let r1 = (r0 + block).min(n);
            let c = block_counts(f, r0, r1, opts)?;
            progress(((r1 - r0) * heads) as u64);
            Ok(c)
        })
        .collect::<Result<_>>()?;
    let mut out: Vec<Counts> = (0..heads)
        .map(|_| Counts {
            below: Vec::with_capacity(if opts.below { n } else { 0 }),
            above: Vec::with_capacity(n),
        })
        .collect();
    for b in blocks {
        for (o, c) in out.iter_mut().zip(b) {
            o.below.extend(c.below);
            o.above.extend(c.above);
        }
    }
    Ok(out)
}

/// Per-head summary of ranks (`rank = 1 + count`): the share within the top 10, within the
/// top `floor(0.05 n)`, and the lower median `sorted[(n - 1) / 2]` (`docs/metrics.md` §4).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankStats {
    pub frac_top1: f64,
    pub frac_top10: f64,
    pub frac_top5pct: f64,
    pub median: u32,
}

/// Summarises ranks (1-based).
pub fn rank_stats(ranks: &[u32]) -> RankStats {
    let n = ranks.len();
    if n == 0 {
        return RankStats {
            frac_top1: f64::NAN,
            frac_top10: f64::NAN,
            frac_top5pct: f64::NAN,
            median: 0,
        };
    }
    let share = |k: u32| ranks.iter().filter(|&&r| r <= k).count() as f64 / n as f64;
    let top5pct = (n as f64 * 0.05).floor() as u32;
    let mut sorted = ranks.to_vec();
    let (_, median, _) = sorted.select_nth_unstable((n - 1) / 2);
    RankStats {
        frac_top1: share(1),
        frac_top10: share(10),
        frac_top5pct: share(top5pct),
        median: *median,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::{Array2, Array3};
    use rand::{Rng, SeedableRng};

    /// The engine against a brute-force [n, n] product, over block sizes that do and do not
    /// divide n, and with more columns than one tile.
    #[test]
    fn counts_match_brute_force() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let (n, d, dh, heads) = (COLS + 37, 9, 5, 3);
        let x = Array2::from_shape_fn((n, d), |_| rng.gen::<f32>() - 0.5);
        let w = Array2::from_shape_fn((d, heads * dh), |_| rng.gen::<f32>() - 0.5);
        let r = Array3::from_shape_fn((heads, dh, n), |_| rng.gen::<f32>() - 0.5);
        for block in [1, 64, 100, n] {
            let f = Factors {
                x: x.view(),
                w: w.view(),
                r: r.view(),
            };
            let opts = Options {
                block_rows: block,
                below: true,
            };
            let done = std::sync::atomic::AtomicU64::new(0);
            let got = diagonal_counts(&f, opts, &|k| {
                done.fetch_add(k, std::sync::atomic::Ordering::Relaxed);
            })
            .unwrap();
            assert_eq!(done.into_inner(), (n * heads) as u64);
            for h in [0, heads - 1] {
                let left = x.dot(&w.slice(s![.., h * dh..(h + 1) * dh]));
                let m = left.dot(&r.index_axis(ndarray::Axis(0), h));
                for i in (0..n).step_by(97) {
                    let dv = m[[i, i]];
                    // Near-ties may round differently in gemm and in ndarray's dot.
                    let tol = 1e-5;
                    let lo = m.row(i).iter().filter(|&&v| v < dv - tol).count() as u32;
                    let hi = m.row(i).iter().filter(|&&v| v > dv + tol).count() as u32;
                    let near = n as u32 - lo - hi;
                    let (b, a) = (got[h].below[i], got[h].above[i]);
                    assert!(
                        b >= lo && b <= lo + near,
                        "block {block} head {h} row {i}: below {b} vs {lo}+{near}"
                    );
                    assert!(
                        a >= hi && a <= hi + near,
                        "block {block} head {h} row {i}: above {a} vs {hi}+{near}"
                    );
                    assert!(a + b < n as u32, "the diagonal itself is never counted");
                }
            }
        }
    }

    #[test]
    fn stats_use_the_lower_median_and_floor_of_five_percent() {
        let ranks: Vec<u32> = (1..=40).collect();
        let s = rank_stats(&ranks);
        assert_eq!(s.median, 20); // sorted[(40 - 1) / 2] = sorted[19]
        assert_eq!(s.frac_top10, 10.0 / 40.0);
        assert_eq!(s.frac_top5pct, 2.0 / 40.0); // floor(0.05 * 40) = 2
        assert_eq!(s.frac_top1, 1.0 / 40.0);
    }

    #[test]
    fn non_finite_weights_are_an_error() {
        let x = Array2::from_elem((4, 2), f32::NAN);
        let w = Array2::ones((2, 2));
        let r = Array3::ones((1, 2, 4));
        let f = Factors {
            x: x.view(),
            w: w.view(),
            r: r.view(),
        };
        let opts = Options {
            block_rows: 2,
            below: false,
        };
        let err = diagonal_counts(&f, opts, &|_| {}).unwrap_err().to_string();
        assert!(err.contains("non-finite"), "{err}");
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use ndarray::{Array2, Array3};
    use std::time::Instant;

    /// CPU seconds of this process so far (utime + stime, /proc/self/stat, 100 Hz ticks).
    fn cpu() -> f64 {
        let s = std::fs::read_to_string("/proc/self/stat").unwrap();
        let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
        (f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap()) / 100.0
    }

    /// `cargo test --lib circuits::rank::speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn engine_speed() {
        let n = 16384;
        for dh in [16usize, 64] {
            let d = 64;
            let x = Array2::from_shape_fn((n, d), |(i, j)| ((i * 7 + j * 13) % 17) as f32 - 8.0);
            let w = Array2::from_shape_fn((d, dh), |(i, j)| ((i * 3 + j * 5) % 11) as f32 - 5.0);
            let r =
                Array3::from_shape_fn((1, dh, n), |(_, i, j)| ((i * 5 + j * 3) % 13) as f32 - 6.0);
            let f = Factors {
                x: x.view(),
                w: w.view(),
                r: r.view(),
            };
            let flop = 2.0 * (n * n * dh) as f64;
            for below in [false, true] {
                let (t, c) = (Instant::now(), cpu());
                diagonal_counts(
                    &f,
                    Options {
                        block_rows: 256,
                        below,
                    },
                    &|_| {},
                )
                .unwrap();
                let (s, cs) = (t.elapsed().as_secs_f64(), cpu() - c);
                eprintln!(
                    "dh {dh} below {below}: wall {s:.2} s cpu {cs:.2} s, {:.1} GFLOP per cpu-s",
                    flop / cs / 1e9
                );
            }
            let left = vec![1f32; 256 * dh];
            let mut tile = vec![0f32; 256 * COLS];
            let reps = n / 256 * n / COLS;
            let c = cpu();
            for _ in 0..reps {
                unsafe {
                    gemm_seq(
                        256,
                        COLS,
                        dh,
                        tile.as_mut_ptr(),
                        COLS as isize,
                        left.as_ptr(),
                        dh as isize,
                        1,
                        r.as_ptr(),
                        n as isize,
                        1,
                    );
                }
            }
            let cs = cpu() - c;
            eprintln!(
                "  gemm only: {:.1} GFLOP per cpu-s",
                2.0 * (reps * 256 * COLS * dh) as f64 / cs / 1e9
            );
            let diag = vec![0.5f32; 256];
            let mut lo = vec![0u32; 256];
            let mut hi = vec![0u32; 256];
            let c = cpu();
            for _ in 0..reps * 20 {
                count_tile(&tile, COLS, &diag, &mut lo, &mut hi);
            }
            let cs = cpu() - c;
            eprintln!(
                "  count only: {:.2} Gelem per cpu-s",
                (20 * reps * 256 * COLS) as f64 / cs / 1e9
            );
        }
        let (m, k, nn) = (2048, 2048, 2048);
        let a = vec![1f32; m * k];
        let b = vec![1f32; k * nn];
        let c = cpu();
        let t = Instant::now();
        for _ in 0..4 {
            std::hint::black_box(crate::kernels::sgemm(m, k, nn, &a, &b));
        }
        let (s, cs) = (t.elapsed().as_secs_f64(), cpu() - c);
        let fl = 4.0 * 2.0 * (m * k * nn) as f64;
        eprintln!(
            "sgemm 2048^3 all threads: wall {:.1} GFLOP/s, {:.1} GFLOP per cpu-s",
            fl / s / 1e9,
            fl / cs / 1e9
        );
    }
}
