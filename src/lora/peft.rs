//! PEFT adapters: `adapter_model.safetensors` (HF tensor names) with `adapter_config.json`.
//!
//! HF and GGUF name the same weights differently (one table below), and for `llama` the rows
//! of q and k are ordered differently: llama.cpp's converter permutes them so that RoPE can
//! rotate adjacent pairs. B's rows follow the base weight's rows, so B of q_proj and k_proj is
//! permuted on load and permuted back on save; A (indexed by input features) is untouched.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use half::{bf16, f16};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde_json::{json, Value as Json};

use super::adapter::{AdapterFormat, Half, LoraAdapter, LoraPair, ScalingRule};
use super::load::{assemble, Loaded, PairCollector};
use crate::atomic_write::stage;
use crate::error::{Error, Result, ResultExt};
use crate::gguf::open_regular_file;
use crate::model::{Fused, Model, Proj, Stored, Target};

pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
pub const CONFIG_FILE: &str = "adapter_config.json";

/// Every tensor kind adapters attach to.
const STORED: [Stored; 9] = [
    Stored::Proj(Proj::AttnQ),
    Stored::Proj(Proj::AttnK),
    Stored::Proj(Proj::AttnV),
    Stored::Proj(Proj::AttnOutput),
    Stored::Proj(Proj::FfnGate),
    Stored::Proj(Proj::FfnUp),
    Stored::Proj(Proj::FfnDown),
    Stored::Fused(Fused::Qkv),
    Stored::Fused(Fused::GateUp),
];

/// HF module path inside a decoder layer, for each tensor (Phi-3's fused `qkv_proj` and
/// `gate_up_proj` included).
fn hf_module(stored: Stored) -> &'static str {
    match stored {
        Stored::Proj(Proj::AttnQ) => "self_attn.q_proj",
        Stored::Proj(Proj::AttnK) => "self_attn.k_proj",
        Stored::Proj(Proj::AttnV) => "self_attn.v_proj",
        Stored::Proj(Proj::AttnOutput) => "self_attn.o_proj",
        Stored::Proj(Proj::FfnGate) => "mlp.gate_proj",
        Stored::Proj(Proj::FfnUp) => "mlp.up_proj",
        Stored::Proj(Proj::FfnDown) => "mlp.down_proj",
        Stored::Fused(Fused::Qkv) => "self_attn.qkv_proj",
        Stored::Fused(Fused::GateUp) => "mlp.gate_up_proj",
    }
}

/// `model.layers.{il}.self_attn.q_proj`: the module name PEFT's patterns match against.
fn module_name(target: Target) -> String {
    format!("model.layers.{}.{}", target.layer, hf_module(target.stored))
}

/// The target of an HF module name (`model.layers.3.mlp.up_proj`).
fn parse_module(name: &str) -> Option<Target> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let stored = STORED.into_iter().find(|&s| hf_module(s) == module)?;
    Some(Target {
        layer: layer.parse().ok()?,
        stored,
    })
}

pub fn load_dir(dir: &Path, model: &Model, scale: f32) -> Result<Loaded> {
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.exists() {
        let hint = if dir.join("adapter_model.bin").exists() {
            " (found adapter_model.bin: pickled weights are not read; save with safe_serialization=True)"
        } else {
            ""
        };
        return Err(Error::io(
            &weights,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("no {WEIGHTS_FILE} in this PEFT directory{hint}"),
            ),
        ));
    }
    load_file(&weights, model, scale).in_file(weights)
}

/// Loads a PEFT weights file; `adapter_config.json` beside it supplies alpha and options.
pub fn load_file(path: &Path, model: &Model, scale: f32) -> Result<Loaded> {
    let config_path = path.with_file_name(CONFIG_FILE);
    let config = match open_regular_file(&config_path, "PEFT config") {
        Ok((mut file, _)) => {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)
                .map_err(|e| Error::io(&config_path, e))?;
            Some(PeftConfig::parse(&bytes).in_file(&config_path)?)
        }
        Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let (file, _) = open_regular_file(path, "SafeTensors file")?;
    // SAFETY: read-only mapping, as for GGUF files.
    let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
    let adapter = from_safetensors(&mmap, config.as_ref(), model, scale)?;
    let warnings = match config {
        Some(_) => Vec::new(),
        None => vec![format!(
            "{}: no {CONFIG_FILE} beside the weights: using alpha = rank (scaling 1.0); set lora.alpha to change it",
            path.display()
        )],
    };
    Ok(Loaded { adapter, warnings })
}

/// An adapter from the bytes of `adapter_model.safetensors` and its parsed config (`None`:
/// alpha = rank), checked against `model`.
pub(crate) fn from_safetensors(
    bytes: &[u8],
    config: Option<&PeftConfig>,
    model: &Model,
    scale: f32,
) -> Result<LoraAdapter> {
    let tensors = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::malformed("SafeTensors", e.to_string()))?;

    let (model_config, _) = model.runnable()?;
    let mut collector = PairCollector::default();
    for (name, view) in tensors.iter() {
        let (target, half) = parse_tensor_name(name)?;
        let shape: [usize; 2] = view.shape().try_into().map_err(|_| Error::BadAdapter {
            what: format!(
                "PEFT tensor '{name}' has shape {:?}, expected 2 dimensions",
                view.shape()
            ),
        })?;
        let mut values = to_f32(name, &view)?;
        if half == Half::B && model_config.arch.permutes_qk() {
            if let Some(n_heads) = qk_heads(target, model_config) {
                values = permute_rows(&values, shape, n_heads, PermuteDirection::HfToGguf)
                    .ok_or_else(|| Error::BadAdapter {
                        what: format!(
                            "PEFT tensor '{name}' has {} rows, which do not split into {n_heads} heads",
                            shape[0]
                        ),
                    })?;
            }
        }
        collector.add(&target.tensor_name(), half, values, shape)?;
    }

    let no_patterns = Vec::new();
    let patterns = config.map_or(&no_patterns, |c| &c.alpha_patterns);
    let alpha_of = |gguf_name: &str| {
        let module = Target::parse(gguf_name, model_config).map(module_name)?;
        match_pattern(patterns, &module)
    };
    let (rule, alpha) = match config {
        Some(config) => (config.rule(), config.lora_alpha),
        None => (ScalingRule::AlphaOverRank, 0.0),
    };
    let raw = collector.finish(alpha_of)?;
    let adapter = assemble(
        model,
        model_config.arch.name(),
        AdapterFormat::SafeTensors,
        rule,
        alpha,
        scale,
        raw,
    )?;
    Ok(match config {
        Some(_) => adapter,
        None => alpha_equals_rank(adapter),
    })
}

/// Without a config PEFT's factor is unknown; alpha = rank makes it 1 (per pair when ranks
/// differ), so `lora.alpha = …` can then set it.
fn alpha_equals_rank(adapter: LoraAdapter) -> LoraAdapter {
    match adapter.common_rank() {
        Some(rank) => {
            adapter.set_alpha(rank as f32);
            adapter
        }
        None => {
            for pair in adapter.pairs_mut().iter_mut() {
                pair.alpha = Some(pair.rank as f32);
            }
            adapter
        }
    }
}

/// `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` → (target, A).
fn parse_tensor_name(name: &str) -> Result<(Target, Half)> {
    let unsupported = |feature: &str, hint: &'static str| Error::Unsupported {
        what: "PEFT option",
        feature: feature.to_string(),
        hint,
    };
    if name.contains("lora_embedding_") || name.contains("embed_tokens") {
        return Err(unsupported(
            "embedding target",
            "adapters on embed_tokens change the embedding lookup, which lugh does not adapt",
        ));
    }
    if name.contains("lm_head") {
        return Err(unsupported(
            "lm_head target",
            "lugh does not adapt the output head",
        ));
    }
    if name.contains("lora_magnitude_vector") {
        return Err(unsupported(
            "use_dora",
            "DoRA rescales each column by a learned magnitude",
        ));
    }
    let rest = name.strip_prefix("base_model.model.").unwrap_or(name);
    let (module, half, tail) = match (rest.split_once(".lora_A."), rest.split_once(".lora_B.")) {
        (Some((m, t)), _) => (m, Half::A, t),
        (_, Some((m, t))) => (m, Half::B, t),
        _ => {
            return Err(Error::BadAdapter {
                what: format!("PEFT tensor '{name}' is not a lora_A or lora_B weight"),
            })
        }
    };
    if tail.ends_with("bias") {
        return Err(unsupported(
            "lora_bias",
            "a bias on lora_B adds a term lugh does not compute",
        ));
    }
    if !(tail == "weight" || tail.ends_with(".weight")) {
        return Err(Error::BadAdapter {
            what: format!("PEFT tensor '{name}' is not a lora_A or lora_B weight"),
        });
    }
    let target = parse_module(module).ok_or_else(|| {
        unsupported(
            module,
            "lugh adapts q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj and down_proj (or the fused qkv_proj and gate_up_proj) of model.layers.N",
        )
    })?;
    Ok((target, half))
}

fn to_f32(name: &str, view: &TensorView) -> Result<Vec<f32>> {
    let data = view.data();
    Ok(match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().expect("8 bytes")) as f32)
            .collect(),
        other => {
            return Err(Error::UnsupportedTensorType {
                name: name.to_string(),
                type_name: format!("{other:?} (PEFT tensors may be F32, F16, BF16 or F64)"),
            })
        }
    })
}

/// Heads whose rows llama.cpp permutes: q over `n_head`, k over `n_head_kv`.
fn qk_heads(target: Target, config: &crate::model::Config) -> Option<usize> {
    match target.stored {
        Stored::Proj(Proj::AttnQ) => Some(config.n_head),
        Stored::Proj(Proj::AttnK) => Some(config.n_head_kv),
        _ => None,
    }
}

#[derive(Clone, Copy)]
enum PermuteDirection {
    HfToGguf,
    GgufToHf,
}

/// Reorders the rows of `[rows, cols]` as `convert_hf_to_gguf.py` permutes q/k: within each
/// head of `d` rows, GGUF row `2j + s` is HF row `s·d/2 + j`.
fn permute_rows(
    values: &[f32],
    [rows, cols]: [usize; 2],
    n_heads: usize,
    dir: PermuteDirection,
) -> Option<Vec<f32>> {
    if n_heads == 0 || rows % n_heads != 0 || !(rows / n_heads).is_multiple_of(2) {
        return None;
    }
    let d = rows / n_heads;
    let mut out = vec![0f32; values.len()];
    for h in 0..n_heads {
        for j in 0..d / 2 {
            for s in 0..2 {
                let gguf = h * d + 2 * j + s;
                let hf = h * d + s * d / 2 + j;
                let (dst, src) = match dir {
                    PermuteDirection::HfToGguf => (gguf, hf),
                    PermuteDirection::GgufToHf => (hf, gguf),
                };
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    Some(out)
}

/// The parts of `adapter_config.json` that change the math, checked like PEFT's
/// `LoraConfig.__post_init__`: options lugh does not compute are refused by name.
pub(crate) struct PeftConfig {
    lora_alpha: f32,
    use_rslora: bool,
    /// `alpha_pattern`, compiled: (regex, key length, alpha).
    alpha_patterns: Vec<(regex::Regex, usize, f32)>,
}

impl PeftConfig {
    pub(crate) fn parse(bytes: &[u8]) -> Result<PeftConfig> {
        let json: Json = serde_json::from_slice(bytes)?;
        let obj = json
            .as_object()
            .ok_or_else(|| Error::malformed("adapter_config.json", "not a JSON object"))?;
        let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
        if let Some(kind) = field("peft_type").and_then(Json::as_str) {
            if kind != "LORA" {
                return Err(Error::Unsupported {
                    what: "PEFT type",
                    feature: kind.to_string(),
                    hint: "lugh reads LoRA adapters (peft_type LORA)",
                });
            }
        }
        // Options that change the forward pass.
        const CHANGES_MATH: [(&str, &str); 10] = [
            (
                "use_dora",
                "DoRA rescales each column by a learned magnitude",
            ),
            (
                "lora_bias",
                "a bias on lora_B adds a term lugh does not compute",
            ),
            (
                "fan_in_fan_out",
                "transposed (Conv1D) base weights are not LLaMA weights",
            ),
            (
                "modules_to_save",
                "fully trained extra modules are not LoRA pairs",
            ),
            (
                "layer_replication",
                "replicated layers change the model's depth",
            ),
            (
                "alora_invocation_tokens",
                "activated LoRA applies only after invocation tokens",
            ),
            ("use_qalora", "QA-LoRA pools the input before A"),
            (
                "trainable_token_indices",
                "trained token embeddings are not LoRA pairs",
            ),
            (
                "target_parameters",
                "LoRA on raw parameters (MoE experts) is not supported",
            ),
            ("arrow_config", "Arrow routing mixes adapters per token"),
        ];
        for (option, hint) in CHANGES_MATH {
            let set = match field(option) {
                None | Some(Json::Bool(false)) => false,
                Some(Json::Array(a)) => !a.is_empty(),
                Some(Json::Object(o)) => !o.is_empty(),
                Some(_) => true,
            };
            if set {
                return Err(Error::Unsupported {
                    what: "PEFT option",
                    feature: option.to_string(),
                    hint,
                });
            }
        }
        if let Some(bias) = field("bias").and_then(Json::as_str) {
            if bias != "none" {
                return Err(Error::Unsupported {
                    what: "PEFT option",
                    feature: format!("bias = \"{bias}\""),
                    hint: "trained base-model biases are not part of a LoRA adapter in lugh",
                });
            }
        }
        let number = |k: &str, default: f64| -> Result<f64> {
            match field(k) {
                None => Ok(default),
                Some(v) => v.as_f64().ok_or_else(|| {
                    Error::malformed("adapter_config.json", format!("'{k}' is not a number"))
                }),
            }
        };
        let alpha_pattern = match field("alpha_pattern") {
            None => Vec::new(),
            Some(Json::Object(map)) => map
                .iter()
                .map(|(k, v)| {
                    v.as_f64().map(|a| (k.clone(), a as f32)).ok_or_else(|| {
                        Error::malformed(
                            "adapter_config.json",
                            format!("alpha_pattern['{k}'] is not a number"),
                        )
                    })
                })
                .collect::<Result<_>>()?,
            Some(_) => {
                return Err(Error::malformed(
                    "adapter_config.json",
                    "alpha_pattern is not an object",
                ))
            }
        };
        Ok(PeftConfig {
            // PEFT's LoraConfig default.
            lora_alpha: number("lora_alpha", 8.0)? as f32,
            use_rslora: field("use_rslora").and_then(Json::as_bool).unwrap_or(false),
            alpha_patterns: compile_patterns(&alpha_pattern)?,
        })
    }

    fn rule(&self) -> ScalingRule {
        if self.use_rslora {
            ScalingRule::AlphaOverSqrtRank
        } else {
            ScalingRule::AlphaOverRank
        }
    }
}

fn compile_patterns(alpha_pattern: &[(String, f32)]) -> Result<Vec<(regex::Regex, usize, f32)>> {
    alpha_pattern
        .iter()
        .map(|(key, alpha)| {
            regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
                .map(|re| (re, key.len(), *alpha))
                .map_err(|e| {
                    Error::malformed(
                        "adapter_config.json",
                        format!("alpha_pattern key '{key}': {e}"),
                    )
                })
        })
        .collect()
}

/// PEFT matches a pattern key against the end of a module name; the most specific (longest)
/// matching key wins.
fn match_pattern(patterns: &[(regex::Regex, usize, f32)], module: &str) -> Option<f32> {
    patterns
        .iter()
        .filter(|(re, _, _)| re.is_match(module))
        .max_by_key(|(_, len, _)| *len)
        .map(|(_, _, alpha)| *alpha)
}

/// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir` (created if
/// needed), each atomically. The factor of every pair is kept exactly: `lora_alpha` is the
/// adapter's, `alpha_pattern` covers pairs that differ.
pub fn save(
    adapter: &LoraAdapter,
    model_arch_permutes_qk: bool,
    heads: (usize, usize),
    dir: &Path,
) -> Result<()> {
    if dir.is_file() {
        return Err(Error::invalid(
            "directory",
            format!(
                "'{}' is a file; save_peft writes a directory",
                dir.display()
            ),
        ));
    }
    let created = !dir.exists();
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let saved = write_dir(adapter, model_arch_permutes_qk, heads, dir);
    if saved.is_err() && created {
        // Only if still empty: a folder this call made and could not fill.
        let _ = std::fs::remove_dir(dir);
    }
    saved
}

fn write_dir(
    adapter: &LoraAdapter,
    model_arch_permutes_qk: bool,
    heads: (usize, usize),
    dir: &Path,
) -> Result<()> {
    let pairs = adapter.pairs();
    let rank = most_common_rank(&pairs);
    let denominator = |r: usize| match adapter.rule {
        ScalingRule::AlphaOverRank => r as f32,
        ScalingRule::AlphaOverSqrtRank => (r as f32).sqrt(),
    };
    // An alpha of 0 (llama.cpp: no alpha) means a factor of 1.
    let factor = |p: &LoraPair| {
        LoraAdapter::scaling(
            adapter.rule,
            p.alpha.unwrap_or(adapter.alpha()),
            1.0,
            p.rank,
        )
    };
    let lora_alpha = if adapter.alpha() != 0.0 {
        adapter.alpha()
    } else {
        denominator(rank)
    };

    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    let mut rank_pattern = BTreeMap::new();
    let mut alpha_pattern = BTreeMap::new();
    let mut targets = std::collections::BTreeSet::new();
    for pair in pairs.iter() {
        let module = module_name(pair.target);
        targets.insert(
            hf_module(pair.target.stored)
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_string(),
        );
        if pair.rank != rank {
            rank_pattern.insert(module.clone(), pair.rank);
        }
        let alpha = factor(pair) * denominator(pair.rank);
        if alpha != lora_alpha {
            alpha_pattern.insert(module.clone(), alpha);
        }
        let mut b = pair.lora_b.clone();
        if model_arch_permutes_qk {
            let n_heads = match pair.target.stored {
                Stored::Proj(Proj::AttnQ) => Some(heads.0),
                Stored::Proj(Proj::AttnK) => Some(heads.1),
                _ => None,
            };
            if let Some(n) = n_heads {
                b = permute_rows(&b, [pair.n_out, pair.rank], n, PermuteDirection::GgufToHf)
                    .expect("shapes were checked against the model");
            }
        }
        let prefix = format!("base_model.model.{module}");
        tensors.push((
            format!("{prefix}.lora_A.weight"),
            vec![pair.rank, pair.n_in],
            f32_bytes(&pair.lora_a),
        ));
        tensors.push((
            format!("{prefix}.lora_B.weight"),
            vec![pair.n_out, pair.rank],
            f32_bytes(&b),
        ));
    }
    let views = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes).map(|v| (name.clone(), v))
        })
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::malformed("SafeTensors", e.to_string()))?;
    let metadata = Some(
        [("format".to_string(), "pt".to_string())]
            .into_iter()
            .collect(),
    );
    let bytes = safetensors::serialize(views, metadata)
        .map_err(|e| Error::malformed("SafeTensors", e.to_string()))?;

    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": null,
        "r": rank,
        "lora_alpha": lora_alpha,
        "use_rslora": adapter.rule == ScalingRule::AlphaOverSqrtRank,
        "target_modules": targets.into_iter().collect::<Vec<_>>(),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "use_dora": false,
        "lora_bias": false,
        "modules_to_save": null,
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    });
    // Both files are written before either replaces an older one: a failure leaves the
    // directory as it was (short of a rename failing between the two).
    let weights = stage(&dir.join(WEIGHTS_FILE), |w| w.write_all(&bytes))?;
    let config = stage(&dir.join(CONFIG_FILE), |w| {
        serde_json::to_writer_pretty(&mut *w, &config)?;
        w.write_all(b"\n")
    })?;
    weights.commit()?;
    config.commit()
}

fn most_common_rank(pairs: &[LoraPair]) -> usize {
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for p in pairs {
        *counts.entry(p.rank).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|&(rank, n)| (n, std::cmp::Reverse(rank)))
        .map_or(0, |(r, _)| r)
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_interleaves_head_halves_and_inverts() {
        // One head of 4 rows, 1 column: HF rows [a0, a1, b0, b1] -> GGUF [a0, b0, a1, b1].
        let hf = [0.0, 1.0, 10.0, 11.0];
        let gguf = permute_rows(&hf, [4, 1], 1, PermuteDirection::HfToGguf).unwrap();
        assert_eq!(gguf, [0.0, 10.0, 1.0, 11.0]);
        let back = permute_rows(&gguf, [4, 1], 1, PermuteDirection::GgufToHf).unwrap();
        assert_eq!(back, hf);
        assert!(permute_rows(&hf, [4, 1], 3, PermuteDirection::HfToGguf).is_none());
    }

    #[test]
    fn tensor_names_map_to_targets() {
        let (target, half) =
            parse_tensor_name("base_model.model.model.layers.7.mlp.down_proj.lora_B.weight")
                .unwrap();
        let down = Stored::Proj(Proj::FfnDown);
        assert_eq!((target.layer, target.stored, half), (7, down, Half::B));
        let (target, half) = parse_tensor_name(
            "base_model.model.model.layers.0.self_attn.o_proj.lora_A.default.weight",
        )
        .unwrap();
        assert_eq!(
            (target.stored, half),
            (Stored::Proj(Proj::AttnOutput), Half::A)
        );
        let (target, _) =
            parse_tensor_name("base_model.model.model.layers.2.self_attn.qkv_proj.lora_A.weight")
                .unwrap();
        assert_eq!(target.stored, Stored::Fused(Fused::Qkv));
        for (name, what) in [
            ("base_model.model.lm_head.lora_A.weight", "lm_head"),
            (
                "base_model.model.model.embed_tokens.lora_embedding_A",
                "embedding",
            ),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                "use_dora",
            ),
            (
                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias",
                "lora_bias",
            ),
        ] {
            let err = parse_tensor_name(name).unwrap_err().to_string();
            assert!(err.contains(what), "{name}: {err}");
        }
    }

    #[test]
    fn config_refuses_options_that_change_the_math() {
        for (json, option) in [
            (r#"{"use_dora": true}"#, "use_dora"),
            (r#"{"lora_bias": true}"#, "lora_bias"),
            (r#"{"bias": "all"}"#, "bias"),
            (r#"{"modules_to_save": ["lm_head"]}"#, "modules_to_save"),
            (r#"{"peft_type": "LOHA"}"#, "LOHA"),
        ] {
            let err = PeftConfig::parse(json.as_bytes())
                .err()
                .expect(json)
                .to_string();
            assert!(err.contains(option), "{json}: {err}");
        }
        let ok = PeftConfig::parse(br#"{"lora_alpha": 16, "use_rslora": true, "use_dora": false, "modules_to_save": null}"#).unwrap();
        assert_eq!(
            (ok.lora_alpha, ok.rule()),
            (16.0, ScalingRule::AlphaOverSqrtRank)
        );
    }

    #[test]
    fn the_most_specific_pattern_wins() {
        let config = PeftConfig::parse(
            br#"{"alpha_pattern": {"q_proj": 4, "model.layers.1.self_attn.q_proj": 9}}"#,
        )
        .unwrap();
        let patterns = &config.alpha_patterns;
        assert_eq!(
            match_pattern(patterns, "model.layers.0.self_attn.q_proj"),
            Some(4.0)
        );
        assert_eq!(
            match_pattern(patterns, "model.layers.1.self_attn.q_proj"),
            Some(9.0)
        );
        assert_eq!(
            match_pattern(patterns, "model.layers.1.self_attn.k_proj"),
            None
        );
    }
}
