//! LoRA adapters (Hu et al., 2021): loading (GGUF, PEFT), validation against a model, the op
//! that applies them, and saving.

mod adapter;
pub mod linear;

pub use adapter::{AdapterFormat, AtomicF32, LoraAdapter, LoraPair, PairGrad, ScalingRule};
pub use linear::{LoraGrads, LoraPlan, Numerics};
