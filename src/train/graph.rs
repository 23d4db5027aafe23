//! A training forward that keeps its activations, and the backward that walks them back.

use std::sync::Arc;

use crate::error::Result;
use crate::infer::Inference;
use crate::lora::{LoraAdapter, LoraGrads, LoraPlan, PairGrad};
use crate::model::{Batch, KvCache, Saved, SeqSpan, Workspace};

/// What a training forward kept: the batch, every block's activations, each sequence's keys
/// and values, and the adapters it ran with.
pub struct TrainGraph {
    tokens: Vec<u32>,
    spans: Vec<SeqSpan>,
    caches: Vec<KvCache>,
    saved: Saved,
    adapters: Vec<Arc<LoraAdapter>>,
}

impl TrainGraph {
    /// Runs `sequences` (each from position 0, rows end to end) in exact f32 math with
    /// `adapters`, returning the graph and logits `[n_tokens, n_vocab]`.
    pub fn forward(
        inf: &Inference,
        sequences: &[&[u32]],
        adapters: &[Arc<LoraAdapter>],
    ) -> Result<(TrainGraph, Vec<f32>)> {
        let config = inf.config();
        let mut spans = Vec::with_capacity(sequences.len());
        let mut caches = Vec::with_capacity(sequences.len());
        let mut row = 0;
        for tokens in sequences {
            inf.check_tokens(tokens)?;
            let cache = inf.create_kv_cache(Some(tokens.len()));
            cache.check_room(tokens.len())?;
            if tokens.len() > inf.n_ctx() {
                inf.create_kv_cache(None).check_room(tokens.len())?;
            }
            spans.push(SeqSpan {
                rows: row..row + tokens.len(),
                pos0: 0,
            });
            caches.push(cache);
            row += tokens.len();
        }
        let mut unique: Vec<Arc<LoraAdapter>> = Vec::new();
        for adapter in adapters {
            adapter.check_fits(config)?;
            if !unique.iter().any(|u| Arc::ptr_eq(u, adapter)) {
                unique.push(Arc::clone(adapter));
            }
        }
        let mut graph = TrainGraph {
            tokens: sequences.concat(),
            spans,
            caches,
            saved: Saved::default(),
            adapters: unique,
        };
        let logits = inf.install(|| {
            let plan = plan(&graph.adapters, graph.tokens.len());
            let batch = Batch {
                tokens: &graph.tokens,
                seqs: &graph.spans,
            };
            let mut caches: Vec<&mut KvCache> = graph.caches.iter_mut().collect();
            inf.model().forward_train(&batch, &mut caches, &plan, &mut Workspace::default(), &mut graph.saved)
        })?;
        Ok((graph, logits))
    }

    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Back-propagates dL/dlogits and adds dL/dA, dL/dB to each trainable adapter's
    /// gradients (they accumulate until `zero_grad`).
    pub fn backward(&self, inf: &Inference, d_logits: &[f32]) -> Result<()> {
        let mut grads = LoraGrads::default();
        inf.install(|| {
            let plan = plan(&self.adapters, self.tokens.len());
            let batch = Batch {
                tokens: &self.tokens,
                seqs: &self.spans,
            };
            let caches: Vec<&KvCache> = self.caches.iter().collect();
            inf.model().backward(&batch, &caches, &plan, &self.saved, d_logits, &mut grads)
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
    LoraPlan::new(vec![(0..n_rows, adapters.iter().map(|a| a.as_ref()).collect())])
}

fn add(into: &mut [f32], values: &[f32]) {
    into.iter_mut().zip(values).for_each(|(a, b)| *a += b);
}
