//! lugh: run and fine-tune LLaMA-family models with LoRA adapters.
//!
//! Base models are GGUF files, memory-mapped and read in place (f32, f16, bf16 and ggml's
//! quantized types). Adapters come from llama.cpp GGUF files or PEFT directories, or are
//! created for training, which uses a hand-written backward pass with exact gradients.

pub mod atomic_write;
pub mod backend;
pub mod device;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod gguf;
pub mod infer;
pub mod lora;
pub mod model;
pub mod ops;
#[cfg(feature = "serve")]
pub mod serve;
pub mod tokenizer;
pub mod train;
pub mod transformer;

#[cfg(feature = "python")]
mod python;

pub use device::{devices, Device};
pub use error::{Error, Result};
pub use gguf::GgufFile;
pub use infer::Inference;
pub use lora::LoraAdapter;
pub use model::{KvCache, Model};
pub use tokenizer::Tokenizer;
