//! x86-64's block quantizers: AVX2, eight lanes at a time, which every level above portable
//! has (32 values fill four registers; wider vectors would not shorten the scalar steps).

use core::arch::x86_64::*;

use super::{QK8_0, QK_K};
use crate::ops::iq4::inverse;

/// `f32::round` (half away from zero) on 8 lanes, exactly: `t = trunc(v)` and `v - t` are
/// exact, so comparing the fraction with 1/2 decides as the scalar rounding does. NaN lanes
/// come out 0, as `as i8` makes them.
#[inline]
#[target_feature(enable = "avx2")]
pub(super) fn round_half_away(v: __m256) -> __m256 {
    let sign = _mm256_set1_ps(-0.0);
    let t = _mm256_round_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
    let frac = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
    let up = _mm256_cmp_ps::<_CMP_GE_OQ>(frac, _mm256_set1_ps(0.5));
    let one = _mm256_or_ps(_mm256_and_ps(v, sign), _mm256_set1_ps(1.0));
    let r = _mm256_blendv_ps(t, _mm256_add_ps(t, one), up);
    _mm256_and_ps(r, _mm256_cmp_ps::<_CMP_ORD_Q>(r, r))
}

/// `v.round() as i8` on 8 lanes, widened to i32.
#[inline]
#[target_feature(enable = "avx2")]
fn round_to_i8(v: __m256) -> __m256i {
    let r = round_half_away(v);
    let r = _mm256_min_ps(
        _mm256_max_ps(r, _mm256_set1_ps(-128.0)),
        _mm256_set1_ps(127.0),
    );
    _mm256_cvttps_epi32(r)
}

/// The largest `|x|` (`x.len()` a multiple of 8), NaN ignored as `f32::max` ignores it.
#[inline]
#[target_feature(enable = "avx2")]
fn abs_max(x: &[f32]) -> f32 {
    let sign = _mm256_set1_ps(-0.0);
    // `maxps` returns its second operand where either is NaN: the running maximum.
    let m = x.chunks_exact(8).fold(_mm256_setzero_ps(), |m, v| {
        // SAFETY: 8 values of `x`.
        let v = unsafe { _mm256_loadu_ps(v.as_ptr()) };
        _mm256_max_ps(_mm256_andnot_ps(sign, v), m)
    });
    let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps::<1>(m));
    let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)))
}

/// The sum of 8 i32 lanes.
#[inline]
#[target_feature(enable = "avx2")]
fn sum(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    _mm_cvtsi128_si32(_mm_add_epi32(s, _mm_shuffle_epi32::<0b01>(s)))
}

/// 32 values of `x` times `scale`, rounded to i8 at `out` (in order); returns them as i32,
/// 8 to a register.
///
/// # Safety
/// `x` is readable for 32 values and `out` writable for 32 bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn quantize32(x: *const f32, scale: __m256, out: *mut i8) -> [__m256i; 4] {
    let q = [0, 8, 16, 24].map(|i| round_to_i8(_mm256_mul_ps(_mm256_loadu_ps(x.add(i)), scale)));
    // Packing works within 128-bit lanes: bytes come out as 4-byte runs of
    // q0 q1 q2 q3 (low lanes), q0 q1 q2 q3 (high lanes); the permute puts them in order.
    let w = _mm256_packs_epi16(
        _mm256_packs_epi32(q[0], q[1]),
        _mm256_packs_epi32(q[2], q[3]),
    );
    let w = _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(out.cast(), w);
    q
}

/// `portable::quantize_q8_0_block`'s bits: `d = amax / 127` (unrounded), `q = round(x / d)`;
/// returns `d` and the values' sum.
#[target_feature(enable = "avx2")]
pub(super) fn q8_0_block(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    assert!(x.len() == QK8_0 && qs.len() == QK8_0);
    let d = abs_max(x) / 127.0;
    let id = _mm256_set1_ps(inverse(d));
    // SAFETY: `x` and `qs` hold 32 each (checked above).
    let q = unsafe { quantize32(x.as_ptr(), id, qs.as_mut_ptr()) };
    let total = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
    (d, sum(total))
}

/// `portable::quantize_q8k_block`'s bits: `d = max / −127` of the first value of largest
/// magnitude, `q = round(x / d)` clamped to i8; also the sums of `q`, 8 of 32 then 16 of 16.
/// Returns `d`.
#[target_feature(enable = "avx2")]
pub(super) fn q8k_block(x: &[f32], qs: &mut [i8], sums: &mut [i16]) -> f32 {
    assert!(x.len() == QK_K && qs.len() == QK_K && sums.len() == super::Q8K_SUMS);
    let Some(iscale) = super::q8k_inverse_scale(x, abs_max(x), qs, sums) else {
        return 0.0;
    };
    let scale = _mm256_set1_ps(iscale);
    for j in 0..QK_K / 32 {
        // SAFETY: 32 values at 32 j < 256 of `x` and `qs` (checked above).
        let q = unsafe { quantize32(x.as_ptr().add(32 * j), scale, qs.as_mut_ptr().add(32 * j)) };
        let halves = [_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3])];
        sums[8 + 2 * j] = sum(halves[0]) as i16;
        sums[9 + 2 * j] = sum(halves[1]) as i16;
        sums[j] = sums[8 + 2 * j] + sums[9 + 2 * j];
    }
    1.0 / iscale
}
