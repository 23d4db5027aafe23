//! The F16 and BF16 kernels on x86-64, in `halves`' sum order: the row kernel (decode) and
//! the tile kernel (k in chunks), on AVX-512 (one 16-lane vector) and on AVX2 (two 8-lane
//! halves of it).
//!
//! BF16 on a CPU with AVX512_BF16 (`Level::Avx512Bf16`) takes `vdpbf16ps` instead, which
//! multiplies 32 pairs at once as ggml's `vec_dot_bf16` does there: lane `l` sums the pairs
//! `(2l, 2l + 1)` of each chunk of 32 values, chunks in order, then the same `reduce`. Its
//! rows and tiles perform that one sequence too (same bits alone or in a batch); its sums
//! differ from the widened kernels' in order, and in the subnormal values the instruction
//! flushes to zero.

use core::arch::x86_64::*;

use rayon::prelude::*;

use super::{chunks, padded, rounded, row_products, with_prepared, Bf16, Half, RowKernel, F16};
use crate::ops::bf16;
use crate::ops::disjoint::SyncPtr;
use crate::ops::qmatmul::driver::{n_tasks, row_tasks, Weights, MIN_TILED};
use crate::ops::qmatmul::simd::{self, prefetch_l2, Ahead};
use crate::ops::qmatmul::{isa, Isa};
use crate::ops::scratch::Pod;

/// A half format's values widened to f32 as they are loaded.
pub(crate) trait Widen {
    /// Whether `vdpbf16ps` multiplies this format.
    const PAIRS: bool = false;

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

    /// An activation (rounded to this format) as the AVX2 kernels keep it: F16 in its own
    /// format, half the bytes of f32 to read in each of the tiles' six passes over a chunk,
    /// for one `vcvtph2ps` a load; BF16 as f32, since its widening takes two instructions,
    /// which cost the tiles more than the bytes saved.
    type Act: Pod + Copy + Default + Send + Sync;

    /// `v` rounded to this format, as an `Act`.
    fn act(v: f32) -> Self::Act;

    /// The 8 activations at `p` as f32.
    ///
    /// # Safety
    /// AVX2 and F16C; `p` points to 8 activations.
    unsafe fn load_act8(p: *const Self::Act) -> __m256;
}

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

impl Widen for F16 {
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

    type Act = u16;

    fn act(v: f32) -> u16 {
        half::f16::from_f32(v).to_bits()
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_act8(p: *const u16) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }
}

/// A bf16 is the top half of an f32: widening shifts it into place.
impl Widen for Bf16 {
    const PAIRS: bool = true;

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

    type Act = f32;

    fn act(v: f32) -> f32 {
        bf16::round(v)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn load_act8(p: *const f32) -> __m256 {
        _mm256_loadu_ps(p)
    }
}

/// The kernels that multiply halves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Level {
    Avx2,
    Avx512,
    /// BF16 pairs by `vdpbf16ps` (AVX512_BF16).
    Avx512Bf16,
}

impl Level {
    /// The best level for format `H` at the instruction set in use (AVX2 or AVX-512).
    pub fn best<H: Half>() -> Level {
        match isa() {
            Isa::Avx2 => Level::Avx2,
            _ if H::PAIRS && bf16::available() => Level::Avx512Bf16,
            _ => Level::Avx512,
        }
    }
}

/// `y[m, n_rows] = x[m, k] · Wᵀ` for `W` of halves `H` in `data` (checked by the caller), by
/// the kernels of `level` (which the CPU has).
pub(crate) fn run<H: Half>(
    data: &[u8],
    n_rows: usize,
    k: usize,
    x: &[f32],
    y: &mut [f32],
    level: Level,
) {
    let w = Weights {
        data,
        n_rows,
        nb: k,
    };
    // The row kernels take 8 rows at a time where the registers hold their accumulators and
    // the rows are long: 8 streams from memory, which the hardware prefetchers keep fuller
    // than 4 when each row is a page or more; shorter rows went faster 4 at a time.
    let long = 2 * k >= 4096;
    match level {
        Level::Avx512 if long => product::<Avx512<H>, 8>(&w, x, y),
        Level::Avx512 => product::<Avx512<H>, 4>(&w, x, y),
        // 8 rows' 16 accumulators would fill the 16 registers (spilled).
        Level::Avx2 => product::<Avx2<H>, 4>(&w, x, y),
        Level::Avx512Bf16 => {
            assert!(H::PAIRS);
            match long {
                true => product::<Avx512Bf16, 8>(&w, x, y),
                false => product::<Avx512Bf16, 4>(&w, x, y),
            }
        }
    }
}

/// `y = x Wᵀ` by the kernels `K`: the activations prepared for them, then rows (`N` at a
/// time) or tiles.
fn product<K: Kernels, const N: usize>(w: &Weights, x: &[f32], y: &mut [f32]) {
    let m = x.len() / w.nb;
    let tiled = m >= MIN_TILED;
    let tasks_bytes = if tiled {
        n_tasks(w.n_rows) * task_bytes(m)
    } else {
        0
    };
    with_prepared::<K, _>(w.nb, x, tasks_bytes, |xs, rest| match tiled {
        true => tiles::<K>(w, xs, rest, m, y),
        false => row_products::<K, N, 1>(w, xs, y),
    })
}

/// Scratch bytes of one tiled task: the partial sums of every token tile, then the chunk of
/// the rows.
fn task_bytes(m: usize) -> usize {
    std::mem::size_of::<Partial>() * m.div_ceil(TOKENS) + CHUNK_BYTES
}

fn tiles<K: Kernels>(w: &Weights, xs: &[K::X], scratch: &mut [u8], m: usize, y: &mut [f32]) {
    let (row_bytes, n_rows, stride) = (2 * w.nb, w.n_rows, padded(w.nb));
    let k_steps = w.nb.next_multiple_of(K::STEP);
    let y_ptr = SyncPtr(y.as_mut_ptr());
    let scratch = scratch.par_chunks_mut(task_bytes(m));
    row_tasks(n_rows).zip(scratch).for_each(|(rows, scratch)| {
        let (partial, chunk) = scratch.split_at_mut(scratch.len() - CHUNK_BYTES);
        // SAFETY: the scratch is 64-byte aligned (`Partial` is a multiple of 64 bytes long)
        // and `Partial` (floats) is valid for any bits.
        let partial = unsafe {
            std::slice::from_raw_parts_mut(
                partial.as_mut_ptr().cast::<Partial>(),
                m.div_ceil(TOKENS),
            )
        };
        let n_tiles = k_steps.div_ceil(K_CHUNK) * m.div_ceil(TOKENS);
        let prefetch_step = (ROWS * row_bytes).div_ceil(n_tiles).next_multiple_of(64);
        for r0 in rows.clone().step_by(ROWS) {
            // The next rows arrive while these are multiplied, a few lines per tile: 1B-class
            // prefill 177 tok/s, against 173 with all of them prefetched here at once.
            let next_rows = (r0 + ROWS).min(rows.end)..(r0 + 2 * ROWS).min(rows.end);
            let mut next =
                w.data[next_rows.start * row_bytes..next_rows.end * row_bytes].as_ptr_range();
            // k in chunks: a chunk of the rows stays in L1 while every token passes over it.
            for k0 in (0..k_steps).step_by(K_CHUNK) {
                let ks = k0..(k0 + K_CHUNK).min(k_steps);
                // The chunk of the rows, copied next to each other: rows a power of two bytes
                // apart fall in the same L1 sets, where 8 of them fill every way and evict one
                // another and the tokens between the passes over them. Rows past the task's
                // end belong to the next task: read, never stored here.
                let bytes = 2 * (ks.end.min(w.nb) - k0);
                for (r, packed) in chunk.chunks_exact_mut(2 * K_CHUNK).enumerate() {
                    let row = (r0 + r).min(n_rows - 1) * row_bytes + 2 * k0;
                    packed[..bytes].copy_from_slice(&w.data[row..row + bytes]);
                }
                let block: [*const u8; ROWS] =
                    std::array::from_fn(|r| chunk[r * 2 * K_CHUNK..].as_ptr());
                for (t0, partial) in (0..m).step_by(TOKENS).zip(partial.iter_mut()) {
                    let t: [usize; TOKENS] = std::array::from_fn(|i| (t0 + i).min(m - 1));
                    assert!(t.iter().all(|&t| xs.len() >= (t + 1) * stride));
                    assert!(ks.end <= stride && ks.start.is_multiple_of(K::STEP));
                    // SAFETY: `supports` checked the CPU; each `block` row holds the columns
                    // `ks` within k; every t[i] < m and ks lies within the padded rows (the
                    // asserts).
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

/// Bytes of one chunk of a tile's rows (`tiles` copies it).
const CHUNK_BYTES: usize = ROWS * 2 * K_CHUNK;

/// One token tile's accumulators between chunks of k: `[token][row][lane]`.
type Partial = [[[f32; 16]; ROWS]; TOKENS];

/// The kernels of one instruction set: its row kernel and its tiles.
trait Kernels: RowKernel {
    /// Values per step along k.
    const STEP: usize;

    /// Adds columns `ks` of `ROWS` rows of `k` halves (`w[r]` points to column `ks.start` of
    /// row `r`) times tokens `t` of `xs` (`prepare`d, `padded(k)` values per token) to
    /// `partial`, which the first chunk (`ks.start == 0`) sets.
    ///
    /// # Safety
    /// The CPU has the instruction set; each `w[r]` points to the columns `ks` within `k`;
    /// `xs` holds the tokens `t`; `ks` lies within `k` rounded up to `STEP`, its start a
    /// multiple of `STEP`.
    unsafe fn tile(
        w: [*const u8; ROWS],
        k: usize,
        xs: &[Self::X],
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

/// `halves`' `reduce` of the 16 lanes of `acc`: halves, then quarters, pairs, neighbours.
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

/// A tile's accumulators: zero at the first chunk (`k0 == 0`), else the partial sums.
#[inline]
#[target_feature(enable = "avx512f")]
fn load_partial(partial: &Partial, k0: usize) -> [[__m512; ROWS]; TOKENS] {
    let mut acc = [[_mm512_setzero_ps(); ROWS]; TOKENS];
    if k0 > 0 {
        // Loops rather than closures: a closure would not inherit the target features.
        for (acc, p) in acc.iter_mut().zip(partial) {
            for (acc, p) in acc.iter_mut().zip(p) {
                // SAFETY: each lane array holds 16 floats.
                *acc = unsafe { _mm512_loadu_ps(p.as_ptr()) };
            }
        }
    }
    acc
}

#[inline]
#[target_feature(enable = "avx512f")]
fn store_partial(partial: &mut Partial, acc: [[__m512; ROWS]; TOKENS]) {
    for (p, a) in partial.iter_mut().zip(acc) {
        for (p, a) in p.iter_mut().zip(a) {
            // SAFETY: each lane array holds 16 floats.
            unsafe { _mm512_storeu_ps(p.as_mut_ptr(), a) };
        }
    }
}

impl<H: Half> RowKernel for Avx512<H> {
    type X = f32;

    fn prepare(x: &[f32], out: &mut [f32]) {
        rounded(H::round, x, out)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn rows<const N: usize>(w: [*const u8; N], k: usize, x: &[f32]) -> [f32; N] {
        let ahead = Ahead::in_groups(k.div_ceil(16), 32, simd::PREFETCH_F16, N);
        let mut acc = [_mm512_setzero_ps(); N];
        // A plain loop: as a closure passed to `chunks`, this body was not inlined (a call
        // per chunk of 16).
        for j in 0..k.div_ceil(16) {
            let x = _mm512_loadu_ps(x[16 * j..].as_ptr());
            let n = (k - 16 * j).min(16);
            for r in 0..N {
                // One prefetch per 64 bytes of the row: every other chunk.
                if j % 2 == 0 {
                    prefetch_l2(ahead.of(w[r], j), 64);
                }
                acc[r] = _mm512_fmadd_ps(H::load16(w[r].add(32 * j), n), x, acc[r]);
            }
        }
        acc.map(|a| reduce(a))
    }
}

impl<H: Half> Kernels for Avx512<H> {
    const STEP: usize = 16;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn tile(
        w: [*const u8; ROWS],
        k: usize,
        xs: &[Self::X],
        t: [usize; TOKENS],
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    ) {
        let (stride, k0) = (padded(k), ks.start);
        let mut acc = load_partial(partial, k0);
        // j counts from the chunk's start, as the rows `w` do.
        let xs = &xs[k0..];
        chunks::<16>(0..ks.len(), k - k0, |j, n| {
            let x: [__m512; TOKENS] =
                std::array::from_fn(|i| _mm512_loadu_ps(xs.as_ptr().add(t[i] * stride + j)));
            for r in 0..ROWS {
                let w = H::load16(w[r].add(2 * j), n);
                for i in 0..TOKENS {
                    acc[i][r] = _mm512_fmadd_ps(w, x[i], acc[i][r]);
                }
            }
        });
        store_partial(partial, acc);
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

/// Adds the chunk of 16 values from `j` of rows `w` (the first `n` of them) times `x` to
/// `acc` (lanes 0–7 and 8–15).
///
/// # Safety
/// AVX2 and F16C; each `w[r]` points to `j + n` values; `x` holds `j + 16`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fmadd_rows16<H: Half, const N: usize>(
    acc: &mut [[__m256; 2]; N],
    w: [*const u8; N],
    j: usize,
    n: usize,
    x: &[H::Act],
) {
    let x = [0, 8].map(|h| H::load_act8(x[j + h..j + h + 8].as_ptr()));
    for r in 0..N {
        let w = load16_avx2::<H>(w[r].add(2 * j), n);
        for h in 0..2 {
            acc[r][h] = _mm256_fmadd_ps(w[h], x[h], acc[r][h]);
        }
    }
}

impl<H: Half> RowKernel for Avx2<H> {
    type X = H::Act;

    fn prepare(x: &[f32], out: &mut [H::Act]) {
        rounded(H::act, x, out)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows<const N: usize>(w: [*const u8; N], k: usize, x: &[H::Act]) -> [f32; N] {
        let ahead = Ahead::in_groups(k.div_ceil(16), 32, simd::PREFETCH_F16, N);
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        // Plain loops: as a closure passed to `chunks`, this body was not inlined (a call
        // per chunk of 16, the accumulators in memory).
        for j in (0..k / 16 * 16).step_by(16) {
            // One prefetch per 64 bytes of the row: every other chunk.
            if j % 32 == 0 {
                for w in w {
                    prefetch_l2(ahead.of(w, j / 16), 64);
                }
            }
            fmadd_rows16::<H, N>(&mut acc, w, j, 16, x);
        }
        if !k.is_multiple_of(16) {
            fmadd_rows16::<H, N>(&mut acc, w, k / 16 * 16, k % 16, x);
        }
        acc.map(|[lo, hi]| reduce_halves(lo, hi))
    }
}

impl<H: Half> Kernels for Avx2<H> {
    const STEP: usize = 16;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile(
        w: [*const u8; ROWS],
        k: usize,
        xs: &[Self::X],
        t: [usize; TOKENS],
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    ) {
        let x: [*const H::Act; TOKENS] = std::array::from_fn(|i| xs.as_ptr().add(t[i] * padded(k)));
        // Each half of the 16 lanes sums on its own: one half of 3 rows at a time, 9 chains
        // of fused multiply-adds that hide their latency, in registers (4 rows spilled one).
        for h in 0..2 {
            tile_half::<H, 3>(w, 0, h, k, x, ks.clone(), partial);
            tile_half::<H, 3>(w, 3, h, k, x, ks.clone(), partial);
            tile_half::<H, 2>(w, 6, h, k, x, ks.clone(), partial);
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

/// AVX2's `tile` for lanes `8 h ..= 8 h + 7` of rows `r0 .. r0 + R`.
///
/// # Safety
/// As `Kernels::tile`; `x[i]` points to token `t[i]`'s values.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_half<H: Half, const R: usize>(
    w: [*const u8; ROWS],
    r0: usize,
    h: usize,
    k: usize,
    x: [*const H::Act; TOKENS],
    ks: std::ops::Range<usize>,
    partial: &mut Partial,
) {
    let mut rows = [std::ptr::null(); R];
    rows.copy_from_slice(&w[r0..r0 + R]);
    let mut acc = [[_mm256_setzero_ps(); TOKENS]; R];
    if ks.start > 0 {
        for (r, acc) in acc.iter_mut().enumerate() {
            for (acc, p) in acc.iter_mut().zip(partial.iter()) {
                *acc = _mm256_loadu_ps(p[r0 + r][8 * h..].as_ptr());
            }
        }
    }
    let whole = ks.end.min(k / 16 * 16).max(ks.start);
    for j in (ks.start..whole).step_by(16) {
        fmadd_tile_half::<H, R>(&mut acc, rows, j - ks.start + 8 * h, x, j + 8 * h, 8);
    }
    for j in (whole..ks.end).step_by(16) {
        let n = (k - j).saturating_sub(8 * h).min(8);
        fmadd_tile_half::<H, R>(&mut acc, rows, j - ks.start + 8 * h, x, j + 8 * h, n);
    }
    for (r, acc) in acc.iter().enumerate() {
        for (acc, p) in acc.iter().zip(partial.iter_mut()) {
            _mm256_storeu_ps(p[r0 + r][8 * h..].as_mut_ptr(), *acc);
        }
    }
}

/// Adds 8 values from `wj` of rows `w` (the first `n` of them) times those from `xj` of
/// tokens `x` to `acc`: `acc[row][token]`.
///
/// # Safety
/// AVX2, FMA and F16C; each `w[r]` points to `wj + n` halves; each `x[i]` to `xj + 8`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn fmadd_tile_half<H: Half, const R: usize>(
    acc: &mut [[__m256; TOKENS]; R],
    w: [*const u8; R],
    wj: usize,
    x: [*const H::Act; TOKENS],
    xj: usize,
    n: usize,
) {
    let mut xv = [_mm256_setzero_ps(); TOKENS];
    for (xv, x) in xv.iter_mut().zip(x) {
        *xv = H::load_act8(x.add(xj));
    }
    for (acc, w) in acc.iter_mut().zip(w) {
        let w = H::load8(w.add(2 * wj), n);
        for (acc, x) in acc.iter_mut().zip(xv) {
            *acc = _mm256_fmadd_ps(w, x, *acc);
        }
    }
}

/// BF16 weights times activations by `vdpbf16ps`, 32 values a step.
struct Avx512Bf16;

/// The first `n` (≤ 32) bf16 values at `p`, zeros after.
///
/// # Safety
/// AVX-512 F/BW; `p` points to `n` values.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
unsafe fn bf16x32(p: *const u8, n: usize) -> __m512bh {
    let v = match n {
        32 => _mm512_loadu_si512(p.cast()),
        _ => _mm512_maskz_loadu_epi16(((1u64 << n) - 1) as __mmask32, p.cast()),
    };
    std::mem::transmute(v)
}

impl RowKernel for Avx512Bf16 {
    type X = u16;

    fn prepare(x: &[f32], out: &mut [u16]) {
        rounded(|v| bf16::bits(v) as u16, x, out)
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn rows<const N: usize>(w: [*const u8; N], k: usize, x: &[u16]) -> [f32; N] {
        let ahead = Ahead::in_groups(k.div_ceil(32), 64, simd::PREFETCH_F16, N);
        let mut acc = [_mm512_setzero_ps(); N];
        // Plain loops: the body of a closure would not inherit the target features.
        for j in (0..k / 32 * 32).step_by(32) {
            for w in w {
                prefetch_l2(ahead.of(w, j / 32), 64);
            }
            dpbf16_rows32(&mut acc, w, j, 32, x);
        }
        if !k.is_multiple_of(32) {
            dpbf16_rows32(&mut acc, w, k / 32 * 32, k % 32, x);
        }
        acc.map(|a| reduce(a))
    }
}

/// Adds the pairs of the chunk of 32 values from `j` of rows `w` (the first `n` of them) times
/// `x` to `acc`.
///
/// # Safety
/// AVX-512 F/BW/VL and BF16; each `w[r]` points to `j + n` values; `x` holds `j + 32`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn dpbf16_rows32<const N: usize>(
    acc: &mut [__m512; N],
    w: [*const u8; N],
    j: usize,
    n: usize,
    x: &[u16],
) {
    let x = bf16x32(x[j..j + 32].as_ptr().cast(), 32);
    for r in 0..N {
        acc[r] = _mm512_dpbf16_ps(acc[r], x, bf16x32(w[r].add(2 * j), n));
    }
}

impl Kernels for Avx512Bf16 {
    const STEP: usize = 32;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
    unsafe fn tile(
        w: [*const u8; ROWS],
        k: usize,
        xs: &[Self::X],
        t: [usize; TOKENS],
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    ) {
        let (stride, k0) = (padded(k), ks.start);
        let mut acc = load_partial(partial, k0);
        // j counts from the chunk's start, as the rows `w` do.
        let xs = &xs[k0..];
        chunks::<32>(0..ks.len(), k - k0, |j, n| {
            let x: [__m512bh; TOKENS] =
                std::array::from_fn(|i| bf16x32(xs.as_ptr().add(t[i] * stride + j).cast(), 32));
            for r in 0..ROWS {
                let w = bf16x32(w[r].add(2 * j), n);
                for i in 0..TOKENS {
                    acc[i][r] = _mm512_dpbf16_ps(acc[i][r], x[i], w);
                }
            }
        });
        store_partial(partial, acc);
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn sums(partial: &Partial) -> [[f32; ROWS]; TOKENS] {
        Avx512::<Bf16>::sums(partial)
    }
}
