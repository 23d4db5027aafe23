//! Activations quantized for the integer kernels, bit for bit as candle's (and ggml's)
//! `quantize_row_q8_K` / `quantize_row_q8_0` round them, in two layouts:
//!
//! - **rows** (`Rows`): token after token, `qs[t, k]` in natural order, one scale per block and
//!   the block's partial sums (ggml's `bsums`): the row kernels read one token at a time.
//! - **groups of 16 tokens** (`Groups`): `qs[g, k/4, t % 16, k % 4]`, so that one 64-byte load
//!   holds 4 consecutive values of 16 tokens — the operand of a `vpdpbusd` whose other operand
//!   is 4 weights broadcast. Scales `d[g, b, t % 16]` and per-format extra terms
//!   `extra[g, b, j, t % 16]` are laid out the same way. Missing tokens of the last group are
//!   zeros.

#[cfg(target_arch = "x86_64")]
use core::arch::x86_64::*;

use half::f16;

use crate::ops::portable;

/// Bytes a 64-byte aligned array of `n` values of `T` takes in an `Arena`.
pub(crate) fn arena_bytes<T>(n: usize) -> usize {
    (n * std::mem::size_of::<T>()).next_multiple_of(64)
}

/// Plain numbers: valid for any bit pattern.
///
/// # Safety
/// Implementors must be primitive integers or floats.
pub(crate) unsafe trait Plain: Copy {}
// SAFETY: primitive numbers.
unsafe impl Plain for i8 {}
unsafe impl Plain for u8 {}
unsafe impl Plain for i16 {}
unsafe impl Plain for i32 {}
unsafe impl Plain for f32 {}

/// Hands out 64-byte aligned arrays from one 64-byte aligned scratch.
pub(crate) struct Arena<'a> {
    rest: &'a mut [u8],
}

impl<'a> Arena<'a> {
    pub(crate) fn new(bytes: &'a mut [u8]) -> Arena<'a> {
        assert!(
            (bytes.as_ptr() as usize).is_multiple_of(64),
            "arena scratch must be 64-byte aligned"
        );
        Arena { rest: bytes }
    }

    /// `n` values of `T` (contents unspecified), 64-byte aligned.
    pub(crate) fn take<T: Plain>(&mut self, n: usize) -> &'a mut [T] {
        let bytes = arena_bytes::<T>(n);
        let (head, rest) = std::mem::take(&mut self.rest).split_at_mut(bytes);
        self.rest = rest;
        // SAFETY: `head` is `bytes >= n * size_of::<T>()` bytes at a 64-byte aligned address
        // (every `take` consumes a multiple of 64 from an aligned start); `T: Plain` is valid
        // for any bit pattern.
        unsafe { std::slice::from_raw_parts_mut(head.as_mut_ptr().cast::<T>(), n) }
    }
}

/// Activations of `m` tokens, one row each.
pub(crate) struct Rows<'a> {
    pub m: usize,
    /// Values per token (a multiple of the block size).
    pub k: usize,
    /// `[m, k]` the quantized values.
    pub qs: &'a [i8],
    /// `[m, k / block]` the block scales (a Q8_0 scale is its f16 widened).
    pub d: &'a [f32],
    /// `[m, k / block, n_sums]` sums of consecutive values: Q8_K keeps the 8 sums of 32 then
    /// the 16 sums of 16 (ggml's `bsums`); Q8_0 the block's one sum.
    pub sums: &'a [i16],
    /// Q8_0: `[m, k / 32]` ggml's Q8_1 `s`, the block's sum times its unrounded scale,
    /// rounded to f16 (the formats with a min multiply it); Q8_K: empty.
    pub s: &'a [f32],
}

/// What a rows layout of `m` tokens of `k` values takes in an `Arena`.
pub(crate) fn rows_bytes(m: usize, k: usize, block: usize, n_sums: usize) -> usize {
    let nb = k / block;
    let s = if block == QK8_0 { m * nb } else { 0 };
    arena_bytes::<i8>(m * k)
        + arena_bytes::<f32>(m * nb)
        + arena_bytes::<i16>(m * nb * n_sums)
        + arena_bytes::<f32>(s)
}

/// Sums per Q8_K block in `Rows::sums`: 8 over 32 values, then 16 over 16.
pub(crate) const Q8K_SUMS: usize = 24;
pub(crate) const QK_K: usize = 256;
pub(crate) const QK8_0: usize = 32;

/// Quantizes `x` (`[m, k]`) to Q8_K rows (parallel over tokens), on any instruction set.
pub(crate) fn quantize_q8k<'a>(x: &[f32], m: usize, k: usize, arena: &mut Arena<'a>) -> Rows<'a> {
    use rayon::prelude::*;
    let nb = k / QK_K;
    let qs = arena.take::<i8>(m * k);
    let d = arena.take::<f32>(m * nb);
    let sums = arena.take::<i16>(m * nb * Q8K_SUMS);
    let work = qs
        .par_chunks_mut(k)
        .zip(d.par_chunks_mut(nb))
        .zip(sums.par_chunks_mut(nb * Q8K_SUMS))
        .zip(x.par_chunks(k));
    work.for_each(|(((qs, d), sums), x)| {
        for b in 0..nb {
            let s = &mut sums[b * Q8K_SUMS..(b + 1) * Q8K_SUMS];
            let (q, x) = (
                &mut qs[b * QK_K..(b + 1) * QK_K],
                &x[b * QK_K..(b + 1) * QK_K],
            );
            d[b] = q8k_block(x, q, s);
        }
    });
    Rows {
        m,
        k,
        qs,
        d,
        sums,
        s: &[],
    }
}

/// Quantizes `x` (`[m, k]`) to Q8_0 rows (parallel over tokens), on any instruction set.
pub(crate) fn quantize_q8_0<'a>(x: &[f32], m: usize, k: usize, arena: &mut Arena<'a>) -> Rows<'a> {
    use rayon::prelude::*;
    let nb = k / QK8_0;
    let qs = arena.take::<i8>(m * k);
    let d = arena.take::<f32>(m * nb);
    let sums = arena.take::<i16>(m * nb);
    let s = arena.take::<f32>(m * nb);
    let work = qs
        .par_chunks_mut(k)
        .zip(d.par_chunks_mut(nb))
        .zip(sums.par_chunks_mut(nb))
        .zip(s.par_chunks_mut(nb))
        .zip(x.par_chunks(k));
    work.for_each(|((((qs, d), sums), s), x)| {
        for b in 0..nb {
            let (q, x) = (
                &mut qs[b * QK8_0..(b + 1) * QK8_0],
                &x[b * QK8_0..(b + 1) * QK8_0],
            );
            let (scale, sum) = q8_0_block(x, q);
            d[b] = f16::from_f32(scale).to_f32();
            sums[b] = sum as i16;
            s[b] = f16::from_f32(scale * sum as f32).to_f32();
        }
    });
    Rows {
        m,
        k,
        qs,
        d,
        sums,
        s,
    }
}

/// One Q8_K block (`quantize_q8k_block`'s bits on any instruction set): the values and the
/// sums of `qs`, and `d`.
fn q8k_block(x: &[f32], qs: &mut [i8], sums: &mut [i16]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if super::isa() == super::Isa::Avx512 {
        // SAFETY: `isa()` found AVX-512 (F, BW, VL).
        return unsafe { quantize_q8k_block(x, qs, sums) };
    }
    let d = portable::quantize_q8k_block(x, qs);
    q8k_sums(qs, sums);
    d
}

/// One Q8_0 block (`portable::quantize_q8_0_block`'s bits on any instruction set).
fn q8_0_block(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    #[cfg(target_arch = "x86_64")]
    if super::isa() == super::Isa::Avx512 {
        // SAFETY: `isa()` found AVX-512 (F, BW, VL).
        return unsafe { quantize_q8_0_block(x, qs) };
    }
    portable::quantize_q8_0_block(x, qs)
}

/// `f32::round` (half away from zero) on 16 lanes, exactly: `t = trunc(v)` and `v - t` are
/// exact, so comparing the fraction with 1/2 decides as the scalar rounding does.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn round_half_away(v: __m512) -> __m512 {
    let t = _mm512_roundscale_ps::<{ _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC }>(v);
    let frac = _mm512_abs_ps(_mm512_sub_ps(v, t));
    let up = _mm512_cmp_ps_mask::<_CMP_GE_OQ>(frac, _mm512_set1_ps(0.5));
    let sign = _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(i32::MIN));
    let one = _mm512_castsi512_ps(_mm512_or_si512(sign, _mm512_set1_epi32(0x3f80_0000)));
    _mm512_mask_add_ps(t, up, t, one)
}

/// The sums of a Q8_K block's values: 8 of 32, then 16 of 16.
fn q8k_sums(qs: &[i8], sums: &mut [i16]) {
    for (j, sum) in sums[8..].iter_mut().enumerate() {
        *sum = qs[16 * j..16 * (j + 1)].iter().map(|&q| q as i16).sum();
    }
    for j in 0..8 {
        sums[j] = sums[8 + 2 * j] + sums[9 + 2 * j];
    }
}

/// One Q8_K block as candle's `BlockQ8K::from_float`: `d = max / -127` of the value of largest
/// magnitude (the first such), `q = round(x / d)` clamped to i8. Writes the values and the
/// sums (8 of 32, then 16 of 16) and returns `d`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn quantize_q8k_block(x: &[f32], qs: &mut [i8], sums: &mut [i16]) -> f32 {
    assert!(x.len() == QK_K && qs.len() == QK_K && sums.len() == Q8K_SUMS);
    // SAFETY: 16 loads of 16 lanes inside `x` (256 values, checked above).
    let v: [__m512; 16] =
        std::array::from_fn(|i| unsafe { _mm512_loadu_ps(x.as_ptr().add(16 * i)) });
    let amax = _mm512_reduce_max_ps(v.iter().fold(_mm512_setzero_ps(), |a, &v| {
        _mm512_max_ps(a, _mm512_abs_ps(v))
    }));
    if amax == 0.0 {
        qs.fill(0);
        sums.fill(0);
        return 0.0;
    }
    let max = x.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax);
    let iscale = -127.0 / max;
    let mut s16 = [0i16; 16];
    for (i, &v) in v.iter().enumerate() {
        let r = round_half_away(_mm512_mul_ps(v, _mm512_set1_ps(iscale)));
        let r = _mm512_min_ps(
            _mm512_max_ps(r, _mm512_set1_ps(-128.0)),
            _mm512_set1_ps(127.0),
        );
        let q = _mm512_cvttps_epi32(r);
        // SAFETY: 16 bytes at offset 16 i < 256 of `qs`.
        unsafe { _mm_storeu_si128(qs.as_mut_ptr().add(16 * i).cast(), _mm512_cvtsepi32_epi8(q)) };
        s16[i] = _mm512_reduce_add_epi32(q) as i16;
    }
    for j in 0..8 {
        sums[j] = s16[2 * j] + s16[2 * j + 1];
    }
    sums[8..].copy_from_slice(&s16);
    1.0 / iscale
}

/// One Q8_0 block as candle's `BlockQ8_0::from_float`: `d = amax / 127` stored as f16,
/// `q = round(x / d)` with the unrounded `d`. Returns the unrounded scale and the values' sum
/// (as `portable::quantize_q8_0_block`, 16 lanes at a time).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn quantize_q8_0_block(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    assert!(x.len() == QK8_0 && qs.len() == QK8_0);
    // SAFETY: two loads of 16 lanes inside `x` (32 values, checked above).
    let v: [__m512; 2] =
        std::array::from_fn(|i| unsafe { _mm512_loadu_ps(x.as_ptr().add(16 * i)) });
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    let mut sum = 0;
    for (i, &v) in v.iter().enumerate() {
        let q = _mm512_cvttps_epi32(round_half_away(_mm512_mul_ps(v, _mm512_set1_ps(id))));
        // SAFETY: 16 bytes at offset 16 i < 32 of `qs`.
        unsafe { _mm_storeu_si128(qs.as_mut_ptr().add(16 * i).cast(), _mm512_cvtsepi32_epi8(q)) };
        sum += _mm512_reduce_add_epi32(q);
    }
    (d, sum)
}

/// Activations of `m` tokens in groups of 16 (see the module comment).
#[cfg(target_arch = "x86_64")]
pub(crate) struct Groups<'a> {
    pub n_groups: usize,
    /// `[n_groups, k / 4, 16, 4]`
    pub qs: &'a [i8],
    /// `[n_groups, nb, 16]`
    pub d: &'a [f32],
    /// `[n_groups, nb, n_extra, 16]`
    pub extra: &'a [i32],
    /// `[n_groups, nb, 16]` the rows' `s` (zeros if theirs is empty).
    pub s: &'a [f32],
}

/// What a groups layout of `m` tokens of `k` values takes in an `Arena`.
#[cfg(target_arch = "x86_64")]
pub(crate) fn groups_bytes(m: usize, k: usize, block: usize, n_extra: usize) -> usize {
    let (g, nb) = (m.div_ceil(16), k / block);
    arena_bytes::<i8>(g * 16 * k)
        + 2 * arena_bytes::<f32>(g * nb * 16)
        + arena_bytes::<i32>(g * nb * n_extra * 16)
}

/// Regroups `rows` 16 tokens at a time (parallel over groups); `extra(sums, j)` makes extra
/// term `j` of a block from that block's sums in `rows`.
#[cfg(target_arch = "x86_64")]
pub(crate) fn group<'a>(
    rows: &Rows,
    block: usize,
    n_extra: usize,
    extra: impl Fn(&[i16], usize) -> i32 + Sync,
    arena: &mut Arena<'a>,
) -> Groups<'a> {
    use rayon::prelude::*;
    let (k, nb) = (rows.k, rows.k / block);
    let n_sums = rows.sums.len() / (rows.m * nb).max(1);
    let n_groups = rows.m.div_ceil(16);
    let qs = arena.take::<i8>(n_groups * 16 * k);
    let d = arena.take::<f32>(n_groups * nb * 16);
    let extra_out = arena.take::<i32>(n_groups * nb * n_extra * 16);
    let s_out = arena.take::<f32>(n_groups * nb * 16);
    let work = qs
        .par_chunks_mut(16 * k)
        .zip(d.par_chunks_mut(nb * 16))
        .zip(extra_out.par_chunks_mut((nb * n_extra * 16).max(1)))
        .zip(s_out.par_chunks_mut((nb * 16).max(1)))
        .enumerate();
    work.for_each(|(g, (((qs, d), ex), s))| {
        for lane in 0..16 {
            let t = 16 * g + lane;
            if t >= rows.m {
                for k4 in 0..k / 4 {
                    qs[(k4 * 16 + lane) * 4..][..4].fill(0);
                }
                for b in 0..nb {
                    d[b * 16 + lane] = 0.0;
                    s[b * 16 + lane] = 0.0;
                    for j in 0..n_extra {
                        ex[(b * n_extra + j) * 16 + lane] = 0;
                    }
                }
                continue;
            }
            let src = &rows.qs[t * k..(t + 1) * k];
            for (k4, v) in src.chunks_exact(4).enumerate() {
                qs[(k4 * 16 + lane) * 4..][..4].copy_from_slice(v);
            }
            for b in 0..nb {
                d[b * 16 + lane] = rows.d[t * nb + b];
                s[b * 16 + lane] = rows.s.get(t * nb + b).copied().unwrap_or(0.0);
                let sums = &rows.sums[(t * nb + b) * n_sums..(t * nb + b + 1) * n_sums];
                for j in 0..n_extra {
                    ex[(b * n_extra + j) * 16 + lane] = extra(sums, j);
                }
            }
        }
    });
    Groups {
        n_groups,
        qs,
        d,
        extra: extra_out,
        s: s_out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{BlockQ8K, BlockQ8_0, GgmlType};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 33) as f32 / (1u64 << 31) as f32 - 0.5) * 6.0
            })
            .collect()
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn rounding_is_f32_round() {
        if super::super::isa() != super::super::Isa::Avx512 {
            return;
        }
        let mut xs: Vec<f32> = vec![0.0, -0.0, 0.5, -0.5, 0.49999997, -0.49999997, 1.5, 2.5];
        for k in 0..140 {
            let h = k as f32 + 0.5;
            for v in [
                h,
                f32::from_bits(h.to_bits() - 1),
                f32::from_bits(h.to_bits() + 1),
            ] {
                xs.extend([v, -v]);
            }
        }
        xs.extend(values(4096, 7).iter().map(|v| v * 40.0));
        xs.resize(xs.len().next_multiple_of(16), 0.0);
        for chunk in xs.chunks(16) {
            let mut out = [0f32; 16];
            // SAFETY: AVX-512 checked above; 16 lanes in and out.
            unsafe {
                _mm512_storeu_ps(
                    out.as_mut_ptr(),
                    round_half_away(_mm512_loadu_ps(chunk.as_ptr())),
                )
            };
            for (x, r) in chunk.iter().zip(out) {
                assert_eq!(x.round().to_bits(), r.to_bits(), "round({x})");
            }
        }
    }

    /// Candle's blocks are opaque outside candle: compare what they dequantize to and what
    /// they dot with themselves.
    #[test]
    fn q8k_rows_equal_candles_blocks() {
        let (m, k) = (3, 512);
        let mut x = values(m * k, 1);
        x[..256].fill(0.0); // an all-zero block
        x[300] = 9.0; // ties between the largest positive and negative values:
        x[301] = -9.0; // the first one sets the sign
        crate::ops::scratch::with_aligned_bytes(rows_bytes(m, k, QK_K, Q8K_SUMS), |buf| {
            let rows = quantize_q8k(&x, m, k, &mut Arena::new(buf));
            for t in 0..m {
                let mut blocks = vec![BlockQ8K::zeros(); k / QK_K];
                BlockQ8K::from_float(&x[t * k..(t + 1) * k], &mut blocks);
                let mut theirs = vec![0f32; k];
                BlockQ8K::to_float(&blocks, &mut theirs);
                for (i, v) in theirs.iter().enumerate() {
                    let ours = rows.d[t * 2 + i / QK_K] * rows.qs[t * k + i] as f32;
                    assert_eq!(v.to_bits(), ours.to_bits(), "token {t} value {i}");
                }
                for b in 0..2 {
                    let q = &rows.qs[t * k + b * QK_K..][..QK_K];
                    let s = &rows.sums[(t * 2 + b) * Q8K_SUMS..][..Q8K_SUMS];
                    for j in 0..16 {
                        assert_eq!(
                            s[8 + j] as i32,
                            q[16 * j..16 * j + 16]
                                .iter()
                                .map(|&v| v as i32)
                                .sum::<i32>()
                        );
                    }
                    for j in 0..8 {
                        assert_eq!(
                            s[j] as i32,
                            q[32 * j..32 * j + 32]
                                .iter()
                                .map(|&v| v as i32)
                                .sum::<i32>()
                        );
                    }
                }
            }
        })
    }

    /// The scalar block quantizers (every instruction set below AVX-512) give the AVX-512
    /// ones' bits.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn scalar_blocks_equal_the_avx512_ones() {
        if super::super::isa() != super::super::Isa::Avx512 {
            return;
        }
        let mut x = values(4 * QK_K, 3);
        x[..QK_K].fill(0.0);
        x[QK_K + 7] = -9.0;
        x[QK_K + 9] = 9.0;
        for x in x.chunks(QK_K) {
            let (mut a, mut b) = ([0i8; QK_K], [0i8; QK_K]);
            let (mut sa, mut sb) = ([0i16; Q8K_SUMS], [0i16; Q8K_SUMS]);
            // SAFETY: AVX-512 checked above.
            let da = unsafe { quantize_q8k_block(x, &mut a, &mut sa) };
            let db = portable::quantize_q8k_block(x, &mut b);
            q8k_sums(&b, &mut sb);
            assert_eq!((da.to_bits(), a, sa), (db.to_bits(), b, sb));
            for x in x.chunks(QK8_0) {
                let (mut a, mut b) = ([0i8; QK8_0], [0i8; QK8_0]);
                // SAFETY: as above.
                let (da, sa) = unsafe { quantize_q8_0_block(x, &mut a) };
                let (db, sb) = portable::quantize_q8_0_block(x, &mut b);
                assert_eq!((da.to_bits(), a, sa), (db.to_bits(), b, sb));
            }
        }
    }

    #[test]
    fn q8_0_rows_equal_candles_blocks() {
        let (m, k) = (2, 128);
        let mut x = values(m * k, 2);
        x[32..64].fill(0.0);
        crate::ops::scratch::with_aligned_bytes(rows_bytes(m, k, QK8_0, 1), |buf| {
            let rows = quantize_q8_0(&x, m, k, &mut Arena::new(buf));
            for t in 0..m {
                let mut blocks = vec![BlockQ8_0::zeros(); k / QK8_0];
                BlockQ8_0::from_float(&x[t * k..(t + 1) * k], &mut blocks);
                let mut theirs = vec![0f32; k];
                BlockQ8_0::to_float(&blocks, &mut theirs);
                for (i, v) in theirs.iter().enumerate() {
                    let ours = rows.d[t * 4 + i / 32] * rows.qs[t * k + i] as f32;
                    assert_eq!(v.to_bits(), ours.to_bits(), "token {t} value {i}");
                }
            }
        })
    }
}
