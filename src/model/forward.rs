//! The whole model over a batch of sequences: embedding, blocks, final norm and output head.
//! Inference and training both run `forward`; training keeps every block's activations and
//! walks them back in `backward`.

use std::ops::Range;

use rayon::prelude::*;

use super::block::{
    block_backward, block_forward, sized, BlockActs, BlockCtx, BlockScratch, SeqSpan,
};
use super::kv_cache::KvCache;
use super::Model;
use crate::error::Result;
use crate::lora::linear::{LoraGrads, LoraPlan, Numerics};
use crate::ops::norm::{rms_norm_backward, rms_norm_forward};
use crate::ops::rope::{Rope, RopeTable};

/// Activation buffers of a forward, reused across calls (kept warm in a `MemoryPool`).
#[derive(Default)]
pub struct Buffers {
    pub(crate) x: Vec<f32>,
    rope_table: RopeTable,
    acts: BlockActs,
    scratch: BlockScratch,
    head_in: Vec<f32>,
    head_inv_rms: Vec<f32>,
    head_x: Vec<f32>,
}

/// A batch: token ids of all sequences end to end, and where each sequence lies.
pub struct Batch<'a> {
    pub tokens: &'a [u32],
    pub seqs: &'a [SeqSpan],
}

/// Activations kept by a training forward: one `BlockActs` per layer plus the head's input.
#[derive(Default)]
pub struct Saved {
    /// Keep only each block's input (`BlockActs::x_in`) and recompute the rest in the
    /// backward: activation memory of one block instead of all.
    pub checkpoint: bool,
    pub blocks: Vec<BlockActs>,
    pub head_x: Vec<f32>,       // [n_tokens, n_embd] final residual stream
    pub head_in: Vec<f32>,      // [n_tokens, n_embd] after the output norm
    pub head_inv_rms: Vec<f32>, // [n_tokens]
}

impl Model {
    /// Runs every block over `batch`, continuing each sequence in its cache, and leaves the
    /// final residual stream in `ws.x`. With `saved`, every block's activations are kept.
    pub fn forward_blocks(
        &self,
        batch: &Batch,
        caches: &mut [&mut KvCache],
        lora: &LoraPlan,
        numerics: Numerics,
        ws: &mut Buffers,
        mut saved: Option<&mut Saved>,
    ) -> Result<()> {
        let (config, weights) = self.runnable()?;
        let rope = self.rope()?;
        let n_embd = config.n_embd;
        let x = sized(&mut ws.x, batch.tokens.len() * n_embd);
        x.par_chunks_mut(n_embd)
            .zip(batch.tokens.par_iter())
            .for_each(|(row, &token)| {
                let t = token as usize;
                weights.token_embd.dequantize_rows(t..t + 1, row)
            });
        rope_positions(rope, batch.seqs, &mut ws.rope_table);
        let ctx = BlockCtx {
            config,
            rope,
            rope_table: &ws.rope_table,
            seqs: batch.seqs,
            lora,
            numerics,
        };
        if let Some(saved) = saved.as_deref_mut() {
            saved.blocks.resize_with(config.n_layer, BlockActs::default);
        }
        for (il, layer) in weights.layers.iter().enumerate() {
            match saved.as_deref_mut() {
                Some(saved) if !saved.checkpoint => {
                    let acts = &mut saved.blocks[il];
                    acts.lend_recomputable(&mut ws.acts);
                    block_forward(&ctx, layer, il, &mut ws.x, caches, acts, &mut ws.scratch);
                    acts.lend_recomputable(&mut ws.acts);
                }
                Some(saved) => {
                    block_forward(
                        &ctx,
                        layer,
                        il,
                        &mut ws.x,
                        caches,
                        &mut ws.acts,
                        &mut ws.scratch,
                    );
                    std::mem::swap(&mut saved.blocks[il].x_in, &mut ws.acts.x_in);
                }
                None => block_forward(
                    &ctx,
                    layer,
                    il,
                    &mut ws.x,
                    caches,
                    &mut ws.acts,
                    &mut ws.scratch,
                ),
            }
        }
        for (span, cache) in batch.seqs.iter().zip(caches.iter_mut()) {
            cache.commit(span.pos0 + span.rows.len());
        }
        Ok(())
    }

    /// Logits `[rows.len(), n_vocab]` of the chosen rows of the final residual stream.
    pub fn head(&self, ws: &mut Buffers, rows: &[usize]) -> Result<Vec<f32>> {
        let (config, weights) = self.runnable()?;
        let n_embd = config.n_embd;
        let head_x = sized(&mut ws.head_x, rows.len() * n_embd);
        for (dst, &row) in head_x.chunks_mut(n_embd).zip(rows) {
            dst.copy_from_slice(&ws.x[row * n_embd..(row + 1) * n_embd]);
        }
        let head_in = sized(&mut ws.head_in, rows.len() * n_embd);
        let inv_rms = sized(&mut ws.head_inv_rms, rows.len());
        rms_norm_forward(
            &ws.head_x,
            &weights.output_norm,
            config.rms_eps,
            head_in,
            inv_rms,
        );
        let mut logits = vec![0f32; rows.len() * config.n_vocab];
        weights.output.matmul(head_in, &mut logits);
        Ok(logits)
    }

    /// Training forward in exact f32 math: runs every block and the output norm, keeping in
    /// `saved` what the backward needs (with `saved.checkpoint`, only each block's input; the
    /// rest is recomputed during the backward). Keys and values stay in `caches`.
    pub fn forward_train(
        &self,
        batch: &Batch,
        caches: &mut [&mut KvCache],
        lora: &LoraPlan,
        ws: &mut Buffers,
        saved: &mut Saved,
    ) -> Result<()> {
        let (config, weights) = self.runnable()?;
        self.forward_blocks(batch, caches, lora, Numerics::Exact, ws, Some(saved))?;
        saved.head_x.clone_from(&ws.x);
        let n_tokens = batch.tokens.len();
        sized(&mut saved.head_in, n_tokens * config.n_embd);
        sized(&mut saved.head_inv_rms, n_tokens);
        rms_norm_forward(
            &saved.head_x,
            &weights.output_norm,
            config.rms_eps,
            &mut saved.head_in,
            &mut saved.head_inv_rms,
        );
        Ok(())
    }

    /// Exact logits `[rows.len(), n_vocab]` of rows of a training forward.
    pub fn logits_exact(
        &self,
        saved: &Saved,
        rows: Range<usize>,
        logits: &mut [f32],
    ) -> Result<()> {
        let (config, weights) = self.runnable()?;
        let head_in = &saved.head_in[rows.start * config.n_embd..rows.end * config.n_embd];
        weights.output.matmul_exact(head_in, logits);
        Ok(())
    }

    /// `d_head_in[rows] += d_logits · W_out`: the head's backward (it has no adapters).
    pub fn head_backward(
        &self,
        d_logits: &[f32],
        rows: Range<usize>,
        d_head_in: &mut [f32],
    ) -> Result<()> {
        let (config, weights) = self.runnable()?;
        let d_rows = &mut d_head_in[rows.start * config.n_embd..rows.end * config.n_embd];
        weights.output.matmul_backward_input(d_logits, d_rows);
        Ok(())
    }

    /// Backward of `forward_train` from dL/d(normed final hidden state): walks the blocks in
    /// reverse, accumulating adapter gradients in `grads`. Checkpointed blocks are run again
    /// first (they store the same keys and values again).
    pub fn backward(
        &self,
        batch: &Batch,
        caches: &mut [&mut KvCache],
        lora: &LoraPlan,
        saved: &Saved,
        d_head_in: &[f32],
        grads: &mut LoraGrads,
    ) -> Result<()> {
        let (config, weights) = self.runnable()?;
        let rope = self.rope()?;
        let mut rope_table = RopeTable::default();
        rope_positions(rope, batch.seqs, &mut rope_table);
        let ctx = BlockCtx {
            config,
            rope,
            rope_table: &rope_table,
            seqs: batch.seqs,
            lora,
            numerics: Numerics::Exact,
        };
        let mut dx = vec![0f32; batch.tokens.len() * config.n_embd];
        rms_norm_backward(
            d_head_in,
            &saved.head_x,
            &weights.output_norm,
            &saved.head_inv_rms,
            &mut dx,
        );
        let mut scratch = BlockScratch::default();
        let mut recomputed = BlockActs::default();
        for (il, layer) in weights.layers.iter().enumerate().rev() {
            let acts = if saved.checkpoint {
                let mut x = saved.blocks[il].x_in.clone();
                block_forward(
                    &ctx,
                    layer,
                    il,
                    &mut x,
                    caches,
                    &mut recomputed,
                    &mut scratch,
                );
                &recomputed
            } else {
                &saved.blocks[il]
            };
            block_backward(&ctx, layer, il, &mut dx, caches, acts, grads, &mut scratch);
        }
        Ok(())
    }
}

/// Each row's position: sequence `s` covers `pos0 .. pos0 + len`.
fn rope_positions(rope: &Rope, seqs: &[SeqSpan], table: &mut RopeTable) {
    let positions = seqs
        .iter()
        .flat_map(|span| span.pos0..span.pos0 + span.rows.len());
    rope.table(positions, table);
}
