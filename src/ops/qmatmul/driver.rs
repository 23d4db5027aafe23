//! Splitting a product into tasks (rows across the rayon pool) and running one format's
//! kernels on them.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::act::Groups;
use super::act::{self, Arena, Rows};
#[cfg(target_arch = "x86_64")]
use super::prefetch::{self, Cache};
#[cfg(target_arch = "x86_64")]
use super::simd;
use crate::ops::disjoint::SyncPtr;
use crate::ops::scratch;

/// Batches from this many tokens up run the tiles; smaller ones the row kernel once per token
/// (or a few tokens at a time).
pub(super) const MIN_TILED: usize = 6;

/// The row kernel of one weight format on one instruction set.
pub(crate) trait RowKernel: Sync {
    /// Values and bytes per weight block (ggml's layout).
    const BLOCK: usize;
    const BLOCK_BYTES: usize;
    /// Whether activations are Q8_K (else Q8_0).
    const Q8K: bool;

    /// Rows `w` (4 pointers to `nb` blocks each) times token `t` of `act`.
    ///
    /// # Safety
    /// The CPU has the kernel's instruction set; each `w[i]` points to `nb` whole blocks;
    /// `act` holds `nb` blocks per token, of the activation type, and `t < act.m`.
    unsafe fn rows4(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4];

    /// `rows4` for each of the tokens `t`: `out[token][row]`, each token's the bits `rows4`
    /// gives (kernels that decode a block once for all four override it).
    ///
    /// # Safety
    /// As `rows4`, for each token of `t`.
    unsafe fn rows4_tokens4(
        w: [*const u8; 4],
        nb: usize,
        act: &Rows,
        t: [usize; 4],
    ) -> [[f32; 4]; 4] {
        // SAFETY: the caller's contract.
        t.map(|t| unsafe { Self::rows4(w, nb, act, t) })
    }
}

/// A format's row kernel on AVX2 (its `RowKernel` is the AVX-512 one).
#[cfg(target_arch = "x86_64")]
pub(crate) trait Avx2Rows: RowKernel {
    /// As `RowKernel::rows4`.
    ///
    /// # Safety
    /// As `RowKernel::rows4`, the CPU having AVX2, FMA and F16C.
    unsafe fn rows4_avx2(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4];
}

/// The AVX2 row kernel of format `F`.
#[cfg(target_arch = "x86_64")]
pub(crate) struct Avx2<F>(std::marker::PhantomData<F>);

#[cfg(target_arch = "x86_64")]
impl<F: Avx2Rows> RowKernel for Avx2<F> {
    const BLOCK: usize = F::BLOCK;
    const BLOCK_BYTES: usize = F::BLOCK_BYTES;
    const Q8K: bool = F::Q8K;

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows4(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
        F::rows4_avx2(w, nb, act, t)
    }
}

/// The kernels of one weight format on one instruction set: its row kernel and its tiles.
#[cfg(target_arch = "x86_64")]
pub(crate) trait Format: RowKernel {
    /// Extra i32 terms per block and token in `Groups`, made from the block's sums.
    const N_EXTRA: usize;
    fn extra(sums: &[i16], j: usize) -> i32;
    /// Bytes of one weight row of `nb` blocks unpacked for `tile` (a multiple of 64).
    fn unpacked_bytes(nb: usize) -> usize;

    /// Unpacks one row of `nb` blocks into `out` (`unpacked_bytes(nb)`, 64-byte aligned).
    ///
    /// # Safety
    /// As `rows4` for `w`; `out` is writable for `unpacked_bytes(nb)` bytes.
    unsafe fn unpack(w: *const u8, nb: usize, out: *mut u8);

    /// 4 unpacked rows times the 16-token groups `g[..]` of `act`: `out[r][i][lane]`.
    ///
    /// # Safety
    /// The CPU has the kernels' instruction set; each `w[r]` is an `unpack`ed row of `nb` blocks;
    /// every `g[i] < act.n_groups`, and `act` holds `nb` blocks of `N_EXTRA` extras.
    unsafe fn tile<const T: usize>(
        w: [*const u8; 4],
        nb: usize,
        act: &Groups,
        g: [usize; T],
    ) -> [[[f32; 16]; T]; 4];
}

/// `y[m, n_rows] = x[m, k] · Wᵀ` for `W` in format `F` (checked by the caller).
#[cfg(target_arch = "x86_64")]
pub(super) fn run<F: Format>(data: &[u8], n_rows: usize, k: usize, x: &[f32], y: &mut [f32]) {
    let m = x.len() / k;
    if m < MIN_TILED {
        return run_rows::<F>(data, n_rows, k, x, y);
    }
    use self::act::{group, groups_bytes, rows_bytes, Q8K_SUMS, QK8_0, QK_K};
    let (block, n_sums) = if F::Q8K { (QK_K, Q8K_SUMS) } else { (QK8_0, 1) };
    let unpacked_bytes = n_tasks(n_rows) * 4 * F::unpacked_bytes(k / F::BLOCK);
    let bytes =
        rows_bytes(m, k, block, n_sums) + groups_bytes(m, k, block, F::N_EXTRA) + unpacked_bytes;
    scratch::with_aligned_bytes(bytes, |buf| {
        let mut arena = Arena::new(buf);
        let rows = quantize::<F>(x, m, k, &mut arena);
        let weights = Weights {
            data,
            n_rows,
            nb: k / F::BLOCK,
        };
        let groups = group(&rows, block, F::N_EXTRA, F::extra, &mut arena);
        let unpacked = arena.take::<u8>(unpacked_bytes);
        tiles::<F>(&weights, &groups, unpacked, m, y);
    })
}

/// `y[m, n_rows] = x[m, k] · Wᵀ` with the row kernel alone, every token through it.
pub(super) fn run_rows<K: RowKernel>(
    data: &[u8],
    n_rows: usize,
    k: usize,
    x: &[f32],
    y: &mut [f32],
) {
    let m = x.len() / k;
    let (block, n_sums) = match K::Q8K {
        true => (act::QK_K, act::Q8K_SUMS),
        false => (act::QK8_0, 1),
    };
    scratch::with_aligned_bytes(act::rows_bytes(m, k, block, n_sums), |buf| {
        let rows = quantize::<K>(x, m, k, &mut Arena::new(buf));
        let weights = Weights {
            data,
            n_rows,
            nb: k / K::BLOCK,
        };
        row_products::<K>(&weights, &rows, y);
    })
}

/// The activations in rows, of the type `K` multiplies.
fn quantize<'a, K: RowKernel>(x: &[f32], m: usize, k: usize, arena: &mut Arena<'a>) -> Rows<'a> {
    match K::Q8K {
        true => act::quantize_q8k(x, m, k, arena),
        false => act::quantize_q8_0(x, m, k, arena),
    }
}

pub(super) struct Weights<'a> {
    pub data: &'a [u8],
    pub n_rows: usize,
    pub nb: usize,
}

impl Weights<'_> {
    /// The `N` rows from `r0`, the last repeated past the end (its results are not stored).
    pub fn rows<const N: usize>(&self, r0: usize, row_bytes: usize) -> [*const u8; N] {
        std::array::from_fn(|i| self.data[(r0 + i).min(self.n_rows - 1) * row_bytes..].as_ptr())
    }
}

/// Tasks of one product: a few per thread, so that work stealing evens out the cores.
pub(super) fn n_tasks(n_rows: usize) -> usize {
    n_rows
        .div_ceil(4)
        .min(4 * rayon::current_num_threads())
        .max(1)
}

/// Row ranges, multiples of 4 rows, for the `n_tasks` tasks of one product.
pub(super) fn row_tasks(
    n_rows: usize,
) -> impl IndexedParallelIterator<Item = std::ops::Range<usize>> {
    let quads = n_rows.div_ceil(4);
    let n_tasks = n_tasks(n_rows);
    (0..n_tasks).into_par_iter().map(move |i| {
        let (a, b) = (i * quads / n_tasks, (i + 1) * quads / n_tasks);
        4 * a..(4 * b).min(n_rows)
    })
}

fn row_products<F: RowKernel>(w: &Weights, act: &Rows, y: &mut [f32]) {
    let row_bytes = w.nb * F::BLOCK_BYTES;
    let n_rows = w.n_rows;
    let y_ptr = SyncPtr(y.as_mut_ptr());
    row_tasks(n_rows).for_each(|rows| {
        for r0 in rows.step_by(4) {
            let quad = w.rows::<4>(r0, row_bytes);
            let n = (n_rows - r0).min(4);
            let store = |t: usize, out: &[f32; 4]| {
                // SAFETY: this task alone writes columns `rows` of y, and t < m.
                let y = unsafe { y_ptr.slice(t * n_rows + r0, n) };
                y.copy_from_slice(&out[..n]);
            };
            let fours = act.m / 4 * 4;
            // SAFETY (both calls): `supports` checked the CPU; `quad` points to whole rows of
            // `nb` blocks (`matmul` checked `data`'s length) and `act` to `nb` activation
            // blocks per token; every token is below m.
            for t0 in (0..fours).step_by(4) {
                let out =
                    unsafe { F::rows4_tokens4(quad, w.nb, act, [0, 1, 2, 3].map(|i| t0 + i)) };
                (0..4).for_each(|i| store(t0 + i, &out[i]));
            }
            for t in fours..act.m {
                store(t, &unsafe { F::rows4(quad, w.nb, act, t) });
            }
        }
    });
}

#[cfg(target_arch = "x86_64")]
fn tiles<F: Format>(w: &Weights, act: &Groups, scratch: &mut [u8], m: usize, y: &mut [f32]) {
    let (row_bytes, unpacked) = (w.nb * F::BLOCK_BYTES, F::unpacked_bytes(w.nb));
    let n_rows = w.n_rows;
    let y_ptr = SyncPtr(y.as_mut_ptr());
    let scratch = scratch.par_chunks_mut(4 * unpacked);
    row_tasks(n_rows).zip(scratch).for_each(|(rows, scratch)| {
        for r0 in rows.clone().step_by(4) {
            let quad = w.rows::<4>(r0, row_bytes);
            for (i, &row) in quad.iter().enumerate() {
                // SAFETY: `supports` checked the CPU; `row` points to a whole row and
                // the scratch holds 4 unpacked rows, 64-byte aligned.
                unsafe { F::unpack(row, w.nb, scratch[i * unpacked..].as_mut_ptr()) };
            }
            // The next 4 rows arrive while these are multiplied.
            if r0 + 4 < rows.end {
                let next = quad[0].wrapping_add(4 * row_bytes);
                prefetch::bytes(next, 4 * row_bytes, Cache::L2);
            }
            let u: [*const u8; 4] = std::array::from_fn(|i| scratch[i * unpacked..].as_ptr());
            let n = (n_rows - r0).min(4);
            let mut g = 0;
            while g < act.n_groups {
                let pair = g + 2 <= act.n_groups;
                // SAFETY: as for `unpack`; g (and g + 1 for a pair) < n_groups.
                let out = unsafe {
                    match pair {
                        true => F::tile::<2>(u, w.nb, act, [g, g + 1]),
                        false => F::tile::<1>(u, w.nb, act, [g]).map(|[a]| [a, a]),
                    }
                };
                for (i, g) in (g..g + 1 + pair as usize).enumerate() {
                    let tokens = (m - 16 * g).min(16);
                    // SAFETY: this task alone writes columns `rows` of y; the tokens
                    // 16 g + lane < m and the rows r0 + i < n_rows.
                    unsafe { store_tile(y_ptr, n_rows, 16 * g, tokens, r0, n, &out, i) };
                }
                g += 1 + pair as usize;
            }
        }
    });
}

/// Writes `tiles[r][i][lane]` to `y[t0 + lane, r0 + r]` for `lane < tokens`, `r < n`. Reads
/// the tile kernel's output where it lies: a copy, made in smaller stores than the 64-byte
/// loads of `store_4x16`, would stall them.
///
/// # Safety
/// Those elements of `y` (`[_, n_rows]` at `y.0`) exist and no other thread writes them.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
unsafe fn store_tile<const T: usize>(
    y: SyncPtr,
    n_rows: usize,
    t0: usize,
    tokens: usize,
    r0: usize,
    n: usize,
    tiles: &[[[f32; 16]; T]; 4],
    i: usize,
) {
    if n == 4 && tokens == 16 {
        // SAFETY: the tiles run on AVX2 or AVX-512 (both have AVX2); the caller's contract
        // covers the stores.
        return unsafe { simd::store_4x16(y.0.add(t0 * n_rows + r0), n_rows, tiles, i) };
    }
    for (r, row) in tiles.iter().enumerate().take(n) {
        for (lane, &v) in row[i].iter().enumerate().take(tokens) {
            // SAFETY: the caller's contract.
            unsafe { y.0.add((t0 + lane) * n_rows + r0 + r).write(v) };
        }
    }
}
