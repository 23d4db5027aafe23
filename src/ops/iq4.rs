//! ggml's non-linear 4-bit formats, which candle does not read: `block_iq4_nl` (18 bytes:
//! `d` f16, then 16 bytes of nibbles, low nibbles values 0..16 and high nibbles 16..32) and
//! `block_iq4_xs` (136 bytes, 256 values: `d` f16, `scales_h` u16, `scales_l` 4 bytes, then
//! 8 sub-blocks of 32 laid out as IQ4_NL's nibbles). A nibble indexes `KVALUES`; a value is
//! `d · KVALUES[q]`, in IQ4_XS `d · (ls − 32) · KVALUES[q]` with the sub-block's 6-bit `ls`.
//!
//! Here: decoding, and encoding (llama.cpp's search for the scales, with the squared values as
//! weights, as its quantizer does without an importance matrix).

use crate::gguf::TensorType;

/// The 16 values a nibble stands for (ggml's `kvalues_iq4nl`).
pub(crate) const KVALUES: [i8; 16] = [
    -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113,
];

const NL_BYTES: usize = 18;
const XS_BYTES: usize = 136;
const QK: usize = 32;
const QK_K: usize = 256;

pub(crate) fn f16_at(b: &[u8], at: usize) -> f32 {
    super::f16::to_f32(u16::from_le_bytes([b[at], b[at + 1]]))
}

/// The 8 sub-block scales `ls − 32` of an IQ4_XS block.
pub(crate) fn xs_scales(block: &[u8]) -> [i32; 8] {
    let high = u16::from_le_bytes([block[2], block[3]]) as i32;
    std::array::from_fn(|s| {
        let low = (block[4 + s / 2] >> (4 * (s % 2))) as i32 & 0xf;
        (low | ((high >> (2 * s)) & 3) << 4) - 32
    })
}

/// The 32 values of 16 bytes of nibbles: low nibbles first.
pub(crate) fn nibbles(qs: &[u8]) -> impl Iterator<Item = usize> + '_ {
    let low = qs.iter().map(|q| (q & 0xf) as usize);
    low.chain(qs.iter().map(|q| (q >> 4) as usize))
}

/// Decodes `out.len()` values stored as `dtype` (IQ4_NL or IQ4_XS).
pub fn dequantize_into(dtype: TensorType, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        TensorType::IQ4NL => {
            for (block, out) in bytes.chunks_exact(NL_BYTES).zip(out.chunks_exact_mut(QK)) {
                let d = f16_at(block, 0);
                for (o, q) in out.iter_mut().zip(nibbles(&block[2..])) {
                    *o = d * KVALUES[q] as f32;
                }
            }
        }
        TensorType::IQ4XS => {
            for (block, out) in bytes.chunks_exact(XS_BYTES).zip(out.chunks_exact_mut(QK_K)) {
                let d = f16_at(block, 0);
                let scales = xs_scales(block);
                for (s, out) in out.chunks_exact_mut(QK).enumerate() {
                    let dl = d * scales[s] as f32;
                    let qs = &block[8 + 16 * s..8 + 16 * (s + 1)];
                    for (o, q) in out.iter_mut().zip(nibbles(qs)) {
                        *o = dl * KVALUES[q] as f32;
                    }
                }
            }
        }
        _ => unreachable!("iq4::dequantize_into takes IQ4 types only"),
    }
}

/// The index of the value of `KVALUES` nearest to `x` (the lower one on a tie).
fn nearest(x: f32) -> usize {
    let above = KVALUES.partition_point(|&v| (v as f32) <= x);
    match above {
        0 => 0,
        16 => 15,
        i if x - (KVALUES[i - 1] as f32) < KVALUES[i] as f32 - x => i - 1,
        i => i,
    }
}

/// The largest magnitude in `x` and the (first) value that has it.
pub(crate) fn abs_max(x: &[f32]) -> (f32, f32) {
    x.iter()
        .fold((0f32, 0f32), |(amax, max), &v| match v.abs() > amax {
            true => (v.abs(), v),
            false => (amax, max),
        })
}

/// The scale of one block of 32 values `x` with weights `w` (`Σ w (x − d·v)²` small):
/// the least-squares scale for the values nearest to `x / d`, over 15 trial `d` around
/// `max / −127`. 0 for an all-zero block.
fn block_scale(x: &[f32], w: &[f32]) -> f32 {
    let (amax, max) = abs_max(x);
    if amax < 1e-15 {
        return 0.0;
    }
    let fit = |id: f32| {
        let (mut sumqx, mut sumq2) = (0f32, 0f32);
        for (&x, &w) in x.iter().zip(w) {
            let q = KVALUES[nearest(id * x)] as f32;
            sumqx += w * q * x;
            sumq2 += w * q * q;
        }
        (sumqx, sumq2)
    };
    let v0 = KVALUES[0] as f32;
    let (sumqx, sumq2) = fit(1.0 / (-max / v0));
    let mut d = sumqx / sumq2;
    let mut best = d * sumqx;
    for step in -7..=7 {
        let (sumqx, sumq2) = fit((step as f32 + v0) / max);
        if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
            d = sumqx / sumq2;
            best = d * sumqx;
        }
    }
    d
}

/// Writes the nibbles of the 32 values `x` quantized with inverse scale `id`.
fn pack(x: &[f32], id: f32, qs: &mut [u8]) {
    for (j, q) in qs.iter_mut().enumerate() {
        *q = nearest(id * x[j]) as u8 | (nearest(id * x[j + 16]) as u8) << 4;
    }
}

pub(crate) fn inverse(d: f32) -> f32 {
    if d != 0.0 {
        1.0 / d
    } else {
        0.0
    }
}

/// Encodes `values` (a whole number of blocks) as `dtype` (IQ4_NL or IQ4_XS).
pub fn quantize_into(dtype: TensorType, values: &[f32], out: &mut [u8]) {
    let weights: Vec<f32> = values.iter().map(|x| x * x).collect();
    match dtype {
        TensorType::IQ4NL => {
            let blocks = out.chunks_exact_mut(NL_BYTES);
            for ((x, w), block) in values.chunks_exact(QK).zip(weights.chunks(QK)).zip(blocks) {
                let d = block_scale(x, w);
                block[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
                pack(x, inverse(d), &mut block[2..]);
            }
        }
        TensorType::IQ4XS => {
            let blocks = out.chunks_exact_mut(XS_BYTES);
            for ((x, w), block) in values
                .chunks_exact(QK_K)
                .zip(weights.chunks(QK_K))
                .zip(blocks)
            {
                let scales: Vec<f32> = (0..8)
                    .map(|s| block_scale(&x[QK * s..QK * (s + 1)], &w[QK * s..QK * (s + 1)]))
                    .collect();
                let max = scales.iter().fold(0f32, |m, &s| match s.abs() > m.abs() {
                    true => s,
                    false => m,
                });
                let d = -max / 32.0;
                let id = inverse(d);
                block[..8].fill(0);
                block[..2].copy_from_slice(&half::f16::from_f32(d).to_le_bytes());
                let mut high = 0u16;
                for (s, &scale) in scales.iter().enumerate() {
                    let l = ((id * scale).round_ties_even() as i32).clamp(-32, 31);
                    let dl = d * l as f32;
                    let xs = &x[QK * s..QK * (s + 1)];
                    pack(xs, inverse(dl), &mut block[8 + 16 * s..8 + 16 * (s + 1)]);
                    let l = (l + 32) as u8;
                    block[4 + s / 2] |= (l & 0xf) << (4 * (s % 2));
                    high |= ((l >> 4) as u16) << (2 * s);
                }
                block[2..4].copy_from_slice(&high.to_le_bytes());
            }
        }
        _ => unreachable!("iq4::quantize_into takes IQ4 types only"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::GgufFile;
    use crate::ops::quant::{dequantize, quantize};

    fn fixture(arch: &str, file: &str) -> GgufFile {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        GgufFile::open(format!("{dir}/tiny-{arch}/{file}"), false).unwrap()
    }

    /// The encoder against llama.cpp's quantizer (`llama_model_quantize`, no importance
    /// matrix) on the same f32 weights: the same bytes.
    #[test]
    fn encoding_equals_llama_cpps() {
        let archs = ["qwen3", "phi3"];
        for (arch, dtype) in archs
            .map(|a| [(a, TensorType::IQ4NL), (a, TensorType::IQ4XS)])
            .concat()
        {
            let f32s = fixture(arch, "base-f32.gguf");
            let theirs = fixture(arch, &format!("base-{}.gguf", dtype.name()));
            let mut n = 0;
            for info in theirs.tensors().iter().filter(|t| t.dtype == dtype) {
                let src = f32s.tensor(&info.name).unwrap();
                let values = dequantize(src.dtype, &f32s.tensor_data(src), src.n_elements());
                let ours = quantize(dtype, &values);
                let theirs = theirs.tensor_data(info);
                let differ = ours
                    .chunks(dtype.type_size())
                    .zip(theirs.chunks(dtype.type_size()))
                    .filter(|(a, b)| a != b)
                    .count();
                assert_eq!(differ, 0, "{dtype} {}: {differ} blocks differ", info.name);
                n += 1;
            }
            assert!(n > 0, "no {dtype} tensor in the fixture");
        }
    }

    #[test]
    fn nearest_picks_the_closest_value_and_the_upper_on_ties() {
        assert_eq!(nearest(-200.0), 0);
        assert_eq!(nearest(500.0), 15);
        assert_eq!(nearest(0.0), 8);
        assert_eq!(nearest(-4.5), 8); // between -10 and 1: 5.5 vs 5.5
        assert_eq!(nearest(-4.6), 7);
        assert_eq!(nearest(f32::NAN), 0);
    }
}
