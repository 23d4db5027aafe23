//! The portable `y = x Wᵀ` with the integer kernels' numerics (see `qmatmul`), for the twelve
//! formats those kernels read and the codebook formats (`codebook`). `Weight::matmul` takes it
//! for the formats whose products candle does not compute as ggml does, or not on every CPU
//! (`supports`): IQ4_NL, IQ4_XS and the codebook formats (candle does not read them), Q4_1
//! and Q5_1 (candle multiplies Q8_1's sums in f16 arithmetic), Q2_K and Q3_K (candle's
//! aarch64 kernels use `sdot` without checking that the CPU has it); for the others it is the
//! scalar model the SIMD kernels are tested against, bit for bit. Activations
//! are rounded as candle's `from_float` rounds them (Q8_0 for the 32-value formats, Q8_K for
//! the others); each weight block adds its exact integer sums through `Format::steps`, blocks
//! in order.

use rayon::prelude::*;

use super::codebook::{self, with_codebook};
use super::disjoint::SyncPtr;
use super::iq4::{abs_max, f16_at, inverse, nibbles, xs_scales, KVALUES};
use super::scratch::{self, Pod};
use crate::gguf::TensorType;

const QK: usize = 32;
const QK_K: usize = 256;

/// Whether `Weight::matmul` takes this module's product for `dtype` (candle has none that
/// matches ggml's and runs on every CPU).
pub fn supports(dtype: TensorType) -> bool {
    use TensorType::*;
    matches!(dtype, IQ4NL | IQ4XS | Q4_1 | Q5_1 | Q2K | Q3K) || codebook::reads(dtype)
}

/// What a weight block adds after its first step `y = fma(S_b, d_w·d_x, y)`.
pub(crate) enum Min {
    None,
    /// Q4_1, Q5_1: `y = fma(m_w, s_x, y)`, `m_w` the f16 at `DMIN_AT` and `s_x` ggml's Q8_1
    /// sum.
    Block,
    /// Q2_K, Q4_K, Q5_K: `y = fma(−M_b, dmin_w·d_x, y)`, `dmin_w` the f16 at `DMIN_AT` and
    /// `M_b = Σ_j min_j Σ_{i∈run j} x_i` over the runs of `RUN` values (Q4_K, Q5_K: 8 of 32;
    /// Q2_K: 16 of 16).
    SubBlocks,
}

/// A weight format as every kernel reads it: its blocks' values (as signed bytes, in order,
/// 32 at a time), their scales (and mins) per run of `RUN` values, and the float steps of the
/// module comment. The exact integer sum of a block is `S_b = Σ_j scale_j Σ_{i∈run j} v_i x_i`.
pub(crate) trait Format: Sync {
    /// Values and bytes per block (ggml's layout).
    const VALUES: usize;
    const BYTES: usize;
    /// Values per scale: 32, or 16 (Q2_K, Q3_K, Q6_K).
    const RUN: usize = 32;
    /// Where `d` (f16) is, and the second f16 of `Min::Block` and `Min::SubBlocks`.
    const D_AT: usize = 0;
    const DMIN_AT: usize = 2;
    const MIN: Min = Min::None;

    /// The block's scale `d` (codebook formats fold in their constant factor).
    fn d(w: &[u8]) -> f32 {
        f16_at(w, Self::D_AT)
    }

    /// Values `32c..32c + 32` of the block `w`.
    fn values(w: &[u8], c: usize) -> [i8; 32];

    /// The scale of each run of `RUN` values (all 1 in the 32-value formats).
    fn scales(_w: &[u8]) -> [i32; 16] {
        [1; 16]
    }

    /// The min of each run of `RUN` values (`Min::SubBlocks`).
    fn mins(_w: &[u8]) -> [i32; 16] {
        [0; 16]
    }

    /// The block's float steps on `acc`, its exact sums `s` (`S_b`) and `m` (`M_b`) in hand,
    /// against an activation block of scale `d_x` (and Q8_1 sum `s_x`): the same on every
    /// instruction set.
    #[inline(always)]
    fn steps(acc: f32, s: i32, m: i32, w: &[u8], d_x: f32, s_x: f32) -> f32 {
        let acc = (s as f32).mul_add(Self::d(w) * d_x, acc);
        match Self::MIN {
            Min::None => acc,
            Min::Block => f16_at(w, Self::DMIN_AT).mul_add(s_x, acc),
            Min::SubBlocks => (-(m as f32)).mul_add(f16_at(w, Self::DMIN_AT) * d_x, acc),
        }
    }
}

pub(crate) struct Q8_0;
pub(crate) struct Q4_0;
pub(crate) struct Q5_0;
pub(crate) struct Q4_1;
pub(crate) struct Q5_1;
pub(crate) struct IQ4NL;
/// Q4_K (`HIGH = false`) or Q5_K (`HIGH = true`, with fifth bits).
pub(crate) struct KQuant<const HIGH: bool>;
pub(crate) type Q4K = KQuant<false>;
pub(crate) type Q5K = KQuant<true>;
pub(crate) struct Q6K;
pub(crate) struct IQ4XS;
pub(crate) struct Q2K;
pub(crate) struct Q3K;

/// 32 values from 16 bytes of nibbles (low nibbles first) and, with `qh`, a fifth bit each
/// (bit `i` of `qh` above value `i`), less `off`.
fn nibble_values(qs: &[u8], qh: u32, off: i32) -> [i8; 32] {
    let mut out = [0i8; 32];
    for (i, q) in nibbles(qs).enumerate() {
        out[i] = (q as i32 + (((qh >> i) & 1) << 4) as i32 - off) as i8;
    }
    out
}

pub(crate) fn u32_at(w: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([w[at], w[at + 1], w[at + 2], w[at + 3]])
}

impl Format for Q8_0 {
    const VALUES: usize = QK;
    const BYTES: usize = 34;

    fn values(w: &[u8], _: usize) -> [i8; 32] {
        std::array::from_fn(|i| w[2 + i] as i8)
    }
}

impl Format for Q4_0 {
    const VALUES: usize = QK;
    const BYTES: usize = 18;

    fn values(w: &[u8], _: usize) -> [i8; 32] {
        nibble_values(&w[2..18], 0, 8)
    }
}

impl Format for Q5_0 {
    const VALUES: usize = QK;
    const BYTES: usize = 22;

    fn values(w: &[u8], _: usize) -> [i8; 32] {
        nibble_values(&w[6..22], u32_at(w, 2), 16)
    }
}

impl Format for Q4_1 {
    const VALUES: usize = QK;
    const BYTES: usize = 20;
    const MIN: Min = Min::Block;

    fn values(w: &[u8], _: usize) -> [i8; 32] {
        nibble_values(&w[4..20], 0, 0)
    }
}

impl Format for Q5_1 {
    const VALUES: usize = QK;
    const BYTES: usize = 24;
    const MIN: Min = Min::Block;

    fn values(w: &[u8], _: usize) -> [i8; 32] {
        nibble_values(&w[8..24], u32_at(w, 4), 0)
    }
}

impl Format for IQ4NL {
    const VALUES: usize = QK;
    const BYTES: usize = 18;

    fn values(w: &[u8], _: usize) -> [i8; 32] {
        nibble_values(&w[2..18], 0, 0).map(|q| KVALUES[q as usize])
    }
}

/// The 8 scales and 8 mins (6 bits each) of a Q4_K / Q5_K block (ggml's `get_scale_min_k4`).
fn k_scales_mins(w: &[u8]) -> ([i32; 8], [i32; 8]) {
    let q = &w[4..16];
    let pair = |j: usize| match j < 4 {
        true => (q[j] & 63, q[j + 4] & 63),
        false => (
            (q[j + 4] & 0xf) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        ),
    };
    (
        std::array::from_fn(|j| pair(j).0 as i32),
        std::array::from_fn(|j| pair(j).1 as i32),
    )
}

/// `block_q4_K` (144 bytes): `d`, `dmin`, 12 bytes of scales and mins, 128 bytes of nibbles
/// (32-byte chunk `c/2` holds values `32c..32c+32`, low nibbles for even `c`);
/// `block_q5_K` (176 bytes) has 32 bytes `qh` before the nibbles, bit `c` of `qh[j]` the fifth
/// bit of value `32c + j`.
impl<const HIGH: bool> Format for KQuant<HIGH> {
    const VALUES: usize = QK_K;
    const BYTES: usize = if HIGH { 176 } else { 144 };
    const MIN: Min = Min::SubBlocks;

    fn values(w: &[u8], c: usize) -> [i8; 32] {
        let qs = &w[if HIGH { 48 } else { 16 } + 32 * (c / 2)..][..32];
        std::array::from_fn(|j| {
            let q = (qs[j] >> (4 * (c % 2))) & 0xf;
            let high = if HIGH { ((w[16 + j] >> c) & 1) << 4 } else { 0 };
            (q | high) as i8
        })
    }

    fn scales(w: &[u8]) -> [i32; 16] {
        let sc = k_scales_mins(w).0;
        std::array::from_fn(|j| if j < 8 { sc[j] } else { 0 })
    }

    fn mins(w: &[u8]) -> [i32; 16] {
        let mn = k_scales_mins(w).1;
        std::array::from_fn(|j| if j < 8 { mn[j] } else { 0 })
    }
}

/// `block_q6_K` (210 bytes): 128 bytes `ql` of low nibbles, 64 bytes `qh` of 2-bit high
/// parts, 16 signed scales (one per 16 values), `d`. Values `32c..32c+32` (`c = 4h + i`) take
/// the nibbles of `ql[64h + 32(i % 2)..]` (high ones for `i ≥ 2`) and bits `2i, 2i + 1` of
/// `qh[32h..]`, less 32.
impl Format for Q6K {
    const VALUES: usize = QK_K;
    const BYTES: usize = 210;
    const RUN: usize = 16;
    const D_AT: usize = 208;

    fn values(w: &[u8], c: usize) -> [i8; 32] {
        let (h, i) = (c / 4, c % 4);
        let (ql, qh) = (&w[64 * h + 32 * (i % 2)..][..32], &w[128 + 32 * h..][..32]);
        std::array::from_fn(|l| {
            let low = (ql[l] >> (4 * (i / 2))) & 0xf;
            let high = (qh[l] >> (2 * i)) & 3;
            ((low | high << 4) as i32 - 32) as i8
        })
    }

    fn scales(w: &[u8]) -> [i32; 16] {
        std::array::from_fn(|j| w[192 + j] as i8 as i32)
    }
}

impl Format for IQ4XS {
    const VALUES: usize = QK_K;
    const BYTES: usize = 136;

    fn values(w: &[u8], c: usize) -> [i8; 32] {
        nibble_values(&w[8 + 16 * c..][..16], 0, 0).map(|q| KVALUES[q as usize])
    }

    fn scales(w: &[u8]) -> [i32; 16] {
        let sc = xs_scales(w);
        std::array::from_fn(|j| if j < 8 { sc[j] } else { 0 })
    }
}

/// Values `32c..32c+32` of a block whose 2-bit values (Q2_K, Q3_K) lie in the 64 bytes `qs`:
/// value `128h + 32j + l` is bits `2j, 2j + 1` of `qs[32h + l]`.
fn crumbs(qs: &[u8], c: usize) -> [u8; 32] {
    let (h, j) = (c / 4, c % 4);
    std::array::from_fn(|l| (qs[32 * h + l] >> (2 * j)) & 3)
}

/// `block_q2_K` (84 bytes): 16 bytes of 4-bit scales (low nibbles) and mins (high nibbles),
/// one each per 16 values, 64 bytes `qs` of 2-bit values (`crumbs`), `d`, `dmin`. Value `i`
/// is `d·sc·q_i − dmin·m` with its run's `sc` and `m`.
impl Format for Q2K {
    const VALUES: usize = QK_K;
    const BYTES: usize = 84;
    const RUN: usize = 16;
    const D_AT: usize = 80;
    const DMIN_AT: usize = 82;
    const MIN: Min = Min::SubBlocks;

    fn values(w: &[u8], c: usize) -> [i8; 32] {
        crumbs(&w[16..80], c).map(|q| q as i8)
    }

    fn scales(w: &[u8]) -> [i32; 16] {
        std::array::from_fn(|j| (w[j] & 0xf) as i32)
    }

    fn mins(w: &[u8]) -> [i32; 16] {
        std::array::from_fn(|j| (w[j] >> 4) as i32)
    }
}

/// The 16 scales `sc − 32` of a Q3_K block, 6 bits each in 12 bytes `q` (ggml's `kmask`
/// shuffle): the low 4 bits of scale `j` are nibble `j / 8` of `q[j % 8]`, the high 2 bits
/// bits `2(j / 4)..` of `q[8 + j % 4]`.
fn q3k_scales(q: &[u8]) -> [i32; 16] {
    std::array::from_fn(|j| {
        let low = (q[j % 8] >> (4 * (j / 8))) & 0xf;
        let high = (q[8 + j % 4] >> (2 * (j / 4))) & 3;
        (low | high << 4) as i32 - 32
    })
}

/// `block_q3_K` (110 bytes): 32 bytes `hmask`, 64 bytes `qs` of 2-bit values (`crumbs`), 12
/// bytes of 6-bit scales (`q3k_scales`, one per 16 values), `d`. Value `32c + l` is
/// `d·sc·(q − 4)` with `q` its 2 bits and bit `c` of `hmask[l]` as bit 2.
impl Format for Q3K {
    const VALUES: usize = QK_K;
    const BYTES: usize = 110;
    const RUN: usize = 16;
    const D_AT: usize = 108;

    fn values(w: &[u8], c: usize) -> [i8; 32] {
        let low = crumbs(&w[32..96], c);
        std::array::from_fn(|l| (low[l] | ((w[l] >> c) & 1) << 2) as i8 - 4)
    }

    fn scales(w: &[u8]) -> [i32; 16] {
        q3k_scales(&w[96..108])
    }
}

/// Decodes block `w` for its products with every token: its values, and the scale and min of
/// each run of `RUN` values (`scales` and `mins` hold `VALUES / RUN` each).
fn decode<F: Format>(w: &[u8], values: &mut [i8], scales: &mut [i32], mins: &mut [i32]) {
    for (c, values) in values.chunks_exact_mut(32).enumerate() {
        values.copy_from_slice(&F::values(w, c));
    }
    scales.copy_from_slice(&F::scales(w)[..scales.len()]);
    if let Min::SubBlocks = F::MIN {
        mins.copy_from_slice(&F::mins(w)[..mins.len()]);
    }
}

/// The exact sums `(S_b, M_b)` of a decoded block against the activations `x` of its values.
fn sums<F: Format>(values: &[i8], scales: &[i32], mins: &[i32], x: &[i8]) -> (i32, i32) {
    let runs = values.chunks_exact(F::RUN).zip(x.chunks_exact(F::RUN));
    let s = runs.zip(scales).fold(0, |s, ((v, x), scale)| {
        let dot: i32 = v.iter().zip(x).map(|(&v, &x)| v as i32 * x as i32).sum();
        s + scale * dot
    });
    let m = match F::MIN {
        Min::SubBlocks => {
            let x_sums = x
                .chunks_exact(F::RUN)
                .map(|x| x.iter().map(|&x| x as i32).sum::<i32>());
            mins.iter().zip(x_sums).map(|(m, x)| m * x).sum()
        }
        _ => 0,
    };
    (s, m)
}

/// A block of 8-bit activations: Q8_0 (`N` = 32) with ggml's Q8_1 `s`, or Q8_K (256).
#[derive(Clone, Copy)]
#[repr(C)]
struct Act<const N: usize> {
    d: f32,
    s: f32,
    qs: [i8; N],
}

// SAFETY: `#[repr(C)]`, f32s and bytes.
unsafe impl Pod for Act<32> {}
unsafe impl Pod for Act<256> {}

/// One Q8_0 block as candle's `BlockQ8_0::from_float` rounds it: `d = amax / 127` (returned
/// unrounded; the block keeps it as f16), `q = round(x / d)`. Returns `d` and the values' sum.
pub(crate) fn quantize_q8_0_block(x: &[f32], qs: &mut [i8]) -> (f32, i32) {
    let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (v * id).round() as i8;
    }
    (d, qs.iter().map(|&q| q as i32).sum())
}

/// One Q8_K block as candle's `BlockQ8K::from_float` rounds it: `d = max / −127` of the value
/// of largest magnitude (the first such), `q = round(x / d)` clamped to i8. Returns `d`.
pub(crate) fn quantize_q8k_block(x: &[f32], qs: &mut [i8]) -> f32 {
    let (amax, max) = abs_max(x);
    if amax == 0.0 {
        qs.fill(0);
        return 0.0;
    }
    let iscale = -127.0 / max;
    for (q, &v) in qs.iter_mut().zip(x) {
        *q = (iscale * v).round().clamp(-128.0, 127.0) as i8;
    }
    1.0 / iscale
}

impl<const N: usize> Act<N> {
    /// Candle's `BlockQ8_0::from_float` (`N` = 32: `d = amax / 127` kept as f16, values
    /// rounded with the unrounded `d`; `s` = the values' sum times that `d`, rounded to f16)
    /// or `BlockQ8K::from_float` (256: `d = max / −127`).
    fn quantize(&mut self, x: &[f32]) {
        if N == QK {
            let (d, sum) = quantize_q8_0_block(x, &mut self.qs);
            self.d = half::f16::from_f32(d).to_f32();
            self.s = half::f16::from_f32(d * sum as f32).to_f32();
            return;
        }
        self.d = quantize_q8k_block(x, &mut self.qs);
    }
}

/// `y[m, n_rows] = x[m, k] · Wᵀ` for `W` stored as `dtype`, one of the formats of
/// `Format` (`supports(dtype)` for `Weight::matmul`).
pub fn matmul(dtype: TensorType, data: &[u8], n_rows: usize, k: usize, x: &[f32], y: &mut [f32]) {
    match dtype {
        TensorType::Q8_0 => products::<Q8_0, QK>(data, n_rows, k, x, y),
        TensorType::Q4_0 => products::<Q4_0, QK>(data, n_rows, k, x, y),
        TensorType::Q5_0 => products::<Q5_0, QK>(data, n_rows, k, x, y),
        TensorType::Q4_1 => products::<Q4_1, QK>(data, n_rows, k, x, y),
        TensorType::Q5_1 => products::<Q5_1, QK>(data, n_rows, k, x, y),
        TensorType::IQ4NL => products::<IQ4NL, QK>(data, n_rows, k, x, y),
        TensorType::Q4K => products::<Q4K, QK_K>(data, n_rows, k, x, y),
        TensorType::Q5K => products::<Q5K, QK_K>(data, n_rows, k, x, y),
        TensorType::Q6K => products::<Q6K, QK_K>(data, n_rows, k, x, y),
        TensorType::IQ4XS => products::<IQ4XS, QK_K>(data, n_rows, k, x, y),
        TensorType::Q2K => products::<Q2K, QK_K>(data, n_rows, k, x, y),
        TensorType::Q3K => products::<Q3K, QK_K>(data, n_rows, k, x, y),
        _ => with_codebook!(dtype, F => products::<F, QK_K>(data, n_rows, k, x, y)),
    }
}

/// Weight rows per task: enough to amortise scheduling, few enough to share work evenly.
const ROWS_PER_TASK: usize = 16;

/// Quantizes the activations, then for each weight row folds its blocks, in order, into each
/// token's output, each block decoded once for all the tokens.
fn products<F: Format, const N: usize>(
    data: &[u8],
    n_rows: usize,
    k: usize,
    x: &[f32],
    y: &mut [f32],
) where
    Act<N>: Pod,
{
    debug_assert!(F::VALUES == N);
    let (m, nb) = (x.len() / k, k / N);
    let row_bytes = nb * F::BYTES;
    scratch::with_zeroed::<Act<N>, _>(m * nb, |act| {
        act.par_chunks_mut(nb.max(1))
            .zip(x.par_chunks(k))
            .for_each(|(blocks, x)| {
                for (b, x) in blocks.iter_mut().zip(x.chunks_exact(N)) {
                    b.quantize(x);
                }
            });
        let y_ptr = SyncPtr(y.as_mut_ptr());
        let runs = N / F::RUN;
        (0..n_rows.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .for_each(|task| {
                let (mut values, mut scales, mut mins) =
                    (vec![0i8; N], vec![0i32; runs], vec![0i32; runs]);
                let mut accs = vec![0f32; m];
                for r in task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(n_rows) {
                    accs.fill(0.0);
                    let w = &data[r * row_bytes..(r + 1) * row_bytes];
                    for (b, w) in w.chunks_exact(F::BYTES).enumerate() {
                        decode::<F>(w, &mut values, &mut scales, &mut mins);
                        let tokens = act.iter().skip(b).step_by(nb.max(1));
                        for (acc, x) in accs.iter_mut().zip(tokens) {
                            let (s, m) = sums::<F>(&values, &scales, &mins, &x.qs);
                            *acc = F::steps(*acc, s, m, w, x.d, x.s);
                        }
                    }
                    for (t, &acc) in accs.iter().enumerate() {
                        // SAFETY: this task alone writes y[t, rows], and t < m, r < n_rows.
                        unsafe { y_ptr.slice(t * n_rows + r, 1)[0] = acc };
                    }
                }
            });
    })
}
