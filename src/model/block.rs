//! One transformer block, forward and backward side by side:
//!
//! ```text
//! x_mid = x   + W_o · attention(rope(W_q · n1), rope(W_k · n1), W_v · n1),  n1 = rms_norm(x)
//! x_out = x_mid + W_down · (silu(W_gate · n2) ⊙ W_up · n2),                 n2 = rms_norm(x_mid)
//! ```
//! Every projection goes through `lora::linear`, which adds the adapters' `s B A` terms.

use std::ops::Range;

use super::config::Config;
use super::kv_cache::KvCache;
use super::weights::{Layer, Proj, Slot};
use crate::lora::linear::{linear, linear_backward, LoraGrads, LoraPlan, Numerics};
use crate::ops::activation::{swiglu_backward, swiglu_forward};
use crate::ops::attention::{
    attention_backward, attention_forward, attention_forward_batched, AttentionShape,
};
use crate::ops::norm::{rms_norm_apply, rms_norm_backward, rms_norm_forward};
use crate::ops::rope::{Rope, RopeTable};

/// One sequence of a batch: its rows in the batch and the position of its first row.
#[derive(Debug, Clone)]
pub struct SeqSpan {
    pub rows: Range<usize>,
    pub pos0: usize,
}

/// What a block computes that its backward needs. Inference reuses one set for every layer;
/// training keeps one per layer (keys and values stay in each sequence's `KvCache`), without
/// the three that are cheap to recompute (`attn_in`, `ffn_in`, `act`: see `lend_recomputable`).
#[derive(Default)]
pub struct BlockActs {
    pub x_in: Vec<f32>,         // [n_tokens, n_embd] residual entering the block
    pub attn_inv_rms: Vec<f32>, // [n_tokens]
    pub attn_in: Vec<f32>,      // [n_tokens, n_embd] rms_norm(x_in) ⊙ attn_norm
    pub q: Vec<f32>,            // [n_tokens, q_dim] after RoPE
    pub lse: Vec<f32>,          // [n_tokens, n_head] log-sum-exp of attention scores
    pub attn_out: Vec<f32>,     // [n_tokens, q_dim]
    pub x_mid: Vec<f32>,        // [n_tokens, n_embd] after the attention residual
    pub ffn_inv_rms: Vec<f32>,  // [n_tokens]
    pub ffn_in: Vec<f32>,       // [n_tokens, n_embd]
    pub gate: Vec<f32>,         // [n_tokens, n_ff]
    pub up: Vec<f32>,           // [n_tokens, n_ff]
    pub act: Vec<f32>,          // [n_tokens, n_ff] silu(gate) ⊙ up
}

impl BlockActs {
    /// Swaps the elementwise-recomputable buffers with `spare`'s. Called before and after a
    /// block's forward, it lends `spare`'s memory for the block and hands the results back to
    /// `spare`, leaving these fields empty: the backward then recomputes them.
    pub fn lend_recomputable(&mut self, spare: &mut BlockActs) {
        std::mem::swap(&mut self.attn_in, &mut spare.attn_in);
        std::mem::swap(&mut self.ffn_in, &mut spare.ffn_in);
        std::mem::swap(&mut self.act, &mut spare.act);
    }
}

/// `saved` if the forward kept it, else its recomputation into `buf`.
fn saved_or<'a>(
    saved: &'a [f32],
    buf: &'a mut Vec<f32>,
    n: usize,
    recompute: impl FnOnce(&mut [f32]),
) -> &'a [f32] {
    if !saved.is_empty() {
        return saved;
    }
    recompute(sized(buf, n));
    buf
}

/// Scratch a block needs but does not keep. Reused across layers and calls.
#[derive(Default)]
pub struct BlockScratch {
    k: Vec<f32>,
    v: Vec<f32>,
    proj_out: Vec<f32>,
    /// One per projection run at the same time.
    lora: [Vec<f32>; 3],
    d_a: Vec<f32>,
    d_b: Vec<f32>,
    d_c: Vec<f32>,
    d_in: Vec<f32>,
    norm_in: Vec<f32>,
    act: Vec<f32>,
}

/// Sizes `buf` to `n` elements, reusing its memory.
pub(crate) fn sized(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    buf.resize(n, 0.0);
    &mut buf[..n]
}

/// What every block of one call shares.
pub struct BlockCtx<'a> {
    pub config: &'a Config,
    pub rope: &'a Rope,
    /// cos/sin of each row's position, in batch row order.
    pub rope_table: &'a RopeTable,
    pub seqs: &'a [SeqSpan],
    pub lora: &'a LoraPlan<'a>,
    pub numerics: Numerics,
}

impl BlockCtx<'_> {
    fn shape(&self) -> AttentionShape {
        AttentionShape {
            n_head: self.config.n_head,
            n_head_kv: self.config.n_head_kv,
            head_dim: self.config.head_dim,
        }
    }

    fn rows(&self, span: &SeqSpan, width: usize) -> Range<usize> {
        span.rows.start * width..span.rows.end * width
    }
}

/// Runs block `il` on the residual stream `x` (`[n_tokens, n_embd]`, updated in place),
/// storing keys and values into each sequence's cache.
pub fn block_forward(
    ctx: &BlockCtx,
    layer: &Layer,
    il: usize,
    x: &mut [f32],
    caches: &mut [&mut KvCache],
    acts: &mut BlockActs,
    scratch: &mut BlockScratch,
) {
    let c = ctx.config;
    let n_tokens = x.len() / c.n_embd;
    let proj = |p: Proj, input: &[f32], out: &mut Vec<f32>, lora_scratch: &mut Vec<f32>| {
        let weight = layer.weight(p);
        let out = sized(out, n_tokens * weight.n_rows);
        let slot = Slot { layer: il, proj: p };
        linear(
            input,
            weight,
            layer.bias(p),
            slot,
            ctx.lora,
            ctx.numerics,
            out,
            lora_scratch,
        );
    };

    acts.x_in.clear();
    acts.x_in.extend_from_slice(x);
    sized(&mut acts.attn_in, x.len());
    sized(&mut acts.attn_inv_rms, n_tokens);
    rms_norm_forward(
        x,
        &layer.attn_norm,
        c.rms_eps,
        &mut acts.attn_in,
        &mut acts.attn_inv_rms,
    );

    // Projections of one input run joined: the cores go from one to the next without the
    // wake-up that a parallel region each would cost (a large share of a decode step).
    let [lora_q, lora_k, lora_v] = &mut scratch.lora;
    rayon::join(
        || proj(Proj::AttnQ, &acts.attn_in, &mut acts.q, lora_q),
        || {
            rayon::join(
                || proj(Proj::AttnK, &acts.attn_in, &mut scratch.k, lora_k),
                || proj(Proj::AttnV, &acts.attn_in, &mut scratch.v, lora_v),
            )
        },
    );
    ctx.rope.apply(&mut acts.q, c.n_head, ctx.rope_table, false);
    ctx.rope
        .apply(&mut scratch.k, c.n_head_kv, ctx.rope_table, false);

    sized(&mut acts.attn_out, n_tokens * c.q_dim());
    sized(&mut acts.lse, n_tokens * c.n_head);
    for (span, cache) in ctx.seqs.iter().zip(caches.iter_mut()) {
        let kv_rows = ctx.rows(span, c.kv_dim());
        cache.store(
            il,
            span.pos0,
            &scratch.k[kv_rows.clone()],
            &scratch.v[kv_rows],
        );
        let n_keys = span.pos0 + span.rows.len();
        // Training needs neither inference's bit-identical rows nor its allocation-free calls.
        let attention = match ctx.numerics {
            Numerics::Exact => attention_forward_batched,
            Numerics::Ggml => attention_forward,
        };
        attention(
            ctx.shape(),
            span.pos0,
            &acts.q[ctx.rows(span, c.q_dim())],
            cache.keys(il, n_keys),
            cache.values(il, n_keys),
            &mut acts.attn_out[ctx.rows(span, c.q_dim())],
            &mut acts.lse[ctx.rows(span, c.n_head)],
        );
    }

    proj(
        Proj::AttnOutput,
        &acts.attn_out,
        &mut scratch.proj_out,
        &mut scratch.lora[0],
    );
    add_into(x, &scratch.proj_out);
    acts.x_mid.clear();
    acts.x_mid.extend_from_slice(x);

    sized(&mut acts.ffn_in, x.len());
    sized(&mut acts.ffn_inv_rms, n_tokens);
    rms_norm_forward(
        x,
        &layer.ffn_norm,
        c.rms_eps,
        &mut acts.ffn_in,
        &mut acts.ffn_inv_rms,
    );
    let [lora_gate, lora_up, _] = &mut scratch.lora;
    rayon::join(
        || proj(Proj::FfnGate, &acts.ffn_in, &mut acts.gate, lora_gate),
        || proj(Proj::FfnUp, &acts.ffn_in, &mut acts.up, lora_up),
    );
    swiglu_forward(
        &acts.gate,
        &acts.up,
        sized(&mut acts.act, n_tokens * c.n_ff),
    );
    proj(
        Proj::FfnDown,
        &acts.act,
        &mut scratch.proj_out,
        &mut scratch.lora[0],
    );
    add_into(x, &scratch.proj_out);
}

/// Backward of `block_forward` for whole sequences (`pos0 = 0`). `dx` holds dL/d(block
/// output) and is replaced by dL/d(block input); adapter gradients accumulate in `grads`.
#[allow(clippy::too_many_arguments)]
pub fn block_backward(
    ctx: &BlockCtx,
    layer: &Layer,
    il: usize,
    dx: &mut [f32],
    caches: &[&mut KvCache],
    acts: &BlockActs,
    grads: &mut LoraGrads,
    scratch: &mut BlockScratch,
) {
    let c = ctx.config;
    let n_tokens = dx.len() / c.n_embd;
    let slot = |proj| Slot { layer: il, proj };
    let back = |p: Proj,
                dy: &[f32],
                input: &[f32],
                d_input: &mut [f32],
                grads: &mut LoraGrads,
                lora: &mut Vec<f32>| {
        linear_backward(
            dy,
            input,
            layer.weight(p),
            slot(p),
            ctx.lora,
            d_input,
            grads,
            lora,
        );
    };

    let act = saved_or(&acts.act, &mut scratch.act, n_tokens * c.n_ff, |out| {
        swiglu_forward(&acts.gate, &acts.up, out)
    });
    let ffn_in = saved_or(&acts.ffn_in, &mut scratch.norm_in, dx.len(), |out| {
        rms_norm_apply(&acts.x_mid, &layer.ffn_norm, &acts.ffn_inv_rms, out)
    });

    // x_out = x_mid + W_down · act
    let d_act = zeroed(&mut scratch.d_a, n_tokens * c.n_ff);
    back(Proj::FfnDown, dx, act, d_act, grads, &mut scratch.lora[0]);
    let d_gate = sized(&mut scratch.d_b, n_tokens * c.n_ff);
    let d_up = sized(&mut scratch.d_c, n_tokens * c.n_ff);
    swiglu_backward(d_act, &acts.gate, &acts.up, d_gate, d_up);
    let d_ffn_in = zeroed(&mut scratch.d_in, n_tokens * c.n_embd);
    back(
        Proj::FfnGate,
        d_gate,
        ffn_in,
        d_ffn_in,
        grads,
        &mut scratch.lora[0],
    );
    back(
        Proj::FfnUp,
        d_up,
        ffn_in,
        d_ffn_in,
        grads,
        &mut scratch.lora[0],
    );
    rms_norm_backward(
        d_ffn_in,
        &acts.x_mid,
        &layer.ffn_norm,
        &acts.ffn_inv_rms,
        dx,
    );

    // x_mid = x_in + W_o · attention(...)
    let d_attn_out = zeroed(&mut scratch.d_a, n_tokens * c.q_dim());
    back(
        Proj::AttnOutput,
        dx,
        &acts.attn_out,
        d_attn_out,
        grads,
        &mut scratch.lora[0],
    );
    let dq = sized(&mut scratch.d_b, n_tokens * c.q_dim());
    sized(&mut scratch.k, n_tokens * c.kv_dim());
    sized(&mut scratch.v, n_tokens * c.kv_dim());
    for (span, cache) in ctx.seqs.iter().zip(caches.iter()) {
        debug_assert_eq!(span.pos0, 0, "training runs whole sequences");
        let n = span.rows.len();
        let kv_rows = ctx.rows(span, c.kv_dim());
        attention_backward(
            ctx.shape(),
            &acts.q[ctx.rows(span, c.q_dim())],
            cache.keys(il, n),
            cache.values(il, n),
            &acts.attn_out[ctx.rows(span, c.q_dim())],
            &acts.lse[ctx.rows(span, c.n_head)],
            &d_attn_out[ctx.rows(span, c.q_dim())],
            &mut dq[ctx.rows(span, c.q_dim())],
            &mut scratch.k[kv_rows.clone()],
            &mut scratch.v[kv_rows],
        );
    }
    ctx.rope.apply(dq, c.n_head, ctx.rope_table, true);
    ctx.rope
        .apply(&mut scratch.k, c.n_head_kv, ctx.rope_table, true);
    let attn_in = saved_or(&acts.attn_in, &mut scratch.norm_in, dx.len(), |out| {
        rms_norm_apply(&acts.x_in, &layer.attn_norm, &acts.attn_inv_rms, out)
    });
    let d_attn_in = zeroed(&mut scratch.d_in, n_tokens * c.n_embd);
    back(
        Proj::AttnQ,
        dq,
        attn_in,
        d_attn_in,
        grads,
        &mut scratch.lora[0],
    );
    back(
        Proj::AttnK,
        &scratch.k,
        attn_in,
        d_attn_in,
        grads,
        &mut scratch.lora[0],
    );
    back(
        Proj::AttnV,
        &scratch.v,
        attn_in,
        d_attn_in,
        grads,
        &mut scratch.lora[0],
    );
    rms_norm_backward(
        d_attn_in,
        &acts.x_in,
        &layer.attn_norm,
        &acts.attn_inv_rms,
        dx,
    );
}

fn zeroed(buf: &mut Vec<f32>, n: usize) -> &mut [f32] {
    let out = sized(buf, n);
    out.fill(0.0);
    out
}

fn add_into(x: &mut [f32], y: &[f32]) {
    x.iter_mut().zip(y).for_each(|(x, y)| *x += y);
}
