//! Training: a forward that keeps activations, the exact backward, loss and optimizers.

mod graph;
pub mod optim;

pub use graph::{Precision, TrainGraph};
pub use optim::{AdamW, Optimizer, Param, Sgd};
