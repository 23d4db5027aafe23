//! Q6_K × Q8_K. ggml's `block_q6_K` (210 bytes, 256 values): 128 bytes `ql` of low nibbles,
//! 64 bytes `qh` of 2-bit high parts, 16 signed 8-bit scales (one per sub-block of 16), `d`
//! (f16). In each half `h` (128 values), value `l` (0..32) and `l + 32` take the low nibbles
//! of `ql[64h + l]` and `ql[64h + l + 32]`, values `l + 64` and `l + 96` their high nibbles;
//! bits `2j..2j+2` of `qh[32h + l]` go above the nibble of value `l + 32j`. Value `i` of
//! sub-block `s` is `d·sc_s·(q_i − 32)`, so against Q8_K activations `x`:
//!
//! ```text
//!     S_b = Σ_s sc_s (Σ_{i∈s} q_i x_i − 32 Σ_{i∈s} x_i)
//! ```

use core::arch::x86_64::*;

use super::act::{Groups, Rows, Q8K_SUMS, QK_K};
use super::driver::{Avx2, Avx2Rows, Format, RowKernel};
use super::simd::{
    block_steps, f16_at, hsum4, hsum4_avx2, i16_pair, tile_avx2, tile_with_starts, NextRows, Pairs,
    Unpacked,
};

pub(crate) struct Q6K;

const BLOCK_BYTES: usize = 210;
const QH: usize = 128;
const SCALES: usize = 192;
const D: usize = 208;

/// One unpacked block: values (0..64) as bytes in natural order, scales as i32, d; for the
/// AVX2 tiles also `−32 sc` as i16, whose pairs times those of the sums of 16 are `S_b`'s
/// second term.
const U_Q: usize = 0; // [u8; 256]
const U_SC: usize = 256; // [i32; 16]
const U_D: usize = 320; // f32
const U_OFF: usize = 336; // [i16; 16]
const U_BYTES: usize = 384;
const LAYOUT: Unpacked = Unpacked {
    scales: U_SC,
    d: U_D,
    bytes: U_BYTES,
};

/// Writes the unpacked block's scales, `−32 sc` and `d` from the block at `p` (both
/// instruction sets' `unpack`).
///
/// # Safety
/// `p` points to a whole block, `o` to `U_BYTES` writable ones; AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store_scales(p: *const u8, o: *mut u8) {
    let sc = _mm_loadu_si128(p.add(SCALES).cast());
    _mm256_storeu_si256(o.add(U_SC).cast(), _mm256_cvtepi8_epi32(sc));
    _mm256_storeu_si256(
        o.add(U_SC + 32).cast(),
        _mm256_cvtepi8_epi32(_mm_srli_si128::<8>(sc)),
    );
    // Within i16: |sc| ≤ 128.
    let off = _mm256_slli_epi16::<5>(_mm256_cvtepi8_epi16(sc));
    let off = _mm256_sub_epi16(_mm256_setzero_si256(), off);
    _mm256_storeu_si256(o.add(U_OFF).cast(), off);
    o.add(U_D).cast::<f32>().write(f16_at(p.add(D)));
}

/// Values `64c..64c+64` of the block at `p` as bytes (0..64) in natural order.
///
/// # Safety
/// `p` points to a whole block; AVX-512 F/BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn chunk(p: *const u8, c: usize) -> __m512i {
    let (h, high) = (c / 2, c % 2 == 1);
    let ql = _mm512_loadu_si512(p.add(64 * h).cast());
    let nibbles = match high {
        false => ql,
        true => _mm512_srli_epi16::<4>(ql),
    };
    let nibbles = _mm512_and_si512(nibbles, _mm512_set1_epi8(0x0f));
    let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(QH + 32 * h).cast()));
    let (lo, hi) = if high { (4, 6) } else { (0, 2) };
    let shift = _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set1_epi16(lo)),
        _mm256_set1_epi16(hi),
    );
    let top = _mm512_and_si512(_mm512_srlv_epi16(qh, shift), _mm512_set1_epi8(3));
    _mm512_or_si512(nibbles, _mm512_slli_epi16::<4>(top))
}

impl RowKernel for Q6K {
    const BLOCK: usize = QK_K;
    const BLOCK_BYTES: usize = BLOCK_BYTES;
    const Q8K: bool = true;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn rows4(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
        // Low nibbles of ql[0..32] and ql[64..96] beside each other are values [0, 32) and
        // [128, 160), whose top bits are qh bits 0..2: vector j = 0..4 holds values
        // [32 j, 32 j + 32) and [128 + 32 j, ...) — sub-blocks (2j, 2j+1, 8+2j, 9+2j), one
        // per 128-bit lane — with their top bits at qh bits 2j..2j+2.
        let index: [__m512i; 4] = std::array::from_fn(|j| {
            let lane = |s: usize| _mm_set1_epi16(s as i16);
            let (a, b) = (2 * j, 2 * j + 1);
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(_mm256_set_m128i(lane(b), lane(a))),
                _mm256_set_m128i(lane(b + 8), lane(a + 8)),
            )
        });
        let (m4, top) = (_mm512_set1_epi8(0x0f), _mm512_set1_epi8(0x30));
        let xq = act.qs[t * act.k..].as_ptr();
        let next = NextRows::new(nb * BLOCK_BYTES, 4, BLOCK_BYTES);
        let mut acc = _mm_setzero_ps();
        for b in 0..nb {
            let x: [__m512i; 4] =
                std::array::from_fn(|c| _mm512_loadu_si512(xq.add(QK_K * b + 64 * c).cast()));
            let x = [
                _mm512_shuffle_i64x2::<0x44>(x[0], x[2]),
                _mm512_shuffle_i64x2::<0xee>(x[0], x[2]),
                _mm512_shuffle_i64x2::<0x44>(x[1], x[3]),
                _mm512_shuffle_i64x2::<0xee>(x[1], x[3]),
            ];
            let sums = act.sums[(t * nb + b) * Q8K_SUMS + 8..].as_ptr();
            let x16 = _mm256_loadu_si256(sums.cast());
            let mut s = [_mm512_setzero_si512(); 4];
            for r in 0..4 {
                let p = w[r].add(b * BLOCK_BYTES);
                next.fetch(w[0], r, b);
                let (l0, l1) = (
                    _mm512_loadu_si512(p.cast()),
                    _mm512_loadu_si512(p.add(64).cast()),
                );
                let ql = [
                    _mm512_shuffle_i64x2::<0x44>(l0, l1),
                    _mm512_shuffle_i64x2::<0xee>(l0, l1),
                ];
                let qh = _mm512_loadu_si512(p.add(QH).cast());
                let high = [
                    _mm512_slli_epi16::<4>(qh),
                    _mm512_slli_epi16::<2>(qh),
                    qh,
                    _mm512_srli_epi16::<2>(qh),
                ];
                let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(SCALES).cast()));
                let sc = _mm512_castsi256_si512(sc16);
                for j in 0..4 {
                    let low = match j {
                        0 | 1 => ql[j],
                        _ => _mm512_srli_epi16::<4>(ql[j - 2]),
                    };
                    // (low & 0x0f) | (high & 0x30)
                    let q =
                        _mm512_ternarylogic_epi32::<0xf8>(_mm512_and_si512(low, m4), high[j], top);
                    let prod = _mm512_maddubs_epi16(q, x[j]);
                    s[r] = _mm512_dpwssd_epi32(s[r], prod, _mm512_permutexvar_epi16(index[j], sc));
                }
                let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, x16));
                s[r] = _mm512_sub_epi32(s[r], _mm512_zextsi256_si512(offset));
            }
            acc = block_steps(acc, hsum4(s), None, w, BLOCK_BYTES, b, D, act.d[t * nb + b]);
        }
        let mut out = [0f32; 4];
        _mm_storeu_ps(out.as_mut_ptr(), acc);
        out
    }
}

/// Values `[128 half + 32 j, 128 half + 32 j + 32)` of the block at `p`, `j = 0..4`, as bytes
/// (0..64): the nibbles of `ql[64 half..]` (low ones for `j < 2`) and bits `2j, 2j + 1` of
/// `qh[32 half..]` above them.
///
/// # Safety
/// `p` points to a whole block; AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn values_avx2(p: *const u8, half: usize) -> [__m256i; 4] {
    let (m4, top) = (_mm256_set1_epi8(0x0f), _mm256_set1_epi8(0x30));
    let ql0 = _mm256_loadu_si256(p.add(64 * half).cast());
    let ql1 = _mm256_loadu_si256(p.add(64 * half + 32).cast());
    let qh = _mm256_loadu_si256(p.add(QH + 32 * half).cast());
    let parts = [
        (_mm256_and_si256(ql0, m4), _mm256_slli_epi16::<4>(qh)),
        (_mm256_and_si256(ql1, m4), _mm256_slli_epi16::<2>(qh)),
        (_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4), qh),
        (
            _mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4),
            _mm256_srli_epi16::<2>(qh),
        ),
    ];
    parts.map(|(low, high)| _mm256_or_si256(low, _mm256_and_si256(high, top)))
}

/// `Avx2Rows::rows4_avx2` of Q6_K: per half block and vector `j`, values `[32 j, 32 j + 32)`
/// of the half (sub-blocks `2j`, `2j + 1` of its 8) as unsigned 6-bit bytes times the
/// activations with `vpmaddubsw` (pairs within i16: 2 · 63 · 128), times their scales with
/// `vpmaddwd`, less `32 Σ_s sc_s X_s`. Exact sums, the AVX-512 kernel's float steps.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows4_avx2(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
    // `vpshufb` patterns giving i16 `2j` of a lane's 8 in the low lane, `2j + 1` in the high.
    let pick: [__m256i; 4] = std::array::from_fn(|j| {
        let i16_at = |i: i16| _mm_set1_epi16(0x0100 * (2 * i + 1) + 2 * i);
        _mm256_set_m128i(i16_at(2 * j as i16 + 1), i16_at(2 * j as i16))
    });
    let xq = act.qs[t * act.k..].as_ptr();
    let next = NextRows::new(nb * BLOCK_BYTES, 4, BLOCK_BYTES);
    let mut acc = _mm_setzero_ps();
    for b in 0..nb {
        let x16 = _mm256_loadu_si256(act.sums[(t * nb + b) * Q8K_SUMS + 8..].as_ptr().cast());
        let s: [__m256i; 4] = std::array::from_fn(|r| {
            let p = w[r].add(b * BLOCK_BYTES);
            next.fetch(w[0], r, b);
            let sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(p.add(SCALES).cast()));
            // `32 Σ_s sc_s X_s`, subtracted from the lanes' sums.
            let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(sc16, x16));
            let mut sum = _mm256_sub_epi32(_mm256_setzero_si256(), offset);
            for half in 0..2 {
                // This half's 8 scales in both lanes.
                let half_scales = match half {
                    0 => _mm256_permute2x128_si256::<0x00>(sc16, sc16),
                    _ => _mm256_permute2x128_si256::<0x11>(sc16, sc16),
                };
                for (j, q) in values_avx2(p, half).into_iter().enumerate() {
                    let x = _mm256_loadu_si256(xq.add(QK_K * b + 128 * half + 32 * j).cast());
                    let scales = _mm256_shuffle_epi8(half_scales, pick[j]);
                    let pairs = _mm256_maddubs_epi16(q, x);
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, scales));
                }
            }
            sum
        });
        let s = hsum4_avx2(s);
        acc = block_steps(acc, s, None, w, BLOCK_BYTES, b, D, act.d[t * nb + b]);
    }
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), acc);
    out
}

impl Avx2Rows for Q6K {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows4_avx2(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
        rows4_avx2(w, nb, act, t)
    }
}

impl Format for Q6K {
    /// `−32 × (sum of 16)` per sub-block: the accumulators' starting values.
    const N_EXTRA: usize = 16;

    fn extra(sums: &[i16], j: usize) -> i32 {
        -32 * sums[8 + j] as i32
    }

    fn unpacked_bytes(nb: usize) -> usize {
        nb * U_BYTES
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn unpack(w: *const u8, nb: usize, out: *mut u8) {
        for b in 0..nb {
            let (p, o) = (w.add(b * BLOCK_BYTES), out.add(b * U_BYTES));
            for c in 0..4 {
                _mm512_storeu_si512(o.add(U_Q + 64 * c).cast(), chunk(p, c));
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
        tile_with_starts::<T, 16>(w, nb, act, g, LAYOUT)
    }
}

/// The AVX2 tiles of Q6_K: the AVX-512 ones' unpacked rows with `U_OFF`, whose pairs times
/// those of the sums of 16 (the groups' extras) are `−32 Σ_s sc_s X_s`.
impl Format for Avx2<Q6K> {
    const N_EXTRA: usize = 8;

    fn extra(sums: &[i16], p: usize) -> i32 {
        i16_pair(&sums[8 + 2 * p..])
    }

    fn unpacked_bytes(nb: usize) -> usize {
        nb * U_BYTES
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(w: *const u8, nb: usize, out: *mut u8) {
        for b in 0..nb {
            let (p, o) = (w.add(b * BLOCK_BYTES), out.add(b * U_BYTES));
            for half in 0..2 {
                for (j, q) in values_avx2(p, half).into_iter().enumerate() {
                    _mm256_storeu_si256(o.add(U_Q + 128 * half + 32 * j).cast(), q);
                }
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
        tile_avx2::<T, 16, 63, false>(w, nb, act, g, LAYOUT, Pairs::Sum { at: U_OFF })
    }
}
