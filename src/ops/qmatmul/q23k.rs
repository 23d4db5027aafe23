//! Q2_K and Q3_K × Q8_K: 2-bit values in 16 runs of 16, each with its own scale. Both keep
//! their values in 64 bytes `qs`: value `128h + 32j + l` is bits `2j, 2j + 1` of `qs[32h + l]`,
//! so one 64-byte load shifted by `2j` holds values `[32j, 32j + 32)` and `[128 + 32j, ...)`,
//! the same order as Q6_K's nibbles (`q6k`).
//!
//! - `block_q2_K` (84 bytes): 16 bytes of scales (low nibbles) and mins (high nibbles), `qs`,
//!   `d`, `dmin`. Value `i` of run `s` is `d·sc_s·q_i − dmin·m_s`: as Q4_K with runs of 16,
//!   `S_b = Σ_s sc_s Σ_{i∈s} q_i x_i`, `M_b = Σ_s m_s Σ_{i∈s} x_i`.
//! - `block_q3_K` (110 bytes): 32 bytes `hmask`, `qs`, 12 bytes of 6-bit scales, `d`. Value
//!   `32c + l` is `d·sc_s·(u − 4)`, `u = q | 4·(bit c of hmask[l])` (0..8), `sc_s` signed:
//!   `S_b = Σ_s sc_s (Σ_{i∈s} u_i x_i − 4 Σ_{i∈s} x_i)`, as Q6_K with an offset of 4.
//!
//! The kernels read the values unsigned (`vpmaddubsw`: pairs within i16, 2 · 7 · 128) and take
//! the runs' sums of activations (ggml's `bsums`) for the mins and the offset. The AVX2 tiles
//! read the AVX-512 ones' unpacked blocks, the offset as i16 pairs `−4 sc` beside Q2_K's mins.

use core::arch::x86_64::*;

use super::act::{Groups, Rows, Q8K_SUMS, QK_K};
use super::driver::{Avx2, Avx2Rows, Format, RowKernel};
use super::simd::{
    block_steps, f16_at, hsum4, hsum4_avx2, i16_pair, tile_avx2, tile_with_mins, tile_with_starts,
    NextRows, Pairs, Unpacked,
};

/// Q2_K (`Q3 = false`) or Q3_K (`Q3 = true`).
pub(crate) struct LowBits<const Q3: bool>;
pub(crate) type Q2K = LowBits<false>;
pub(crate) type Q3K = LowBits<true>;

const fn block_bytes(q3: bool) -> usize {
    if q3 {
        110
    } else {
        84
    }
}
/// Where `qs` and `d` are (Q2_K's `dmin` follows its `d`; Q3_K's `hmask` is at 0).
const fn qs_at(q3: bool) -> usize {
    if q3 {
        32
    } else {
        16
    }
}
const fn d_at(q3: bool) -> usize {
    if q3 {
        108
    } else {
        80
    }
}
const Q3_SCALES: usize = 96;

/// One unpacked block: values (0..8) as bytes in natural order, scales as i32, i16 pairs
/// (Q2_K's mins; Q3_K's `−4 sc`, for the AVX2 tiles), `d` (and Q2_K's `dmin`).
const U_Q: usize = 0; // [u8; 256]
const U_SC: usize = 256; // [i32; 16]
const U_MP: usize = 320; // [(i16, i16); 8]: (m_2p, m_2p+1) or (−4 sc_2p, −4 sc_2p+1)
const U_D: usize = 352; // f32 d, then f32 dmin
const U_BYTES: usize = 384;
const LAYOUT: Unpacked = Unpacked {
    scales: U_SC,
    d: U_D,
    bytes: U_BYTES,
};

/// The 16 run scales of the block at `p` as i16 (Q3_K's signed, `sc − 32`), and Q2_K's 16
/// mins (Q3_K: zeros).
///
/// # Safety
/// `p` points to a whole block.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn scales_mins<const Q3: bool>(p: *const u8) -> (__m256i, __m256i) {
    if !Q3 {
        let b = _mm_loadu_si128(p.cast());
        let m4 = _mm_set1_epi8(0x0f);
        let sc = _mm256_cvtepu8_epi16(_mm_and_si128(b, m4));
        let mn = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16::<4>(b), m4));
        return (sc, mn);
    }
    // ggml's `kmask` shuffle: low 4 bits from nibble j / 8 of byte j % 8, high 2 bits from
    // bits 2(j / 4).. of byte 8 + j % 4.
    let u = |i: usize| p.add(Q3_SCALES + 4 * i).cast::<u32>().read_unaligned();
    let (a0, a1, a2) = (u(0), u(1), u(2));
    let (low, high) = (0x0f0f_0f0f, 0x0303_0303);
    let s = [
        (a0 & low) | ((a2 & high) << 4),
        (a1 & low) | (((a2 >> 2) & high) << 4),
        ((a0 >> 4) & low) | (((a2 >> 4) & high) << 4),
        ((a1 >> 4) & low) | (((a2 >> 6) & high) << 4),
    ];
    let bytes = _mm_setr_epi32(s[0] as i32, s[1] as i32, s[2] as i32, s[3] as i32);
    let sc = _mm256_sub_epi16(_mm256_cvtepu8_epi16(bytes), _mm256_set1_epi16(32));
    (sc, _mm256_setzero_si256())
}

/// A 512-bit vector of `a` in every byte of its lower half and `b` in its upper half.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn halves8(a: u8, b: u8) -> __m512i {
    _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set1_epi8(a as i8)),
        _mm256_set1_epi8(b as i8),
    )
}

/// `q + 4` in the bytes of `q` whose `hm` byte has a bit of `bits` (Q3_K's third bit).
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
fn third_bits(q: __m512i, hm: __m512i, bits: __m512i) -> __m512i {
    let set = _mm512_test_epi8_mask(hm, bits);
    _mm512_mask_add_epi8(q, set, q, _mm512_set1_epi8(4))
}

/// `RowKernel::rows4` of Q2_K (`Q3` false) and Q3_K.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows4<const Q3: bool>(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
    let block_bytes = block_bytes(Q3);
    // Vector j holds values [32 j, 32 j + 32) and [128 + 32 j, ...): runs (2j, 2j+1, 8+2j,
    // 9+2j), one per 128-bit lane, whose third bits (Q3_K) are hmask bits j and 4 + j. With
    // the first 8 scales (i16) in lanes 0, 1 and the last 8 in lanes 2, 3, `vpshufb` picks
    // i16 2j (lanes 0, 2) and 2j + 1 (lanes 1, 3): cheaper than `vpermw` per vector.
    let pick: [__m512i; 4] = std::array::from_fn(|j| {
        let i16_at = |i: usize| _mm_set1_epi16((0x0100 * (2 * i + 1) + 2 * i) as i16);
        let (a, b) = (i16_at(2 * j), i16_at(2 * j + 1));
        let ab = _mm256_set_m128i(b, a);
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(ab), ab)
    });
    let hbits: [__m512i; 4] = std::array::from_fn(|j| halves8(1 << j, 1 << (4 + j)));
    let m3 = _mm512_set1_epi8(3);
    let xq = act.qs[t * act.k..].as_ptr();
    let next = NextRows::new(nb * block_bytes, 4, block_bytes);
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
        let x16 = _mm256_loadu_si256(act.sums[(t * nb + b) * Q8K_SUMS + 8..].as_ptr().cast());
        let mut s = [_mm512_setzero_si512(); 4];
        let mut m = [_mm256_setzero_si256(); 4];
        for r in 0..4 {
            let p = w[r].add(b * block_bytes);
            next.fetch(w[0], r, b);
            let qs = _mm512_loadu_si512(p.add(qs_at(Q3)).cast());
            let (sc16, mn16) = scales_mins::<Q3>(p);
            let sc = _mm512_castsi256_si512(sc16);
            let sc = _mm512_shuffle_i64x2::<0b01_01_00_00>(sc, sc);
            let hm = match Q3 {
                true => _mm512_broadcast_i64x4(_mm256_loadu_si256(p.cast())),
                false => _mm512_setzero_si512(),
            };
            let shifted = [
                qs,
                _mm512_srli_epi16::<2>(qs),
                _mm512_srli_epi16::<4>(qs),
                _mm512_srli_epi16::<6>(qs),
            ];
            for (j, q) in shifted.into_iter().enumerate() {
                let mut q = _mm512_and_si512(q, m3);
                if Q3 {
                    q = third_bits(q, hm, hbits[j]);
                }
                let prod = _mm512_maddubs_epi16(q, x[j]);
                s[r] = _mm512_dpwssd_epi32(s[r], prod, _mm512_shuffle_epi8(sc, pick[j]));
            }
            match Q3 {
                // Less `4 Σ_s sc_s X_s`.
                true => {
                    let offset = _mm256_slli_epi32::<2>(_mm256_madd_epi16(sc16, x16));
                    s[r] = _mm512_sub_epi32(s[r], _mm512_zextsi256_si512(offset));
                }
                false => m[r] = _mm256_madd_epi16(mn16, x16),
            }
        }
        let m = if Q3 { None } else { Some(hsum4_avx2(m)) };
        let d_x = act.d[t * nb + b];
        acc = block_steps(acc, hsum4(s), m, w, block_bytes, b, d_at(Q3), d_x);
    }
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// Values `[128 half + 32 j, 128 half + 32 j + 32)` of the block at `p`, `j = 0..4`, as
/// unsigned bytes: bits `2j, 2j + 1` of `qs[32 half..]`, with `Q3` hmask bit `4 half + j` as
/// bit 2.
///
/// # Safety
/// `p` points to a whole block; AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn values_avx2<const Q3: bool>(p: *const u8, half: usize) -> [__m256i; 4] {
    let (m3, four) = (_mm256_set1_epi8(3), _mm256_set1_epi8(4));
    let qs = _mm256_loadu_si256(p.add(qs_at(Q3) + 32 * half).cast());
    let hm = match Q3 {
        true => _mm256_loadu_si256(p.cast()),
        false => _mm256_setzero_si256(),
    };
    let shifted = [
        qs,
        _mm256_srli_epi16::<2>(qs),
        _mm256_srli_epi16::<4>(qs),
        _mm256_srli_epi16::<6>(qs),
    ];
    std::array::from_fn(|j| {
        let q = _mm256_and_si256(shifted[j], m3);
        if !Q3 {
            return q;
        }
        let bit = _mm256_set1_epi8((1u8 << (4 * half + j)) as i8);
        let set = _mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit);
        _mm256_or_si256(q, _mm256_and_si256(set, four))
    })
}

/// `Avx2Rows::rows4_avx2` of Q2_K (`Q3` false) and Q3_K: per half block and shift `j`, values
/// `[32 j, 32 j + 32)` of the half (runs `2j`, `2j + 1` of its 8) as unsigned bytes times the
/// activations with `vpmaddubsw`, times their scales with `vpmaddwd`; the mins' term (Q2_K)
/// or the offset (Q3_K) from the runs' sums. Exact sums, the AVX-512 kernel's float steps.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows4_avx2<const Q3: bool>(
    w: [*const u8; 4],
    nb: usize,
    act: &Rows,
    t: usize,
) -> [f32; 4] {
    let block_bytes = block_bytes(Q3);
    // `vpshufb` patterns giving i16 `2j` of a lane's 8 in the low lane, `2j + 1` in the high.
    let pick: [__m256i; 4] = std::array::from_fn(|j| {
        let i16_at = |i: i16| _mm_set1_epi16(0x0100 * (2 * i + 1) + 2 * i);
        _mm256_set_m128i(i16_at(2 * j as i16 + 1), i16_at(2 * j as i16))
    });
    let xq = act.qs[t * act.k..].as_ptr();
    let next = NextRows::new(nb * block_bytes, 4, block_bytes);
    let mut acc = _mm_setzero_ps();
    for b in 0..nb {
        let x16 = _mm256_loadu_si256(act.sums[(t * nb + b) * Q8K_SUMS + 8..].as_ptr().cast());
        let mut m = [_mm256_setzero_si256(); 4];
        let s: [__m256i; 4] = std::array::from_fn(|r| {
            let p = w[r].add(b * block_bytes);
            next.fetch(w[0], r, b);
            let (sc16, mn16) = scales_mins::<Q3>(p);
            let mut sum = match Q3 {
                true => {
                    let offset = _mm256_slli_epi32::<2>(_mm256_madd_epi16(sc16, x16));
                    _mm256_sub_epi32(_mm256_setzero_si256(), offset)
                }
                false => {
                    m[r] = _mm256_madd_epi16(mn16, x16);
                    _mm256_setzero_si256()
                }
            };
            for half in 0..2 {
                // This half's 8 scales in both lanes.
                let half_scales = match half {
                    0 => _mm256_permute2x128_si256::<0x00>(sc16, sc16),
                    _ => _mm256_permute2x128_si256::<0x11>(sc16, sc16),
                };
                let values = values_avx2::<Q3>(p, half);
                for (j, (q, &pick)) in values.into_iter().zip(&pick).enumerate() {
                    let x = _mm256_loadu_si256(xq.add(QK_K * b + 128 * half + 32 * j).cast());
                    let pairs = _mm256_maddubs_epi16(q, x);
                    let scales = _mm256_shuffle_epi8(half_scales, pick);
                    sum = _mm256_add_epi32(sum, _mm256_madd_epi16(pairs, scales));
                }
            }
            sum
        });
        let m = if Q3 { None } else { Some(hsum4_avx2(m)) };
        let d_x = act.d[t * nb + b];
        acc = block_steps(acc, hsum4_avx2(s), m, w, block_bytes, b, d_at(Q3), d_x);
    }
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// Values `64c..64c+64` of the block at `p` as unsigned bytes in natural order: the 32 bytes
/// of `qs` holding them in both halves, shifted by `2j` (lower half) and `2j + 2` (upper),
/// `j = 2 (c % 2)`; with `Q3`, hmask bits `2c` and `2c + 1` as bit 2.
///
/// # Safety
/// `p` points to a whole block.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn chunk<const Q3: bool>(p: *const u8, c: usize) -> __m512i {
    let (h, j) = (c / 2, 2 * (c % 2) as i16);
    let qs = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.add(qs_at(Q3) + 32 * h).cast()));
    let shift = _mm512_inserti64x4::<1>(
        _mm512_castsi256_si512(_mm256_set1_epi16(2 * j)),
        _mm256_set1_epi16(2 * j + 2),
    );
    let q = _mm512_and_si512(_mm512_srlv_epi16(qs, shift), _mm512_set1_epi8(3));
    if !Q3 {
        return q;
    }
    let hm = _mm512_broadcast_i64x4(_mm256_loadu_si256(p.cast()));
    third_bits(q, hm, halves8(1 << (2 * c), 1 << (2 * c + 1)))
}

/// Writes the unpacked block's scales, i16 pairs, `d` and `dmin` from the block at `p` (both
/// instruction sets' `unpack`).
///
/// # Safety
/// `p` points to a whole block, `o` to `U_BYTES` writable ones; AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store_scales<const Q3: bool>(p: *const u8, o: *mut u8) {
    let (sc, mn) = scales_mins::<Q3>(p);
    let lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(sc));
    let hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256::<1>(sc));
    _mm256_storeu_si256(o.add(U_SC).cast(), lo);
    _mm256_storeu_si256(o.add(U_SC + 32).cast(), hi);
    // Within i16: |sc| ≤ 32.
    let pairs = match Q3 {
        true => _mm256_sub_epi16(_mm256_setzero_si256(), _mm256_slli_epi16::<2>(sc)),
        false => mn,
    };
    _mm256_storeu_si256(o.add(U_MP).cast(), pairs);
    let d = o.add(U_D).cast::<f32>();
    d.write(f16_at(p.add(d_at(Q3))));
    if !Q3 {
        d.add(1).write(f16_at(p.add(d_at(Q3) + 2)));
    }
}

/// `Format::unpack` of Q2_K (`Q3` false) and Q3_K.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn unpack<const Q3: bool>(w: *const u8, nb: usize, out: *mut u8) {
    for b in 0..nb {
        let (p, o) = (w.add(b * block_bytes(Q3)), out.add(b * U_BYTES));
        for c in 0..4 {
            _mm512_storeu_si512(o.add(U_Q + 64 * c).cast(), chunk::<Q3>(p, c));
        }
        store_scales::<Q3>(p, o);
    }
}

/// `Format::unpack` of Q2_K and Q3_K on AVX2: the same bytes.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn unpack_avx2<const Q3: bool>(w: *const u8, nb: usize, out: *mut u8) {
    for b in 0..nb {
        let (p, o) = (w.add(b * block_bytes(Q3)), out.add(b * U_BYTES));
        for half in 0..2 {
            for (j, q) in values_avx2::<Q3>(p, half).into_iter().enumerate() {
                _mm256_storeu_si256(o.add(U_Q + 128 * half + 32 * j).cast(), q);
            }
        }
        store_scales::<Q3>(p, o);
    }
}

impl<const Q3: bool> RowKernel for LowBits<Q3> {
    const BLOCK: usize = QK_K;
    const BLOCK_BYTES: usize = block_bytes(Q3);
    const Q8K: bool = true;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn rows4(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
        rows4::<Q3>(w, nb, act, t)
    }
}

impl<const Q3: bool> Avx2Rows for LowBits<Q3> {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows4_avx2(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
        rows4_avx2::<Q3>(w, nb, act, t)
    }
}

impl<const Q3: bool> Format for LowBits<Q3> {
    /// Q2_K: the sums of 16 as i16 pairs `(X_2p, X_2p+1)`, for `M_b`; Q3_K: `−4 × (sum of
    /// 16)` per run, the accumulators' starting values.
    const N_EXTRA: usize = if Q3 { 16 } else { 8 };

    fn extra(sums: &[i16], j: usize) -> i32 {
        match Q3 {
            true => -4 * sums[8 + j] as i32,
            false => i16_pair(&sums[8 + 2 * j..]),
        }
    }

    fn unpacked_bytes(nb: usize) -> usize {
        nb * U_BYTES
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn unpack(w: *const u8, nb: usize, out: *mut u8) {
        unpack::<Q3>(w, nb, out)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile<const T: usize>(
        w: [*const u8; 4],
        nb: usize,
        act: &Groups,
        g: [usize; T],
    ) -> [[[f32; 16]; T]; 4] {
        match Q3 {
            true => tile_with_starts::<T, 16>(w, nb, act, g, LAYOUT),
            false => tile_with_mins::<T, 16, 8>(w, nb, act, g, LAYOUT, U_MP),
        }
    }
}

/// The AVX2 tiles of Q2_K and Q3_K: the AVX-512 ones' unpacked rows, whose `U_MP` pairs times
/// those of the sums of 16 (the groups' extras) are Q2_K's `M_b` or Q3_K's `−4 Σ_s sc_s X_s`.
/// Values at most 3 (Q2_K) or 7 (Q3_K): a sub-block's 4 steps summed in i16 (4 · 2 · 7 · 128).
impl<const Q3: bool> Format for Avx2<LowBits<Q3>> {
    const N_EXTRA: usize = 8;

    fn extra(sums: &[i16], p: usize) -> i32 {
        i16_pair(&sums[8 + 2 * p..])
    }

    fn unpacked_bytes(nb: usize) -> usize {
        nb * U_BYTES
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(w: *const u8, nb: usize, out: *mut u8) {
        unpack_avx2::<Q3>(w, nb, out)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const T: usize>(
        w: [*const u8; 4],
        nb: usize,
        act: &Groups,
        g: [usize; T],
    ) -> [[[f32; 16]; T]; 4] {
        match Q3 {
            true => tile_avx2::<T, 16, 7, false>(w, nb, act, g, LAYOUT, Pairs::Sum { at: U_MP }),
            false => tile_avx2::<T, 16, 3, false>(w, nb, act, g, LAYOUT, Pairs::Mins { at: U_MP }),
        }
    }
}
