//! What the formats' kernels share.

use core::arch::x86_64::*;

use super::act::Groups;
use super::prefetch::{self, Cache};

/// Horizontal sums of 4 vectors of 16 i32: `[Σ s[0], Σ s[1], Σ s[2], Σ s[3]]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn hsum4(s: [__m512i; 4]) -> __m128i {
    let half = |a, b| {
        _mm512_add_epi32(
            _mm512_shuffle_i64x2::<0b01_00_01_00>(a, b),
            _mm512_shuffle_i64x2::<0b11_10_11_10>(a, b),
        )
    };
    let (t01, t23) = (half(s[0], s[1]), half(s[2], s[3]));
    // One 128-bit lane per input vector, then within each lane.
    let u = _mm512_add_epi32(
        _mm512_shuffle_i64x2::<0b10_00_10_00>(t01, t23),
        _mm512_shuffle_i64x2::<0b11_01_11_01>(t01, t23),
    );
    lane_sums(u)
}

/// The sums of each of 4 vectors of 8 i32.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) fn hsum4_avx2(z: [__m256i; 4]) -> __m128i {
    let (a, b) = (_mm256_hadd_epi32(z[0], z[1]), _mm256_hadd_epi32(z[2], z[3]));
    let c = _mm256_hadd_epi32(a, b);
    _mm_add_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256::<1>(c))
}

/// The sum of each 128-bit lane's 4 i32: `[Σ lane 0, Σ lane 1, Σ lane 2, Σ lane 3]`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) fn lane_sums(u: __m512i) -> __m128i {
    let v = _mm512_add_epi32(u, _mm512_shuffle_epi32::<0b01_00_11_10>(u));
    let w = _mm512_add_epi32(v, _mm512_shuffle_epi32::<0b10_11_00_01>(v));
    let idx = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
    _mm512_castsi512_si128(_mm512_permutexvar_epi32(idx, w))
}

/// The first 16 bytes of the blocks at `p[r]` (their headers), one per 128-bit lane.
///
/// # Safety
/// Each `p[r]` is readable for 16 bytes.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn headers(p: [*const u8; 4]) -> __m512i {
    let h = |r: usize| _mm_loadu_si128(p[r].cast());
    let h01 = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(h(0)), h(1));
    let h23 = _mm256_inserti128_si256::<1>(_mm256_castsi128_si256(h(2)), h(3));
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(h01), h23)
}

/// 4 consecutive bytes at `p` as one i32, broadcast to 16 lanes.
///
/// # Safety
/// `p` is readable for 4 bytes.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn bcast4(p: *const u8) -> __m512i {
    _mm512_set1_epi32(p.cast::<i32>().read_unaligned())
}

/// Bytes, at least, by which the row kernels' prefetches run ahead of their reads: enough in
/// flight to cover DRAM latency at full bandwidth, which the hardware prefetchers alone do
/// not keep (measurements in benches/README, "sixteenth session").
const PREFETCH_DISTANCE: usize = 8192;

/// Where a row kernel prefetches. It takes `group` consecutive rows at a time, a step of each
/// in turn: as many streams through memory as rows, which the hardware prefetchers follow
/// badly. So while it reads step `i` of row `r`, it asks for the matching share of the rows
/// whole groups further on, in address order: one stream, at least `PREFETCH_DISTANCE` ahead,
/// that covers the next rows as fast as the kernel reads them.
#[derive(Clone, Copy)]
pub(crate) struct NextRows {
    /// Whole groups, in bytes.
    distance: usize,
    group: usize,
    /// Bytes read from a row per step.
    step: usize,
}

impl NextRows {
    /// For rows of `row_bytes`, taken `group` at a time, `step` bytes of each per step.
    pub(crate) fn new(row_bytes: usize, group: usize, step: usize) -> NextRows {
        let group_bytes = group * row_bytes;
        NextRows {
            distance: PREFETCH_DISTANCE.div_ceil(group_bytes) * group_bytes,
            group,
            step,
        }
    }

    /// Prefetches the share of step `i` of row `r` in the group from `rows`.
    #[inline(always)]
    pub(crate) fn fetch(self, rows: *const u8, r: usize, i: usize) {
        let p = rows.wrapping_add(self.distance + (i * self.group + r) * self.step);
        // Asked at each prefetch, not kept in the struct: kept, the AVX2 F16 rows issued their
        // prefetches back to back and decoded a quarter slower on an Intel Xeon (benches/README,
        // twenty-sixth session).
        prefetch::bytes(p, self.step, Cache::row_streams());
    }
}

/// Stores `tiles[r][i][t]` at `y[t · stride + r]`: 4 rows of 16 tokens, transposed, 8
/// tokens at a time (as fast as 16 with AVX-512 registers, and every level has AVX2).
///
/// # Safety
/// AVX2; `y[t · stride .. t · stride + 4]` is writable for every t < 16; `i < T`.
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn store_4x16<const T: usize>(
    y: *mut f32,
    stride: usize,
    tiles: &[[[f32; 16]; T]; 4],
    i: usize,
) {
    for half in 0..2 {
        let r: [__m256; 4] =
            std::array::from_fn(|r| _mm256_loadu_ps(tiles[r][i][8 * half..].as_ptr()));
        let (t0, t1) = (
            _mm256_unpacklo_ps(r[0], r[1]),
            _mm256_unpackhi_ps(r[0], r[1]),
        );
        let (t2, t3) = (
            _mm256_unpacklo_ps(r[2], r[3]),
            _mm256_unpackhi_ps(r[2], r[3]),
        );
        // u[j], 128-bit lane l: the 4 rows of token 4 l + j.
        let u = [
            _mm256_shuffle_ps::<0x44>(t0, t2),
            _mm256_shuffle_ps::<0xee>(t0, t2),
            _mm256_shuffle_ps::<0x44>(t1, t3),
            _mm256_shuffle_ps::<0xee>(t1, t3),
        ];
        let y = y.add(8 * half * stride);
        for (j, &u) in u.iter().enumerate() {
            _mm_storeu_ps(y.add(j * stride), _mm256_castps256_ps128(u));
            _mm_storeu_ps(y.add((4 + j) * stride), _mm256_extractf128_ps::<1>(u));
        }
    }
}

/// The float step of every tile kernel, for weight block `b` (of `nb`) of 4 rows with scales
/// `d_w[r]`, and the 16-token groups `g[i]`: `f[r][i] = fma(S[r][i], d_w[r] · d_x, f[r][i])`
/// (see the module's numerics).
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn add_block<const T: usize>(
    f: &mut [[__m512; T]; 4],
    s: &[[__m512i; T]; 4],
    d_w: [f32; 4],
    act: &Groups,
    g: [usize; T],
    nb: usize,
    b: usize,
) {
    for i in 0..T {
        let d_x = _mm512_loadu_ps(act.d[(g[i] * nb + b) * 16..].as_ptr());
        for r in 0..4 {
            let d = _mm512_mul_ps(_mm512_set1_ps(d_w[r]), d_x);
            f[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[r][i]), d, f[r][i]);
        }
    }
}

/// The second float step of the tiles of the formats with mins (Q2_K, Q4_K, Q5_K), for weight
/// block `b` of 4 rows: `f[r][i] = fma(−M[r][i], dmin_w[r] · d_x, f[r][i])`, `M` made of the
/// `P` i16 pairs of mins `(m_2p, m_2p+1)` at `mins[r]` and the groups' `P` extras, the pairs of
/// the activations' sums over the same runs.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI; `mins[r]` readable for `4 P` bytes; `g[i] < act.n_groups`, and `act`
/// holds `nb` blocks of `P` extras.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn sub_mins<const T: usize, const P: usize>(
    f: &mut [[__m512; T]; 4],
    mins: [*const u8; 4],
    dmin_w: [f32; 4],
    act: &Groups,
    g: [usize; T],
    nb: usize,
    b: usize,
) {
    for i in 0..T {
        let blk = g[i] * nb + b;
        let d_x = _mm512_loadu_ps(act.d[blk * 16..].as_ptr());
        let xp: [__m512i; P] = std::array::from_fn(|p| {
            _mm512_loadu_si512(act.extra[(blk * P + p) * 16..].as_ptr().cast())
        });
        for r in 0..4 {
            let mut m = _mm512_setzero_si512();
            for (p, &xp) in xp.iter().enumerate() {
                m = _mm512_dpwssd_epi32(m, bcast4(mins[r].add(4 * p)), xp);
            }
            let dmin = _mm512_mul_ps(_mm512_set1_ps(dmin_w[r]), d_x);
            f[r][i] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(m), dmin, f[r][i]);
        }
    }
}

/// A tile kernel's accumulators as the `[row][group][token]` floats it returns.
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) unsafe fn tile_values<const T: usize>(f: [[__m512; T]; 4]) -> [[[f32; 16]; T]; 4] {
    let mut out = [[[0f32; 16]; T]; 4];
    for r in 0..4 {
        for i in 0..T {
            _mm512_storeu_ps(out[r][i].as_mut_ptr(), f[r][i]);
        }
    }
    out
}

/// `KVALUES + 128`: the IQ4 nibbles' values as the unsigned bytes `vpdpbusd` reads.
const IQ4_UNSIGNED: [u8; 16] = {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 16 {
        out[i] = (crate::ops::iq4::KVALUES[i] as i16 + 128) as u8;
        i += 1;
    }
    out
};

/// `IQ4_UNSIGNED`: a `vpshufb` table from nibbles to values (broadcast it to each lane).
#[inline]
pub(crate) fn iq4_table() -> __m128i {
    // SAFETY: 16 bytes from a 16-byte array (SSE2 is x86-64's baseline).
    unsafe { _mm_loadu_si128(IQ4_UNSIGNED.as_ptr().cast()) }
}

/// `KVALUES`: a `vpshufb` table from nibbles to the values as signed bytes, in both lanes.
///
/// # Safety
/// AVX2.
#[inline]
#[target_feature(enable = "avx2")]
pub(crate) unsafe fn iq4_signed_table_avx2() -> __m256i {
    _mm256_broadcastsi128_si256(_mm_loadu_si128(crate::ops::iq4::KVALUES.as_ptr().cast()))
}

/// A tile's integer sums over one block of 256 unpacked values in `N_SUB` scaled sub-blocks:
/// `s[r][i] = Σ_sb sc_r[sb] · (start(sb)[i] + Σ_{k∈sb} u_r[k] x_i[k])`, where `u[r]` holds the
/// block's values as bytes, `sc[r]` its scales as i32, and `xq[i]` the block's activations in
/// the groups layout.
///
/// # Safety
/// AVX-512 F/BW/VL/VNNI; `u[r]` readable for 256 bytes, `sc[r]` for `N_SUB` i32, `xq[i]` for
/// the block's 16 × 256 activations.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn scaled_subblocks<const T: usize, const N_SUB: usize>(
    u: [*const u8; 4],
    sc: [*const i32; 4],
    xq: [*const i8; T],
    start: impl Fn(usize) -> [__m512i; T],
) -> [[__m512i; T]; 4] {
    let steps = 64 / N_SUB;
    let mut s = [[_mm512_setzero_si512(); T]; 4];
    for sb in 0..N_SUB {
        let mut is = [start(sb); 4];
        for j in 0..steps {
            let k4 = steps * sb + j;
            let x: [__m512i; T] =
                std::array::from_fn(|i| _mm512_loadu_si512(xq[i].add(k4 * 64).cast()));
            for r in 0..4 {
                let q = bcast4(u[r].add(4 * k4));
                for i in 0..T {
                    is[r][i] = _mm512_dpbusd_epi32(is[r][i], q, x[i]);
                }
            }
        }
        for r in 0..4 {
            let sc = _mm512_set1_epi32(sc[r].add(sb).read());
            for i in 0..T {
                s[r][i] = _mm512_add_epi32(s[r][i], _mm512_mullo_epi32(is[r][i], sc));
            }
        }
    }
    s
}

/// Where an unpacked block of 256 values keeps its parts: the values as bytes first, then
/// its sub-block scales as i32 at `scales`, its `d` (f32) at `d`; `bytes` per block.
pub(crate) struct Unpacked {
    pub scales: usize,
    pub d: usize,
    pub bytes: usize,
}

/// `Format::tile` of a format unpacked as `layout`, with `N_SUB` scaled sub-blocks whose
/// sums start at the groups' `N_SUB` extras (Q6_K, IQ4_XS).
///
/// # Safety
/// As `Format::tile`; each `w[r]` holds `nb` blocks unpacked as `layout`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn tile_with_starts<const T: usize, const N_SUB: usize>(
    w: [*const u8; 4],
    nb: usize,
    act: &Groups,
    g: [usize; T],
    layout: Unpacked,
) -> [[[f32; 16]; T]; 4] {
    let k = nb * 256;
    let xq: [*const i8; T] = std::array::from_fn(|i| act.qs[g[i] * 16 * k..].as_ptr());
    let mut f = [[_mm512_setzero_ps(); T]; 4];
    for b in 0..nb {
        let u: [*const u8; 4] = std::array::from_fn(|r| w[r].add(b * layout.bytes));
        let start = |sb: usize| {
            std::array::from_fn(|i| {
                let blk = g[i] * nb + b;
                _mm512_loadu_si512(act.extra[(blk * N_SUB + sb) * 16..].as_ptr().cast())
            })
        };
        let sc = u.map(|u| u.add(layout.scales).cast::<i32>());
        let xb = xq.map(|x| x.add(b * 256 * 16));
        let s = scaled_subblocks::<T, N_SUB>(u, sc, xb, start);
        let d_w = std::array::from_fn(|r| u[r].add(layout.d).cast::<f32>().read());
        add_block(&mut f, &s, d_w, act, g, nb, b);
    }
    tile_values(f)
}

/// `Format::tile` of a format unpacked as `layout` whose `N_SUB` scaled sub-blocks' sums start
/// from zero, followed by the mins' step: `P` i16 pairs of mins at `mins`, `dmin` the f32
/// after `d` (Q4_K, Q5_K, Q2_K).
///
/// # Safety
/// As `Format::tile`; each `w[r]` holds `nb` blocks unpacked as `layout`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni")]
pub(crate) unsafe fn tile_with_mins<const T: usize, const N_SUB: usize, const P: usize>(
    w: [*const u8; 4],
    nb: usize,
    act: &Groups,
    g: [usize; T],
    layout: Unpacked,
    mins: usize,
) -> [[[f32; 16]; T]; 4] {
    let k = nb * 256;
    let xq: [*const i8; T] = std::array::from_fn(|i| act.qs[g[i] * 16 * k..].as_ptr());
    let mut f = [[_mm512_setzero_ps(); T]; 4];
    for b in 0..nb {
        let u: [*const u8; 4] = std::array::from_fn(|r| w[r].add(b * layout.bytes));
        let sc = u.map(|u| u.add(layout.scales).cast::<i32>());
        let xb = xq.map(|x| x.add(b * 256 * 16));
        let zero = |_| [_mm512_setzero_si512(); T];
        let s = scaled_subblocks::<T, N_SUB>(u, sc, xb, zero);
        let dw: [*const f32; 4] = std::array::from_fn(|r| u[r].add(layout.d).cast());
        add_block(&mut f, &s, dw.map(|d| d.read()), act, g, nb, b);
        let dmin = dw.map(|d| d.add(1).read());
        sub_mins::<T, P>(&mut f, u.map(|u| u.add(mins)), dmin, act, g, nb, b);
    }
    tile_values(f)
}

/// The f16 at byte `at` of block `b` of 4 rows, widened.
#[inline]
#[target_feature(enable = "avx2,f16c")]
pub(crate) unsafe fn halves4(w: [*const u8; 4], block_bytes: usize, b: usize, at: usize) -> __m128 {
    let h = |r: usize| {
        w[r].add(b * block_bytes + at)
            .cast::<i16>()
            .read_unaligned()
    };
    _mm_cvtph_ps(_mm_set_epi16(0, 0, 0, 0, h(3), h(2), h(1), h(0)))
}

/// A 256-value block's float steps on 4 rows (the module comment's sequence): `acc =
/// fma(S_b, d_w·d_x, acc)`, then, given the mins' sums `M_b`, `acc = fma(−M_b, dmin_w·d_x,
/// acc)`; `d_w` is the f16 at byte `d_at` of block `b`, `dmin_w` the one after it.
///
/// # Safety
/// AVX2, FMA and F16C; each `w[r]` holds block `b`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn block_steps(
    acc: __m128,
    s: __m128i,
    m: Option<__m128i>,
    w: [*const u8; 4],
    block_bytes: usize,
    b: usize,
    d_at: usize,
    d_x: f32,
) -> __m128 {
    let dx = _mm_set1_ps(d_x);
    let d = _mm_mul_ps(halves4(w, block_bytes, b, d_at), dx);
    let acc = _mm_fmadd_ps(_mm_cvtepi32_ps(s), d, acc);
    match m {
        Some(m) => {
            let dmin = _mm_mul_ps(halves4(w, block_bytes, b, d_at + 2), dx);
            _mm_fnmadd_ps(_mm_cvtepi32_ps(m), dmin, acc)
        }
        None => acc,
    }
}

/// f16 widened to f32 (exactly).
///
/// # Safety
/// `p` is readable for 2 bytes.
#[inline(always)]
pub(crate) unsafe fn f16_at(p: *const u8) -> f32 {
    half::f16::from_bits(p.cast::<u16>().read_unaligned()).to_f32()
}

/// AVX2's `scaled_subblocks`, for one 16-token group in two halves of 8 tokens:
/// `s[r][h] = Σ_sb sc_r[sb] · Σ_{k∈sb} q_r[k] x_h[k]`, the block's values `q` as bytes at
/// `u[r]`: unsigned, at most `MAX`, or with `SIGNED` signed (`MAX` 127), multiplied as ggml's
/// AVX2 code does (`|q|` times `x` with `q`'s sign). Without `vpdpbusd`, `vpmaddubsw` makes i16
/// pairs of products, each at most `2 · MAX · 128` in magnitude; as many 4-value steps as
/// cannot overflow i16 are summed there (Q4_K 8, Q5_K 4, Q6_K 2, signed values 1; Q2_K and
/// Q3_K their sub-blocks' 4), then multiplied by the sub-block's scale with `vpmaddwd`: exact
/// i32 sums.
///
/// # Safety
/// AVX2; `u[r]` readable for 256 bytes, `sc[r]` for `N_SUB` i32 in i16 range, `xq` for the
/// block's 16 × 256 activations in the groups layout.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn scaled_subblocks_avx2<
    const N_SUB: usize,
    const MAX: usize,
    const SIGNED: bool,
>(
    u: [*const u8; 4],
    sc: [*const i32; 4],
    xq: *const i8,
) -> [[__m256i; 2]; 4] {
    let steps = 64 / N_SUB;
    let run = (i16::MAX as usize / (2 * MAX * 128)).clamp(1, steps);
    let mut s = [[_mm256_setzero_si256(); 2]; 4];
    for sb in 0..N_SUB {
        for j0 in (0..steps).step_by(run) {
            let mut p = [[_mm256_setzero_si256(); 2]; 4];
            for j in j0..(j0 + run).min(steps) {
                let k4 = steps * sb + j;
                let x: [__m256i; 2] =
                    std::array::from_fn(|h| _mm256_loadu_si256(xq.add(64 * k4 + 32 * h).cast()));
                for r in 0..4 {
                    let q = _mm256_set1_epi32(u[r].add(4 * k4).cast::<i32>().read_unaligned());
                    for h in 0..2 {
                        let pairs = match SIGNED {
                            true => _mm256_maddubs_epi16(
                                _mm256_sign_epi8(q, q),
                                _mm256_sign_epi8(x[h], q),
                            ),
                            false => _mm256_maddubs_epi16(q, x[h]),
                        };
                        p[r][h] = _mm256_add_epi16(p[r][h], pairs);
                    }
                }
            }
            for r in 0..4 {
                let scale = _mm256_set1_epi16(sc[r].add(sb).read() as i16);
                for h in 0..2 {
                    s[r][h] = _mm256_add_epi32(s[r][h], _mm256_madd_epi16(p[r][h], scale));
                }
            }
        }
    }
    s
}

/// What an AVX2 tile makes of the i16 pairs of weights at byte `at` of an unpacked block
/// (one i32 per pair) times the groups' extras, the i16 pairs `(X_2p, X_2p+1)` of the
/// activations' sums over the block's sub-blocks.
#[derive(Clone, Copy)]
pub(crate) enum Pairs {
    /// Nothing: the format has none.
    None,
    /// A term of `S_b` (Q6_K's `−32 Σ_s sc_s X_s`, Q3_K's `−4 Σ_s sc_s X_s`).
    Sum { at: usize },
    /// `M_b`, for the second float step with `dmin` (f32) after `d` (Q2_K, Q4_K, Q5_K).
    Mins { at: usize },
}

/// `(sums[0], sums[1])` as one i32, the low half first: the i16 pairs of `vpmaddwd` (and
/// `vpdpwssd`) that `Pairs` and the AVX-512 Q4_K tile's mins multiply.
pub(crate) fn i16_pair(sums: &[i16]) -> i32 {
    (sums[0] as u16 as i32) | ((sums[1] as i32) << 16)
}

/// `Format::tile` on AVX2 of a format unpacked as `layout`, with `N_SUB` scaled sub-blocks of
/// values as `scaled_subblocks_avx2` reads them and `pairs`: one group at a time (16 ymm
/// registers hold one group's accumulators), the AVX-512 tiles' float steps.
///
/// # Safety
/// AVX2, FMA; each `w[r]` holds `nb` blocks unpacked as `layout`; every `g[i] <
/// act.n_groups`, and `act` holds `nb` blocks of `N_SUB / 2` extras where `pairs` has some.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn tile_avx2<
    const T: usize,
    const N_SUB: usize,
    const MAX: usize,
    const SIGNED: bool,
>(
    w: [*const u8; 4],
    nb: usize,
    act: &Groups,
    g: [usize; T],
    layout: Unpacked,
    pairs: Pairs,
) -> [[[f32; 16]; T]; 4] {
    let mut out = [[[0f32; 16]; T]; 4];
    for (i, &g) in g.iter().enumerate() {
        let xq = act.qs[g * 16 * nb * 256..].as_ptr();
        let mut f = [[_mm256_setzero_ps(); 2]; 4];
        for b in 0..nb {
            let u: [*const u8; 4] = std::array::from_fn(|r| w[r].add(b * layout.bytes));
            let sc = u.map(|u| u.add(layout.scales).cast::<i32>());
            let xb = xq.add(b * 256 * 16);
            let mut s = scaled_subblocks_avx2::<N_SUB, MAX, SIGNED>(u, sc, xb);
            let blk = g * nb + b;
            let pair_sums = |at: usize| {
                let mut t = [[_mm256_setzero_si256(); 2]; 4];
                for p in 0..N_SUB / 2 {
                    let x = act.extra[(blk * N_SUB / 2 + p) * 16..].as_ptr();
                    let x: [__m256i; 2] =
                        std::array::from_fn(|h| _mm256_loadu_si256(x.add(8 * h).cast()));
                    for r in 0..4 {
                        let wp = u[r].add(at + 4 * p).cast::<i32>().read_unaligned();
                        for h in 0..2 {
                            let prod = _mm256_madd_epi16(_mm256_set1_epi32(wp), x[h]);
                            t[r][h] = _mm256_add_epi32(t[r][h], prod);
                        }
                    }
                }
                t
            };
            let mins = match pairs {
                Pairs::None => None,
                Pairs::Sum { at } => {
                    let t = pair_sums(at);
                    for r in 0..4 {
                        for h in 0..2 {
                            s[r][h] = _mm256_add_epi32(s[r][h], t[r][h]);
                        }
                    }
                    None
                }
                Pairs::Mins { at } => Some(pair_sums(at)),
            };
            for h in 0..2 {
                let dx = _mm256_loadu_ps(act.d[blk * 16 + 8 * h..].as_ptr());
                for r in 0..4 {
                    let dw = u[r].add(layout.d).cast::<f32>();
                    let d = _mm256_mul_ps(_mm256_set1_ps(dw.read()), dx);
                    f[r][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r][h]), d, f[r][h]);
                    if let Some(m) = mins {
                        let dmin = _mm256_mul_ps(_mm256_set1_ps(dw.add(1).read()), dx);
                        f[r][h] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(m[r][h]), dmin, f[r][h]);
                    }
                }
            }
        }
        for r in 0..4 {
            _mm256_storeu_ps(out[r][i].as_mut_ptr(), f[r][0]);
            _mm256_storeu_ps(out[r][i][8..].as_mut_ptr(), f[r][1]);
        }
    }
    out
}
