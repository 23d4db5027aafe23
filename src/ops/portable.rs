//! The portable `y = x Wᵀ` with ggml's numerics, for the formats whose products candle does
//! not compute as ggml does: IQ4_NL and IQ4_XS (candle does not read them), Q4_1 and Q5_1
//! (candle multiplies Q8_1's sums in f16 arithmetic). Activations are rounded as candle's
//! `from_float` rounds them (Q8_0 for the 32-value formats, Q8_K for IQ4_XS); each weight
//! block adds its exact integer `S_b` (see `iq4` and `qmatmul::q8_0`) through
//! `y = fma(S_b, d_w·d_x, y)`, blocks in order, and a min `m_w` through `y = fma(m_w, s_x, y)`
//! with ggml's Q8_1 `s_x` — the sequence the AVX-512 kernels perform, so both give the same
//! bits.

use rayon::prelude::*;

use super::iq4::{abs_max, f16_at, inverse, nibbles, xs_scales, KVALUES};
use super::matmul::SyncPtr;
use super::scratch::{self, Pod};
use crate::gguf::TensorType;

const QK: usize = 32;
const QK_K: usize = 256;

/// Whether this module computes products of `dtype`.
pub fn supports(dtype: TensorType) -> bool {
    matches!(
        dtype,
        TensorType::IQ4NL | TensorType::IQ4XS | TensorType::Q4_1 | TensorType::Q5_1
    )
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

/// `Σ KVALUES[q_i] x_i` over one sub-block of 32.
fn dot_iq4(qs: &[u8], x: &[i8]) -> i32 {
    nibbles(qs)
        .zip(x)
        .map(|(q, &x)| KVALUES[q] as i32 * x as i32)
        .sum()
}

/// `Σ q_i x_i` over a Q4_1 (`qh` None) or Q5_1 block's unsigned values.
fn dot_unsigned(qs: &[u8], qh: Option<u32>, x: &[i8]) -> i32 {
    let fifth = |i: usize| qh.map_or(0, |h| ((h >> i) & 1) << 4) as usize;
    let values = nibbles(qs).enumerate().map(|(i, q)| q + fifth(i));
    values.zip(x).map(|(q, &x)| q as i32 * x as i32).sum()
}

/// A block's two float steps: `fma(S_b, d_w·d_x, y)`, then with a min `fma(m_w, s_x, y)`.
fn steps<const N: usize>(acc: f32, s: i32, d: f32, min: Option<f32>, x: &Act<N>) -> f32 {
    let acc = (s as f32).mul_add(d * x.d, acc);
    min.map_or(acc, |m| m.mul_add(x.s, acc))
}

/// `y[m, n_rows] = x[m, k] · Wᵀ` for `W` stored as `dtype` (`supports(dtype)`).
pub fn matmul(dtype: TensorType, data: &[u8], n_rows: usize, k: usize, x: &[f32], y: &mut [f32]) {
    match dtype {
        TensorType::IQ4NL => products::<QK>(data, n_rows, k, x, y, |w, x, acc| {
            steps(acc, dot_iq4(&w[2..], &x.qs), f16_at(w, 0), None, x)
        }),
        TensorType::IQ4XS => products::<QK_K>(data, n_rows, k, x, y, |w, x, acc| {
            let scales = xs_scales(w);
            let dots = (0..8).map(|s| scales[s] * dot_iq4(&w[8 + 16 * s..][..16], &x.qs[QK * s..]));
            steps(acc, dots.sum(), f16_at(w, 0), None, x)
        }),
        TensorType::Q4_1 => products::<QK>(data, n_rows, k, x, y, |w, x, acc| {
            let s = dot_unsigned(&w[4..], None, &x.qs);
            steps(acc, s, f16_at(w, 0), Some(f16_at(w, 2)), x)
        }),
        TensorType::Q5_1 => products::<QK>(data, n_rows, k, x, y, |w, x, acc| {
            let qh = u32::from_le_bytes([w[4], w[5], w[6], w[7]]);
            let s = dot_unsigned(&w[8..], Some(qh), &x.qs);
            steps(acc, s, f16_at(w, 0), Some(f16_at(w, 2)), x)
        }),
        _ => unreachable!("portable::matmul takes the types `supports` lists"),
    }
}

/// Weight rows per task: enough to amortise scheduling, few enough to share work evenly.
const ROWS_PER_TASK: usize = 16;

/// Quantizes the activations, then folds each row's blocks into its outputs with
/// `block(w, x, acc)`, blocks in order.
fn products<const N: usize>(
    data: &[u8],
    n_rows: usize,
    k: usize,
    x: &[f32],
    y: &mut [f32],
    block: impl Fn(&[u8], &Act<N>, f32) -> f32 + Sync,
) where
    Act<N>: Pod,
{
    let (m, nb) = (x.len() / k, k / N);
    let row_bytes = data.len() / n_rows.max(1);
    let block_bytes = row_bytes / nb.max(1);
    scratch::with_zeroed::<Act<N>, _>(m * nb, |act| {
        act.par_chunks_mut(nb.max(1))
            .zip(x.par_chunks(k))
            .for_each(|(blocks, x)| {
                for (b, x) in blocks.iter_mut().zip(x.chunks_exact(N)) {
                    b.quantize(x);
                }
            });
        let y_ptr = SyncPtr(y.as_mut_ptr());
        (0..n_rows.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .for_each(|task| {
                let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(n_rows);
                for t in 0..m {
                    let xt = &act[t * nb..(t + 1) * nb];
                    for r in rows.clone() {
                        let w = &data[r * row_bytes..(r + 1) * row_bytes];
                        let blocks = w.chunks_exact(block_bytes).zip(xt);
                        let acc = blocks.fold(0f32, |acc, (w, x)| block(w, x, acc));
                        // SAFETY: this task alone writes y[t, rows], and t < m, r < n_rows.
                        unsafe { y_ptr.slice(t * n_rows + r, 1)[0] = acc };
                    }
                }
            });
    })
}
