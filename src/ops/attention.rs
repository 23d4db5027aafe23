//! Causal softmax attention with grouped-query heads, forward and backward.
//!
//! Shapes (one sequence): queries `[n_tokens, n_head * head_dim]` at positions
//! `pos0 .. pos0 + n_tokens`; keys and values `[n_keys, n_head_kv * head_dim]` for positions
//! `0 .. n_keys`; query head `h` reads key/value head `h / (n_head / n_head_kv)`.

use rayon::prelude::*;

use super::matmul::SyncPtr;

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

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
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
    let (hd, scale) = (shape.head_dim, shape.scale());
    let kv_dim = shape.kv_dim();
    out.par_chunks_mut(shape.q_dim())
        .zip(q.par_chunks(shape.q_dim()))
        .zip(lse.par_chunks_mut(shape.n_head))
        .enumerate()
        .for_each_init(Vec::new, |scores, (t, ((out, q), lse))| {
            let n_keys = pos0 + t + 1;
            for head in 0..shape.n_head {
                let kv_off = shape.kv_head(head) * hd;
                let q_head = &q[head * hd..(head + 1) * hd];
                scores.clear();
                scores.extend(
                    (0..n_keys).map(|j| scale * dot(q_head, &k[j * kv_dim + kv_off..][..hd])),
                );
                let max = scores.iter().fold(f32::NEG_INFINITY, |m, &s| m.max(s));
                let mut sum = 0f32;
                for s in scores.iter_mut() {
                    *s = (*s - max).exp();
                    sum += *s;
                }
                lse[head] = max + sum.ln();
                let out_head = &mut out[head * hd..(head + 1) * hd];
                out_head.fill(0.0);
                for (j, &p) in scores.iter().enumerate() {
                    let v_row = &v[j * kv_dim + kv_off..][..hd];
                    for (o, &v) in out_head.iter_mut().zip(v_row) {
                        *o += p * v;
                    }
                }
                let inv = 1.0 / sum;
                out_head.iter_mut().for_each(|o| *o *= inv);
            }
        });
}

/// Gradients of `attention_forward` (with `pos0 = 0`: training runs whole sequences).
/// With P = softmax(s), s = q·k·scale, D = dout·out:
///   dv_j += P_j dout,  ds_j = P_j (dout·v_j − D),  dq += scale Σ_j ds_j k_j,  dk_j += scale ds_j q.
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
    dq.fill(0.0);
    dk.fill(0.0);
    dv.fill(0.0);
    let (dq_ptr, dk_ptr, dv_ptr) = (
        SyncPtr(dq.as_mut_ptr()),
        SyncPtr(dk.as_mut_ptr()),
        SyncPtr(dv.as_mut_ptr()),
    );
    let group = shape.n_head / shape.n_head_kv;
    // One task per key/value head: it alone writes that head's columns of dk and dv, and the
    // columns of dq of its query heads.
    (0..shape.n_head_kv).into_par_iter().for_each(|kv_head| {
        let kv_off = kv_head * hd;
        let mut d_scores = Vec::with_capacity(n_tokens);
        for head in kv_head * group..(kv_head + 1) * group {
            let q_off = head * hd;
            for t in 0..n_tokens {
                let q_t = &q[t * q_dim + q_off..][..hd];
                let dout_t = &d_out[t * q_dim + q_off..][..hd];
                let row_lse = lse[t * shape.n_head + head];
                let big_d = dot(dout_t, &out[t * q_dim + q_off..][..hd]);
                d_scores.clear();
                for j in 0..=t {
                    let p = (scale * dot(q_t, &k[j * kv_dim + kv_off..][..hd]) - row_lse).exp();
                    // SAFETY: columns kv_off.. of dk/dv belong to this task.
                    let dv_j = unsafe { dv_ptr.slice(j * kv_dim + kv_off, hd) };
                    for (d, &g) in dv_j.iter_mut().zip(dout_t) {
                        *d += p * g;
                    }
                    let dp = dot(dout_t, &v[j * kv_dim + kv_off..][..hd]);
                    d_scores.push(p * (dp - big_d) * scale);
                }
                // SAFETY: columns q_off.. of dq belong to this task (its query heads).
                let dq_t = unsafe { dq_ptr.slice(t * q_dim + q_off, hd) };
                for (j, &ds) in d_scores.iter().enumerate() {
                    let k_j = &k[j * kv_dim + kv_off..][..hd];
                    // SAFETY: as above, this task's dk columns.
                    let dk_j = unsafe { dk_ptr.slice(j * kv_dim + kv_off, hd) };
                    for i in 0..hd {
                        dq_t[i] += ds * k_j[i];
                        dk_j[i] += ds * q_t[i];
                    }
                }
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
