//! The kernels the model needs, each forward with its backward beside it. Rows are tokens;
//! every function works on the current rayon pool.

pub mod activation;
pub mod attention;
pub mod gemm;
pub mod matmul;
pub mod norm;
mod qmatmul;
pub mod quant;
pub mod rope;
pub mod scratch;

pub use matmul::Weight;
