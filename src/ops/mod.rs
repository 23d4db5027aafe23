//! The kernels the model needs, each forward with its backward beside it. Rows are tokens;
//! every function works on the current rayon pool.

pub mod activation;
pub mod attention;
mod bf16;
mod codebook;
mod disjoint;
pub(crate) mod exp;
mod f16;
pub mod gemm;
mod iq4;
pub mod loss;
pub mod matmul;
pub mod norm;
mod portable;
mod qmatmul;
pub mod quant;
pub mod rope;
pub mod scratch;

pub use matmul::{Numerics, Weight};
