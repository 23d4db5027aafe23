//! LoRA adapters (Hu et al., 2021): loading (llama.cpp GGUF, PEFT), validation against a
//! model, creation for training, the op that applies them, saving and merging.

mod adapter;
mod create;
mod gguf_adapter;
pub mod linear;
mod load;
mod merge;
mod narrow;
mod peft;

pub use adapter::{AdapterFormat, AtomicF32, Half, LoraAdapter, LoraPair, PairGrad, ScalingRule};
pub use create::{create, target_names, MAX_RANK};
pub use linear::{LoraGrads, LoraPlan, Scaled};
pub use load::{load, Loaded};
pub use merge::merge;
pub use narrow::{Narrow, NarrowCopy};

pub(crate) use gguf_adapter::from_gguf as gguf_adapter_from_gguf;
pub(crate) use peft::{from_safetensors as peft_from_safetensors, PeftConfig};

use std::path::Path;

use crate::error::Result;
use crate::gguf::TensorType;
use crate::model::Model;

impl LoraAdapter {
    /// Saves in llama.cpp's GGUF layout (the path must end with `.gguf`), the factors as
    /// `dtype` (F32, F16 or BF16).
    pub fn save_gguf(&self, path: &Path, dtype: TensorType) -> Result<()> {
        gguf_adapter::save(self, path, dtype)
    }

    /// Saves a PEFT directory for `model` (q/k rows of B back in HF order for llama).
    pub fn save_peft(&self, model: &Model, dir: &Path) -> Result<()> {
        let (config, _) = model.runnable()?;
        self.check_fits(config)?;
        peft::save(
            self,
            config.arch.permutes_qk(),
            (config.n_head, config.n_head_kv),
            dir,
        )
    }
}
