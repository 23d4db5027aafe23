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
//!
//! Each block is quantized by `x86` (AVX2) or `neon` with the scalar code's bits
//! (`portable::quantize_q8k_block`, `quantize_q8_0_block`), NaN and infinities included.

use half::f16;

use crate::ops::portable;

#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(target_arch = "x86_64")]
mod x86;

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

/// One Q8_K block (`portable::quantize_q8k_block`'s bits on any instruction set): the values
/// and the sums of `qs`, and `d`.
fn q8k_block(x: &[f32], qs: &mut [i8], sums: &mut [i16]) -> f32 {
    match super::isa() {
        super::Isa::Portable => {
            let d = portable::quantize_q8k_block(x, qs);
            q8k_sums(qs, sums);
            d
        }
        // SAFETY: every level above portable has AVX2.
        #[cfg(target_arch = "x86_64")]
        _ => unsafe { x86::q8k_block(x, qs, sums) },
        // SAFETY: NEON is aarch64's baseline.
        #[cfg(target_arch = "aarch64")]
        _ => unsafe { neon::q8k_block(x, qs, sums) },
    }
}

/// What the vector Q8_K quantizers share, given the block's largest magnitude `amax`: `None`
/// for a block of zeros (`qs` and `sums` zeroed), else `−127 / max` of the first value of that
/// magnitude.
fn q8k_inverse_scale(x: &[f32], amax: f32, qs: &mut [i8], sums: &mut [i16]) -> Option<f32> {
    if amax == 0.0 {
        qs.fill(0);
        sums.fill(0);
        return None;
    }
    Some(-127.0 / x.iter().copied().find(|v| v.abs() == amax).unwrap_or(amax))
}

/// One Q8_0 block (`portable::quantize_q8_0_block`'s bits on any instruction set).
fn q8_0_block(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    match super::isa() {
        super::Isa::Portable => portable::quantize_q8_0_block(x, qs),
        // SAFETY: as in `q8k_block`.
        #[cfg(target_arch = "x86_64")]
        _ => unsafe { x86::q8_0_block(x, qs) },
        // SAFETY: as in `q8k_block`.
        #[cfg(target_arch = "aarch64")]
        _ => unsafe { neon::q8_0_block(x, qs) },
    }
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
        assert!(is_x86_feature_detected!("avx2"), "x86-64 tests need AVX2");
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
        xs.resize(xs.len().next_multiple_of(8), 0.0);
        for chunk in xs.chunks(8) {
            use core::arch::x86_64::*;
            let mut out = [0f32; 8];
            // SAFETY: AVX2 checked above; 8 lanes in and out.
            unsafe {
                _mm256_storeu_ps(
                    out.as_mut_ptr(),
                    x86::round_half_away(_mm256_loadu_ps(chunk.as_ptr())),
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

    /// This architecture's vector block quantizers (Q8_K, Q8_0).
    #[allow(clippy::type_complexity)]
    fn vector_quantizers() -> (
        impl Fn(&[f32], &mut [i8], &mut [i16]) -> f32,
        impl Fn(&[f32], &mut [i8]) -> (f32, i32),
    ) {
        #[cfg(target_arch = "x86_64")]
        {
            assert!(is_x86_feature_detected!("avx2"), "x86-64 tests need AVX2");
            // SAFETY: AVX2 checked above.
            let q8k = |x: &[f32], qs: &mut [i8], s: &mut [i16]| unsafe { x86::q8k_block(x, qs, s) };
            // SAFETY: as above.
            let q8_0 = |x: &[f32], qs: &mut [i8]| unsafe { x86::q8_0_block(x, qs) };
            (q8k, q8_0)
        }
        #[cfg(target_arch = "aarch64")]
        {
            // SAFETY: NEON is aarch64's baseline.
            let q8k =
                |x: &[f32], qs: &mut [i8], s: &mut [i16]| unsafe { neon::q8k_block(x, qs, s) };
            // SAFETY: as above.
            let q8_0 = |x: &[f32], qs: &mut [i8]| unsafe { neon::q8_0_block(x, qs) };
            (q8k, q8_0)
        }
    }

    /// The vector block quantizers give the scalar ones' bits, on ordinary blocks and on the
    /// edges: zeros, a tie of the largest magnitudes, NaN and infinities, values so small that
    /// `1 / d` overflows, values near `f32::MAX`.
    #[test]
    fn vector_blocks_equal_the_scalar_ones() {
        let (q8k, q8_0) = vector_quantizers();
        let mut x = values(9 * QK_K, 3);
        x[..QK_K].fill(0.0);
        x[QK_K + 7] = -9.0;
        x[QK_K + 9] = 9.0;
        x[2 * QK_K + 40] = f32::NAN;
        x[3 * QK_K + 3] = f32::INFINITY;
        x[3 * QK_K + 70] = f32::NEG_INFINITY;
        x[4 * QK_K..5 * QK_K].iter_mut().for_each(|v| *v *= 1e-40);
        x[5 * QK_K..6 * QK_K].iter_mut().for_each(|v| *v *= 1e37);
        x[6 * QK_K..6 * QK_K + 32].fill(f32::NAN);
        for x in x.chunks(QK_K) {
            let (mut a, mut b) = ([0i8; QK_K], [0i8; QK_K]);
            let (mut sa, mut sb) = ([0i16; Q8K_SUMS], [0i16; Q8K_SUMS]);
            let da = q8k(x, &mut a, &mut sa);
            let db = portable::quantize_q8k_block(x, &mut b);
            q8k_sums(&b, &mut sb);
            assert_eq!((da.to_bits(), a, sa), (db.to_bits(), b, sb));
            for x in x.chunks(QK8_0) {
                let (mut a, mut b) = ([0i8; QK8_0], [0i8; QK8_0]);
                let (da, sa) = q8_0(x, &mut a);
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
