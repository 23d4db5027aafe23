//! ggml's codebook formats, which candle does not read: blocks of 256 values whose groups of
//! 8 (or 4) are entries of a fixed grid, with signs and a scale per run of 32 (or 16) values.
//! A value is `d · FACTOR · scale · v`, `v` the signed grid value:
//!
//! | type | bytes | grid | scale | FACTOR |
//! |---|---|---|---|---|
//! | IQ2_XXS | 66: `d`, per 32 values a u32 of 4 grid indices, a u32 of 4 × 7 sign bits and 4 bits `ls` | 256 × 8 | `2 ls + 1` per 32 | 1/8 |
//! | IQ2_XS | 74: `d`, per 8 values a u16 (9-bit index, 7 sign bits), 8 bytes of 4-bit `ls` | 512 × 8 | `2 ls + 1` per 16 | 1/8 |
//! | IQ2_S | 82: `d`, 32 index bytes, 32 sign bytes, 8 bytes of 2 high index bits each, 8 bytes of `ls` | 1024 × 8 | `2 ls + 1` per 16 | 1/8 |
//! | IQ3_XXS | 98: `d`, 64 index bytes (4 values each), per 32 values a u32 of 4 × 7 sign bits and `ls` | 256 × 4 | `2 ls + 1` per 32 | 1/4 |
//! | IQ3_S | 110: `d`, 64 index bytes, 8 bytes of high index bits, 32 sign bytes, 4 bytes of `ls` | 512 × 4 | `2 ls + 1` per 32 | 1 |
//! | IQ1_S | 50: `d`, 32 index bytes, per 32 values a u16 (4 × 3 high index bits, `ls`, δ's sign) | 2048 × 8 | `2 ls + 1` per 32 | 1/8 |
//! | IQ1_M | 56: 32 index bytes, per 16 values a byte (per 8: 3 high index bits, δ's sign), 4 u16 of 3-bit `ls` whose top nibbles hold `d` | 2048 × 8 | `2 ls + 1` per 16 | 1/8 |
//!
//! The 7 sign bits of IQ2_XXS, IQ2_XS and IQ3_XXS stand for 8 (ggml's `ksign`: the eighth
//! makes the count even). IQ1's values are grid values (−1, 0, 1) plus δ = ±1/8, taken here as
//! `8 g ± 1` with FACTOR 1/8 (its grid holds `8 g`), so that every format's block sum is an
//! exact integer sum.
//!
//! Here: the formats' values as magnitudes and sign masks (`Signed`, which the SIMD kernels
//! read), the parts from which the x86 kernels assemble some formats' values in vectors
//! instead (`Quads`, `SignBytes`, `SevenSigns`, `Iq1`), decoding, and each format's `Format` for the
//! portable products.

mod grids;

use super::iq4::f16_at;
use super::portable::{u32_at, Format};
use crate::gguf::TensorType;

const QK_K: usize = 256;

/// A grid of `N` entries as `grids` holds it: value `j` of entry `i` is
/// `map[(entries[i] >> (slot · j)) & (2^slot − 1)]`, for `j < width`.
struct Packed<const N: usize> {
    map: &'static [i8],
    slot: u32,
    width: u32,
    entries: [u16; N],
}

impl<const N: usize> Packed<N> {
    /// Entry `i`'s values as the little-endian bytes of `out[i]`.
    const fn expand(&self) -> [u64; N] {
        let mut out = [0u64; N];
        let mut i = 0;
        while i < N {
            let mut j = 0;
            while j < self.width {
                let index = (self.entries[i] >> (self.slot * j)) & ((1 << self.slot) - 1);
                out[i] |= (self.map[index as usize] as u8 as u64) << (8 * j);
                j += 1;
            }
            i += 1;
        }
        out
    }
}

static IQ2XXS_GRID: [u64; 256] = grids::IQ2XXS.expand();
static IQ2XS_GRID: [u64; 512] = grids::IQ2XS.expand();
static IQ2S_GRID: [u64; 1024] = grids::IQ2S.expand();
static IQ3XXS_GRID: [u64; 256] = grids::IQ3XXS.expand();
static IQ3S_GRID: [u64; 512] = grids::IQ3S.expand();
/// IQ1's grid entries times 8 (bytes −8, 0, 8).
pub(crate) static IQ1S_GRID: [u64; 2048] = grids::IQ1S.expand();

/// IQ1's values `8 g + δ` by index and δ's sign: `8 g + 1` at `i`, `8 g − 1` at `2048 + i`
/// (the x86 IQ1_M rows read them whole).
#[cfg(target_arch = "x86_64")]
pub(crate) static IQ1_VALUES: [u64; 4096] = {
    let grid = grids::IQ1S.expand();
    let mut out = [0u64; 4096];
    let mut i = 0;
    while i < 4096 {
        let bytes = grid[i % 2048].to_le_bytes();
        let mut j = 0;
        while j < 8 {
            let v = bytes[j] as i8 + if i < 2048 { 1 } else { -1 };
            out[i] |= (v as u8 as u64) << (8 * j);
            j += 1;
        }
        i += 1;
    }
    out
};

/// Byte `j` of `SIGN_MASKS[s]` is 0xff where bit `j` of `s` is set.
static SIGN_MASKS: [u64; 256] = {
    let mut masks = [0u64; 256];
    let mut s = 0;
    while s < 256 {
        let mut j = 0;
        while j < 8 {
            if (s >> j) & 1 == 1 {
                masks[s] |= 0xff << (8 * j);
            }
            j += 1;
        }
        s += 1;
    }
    masks
};

/// The sign mask of the 8 sign bits that 7 bits stand for (the eighth is their parity).
static KSIGN_MASKS: [u64; 128] = {
    let mut masks = [0u64; 128];
    let mut bits = 0;
    while bits < 128 {
        masks[bits] = SIGN_MASKS[bits | (bits.count_ones() as usize & 1) << 7];
        bits += 1;
    }
    masks
};

/// The sign mask of the 7 bits at `shift` in `bits`.
#[inline(always)]
fn ksign(bits: u64, shift: u32) -> u64 {
    KSIGN_MASKS[((bits >> shift) & 127) as usize]
}

/// The formats that keep the 7 sign bits of a 32 values' groups together (IQ2_XXS, IQ3_XXS).
pub(crate) trait SevenSigns {
    /// Where group `l`'s 7 bits start in `sign_bits`.
    const SHIFTS: [u32; 4];

    /// The bits that hold the signs of values `32c..32c + 32`.
    fn sign_bits(w: &[u8], c: usize) -> u64;
}

/// The sign masks of values `32c..32c + 32` of a `SevenSigns` format.
#[inline(always)]
fn seven_sign_masks<F: SevenSigns>(w: &[u8], c: usize) -> [u64; 4] {
    let bits = F::sign_bits(w, c);
    F::SHIFTS.map(|shift| ksign(bits, shift))
}

/// The 8 byte values of `magnitudes` (none 0, as no grid holds 0), negated where `mask` is
/// 0xff: `(v ^ 0xff) + 1` per byte, which never carries into the next (as long as no byte
/// it negates is 0).
#[inline(always)]
fn signed(magnitudes: u64, mask: u64) -> u64 {
    (magnitudes ^ mask).wrapping_add(mask & 0x0101_0101_0101_0101)
}

/// The formats that store a sign bit per value, 4 bytes per 32 values (IQ2_S, IQ3_S).
pub(crate) trait SignBytes {
    /// The sign bytes of values `32c..32c + 32`: bit `j` of byte `l` is value `8l + j`'s.
    fn sign_bytes(w: &[u8], c: usize) -> &[u8; 4];
}

/// The sign masks of the groups from their sign bytes.
#[inline(always)]
fn byte_masks(signs: &[u8; 4]) -> [u64; 4] {
    signs.map(|s| SIGN_MASKS[s as usize])
}

/// The formats whose grid entries hold 4 values (IQ3): each group of 8 is two entries.
pub(crate) trait Quads {
    /// The magnitudes of values `32c..32c + 32`: 8 grid entries, 4 little-endian bytes each.
    fn quads(w: &[u8], c: usize) -> [u32; 8];
}

/// `Quads::quads` as the magnitudes of 4 groups.
#[inline(always)]
fn paired(q: [u32; 8]) -> [u64; 4] {
    std::array::from_fn(|l| q[2 * l] as u64 | (q[2 * l + 1] as u64) << 32)
}

fn u16_at(w: &[u8], at: usize) -> u32 {
    u16::from_le_bytes([w[at], w[at + 1]]) as u32
}

/// 32 values from 4 groups of 8 (little-endian bytes).
#[inline(always)]
fn join(group: impl Fn(usize) -> u64) -> [i8; 32] {
    let mut out = [0; 32];
    for (g, out) in out.chunks_exact_mut(8).enumerate() {
        for (o, b) in out.iter_mut().zip(group(g).to_le_bytes()) {
            *o = b as i8;
        }
    }
    out
}

/// The scales `2 ls + 1` of 4-bit `ls`, two per byte (low nibble first), from `bytes`.
fn nibble_scales(bytes: &[u8]) -> [i32; 16] {
    std::array::from_fn(|j| match bytes.get(j / 2) {
        Some(b) => 2 * ((b >> (4 * (j % 2))) & 0xf) as i32 + 1,
        None => 0,
    })
}

pub(crate) struct IQ2XXS;
pub(crate) struct IQ2XS;
pub(crate) struct IQ2S;
pub(crate) struct IQ3XXS;
pub(crate) struct IQ3S;
pub(crate) struct IQ1S;
pub(crate) struct IQ1M;

/// A codebook format as its values' magnitudes (none 0) and signs: values `32c..32c + 32` as
/// 4 groups of 8, each its magnitudes and sign mask (`SIGN_MASKS`), as little-endian bytes.
pub(crate) trait Signed: Format {
    fn groups(w: &[u8], c: usize) -> ([u64; 4], [u64; 4]);
}

/// The 4 groups `group(l)` as `Signed::groups` returns them, in a plain loop: for IQ1, arrays
/// that `from_fn` made of these calls went through memory (store-forwarding stalls).
#[inline(always)]
fn four(group: impl Fn(usize) -> (u64, u64)) -> ([u64; 4], [u64; 4]) {
    let mut out = ([0; 4], [0; 4]);
    for l in 0..4 {
        (out.0[l], out.1[l]) = group(l);
    }
    out
}

/// `Format` for a `Signed` format: its values from its groups.
macro_rules! signed_format {
    ($F:ty, bytes: $bytes:expr, run: $run:expr, d: $d:expr, scales: $scales:expr) => {
        impl Format for $F {
            const VALUES: usize = QK_K;
            const BYTES: usize = $bytes;
            const RUN: usize = $run;

            fn d(w: &[u8]) -> f32 {
                $d(w)
            }

            fn values(w: &[u8], c: usize) -> [i8; 32] {
                let (magnitudes, masks) = Self::groups(w, c);
                join(|l| signed(magnitudes[l], masks[l]))
            }

            fn scales(w: &[u8]) -> [i32; 16] {
                $scales(w)
            }
        }
    };
}

/// The f16 `d` at the block's start times `FACTOR`: 1/8, 1/4 or 1 (exact).
fn scaled_d<const EIGHTHS: u8>(w: &[u8]) -> f32 {
    f16_at(w, 0) * (EIGHTHS as f32 / 8.0)
}

/// The scales `2 ls + 1` of the 4-bit `ls` in the top bits of the u32 at `AT + STRIDE · c`,
/// one per 32 values.
fn top_scales<const AT: usize, const STRIDE: usize>(w: &[u8]) -> [i32; 16] {
    std::array::from_fn(|c| match c < 8 {
        true => 2 * (u32_at(w, AT + STRIDE * c) >> 28) as i32 + 1,
        false => 0,
    })
}

impl SevenSigns for IQ2XXS {
    const SHIFTS: [u32; 4] = [0, 7, 14, 21];

    #[inline(always)]
    fn sign_bits(w: &[u8], c: usize) -> u64 {
        u32_at(w, 2 + 8 * c + 4) as u64
    }
}

impl Signed for IQ2XXS {
    #[inline(always)]
    fn groups(w: &[u8], c: usize) -> ([u64; 4], [u64; 4]) {
        let q = &w[2 + 8 * c..][..4];
        (
            std::array::from_fn(|l| IQ2XXS_GRID[q[l] as usize]),
            seven_sign_masks::<Self>(w, c),
        )
    }
}
signed_format!(IQ2XXS, bytes: 66, run: 32, d: scaled_d::<1>, scales: top_scales::<6, 8>);

impl Signed for IQ2XS {
    #[inline(always)]
    fn groups(w: &[u8], c: usize) -> ([u64; 4], [u64; 4]) {
        let q: [u32; 4] = std::array::from_fn(|l| u16_at(w, 2 + 2 * (4 * c + l)));
        (
            q.map(|q| IQ2XS_GRID[(q & 511) as usize]),
            q.map(|q| ksign(q as u64, 9)),
        )
    }
}
signed_format!(IQ2XS, bytes: 74, run: 16, d: scaled_d::<1>, scales: |w: &[u8]| nibble_scales(IQ2XS::scale_bytes(w)));

/// The formats whose scales are 16 nibbles `ls`, two per byte, low first (IQ2_XS, IQ2_S).
pub(crate) trait NibbleScales {
    /// Where the 8 bytes start.
    const SCALES: usize;

    /// The 8 bytes of the block `w`.
    fn scale_bytes(w: &[u8]) -> &[u8; 8] {
        w[Self::SCALES..Self::SCALES + 8].try_into().unwrap()
    }
}

impl NibbleScales for IQ2XS {
    const SCALES: usize = 66;
}

impl SignBytes for IQ2S {
    #[inline(always)]
    fn sign_bytes(w: &[u8], c: usize) -> &[u8; 4] {
        w[34 + 4 * c..][..4].try_into().unwrap()
    }
}

impl Signed for IQ2S {
    #[inline(always)]
    fn groups(w: &[u8], c: usize) -> ([u64; 4], [u64; 4]) {
        let high = w[66 + c] as usize;
        let index = |l: usize| w[2 + 4 * c + l] as usize | ((high >> (2 * l)) & 3) << 8;
        (
            std::array::from_fn(|l| IQ2S_GRID[index(l)]),
            byte_masks(Self::sign_bytes(w, c)),
        )
    }
}
signed_format!(IQ2S, bytes: 82, run: 16, d: scaled_d::<1>, scales: |w: &[u8]| nibble_scales(IQ2S::scale_bytes(w)));

impl NibbleScales for IQ2S {
    const SCALES: usize = 74;
}

impl Quads for IQ3XXS {
    #[inline(always)]
    fn quads(w: &[u8], c: usize) -> [u32; 8] {
        let q = &w[2 + 8 * c..][..8];
        std::array::from_fn(|e| IQ3XXS_GRID[q[e] as usize] as u32)
    }
}

impl SevenSigns for IQ3XXS {
    const SHIFTS: [u32; 4] = [0, 7, 14, 21];

    #[inline(always)]
    fn sign_bits(w: &[u8], c: usize) -> u64 {
        u32_at(w, 66 + 4 * c) as u64
    }
}

impl Signed for IQ3XXS {
    #[inline(always)]
    fn groups(w: &[u8], c: usize) -> ([u64; 4], [u64; 4]) {
        (paired(Self::quads(w, c)), seven_sign_masks::<Self>(w, c))
    }
}
signed_format!(IQ3XXS, bytes: 98, run: 32, d: scaled_d::<2>, scales: top_scales::<66, 4>);

impl Quads for IQ3S {
    #[inline(always)]
    fn quads(w: &[u8], c: usize) -> [u32; 8] {
        let (q, high) = (&w[2 + 8 * c..][..8], w[66 + c] as usize);
        std::array::from_fn(|e| IQ3S_GRID[q[e] as usize | ((high >> e) & 1) << 8] as u32)
    }
}

impl SignBytes for IQ3S {
    #[inline(always)]
    fn sign_bytes(w: &[u8], c: usize) -> &[u8; 4] {
        w[74 + 4 * c..][..4].try_into().unwrap()
    }
}

impl Signed for IQ3S {
    #[inline(always)]
    fn groups(w: &[u8], c: usize) -> ([u64; 4], [u64; 4]) {
        (
            paired(Self::quads(w, c)),
            byte_masks(Self::sign_bytes(w, c)),
        )
    }
}
signed_format!(IQ3S, bytes: 110, run: 32, d: scaled_d::<8>, scales: |w: &[u8]| nibble_scales(&w[106..110]));

/// The top bit of each byte.
const HIGH: u64 = 0x8080_8080_8080_8080;
const ONES: u64 = 0x0101_0101_0101_0101;

/// IQ1's groups as stored: grid entries `8 g` (bytes −8, 0, 8) and their δ (bytes ±1).
pub(crate) trait Iq1 {
    /// Where the block's 32 index bytes start, and its high index bits (`qh`).
    const QS: usize;
    const QH: usize;

    /// The grid entry and δ of group `l` of values `32c..32c + 32`.
    fn entry(w: &[u8], c: usize, l: usize) -> (u64, u64);
}

/// δ's bytes: −1 where `negative`, else 1.
#[inline(always)]
fn delta(negative: bool) -> u64 {
    if negative {
        u64::MAX
    } else {
        ONES
    }
}

/// An IQ1 grid entry `8 g` plus its δ (`8 g ± 1`: −9, −7, −1, 1, 7 or 9 per byte), as
/// magnitudes and a sign mask.
#[inline(always)]
fn iq1_group((eight_g, delta): (u64, u64)) -> (u64, u64) {
    // Byte-wise `8g + δ`: the low 7 bits of each byte summed apart, the top ones xor'ed in.
    let v = ((eight_g & !HIGH) + (delta & !HIGH)) ^ ((eight_g ^ delta) & HIGH);
    let mask = ((v >> 7) & ONES) * 0xff;
    (signed(v, mask), mask)
}

impl Iq1 for IQ1S {
    const QS: usize = 2;
    /// A u16 per 32 values: 4 × 3 high index bits, 3 bits `ls`, δ's sign.
    const QH: usize = 34;

    #[inline(always)]
    fn entry(w: &[u8], c: usize, l: usize) -> (u64, u64) {
        let qh = u16_at(w, Self::QH + 2 * c);
        let index = w[Self::QS + 4 * c + l] as usize | (((qh >> (3 * l)) & 7) as usize) << 8;
        (IQ1S_GRID[index], delta(qh & 0x8000 != 0))
    }
}

impl Signed for IQ1S {
    #[inline(always)]
    fn groups(w: &[u8], c: usize) -> ([u64; 4], [u64; 4]) {
        four(|l| iq1_group(Self::entry(w, c, l)))
    }
}
signed_format!(IQ1S, bytes: 50, run: 32, d: scaled_d::<1>, scales: |w: &[u8]| {
    std::array::from_fn(|c| match c < 8 {
        true => 2 * ((u16_at(w, 34 + 2 * c) >> 12) & 7) as i32 + 1,
        false => 0,
    })
});

/// IQ1_M's `d`: its 16 bits are the top nibbles of the 4 u16 of scales, first to last.
fn iq1m_d(w: &[u8]) -> f32 {
    let bits = (0..4).fold(0, |d, i| d | (u16_at(w, 48 + 2 * i) >> 12) << (4 * i));
    super::f16::to_f32(bits as u16) * 0.125
}

impl Iq1 for IQ1M {
    const QS: usize = 0;
    /// A nibble per 8 values, the first in the low one: 3 high index bits, δ's sign.
    const QH: usize = 32;

    #[inline(always)]
    fn entry(w: &[u8], c: usize, l: usize) -> (u64, u64) {
        let g = 4 * c + l;
        let qh = (w[Self::QH + g / 2] >> (4 * (g % 2))) as usize;
        (
            IQ1S_GRID[w[Self::QS + g] as usize | (qh & 7) << 8],
            delta(qh & 8 != 0),
        )
    }
}

impl Signed for IQ1M {
    #[inline(always)]
    fn groups(w: &[u8], c: usize) -> ([u64; 4], [u64; 4]) {
        four(|l| iq1_group(Self::entry(w, c, l)))
    }
}
signed_format!(IQ1M, bytes: 56, run: 16, d: iq1m_d, scales: |w: &[u8]| {
    std::array::from_fn(|j| 2 * ((u16_at(w, 48 + 2 * (j / 4)) >> (3 * (j % 4))) & 7) as i32 + 1)
});

/// Whether `dtype` is a codebook format.
pub fn reads(dtype: TensorType) -> bool {
    use TensorType::*;
    matches!(dtype, IQ2XXS | IQ2XS | IQ2S | IQ3XXS | IQ3S | IQ1S | IQ1M)
}

/// Runs `$body` with `$F` bound to the `Format` of codebook type `$dtype`.
macro_rules! with_codebook {
    ($dtype:expr, $F:ident => $body:expr) => {
        match $dtype {
            TensorType::IQ2XXS => {
                type $F = $crate::ops::codebook::IQ2XXS;
                $body
            }
            TensorType::IQ2XS => {
                type $F = $crate::ops::codebook::IQ2XS;
                $body
            }
            TensorType::IQ2S => {
                type $F = $crate::ops::codebook::IQ2S;
                $body
            }
            TensorType::IQ3XXS => {
                type $F = $crate::ops::codebook::IQ3XXS;
                $body
            }
            TensorType::IQ3S => {
                type $F = $crate::ops::codebook::IQ3S;
                $body
            }
            TensorType::IQ1S => {
                type $F = $crate::ops::codebook::IQ1S;
                $body
            }
            TensorType::IQ1M => {
                type $F = $crate::ops::codebook::IQ1M;
                $body
            }
            _ => unreachable!("{} is not a codebook format", $dtype),
        }
    };
}
pub(crate) use with_codebook;

/// Decodes `out.len()` values stored as codebook type `dtype`: `(d · scale) · v`, the order
/// in which ggml rounds them.
pub fn dequantize_into(dtype: TensorType, bytes: &[u8], out: &mut [f32]) {
    with_codebook!(dtype, F => decode::<F>(bytes, out))
}

fn decode<F: Format>(bytes: &[u8], out: &mut [f32]) {
    for (w, out) in bytes.chunks_exact(F::BYTES).zip(out.chunks_exact_mut(QK_K)) {
        let (d, scales) = (F::d(w), F::scales(w));
        for (c, out) in out.chunks_exact_mut(32).enumerate() {
            for (i, (o, v)) in out.iter_mut().zip(F::values(w, c)).enumerate() {
                *o = d * scales[(32 * c + i) / F::RUN] as f32 * v as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::portable::{self, quantize_q8k_block};

    const TYPES: [TensorType; 7] = [
        TensorType::IQ2XXS,
        TensorType::IQ2XS,
        TensorType::IQ2S,
        TensorType::IQ3XXS,
        TensorType::IQ3S,
        TensorType::IQ1S,
        TensorType::IQ1M,
    ];

    /// Random blocks of `dtype` with a finite scale `d` of about 1e-2.
    fn blocks(dtype: TensorType, n_blocks: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut bytes: Vec<u8> = (0..n_blocks * dtype.type_size())
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as u8
            })
            .collect();
        for block in bytes.chunks_exact_mut(dtype.type_size()) {
            let d = half::f16::from_f32(0.01 + block[7] as f32 * 1e-4).to_bits();
            if dtype == TensorType::IQ1M {
                for i in 0..4 {
                    let top = &mut block[48 + 2 * i + 1];
                    *top = (*top & 0x0f) | (((d >> (4 * i)) & 0xf) << 4) as u8;
                }
            } else {
                block[..2].copy_from_slice(&d.to_le_bytes());
            }
        }
        bytes
    }

    #[test]
    fn grids_hold_ggml_values() {
        assert_eq!(IQ2XXS_GRID[0], 0x0808_0808_0808_0808);
        assert_eq!(IQ1S_GRID[0], 0xf8f8_f8f8_f8f8_f8f8);
        for g in IQ2S_GRID.iter().chain(&IQ2XS_GRID) {
            assert!(g.to_le_bytes().iter().all(|b| [8, 25, 43].contains(b)));
        }
        for g in IQ3S_GRID {
            let bytes = g.to_le_bytes();
            let (values, rest) = bytes.split_at(4);
            assert!(values.iter().all(|b| b % 2 == 1 && (1..=15).contains(b)));
            assert_eq!(rest, [0; 4]);
        }
        let v = 0x2b19_0808_2b2b_1908;
        assert_eq!(signed(v, SIGN_MASKS[0b1010_0001]), 0xd519_f808_2b2b_19f8);
        // Grid entries are distinct: an index stands for one group of values.
        let mut entries = IQ1S_GRID.to_vec();
        entries.sort();
        entries.dedup();
        assert_eq!(entries.len(), 2048);
        assert_eq!(KSIGN_MASKS[1], 0xff00_0000_0000_00ff);
        assert_eq!(KSIGN_MASKS[3], 0xffff);
    }

    /// The products (activations rounded to Q8_K, exact integer sums) equal the decoded
    /// weights times the rounded activations in f64: `values`, `scales` and `d` agree with
    /// `dequantize_into`, the activations' rounding aside.
    #[test]
    fn products_equal_decoded_weights_times_rounded_activations() {
        let (n_rows, k, m) = (5, 512, 3);
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 997) as f32 / 500.0 - 1.0)
            .collect();
        let mut rounded = x.clone();
        for block in rounded.chunks_exact_mut(QK_K) {
            let mut qs = [0i8; QK_K];
            let d = quantize_q8k_block(block, &mut qs);
            block
                .iter_mut()
                .zip(qs)
                .for_each(|(v, q)| *v = d * q as f32);
        }
        for dtype in TYPES {
            let data = blocks(dtype, n_rows * k / QK_K, dtype.id() as u64);
            let mut w = vec![0f32; n_rows * k];
            dequantize_into(dtype, &data, &mut w);
            assert!(w.iter().all(|v| v.is_finite()) && w.iter().any(|&v| v != 0.0));
            let mut y = vec![0f32; m * n_rows];
            portable::matmul(dtype, &data, n_rows, k, &x, &mut y);
            for (i, got) in y.iter().enumerate() {
                let (t, r) = (i / n_rows, i % n_rows);
                let terms = w[r * k..][..k].iter().zip(&rounded[t * k..][..k]);
                let (want, size) = terms.fold((0f64, 0f64), |(s, a), (&w, &x)| {
                    (s + w as f64 * x as f64, a + (w as f64 * x as f64).abs())
                });
                assert!(
                    (*got as f64 - want).abs() <= 1e-5 * size,
                    "{dtype} y[{t}, {r}]: {got} vs {want}"
                );
            }
        }
    }
}
