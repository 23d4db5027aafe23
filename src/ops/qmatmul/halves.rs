//! F16 and BF16 weights × activations rounded to the same format (ggml's `vec_dot_f16` and
//! `vec_dot_bf16` numerics: the product of two halves is exact in f32, only the order of the
//! sums is free). For each output, lane `l` of 16 accumulator lanes sums `w_k x_k` for
//! `k ≡ l (mod 16)`, `k` ascending, by fused multiply-adds; then `reduce` adds the lanes in a
//! fixed tree. The row kernel (decode) and the tile kernel (k in chunks) perform that same
//! sequence, on AVX-512 (one 16-lane vector) and on AVX2 (two 8-lane halves of it), so a
//! token's outputs have the same bits alone or in a batch, on either instruction set. Both
//! widen the halves as they load them.

use core::arch::x86_64::*;

use rayon::prelude::*;

use super::driver::{row_tasks, Weights, MIN_TILED};
use super::simd::{self, prefetch_l2, Ahead};
use crate::ops::matmul::SyncPtr;
use crate::ops::scratch;

/// A 16-bit float format of weights.
pub(super) trait Half: Sync {
    /// `v` rounded to this format (to nearest, ties to even), as ggml rounds activations.
    fn round(v: f32) -> f32;

    /// 16 values at `p`, the first `n` of them (the rest zero), widened to f32.
    ///
    /// # Safety
    /// AVX-512 F/BW; `p` points to `n` ≤ 16 values.
    unsafe fn load16(p: *const u8, n: usize) -> __m512;

    /// 8 values at `p`, the first `n` of them (the rest zero), widened to f32.
    ///
    /// # Safety
    /// AVX2 and F16C; `p` points to `n` ≤ 8 values.
    unsafe fn load8(p: *const u8, n: usize) -> __m256;
}

pub(super) struct F16;
pub(super) struct Bf16;

/// The first `n` (≤ 8) halves at `p`, zeros after.
///
/// # Safety
/// `p` points to `n` halves.
#[inline(always)]
unsafe fn halves8(p: *const u8, n: usize) -> __m128i {
    match n {
        8 => _mm_loadu_si128(p.cast()),
        _ => {
            let mut v = [0u16; 8];
            std::ptr::copy_nonoverlapping(p, v.as_mut_ptr().cast::<u8>(), 2 * n);
            _mm_loadu_si128(v.as_ptr().cast())
        }
    }
}

/// The first `n` (≤ 16) halves at `p`, zeros after.
///
/// # Safety
/// AVX-512 BW/VL; `p` points to `n` halves.
#[inline(always)]
unsafe fn halves16(p: *const u8, n: usize) -> __m256i {
    match n {
        16 => _mm256_loadu_si256(p.cast()),
        _ => _mm256_maskz_loadu_epi16(lanes(n) as __mmask16, p.cast()),
    }
}

impl Half for F16 {
    fn round(v: f32) -> f32 {
        half::f16::from_f32(v).to_f32()
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const u8, n: usize) -> __m512 {
        _mm512_cvtph_ps(halves16(p, n))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8, n: usize) -> __m256 {
        _mm256_cvtph_ps(halves8(p, n))
    }
}

/// A bf16 is the top half of an f32: widening shifts it into place.
impl Half for Bf16 {
    fn round(v: f32) -> f32 {
        half::bf16::from_f32(v).to_f32()
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn load16(p: *const u8, n: usize) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(halves16(
            p, n,
        ))))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load8(p: *const u8, n: usize) -> __m256 {
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(halves8(
            p, n,
        ))))
    }
}

/// `y[m, n_rows] = x[m, k] · Wᵀ` for `W` of halves `H` in `data` (checked by the caller), on
/// AVX-512 or, with `avx2`, on AVX2.
pub(super) fn run<H: Half>(
    data: &[u8],
    n_rows: usize,
    k: usize,
    x: &[f32],
    y: &mut [f32],
    avx2: bool,
) {
    let m = x.len() / k;
    let k16 = k.next_multiple_of(16);
    let tiled = m >= MIN_TILED;
    let n_tasks = super::driver::n_tasks(n_rows);
    let bytes = 4 * m * k16 + if tiled { n_tasks * task_bytes(m) } else { 0 };
    scratch::with_aligned_bytes(bytes, |buf| {
        let (xs, rest) = buf.split_at_mut(4 * m * k16);
        // SAFETY: the scratch is 64-byte aligned and f32 is valid for any bits.
        let xs = unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast::<f32>(), m * k16) };
        xs.par_chunks_mut(k16)
            .zip(x.par_chunks(k))
            .for_each(|(out, x)| {
                out[..k]
                    .iter_mut()
                    .zip(x)
                    .for_each(|(o, &v)| *o = H::round(v));
                out[k..].fill(0.0);
            });
        let w = Weights {
            data,
            n_rows,
            nb: k,
        };
        match (tiled, avx2) {
            (true, false) => tiles::<Avx512<H>>(&w, xs, k16, rest, m, y),
            (true, true) => tiles::<Avx2<H>>(&w, xs, k16, rest, m, y),
            (false, false) => row_products::<Avx512<H>>(&w, xs, k16, y),
            (false, true) => row_products::<Avx2<H>>(&w, xs, k16, y),
        }
    })
}

fn row_products<K: Kernels>(w: &Weights, xs: &[f32], k16: usize, y: &mut [f32]) {
    let (row_bytes, n_rows, m) = (2 * w.nb, w.n_rows, xs.len() / k16);
    let y_ptr = SyncPtr(y.as_mut_ptr());
    row_tasks(n_rows).for_each(|rows| {
        for r0 in rows.step_by(4) {
            let quad = w.rows::<4>(r0, row_bytes);
            let n = (n_rows - r0).min(4);
            for t in 0..m {
                // SAFETY: `supports` checked the CPU; `quad` points to whole rows of k
                // halves and `xs` holds m rows of k16 floats.
                let out = unsafe { K::rows4(quad, w.nb, &xs[t * k16..(t + 1) * k16]) };
                // SAFETY: this task alone writes columns `rows` of y, and t < m.
                let y = unsafe { y_ptr.slice(t * n_rows + r0, n) };
                y.copy_from_slice(&out[..n]);
            }
        }
    });
}

/// Scratch bytes of one tiled task: the partial sums of every token tile.
fn task_bytes(m: usize) -> usize {
    std::mem::size_of::<Partial>() * m.div_ceil(TOKENS)
}

fn tiles<K: Kernels>(
    w: &Weights,
    xs: &[f32],
    k16: usize,
    scratch: &mut [u8],
    m: usize,
    y: &mut [f32],
) {
    let (row_bytes, n_rows) = (2 * w.nb, w.n_rows);
    let y_ptr = SyncPtr(y.as_mut_ptr());
    let scratch = scratch.par_chunks_mut(task_bytes(m));
    row_tasks(n_rows).zip(scratch).for_each(|(rows, scratch)| {
        // SAFETY: the scratch is 64-byte aligned (`Partial` is a multiple of 64 bytes long)
        // and `Partial` (floats) is valid for any bits.
        let partial = unsafe {
            std::slice::from_raw_parts_mut(
                scratch.as_mut_ptr().cast::<Partial>(),
                m.div_ceil(TOKENS),
            )
        };
        let n_tiles = k16.div_ceil(K_CHUNK) * m.div_ceil(TOKENS);
        let prefetch_step = (ROWS * row_bytes).div_ceil(n_tiles).next_multiple_of(64);
        for r0 in rows.clone().step_by(ROWS) {
            // Rows past the task's end belong to the next task: read, never stored here.
            let block = w.rows::<ROWS>(r0, row_bytes);
            // The next rows arrive while these are multiplied, a few lines per tile: 1B-class
            // prefill 177 tok/s, against 173 with all of them prefetched here at once.
            let next_rows = (r0 + ROWS).min(rows.end)..(r0 + 2 * ROWS).min(rows.end);
            let mut next =
                w.data[next_rows.start * row_bytes..next_rows.end * row_bytes].as_ptr_range();
            // k in chunks: a chunk of the rows stays in L1 while every token passes over it.
            for k0 in (0..k16).step_by(K_CHUNK) {
                let ks = k0..(k0 + K_CHUNK).min(k16);
                for (t0, partial) in (0..m).step_by(TOKENS).zip(partial.iter_mut()) {
                    let t: [usize; TOKENS] = std::array::from_fn(|i| (t0 + i).min(m - 1));
                    assert!(t.iter().all(|&t| xs.len() >= (t + 1) * k16));
                    assert!(ks.end <= k16 && ks.start.is_multiple_of(16));
                    // SAFETY: `supports` checked the CPU; each `block` row holds k halves;
                    // every t[i] < m and ks lies within k16 (the asserts).
                    unsafe { K::tile(block, w.nb, xs, t, ks.clone(), partial) };
                    let len = prefetch_step.min(next.end as usize - next.start as usize);
                    simd::prefetch_l2(next.start, len);
                    next.start = next.start.wrapping_add(len);
                }
            }
            let n = (rows.end - r0).min(ROWS);
            for (t0, partial) in (0..m).step_by(TOKENS).zip(partial.iter()) {
                // SAFETY: `supports` checked the CPU.
                let out = unsafe { K::sums(partial) };
                for (i, out) in out.iter().enumerate().take(m - t0) {
                    // SAFETY: this task alone writes columns `rows` of y; t0 + i < m.
                    let y = unsafe { y_ptr.slice((t0 + i) * n_rows + r0, n) };
                    y.copy_from_slice(&out[..n]);
                }
            }
        }
    });
}

/// Mask of the first `n` (≤ 16) lanes.
fn lanes(n: usize) -> u16 {
    ((1u32 << n) - 1) as u16
}

/// Rows and tokens per tile: 8 × 3 accumulators of 16 lanes, so each token's 16 values
/// loaded from L2 serve 8 rows. 1B-class prefill, tok/s: 4 × 4: 160, 4 × 6: 151, 8 × 2: 172,
/// 6 × 4: 183, 8 × 3: 183, 12 × 2: 160.
const ROWS: usize = 8;
const TOKENS: usize = 3;

/// Values of k per pass over the tokens: the rows' chunk (16 KiB of halves) and one tile's
/// tokens (12 KiB) fit in L1. 1B-class prefill, tok/s: 512: 178, 1024: 187, 2048: 188 (with
/// 4 × 4 tiles over rows widened to f32 first: 256: 129, 512: 135, 1024: 146, 2048: 130).
const K_CHUNK: usize = 1024;

/// One token tile's accumulators between chunks of k: `[token][row][lane]`.
type Partial = [[[f32; 16]; ROWS]; TOKENS];

/// The kernels of one instruction set.
trait Kernels {
    /// Rows `w` (4 pointers to `k` halves) times one token `x` (`k` rounded values, zeros to
    /// a multiple of 16).
    ///
    /// # Safety
    /// The CPU has the instruction set; each `w[r]` points to `k` halves.
    unsafe fn rows4(w: [*const u8; 4], k: usize, x: &[f32]) -> [f32; 4];

    /// Adds columns `ks` of `ROWS` rows (`w`, `k` halves each) times tokens `t` of `xs` (`k`
    /// values rounded up to 16 per token) to `partial`, which the first chunk
    /// (`ks.start == 0`) sets.
    ///
    /// # Safety
    /// The CPU has the instruction set; each `w[r]` points to `k` halves; `xs` holds the
    /// tokens `t`; `ks` lies within `k` rounded up to 16 and its start is a multiple of 16.
    unsafe fn tile(
        w: [*const u8; ROWS],
        k: usize,
        xs: &[f32],
        t: [usize; TOKENS],
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    );

    /// A tile's finished accumulators as outputs: `out[token][row]`.
    ///
    /// # Safety
    /// The CPU has the instruction set.
    unsafe fn sums(partial: &Partial) -> [[f32; ROWS]; TOKENS];
}

struct Avx512<H>(std::marker::PhantomData<H>);
struct Avx2<H>(std::marker::PhantomData<H>);

/// The 16 lanes of `acc` summed in a fixed order: halves, then quarters, pairs, neighbours.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn reduce(acc: __m512) -> f32 {
    let lo = _mm512_castps512_ps256(acc);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
    reduce_halves(lo, hi)
}

/// `reduce` of the 16 lanes `lo` (0–7) and `hi` (8–15).
#[inline]
#[target_feature(enable = "avx")]
fn reduce_halves(lo: __m256, hi: __m256) -> f32 {
    let v = _mm256_add_ps(lo, hi);
    let v = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
    _mm_cvtss_f32(_mm_add_ss(v, _mm_movehdup_ps(v)))
}

impl<H: Half> Kernels for Avx512<H> {
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn rows4(w: [*const u8; 4], k: usize, x: &[f32]) -> [f32; 4] {
        let ahead = Ahead::new(k.div_ceil(16), 32, simd::PREFETCH_F16);
        let mut acc = [_mm512_setzero_ps(); 4];
        for j in 0..k.div_ceil(16) {
            let x = _mm512_loadu_ps(x[16 * j..].as_ptr());
            let n = (k - 16 * j).min(16);
            for r in 0..4 {
                // One prefetch per 64 bytes of the row: every other chunk.
                if j % 2 == 0 {
                    prefetch_l2(ahead.of(w[r], j), 64);
                }
                acc[r] = _mm512_fmadd_ps(H::load16(w[r].add(32 * j), n), x, acc[r]);
            }
        }
        acc.map(|a| reduce(a))
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn tile(
        w: [*const u8; ROWS],
        k: usize,
        xs: &[f32],
        t: [usize; TOKENS],
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    ) {
        let k16 = k.next_multiple_of(16);
        let mut acc = [[_mm512_setzero_ps(); ROWS]; TOKENS];
        if ks.start > 0 {
            acc = partial.map(|p| p.map(|p| _mm512_loadu_ps(p.as_ptr())));
        }
        for j in ks.step_by(16) {
            let n = (k - j).min(16);
            let x: [__m512; TOKENS] =
                std::array::from_fn(|i| _mm512_loadu_ps(xs.as_ptr().add(t[i] * k16 + j)));
            for r in 0..ROWS {
                let w = H::load16(w[r].add(2 * j), n);
                for i in 0..TOKENS {
                    acc[i][r] = _mm512_fmadd_ps(w, x[i], acc[i][r]);
                }
            }
        }
        for (p, a) in partial.iter_mut().zip(acc) {
            for (p, a) in p.iter_mut().zip(a) {
                _mm512_storeu_ps(p.as_mut_ptr(), a);
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn sums(partial: &Partial) -> [[f32; ROWS]; TOKENS] {
        partial.map(|p| p.map(|p| reduce(_mm512_loadu_ps(p.as_ptr()))))
    }
}

/// 16 halves at `p`, the first `n` of them, widened as two 8-lane vectors.
///
/// # Safety
/// AVX2 and F16C; `p` points to `n` ≤ 16 halves.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn load16_avx2<H: Half>(p: *const u8, n: usize) -> [__m256; 2] {
    [
        H::load8(p, n.min(8)),
        H::load8(p.add(16), n.saturating_sub(8)),
    ]
}

/// Runs `step(j, n)` for the chunks of 16 values from `j` in `ks` (`n` of them within `k`):
/// the whole ones in a loop of their own, so that the last, partial one's copy stays out
/// of it and the accumulators in registers.
#[inline(always)]
fn chunks(ks: std::ops::Range<usize>, k: usize, mut step: impl FnMut(usize, usize)) {
    let whole = ks.end.min(k / 16 * 16).max(ks.start);
    for j in (ks.start..whole).step_by(16) {
        step(j, 16);
    }
    for j in (whole..ks.end).step_by(16) {
        step(j, k - j);
    }
}

impl<H: Half> Kernels for Avx2<H> {
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows4(w: [*const u8; 4], k: usize, x: &[f32]) -> [f32; 4] {
        let ahead = Ahead::new(k.div_ceil(16), 32, simd::PREFETCH_F16);
        let mut acc = [[_mm256_setzero_ps(); 2]; 4];
        chunks(0..k.next_multiple_of(16), k, |j, n| {
            let x = [0, 8].map(|h| _mm256_loadu_ps(x[j + h..].as_ptr()));
            for r in 0..4 {
                // One prefetch per 64 bytes of the row: every other chunk.
                if j % 32 == 0 {
                    prefetch_l2(ahead.of(w[r], j / 16), 64);
                }
                let w = load16_avx2::<H>(w[r].add(2 * j), n);
                for h in 0..2 {
                    acc[r][h] = _mm256_fmadd_ps(w[h], x[h], acc[r][h]);
                }
            }
        });
        acc.map(|[lo, hi]| reduce_halves(lo, hi))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile(
        w: [*const u8; ROWS],
        k: usize,
        xs: &[f32],
        t: [usize; TOKENS],
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    ) {
        let k16 = k.next_multiple_of(16);
        let x: [*const f32; TOKENS] = std::array::from_fn(|i| xs.as_ptr().add(t[i] * k16));
        // One row at a time: its 3 tokens × 2 halves of accumulators stay in registers.
        for r in 0..ROWS {
            let mut acc = [[_mm256_setzero_ps(); 2]; TOKENS];
            if ks.start > 0 {
                for (acc, p) in acc.iter_mut().zip(partial.iter()) {
                    let p = p[r].as_ptr();
                    *acc = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8))];
                }
            }
            chunks(ks.clone(), k, |j, n| {
                let w = load16_avx2::<H>(w[r].add(2 * j), n);
                for (acc, x) in acc.iter_mut().zip(x) {
                    for (h, acc) in acc.iter_mut().enumerate() {
                        *acc = _mm256_fmadd_ps(w[h], _mm256_loadu_ps(x.add(j + 8 * h)), *acc);
                    }
                }
            });
            for (acc, p) in acc.iter().zip(partial.iter_mut()) {
                let p = p[r].as_mut_ptr();
                _mm256_storeu_ps(p, acc[0]);
                _mm256_storeu_ps(p.add(8), acc[1]);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn sums(partial: &Partial) -> [[f32; ROWS]; TOKENS] {
        partial.map(|p| {
            p.map(|p| {
                reduce_halves(
                    _mm256_loadu_ps(p.as_ptr()),
                    _mm256_loadu_ps(p[8..].as_ptr()),
                )
            })
        })
    }
}
