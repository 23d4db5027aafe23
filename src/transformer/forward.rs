//! The whole model over a batch of sequences: embedding, blocks, final norm and output head,
//! as backend calls: inference (`forward_logits`), and training (`forward_train`), which keeps
//! every block's activations and walks them back in `backward`.

use std::ops::Range;

use super::block::{
    block_attention, block_backward, block_forward, block_rest, BlockActs, BlockCtx, BlockScratch,
};
use crate::backend::{Backend, Norm};
use crate::error::Result;
use crate::lora::LoraPlan;
use crate::model::{KvCache, Proj, SeqSpan};
use crate::ops::Numerics;

/// Activation buffers of a forward (tensors `T`, RoPE table `R`), reused across calls
/// (kept warm in a `MemoryPool`).
#[derive(Default)]
pub struct Buffers<T, R> {
    x: T,
    rope_table: R,
    acts: BlockActs<T>,
    scratch: BlockScratch<T>,
    /// Rows of a tensor kept by `keep_rows`.
    kept: T,
    head_in: T,
    head_inv_rms: T,
}

/// The buffers of backend `B`.
pub type BuffersOf<B> = Buffers<<B as Backend>::Tensor, <B as Backend>::RopeTable>;

/// A batch: token ids of all sequences end to end, and where each sequence lies.
pub struct Batch<'a> {
    pub tokens: &'a [u32],
    pub seqs: &'a [SeqSpan],
}

/// Activations kept by a training forward: one `BlockActs` per layer plus the head's input.
pub struct Saved<T> {
    /// Keep only each block's input (`BlockActs::x_in`) and recompute the rest in the
    /// backward: activation memory of one block instead of all.
    pub checkpoint: bool,
    /// `Exact` or `Bf16`: the products of the forward, which its backward repeats.
    pub numerics: Numerics,
    pub blocks: Vec<BlockActs<T>>,
    pub head_x: T,       // [n_tokens, n_embd] final residual stream
    pub head_in: T,      // [n_tokens, n_embd] after the output norm
    pub head_inv_rms: T, // [n_tokens]
}

impl<T: Default> Saved<T> {
    pub fn new(checkpoint: bool, numerics: Numerics) -> Saved<T> {
        Saved {
            checkpoint,
            numerics,
            blocks: Vec::new(),
            head_x: T::default(),
            head_in: T::default(),
            head_inv_rms: T::default(),
        }
    }
}

/// Inference over `batch`, continuing each sequence in its cache: the logits
/// `[rows.len(), n_vocab]` (ggml numerics) of the batch rows `rows` (ascending), on the host.
///
/// Only those rows' outputs are read, so the last block runs past its attention on them
/// alone (its keys and values, from every row, are stored first): for a prefill, one row
/// of the projection and feed-forward of that block instead of all.
pub fn forward_logits<B: Backend>(
    b: &B,
    batch: &Batch,
    caches: &mut [&mut KvCache],
    mut lora: LoraPlan,
    ws: &mut BuffersOf<B>,
    rows: &[usize],
) -> Result<Vec<f32>> {
    let c = b.config();
    let numerics = Numerics::Ggml;
    b.embed(batch.tokens, &mut ws.x)?;
    b.rope_table(batch.seqs, &mut ws.rope_table)?;
    let mut kept = rows.len() == batch.tokens.len();
    for il in 0..c.n_layer {
        let ctx = BlockCtx {
            rope_table: &ws.rope_table,
            seqs: batch.seqs,
            lora: &lora,
            numerics,
        };
        let (acts, scratch) = (&mut ws.acts, &mut ws.scratch);
        block_attention(b, &ctx, il, &ws.x, caches, acts, scratch)?;
        if !kept && il + 1 == c.n_layer {
            keep_rows(b, &mut acts.attn_out, c.q_dim(), rows, &mut ws.kept)?;
            keep_rows(b, &mut ws.x, c.n_embd, rows, &mut ws.kept)?;
            lora.select_rows(rows);
            kept = true;
        }
        block_rest(b, &lora, numerics, il, &mut ws.x, acts, scratch)?;
    }
    if !kept {
        // A model without blocks.
        keep_rows(b, &mut ws.x, c.n_embd, rows, &mut ws.kept)?;
    }
    commit(batch, caches);
    b.rms_norm(Norm::Output, &ws.x, &mut ws.head_in, &mut ws.head_inv_rms)?;
    let logits = b.logits(&ws.head_in, 0..rows.len(), numerics)?;
    b.download(logits)
}

/// `x = x[rows]` (rows of `width` values), by way of `spare`.
fn keep_rows<B: Backend>(
    b: &B,
    x: &mut B::Tensor,
    width: usize,
    rows: &[usize],
    spare: &mut B::Tensor,
) -> Result<()> {
    b.gather_rows(x, width, rows, spare)?;
    std::mem::swap(x, spare);
    Ok(())
}

/// Each sequence's cache now holds its batch rows.
fn commit(batch: &Batch, caches: &mut [&mut KvCache]) {
    for (span, cache) in batch.seqs.iter().zip(caches.iter_mut()) {
        cache.commit(span.pos0 + span.rows.len());
    }
}

/// Runs every block over `batch`, continuing each sequence in its cache, keeping in `saved`
/// every block's activations, and leaves the final residual stream in `ws.x`.
fn forward_blocks<B: Backend>(
    b: &B,
    batch: &Batch,
    caches: &mut [&mut KvCache],
    lora: &LoraPlan,
    ws: &mut BuffersOf<B>,
    saved: &mut Saved<B::Tensor>,
) -> Result<()> {
    b.embed(batch.tokens, &mut ws.x)?;
    b.rope_table(batch.seqs, &mut ws.rope_table)?;
    let ctx = BlockCtx {
        rope_table: &ws.rope_table,
        seqs: batch.seqs,
        lora,
        numerics: saved.numerics,
    };
    saved
        .blocks
        .resize_with(b.config().n_layer, BlockActs::default);
    for (il, acts) in saved.blocks.iter_mut().enumerate() {
        let (x, scratch) = (&mut ws.x, &mut ws.scratch);
        match saved.checkpoint {
            false => {
                acts.lend_recomputable(&mut ws.acts);
                block_forward(b, &ctx, il, x, caches, acts, scratch)?;
                acts.lend_recomputable(&mut ws.acts);
            }
            true => {
                block_forward(b, &ctx, il, x, caches, &mut ws.acts, scratch)?;
                std::mem::swap(&mut acts.x_in, &mut ws.acts.x_in);
            }
        }
    }
    commit(batch, caches);
    Ok(())
}

/// Training forward in `saved.numerics` (exact f32, or mixed bf16): runs every block and the
/// output norm, keeping in `saved` what the backward needs (with `saved.checkpoint`, only each
/// block's input; the rest is recomputed during the backward). Keys and values stay in
/// `caches`.
pub fn forward_train<B: Backend>(
    b: &B,
    batch: &Batch,
    caches: &mut [&mut KvCache],
    lora: &LoraPlan,
    saved: &mut Saved<B::Tensor>,
) -> Result<()> {
    let mut ws = BuffersOf::<B>::default();
    forward_blocks(b, batch, caches, lora, &mut ws, saved)?;
    saved.head_x = ws.x;
    b.rms_norm(
        Norm::Output,
        &saved.head_x,
        &mut saved.head_in,
        &mut saved.head_inv_rms,
    )
}

/// Logits `[rows.len(), n_vocab]` of rows of a training forward, in its numerics.
pub fn logits_train<B: Backend>(
    b: &B,
    saved: &Saved<B::Tensor>,
    rows: Range<usize>,
) -> Result<B::Tensor> {
    b.logits(&saved.head_in, rows, saved.numerics)
}

/// Backward of `forward_train` from dL/d(normed final hidden state): walks the blocks in
/// reverse, accumulating adapter gradients in `grads`. Checkpointed blocks are run again
/// first (they store the same keys and values again).
pub fn backward<B: Backend>(
    b: &B,
    batch: &Batch,
    caches: &mut [&mut KvCache],
    lora: &LoraPlan,
    saved: &Saved<B::Tensor>,
    d_head_in: &B::Tensor,
    grads: &mut B::Grads,
) -> Result<()> {
    let config = b.config();
    let mut rope_table = B::RopeTable::default();
    b.rope_table(batch.seqs, &mut rope_table)?;
    let ctx = BlockCtx {
        rope_table: &rope_table,
        seqs: batch.seqs,
        lora,
        numerics: saved.numerics,
    };
    // As autograd does, no gradient flows below the lowest layer that trains something.
    let Some(lowest) = (0..config.n_layer).find(|&il| lora.trains(il, &Proj::ALL)) else {
        return Ok(());
    };
    let mut dx = B::Tensor::default();
    b.zeros(batch.tokens.len(), config.n_embd, &mut dx)?;
    b.rms_norm_backward(
        Norm::Output,
        d_head_in,
        &saved.head_x,
        &saved.head_inv_rms,
        &mut dx,
    )?;
    let mut scratch = BlockScratch::default();
    let mut recomputed = BlockActs::default();
    for il in (lowest..config.n_layer).rev() {
        let acts = if saved.checkpoint {
            let mut x = B::Tensor::default();
            b.copy(&saved.blocks[il].x_in, &mut x)?;
            block_forward(b, &ctx, il, &mut x, caches, &mut recomputed, &mut scratch)?;
            &recomputed
        } else {
            &saved.blocks[il]
        };
        let input_grad = il > lowest;
        block_backward(
            b,
            &ctx,
            il,
            &mut dx,
            caches,
            acts,
            grads,
            &mut scratch,
            input_grad,
        )?;
    }
    Ok(())
}
