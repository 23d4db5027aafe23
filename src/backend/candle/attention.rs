//! Causal attention with grouped-query heads on candle tensors, forward and backward, as
//! batched matrix products over heads (`[n_head, rows, keys]` scores).

use candle_core::{Tensor, D};

use crate::error::Result;
use crate::model::Config;

#[derive(Debug, Clone, Copy)]
pub struct Shape {
    n_head: usize,
    n_head_kv: usize,
    head_dim: usize,
}

impl Shape {
    pub fn of(config: &Config) -> Shape {
        Shape {
            n_head: config.n_head,
            n_head_kv: config.n_head_kv,
            head_dim: config.head_dim,
        }
    }

    fn group(&self) -> usize {
        self.n_head / self.n_head_kv
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// `[rows, n * head_dim]` → `[n, rows, head_dim]`.
    fn split(&self, x: &Tensor, n: usize) -> Result<Tensor> {
        let rows = x.dims()[0];
        Ok(x.reshape((rows, n, self.head_dim))?
            .transpose(0, 1)?
            .contiguous()?)
    }

    /// Key/value heads repeated for their query heads: `[n_head, keys, head_dim]`.
    fn expand_kv(&self, x: &Tensor) -> Result<Tensor> {
        let heads = self.split(x, self.n_head_kv)?;
        let (_, keys, hd) = heads.dims3()?;
        Ok(heads
            .unsqueeze(1)?
            .broadcast_as((self.n_head_kv, self.group(), keys, hd))?
            .reshape((self.n_head, keys, hd))?)
    }

    /// `[n, rows, head_dim]` → `[rows, n * head_dim]`.
    fn merge(&self, x: &Tensor) -> Result<Tensor> {
        let (n, rows, hd) = x.dims3()?;
        Ok(x.transpose(0, 1)?.contiguous()?.reshape((rows, n * hd))?)
    }

    /// Gradients of the repeated heads summed back onto their key/value head.
    fn reduce_kv(&self, x: &Tensor) -> Result<Tensor> {
        let (_, keys, hd) = x.dims3()?;
        let summed = x
            .reshape((self.n_head_kv, self.group(), keys, hd))?
            .sum(1)?;
        self.merge(&summed)
    }
}

/// Scaled scores `q kᵀ / √d` with future keys at -∞: `[n_head, rows, keys]`; the rows are
/// positions `pos0 ..` (a single row sees every key: no mask).
fn scores(shape: Shape, pos0: usize, q: &Tensor, k: &Tensor) -> Result<Tensor> {
    let rows = q.dims()[1];
    let keys = k.dims()[1];
    let scores = (q.matmul(&k.t()?)? * shape.scale())?;
    if rows == 1 {
        return Ok(scores);
    }
    let mask: Vec<f32> = (0..rows)
        .flat_map(|t| (0..keys).map(move |j| if j > pos0 + t { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (1, rows, keys), q.device())?;
    Ok(scores.broadcast_add(&mask)?)
}

/// One sequence: queries `[rows, q_dim]` at positions `pos0 ..`, keys and values
/// `[pos0 + rows, kv_dim]`. Returns the output `[rows, q_dim]` and log-sum-exp `[rows, n_head]`.
pub fn forward(
    shape: Shape,
    pos0: usize,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let q = shape.split(q, shape.n_head)?;
    let (k, v) = (shape.expand_kv(k)?, shape.expand_kv(v)?);
    let s = scores(shape, pos0, &q, &k)?;
    let max = s.max_keepdim(D::Minus1)?;
    let e = s.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let lse = (max + sum.log()?)?; // [n_head, rows, 1]
    let out = e.broadcast_div(&sum)?.matmul(&v)?;
    Ok((shape.merge(&out)?, lse.squeeze(2)?.t()?.contiguous()?))
}

/// Gradients for one whole sequence (`pos0 = 0`): with P = softmax(S),
///   dV = Pᵀ dO,  dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)) / √d,  dQ = dS K,  dK = dSᵀ Q,
/// summed over the query heads of each key/value head. Returns (dq, dk, dv).
pub fn backward(
    shape: Shape,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    d_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let q = shape.split(q, shape.n_head)?;
    let (k, v) = (shape.expand_kv(k)?, shape.expand_kv(v)?);
    let (out, d_out) = (
        shape.split(out, shape.n_head)?,
        shape.split(d_out, shape.n_head)?,
    );
    let lse = lse.t()?.unsqueeze(2)?; // [n_head, rows, 1]
    let p = scores(shape, 0, &q, &k)?.broadcast_sub(&lse)?.exp()?;
    let dv = p.t()?.matmul(&d_out)?;
    let dp = d_out.matmul(&v.t()?)?;
    let big_d = (&d_out * &out)?.sum_keepdim(D::Minus1)?;
    let ds = ((p * dp.broadcast_sub(&big_d)?)? * shape.scale())?;
    let dq = ds.matmul(&k)?;
    let dk = ds.t()?.matmul(&q)?;
    Ok((
        shape.merge(&dq)?,
        shape.reduce_kv(&dk)?,
        shape.reduce_kv(&dv)?,
    ))
}
