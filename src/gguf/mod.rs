//! GGUF files (ggml's model format): reading over a memory mapping, writing atomically.

mod reader;
mod tensor_type;
mod value;
mod writer;

pub(crate) use reader::{not_a_regular_file, open_regular_file};
pub use reader::{ByteView, GgufFile, TensorInfo, DEFAULT_ALIGNMENT, MAX_DIMS};
pub use tensor_type::TensorType;
pub use value::{Value, ValueType};
pub use writer::{GgufWriter, TensorBytes};

#[cfg(test)]
mod tests;
