//! Every kernel against candle's `vec_dot` and against the dequantized product, on quantized
//! random values and on random block bytes; one token alone against the same token in a batch.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};

use super::*;
use crate::ops::quant::{as_blocks, quantize};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }

    /// Uniform in [-1, 1).
    fn float(&mut self) -> f32 {
        self.next() as f32 / (1u64 << 30) as f32 - 1.0
    }
}

/// `[n_rows, k]` weights of `dtype`: rows of quantized random values, and every third row
/// random bytes but for its f16 scales (any other bit pattern is a valid block); for the
/// codebook formats, every row random.
fn weights(dtype: TensorType, n_rows: usize, k: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let values: Vec<f32> = (0..n_rows * k).map(|_| rng.float()).collect();
    // The codebook formats have no encoder: every row random.
    let encodes = crate::ops::quant::encodes(dtype);
    let mut bytes = match encodes {
        true => quantize(dtype, &values),
        false => vec![0; n_rows * dtype.row_bytes(k).unwrap()],
    };
    if matches!(dtype, TensorType::F16 | TensorType::BF16) {
        return bytes;
    }
    let halves: &[usize] = match dtype {
        TensorType::Q4K | TensorType::Q5K => &[0, 2],
        TensorType::Q6K => &[208],
        TensorType::Q2K => &[80, 82],
        TensorType::Q3K => &[108],
        TensorType::Q4_1 | TensorType::Q5_1 => &[0, 2],
        _ => &[0],
    };
    let (block_bytes, row_bytes) = (dtype.type_size(), dtype.row_bytes(k).unwrap());
    for row in bytes
        .chunks_mut(row_bytes)
        .step_by(if encodes { 3 } else { 1 })
    {
        for block in row.chunks_mut(block_bytes) {
            block.iter_mut().for_each(|b| *b = rng.next() as u8);
            for &h in halves {
                let d = half::f16::from_f32(0.001 + 0.05 * rng.float().abs());
                block[h..h + 2].copy_from_slice(&d.to_le_bytes());
            }
        }
    }
    bytes
}

/// candle's products, `[m, n_rows]`, and the dequantized ones in f64 with the sums of
/// magnitudes they are compared to.
fn references<T: GgmlType>(
    data: &[u8],
    n_rows: usize,
    k: usize,
    x: &[f32],
) -> (Vec<f32>, Vec<f64>, Vec<f64>) {
    let m = x.len() / k;
    let nb = k / T::BLCK_SIZE;
    let w = as_blocks::<T>(data);
    let mut dense = vec![0f32; n_rows * k];
    T::to_float(w, &mut dense);
    let (mut theirs, mut naive, mut scale) = (vec![], vec![], vec![]);
    for t in 0..m {
        let mut xq = vec![T::VecDotType::zeros(); nb];
        T::VecDotType::from_float(&x[t * k..(t + 1) * k], &mut xq);
        let mut xd = vec![0f32; k];
        T::VecDotType::to_float(&xq, &mut xd);
        for r in 0..n_rows {
            theirs.push(T::vec_dot(k, &w[r * nb..(r + 1) * nb], &xq));
            let row = &dense[r * k..(r + 1) * k];
            naive.push(
                row.iter()
                    .zip(&xd)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum(),
            );
            scale.push(
                row.iter()
                    .zip(&xd)
                    .map(|(&a, &b)| (a as f64 * b as f64).abs())
                    .sum(),
            );
        }
    }
    (theirs, naive, scale)
}

/// Every kernel on `n_rows` rows of `k` values: against the references, and each batch size
/// against the same tokens alone.
fn check<T: GgmlType>(dtype: TensorType, n_rows: usize, k: usize) {
    check_within::<T>(dtype, n_rows, k, 2e-6)
}

/// `check` within `rel` of the sums of magnitudes.
fn check_within<T: GgmlType>(dtype: TensorType, n_rows: usize, k: usize, rel: f64) {
    if !supports(dtype) {
        eprintln!("no {dtype} kernels on this CPU ({:?}): not tested", isa());
        return;
    }
    let data = weights(dtype, n_rows, k, k as u64);
    let mut rng = Rng(7);
    let x: Vec<f32> = (0..33 * k).map(|_| 3.0 * rng.float()).collect();
    let all = {
        let mut y = vec![0f32; 33 * n_rows];
        assert!(matmul(dtype, &data, n_rows, k, &x, &mut y));
        y
    };
    assert_near_references::<T>(dtype, &data, n_rows, k, &x, &all, rel);
    // Any batch size, either kernel: each token's outputs are the same bits.
    for m in [1, 2, 3, 4, 5, 6, 16, 17, 31] {
        let mut y = vec![0f32; m * n_rows];
        assert!(matmul(dtype, &data, n_rows, k, &x[..m * k], &mut y));
        for (i, (a, b)) in y.iter().zip(&all).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{dtype} k={k} m={m} [{i}]: {a} vs {b}"
            );
        }
    }
}

/// `check` of the half kernels at this CPU's best level; on x86, where that is AVX-512,
/// `check_half_levels` too.
fn check_halves<H: halves::Half, T: GgmlType>(dtype: TensorType, n_rows: usize, k: usize) {
    check::<T>(dtype, n_rows, k);
    #[cfg(target_arch = "x86_64")]
    if isa() == Isa::Avx512 {
        check_half_levels::<H, T>(dtype, n_rows, k);
    }
}

/// The widened AVX-512 half kernels (which BF16 leaves for `vdpbf16ps` where the CPU has
/// AVX512_BF16) against the references, and the AVX2 ones bit for bit against them for every
/// batch size.
#[cfg(target_arch = "x86_64")]
fn check_half_levels<H: halves::Half, T: GgmlType>(dtype: TensorType, n_rows: usize, k: usize) {
    use halves::Level;
    let data = weights(dtype, n_rows, k, k as u64);
    let mut rng = Rng(7);
    let x: Vec<f32> = (0..33 * k).map(|_| 3.0 * rng.float()).collect();
    let run = |x: &[f32], level: Level| {
        let mut y = vec![0f32; x.len() / k * n_rows];
        halves::run::<H>(&data, n_rows, k, x, &mut y, level);
        y
    };
    let (_, naive, scale) = references::<T>(&data, n_rows, k, &x);
    for (i, v) in run(&x, Level::Avx512).into_iter().enumerate() {
        let tol = 2e-6 * scale[i] + 1e-6;
        assert!((v as f64 - naive[i]).abs() <= tol, "{dtype} k={k} [{i}]");
    }
    for m in [1, 2, 3, 5, 6, 16, 17, 33] {
        let x = &x[..m * k];
        let (avx2, avx512) = (run(x, Level::Avx2), run(x, Level::Avx512));
        for (i, (a, b)) in avx2.iter().zip(&avx512).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{dtype} k={k} m={m} [{i}]: {a} vs {b}"
            );
        }
    }
}

#[test]
fn f16_and_bf16_match_candle_on_every_instruction_set() {
    for k in [40, 48, 256, 2056] {
        check_halves::<halves::F16, half::f16>(TensorType::F16, 13, k);
        check_halves::<halves::Bf16, half::bf16>(TensorType::BF16, 13, k);
    }
}

/// `halves`' sum order in scalar code: lane `l` of 16 sums `w_i x_i` for `i ≡ l (mod 16)`,
/// `i` ascending, by fused multiply-adds (zeros from `w.len()` to the next multiple of 16);
/// then the lanes added by halves, quarters, pairs and neighbours.
fn half_sum_order(w: &[f32], x: &[f32]) -> f32 {
    let mut lanes = [0f32; 16];
    for i in 0..w.len().next_multiple_of(16) {
        let (w, x) = (
            w.get(i).copied().unwrap_or(0.0),
            x.get(i).copied().unwrap_or(0.0),
        );
        lanes[i % 16] = w.mul_add(x, lanes[i % 16]);
    }
    for n in [8, 4, 2, 1] {
        for l in 0..n {
            lanes[l] += lanes[l + n];
        }
    }
    lanes[0]
}

/// The half kernel `name`, `run(x, y)` on `n_rows` rows of `k` values, against
/// `half_sum_order` of the weights widened and the activations rounded to `H`: the same bits,
/// for 1 token and for 17. Some activations are scaled into F16's subnormals.
fn check_sum_order<H: halves::Half, T: GgmlType>(
    dtype: TensorType,
    n_rows: usize,
    k: usize,
    name: &str,
    run: impl Fn(&[u8], &[f32], &mut [f32]),
) {
    let data = weights(dtype, n_rows, k, k as u64);
    let mut dense = vec![0f32; n_rows * k];
    T::to_float(as_blocks::<T>(&data), &mut dense);
    let mut rng = Rng(9);
    let x: Vec<f32> = (0..200 * k)
        .map(|i| 3.0 * rng.float() * if i % 7 == 0 { 1e-6 } else { 1.0 })
        .collect();
    let rounded: Vec<f32> = x.iter().map(|&v| H::round(v)).collect();
    // 200 tokens: at k = 2056, two blocks of tokens of the x86 tiles, the second ending in
    // a tile of two.
    for m in [1, 17, 200] {
        let mut y = vec![0f32; m * n_rows];
        run(&data, &x[..m * k], &mut y);
        for (i, &v) in y.iter().enumerate() {
            let (t, r) = (i / n_rows, i % n_rows);
            let model = half_sum_order(&dense[r * k..][..k], &rounded[t * k..][..k]);
            assert_eq!(
                v.to_bits(),
                model.to_bits(),
                "{dtype} k={k} m={m} [{i}]: {name} {v} vs the sum order's {model}"
            );
        }
    }
}

/// NEON's half kernel follows `halves`' sum order to the bit: so it gives the same bits as
/// x86's widened kernels, which `widened_half_kernels_follow_the_sum_order` holds to it too.
#[cfg(target_arch = "aarch64")]
#[test]
fn neon_half_kernels_follow_the_sum_order() {
    fn neon<H: halves::Half, T: GgmlType>(dtype: TensorType, k: usize) {
        let run = |data: &[u8], x: &[f32], y: &mut [f32]| {
            assert!(matmul(dtype, data, 13, k, x, y));
        };
        match supports(dtype) {
            true => check_sum_order::<H, T>(dtype, 13, k, "NEON", run),
            false => eprintln!("LUGH_ISA={:?}: the NEON half kernels are not tested", isa()),
        }
    }
    for k in [16, 40, 48, 256, 2056] {
        neon::<halves::F16, half::f16>(TensorType::F16, k);
        neon::<halves::Bf16, half::bf16>(TensorType::BF16, k);
    }
}

/// x86's widened half kernels (AVX2, and AVX-512 where the CPU has it; rows and tiles)
/// follow `halves`' sum order to the bit, as NEON's do.
#[cfg(target_arch = "x86_64")]
#[test]
fn widened_half_kernels_follow_the_sum_order() {
    fn x86<H: halves::Half, T: GgmlType>(dtype: TensorType, k: usize) {
        let mut levels = vec![];
        if isa() >= Isa::Avx2 {
            levels.push(halves::Level::Avx2);
        }
        if isa() == Isa::Avx512 {
            levels.push(halves::Level::Avx512);
        }
        if levels.is_empty() {
            eprintln!(
                "LUGH_ISA={:?}: the widened half kernels are not tested",
                isa()
            );
        }
        for level in levels {
            let run = |data: &[u8], x: &[f32], y: &mut [f32]| {
                halves::run::<H>(data, 13, k, x, y, level);
            };
            check_sum_order::<H, T>(dtype, 13, k, &format!("{level:?}"), run);
        }
    }
    for k in [16, 37, 40, 45, 48, 256, 2056] {
        x86::<halves::F16, half::f16>(TensorType::F16, k);
        x86::<halves::Bf16, half::bf16>(TensorType::BF16, k);
    }
}

#[test]
fn half_tiles_span_several_row_blocks_per_task() {
    // 77 rows on 2 threads: 8 tasks of 8 or 12 rows, so whole 8-row blocks and a remainder.
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    pool.install(|| {
        check_halves::<halves::F16, half::f16>(TensorType::F16, 77, 2056);
        check_halves::<halves::Bf16, half::bf16>(TensorType::BF16, 77, 2056);
    });
}

#[test]
fn q4_k_matches_candle() {
    for k in [256, 768, 2048] {
        check::<BlockQ4K>(TensorType::Q4K, 13, k);
    }
}

#[test]
fn q5_k_matches_candle() {
    for k in [256, 768, 2048] {
        check::<BlockQ5K>(TensorType::Q5K, 13, k);
    }
}

#[test]
fn q6_k_matches_candle() {
    for k in [256, 768, 2048] {
        check::<BlockQ6K>(TensorType::Q6K, 13, k);
    }
}

#[test]
fn q8_0_matches_candle() {
    for k in [32, 96, 160, 2048] {
        check::<BlockQ8_0>(TensorType::Q8_0, 13, k);
    }
}

#[test]
fn q4_0_matches_candle() {
    for k in [32, 96, 160, 2048] {
        check::<BlockQ4_0>(TensorType::Q4_0, 13, k);
    }
}

#[test]
fn q5_0_matches_candle() {
    for k in [32, 96, 160, 576, 2048] {
        check::<BlockQ5_0>(TensorType::Q5_0, 13, k);
    }
}

/// The kernels against the portable product (`ops::portable`): the same bits, for every batch
/// size and either kernel.
fn check_portable(dtype: TensorType, n_rows: usize, k: usize) {
    if !supports(dtype) {
        eprintln!("no {dtype} kernels on this CPU ({:?}): not tested", isa());
        return;
    }
    let data = weights(dtype, n_rows, k, k as u64);
    let mut rng = Rng(11);
    let x: Vec<f32> = (0..33 * k).map(|_| 3.0 * rng.float()).collect();
    for m in [1, 2, 5, 6, 16, 17, 33] {
        let (x, mut ours, mut portable) =
            (&x[..m * k], vec![0f32; m * n_rows], vec![0f32; m * n_rows]);
        assert!(matmul(dtype, &data, n_rows, k, x, &mut ours));
        crate::ops::portable::matmul(dtype, &data, n_rows, k, x, &mut portable);
        for (i, (a, b)) in ours.iter().zip(&portable).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{dtype} k={k} m={m} [{i}]: {a} vs {b}"
            );
        }
    }
}

/// The mins multiply ggml's Q8_1 `s`, each activation block's sum times its scale rounded to
/// f16: up to 2⁻¹¹ of that term from the dequantized product, and from candle, which rounds
/// the sum and the scale to f16 and multiplies them in f16.
const Q8_1_SUMS: f64 = 1e-3;

#[test]
fn q4_1_matches_candle() {
    for k in [32, 96, 160, 576, 2048] {
        check_within::<BlockQ4_1>(TensorType::Q4_1, 13, k, Q8_1_SUMS);
        check_portable(TensorType::Q4_1, 13, k);
    }
}

#[test]
fn q5_1_matches_candle() {
    for k in [32, 96, 160, 576, 2048] {
        check_within::<BlockQ5_1>(TensorType::Q5_1, 13, k, Q8_1_SUMS);
        check_portable(TensorType::Q5_1, 13, k);
    }
}

#[test]
fn iq4_nl_equals_the_portable_product() {
    for k in [32, 96, 160, 576, 2048] {
        check_portable(TensorType::IQ4NL, 13, k);
    }
}

#[test]
fn iq4_xs_equals_the_portable_product() {
    for k in [256, 768, 2048] {
        check_portable(TensorType::IQ4XS, 13, k);
    }
}

/// The portable product alone (on any CPU) within 2e-6 of candle's and the dequantized one.
fn check_portable_references<T: GgmlType>(dtype: TensorType, n_rows: usize, k: usize) {
    let data = weights(dtype, n_rows, k, k as u64);
    let mut rng = Rng(13);
    let x: Vec<f32> = (0..5 * k).map(|_| 3.0 * rng.float()).collect();
    let mut ours = vec![0f32; 5 * n_rows];
    crate::ops::portable::matmul(dtype, &data, n_rows, k, &x, &mut ours);
    assert_near_references::<T>(dtype, &data, n_rows, k, &x, &ours, 2e-6);
}

/// `ours`, the product of `data` and `x`, within `rel` of the sums of magnitudes from candle's
/// and from the dequantized one.
fn assert_near_references<T: GgmlType>(
    dtype: TensorType,
    data: &[u8],
    n_rows: usize,
    k: usize,
    x: &[f32],
    ours: &[f32],
    rel: f64,
) {
    let (theirs, naive, scale) = references::<T>(data, n_rows, k, x);
    for (i, &v) in ours.iter().enumerate() {
        let tol = rel * scale[i] + 1e-6;
        assert!(
            (v as f64 - theirs[i] as f64).abs() <= tol,
            "{dtype} k={k} [{i}]: {v} vs candle {}",
            theirs[i]
        );
        assert!(
            (v as f64 - naive[i]).abs() <= tol,
            "{dtype} k={k} [{i}]: {v} vs dequantized {}",
            naive[i]
        );
    }
}

#[test]
fn q2_k_and_q3_k_match_candle() {
    for k in [256, 768, 2048] {
        check_portable_references::<BlockQ2K>(TensorType::Q2K, 13, k);
        check_portable_references::<BlockQ3K>(TensorType::Q3K, 13, k);
        check::<BlockQ2K>(TensorType::Q2K, 13, k);
        check_portable(TensorType::Q2K, 13, k);
        check::<BlockQ3K>(TensorType::Q3K, 13, k);
        check_portable(TensorType::Q3K, 13, k);
    }
}

/// The AVX2 row kernel of one format on `n_rows` rows of `k` values: bit for bit against the
/// portable product, within a tolerance of candle's (where candle reads the format as ggml
/// does) and the dequantized one; and bit for bit against the AVX-512 kernels where the CPU
/// has them.
#[cfg(target_arch = "x86_64")]
fn check_avx2<B: driver::Avx2Rows, T: GgmlType>(dtype: TensorType, n_rows: usize, k: usize) {
    if !(is_x86_feature_detected!("avx2")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c"))
    {
        eprintln!("no AVX2: the AVX2 kernels are not tested on this CPU");
        return;
    }
    let data = weights(dtype, n_rows, k, k as u64);
    let mut rng = Rng(5);
    let x: Vec<f32> = (0..9 * k).map(|_| 3.0 * rng.float()).collect();
    let mut ours = vec![0f32; 9 * n_rows];
    driver::run_rows::<driver::Avx2<B>>(&data, n_rows, k, &x, &mut ours);
    let mut portable = vec![0f32; 9 * n_rows];
    crate::ops::portable::matmul(dtype, &data, n_rows, k, &x, &mut portable);
    for (i, (a, b)) in ours.iter().zip(&portable).enumerate() {
        assert_eq!(
            a.to_bits(),
            b.to_bits(),
            "{dtype} k={k} [{i}]: AVX2 vs portable"
        );
    }
    if !crate::ops::portable::supports(dtype) {
        let (theirs, naive, scale) = references::<T>(&data, n_rows, k, &x);
        for (i, &v) in ours.iter().enumerate() {
            let tol = 2e-6 * scale[i] + 1e-6;
            assert!(
                (v as f64 - theirs[i] as f64).abs() <= tol,
                "{dtype} k={k} [{i}]: vs candle"
            );
            assert!(
                (v as f64 - naive[i]).abs() <= tol,
                "{dtype} k={k} [{i}]: vs dequantized"
            );
        }
    }
    if isa() == Isa::Avx512 {
        let mut avx512 = vec![0f32; 9 * n_rows];
        assert!(matmul(dtype, &data, n_rows, k, &x, &mut avx512));
        for (i, (a, b)) in ours.iter().zip(&avx512).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{dtype} k={k} [{i}]: AVX2 vs AVX-512"
            );
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_row_kernels_match_candle_and_the_avx512_kernels() {
    for k in [32, 96, 576, 2048] {
        check_avx2::<q8_0::Q8_0, BlockQ8_0>(TensorType::Q8_0, 13, k);
        check_avx2::<q8_0::Q4_0, BlockQ4_0>(TensorType::Q4_0, 13, k);
        check_avx2::<q8_0::Q5_0, BlockQ5_0>(TensorType::Q5_0, 13, k);
        check_avx2::<q8_0::Q4_1, BlockQ4_1>(TensorType::Q4_1, 13, k);
        check_avx2::<q8_0::Q5_1, BlockQ5_1>(TensorType::Q5_1, 13, k);
        check_avx2::<q8_0::IQ4NL, BlockQ4_0>(TensorType::IQ4NL, 13, k);
    }
    for k in [256, 768, 2048] {
        check_avx2::<q4k::Q4K, BlockQ4K>(TensorType::Q4K, 13, k);
        check_avx2::<q4k::Q5K, BlockQ5K>(TensorType::Q5K, 13, k);
        check_avx2::<q6k::Q6K, BlockQ6K>(TensorType::Q6K, 13, k);
        check_avx2::<iq4xs::IQ4XS, BlockQ4K>(TensorType::IQ4XS, 13, k);
        check_avx2::<q23k::Q2K, BlockQ2K>(TensorType::Q2K, 13, k);
        check_avx2::<q23k::Q3K, BlockQ3K>(TensorType::Q3K, 13, k);
    }
}

/// The AVX2 kernels of one format (rows below `MIN_TILED` tokens, tiles from it) for every
/// batch size up to 33: the same bits as the AVX2 row kernel, the portable product and, where
/// the CPU has it, the AVX-512 kernels for that batch size.
#[cfg(target_arch = "x86_64")]
fn check_avx2_tiles<B: driver::Avx2Rows>(dtype: TensorType, n_rows: usize, k: usize)
where
    driver::Avx2<B>: driver::Format,
{
    if !is_x86_feature_detected!("avx2") || !is_x86_feature_detected!("fma") {
        return;
    }
    let data = weights(dtype, n_rows, k, k as u64);
    let mut rng = Rng(3);
    let x: Vec<f32> = (0..33 * k).map(|_| 3.0 * rng.float()).collect();
    let mut rows = vec![0f32; 33 * n_rows];
    driver::run_rows::<driver::Avx2<B>>(&data, n_rows, k, &x, &mut rows);
    for m in 1..=33 {
        let x = &x[..m * k];
        let mut ours = vec![0f32; m * n_rows];
        driver::run::<driver::Avx2<B>>(&data, n_rows, k, x, &mut ours);
        let mut portable = vec![0f32; m * n_rows];
        crate::ops::portable::matmul(dtype, &data, n_rows, k, x, &mut portable);
        let mut others = vec![("rows", &rows[..m * n_rows]), ("portable", &portable)];
        let mut avx512 = vec![0f32; m * n_rows];
        if isa() == Isa::Avx512 {
            assert!(matmul(dtype, &data, n_rows, k, x, &mut avx512));
            others.push(("AVX-512", &avx512));
        }
        for (name, other) in others {
            for (i, (a, b)) in ours.iter().zip(other).enumerate() {
                assert_eq!(
                    a.to_bits(),
                    b.to_bits(),
                    "{dtype} k={k} m={m} [{i}]: AVX2 vs {name}"
                );
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_kernels_equal_the_rows_portable_and_avx512_at_every_batch_size() {
    for k in [32, 96, 576] {
        check_avx2_tiles::<q8_0::Q8_0>(TensorType::Q8_0, 13, k);
        check_avx2_tiles::<q8_0::Q4_0>(TensorType::Q4_0, 13, k);
        check_avx2_tiles::<q8_0::Q5_0>(TensorType::Q5_0, 13, k);
        check_avx2_tiles::<q8_0::Q4_1>(TensorType::Q4_1, 13, k);
        check_avx2_tiles::<q8_0::Q5_1>(TensorType::Q5_1, 13, k);
        check_avx2_tiles::<q8_0::IQ4NL>(TensorType::IQ4NL, 13, k);
    }
    for k in [256, 768, 2048] {
        check_avx2_tiles::<q4k::Q4K>(TensorType::Q4K, 13, k);
        check_avx2_tiles::<q4k::Q5K>(TensorType::Q5K, 13, k);
        check_avx2_tiles::<q6k::Q6K>(TensorType::Q6K, 13, k);
        check_avx2_tiles::<iq4xs::IQ4XS>(TensorType::IQ4XS, 13, k);
        check_avx2_tiles::<q23k::Q2K>(TensorType::Q2K, 13, k);
        check_avx2_tiles::<q23k::Q3K>(TensorType::Q3K, 13, k);
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn codebook_kernels_equal_the_portable_product_at_every_batch_size() {
    use super::codebook::Codebook;
    use crate::ops::codebook as cb;
    for k in [256, 768, 2048] {
        for dtype in [
            TensorType::IQ2XXS,
            TensorType::IQ2XS,
            TensorType::IQ2S,
            TensorType::IQ3XXS,
            TensorType::IQ3S,
            TensorType::IQ1S,
            TensorType::IQ1M,
        ] {
            check_portable(dtype, 13, k);
        }
        check_avx2_tiles::<Codebook<cb::IQ2XXS>>(TensorType::IQ2XXS, 13, k);
        check_avx2_tiles::<Codebook<cb::IQ2XS>>(TensorType::IQ2XS, 13, k);
        check_avx2_tiles::<Codebook<cb::IQ2S>>(TensorType::IQ2S, 13, k);
        check_avx2_tiles::<Codebook<cb::IQ3XXS>>(TensorType::IQ3XXS, 13, k);
        check_avx2_tiles::<Codebook<cb::IQ3S>>(TensorType::IQ3S, 13, k);
        check_avx2_tiles::<Codebook<cb::IQ1S>>(TensorType::IQ1S, 13, k);
        check_avx2_tiles::<Codebook<cb::IQ1M>>(TensorType::IQ1M, 13, k);
    }
}

/// The NEON row kernel of format `F`, with widening multiplies, `sdot` and `smmla` (where the
/// CPU has them): bit for bit against the portable product (candle's `check`s test the one
/// `matmul` takes against candle).
#[cfg(target_arch = "aarch64")]
fn check_neon<F: neon::Vectors>(dtype: TensorType, n_rows: usize, k: usize) {
    let data = weights(dtype, n_rows, k, k as u64);
    let mut rng = Rng(5);
    let x: Vec<f32> = (0..5 * k).map(|_| 3.0 * rng.float()).collect();
    let mut portable = vec![0f32; 5 * n_rows];
    crate::ops::portable::matmul(dtype, &data, n_rows, k, &x, &mut portable);
    type Product = fn(&[u8], usize, usize, &[f32], &mut [f32]);
    let kernels: [(&str, bool, Product); 3] = [
        (
            "widening",
            true,
            driver::run_rows::<neon::Neon<F, neon::Widening>>,
        ),
        (
            "sdot",
            std::arch::is_aarch64_feature_detected!("dotprod"),
            driver::run_rows::<neon::Neon<F, neon::Sdot>>,
        ),
        (
            "smmla",
            std::arch::is_aarch64_feature_detected!("i8mm"),
            driver::run_rows::<neon::Neon<F, neon::Smmla>>,
        ),
    ];
    for (name, has, product) in kernels {
        if !has {
            eprintln!("this CPU lacks {name}: those kernels are not tested here");
            continue;
        }
        let mut ours = vec![0f32; 5 * n_rows];
        product(&data, n_rows, k, &x, &mut ours);
        for (i, (a, b)) in ours.iter().zip(&portable).enumerate() {
            assert_eq!(
                a.to_bits(),
                b.to_bits(),
                "{dtype} k={k} [{i}]: NEON {name} vs portable"
            );
        }
    }
}

#[cfg(target_arch = "aarch64")]
#[test]
fn neon_row_kernels_equal_the_portable_product() {
    use crate::ops::codebook as cb;
    use crate::ops::portable::*;
    for k in [32, 96, 576, 2048] {
        check_neon::<Q8_0>(TensorType::Q8_0, 13, k);
        check_neon::<Q4_0>(TensorType::Q4_0, 13, k);
        check_neon::<Q5_0>(TensorType::Q5_0, 13, k);
        check_neon::<Q4_1>(TensorType::Q4_1, 13, k);
        check_neon::<Q5_1>(TensorType::Q5_1, 13, k);
        check_neon::<IQ4NL>(TensorType::IQ4NL, 13, k);
    }
    for k in [256, 768, 2048] {
        check_neon::<Q4K>(TensorType::Q4K, 13, k);
        check_neon::<Q5K>(TensorType::Q5K, 13, k);
        check_neon::<Q6K>(TensorType::Q6K, 13, k);
        check_neon::<IQ4XS>(TensorType::IQ4XS, 13, k);
        check_neon::<Q2K>(TensorType::Q2K, 13, k);
        check_neon::<Q3K>(TensorType::Q3K, 13, k);
        check_neon::<cb::IQ2XXS>(TensorType::IQ2XXS, 13, k);
        check_neon::<cb::IQ2XS>(TensorType::IQ2XS, 13, k);
        check_neon::<cb::IQ2S>(TensorType::IQ2S, 13, k);
        check_neon::<cb::IQ3XXS>(TensorType::IQ3XXS, 13, k);
        check_neon::<cb::IQ3S>(TensorType::IQ3S, 13, k);
        check_neon::<cb::IQ1S>(TensorType::IQ1S, 13, k);
        check_neon::<cb::IQ1M>(TensorType::IQ1M, 13, k);
    }
}

#[test]
fn other_types_are_declined() {
    let mut y = vec![0f32; 2];
    let data = quantize(TensorType::F32, &[0.5; 512]);
    assert!(!matmul(TensorType::F32, &data, 2, 256, &[1.0; 256], &mut y));
    assert_eq!(y, [0.0, 0.0]);
}
