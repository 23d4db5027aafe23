//! Adapters in llama.cpp's GGUF layout (`convert_lora_to_gguf.py`, `llama-adapter.cpp`):
//! `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha`, and per adapted
//! weight `<name>.lora_a` (numpy `[rank, n_in]`) and `<name>.lora_b` (numpy `[n_out, rank]`).

use std::borrow::Cow;
use std::path::Path;

use super::adapter::{AdapterFormat, Half, LoraAdapter, ScalingRule};
use super::load::{assemble, Loaded, PairCollector};
use super::narrow::check_range;
use crate::error::{Error, Result};
use crate::gguf::{GgufFile, GgufWriter, TensorBytes, TensorType};
use crate::model::Model;
use crate::ops::quant::{quantize, tensor_f32};

const ALORA_KEY: &str = "adapter.alora.invocation_tokens";

pub fn load(path: &Path, model: &Model, scale: f32) -> Result<Loaded> {
    from_gguf(&GgufFile::open(path, true)?, model, scale)
}

/// An adapter from an open GGUF, checked against `model`.
pub fn from_gguf(file: &GgufFile, model: &Model, scale: f32) -> Result<Loaded> {
    match file.get_str("general.type")? {
        Some("adapter") => {}
        other => {
            return Err(Error::BadAdapter {
                what: format!(
                    "not an adapter: general.type is {} (expected 'adapter')",
                    other.map_or("missing".to_string(), |t| format!("'{t}'"))
                ),
            })
        }
    }
    match file.get_str("adapter.type")? {
        Some("lora") => {}
        other => {
            return Err(Error::BadAdapter {
                what: format!(
                    "not a LoRA adapter: adapter.type is {} (expected 'lora')",
                    other.map_or("missing".to_string(), |t| format!("'{t}'"))
                ),
            })
        }
    }
    if file.get(ALORA_KEY).is_some() {
        return Err(Error::Unsupported {
            what: "adapter option",
            feature: ALORA_KEY.to_string(),
            hint: "activated LoRA (aLoRA) changes which positions the adapter applies to",
        });
    }
    let architecture = file
        .get_str("general.architecture")?
        .ok_or_else(|| Error::MissingKey {
            key: "general.architecture".into(),
        })?
        .to_string();
    // llama.cpp: without alpha the adapter is weighed by the user scale alone (alpha = 0).
    let alpha = file.get_f32("adapter.lora.alpha")?.unwrap_or(0.0);

    let mut collector = PairCollector::default();
    for info in file.tensors() {
        let (base, half) = if let Some(base) = info.name.strip_suffix(".lora_a") {
            (base, Half::A)
        } else if let Some(base) = info.name.strip_suffix(".lora_b") {
            (base, Half::B)
        } else if info.name.ends_with("_norm.weight") {
            continue; // llama.cpp ignores norm vectors in adapters too
        } else {
            return Err(Error::BadAdapter {
                what: format!(
                    "adapter tensor '{}' is neither a lora_a nor a lora_b",
                    info.name
                ),
            });
        };
        if !matches!(
            info.dtype,
            TensorType::F32 | TensorType::F16 | TensorType::BF16 | TensorType::Q8_0
        ) {
            return Err(Error::UnsupportedTensorType {
                name: info.name.clone(),
                type_name: format!(
                    "{} (adapter tensors may be f32, f16, bf16 or q8_0)",
                    info.dtype
                ),
            });
        }
        let shape: [usize; 2] =
            info.shape
                .as_slice()
                .try_into()
                .map_err(|_| Error::BadAdapter {
                    what: format!(
                        "adapter tensor '{}' has shape {:?}, expected 2 dimensions",
                        info.name, info.shape
                    ),
                })?;
        collector.add(base, half, tensor_f32(file, info), shape)?;
    }
    let raw = collector.finish(|_| None)?;
    let adapter = assemble(
        model,
        &architecture,
        AdapterFormat::Gguf,
        ScalingRule::AlphaOverRank,
        alpha,
        scale,
        raw,
    )?;
    Ok(Loaded {
        adapter,
        warnings: Vec::new(),
    })
}

/// Writes `adapter` as llama.cpp reads it, its factors in `dtype` (F32, F16 or BF16, rounded
/// to nearest as llama.cpp's `convert_lora_to_gguf.py --outtype` does). llama.cpp weighs every
/// pair by `alpha / rank`; where this adapter's factor differs (rsLoRA, per-module alpha), the
/// difference is folded into B so that llama.cpp computes the same update.
pub fn save(adapter: &LoraAdapter, path: &Path, dtype: TensorType) -> Result<()> {
    if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
        return Err(Error::invalid(
            "path",
            format!(
                "'{}' must end with .gguf (use save_peft for PEFT directories)",
                path.display()
            ),
        ));
    }
    let pairs = adapter.pairs();
    let mut writer = GgufWriter::new();
    writer.set("general.architecture", adapter.architecture.as_str());
    writer.set("general.type", "adapter");
    writer.set("adapter.type", "lora");
    let uses_alpha = adapter.alpha() != 0.0 || pairs.iter().any(|p| p.alpha.is_some());
    // The factor of pair p without the user scale, and the one llama.cpp will apply.
    let factor = |p: &super::LoraPair| {
        LoraAdapter::scaling(
            adapter.rule,
            p.alpha.unwrap_or(adapter.alpha()),
            1.0,
            p.rank,
        )
    };
    let gguf_alpha = pairs.first().map_or(0.0, |p| factor(p) * p.rank as f32);
    if uses_alpha {
        writer.set("adapter.lora.alpha", gguf_alpha);
    }
    for pair in pairs.iter() {
        let name = pair.name();
        let a_name = format!("{name}.lora_a");
        writer.add_tensor(
            &a_name,
            dtype,
            &[pair.rank, pair.n_in],
            encode(&a_name, &pair.lora_a, dtype)?,
        )?;
        let llama_factor = gguf_alpha / pair.rank as f32;
        let b: Cow<[f32]> = match uses_alpha && factor(pair) != llama_factor {
            true => {
                let fold = factor(pair) / llama_factor;
                pair.lora_b.iter().map(|v| v * fold).collect()
            }
            false => Cow::Borrowed(&pair.lora_b),
        };
        let b_name = format!("{name}.lora_b");
        let b = encode(&b_name, &b, dtype)?;
        writer.add_tensor(&b_name, dtype, &[pair.n_out, pair.rank], b)?;
    }
    writer.write(path)
}

/// `values` of tensor `name` encoded as `dtype` (F32, F16 or BF16); a finite value that
/// `dtype` cannot hold (beyond f16's ±65504) is an error, not an infinity in the file.
fn encode(name: &str, values: &[f32], dtype: TensorType) -> Result<TensorBytes> {
    check_range(name, values, dtype)?;
    Ok(TensorBytes::Owned(quantize(dtype, values)))
}
