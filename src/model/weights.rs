//! The model's weights: views into the GGUF mapping, found by their GGUF names and checked
//! against the hyper-parameters once, at open.

use std::ops::Range;

use super::config::{Config, Fused};
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, TensorInfo};
use crate::ops::quant::tensor_f32;
use crate::ops::Weight;

/// The seven projections of a block that carry adapters, in llama.cpp's naming.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proj {
    AttnQ,
    AttnK,
    AttnV,
    AttnOutput,
    FfnGate,
    FfnUp,
    FfnDown,
}

impl Proj {
    pub const ALL: [Proj; 7] = [
        Proj::AttnQ,
        Proj::AttnK,
        Proj::AttnV,
        Proj::AttnOutput,
        Proj::FfnGate,
        Proj::FfnUp,
        Proj::FfnDown,
    ];

    /// The GGUF name: `blk.{il}.{name}.weight`.
    pub fn name(self) -> &'static str {
        match self {
            Proj::AttnQ => "attn_q",
            Proj::AttnK => "attn_k",
            Proj::AttnV => "attn_v",
            Proj::AttnOutput => "attn_output",
            Proj::FfnGate => "ffn_gate",
            Proj::FfnUp => "ffn_up",
            Proj::FfnDown => "ffn_down",
        }
    }

    pub fn from_name(name: &str) -> Option<Proj> {
        Self::ALL.into_iter().find(|p| p.name() == name)
    }

    /// `[n_out, n_in]` of this projection.
    pub fn shape(self, config: &Config) -> [usize; 2] {
        match self {
            Proj::AttnQ => [config.q_dim(), config.n_embd],
            Proj::AttnK | Proj::AttnV => [config.kv_dim(), config.n_embd],
            Proj::AttnOutput => [config.n_embd, config.q_dim()],
            Proj::FfnGate | Proj::FfnUp => [config.n_ff, config.n_embd],
            Proj::FfnDown => [config.n_embd, config.n_ff],
        }
    }
}

/// A projection weight of one layer: the unit adapters attach to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    pub layer: usize,
    pub proj: Proj,
}

impl Slot {
    pub fn index(self) -> usize {
        self.layer * Proj::ALL.len() + self.proj as usize
    }

    pub fn tensor_name(self) -> String {
        format!("blk.{}.{}.weight", self.layer, self.proj.name())
    }

    /// Parses `blk.{il}.{proj}.weight`.
    pub fn parse(name: &str) -> Option<Slot> {
        let rest = name.strip_prefix("blk.")?.strip_suffix(".weight")?;
        let (layer, proj) = rest.split_once('.')?;
        Some(Slot {
            layer: layer.parse().ok()?,
            proj: Proj::from_name(proj)?,
        })
    }
}

/// How a base tensor that adapters attach to is stored: one projection, or several fused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stored {
    Proj(Proj),
    Fused(Fused),
}

/// A base tensor of one layer that an adapter pair adapts (its GGUF name is the pair's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Target {
    pub layer: usize,
    pub stored: Stored,
}

impl Target {
    /// The tensor that stores `slot` in a model of `config`.
    pub fn of(slot: Slot, config: &Config) -> Target {
        let stored = match config.fused_with(slot.proj) {
            Some(f) => Stored::Fused(f),
            None => Stored::Proj(slot.proj),
        };
        Target {
            layer: slot.layer,
            stored,
        }
    }

    /// `blk.{il}.{name}.weight`.
    pub fn tensor_name(self) -> String {
        let name = match self.stored {
            Stored::Proj(p) => p.name(),
            Stored::Fused(f) => f.name(),
        };
        format!("blk.{}.{name}.weight", self.layer)
    }

    /// The target named `name` in a model of `config` (`blk.3.attn_qkv.weight` where the file
    /// stores q, k and v fused; `ffn_up` names the fused gate and up where it holds both).
    pub fn parse(name: &str, config: &Config) -> Option<Target> {
        let rest = name.strip_prefix("blk.")?.strip_suffix(".weight")?;
        let (layer, tensor) = rest.split_once('.')?;
        let layer = layer.parse().ok()?;
        let stored = match config.fused.iter().find(|f| f.name() == tensor) {
            Some(&f) => Stored::Fused(f),
            None => {
                let proj = Proj::from_name(tensor)?;
                if config.fused_with(proj).is_some() {
                    return None;
                }
                Stored::Proj(proj)
            }
        };
        Some(Target { layer, stored })
    }

    /// `[n_out, n_in]` of the tensor.
    pub fn shape(self, config: &Config) -> [usize; 2] {
        match self.stored {
            Stored::Proj(p) => p.shape(config),
            Stored::Fused(f) => f.shape(config),
        }
    }

    /// The projections it stores and their rows.
    pub fn parts(self, config: &Config) -> Vec<(Proj, Range<usize>)> {
        match self.stored {
            Stored::Proj(p) => vec![(p, 0..p.shape(config)[0])],
            Stored::Fused(f) => f.parts(config),
        }
    }
}

pub struct Layer {
    pub attn_norm: Vec<f32>, // [n_embd]
    pub ffn_norm: Vec<f32>,  // [n_embd]
    /// Per-head RMSNorm weights of q and k, `[head_dim]` (Qwen3, Gemma 3).
    pub q_norm: Option<Vec<f32>>,
    pub k_norm: Option<Vec<f32>>,
    /// Norms of the attention and FFN outputs, `[n_embd]` (Gemma).
    pub post_attn_norm: Option<Vec<f32>>,
    pub post_ffn_norm: Option<Vec<f32>>,
    /// Indexed by `Proj`: attn_q [q_dim, n_embd], attn_k/v [kv_dim, n_embd],
    /// attn_output [n_embd, q_dim], ffn_gate/up [n_ff, n_embd], ffn_down [n_embd, n_ff].
    projections: Vec<Weight>,
    /// Optional biases (Qwen2 has q, k and v biases), indexed by `Proj`.
    biases: Vec<Option<Vec<f32>>>,
}

impl Layer {
    pub fn weight(&self, proj: Proj) -> &Weight {
        &self.projections[proj as usize]
    }

    pub fn bias(&self, proj: Proj) -> Option<&[f32]> {
        self.biases[proj as usize].as_deref()
    }
}

pub struct Weights {
    pub token_embd: Weight, // [n_vocab, n_embd]
    pub layers: Vec<Layer>,
    pub output_norm: Vec<f32>, // [n_embd]
    /// [n_vocab, n_embd]: `output.weight`, or the embedding itself when tied.
    pub output: Weight,
    /// Llama 3.1 RoPE frequency factors, `[n_rot / 2]`.
    pub rope_freqs: Option<Vec<f32>>,
    /// LongRoPE's (short, long) frequency factors, `[n_rot / 2]` each (Phi-3 128k).
    pub rope_long: Option<(Vec<f32>, Vec<f32>)>,
}

impl Weights {
    pub fn slot_weight(&self, slot: Slot) -> &Weight {
        self.layers[slot.layer].weight(slot.proj)
    }

    pub fn load(file: &GgufFile, config: &Config) -> Result<Weights> {
        let loader = Loader { file };
        let n_embd = config.n_embd;
        // n_layer comes from the metadata: reserve no more layers than the tensors can fill
        // (a missing layer is an error below, a huge reservation would abort).
        let mut layers = Vec::with_capacity(config.n_layer.min(file.tensors().len()));
        for il in 0..config.n_layer {
            let fused = config
                .fused
                .iter()
                .map(|&f| loader.fused(il, f, config).map(|w| (f, w)))
                .collect::<Result<Vec<_>>>()?;
            let mut projections = Vec::with_capacity(Proj::ALL.len());
            let mut biases = Vec::with_capacity(Proj::ALL.len());
            for proj in Proj::ALL {
                let slot = Slot { layer: il, proj };
                let [n_out, n_in] = proj.shape(config);
                let stored = fused.iter().find(|(f, _)| f.projections().contains(&proj));
                projections.push(match stored {
                    Some((f, weight)) => {
                        let (_, rows) = f
                            .parts(config)
                            .into_iter()
                            .find(|(p, _)| *p == proj)
                            .expect("a fused tensor's projection has its rows");
                        weight.rows(&slot.tensor_name(), rows)?
                    }
                    None => loader.weight(&slot.tensor_name(), n_out, n_in)?,
                });
                let bias_name = format!("blk.{il}.{}.bias", proj.name());
                biases.push(loader.optional_vector(&bias_name, n_out)?);
            }
            let head_norm = |name: &str| -> Result<Option<Vec<f32>>> {
                match config.arch.has_qk_norm() {
                    true => loader
                        .vector(&format!("blk.{il}.{name}.weight"), config.head_dim)
                        .map(Some),
                    false => Ok(None),
                }
            };
            let post_norm = |name: &str| -> Result<Option<Vec<f32>>> {
                match config.post_norms {
                    true => loader
                        .vector(&format!("blk.{il}.{name}.weight"), n_embd)
                        .map(Some),
                    false => Ok(None),
                }
            };
            layers.push(Layer {
                attn_norm: loader.vector(&format!("blk.{il}.attn_norm.weight"), n_embd)?,
                ffn_norm: loader.vector(&format!("blk.{il}.ffn_norm.weight"), n_embd)?,
                q_norm: head_norm("attn_q_norm")?,
                k_norm: head_norm("attn_k_norm")?,
                post_attn_norm: post_norm("post_attention_norm")?,
                post_ffn_norm: post_norm("post_ffw_norm")?,
                projections,
                biases,
            });
        }
        let token_embd = loader.weight("token_embd.weight", config.n_vocab, n_embd)?;
        let output = match file.tensor("output.weight") {
            Some(_) => loader.weight("output.weight", config.n_vocab, n_embd)?,
            None => token_embd.clone(),
        };
        Ok(Weights {
            output_norm: loader.vector("output_norm.weight", n_embd)?,
            rope_freqs: loader.optional_vector("rope_freqs.weight", config.n_rot / 2)?,
            rope_long: match (
                loader.optional_vector("rope_factors_short.weight", config.n_rot / 2)?,
                loader.optional_vector("rope_factors_long.weight", config.n_rot / 2)?,
            ) {
                (Some(short), Some(long)) => Some((short, long)),
                (None, None) => None,
                _ => {
                    return Err(Error::invalid(
                        "rope_factors",
                        "LongRoPE needs both rope_factors_short and rope_factors_long",
                    ))
                }
            },
            token_embd,
            layers,
            output,
        })
    }
}

struct Loader<'a> {
    file: &'a GgufFile,
}

impl Loader<'_> {
    fn info(&self, name: &str) -> Result<&TensorInfo> {
        self.file.tensor(name).ok_or_else(|| Error::TensorNotFound {
            name: name.to_string(),
        })
    }

    fn weight(&self, name: &str, n_out: usize, n_in: usize) -> Result<Weight> {
        let info = self.info(name)?;
        if info.shape != [n_out, n_in] {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: vec![n_out, n_in],
                got: info.shape.clone(),
            });
        }
        Weight::new(name, info.dtype, n_out, n_in, self.file.tensor_data(info))
    }

    /// Layer `il`'s fused tensor `f`; a bias on it is refused (no fused model lugh runs
    /// has one, and it would be silently lost).
    fn fused(&self, il: usize, f: Fused, config: &Config) -> Result<Weight> {
        let bias = format!("blk.{il}.{}.bias", f.name());
        if self.file.tensor(&bias).is_some() {
            return Err(Error::Unsupported {
                what: "tensor",
                feature: bias,
                hint: "lugh reads fused projections without biases",
            });
        }
        let [n_out, n_in] = f.shape(config);
        self.weight(&format!("blk.{il}.{}.weight", f.name()), n_out, n_in)
    }

    fn vector(&self, name: &str, n: usize) -> Result<Vec<f32>> {
        let info = self.info(name)?;
        if info.shape != [n] {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: vec![n],
                got: info.shape.clone(),
            });
        }
        Ok(tensor_f32(self.file, info))
    }

    fn optional_vector(&self, name: &str, n: usize) -> Result<Option<Vec<f32>>> {
        match self.file.tensor(name) {
            Some(_) => self.vector(name, n).map(Some),
            None => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_names_round_trip() {
        let slot = Slot {
            layer: 12,
            proj: Proj::FfnDown,
        };
        assert_eq!(slot.tensor_name(), "blk.12.ffn_down.weight");
        assert_eq!(Slot::parse("blk.12.ffn_down.weight"), Some(slot));
        assert_eq!(Slot::parse("blk.1.attn_norm.weight"), None);
        assert_eq!(Slot::parse("output.weight"), None);
    }
}
