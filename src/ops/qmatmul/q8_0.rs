//! The 32-value formats × Q8_0: ggml's `block_q8_0` (34 bytes: `d` f16, 32 × i8),
//! `block_q4_0` (18 bytes: `d` f16, 16 bytes whose low nibbles are values 0..16 and high
//! nibbles values 16..32, each `q − 8`), `block_q5_0` (22 bytes: `d` f16, `qh` u32 whose
//! bit `i` is value `i`'s fifth bit, then Q4_0's nibbles; each `q − 16`), `block_iq4_nl`
//! (Q4_0's layout, each nibble an index into `iq4::KVALUES`), and `block_q4_1` / `block_q5_1`
//! (Q4_0's / Q5_0's with a min `m` (f16) after `d`: values `d·q + m`, `q` unsigned).
//! `vpdpbusd` wants one unsigned operand, so all are read as unsigned bytes `u = q + OFF`
//! (Q8_0: `q ^ 0x80`, OFF = 128; Q4_0: the nibble, OFF = 8; Q5_0: nibble and fifth bit,
//! OFF = 16; IQ4_NL: the nibble's value + 128, OFF = 128; Q4_1, Q5_1: OFF = 0), and against
//! Q8_0 activations `x` with block sums `X_b = Σ_i x_i`:
//!
//! ```text
//!     S_b = Σ_i u_i x_i − OFF X_b
//! ```
//!
//! The formats with a min add their second term after each block's first, as ggml's Q8_1
//! does, with `s_x` the block's sum times its unrounded scale, rounded to f16:
//! `y = fma(S_b, d_w·d_x, y); y = fma(m_w, s_x, y)`.

use core::arch::x86_64::*;

use super::act::{Groups, Rows, QK8_0};
use super::driver::{Avx2, Avx2Rows, Format, RowKernel};
use super::simd::{
    add_block, bcast4, f16_at, halves4, hsum4_avx2, iq4_signed_table_avx2, iq4_table, tile_values,
    NextRows,
};

pub(crate) struct Q8_0;
pub(crate) struct Q4_0;
pub(crate) struct Q5_0;
pub(crate) struct IQ4NL;
pub(crate) struct Q4_1;
pub(crate) struct Q5_1;

/// What distinguishes the 32-value formats.
pub(crate) trait Block32 {
    const BYTES: usize;
    const OFF: i32;
    /// Whether the block stores a min `m` (f16, after `d`).
    const MIN: bool = false;
    /// Whether the AVX-512 row kernel multiplies a row's two blocks in one 512-bit register
    /// (values that take a load, or a load and Q5's masked add of fifth bits) rather than in
    /// two 256-bit ones (4-bit nibbles: unpacked by `vpermw` across 512 bits they took longer,
    /// benches/README, thirty-first session).
    const WIDE_ROWS: bool = false;
    /// The block's 32 values as unsigned bytes `q + OFF`, in order (AVX2: both instruction
    /// sets' kernels read them).
    ///
    /// # Safety
    /// `p` points to a whole block; AVX2.
    unsafe fn values(p: *const u8) -> __m256i;

    /// The values of the two blocks at `p` as 64 unsigned bytes, in order, given `raw`, the
    /// two blocks' bytes when they fit in 64 (`pair_loads`).
    ///
    /// # Safety
    /// `p` points to two whole blocks; AVX-512 F/BW/VL.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn pair(p: *const u8, _raw: __m512i) -> __m512i {
        _mm512_inserti64x4::<1>(
            _mm512_castsi256_si512(Self::values(p)),
            Self::values(p.add(Self::BYTES)),
        )
    }

    /// The values of the two blocks at `p` as unsigned bytes, halves together: values
    /// `0..16` of both blocks, then values `16..32` of both.
    ///
    /// # Safety
    /// `p` points to two whole blocks; AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn pair_avx2(p: *const u8) -> [__m256i; 2] {
        let (a, b) = (Self::values(p), Self::values(p.add(Self::BYTES)));
        [
            _mm256_permute2x128_si256::<0x20>(a, b),
            _mm256_permute2x128_si256::<0x31>(a, b),
        ]
    }

    /// `pair_avx2`'s values less `OFF`, as signed bytes (the AVX2 row kernel's operands when
    /// `OFF` is 128).
    ///
    /// # Safety
    /// `p` points to two whole blocks; AVX2.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn signed_pair_avx2(p: *const u8) -> [__m256i; 2] {
        let off = _mm256_set1_epi8(Self::OFF as i8);
        Self::pair_avx2(p).map(|u| _mm256_sub_epi8(u, off))
    }
}

/// `pair_avx2` of the nibbles at byte `at` of two blocks of `bytes` at `p`.
///
/// # Safety
/// `p` points to two whole blocks; AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibble_pair_avx2(p: *const u8, at: usize, bytes: usize) -> [__m256i; 2] {
    let q = _mm256_loadu2_m128i(p.add(bytes + at).cast(), p.add(at).cast());
    let m4 = _mm256_set1_epi8(0x0f);
    [
        _mm256_and_si256(q, m4),
        _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4),
    ]
}

/// Whether the AVX-512 row kernel reads two blocks of `B` with one 64-byte load.
const fn pair_loads<B: Block32>() -> bool {
    2 * B::BYTES <= 64
}

/// The nibbles at byte `at` of two blocks of `bytes` in `raw` (as `pair_loads` reads them) as
/// 64 bytes, low nibbles first in each block: `vpermw` puts each block's 16 bytes in two
/// 128-bit lanes (`at` and `bytes` are even), the second shifted down by a nibble.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn nibble_pair(raw: __m512i, at: usize, bytes: usize) -> __m512i {
    let idx: [i16; 32] = std::array::from_fn(|i| ((i / 16) * bytes / 2 + at / 2 + i % 8) as i16);
    // SAFETY: 64 bytes from a 64-byte array.
    let idx = unsafe { _mm512_loadu_si512(idx.as_ptr().cast()) };
    let both = _mm512_permutexvar_epi16(idx, raw);
    let shifted = _mm512_srlv_epi64(both, _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
    _mm512_and_si512(shifted, _mm512_set1_epi8(0x0f))
}

/// Two Q5 blocks' values (`nibble_pair`'s nibbles) with their fifth bits added, one mask bit
/// per value: the u32 `qh` at byte `qh` of each block (of `bytes`) at `p`.
///
/// # Safety
/// `p` points to two whole blocks; AVX-512 F/BW/VL.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn with_fifth_bits(nibbles: __m512i, p: *const u8, qh: usize, bytes: usize) -> __m512i {
    let bits = |b: usize| u64::from(p.add(b * bytes + qh).cast::<u32>().read_unaligned());
    _mm512_mask_add_epi8(
        nibbles,
        bits(0) | bits(1) << 32,
        nibbles,
        _mm512_set1_epi8(0x10),
    )
}

impl Block32 for Q8_0 {
    const BYTES: usize = 34;
    const OFF: i32 = 128;
    const WIDE_ROWS: bool = true;

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values(p: *const u8) -> __m256i {
        _mm256_xor_si256(_mm256_loadu_si256(p.add(2).cast()), _mm256_set1_epi8(-128))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn signed_pair_avx2(p: *const u8) -> [__m256i; 2] {
        let qs = |b: usize| p.add(b * Self::BYTES + 2).cast::<__m128i>();
        [
            _mm256_loadu2_m128i(qs(1), qs(0)),
            _mm256_loadu2_m128i(qs(1).add(1), qs(0).add(1)),
        ]
    }
}

/// The 32 nibbles of 16 bytes at `qs`, low nibbles first, as bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles(qs: *const u8) -> __m256i {
    let q = _mm_loadu_si128(qs.cast());
    let both = _mm256_set_m128i(_mm_srli_epi16::<4>(q), q);
    _mm256_and_si256(both, _mm256_set1_epi8(0x0f))
}

/// `0x10` in byte `i` where bit `i` of the u32 at `p` is set (Q5's fifth bits), else 0.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn fifth_bits(p: *const u8) -> __m256i {
    let bits = _mm256_set1_epi32(p.cast::<i32>().read_unaligned());
    // Byte i holds byte i / 8 of the bits; every bit but bit i % 8 is then set, so the byte
    // is all ones exactly when bit i is.
    let spread = _mm256_shuffle_epi8(
        bits,
        _mm256_set_epi64x(
            0x0303030303030303,
            0x0202020202020202,
            0x0101010101010101,
            0,
        ),
    );
    let others = _mm256_set1_epi64x(0x7fbf_dfef_f7fb_fdfe);
    let set = _mm256_cmpeq_epi8(_mm256_or_si256(spread, others), _mm256_set1_epi8(-1));
    _mm256_and_si256(set, _mm256_set1_epi8(0x10))
}

impl Block32 for Q4_0 {
    const BYTES: usize = 18;
    const OFF: i32 = 8;

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values(p: *const u8) -> __m256i {
        nibbles(p.add(2))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn pair_avx2(p: *const u8) -> [__m256i; 2] {
        nibble_pair_avx2(p, 2, Self::BYTES)
    }
}

impl Block32 for Q5_0 {
    const BYTES: usize = 22;
    const OFF: i32 = 16;
    const WIDE_ROWS: bool = true;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn pair(p: *const u8, raw: __m512i) -> __m512i {
        with_fifth_bits(nibble_pair(raw, 6, Self::BYTES), p, 2, Self::BYTES)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values(p: *const u8) -> __m256i {
        _mm256_or_si256(nibbles(p.add(6)), fifth_bits(p.add(2)))
    }
}

impl Block32 for IQ4NL {
    const BYTES: usize = 18;
    const OFF: i32 = 128;

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values(p: *const u8) -> __m256i {
        _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(iq4_table()), nibbles(p.add(2)))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn pair_avx2(p: *const u8) -> [__m256i; 2] {
        let table = _mm256_broadcastsi128_si256(iq4_table());
        nibble_pair_avx2(p, 2, Self::BYTES).map(|n| _mm256_shuffle_epi8(table, n))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn signed_pair_avx2(p: *const u8) -> [__m256i; 2] {
        let table = iq4_signed_table_avx2();
        nibble_pair_avx2(p, 2, Self::BYTES).map(|n| _mm256_shuffle_epi8(table, n))
    }
}

impl Block32 for Q4_1 {
    const BYTES: usize = 20;
    const OFF: i32 = 0;
    const MIN: bool = true;

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values(p: *const u8) -> __m256i {
        nibbles(p.add(4))
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn pair_avx2(p: *const u8) -> [__m256i; 2] {
        nibble_pair_avx2(p, 4, Self::BYTES)
    }
}

impl Block32 for Q5_1 {
    const BYTES: usize = 24;
    const OFF: i32 = 0;
    const MIN: bool = true;
    const WIDE_ROWS: bool = true;

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn pair(p: *const u8, raw: __m512i) -> __m512i {
        with_fifth_bits(nibble_pair(raw, 8, Self::BYTES), p, 4, Self::BYTES)
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn values(p: *const u8) -> __m256i {
        _mm256_or_si256(nibbles(p.add(8)), fifth_bits(p.add(4)))
    }
}

/// Sums of dwords 0..8 and 8..16 of each vector: `[Σ lo(z[r])]` then `[Σ hi(z[r])]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
fn hsum4x2(z: [__m512i; 4]) -> __m256i {
    let pair = |a, b| {
        _mm512_add_epi32(
            _mm512_shuffle_i64x2::<0b10_00_10_00>(a, b),
            _mm512_shuffle_i64x2::<0b11_01_11_01>(a, b),
        )
    };
    let lanes = |u| {
        let v = _mm512_add_epi32(u, _mm512_shuffle_epi32::<0b01_00_11_10>(u));
        _mm512_add_epi32(v, _mm512_shuffle_epi32::<0b10_11_00_01>(v))
    };
    // [lo z0, hi z0, lo z1, hi z1] and the same for z2, z3, one sum per 128-bit lane.
    let (p, q) = (lanes(pair(z[0], z[1])), lanes(pair(z[2], z[3])));
    let idx = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 28, 20, 12, 4, 24, 16, 8, 0);
    _mm512_castsi512_si256(_mm512_permutex2var_epi32(p, idx, q))
}

/// Block `b`'s float steps on 4 rows `w` and token `t`, its exact sums `s` in hand (see the
/// module comment): the same on every instruction set.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn steps<B: Block32>(
    acc: __m128,
    s: __m128i,
    w: [*const u8; 4],
    b: usize,
    act: &Rows,
    t: usize,
) -> __m128 {
    // The f16 at `at` in block `b` of the 4 rows (d at 0, m at 2).
    let halves = |at: usize| halves4(w, B::BYTES, b, at);
    let i = t * act.k / QK8_0 + b;
    let dx = _mm_set1_ps(act.d[i]);
    let acc = _mm_fmadd_ps(_mm_cvtepi32_ps(s), _mm_mul_ps(halves(0), dx), acc);
    match B::MIN {
        true => _mm_fmadd_ps(halves(2), _mm_set1_ps(act.s[i]), acc),
        false => acc,
    }
}

/// The scales `d` (and with a min, the mins `m`) of blocks `b` and `b + 1` of 4 rows, widened:
/// block `b`'s rows, then block `b + 1`'s. Permuted out of `first`, the first 32 bytes of
/// each row's two blocks, where both blocks' headers lie in them; else read from memory.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,f16c")]
unsafe fn scales4x2<B: Block32>(
    w: [*const u8; 4],
    b: usize,
    first: [__m256i; 4],
) -> (__m256, Option<__m256>) {
    if B::BYTES + 4 > 32 {
        let m = B::MIN.then(|| halves4x2::<B>(w, b, 2));
        return (halves4x2::<B>(w, b, 0), m);
    }
    // Word j: group j / 4 (d of b, d of b + 1, m of b, m of b + 1) of row 0 (even j) or row 1;
    // rows 2 and 3 blended in the same way.
    let words: [i16; 16] = std::array::from_fn(|j| {
        let group = j / 4;
        let word = (group % 2) * B::BYTES / 2 + group / 2;
        (word + 16 * (j % 2)) as i16
    });
    let idx = _mm256_loadu_si256(words.as_ptr().cast());
    let r01 = _mm256_permutex2var_epi16(first[0], idx, first[1]);
    let r23 = _mm256_permutex2var_epi16(first[2], idx, first[3]);
    let both = _mm256_mask_blend_epi16(0b1100_1100_1100_1100, r01, r23);
    let m = B::MIN.then(|| _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(both)));
    (_mm256_cvtph_ps(_mm256_castsi256_si128(both)), m)
}

/// The f16 at byte `at` of blocks `b` and `b + 1` of 4 rows, widened: block `b`'s rows, then
/// block `b + 1`'s.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn halves4x2<B: Block32>(w: [*const u8; 4], b: usize, at: usize) -> __m256 {
    let h = |r: usize, b: usize| w[r].add(b * B::BYTES + at).cast::<i16>().read_unaligned();
    _mm256_cvtph_ps(_mm_setr_epi16(
        h(0, b),
        h(1, b),
        h(2, b),
        h(3, b),
        h(0, b + 1),
        h(1, b + 1),
        h(2, b + 1),
        h(3, b + 1),
    ))
}

/// `steps` of blocks `b` and `b + 1` from their exact sums `s` (block `b`'s rows, then
/// `b + 1`'s), the rows' scales `d` and mins `m` (as `halves4x2` gives them), and the
/// activations' scales and sums from `xd[b]` and `xs[b]`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn steps2<B: Block32>(
    acc: __m128,
    s: __m256i,
    d: __m256,
    m: Option<__m256>,
    xd: *const f32,
    xs: *const f32,
    b: usize,
) -> __m128 {
    let s = _mm256_cvtepi32_ps(s);
    let d = _mm256_mul_ps(d, bcast4x2(xd.add(b)));
    let (m, sx) = match m {
        Some(m) => (m, bcast4x2(xs.add(b))),
        None => (_mm256_setzero_ps(), _mm256_setzero_ps()),
    };
    let mut acc = acc;
    for (s, d, m, sx) in [
        (
            _mm256_castps256_ps128(s),
            _mm256_castps256_ps128(d),
            _mm256_castps256_ps128(m),
            _mm256_castps256_ps128(sx),
        ),
        (
            _mm256_extractf128_ps::<1>(s),
            _mm256_extractf128_ps::<1>(d),
            _mm256_extractf128_ps::<1>(m),
            _mm256_extractf128_ps::<1>(sx),
        ),
    ] {
        acc = _mm_fmadd_ps(s, d, acc);
        if B::MIN {
            acc = _mm_fmadd_ps(m, sx, acc);
        }
    }
    acc
}

/// `[v[0]; 4]` then `[v[1]; 4]`.
///
/// # Safety
/// `v` is readable for 2 floats; AVX2.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bcast4x2(v: *const f32) -> __m256 {
    let pair = _mm_castpd_ps(_mm_load_sd(v.cast()));
    _mm256_permutevar8x32_ps(
        _mm256_castps128_ps256(pair),
        _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
    )
}

/// `rows4` of a 32-value format in 512-bit registers (`WIDE_ROWS`): two blocks per product, one
/// at the end if odd. The products start from `−OFF X_b`, so that they end exact.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn rows4_wide<B: Block32>(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
    let xq = act.qs[t * act.k..].as_ptr();
    let i0 = t * act.k / QK8_0;
    let (xsums, xd, xs) = (
        act.sums[i0..].as_ptr(),
        act.d[i0..].as_ptr(),
        act.s[i0..].as_ptr(),
    );
    let next = NextRows::new(nb * B::BYTES, 4, 2 * B::BYTES);
    let pair_mask = u64::MAX >> 64usize.saturating_sub(2 * B::BYTES);
    // Dword 0 from lane 0, dword 8 from lane 1: the starts of the two blocks' products.
    let to_starts = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0);
    let mut acc = _mm_setzero_ps();
    let mut b = 0;
    while b + 2 <= nb {
        let x = _mm512_loadu_si512(xq.add(QK8_0 * b).cast());
        let sums = _mm_cvtepi16_epi32(_mm_cvtsi32_si128(
            xsums.add(b).cast::<i32>().read_unaligned(),
        ));
        let offs = _mm_mullo_epi32(sums, _mm_set1_epi32(-B::OFF));
        let start = _mm512_maskz_permutexvar_epi32(0x0101, to_starts, _mm512_castsi128_si512(offs));
        let p: [*const u8; 4] = std::array::from_fn(|r| w[r].add(b * B::BYTES));
        // Whole 64-byte loads while they stay inside the rows (masked ones cost more), masked
        // ones for a row's last pairs.
        let inside = (b * B::BYTES + 64) <= nb * B::BYTES;
        let raw: [__m512i; 4] = std::array::from_fn(|r| match (pair_loads::<B>(), inside) {
            (true, true) => _mm512_loadu_si512(p[r].cast()),
            (true, false) => _mm512_maskz_loadu_epi8(pair_mask, p[r].cast()),
            (false, _) => _mm512_setzero_si512(),
        });
        let z: [__m512i; 4] = std::array::from_fn(|r| {
            next.fetch(w[0], r, b / 2);
            _mm512_dpbusd_epi32(start, B::pair(p[r], raw[r]), x)
        });
        let (d, m) = scales4x2::<B>(w, b, raw.map(|r| _mm512_castsi512_si256(r)));
        acc = steps2::<B>(acc, hsum4x2(z), d, m, xd, xs, b);
        b += 2;
    }
    if b < nb {
        let x = _mm256_loadu_si256(xq.add(QK8_0 * b).cast());
        let z: [__m512i; 4] = std::array::from_fn(|r| {
            let u = B::values(w[r].add(b * B::BYTES));
            _mm512_zextsi256_si512(_mm256_dpbusd_epi32(_mm256_setzero_si256(), u, x))
        });
        let exact = _mm_sub_epi32(
            super::simd::hsum4(z),
            _mm_set1_epi32(B::OFF * xsums.add(b).read() as i32),
        );
        acc = steps::<B>(acc, exact, w, b, act, t);
    }
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), acc);
    out
}

/// Where the scales start in an unpacked row of `nb` blocks (values first, 32 bytes each).
fn scales_at(nb: usize) -> usize {
    (nb * QK8_0).next_multiple_of(64)
}

/// Bytes of an unpacked row of `nb` blocks.
fn unpacked_bytes<B: Block32>(nb: usize) -> usize {
    let n_scales = if B::MIN { 2 * nb } else { nb };
    scales_at(nb) + (4 * n_scales).next_multiple_of(64)
}

/// An unpacked row: values, then the scales `d` as f32, then (with a min) the mins.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn unpack<B: Block32>(w: *const u8, nb: usize, out: *mut u8) {
    let d = out.add(scales_at(nb)).cast::<f32>();
    for b in 0..nb {
        let p = w.add(b * B::BYTES);
        _mm256_storeu_si256(out.add(QK8_0 * b).cast(), B::values(p));
        d.add(b).write(f16_at(p));
        if B::MIN {
            d.add(nb + b).write(f16_at(p.add(2)));
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
unsafe fn tile<B: Block32, const T: usize>(
    w: [*const u8; 4],
    nb: usize,
    act: &Groups,
    g: [usize; T],
) -> [[[f32; 16]; T]; 4] {
    let k = nb * QK8_0;
    let xq: [*const i8; T] = std::array::from_fn(|i| act.qs[g[i] * 16 * k..].as_ptr());
    let dw: [*const f32; 4] = std::array::from_fn(|r| w[r].add(scales_at(nb)).cast());
    let mut f = [[_mm512_setzero_ps(); T]; 4];
    for b in 0..nb {
        let start: [__m512i; T] = std::array::from_fn(|i| {
            _mm512_loadu_si512(act.extra[(g[i] * nb + b) * 16..].as_ptr().cast())
        });
        let mut s = [start; 4];
        for j in 0..8 {
            let k4 = 8 * b + j;
            let x: [__m512i; T] =
                std::array::from_fn(|i| _mm512_loadu_si512(xq[i].add(k4 * 64).cast()));
            for r in 0..4 {
                let q = bcast4(w[r].add(4 * k4));
                for i in 0..T {
                    s[r][i] = _mm512_dpbusd_epi32(s[r][i], q, x[i]);
                }
            }
        }
        let d_w = std::array::from_fn(|r| dw[r].add(b).read());
        add_block(&mut f, &s, d_w, act, g, nb, b);
        if B::MIN {
            for i in 0..T {
                let sx = _mm512_loadu_ps(act.s[(g[i] * nb + b) * 16..].as_ptr());
                for r in 0..4 {
                    let m = _mm512_set1_ps(dw[r].add(nb + b).read());
                    f[r][i] = _mm512_fmadd_ps(m, sx, f[r][i]);
                }
            }
        }
    }
    tile_values(f)
}

/// One 16-token group of an AVX2 tile: 4 unpacked rows times group `g` of `act`, each token's
/// block steps as the row kernels take them. Signed values (Q8_0, IQ4_NL) use the sign
/// trick; small unsigned ones start from the groups' `−OFF X_b`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn tile_group_avx2<B: Block32>(
    w: [*const u8; 4],
    nb: usize,
    act: &Groups,
    g: usize,
) -> [[f32; 16]; 4] {
    let k = nb * QK8_0;
    let xq = act.qs[g * 16 * k..].as_ptr();
    let dw: [*const f32; 4] = std::array::from_fn(|r| w[r].add(scales_at(nb)).cast());
    let signed = B::OFF >= 128;
    let (off, ones) = (_mm256_set1_epi8(B::OFF as i8), _mm256_set1_epi16(1));
    let mut f = [[_mm256_setzero_ps(); 2]; 4];
    for b in 0..nb {
        let blk = (g * nb + b) * 16;
        let start: [__m256i; 2] = match signed {
            true => [_mm256_setzero_si256(); 2],
            false => std::array::from_fn(|h| {
                _mm256_loadu_si256(act.extra[blk + 8 * h..].as_ptr().cast())
            }),
        };
        let mut s = [start; 4];
        for j in 0..8 {
            let k4 = 8 * b + j;
            let x: [__m256i; 2] =
                std::array::from_fn(|h| _mm256_loadu_si256(xq.add(k4 * 64 + 32 * h).cast()));
            for r in 0..4 {
                let u = _mm256_set1_epi32(w[r].add(4 * k4).cast::<i32>().read_unaligned());
                for h in 0..2 {
                    let pairs = match signed {
                        true => {
                            let q = _mm256_sub_epi8(u, off);
                            _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x[h], q))
                        }
                        false => _mm256_maddubs_epi16(u, x[h]),
                    };
                    s[r][h] = _mm256_add_epi32(s[r][h], _mm256_madd_epi16(pairs, ones));
                }
            }
        }
        for h in 0..2 {
            let dx = _mm256_loadu_ps(act.d[blk + 8 * h..].as_ptr());
            let sx = _mm256_loadu_ps(act.s[blk + 8 * h..].as_ptr());
            for r in 0..4 {
                let d = _mm256_mul_ps(_mm256_set1_ps(dw[r].add(b).read()), dx);
                f[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r][h]), d, f[r][h]);
                if B::MIN {
                    let m = _mm256_set1_ps(dw[r].add(nb + b).read());
                    f[r][h] = _mm256_fmadd_ps(m, sx, f[r][h]);
                }
            }
        }
    }
    let mut out = [[0f32; 16]; 4];
    for r in 0..4 {
        _mm256_storeu_ps(out[r].as_mut_ptr(), f[r][0]);
        _mm256_storeu_ps(out[r][8..].as_mut_ptr(), f[r][1]);
    }
    out
}

/// The AVX2 tiles of the 32-value formats: the AVX-512 ones' unpacked rows, one group at a
/// time (16 ymm registers hold one group's accumulators).
impl<B: Block32 + Avx2Rows> Format for Avx2<B> {
    const N_EXTRA: usize = 1;

    fn extra(sums: &[i16], _: usize) -> i32 {
        match B::OFF >= 128 {
            true => 0,
            false => -B::OFF * sums[0] as i32,
        }
    }

    fn unpacked_bytes(nb: usize) -> usize {
        unpacked_bytes::<B>(nb)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn unpack(w: *const u8, nb: usize, out: *mut u8) {
        unpack::<B>(w, nb, out)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<const T: usize>(
        w: [*const u8; 4],
        nb: usize,
        act: &Groups,
        g: [usize; T],
    ) -> [[[f32; 16]; T]; 4] {
        let groups = g.map(|g| tile_group_avx2::<B>(w, nb, act, g));
        std::array::from_fn(|r| std::array::from_fn(|i| groups[i][r]))
    }
}

macro_rules! format_32 {
    ($t:ty) => {
        impl RowKernel for $t {
            const BLOCK: usize = QK8_0;
            const BLOCK_BYTES: usize = <$t as Block32>::BYTES;
            const Q8K: bool = false;

            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")]
            unsafe fn rows4(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
                match <$t as Block32>::WIDE_ROWS {
                    true => rows4_wide::<$t>(w, nb, act, t),
                    false => rows4_256::<$t, true>(w, nb, act, t),
                }
            }
        }

        impl Avx2Rows for $t {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn rows4_avx2(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
                rows4_256::<$t, false>(w, nb, act, t)
            }
        }

        impl Format for $t {
            /// `−OFF × (sum of the block)`: the accumulators' starting values.
            const N_EXTRA: usize = 1;

            fn extra(sums: &[i16], _: usize) -> i32 {
                -<$t as Block32>::OFF * sums[0] as i32
            }

            fn unpacked_bytes(nb: usize) -> usize {
                unpacked_bytes::<$t>(nb)
            }

            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
            unsafe fn unpack(w: *const u8, nb: usize, out: *mut u8) {
                unpack::<$t>(w, nb, out)
            }

            #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
            unsafe fn tile<const T: usize>(
                w: [*const u8; 4],
                nb: usize,
                act: &Groups,
                g: [usize; T],
            ) -> [[[f32; 16]; T]; 4] {
                tile::<$t, T>(w, nb, act, g)
            }
        }
    };
}
format_32!(Q8_0);
format_32!(Q4_0);
format_32!(Q5_0);
format_32!(IQ4NL);
format_32!(Q4_1);
format_32!(Q5_1);

/// `rows4` of a 32-value format in 256-bit registers, two blocks at a time: on AVX2, or (`VL`)
/// with AVX-512's `vpdpbusd`, byte masks and word permutes on 256-bit registers. `vpdpbusd`
/// multiplies the unsigned values by the activations, less `OFF X_b` after. Without it, small
/// unsigned values (up to 31) multiply the activations with `vpmaddubsw` directly, less `OFF
/// X_b` after; Q8_0's and IQ4_NL's are made signed (`q = u − OFF`) and multiplied as ggml's
/// AVX2 code does, `|q|` times `x` with `q`'s sign. Either way pairs of products stay within
/// i16 (2 · 128 · 127; two small ones' pairs added: 4 · 31 · 127), the sums are exact, and the
/// float steps, shared with every level, give the same bits.
///
/// # Safety
/// As `RowKernel::rows4`, the caller (into which this is inlined) having AVX2, FMA and F16C,
/// and with `VL` AVX-512 F, BW, VL and VNNI.
#[inline(always)]
unsafe fn rows4_256<B: Block32, const VL: bool>(
    w: [*const u8; 4],
    nb: usize,
    act: &Rows,
    t: usize,
) -> [f32; 4] {
    let xq = act.qs[t * act.k..].as_ptr();
    let i0 = t * act.k / QK8_0;
    let (xsums, xd, xs) = (
        act.sums[i0..].as_ptr(),
        act.d[i0..].as_ptr(),
        act.s[i0..].as_ptr(),
    );
    let (off, ones, zero) = (
        _mm256_set1_epi8(B::OFF as i8),
        _mm256_set1_epi16(1),
        _mm256_setzero_si256(),
    );
    let small = B::OFF < 128;
    // Whether the sums hold `OFF X_b`, to take away.
    let less_off = VL || small;
    // `q · x` for signed `q`, summed in i32 pairs, exact.
    let signed_dot = |q: __m256i, x: __m256i| {
        _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(x, q)),
            ones,
        )
    };
    // One block's values `u` times `x`, in i32 partial sums.
    let block_dot = |u: __m256i, x: __m256i| match (VL, small) {
        (true, _) => _mm256_dpbusd_epi32(zero, u, x),
        (false, true) => _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), ones),
        (false, false) => signed_dot(_mm256_sub_epi8(u, off), x),
    };
    let next = NextRows::new(nb * B::BYTES, 4, 2 * B::BYTES);
    let mut acc = _mm_setzero_ps();
    let mut b = 0;
    while b + 2 <= nb {
        let x: [__m256i; 2] =
            std::array::from_fn(|i| _mm256_loadu_si256(xq.add(QK8_0 * (b + i)).cast()));
        let x = [
            _mm256_permute2x128_si256::<0x20>(x[0], x[1]),
            _mm256_permute2x128_si256::<0x31>(x[0], x[1]),
        ];
        // Block b's partial sums in the low lane, block b + 1's in the high one.
        let z: [__m256i; 4] = std::array::from_fn(|r| {
            next.fetch(w[0], r, b / 2);
            let p = w[r].add(b * B::BYTES);
            match (VL, small) {
                (true, _) => {
                    let u = B::pair_avx2(p);
                    _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(zero, u[0], x[0]), u[1], x[1])
                }
                (false, true) => {
                    let u = B::pair_avx2(p);
                    let (lo, hi) = (
                        _mm256_maddubs_epi16(u[0], x[0]),
                        _mm256_maddubs_epi16(u[1], x[1]),
                    );
                    _mm256_madd_epi16(_mm256_add_epi16(lo, hi), ones)
                }
                (false, false) => {
                    let q = B::signed_pair_avx2(p);
                    _mm256_add_epi32(signed_dot(q[0], x[0]), signed_dot(q[1], x[1]))
                }
            }
        });
        // Block b's 4 rows, then block b + 1's.
        let s = _mm256_hadd_epi32(_mm256_hadd_epi32(z[0], z[1]), _mm256_hadd_epi32(z[2], z[3]));
        let s = match less_off {
            true => {
                let sums = _mm_cvtepi16_epi32(_mm_cvtsi32_si128(
                    xsums.add(b).cast::<i32>().read_unaligned(),
                ));
                let sums = _mm256_permutevar8x32_epi32(
                    _mm256_castsi128_si256(sums),
                    _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
                );
                _mm256_sub_epi32(s, _mm256_mullo_epi32(sums, _mm256_set1_epi32(B::OFF)))
            }
            false => s,
        };
        let (d, m) = match VL {
            true => {
                let first = w.map(|r| _mm256_loadu_si256(r.add(b * B::BYTES).cast()));
                scales4x2::<B>(w, b, first)
            }
            false => (
                halves4x2::<B>(w, b, 0),
                B::MIN.then(|| halves4x2::<B>(w, b, 2)),
            ),
        };
        acc = steps2::<B>(acc, s, d, m, xd, xs, b);
        b += 2;
    }
    if b < nb {
        let x = _mm256_loadu_si256(xq.add(QK8_0 * b).cast());
        let z: [__m256i; 4] =
            std::array::from_fn(|r| block_dot(B::values(w[r].add(b * B::BYTES)), x));
        let s = match less_off {
            true => _mm_sub_epi32(
                hsum4_avx2(z),
                _mm_set1_epi32(B::OFF * xsums.add(b).read() as i32),
            ),
            false => hsum4_avx2(z),
        };
        acc = steps::<B>(acc, s, w, b, act, t);
    }
    let mut out = [0f32; 4];
    _mm_storeu_ps(out.as_mut_ptr(), acc);
    out
}
