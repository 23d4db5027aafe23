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
    scale: f64,
    /// Scores become `c · tanh(s / c)` (Gemma 2).
    softcap: Option<f64>,
    /// A query at position `p` sees keys `p + 1 - window ..= p` only.
    window: Option<usize>,
}

impl Shape {
    /// Layer `il`'s attention.
    pub fn of(config: &Config, il: usize) -> Shape {
        Shape {
            n_head: config.n_head,
            n_head_kv: config.n_head_kv,
            head_dim: config.head_dim,
            scale: config.attn_scale as f64,
            softcap: config.attn_softcap.map(f64::from),
            window: config.sliding_window.filter(|_| config.is_sliding(il)),
        }
    }

    fn group(&self) -> usize {
        self.n_head / self.n_head_kv
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

/// Scores `score(q kᵀ)` (scaled, soft-capped): `[n_head, rows, keys]`, and the same with the
/// keys each row does not see (future ones, and beyond the window) at -∞. The rows are
/// positions `pos0 ..`.
fn scores(shape: Shape, pos0: usize, q: &Tensor, k: &Tensor) -> Result<(Tensor, Tensor)> {
    let rows = q.dims()[1];
    let keys = k.dims()[1];
    let scores = (q.matmul(&k.t()?)? * shape.scale)?;
    let scores = match shape.softcap {
        Some(c) => ((scores / c)?.tanh()? * c)?,
        None => scores,
    };
    let hidden = |t: usize, j: usize| {
        let pos = pos0 + t;
        j > pos || shape.window.is_some_and(|w| pos - j >= w)
    };
    if (0..rows).all(|t| (0..keys).all(|j| !hidden(t, j))) {
        return Ok((scores.clone(), scores));
    }
    let mask: Vec<f32> = (0..rows)
        .flat_map(|t| (0..keys).map(move |j| if hidden(t, j) { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (1, rows, keys), q.device())?;
    let masked = scores.broadcast_add(&mask)?;
    Ok((scores, masked))
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
    let (_, s) = scores(shape, pos0, &q, &k)?;
    let max = s.max_keepdim(D::Minus1)?;
    let e = s.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    let lse = (max + sum.log()?)?; // [n_head, rows, 1]
    let out = e.broadcast_div(&sum)?.matmul(&v)?;
    Ok((shape.merge(&out)?, lse.squeeze(2)?.t()?.contiguous()?))
}

/// Gradients for one whole sequence (`pos0 = 0`): with P = softmax(S), S = score(Q Kᵀ),
///   dV = Pᵀ dO,  dS = P ⊙ (dO Vᵀ − rowsum(dO ⊙ O)) · score′,  dQ = dS K,  dK = dSᵀ Q,
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
    let (capped, masked) = scores(shape, 0, &q, &k)?;
    let p = masked.broadcast_sub(&lse)?.exp()?;
    // d(score)/d(q·k): the scale, through the cap's 1 − (s/c)².
    let slope = match shape.softcap {
        Some(c) => ((1.0 - (capped / c)?.sqr()?)? * shape.scale)?,
        None => capped.ones_like()?.affine(shape.scale, 0.0)?,
    };
    let dv = p.t()?.matmul(&d_out)?;
    let dp = d_out.matmul(&v.t()?)?;
    let big_d = (&d_out * &out)?.sum_keepdim(D::Minus1)?;
    let ds = ((p * dp.broadcast_sub(&big_d)?)? * slope)?;
    let dq = ds.matmul(&k)?;
    let dk = ds.t()?.matmul(&q)?;
    Ok((
        shape.merge(&dq)?,
        shape.reduce_kv(&dk)?,
        shape.reduce_kv(&dv)?,
    ))
}
