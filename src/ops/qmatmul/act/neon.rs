//! aarch64's block quantizers: `fcvtas` rounds half away from zero and saturates (NaN to 0)
//! as `f32::round` then `as` do, and `fmaxnm` ignores NaN as `f32::max` does, so each step
//! is one instruction on 4 lanes.

use core::arch::aarch64::*;

use super::{QK8_0, QK_K};
use crate::ops::iq4::inverse;

/// The largest `|x|` (`x.len()` a multiple of 4), NaN ignored.
#[inline]
#[target_feature(enable = "neon")]
fn abs_max(x: &[f32]) -> f32 {
    let m = x.chunks_exact(4).fold(vdupq_n_f32(0.0), |m, v| {
        // SAFETY: 4 values of `x`.
        vmaxnmq_f32(m, vabsq_f32(unsafe { vld1q_f32(v.as_ptr()) }))
    });
    vmaxnmvq_f32(m)
}

/// 16 values of `x` times `scale`, rounded to i8 at `out`; returns their sum.
///
/// # Safety
/// `x` is readable for 16 values and `out` writable for 16 bytes.
#[inline]
#[target_feature(enable = "neon")]
unsafe fn quantize16(x: *const f32, scale: float32x4_t, out: *mut i8) -> i16 {
    let q = [0, 4, 8, 12].map(|i| vcvtaq_s32_f32(vmulq_f32(vld1q_f32(x.add(i)), scale)));
    let h = [
        vcombine_s16(vqmovn_s32(q[0]), vqmovn_s32(q[1])),
        vcombine_s16(vqmovn_s32(q[2]), vqmovn_s32(q[3])),
    ];
    let b = vcombine_s8(vqmovn_s16(h[0]), vqmovn_s16(h[1]));
    vst1q_s8(out, b);
    vaddlvq_s8(b)
}

/// `portable::quantize_q8_0_block`'s bits: `d = amax / 127` (unrounded), `q = round(x / d)`;
/// returns `d` and the values' sum.
#[target_feature(enable = "neon")]
pub(super) fn q8_0_block(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    assert!(x.len() == QK8_0 && qs.len() == QK8_0);
    let d = abs_max(x) / 127.0;
    let id = vdupq_n_f32(inverse(d));
    // SAFETY: two runs of 16 inside `x` and `qs` (32 each, checked above).
    let halves =
        [0, 16].map(|i| unsafe { quantize16(x.as_ptr().add(i), id, qs.as_mut_ptr().add(i)) });
    (d, halves.iter().map(|&s| s as i32).sum())
}

/// `portable::quantize_q8k_block`'s bits: `d = max / −127` of the first value of largest
/// magnitude, `q = round(x / d)` clamped to i8; also the sums of `q`, 8 of 32 then 16 of 16.
/// Returns `d`.
#[target_feature(enable = "neon")]
pub(super) fn q8k_block(x: &[f32], qs: &mut [i8], sums: &mut [i16]) -> f32 {
    assert!(x.len() == QK_K && qs.len() == QK_K && sums.len() == super::Q8K_SUMS);
    let Some(iscale) = super::q8k_inverse_scale(x, abs_max(x), qs, sums) else {
        return 0.0;
    };
    let scale = vdupq_n_f32(iscale);
    for j in 0..QK_K / 16 {
        // SAFETY: 16 values at 16 j < 256 of `x` and `qs` (checked above).
        sums[8 + j] =
            unsafe { quantize16(x.as_ptr().add(16 * j), scale, qs.as_mut_ptr().add(16 * j)) };
    }
    for j in 0..8 {
        sums[j] = sums[8 + 2 * j] + sums[9 + 2 * j];
    }
    1.0 / iscale
}
