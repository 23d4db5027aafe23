//! f32 matrix products: through the `gemm` crate (candle's CPU GEMM), behind one safe
//! function, and the dot products for shapes too small to pay for its packing (whose matrix
//! may also hold f16 or bf16 values, widened exactly as they are loaded).

use gemm::Parallelism;

#[cfg(target_arch = "x86_64")]
use super::qmatmul::halves::{self, Widen};

/// A strided f32 matrix view: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A contiguous row-major `rows × cols` matrix.
    pub fn new(data: &'a [f32], rows: usize, cols: usize) -> MatRef<'a> {
        MatRef::with_stride(data, rows, cols, cols)
    }

    /// Row-major rows `row_stride` apart (a column block of a wider matrix).
    pub fn with_stride(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> MatRef<'a> {
        MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }

    /// The transpose, without moving data.
    pub fn t(self) -> MatRef<'a> {
        MatRef {
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    fn in_bounds(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride
                < self.data.len()
    }
}

/// A mutable row-major matrix whose rows are `row_stride` apart.
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
}

impl<'a> MatMut<'a> {
    /// The same view, borrowed again for one product.
    pub fn reborrow(&mut self) -> MatMut<'_> {
        MatMut {
            data: self.data,
            ..*self
        }
    }

    pub fn new(data: &'a mut [f32], rows: usize, cols: usize) -> MatMut<'a> {
        MatMut::with_stride(data, rows, cols, cols)
    }

    pub fn with_stride(
        data: &'a mut [f32],
        rows: usize,
        cols: usize,
        row_stride: usize,
    ) -> MatMut<'a> {
        MatMut {
            data,
            rows,
            cols,
            row_stride,
        }
    }
}

/// `c = a · b`, or `c += a · b` with `accumulate`; on the current rayon pool when `parallel`.
pub fn gemm(a: MatRef, b: MatRef, c: MatMut, accumulate: bool, parallel: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert!(
        b.rows == k && c.rows == m && c.cols == n,
        "gemm shapes: a {m}x{k}, b {}x{n}, c {}x{}",
        b.rows,
        c.rows,
        c.cols
    );
    assert!(a.in_bounds() && b.in_bounds(), "gemm operand out of bounds");
    assert!(m == 0 || n == 0 || (m - 1) * c.row_stride + n <= c.data.len());
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                c.data[i * c.row_stride..i * c.row_stride + n].fill(0.0);
            }
        }
        return;
    }
    let parallelism = if parallel {
        Parallelism::Rayon(rayon::current_num_threads())
    } else {
        Parallelism::None
    };
    // SAFETY: every view was bounds-checked above for the strides passed here; `c` is a unique
    // borrow, so it aliases neither `a` nor `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.data.as_mut_ptr(),
            1,
            c.row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// A matrix value the dot products widen to f32 as they load it: f32 itself, or the f16 and
/// bf16 of a frozen adapter kept in its file's precision. Widening is exact, so a product
/// has the same bits whichever of them holds the values.
pub trait RowValue: Copy + Sync {
    fn to_f32(self) -> f32;

    /// The 8 values at `p` as f32.
    ///
    /// # Safety
    /// AVX2 and F16C; `p` points to 8 values.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> core::arch::x86_64::__m256;

    /// The 4 values at `p` as f32.
    ///
    /// # Safety
    /// `p` points to 4 values.
    #[cfg(target_arch = "aarch64")]
    unsafe fn load4(p: *const Self) -> core::arch::aarch64::float32x4_t;
}

impl RowValue for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const f32) -> core::arch::x86_64::__m256 {
        core::arch::x86_64::_mm256_loadu_ps(p)
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn load4(p: *const f32) -> core::arch::aarch64::float32x4_t {
        core::arch::aarch64::vld1q_f32(p)
    }
}

impl RowValue for half::f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        super::f16::to_f32(self.to_bits())
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::f16) -> core::arch::x86_64::__m256 {
        <halves::F16 as Widen>::load8(p.cast(), 8)
    }

    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn load4(p: *const half::f16) -> core::arch::aarch64::float32x4_t {
        use core::arch::aarch64::*;
        super::f16::widen8(vcombine_u16(vld1_u16(p.cast()), vdup_n_u16(0)))[0]
    }
}

impl RowValue for half::bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const half::bf16) -> core::arch::x86_64::__m256 {
        <halves::Bf16 as Widen>::load8(p.cast(), 8)
    }

    /// A bf16 is the top half of an f32: widening shifts it into place.
    #[cfg(target_arch = "aarch64")]
    #[inline(always)]
    unsafe fn load4(p: *const half::bf16) -> core::arch::aarch64::float32x4_t {
        use core::arch::aarch64::*;
        vreinterpretq_f32_u32(vshll_n_u16::<16>(vld1_u16(p.cast())))
    }
}

/// `a · b` with eight independent sums, which the compiler turns into SIMD lanes (a single
/// running f32 sum cannot be reordered, so it would stay scalar).
#[inline]
pub fn dot<V: RowValue>(a: &[V], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(x, y)| x.to_f32() * y)
        .sum();
    for (x, y) in a8.zip(b8) {
        for l in 0..8 {
            lanes[l] += x[l].to_f32() * y[l];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `y[i] += m[i] · x` for the rows `m[i]` of `m` (`[y.len(), x.len()]`): one token's LoRA
/// terms, short rows whose sums a `dot` each would spend most of its time reducing. With
/// AVX2 or NEON, 8 rows' sums are reduced together.
pub fn add_row_dots<V: RowValue>(m: &[V], x: &[f32], y: &mut [f32]) {
    let k = x.len();
    assert_eq!(m.len(), y.len() * k);
    let done = match super::qmatmul::isa() {
        super::qmatmul::Isa::Portable => 0,
        _ => add_row_dots_simd(m, x, y),
    };
    for (y, row) in y[done..]
        .iter_mut()
        .zip(m[done * k..].chunks_exact(k.max(1)))
    {
        *y += dot(row, x);
    }
}

/// `add_row_dots` on whole groups of 8 rows, where the width suits the vectors; returns how
/// many rows it did.
#[cfg(target_arch = "x86_64")]
fn add_row_dots_simd<V: RowValue>(m: &[V], x: &[f32], y: &mut [f32]) -> usize {
    if !x.len().is_multiple_of(8) {
        return 0;
    }
    // SAFETY: every level above portable has AVX2, FMA and F16C.
    unsafe { add_row_dots_avx2(m, x, y) }
}

/// `add_row_dots` on whole groups of 8 rows (`x.len()` a multiple of 8); returns how many
/// rows it did.
///
/// # Safety
/// The CPU has AVX2, FMA and F16C.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn add_row_dots_avx2<V: RowValue>(m: &[V], x: &[f32], y: &mut [f32]) -> usize {
    use core::arch::x86_64::*;
    let k = x.len();
    let groups = y.len() / 8;
    for (g, y) in y.chunks_exact_mut(8).enumerate() {
        let rows = &m[g * 8 * k..][..8 * k];
        let mut acc = [_mm256_setzero_ps(); 8];
        for c in (0..k).step_by(8) {
            let x = _mm256_loadu_ps(x[c..].as_ptr());
            for (r, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(V::load8(rows[r * k + c..].as_ptr()), x, *acc);
            }
        }
        // Lanes 0..4 of `quads[q]` sum to row 4q's..4q + 4's low halves, lanes 4..8 to their
        // high halves.
        let pairs = [0, 2, 4, 6].map(|r| _mm256_hadd_ps(acc[r], acc[r + 1]));
        let quads = [
            _mm256_hadd_ps(pairs[0], pairs[1]),
            _mm256_hadd_ps(pairs[2], pairs[3]),
        ];
        let sums = _mm256_add_ps(
            _mm256_permute2f128_ps::<0x20>(quads[0], quads[1]),
            _mm256_permute2f128_ps::<0x31>(quads[0], quads[1]),
        );
        let y = y.as_mut_ptr();
        _mm256_storeu_ps(y, _mm256_add_ps(_mm256_loadu_ps(y), sums));
    }
    groups * 8
}

/// `add_row_dots` on whole groups of 8 rows, where the width is a multiple of 4; returns
/// how many rows it did.
#[cfg(target_arch = "aarch64")]
fn add_row_dots_simd<V: RowValue>(m: &[V], x: &[f32], y: &mut [f32]) -> usize {
    use core::arch::aarch64::*;
    let k = x.len();
    if !k.is_multiple_of(4) {
        return 0;
    }
    for (g, y) in y.chunks_exact_mut(8).enumerate() {
        let rows = &m[g * 8 * k..][..8 * k];
        // SAFETY: NEON is part of every aarch64 CPU; each load reads 4 values inside `x`,
        // `rows` or `y` (`k` a multiple of 4, `y` 8 long).
        unsafe {
            let mut acc = [vdupq_n_f32(0.0); 8];
            for c in (0..k).step_by(4) {
                let x = vld1q_f32(x.as_ptr().add(c));
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = vfmaq_f32(*acc, V::load4(rows.as_ptr().add(r * k + c)), x);
                }
            }
            // Pairwise adds: lane i of `quad(r)` is row r + i's sum.
            let quad = |r: usize| {
                vpaddq_f32(
                    vpaddq_f32(acc[r], acc[r + 1]),
                    vpaddq_f32(acc[r + 2], acc[r + 3]),
                )
            };
            let y = y.as_mut_ptr();
            vst1q_f32(y, vaddq_f32(vld1q_f32(y), quad(0)));
            vst1q_f32(y.add(4), vaddq_f32(vld1q_f32(y.add(4)), quad(4)));
        }
    }
    y.len() / 8 * 8
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn add_row_dots_simd<V: RowValue>(_: &[V], _: &[f32], _: &mut [f32]) -> usize {
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn products_match_spelled_out_values() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 2x3
        let w = [1.0, 0.0, -1.0, 2.0, 1.0, 0.5]; // 2x3, used transposed
        let mut c = [10.0f32; 4];
        gemm(
            MatRef::new(&a, 2, 3),
            MatRef::new(&w, 2, 3).t(),
            MatMut::new(&mut c, 2, 2),
            false,
            false,
        );
        assert_eq!(c, [-2.0, 5.5, -2.0, 16.0]);
        let b = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]; // 3x2
        gemm(
            MatRef::new(&a, 2, 3),
            MatRef::new(&b, 3, 2),
            MatMut::new(&mut c, 2, 2),
            true,
            false,
        );
        assert_eq!(c, [-2.0 + 22.0, 5.5 + 28.0, -2.0 + 49.0, 16.0 + 64.0]);
        // aᵀ a: [3x2]·[2x3]
        let mut g = [0f32; 9];
        gemm(
            MatRef::new(&a, 2, 3).t(),
            MatRef::new(&a, 2, 3),
            MatMut::new(&mut g, 3, 3),
            false,
            false,
        );
        assert_eq!(g, [17.0, 22.0, 27.0, 22.0, 29.0, 36.0, 27.0, 36.0, 45.0]);
    }

    /// Every row count around the groups of 8, widths that take the AVX2 or NEON path and
    /// others, against sums in f64.
    #[test]
    fn row_dots_add_each_rows_product() {
        for (n, k) in [
            (0, 8),
            (1, 16),
            (8, 16),
            (13, 24),
            (17, 8),
            (11, 12),
            (9, 5),
            (3, 0),
        ] {
            let m: Vec<f32> = (0..n * k)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let x: Vec<f32> = (0..k)
                .map(|i| ((i * 53 % 29) as f32 - 14.0) / 7.0)
                .collect();
            let mut y: Vec<f32> = (0..n).map(|i| i as f32).collect();
            add_row_dots(&m, &x, &mut y);
            for (i, &y) in y.iter().enumerate() {
                let expected = i as f64
                    + (0..k)
                        .map(|c| m[i * k + c] as f64 * x[c] as f64)
                        .sum::<f64>();
                assert!(
                    (y as f64 - expected).abs() < 1e-5,
                    "{n}×{k} row {i}: {y} vs {expected}"
                );
            }
        }
    }

    /// Row dots over f16 or bf16 values give the bits of the same dots over the values
    /// widened to f32 (the vector groups of 8 rows and the scalar rest alike), for values
    /// spread over each format's finite range, subnormals and signed zeros included.
    #[test]
    fn halves_dot_as_their_widened_values() {
        fn check<V: RowValue>(from_bits: impl Fn(u16) -> V) {
            for (n, k) in [(8, 16), (13, 24), (17, 8), (11, 12), (9, 5)] {
                let m: Vec<V> = (0..n * k)
                    .map(|i| (i as u32).wrapping_mul(2_654_435_761) >> 16)
                    .map(|bits| from_bits(bits as u16 & 0xbfff))
                    .filter(|v| v.to_f32().is_finite())
                    .chain(std::iter::repeat(from_bits(0x8000)))
                    .take(n * k)
                    .collect();
                let x: Vec<f32> = (0..k).map(|i| (i as f32 - 3.5) / 3.0).collect();
                let widened: Vec<f32> = m.iter().map(|v| v.to_f32()).collect();
                let (mut y, mut expected) = (vec![0.5f32; n], vec![0.5f32; n]);
                add_row_dots(&m, &x, &mut y);
                add_row_dots(&widened, &x, &mut expected);
                for (i, (y, e)) in y.iter().zip(&expected).enumerate() {
                    assert_eq!(y.to_bits(), e.to_bits(), "{n}×{k} row {i}: {y} vs {e}");
                }
            }
        }
        check(half::f16::from_bits);
        check(half::bf16::from_bits);
    }
}
