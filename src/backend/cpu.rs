//! The CPU backend: lugh's own kernels (`ops/`) on host slices, on the calling rayon pool.

use std::ops::Range;

use rayon::prelude::*;

use super::{Backend, Norm, HEAD_NORMS, POST_NORMS};
use crate::error::Result;
use crate::lora::linear::{linear, linear_backward};
use crate::lora::{LoraGrads, LoraPlan};
use crate::model::{Config, Glu, KvCache, Layer, Model, Proj, SeqSpan, Slot, Weights};
use crate::ops::activation::{geglu_backward, geglu_forward, swiglu_backward, swiglu_forward};
use crate::ops::activation::{softcap, softcap_backward};
use crate::ops::attention::{
    attention_backward, attention_forward_batched, attention_forward_seqs, AttentionShape, SeqKv,
};
use crate::ops::loss::cross_entropy_in_place;
use crate::ops::norm::{rms_norm_apply, rms_norm_backward, rms_norm_forward};
use crate::ops::rope::{Rope, RopeTable};
use crate::ops::scratch;
use crate::ops::Numerics;

/// A model's weights as they lie in the mapping, computed on by the host's cores.
pub struct CpuBackend<'a> {
    config: &'a Config,
    weights: &'a Weights,
    rope: &'a Rope,
}

impl<'a> CpuBackend<'a> {
    /// `rope`: the model's RoPE for the inference's context (`Rope::for_context`).
    pub fn new(model: &'a Model, rope: &'a Rope) -> Result<CpuBackend<'a>> {
        let (config, weights) = model.runnable()?;
        Ok(CpuBackend {
            config,
            weights,
            rope,
        })
    }

    fn norm_weight(&self, norm: Norm) -> &[f32] {
        let layer = |il: usize| &self.weights.layers[il];
        match norm {
            Norm::Attn(il) => &layer(il).attn_norm,
            Norm::Ffn(il) => &layer(il).ffn_norm,
            Norm::PostAttn(il) => layer(il).post_attn_norm.as_deref().expect(POST_NORMS),
            Norm::PostFfn(il) => layer(il).post_ffn_norm.as_deref().expect(POST_NORMS),
            Norm::QHead(il) => layer(il).q_norm.as_deref().expect(HEAD_NORMS),
            Norm::KHead(il) => layer(il).k_norm.as_deref().expect(HEAD_NORMS),
            Norm::Output => &self.weights.output_norm,
        }
    }

    /// Layer `il`'s attention.
    fn shape(&self, il: usize) -> AttentionShape {
        let c = self.config;
        AttentionShape {
            n_head: c.n_head,
            n_head_kv: c.n_head_kv,
            head_dim: c.head_dim,
            scale: c.attn_scale,
            softcap: c.attn_softcap,
            window: c.sliding_window.filter(|_| c.is_sliding(il)),
        }
    }
}

/// Sizes `buf` to `n` elements, reusing its memory.
pub(crate) fn sized(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    buf.resize(n, 0.0);
    &mut buf[..n]
}

fn rows_of(span: &SeqSpan, width: usize) -> Range<usize> {
    span.rows.start * width..span.rows.end * width
}

/// One projection of a joined `linear` call.
struct Job<'j> {
    layer: &'j Layer,
    slot: Slot,
    y: &'j mut Vec<f32>,
}

/// Runs the jobs joined: the cores go from one projection to the next without the wake-up
/// that a parallel region each would cost (a large share of a decode step).
fn run_joined(jobs: &mut [Job], x: &[f32], lora: &LoraPlan, numerics: Numerics) {
    match jobs {
        [] => {}
        [job] => {
            let weight = job.layer.weight(job.slot.proj);
            let n_tokens = x.len() / weight.n_cols;
            let y = sized(job.y, n_tokens * weight.n_rows);
            let bias = job.layer.bias(job.slot.proj);
            scratch::with_f32(|lora_scratch| {
                linear(x, weight, bias, job.slot, lora, numerics, y, lora_scratch)
            });
        }
        _ => {
            let (first, rest) = jobs.split_at_mut(1);
            rayon::join(
                || run_joined(first, x, lora, numerics),
                || run_joined(rest, x, lora, numerics),
            );
        }
    }
}

impl Backend for CpuBackend<'_> {
    type Tensor = Vec<f32>;
    type RopeTable = RopeTable;
    type Grads = LoraGrads;

    fn config(&self) -> &Config {
        self.config
    }

    fn is_empty(t: &Vec<f32>) -> bool {
        t.is_empty()
    }

    fn zeros(&self, rows: usize, width: usize, t: &mut Vec<f32>) -> Result<()> {
        sized(t, rows * width).fill(0.0);
        Ok(())
    }

    fn copy(&self, src: &Vec<f32>, dst: &mut Vec<f32>) -> Result<()> {
        dst.clear();
        dst.extend_from_slice(src);
        Ok(())
    }

    fn add_assign(&self, x: &mut Vec<f32>, y: &Vec<f32>) -> Result<()> {
        x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
        Ok(())
    }

    fn upload(&self, values: &[f32], _width: usize) -> Result<Vec<f32>> {
        Ok(values.to_vec())
    }

    fn download(&self, t: Vec<f32>) -> Result<Vec<f32>> {
        Ok(t)
    }

    fn embed(&self, tokens: &[u32], x: &mut Vec<f32>) -> Result<()> {
        let n_embd = self.config.n_embd;
        sized(x, tokens.len() * n_embd)
            .par_chunks_mut(n_embd)
            .zip(tokens.par_iter())
            .for_each(|(row, &token)| {
                let t = token as usize;
                self.weights.token_embd.dequantize_rows(t..t + 1, row);
                if let Some(scale) = self.config.embd_scale {
                    row.iter_mut().for_each(|v| *v *= scale);
                }
            });
        Ok(())
    }

    fn gather_rows(
        &self,
        x: &Vec<f32>,
        width: usize,
        rows: &[usize],
        out: &mut Vec<f32>,
    ) -> Result<()> {
        let out = sized(out, rows.len() * width);
        for (dst, &row) in out.chunks_mut(width).zip(rows) {
            dst.copy_from_slice(&x[row * width..(row + 1) * width]);
        }
        Ok(())
    }

    fn rope_table(&self, seqs: &[SeqSpan], table: &mut RopeTable) -> Result<()> {
        self.rope.table(SeqSpan::positions(seqs), table);
        Ok(())
    }

    fn rope(
        &self,
        il: usize,
        x: &mut Vec<f32>,
        n_heads: usize,
        table: &RopeTable,
        inverse: bool,
    ) -> Result<()> {
        let table = table.for_layer(self.config.is_sliding(il));
        self.rope.apply(x, n_heads, table, inverse);
        Ok(())
    }

    fn rms_norm(
        &self,
        norm: Norm,
        x: &Vec<f32>,
        y: &mut Vec<f32>,
        inv_rms: &mut Vec<f32>,
    ) -> Result<()> {
        let weight = self.norm_weight(norm);
        rms_norm_forward(
            x,
            weight,
            self.config.rms_eps,
            sized(y, x.len()),
            sized(inv_rms, x.len() / weight.len()),
        );
        Ok(())
    }

    fn rms_norm_apply(
        &self,
        norm: Norm,
        x: &Vec<f32>,
        inv_rms: &Vec<f32>,
        y: &mut Vec<f32>,
    ) -> Result<()> {
        rms_norm_apply(x, self.norm_weight(norm), inv_rms, sized(y, x.len()));
        Ok(())
    }

    fn rms_norm_backward(
        &self,
        norm: Norm,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        inv_rms: &Vec<f32>,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        rms_norm_backward(dy, x, self.norm_weight(norm), inv_rms, dx);
        Ok(())
    }

    fn linear<const N: usize>(
        &self,
        il: usize,
        projs: [Proj; N],
        x: &Vec<f32>,
        ys: [&mut Vec<f32>; N],
        lora: &LoraPlan,
        numerics: Numerics,
    ) -> Result<()> {
        let layer = &self.weights.layers[il];
        let mut jobs = ys.into_iter().zip(projs).map(|(y, proj)| Job {
            layer,
            slot: Slot { layer: il, proj },
            y,
        });
        let mut jobs: [Job; N] = std::array::from_fn(|_| jobs.next().expect("N jobs"));
        run_joined(&mut jobs, x, lora, numerics);
        Ok(())
    }

    fn linear_backward(
        &self,
        il: usize,
        proj: Proj,
        dy: &Vec<f32>,
        x: &Vec<f32>,
        lora: &LoraPlan,
        numerics: Numerics,
        dx: Option<&mut Vec<f32>>,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        let weight = self.weights.layers[il].weight(proj);
        let slot = Slot { layer: il, proj };
        let dx = dx.map(|dx| &mut dx[..]);
        scratch::with_f32(|buf| {
            linear_backward(dy, x, weight, slot, lora, numerics, dx, grads, buf)
        });
        Ok(())
    }

    fn attention(
        &self,
        il: usize,
        seqs: &[SeqSpan],
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        caches: &mut [&mut KvCache],
        numerics: Numerics,
        out: &mut Vec<f32>,
        lse: &mut Vec<f32>,
    ) -> Result<()> {
        let c = self.config;
        let n_tokens = q.len() / c.q_dim();
        let out = sized(out, n_tokens * c.q_dim());
        let lse = sized(lse, n_tokens * c.n_head);
        for (span, cache) in seqs.iter().zip(caches.iter_mut()) {
            let kv_rows = rows_of(span, c.kv_dim());
            cache.store(il, span.pos0, &k[kv_rows.clone()], &v[kv_rows]);
        }
        match numerics {
            // Inference: every sequence in one pass, each row's bits its own.
            Numerics::Ggml => {
                let caches: &[&mut KvCache] = caches;
                let seq = |i: usize| seq_kv(il, &seqs[i], caches[i]);
                attention_forward_seqs(self.shape(il), seqs.len(), seq, q, out, lse);
            }
            // Training: whole sequences, by GEMMs.
            Numerics::Exact | Numerics::Bf16 => {
                for (span, cache) in seqs.iter().zip(caches.iter()) {
                    let (keys, values) = cache.exact_rows(il, span.pos0 + span.rows.len())?;
                    attention_forward_batched(
                        self.shape(il),
                        span.pos0,
                        &q[rows_of(span, c.q_dim())],
                        keys,
                        values,
                        &mut out[rows_of(span, c.q_dim())],
                        &mut lse[rows_of(span, c.n_head)],
                    );
                }
            }
        }
        Ok(())
    }

    fn attention_backward(
        &self,
        il: usize,
        seqs: &[SeqSpan],
        caches: &[&mut KvCache],
        q: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        d_out: &Vec<f32>,
        dq: &mut Vec<f32>,
        dk: &mut Vec<f32>,
        dv: &mut Vec<f32>,
    ) -> Result<()> {
        let c = self.config;
        let n_tokens = q.len() / c.q_dim();
        let dq = sized(dq, n_tokens * c.q_dim());
        let dk = sized(dk, n_tokens * c.kv_dim());
        let dv = sized(dv, n_tokens * c.kv_dim());
        for (span, cache) in seqs.iter().zip(caches.iter()) {
            debug_assert_eq!(span.pos0, 0, "training runs whole sequences");
            let n = span.rows.len();
            let (q_rows, kv_rows) = (rows_of(span, c.q_dim()), rows_of(span, c.kv_dim()));
            let (keys, values) = cache.exact_rows(il, n)?;
            attention_backward(
                self.shape(il),
                &q[q_rows.clone()],
                keys,
                values,
                &out[q_rows.clone()],
                &lse[rows_of(span, c.n_head)],
                &d_out[q_rows.clone()],
                &mut dq[q_rows],
                &mut dk[kv_rows.clone()],
                &mut dv[kv_rows],
            );
        }
        Ok(())
    }

    fn glu(&self, gate: &Vec<f32>, up: &Vec<f32>, act: &mut Vec<f32>) -> Result<()> {
        let act = sized(act, gate.len());
        match self.config.glu {
            Glu::Silu => swiglu_forward(gate, up, act),
            Glu::GeluTanh => geglu_forward(gate, up, act),
        }
        Ok(())
    }

    fn glu_backward(
        &self,
        d_act: &Vec<f32>,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        d_gate: &mut Vec<f32>,
        d_up: &mut Vec<f32>,
    ) -> Result<()> {
        let n = gate.len();
        let (d_gate, d_up) = (sized(d_gate, n), sized(d_up, n));
        match self.config.glu {
            Glu::Silu => swiglu_backward(d_act, gate, up, d_gate, d_up),
            Glu::GeluTanh => geglu_backward(d_act, gate, up, d_gate, d_up),
        }
        Ok(())
    }

    fn logits(&self, x: &Vec<f32>, rows: Range<usize>, numerics: Numerics) -> Result<Vec<f32>> {
        let n_embd = self.config.n_embd;
        let x = &x[rows.start * n_embd..rows.end * n_embd];
        let mut logits = vec![0f32; rows.len() * self.config.n_vocab];
        self.weights.output.product(numerics, x, &mut logits);
        if let Some(cap) = self.config.final_softcap {
            softcap(&mut logits, cap);
        }
        Ok(logits)
    }

    fn cross_entropy(
        &self,
        logits: &mut Vec<f32>,
        targets: &[i64],
        normalizer: usize,
    ) -> Result<f64> {
        let capped = self.config.final_softcap.map(|cap| (cap, logits.clone()));
        let loss = cross_entropy_in_place(logits, self.config.n_vocab, targets, normalizer);
        if let Some((cap, capped)) = capped {
            softcap_backward(logits, &capped, cap);
        }
        Ok(loss)
    }

    fn logits_backward(
        &self,
        d_logits: &Vec<f32>,
        rows: Range<usize>,
        numerics: Numerics,
        dx: &mut Vec<f32>,
    ) -> Result<()> {
        let n_embd = self.config.n_embd;
        let dx_rows = &mut dx[rows.start * n_embd..rows.end * n_embd];
        self.weights
            .output
            .backward_input(numerics, d_logits, dx_rows);
        Ok(())
    }

    fn grads_to_host(&self, grads: LoraGrads) -> Result<LoraGrads> {
        Ok(grads)
    }
}

/// Sequence `span`'s rows and cached keys and values in layer `il` (after this batch's).
fn seq_kv<'a>(il: usize, span: &SeqSpan, cache: &'a KvCache) -> SeqKv<'a> {
    let n_keys = span.pos0 + span.rows.len();
    SeqKv {
        rows: span.rows.clone(),
        pos0: span.pos0,
        kv: cache.cached(il, n_keys),
    }
}
