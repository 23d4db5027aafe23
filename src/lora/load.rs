//! Loading an adapter from any supported source, and the checks every source shares.

use std::collections::BTreeMap;
use std::path::Path;

use super::adapter::{AdapterFormat, Half, LoraAdapter, LoraPair, ScalingRule};
use super::{gguf_adapter, peft, NarrowCopy};
use crate::error::{Error, Result, ResultExt};
use crate::gguf::not_a_regular_file;
use crate::model::{Model, Target};

/// An adapter and the warnings its loading produced (e.g. a PEFT file without config).
pub struct Loaded {
    pub adapter: LoraAdapter,
    pub warnings: Vec<String>,
}

/// Loads `path` for `model`. The format comes from the path: `*.gguf` (llama.cpp),
/// `*.safetensors` (PEFT; `adapter_config.json` beside it) or a PEFT directory.
pub fn load(path: &Path, model: &Model, scale: f32) -> Result<Loaded> {
    let io = |e| Error::io(path, e);
    let meta = std::fs::metadata(path).map_err(io)?;
    let loaded = if meta.is_dir() {
        peft::load_dir(path, model, scale)
    } else if !meta.is_file() {
        return Err(not_a_regular_file(path, "adapter"));
    } else {
        match path.extension().and_then(|e| e.to_str()) {
            Some("gguf") => gguf_adapter::load(path, model, scale),
            Some("safetensors") => peft::load_file(path, model, scale),
            _ => Err(Error::invalid(
                "adapter",
                "the format comes from the path: a .gguf file, a .safetensors file or a PEFT directory",
            )),
        }
    };
    loaded.in_file(path)
}

/// One A/B pair as read from a file, before it is checked against the model.
pub struct RawPair {
    pub lora_a: Vec<f32>,    // [rank, n_in]
    pub a_shape: [usize; 2], // as stored
    pub lora_b: Vec<f32>,    // [n_out, rank]
    pub b_shape: [usize; 2], // as stored
    pub alpha: Option<f32>,
}

/// Values and stored shape of one matrix.
type Matrix = (Vec<f32>, [usize; 2]);

/// A/B halves collected by base tensor name, so that a missing half can be named.
#[derive(Default)]
pub struct PairCollector {
    halves: BTreeMap<String, (Option<Matrix>, Option<Matrix>)>,
}

impl PairCollector {
    pub fn add(
        &mut self,
        base_name: &str,
        half: Half,
        values: Vec<f32>,
        shape: [usize; 2],
    ) -> Result<()> {
        let entry = self.halves.entry(base_name.to_string()).or_default();
        let slot = match half {
            Half::A => &mut entry.0,
            Half::B => &mut entry.1,
        };
        if slot.replace((values, shape)).is_some() {
            return Err(Error::BadAdapter {
                what: format!("adapter has two lora_{half:?} tensors for '{base_name}'")
                    .to_lowercase(),
            });
        }
        Ok(())
    }

    /// Pairs by base tensor name; an error names a pair missing a half.
    pub fn finish(self, alpha_of: impl Fn(&str) -> Option<f32>) -> Result<Vec<(String, RawPair)>> {
        self.halves
            .into_iter()
            .map(|(name, halves)| match halves {
                (Some((lora_a, a_shape)), Some((lora_b, b_shape))) => {
                    let alpha = alpha_of(&name);
                    Ok((
                        name,
                        RawPair {
                            lora_a,
                            a_shape,
                            lora_b,
                            b_shape,
                            alpha,
                        },
                    ))
                }
                (a, _) => Err(Error::BadAdapter {
                    what: format!(
                        "adapter tensor pair for '{name}' has lora_{} but no lora_{}",
                        if a.is_some() { "a" } else { "b" },
                        if a.is_some() { "b" } else { "a" },
                    ),
                }),
            })
            .collect()
    }
}

/// Checks raw pairs against the model (names, shapes, ranks) and builds the adapter.
/// Pairs are ordered layer by layer, projections in model order.
pub fn assemble(
    model: &Model,
    architecture: &str,
    format: AdapterFormat,
    rule: ScalingRule,
    alpha: f32,
    scale: f32,
    raw: Vec<(String, RawPair)>,
) -> Result<LoraAdapter> {
    let (config, _) = model.runnable()?;
    let model_arch = config.arch.name();
    if architecture != model_arch {
        return Err(Error::ArchMismatch {
            model: model_arch.to_string(),
            adapter: architecture.to_string(),
        });
    }
    let mut pairs = Vec::with_capacity(raw.len());
    for (name, raw) in raw {
        let target = Target::parse(&name, config)
            .filter(|t| t.layer < config.n_layer)
            .ok_or_else(|| unknown_target(model, &name))?;
        let [n_out, n_in] = target.shape(config);
        let rank = raw.a_shape[0];
        if raw.a_shape[1] != n_in || raw.b_shape[0] != n_out || raw.b_shape[1] != rank || rank == 0
        {
            return Err(Error::BadAdapter {
                what: format!(
                    "adapter pair for '{name}' does not fit: lora_a {:?} and lora_b {:?}, expected [rank, {n_in}] and [{n_out}, rank] with rank >= 1 (is this adapter for another base model?)",
                    raw.a_shape, raw.b_shape
                ),
            });
        }
        pairs.push(LoraPair {
            target,
            parts: target.parts(config),
            rank,
            n_in,
            n_out,
            lora_a: raw.lora_a,
            lora_b: raw.lora_b,
            alpha: raw.alpha,
            grad: None,
            narrow: NarrowCopy::default(),
        });
    }
    if pairs.is_empty() {
        return Err(Error::BadAdapter {
            what: "adapter has no LoRA tensor pairs".to_string(),
        });
    }
    pairs.sort_by_key(|p| p.target);
    Ok(LoraAdapter::new(
        architecture.to_string(),
        format,
        rule,
        alpha,
        scale,
        pairs,
    ))
}

fn unknown_target(model: &Model, name: &str) -> Error {
    if model.file().tensor(name).is_some() {
        Error::Unsupported {
            what: "LoRA target",
            feature: name.to_string(),
            hint: "lugh applies adapters to the attention and feed-forward projections (attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down; attn_qkv and ffn_up where a model stores them fused)",
        }
    } else {
        Error::BadAdapter {
            what: format!(
                "adapter tensor '{name}' has no base tensor in the model (is this adapter for another base model?)"
            ),
        }
    }
}
