//! Hyper-parameters read from `{arch}.*` GGUF metadata, checked once.

use std::ops::Range;

use super::weights::Proj;
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::ops::rope::RopeStyle;

/// The architectures lugh runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// Llama 1–3, Mistral, TinyLlama, ... (llama.cpp `LLM_ARCH_LLAMA`).
    Llama,
    /// Qwen2 / Qwen2.5: q/k/v biases, NeoX RoPE.
    Qwen2,
    /// Qwen3 (dense): RMSNorm over each head of q and k before RoPE, NeoX RoPE, no biases.
    Qwen3,
    /// Phi-3 / Phi-3.5 / Phi-4: q, k, v in one `attn_qkv` tensor and gate, up in one
    /// `ffn_up` (see `Fused`), NeoX RoPE.
    Phi3,
    /// Gemma 2: embeddings scaled by √n_embd, GELU-tanh gate, norms after attention and
    /// FFN as well as before, soft-capped attention scores and logits, a sliding window on
    /// alternate layers.
    Gemma2,
    /// Gemma 3 (text): Gemma 2 without soft-capping, with q/k head norms, five sliding
    /// layers to one global, and its own RoPE base on the sliding layers.
    Gemma3,
}

/// The activation of the gated feed-forward: `act(gate) ⊙ up`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Glu {
    /// SwiGLU: `silu(g) = g σ(g)` (LLaMA, Qwen, Phi).
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma).
    GeluTanh,
}

impl Architecture {
    pub const ALL: [Architecture; 6] = [
        Architecture::Llama,
        Architecture::Qwen2,
        Architecture::Qwen3,
        Architecture::Phi3,
        Architecture::Gemma2,
        Architecture::Gemma3,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Qwen3 => "qwen3",
            Architecture::Phi3 => "phi3",
            Architecture::Gemma2 => "gemma2",
            Architecture::Gemma3 => "gemma3",
        }
    }

    /// Whether each head of q and k is RMS-normalised (`attn_q_norm`, `attn_k_norm`, weights
    /// of `head_dim`) before RoPE.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Architecture::Qwen3 | Architecture::Gemma3)
    }

    fn is_gemma(self) -> bool {
        matches!(self, Architecture::Gemma2 | Architecture::Gemma3)
    }

    pub fn from_name(name: &str) -> Result<Architecture> {
        Self::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| Error::UnsupportedArchitecture {
                arch: name.to_string(),
                supported: Self::ALL.map(|a| a.name()).join(", "),
            })
    }

    /// llama.cpp's RoPE mode for the architecture. LLaMA's GGUF q/k rows were permuted by the
    /// converter into the interleaved ("normal") layout; Qwen2 keeps HF's NeoX layout.
    pub fn rope_style(self) -> RopeStyle {
        match self {
            Architecture::Llama => RopeStyle::Normal,
            Architecture::Qwen2
            | Architecture::Qwen3
            | Architecture::Phi3
            | Architecture::Gemma2
            | Architecture::Gemma3 => RopeStyle::Neox,
        }
    }

    /// Whether HF's q/k rows are permuted in this architecture's GGUF files (and so in the
    /// B matrices of adapters converted for them).
    pub fn permutes_qk(self) -> bool {
        self.rope_style() == RopeStyle::Normal
    }
}

/// Dimension legend used across the crate:
/// `n_vocab` tokens, `n_embd` model width, `n_layer` blocks, `n_head` query heads,
/// `n_head_kv` key/value heads (GQA), `head_dim` per head, `n_ff` feed-forward width,
/// `n_rot` rotated dimensions per head, `n_tokens` rows of a batch, `il` a layer index.
#[derive(Debug, Clone)]
pub struct Config {
    pub arch: Architecture,
    pub n_vocab: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_head_kv: usize,
    pub head_dim: usize,
    pub n_ff: usize,
    pub n_ctx_train: usize,
    pub n_rot: usize,
    pub rope_freq_base: f32,
    /// Linear RoPE position scaling (1 / scaling factor); 1.0 when unscaled.
    pub rope_freq_scale: f32,
    /// LongRoPE's factor on cos and sin (`rope.scaling.attn_factor`, 1.0 when absent).
    pub rope_attn_factor: f32,
    /// The context LongRoPE's short factors cover (`rope.scaling.original_context_length`).
    pub n_ctx_orig: usize,
    pub rms_eps: f32,
    /// The projections this file stores together (Phi-3's `attn_qkv` and `ffn_up`).
    pub fused: Vec<Fused>,
    /// Factor on the embedding rows (Gemma: √n_embd).
    pub embd_scale: Option<f32>,
    /// Whether attention and FFN outputs are RMS-normalised before their residual
    /// (`post_attention_norm`, `post_ffw_norm`: Gemma).
    pub post_norms: bool,
    pub glu: Glu,
    /// Factor on the attention scores `q · k` (1/√head_dim; Gemma 27B: 1/√(n_embd/n_head)).
    pub attn_scale: f32,
    /// `c · tanh(s / c)` on attention scores and on logits (Gemma 2).
    pub attn_softcap: Option<f32>,
    pub final_softcap: Option<f32>,
    /// Layers that attend to the last `sliding_window` positions only (see `is_sliding`).
    pub sliding_window: Option<usize>,
    sliding: Sliding,
    /// (base, linear scale) of RoPE on the sliding layers where it differs (Gemma 3).
    pub rope_swa: Option<(f32, f32)>,
}

impl Config {
    /// Reads and checks the hyper-parameters. `n_vocab` comes from the caller (the embedding
    /// matrix is the authority on it).
    pub fn from_gguf(file: &GgufFile, n_vocab: usize) -> Result<Config> {
        let arch_name = file
            .get_str("general.architecture")?
            .ok_or_else(|| Error::MissingKey {
                key: "general.architecture".into(),
            })?;
        let arch = Architecture::from_name(arch_name)?;
        let key = |suffix: &str| format!("{arch_name}.{suffix}");
        let required = |suffix: &str| -> Result<usize> {
            let k = key(suffix);
            match file.require(&k)? {
                crate::gguf::Value::Array { .. } => Err(Error::Unsupported {
                    what: "per-layer value of",
                    feature: k.clone(),
                    hint: "lugh needs one value for all layers",
                }),
                v => v.to_usize(&k),
            }
        };
        let n_embd = required("embedding_length")?;
        let n_layer = required("block_count")?;
        let n_head = required("attention.head_count")?;
        let n_ff = required("feed_forward_length")?;
        let n_ctx_train = required("context_length")?;
        let n_head_kv = match file.get(&key("attention.head_count_kv")) {
            Some(_) => required("attention.head_count_kv")?,
            None => n_head,
        };
        let positive = |name: &'static str, v: usize| {
            if v == 0 {
                Err(Error::invalid(name, format!("{arch_name}: {name} is 0")))
            } else {
                Ok(v)
            }
        };
        positive("embedding_length", n_embd)?;
        positive("head_count", n_head)?;
        positive("head_count_kv", n_head_kv)?;
        positive("feed_forward_length", n_ff)?;
        if n_head % n_head_kv != 0 {
            return Err(Error::invalid(
                "head_count_kv",
                format!("{n_head} query heads cannot be grouped over {n_head_kv} key/value heads"),
            ));
        }
        let head_dim = match file.get_usize(&key("attention.key_length"))? {
            Some(d) => d,
            None if n_embd % n_head == 0 => n_embd / n_head,
            None => {
                return Err(Error::invalid(
                    "head_count",
                    format!("embedding length {n_embd} is not a multiple of {n_head} heads"),
                ))
            }
        };
        positive("key_length", head_dim)?;
        // key_length is read as given: q_dim = n_head * head_dim must not wrap around to a
        // width the weights happen to have (attention would then read past every head).
        if n_head.checked_mul(head_dim).is_none() {
            return Err(Error::invalid(
                "key_length",
                format!("{arch_name}: {n_head} heads of {head_dim} dimensions overflow"),
            ));
        }
        if let Some(value_len) = file.get_usize(&key("attention.value_length"))? {
            if value_len != head_dim {
                return Err(Error::Unsupported {
                    what: "attention with value length",
                    feature: format!("{value_len} != key length {head_dim}"),
                    hint: "lugh needs equal key and value head sizes",
                });
            }
        }
        let n_rot = file
            .get_usize(&key("rope.dimension_count"))?
            .unwrap_or(head_dim);
        if n_rot > head_dim || n_rot % 2 != 0 || head_dim % 2 != 0 {
            return Err(Error::invalid(
                "rope.dimension_count",
                format!("{n_rot} rotated dimensions do not fit heads of {head_dim}"),
            ));
        }
        let rms_eps = file
            .get_f32(&key("attention.layer_norm_rms_epsilon"))?
            .ok_or_else(|| Error::MissingKey {
                key: key("attention.layer_norm_rms_epsilon"),
            })?;
        // A base, factor or cap that is not a positive number would make every logit NaN.
        let positive_f32 = |suffix: &str, default: f32| -> Result<f32> {
            let v = file.get_f32(&key(suffix))?.unwrap_or(default);
            match v.is_finite() && v > 0.0 {
                true => Ok(v),
                false => Err(Error::invalid(
                    "metadata",
                    format!("{}: {v} must be a positive number", key(suffix)),
                )),
            }
        };
        let rope_freq_base = positive_f32("rope.freq_base", 10000.0)?;
        let rope_freq_scale = rope_scale(file, arch_name)?;
        let rope_attn_factor = positive_f32("rope.scaling.attn_factor", 1.0)?;
        let n_ctx_orig = file
            .get_usize(&key("rope.scaling.original_context_length"))?
            .unwrap_or(n_ctx_train);
        let fused = Fused::ALL
            .into_iter()
            .filter(|f| f.stored_in(file, n_ff))
            .collect();
        let gemma = arch.is_gemma();
        // llama.cpp reads a cap of 0 as "none".
        let cap = |suffix: &str| -> Result<Option<f32>> {
            match file.get_f32(&key(suffix))? {
                None | Some(0.0) => Ok(None),
                Some(_) => positive_f32(suffix, 0.0).map(Some),
            }
        };
        // Gemma's 27B models scale scores by their width per head (llama.cpp, gemma_pytorch).
        let big_gemma = (arch == Architecture::Gemma2 && n_layer == 46)
            || (arch == Architecture::Gemma3 && n_layer == 62);
        let attn_scale = match big_gemma {
            true => 1.0 / ((n_embd / n_head) as f32).sqrt(),
            false => 1.0 / (head_dim as f32).sqrt(),
        };
        let sliding_window = match arch {
            Architecture::Gemma2 => Some(
                file.get_usize(&key("attention.sliding_window"))?
                    .unwrap_or(4096),
            ),
            Architecture::Gemma3 => file
                .get_usize(&key("attention.sliding_window"))?
                .filter(|&w| w > 0),
            _ => None,
        };
        let sliding = match sliding_window {
            Some(_) => sliding_layers(
                file,
                &key("attention.sliding_window_pattern"),
                n_layer,
                arch,
            )?,
            None => Sliding::Period(1),
        };
        let rope_swa = match (arch, sliding_window) {
            (Architecture::Gemma3, Some(_)) => {
                Some((positive_f32("rope.freq_base_swa", 10000.0)?, 1.0))
            }
            _ => None,
        };
        Ok(Config {
            arch,
            n_vocab,
            n_embd,
            n_layer,
            n_head,
            n_head_kv,
            head_dim,
            n_ff,
            n_ctx_train,
            n_rot,
            rope_freq_base,
            rope_freq_scale,
            rope_attn_factor,
            n_ctx_orig,
            rms_eps,
            fused,
            embd_scale: gemma.then(|| (n_embd as f32).sqrt()),
            post_norms: gemma,
            glu: if gemma { Glu::GeluTanh } else { Glu::Silu },
            attn_scale,
            attn_softcap: match arch {
                Architecture::Gemma2 => cap("attn_logit_softcapping")?,
                _ => None,
            },
            final_softcap: match gemma {
                true => cap("final_logit_softcapping")?,
                false => None,
            },
            sliding_window,
            sliding,
            rope_swa,
        })
    }

    pub fn q_dim(&self) -> usize {
        self.n_head * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.n_head_kv * self.head_dim
    }

    /// Whether layer `il` attends within the sliding window.
    pub fn is_sliding(&self, il: usize) -> bool {
        self.sliding_window.is_some()
            && match &self.sliding {
                Sliding::Period(n) => *n == 0 || il % n < n - 1,
                Sliding::Flags(flags) => flags.get(il).copied().unwrap_or(false),
            }
    }

    /// The fused tensor that stores `proj` in this file, if any.
    pub fn fused_with(&self, proj: Proj) -> Option<Fused> {
        self.fused
            .iter()
            .copied()
            .find(|f| f.projections().contains(&proj))
    }
}

/// Projections a file stores in one tensor, stacked by rows, as llama.cpp names them:
/// `attn_qkv` = [q; k; v] and (when there is no `ffn_gate`) `ffn_up` = [gate; up].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Fused {
    Qkv,
    GateUp,
}

impl Fused {
    pub const ALL: [Fused; 2] = [Fused::Qkv, Fused::GateUp];

    /// The GGUF name: `blk.{il}.{name}.weight`.
    pub fn name(self) -> &'static str {
        match self {
            Fused::Qkv => "attn_qkv",
            Fused::GateUp => "ffn_up",
        }
    }

    /// The projections, in row order.
    pub fn projections(self) -> &'static [Proj] {
        match self {
            Fused::Qkv => &[Proj::AttnQ, Proj::AttnK, Proj::AttnV],
            Fused::GateUp => &[Proj::FfnGate, Proj::FfnUp],
        }
    }

    /// Each projection's rows in the fused tensor.
    pub fn parts(self, config: &Config) -> Vec<(Proj, Range<usize>)> {
        let mut start = 0;
        self.projections()
            .iter()
            .map(|&proj| {
                let n = proj.shape(config)[0];
                start += n;
                (proj, start - n..start)
            })
            .collect()
    }

    /// `[n_out, n_in]` of the fused tensor.
    pub fn shape(self, config: &Config) -> [usize; 2] {
        let n_out = self.projections().iter().map(|p| p.shape(config)[0]).sum();
        [n_out, config.n_embd]
    }

    /// Whether `file` stores these projections fused (judged on layer 0).
    fn stored_in(self, file: &GgufFile, n_ff: usize) -> bool {
        match self {
            Fused::Qkv => file.tensor("blk.0.attn_qkv.weight").is_some(),
            Fused::GateUp => {
                file.tensor("blk.0.ffn_gate.weight").is_none()
                    && file
                        .tensor("blk.0.ffn_up.weight")
                        .is_some_and(|t| t.shape.first() == Some(&(2 * n_ff)))
            }
        }
    }
}

/// Which layers slide: in every period of `n` layers all but the last (0: all of them), or a
/// flag per layer.
#[derive(Debug, Clone)]
enum Sliding {
    Period(usize),
    Flags(Vec<bool>),
}

/// Which layers slide (`attention.sliding_window_pattern`: one flag per layer, or a period),
/// as llama.cpp reads it; Gemma 2's period is 2, Gemma 3's 6.
fn sliding_layers(
    file: &GgufFile,
    key: &str,
    n_layer: usize,
    arch: Architecture,
) -> Result<Sliding> {
    if let Some(crate::gguf::Value::Array { items, .. }) = file.get(key) {
        let flags: Vec<bool> = items
            .iter()
            .map(|v| matches!(v, crate::gguf::Value::Bool(true)))
            .collect();
        if flags.len() != n_layer {
            return Err(Error::invalid(
                "sliding_window_pattern",
                format!("{} flags for {n_layer} layers", flags.len()),
            ));
        }
        return Ok(Sliding::Flags(flags));
    }
    let default = if arch == Architecture::Gemma2 { 2 } else { 6 };
    Ok(Sliding::Period(file.get_usize(key)?.unwrap_or(default)))
}

/// Linear scaling is applied; the other schemes change the math and are refused rather than
/// silently ignored.
fn rope_scale(file: &GgufFile, arch: &str) -> Result<f32> {
    let kind = file
        .get_str(&format!("{arch}.rope.scaling.type"))?
        .unwrap_or("none");
    let factor = match file.get_f32(&format!("{arch}.rope.scaling.factor"))? {
        Some(f) => Some(f),
        None => file.get_f32(&format!("{arch}.rope.scale_linear"))?,
    };
    match (kind, factor) {
        ("none", None) | ("linear", None) => Ok(1.0),
        ("none", Some(f)) | ("linear", Some(f)) if f == 0.0 || f == 1.0 => Ok(1.0),
        ("linear", Some(f)) | ("none", Some(f)) if f > 0.0 => Ok(1.0 / f),
        (other, _) => Err(Error::Unsupported {
            what: "RoPE scaling",
            feature: other.to_string(),
            hint: "lugh implements linear RoPE scaling only",
        }),
    }
}
