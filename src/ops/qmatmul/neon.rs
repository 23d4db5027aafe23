//! The row kernels on aarch64 (NEON), for every format of `portable::Format`: a block's values
//! as signed bytes, 32 at a time (`Vectors`), times the activations 16 at a time (`Dot`:
//! `sdot` where the CPU has `dotprod`, else widening multiplies), each run's sum times its
//! scale; then the format's float steps, `Format::steps`, four rows side by side. The integer
//! sums are exact and the float operations those of every other kernel, so a product has the
//! same bits as on x86. Batches run 4 tokens at a time against each 4 rows (`tile`): a block's
//! values are decoded once for the four tokens, and on a CPU with `i8mm` multiplied by
//! `smmla`, two rows by two tokens an instruction.

use core::arch::aarch64::*;
use core::arch::asm;
use std::marker::PhantomData;

use super::act::{Rows, Q8K_SUMS, QK_K};
use super::driver::{run_rows, RowKernel};
use crate::gguf::TensorType;
use crate::ops::codebook::{self, with_codebook, Signed};
use crate::ops::f16;
use crate::ops::iq4::KVALUES;
use crate::ops::portable::{
    Format, KQuant, Min, IQ4NL, IQ4XS, Q2K, Q3K, Q4K, Q4_0, Q4_1, Q5K, Q5_0, Q5_1, Q6K, Q8_0,
};

/// `y[m, n_rows] = x[m, k] · Wᵀ` for `W` stored as `dtype` (`supports(dtype)` on NEON), with
/// `sdot` where the CPU has it.
pub(super) fn matmul(
    dtype: TensorType,
    data: &[u8],
    n_rows: usize,
    k: usize,
    x: &[f32],
    y: &mut [f32],
) {
    use std::arch::is_aarch64_feature_detected as has;
    match (has!("dotprod"), has!("i8mm")) {
        (true, true) => matmul_with::<Smmla>(dtype, data, n_rows, k, x, y),
        (true, false) => matmul_with::<Sdot>(dtype, data, n_rows, k, x, y),
        _ => matmul_with::<Widening>(dtype, data, n_rows, k, x, y),
    }
}

/// `matmul` with the dot product `D`, every batch size through the row kernel.
fn matmul_with<D: Dot>(
    dtype: TensorType,
    data: &[u8],
    n_rows: usize,
    k: usize,
    x: &[f32],
    y: &mut [f32],
) {
    match dtype {
        TensorType::Q8_0 => run_rows::<Neon<Q8_0, D>>(data, n_rows, k, x, y),
        TensorType::Q4_0 => run_rows::<Neon<Q4_0, D>>(data, n_rows, k, x, y),
        TensorType::Q5_0 => run_rows::<Neon<Q5_0, D>>(data, n_rows, k, x, y),
        TensorType::Q4_1 => run_rows::<Neon<Q4_1, D>>(data, n_rows, k, x, y),
        TensorType::Q5_1 => run_rows::<Neon<Q5_1, D>>(data, n_rows, k, x, y),
        TensorType::IQ4NL => run_rows::<Neon<IQ4NL, D>>(data, n_rows, k, x, y),
        TensorType::Q4K => run_rows::<Neon<Q4K, D>>(data, n_rows, k, x, y),
        TensorType::Q5K => run_rows::<Neon<Q5K, D>>(data, n_rows, k, x, y),
        TensorType::Q6K => run_rows::<Neon<Q6K, D>>(data, n_rows, k, x, y),
        TensorType::IQ4XS => run_rows::<Neon<IQ4XS, D>>(data, n_rows, k, x, y),
        TensorType::Q2K => run_rows::<Neon<Q2K, D>>(data, n_rows, k, x, y),
        TensorType::Q3K => run_rows::<Neon<Q3K, D>>(data, n_rows, k, x, y),
        _ if codebook::reads(dtype) => {
            with_codebook!(dtype, F => run_rows::<Neon<F, D>>(data, n_rows, k, x, y))
        }
        _ => unreachable!("supports() lists the NEON types"),
    }
}

/// A 16-byte signed dot product on NEON.
pub(crate) trait Dot: Sync {
    /// `acc` plus the 16 products `a_i b_i`, spread over its lanes (which lane takes which
    /// product is the method's own: callers only add the lanes up).
    ///
    /// # Safety
    /// The CPU has the method's instructions; one of `a`, `b` lies within ±127.
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t;

    /// `S_b` of the blocks at `p` (one per row) against the activations at each `x`: for each
    /// token, the four rows' sums in the lanes of a vector.
    ///
    /// # Safety
    /// As `dot`; each `p[r]` points to a whole block, each `x[j]` to its activations.
    #[inline(always)]
    unsafe fn sums<F: Vectors, const T: usize>(
        p: [*const u8; 4],
        x: [*const i8; T],
    ) -> [int32x4_t; T] {
        row_sums::<F, Self, T>(p, x)
    }

    /// `tile` of format `F` with this dot product.
    ///
    /// # Safety
    /// As `RowKernel::rows4`, for each token of `t`.
    unsafe fn tile<F: Vectors, const T: usize>(
        w: [*const u8; 4],
        nb: usize,
        act: &Rows,
        t: [usize; T],
    ) -> [[f32; 4]; T];
}

/// `Dot::tile`: the generic `tile` compiled with the dot product's CPU features.
macro_rules! tile_with {
    ($($features:literal)?) => {
        $(#[target_feature(enable = $features)])?
        unsafe fn tile<F: Vectors, const T: usize>(
            w: [*const u8; 4],
            nb: usize,
            act: &Rows,
            t: [usize; T],
        ) -> [[f32; 4]; T] {
            tile::<F, Self, T>(w, nb, act, t)
        }
    };
}

/// An instruction that adds the products of two vectors of 16 bytes to 4 i32 lanes, as a
/// function of the CPU feature it needs: written as assembly, as its intrinsic is not stable.
macro_rules! accumulating {
    ($(#[$doc:meta])* $name:ident, $feature:literal) => {
        $(#[$doc])*
        ///
        /// # Safety
        #[doc = concat!("The CPU has `", $feature, "`.")]
        #[inline]
        #[target_feature(enable = $feature)]
        unsafe fn $name(mut acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
            // SAFETY: the feature is enabled; registers only.
            unsafe {
                asm!(
                    concat!(stringify!($name), " {acc:v}.4s, {a:v}.16b, {b:v}.16b"),
                    acc = inout(vreg) acc,
                    a = in(vreg) a,
                    b = in(vreg) b,
                    options(pure, nomem, nostack, preserves_flags),
                )
            };
            acc
        }
    };
}

accumulating!(
    /// `acc` plus the products `a_i b_i`, lane `l` adding those of bytes `4l..4l + 4`.
    sdot,
    "dotprod"
);
accumulating!(
    /// `acc` plus the 2 × 2 products of `a`'s and `b`'s two 8-byte halves: lane `2i + j` adds
    /// `a`'s half `i` times `b`'s half `j`.
    smmla,
    "i8mm"
);

/// `sdot` (the `dotprod` extension).
pub(crate) struct Sdot;

impl Dot for Sdot {
    #[inline]
    #[target_feature(enable = "dotprod")]
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        sdot(acc, a, b)
    }

    tile_with!("dotprod");
}

/// `smmla` (the `i8mm` extension) for batches: each instruction multiplies 8 values of two
/// rows by the same 8 of two tokens, twice the products of an `sdot`; a lone token takes
/// `sdot`.
pub(crate) struct Smmla;

/// 32 values of two rows (or tokens) `a` and `b` as `smmla` takes them: 8 of each, in order.
#[inline(always)]
unsafe fn interleaved(a: [int8x16_t; 2], b: [int8x16_t; 2]) -> [int8x16_t; 4] {
    let pair = |h: usize| {
        let (a, b) = (vreinterpretq_s64_s8(a[h]), vreinterpretq_s64_s8(b[h]));
        [vzip1q_s64(a, b), vzip2q_s64(a, b)].map(|v| vreinterpretq_s8_s64(v))
    };
    let [p0, p1] = pair(0);
    let [p2, p3] = pair(1);
    [p0, p1, p2, p3]
}

/// `Dot::sums` of four rows and four tokens by `smmla`: rows and tokens in pairs, each pair of
/// pairs a 2 × 2 block of sums; each run's sums times its rows' scales, as `row_sums` does.
#[inline(always)]
unsafe fn pair_sums<F: Vectors>(p: [*const u8; 4], x: [*const i8; 4]) -> [int32x4_t; 4] {
    let zero = vdupq_n_s32(0);
    // acc[rp][tp]: rows 2rp, 2rp + 1 times tokens 2tp, 2tp + 1, lane 2 (row) + (token).
    let mut acc = [[zero; 2]; 2];
    let scales = p.map(|p| F::scales(std::slice::from_raw_parts(p, F::BYTES)));
    for c in 0..F::VALUES / 32 {
        let v: [[int8x16_t; 2]; 4] = std::array::from_fn(|r| F::vectors(p[r], c));
        let x: [[int8x16_t; 2]; 4] =
            std::array::from_fn(|j| [vld1q_s8(x[j].add(32 * c)), vld1q_s8(x[j].add(32 * c + 16))]);
        let rows = [interleaved(v[0], v[1]), interleaved(v[2], v[3])];
        let tokens = [interleaved(x[0], x[1]), interleaved(x[2], x[3])];
        // The runs of chunk c: one of 32 values (4 groups of 8), or two of 16.
        let runs = 32 / F::RUN;
        for run in 0..runs {
            let groups = run * 4 / runs..(run + 1) * 4 / runs;
            let scale = run + runs * c;
            for (rp, rows) in rows.iter().enumerate() {
                let scale = vcombine_s32(
                    vdup_n_s32(scales[2 * rp][scale]),
                    vdup_n_s32(scales[2 * rp + 1][scale]),
                );
                for (tp, tokens) in tokens.iter().enumerate() {
                    let mut dot = zero;
                    for g in groups.clone() {
                        dot = smmla(dot, rows[g], tokens[g]);
                    }
                    acc[rp][tp] = vmlaq_s32(acc[rp][tp], dot, scale);
                }
            }
        }
    }
    // Token 2tp + e: lane e (row 2rp) and 2 + e (row 2rp + 1) of both row pairs.
    let [[a0, a1], [b0, b1]] = acc;
    [
        vuzp1q_s32(a0, b0),
        vuzp2q_s32(a0, b0),
        vuzp1q_s32(a1, b1),
        vuzp2q_s32(a1, b1),
    ]
}

impl Dot for Smmla {
    #[inline]
    #[target_feature(enable = "dotprod")]
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        sdot(acc, a, b)
    }

    #[inline(always)]
    unsafe fn sums<F: Vectors, const T: usize>(
        p: [*const u8; 4],
        x: [*const i8; T],
    ) -> [int32x4_t; T] {
        match T {
            4 => {
                let s = pair_sums::<F>(p, std::array::from_fn(|j| x[j]));
                std::array::from_fn(|j| s[j])
            }
            _ => row_sums::<F, Self, T>(p, x),
        }
    }

    tile_with!("dotprod,i8mm");
}

/// Baseline NEON: products widened to i16, pairs of them added (within i16, as one operand is
/// within ±127: 2 · 128 · 127), then pairs of those into the i32 lanes.
pub(crate) struct Widening;

impl Dot for Widening {
    #[inline]
    unsafe fn dot(acc: int32x4_t, a: int8x16_t, b: int8x16_t) -> int32x4_t {
        let low = vmull_s8(vget_low_s8(a), vget_low_s8(b));
        vpadalq_s16(acc, vmlal_high_s8(low, a, b))
    }

    tile_with!();
}

/// The row kernel of format `F` with the dot product `D`.
pub(crate) struct Neon<F, D>(PhantomData<(F, D)>);

impl<F: Vectors, D: Dot> RowKernel for Neon<F, D> {
    const BLOCK: usize = F::VALUES;
    const BLOCK_BYTES: usize = F::BYTES;
    const Q8K: bool = F::VALUES == QK_K;

    unsafe fn rows4(w: [*const u8; 4], nb: usize, act: &Rows, t: usize) -> [f32; 4] {
        let [out] = D::tile::<F, 1>(w, nb, act, [t]);
        out
    }

    unsafe fn rows4_tokens4(
        w: [*const u8; 4],
        nb: usize,
        act: &Rows,
        t: [usize; 4],
    ) -> [[f32; 4]; 4] {
        D::tile::<F, 4>(w, nb, act, t)
    }
}

/// A format's values in NEON registers.
pub(crate) trait Vectors: Format {
    /// `Format::values(block, c)`: values `32c..32c + 32` of the block at `p`.
    ///
    /// # Safety
    /// `p` points to a whole block.
    unsafe fn vectors(p: *const u8, c: usize) -> [int8x16_t; 2];

    /// `Format::d` of each row's block `w`, a lane each: by default the f16 at `D_AT`.
    ///
    /// # Safety
    /// None beyond NEON's (baseline).
    #[inline(always)]
    unsafe fn d4(w: [&[u8]; 4]) -> float32x4_t {
        f16_lanes(w, Self::D_AT)
    }
}

/// Rows `w` times tokens `t`: per block, each row's values decoded once and their exact
/// sums against every token (`Dot::sums`), then the float steps of the four rows side by
/// side, a lane each — for each (row, token) the sequence a lone token takes.
#[inline(always)]
unsafe fn tile<F: Vectors, D: Dot, const T: usize>(
    w: [*const u8; 4],
    nb: usize,
    act: &Rows,
    t: [usize; T],
) -> [[f32; 4]; T] {
    let mut acc = [vdupq_n_f32(0.0); T];
    for b in 0..nb {
        let i: [usize; T] = std::array::from_fn(|j| t[j] * nb + b);
        let x: [*const i8; T] =
            std::array::from_fn(|j| act.qs[t[j] * act.k + b * F::VALUES..].as_ptr());
        let p = w.map(|w| w.add(b * F::BYTES));
        let sums = D::sums::<F, T>(p, x);
        let blocks = p.map(|p| std::slice::from_raw_parts(p, F::BYTES));
        acc = steps::<F, T>(acc, sums, blocks, act, i);
    }
    acc.map(|acc| {
        let mut out = [0f32; 4];
        vst1q_f32(out.as_mut_ptr(), acc);
        out
    })
}

/// `Format::steps` of four rows' blocks `w` (a lane each) for each token `j`, its exact sums
/// `s[j]` in hand, against its activation block `i[j]`: lane by lane the same operations.
#[inline(always)]
unsafe fn steps<F: Vectors, const T: usize>(
    acc: [float32x4_t; T],
    s: [int32x4_t; T],
    w: [&[u8]; 4],
    act: &Rows,
    i: [usize; T],
) -> [float32x4_t; T] {
    let d = F::d4(w);
    let dmin = match F::MIN {
        Min::None => vdupq_n_f32(0.0),
        _ => f16_lanes(w, F::DMIN_AT),
    };
    let mins = match F::MIN {
        Min::SubBlocks => w.map(|w| F::mins(w)),
        _ => [[0; 16]; 4],
    };
    std::array::from_fn(|j| {
        let d_x = act.d[i[j]];
        let acc = vfmaq_f32(acc[j], vcvtq_f32_s32(s[j]), vmulq_n_f32(d, d_x));
        match F::MIN {
            Min::None => acc,
            Min::Block => vfmaq_f32(acc, dmin, vdupq_n_f32(act.s[i[j]])),
            Min::SubBlocks => {
                // The activations' sums over the runs: 8 of 32, or 16 of 16 (Q2_K).
                let x_sums = match F::RUN {
                    32 => &act.sums[i[j] * Q8K_SUMS..][..8],
                    _ => &act.sums[i[j] * Q8K_SUMS + 8..][..16],
                };
                // Each row's Σ min · sum, 4 runs a step (exact in i32).
                let sum = |mins: &[i32; 16]| {
                    let mut total = vdupq_n_s32(0);
                    for (m, x) in mins.chunks_exact(4).zip(x_sums.chunks_exact(4)) {
                        let x = vmovl_s16(vld1_s16(x.as_ptr()));
                        total = vmlaq_s32(total, vld1q_s32(m.as_ptr()), x);
                    }
                    total
                };
                let m = rows_side_by_side(std::array::from_fn(|r| sum(&mins[r])));
                let m = vcvtq_f32_s32(m);
                vfmaq_f32(acc, vnegq_f32(m), vmulq_n_f32(dmin, d_x))
            }
        }
    })
}

/// The f16 at byte `at` of each row's block `w`, a lane each, widened by `fcvtl`.
#[inline(always)]
unsafe fn f16_lanes(w: [&[u8]; 4], at: usize) -> float32x4_t {
    let h = |r: usize| u16::from_le_bytes([w[r][at], w[r][at + 1]]);
    let bits = vsetq_lane_u16::<0>(h(0), vdupq_n_u16(0));
    let bits = vsetq_lane_u16::<1>(h(1), bits);
    let bits = vsetq_lane_u16::<2>(h(2), bits);
    let bits = vsetq_lane_u16::<3>(h(3), bits);
    f16::widen8(bits)[0]
}

/// `f(c)` for each chunk `c` of 32 values of a block of `F`; where `written_out`, one call
/// per chunk, so that each, inlined, decodes its chunk with `c` a constant (`vectors`'
/// shifts and halves by chunk), where a loop kept `c` in a register and computed them. For
/// one token only (`written_out` a constant where inlined): with several, the chunks written
/// out keep too many vectors live and spill (benches/README, twenty-fourth session).
#[inline(always)]
fn each_chunk<F: Vectors>(written_out: bool, mut f: impl FnMut(usize)) {
    const { assert!(F::VALUES <= 256) };
    if !written_out {
        return (0..F::VALUES / 32).for_each(f);
    }
    macro_rules! chunks {
        ($($c:literal)*) => { $(if $c < F::VALUES / 32 { f($c) })* };
    }
    chunks!(0 1 2 3 4 5 6 7);
}

/// `Dot::sums` by `D::dot`, row by row.
#[inline(always)]
unsafe fn row_sums<F: Vectors, D: Dot + ?Sized, const T: usize>(
    p: [*const u8; 4],
    x: [*const i8; T],
) -> [int32x4_t; T] {
    let zero = vdupq_n_s32(0);
    let mut s = [[zero; T]; 4];
    for (s, p) in s.iter_mut().zip(p) {
        let scales = F::scales(std::slice::from_raw_parts(p, F::BYTES));
        each_chunk::<F>(T == 1, |c| {
            let v = F::vectors(p, c);
            for (s, x) in s.iter_mut().zip(x) {
                let x = [vld1q_s8(x.add(32 * c)), vld1q_s8(x.add(32 * c + 16))];
                if F::RUN == 32 {
                    let dot = D::dot(D::dot(zero, v[0], x[0]), v[1], x[1]);
                    *s = vmlaq_n_s32(*s, dot, scales[c]);
                } else {
                    *s = vmlaq_n_s32(*s, D::dot(zero, v[0], x[0]), scales[2 * c]);
                    *s = vmlaq_n_s32(*s, D::dot(zero, v[1], x[1]), scales[2 * c + 1]);
                }
            }
        });
    }
    std::array::from_fn(|j| rows_side_by_side(std::array::from_fn(|r| s[r][j])))
}

/// Each of four rows' vectors of partial sums added up, the rows' totals side by side.
#[inline(always)]
unsafe fn rows_side_by_side(rows: [int32x4_t; 4]) -> int32x4_t {
    vpaddq_s32(vpaddq_s32(rows[0], rows[1]), vpaddq_s32(rows[2], rows[3]))
}

/// The 32 nibbles of 16 bytes at `qs`: low nibbles (values 0..16), high nibbles (16..32).
#[inline(always)]
unsafe fn nibbles(qs: *const u8) -> [uint8x16_t; 2] {
    let q = vld1q_u8(qs);
    [vandq_u8(q, vdupq_n_u8(0x0f)), vshrq_n_u8::<4>(q)]
}

/// `0x10` in byte `i` where bit `i` of the u32 at `p` is set (Q5's fifth bits), else 0.
#[inline(always)]
unsafe fn fifth_bits(p: *const u8) -> [uint8x16_t; 2] {
    let bits = vreinterpretq_u8_u32(vdupq_n_u32(p.cast::<u32>().read_unaligned()));
    const BIT: [u8; 16] = [1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128];
    let bit = vld1q_u8(BIT.as_ptr());
    // Byte i of the 32 takes byte i / 8 of the bits.
    std::array::from_fn(|h| {
        let at = 2 * h as u8;
        let idx = vcombine_u8(vdup_n_u8(at), vdup_n_u8(at + 1));
        let set = vtstq_u8(vqtbl1q_u8(bits, idx), bit);
        vandq_u8(set, vdupq_n_u8(0x10))
    })
}

/// Unsigned values less `off`, as signed bytes.
#[inline(always)]
unsafe fn less(v: [uint8x16_t; 2], off: u8) -> [int8x16_t; 2] {
    v.map(|v| vreinterpretq_s8_u8(vsubq_u8(v, vdupq_n_u8(off))))
}

/// `KVALUES[q]` for each nibble `q`.
#[inline(always)]
unsafe fn iq4_values(q: [uint8x16_t; 2]) -> [int8x16_t; 2] {
    let table = vld1q_s8(KVALUES.as_ptr());
    q.map(|q| vqtbl1q_s8(table, q))
}

#[inline(always)]
unsafe fn or(a: [uint8x16_t; 2], b: [uint8x16_t; 2]) -> [uint8x16_t; 2] {
    [vorrq_u8(a[0], b[0]), vorrq_u8(a[1], b[1])]
}

impl Vectors for Q8_0 {
    #[inline(always)]
    unsafe fn vectors(p: *const u8, _: usize) -> [int8x16_t; 2] {
        let q = p.add(2).cast::<i8>();
        [vld1q_s8(q), vld1q_s8(q.add(16))]
    }
}

impl Vectors for Q4_0 {
    #[inline(always)]
    unsafe fn vectors(p: *const u8, _: usize) -> [int8x16_t; 2] {
        less(nibbles(p.add(2)), 8)
    }
}

impl Vectors for Q5_0 {
    #[inline(always)]
    unsafe fn vectors(p: *const u8, _: usize) -> [int8x16_t; 2] {
        less(or(nibbles(p.add(6)), fifth_bits(p.add(2))), 16)
    }
}

impl Vectors for Q4_1 {
    #[inline(always)]
    unsafe fn vectors(p: *const u8, _: usize) -> [int8x16_t; 2] {
        less(nibbles(p.add(4)), 0)
    }
}

impl Vectors for Q5_1 {
    #[inline(always)]
    unsafe fn vectors(p: *const u8, _: usize) -> [int8x16_t; 2] {
        less(or(nibbles(p.add(8)), fifth_bits(p.add(4))), 0)
    }
}

impl Vectors for IQ4NL {
    #[inline(always)]
    unsafe fn vectors(p: *const u8, _: usize) -> [int8x16_t; 2] {
        iq4_values(nibbles(p.add(2)))
    }
}

impl<const HIGH: bool> Vectors for KQuant<HIGH> {
    #[inline(always)]
    unsafe fn vectors(p: *const u8, c: usize) -> [int8x16_t; 2] {
        let qs = p.add(if HIGH { 48 } else { 16 } + 32 * (c / 2));
        let q: [uint8x16_t; 2] = std::array::from_fn(|h| {
            let q = vld1q_u8(qs.add(16 * h));
            match c % 2 {
                0 => vandq_u8(q, vdupq_n_u8(0x0f)),
                _ => vshrq_n_u8::<4>(q),
            }
        });
        if !HIGH {
            return less(q, 0);
        }
        // Bit c of qh[j] is the fifth bit of value 32c + j.
        let bit = vdupq_n_u8(1 << c);
        let high = std::array::from_fn(|h| {
            let set = vtstq_u8(vld1q_u8(p.add(16 + 16 * h)), bit);
            vandq_u8(set, vdupq_n_u8(0x10))
        });
        less(or(q, high), 0)
    }
}

impl Vectors for Q6K {
    #[inline(always)]
    unsafe fn vectors(p: *const u8, c: usize) -> [int8x16_t; 2] {
        let (h, i) = (c / 4, c % 4);
        let (ql, qh) = (p.add(64 * h + 32 * (i % 2)), p.add(128 + 32 * h));
        let v = std::array::from_fn(|j| {
            let low = vld1q_u8(ql.add(16 * j));
            let low = match i / 2 {
                0 => vandq_u8(low, vdupq_n_u8(0x0f)),
                _ => vshrq_n_u8::<4>(low),
            };
            let high = vshlq_u8(vld1q_u8(qh.add(16 * j)), vdupq_n_s8(-2 * i as i8));
            vorrq_u8(low, vshlq_n_u8::<4>(vandq_u8(high, vdupq_n_u8(3))))
        });
        less(v, 32)
    }
}

/// Values `32c..32c + 32` of the 2-bit values in the 64 bytes at `qs` (Q2_K, Q3_K): bits
/// `2j, 2j + 1` of `qs[32h..32h + 32]`, `c = 4h + j`.
#[inline(always)]
unsafe fn crumbs(qs: *const u8, c: usize) -> [uint8x16_t; 2] {
    let (h, j) = (c / 4, c % 4);
    std::array::from_fn(|k| {
        let q = vshlq_u8(vld1q_u8(qs.add(32 * h + 16 * k)), vdupq_n_s8(-2 * j as i8));
        vandq_u8(q, vdupq_n_u8(3))
    })
}

impl Vectors for Q2K {
    #[inline(always)]
    unsafe fn vectors(p: *const u8, c: usize) -> [int8x16_t; 2] {
        less(crumbs(p.add(16), c), 0)
    }
}

impl Vectors for Q3K {
    #[inline(always)]
    unsafe fn vectors(p: *const u8, c: usize) -> [int8x16_t; 2] {
        // Bit c of hmask[l] is bit 2 of value 32c + l.
        let bit = vdupq_n_u8(1 << c);
        let high = std::array::from_fn(|k| {
            let set = vtstq_u8(vld1q_u8(p.add(16 * k)), bit);
            vandq_u8(set, vdupq_n_u8(4))
        });
        less(or(crumbs(p.add(32), c), high), 4)
    }
}

impl Vectors for IQ4XS {
    #[inline(always)]
    unsafe fn vectors(p: *const u8, c: usize) -> [int8x16_t; 2] {
        iq4_values(nibbles(p.add(8 + 16 * c)))
    }
}

/// The values of a codebook format: its groups' magnitudes negated where the masks are set.
#[inline(always)]
unsafe fn signed<F: Signed>(p: *const u8, c: usize) -> [int8x16_t; 2] {
    let (magnitudes, masks) = F::groups(std::slice::from_raw_parts(p, F::BYTES), c);
    std::array::from_fn(|h| {
        let pair = |q: [u64; 4]| vcombine_u8(vcreate_u8(q[2 * h]), vcreate_u8(q[2 * h + 1]));
        let (v, mask) = (pair(magnitudes), pair(masks));
        vreinterpretq_s8_u8(vsubq_u8(veorq_u8(v, mask), mask))
    })
}

macro_rules! signed_vectors {
    ($($F:ident),*) => {$(
        impl Vectors for codebook::$F {
            #[inline(always)]
            unsafe fn vectors(p: *const u8, c: usize) -> [int8x16_t; 2] {
                signed::<Self>(p, c)
            }

            /// Their `d` folds in a constant factor.
            #[inline(always)]
            unsafe fn d4(w: [&[u8]; 4]) -> float32x4_t {
                let d = [Self::d(w[0]), Self::d(w[1]), Self::d(w[2]), Self::d(w[3])];
                vld1q_f32(d.as_ptr())
            }
        }
    )*};
}
signed_vectors!(IQ2XXS, IQ2XS, IQ2S, IQ3XXS, IQ3S, IQ1S, IQ1M);
