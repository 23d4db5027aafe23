//! F16 and BF16 weights × activations rounded to the same format (ggml's `vec_dot_f16` and
//! `vec_dot_bf16` numerics: the product of two halves is exact in f32, only the order of the
//! sums is free).
//!
//! **Sum order.** For each output, lane `l` of 16 accumulator lanes sums `w_k x_k` for
//! `k ≡ l (mod 16)`, `k` ascending, by fused multiply-adds (the last chunk of 16 padded with
//! zeros, which add nothing); then the 16 lanes are added in a fixed tree, `reduce`: halves
//! (lane `l` plus lane `l + 8`), then quarters (`l + 4`), pairs (`l + 2`) and neighbours.
//! Every kernel below performs that one sequence, however its lanes sit in registers:
//!
//! - `x86`: AVX-512 (one 16-lane vector) and AVX2 (two 8-lane halves of it), as a row kernel
//!   (decode) and tiles (prefill, k in chunks);
//! - `neon`: four `float32x4_t`, as a row kernel and tiles (one pass per quarter of the lanes);
//!
//! the tiles share one driver, `tiled`.
//!
//! So a token's outputs have the same bits alone or in a batch, on AVX-512, AVX2 and NEON
//! alike (a test holds each to a scalar model of the sequence). All widen the halves as they
//! load them, which is exact.
//!
//! The exception: BF16 on a CPU with AVX512_BF16 takes `vdpbf16ps`, which multiplies pairs
//! (`x86::Level::Avx512Bf16`): the same bits alone or in a batch, another sum order.

#[cfg(target_arch = "aarch64")]
mod neon;
mod tiled;
#[cfg(target_arch = "x86_64")]
mod x86;

use rayon::prelude::*;

use super::driver::{row_tasks, Weights};
use crate::ops::disjoint::SyncPtr;
use crate::ops::scratch::{self, Pod};

#[cfg(target_arch = "aarch64")]
pub(crate) use neon::Widen;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::{run, Level, Widen};

/// A 16-bit float format of weights; `Widen` loads it on this CPU's instruction set.
pub(crate) trait Half: Widen + Sync {
    /// `v` rounded to this format (to nearest, ties to even), as ggml rounds activations.
    fn round(v: f32) -> f32;
}

pub(crate) struct F16;
pub(crate) struct Bf16;

impl Half for F16 {
    fn round(v: f32) -> f32 {
        half::f16::from_f32(v).to_f32()
    }
}

impl Half for Bf16 {
    fn round(v: f32) -> f32 {
        crate::ops::bf16::round(v)
    }
}

/// `y[m, n_rows] = x[m, k] · Wᵀ` for `W` of halves `H` in `data` (checked by the caller), by
/// the best kernels for `H` on this CPU.
pub(super) fn matmul<H: Half>(data: &[u8], n_rows: usize, k: usize, x: &[f32], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    run::<H>(data, n_rows, k, x, y, Level::best::<H>());
    #[cfg(target_arch = "aarch64")]
    neon::matmul::<H>(data, n_rows, k, x, y);
}

/// The row kernel of one instruction set (and, for `vdpbf16ps`, sum order).
trait RowKernel {
    /// An activation as the kernel reads it.
    type X: Pod + Send + Sync;

    /// A token's activations `x` rounded to the weights' format, zeros to `padded(x.len())`.
    fn prepare(x: &[f32], out: &mut [Self::X]);

    /// Rows `w` (`N` pointers to `k` halves) times one token `x` (`prepare`d).
    ///
    /// # Safety
    /// The CPU has the instruction set; each `w[r]` points to `k` halves.
    unsafe fn rows<const N: usize>(w: [*const u8; N], k: usize, x: &[Self::X]) -> [f32; N];

    /// `rows` for `T` tokens `xs` at once: `out[token][row]`. A kernel whose widening of
    /// the halves costs as much as its multiply-adds widens each chunk once for all of them.
    ///
    /// # Safety
    /// As `rows`.
    unsafe fn rows_tokens<const N: usize, const T: usize>(
        w: [*const u8; N],
        k: usize,
        xs: [&[Self::X]; T],
    ) -> [[f32; N]; T] {
        xs.map(|x| Self::rows::<N>(w, k, x))
    }
}

/// `out` = `x` through `round`, zeros after.
fn rounded<X: Copy + Default>(round: impl Fn(f32) -> X, x: &[f32], out: &mut [X]) {
    let (values, padding) = out.split_at_mut(x.len());
    values.iter_mut().zip(x).for_each(|(o, &v)| *o = round(v));
    padding.fill(X::default());
}

/// Values a token's activations are padded to (zeros): every kernel's chunks end within it.
fn padded(k: usize) -> usize {
    k.next_multiple_of(32)
}

/// Runs `f` on the `m` tokens of `x` (`[m, k]`) `prepare`d for `K`, `padded(k)` values each,
/// and `extra` bytes of 64-byte aligned scratch.
fn with_prepared<K: RowKernel, R>(
    k: usize,
    x: &[f32],
    extra: usize,
    f: impl FnOnce(&[K::X], &mut [u8]) -> R,
) -> R {
    let (m, stride) = (x.len() / k, padded(k));
    let xs_bytes = (m * stride * std::mem::size_of::<K::X>()).next_multiple_of(64);
    scratch::with_aligned_bytes(xs_bytes + extra, |buf| {
        let (xs, rest) = buf.split_at_mut(xs_bytes);
        // SAFETY: the scratch is 64-byte aligned and `K::X` (a `Pod` number) is valid for any
        // bits; `xs_bytes` holds `m * stride` of them.
        let xs =
            unsafe { std::slice::from_raw_parts_mut(xs.as_mut_ptr().cast::<K::X>(), m * stride) };
        xs.par_chunks_mut(stride)
            .zip(x.par_chunks(k))
            .for_each(|(out, x)| K::prepare(x, out));
        f(xs, rest)
    })
}

/// `y = x Wᵀ` by the row kernel `K`, `N` rows times `T` tokens at a time, for the tokens
/// `xs` (`prepare`d).
fn row_products<K: RowKernel, const N: usize, const T: usize>(
    w: &Weights,
    xs: &[K::X],
    y: &mut [f32],
) {
    let (row_bytes, stride) = (2 * w.nb, padded(w.nb));
    let m = xs.len() / stride;
    let y_ptr = SyncPtr(y.as_mut_ptr());
    row_tasks(w.n_rows).for_each(|rows| {
        for r0 in rows.clone().step_by(N) {
            // Rows past the task's end belong to the next task: read, never stored here.
            let block = w.rows::<N>(r0, row_bytes);
            let n = (rows.end - r0).min(N);
            for t0 in (0..m).step_by(T) {
                // The last group repeats its last token where m is not a multiple of T.
                let x = std::array::from_fn(|i| {
                    let t = (t0 + i).min(m - 1);
                    &xs[t * stride..(t + 1) * stride]
                });
                // SAFETY: `supports` checked the CPU; `block` points to whole rows of k
                // halves and `x` holds padded tokens.
                let out = unsafe { K::rows_tokens::<N, T>(block, w.nb, x) };
                for (i, out) in out.iter().enumerate().take(m - t0) {
                    // SAFETY: this task alone writes columns `rows` of y, and t0 + i < m.
                    let y = unsafe { y_ptr.slice((t0 + i) * w.n_rows + r0, n) };
                    y.copy_from_slice(&out[..n]);
                }
            }
        }
    });
}

/// Runs `step(j, n)` for the chunks of `N` values from `j` in `ks` (`n` of them within
/// `k`): the whole ones in a loop of their own, so that the last, partial one's load stays
/// out of it and the accumulators in registers.
#[inline(always)]
fn chunks<const N: usize>(
    ks: std::ops::Range<usize>,
    k: usize,
    mut step: impl FnMut(usize, usize),
) {
    let whole = ks.end.min(k / N * N).max(ks.start);
    for j in (ks.start..whole).step_by(N) {
        step(j, N);
    }
    for j in (whole..ks.end).step_by(N) {
        step(j, k - j);
    }
}
