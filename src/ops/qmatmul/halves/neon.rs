//! The F16 and BF16 kernels on aarch64: the row kernel (decode, and batches below
//! `MIN_TILED` two tokens at a time) and the tile kernel over widened rows (`tiled`).
//! `halves`' 16 accumulator lanes are four `float32x4_t`; each lane takes the same exact
//! products in the same order, by fused multiply-adds (`vfmaq_f32`, as x86's `vfmadd`), and
//! `reduce` adds the four vectors in the same tree, so the outputs are the same bits as the
//! x86 AVX2 and AVX-512 widened kernels' (subnormals kept on both: Linux leaves FPCR's and
//! MXCSR's flush-to-zero off).

use core::arch::aarch64::*;
use std::marker::PhantomData;

use super::tiled::{lanes_apart, product, Kernels, Partial, ROWS, TOKENS, WIDENED_K_CHUNK};
use super::{chunks, rounded, row_products, Bf16, Half, RowKernel, F16};
use crate::ops::qmatmul::driver::Weights;

/// `y[m, n_rows] = x[m, k] · Wᵀ` for `W` of halves `H` in `data` (checked by the caller).
pub(super) fn matmul<H: Half>(data: &[u8], n_rows: usize, k: usize, x: &[f32], y: &mut [f32]) {
    let w = Weights {
        data,
        n_rows,
        nb: k,
    };
    product::<Neon<H>>(&w, x, y)
}

/// A half format's values widened to f32 as they are loaded.
pub(crate) trait Widen {
    /// The 8 halves of `v` as f32: values 0–3, then 4–7.
    ///
    /// # Safety
    /// None beyond NEON, which aarch64 always has.
    unsafe fn widen(v: uint16x8_t) -> [float32x4_t; 2];
}

impl Widen for F16 {
    #[inline(always)]
    unsafe fn widen(v: uint16x8_t) -> [float32x4_t; 2] {
        crate::ops::f16::widen8(v)
    }
}

/// A bf16 is the top half of an f32: widening shifts it into place.
impl Widen for Bf16 {
    #[inline(always)]
    unsafe fn widen(v: uint16x8_t) -> [float32x4_t; 2] {
        [
            vreinterpretq_f32_u32(vshll_n_u16::<16>(vget_low_u16(v))),
            vreinterpretq_f32_u32(vshll_high_n_u16::<16>(v)),
        ]
    }
}

/// 16 halves at `p`, the first `n` of them (the rest zero), widened to f32.
///
/// # Safety
/// `p` points to `n` ≤ 16 halves.
#[inline(always)]
unsafe fn load16<H: Widen>(p: *const u8, n: usize) -> [float32x4_t; 4] {
    let v = match n {
        16 => [vld1q_u8(p), vld1q_u8(p.add(16))],
        _ => {
            let mut v = [0u8; 32];
            std::ptr::copy_nonoverlapping(p, v.as_mut_ptr(), 2 * n);
            [vld1q_u8(v.as_ptr()), vld1q_u8(v.as_ptr().add(16))]
        }
    };
    let [a, b] = H::widen(vreinterpretq_u16_u8(v[0]));
    let [c, d] = H::widen(vreinterpretq_u16_u8(v[1]));
    [a, b, c, d]
}

/// Lanes a tile's pass takes of every 16: a quarter, one vector.
const QUARTER: usize = 4;

/// `halves`' `reduce` of the 16 lanes `acc[0]` (lanes 0–3) to `acc[3]` (12–15).
#[inline(always)]
unsafe fn reduce(acc: [float32x4_t; 4]) -> f32 {
    // Halves: lanes l + (l + 8), for l in 0–3, then 4–7.
    let h = [vaddq_f32(acc[0], acc[2]), vaddq_f32(acc[1], acc[3])];
    // Quarters: l + (l + 4).
    let q = vaddq_f32(h[0], h[1]);
    // Pairs: l + (l + 2), then neighbours.
    vaddv_f32(vadd_f32(vget_low_f32(q), vget_high_f32(q)))
}

/// The row kernel of halves `H`.
pub(crate) struct Neon<H>(PhantomData<H>);

impl<H: Half> RowKernel for Neon<H> {
    type X = f32;

    fn prepare(x: &[f32], out: &mut [f32]) {
        rounded(H::round, x, out)
    }

    #[inline]
    unsafe fn rows<const N: usize>(w: [*const u8; N], k: usize, x: &[f32]) -> [f32; N] {
        let [out] = Self::rows_tokens::<N, 1>(w, k, [x]);
        out
    }

    #[inline]
    unsafe fn rows_tokens<const N: usize, const T: usize>(
        w: [*const u8; N],
        k: usize,
        xs: [&[f32]; T],
    ) -> [[f32; N]; T] {
        let mut acc = [[[vdupq_n_f32(0.0); 4]; N]; T];
        chunks::<16>(0..k.next_multiple_of(16), k, |j, n| {
            let x: [[float32x4_t; 4]; T] =
                xs.map(|x| std::array::from_fn(|q| vld1q_f32(x[j + 4 * q..].as_ptr())));
            for r in 0..N {
                let w = load16::<H>(w[r].add(2 * j), n);
                for t in 0..T {
                    for q in 0..4 {
                        acc[t][r][q] = vfmaq_f32(acc[t][r][q], w[q], x[t][q]);
                    }
                }
            }
        });
        acc.map(|token| token.map(|a| reduce(a)))
    }
}

impl<H: Half> Kernels for Neon<H> {
    const STEP: usize = 16;
    const K_CHUNK: usize = WIDENED_K_CHUNK;
    const PACKED: usize = 4;

    /// Batches 2 rows × 2 tokens at a time: each chunk of a row is widened once for two
    /// tokens (widening costs as many instructions as the multiply-adds it feeds), the 16
    /// accumulators and both tokens' values in registers.
    fn untiled(w: &Weights, xs: &[f32], y: &mut [f32]) {
        match xs.len() / super::padded(w.nb) {
            1 => row_products::<Self, 4, 1>(w, xs, y),
            _ => row_products::<Self, 2, 2>(w, xs, y),
        }
    }

    /// Each quarter of a chunk's lanes (of every 16) apart, for `tile`'s passes.
    fn lay_out(x: &[f32], out: &mut [f32]) {
        lanes_apart::<H, { 16 / QUARTER }>(x, out)
    }

    /// The row's chunk widened to f32, its quarters of lanes apart as `lay_out` puts the
    /// tokens', zeros past its end.
    unsafe fn pack(row: &[u8], chunk: &mut [u8]) {
        let (n, len) = (row.len() / 2, chunk.len() / 4);
        assert!(len >= n && len.is_multiple_of(16));
        let quarter = len / 4;
        let out = chunk.as_mut_ptr().cast::<f32>();
        for s in 0..len / 16 {
            let v = load16::<H>(
                row.as_ptr().wrapping_add(32 * s),
                n.saturating_sub(16 * s).min(16),
            );
            for (q, v) in v.into_iter().enumerate() {
                vst1q_f32(out.add(q * quarter + QUARTER * s), v);
            }
        }
    }

    /// A pass per quarter of the lanes, over the 8 rows × 3 tokens: 24 chains of fused
    /// multiply-adds in registers with the tokens' values, a row's loaded as it is multiplied
    /// by all three.
    unsafe fn tile(
        w: *const u8,
        _: usize,
        x: *const f32,
        ks: std::ops::Range<usize>,
        partial: &mut Partial,
    ) {
        let quarter = ks.len() / 4;
        for q in 0..4 {
            let lanes = QUARTER * q;
            let mut acc = [[vdupq_n_f32(0.0); ROWS]; TOKENS];
            if ks.start > 0 {
                for (acc, p) in acc.iter_mut().zip(partial.iter()) {
                    for (acc, p) in acc.iter_mut().zip(p) {
                        *acc = vld1q_f32(p[lanes..].as_ptr());
                    }
                }
            }
            // One pointer each for the rows (`K_CHUNK` f32 apart) and the tokens (as many
            // values), moved on at each step: the loads take the offsets as immediates, where
            // a pointer per row and token, or an index, took an instruction each per step.
            let (mut w, mut x) = (w.cast::<f32>().add(q * quarter), x.add(q * quarter));
            for _ in 0..quarter / QUARTER {
                let xv: [_; TOKENS] = std::array::from_fn(|t| vld1q_f32(x.add(t * Self::K_CHUNK)));
                for r in 0..ROWS {
                    let w = vld1q_f32(w.add(r * Self::K_CHUNK));
                    for (acc, x) in acc.iter_mut().zip(xv) {
                        acc[r] = vfmaq_f32(acc[r], w, x);
                    }
                }
                (w, x) = (w.add(QUARTER), x.add(QUARTER));
            }
            for (acc, p) in acc.iter().zip(partial.iter_mut()) {
                for (acc, p) in acc.iter().zip(p) {
                    vst1q_f32(p[lanes..].as_mut_ptr(), *acc);
                }
            }
        }
    }
}

/// A tile's finished accumulators as outputs, `out[token][row]`.
///
/// # Safety
/// None beyond NEON, which aarch64 always has.
pub(super) unsafe fn sums(partial: &Partial) -> [[f32; ROWS]; TOKENS] {
    std::array::from_fn(|t| {
        std::array::from_fn(|r| {
            reduce(std::array::from_fn(|q| {
                vld1q_f32(partial[t][r][QUARTER * q..].as_ptr())
            }))
        })
    })
}
