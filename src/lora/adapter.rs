//! A LoRA adapter: pairs of low-rank matrices attached to projection weights, with the alpha
//! and user scale that weigh them. Loaded adapters and trainable ones are the same type.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use candle_core::Tensor;

use super::{Narrow, NarrowCopy};
use crate::error::{Error, Result};
use crate::model::{Config, Proj, Slot, Target};

/// A float that threads can read and write without tearing (a forward reads `scale` once).
#[derive(Debug, Default)]
pub struct AtomicF32(AtomicU32);

impl AtomicF32 {
    pub fn new(v: f32) -> AtomicF32 {
        AtomicF32(AtomicU32::new(v.to_bits()))
    }
    pub fn get(&self) -> f32 {
        f32::from_bits(self.0.load(Ordering::Acquire))
    }
    pub fn set(&self, v: f32) {
        self.0.store(v.to_bits(), Ordering::Release)
    }
}

/// One adapted weight `W [n_out, n_in]`: `ΔW = B A` with `A [rank, n_in]`, `B [n_out, rank]`.
/// On a fused tensor (Phi-3's `attn_qkv`) the projections share A, each with its rows of B,
/// exactly as PEFT adapts `qkv_proj`.
#[derive(Debug, Clone)]
pub struct LoraPair {
    pub target: Target,
    /// The projections it applies to and their rows of B: all of the target's, or (created
    /// for some projections of a fused tensor) some; the other rows of B stay zero.
    pub parts: Vec<(Proj, Range<usize>)>,
    pub rank: usize,
    pub n_in: usize,
    pub n_out: usize,
    pub lora_a: Vec<f32>, // [rank, n_in]
    pub lora_b: Vec<f32>, // [n_out, rank]
    /// This pair's own alpha (PEFT `alpha_pattern`); `None` uses the adapter's.
    pub alpha: Option<f32>,
    /// Accumulated dL/dA and dL/dB, once a backward has run.
    pub grad: Option<PairGrad>,
    /// `lora_a` and `lora_b` in f16 or bf16 where that holds them exactly.
    pub narrow: NarrowCopy,
}

/// Which matrix of a pair: `A [rank, n_in]` or `B [n_out, rank]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Half {
    A,
    B,
}

#[derive(Debug, Clone)]
pub struct PairGrad {
    pub lora_a: Vec<f32>,
    pub lora_b: Vec<f32>,
}

impl LoraPair {
    pub fn name(&self) -> String {
        self.target.tensor_name()
    }

    /// The slots it applies to.
    pub fn slots(&self) -> impl Iterator<Item = Slot> + '_ {
        self.parts.iter().map(|&(proj, _)| Slot {
            layer: self.target.layer,
            proj,
        })
    }

    /// The rows of B that `proj` reads.
    pub fn b_rows(&self, proj: Proj) -> Option<Range<usize>> {
        self.parts
            .iter()
            .find(|(p, _)| *p == proj)
            .map(|(_, rows)| rows.clone())
    }

    /// `[rank, n_in]` for A, `[n_out, rank]` for B.
    pub fn shape(&self, half: Half) -> [usize; 2] {
        match half {
            Half::A => [self.rank, self.n_in],
            Half::B => [self.n_out, self.rank],
        }
    }

    pub fn values(&self, half: Half) -> &[f32] {
        match half {
            Half::A => &self.lora_a,
            Half::B => &self.lora_b,
        }
    }

    pub fn values_mut(&mut self, half: Half) -> &mut Vec<f32> {
        match half {
            Half::A => &mut self.lora_a,
            Half::B => &mut self.lora_b,
        }
    }

    /// A and B in the 16-bit format that holds all their values, if one does.
    pub fn narrow(&self) -> Option<&Narrow> {
        self.narrow.of(&self.lora_a, &self.lora_b)
    }

    pub fn grad(&self, half: Half) -> Option<&[f32]> {
        self.grad.as_ref().map(|g| match half {
            Half::A => g.lora_a.as_slice(),
            Half::B => g.lora_b.as_slice(),
        })
    }

    /// The values to update and their gradient, borrowed together.
    pub fn values_and_grad(&mut self, half: Half) -> (&mut [f32], Option<&[f32]>) {
        let grad = self.grad.as_ref().map(|g| match half {
            Half::A => g.lora_a.as_slice(),
            Half::B => g.lora_b.as_slice(),
        });
        let values = match half {
            Half::A => &mut self.lora_a,
            Half::B => &mut self.lora_b,
        };
        (values, grad)
    }

    pub fn grad_mut(&mut self, half: Half) -> Option<&mut Vec<f32>> {
        self.grad.as_mut().map(|g| match half {
            Half::A => &mut g.lora_a,
            Half::B => &mut g.lora_b,
        })
    }
}

/// Where an adapter came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    Gguf,
    SafeTensors,
    Trainable,
}

impl AdapterFormat {
    pub fn name(self) -> &'static str {
        match self {
            AdapterFormat::Gguf => "gguf",
            AdapterFormat::SafeTensors => "safetensors",
            AdapterFormat::Trainable => "trainable",
        }
    }
}

/// How alpha and rank turn into the factor on `B A x`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalingRule {
    /// `alpha / rank` (LoRA, Hu et al. 2021); an alpha of 0 means "no alpha": the factor is
    /// the user scale alone, as llama.cpp does for adapters without `adapter.lora.alpha`.
    AlphaOverRank,
    /// `alpha / sqrt(rank)` (rsLoRA, Kalajdzievski 2023; PEFT `use_rslora`).
    AlphaOverSqrtRank,
}

pub struct LoraAdapter {
    pub architecture: String,
    pub format: AdapterFormat,
    pub rule: ScalingRule,
    alpha: AtomicF32,
    scale: AtomicF32,
    by_slot: HashMap<Slot, usize>,
    pairs: RwLock<Vec<LoraPair>>,
    /// Copies of the pairs on candle devices, made on first use and dropped on any write.
    device_copies: Mutex<Vec<DeviceCopy>>,
}

/// The pairs (A, B) uploaded to one device, by pair index.
struct DeviceCopy {
    device: candle_core::Device,
    pairs: Vec<Option<(Tensor, Tensor)>>,
}

impl LoraAdapter {
    /// `pairs` must have distinct slots; their order is kept (save order, parameter order).
    pub fn new(
        architecture: String,
        format: AdapterFormat,
        rule: ScalingRule,
        alpha: f32,
        scale: f32,
        pairs: Vec<LoraPair>,
    ) -> LoraAdapter {
        let by_slot = pairs
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.slots().map(move |slot| (slot, i)))
            .collect();
        LoraAdapter {
            architecture,
            format,
            rule,
            alpha: AtomicF32::new(alpha),
            scale: AtomicF32::new(scale),
            by_slot,
            pairs: RwLock::new(pairs),
            device_copies: Mutex::new(Vec::new()),
        }
    }

    pub fn alpha(&self) -> f32 {
        self.alpha.get()
    }

    pub fn set_alpha(&self, alpha: f32) {
        self.alpha.set(alpha)
    }

    pub fn scale(&self) -> f32 {
        self.scale.get()
    }

    pub fn set_scale(&self, scale: f32) {
        self.scale.set(scale)
    }

    pub fn trainable(&self) -> bool {
        self.format == AdapterFormat::Trainable
    }

    pub fn n_pairs(&self) -> usize {
        self.pairs().len()
    }

    /// Index of the pair named `name` (`blk.3.attn_q.weight`).
    pub fn pair_named(&self, name: &str) -> Option<usize> {
        self.pairs().iter().position(|p| p.name() == name)
    }

    /// Index of the pair applied to `slot`.
    pub fn pair_index(&self, slot: Slot) -> Option<usize> {
        self.by_slot.get(&slot).copied()
    }

    /// Read access for a forward; a poisoned lock (a panic elsewhere) still yields the data.
    pub fn pairs(&self) -> RwLockReadGuard<'_, Vec<LoraPair>> {
        self.pairs.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Write access; device and narrow copies are dropped (the next forward makes them
    /// again from the new values).
    pub fn pairs_mut(&self) -> RwLockWriteGuard<'_, Vec<LoraPair>> {
        let mut guard = self.pairs.write().unwrap_or_else(|e| e.into_inner());
        guard.iter_mut().for_each(|pair| pair.narrow.forget());
        self.device_copies
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        guard
    }

    /// Pair `index` (`pair`, read under the caller's lock) as `A [rank, n_in]` and
    /// `B [n_out, rank]` f32 tensors on `device`, uploaded once per write of the adapter.
    pub(crate) fn pair_on(
        &self,
        index: usize,
        pair: &LoraPair,
        device: &candle_core::Device,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let mut copies = self
            .device_copies
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let copy = match copies.iter().position(|c| c.device.same_device(device)) {
            Some(i) => &mut copies[i],
            None => {
                copies.push(DeviceCopy {
                    device: device.clone(),
                    pairs: vec![None; self.n_pairs()],
                });
                copies.last_mut().expect("pushed")
            }
        };
        if let Some(tensors) = &copy.pairs[index] {
            return Ok(tensors.clone());
        }
        let a = Tensor::from_slice(&pair.lora_a, (pair.rank, pair.n_in), device)?;
        let b = Tensor::from_slice(&pair.lora_b, (pair.n_out, pair.rank), device)?;
        copy.pairs[index] = Some((a.clone(), b.clone()));
        Ok((a, b))
    }

    /// The factor on `B A x` for one pair: the single place where alpha, rank and the user
    /// scale combine. `alpha` and `scale` are passed in so that a forward uses one snapshot.
    pub fn scaling(rule: ScalingRule, alpha: f32, scale: f32, rank: usize) -> f32 {
        if alpha == 0.0 {
            return scale;
        }
        match rule {
            ScalingRule::AlphaOverRank => scale * alpha / rank as f32,
            ScalingRule::AlphaOverSqrtRank => scale * alpha / (rank as f32).sqrt(),
        }
    }

    /// The factor for `pair` with the adapter's current alpha and scale.
    pub fn pair_scaling(&self, pair: &LoraPair) -> f32 {
        Self::scaling(
            self.rule,
            pair.alpha.unwrap_or(self.alpha()),
            self.scale(),
            pair.rank,
        )
    }

    /// The rank shared by every pair, or `None` when ranks differ (PEFT `rank_pattern`).
    pub fn common_rank(&self) -> Option<usize> {
        let pairs = self.pairs();
        let first = pairs.first()?.rank;
        pairs.iter().all(|p| p.rank == first).then_some(first)
    }

    pub fn weight_names(&self) -> Vec<String> {
        self.pairs().iter().map(|p| p.name()).collect()
    }

    /// A trainable adapter with the same weights, alpha, scale and rule.
    pub fn trainable_copy(&self) -> LoraAdapter {
        let pairs = self
            .pairs()
            .iter()
            .map(|p| LoraPair {
                grad: None,
                ..p.clone()
            })
            .collect();
        LoraAdapter::new(
            self.architecture.clone(),
            AdapterFormat::Trainable,
            self.rule,
            self.alpha(),
            self.scale(),
            pairs,
        )
    }

    /// Checks that every pair fits the model of `config`: an adapter loaded for one model
    /// must not run on another of a different shape.
    pub fn check_fits(&self, config: &Config) -> Result<()> {
        for pair in self.pairs().iter() {
            if pair.target.layer >= config.n_layer {
                return Err(Error::BadAdapter {
                    what: format!(
                        "adapter tensor '{}' is for layer {}, but the model has {} layers",
                        pair.name(),
                        pair.target.layer,
                        config.n_layer
                    ),
                });
            }
            let [n_out, n_in] = pair.target.shape(config);
            let parts = pair.target.parts(config);
            if [pair.n_out, pair.n_in] != [n_out, n_in]
                || !pair.parts.iter().all(|part| parts.contains(part))
            {
                return Err(Error::ShapeMismatch {
                    name: pair.name(),
                    expected: vec![n_out, n_in],
                    got: vec![pair.n_out, pair.n_in],
                });
            }
        }
        Ok(())
    }

    /// Clears accumulated gradients.
    pub fn zero_grad(&self) {
        for pair in self.pairs_mut().iter_mut() {
            pair.grad = None;
        }
    }
}

impl std::fmt::Debug for LoraAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraAdapter")
            .field("format", &self.format)
            .field("alpha", &self.alpha())
            .field("scale", &self.scale())
            .field("n_pairs", &self.n_pairs())
            .finish()
    }
}

#[cfg(test)]
impl LoraPair {
    /// A pair on `proj` of layer 0 with factors `a [rank, n_in]` and `b [n_out, rank]`.
    pub(crate) fn of_layer_0(proj: Proj, rank: usize, a: Vec<f32>, b: Vec<f32>) -> LoraPair {
        let (n_in, n_out) = (a.len() / rank, b.len() / rank);
        LoraPair {
            target: Target {
                layer: 0,
                stored: crate::model::Stored::Proj(proj),
            },
            parts: vec![(proj, 0..n_out)],
            rank,
            n_in,
            n_out,
            lora_a: a,
            lora_b: b,
            alpha: None,
            grad: None,
            narrow: NarrowCopy::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scaling_follows_each_rule() {
        assert_eq!(
            LoraAdapter::scaling(ScalingRule::AlphaOverRank, 16.0, 0.5, 8),
            1.0
        );
        assert_eq!(
            LoraAdapter::scaling(ScalingRule::AlphaOverSqrtRank, 8.0, 1.0, 16),
            2.0
        );
        // llama.cpp: an adapter without alpha is weighed by the user scale alone.
        assert_eq!(
            LoraAdapter::scaling(ScalingRule::AlphaOverRank, 0.0, 0.7, 8),
            0.7
        );
    }
}
