//! A GGUF model: its file, hyper-parameters and weights (views into the mapping).

mod config;
mod kv_cache;
mod weights;

use std::path::Path;
#[cfg(test)]
use std::sync::Arc;
use std::sync::OnceLock;

pub use config::{Architecture, Config, Fused, Glu};
pub use kv_cache::{KvCache, KvDtype, SeqSpan};
pub use weights::{Layer, Proj, Slot, Stored, Target, Weights};

use crate::error::{Error, Result, ResultExt};
use crate::gguf::GgufFile;
use crate::ops::rope::{LongRope, Rope};

/// An open model. Any GGUF opens (vocabulary-only files and adapters too, for their
/// metadata); a file with a model's tensors must also be a complete model of a supported
/// architecture, checked here so that inference cannot fail on it later.
pub struct Model {
    file: GgufFile,
    runnable: Option<Runnable>,
    /// The tokens that end generation, read from the vocabulary on first use.
    end_of_generation: OnceLock<Vec<u32>>,
}

/// What a file with weights adds: hyper-parameters, weights and the RoPE they imply.
struct Runnable {
    config: Config,
    weights: Weights,
    rope: Rope,
}

impl Model {
    pub fn open(path: impl AsRef<Path>, use_mmap: bool) -> Result<Model> {
        Self::from_gguf(GgufFile::open(path, use_mmap)?)
    }

    /// A model from an open GGUF (`GgufFile::open` or `GgufFile::from_bytes`).
    pub fn from_gguf(file: GgufFile) -> Result<Model> {
        let runnable = if file.tensors().is_empty() || Self::is_adapter(&file) {
            None
        } else {
            Some(Self::load(&file).in_file(file.path())?)
        };
        Ok(Model {
            file,
            runnable,
            end_of_generation: OnceLock::new(),
        })
    }

    /// Whether `file` is an adapter (`general.type = adapter`, as llama.cpp writes them).
    fn is_adapter(file: &GgufFile) -> bool {
        file.get_str("general.type").ok().flatten() == Some("adapter")
    }

    /// Why this file cannot run.
    fn not_runnable(&self) -> Error {
        match Self::is_adapter(&self.file) {
            true => Error::AdapterNotModel,
            false => Error::NoWeights,
        }
    }

    fn load(file: &GgufFile) -> Result<Runnable> {
        let embd = file
            .tensor("token_embd.weight")
            .ok_or_else(|| Error::TensorNotFound {
                name: "token_embd.weight".into(),
            })?;
        let n_vocab = embd.shape.first().copied().unwrap_or(0);
        let config = Config::from_gguf(file, n_vocab)?;
        let weights = Weights::load(file, &config)?;
        let rope = Rope {
            style: config.arch.rope_style(),
            head_dim: config.head_dim,
            n_rot: config.n_rot,
            freq_base: config.rope_freq_base,
            freq_scale: config.rope_freq_scale,
            freq_factors: weights.rope_freqs.clone(),
            mscale: config.rope_attn_factor,
            long_rope: weights.rope_long.clone().map(|(short, long)| LongRope {
                short,
                long,
                n_ctx_orig: config.n_ctx_orig,
            }),
            swa: None,
        };
        let rope = Rope {
            swa: config.rope_swa.map(|(freq_base, freq_scale)| {
                Box::new(Rope {
                    freq_base,
                    freq_scale,
                    freq_factors: None,
                    mscale: 1.0,
                    long_rope: None,
                    ..rope.clone()
                })
            }),
            ..rope
        };
        Ok(Runnable {
            config,
            weights,
            rope,
        })
    }

    pub fn file(&self) -> &GgufFile {
        &self.file
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// The architecture named in the file (`general.architecture`), supported or not.
    pub fn architecture(&self) -> Option<&str> {
        self.file.get_str("general.architecture").ok().flatten()
    }

    /// Hyper-parameters and weights; an error for a vocabulary-only file.
    pub fn runnable(&self) -> Result<(&Config, &Weights)> {
        self.runnable
            .as_ref()
            .map(|r| (&r.config, &r.weights))
            .ok_or_else(|| self.not_runnable())
    }

    pub fn config(&self) -> Option<&Config> {
        self.runnable.as_ref().map(|r| &r.config)
    }

    /// The vocabulary size: the embedding's rows, or the tokenizer's size for vocab-only files.
    pub fn n_vocab(&self) -> usize {
        match self.config() {
            Some(c) => c.n_vocab,
            None => self
                .file
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.as_array("tokenizer.ggml.tokens").ok())
                .map_or(0, |tokens| tokens.len()),
        }
    }

    /// The end-of-sequence token named in the file, if any.
    pub fn eos_token(&self) -> Option<u32> {
        self.file
            .get_usize("tokenizer.ggml.eos_token_id")
            .ok()
            .flatten()
            .and_then(|id| u32::try_from(id).ok())
    }

    /// The tokens that end a generation: EOS, end of turn and the others llama.cpp's
    /// vocabulary recognises (`Tokenizer::is_eog`); just EOS when the vocabulary does not load.
    pub fn end_of_generation(&self) -> &[u32] {
        self.end_of_generation.get_or_init(|| {
            match crate::tokenizer::Tokenizer::from_gguf(&self.file) {
                Ok(tokenizer) => tokenizer.end_of_generation().collect(),
                Err(_) => self.eos_token().into_iter().collect(),
            }
        })
    }

    /// The RoPE this model uses (an inference runs `rope.for_context(n_ctx)`: LongRoPE
    /// depends on the context size).
    pub fn rope(&self) -> Result<&Rope> {
        self.runnable
            .as_ref()
            .map(|r| &r.rope)
            .ok_or_else(|| self.not_runnable())
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Model")
            .field("path", &self.path())
            .field("config", &self.config())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::tiny_model_with;
    use crate::gguf::Value;

    fn open(metadata: &[(&str, Value)]) -> Result<Model> {
        Model::from_gguf(GgufFile::from_bytes(&tiny_model_with(metadata))?)
    }

    #[test]
    fn counts_from_the_metadata_do_not_size_allocations() {
        // A reservation of 2^40 layers would abort the process; the missing layer is named.
        let err = open(&[("llama.block_count", Value::U64(1 << 40))]).unwrap_err();
        assert!(
            matches!(err.root(), Error::TensorNotFound { name } if name == "blk.1.attn_q.weight"),
            "{err}"
        );
    }

    #[test]
    fn heads_that_overflow_are_refused() {
        // 4 heads of 2^62 + 2 wrap around to the real width 8 of attn_q.
        let err = open(&[
            ("llama.attention.head_count", Value::U32(4)),
            ("llama.attention.key_length", Value::U64((1 << 62) + 2)),
        ])
        .unwrap_err();
        assert!(
            matches!(err.root(), Error::InvalidArgument { name: "key_length", reason } if reason.contains("overflow")),
            "{err}"
        );
        let err = open(&[("llama.attention.key_length", Value::U32(0))]).unwrap_err();
        assert!(err.to_string().contains("key_length is 0"), "{err}");
    }

    #[test]
    fn generation_ends_at_every_end_of_generation_token() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/vocab/ggml-vocab-llama-bpe.gguf"
        );
        let model = Model::open(path, true).unwrap();
        // Llama 3: <|end_of_text|> (EOS) and <|eot_id|> (end of turn).
        assert_eq!(model.end_of_generation(), [128001, 128009]);
        assert_eq!(model.eos_token(), Some(128001));
    }

    #[test]
    fn a_huge_context_is_only_an_upper_bound() {
        let model = Arc::new(open(&[("llama.context_length", Value::U64(1 << 60))]).unwrap());
        let reference = Arc::new(open(&[]).unwrap());
        let run = |model: &Arc<Model>| {
            crate::Inference::new(Arc::clone(model), None, Some(1))
                .unwrap()
                .forward(&[1, 2, 3], &[])
                .unwrap()
        };
        assert_eq!(run(&model), run(&reference));
    }
}
