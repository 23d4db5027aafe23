//! `lugh.LoRA`.

use std::sync::Arc;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use super::convert::type_name;
use crate::lora::LoraAdapter;

/// A LoRA adapter: loaded from a llama.cpp GGUF file or a PEFT directory, or created for
/// training. Applied as `y = W x + (alpha / rank) * scale * B (A x)`.
#[pyclass(name = "LoRA", module = "lugh", frozen)]
pub struct PyLoRA {
    pub(crate) inner: Arc<LoraAdapter>,
}

/// `None`, a `LoRA`, or a list/tuple of them.
pub fn adapters(obj: Option<&Bound<'_, PyAny>>) -> PyResult<Vec<Arc<LoraAdapter>>> {
    let Some(obj) = obj.filter(|o| !o.is_none()) else {
        return Ok(Vec::new());
    };
    if let Ok(lora) = obj.cast::<PyLoRA>() {
        return Ok(vec![Arc::clone(&lora.get().inner)]);
    }
    if obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>() {
        return obj
            .try_iter()?
            .map(|item| {
                let item = item?;
                item.cast::<PyLoRA>()
                    .map(|l| Arc::clone(&l.get().inner))
                    .map_err(|_| lora_type_error(&item))
            })
            .collect();
    }
    Err(lora_type_error(obj))
}

fn lora_type_error(obj: &Bound<'_, PyAny>) -> PyErr {
    PyTypeError::new_err(format!(
        "lora must be None, a lugh.LoRA or a list of them, got {}",
        type_name(obj)
    ))
}

/// `forward_batch`'s `lora`: a list with one entry per sequence (each None, a LoRA or a list),
/// or anything `adapters` accepts, applied to every sequence.
pub fn batch_adapters(
    obj: Option<&Bound<'_, PyAny>>,
    n_sequences: usize,
) -> PyResult<Vec<Vec<Arc<LoraAdapter>>>> {
    if let Some(list) = obj.filter(|o| o.is_instance_of::<PyList>() || o.is_instance_of::<PyTuple>()) {
        if list.len()? == n_sequences {
            return list
                .try_iter()?
                .map(|entry| adapters(Some(&entry?)))
                .collect();
        }
    }
    let shared = adapters(obj)?;
    Ok(vec![shared; n_sequences])
}
