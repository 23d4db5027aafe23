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

use rayon::prelude::*;

use super::{chunks, rounded, row_products, with_prepared, Bf16, Half, RowKernel, F16};
use crate::ops::bf16;
use crate::ops::disjoint::SyncPtr;
use crate::ops::qmatmul::driver::{n_tasks, row_tasks, Weights, MIN_TILED};
use crate::ops::qmatmul::simd::{self, NextRows};
use crate::ops::qmatmul::{isa, Isa};
use crate::ops::scratch;

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

/// Rows the row kernels take at a time: 8 went no faster from memory (with `NextRows`) or
/// from L2 (slower on AVX-512 F16), and on AVX2 their 16 accumulators would spill.
const ROW_KERNEL_ROWS: usize = 4;

/// `y = x Wᵀ` by the kernels `K`: the activations prepared for them, then rows or tiles.
fn product<K: Kernels>(w: &Weights, x: &[f32], y: &mut [f32]) {
    let m = x.len() / w.nb;
    if m < MIN_TILED {
        return with_prepared::<K, _>(w.nb, x, 0, |xs, _| {
            row_products::<K, ROW_KERNEL_ROWS, 1>(w, xs, y)
        });
    }
    let panel = Panel::new::<K>(m, w.nb);
    let panel_bytes = (panel.len() * std::mem::size_of::<K::X>()).next_multiple_of(64);
    let tasks_bytes = n_tasks(w.n_rows) * task_bytes::<K>(m, w.nb);
    scratch::with_aligned_bytes(panel_bytes + tasks_bytes, |buf| {
        let (xs, rest) = buf.split_at_mut(panel_bytes);
        // SAFETY: the scratch is 64-byte aligned and `K::X` (a `Pod` number) is valid for any
        // bits; `panel_bytes` holds `panel.len()` of them.
        let xs =
            unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast::<K::X>(), panel.len()) };
        panel.fill::<K>(x, w.nb, xs);
        tiles::<K>(w, &panel, xs, rest, y)
    })
}

/// The tokens laid out for the tiles: in blocks of `token_block` tokens, each block chunk by
/// chunk of k, each chunk token by token (the last tile's missing tokens zeros), a token's
/// chunk as `Kernels::lay_out` writes it in `K_CHUNK` values. So a tile's tokens lie next to
/// each other and the tile after them next: the tiles stream through memory in order, where
/// the tokens' own rows, a power of two apart, would put a tile's tokens in the same L1 sets.
struct Panel {
    /// Tokens.
    m: usize,
    /// Tokens per block, whole tiles.
    block: usize,
    /// Values per token and chunk (`Kernels::K_CHUNK`).
    chunk: usize,
    /// Chunks of k (rounded up to `Kernels::STEP`).
    n_chunks: usize,
}

impl Panel {
    fn new<K: Kernels>(m: usize, k: usize) -> Panel {
        Panel {
            m,
            block: token_block(m, k),
            chunk: K::K_CHUNK,
            n_chunks: k.next_multiple_of(K::STEP).div_ceil(K::K_CHUNK),
        }
    }

    /// Values, the last tile's missing tokens included.
    fn len(&self) -> usize {
        self.m.next_multiple_of(TOKENS) * self.n_chunks * self.chunk
    }

    /// Tokens of the block starting at token `b0`, whole tiles.
    fn block_len(&self, b0: usize) -> usize {
        (self.m - b0).min(self.block).next_multiple_of(TOKENS)
    }

    /// Where token `t`'s chunk `c` starts.
    fn at(&self, t: usize, c: usize) -> usize {
        let b0 = t / self.block * self.block;
        (b0 * self.n_chunks + c * self.block_len(b0) + t - b0) * self.chunk
    }

    /// The token and chunk whose values start at `at`.
    fn token_chunk(&self, at: usize) -> (usize, usize) {
        let slot = at / self.chunk;
        let b0 = slot / (self.block * self.n_chunks) * self.block;
        let rest = slot - b0 * self.n_chunks;
        let tokens = self.block_len(b0);
        (b0 + rest % tokens, rest / tokens)
    }

    /// Lays out the tokens `x` (`[m, k]`) in `out` (`len` values) for `K`'s tiles.
    fn fill<K: Kernels>(&self, x: &[f32], k: usize, out: &mut [K::X]) {
        let k_steps = k.next_multiple_of(K::STEP);
        out.par_chunks_mut(self.chunk)
            .enumerate()
            .for_each(|(slot, out)| {
                let (t, c) = self.token_chunk(slot * self.chunk);
                let ks = c * self.chunk..((c + 1) * self.chunk).min(k_steps);
                // A missing token's values are all past the end: zeros.
                let x = match t < self.m {
                    true => &x[t * k..][ks.start.min(k)..ks.end.min(k)],
                    false => &[],
                };
                K::lay_out(x, &mut out[..ks.len()]);
            });
    }
}

/// Scratch bytes of one tiled task: the partial sums of a block of token tiles, then the
/// chunk of the rows.
fn task_bytes<K: Kernels>(m: usize, k: usize) -> usize {
    let tiles = m.min(token_block(m, k)).div_ceil(TOKENS);
    std::mem::size_of::<Partial>() * tiles + ROWS * K::PACKED * K::K_CHUNK
}

/// Tokens per block of the panel: blocks of about 1 MiB of f32 (at least 32 tiles), their
/// number rounded to the nearest and the tokens shared out evenly, whole tiles. Each block
/// widens every chunk of the rows again, so a few tokens past a block's end join it rather
/// than make a block of their own; within a block, the panel streams in order.
fn token_block(m: usize, k: usize) -> usize {
    let most = ((1 << 20) / (4 * k.max(1))).max(32 * TOKENS);
    let blocks = ((m + most / 2) / most).max(1);
    m.div_ceil(blocks).next_multiple_of(TOKENS)
}

fn tiles<K: Kernels>(w: &Weights, panel: &Panel, xs: &[K::X], scratch: &mut [u8], y: &mut [f32]) {
    let (row_bytes, n_rows, m) = (2 * w.nb, w.n_rows, panel.m);
    let k_steps = w.nb.next_multiple_of(K::STEP);
    let y_ptr = SyncPtr(y.as_mut_ptr());
    let chunk_row = K::PACKED * K::K_CHUNK;
    let scratch = scratch.par_chunks_mut(task_bytes::<K>(m, w.nb));
    let token_block = panel.block;
    row_tasks(n_rows).zip(scratch).for_each(|(rows, scratch)| {
        let (partial, chunk) = scratch.split_at_mut(scratch.len() - ROWS * chunk_row);
        // SAFETY: the scratch is 64-byte aligned (`Partial` is a multiple of 64 bytes long)
        // and `Partial` (floats) is valid for any bits.
        let partial = unsafe {
            std::slice::from_raw_parts_mut(
                partial.as_mut_ptr().cast::<Partial>(),
                partial.len() / std::mem::size_of::<Partial>(),
            )
        };
        for tokens in (0..m).step_by(token_block) {
            let tokens = tokens..(tokens + token_block).min(m);
            let n_tiles = tokens.len().div_ceil(TOKENS);
            let prefetch_step = (ROWS * row_bytes)
                .div_ceil(n_tiles * k_steps.div_ceil(K::K_CHUNK))
                .next_multiple_of(64);
            for r0 in rows.clone().step_by(ROWS) {
                // The next rows come from memory into L2 while these are multiplied, a few
                // lines per tile (1B-class prefill 177 tok/s, against 173 with all of them
                // prefetched here at once) ...
                let next_rows = (r0 + ROWS).min(rows.end)..(r0 + 2 * ROWS).min(rows.end);
                let mut next =
                    w.data[next_rows.start * row_bytes..next_rows.end * row_bytes].as_ptr_range();
                // k in chunks: a chunk of the rows stays in L1 while every token passes over it.
                for k0 in (0..k_steps).step_by(K::K_CHUNK) {
                    let ks = k0..(k0 + K::K_CHUNK).min(k_steps);
                    // The chunk of the rows, packed next to each other: rows a power of two
                    // bytes apart fall in the same L1 sets, where 8 of them fill every way and
                    // evict one another and the tokens between the passes over them. Rows past
                    // the task's end belong to the next task: read, never stored here.
                    let bytes = 2 * (ks.end.min(w.nb) - k0);
                    for (r, packed) in chunk.chunks_exact_mut(chunk_row).enumerate() {
                        let row = (r0 + r).min(n_rows - 1) * row_bytes + 2 * k0;
                        // SAFETY: `supports` checked the CPU.
                        unsafe {
                            K::pack(
                                &w.data[row..row + bytes],
                                &mut packed[..K::PACKED * ks.len()],
                            )
                        };
                    }
                    let block: [*const u8; ROWS] =
                        std::array::from_fn(|r| chunk[r * chunk_row..].as_ptr());
                    // ... and the next chunk to pack (the same rows further along k, or the
                    // next rows from k = 0) into L1 over the last tiles: any earlier, the
                    // tokens streaming through would evict it first.
                    let (next_r0, next_k0) = match ks.end < k_steps {
                        true => (r0, ks.end),
                        false => (r0 + ROWS, 0),
                    };
                    let next_bytes = 2 * ((next_k0 + K::K_CHUNK).min(w.nb) - next_k0.min(w.nb));
                    let last_tiles = n_tiles.min(ROWS);
                    // The block's tiles of tokens for this chunk, one after another.
                    let tile_values = TOKENS * K::K_CHUNK;
                    let at = panel.at(tokens.start, k0 / K::K_CHUNK);
                    let panel_tiles = xs[at..][..n_tiles * tile_values].chunks_exact(tile_values);
                    assert!(ks.end <= k_steps && ks.start.is_multiple_of(K::STEP));
                    for (i, (partial, x)) in partial.iter_mut().zip(panel_tiles).enumerate() {
                        if let Some(j) = (i + last_tiles).checked_sub(n_tiles) {
                            let share = j * ROWS / last_tiles..(j + 1) * ROWS / last_tiles;
                            for r in share.map(|r| next_r0 + r).filter(|&r| r < rows.end) {
                                let at = r * row_bytes + 2 * next_k0;
                                simd::prefetch_l1(w.data[at..at + next_bytes].as_ptr(), next_bytes);
                            }
                        }
                        let x = std::array::from_fn(|i| x[i * K::K_CHUNK..].as_ptr());
                        // SAFETY: `supports` checked the CPU; each `block` row holds the
                        // columns `ks` within k (the assert); each x[i] points to a token's
                        // chunk in the panel, `K_CHUNK` values.
                        unsafe { K::tile(block, w.nb, x, ks.clone(), partial) };
                        let len = prefetch_step.min(next.end as usize - next.start as usize);
                        simd::prefetch_l2(next.start, len);
                        next.start = next.start.wrapping_add(len);
                    }
                }
                let n = (rows.end - r0).min(ROWS);
                for (t0, partial) in tokens.clone().step_by(TOKENS).zip(partial.iter()) {
                    // SAFETY: `supports` checked the CPU.
                    let out = unsafe { sums(partial) };
                    for (i, out) in out.iter().enumerate().take(m - t0) {
                        // SAFETY: this task alone writes columns `rows` of y; t0 + i < m.
                        let y = unsafe { y_ptr.slice((t0 + i) * n_rows + r0, n) };
                        y.copy_from_slice(&out[..n]);
                    }
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

/// One token tile's accumulators between chunks of k: `[token][row][lane]`.
type Partial = [[[f32; 16]; ROWS]; TOKENS];

/// The kernels of one instruction set: its row kernel and its tiles.
trait Kernels: RowKernel {
    /// Values per step along k.
    const STEP: usize;

    /// Values of k per pass over the tokens: the rows' chunk (16 KiB) and one tile's tokens
    /// fit in L1.
    const K_CHUNK: usize = 1024;

    /// Bytes a value of the rows takes in the chunk `tile` reads (`pack` writes it).
    const PACKED: usize = 2;

    /// Writes a token's values of a chunk (`x`, zeros past its end to `out`'s end) rounded
    /// to the weights' format, as `tile` reads them: by default, in order.
    fn lay_out(x: &[f32], out: &mut [Self::X]) {
        Self::prepare(x, out)
    }

    /// Writes the halves `row` (a chunk's columns within k) to `chunk` as `tile` reads them:
    /// by default, as they are.
    ///
    /// # Safety
    /// The CPU has the instruction set; `chunk` holds `PACKED` bytes per column of the chunk.
    unsafe fn pack(row: &[u8], chunk: &mut [u8]) {
        chunk[..row.len()].copy_from_slice(row);
    }

    /// Adds columns `ks` of `ROWS` rows of `k` halves (`w[r]`: row `r`'s columns `ks` as
    /// `pack` wrote them) times `TOKENS` tokens (`x[i]`: token `i`'s columns `ks` as `lay_out`
    /// wrote them, in a `Panel`) to `partial`, which the first chunk (`ks.start == 0`) sets.
    ///
    /// # Safety
    /// The CPU has the instruction set; each `w[r]` points to a packed chunk of `ks`, each
    /// `x[i]` to a laid out one, the next tile's tokens after them; `ks` lies within `k`
    /// rounded up to `STEP`, its start a multiple of `STEP`.
    unsafe fn tile(
        w: [*const u8; ROWS],
        k: usize,
        x: [*const Self::X; TOKENS],
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    );
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
unsafe fn sums(partial: &Partial) -> [[f32; ROWS]; TOKENS] {
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
        w: [*const u8; ROWS],
        _: usize,
        x: [*const f32; TOKENS],
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    ) {
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

/// `Kernels::K_CHUNK` of tiles over widened rows: 16 KiB of f32.
const WIDENED_K_CHUNK: usize = 512;

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
        for (h, out) in out.chunks_exact_mut(out.len() / 2).enumerate() {
            for (s, out) in out.chunks_exact_mut(8).enumerate() {
                for (l, out) in out.iter_mut().enumerate() {
                    *out = x.get(16 * s + 8 * h + l).map_or(0.0, |&v| H::round(v));
                }
            }
        }
    }

    unsafe fn pack(row: &[u8], chunk: &mut [u8]) {
        widen::<H>(row, chunk)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile(
        w: [*const u8; ROWS],
        _: usize,
        x: [*const f32; TOKENS],
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    ) {
        // Each half of the 16 lanes sums on its own: one half of 4 rows at a time, 12 chains
        // of fused multiply-adds that hide their latency, in registers with the 3 tokens'
        // values (the rows, widened, are loaded from L1 as they are multiplied). The first
        // three passes bring the next tile's tokens into L1, a token each, a line per step,
        // and the last its partial sums (`tiles` keeps them one after another): the first
        // pass over a tile would otherwise wait on all of its lines.
        let next = x[TOKENS - 1].wrapping_add(Self::K_CHUNK);
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
    w: [*const u8; ROWS],
    r0: usize,
    h: usize,
    x: [*const f32; TOKENS],
    ks: std::ops::Range<usize>,
    partial: &mut Partial,
    fetch: *const f32,
) {
    let mut acc = [[_mm256_setzero_ps(); TOKENS]; R];
    if ks.start > 0 {
        for (r, acc) in acc.iter_mut().enumerate() {
            for (acc, p) in acc.iter_mut().zip(partial.iter()) {
                *acc = _mm256_loadu_ps(p[r0 + r][8 * h..].as_ptr());
            }
        }
    }
    // Step s: values 16 s + 8 h .. of the chunk; the tokens keep this half's values apart.
    let x = x.map(|x| x.add(h * ks.len() / 2));
    for s in 0..ks.len() / 16 {
        _mm_prefetch::<_MM_HINT_T0>(fetch.wrapping_add(16 * s).cast());
        let mut xv = [_mm256_setzero_ps(); TOKENS];
        for (xv, x) in xv.iter_mut().zip(x) {
            *xv = _mm256_loadu_ps(x.add(8 * s));
        }
        for (acc, w) in acc.iter_mut().zip(&w[r0..r0 + R]) {
            let w = _mm256_loadu_ps(w.cast::<f32>().add(16 * s + 8 * h));
            for (acc, x) in acc.iter_mut().zip(xv) {
                *acc = _mm256_fmadd_ps(w, x, *acc);
            }
        }
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
        w: [*const u8; ROWS],
        k: usize,
        x: [*const u16; TOKENS],
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    ) {
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
