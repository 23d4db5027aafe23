//! The tiled product of halves, for prefill: k in chunks, each chunk of `ROWS` rows packed
//! (on x86 AVX-512 and AVX2 and on NEON, widened to f32) once for every tile of `TOKENS`
//! tokens that passes over it, the tokens laid out in a `Panel`. Each tile keeps the 16 lanes
//! of `halves`' sum order for each of its outputs (`Partial`) from chunk to chunk, so a token
//! gets the same bits as from the row kernel. The instruction sets' `Kernels` pack, lay out
//! and multiply; `sums` finishes a tile on each.

use rayon::prelude::*;

#[cfg(target_arch = "aarch64")]
use super::neon::sums;
#[cfg(target_arch = "x86_64")]
use super::x86::sums;
use super::{row_products, with_prepared, Half, RowKernel};
use crate::ops::disjoint::SyncPtr;
use crate::ops::qmatmul::driver::{n_tasks, row_tasks, Weights, MIN_TILED};
use crate::ops::qmatmul::prefetch::{self, Cache};
use crate::ops::scratch;

/// `Kernels::K_CHUNK` of tiles over widened rows: 16 KiB of f32.
pub(super) const WIDENED_K_CHUNK: usize = 512;

/// Rows and tokens per tile: 8 × 3 accumulators of 16 lanes, so each token's 16 values
/// loaded from L2 serve 8 rows (1B-class prefill on AVX-512, tok/s: 4 × 4: 160, 4 × 6: 151,
/// 8 × 2: 172, 6 × 4: 183, 8 × 3: 183, 12 × 2: 160); a pass over a quarter of the lanes on
/// NEON holds its 24 accumulators, the 3 tokens' values and a row's in 28 of 32 registers.
pub(super) const ROWS: usize = 8;
pub(super) const TOKENS: usize = 3;

/// One token tile's accumulators between chunks of k: `[token][row][lane]`.
pub(super) type Partial = [[[f32; 16]; ROWS]; TOKENS];

/// The kernels of one instruction set: its row kernel and its tiles.
pub(super) trait Kernels: RowKernel + Sized {
    /// Values per step along k.
    const STEP: usize;

    /// Values of k per pass over the tokens: the rows' chunk (16 KiB) and one tile's tokens
    /// fit in L1.
    const K_CHUNK: usize = 1024;

    /// Bytes a value of the rows takes in the chunk `tile` reads (`pack` writes it).
    const PACKED: usize = 2;

    /// `y = x Wᵀ` for fewer than `MIN_TILED` tokens `xs` (`prepare`d): by default by the row
    /// kernel, 4 rows of a token at a time (8 went no faster from memory or from L2 on x86,
    /// and on AVX2 their 16 accumulators would spill).
    fn untiled(w: &Weights, xs: &[Self::X], y: &mut [f32]) {
        row_products::<Self, 4, 1>(w, xs, y)
    }

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

    /// Adds columns `ks` of `ROWS` rows of `k` halves (`w`: each row's columns `ks` as `pack`
    /// wrote them, `PACKED * K_CHUNK` bytes apart) times `TOKENS` tokens (`x`: each token's
    /// columns `ks` as `lay_out` wrote them, `K_CHUNK` values apart in a `Panel`) to
    /// `partial`, which the first chunk (`ks.start == 0`) sets.
    ///
    /// # Safety
    /// The CPU has the instruction set; `w` points to `ROWS` packed chunks of `ks`, `x` to
    /// `TOKENS` laid out ones, the next tile's tokens after them; `ks` lies within `k` rounded
    /// up to `STEP`, its start a multiple of `STEP`.
    unsafe fn tile(
        w: *const u8,
        k: usize,
        x: *const Self::X,
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    );
}

/// `y = x Wᵀ` by the kernels `K`: the activations prepared for them, then rows or tiles.
pub(super) fn product<K: Kernels>(w: &Weights, x: &[f32], y: &mut [f32]) {
    let m = x.len() / w.nb;
    if m < MIN_TILED {
        return with_prepared::<K, _>(w.nb, x, 0, |xs, _| K::untiled(w, xs, y));
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
                                prefetch::lines(w.data[at..].as_ptr(), next_bytes, Cache::L1);
                            }
                        }
                        // SAFETY: `supports` checked the CPU; each row of `chunk` holds the
                        // columns `ks` within k (the assert); `x` holds the tile's tokens'
                        // chunks in the panel, `K_CHUNK` values each.
                        unsafe { K::tile(chunk.as_ptr(), w.nb, x.as_ptr(), ks.clone(), partial) };
                        let len = prefetch_step.min(next.end as usize - next.start as usize);
                        prefetch::bytes(next.start, len, Cache::L2);
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

/// `Kernels::lay_out` for tiles that take each chunk in `PARTS` passes, each over `16 /
/// PARTS` of every 16 lanes: a pass's values together, in order, so that it reads its own
/// lines only.
pub(super) fn lanes_apart<H: Half, const PARTS: usize>(x: &[f32], out: &mut [f32]) {
    let width = 16 / PARTS;
    for (p, out) in out.chunks_exact_mut(out.len() / PARTS).enumerate() {
        for (s, out) in out.chunks_exact_mut(width).enumerate() {
            for (l, out) in out.iter_mut().enumerate() {
                *out = x.get(16 * s + width * p + l).map_or(0.0, |&v| H::round(v));
            }
        }
    }
}
