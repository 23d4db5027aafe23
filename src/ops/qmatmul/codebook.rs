//! The codebook formats × Q8_K (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M; see
//! `ops::codebook`): each 32 values are 4 groups of 8 magnitudes with a sign mask each
//! (`Signed::groups`), in runs of `RUN` values with a scale `2 ls + 1`. The row kernels
//! multiply the magnitudes by the activations negated where the signs are (`maddubs`: no pair
//! exceeds 2 · 62 · 127; IQ1_M's values, never 0, sign the activations themselves, and IQ1_S
//! takes its δ from the activations' sums), then by the run scales (`madd`); the tiles read the blocks unpacked as values (unsigned `v + 128` for
//! the AVX-512 tiles, whose sums start at `−128 Σ x` per run; signed for the AVX2 ones),
//! scales as i32 and `d` with the format's factor. Every sum is exact and every float step
//! `fma(S_b, d_w · d_x, acc)`, as in `portable`: the same bits.

use core::arch::x86_64::*;
use std::marker::PhantomData;

use super::act::{Groups, Rows, Q8K_SUMS, QK_K};
use super::driver::{Avx2, Avx2Rows, Format, RowKernel};
use super::simd::{hsum4_avx2, tile_avx2, tile_with_starts, NextRows, Pairs, Unpacked};
use crate::ops::codebook::{self as cb, Iq1, NibbleScales, Quads, SevenSigns, SignBytes, Signed};
use crate::ops::portable;

/// The kernels of codebook format `F`.
pub(crate) struct Codebook<F>(PhantomData<F>);

/// One unpacked block: values as bytes, the run scales as i32 (8 or 16), `d` times the factor.
const U_SC: usize = 256;
const U_D: usize = 320;
const U_BYTES: usize = 384;
const LAYOUT: Unpacked = Unpacked {
    scales: U_SC,
    d: U_D,
    bytes: U_BYTES,
};

/// 4 u64 as a vector, the first in the low lane.
#[inline]
#[target_feature(enable = "avx2")]
fn vector(q: [u64; 4]) -> __m256i {
    _mm256_setr_epi64x(q[0] as i64, q[1] as i64, q[2] as i64, q[3] as i64)
}

/// A codebook format's values on AVX2.
pub(crate) trait Avx2Groups: Signed {
    /// Values `32c..32c + 32` of the block `w`: magnitudes and signs, as vectors (by default
    /// `Signed::groups`, moved into them: the signs as a mask).
    ///
    /// # Safety
    /// AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn groups(w: &[u8], c: usize) -> (__m256i, __m256i) {
        let (magnitudes, masks) = <Self as Signed>::groups(w, c);
        (vector(magnitudes), vector(masks))
    }

    /// Values `32c..32c + 32` of the block `w`, signed.
    ///
    /// # Safety
    /// AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values(w: &[u8], c: usize) -> __m256i {
        let (magnitudes, signs) = <Self as Avx2Groups>::groups(w, c);
        Self::signed(magnitudes, signs)
    }

    /// `v` negated where the values are negative, as the signs from `groups` say (by default
    /// a mask: 0xff there).
    ///
    /// # Safety
    /// AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn signed(v: __m256i, mask: __m256i) -> __m256i {
        _mm256_sub_epi8(_mm256_xor_si256(v, mask), mask)
    }

    /// The scales of the block's 16 runs of 16 as i16: the even runs in the low lane, the odd
    /// ones in the high, runs `2c` and `2c + 1` at u16 `c` (picked for values `32c..32c + 32`
    /// by one `pshufb`). By default from `scales`.
    ///
    /// # Safety
    /// AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn run_pairs(w: &[u8]) -> __m256i {
        let s = Self::scales(w).map(|s| s as i16);
        _mm256_setr_epi16(
            s[0], s[2], s[4], s[6], s[8], s[10], s[12], s[14], s[1], s[3], s[5], s[7], s[9], s[11],
            s[13], s[15],
        )
    }

    /// `S_b` of the block `w` against the Q8_K values at `x` (their sums at `sums`), in 8 i32
    /// lanes: the magnitudes times the activations signed as the values are (`maddubs`), then
    /// times the run scales (`madd`).
    ///
    /// # Safety
    /// AVX2; `x` is readable for 256 values, none −128 (Q8_K's lie in −127..=127), `sums` for
    /// `Q8K_SUMS`.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn block_sum(w: &[u8], x: *const i8, _sums: *const i16) -> __m256i {
        let (scales, run_pairs) = (Self::scales(w), Self::run_pairs(w));
        let mut acc = _mm256_setzero_si256();
        // With runs of 32, `scales[c]` is values `32c..32c + 32`'s.
        for (c, &scale) in scales[..QK_K / 32].iter().enumerate() {
            let x = _mm256_loadu_si256(x.add(32 * c).cast());
            let (magnitudes, signs) = <Self as Avx2Groups>::groups(w, c);
            let pairs = _mm256_maddubs_epi16(magnitudes, Self::signed(x, signs));
            let scale = match Self::RUN {
                32 => _mm256_set1_epi16(scale as i16),
                _ => _mm256_shuffle_epi8(run_pairs, _mm256_set1_epi16(0x0100 + 0x0202 * c as i16)),
            };
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, scale));
        }
        acc
    }
}

/// The signs of a `SevenSigns` format's values `32c..32c + 32`, made in the vector, as bytes
/// with the top bit set where the values are negative: each group's 7 bits spread over its
/// bytes and tested, the eighth their parity (the sum of the 0xff bytes is odd where their
/// count is).
#[inline]
#[target_feature(enable = "avx2")]
fn seven_signs<F: SevenSigns>(w: &[u8], c: usize) -> __m256i {
    let shifts = F::SHIFTS.map(i64::from);
    let bits = _mm256_srlv_epi64(
        _mm256_set1_epi64x(F::sign_bits(w, c) as i64),
        _mm256_setr_epi64x(shifts[0], shifts[1], shifts[2], shifts[3]),
    );
    // Byte 0 of each group's u64 to all 8 of its bytes.
    let spread = _mm256_shuffle_epi8(
        bits,
        _mm256_setr_epi64x(0, 0x0808_0808_0808_0808, 0, 0x0808_0808_0808_0808),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    let seven = _mm256_cmpeq_epi8(
        _mm256_and_si256(spread, _mm256_set1_epi64x(0x0040_2010_0804_0201)),
        bit,
    );
    let parity = _mm256_slli_epi64::<63>(_mm256_sad_epu8(seven, _mm256_setzero_si256()));
    _mm256_or_si256(seven, parity)
}

/// `v` negated where the top bits of `signs` are set (`sign` by `signs` made odd, so never 0;
/// measured faster than making them a mask).
#[inline]
#[target_feature(enable = "avx2")]
fn odd_signed(v: __m256i, signs: __m256i) -> __m256i {
    _mm256_sign_epi8(v, _mm256_or_si256(signs, _mm256_set1_epi8(1)))
}

/// The `SevenSigns` formats' groups: their entries (`magnitudes`), and `seven_signs`.
macro_rules! seven_signs_groups {
    ($($F:ty => $magnitudes:expr),*) => {$(
        impl Avx2Groups for $F {
            #[inline]
            #[target_feature(enable = "avx2")]
            unsafe fn groups(w: &[u8], c: usize) -> (__m256i, __m256i) {
                ($magnitudes(w, c), seven_signs::<Self>(w, c))
            }

            #[inline]
            #[target_feature(enable = "avx2")]
            unsafe fn signed(v: __m256i, signs: __m256i) -> __m256i {
                odd_signed(v, signs)
            }
        }
    )*};
}
seven_signs_groups!(
    cb::IQ2XXS => |w, c| vector(<cb::IQ2XXS as Signed>::groups(w, c).0),
    cb::IQ3XXS => quads::<cb::IQ3XXS>
);

/// `Avx2Groups::run_pairs` of a `NibbleScales` format: the low nibbles (even runs) and the
/// high ones (odd runs), widened.
#[inline]
#[target_feature(enable = "avx2")]
fn nibble_run_pairs<F: NibbleScales>(w: &[u8]) -> __m256i {
    let b = _mm_set1_epi64x(i64::from_le_bytes(*F::scale_bytes(w)));
    let low = _mm_and_si128(b, _mm_set1_epi8(0xf));
    let high = _mm_and_si128(_mm_srli_epi16::<4>(b), _mm_set1_epi8(0xf));
    let ls = _mm256_setr_m128i(_mm_cvtepu8_epi16(low), _mm_cvtepu8_epi16(high));
    _mm256_or_si256(_mm256_slli_epi16::<1>(ls), _mm256_set1_epi16(1))
}

/// IQ2_XS's sign bits share each group's u16 with its index: its masks come from the table.
impl Avx2Groups for cb::IQ2XS {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn run_pairs(w: &[u8]) -> __m256i {
        nibble_run_pairs::<Self>(w)
    }
}

/// The 8 grid entries of an IQ3 format's 32 values, inserted into the vector as they are
/// loaded (not paired in general registers first).
#[inline]
#[target_feature(enable = "avx2")]
fn quads<F: Quads>(w: &[u8], c: usize) -> __m256i {
    let q = F::quads(w, c).map(|q| q as i32);
    _mm256_setr_epi32(q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7])
}

/// The sign mask of the sign bytes of values `32c..32c + 32`, made in the vector: each byte
/// spread over its 8 values, then its bits tested.
#[inline]
#[target_feature(enable = "avx2")]
fn sign_mask<F: SignBytes>(w: &[u8], c: usize) -> __m256i {
    let bits = _mm256_set1_epi32(i32::from_le_bytes(*F::sign_bytes(w, c)));
    let spread = _mm256_setr_epi64x(
        0,
        0x0101_0101_0101_0101,
        0x0202_0202_0202_0202,
        0x0303_0303_0303_0303,
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(
        _mm256_and_si256(_mm256_shuffle_epi8(bits, spread), bit),
        bit,
    )
}

impl Avx2Groups for cb::IQ2S {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn groups(w: &[u8], c: usize) -> (__m256i, __m256i) {
        let (magnitudes, _) = <Self as Signed>::groups(w, c);
        (vector(magnitudes), sign_mask::<Self>(w, c))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn run_pairs(w: &[u8]) -> __m256i {
        nibble_run_pairs::<Self>(w)
    }
}

impl Avx2Groups for cb::IQ3S {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn groups(w: &[u8], c: usize) -> (__m256i, __m256i) {
        (quads::<Self>(w, c), sign_mask::<Self>(w, c))
    }
}

/// IQ1's values `8 g + δ` from the entries as stored (not per group of 8 in the general
/// registers).
#[inline]
#[target_feature(enable = "avx2")]
fn iq1_values<F: Iq1>(w: &[u8], c: usize) -> __m256i {
    let (mut entries, mut deltas) = ([0; 4], [0; 4]);
    for l in 0..4 {
        (entries[l], deltas[l]) = F::entry(w, c, l);
    }
    _mm256_add_epi8(vector(entries), vector(deltas))
}

/// The 16 bytes of `w` at `at`.
#[inline]
#[target_feature(enable = "avx2")]
fn bytes16(w: &[u8], at: usize) -> __m128i {
    let b: &[u8; 16] = w[at..at + 16].try_into().unwrap();
    // SAFETY: 16 readable bytes.
    unsafe { _mm_loadu_si128(b.as_ptr().cast()) }
}

/// The byte offsets into an IQ1 table of u64 (`IQ1S_GRID`, `IQ1_VALUES`; 8 × the index) of an
/// IQ1 block's 32 groups, as u16, 4 to a u64 (each 32 values' taken from the vector at once,
/// then apart by shifts, where a `pextrw` per offset measured slower): the index bytes
/// widened, and the bits under `mask` that `high` holds for each group (the high index bits
/// at 11..14, for IQ1_M δ's sign at 14 too).
#[inline]
#[target_feature(enable = "avx2")]
fn iq1_offsets<F: Iq1>(w: &[u8], high: [__m256i; 2], mask: i16) -> [u64; 8] {
    let mut out = [0u64; 8];
    for (h, high) in high.into_iter().enumerate() {
        let low = _mm256_slli_epi16::<3>(_mm256_cvtepu8_epi16(bytes16(w, F::QS + 16 * h)));
        let offsets = _mm256_or_si256(low, _mm256_and_si256(high, _mm256_set1_epi16(mask)));
        // SAFETY: 4 u64 in `out`.
        unsafe { _mm256_storeu_si256(out[4 * h..].as_mut_ptr().cast(), offsets) };
    }
    out
}

/// The entries of `grid` of groups `4c..4c + 4`, at the offsets in `offsets[c]`, as a vector.
///
/// # Safety
/// Every offset is a multiple of 8 below `8 · grid.len()`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn iq1_entries(grid: &[u64], offsets: &[u64; 8], c: usize) -> __m256i {
    let grid = grid.as_ptr().cast::<u8>();
    let o = offsets[c];
    let e = |l: usize| {
        grid.add((o >> (16 * l)) as u16 as usize)
            .cast::<i64>()
            .read()
    };
    _mm256_setr_epi64x(e(0), e(1), e(2), e(3))
}

/// The `pshufb` controls that repeat u16 `c` four times, for `c` in `0..4` and in `4..8`
/// (each lane holds all 8; the repeats of `c` land in lane `c / 2 % 2`).
static REPEAT_U16: [[i8; 32]; 2] = {
    let mut out = [[0i8; 32]; 2];
    let mut i = 0;
    while i < 64 {
        out[i / 32][i % 32] = 2 * (i / 8) as i8 + (i % 2) as i8;
        i += 1;
    }
    out
};

/// IQ1_S's block sum, `Σ_c s_c (Σ 8 g x + δ_c Σ x)`: the grid values sign the activations
/// (`8 g` is 0 or ±8) and `madd` takes `8 s_c`; δ, one per 32 values, multiplies the
/// activations' sums of 32.
///
/// # Safety
/// As `Avx2Groups::block_sum`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn iq1s_block_sum(w: &[u8], x: *const i8, sums: *const i16) -> __m256i {
    type F = cb::IQ1S;
    let qh = bytes16(w, F::QH);
    // Group 4c + l takes bits 3l..3l + 3 of qh[c] (u16): each qh[c] four times, shifted left
    // by 11 − 3l.
    let both = _mm256_broadcastsi128_si256(qh);
    let shift = _mm256_setr_epi16(
        2048, 256, 32, 4, 2048, 256, 32, 4, 2048, 256, 32, 4, 2048, 256, 32, 4,
    );
    let high = REPEAT_U16.map(|repeat| {
        let repeat = _mm256_loadu_si256(repeat.as_ptr().cast());
        _mm256_mullo_epi16(_mm256_shuffle_epi8(both, repeat), shift)
    });
    let offsets = iq1_offsets::<F>(w, high, 0x3800);
    let scales = _mm_or_si128(
        _mm_slli_epi16::<1>(_mm_and_si128(_mm_srli_epi16::<12>(qh), _mm_set1_epi16(7))),
        _mm_set1_epi16(1),
    );
    let negative = _mm_srai_epi16::<15>(qh);
    let deltas = _mm_madd_epi16(
        _mm_sub_epi16(_mm_xor_si128(scales, negative), negative),
        _mm_loadu_si128(sums.cast()),
    );
    let mut eights = [0i16; 8];
    _mm_storeu_si128(eights.as_mut_ptr().cast(), _mm_slli_epi16::<3>(scales));
    let mut acc = _mm256_setr_m128i(deltas, _mm_setzero_si128());
    for (c, &eight) in eights.iter().enumerate() {
        let x = _mm256_loadu_si256(x.add(32 * c).cast());
        let gx = _mm256_sign_epi8(x, iq1_entries(&cb::IQ1S_GRID, &offsets, c));
        let pairs = _mm256_maddubs_epi16(_mm256_set1_epi8(1), gx);
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(eight)));
    }
    acc
}

/// The `pshufb` controls that pick, for values `32c..32c + 32`, the u16 of runs `2c` (low
/// lane) and `2c + 1` (high lane) from the scales of `iq1m_block_sum`.
const RUN_WORD: [i16; 8] = {
    let (mut out, order) = ([0i16; 8], [0, 4, 1, 5, 2, 6, 3, 7]);
    let mut c = 0;
    while c < 8 {
        out[c] = ((2 * order[c] + 1) << 8) | (2 * order[c]);
        c += 1;
    }
    out
};

/// IQ1_M's block sum, `Σ_r s_r Σ (8 g + δ) x` over its runs of 16 (δ per 8 values): the
/// values, read whole from `IQ1_VALUES` (δ's sign picks the half: measured faster than
/// adding δ made in the vector), as magnitudes times the activations signed as they are
/// (`8 g + δ` is never 0).
///
/// # Safety
/// As `Avx2Groups::block_sum`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn iq1m_block_sum(w: &[u8], x: *const i8, _sums: *const i16) -> __m256i {
    type F = cb::IQ1M;
    // Group g takes nibble g of qh (3 high index bits, then δ's sign): each byte twice,
    // shifted left by 11 and by 7.
    let qh = bytes16(w, F::QH);
    let shift = _mm256_setr_epi16(
        2048, 128, 2048, 128, 2048, 128, 2048, 128, 2048, 128, 2048, 128, 2048, 128, 2048, 128,
    );
    let high = [_mm_unpacklo_epi8(qh, qh), _mm_unpackhi_epi8(qh, qh)]
        .map(|twice| _mm256_mullo_epi16(_mm256_cvtepu8_epi16(twice), shift));
    let offsets = iq1_offsets::<F>(w, high, 0x7800);
    // u16 j of the 4 at 48 holds the 3-bit `ls` of runs 4j..4j + 4. Shifted by 0 and 6 (low
    // lane) the u16 hold the even runs, by 3 and 9 (high lane) the odd ones, as `RUN_WORD`
    // reads them.
    let packed = _mm256_set1_epi64x(i64::from_le_bytes(w[48..56].try_into().unwrap()));
    let ls = _mm256_and_si256(
        _mm256_srlv_epi64(packed, _mm256_setr_epi64x(0, 6, 3, 9)),
        _mm256_set1_epi16(7),
    );
    let scales = _mm256_or_si256(_mm256_slli_epi16::<1>(ls), _mm256_set1_epi16(1));
    let mut acc = _mm256_setzero_si256();
    for (c, word) in RUN_WORD.into_iter().enumerate() {
        let v = iq1_entries(&cb::IQ1_VALUES, &offsets, c);
        let x = _mm256_loadu_si256(x.add(32 * c).cast());
        let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(v), _mm256_sign_epi8(x, v));
        let scale = _mm256_shuffle_epi8(scales, _mm256_set1_epi16(word));
        acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, scale));
    }
    acc
}

/// IQ1's values from the entries as stored, and its block sums.
macro_rules! iq1_groups {
    ($($F:ty => $block_sum:ident),*) => {$(
        impl Avx2Groups for $F {
            #[inline]
            #[target_feature(enable = "avx2")]
            unsafe fn values(w: &[u8], c: usize) -> __m256i {
                iq1_values::<Self>(w, c)
            }

            #[inline]
            #[target_feature(enable = "avx2")]
            unsafe fn block_sum(w: &[u8], x: *const i8, sums: *const i16) -> __m256i {
                $block_sum(w, x, sums)
            }
        }
    )*};
}
iq1_groups!(cb::IQ1S => iq1s_block_sum, cb::IQ1M => iq1m_block_sum);

/// 4 rows times token `t`: each block's exact sums, then `fma(S_b, d_w · d_x, acc)`.
///
/// # Safety
/// As `RowKernel::rows4`, on a CPU with AVX2, FMA and F16C.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn rows4<F: Avx2Groups>(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
    let xq = act.qs[t * act.k..].as_ptr();
    let sums = act.sums[t * nb * Q8K_SUMS..].as_ptr();
    let next = NextRows::new(nb * F::BYTES, 4, F::BYTES);
    let mut acc = _mm_setzero_ps();
    for b in 0..nb {
        let block = |r: usize| std::slice::from_raw_parts(w[r].add(b * F::BYTES), F::BYTES);
        let s: [__m256i; 4] = std::array::from_fn(|r| {
            next.fetch(w[0], r, b);
            F::block_sum(block(r), xq.add(QK_K * b), sums.add(Q8K_SUMS * b))
        });
        let d_w = _mm_setr_ps(
            F::d(block(0)),
            F::d(block(1)),
            F::d(block(2)),
            F::d(block(3)),
        );
        let d = _mm_mul_ps(d_w, _mm_set1_ps(act.d[t * nb + b]));
        acc = _mm_fmadd_ps(_mm_cvtepi32_ps(hsum4_avx2(s)), d, acc);
    }
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// Writes the unpacked blocks of the row `w`: values (plus `offset`), scales, `d`.
///
/// # Safety
/// AVX2; `w` points to `nb` whole blocks, `out` to `nb · U_BYTES` writable bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn unpack<F: Avx2Groups>(w: *const u8, nb: usize, out: *mut u8, offset: i8) {
    for b in 0..nb {
        let (w, o) = (
            std::slice::from_raw_parts(w.add(b * F::BYTES), F::BYTES),
            out.add(b * U_BYTES),
        );
        for c in 0..QK_K / 32 {
            let v = _mm256_add_epi8(<F as Avx2Groups>::values(w, c), _mm256_set1_epi8(offset));
            _mm256_storeu_si256(o.add(32 * c).cast(), v);
        }
        o.add(U_SC)
            .cast::<[i32; 16]>()
            .write_unaligned(F::scales(w));
        o.add(U_D).cast::<f32>().write(F::d(w));
    }
}

impl<F: Avx2Groups> RowKernel for Codebook<F> {
    const BLOCK: usize = QK_K;
    const BLOCK_BYTES: usize = <F as portable::Format>::BYTES;
    const Q8K: bool = true;

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn rows4(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
        rows4::<F>(w, nb, act, t)
    }
}

impl<F: Avx2Groups> Avx2Rows for Codebook<F> {
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows4_avx2(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
        rows4::<F>(w, nb, act, t)
    }
}

impl<F: Avx2Groups> Format for Codebook<F> {
    /// `−128 × (sum of the run)` per run: the accumulators' starting values.
    const N_EXTRA: usize = QK_K / F::RUN;

    fn extra(sums: &[i16], j: usize) -> i32 {
        // `Rows::sums`: the 8 sums of 32, then the 16 of 16.
        let at = if F::RUN == 32 { j } else { 8 + j };
        -128 * sums[at] as i32
    }

    fn unpacked_bytes(nb: usize) -> usize {
        nb * U_BYTES
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn unpack(w: *const u8, nb: usize, out: *mut u8) {
        // Values in −62..=62: unsigned `v + 128` for `vpdpbusd`.
        unpack::<F>(w, nb, out, -128)
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
    unsafe fn tile<const T: usize>(
        w: [*const u8; 4],
        nb: usize,
        act: &Groups,
        g: [usize; T],
    ) -> [[[f32; 16]; T]; 4] {
        match F::RUN {
            32 => tile_with_starts::<T, 8>(w, nb, act, g, LAYOUT),
            _ => tile_with_starts::<T, 16>(w, nb, act, g, LAYOUT),
        }
    }
}

/// The AVX2 tiles: values unpacked signed.
impl<F: Avx2Groups> Format for Avx2<Codebook<F>> {
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
        unpack::<F>(w, nb, out, 0)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const T: usize>(
        w: [*const u8; 4],
        nb: usize,
        act: &Groups,
        g: [usize; T],
    ) -> [[[f32; 16]; T]; 4] {
        match F::RUN {
            32 => tile_avx2::<T, 8, 127, true>(w, nb, act, g, LAYOUT, Pairs::None),
            _ => tile_avx2::<T, 16, 127, true>(w, nb, act, g, LAYOUT, Pairs::None),
        }
    }
}
