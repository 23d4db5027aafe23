//! Q4_K × Q8_K, and what Q5_K shares with it. ggml's `block_q4_K` (144 bytes, 256 values):
//! `d`, `dmin` (f16), 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, then 128 bytes
//! of nibbles: byte `j` of chunk `c` (32 bytes) holds value `64c + j` in its low nibble and
//! `64c + 32 + j` in its high one. `block_q5_K` (176 bytes) has 32 bytes `qh` between the
//! scales and the nibbles: bit `2c` of `qh[j]` is the fifth bit of value `64c + j`, bit
//! `2c + 1` that of `64c + 32 + j`. Value `i` of sub-block `s` is `d·sc_s·q_i − dmin·m_s`, so
//! against Q8_K activations `x`:
//!
//! ```text
//!     S_b = Σ_s sc_s Σ_{i∈s} q_i x_i,    M_b = Σ_s m_s Σ_{i∈s} x_i
//! ```

use core::arch::x86_64::*;

use super::act::{Groups, Rows, Q8K_SUMS, QK_K};
use super::driver::{Avx2, Avx2Rows, Format, RowKernel};
use super::simd::{
    block_steps, f16_at, headers, hsum4, hsum4_avx2, i16_pair, lane_sums, tile_avx2,
    tile_with_mins, NextRows, Pairs, Unpacked,
};

/// Q4_K (`HIGH = false`) or Q5_K (`HIGH = true`, the fifth bits merged in).
pub(crate) struct KQuant<const HIGH: bool>;
pub(crate) type Q4K = KQuant<false>;
pub(crate) type Q5K = KQuant<true>;

/// Block bytes and where the nibbles start, without and with the fifth bits (Q4_K, Q5_K).
const fn block_bytes(high: bool) -> usize {
    if high {
        176
    } else {
        144
    }
}
const fn nibbles_at(high: bool) -> usize {
    if high {
        48
    } else {
        16
    }
}
/// Where Q5_K's fifth bits start.
const QH: usize = 16;

/// One unpacked block: values as bytes in natural order, scales as i32, mins as i16 pairs.
const U_Q: usize = 0; // [u8; 256]
const U_SC: usize = 256; // [i32; 8]
const U_MP: usize = 288; // [(i16, i16); 4]: (m_2p, m_2p+1)
const U_D: usize = 304; // f32 d, then f32 dmin
const U_BYTES: usize = 320;
const LAYOUT: Unpacked = Unpacked {
    scales: U_SC,
    d: U_D,
    bytes: U_BYTES,
};

/// The 8 scales and 8 mins of a block's 12 packed bytes at `p` (ggml's `get_scale_min_k4`,
/// four at a time as candle's `utmp`): (scales, mins), one byte each.
///
/// # Safety
/// `p` is readable for 12 bytes.
#[inline(always)]
unsafe fn scales_mins(p: *const u8) -> (u64, u64) {
    let u = |i: usize| p.add(4 * i).cast::<u32>().read_unaligned();
    let (u0, u1, u2) = (u(0), u(1), u(2));
    let sc_lo = u0 & 0x3f3f_3f3f;
    let sc_hi = (u2 & 0x0f0f_0f0f) | (((u0 >> 6) & 0x0303_0303) << 4);
    let mn_lo = u1 & 0x3f3f_3f3f;
    let mn_hi = ((u2 >> 4) & 0x0f0f_0f0f) | (((u1 >> 6) & 0x0303_0303) << 4);
    (
        sc_lo as u64 | (sc_hi as u64) << 32,
        mn_lo as u64 | (mn_hi as u64) << 32,
    )
}

/// Values `64c..64c+64` of the block at `p` as bytes in natural order: nibble chunk `c`
/// broadcast to both halves, the upper half shifted right by 4; with `HIGH`, the fifth bits
/// `2c` (lower half) and `2c + 1` (upper half) of `qh` put above them.
///
/// # Safety
/// `p` points to a whole block; AVX-512 F/BW.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn chunk<const HIGH: bool>(p: *const u8, c: usize) -> __m512i {
    let halves = |a: i16, b: i16| {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi16(a)),
            _mm256_set1_epi16(b),
        )
    };
    let q = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(nibbles_at(HIGH) + 32 * c).cast()));
    let q = _mm512_and_si512(_mm512_srlv_epi16(q, halves(0, 4)), _mm512_set1_epi8(0x0f));
    if !HIGH {
        return q;
    }
    // Bits 2c and 2c + 1 moved to bit 4.
    let qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(QH).cast()));
    let (b0, b1) = (2 * c as i16, 2 * c as i16 + 1);
    let top = match c < 2 {
        true => _mm512_sllv_epi16(qh, halves(4 - b0, 4 - b1)),
        false => _mm512_srlv_epi16(qh, halves(b0 - 4, b1 - 4)),
    };
    // q | (top & 0x10)
    _mm512_ternarylogic_epi32::<0xf8>(q, top, _mm512_set1_epi8(0x10))
}

/// `scales_mins` on 4 headers at once: in each 128-bit lane, bytes 0..8 the scales and bytes
/// 8..16 the mins of that lane's block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn unpack_scales(h: __m512i) -> __m512i {
    // The packed byte j of the 12 is header byte 4 + j. Low parts: scales 0..4 and mins 0..4
    // are bytes 0..4 and 4..8 (6 bits), scales 4..8 the low and mins 4..8 the high nibbles of
    // bytes 8..12.
    let low = _mm512_shuffle_epi8(
        h,
        _mm512_broadcast_i32x4(_mm_setr_epi8(
            4, 5, 6, 7, 12, 13, 14, 15, 8, 9, 10, 11, 12, 13, 14, 15,
        )),
    );
    let low = _mm512_mask_blend_epi8(0xf000_f000_f000_f000, low, _mm512_srli_epi16::<4>(low));
    let low = _mm512_and_si512(
        low,
        _mm512_broadcast_i32x4(_mm_setr_epi8(
            63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15,
        )),
    );
    // High parts of scales and mins 4..8: the top 2 bits of bytes 0..4 and 4..8, as bits 4..6.
    let high = _mm512_shuffle_epi8(
        h,
        _mm512_broadcast_i32x4(_mm_setr_epi8(
            -1, -1, -1, -1, 4, 5, 6, 7, -1, -1, -1, -1, 8, 9, 10, 11,
        )),
    );
    let high = _mm512_and_si512(_mm512_srli_epi16::<2>(high), _mm512_set1_epi8(0x30));
    _mm512_or_si512(low, high)
}

/// `vpshufb` patterns giving the i16 pair `(sc, sc)` of sub-block `a` in dwords 0..8 and of
/// `b` in dwords 8..16, from the scales in bytes 0..8 of each lane.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn scale_pattern(a: usize, b: usize) -> __m512i {
    let lane = |s: usize| {
        let s = s as i8;
        _mm_set_epi8(
            -128, s, -128, s, -128, s, -128, s, -128, s, -128, s, -128, s, -128, s,
        )
    };
    let (a, b) = (lane(a), lane(b));
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set_m128i(a, a)),
        _mm256_set_m128i(b, b),
    )
}

/// `Format::rows4` of Q4_K (`HIGH` false) and Q5_K.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows4<const HIGH: bool>(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
    let block_bytes = block_bytes(HIGH);
    // 64 bytes of nibbles hold values [0, 32) and [64, 96) in their low nibbles, [32, 64)
    // and [96, 128) in their high ones (then the same from 128): sub-blocks (0, 2), (1, 3),
    // (4, 6), (5, 7).
    let pattern = [
        scale_pattern(0, 2),
        scale_pattern(1, 3),
        scale_pattern(4, 6),
        scale_pattern(5, 7),
    ];
    let m4 = _mm512_set1_epi8(0x0f);
    let (bit4, halves) = (_mm512_set1_epi8(0x10), |a: i16, b: i16| {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(_mm256_set1_epi16(a)),
            _mm256_set1_epi16(b),
        )
    });
    let shifts = [halves(4, 2), halves(3, 1), halves(0, 2), halves(1, 3)];
    let mins_i16 = _mm512_broadcast_i32x4(_mm_setr_epi8(
        8, -1, 9, -1, 10, -1, 11, -1, 12, -1, 13, -1, 14, -1, 15, -1,
    ));
    let d_dmin = _mm512_castsi128_si512(_mm_setr_epi16(0, 8, 16, 24, 1, 9, 17, 25));
    let xq = act.qs[t * act.k..].as_ptr();
    let next = NextRows::new(nb * block_bytes, 4, block_bytes);
    let mut acc = _mm_setzero_ps();
    for b in 0..nb {
        // The activations regrouped as the nibbles give the values.
        let x: [__m512i; 4] =
            std::array::from_fn(|c| _mm512_loadu_si512(xq.add(QK_K * b + 64 * c).cast()));
        let x = [
            _mm512_shuffle_i64x2::<0x44>(x[0], x[1]),
            _mm512_shuffle_i64x2::<0xee>(x[0], x[1]),
            _mm512_shuffle_i64x2::<0x44>(x[2], x[3]),
            _mm512_shuffle_i64x2::<0xee>(x[2], x[3]),
        ];
        let p: [*const u8; 4] = std::array::from_fn(|r| w[r].add(b * block_bytes));
        // d, dmin, 12 bytes of scales and mins.
        let hdr = headers(p);
        let scmn = unpack_scales(hdr);
        let mut s = [_mm512_setzero_si512(); 4];
        for r in 0..4 {
            next.fetch(w[0], r, b);
            // Lane r (this row's scales) in every lane.
            let r4 = 4 * r as i32;
            let lane = _mm512_broadcast_i32x4(_mm_setr_epi32(r4, r4 + 1, r4 + 2, r4 + 3));
            let sc = _mm512_permutexvar_epi32(lane, scmn);
            // Two chains of two: LLVM splits longer vpdpwssd chains into vpmaddwd + vpaddd.
            let mut half_sums = [_mm512_setzero_si512(); 2];
            // Q5_K: qh in both halves; bits (0, 2), (1, 3), (4, 6), (5, 7) go to bit 4.
            let qh = match HIGH {
                true => _mm512_broadcast_i64x4(_mm256_loadu_si256(p[r].add(QH).cast())),
                false => _mm512_setzero_si512(),
            };
            for (half, sum) in half_sums.iter_mut().enumerate() {
                let q = _mm512_loadu_si512(p[r].add(nibbles_at(HIGH) + 64 * half).cast());
                let mut lo = _mm512_and_si512(q, m4);
                let mut hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
                if HIGH {
                    let (top_lo, top_hi) = match half {
                        0 => (
                            _mm512_sllv_epi16(qh, shifts[0]),
                            _mm512_sllv_epi16(qh, shifts[1]),
                        ),
                        _ => (
                            _mm512_srlv_epi16(qh, shifts[2]),
                            _mm512_srlv_epi16(qh, shifts[3]),
                        ),
                    };
                    lo = _mm512_ternarylogic_epi32::<0xf8>(lo, top_lo, bit4);
                    hi = _mm512_ternarylogic_epi32::<0xf8>(hi, top_hi, bit4);
                }
                for (j, v) in [lo, hi].into_iter().enumerate() {
                    let c = 2 * half + j;
                    let prod = _mm512_maddubs_epi16(v, x[c]);
                    *sum = _mm512_dpwssd_epi32(*sum, prod, _mm512_shuffle_epi8(sc, pattern[c]));
                }
            }
            s[r] = _mm512_add_epi32(half_sums[0], half_sums[1]);
        }
        let s4 = hsum4(s);
        let x32 = _mm512_broadcast_i32x4(_mm_loadu_si128(
            act.sums[(t * nb + b) * Q8K_SUMS..].as_ptr().cast(),
        ));
        let m4 = lane_sums(_mm512_madd_epi16(_mm512_shuffle_epi8(scmn, mins_i16), x32));
        let dd = _mm256_cvtph_ps(_mm512_castsi512_si128(_mm512_permutexvar_epi16(
            d_dmin, hdr,
        )));
        let dx = _mm_set1_ps(act.d[t * nb + b]);
        let d = _mm_mul_ps(_mm256_castps256_ps128(dd), dx);
        let dmin = _mm_mul_ps(_mm256_extractf128_ps::<1>(dd), dx);
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(s4), d, acc);
        acc = _mm_fnmadd_ps(_mm_cvtepi32_ps(m4), dmin, acc);
    }
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// Values `64c..64c+32` and `64c+32..64c+64` of the block at `p` as bytes: the low and high
/// nibbles of chunk `c`, with `HIGH` the fifth bits `2c` and `2c + 1` of `qh` put above them.
///
/// # Safety
/// `p` points to a whole block; AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn values_avx2<const HIGH: bool>(p: *const u8, c: usize) -> [__m256i; 2] {
    let m4 = _mm256_set1_epi8(0x0f);
    let q = _mm256_loadu_si256(p.add(nibbles_at(HIGH) + 32 * c).cast());
    let lo = _mm256_and_si256(q, m4);
    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
    if !HIGH {
        return [lo, hi];
    }
    let qh = _mm256_loadu_si256(p.add(QH).cast());
    // Bit n of qh to bit 4.
    let bit = |n: i32| {
        let moved = match n < 4 {
            true => _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - n)),
            false => _mm256_srl_epi16(qh, _mm_cvtsi32_si128(n - 4)),
        };
        _mm256_and_si256(moved, _mm256_set1_epi8(0x10))
    };
    [
        _mm256_or_si256(lo, bit(2 * c as i32)),
        _mm256_or_si256(hi, bit(2 * c as i32 + 1)),
    ]
}

/// `Avx2Rows::rows4_avx2` of Q4_K (`HIGH` false) and Q5_K: per 32-byte chunk of nibbles,
/// the low nibbles (sub-block `2c`) and the high ones (`2c + 1`) times the activations with
/// `vpmaddubsw` (pairs within i16: 2 · 31 · 128), then times the sub-block's scale with
/// `vpmaddwd`; the mins' term from the activations' sums of 32. Exact sums, the AVX-512
/// kernel's float steps.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows4_avx2<const HIGH: bool>(
    w: [*const u8; 4],
    nb: usize,
    act: &Rows,
    t: usize,
) -> [f32; 4] {
    let block_bytes = block_bytes(HIGH);
    // `vpshufb` patterns broadcasting i16 `i` of a lane's 8 to all of it.
    let pick: [__m256i; 8] =
        std::array::from_fn(|i| _mm256_set1_epi16(0x0100 * (2 * i as i16 + 1) + 2 * i as i16));
    let xq = act.qs[t * act.k..].as_ptr();
    let next = NextRows::new(nb * block_bytes, 4, block_bytes);
    let mut acc = _mm_setzero_ps();
    for b in 0..nb {
        let x = |i: usize| _mm256_loadu_si256(xq.add(QK_K * b + 32 * i).cast());
        let x32 = _mm_loadu_si128(act.sums[(t * nb + b) * Q8K_SUMS..].as_ptr().cast());
        let mut mins = [_mm_setzero_si128(); 4];
        let s: [__m256i; 4] = std::array::from_fn(|r| {
            let p = w[r].add(b * block_bytes);
            next.fetch(w[0], r, b);
            let (sc, mn) = scales_mins(p.add(4));
            let widen = |v: u64| _mm_cvtepu8_epi16(_mm_cvtsi64_si128(v as i64));
            mins[r] = _mm_madd_epi16(widen(mn), x32);
            let scales = _mm256_broadcastsi128_si256(widen(sc));
            let mut sum = _mm256_setzero_si256();
            for c in 0..4 {
                for (j, v) in values_avx2::<HIGH>(p, c).into_iter().enumerate() {
                    let scale = _mm256_shuffle_epi8(scales, pick[2 * c + j]);
                    let pairs = _mm256_maddubs_epi16(v, x(2 * c + j));
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, scale));
                }
            }
            sum
        });
        let m = _mm_hadd_epi32(
            _mm_hadd_epi32(mins[0], mins[1]),
            _mm_hadd_epi32(mins[2], mins[3]),
        );
        let d_x = act.d[t * nb + b];
        acc = block_steps(acc, hsum4_avx2(s), Some(m), w, block_bytes, b, 0, d_x);
    }
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// Writes the unpacked block's scales, mins, `d` and `dmin` from the block at `p` (both
/// instruction sets' `unpack`).
///
/// # Safety
/// `p` points to a whole block, `o` to `U_BYTES` writable ones; AVX2.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn store_scales(p: *const u8, o: *mut u8) {
    let (sc, mn) = scales_mins(p.add(4));
    _mm256_storeu_si256(
        o.add(U_SC).cast(),
        _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(sc as i64)),
    );
    _mm_storeu_si128(
        o.add(U_MP).cast(),
        _mm_cvtepu8_epi16(_mm_cvtsi64_si128(mn as i64)),
    );
    let d = o.add(U_D).cast::<f32>();
    d.write(f16_at(p));
    d.add(1).write(f16_at(p.add(2)));
}

/// `Format::unpack` of Q4_K (`HIGH` false) and Q5_K.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn unpack<const HIGH: bool>(w: *const u8, nb: usize, out: *mut u8) {
    for b in 0..nb {
        let (p, o) = (w.add(b * block_bytes(HIGH)), out.add(b * U_BYTES));
        for c in 0..4 {
            _mm512_storeu_si512(o.add(U_Q + 64 * c).cast(), chunk::<HIGH>(p, c));
        }
        store_scales(p, o);
    }
}

/// `unpack` on AVX2: the same bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_avx2<const HIGH: bool>(w: *const u8, nb: usize, out: *mut u8) {
    for b in 0..nb {
        let (p, o) = (w.add(b * block_bytes(HIGH)), out.add(b * U_BYTES));
        for c in 0..4 {
            let [lo, hi] = values_avx2::<HIGH>(p, c);
            _mm256_storeu_si256(o.add(U_Q + 64 * c).cast(), lo);
            _mm256_storeu_si256(o.add(U_Q + 64 * c + 32).cast(), hi);
        }
        store_scales(p, o);
    }
}

impl<const HIGH: bool> RowKernel for KQuant<HIGH> {
    const BLOCK: usize = QK_K;
    const BLOCK_BYTES: usize = block_bytes(HIGH);
    const Q8K: bool = true;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn rows4(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
        rows4::<HIGH>(w, nb, act, t)
    }
}

impl<const HIGH: bool> Avx2Rows for KQuant<HIGH> {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows4_avx2(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
        rows4_avx2::<HIGH>(w, nb, act, t)
    }
}

impl<const HIGH: bool> Format for KQuant<HIGH> {
    /// The sums of 32 as i16 pairs `(X_2p, X_2p+1)`, for `M_b`.
    const N_EXTRA: usize = 4;

    fn extra(sums: &[i16], p: usize) -> i32 {
        i16_pair(&sums[2 * p..])
    }

    fn unpacked_bytes(nb: usize) -> usize {
        nb * U_BYTES
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn unpack(w: *const u8, nb: usize, out: *mut u8) {
        unpack::<HIGH>(w, nb, out)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile<const T: usize>(
        w: [*const u8; 4],
        nb: usize,
        act: &Groups,
        g: [usize; T],
    ) -> [[[f32; 16]; T]; 4] {
        tile_with_mins::<T, 8, 4>(w, nb, act, g, LAYOUT, U_MP)
    }
}

/// The AVX2 tiles of Q4_K and Q5_K: the AVX-512 ones' unpacked rows and groups.
impl<const HIGH: bool> Format for Avx2<KQuant<HIGH>> {
    const N_EXTRA: usize = KQuant::<HIGH>::N_EXTRA;

    fn extra(sums: &[i16], p: usize) -> i32 {
        KQuant::<HIGH>::extra(sums, p)
    }

    fn unpacked_bytes(nb: usize) -> usize {
        nb * U_BYTES
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(w: *const u8, nb: usize, out: *mut u8) {
        unpack_avx2::<HIGH>(w, nb, out)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const T: usize>(
        w: [*const u8; 4],
        nb: usize,
        act: &Groups,
        g: [usize; T],
    ) -> [[[f32; 16]; T]; 4] {
        let mins = Pairs::Mins { at: U_MP };
        match HIGH {
            true => tile_avx2::<T, 8, 31, false>(w, nb, act, g, LAYOUT, mins),
            false => tile_avx2::<T, 8, 15, false>(w, nb, act, g, LAYOUT, mins),
        }
    }
}
