//! Python arguments to core types and core results to Python objects.

use numpy::{PyArray1, PyArrayMethods, PyReadonlyArray1};
use pyo3::exceptions::{PyIndexError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};

use crate::gguf::Value;

/// Token ids from a list/tuple of ints or a 1-D numpy integer array.
pub fn tokens(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u32>> {
    if obj.is_instance_of::<PyString>() || obj.is_instance_of::<PyBytes>() {
        return Err(PyTypeError::new_err(
            "tokens must be a sequence of token ids (ints), not a string: encode text with lugh.Tokenizer first",
        ));
    }
    let ids: Vec<i64> = if let Ok(array) = obj.extract::<PyReadonlyArray1<'_, i64>>() {
        array.as_array().to_vec()
    } else if let Ok(array) = obj.extract::<PyReadonlyArray1<'_, i32>>() {
        array.as_array().iter().map(|&t| t as i64).collect()
    } else {
        obj.extract::<Vec<i64>>().map_err(|_| {
            PyTypeError::new_err(format!(
                "tokens must be a sequence of ints, got {}",
                type_name(obj)
            ))
        })?
    };
    ids.into_iter()
        .map(|t| {
            u32::try_from(t).map_err(|_| {
                PyIndexError::new_err(format!("token id {t} is out of range (ids are >= 0)"))
            })
        })
        .collect()
}

pub fn type_name(obj: &Bound<'_, PyAny>) -> String {
    obj.get_type()
        .name()
        .map_or_else(|_| "?".to_string(), |n| n.to_string())
}

/// A 1-D float32 array owning `values`.
pub fn array1<'py>(py: Python<'py>, values: Vec<f32>) -> Bound<'py, PyArray1<f32>> {
    PyArray1::from_vec(py, values)
}

/// A `[rows, cols]` float32 array owning `values`.
pub fn array2<'py>(py: Python<'py>, values: Vec<f32>, cols: usize) -> PyResult<Bound<'py, PyAny>> {
    let rows = values.len() / cols.max(1);
    Ok(PyArray1::from_vec(py, values)
        .reshape([rows, cols])?
        .into_any())
}

/// A GGUF metadata value as a Python object (arrays as lists).
pub fn value_to_py<'py>(py: Python<'py>, value: &Value) -> PyResult<Bound<'py, PyAny>> {
    Ok(match value {
        Value::U8(v) => v.into_pyobject(py)?.into_any(),
        Value::I8(v) => v.into_pyobject(py)?.into_any(),
        Value::U16(v) => v.into_pyobject(py)?.into_any(),
        Value::I16(v) => v.into_pyobject(py)?.into_any(),
        Value::U32(v) => v.into_pyobject(py)?.into_any(),
        Value::I32(v) => v.into_pyobject(py)?.into_any(),
        Value::U64(v) => v.into_pyobject(py)?.into_any(),
        Value::I64(v) => v.into_pyobject(py)?.into_any(),
        Value::F32(v) => v.into_pyobject(py)?.into_any(),
        Value::F64(v) => v.into_pyobject(py)?.into_any(),
        Value::Bool(v) => v.into_pyobject(py)?.to_owned().into_any(),
        Value::String(s) => PyString::new(py, s).into_any(),
        Value::Array { items, .. } => {
            let list = PyList::empty(py);
            for item in items {
                list.append(value_to_py(py, item)?)?;
            }
            list.into_any()
        }
    })
}

/// A dict from string keys.
pub fn dict<'py>(
    py: Python<'py>,
    entries: &[(&str, Bound<'py, PyAny>)],
) -> PyResult<Bound<'py, PyDict>> {
    let dict = PyDict::new(py);
    for (k, v) in entries {
        dict.set_item(k, v)?;
    }
    Ok(dict)
}
