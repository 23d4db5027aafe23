//! Causal softmax attention with grouped-query heads, forward and backward, as matrix
//! products per head (`S = Q Kᵀ`, `O = P V`) over blocks of queries.
//!
//! Shapes (one sequence): queries `[n_tokens, n_head * head_dim]` at positions
//! `pos0 .. pos0 + n_tokens`; keys and values `[n_keys, n_head_kv * head_dim]` for positions
//! `0 .. n_keys`; query head `h` reads key/value head `h / (n_head / n_head_kv)`.

use rayon::prelude::*;

use super::gemm::{gemm, MatMut, MatRef};
use super::matmul::SyncPtr;

/// Queries handled together: bounds the score block to `QUERY_BLOCK × n_keys` floats.
const QUERY_BLOCK: usize = 128;

#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
}

impl AttentionShape {
    fn scale(&self) -> f32 {
        1.0 / (self.head_dim as f32).sqrt()
    }

    fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    fn kv_head(&self, head: usize) -> usize {
        head / (self.n_head / self.n_head_kv)
    }
}

/// Head `head` of rows `rows` of a `[n, n_heads * head_dim]` matrix.
fn head_view(
    data: &[f32],
    rows: std::ops::Range<usize>,
    head: usize,
    shape_dim: usize,
    head_dim: usize,
) -> MatRef<'_> {
    MatRef::with_stride(
        &data[rows.start * shape_dim + head * head_dim..],
        rows.len(),
        head_dim,
        shape_dim,
    )
}

/// `s[i, j] = scale · q_i · k_j` for the queries `rows` (at positions `pos0 + row`) against
/// the keys they may see; returns the number of keys of the block (`pos0 + rows.end`).
fn scores(
    shape: AttentionShape,
    pos0: usize,
    rows: std::ops::Range<usize>,
    head: usize,
    q: &[f32],
    k: &[f32],
    s: &mut Vec<f32>,
) -> usize {
    let hd = shape.head_dim;
    let n_keys = pos0 + rows.end;
    s.resize(rows.len() * n_keys, 0.0);
    let q_h = head_view(q, rows.clone(), head, shape.q_dim(), hd);
    let k_g = head_view(k, 0..n_keys, shape.kv_head(head), shape.kv_dim(), hd);
    gemm(
        q_h,
        k_g.t(),
        MatMut::new(s, rows.len(), n_keys),
        false,
        false,
    );
    let scale = shape.scale();
    s.iter_mut().for_each(|v| *v *= scale);
    n_keys
}

/// `out = softmax(q kᵀ / sqrt(head_dim) + causal mask) v` for each head; `lse[t, h]` receives
/// the log-sum-exp of the scaled scores, which is all the backward needs to rebuild them.
#[allow(clippy::too_many_arguments)]
pub fn attention_forward(
    shape: AttentionShape,
    pos0: usize,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &mut [f32],
    lse: &mut [f32],
) {
    let hd = shape.head_dim;
    let n_tokens = q.len() / shape.q_dim();
    let n_blocks = n_tokens.div_ceil(QUERY_BLOCK);
    let (out_ptr, lse_ptr) = (SyncPtr(out.as_mut_ptr()), SyncPtr(lse.as_mut_ptr()));
    (0..shape.n_head * n_blocks)
        .into_par_iter()
        .for_each_init(Vec::new, |s, task| {
            let (head, block) = (task / n_blocks, task % n_blocks);
            let rows = block * QUERY_BLOCK..((block + 1) * QUERY_BLOCK).min(n_tokens);
            let n_keys = scores(shape, pos0, rows.clone(), head, q, k, s);
            for (i, row) in s.chunks_mut(n_keys).enumerate() {
                let visible = pos0 + rows.start + i + 1;
                let max = row[..visible]
                    .iter()
                    .fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                let mut sum = 0f32;
                for x in &mut row[..visible] {
                    *x = (*x - max).exp();
                    sum += *x;
                }
                let inv = 1.0 / sum;
                row[..visible].iter_mut().for_each(|x| *x *= inv);
                row[visible..].fill(0.0);
                // SAFETY: (row, head) of lse belongs to this task alone.
                unsafe {
                    lse_ptr.slice((rows.start + i) * shape.n_head + head, 1)[0] = max + sum.ln()
                };
            }
            let v_g = head_view(v, 0..n_keys, shape.kv_head(head), shape.kv_dim(), hd);
            // SAFETY: rows `rows` of head `head` of out belong to this task alone.
            let out_rows = unsafe {
                out_ptr.slice(
                    rows.start * shape.q_dim() + head * hd,
                    (rows.len() - 1) * shape.q_dim() + hd,
                )
            };
            let out_h = MatMut::with_stride(out_rows, rows.len(), hd, shape.q_dim());
            gemm(MatRef::new(s, rows.len(), n_keys), v_g, out_h, false, false);
        });
}

/// Gradients of `attention_forward` (with `pos0 = 0`: training runs whole sequences).
/// With P = softmax(S), S = scale·Q Kᵀ, D_t = dO_t · O_t:
///   dV = Pᵀ dO,   dS = P ∘ (dO Vᵀ − D),   dQ = scale · dS K,   dK = scale · dSᵀ Q.
/// `dq`, `dk`, `dv` are overwritten.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    shape: AttentionShape,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    d_out: &[f32],
    dq: &mut [f32],
    dk: &mut [f32],
    dv: &mut [f32],
) {
    let (hd, scale) = (shape.head_dim, shape.scale());
    let (q_dim, kv_dim) = (shape.q_dim(), shape.kv_dim());
    let n_tokens = q.len() / q_dim;
    dk.fill(0.0);
    dv.fill(0.0);
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SyncPtr(dq.as_mut_ptr()),
        SyncPtr(dk.as_mut_ptr()),
        SyncPtr(dv.as_mut_ptr()),
    );
    let group = shape.n_head / shape.n_head_kv;
    // With fewer key/value heads than threads, the products themselves go parallel.
    let parallel = shape.n_head_kv < rayon::current_num_threads();
    // One task per key/value head: it alone writes that head's columns of dk and dv, and the
    // columns of dq of its query heads.
    (0..shape.n_head_kv).into_par_iter().for_each(|kv_head| {
        let (mut s, mut dp) = (Vec::new(), Vec::new());
        // SAFETY: the columns of head `kv_head` of dk/dv, and of this group's query heads in
        // dq, belong to this task alone; the views below cover exactly those columns.
        let dk_g = |n| unsafe { dk_ptr.slice(kv_head * hd, (n - 1) * kv_dim + hd) };
        let dv_g = |n| unsafe { dv_ptr.slice(kv_head * hd, (n - 1) * kv_dim + hd) };
        for head in kv_head * group..(kv_head + 1) * group {
            for start in (0..n_tokens).step_by(QUERY_BLOCK) {
                let rows = start..(start + QUERY_BLOCK).min(n_tokens);
                let n = rows.len();
                let n_keys = scores(shape, 0, rows.clone(), head, q, k, &mut s);
                // P from the saved log-sum-exp; masked entries are 0.
                for (i, row) in s.chunks_mut(n_keys).enumerate() {
                    let t = rows.start + i;
                    let row_lse = lse[t * shape.n_head + head];
                    row[..=t].iter_mut().for_each(|x| *x = (*x - row_lse).exp());
                    row[t + 1..].fill(0.0);
                }
                let p = MatRef::new(&s, n, n_keys);
                let d_o = head_view(d_out, rows.clone(), head, q_dim, hd);
                let v_g = head_view(v, 0..n_keys, kv_head, kv_dim, hd);
                let k_g = head_view(k, 0..n_keys, kv_head, kv_dim, hd);
                let q_h = head_view(q, rows.clone(), head, q_dim, hd);
                // dV += Pᵀ dO
                gemm(
                    p.t(),
                    d_o,
                    MatMut::with_stride(dv_g(n_keys), n_keys, hd, kv_dim),
                    true,
                    parallel,
                );
                // dS = P ∘ (dO Vᵀ − D) · scale
                dp.resize(n * n_keys, 0.0);
                gemm(
                    d_o,
                    v_g.t(),
                    MatMut::new(&mut dp, n, n_keys),
                    false,
                    parallel,
                );
                for (i, (ds, p_row)) in dp.chunks_mut(n_keys).zip(s.chunks(n_keys)).enumerate() {
                    let t = rows.start + i;
                    let o = &out[t * q_dim + head * hd..][..hd];
                    let g = &d_out[t * q_dim + head * hd..][..hd];
                    let big_d: f32 = o.iter().zip(g).map(|(a, b)| a * b).sum();
                    for (d, &p) in ds.iter_mut().zip(p_row) {
                        *d = p * (*d - big_d) * scale;
                    }
                }
                let ds = MatRef::new(&dp, n, n_keys);
                // dQ = dS K (rows `rows`, head `head`: this task's columns)
                let dq_rows =
                    unsafe { dq_ptr.slice(rows.start * q_dim + head * hd, (n - 1) * q_dim + hd) };
                gemm(
                    ds,
                    k_g,
                    MatMut::with_stride(dq_rows, n, hd, q_dim),
                    false,
                    parallel,
                );
                // dK += dSᵀ Q
                gemm(
                    ds.t(),
                    q_h,
                    MatMut::with_stride(dk_g(n_keys), n_keys, hd, kv_dim),
                    true,
                    parallel,
                );
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 1000) as f32 / 500.0) - 1.0)
            .collect()
    }

    const SHAPE: AttentionShape = AttentionShape {
        n_head: 4,
        n_head_kv: 2,
        head_dim: 3,
    };

    #[test]
    fn first_position_copies_its_value() {
        let q = values(12, 1);
        let k = values(6, 2);
        let v = values(6, 3);
        let mut out = vec![0f32; 12];
        let mut lse = vec![0f32; 4];
        attention_forward(SHAPE, 0, &q, &k, &v, &mut out, &mut lse);
        // One key: softmax weight 1, every query head returns its kv head's value.
        assert_eq!(&out[0..3], &v[0..3]);
        assert_eq!(&out[3..6], &v[0..3]);
        assert_eq!(&out[6..9], &v[3..6]);
    }

    /// A direct evaluation of the definition, for comparison.
    fn naive(pos0: usize, q: &[f32], k: &[f32], v: &[f32]) -> Vec<f32> {
        let (hd, q_dim, kv_dim) = (SHAPE.head_dim, SHAPE.q_dim(), SHAPE.kv_dim());
        let n = q.len() / q_dim;
        let mut out = vec![0f32; q.len()];
        for t in 0..n {
            for h in 0..SHAPE.n_head {
                let g = SHAPE.kv_head(h);
                let s: Vec<f32> = (0..=pos0 + t)
                    .map(|j| {
                        (0..hd)
                            .map(|i| q[t * q_dim + h * hd + i] * k[j * kv_dim + g * hd + i])
                            .sum::<f32>()
                            * SHAPE.scale()
                    })
                    .collect();
                let max = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                let e: Vec<f32> = s.iter().map(|x| (x - max).exp()).collect();
                let z: f32 = e.iter().sum();
                for i in 0..hd {
                    out[t * q_dim + h * hd + i] = e
                        .iter()
                        .enumerate()
                        .map(|(j, p)| p / z * v[j * kv_dim + g * hd + i])
                        .sum();
                }
            }
        }
        out
    }

    #[test]
    fn forward_matches_the_definition_with_a_cache_offset() {
        let (pos0, n) = (3, 4);
        let q = values(n * 12, 8);
        let k = values((pos0 + n) * 6, 9);
        let v = values((pos0 + n) * 6, 10);
        let mut out = vec![0f32; n * 12];
        let mut lse = vec![0f32; n * 4];
        attention_forward(SHAPE, pos0, &q, &k, &v, &mut out, &mut lse);
        for (a, b) in out.iter().zip(naive(pos0, &q, &k, &v)) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        let n = 3;
        let q = values(n * 12, 4);
        let k = values(n * 6, 5);
        let v = values(n * 6, 6);
        let w = values(n * 12, 7); // loss = Σ w ⊙ out
        let loss = |q: &[f32], k: &[f32], v: &[f32]| {
            let mut out = vec![0f32; n * 12];
            let mut lse = vec![0f32; n * 4];
            attention_forward(SHAPE, 0, q, k, v, &mut out, &mut lse);
            out.iter().zip(&w).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        let mut out = vec![0f32; n * 12];
        let mut lse = vec![0f32; n * 4];
        attention_forward(SHAPE, 0, &q, &k, &v, &mut out, &mut lse);
        let (mut dq, mut dk, mut dv) = (vec![0f32; n * 12], vec![0f32; n * 6], vec![0f32; n * 6]);
        attention_backward(SHAPE, &q, &k, &v, &out, &lse, &w, &mut dq, &mut dk, &mut dv);
        let check = |analytic: &[f32], which: usize| {
            for i in 0..analytic.len() {
                let mut inputs = [q.clone(), k.clone(), v.clone()];
                inputs[which][i] += 1e-3;
                let plus = loss(&inputs[0], &inputs[1], &inputs[2]);
                inputs[which][i] -= 2e-3;
                let minus = loss(&inputs[0], &inputs[1], &inputs[2]);
                let numeric = (plus - minus) / 2e-3;
                assert!(
                    (analytic[i] as f64 - numeric).abs() < 2e-3,
                    "input {which} element {i}: {} vs {numeric}",
                    analytic[i]
                );
            }
        };
        check(&dq, 0);
        check(&dk, 1);
        check(&dv, 2);
    }
}
