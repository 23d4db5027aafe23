//! A training forward that keeps its activations, and the backward that walks them back, on
//! the inference's backend.

use std::ops::Range;
use std::sync::{Arc, PoisonError};

use crate::backend::{AnyState, Backend};
use crate::error::{Error, Result};
use crate::infer::{with_backend, Inference, SpareActivations};
use crate::lora::{LoraAdapter, LoraGrads, LoraPlan, PairGrad};
use crate::model::{KvCache, SeqSpan};
use crate::ops::activation::softcap_backward;
use crate::ops::loss::count_scored;
use crate::ops::Numerics;
use crate::transformer::{self, Batch, Saved};

/// Logits materialised at a time by the fused loss: 128 MiB (1024 rows of a 32k vocabulary),
/// whatever the batch. Each block is one product with the whole output head, which runs at
/// full speed only in large blocks: per thread 209 GFLOP/s at 1024 rows, 140 at 256 rows.
const LOSS_BLOCK_VALUES: usize = 32 << 20;

/// The arithmetic of a training forward and its backward.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// Exact f32 math on the dequantized weights: gradients equal PyTorch's in f32.
    #[default]
    F32,
    /// Mixed precision, as PyTorch's bf16 autocast: the frozen weights' products (forward,
    /// and `dy W` in the backward) on bf16-rounded operands with f32 sums; attention, the
    /// LoRA terms, norms, loss and gradients in f32.
    Bf16,
}

impl Precision {
    fn numerics(self) -> Numerics {
        match self {
            Precision::F32 => Numerics::Exact,
            Precision::Bf16 => Numerics::Bf16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = Error;

    fn from_str(s: &str) -> Result<Precision> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(Error::invalid(
                "precision",
                format!("{s:?}: use \"f32\" (exact) or \"bf16\" (mixed)"),
            )),
        }
    }
}

/// What a training forward kept: the batch, the activations (`Saved` of the backend's
/// tensors), each sequence's keys and values, and the adapters it ran with.
pub struct TrainGraph {
    tokens: Vec<u32>,
    spans: Vec<SeqSpan>,
    caches: Vec<KvCache>,
    saved: AnyState,
    adapters: Vec<Arc<LoraAdapter>>,
    /// Where `saved` goes when this graph is dropped.
    spare: SpareActivations,
}

impl Drop for TrainGraph {
    fn drop(&mut self) {
        let mut slot = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        *slot = std::mem::take(&mut self.saved);
    }
}

impl TrainGraph {
    /// Runs `sequences` (each from position 0, rows end to end) with `adapters`, in
    /// `precision`. With `checkpoint`, keeps only each block's input and recomputes the rest
    /// during the backward.
    pub fn forward(
        inf: &Inference,
        sequences: &[&[u32]],
        adapters: &[Arc<LoraAdapter>],
        checkpoint: bool,
        precision: Precision,
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
            // Exact gradients need the exact keys and values, whatever the inference's
            // cache type.
            caches.push(KvCache::for_training(config, tokens.len(), inf.device()));
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
        let saved = std::mem::take(&mut *spare.lock().unwrap_or_else(PoisonError::into_inner));
        let mut graph = TrainGraph {
            tokens: sequences.concat(),
            spans,
            caches,
            saved,
            adapters: unique,
            spare,
        };
        let numerics = precision.numerics();
        inf.install(|| with_backend!(inf, b => graph.forward_on(b, checkpoint, numerics)))?;
        Ok(graph)
    }

    fn forward_on<B: Backend>(
        &mut self,
        b: &B,
        checkpoint: bool,
        numerics: Numerics,
    ) -> Result<()> {
        // A checkpointed graph keeps only block inputs: reusing a full one would keep the rest.
        let saved = self
            .saved
            .take::<Saved<B::Tensor>>()
            .filter(|saved| saved.checkpoint == checkpoint)
            .unwrap_or_else(|| Saved::new(checkpoint, numerics));
        let saved = self.saved.put(saved);
        saved.numerics = numerics;
        let plan = plan(&self.adapters, self.tokens.len());
        let batch = Batch {
            tokens: &self.tokens,
            seqs: &self.spans,
        };
        let mut caches: Vec<&mut KvCache> = self.caches.iter_mut().collect();
        transformer::forward_train(b, &batch, &mut caches, &plan, saved)
    }

    pub fn n_tokens(&self) -> usize {
        self.tokens.len()
    }

    /// Every row's exact logits, `[n_tokens, n_vocab]`.
    pub fn logits(&self, inf: &Inference) -> Result<Vec<f32>> {
        inf.install(|| {
            with_backend!(inf, b => {
                let logits = transformer::logits_train(b, saved_in(b, &self.saved)?, 0..self.n_tokens())?;
                b.download(logits)
            })
        })
    }

    /// Back-propagates dL/dlogits (`[n_tokens, n_vocab]`) and adds dL/dA, dL/dB to each
    /// trainable adapter's gradients (they accumulate until `zero_grad`).
    pub fn backward(mut self, inf: &Inference, d_logits: &[f32]) -> Result<()> {
        let (n_vocab, n_embd) = (inf.config().n_vocab, inf.config().n_embd);
        // Through the logits' soft-cap (Gemma 2): dL/draw = dL/dy · (1 − (y / c)²).
        let through_cap;
        let d_logits = match inf.config().final_softcap {
            Some(cap) => {
                let mut d = d_logits.to_vec();
                softcap_backward(&mut d, &self.logits(inf)?, cap);
                through_cap = d;
                &through_cap
            }
            None => d_logits,
        };
        let grads = inf.install(|| {
            with_backend!(inf, b => {
                let d_logits = b.upload(d_logits, n_vocab)?;
                let mut d_head_in = Default::default();
                b.zeros(self.n_tokens(), n_embd, &mut d_head_in)?;
                let numerics = saved_in(b, &self.saved)?.numerics;
                b.logits_backward(&d_logits, 0..self.n_tokens(), numerics, &mut d_head_in)?;
                self.backward_on(b, &d_head_in)
            })
        })?;
        self.add_grads(grads);
        Ok(())
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
        let n_embd = inf.config().n_embd;
        let (loss, grads) = inf.install(|| {
            with_backend!(inf, b => {
                let mut d_head_in = Default::default();
                b.zeros(self.n_tokens(), n_embd, &mut d_head_in)?;
                let loss = self.head_loss(b, targets, normalizer, Some(&mut d_head_in))?;
                Ok::<_, Error>((loss, self.backward_on(b, &d_head_in)?))
            })
        })?;
        self.add_grads(grads);
        Ok(loss)
    }

    /// (summed cross-entropy, scored rows) without a backward.
    pub fn loss(&self, inf: &Inference, targets: &[i64]) -> Result<(f64, usize)> {
        inf.install(|| with_backend!(inf, b => self.head_loss(b, targets, None, None)))
    }

    fn head_loss<B: Backend>(
        &self,
        b: &B,
        targets: &[i64],
        normalizer: Option<usize>,
        d_head_in: Option<&mut B::Tensor>,
    ) -> Result<(f64, usize)> {
        let block_rows = (LOSS_BLOCK_VALUES / b.config().n_vocab).max(1);
        self.head_loss_in_blocks(b, targets, normalizer, d_head_in, block_rows)
    }

    /// `head_loss` with logits materialised `block_rows` rows at a time.
    fn head_loss_in_blocks<B: Backend>(
        &self,
        b: &B,
        targets: &[i64],
        normalizer: Option<usize>,
        mut d_head_in: Option<&mut B::Tensor>,
        block_rows: usize,
    ) -> Result<(f64, usize)> {
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
        let n_scored = count_scored(targets, b.config().n_vocab)?;
        let normalizer = normalizer.unwrap_or(n_scored);
        let saved = saved_in(b, &self.saved)?;
        let mut sum = 0.0;
        for start in (0..self.n_tokens()).step_by(block_rows) {
            let rows: Range<usize> = start..(start + block_rows).min(self.n_tokens());
            let mut block = transformer::logits_train(b, saved, rows.clone())?;
            sum += b.cross_entropy(&mut block, &targets[rows.clone()], normalizer)?;
            if let Some(d_head_in) = d_head_in.as_deref_mut() {
                b.logits_backward(&block, rows, saved.numerics, d_head_in)?;
            }
        }
        Ok((sum, n_scored))
    }

    fn backward_on<B: Backend>(&mut self, b: &B, d_head_in: &B::Tensor) -> Result<LoraGrads> {
        let mut grads = B::Grads::default();
        let plan = plan(&self.adapters, self.tokens.len());
        let batch = Batch {
            tokens: &self.tokens,
            seqs: &self.spans,
        };
        let saved = saved_in(b, &self.saved)?;
        let mut caches: Vec<&mut KvCache> = self.caches.iter_mut().collect();
        transformer::backward(b, &batch, &mut caches, &plan, saved, d_head_in, &mut grads)?;
        b.grads_to_host(grads)
    }

    fn add_grads(&self, grads: LoraGrads) {
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
    }
}

/// The activations a forward on `b` kept in `state`.
fn saved_in<'s, B: Backend>(_b: &B, state: &'s AnyState) -> Result<&'s Saved<B::Tensor>> {
    state
        .peek::<Saved<B::Tensor>>()
        .ok_or_else(|| Error::invalid("graph", "its activations were made on another device"))
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
    use crate::backend::cpu::CpuBackend;
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
        let graph = TrainGraph::forward(&inf, &sequences, &[], false, Precision::F32).unwrap();
        let targets: Vec<i64> = vec![5, 9, 200, 31, 7, 7, -100, 40, 3, -100];
        let b = CpuBackend::new(inf.model(), inf.rope()).unwrap();
        let run = |block_rows| {
            let mut d = vec![0f32; graph.n_tokens() * inf.config().n_embd];
            let (sum, n) = inf
                .install(|| graph.head_loss_in_blocks(&b, &targets, None, Some(&mut d), block_rows))
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
