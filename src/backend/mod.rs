//! The boundary between the model's recipe (`transformer`) and the devices that compute it.
//! The recipe — forward and hand-written backward — is written once against `Backend`; two
//! implementations run it:
//! - `cpu`: lugh's own kernels on host slices (`ops/`), chosen per instruction set;
//! - `candle`: candle-core tensors on a `candle_core::Device` (CPU, CUDA, Metal).
//!
//! Rows of every activation are tokens of the batch, end to end; widths are named in the
//! recipe. Ops that accumulate say so (`+=`); the others overwrite their output.

pub mod candle;
pub mod cpu;

use std::any::Any;
use std::ops::Range;

use crate::error::Result;
use crate::lora::{LoraGrads, LoraPlan};
use crate::model::{Config, KvCache, Proj, SeqSpan};
use crate::ops::Numerics;

/// Which RMSNorm weight: a block's two, the two after its attention and FFN (Gemma), its
/// per-head ones of q and k (over `head_dim`), or the one before the output head. A norm's
/// rows are as wide as its weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Norm {
    Attn(usize),
    Ffn(usize),
    PostAttn(usize),
    PostFfn(usize),
    QHead(usize),
    KHead(usize),
    Output,
}

/// Why a backend may expect head and post norm weights: the recipe uses them only for
/// architectures whose weights have them.
pub(crate) const HEAD_NORMS: &str = "head norms are loaded for every architecture that uses them";
pub(crate) const POST_NORMS: &str = "post norms are loaded for every architecture that uses them";

/// The ops of the recipe, on one model's weights placed on one device.
pub trait Backend: Sync {
    /// An activation `[rows, width]`, row-major f32. `Default` is empty.
    type Tensor: Default + Send + Sync + 'static;
    /// cos and sin of each row's RoPE angles.
    type RopeTable: Default + Send + Sync + 'static;
    /// Adapter gradients accumulated by a backward, until `grads_to_host`.
    type Grads: Default + Send;

    fn config(&self) -> &Config;

    /// Whether `t` holds nothing (a recomputable activation that training did not keep).
    fn is_empty(t: &Self::Tensor) -> bool;

    /// `t = zeros[rows, width]`.
    fn zeros(&self, rows: usize, width: usize, t: &mut Self::Tensor) -> Result<()>;

    /// `dst = src`.
    fn copy(&self, src: &Self::Tensor, dst: &mut Self::Tensor) -> Result<()>;

    /// `x += y`.
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;

    /// `[rows, width]` from host values.
    fn upload(&self, values: &[f32], width: usize) -> Result<Self::Tensor>;

    /// The values on the host, row-major.
    fn download(&self, t: Self::Tensor) -> Result<Vec<f32>>;

    /// `x[t] = token_embd[tokens[t]]`.
    fn embed(&self, tokens: &[u32], x: &mut Self::Tensor) -> Result<()>;

    /// `out = x[rows]` (rows by index) of `x`, rows of `width` values.
    fn gather_rows(
        &self,
        x: &Self::Tensor,
        width: usize,
        rows: &[usize],
        out: &mut Self::Tensor,
    ) -> Result<()>;

    /// The rotation angles of every row of a batch of `seqs`.
    fn rope_table(&self, seqs: &[SeqSpan], table: &mut Self::RopeTable) -> Result<()>;

    /// Rotates each head of `x` (`[rows, n_heads * head_dim]`) in place with layer `il`'s
    /// rotation; `inverse` turns back (the backward).
    fn rope(
        &self,
        il: usize,
        x: &mut Self::Tensor,
        n_heads: usize,
        table: &Self::RopeTable,
        inverse: bool,
    ) -> Result<()>;

    /// `y = x / rms(x) ⊙ w` over rows as wide as the norm's weight, keeping each row's
    /// `1 / rms` for the backward.
    fn rms_norm(
        &self,
        norm: Norm,
        x: &Self::Tensor,
        y: &mut Self::Tensor,
        inv_rms: &mut Self::Tensor,
    ) -> Result<()>;

    /// `y = x · inv_rms ⊙ w`: a forward's normalisation recomputed.
    fn rms_norm_apply(
        &self,
        norm: Norm,
        x: &Self::Tensor,
        inv_rms: &Self::Tensor,
        y: &mut Self::Tensor,
    ) -> Result<()>;

    /// `dx += dL/dx` of `rms_norm` (the weight is frozen).
    fn rms_norm_backward(
        &self,
        norm: Norm,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        inv_rms: &Self::Tensor,
        dx: &mut Self::Tensor,
    ) -> Result<()>;

    /// `y_i = x W_iᵀ + b_i + Σ s B (A x)` for projections `projs` of layer `il` that share
    /// their input (q, k, v; gate, up), computed together where the device gains from it.
    #[allow(clippy::too_many_arguments)]
    fn linear<const N: usize>(
        &self,
        il: usize,
        projs: [Proj; N],
        x: &Self::Tensor,
        ys: [&mut Self::Tensor; N],
        lora: &LoraPlan,
        numerics: Numerics,
    ) -> Result<()>;

    /// Backward of `linear` for one projection: `dx += dy W + Σ s (dy B) A` where `dx` is
    /// given, and the trainable adapters' dA, dB into `grads`; `dy W` with the forward's
    /// `numerics`.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        il: usize,
        proj: Proj,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        lora: &LoraPlan,
        numerics: Numerics,
        dx: Option<&mut Self::Tensor>,
        grads: &mut Self::Grads,
    ) -> Result<()>;

    /// Stores each sequence's keys and values (`[rows, kv_dim]`, after RoPE) of layer `il`
    /// in its cache, then `out = softmax(q kᵀ / √d + causal) v` over everything cached, with
    /// grouped-query heads; `lse` (`[rows, n_head]`) keeps each score row's log-sum-exp.
    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        il: usize,
        seqs: &[SeqSpan],
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        caches: &mut [&mut KvCache],
        numerics: Numerics,
        out: &mut Self::Tensor,
        lse: &mut Self::Tensor,
    ) -> Result<()>;

    /// Backward of `attention` for whole sequences (`pos0 = 0`): overwrites `dq`, `dk`, `dv`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        il: usize,
        seqs: &[SeqSpan],
        caches: &[&mut KvCache],
        q: &Self::Tensor,
        out: &Self::Tensor,
        lse: &Self::Tensor,
        d_out: &Self::Tensor,
        dq: &mut Self::Tensor,
        dk: &mut Self::Tensor,
        dv: &mut Self::Tensor,
    ) -> Result<()>;

    /// `act = silu(gate) ⊙ up`.
    fn glu(&self, gate: &Self::Tensor, up: &Self::Tensor, act: &mut Self::Tensor) -> Result<()>;

    /// Overwrites `d_gate`, `d_up` with the backward of `glu`.
    fn glu_backward(
        &self,
        d_act: &Self::Tensor,
        gate: &Self::Tensor,
        up: &Self::Tensor,
        d_gate: &mut Self::Tensor,
        d_up: &mut Self::Tensor,
    ) -> Result<()>;

    /// Logits `x[rows] W_outᵀ` (`[rows.len(), n_vocab]`).
    fn logits(
        &self,
        x: &Self::Tensor,
        rows: Range<usize>,
        numerics: Numerics,
    ) -> Result<Self::Tensor>;

    /// Replaces `logits` by dL/dlogits of the cross-entropy against `targets` (-100:
    /// unscored) summed over scored rows and divided by `normalizer`; returns the summed loss.
    fn cross_entropy(
        &self,
        logits: &mut Self::Tensor,
        targets: &[i64],
        normalizer: usize,
    ) -> Result<f64>;

    /// `dx[rows] += d_logits W_out`: the head's backward, with the forward's `numerics`.
    fn logits_backward(
        &self,
        d_logits: &Self::Tensor,
        rows: Range<usize>,
        numerics: Numerics,
        dx: &mut Self::Tensor,
    ) -> Result<()>;

    /// The gradients on the host, keyed by (adapter in plan, pair).
    fn grads_to_host(&self, grads: Self::Grads) -> Result<LoraGrads>;
}

/// State kept between calls by whichever backend last used it (a memory pool can serve
/// inferences on different devices; each takes the type it needs).
#[derive(Default)]
pub struct AnyState(Option<Box<dyn Any + Send + Sync>>);

impl AnyState {
    /// The state as `T`, made anew if it held another backend's.
    pub fn get<T: Default + Send + Sync + 'static>(&mut self) -> &mut T {
        if !self.0.as_ref().is_some_and(|s| s.is::<T>()) {
            self.0 = Some(Box::new(T::default()));
        }
        self.0
            .as_mut()
            .and_then(|s| s.downcast_mut::<T>())
            .expect("set to a T above")
    }

    /// Takes the state out if it is a `T`.
    pub fn take<T: Send + Sync + 'static>(&mut self) -> Option<T> {
        match self.0.take()?.downcast::<T>() {
            Ok(state) => Some(*state),
            Err(other) => {
                self.0 = Some(other);
                None
            }
        }
    }

    /// Holds `state` from now on, and lends it.
    pub fn put<T: Send + Sync + 'static>(&mut self, state: T) -> &mut T {
        self.0 = Some(Box::new(state));
        self.0
            .as_mut()
            .and_then(|s| s.downcast_mut::<T>())
            .expect("just put")
    }

    /// The state if it is a `T`.
    pub fn peek<T: 'static>(&self) -> Option<&T> {
        self.0.as_ref()?.downcast_ref::<T>()
    }
}
