//! `y = x Wᵀ` for quantized weights read in place (ggml's block layouts), with integer
//! kernels for the CPU's instruction set chosen at run time (`Isa`); `Weight::matmul` falls
//! back to `ops::portable` or candle's `vec_dot` where this module declines (another CPU,
//! another type).
//!
//! **Numerics.** Each token is quantized as ggml does for the weight's dot type (Q8_K for the
//! K-quants, Q8_0 for the 32-value blocks), bit for bit as candle's `from_float`. For each
//! weight block `b` and token, a kernel computes exact integer sums — `S_b`, the block's
//! scaled dot product, and for Q2_K, Q4_K and Q5_K `M_b = Σ_s min_s · Σ_{i∈s} x_i` — and
//! accumulates in f32, blocks in order:
//!
//! ```text
//!     y = 0;  y = fma(S_b, d_w·d_x, y);  y = fma(M_b, -(dmin_w·d_x), y)   for b = 0, 1, ...
//! ```
//!
//! The kernels differ from ggml's and candle's `vec_dot` only in the order of these float
//! operations. Every kernel performs exactly this sequence, so a token's output is the same to
//! the bit whether it is computed alone (decode) or with others (prefill).
//!
//! **Kernels.** Per format and instruction set:
//! - `rows4`: 4 weight rows × 1 token, straight from the blocks; for decode and small batches.
//!   Memory bound: its job is to stream the weights at full bandwidth. AVX-512, AVX2 and NEON
//!   (`neon`: `sdot` where the CPU has `dotprod`, else widening multiplies; batches take it 4
//!   tokens at a time, each block's values decoded once for the four, by `smmla` where the
//!   CPU has `i8mm`).
//! - `tile`: 4 weight rows × 16 or 32 tokens (AVX-512 and AVX2). Each task first unpacks its
//!   next 4 rows into scratch (values as bytes, scales as i32: a few KiB that stay in L1,
//!   never the whole matrix), the tokens are laid out 16 to a vector (`act::Groups`), and one
//!   `vpdpbusd` multiplies 4 weights (broadcast) with 4 values of 16 tokens: 64 multiply-adds
//!   per instruction, on 8 accumulators at a time. AVX2 has no `vpdpbusd`: `vpmaddubsw` makes
//!   i16 pairs of products of 8 tokens, summed in i16 while they cannot overflow, and
//!   `vpmaddwd` widens them to i32 (times the sub-block's scale); one 16-token group at a time.
//!
//! `ops::portable` performs the same sequence in scalar code, for all twelve integer formats
//! and the codebook ones: the tests hold every kernel to its bits.
//!
//! Files: `act` quantizes the activations, `driver` splits a product into tasks and runs the
//! kernels of one format (`q23k` for Q2_K and Q3_K, `q4k` for Q4_K and Q5_K, `q6k`, `iq4xs`,
//! `q8_0` for Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and IQ4_NL, `codebook` for IQ2_XXS, IQ2_XS, IQ2_S,
//! IQ3_XXS, IQ3_S, IQ1_S and IQ1_M), `simd` holds what they share; those eight files are
//! x86-64's. `prefetch` asks for cache lines on both architectures. `neon` has aarch64's kernels for the twelve integer formats and the codebook ones,
//! reading the blocks' values as `portable::Format` (and `codebook::Signed`) describes them.
//! `halves`, for F16 and BF16, has ggml's numerics for them (activations rounded to the weights' format, one fixed
//! sum order), its own driver (`halves::tiled` for prefill), and the kernels of both
//! architectures: `halves::x86` (rows and tiles, AVX-512 and AVX2) and `halves::neon` (rows
//! and tiles), the same bits on all three.

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod act;
#[cfg(target_arch = "x86_64")]
mod codebook;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod driver;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod halves;
#[cfg(target_arch = "x86_64")]
mod iq4xs;
#[cfg(target_arch = "aarch64")]
mod neon;
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
pub(crate) mod prefetch;
#[cfg(target_arch = "x86_64")]
mod q23k;
#[cfg(target_arch = "x86_64")]
mod q4k;
#[cfg(target_arch = "x86_64")]
mod q6k;
#[cfg(target_arch = "x86_64")]
mod q8_0;
#[cfg(target_arch = "x86_64")]
mod simd;
#[cfg(all(test, any(target_arch = "x86_64", target_arch = "aarch64")))]
mod tests;

use std::sync::OnceLock;

use crate::gguf::TensorType;

/// The instruction set the kernels use, chosen once: the best this CPU has, or the level
/// `LUGH_ISA` names (`portable`, `avx2`, `avx512`, `neon`; a level the CPU lacks falls back
/// to the best it has below it, or on another architecture to its best), so that every path
/// can be tested and measured on one machine. `LUGH_NO_AVX512` is an alias of `LUGH_ISA=avx2`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// candle's dot products and `ops::portable`.
    Portable,
    /// x86-64-v3: AVX2, FMA, F16C.
    #[cfg(target_arch = "x86_64")]
    Avx2,
    /// AVX-512 F, BW, VL and VNNI.
    #[cfg(target_arch = "x86_64")]
    Avx512,
    /// aarch64's baseline SIMD; the kernels use `sdot` where the CPU has `dotprod`.
    #[cfg(target_arch = "aarch64")]
    Neon,
}

pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let wanted = std::env::var("LUGH_ISA").unwrap_or_default();
        if wanted == "portable" {
            return Isa::Portable;
        }
        #[cfg(target_arch = "x86_64")]
        if wanted == "avx2" || std::env::var_os("LUGH_NO_AVX512").is_some() {
            return best_isa().min(Isa::Avx2);
        }
        best_isa()
    })
}

fn best_isa() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx512 = is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512vnni");
        let avx2 = is_x86_feature_detected!("avx2")
            && is_x86_feature_detected!("fma")
            && is_x86_feature_detected!("f16c");
        match (avx512, avx2) {
            (true, true) => Isa::Avx512,
            (_, true) => Isa::Avx2,
            _ => Isa::Portable,
        }
    }
    #[cfg(target_arch = "aarch64")]
    {
        Isa::Neon
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    Isa::Portable
}

/// Whether `matmul` has kernels for `dtype` on this CPU: every type but f32 on AVX-512, AVX2
/// and NEON alike, none at the portable level.
pub(crate) fn supports(dtype: TensorType) -> bool {
    use TensorType::*;
    #[rustfmt::skip]
    let kernels = matches!(
        dtype,
        F16 | BF16 | Q8_0 | Q4_0 | Q4_1 | Q5_0 | Q5_1 | IQ4NL
            | Q2K | Q3K | Q4K | Q5K | Q6K | IQ4XS
    ) || crate::ops::codebook::reads(dtype);
    kernels && isa() != Isa::Portable
}

/// `y[m, n_rows] = x[m, k] · Wᵀ` for `W` stored as `dtype` in `data` (`n_rows` rows of `k`
/// values). Returns false, touching nothing, when `supports(dtype)` is false.
pub(crate) fn matmul(
    dtype: TensorType,
    data: &[u8],
    n_rows: usize,
    k: usize,
    x: &[f32],
    y: &mut [f32],
) -> bool {
    if !supports(dtype) {
        return false;
    }
    assert!(x.len().is_multiple_of(k) && y.len() == x.len() / k * n_rows);
    assert!(dtype.row_bytes(k).map(|r| r * n_rows) == Some(data.len()));
    #[cfg(target_arch = "aarch64")]
    match dtype {
        TensorType::F16 => halves::matmul::<halves::F16>(data, n_rows, k, x, y),
        TensorType::BF16 => halves::matmul::<halves::Bf16>(data, n_rows, k, x, y),
        _ => neon::matmul(dtype, data, n_rows, k, x, y),
    }
    #[cfg(target_arch = "x86_64")]
    {
        use crate::ops::codebook as cb;
        use codebook::Codebook;
        use driver::{run, Avx2};
        use TensorType::*;
        let avx2 = isa() == Isa::Avx2;
        match (dtype, avx2) {
            (F16, _) => halves::matmul::<halves::F16>(data, n_rows, k, x, y),
            (BF16, _) => halves::matmul::<halves::Bf16>(data, n_rows, k, x, y),
            (Q8_0, true) => run::<Avx2<q8_0::Q8_0>>(data, n_rows, k, x, y),
            (Q4_0, true) => run::<Avx2<q8_0::Q4_0>>(data, n_rows, k, x, y),
            (Q5_0, true) => run::<Avx2<q8_0::Q5_0>>(data, n_rows, k, x, y),
            (Q4_1, true) => run::<Avx2<q8_0::Q4_1>>(data, n_rows, k, x, y),
            (Q5_1, true) => run::<Avx2<q8_0::Q5_1>>(data, n_rows, k, x, y),
            (IQ4NL, true) => run::<Avx2<q8_0::IQ4NL>>(data, n_rows, k, x, y),
            (Q4K, true) => run::<Avx2<q4k::Q4K>>(data, n_rows, k, x, y),
            (Q5K, true) => run::<Avx2<q4k::Q5K>>(data, n_rows, k, x, y),
            (Q6K, true) => run::<Avx2<q6k::Q6K>>(data, n_rows, k, x, y),
            (IQ4XS, true) => run::<Avx2<iq4xs::IQ4XS>>(data, n_rows, k, x, y),
            (Q2K, true) => run::<Avx2<q23k::Q2K>>(data, n_rows, k, x, y),
            (Q3K, true) => run::<Avx2<q23k::Q3K>>(data, n_rows, k, x, y),
            (Q4K, false) => run::<q4k::Q4K>(data, n_rows, k, x, y),
            (Q5K, false) => run::<q4k::Q5K>(data, n_rows, k, x, y),
            (Q6K, false) => run::<q6k::Q6K>(data, n_rows, k, x, y),
            (Q8_0, false) => run::<q8_0::Q8_0>(data, n_rows, k, x, y),
            (Q4_0, false) => run::<q8_0::Q4_0>(data, n_rows, k, x, y),
            (Q5_0, false) => run::<q8_0::Q5_0>(data, n_rows, k, x, y),
            (Q4_1, false) => run::<q8_0::Q4_1>(data, n_rows, k, x, y),
            (Q5_1, false) => run::<q8_0::Q5_1>(data, n_rows, k, x, y),
            (IQ4NL, false) => run::<q8_0::IQ4NL>(data, n_rows, k, x, y),
            (IQ4XS, false) => run::<iq4xs::IQ4XS>(data, n_rows, k, x, y),
            (Q2K, false) => run::<q23k::Q2K>(data, n_rows, k, x, y),
            (Q3K, false) => run::<q23k::Q3K>(data, n_rows, k, x, y),
            (IQ2XXS, true) => run::<Avx2<Codebook<cb::IQ2XXS>>>(data, n_rows, k, x, y),
            (IQ2XS, true) => run::<Avx2<Codebook<cb::IQ2XS>>>(data, n_rows, k, x, y),
            (IQ2S, true) => run::<Avx2<Codebook<cb::IQ2S>>>(data, n_rows, k, x, y),
            (IQ3XXS, true) => run::<Avx2<Codebook<cb::IQ3XXS>>>(data, n_rows, k, x, y),
            (IQ3S, true) => run::<Avx2<Codebook<cb::IQ3S>>>(data, n_rows, k, x, y),
            (IQ1S, true) => run::<Avx2<Codebook<cb::IQ1S>>>(data, n_rows, k, x, y),
            (IQ1M, true) => run::<Avx2<Codebook<cb::IQ1M>>>(data, n_rows, k, x, y),
            (IQ2XXS, false) => run::<Codebook<cb::IQ2XXS>>(data, n_rows, k, x, y),
            (IQ2XS, false) => run::<Codebook<cb::IQ2XS>>(data, n_rows, k, x, y),
            (IQ2S, false) => run::<Codebook<cb::IQ2S>>(data, n_rows, k, x, y),
            (IQ3XXS, false) => run::<Codebook<cb::IQ3XXS>>(data, n_rows, k, x, y),
            (IQ3S, false) => run::<Codebook<cb::IQ3S>>(data, n_rows, k, x, y),
            (IQ1S, false) => run::<Codebook<cb::IQ1S>>(data, n_rows, k, x, y),
            (IQ1M, false) => run::<Codebook<cb::IQ1M>>(data, n_rows, k, x, y),
            _ => unreachable!("supports() lists the types above"),
        }
    }
    true
}
