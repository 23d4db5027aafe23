//! One transformer block, forward and backward side by side, as backend calls:
//!
//! ```text
//! x_mid = x   + W_o · attention(rope(W_q · n1), rope(W_k · n1), W_v · n1),  n1 = rms_norm(x)
//! x_out = x_mid + W_down · (silu(W_gate · n2) ⊙ W_up · n2),                 n2 = rms_norm(x_mid)
//! ```
//! Architectures with head norms (Qwen3, Gemma 3) normalise each head of `W_q · n1` and
//! `W_k · n1` before RoPE; with post norms (Gemma) each branch's output is RMS-normalised
//! before its residual. Every projection goes through `Backend::linear`, which adds the
//! adapters' `s B A` terms.

use crate::backend::{Backend, Norm};
use crate::error::Result;
use crate::lora::LoraPlan;
use crate::model::{KvCache, Proj, SeqSpan};
use crate::ops::Numerics;

/// What a block computes that its backward needs. Inference reuses one set for every layer;
/// training keeps one per layer (keys and values stay in each sequence's `KvCache`), without
/// the three that are cheap to recompute (`attn_in`, `ffn_in`, `act`: see `lend_recomputable`).
#[derive(Default)]
pub struct BlockActs<T> {
    pub x_in: T,              // [n_tokens, n_embd] residual entering the block
    pub attn_inv_rms: T,      // [n_tokens]
    pub attn_in: T,           // [n_tokens, n_embd] rms_norm(x_in) ⊙ attn_norm
    pub q_raw: T,             // [n_tokens, q_dim] W_q · attn_in, before its head norm (Qwen3)
    pub k_raw: T,             // [n_tokens, kv_dim] W_k · attn_in, before its head norm (Qwen3)
    pub q_inv_rms: T,         // [n_tokens * n_head] (Qwen3)
    pub k_inv_rms: T,         // [n_tokens * n_head_kv] (Qwen3)
    pub q: T,                 // [n_tokens, q_dim] after RoPE
    pub lse: T,               // [n_tokens, n_head] log-sum-exp of attention scores
    pub attn_out: T,          // [n_tokens, q_dim]
    pub attn_proj: T,         // [n_tokens, n_embd] W_o · attn_out before its post norm (Gemma)
    pub post_attn_inv_rms: T, // [n_tokens] (Gemma)
    pub x_mid: T,             // [n_tokens, n_embd] after the attention residual
    pub ffn_inv_rms: T,       // [n_tokens]
    pub ffn_in: T,            // [n_tokens, n_embd]
    pub gate: T,              // [n_tokens, n_ff]
    pub up: T,                // [n_tokens, n_ff]
    pub act: T,               // [n_tokens, n_ff] act(gate) ⊙ up
    pub ffn_proj: T,          // [n_tokens, n_embd] W_down · act before its post norm (Gemma)
    pub post_ffn_inv_rms: T,  // [n_tokens] (Gemma)
}

impl<T> BlockActs<T> {
    /// Swaps the elementwise-recomputable buffers with `spare`'s. Called before and after a
    /// block's forward, it lends `spare`'s memory for the block and hands the results back to
    /// `spare`, leaving these fields empty: the backward then recomputes them.
    pub fn lend_recomputable(&mut self, spare: &mut BlockActs<T>) {
        std::mem::swap(&mut self.attn_in, &mut spare.attn_in);
        std::mem::swap(&mut self.ffn_in, &mut spare.ffn_in);
        std::mem::swap(&mut self.act, &mut spare.act);
    }
}

/// `saved` if the forward kept it, else its recomputation into `buf`.
fn saved_or<'a, B: Backend>(
    saved: &'a B::Tensor,
    buf: &'a mut B::Tensor,
    recompute: impl FnOnce(&mut B::Tensor) -> Result<()>,
) -> Result<&'a B::Tensor> {
    if !B::is_empty(saved) {
        return Ok(saved);
    }
    recompute(buf)?;
    Ok(buf)
}

/// Scratch a block needs but does not keep. Reused across layers and calls.
#[derive(Default)]
pub struct BlockScratch<T> {
    k: T,
    v: T,
    proj_out: T,
    d_a: T,
    d_b: T,
    d_c: T,
    d_in: T,
    d_post: T,
    norm_in: T,
    act: T,
}

/// What every block of one call shares.
pub struct BlockCtx<'a, B: Backend> {
    /// cos/sin of each row's position, in batch row order.
    pub rope_table: &'a B::RopeTable,
    pub seqs: &'a [SeqSpan],
    pub lora: &'a LoraPlan<'a>,
    pub numerics: Numerics,
}

/// Runs block `il` on the residual stream `x` (`[n_tokens, n_embd]`, updated in place),
/// storing keys and values into each sequence's cache.
pub fn block_forward<B: Backend>(
    b: &B,
    ctx: &BlockCtx<B>,
    il: usize,
    x: &mut B::Tensor,
    caches: &mut [&mut KvCache],
    acts: &mut BlockActs<B::Tensor>,
    scratch: &mut BlockScratch<B::Tensor>,
) -> Result<()> {
    block_attention(b, ctx, il, x, caches, acts, scratch)?;
    block_rest(b, ctx.lora, ctx.numerics, il, x, acts, scratch)
}

/// The first part of block `il`, up to the attention's output (`acts.attn_out`), which
/// stores the keys and values into each sequence's cache; `x` is left unchanged.
pub fn block_attention<B: Backend>(
    b: &B,
    ctx: &BlockCtx<B>,
    il: usize,
    x: &B::Tensor,
    caches: &mut [&mut KvCache],
    acts: &mut BlockActs<B::Tensor>,
    scratch: &mut BlockScratch<B::Tensor>,
) -> Result<()> {
    let c = b.config();
    let (lora, numerics) = (ctx.lora, ctx.numerics);
    let head_norms = c.arch.has_qk_norm();
    b.copy(x, &mut acts.x_in)?;
    b.rms_norm(Norm::Attn(il), x, &mut acts.attn_in, &mut acts.attn_inv_rms)?;
    let (q, k) = match head_norms {
        true => (&mut acts.q_raw, &mut acts.k_raw),
        false => (&mut acts.q, &mut scratch.k),
    };
    b.linear(
        il,
        [Proj::AttnQ, Proj::AttnK, Proj::AttnV],
        &acts.attn_in,
        [q, k, &mut scratch.v],
        lora,
        numerics,
    )?;
    if head_norms {
        b.rms_norm(
            Norm::QHead(il),
            &acts.q_raw,
            &mut acts.q,
            &mut acts.q_inv_rms,
        )?;
        b.rms_norm(
            Norm::KHead(il),
            &acts.k_raw,
            &mut scratch.k,
            &mut acts.k_inv_rms,
        )?;
    }
    b.rope(il, &mut acts.q, c.n_head, ctx.rope_table, false)?;
    b.rope(il, &mut scratch.k, c.n_head_kv, ctx.rope_table, false)?;
    b.attention(
        il,
        ctx.seqs,
        &acts.q,
        &scratch.k,
        &scratch.v,
        caches,
        numerics,
        &mut acts.attn_out,
        &mut acts.lse,
    )
}

/// The rest of block `il` on the rows of `x` and `acts.attn_out` (which `lora` is planned
/// for): the attention's projection and residual, then the feed-forward branch.
pub fn block_rest<B: Backend>(
    b: &B,
    lora: &LoraPlan,
    numerics: Numerics,
    il: usize,
    x: &mut B::Tensor,
    acts: &mut BlockActs<B::Tensor>,
    scratch: &mut BlockScratch<B::Tensor>,
) -> Result<()> {
    let attn = [&mut scratch.proj_out];
    b.linear(il, [Proj::AttnOutput], &acts.attn_out, attn, lora, numerics)?;
    let (raw, inv_rms) = (&mut acts.attn_proj, &mut acts.post_attn_inv_rms);
    add_branch(
        b,
        Norm::PostAttn(il),
        x,
        &mut scratch.proj_out,
        raw,
        inv_rms,
    )?;
    b.copy(x, &mut acts.x_mid)?;

    b.rms_norm(Norm::Ffn(il), x, &mut acts.ffn_in, &mut acts.ffn_inv_rms)?;
    b.linear(
        il,
        [Proj::FfnGate, Proj::FfnUp],
        &acts.ffn_in,
        [&mut acts.gate, &mut acts.up],
        lora,
        numerics,
    )?;
    b.glu(&acts.gate, &acts.up, &mut acts.act)?;
    let down = [&mut scratch.proj_out];
    b.linear(il, [Proj::FfnDown], &acts.act, down, lora, numerics)?;
    let (raw, inv_rms) = (&mut acts.ffn_proj, &mut acts.post_ffn_inv_rms);
    add_branch(b, Norm::PostFfn(il), x, &mut scratch.proj_out, raw, inv_rms)
}

/// `x += branch`, or with post norms `x += rms_norm(branch)`, keeping the branch before its
/// norm in `raw` (`branch` is then left with the normalised values).
fn add_branch<B: Backend>(
    b: &B,
    norm: Norm,
    x: &mut B::Tensor,
    branch: &mut B::Tensor,
    raw: &mut B::Tensor,
    inv_rms: &mut B::Tensor,
) -> Result<()> {
    if b.config().post_norms {
        std::mem::swap(raw, branch);
        b.rms_norm(norm, raw, branch, inv_rms)?;
    }
    b.add_assign(x, branch)
}

/// dL/d(branch before its post norm) from `dy` = dL/d(residual), or `dy` itself without post
/// norms.
fn branch_grad<'a, B: Backend>(
    b: &B,
    norm: Norm,
    n_tokens: usize,
    dy: &'a B::Tensor,
    raw: &B::Tensor,
    inv_rms: &B::Tensor,
    out: &'a mut B::Tensor,
) -> Result<&'a B::Tensor> {
    if !b.config().post_norms {
        return Ok(dy);
    }
    b.zeros(n_tokens, b.config().n_embd, out)?;
    b.rms_norm_backward(norm, dy, raw, inv_rms, out)?;
    Ok(out)
}

/// Backward of `block_forward` for whole sequences (`pos0 = 0`). `dx` holds dL/d(block
/// output); adapter gradients accumulate in `grads`. With `input_grad`, `dx` is replaced by
/// dL/d(block input). Without it (nothing trainable lies below), as with autograd, only what
/// this block's own trainable terms need is computed, and `dx` is left partly updated.
#[allow(clippy::too_many_arguments)]
pub fn block_backward<B: Backend>(
    b: &B,
    ctx: &BlockCtx<B>,
    il: usize,
    dx: &mut B::Tensor,
    caches: &[&mut KvCache],
    acts: &BlockActs<B::Tensor>,
    grads: &mut B::Grads,
    scratch: &mut BlockScratch<B::Tensor>,
    input_grad: bool,
) -> Result<()> {
    let c = b.config();
    let n_tokens = ctx.seqs.last().map_or(0, |s| s.rows.end);
    let (lora, numerics) = (ctx.lora, ctx.numerics);
    // The gradients each part needs, from the block's input up: a part runs where it or
    // something below it trains.
    let qkv = input_grad || lora.trains(il, &[Proj::AttnQ, Proj::AttnK, Proj::AttnV]);
    let attn = qkv || lora.trains(il, &[Proj::AttnOutput]);
    let gate_up = attn || lora.trains(il, &[Proj::FfnGate, Proj::FfnUp]);
    if !gate_up && !lora.trains(il, &[Proj::FfnDown]) {
        return Ok(());
    }

    let act = saved_or::<B>(&acts.act, &mut scratch.act, |out| {
        b.glu(&acts.gate, &acts.up, out)
    })?;
    let ffn_in = saved_or::<B>(&acts.ffn_in, &mut scratch.norm_in, |out| {
        b.rms_norm_apply(Norm::Ffn(il), &acts.x_mid, &acts.ffn_inv_rms, out)
    })?;

    // x_out = x_mid + W_down · act (its post norm between, with Gemma)
    let (raw, inv) = (&acts.ffn_proj, &acts.post_ffn_inv_rms);
    let d_down = branch_grad(
        b,
        Norm::PostFfn(il),
        n_tokens,
        dx,
        raw,
        inv,
        &mut scratch.d_post,
    )?;
    if gate_up {
        b.zeros(n_tokens, c.n_ff, &mut scratch.d_a)?;
    }
    let d_act = gate_up.then_some(&mut scratch.d_a);
    b.linear_backward(il, Proj::FfnDown, d_down, act, lora, numerics, d_act, grads)?;
    if !gate_up {
        return Ok(());
    }
    b.glu_backward(
        &scratch.d_a,
        &acts.gate,
        &acts.up,
        &mut scratch.d_b,
        &mut scratch.d_c,
    )?;
    if attn {
        b.zeros(n_tokens, c.n_embd, &mut scratch.d_in)?;
    }
    for (proj, dy) in [(Proj::FfnGate, &scratch.d_b), (Proj::FfnUp, &scratch.d_c)] {
        let d_in = attn.then_some(&mut scratch.d_in);
        b.linear_backward(il, proj, dy, ffn_in, lora, numerics, d_in, grads)?;
    }
    if !attn {
        return Ok(());
    }
    b.rms_norm_backward(
        Norm::Ffn(il),
        &scratch.d_in,
        &acts.x_mid,
        &acts.ffn_inv_rms,
        dx,
    )?;

    // x_mid = x_in + W_o · attention(...) (its post norm between, with Gemma)
    let (raw, inv) = (&acts.attn_proj, &acts.post_attn_inv_rms);
    let d_o = branch_grad(
        b,
        Norm::PostAttn(il),
        n_tokens,
        dx,
        raw,
        inv,
        &mut scratch.d_post,
    )?;
    if qkv {
        b.zeros(n_tokens, c.q_dim(), &mut scratch.d_a)?;
    }
    let d_attn_out = qkv.then_some(&mut scratch.d_a);
    b.linear_backward(
        il,
        Proj::AttnOutput,
        d_o,
        &acts.attn_out,
        lora,
        numerics,
        d_attn_out,
        grads,
    )?;
    if !qkv {
        return Ok(());
    }
    b.attention_backward(
        il,
        ctx.seqs,
        caches,
        &acts.q,
        &acts.attn_out,
        &acts.lse,
        &scratch.d_a,
        &mut scratch.d_b,
        &mut scratch.k,
        &mut scratch.v,
    )?;
    b.rope(il, &mut scratch.d_b, c.n_head, ctx.rope_table, true)?;
    b.rope(il, &mut scratch.k, c.n_head_kv, ctx.rope_table, true)?;
    // dL/d(W_q · n1) and dL/d(W_k · n1): through the head norms where there are some.
    let (dq, dk) = match c.arch.has_qk_norm() {
        true => {
            let (d_q, d_k) = (&mut scratch.d_a, &mut scratch.d_c);
            b.zeros(n_tokens, c.q_dim(), d_q)?;
            b.rms_norm_backward(
                Norm::QHead(il),
                &scratch.d_b,
                &acts.q_raw,
                &acts.q_inv_rms,
                d_q,
            )?;
            b.zeros(n_tokens, c.kv_dim(), d_k)?;
            b.rms_norm_backward(
                Norm::KHead(il),
                &scratch.k,
                &acts.k_raw,
                &acts.k_inv_rms,
                d_k,
            )?;
            (&scratch.d_a, &scratch.d_c)
        }
        false => (&scratch.d_b, &scratch.k),
    };
    let attn_in = saved_or::<B>(&acts.attn_in, &mut scratch.norm_in, |out| {
        b.rms_norm_apply(Norm::Attn(il), &acts.x_in, &acts.attn_inv_rms, out)
    })?;
    if input_grad {
        b.zeros(n_tokens, c.n_embd, &mut scratch.d_in)?;
    }
    for (proj, dy) in [
        (Proj::AttnQ, dq),
        (Proj::AttnK, dk),
        (Proj::AttnV, &scratch.v),
    ] {
        let d_in = input_grad.then_some(&mut scratch.d_in);
        b.linear_backward(il, proj, dy, attn_in, lora, numerics, d_in, grads)?;
    }
    if !input_grad {
        return Ok(());
    }
    b.rms_norm_backward(
        Norm::Attn(il),
        &scratch.d_in,
        &acts.x_in,
        &acts.attn_inv_rms,
        dx,
    )
}
