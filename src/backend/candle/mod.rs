//! The candle backend: the recipe on candle-core tensors on a CPU, CUDA or Metal device.
//! Weights are uploaded once (quantized ones stay quantized); activations, KV caches and
//! adapter gradients stay on the device; the host sends token ids and receives logits, the
//! loss and the gradients.

mod attention;
mod weights;

use std::collections::HashMap;
use std::ops::Range;

use candle_core::{DType, Tensor};

use super::{Backend, Norm, HEAD_NORMS, POST_NORMS};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::lora::{LoraGrads, LoraPlan};
use crate::model::{Config, Glu, KvCache, Model, Proj, SeqSpan, Slot};
use crate::ops::rope::{Rope, RopeStyle, RopeTable};
use crate::ops::{Numerics, Weight};
use weights::DeviceWeights;

/// An activation on the device (`None`: empty).
pub type Act = Option<Tensor>;

/// Adapter gradients (dA, dB) on the device, keyed by (adapter in plan, pair).
pub type DeviceGrads = HashMap<(usize, usize), (Tensor, Tensor)>;

/// A model placed on a candle device.
pub struct CandleModel {
    device: Device,
    dev: candle_core::Device,
    config: Config,
    rope: Rope,
    /// Looked up on the host: only the batch's rows are uploaded.
    token_embd: Weight,
    weights: DeviceWeights,
}

fn get(t: &Act) -> Result<&Tensor> {
    t.as_ref()
        .ok_or_else(|| Error::invalid("activation", "used before it was computed"))
}

impl CandleModel {
    /// Uploads `model`'s weights to `device` (which must be a candle device); `rope` is the
    /// model's RoPE for the inference's context (`Rope::for_context`).
    pub fn new(model: &Model, device: Device, rope: Rope) -> Result<CandleModel> {
        let dev = device.open()?;
        let (config, weights) = model.runnable()?;
        Ok(CandleModel {
            device,
            config: config.clone(),
            rope,
            token_embd: weights.token_embd.clone(),
            weights: DeviceWeights::upload(weights, &dev)?,
            dev,
        })
    }

    pub fn device(&self) -> Device {
        self.device
    }

    fn norm_weight(&self, norm: Norm) -> &Tensor {
        let layer = |il: usize| &self.weights.layers[il];
        match norm {
            Norm::Attn(il) => &layer(il).attn_norm,
            Norm::Ffn(il) => &layer(il).ffn_norm,
            Norm::PostAttn(il) => layer(il).post_attn_norm.as_ref().expect(POST_NORMS),
            Norm::PostFfn(il) => layer(il).post_ffn_norm.as_ref().expect(POST_NORMS),
            Norm::QHead(il) => layer(il).q_norm.as_ref().expect(HEAD_NORMS),
            Norm::KHead(il) => layer(il).k_norm.as_ref().expect(HEAD_NORMS),
            Norm::Output => &self.weights.output_norm,
        }
    }

    /// `x` as rows of `norm`'s width, and a function giving back `x`'s shape.
    fn norm_rows(
        &self,
        norm: Norm,
        x: &Tensor,
    ) -> Result<(Tensor, impl Fn(Tensor) -> Result<Tensor>)> {
        let width = self.norm_weight(norm).dims()[0];
        let shape = x.dims().to_vec();
        let rows = x.reshape(((), width))?;
        Ok((rows, move |t: Tensor| Ok(t.reshape(shape.as_slice())?)))
    }

    /// `y + s B (A x)` for each adapter term of `slot` (rows of one sequence or all).
    fn add_lora(&self, slot: Slot, x: &Tensor, mut y: Tensor, lora: &LoraPlan) -> Result<Tensor> {
        let n_rows = x.dims()[0];
        for term in lora.terms(slot) {
            let adapter = lora.adapter(term.adapter);
            let (a, b) = adapter.pair_on(term.pair_index, term.pair, &self.dev)?;
            let b = b.narrow(0, term.b_rows.start, term.b_rows.len())?;
            let x_rows = x.narrow(0, term.rows.start, term.rows.len())?;
            let u = (x_rows.matmul(&a.t()?)? * term.scaling as f64)?;
            let delta = u.matmul(&b.t()?)?;
            y = (y + pad_rows(delta, &term.rows, n_rows)?)?;
        }
        Ok(y)
    }
}

/// `t` (rows `rows` of a `[n_rows, ..]` matrix) with zero rows around it.
/// cos and sin of each row's angles on the device, and those of the sliding-window layers
/// where their rotation differs (Gemma 3).
pub struct RopeTensors {
    all: (Tensor, Tensor),
    sliding: Option<(Tensor, Tensor)>,
}

fn pad_rows(t: Tensor, rows: &Range<usize>, n_rows: usize) -> Result<Tensor> {
    if rows.len() == n_rows {
        return Ok(t);
    }
    Ok(t.pad_with_zeros(0, rows.start, n_rows - rows.end)?)
}

/// GELU with its tanh approximation, and its derivative.
fn gelu_tanh(x: &Tensor) -> Result<(Tensor, Tensor)> {
    const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
    const CUBE: f64 = 0.044_715;
    let x2 = x.sqr()?;
    let inner = ((x * (x2.clone() * CUBE)?)? + x)?;
    let t = (inner * SQRT_2_OVER_PI)?.tanh()?;
    let one_plus_t = (&t + 1.0)?;
    let value = ((x * &one_plus_t)? * 0.5)?;
    let d_inner = ((x2 * (3.0 * CUBE))? + 1.0)?.affine(SQRT_2_OVER_PI, 0.0)?;
    let sech2 = (1.0 - t.sqr()?)?;
    let slope = ((one_plus_t * 0.5)? + ((x * sech2)? * d_inner)?.affine(0.5, 0.0)?)?;
    Ok((value, slope))
}

fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok((x.neg()?.exp()? + 1.0)?.recip()?)
}

impl Backend for CandleModel {
    type Tensor = Act;
    type RopeTable = Option<RopeTensors>;
    type Grads = DeviceGrads;

    fn config(&self) -> &Config {
        &self.config
    }

    fn is_empty(t: &Act) -> bool {
        t.is_none()
    }

    fn zeros(&self, rows: usize, width: usize, t: &mut Act) -> Result<()> {
        *t = Some(Tensor::zeros((rows, width), DType::F32, &self.dev)?);
        Ok(())
    }

    fn copy(&self, src: &Act, dst: &mut Act) -> Result<()> {
        // Tensors are immutable: sharing is a copy.
        dst.clone_from(src);
        Ok(())
    }

    fn add_assign(&self, x: &mut Act, y: &Act) -> Result<()> {
        *x = Some((get(x)? + get(y)?)?);
        Ok(())
    }

    fn upload(&self, values: &[f32], width: usize) -> Result<Act> {
        let rows = values.len() / width.max(1);
        Ok(Some(Tensor::from_slice(values, (rows, width), &self.dev)?))
    }

    fn download(&self, t: Act) -> Result<Vec<f32>> {
        Ok(get(&t)?.flatten_all()?.to_vec1::<f32>()?)
    }

    fn embed(&self, tokens: &[u32], x: &mut Act) -> Result<()> {
        let n_embd = self.config.n_embd;
        let mut rows = vec![0f32; tokens.len() * n_embd];
        for (row, &token) in rows.chunks_mut(n_embd).zip(tokens) {
            let t = token as usize;
            self.token_embd.dequantize_rows(t..t + 1, row);
            if let Some(scale) = self.config.embd_scale {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
        *x = Some(Tensor::from_vec(rows, (tokens.len(), n_embd), &self.dev)?);
        Ok(())
    }

    fn gather_rows(&self, x: &Act, _width: usize, rows: &[usize], out: &mut Act) -> Result<()> {
        let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        let ids = Tensor::from_vec(ids, rows.len(), &self.dev)?;
        *out = Some(get(x)?.index_select(&ids, 0)?);
        Ok(())
    }

    fn rope_table(&self, seqs: &[SeqSpan], table: &mut Self::RopeTable) -> Result<()> {
        let mut host = RopeTable::default();
        self.rope.table(SeqSpan::positions(seqs), &mut host);
        let half = self.rope.n_rot / 2;
        let upload = |t: &RopeTable| -> Result<(Tensor, Tensor)> {
            let (cos, sin) = t.parts();
            Ok((
                Tensor::from_slice(cos, (cos.len() / half.max(1), half), &self.dev)?,
                Tensor::from_slice(sin, (sin.len() / half.max(1), half), &self.dev)?,
            ))
        };
        let swa = host.for_layer(true);
        *table = Some(RopeTensors {
            all: upload(&host)?,
            sliding: match std::ptr::eq(swa, &host) {
                true => None,
                false => Some(upload(swa)?),
            },
        });
        Ok(())
    }

    fn rope(
        &self,
        il: usize,
        x: &mut Act,
        n_heads: usize,
        table: &Self::RopeTable,
        inverse: bool,
    ) -> Result<()> {
        let tables = table
            .as_ref()
            .ok_or_else(|| Error::invalid("rope", "no angle table"))?;
        let (cos, sin) = match (&tables.sliding, self.config.is_sliding(il)) {
            (Some(sliding), true) => sliding,
            _ => &tables.all,
        };
        let (hd, n_rot, half) = (self.rope.head_dim, self.rope.n_rot, self.rope.n_rot / 2);
        let t = get(x)?;
        let n = t.dims()[0];
        let heads = t.reshape((n, n_heads, hd))?;
        let (cos, mut sin) = (cos.unsqueeze(1)?, sin.unsqueeze(1)?); // [n, 1, half]
        if inverse {
            sin = sin.neg()?;
        }
        let rot = heads.narrow(2, 0, n_rot)?;
        let turn = |x0: &Tensor, x1: &Tensor| -> Result<(Tensor, Tensor)> {
            let y0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
            let y1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
            Ok((y0, y1))
        };
        let rotated = match self.rope.style {
            RopeStyle::Normal => {
                let pairs = rot.reshape((n, n_heads, half, 2))?;
                let x0 = pairs.narrow(3, 0, 1)?.squeeze(3)?;
                let x1 = pairs.narrow(3, 1, 1)?.squeeze(3)?;
                let (y0, y1) = turn(&x0, &x1)?;
                Tensor::stack(&[y0, y1], 3)?.reshape((n, n_heads, n_rot))?
            }
            RopeStyle::Neox => {
                let (x0, x1) = (rot.narrow(2, 0, half)?, rot.narrow(2, half, half)?);
                let (y0, y1) = turn(&x0, &x1)?;
                Tensor::cat(&[y0, y1], 2)?
            }
        };
        let whole = match n_rot < hd {
            true => Tensor::cat(&[rotated, heads.narrow(2, n_rot, hd - n_rot)?], 2)?,
            false => rotated,
        };
        *x = Some(whole.reshape((n, n_heads * hd))?);
        Ok(())
    }

    fn rms_norm(&self, norm: Norm, x: &Act, y: &mut Act, inv_rms: &mut Act) -> Result<()> {
        let (rows, _) = self.norm_rows(norm, get(x)?)?;
        let eps = self.config.rms_eps as f64;
        let inv = (rows.sqr()?.mean_keepdim(1)? + eps)?.sqrt()?.recip()?;
        *inv_rms = Some(inv);
        self.rms_norm_apply(norm, x, inv_rms, y)
    }

    fn rms_norm_apply(&self, norm: Norm, x: &Act, inv_rms: &Act, y: &mut Act) -> Result<()> {
        let (rows, back) = self.norm_rows(norm, get(x)?)?;
        let normed = rows.broadcast_mul(get(inv_rms)?)?;
        *y = Some(back(normed.broadcast_mul(self.norm_weight(norm))?)?);
        Ok(())
    }

    fn rms_norm_backward(
        &self,
        norm: Norm,
        dy: &Act,
        x: &Act,
        inv_rms: &Act,
        dx: &mut Act,
    ) -> Result<()> {
        let r = get(inv_rms)?;
        let (dy, back) = self.norm_rows(norm, get(dy)?)?;
        let (x, _) = self.norm_rows(norm, get(x)?)?;
        let d_normed = dy.broadcast_mul(self.norm_weight(norm))?;
        let normed = x.broadcast_mul(r)?;
        let mean = (&d_normed * &normed)?.mean_keepdim(1)?;
        let d = (d_normed - normed.broadcast_mul(&mean)?)?.broadcast_mul(r)?;
        *dx = Some((get(dx)? + back(d)?)?);
        Ok(())
    }

    fn linear<const N: usize>(
        &self,
        il: usize,
        projs: [Proj; N],
        x: &Act,
        ys: [&mut Act; N],
        lora: &LoraPlan,
        numerics: Numerics,
    ) -> Result<()> {
        let (x, layer) = (get(x)?, &self.weights.layers[il]);
        for (proj, y) in projs.into_iter().zip(ys) {
            let mut out = layer.weight(proj).matmul(x, numerics)?;
            if let Some(bias) = layer.bias(proj) {
                out = out.broadcast_add(bias)?;
            }
            *y = Some(self.add_lora(Slot { layer: il, proj }, x, out, lora)?);
        }
        Ok(())
    }

    fn linear_backward(
        &self,
        il: usize,
        proj: Proj,
        dy: &Act,
        x: &Act,
        lora: &LoraPlan,
        numerics: Numerics,
        dx: Option<&mut Act>,
        grads: &mut DeviceGrads,
    ) -> Result<()> {
        let (dy, x) = (get(dy)?, get(x)?);
        let n_rows = x.dims()[0];
        let weight = self.weights.layers[il].weight(proj);
        let mut d = match dx {
            Some(_) => Some(weight.backward_input(dy, numerics)?),
            None => None,
        };
        for term in lora.terms(Slot { layer: il, proj }) {
            let adapter = lora.adapter(term.adapter);
            if !adapter.trainable() && d.is_none() {
                continue;
            }
            let (a, b) = adapter.pair_on(term.pair_index, term.pair, &self.dev)?;
            let b = b.narrow(0, term.b_rows.start, term.b_rows.len())?;
            let (start, len) = (term.rows.start, term.rows.len());
            let (dy_rows, x_rows) = (dy.narrow(0, start, len)?, x.narrow(0, start, len)?);
            let g = (dy_rows.matmul(&b)? * term.scaling as f64)?; // [rows, rank]
            if adapter.trainable() {
                let u = (x_rows.matmul(&a.t()?)? * term.scaling as f64)?;
                // The slot's rows of dB, in the pair's (all of them but on fused tensors).
                let d_b = pad_rows(dy_rows.t()?.matmul(&u)?, &term.b_rows, term.pair.n_out)?;
                let d_a = g.t()?.matmul(&x_rows)?;
                let (d_a, d_b) = match grads.remove(&(term.adapter, term.pair_index)) {
                    Some((acc_a, acc_b)) => ((acc_a + d_a)?, (acc_b + d_b)?),
                    None => (d_a, d_b),
                };
                grads.insert((term.adapter, term.pair_index), (d_a, d_b));
            }
            if let Some(d) = &mut d {
                *d = (&*d + pad_rows(g.matmul(&a)?, &term.rows, n_rows)?)?;
            }
        }
        if let (Some(dx), Some(d)) = (dx, d) {
            *dx = Some((get(dx)? + d)?);
        }
        Ok(())
    }

    fn attention(
        &self,
        il: usize,
        seqs: &[SeqSpan],
        q: &Act,
        k: &Act,
        v: &Act,
        caches: &mut [&mut KvCache],
        _numerics: Numerics,
        out: &mut Act,
        lse: &mut Act,
    ) -> Result<()> {
        let (q, k, v) = (get(q)?, get(k)?, get(v)?);
        let shape = attention::Shape::of(&self.config, il);
        let mut outs = Vec::with_capacity(seqs.len());
        let mut lses = Vec::with_capacity(seqs.len());
        for (span, cache) in seqs.iter().zip(caches.iter_mut()) {
            let (start, len) = (span.rows.start, span.rows.len());
            cache.store_tensors(
                il,
                span.pos0,
                &k.narrow(0, start, len)?,
                &v.narrow(0, start, len)?,
            )?;
            let (keys, values) = cache.tensors(il, span.pos0 + len)?;
            let (o, l) =
                attention::forward(shape, span.pos0, &q.narrow(0, start, len)?, &keys, &values)?;
            outs.push(o);
            lses.push(l);
        }
        *out = Some(Tensor::cat(&outs, 0)?);
        *lse = Some(Tensor::cat(&lses, 0)?);
        Ok(())
    }

    fn attention_backward(
        &self,
        il: usize,
        seqs: &[SeqSpan],
        caches: &[&mut KvCache],
        q: &Act,
        out: &Act,
        lse: &Act,
        d_out: &Act,
        dq: &mut Act,
        dk: &mut Act,
        dv: &mut Act,
    ) -> Result<()> {
        let (q, out, lse, d_out) = (get(q)?, get(out)?, get(lse)?, get(d_out)?);
        let shape = attention::Shape::of(&self.config, il);
        let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
        for (span, cache) in seqs.iter().zip(caches.iter()) {
            let (start, n) = (span.rows.start, span.rows.len());
            let (keys, values) = cache.tensors(il, n)?;
            let rows = |t: &Tensor| t.narrow(0, start, n);
            let (dq_s, dk_s, dv_s) = attention::backward(
                shape,
                &rows(q)?,
                &keys,
                &values,
                &rows(out)?,
                &rows(lse)?,
                &rows(d_out)?,
            )?;
            dqs.push(dq_s);
            dks.push(dk_s);
            dvs.push(dv_s);
        }
        *dq = Some(Tensor::cat(&dqs, 0)?);
        *dk = Some(Tensor::cat(&dks, 0)?);
        *dv = Some(Tensor::cat(&dvs, 0)?);
        Ok(())
    }

    fn glu(&self, gate: &Act, up: &Act, act: &mut Act) -> Result<()> {
        let g = get(gate)?;
        let activated = match self.config.glu {
            Glu::Silu => g.silu()?,
            Glu::GeluTanh => gelu_tanh(g)?.0,
        };
        *act = Some((activated * get(up)?)?);
        Ok(())
    }

    fn glu_backward(
        &self,
        d_act: &Act,
        gate: &Act,
        up: &Act,
        d_gate: &mut Act,
        d_up: &mut Act,
    ) -> Result<()> {
        let (da, g, u) = (get(d_act)?, get(gate)?, get(up)?);
        if self.config.glu == Glu::GeluTanh {
            let (value, slope) = gelu_tanh(g)?;
            *d_up = Some((da * value)?);
            *d_gate = Some(((da * u)? * slope)?);
            return Ok(());
        }
        let s = sigmoid(g)?;
        let silu = (g * &s)?;
        *d_up = Some((da * &silu)?);
        // σ(g) (1 + g (1 − σ(g))) = σ(g) + silu(g) (1 − σ(g))
        let d_silu = (&s + (&silu * (1.0 - &s)?)?)?;
        *d_gate = Some(((da * u)? * d_silu)?);
        Ok(())
    }

    fn logits(&self, x: &Act, rows: Range<usize>, numerics: Numerics) -> Result<Act> {
        let x = get(x)?.narrow(0, rows.start, rows.len())?;
        let logits = self.weights.output.matmul(&x, numerics)?;
        Ok(Some(match self.config.final_softcap {
            Some(cap) => ((logits / cap as f64)?.tanh()? * cap as f64)?,
            None => logits,
        }))
    }

    fn cross_entropy(&self, logits: &mut Act, targets: &[i64], normalizer: usize) -> Result<f64> {
        let l = get(logits)?;
        let n = targets.len();
        let scored: Vec<f32> = targets
            .iter()
            .map(|&t| if t < 0 { 0.0 } else { 1.0 })
            .collect();
        let ids: Vec<u32> = targets.iter().map(|&t| t.max(0) as u32).collect();
        let scored = Tensor::from_vec(scored, (n, 1), &self.dev)?;
        let ids = Tensor::from_vec(ids, (n, 1), &self.dev)?;
        let shifted = l.broadcast_sub(&l.max_keepdim(1)?)?;
        let log_sum = shifted.exp()?.sum_keepdim(1)?.log()?;
        let picked = shifted.gather(&ids, 1)?;
        let losses = ((log_sum.clone() - picked)? * &scored)?;
        let sum: f64 = losses
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|&v| v as f64)
            .sum();
        let weight = (scored / normalizer as f64)?;
        let softmax = shifted.broadcast_sub(&log_sum)?.exp()?;
        let grad = softmax.broadcast_mul(&weight)?;
        let grad = grad.scatter_add(&ids, &weight.neg()?, 1)?;
        *logits = Some(match self.config.final_softcap {
            // Through the cap: the logits held the capped values y, dy/draw = 1 − (y/c)².
            Some(cap) => (grad * (1.0 - (l / cap as f64)?.sqr()?)?)?,
            None => grad,
        });
        Ok(sum)
    }

    fn logits_backward(
        &self,
        d_logits: &Act,
        rows: Range<usize>,
        numerics: Numerics,
        dx: &mut Act,
    ) -> Result<()> {
        let d = self
            .weights
            .output
            .backward_input(get(d_logits)?, numerics)?;
        let n_rows = get(dx)?.dims()[0];
        *dx = Some((get(dx)? + pad_rows(d, &rows, n_rows)?)?);
        Ok(())
    }

    fn grads_to_host(&self, grads: DeviceGrads) -> Result<LoraGrads> {
        let mut host = LoraGrads::default();
        for (key, (d_a, d_b)) in grads {
            let flat = |t: Tensor| -> Result<Vec<f32>> { Ok(t.flatten_all()?.to_vec1::<f32>()?) };
            host.grads.insert(key, (flat(d_a)?, flat(d_b)?));
        }
        Ok(host)
    }
}
