//! GGUF v3 writer: metadata in insertion order, tensors aligned to `general.alignment`.
//! Files are written atomically; the `gguf` Python package and llama.cpp read them.

use std::io::Write;
use std::path::Path;

use super::reader::{ByteView, DEFAULT_ALIGNMENT, GGUF_MAGIC};
use super::tensor_type::TensorType;
use super::value::Value;
use crate::atomic_write::write_atomically;
use crate::error::{Error, Result};

/// Tensor bytes to write: a view of another file (copied through) or owned bytes.
pub enum TensorBytes {
    View(ByteView),
    Owned(Vec<u8>),
}

impl TensorBytes {
    fn bytes(&self) -> &[u8] {
        match self {
            TensorBytes::View(view) => view,
            TensorBytes::Owned(bytes) => bytes,
        }
    }
}

struct PendingTensor {
    name: String,
    dtype: TensorType,
    /// Row-major, outermost first.
    shape: Vec<usize>,
    data: TensorBytes,
}

#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, Value)>,
    tensors: Vec<PendingTensor>,
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// Sets a key, replacing an earlier value in place.
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        let value = value.into();
        match self.metadata.iter_mut().find(|(k, _)| k == key) {
            Some(entry) => entry.1 = value,
            None => self.metadata.push((key.to_string(), value)),
        }
    }

    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    pub fn add_tensor(
        &mut self,
        name: &str,
        dtype: TensorType,
        shape: &[usize],
        data: TensorBytes,
    ) -> Result<()> {
        let row = shape.last().copied().unwrap_or(1);
        let expected = dtype
            .row_bytes(row)
            .map(|b| b * shape.iter().rev().skip(1).product::<usize>());
        if expected != Some(data.bytes().len()) {
            return Err(Error::ShapeMismatch {
                name: name.to_string(),
                expected: shape.to_vec(),
                got: vec![data.bytes().len()],
            });
        }
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(Error::invalid("tensor", format!("'{name}' added twice")));
        }
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            dtype,
            shape: shape.to_vec(),
            data,
        });
        Ok(())
    }

    pub fn add_f32(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<()> {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add_tensor(name, TensorType::F32, shape, TensorBytes::Owned(bytes))
    }

    fn alignment(&self) -> usize {
        match self.metadata.iter().find(|(k, _)| k == "general.alignment") {
            Some((_, Value::U32(a))) if a.is_power_of_two() => *a as usize,
            _ => DEFAULT_ALIGNMENT,
        }
    }

    /// Writes the file atomically.
    pub fn write(&self, path: &Path) -> Result<()> {
        write_atomically(path, |out| self.write_to(out))
    }

    pub fn write_to(&self, out: &mut dyn Write) -> std::io::Result<()> {
        let alignment = self.alignment();
        let mut header = Vec::new();
        header.extend_from_slice(GGUF_MAGIC);
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            encode_string(key, &mut header);
            header.extend_from_slice(&value.value_type().id().to_le_bytes());
            encode_value(value, &mut header);
        }
        let mut data_offset = 0usize;
        for tensor in &self.tensors {
            encode_string(&tensor.name, &mut header);
            header.extend_from_slice(&(tensor.shape.len() as u32).to_le_bytes());
            for &dim in tensor.shape.iter().rev() {
                header.extend_from_slice(&(dim as u64).to_le_bytes());
            }
            header.extend_from_slice(&tensor.dtype.id().to_le_bytes());
            header.extend_from_slice(&(data_offset as u64).to_le_bytes());
            data_offset = pad(data_offset + tensor.data.bytes().len(), alignment);
        }
        header.resize(pad(header.len(), alignment), 0);
        out.write_all(&header)?;
        let zeros = vec![0u8; alignment];
        for tensor in &self.tensors {
            let bytes = tensor.data.bytes();
            out.write_all(bytes)?;
            out.write_all(&zeros[..pad(bytes.len(), alignment) - bytes.len()])?;
        }
        Ok(())
    }
}

fn pad(n: usize, alignment: usize) -> usize {
    n.div_ceil(alignment) * alignment
}

fn encode_string(s: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn encode_value(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::U8(v) => out.push(*v),
        Value::I8(v) => out.push(*v as u8),
        Value::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        Value::Bool(v) => out.push(*v as u8),
        Value::String(s) => encode_string(s, out),
        Value::Array { item_type, items } => {
            out.extend_from_slice(&item_type.id().to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                encode_value(item, out);
            }
        }
    }
}
