//! The transformer's recipe, written once against `backend::Backend`: one block forward and
//! backward side by side (`block`), and the whole model over a batch of sequences — inference,
//! and training's forward that keeps activations and its backward (`forward`).

mod block;
mod forward;

pub use block::BlockActs;
pub use forward::{
    backward, forward_logits, forward_train, logits_train, Batch, Buffers, BuffersOf, Saved,
};
