//! The F16 and BF16 kernels on x86-64, in `halves`' sum order: the row kernel (decode) and
//! the tile kernel (k in chunks, each chunk of the rows widened to f32 once for every token
//! tile that passes over it), on AVX-512 (one 16-lane vector) and on AVX2 (two 8-lane
//! halves of it).
//!
//! BF16 on a CPU with AVX512_BF16 (`Level::Avx512Bf16`) takes `vdpbf16ps` instead, which
//! multiplies 32 pairs at once as ggml's `vec_dot_bf16` does there: lane `l` sums the pairs
//! `(2l, 2l + 1)` of each chunk of 32 values, chunks in order, then the same `reduce`. Its
//! rows and tiles perform that one sequence too (same bits alone or in a batch); its sums
//! differ from the widened kernels' in order, and in the subnormal values the instruction
//! flushes to zero.

use core::arch::x86_64::*;

use super::tiled::{lanes_apart, product, Kernels, Partial, ROWS, TOKENS, WIDENED_K_CHUNK};
use super::{chunks, rounded, Bf16, Half, RowKernel, F16};
use crate::ops::bf16;
use crate::ops::qmatmul::driver::Weights;
use crate::ops::qmatmul::simd::NextRows;
use crate::ops::qmatmul::{isa, Isa};

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
    match level {
        Level::Avx512 => product::<Avx512<H>>(&w, x, y),
        Level::Avx2 => product::<Avx2<H>>(&w, x, y),
        Level::Avx512Bf16 => {
            assert!(H::PAIRS);
            product::<Avx512Bf16>(&w, x, y)
        }
    }
}

/// The rows of a tile's packed chunk `w`: `PACKED * K_CHUNK` bytes apart.
///
/// # Safety
/// As `Kernels::tile`.
#[inline(always)]
unsafe fn rows_at<K: Kernels>(w: *const u8) -> [*const u8; ROWS] {
    std::array::from_fn(|r| w.add(r * K::PACKED * K::K_CHUNK))
}

/// The tokens of a tile's chunk of the panel `x`: `K_CHUNK` values apart.
///
/// # Safety
/// As `Kernels::tile`.
#[inline(always)]
unsafe fn tokens_at<K: Kernels>(x: *const K::X) -> [*const K::X; TOKENS] {
    std::array::from_fn(|i| x.add(i * K::K_CHUNK))
}

/// Mask of the first `n` (≤ 16) lanes.
fn lanes(n: usize) -> u16 {
    ((1u32 << n) - 1) as u16
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

/// A tile's finished accumulators as outputs, `out[token][row]`.
///
/// # Safety
/// AVX2.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn sums(partial: &Partial) -> [[f32; ROWS]; TOKENS] {
    let mut out = [[0f32; ROWS]; TOKENS];
    for (out, partial) in out.iter_mut().zip(partial) {
        let (mut lo, mut hi) = ([_mm256_setzero_ps(); ROWS], [_mm256_setzero_ps(); ROWS]);
        for (r, lanes) in partial.iter().enumerate() {
            lo[r] = _mm256_loadu_ps(lanes.as_ptr());
            hi[r] = _mm256_loadu_ps(lanes[8..].as_ptr());
        }
        _mm256_storeu_ps(out.as_mut_ptr(), reduce_rows(lo, hi));
    }
    out
}

/// `reduce` of the 16 lanes of 8 rows at once (row `r`'s lanes 0–7 in `lo[r]`, 8–15 in
/// `hi[r]`), each step's additions side by side: lane `r` of the result is row `r`'s sum.
#[inline]
#[target_feature(enable = "avx2")]
fn reduce_rows(lo: [__m256; 8], hi: [__m256; 8]) -> __m256 {
    // Halves: lane l + lane (l + 8).
    let mut h = [_mm256_setzero_ps(); 8];
    for r in 0..8 {
        h[r] = _mm256_add_ps(lo[r], hi[r]);
    }
    // Quarters, l + (l + 4): rows 2i and 2i + 1 in the low and high 128 bits of q[i].
    let mut q = [_mm256_setzero_ps(); 4];
    for i in 0..4 {
        let (a, b) = (h[2 * i], h[2 * i + 1]);
        q[i] = _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(a, b),
            _mm256_permute2f128_ps::<0x31>(a, b),
        );
    }
    // Pairs, l + (l + 2): p[i] holds rows 4i, 4i + 2 (low) and 4i + 1, 4i + 3 (high), two
    // lanes each.
    let mut p = [_mm256_setzero_ps(); 2];
    for i in 0..2 {
        let (a, b) = (q[2 * i], q[2 * i + 1]);
        p[i] = _mm256_add_ps(
            _mm256_shuffle_ps::<0b01_00_01_00>(a, b),
            _mm256_shuffle_ps::<0b11_10_11_10>(a, b),
        );
    }
    // Neighbours: rows 0, 2, 4, 6, then 1, 3, 5, 7; put in order.
    let n = _mm256_add_ps(
        _mm256_shuffle_ps::<0b10_00_10_00>(p[0], p[1]),
        _mm256_shuffle_ps::<0b11_01_11_01>(p[0], p[1]),
    );
    _mm256_permutevar8x32_ps(n, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7))
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

/// Adds the chunk of 16 values from `j` of rows `w` (the first `n` of them) times `x` to
/// `acc`.
///
/// # Safety
/// AVX-512 F/BW/VL; each `w[r]` points to `j + n` values; `x` holds `j + 16`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn fmadd_rows16_avx512<H: Half, const N: usize>(
    acc: &mut [__m512; N],
    w: [*const u8; N],
    j: usize,
    n: usize,
    x: &[f32],
) {
    let x = _mm512_loadu_ps(x[j..j + 16].as_ptr());
    for r in 0..N {
        acc[r] = _mm512_fmadd_ps(H::load16(w[r].add(2 * j), n), x, acc[r]);
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
        let next = NextRows::new(2 * k, N, 64);
        let mut acc = [_mm512_setzero_ps(); N];
        // Plain loops (a closure passed to `chunks` was not inlined): whole pairs of chunks,
        // a line of each row and a prefetch for each, then what is left.
        for j in (0..k / 32 * 32).step_by(32) {
            for r in 0..N {
                next.fetch(w[0], r, j / 32);
            }
            fmadd_rows16_avx512::<H, N>(&mut acc, w, j, 16, x);
            fmadd_rows16_avx512::<H, N>(&mut acc, w, j + 16, 16, x);
        }
        for j in (k / 32 * 32..k).step_by(16) {
            fmadd_rows16_avx512::<H, N>(&mut acc, w, j, (k - j).min(16), x);
        }
        acc.map(|a| reduce(a))
    }
}

impl<H: Half> Kernels for Avx512<H> {
    const STEP: usize = 16;

    const K_CHUNK: usize = WIDENED_K_CHUNK;
    const PACKED: usize = 4;

    unsafe fn pack(row: &[u8], chunk: &mut [u8]) {
        widen16::<H>(row, chunk)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn tile(
        w: *const u8,
        _: usize,
        x: *const f32,
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    ) {
        let (w, x) = (rows_at::<Self>(w), tokens_at::<Self>(x));
        let mut acc = load_partial(partial, ks.start);
        // j counts from the chunk's start, as the rows `w` and tokens `x` do.
        for j in (0..ks.len()).step_by(16) {
            let x: [__m512; TOKENS] = std::array::from_fn(|i| _mm512_loadu_ps(x[i].add(j)));
            for r in 0..ROWS {
                let w = _mm512_loadu_ps(w[r].add(4 * j).cast());
                for i in 0..TOKENS {
                    acc[i][r] = _mm512_fmadd_ps(w, x[i], acc[i][r]);
                }
            }
        }
        store_partial(partial, acc);
    }
}

/// The halves `row` widened to f32 in `chunk`, zeros after them to its end (where the tiles'
/// last step adds nothing): once per chunk of the rows, rather than at each of the passes of
/// the tokens over it, which then multiply, load for load, as f32 products do.
///
/// # Safety
/// AVX2 and F16C; `chunk` holds 4 bytes per value of `row` rounded up to 8 values.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen<H: Half>(row: &[u8], chunk: &mut [u8]) {
    let n = row.len() / 2;
    assert!(chunk.len() >= 4 * n.next_multiple_of(8) && chunk.len().is_multiple_of(32));
    let (src, dst) = (row.as_ptr(), chunk.as_mut_ptr());
    // Whole vectors without the tail's lane count (a third of the instructions).
    let whole = n / 8 * 8;
    for j in (0..whole).step_by(8) {
        _mm256_storeu_ps(dst.add(4 * j).cast(), H::load8(src.add(2 * j), 8));
    }
    for j in (whole..chunk.len() / 4).step_by(8) {
        let v = H::load8(src.add(2 * j), n.saturating_sub(j).min(8));
        _mm256_storeu_ps(dst.add(4 * j).cast(), v);
    }
}

/// `widen` 16 values a vector, for the AVX-512 tiles.
///
/// # Safety
/// AVX-512 F/BW/VL; `chunk` holds 4 bytes per value of `row` rounded up to 16 values.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn widen16<H: Half>(row: &[u8], chunk: &mut [u8]) {
    let n = row.len() / 2;
    assert!(chunk.len() >= 4 * n.next_multiple_of(16) && chunk.len().is_multiple_of(64));
    let (src, dst) = (row.as_ptr(), chunk.as_mut_ptr());
    let whole = n / 16 * 16;
    for j in (0..whole).step_by(16) {
        _mm512_storeu_ps(dst.add(4 * j).cast(), H::load16(src.add(2 * j), 16));
    }
    for j in (whole..chunk.len() / 4).step_by(16) {
        let v = H::load16(src.add(2 * j), n.saturating_sub(j).min(16));
        _mm512_storeu_ps(dst.add(4 * j).cast(), v);
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
    x: &[f32],
) {
    let x = [0, 8].map(|h| _mm256_loadu_ps(x[j + h..j + h + 8].as_ptr()));
    for r in 0..N {
        let w = load16_avx2::<H>(w[r].add(2 * j), n);
        for h in 0..2 {
            acc[r][h] = _mm256_fmadd_ps(w[h], x[h], acc[r][h]);
        }
    }
}

impl<H: Half> RowKernel for Avx2<H> {
    type X = f32;

    fn prepare(x: &[f32], out: &mut [f32]) {
        rounded(H::round, x, out)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows<const N: usize>(w: [*const u8; N], k: usize, x: &[f32]) -> [f32; N] {
        let next = NextRows::new(2 * k, N, 64);
        let mut acc = [[_mm256_setzero_ps(); 2]; N];
        // Plain loops as for AVX-512 (through a closure, the accumulators stayed in memory).
        for j in (0..k / 32 * 32).step_by(32) {
            for r in 0..N {
                next.fetch(w[0], r, j / 32);
            }
            fmadd_rows16::<H, N>(&mut acc, w, j, 16, x);
            fmadd_rows16::<H, N>(&mut acc, w, j + 16, 16, x);
        }
        for j in (k / 32 * 32..k).step_by(16) {
            fmadd_rows16::<H, N>(&mut acc, w, j, (k - j).min(16), x);
        }
        acc.map(|[lo, hi]| reduce_halves(lo, hi))
    }
}

impl<H: Half> Kernels for Avx2<H> {
    const STEP: usize = 16;
    const K_CHUNK: usize = WIDENED_K_CHUNK;
    const PACKED: usize = 4;

    /// The values of a chunk's lanes 0–7 (of every 16), then of lanes 8–15: each pass of
    /// `tile_half` reads half the lines.
    fn lay_out(x: &[f32], out: &mut [f32]) {
        lanes_apart::<H, 2>(x, out)
    }

    unsafe fn pack(row: &[u8], chunk: &mut [u8]) {
        widen::<H>(row, chunk)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile(
        w: *const u8,
        _: usize,
        x: *const f32,
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    ) {
        // Each half of the 16 lanes sums on its own: one half of 4 rows at a time, 12 chains
        // of fused multiply-adds that hide their latency, in registers with the 3 tokens'
        // values (the rows, widened, are loaded from L1 as they are multiplied). The first
        // three passes bring the next tile's tokens into L1, a token each, a line per step,
        // and the last its partial sums (`tiles` keeps them one after another): the first
        // pass over a tile would otherwise wait on all of its lines.
        let next = x.wrapping_add(TOKENS * Self::K_CHUNK);
        let next_partial = (partial as *const Partial).wrapping_add(1).cast::<f32>();
        for h in 0..2 {
            for r0 in [0, 4] {
                let pass = 2 * h + r0 / 4;
                let fetch = match pass < TOKENS {
                    true => next.wrapping_add(pass * Self::K_CHUNK),
                    false => next_partial,
                };
                tile_half::<4>(w, r0, h, x, ks.clone(), partial, fetch);
            }
        }
    }
}

/// AVX2's `tile` for lanes `8 h ..= 8 h + 7` of rows `r0 .. r0 + R` (widened), prefetching
/// a line from `fetch` on at each step.
///
/// # Safety
/// As `Kernels::tile`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_half<const R: usize>(
    w: *const u8,
    r0: usize,
    h: usize,
    x: *const f32,
    ks: std::ops::Range<usize>,
    partial: &mut Partial,
    fetch: *const f32,
) {
    const K_CHUNK: usize = WIDENED_K_CHUNK;
    let mut acc = [[_mm256_setzero_ps(); TOKENS]; R];
    if ks.start > 0 {
        for (r, acc) in acc.iter_mut().enumerate() {
            for (acc, p) in acc.iter_mut().zip(partial.iter()) {
                *acc = _mm256_loadu_ps(p[r0 + r][8 * h..].as_ptr());
            }
        }
    }
    // Step s: values 16 s + 8 h .. of the chunk; the tokens keep this half's values apart.
    // Rows and tokens at offsets from one base each, which the loads take as immediates.
    let (mut w, mut x) = (
        w.cast::<f32>().add(r0 * K_CHUNK + 8 * h),
        x.add(h * ks.len() / 2),
    );
    let mut fetch = fetch;
    for _ in 0..ks.len() / 16 {
        _mm_prefetch::<_MM_HINT_T0>(fetch.cast());
        let mut xv = [_mm256_setzero_ps(); TOKENS];
        for (i, xv) in xv.iter_mut().enumerate() {
            *xv = _mm256_loadu_ps(x.add(i * K_CHUNK));
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let w = _mm256_loadu_ps(w.add(r * K_CHUNK));
            for (acc, x) in acc.iter_mut().zip(xv) {
                *acc = _mm256_fmadd_ps(w, x, *acc);
            }
        }
        (w, x, fetch) = (w.add(16), x.add(8), fetch.wrapping_add(16));
    }
    for (r, acc) in acc.iter().enumerate() {
        for (acc, p) in acc.iter().zip(partial.iter_mut()) {
            _mm256_storeu_ps(p[r0 + r][8 * h..].as_mut_ptr(), *acc);
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
        let next = NextRows::new(2 * k, N, 64);
        let mut acc = [_mm512_setzero_ps(); N];
        // Plain loops: the body of a closure would not inherit the target features.
        for j in (0..k / 32 * 32).step_by(32) {
            for r in 0..N {
                next.fetch(w[0], r, j / 32);
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
        w: *const u8,
        k: usize,
        x: *const u16,
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    ) {
        let (w, x) = (rows_at::<Self>(w), tokens_at::<Self>(x));
        let k0 = ks.start;
        let mut acc = load_partial(partial, k0);
        // j counts from the chunk's start, as the rows `w` and tokens `x` do.
        chunks::<32>(0..ks.len(), k - k0, |j, n| {
            let x: [__m512bh; TOKENS] = std::array::from_fn(|i| bf16x32(x[i].add(j).cast(), 32));
            for r in 0..ROWS {
                let w = bf16x32(w[r].add(2 * j), n);
                for i in 0..TOKENS {
                    acc[i][r] = _mm512_dpbf16_ps(acc[i][r], x[i], w);
                }
            }
        });
        store_partial(partial, acc);
    }
}
