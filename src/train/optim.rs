//! Optimizers over adapter parameters, with PyTorch's update rules (`torch.optim.AdamW`,
//! `torch.optim.SGD`, `clip_grad_norm_`, `clip_grad_value_`). Updates happen in place, under
//! the adapter's write lock.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::lora::{Half, LoraAdapter};

/// One trainable matrix: half `half` of pair `pair` of a trainable adapter.
#[derive(Clone)]
pub struct Param {
    pub adapter: Arc<LoraAdapter>,
    pub pair: usize,
    pub half: Half,
}

impl Param {
    /// Every parameter of a trainable adapter: A0, B0, A1, B1, ...
    pub fn all_of(adapter: &Arc<LoraAdapter>) -> Result<Vec<Param>> {
        require_trainable(adapter)?;
        Ok((0..adapter.n_pairs())
            .flat_map(|pair| {
                [Half::A, Half::B].map(|half| Param {
                    adapter: Arc::clone(adapter),
                    pair,
                    half,
                })
            })
            .collect())
    }

    /// `<weight>.lora_a` / `.lora_b`.
    pub fn name(&self) -> String {
        let suffix = match self.half {
            Half::A => "lora_a",
            Half::B => "lora_b",
        };
        format!("{}.{suffix}", self.adapter.pairs()[self.pair].name())
    }

    pub fn shape(&self) -> [usize; 2] {
        self.adapter.pairs()[self.pair].shape(self.half)
    }

    pub fn data(&self) -> Vec<f32> {
        self.adapter.pairs()[self.pair].values(self.half).to_vec()
    }

    pub fn set_data(&self, values: &[f32]) -> Result<()> {
        let mut pairs = self.adapter.pairs_mut();
        let pair = &mut pairs[self.pair];
        let shape = pair.shape(self.half);
        let data = pair.values_mut(self.half);
        if values.len() != data.len() {
            return Err(Error::ShapeMismatch {
                name: self.name_of(pair.name()),
                expected: shape.to_vec(),
                got: vec![values.len()],
            });
        }
        data.copy_from_slice(values);
        Ok(())
    }

    fn name_of(&self, weight: String) -> String {
        match self.half {
            Half::A => format!("{weight}.lora_a"),
            Half::B => format!("{weight}.lora_b"),
        }
    }

    pub fn grad(&self) -> Option<Vec<f32>> {
        self.adapter.pairs()[self.pair]
            .grad(self.half)
            .map(<[f32]>::to_vec)
    }

    /// Zeroes this matrix's gradient (the pair's other half keeps its own).
    pub fn zero_grad(&self) {
        if let Some(grad) = self.adapter.pairs_mut()[self.pair].grad_mut(self.half) {
            grad.fill(0.0);
        }
    }

    /// Runs `f(data, grad)` under the write lock; skipped (false) when there is no gradient.
    fn update(&self, f: impl FnOnce(&mut [f32], &[f32])) -> bool {
        let mut pairs = self.adapter.pairs_mut();
        match pairs[self.pair].values_and_grad(self.half) {
            (values, Some(grad)) => {
                f(values, grad);
                true
            }
            (_, None) => false,
        }
    }

    fn with_grad_mut(&self, f: impl FnOnce(&mut [f32])) {
        if let Some(grad) = self.adapter.pairs_mut()[self.pair].grad_mut(self.half) {
            f(grad)
        }
    }
}

pub fn require_trainable(adapter: &LoraAdapter) -> Result<()> {
    if adapter.trainable() {
        Ok(())
    } else {
        Err(Error::invalid(
            "adapter",
            format!(
                "this {} adapter is not trainable: use lora.trainable_copy() to train it further",
                adapter.format.name()
            ),
        ))
    }
}

/// What every optimizer shares: parameters, a learning rate, a step.
pub trait Optimizer: Send + Sync {
    fn params(&self) -> &[Param];
    fn lr(&self) -> f32;
    fn set_lr_unchecked(&mut self, lr: f32);
    /// One update of every parameter that has a gradient.
    fn step(&mut self);

    fn set_lr(&mut self, lr: f32) -> Result<()> {
        check_hyper("lr", lr)?;
        self.set_lr_unchecked(lr);
        Ok(())
    }

    /// Clears the gradients of every adapter the parameters belong to.
    fn zero_grad(&self) {
        let mut seen: Vec<*const LoraAdapter> = Vec::new();
        for p in self.params() {
            let adapter = Arc::as_ptr(&p.adapter);
            if !seen.contains(&adapter) {
                seen.push(adapter);
                p.adapter.zero_grad();
            }
        }
    }
}

/// AdamW's per-parameter state.
#[derive(Debug, Clone, Default)]
pub struct AdamState {
    pub step: u64,
    pub exp_avg: Vec<f32>,
    pub exp_avg_sq: Vec<f32>,
}

/// AdamW (Loshchilov & Hutter, 2019) exactly as `torch.optim.AdamW`:
/// `p -= lr·wd·p;  m = β1 m + (1−β1) g;  v = β2 v + (1−β2) g²;
///  p -= lr/(1−β1^t) · m / (sqrt(v)/sqrt(1−β2^t) + eps)`.
pub struct AdamW {
    pub params: Vec<Param>,
    pub lr: f32,
    pub betas: (f32, f32),
    pub eps: f32,
    pub weight_decay: f32,
    pub state: Vec<AdamState>,
}

impl AdamW {
    pub fn new(
        params: Vec<Param>,
        lr: f32,
        betas: (f32, f32),
        eps: f32,
        weight_decay: f32,
    ) -> Result<AdamW> {
        check_hyper("lr", lr)?;
        check_hyper("eps", eps)?;
        check_hyper("weight_decay", weight_decay)?;
        for (name, beta) in [("betas[0]", betas.0), ("betas[1]", betas.1)] {
            if !(0.0..1.0).contains(&beta) {
                return Err(Error::invalid(
                    "betas",
                    format!("{name} = {beta} is outside [0, 1)"),
                ));
            }
        }
        let state = vec![AdamState::default(); params.len()];
        Ok(AdamW {
            params,
            lr,
            betas,
            eps,
            weight_decay,
            state,
        })
    }
}

impl Optimizer for AdamW {
    fn params(&self) -> &[Param] {
        &self.params
    }

    fn lr(&self) -> f32 {
        self.lr
    }

    fn set_lr_unchecked(&mut self, lr: f32) {
        self.lr = lr;
    }

    fn step(&mut self) {
        let (lr, (b1, b2), eps, wd) = (self.lr, self.betas, self.eps, self.weight_decay);
        for (param, state) in self.params.iter().zip(self.state.iter_mut()) {
            param.update(|p, g| {
                if state.exp_avg.len() != p.len() {
                    state.exp_avg = vec![0.0; p.len()];
                    state.exp_avg_sq = vec![0.0; p.len()];
                }
                state.step += 1;
                let t = state.step as i32;
                let bias1 = 1.0 - (b1 as f64).powi(t);
                let bias2_sqrt = (1.0 - (b2 as f64).powi(t)).sqrt();
                let step_size = (lr as f64 / bias1) as f32;
                let decay = 1.0 - lr * wd;
                for (((p, &g), m), v) in p
                    .iter_mut()
                    .zip(g)
                    .zip(state.exp_avg.iter_mut())
                    .zip(state.exp_avg_sq.iter_mut())
                {
                    *p *= decay;
                    *m = b1 * *m + (1.0 - b1) * g;
                    *v = b2 * *v + (1.0 - b2) * g * g;
                    let denom = (v.sqrt() as f64 / bias2_sqrt) as f32 + eps;
                    *p -= step_size * *m / denom;
                }
            });
        }
    }
}

/// SGD as `torch.optim.SGD` (dampening 0): `g += wd·p;  b = μ b + g (b = g at first);
/// g = g + μ b (Nesterov) or b;  p -= lr·g`.
pub struct Sgd {
    pub params: Vec<Param>,
    pub lr: f32,
    pub momentum: f32,
    pub nesterov: bool,
    pub weight_decay: f32,
    pub buffers: Vec<Option<Vec<f32>>>,
}

impl Sgd {
    pub fn new(
        params: Vec<Param>,
        lr: f32,
        momentum: f32,
        nesterov: bool,
        weight_decay: f32,
    ) -> Result<Sgd> {
        check_hyper("lr", lr)?;
        check_hyper("momentum", momentum)?;
        check_hyper("weight_decay", weight_decay)?;
        if nesterov && momentum == 0.0 {
            return Err(Error::invalid(
                "nesterov",
                "Nesterov momentum needs momentum > 0",
            ));
        }
        let buffers = vec![None; params.len()];
        Ok(Sgd {
            params,
            lr,
            momentum,
            nesterov,
            weight_decay,
            buffers,
        })
    }
}

impl Optimizer for Sgd {
    fn params(&self) -> &[Param] {
        &self.params
    }

    fn lr(&self) -> f32 {
        self.lr
    }

    fn set_lr_unchecked(&mut self, lr: f32) {
        self.lr = lr;
    }

    fn step(&mut self) {
        let (lr, mu, wd, nesterov) = (self.lr, self.momentum, self.weight_decay, self.nesterov);
        for (param, buffer) in self.params.iter().zip(self.buffers.iter_mut()) {
            param.update(|p, g| {
                let mut d: Vec<f32> = g.iter().zip(p.iter()).map(|(g, p)| g + wd * p).collect();
                if mu != 0.0 {
                    let b = match buffer {
                        Some(b) => {
                            b.iter_mut().zip(&d).for_each(|(b, d)| *b = mu * *b + d);
                            b
                        }
                        None => buffer.insert(d.clone()),
                    };
                    if nesterov {
                        d.iter_mut().zip(b.iter()).for_each(|(d, b)| *d += mu * b);
                    } else {
                        d.copy_from_slice(b);
                    }
                }
                p.iter_mut().zip(&d).for_each(|(p, d)| *p -= lr * d);
            });
        }
    }
}

fn check_hyper(name: &'static str, value: f32) -> Result<()> {
    if value.is_finite() && value >= 0.0 {
        Ok(())
    } else {
        Err(Error::invalid(
            name,
            format!("{value} must be a finite number >= 0"),
        ))
    }
}

/// Scales gradients so that their joint L2 norm is at most `max_norm`; returns the norm
/// before clipping (`torch.nn.utils.clip_grad_norm_`).
pub fn clip_grad_norm(params: &[Param], max_norm: f32) -> f32 {
    let total: f64 = params
        .iter()
        .filter_map(Param::grad)
        .map(|g| g.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>())
        .sum::<f64>()
        .sqrt();
    let coef = (max_norm as f64 / (total + 1e-6)).min(1.0) as f32;
    if coef < 1.0 {
        for p in params {
            p.with_grad_mut(|g| g.iter_mut().for_each(|v| *v *= coef));
        }
    }
    total as f32
}

/// Clamps every gradient element to `[-max_value, max_value]`.
pub fn clip_grad_value(params: &[Param], max_value: f32) {
    for p in params {
        p.with_grad_mut(|g| {
            g.iter_mut()
                .for_each(|v| *v = v.clamp(-max_value, max_value))
        });
    }
}
