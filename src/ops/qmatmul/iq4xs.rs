//! IQ4_XS × Q8_K: ggml's `block_iq4_xs` (136 bytes, 256 values: `d` f16, the 6-bit sub-block
//! scales `ls` split into `scales_h` (u16) and `scales_l` (4 bytes), then 8 sub-blocks of 32
//! laid out as IQ4_NL's nibbles). Value `i` of sub-block `s` is `d·(ls_s − 32)·KVALUES[q_i]`.
//! The row kernels multiply the signed values; the AVX-512 tiles read them as unsigned bytes
//! `u_i = KVALUES[q_i] + 128` for `vpdpbusd`, against Q8_K activations `x`:
//!
//! ```text
//!     S_b = Σ_s (ls_s − 32) (Σ_{i∈s} u_i x_i − 128 Σ_{i∈s} x_i)
//! ```
//!
//! Either way `S_b` is exact, so both give the same bits.

use core::arch::x86_64::*;

use super::act::{Groups, Rows, QK_K};
use super::driver::{Avx2, Avx2Rows, Format, RowKernel};
use super::simd::{
    block_steps, f16_at, headers, hsum4, hsum4_avx2, iq4_signed_table_avx2, iq4_table, tile_avx2,
    tile_with_starts, NextRows, Pairs, Unpacked,
};
use crate::ops::iq4::{xs_scales, KVALUES};

pub(crate) struct IQ4XS;

const BLOCK_BYTES: usize = 136;
/// Where the nibbles start.
const QS: usize = 8;

/// One unpacked block: values as bytes in natural order (unsigned `KVALUES + 128` for the
/// AVX-512 tiles, signed for the AVX2 ones), scales `ls − 32` as i32, `d`.
const U_Q: usize = 0; // [u8; 256]
const U_SC: usize = 256; // [i32; 8]
const U_D: usize = 288; // f32
const U_BYTES: usize = 320;
const LAYOUT: Unpacked = Unpacked {
    scales: U_SC,
    d: U_D,
    bytes: U_BYTES,
};

/// The scales `ls − 32` of the block at `p`.
///
/// # Safety
/// `p` is readable for 8 bytes.
#[inline(always)]
unsafe fn scales(p: *const u8) -> [i32; 8] {
    xs_scales(std::slice::from_raw_parts(p, 8))
}

/// The nibbles of sub-blocks `2j` and `2j + 1` of the block at `p`, in natural order.
///
/// # Safety
/// `p` points to a whole block; AVX-512 F/BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn nibble_pair(p: *const u8, j: usize) -> __m512i {
    // Each sub-block's 16 bytes in two 128-bit lanes, the second shifted to its high nibbles.
    let q = _mm512_castsi256_si512(_mm256_loadu_si256(p.add(QS + 32 * j).cast()));
    let q = _mm512_shuffle_i64x2::<0b01_01_00_00>(q, q);
    let shift = _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0);
    _mm512_and_si512(_mm512_srlv_epi64(q, shift), _mm512_set1_epi8(0x0f))
}

/// Sub-blocks `2j` and `2j + 1` of the block at `p` as unsigned values, in natural order.
///
/// # Safety
/// `p` points to a whole block; AVX-512 F/BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn pair(p: *const u8, j: usize) -> __m512i {
    _mm512_shuffle_epi8(_mm512_broadcast_i32x4(iq4_table()), nibble_pair(p, j))
}

/// The scales `ls − 32` as i16 of 4 block headers, in the header's 128-bit lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn scales4(hdr: __m512i) -> __m512i {
    // Word s: the nibble s % 2 of byte 4 + s / 2 of `scales_l` ...
    let low = _mm512_shuffle_epi8(
        hdr,
        _mm512_broadcast_i32x4(_mm_setr_epi8(
            4, -1, 4, -1, 5, -1, 5, -1, 6, -1, 6, -1, 7, -1, 7, -1,
        )),
    );
    let low = _mm512_srlv_epi16(
        low,
        _mm512_broadcast_i32x4(_mm_setr_epi16(0, 4, 0, 4, 0, 4, 0, 4)),
    );
    // ... and bits 2s, 2s + 1 of `scales_h` above it.
    let high = _mm512_shuffle_epi8(hdr, _mm512_set1_epi16(0x0302));
    let high = _mm512_srlv_epi16(
        high,
        _mm512_broadcast_i32x4(_mm_setr_epi16(0, 2, 4, 6, 8, 10, 12, 14)),
    );
    let ls = _mm512_or_si512(
        _mm512_and_si512(low, _mm512_set1_epi16(0x0f)),
        _mm512_slli_epi16::<4>(_mm512_and_si512(high, _mm512_set1_epi16(3))),
    );
    _mm512_sub_epi16(ls, _mm512_set1_epi16(32))
}

/// `|KVALUES|`: a `vpshufb` table from nibbles to the values' magnitudes.
const IQ4_MAGNITUDES: [u8; 16] = {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = KVALUES[i].unsigned_abs();
        i += 1;
    }
    out
};

/// Writes the unpacked block's scales and `d` from the block at `p` (both instruction sets'
/// `unpack`).
///
/// # Safety
/// `p` points to a whole block, `o` to `U_BYTES` writable ones.
#[inline(always)]
unsafe fn store_scales(p: *const u8, o: *mut u8) {
    o.add(U_SC).cast::<[i32; 8]>().write_unaligned(scales(p));
    o.add(U_D).cast::<f32>().write(f16_at(p));
}

impl RowKernel for IQ4XS {
    const BLOCK: usize = QK_K;
    const BLOCK_BYTES: usize = BLOCK_BYTES;
    const Q8K: bool = true;

    /// The values signed (`KVALUES[q]`: negative exactly for the nibbles below 8), as ggml's
    /// AVX2 code multiplies them: `|q|` times `x` with `q`'s sign (pairs within i16: 2 · 127 ·
    /// 127), times the sub-block's scale with `vpdpwssd`. Exact sums.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn rows4(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
        let xq = act.qs[t * act.k..].as_ptr();
        let xd = act.d[t * nb..].as_ptr();
        let magnitudes = _mm512_broadcast_i32x4(_mm_loadu_si128(IQ4_MAGNITUDES.as_ptr().cast()));
        // `vpshufb` patterns giving the i16 pair `(sc, sc)` of sub-block `2j` in dwords 0..8
        // and of `2j + 1` in dwords 8..16, from the 8 scales of each lane.
        let pattern: [__m512i; 4] = std::array::from_fn(|j| {
            let word = |s: i32| 0x0100_0100 * (2 * s + 1) + 0x0001_0001 * 2 * s;
            let j = 2 * j as i32;
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_set1_epi32(word(j))),
                _mm256_set1_epi32(word(j + 1)),
            )
        });
        let next = NextRows::new(nb * BLOCK_BYTES, 4, BLOCK_BYTES);
        let mut acc = _mm_setzero_ps();
        for b in 0..nb {
            let x: [__m512i; 4] =
                std::array::from_fn(|j| _mm512_loadu_si512(xq.add(QK_K * b + 64 * j).cast()));
            let p: [*const u8; 4] = std::array::from_fn(|r| w[r].add(b * BLOCK_BYTES));
            let sc = scales4(headers(p));
            // A plain loop: as a closure passed to `from_fn`, this body was not inlined.
            let mut s = [_mm512_setzero_si512(); 4];
            for r in 0..4 {
                next.fetch(w[0], r, b);
                // Lane r (this row's scales) in every lane.
                let r4 = 4 * r as i32;
                let lane = _mm512_broadcast_i32x4(_mm_setr_epi32(r4, r4 + 1, r4 + 2, r4 + 3));
                let sc = _mm512_permutexvar_epi32(lane, sc);
                let mut sum = _mm512_setzero_si512();
                for (j, &x) in x.iter().enumerate() {
                    let q = nibble_pair(p[r], j);
                    let negative = _mm512_testn_epi8_mask(q, _mm512_set1_epi8(8));
                    let x = _mm512_mask_sub_epi8(x, negative, _mm512_setzero_si512(), x);
                    let pairs = _mm512_maddubs_epi16(_mm512_shuffle_epi8(magnitudes, q), x);
                    sum = _mm512_dpwssd_epi32(sum, pairs, _mm512_shuffle_epi8(sc, pattern[j]));
                }
                s[r] = sum;
            }
            acc = block_steps(acc, hsum4(s), None, w, BLOCK_BYTES, b, 0, xd.add(b).read());
        }
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), acc);
        out
    }
}

/// Sub-block `sb` of the block at `p` as signed bytes (`KVALUES`), in natural order.
///
/// # Safety
/// `p` points to a whole block; AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn subblock_avx2(p: *const u8, sb: usize) -> __m256i {
    let table = iq4_signed_table_avx2();
    let q = _mm_loadu_si128(p.add(QS + 16 * sb).cast());
    let nibbles = _mm256_set_m128i(_mm_srli_epi16::<4>(q), q);
    _mm256_shuffle_epi8(table, _mm256_and_si256(nibbles, _mm256_set1_epi8(0x0f)))
}

/// `scales` of the block at `p` as 8 i16: `scales4` without AVX-512's variable word shifts
/// (multiplications by powers of two instead).
///
/// # Safety
/// `p` is readable for 8 bytes; AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn scales_avx2(p: *const u8) -> __m128i {
    let hdr = _mm_loadl_epi64(p.cast());
    // Word s: the nibble s % 2 of byte 4 + s / 2 of `scales_l` ...
    let low = _mm_shuffle_epi8(
        hdr,
        _mm_setr_epi8(4, -1, 4, -1, 5, -1, 5, -1, 6, -1, 6, -1, 7, -1, 7, -1),
    );
    let low = _mm_srli_epi16::<4>(_mm_mullo_epi16(
        low,
        _mm_setr_epi16(16, 1, 16, 1, 16, 1, 16, 1),
    ));
    // ... and bits 2s, 2s + 1 of `scales_h` above it (moved to the top, then down).
    let high = _mm_shuffle_epi8(hdr, _mm_set1_epi16(0x0302));
    let to_top = _mm_setr_epi16(1 << 14, 1 << 12, 1 << 10, 1 << 8, 1 << 6, 1 << 4, 1 << 2, 1);
    let high = _mm_srli_epi16::<14>(_mm_mullo_epi16(high, to_top));
    let ls = _mm_or_si128(
        _mm_and_si128(low, _mm_set1_epi16(0x0f)),
        _mm_slli_epi16::<4>(high),
    );
    _mm_sub_epi16(ls, _mm_set1_epi16(32))
}

/// `Avx2Rows::rows4_avx2` of IQ4_XS: each sub-block's values looked up as signed bytes, times
/// the activations as ggml's AVX2 code multiplies signed bytes (`|q|` times `x` with `q`'s
/// sign, pairs within i16: 2 · 127 · 127), times the sub-block's scale with `vpmaddwd`.
/// Exact sums, the AVX-512 kernel's float steps.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows4_avx2(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
    let xq = act.qs[t * act.k..].as_ptr();
    // `vpshufb` patterns broadcasting i16 `2j` of the scales to the low lane, `2j + 1` to the
    // high one.
    let word = |s: i16| 0x0100 * (2 * s + 1) + 2 * s;
    let pick: [__m256i; 4] = std::array::from_fn(|j| {
        let j = 2 * j as i16;
        _mm256_set_m128i(_mm_set1_epi16(word(j + 1)), _mm_set1_epi16(word(j)))
    });
    let table = iq4_signed_table_avx2();
    let m4 = _mm256_set1_epi8(0x0f);
    let next = NextRows::new(nb * BLOCK_BYTES, 4, BLOCK_BYTES);
    let mut acc = _mm_setzero_ps();
    for b in 0..nb {
        // Per pair of sub-blocks, their values 0..16, then 16..32, as `nibbles` gives them.
        let x: [[__m256i; 2]; 4] = std::array::from_fn(|j| {
            let x = |sb: usize| _mm256_loadu_si256(xq.add(QK_K * b + 32 * sb).cast());
            let (a, c) = (x(2 * j), x(2 * j + 1));
            [
                _mm256_permute2x128_si256::<0x20>(a, c),
                _mm256_permute2x128_si256::<0x31>(a, c),
            ]
        });
        let s: [__m256i; 4] = std::array::from_fn(|r| {
            let p = w[r].add(b * BLOCK_BYTES);
            next.fetch(w[0], r, b);
            let sc = _mm256_broadcastsi128_si256(scales_avx2(p));
            let mut sum = _mm256_setzero_si256();
            for (j, x) in x.iter().enumerate() {
                // Sub-blocks 2j and 2j + 1 side by side: values 0..16, then 16..32.
                let q = _mm256_loadu_si256(p.add(QS + 32 * j).cast());
                let nibbles = [q, _mm256_srli_epi16::<4>(q)];
                for (n, x) in nibbles.iter().zip(x) {
                    let v = _mm256_shuffle_epi8(table, _mm256_and_si256(*n, m4));
                    let pairs =
                        _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(*x, v));
                    let scale = _mm256_shuffle_epi8(sc, pick[j]);
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, scale));
                }
            }
            sum
        });
        let s = hsum4_avx2(s);
        acc = block_steps(acc, s, None, w, BLOCK_BYTES, b, 0, act.d[t * nb + b]);
    }
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), acc);
    out
}

impl Avx2Rows for IQ4XS {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows4_avx2(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
        rows4_avx2(w, nb, act, t)
    }
}

impl Format for IQ4XS {
    /// `−128 × (sum of 32)` per sub-block: the accumulators' starting values.
    const N_EXTRA: usize = 8;

    fn extra(sums: &[i16], j: usize) -> i32 {
        -128 * sums[j] as i32
    }

    fn unpacked_bytes(nb: usize) -> usize {
        nb * U_BYTES
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn unpack(w: *const u8, nb: usize, out: *mut u8) {
        for b in 0..nb {
            let (p, o) = (w.add(b * BLOCK_BYTES), out.add(b * U_BYTES));
            for j in 0..4 {
                _mm512_storeu_si512(o.add(U_Q + 64 * j).cast(), pair(p, j));
            }
            store_scales(p, o);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile<const T: usize>(
        w: [*const u8; 4],
        nb: usize,
        act: &Groups,
        g: [usize; T],
    ) -> [[[f32; 16]; T]; 4] {
        tile_with_starts::<T, 8>(w, nb, act, g, LAYOUT)
    }
}

/// The AVX2 tiles of IQ4_XS: its values unpacked signed (their sign trick needs no offset).
impl Format for Avx2<IQ4XS> {
    /// None used: `Groups` has at least one.
    const N_EXTRA: usize = 1;

    fn extra(_: &[i16], _: usize) -> i32 {
        0
    }

    fn unpacked_bytes(nb: usize) -> usize {
        nb * U_BYTES
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(w: *const u8, nb: usize, out: *mut u8) {
        for b in 0..nb {
            let (p, o) = (w.add(b * BLOCK_BYTES), out.add(b * U_BYTES));
            for sb in 0..8 {
                _mm256_storeu_si256(o.add(U_Q + 32 * sb).cast(), subblock_avx2(p, sb));
            }
            store_scales(p, o);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const T: usize>(
        w: [*const u8; 4],
        nb: usize,
        act: &Groups,
        g: [usize; T],
    ) -> [[[f32; 16]; T]; 4] {
        tile_avx2::<T, 8, 127, true>(w, nb, act, g, LAYOUT, Pairs::None)
    }
}
