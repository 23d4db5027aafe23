//! New adapters for training, initialised as PEFT does.

use rand::distr::{Distribution, Uniform};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::adapter::{AdapterFormat, LoraAdapter, LoraPair, ScalingRule};
use super::NarrowCopy;
use crate::error::{Error, Result};
use crate::model::{Model, Proj, Slot, Stored, Target};

pub const MAX_RANK: usize = 256;

/// The projection names `create` accepts, for error messages.
pub fn target_names() -> String {
    Proj::ALL.map(Proj::name).join(", ")
}

/// A trainable adapter on `targets` of every layer: A Kaiming-uniform with bound
/// `1/sqrt(n_in)` (PEFT's `kaiming_uniform_(a=sqrt(5))`), B zero, so that a new adapter
/// changes nothing. Pairs are ordered layer by layer, targets in the given order. Targets
/// that the model stores in one tensor (Phi-3: q, k, v in `attn_qkv`; gate and up in
/// `ffn_up`) get one pair on that tensor, as PEFT's `qkv_proj` / `gate_up_proj`: one A, and
/// B rows for the targets given.
pub fn create(
    model: &Model,
    rank: usize,
    alpha: f32,
    scale: f32,
    targets: &[Proj],
    seed: Option<u64>,
) -> Result<LoraAdapter> {
    let (config, _) = model.runnable()?;
    if !(1..=MAX_RANK).contains(&rank) {
        return Err(Error::invalid(
            "rank",
            format!("{rank} is outside 1..={MAX_RANK}"),
        ));
    }
    if targets.is_empty() {
        return Err(Error::invalid(
            "targets",
            format!("none given; choose among {}", target_names()),
        ));
    }
    for (i, t) in targets.iter().enumerate() {
        if targets[..i].contains(t) {
            return Err(Error::invalid(
                "targets",
                format!("'{}' is listed twice", t.name()),
            ));
        }
    }
    if !alpha.is_finite() {
        return Err(Error::invalid(
            "alpha",
            format!("{alpha} is not a finite number"),
        ));
    }
    let mut rng = match seed {
        Some(seed) => StdRng::seed_from_u64(seed),
        None => StdRng::from_os_rng(),
    };
    // One pair per base tensor: projections a file stores fused share one (and its A).
    let mut tensors: Vec<(Stored, Vec<Proj>)> = Vec::new();
    for &proj in targets {
        let stored = Target::of(Slot { layer: 0, proj }, config).stored;
        match tensors.iter_mut().find(|(s, _)| *s == stored) {
            Some((_, projs)) => projs.push(proj),
            None => tensors.push((stored, vec![proj])),
        }
    }
    let mut pairs = Vec::with_capacity(config.n_layer * tensors.len());
    for layer in 0..config.n_layer {
        for (stored, projs) in &tensors {
            let target = Target {
                layer,
                stored: *stored,
            };
            let [n_out, n_in] = target.shape(config);
            let bound = 1.0 / (n_in as f32).sqrt();
            let uniform = Uniform::new_inclusive(-bound, bound).expect("a finite, ordered range");
            pairs.push(LoraPair {
                target,
                parts: target
                    .parts(config)
                    .into_iter()
                    .filter(|(p, _)| projs.contains(p))
                    .collect(),
                rank,
                n_in,
                n_out,
                lora_a: (0..rank * n_in).map(|_| uniform.sample(&mut rng)).collect(),
                lora_b: vec![0.0; n_out * rank],
                alpha: None,
                grad: None,
                narrow: NarrowCopy::default(),
            });
        }
    }
    Ok(LoraAdapter::new(
        config.arch.name().to_string(),
        AdapterFormat::Trainable,
        ScalingRule::AlphaOverRank,
        alpha,
        scale,
        pairs,
    ))
}
