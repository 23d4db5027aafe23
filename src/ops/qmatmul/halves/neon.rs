//! The F16 and BF16 row kernel on aarch64, every batch size through it (batches two tokens
//! at a time; no prefetch). `halves`' 16 accumulator lanes are four `float32x4_t`; each lane
//! takes the same exact products in the same order, by fused multiply-adds (`vfmaq_f32`, as
//! x86's `vfmadd`), and `reduce` adds the four vectors in the same tree, so the outputs are the
//! same bits as the x86 AVX2 and AVX-512 widened kernels' (subnormals kept on both: Linux
//! leaves FPCR's and MXCSR's flush-to-zero off).

use core::arch::aarch64::*;
use std::marker::PhantomData;

use super::{chunks, rounded, row_products, with_prepared, Bf16, Half, RowKernel, F16};
use crate::ops::qmatmul::driver::Weights;

/// `y[m, n_rows] = x[m, k] · Wᵀ` for `W` of halves `H` in `data` (checked by the caller).
pub(super) fn matmul<H: Half>(data: &[u8], n_rows: usize, k: usize, x: &[f32], y: &mut [f32]) {
    let w = Weights {
        data,
        n_rows,
        nb: k,
    };
    // Batches 2 rows × 2 tokens at a time: each chunk of a row is widened once for two
    // tokens (widening costs as many instructions as the multiply-adds it feeds), the 16
    // accumulators and both tokens' values in registers.
    with_prepared::<Neon<H>, _>(k, x, 0, |xs, _| match x.len() / k {
        1 => row_products::<Neon<H>, 4, 1>(&w, xs, y),
        _ => row_products::<Neon<H>, 2, 2>(&w, xs, y),
    })
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
