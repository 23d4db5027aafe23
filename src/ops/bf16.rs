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
        let done = pack_row_simd(row, out);
        for (o, w) in out[done..].iter_mut().zip(row_pairs(&row[2 * done..])) {
            *o = w;
        }
    });
}

/// The words of `row`'s first pairs that a vector path writes into `out`, 16 at a time:
/// how many (0 without one).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
fn pack_row_simd(row: &[f32], out: &mut [u32]) -> usize {
    #[cfg(target_arch = "x86_64")]
    if available() {
        let done = row.len() / 32 * 16;
        // SAFETY: AVX-512 is there (`available`); the slices bound the reads and writes.
        unsafe { avx512::pack_row(&row[..2 * done], &mut out[..done]) };
        return done;
    }
    0
}

/// The words of `row`'s pairs in order, an odd last value paired with zero.
fn row_pairs(row: &[f32]) -> impl Iterator<Item = u32> + '_ {
    let values = row.chunks_exact(2);
    let last = values.remainder().first().map(|&v| pair(v, 0.0));
    values.map(|v| pair(v[0], v[1])).chain(last)
}

/// Values a panel is filled from: f32, or a weight's halves as they are stored (F16 widened
/// exactly; BF16 values are bf16 already), without an f32 copy.
#[derive(Clone, Copy)]
pub(crate) enum Values<'a> {
    F32(&'a [f32]),
    /// Little-endian F16 values, 2 bytes each.
    F16(&'a [u8]),
    /// Little-endian BF16 values, 2 bytes each.
    Bf16(&'a [u8]),
}

impl Values<'_> {
    fn len(&self) -> usize {
        match self {
            Values::F32(v) => v.len(),
            Values::F16(b) | Values::Bf16(b) => b.len() / 2,
        }
    }

    fn get(&self, i: usize) -> f32 {
        let bits16 = |b: &[u8]| u16::from_le_bytes([b[2 * i], b[2 * i + 1]]);
        match self {
            Values::F32(v) => v[i],
            Values::F16(b) => half::f16::from_bits(bits16(b)).to_f32(),
            Values::Bf16(b) => f32::from_bits(u32::from(bits16(b)) << 16),
        }
    }
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
    pub fn fill_from_rows(&mut self, rows: Values, n: usize) {
        assert!(self.pairs == pairs(n) && rows.len() >= self.cols * n);
        // A block of pairs at a time, so that the words written down each column stay in L1.
        const BLOCK: usize = 16;
        let done = self.fill_from_rows_simd(rows, n);
        for p0 in (done..self.pairs).step_by(BLOCK) {
            for c in 0..self.cols {
                for p in p0..(p0 + BLOCK).min(self.pairs) {
                    let at = |i: usize| match i < n {
                        true => rows.get(c * n + i),
                        false => 0.0,
                    };
                    self.words[p * COLS + c] = pair(at(2 * p), at(2 * p + 1));
                }
            }
        }
        self.zero_columns_past_cols();
    }

    /// The panel's first pairs from `rows` by a vector path, 16 at a time: how many (0
    /// without one).
    #[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables))]
    fn fill_from_rows_simd(&mut self, rows: Values, n: usize) -> usize {
        #[cfg(target_arch = "x86_64")]
        if available() {
            let done = n / 32 * 16;
            // SAFETY: AVX-512 is there (`available`); the caller's assert bounds the reads
            // of `cols` rows of `n` values, and `words` holds `pairs * COLS ≥ done * COLS`.
            unsafe { avx512::fill_from_rows(self.words, rows, n, self.cols, done) };
            return done;
        }
        0
    }

    /// Pairs `p0..p0 + pairs(n)` of the panel from columns `c0..c0 + cols` of the `n` rows
    /// of `matrix` (`stride` values a row; the backward's weight, whose rows are the
    /// reduction), paired down each column.
    pub fn fill_from_columns(
        &mut self,
        p0: usize,
        matrix: &[f32],
        n: usize,
        stride: usize,
        c0: usize,
    ) {
        assert!(
            p0 + pairs(n) <= self.pairs
                && (n == 0 || (n - 1) * stride + c0 + self.cols <= matrix.len())
        );
        let cols = self.cols;
        let row = |i: usize| &matrix[i * stride + c0..i * stride + c0 + cols];
        let words = self.words.chunks_exact_mut(COLS).skip(p0);
        for (p, words) in words.take(pairs(n)).enumerate() {
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
            words[cols..].fill(0);
        }
    }

    fn zero_columns_past_cols(&mut self) {
        for words in self.words.chunks_exact_mut(COLS).take(self.pairs) {
            words[self.cols..].fill(0);
        }
    }
}

/// `c[t, ..cols] (+)= Σ_p a[t, p] · panel[p, ..cols]` for the `m` rows of `a` (`pairs` words
/// each, `a_stride` apart) into `c` (rows `c_stride` apart). Needs `available()`; takes the
/// tile unit where there is one (`amx`).
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
    #[cfg(target_arch = "x86_64")]
    multiply_on(
        amx::available(),
        a,
        a_stride,
        m,
        panel,
        c,
        c_stride,
        accumulate,
    );
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("bf16::available() is false off x86-64");
}

/// `multiply` by the tile unit (`amx`) or by `vdpbf16ps`.
#[cfg(target_arch = "x86_64")]
#[allow(clippy::too_many_arguments)]
fn multiply_on(
    tile_unit: bool,
    a: &[u32],
    a_stride: usize,
    m: usize,
    panel: &Panel,
    c: &mut [f32],
    c_stride: usize,
    accumulate: bool,
) {
    assert!(available() && (!tile_unit || amx::available()));
    assert!(m == 0 || (m - 1) * a_stride + panel.pairs <= a.len());
    assert!(m == 0 || (m - 1) * c_stride + panel.cols <= c.len());
    assert!(panel.words.len() >= panel.pairs * COLS);
    let words = (panel.words.as_ptr(), panel.pairs, panel.cols);
    if tile_unit {
        // SAFETY: `amx::available()`; the asserts bound the reads and writes.
        unsafe {
            amx::multiply(
                (a.as_ptr(), a_stride),
                m,
                words,
                (c.as_mut_ptr(), c_stride),
                accumulate,
            )
        };
        return;
    }
    for t0 in (0..m).step_by(avx512::ROWS) {
        let a = (a[t0 * a_stride..].as_ptr(), a_stride);
        let c = (c[t0 * c_stride..].as_mut_ptr(), c_stride);
        // SAFETY: `available()` found AVX512_BF16; each call takes min(m - t0, ROWS) rows,
        // all below `m`, and the asserts bound their reads and writes.
        unsafe {
            match m - t0 {
                1 => avx512::tile::<1>(a, words, c, accumulate),
                2 => avx512::tile::<2>(a, words, c, accumulate),
                3 => avx512::tile::<3>(a, words, c, accumulate),
                4 => avx512::tile::<4>(a, words, c, accumulate),
                5 => avx512::tile::<5>(a, words, c, accumulate),
                _ => avx512::tile::<{ avx512::ROWS }>(a, words, c, accumulate),
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx;

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::{Values, COLS};

    /// Rows of the left operand one call multiplies (6 × 4 accumulators in registers).
    pub(super) const ROWS: usize = 6;

    /// Pairs `0..pairs` (a multiple of 16) of the panel of `cols` rows of `n` values into
    /// `words` (`[pairs][COLS]`): 16 rows × 16 pairs are rounded and paired a row a vector,
    /// then transposed in registers.
    ///
    /// # Safety
    /// AVX-512 F; `rows` holds `cols ≤ COLS` rows of `n ≥ 2 * pairs` values and `words` at
    /// least `pairs * COLS` words.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn fill_from_rows(
        words: &mut [u32],
        rows: Values,
        n: usize,
        cols: usize,
        pairs: usize,
    ) {
        debug_assert!(pairs.is_multiple_of(16) && 2 * pairs <= n && cols <= COLS);
        debug_assert!(rows.len() >= cols * n && words.len() >= pairs * COLS);
        for c0 in (0..cols).step_by(16) {
            for p0 in (0..pairs).step_by(16) {
                let mut v: [__m512i; 16] = std::array::from_fn(|r| match c0 + r < cols {
                    true => pairs_at(rows, (c0 + r) * n + 2 * p0),
                    false => _mm512_setzero_si512(),
                });
                transpose16(&mut v);
                for (i, v) in v.iter().enumerate() {
                    _mm512_storeu_si512(words.as_mut_ptr().add((p0 + i) * COLS + c0).cast(), *v);
                }
            }
        }
    }

    /// `row` (a multiple of 32 values) as bf16 pairs into `out` (half as many words).
    ///
    /// # Safety
    /// AVX-512 F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn pack_row(row: &[f32], out: &mut [u32]) {
        assert!(row.len() == 2 * out.len() && out.len().is_multiple_of(16));
        for (src, dst) in row.chunks_exact(32).zip(out.chunks_exact_mut(16)) {
            _mm512_storeu_si512(dst.as_mut_ptr().cast(), round_pairs(src.as_ptr()));
        }
    }

    /// Values `i..i + 32` of `values` as 16 words of bf16 pairs, rounded as `super::bits`
    /// does.
    ///
    /// # Safety
    /// AVX-512 F; `values` holds them.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn pairs_at(values: Values, i: usize) -> __m512i {
        match values {
            Values::F32(v) => round_pairs(v.as_ptr().add(i)),
            Values::F16(b) => {
                let p = b.as_ptr().add(2 * i);
                let widen = |p: *const u8| _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()));
                round_pairs_of(widen(p), widen(p.add(32)))
            }
            // bf16 already: the pairs are the stored words (a NaN stays as it is stored).
            Values::Bf16(b) => _mm512_loadu_si512(b.as_ptr().add(2 * i).cast()),
        }
    }

    /// The 32 values at `src` as 16 words of bf16 pairs, rounded as `super::bits` does.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn round_pairs(src: *const f32) -> __m512i {
        round_pairs_of(_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)))
    }

    /// Values `lo` (0–15) and `hi` (16–31) as 16 words of bf16 pairs, rounded as
    /// `super::bits` does.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn round_pairs_of(lo: __m512, hi: __m512) -> __m512i {
        let half = |v: __m512| {
            let b = _mm512_castps_si512(v);
            let odd = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
            let bias = _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff));
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(b, bias));
            let quiet = _mm512_or_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(0x40));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
            _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, rounded, quiet))
        };
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(half(lo)), half(hi))
    }

    /// `v[r]` lane `c` becomes `v[c]` lane `r`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(v: &mut [__m512i; 16]) {
        // Pairs of rows interleaved, then pairs of pairs: each 128-bit lane holds a 4 × 4
        // block transposed, `u[4i + j]` lane `l` = rows `4i..4i + 4` of column `4l + j`.
        let t: [__m512i; 16] = std::array::from_fn(|i| match i % 2 {
            0 => _mm512_unpacklo_epi32(v[i], v[i + 1]),
            _ => _mm512_unpackhi_epi32(v[i - 1], v[i]),
        });
        let u: [__m512i; 16] = std::array::from_fn(|i| {
            let (base, j) = (i - i % 4, i % 4);
            let (a, b) = (t[base + j / 2], t[base + j / 2 + 2]);
            match j % 2 {
                0 => _mm512_unpacklo_epi64(a, b),
                _ => _mm512_unpackhi_epi64(a, b),
            }
        });
        // Then the 128-bit lanes gathered: column `4l + j` takes lane `l` of u[j], u[4 + j],
        // u[8 + j] and u[12 + j].
        for j in 0..4 {
            let x0 = _mm512_shuffle_i32x4::<0x44>(u[j], u[4 + j]);
            let x1 = _mm512_shuffle_i32x4::<0xee>(u[j], u[4 + j]);
            let y0 = _mm512_shuffle_i32x4::<0x44>(u[8 + j], u[12 + j]);
            let y1 = _mm512_shuffle_i32x4::<0xee>(u[8 + j], u[12 + j]);
            v[j] = _mm512_shuffle_i32x4::<0x88>(x0, y0);
            v[4 + j] = _mm512_shuffle_i32x4::<0xdd>(x0, y0);
            v[8 + j] = _mm512_shuffle_i32x4::<0x88>(x1, y1);
            v[12 + j] = _mm512_shuffle_i32x4::<0xdd>(x1, y1);
        }
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Both units of an AVX512_BF16 CPU with AMX (the tile unit and `vdpbf16ps`) against
    /// f64 sums of the rounded operands; `bf16_products_are_the_rounded_operands_products`
    /// (ops::matmul) covers the unit each CPU takes.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn tile_unit_and_vdpbf16ps_products_are_the_rounded_operands_products() {
        if !available() {
            return;
        }
        let value = |i: usize, seed: usize| {
            ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 7) % 2001) as f32 / 1000.0 - 1.0
        };
        // Whole tiles, a tail of rows, of pairs and of panel columns, an odd last value.
        for (m, n, cols) in [
            (16, 32, 64),
            (1, 64, 64),
            (17, 75, 5),
            (40, 200, 64),
            (33, 16, 20),
        ] {
            let (rows, x): (Vec<f32>, Vec<f32>) = (
                (0..cols * n).map(|i| value(i, 1)).collect(),
                (0..m * n).map(|i| value(i, 2)).collect(),
            );
            let np = pairs(n);
            let mut words = vec![0; np * COLS];
            let mut panel = Panel {
                words: &mut words,
                pairs: np,
                cols,
            };
            panel.fill_from_rows(Values::F32(&rows), n);
            let mut a = vec![0; m * np];
            pack_rows(&x, n, &mut a);
            let r = |v: f32| round(v) as f64;
            let want = |t: usize, c: usize| -> f64 {
                (0..n).map(|i| r(x[t * n + i]) * r(rows[c * n + i])).sum()
            };
            let tol = 4.0 * n as f64 * f32::EPSILON as f64;
            let units = [false, true];
            for &tile_unit in units.iter().filter(|&&u| !u || amx::available()) {
                for accumulate in [false, true] {
                    // Rows of `c` wider than the panel: the columns past it stay as they were.
                    let stride = cols + 3;
                    let mut c = vec![0.5f32; m * stride];
                    multiply_on(tile_unit, &a, np, m, &panel, &mut c, stride, accumulate);
                    for t in 0..m {
                        for j in 0..stride {
                            let got = c[t * stride + j] as f64;
                            let expect = match j < cols {
                                true => want(t, j) + if accumulate { 0.5 } else { 0.0 },
                                false => 0.5,
                            };
                            assert!(
                                (got - expect).abs() < tol,
                                "amx {tile_unit} m {m} n {n} cols {cols} [{t}, {j}]: {got} vs {expect}"
                            );
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn packed_rows_and_panels_hold_each_pair_rounded_as_bits_rounds() {
        // Arbitrary bit patterns (NaNs, ties, subnormals among them); widths with whole
        // blocks of 16 pairs, a tail of pairs and an odd last value; 1 to 64 columns.
        let value = |i: usize| {
            let b = (i as u32).wrapping_mul(2654435761);
            f32::from_bits(if i.is_multiple_of(5) {
                b & 0xffff_0000 | 0x8000
            } else {
                b
            })
        };
        for (n, cols) in [(64, 64), (96, 37), (75, 16), (33, 1), (7, 20)] {
            let rows: Vec<f32> = (0..cols * n).map(value).collect();
            let mut words = vec![u32::MAX; pairs(n) * COLS];
            let mut panel = Panel {
                words: &mut words,
                pairs: pairs(n),
                cols,
            };
            panel.fill_from_rows(Values::F32(&rows), n);
            let mut packed = vec![u32::MAX; cols * pairs(n)];
            pack_rows(&rows, n, &mut packed);
            for p in 0..pairs(n) {
                for c in 0..COLS {
                    let at = |i: usize| match c < cols && i < n {
                        true => rows[c * n + i],
                        false => 0.0,
                    };
                    let want = pair(at(2 * p), at(2 * p + 1));
                    assert_eq!(
                        words[p * COLS + c],
                        want,
                        "n {n} cols {cols} pair {p} col {c}"
                    );
                    if c < cols {
                        assert_eq!(packed[c * pairs(n) + p], want, "n {n} row {c} pair {p}");
                    }
                }
            }
        }
    }

    #[test]
    fn panels_from_stored_halves_equal_panels_from_their_f32_values() {
        // Every kind of half but NaN (whose payload the stored BF16 words keep): subnormals,
        // infinities, values that round to even; whole blocks of 16 pairs, a tail, an odd
        // last value.
        let bits = |i: usize| (i as u32).wrapping_mul(2654435761).rotate_left(7) as u16;
        let fill = |values: Values, n: usize, cols: usize| {
            let mut words = vec![u32::MAX; pairs(n) * COLS];
            let mut panel = Panel {
                words: &mut words,
                pairs: pairs(n),
                cols,
            };
            panel.fill_from_rows(values, n);
            words
        };
        for (n, cols) in [(64, 64), (96, 37), (75, 16), (33, 1)] {
            let f16: Vec<half::f16> = (0..cols * n)
                .map(|i| half::f16::from_bits(bits(i)))
                .map(|v| if v.is_nan() { half::f16::ZERO } else { v })
                .collect();
            let bf16: Vec<half::bf16> = (0..cols * n)
                .map(|i| half::bf16::from_bits(bits(i)))
                .map(|v| if v.is_nan() { half::bf16::ZERO } else { v })
                .collect();
            let f16_bytes: Vec<u8> = f16.iter().flat_map(|v| v.to_le_bytes()).collect();
            let bf16_bytes: Vec<u8> = bf16.iter().flat_map(|v| v.to_le_bytes()).collect();
            let f16_f32: Vec<f32> = f16.iter().map(|v| v.to_f32()).collect();
            let bf16_f32: Vec<f32> = bf16.iter().map(|v| v.to_f32()).collect();
            assert!(
                fill(Values::F16(&f16_bytes), n, cols) == fill(Values::F32(&f16_f32), n, cols),
                "F16, n {n} cols {cols}"
            );
            assert!(
                fill(Values::Bf16(&bf16_bytes), n, cols) == fill(Values::F32(&bf16_f32), n, cols),
                "BF16, n {n} cols {cols}"
            );
        }
    }
}
