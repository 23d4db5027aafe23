//! A training forward that keeps its activations, and the backward that walks them back.

use std::sync::{Arc, PoisonError};

use super::loss::{count_scored, cross_entropy_in_place};
use crate::error::{Error, Result};
use crate::infer::{Inference, SpareActivations};
use crate::lora::{LoraAdapter, LoraGrads, LoraPlan, PairGrad};
use crate::model::{Batch, Buffers, KvCache, Saved, SeqSpan};

/// Logits materialised at a time by the fused loss: 128 MiB (1024 rows of a 32k vocabulary),
/// whatever the batch. Each block is one product with the whole output head, which runs at
/// full speed only in large blocks: per thread 209 GFLOP/s at 1024 rows, 140 at 256 rows.
const LOSS_BLOCK_VALUES: usize = 32 << 20;

/// What a training forward kept: the batch, the activations, each sequence's keys and values,
/// and the adapters it ran with.
pub struct TrainGraph {
    tokens: Vec<u32>,
    spans: Vec<SeqSpan>,
    caches: Vec<KvCache>,
    saved: Saved,
    adapters: Vec<Arc<LoraAdapter>>,
    /// Where `saved` goes when this graph is dropped.
    spare: SpareActivations,
}

impl Drop for TrainGraph {
    fn drop(&mut self) {
        let mut slot = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = Some(std::mem::take(&mut self.saved));
    }
}

impl TrainGraph {
    /// Runs `sequences` (each from position 0, rows end to end) in exact f32 math with
    /// `adapters`. With `checkpoint`, keeps only each block's input and recomputes the rest
    /// during the backward.
    pub fn forward(
        inf: &Inference,
        sequences: &[&[u32]],
        adapters: &[Arc<LoraAdapter>],
        checkpoint: bool,
    ) -> Result<TrainGraph> {
        let config = inf.config();
        if sequences.is_empty() {
            return Err(Error::Empty { what: "the batch" });
        }
        let mut spans = Vec::with_capacity(sequences.len());
        let mut caches = Vec::with_capacity(sequences.len());
        let mut row = 0;
        for tokens in sequences {
            inf.check_tokens(tokens)?;
            inf.create_kv_cache(None).check_room(tokens.len())?;
            spans.push(SeqSpan {
                rows: row..row + tokens.len(),
                pos0: 0,
            });
            caches.push(inf.create_kv_cache(Some(tokens.len())));
            row += tokens.len();
        }
        let mut unique: Vec<Arc<LoraAdapter>> = Vec::new();
        for adapter in adapters {
            adapter.check_fits(config)?;
            if !unique.iter().any(|u| Arc::ptr_eq(u, adapter)) {
                unique.push(Arc::clone(adapter));
            }
        }
        let spare = Arc::clone(inf.spare_activations());
        // A checkpointed graph keeps only block inputs: reusing a full one would keep the rest.
        let saved = match spare.lock().unwrap_or_else(PoisonError::into_inner).take() {
            Some(saved) if saved.checkpoint == checkpoint => saved,
            _ => Saved {
                checkpoint,
                ..Saved::default()
            },
        };
        let mut graph = TrainGraph {
            tokens: sequences.concat(),
            spans,
            caches,
            saved,
            adapters: unique,
            spare,
        };
        inf.install(|| {
            let plan = plan(&graph.adapters, graph.tokens.len());
            let batch = Batch {
                tokens: &graph.tokens,
                seqs: &graph.spans,
            };
            let mut caches: Vec<&mut KvCache> = graph.caches.iter_mut().collect();
            inf.model().forward_train(
                &batch,
                &mut caches,
                &plan,
                &mut Buffers::default(),
                &mut graph.saved,
            )
        })?;
        Ok(graph)
    }

    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Every row's exact logits, `[n_tokens, n_vocab]`.
    pub fn logits(&self, inf: &Inference) -> Result<Vec<f32>> {
        let mut logits = vec![0f32; self.n_tokens() * inf.config().n_vocab];
        inf.install(|| {
            inf.model()
                .logits_exact(&self.saved, 0..self.n_tokens(), &mut logits)
        })?;
        Ok(logits)
    }

    /// Back-propagates dL/dlogits (`[n_tokens, n_vocab]`) and adds dL/dA, dL/dB to each
    /// trainable adapter's gradients (they accumulate until `zero_grad`).
    pub fn backward(mut self, inf: &Inference, d_logits: &[f32]) -> Result<()> {
        let mut d_head_in = vec![0f32; self.n_tokens() * inf.config().n_embd];
        inf.install(|| {
            inf.model()
                .head_backward(d_logits, 0..self.n_tokens(), &mut d_head_in)
        })?;
        self.backward_from_head(inf, &d_head_in)
    }

    /// The cross-entropy against `targets` (one per row, -100 masked) and its backward,
    /// fused: logits exist one block of rows at a time. Gradients are of the loss summed over
    /// scored rows divided by `normalizer` (default: this batch's scored rows), so that
    /// micro-batches of one step can share one mean. Returns (summed loss, scored rows).
    pub fn loss_backward(
        mut self,
        inf: &Inference,
        targets: &[i64],
        normalizer: Option<usize>,
    ) -> Result<(f64, usize)> {
        let mut d_head_in = vec![0f32; self.n_tokens() * inf.config().n_embd];
        let (sum, n_scored) = self.head_loss(inf, targets, normalizer, Some(&mut d_head_in))?;
        self.backward_from_head(inf, &d_head_in)?;
        Ok((sum, n_scored))
    }

    /// (summed cross-entropy, scored rows) without a backward.
    pub fn loss(&self, inf: &Inference, targets: &[i64]) -> Result<(f64, usize)> {
        self.head_loss(inf, targets, None, None)
    }

    fn head_loss(
        &self,
        inf: &Inference,
        targets: &[i64],
        normalizer: Option<usize>,
        d_head_in: Option<&mut [f32]>,
    ) -> Result<(f64, usize)> {
        let block_rows = (LOSS_BLOCK_VALUES / inf.config().n_vocab).max(1);
        self.head_loss_in_blocks(inf, targets, normalizer, d_head_in, block_rows)
    }

    /// `head_loss` with logits materialised `block_rows` rows at a time.
    fn head_loss_in_blocks(
        &self,
        inf: &Inference,
        targets: &[i64],
        normalizer: Option<usize>,
        mut d_head_in: Option<&mut [f32]>,
        block_rows: usize,
    ) -> Result<(f64, usize)> {
        let config = inf.config();
        if targets.len() != self.n_tokens() {
            return Err(Error::invalid(
                "targets",
                format!(
                    "{} targets for {} rows: give one target (or -100) per row",
                    targets.len(),
                    self.n_tokens()
                ),
            ));
        }
        let n_scored = count_scored(targets, config.n_vocab)?;
        let normalizer = normalizer.unwrap_or(n_scored);
        let model = inf.model();
        let mut block = Vec::new();
        let sum = inf.install(|| -> Result<f64> {
            let mut sum = 0.0;
            for start in (0..self.n_tokens()).step_by(block_rows) {
                let rows = start..(start + block_rows).min(self.n_tokens());
                block.resize(rows.len() * config.n_vocab, 0.0);
                model.logits_exact(&self.saved, rows.clone(), &mut block)?;
                sum += cross_entropy_in_place(
                    &mut block,
                    config.n_vocab,
                    &targets[rows.clone()],
                    normalizer,
                );
                if let Some(d_head_in) = d_head_in.as_deref_mut() {
                    model.head_backward(&block, rows, d_head_in)?;
                }
            }
            Ok(sum)
        })?;
        Ok((sum, n_scored))
    }

    fn backward_from_head(&mut self, inf: &Inference, d_head_in: &[f32]) -> Result<()> {
        let mut grads = LoraGrads::default();
        inf.install(|| {
            let plan = plan(&self.adapters, self.tokens.len());
            let batch = Batch {
                tokens: &self.tokens,
                seqs: &self.spans,
            };
            let mut caches: Vec<&mut KvCache> = self.caches.iter_mut().collect();
            inf.model().backward(
                &batch,
                &mut caches,
                &plan,
                &self.saved,
                d_head_in,
                &mut grads,
            )
        })?;
        for ((adapter_index, pair_index), (d_a, d_b)) in grads.grads {
            let mut pairs = self.adapters[adapter_index].pairs_mut();
            let pair = &mut pairs[pair_index];
            match &mut pair.grad {
                Some(grad) => {
                    add(&mut grad.lora_a, &d_a);
                    add(&mut grad.lora_b, &d_b);
                }
                None => {
                    pair.grad = Some(PairGrad {
                        lora_a: d_a,
                        lora_b: d_b,
                    })
                }
            }
        }
        Ok(())
    }
}

/// Every adapter on every row; adapter `i` of the plan is `adapters[i]`.
fn plan(adapters: &[Arc<LoraAdapter>], n_rows: usize) -> LoraPlan<'_> {
    if adapters.is_empty() {
        return LoraPlan::none();
    }
    LoraPlan::new(vec![(
        0..n_rows,
        adapters.iter().map(|a| a.as_ref()).collect(),
    )])
}

fn add(into: &mut [f32], values: &[f32]) {
    into.iter_mut().zip(values).for_each(|(a, b)| *a += b);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Model;

    /// The fused loss gives the same sum and dL/d(head input) whatever its block size.
    #[test]
    fn loss_blocks_do_not_change_the_result() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/tiny-llama/base-f32.gguf"
        );
        let inf =
            Inference::new(Arc::new(Model::open(path, true).unwrap()), None, Some(2)).unwrap();
        let sequences: [&[u32]; 2] = [&[1, 5, 9, 200, 31, 7, 7], &[1, 40, 3]];
        let graph = TrainGraph::forward(&inf, &sequences, &[], false).unwrap();
        let targets: Vec<i64> = vec![5, 9, 200, 31, 7, 7, -100, 40, 3, -100];
        let run = |block_rows| {
            let mut d = vec![0f32; graph.n_tokens() * inf.config().n_embd];
            let (sum, n) = graph
                .head_loss_in_blocks(&inf, &targets, None, Some(&mut d), block_rows)
                .unwrap();
            (sum, n, d)
        };
        let (sum, n, d) = run(graph.n_tokens());
        assert_eq!(n, 8);
        for block_rows in [1, 3, 4] {
            let (s, m, e) = run(block_rows);
            assert_eq!(m, n);
            assert!(
                (s - sum).abs() <= 1e-6 * sum.abs(),
                "{block_rows}: {s} vs {sum}"
            );
            let max = d.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in e.iter().zip(&d) {
                assert!((a - b).abs() <= 1e-5 * max, "{block_rows}: {a} vs {b}");
            }
        }
    }
}
