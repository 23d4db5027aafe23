//! Frozen weights read in place, and the three products a linear layer needs:
//! `y = x Wᵀ` with ggml's numerics (inference), `y = x Wᵀ` exactly in f32 (training forward),
//! and `dx += dy W` (training backward). Rows of `x`, `y`, `dx`, `dy` are tokens.

use std::ops::Range;

use candle_core::quantized::k_quants::GgmlType;
use rayon::prelude::*;

use super::bf16::{self, Panel, Values};
use super::disjoint::SyncPtr;
use super::gemm::{gemm, MatMut, MatRef};
use super::portable;
use super::qmatmul;
use super::quant::{as_blocks, dequantize_into, with_block_type};
use super::scratch::{self, Pod};
use crate::error::{Error, Result};
use crate::gguf::{ByteView, TensorType};

/// Fewest weight rows dequantized at a time by the exact products: 64 rows of a 2048-wide
/// matrix are 512 KiB of f32, enough for an efficient GEMM.
const DEQUANT_ROWS: usize = 64;

/// Most weight rows dequantized at a time by the exact forward products.
const MAX_DEQUANT_ROWS: usize = 4 * DEQUANT_ROWS;

/// Most weight columns per task of the backward products (`dx += dy W`): each task's columns
/// of `dx` (1 MiB for 1024 tokens) stay in its core's cache while the reduction runs over all
/// the weight's rows.
const BACKWARD_COLS: usize = 256;

/// Weight rows a backward task dequantizes at a time: 2 MiB of f32.
const BACKWARD_ROWS: usize = 2048;

/// Words of bf16 panels a backward task holds at a time (512 KiB).
const BF16_PANEL_WORDS: usize = 1 << 17;

/// Fewest tokens a bf16 backward task takes when tokens are split.
const MIN_BF16_TASK_TOKENS: usize = 64;

/// The share of `len` rows or columns per task that gives every thread two tasks, a multiple
/// of `step` within `min..=max`.
fn task_size(len: usize, step: usize, min: usize, max: usize) -> usize {
    len.div_ceil(2 * rayon::current_num_threads())
        .next_multiple_of(step)
        .clamp(min, max)
}

/// How a frozen weight multiplies activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Numerics {
    /// As ggml: activations rounded to the weight's dot type (q8 blocks, f16). Inference.
    Ggml,
    /// f32 on the dequantized weights: the function the training backward differentiates.
    Exact,
    /// Training's mixed precision: as `Exact`, but the frozen weights' products (forward and
    /// backward) on bf16-rounded operands with f32 sums, as PyTorch's bf16 autocast.
    Bf16,
}

/// A frozen matrix `[n_rows, n_cols]` (a weight `[n_out, n_in]`) of any tensor type.
#[derive(Clone, Debug)]
pub struct Weight {
    pub name: String,
    pub dtype: TensorType,
    pub n_rows: usize,
    pub n_cols: usize,
    data: ByteView,
}

impl Weight {
    /// Checks that `data` holds exactly `n_rows` rows of `n_cols` elements of `dtype`.
    pub fn new(
        name: &str,
        dtype: TensorType,
        n_rows: usize,
        n_cols: usize,
        data: ByteView,
    ) -> Result<Weight> {
        let expected = dtype
            .row_bytes(n_cols)
            .and_then(|row| row.checked_mul(n_rows));
        if expected != Some(data.len())
            || !(data.as_ptr() as usize).is_multiple_of(dtype.alignment())
        {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: vec![n_rows, n_cols],
                got: vec![data.len()],
            });
        }
        Ok(Weight {
            name: name.to_string(),
            dtype,
            n_rows,
            n_cols,
            data,
        })
    }

    pub fn data(&self) -> &ByteView {
        &self.data
    }

    /// Rows `rows` as a matrix named `name`: a view of the same bytes (a projection stored
    /// in a fused tensor).
    pub fn rows(&self, name: &str, rows: Range<usize>) -> Result<Weight> {
        if rows.start > rows.end || rows.end > self.n_rows {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: vec![rows.end, self.n_cols],
                got: vec![self.n_rows, self.n_cols],
            });
        }
        let row_bytes = self.row_bytes();
        let bytes = self
            .data
            .slice(rows.start * row_bytes..rows.end * row_bytes);
        Weight::new(name, self.dtype, rows.len(), self.n_cols, bytes)
    }

    fn row_bytes(&self) -> usize {
        self.data.len() / self.n_rows.max(1)
    }

    /// Rows `rows` as f32 into `out` (`rows.len() * n_cols` values): embedding lookups and
    /// the exact products.
    pub fn dequantize_rows(&self, rows: Range<usize>, out: &mut [f32]) {
        let bytes = &self.data[rows.start * self.row_bytes()..rows.end * self.row_bytes()];
        dequantize_into(self.dtype, bytes, out);
    }

    pub fn to_f32(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.n_rows * self.n_cols];
        self.dequantize_rows(0..self.n_rows, &mut out);
        out
    }

    /// `y[m, n_rows] = x[m, n_cols] · Wᵀ` with `numerics`.
    pub fn product(&self, numerics: Numerics, x: &[f32], y: &mut [f32]) {
        match numerics {
            Numerics::Ggml => self.matmul(x, y),
            Numerics::Exact => self.matmul_exact(x, y),
            Numerics::Bf16 => self.matmul_bf16(x, y),
        }
    }

    /// `dx[m, n_cols] += dy[m, n_rows] · W` with the forward's `numerics` (f32 unless `Bf16`).
    pub fn backward_input(&self, numerics: Numerics, dy: &[f32], dx: &mut [f32]) {
        match numerics {
            Numerics::Bf16 => self.matmul_backward_input_bf16(dy, dx),
            Numerics::Ggml | Numerics::Exact => self.matmul_backward_input(dy, dx),
        }
    }

    /// `y[m, n_rows] = x[m, n_cols] · Wᵀ` as ggml computes it: each row of `x` is first
    /// rounded to the weight's dot-product type (q8_0 / q8_1 / q8_K blocks for quantized
    /// weights, f16 / bf16 for half weights), then multiplied with integer or half dot kernels.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) {
        let m = x.len() / self.n_cols;
        assert!(x.len() == m * self.n_cols && y.len() == m * self.n_rows);
        let (data, n_rows, k) = (&self.data, self.n_rows, self.n_cols);
        if qmatmul::matmul(self.dtype, data, n_rows, k, x, y) {
            return;
        }
        if portable::supports(self.dtype) {
            return portable::matmul(self.dtype, data, n_rows, k, x, y);
        }
        with_block_type!(
            self.dtype, T => matmul_ggml::<T>(self, x, m, y),
            else unreachable!("portable::supports lists the types candle does not read")
        )
    }

    /// `y[m, n_rows] = x[m, n_cols] · Wᵀ` in f32 on the dequantized weight: the exact math
    /// that the training forward differentiates.
    pub fn matmul_exact(&self, x: &[f32], y: &mut [f32]) {
        self.matmul_dense(x, y, false)
    }

    /// `y[m, n_rows] = x[m, n_cols] · Wᵀ` on bf16-rounded `x` and `W` with f32 sums: the
    /// training forward's mixed-precision mode (`ops::bf16`).
    pub fn matmul_bf16(&self, x: &[f32], y: &mut [f32]) {
        let m = x.len() / self.n_cols;
        assert!(x.len() == m * self.n_cols && y.len() == m * self.n_rows);
        if !bf16::available() {
            let x: Vec<f32> = x.iter().map(|&v| bf16::round(v)).collect();
            return self.matmul_dense(&x, y, true);
        }
        let (n_rows, k, np) = (self.n_rows, self.n_cols, bf16::pairs(self.n_cols));
        scratch::with_pod::<u32, _>(m * np, |xb| {
            bf16::pack_rows(x, k, xb);
            self.for_row_blocks(bf16::COLS, y, |rows, y| {
                scratch::with_pod::<u32, _>(np * bf16::COLS, |words| {
                    let mut panel = Panel {
                        words,
                        pairs: np,
                        cols: rows.len(),
                    };
                    match self.halves(rows.clone()) {
                        Some(halves) => panel.fill_from_rows(halves, k),
                        None => self.with_dequantized_rows(rows, |w| {
                            panel.fill_from_rows(Values::F32(w), k)
                        }),
                    }
                    bf16::multiply(xb, np, m, &panel, y, n_rows, false);
                })
            })
        })
    }

    /// Rows `rows` as they are stored, where they are halves (F16 or BF16).
    fn halves(&self, rows: Range<usize>) -> Option<Values<'_>> {
        let bytes = &self.data[rows.start * self.row_bytes()..rows.end * self.row_bytes()];
        match self.dtype {
            TensorType::F16 => Some(Values::F16(bytes)),
            TensorType::BF16 => Some(Values::Bf16(bytes)),
            _ => None,
        }
    }

    /// Runs `f` on rows `rows` dequantized to f32 in this thread's scratch.
    fn with_dequantized_rows<R>(&self, rows: Range<usize>, f: impl FnOnce(&mut [f32]) -> R) -> R {
        scratch::with_f32(|w| {
            w.resize(rows.len() * self.n_cols, 0.0);
            self.dequantize_rows(rows, w);
            f(w)
        })
    }

    /// `matmul_exact`, or with `W` rounded to bf16 as it is dequantized (`x` already is).
    fn matmul_dense(&self, x: &[f32], y: &mut [f32], round: bool) {
        let m = x.len() / self.n_cols;
        assert!(x.len() == m * self.n_cols && y.len() == m * self.n_rows);
        let x = MatRef::new(x, m, self.n_cols);
        if self.dtype == TensorType::F32 && !round {
            let w = MatRef::new(as_blocks::<f32>(&self.data), self.n_rows, self.n_cols);
            return gemm(x, w.t(), MatMut::new(y, m, self.n_rows), false, true);
        }
        // Each task's product packs x anew: as few tasks as keep every thread busy.
        let block_rows = task_size(self.n_rows, 16, DEQUANT_ROWS, MAX_DEQUANT_ROWS);
        self.for_dequantized_blocks(block_rows, y, |rows, w, y| {
            if round {
                w.iter_mut().for_each(|v| *v = bf16::round(*v));
            }
            let y = MatMut::with_stride(y, m, rows.len(), self.n_rows);
            gemm(
                x,
                MatRef::new(w, rows.len(), self.n_cols).t(),
                y,
                false,
                false,
            );
        });
    }

    /// Runs `f(rows, w, y)` on blocks of `block_rows` weight rows in parallel: `w` holds the
    /// block dequantized to f32 (`[rows.len(), n_cols]`), `y` its columns of the output
    /// (`[m, n_rows]`, the slice starting at column `rows.start`, rows `n_rows` apart).
    fn for_dequantized_blocks(
        &self,
        block_rows: usize,
        y: &mut [f32],
        f: impl Fn(Range<usize>, &mut [f32], &mut [f32]) + Sync,
    ) {
        self.for_row_blocks(block_rows, y, |rows, y| {
            self.with_dequantized_rows(rows.clone(), |w| f(rows, w, y))
        })
    }

    /// Runs `f(rows, y)` on blocks of `block_rows` weight rows in parallel, `y` as in
    /// `for_dequantized_blocks`.
    fn for_row_blocks(
        &self,
        block_rows: usize,
        y: &mut [f32],
        f: impl Fn(Range<usize>, &mut [f32]) + Sync,
    ) {
        let m = y.len() / self.n_rows.max(1);
        if m == 0 {
            return;
        }
        let y_ptr = SyncPtr(y.as_mut_ptr());
        (0..self.n_rows.div_ceil(block_rows))
            .into_par_iter()
            .for_each(|block| {
                let rows = block * block_rows..((block + 1) * block_rows).min(self.n_rows);
                // SAFETY: each task writes only columns `rows` of y, disjoint across tasks.
                let y = unsafe { y_ptr.slice(rows.start, (m - 1) * self.n_rows + rows.len()) };
                f(rows, y)
            });
    }

    /// `dx[m, n_cols] += dy[m, n_rows] · W` in f32, dequantizing a block of rows at a time so
    /// that a quantized model is never held in f32 whole.
    pub fn matmul_backward_input(&self, dy: &[f32], dx: &mut [f32]) {
        self.backward_dense(dy, dx, false)
    }

    /// `dx[m, n_cols] += dy[m, n_rows] · W` on bf16-rounded `dy` and `W` with f32 sums: the
    /// training backward's mixed-precision mode.
    pub fn matmul_backward_input_bf16(&self, dy: &[f32], dx: &mut [f32]) {
        let m = dy.len() / self.n_rows;
        assert!(dy.len() == m * self.n_rows && dx.len() == m * self.n_cols);
        if !bf16::available() {
            let dy: Vec<f32> = dy.iter().map(|&v| bf16::round(v)).collect();
            return self.backward_dense(&dy, dx, true);
        }
        if m == 0 {
            return;
        }
        let (n, k, np) = (self.n_rows, self.n_cols, bf16::pairs(self.n_rows));
        // A task's columns of dx: whole panels, and whole blocks to dequantize.
        let width = bf16::COLS.max(self.dtype.block_size());
        let col_tasks = k.div_ceil(width);
        // Tokens split too where the columns alone leave threads idle (each such task fills
        // the same panels again).
        let splits = (2 * rayon::current_num_threads())
            .div_ceil(col_tasks)
            .min(m.div_ceil(MIN_BF16_TASK_TOKENS));
        let tokens = m.div_ceil(splits);
        // Weight rows turned into panels at a time: the task's panels stay in its cache while
        // every token multiplies them.
        let pass_rows = 2 * (BF16_PANEL_WORDS / width);
        let dx_ptr = SyncPtr(dx.as_mut_ptr());
        scratch::with_pod::<u32, _>(m * np, |dyb| {
            bf16::pack_rows(dy, n, dyb);
            let token_tasks = m.div_ceil(tokens);
            (0..col_tasks * token_tasks)
                .into_par_iter()
                .for_each(|task| {
                    let (c, t) = (task / token_tasks, task % token_tasks);
                    let cols = c * width..((c + 1) * width).min(k);
                    let t = t * tokens..((t + 1) * tokens).min(m);
                    // SAFETY: each task writes only tokens `t`, columns `cols` of dx, disjoint
                    // across tasks.
                    let dx = unsafe {
                        dx_ptr.slice(t.start * k + cols.start, (t.len() - 1) * k + cols.len())
                    };
                    let n_panels = cols.len().div_ceil(bf16::COLS);
                    for start in (0..n).step_by(pass_rows) {
                        let rows = start..(start + pass_rows).min(n);
                        let pairs = bf16::pairs(rows.len());
                        scratch::with_pod::<u32, _>(n_panels * pairs * bf16::COLS, |words| {
                            let mut panels: Vec<Panel> = words
                                .chunks_exact_mut(pairs * bf16::COLS)
                                .enumerate()
                                .map(|(i, words)| Panel {
                                    words,
                                    pairs,
                                    cols: (cols.len() - i * bf16::COLS).min(bf16::COLS),
                                })
                                .collect();
                            self.fill_panels_from_columns(rows.clone(), cols.clone(), &mut panels);
                            let dy = &dyb[t.start * np + rows.start / 2..];
                            for (i, panel) in panels.iter().enumerate() {
                                let dx = &mut dx[i * bf16::COLS..];
                                bf16::multiply(dy, np, t.len(), panel, dx, k, true);
                            }
                        })
                    }
                })
        })
    }

    /// The panels of `W[rows, cols]` (one per `bf16::COLS` columns), paired down each column,
    /// dequantized a few rows at a time.
    fn fill_panels_from_columns(
        &self,
        rows: Range<usize>,
        cols: Range<usize>,
        panels: &mut [Panel],
    ) {
        const ROWS: usize = 32;
        scratch::with_f32(|w| {
            for start in rows.clone().step_by(ROWS) {
                let sub = start..(start + ROWS).min(rows.end);
                w.resize(sub.len() * cols.len(), 0.0);
                self.dequantize_block(sub.clone(), cols.clone(), w);
                let p0 = (start - rows.start) / 2;
                for (i, panel) in panels.iter_mut().enumerate() {
                    panel.fill_from_columns(p0, w, sub.len(), cols.len(), i * bf16::COLS);
                }
            }
        })
    }

    /// `matmul_backward_input`, or with `W` rounded to bf16 as it is dequantized (`dy`
    /// already is).
    fn backward_dense(&self, dy: &[f32], dx: &mut [f32], round: bool) {
        let m = dy.len() / self.n_rows;
        assert!(dy.len() == m * self.n_rows && dx.len() == m * self.n_cols);
        if self.dtype == TensorType::F32 && !round {
            let w = MatRef::new(as_blocks::<f32>(&self.data), self.n_rows, self.n_cols);
            let dy = MatRef::new(dy, m, self.n_rows);
            return gemm(dy, w, MatMut::new(dx, m, self.n_cols), true, true);
        }
        if m == 0 {
            return;
        }
        let (n, k) = (self.n_rows, self.n_cols);
        // Whole blocks per task.
        let block = self.dtype.block_size();
        let width = task_size(k, block, block, BACKWARD_COLS.next_multiple_of(block));
        let dx_ptr = SyncPtr(dx.as_mut_ptr());
        (0..k.div_ceil(width)).into_par_iter().for_each(|task| {
            let cols = task * width..((task + 1) * width).min(k);
            // SAFETY: each task writes only columns `cols` of dx, disjoint across tasks.
            let dx = unsafe { dx_ptr.slice(cols.start, (m - 1) * k + cols.len()) };
            let mut dx = MatMut::with_stride(dx, m, cols.len(), k);
            scratch::with_f32(|w| {
                for start in (0..n).step_by(BACKWARD_ROWS) {
                    let rows = start..(start + BACKWARD_ROWS).min(n);
                    w.resize(rows.len() * cols.len(), 0.0);
                    self.dequantize_block(rows.clone(), cols.clone(), w);
                    if round {
                        w.iter_mut().for_each(|v| *v = bf16::round(*v));
                    }
                    let dy = MatRef::with_stride(&dy[rows.start..], m, rows.len(), n);
                    let w = MatRef::new(w, rows.len(), cols.len());
                    gemm(dy, w, dx.reborrow(), true, false);
                }
            })
        });
    }

    /// `W[rows, cols]` as f32 into `out` (`[rows.len(), cols.len()]`); `cols` must start and
    /// end on block boundaries (or at the row's end).
    fn dequantize_block(&self, rows: Range<usize>, cols: Range<usize>, out: &mut [f32]) {
        let row_bytes = self.row_bytes();
        let byte_at = |col: usize| self.dtype.row_bytes(col).expect("block-aligned columns");
        let (first, end) = (byte_at(cols.start), byte_at(cols.end));
        for (r, out) in rows.zip(out.chunks_exact_mut(cols.len())) {
            let row = &self.data[r * row_bytes..];
            dequantize_into(self.dtype, &row[first..end], out);
        }
    }
}

/// Weight rows each task takes in a ggml-style product: enough to amortise scheduling,
/// few enough that two cores share the work evenly.
const ROWS_PER_TASK: usize = 16;

fn matmul_ggml<T: GgmlType>(w: &Weight, x: &[f32], m: usize, y: &mut [f32])
where
    T::VecDotType: Pod,
{
    let blocks_per_row = w.n_cols / T::BLCK_SIZE;
    scratch::with_zeroed::<T::VecDotType, _>(m * blocks_per_row, |xq| {
        if T::DIRECT_COPY {
            T::VecDotType::direct_copy(x, xq);
        } else {
            xq.par_chunks_mut(blocks_per_row)
                .zip(x.par_chunks(w.n_cols))
                .for_each(|(xq_row, x_row)| T::VecDotType::from_float(x_row, xq_row));
        }
        dot_rows::<T>(w, xq, m, y)
    })
}

/// `y[t, j] = w_j · xq_t` for every token `t` and weight row `j`, split by weight rows.
fn dot_rows<T: GgmlType>(w: &Weight, xq: &[T::VecDotType], m: usize, y: &mut [f32]) {
    let blocks_per_row = w.n_cols / T::BLCK_SIZE;
    let w_blocks = as_blocks::<T>(&w.data);
    let n_rows = w.n_rows;
    let y_ptr = SyncPtr(y.as_mut_ptr());
    (0..n_rows.div_ceil(ROWS_PER_TASK))
        .into_par_iter()
        .for_each(|task| {
            let rows = task * ROWS_PER_TASK..((task + 1) * ROWS_PER_TASK).min(n_rows);
            let row_blocks = |j: usize| &w_blocks[j * blocks_per_row..(j + 1) * blocks_per_row];
            for t in 0..m {
                let x_row = &xq[t * blocks_per_row..(t + 1) * blocks_per_row];
                // SAFETY: this task alone writes y[t, rows].
                let y_row = unsafe { y_ptr.slice(t * n_rows + rows.start, rows.len()) };
                let mut j = rows.start;
                while j + 4 <= rows.end {
                    let (a, b, c, d) = T::vec_dot_4(
                        w.n_cols,
                        row_blocks(j),
                        row_blocks(j + 1),
                        row_blocks(j + 2),
                        row_blocks(j + 3),
                        x_row,
                    );
                    y_row[j - rows.start..j - rows.start + 4].copy_from_slice(&[a, b, c, d]);
                    j += 4;
                }
                for j in j..rows.end {
                    y_row[j - rows.start] = T::vec_dot(w.n_cols, row_blocks(j), x_row);
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::quant::quantize;

    fn weight(dtype: TensorType, values: &[f32], n_rows: usize, n_cols: usize) -> Weight {
        let bytes = quantize(dtype, values);
        Weight::new("w", dtype, n_rows, n_cols, ByteView::from_vec(bytes)).unwrap()
    }

    fn naive(w: &[f32], x: &[f32], n_rows: usize, n_cols: usize) -> Vec<f32> {
        let m = x.len() / n_cols;
        let mut y = vec![0f32; m * n_rows];
        for t in 0..m {
            for j in 0..n_rows {
                y[t * n_rows + j] = (0..n_cols)
                    .map(|i| x[t * n_cols + i] * w[j * n_cols + i])
                    .sum();
            }
        }
        y
    }

    fn values(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                (((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 16) % 200) as f32
                    / 100.0
                    - 1.0
            })
            .collect()
    }

    /// `x Wᵀ` and `dy W` on bf16-rounded operands, summed in f64.
    fn rounded_products(w: &Weight, x: &[f32], dy: &[f32]) -> (Vec<f64>, Vec<f64>) {
        let (n, k) = (w.n_rows, w.n_cols);
        let r = |v: &f32| bf16::round(*v) as f64;
        let (w, x, dy): (Vec<f64>, Vec<f64>, Vec<f64>) = (
            w.to_f32().iter().map(r).collect(),
            x.iter().map(r).collect(),
            dy.iter().map(r).collect(),
        );
        let m = x.len() / k;
        let y = (0..m * n)
            .map(|i| (0..k).map(|c| x[i / n * k + c] * w[i % n * k + c]).sum())
            .collect();
        let dx = (0..m * k)
            .map(|i| (0..n).map(|j| dy[i / k * n + j] * w[j * k + i % k]).sum())
            .collect();
        (y, dx)
    }

    #[test]
    fn bf16_products_are_the_rounded_operands_products() {
        // Odd and ragged sizes: a tail of pairs, of panel columns and of kernel rows.
        let cases = [
            (TensorType::F32, 67, 37, 7),
            (TensorType::F16, 130, 64, 13),
            (TensorType::Q4K, 300, 256, 6),
            (TensorType::Q8_0, 65, 96, 1),
            // The backward in two passes of rows (the last one odd), tokens split in tasks.
            (TensorType::Q4K, 2 * BF16_PANEL_WORDS / 256 + 7, 256, 130),
        ];
        for (dtype, n_rows, n_cols, m) in cases {
            let w = weight(dtype, &values(n_rows * n_cols, 5), n_rows, n_cols);
            let (x, dy) = (values(m * n_cols, 6), values(m * n_rows, 7));
            let (want_y, want_dx) = rounded_products(&w, &x, &dy);
            let rounded = |v: &[f32]| v.iter().map(|&v| bf16::round(v)).collect::<Vec<_>>();
            // The path this CPU takes, and the f32 fallback, whichever that is.
            let mut ys = [vec![0f32; m * n_rows], vec![0f32; m * n_rows]];
            w.matmul_bf16(&x, &mut ys[0]);
            w.matmul_dense(&rounded(&x), &mut ys[1], true);
            let mut dxs = [vec![1f32; m * n_cols], vec![1f32; m * n_cols]];
            w.matmul_backward_input_bf16(&dy, &mut dxs[0]);
            w.backward_dense(&rounded(&dy), &mut dxs[1], true);
            // f32 sums of exact products: a few ulps of the sum of magnitudes.
            let tol = |terms: usize| 4.0 * terms as f64 * f32::EPSILON as f64;
            for y in &ys {
                for (a, b) in y.iter().zip(&want_y) {
                    assert!((*a as f64 - b).abs() < tol(n_cols), "{dtype} y: {a} vs {b}");
                }
            }
            for dx in &dxs {
                for (a, b) in dx.iter().zip(&want_dx) {
                    let b = b + 1.0;
                    assert!(
                        (*a as f64 - b).abs() < tol(n_rows),
                        "{dtype} dx: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn backward_sums_every_row_chunk_into_every_column_task() {
        // More rows than one chunk of BACKWARD_ROWS, and column tasks of whole blocks with a
        // ragged last one.
        let (n_rows, n_cols, m) = (BACKWARD_ROWS + 37, 96, 3);
        for dtype in [TensorType::F16, TensorType::Q8_0] {
            let w = weight(dtype, &values(n_rows * n_cols, 8), n_rows, n_cols);
            let dense = w.to_f32();
            let dy = values(m * n_rows, 9);
            let mut dx = vec![1f32; m * n_cols];
            w.matmul_backward_input(&dy, &mut dx);
            for (i, got) in dx.iter().enumerate() {
                let (t, c) = (i / n_cols, i % n_cols);
                let want: f64 = 1.0
                    + (0..n_rows)
                        .map(|j| dy[t * n_rows + j] as f64 * dense[j * n_cols + c] as f64)
                        .sum::<f64>();
                let tol = 4.0 * n_rows as f64 * f32::EPSILON as f64;
                assert!((*got as f64 - want).abs() < tol, "{dtype} dx[{t}, {c}]");
            }
        }
    }

    #[test]
    fn products_agree_with_a_naive_loop_on_every_type() {
        let (n_rows, n_cols, m) = (37, 512, 5);
        let x = values(m * n_cols, 1);
        for dtype in [
            TensorType::F32,
            TensorType::F16,
            TensorType::Q8_0,
            TensorType::Q4_1,
            TensorType::Q5_1,
            TensorType::Q2K,
            TensorType::Q3K,
            TensorType::Q4K,
            TensorType::Q6K,
            TensorType::IQ4NL,
            TensorType::IQ4XS,
        ] {
            let w = weight(dtype, &values(n_rows * n_cols, 2), n_rows, n_cols);
            let dense = w.to_f32();
            let expected = naive(&dense, &x, n_rows, n_cols);
            let mut exact = vec![0f32; m * n_rows];
            w.matmul_exact(&x, &mut exact);
            let mut ggml = vec![0f32; m * n_rows];
            w.matmul(&x, &mut ggml);
            for ((e, a), g) in expected.iter().zip(&exact).zip(&ggml) {
                assert!((e - a).abs() < 1e-3, "{dtype}: exact {a} vs {e}");
                // ggml rounds activations to 8 bits: about 1% of the row's scale.
                assert!(
                    (e - g).abs() < 0.02 * n_cols as f32 / 16.0,
                    "{dtype}: ggml {g} vs {e}"
                );
            }
            let dy = values(m * n_rows, 3);
            let mut dx = vec![1f32; m * n_cols];
            w.matmul_backward_input(&dy, &mut dx);
            for t in 0..m {
                for i in 0..n_cols {
                    let want: f32 = 1.0
                        + (0..n_rows)
                            .map(|j| dy[t * n_rows + j] * dense[j * n_cols + i])
                            .sum::<f32>();
                    assert!((dx[t * n_cols + i] - want).abs() < 1e-3, "{dtype}: dx");
                }
            }
        }
    }
}
