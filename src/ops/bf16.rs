//! Products on bf16-rounded operands with f32 sums: the frozen weights' products in training's
//! mixed-precision mode, as PyTorch's bf16 autocast computes them (operands rounded to bf16,
//! products accumulated in f32).
//!
//! A product of two bf16 values is exact in f32, so every implementation computes the same
//! terms and differs only in the order of the f32 additions. With AVX512_BF16, `vdpbf16ps`
//! multiplies pairs of bf16 values into f32 lanes at twice the rate of f32 FMAs; elsewhere
//! the rounded operands go through the f32 GEMM.
//!
//! Layout: a row of the left operand is bf16 pairs along the reduction, one `u32` word a pair
//! (the even element in the low half, as in memory); the right operand is a `Panel` of
//! `COLS` output columns, pair-major, so one vector load brings 16 columns' pairs.

/// Output columns of a panel: four 16-lane vectors.
pub(crate) const COLS: usize = 64;

/// `v` rounded to the nearest bf16 value (ties to even), as f32.
#[inline]
pub(crate) fn round(v: f32) -> f32 {
    f32::from_bits(bits(v) << 16)
}

/// The bf16 nearest `v` (ties to even; NaN stays NaN), without branches so that loops of it
/// vectorize.
#[inline(always)]
pub(crate) fn bits(v: f32) -> u32 {
    let b = v.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let quiet = (b >> 16) | 0x40;
    if v.is_nan() {
        quiet
    } else {
        rounded
    }
}

/// The pair `(lo, hi)` as one word: `lo` in the low half.
#[inline(always)]
fn pair(lo: f32, hi: f32) -> u32 {
    bits(lo) | bits(hi) << 16
}

/// Whether this CPU multiplies bf16 pairs (AVX512_BF16), at the instruction-set level in use
/// (`LUGH_ISA` below `avx512` turns it off, so that the fallback is tested on one machine).
pub(crate) fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        use super::qmatmul::{isa, Isa};
        use std::sync::OnceLock;
        static BF16: OnceLock<bool> = OnceLock::new();
        *BF16.get_or_init(|| isa() == Isa::Avx512 && is_x86_feature_detected!("avx512bf16"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// Words per row of `n` values in pairs (an odd last value pairs with zero).
pub(crate) fn pairs(n: usize) -> usize {
    n.div_ceil(2)
}

/// Rows of `x` (`[m, n]`) as bf16 pairs into `out` (`[m, pairs(n)]`), in parallel.
pub(crate) fn pack_rows(x: &[f32], n: usize, out: &mut [u32]) {
    use rayon::prelude::*;
    let np = pairs(n);
    let rows = x.par_chunks_exact(n).zip(out.par_chunks_exact_mut(np));
    rows.for_each(|(row, out)| {
        for (o, w) in out.iter_mut().zip(row_pairs(row)) {
            *o = w;
        }
    });
}

/// The words of `row`'s pairs in order, an odd last value paired with zero.
fn row_pairs(row: &[f32]) -> impl Iterator<Item = u32> + '_ {
    let values = row.chunks_exact(2);
    let last = values.remainder().first().map(|&v| pair(v, 0.0));
    values.map(|v| pair(v[0], v[1])).chain(last)
}

/// A panel of `cols ≤ COLS` output columns and `pairs` reduction pairs, `[pairs][COLS]`
/// words, columns past `cols` zero.
pub(crate) struct Panel<'a> {
    pub words: &'a mut [u32],
    pub pairs: usize,
    pub cols: usize,
}

impl Panel<'_> {
    /// The panel of `cols` rows of `n` values (`rows[c * n + i]`, the forward's weight rows),
    /// paired along each row.
    pub fn fill_from_rows(&mut self, rows: &[f32], n: usize) {
        assert!(self.pairs == pairs(n) && rows.len() >= self.cols * n);
        // A block of pairs at a time, so that the words written down each column stay in L1.
        const BLOCK: usize = 16;
        for p0 in (0..self.pairs).step_by(BLOCK) {
            let values = 2 * p0..(2 * (p0 + BLOCK)).min(n);
            for (c, row) in rows.chunks_exact(n).take(self.cols).enumerate() {
                for (p, w) in row_pairs(&row[values.clone()]).enumerate() {
                    self.words[(p0 + p) * COLS + c] = w;
                }
            }
        }
        self.zero_columns_past_cols();
    }

    /// The panel of columns `c0..c0 + cols` of the `n` rows of `matrix` (`stride` values a
    /// row; the backward's weight, whose rows are the reduction), paired down each column.
    pub fn fill_from_columns(&mut self, matrix: &[f32], n: usize, stride: usize, c0: usize) {
        assert!(
            self.pairs == pairs(n) && (n == 0 || (n - 1) * stride + c0 + self.cols <= matrix.len())
        );
        let cols = self.cols;
        let row = |i: usize| &matrix[i * stride + c0..i * stride + c0 + cols];
        for (p, words) in self
            .words
            .chunks_exact_mut(COLS)
            .take(self.pairs)
            .enumerate()
        {
            let lo = row(2 * p);
            match 2 * p + 1 < n {
                true => {
                    let hi = row(2 * p + 1);
                    for ((w, &l), &h) in words.iter_mut().zip(lo).zip(hi) {
                        *w = pair(l, h);
                    }
                }
                false => {
                    for (w, &l) in words.iter_mut().zip(lo) {
                        *w = pair(l, 0.0);
                    }
                }
            }
        }
        self.zero_columns_past_cols();
    }

    fn zero_columns_past_cols(&mut self) {
        for words in self.words.chunks_exact_mut(COLS).take(self.pairs) {
            words[self.cols..].fill(0);
        }
    }
}

/// `c[t, ..cols] (+)= Σ_p a[t, p] · panel[p, ..cols]` for the `m` rows of `a` (`pairs` words
/// each, `a_stride` apart) into `c` (rows `c_stride` apart). Needs `available()`.
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
pub(crate) fn multiply(
    a: &[u32],
    a_stride: usize,
    m: usize,
    panel: &Panel,
    c: &mut [f32],
    c_stride: usize,
    accumulate: bool,
) {
    assert!(available());
    assert!(m == 0 || (m - 1) * a_stride + panel.pairs <= a.len());
    assert!(m == 0 || (m - 1) * c_stride + panel.cols <= c.len());
    assert!(panel.words.len() >= panel.pairs * COLS);
    #[cfg(target_arch = "x86_64")]
    for t0 in (0..m).step_by(avx512::ROWS) {
        let a = (a[t0 * a_stride..].as_ptr(), a_stride);
        let c = (c[t0 * c_stride..].as_mut_ptr(), c_stride);
        let panel = (panel.words.as_ptr(), panel.pairs, panel.cols);
        // SAFETY: `available()` found AVX512_BF16; each call takes min(m - t0, ROWS) rows,
        // all below `m`, and the asserts bound their reads and writes.
        unsafe {
            match m - t0 {
                1 => avx512::tile::<1>(a, panel, c, accumulate),
                2 => avx512::tile::<2>(a, panel, c, accumulate),
                3 => avx512::tile::<3>(a, panel, c, accumulate),
                4 => avx512::tile::<4>(a, panel, c, accumulate),
                5 => avx512::tile::<5>(a, panel, c, accumulate),
                _ => avx512::tile::<{ avx512::ROWS }>(a, panel, c, accumulate),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::COLS;

    /// Rows of the left operand one call multiplies (6 × 4 accumulators in registers).
    pub(super) const ROWS: usize = 6;

    /// `R` rows of `a` (`stride` words apart) times the panel `(words, pairs, cols)`, into
    /// `R` rows of `c` (`stride` values apart).
    ///
    /// # Safety
    /// AVX-512 F and BF16; each row of `a` has `pairs` words, `words` has `pairs * COLS`, and
    /// each row of `c` is writable for `cols` values.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn tile<const R: usize>(
        (a, a_stride): (*const u32, usize),
        (words, pairs, cols): (*const u32, usize, usize),
        (c, c_stride): (*mut f32, usize),
        accumulate: bool,
    ) {
        let a: [*const u32; R] = std::array::from_fn(|i| a.add(i * a_stride));
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        for p in 0..pairs {
            let w = words.add(p * COLS);
            let b: [__m512bh; 4] = std::array::from_fn(|j| {
                std::mem::transmute(_mm512_loadu_si512(w.add(16 * j).cast()))
            });
            for (acc, a) in acc.iter_mut().zip(a) {
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(*a.add(p) as i32));
                for (acc, b) in acc.iter_mut().zip(b) {
                    *acc = _mm512_dpbf16_ps(*acc, x, b);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let out = c.add(i * c_stride);
            for (j, &v) in acc.iter().enumerate() {
                let lanes = cols.saturating_sub(16 * j).min(16);
                let mask = ((1u32 << lanes) - 1) as __mmask16;
                let out = out.wrapping_add(16 * j);
                let v = match accumulate {
                    true => _mm512_add_ps(_mm512_maskz_loadu_ps(mask, out), v),
                    false => v,
                };
                _mm512_mask_storeu_ps(out, mask, v);
            }
        }
    }
}
