//! ggml's block formats, read in place through candle's block types and dot kernels.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use half::{bf16, f16};

use super::{codebook, iq4};
use crate::gguf::{GgufFile, TensorInfo, TensorType};

/// Runs `$body` with `$T` bound to the candle block type that stores `$dtype`, or `$other`
/// for the types candle does not read (IQ4_NL, IQ4_XS, the codebook formats).
macro_rules! with_block_type {
    ($dtype:expr, $T:ident => $body:expr, else $other:expr) => {
        match $dtype {
            TensorType::F32 => {
                type $T = f32;
                $body
            }
            TensorType::F16 => {
                type $T = half::f16;
                $body
            }
            TensorType::BF16 => {
                type $T = half::bf16;
                $body
            }
            TensorType::Q4_0 => {
                type $T = candle_core::quantized::k_quants::BlockQ4_0;
                $body
            }
            TensorType::Q4_1 => {
                type $T = candle_core::quantized::k_quants::BlockQ4_1;
                $body
            }
            TensorType::Q5_0 => {
                type $T = candle_core::quantized::k_quants::BlockQ5_0;
                $body
            }
            TensorType::Q5_1 => {
                type $T = candle_core::quantized::k_quants::BlockQ5_1;
                $body
            }
            TensorType::Q8_0 => {
                type $T = candle_core::quantized::k_quants::BlockQ8_0;
                $body
            }
            TensorType::Q2K => {
                type $T = candle_core::quantized::k_quants::BlockQ2K;
                $body
            }
            TensorType::Q3K => {
                type $T = candle_core::quantized::k_quants::BlockQ3K;
                $body
            }
            TensorType::Q4K => {
                type $T = candle_core::quantized::k_quants::BlockQ4K;
                $body
            }
            TensorType::Q5K => {
                type $T = candle_core::quantized::k_quants::BlockQ5K;
                $body
            }
            TensorType::Q6K => {
                type $T = candle_core::quantized::k_quants::BlockQ6K;
                $body
            }
            TensorType::IQ4NL
            | TensorType::IQ4XS
            | TensorType::IQ2XXS
            | TensorType::IQ2XS
            | TensorType::IQ2S
            | TensorType::IQ3XXS
            | TensorType::IQ3S
            | TensorType::IQ1S
            | TensorType::IQ1M => $other,
        }
    };
}
pub(crate) use with_block_type;

/// Reinterprets bytes as blocks in place.
///
/// The GGUF reader has checked that every tensor's length is a whole number of blocks and its
/// offset a multiple of the type's alignment; `Weight` keeps that invariant.
pub fn as_blocks<T: GgmlType>(bytes: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    assert!(
        bytes.len().is_multiple_of(size)
            && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()),
        "tensor bytes are not whole, aligned blocks"
    );
    // SAFETY: the blocks are `#[repr(C)]` structs of integers, f16 and byte arrays (or plain
    // floats), valid for any bit pattern; length and alignment are checked just above.
    unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), bytes.len() / size) }
}

pub fn as_blocks_mut<T: GgmlType>(bytes: &mut [u8]) -> &mut [T] {
    let size = std::mem::size_of::<T>();
    assert!(
        bytes.len().is_multiple_of(size)
            && (bytes.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>()),
        "tensor bytes are not whole, aligned blocks"
    );
    // SAFETY: as in `as_blocks`; the borrow is unique.
    unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr().cast::<T>(), bytes.len() / size) }
}

/// Converts `out.len()` elements stored as `dtype` to f32.
pub fn dequantize_into(dtype: TensorType, bytes: &[u8], out: &mut [f32]) {
    use half::slice::HalfFloatSliceExt;
    match dtype {
        // `half` converts slices with the CPU's vector instructions; candle's `to_float`
        // converts one value at a time.
        TensorType::F16 => as_blocks::<half::f16>(bytes).convert_to_f32_slice(out),
        TensorType::BF16 => as_blocks::<half::bf16>(bytes).convert_to_f32_slice(out),
        _ => with_block_type!(
            dtype, T => T::to_float(as_blocks::<T>(bytes), out),
            else match codebook::reads(dtype) {
                true => codebook::dequantize_into(dtype, bytes, out),
                false => iq4::dequantize_into(dtype, bytes, out),
            }
        ),
    }
}

pub fn dequantize(dtype: TensorType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![0f32; n];
    dequantize_into(dtype, bytes, &mut out);
    out
}

/// A tensor of `file` converted to f32 (adapters and small vectors: norms, biases).
pub fn tensor_f32(file: &GgufFile, info: &TensorInfo) -> Vec<f32> {
    dequantize(info.dtype, &file.tensor_data(info), info.n_elements())
}

/// Whether `quantize` can encode `dtype`: every type but the codebook formats, whose encoders
/// search their grids with an importance matrix.
pub fn encodes(dtype: TensorType) -> bool {
    !codebook::reads(dtype)
}

/// Encodes f32 values as `dtype` (rows must be whole blocks; `encodes(dtype)`). Used to write
/// merged models.
pub fn quantize(dtype: TensorType, values: &[f32]) -> Vec<u8> {
    assert!(encodes(dtype), "quantize: lugh does not encode {dtype}");
    let n_bytes = dtype
        .row_bytes(values.len())
        .expect("quantize: length must be a whole number of blocks");
    // u32 storage keeps the buffer aligned for every block type (f32 needs 4).
    let mut storage = vec![0u32; n_bytes.div_ceil(4)];
    let bytes = bytes_of_mut(&mut storage, n_bytes);
    with_block_type!(
        dtype, T => T::from_float(values, as_blocks_mut::<T>(bytes)),
        else iq4::quantize_into(dtype, values, bytes)
    );
    bytes.to_vec()
}

fn bytes_of_mut(storage: &mut [u32], n_bytes: usize) -> &mut [u8] {
    assert!(n_bytes <= 4 * storage.len());
    // SAFETY: u8 has no alignment or validity requirements; the length is checked above.
    unsafe { std::slice::from_raw_parts_mut(storage.as_mut_ptr().cast::<u8>(), n_bytes) }
}

// The block sizes lugh's table declares must equal candle's struct sizes.
const _: () = {
    assert!(std::mem::size_of::<BlockQ4_0>() == 18);
    assert!(std::mem::size_of::<BlockQ4_1>() == 20);
    assert!(std::mem::size_of::<BlockQ5_0>() == 22);
    assert!(std::mem::size_of::<BlockQ5_1>() == 24);
    assert!(std::mem::size_of::<BlockQ8_0>() == 34);
    assert!(std::mem::size_of::<BlockQ2K>() == 84);
    assert!(std::mem::size_of::<BlockQ3K>() == 110);
    assert!(std::mem::size_of::<BlockQ4K>() == 144);
    assert!(std::mem::size_of::<BlockQ5K>() == 176);
    assert!(std::mem::size_of::<BlockQ6K>() == 210);
    assert!(std::mem::size_of::<f16>() == 2);
    assert!(std::mem::size_of::<bf16>() == 2);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_round_trip_is_close() {
        let values: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 8.0).collect();
        let bytes = quantize(TensorType::Q8_0, &values);
        assert_eq!(bytes.len(), 68);
        let back = dequantize(TensorType::Q8_0, &bytes, 64);
        for (a, b) in values.iter().zip(&back) {
            assert!((a - b).abs() < 4.0 / 127.0 / 2.0 + 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn f16_is_exact_for_small_integers() {
        let values = [1.0f32, -2.0, 0.5, 1024.0];
        let bytes = quantize(TensorType::F16, &values);
        assert_eq!(dequantize(TensorType::F16, &bytes, 4), values);
    }
}
