//! `lugh.Model`.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::{PyKeyError, PyTypeError};
use pyo3::prelude::*;
use pyo3::types::PyList;

use super::convert::{dict, value_to_py};
use super::errors::IntoPyResult;
use crate::model::Model;

/// A GGUF model file, memory-mapped. Any GGUF opens (vocabulary-only files too); a file with
/// tensors must be a complete model of a supported architecture (llama, qwen2, qwen3).
#[pyclass(name = "Model", module = "lugh", frozen)]
pub struct PyModel {
    pub(crate) inner: Arc<Model>,
}

/// Exactly one of several aliases for the same argument (`Model(path)`, `Model(file=...)`).
pub fn one_of<T>(names: &[&str], values: Vec<Option<T>>) -> PyResult<T> {
    let mut given: Vec<(usize, T)> = values
        .into_iter()
        .enumerate()
        .filter_map(|(i, v)| v.map(|v| (i, v)))
        .collect();
    match given.len() {
        1 => Ok(given.pop().map(|(_, v)| v).expect("one value")),
        0 => Err(PyTypeError::new_err(format!(
            "missing argument: give one of {}",
            names.join(", ")
        ))),
        _ => Err(PyTypeError::new_err(format!(
            "give only one of {}",
            given
                .iter()
                .map(|(i, _)| names[*i])
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

#[pymethods]
impl PyModel {
    /// Opens `path` (aliases: `model=`, `file=`). With `use_mmap` (default) weights are served
    /// from the mapping; without, the file is read into memory.
    #[new]
    #[pyo3(signature = (path=None, use_mmap=true, *, model=None, file=None))]
    fn new(
        py: Python<'_>,
        path: Option<PathBuf>,
        use_mmap: bool,
        model: Option<PathBuf>,
        file: Option<PathBuf>,
    ) -> PyResult<PyModel> {
        let path = one_of(&["path", "model", "file"], vec![path, model, file])?;
        let inner = py.detach(|| Model::open(&path, use_mmap)).py()?;
        Ok(PyModel {
            inner: Arc::new(inner),
        })
    }

    #[getter]
    fn filename(&self) -> String {
        self.inner.path().display().to_string()
    }

    /// `general.architecture` ("llama", "qwen2", ...).
    #[getter]
    fn architecture(&self) -> Option<String> {
        self.inner.architecture().map(str::to_string)
    }

    #[getter]
    fn n_vocab(&self) -> usize {
        self.inner.n_vocab()
    }

    #[getter]
    fn n_embd(&self) -> Option<usize> {
        self.inner.config().map(|c| c.n_embd)
    }

    #[getter]
    fn n_layer(&self) -> Option<usize> {
        self.inner.config().map(|c| c.n_layer)
    }

    #[getter]
    fn n_head(&self) -> Option<usize> {
        self.inner.config().map(|c| c.n_head)
    }

    #[getter]
    fn n_head_kv(&self) -> Option<usize> {
        self.inner.config().map(|c| c.n_head_kv)
    }

    #[getter]
    fn head_dim(&self) -> Option<usize> {
        self.inner.config().map(|c| c.head_dim)
    }

    #[getter]
    fn n_ff(&self) -> Option<usize> {
        self.inner.config().map(|c| c.n_ff)
    }

    #[getter]
    fn n_ctx_train(&self) -> Option<usize> {
        self.inner.config().map(|c| c.n_ctx_train)
    }

    #[getter]
    fn rope_freq_base(&self) -> Option<f32> {
        self.inner.config().map(|c| c.rope_freq_base)
    }

    #[getter]
    fn rms_eps(&self) -> Option<f32> {
        self.inner.config().map(|c| c.rms_eps)
    }

    #[getter]
    fn n_tensors(&self) -> usize {
        self.inner.file().tensors().len()
    }

    #[getter]
    fn n_kv(&self) -> usize {
        self.inner.file().metadata().len()
    }

    /// Tensor names in file order.
    fn tensor_names(&self) -> Vec<String> {
        self.inner
            .file()
            .tensors()
            .iter()
            .map(|t| t.name.clone())
            .collect()
    }

    /// `{"type": "q4_k", "shape": [n_out, n_in], "n_bytes": int}`; KeyError if absent.
    fn tensor_info<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let info = self
            .inner
            .file()
            .tensor(name)
            .ok_or_else(|| PyKeyError::new_err(format!("no tensor named '{name}'")))?;
        Ok(dict(
            py,
            &[
                ("type", info.dtype.name().into_pyobject(py)?.into_any()),
                ("shape", PyList::new(py, &info.shape)?.into_any()),
                ("n_bytes", info.n_bytes.into_pyobject(py)?.into_any()),
            ],
        )?
        .into_any())
    }

    /// Metadata keys in file order.
    fn kv_keys(&self) -> Vec<String> {
        self.inner
            .file()
            .metadata()
            .iter()
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// A metadata value (arrays as lists); KeyError if absent.
    fn get_kv<'py>(&self, py: Python<'py>, key: &str) -> PyResult<Bound<'py, PyAny>> {
        let value = self
            .inner
            .file()
            .get(key)
            .ok_or_else(|| PyKeyError::new_err(format!("no metadata key '{key}'")))?;
        value_to_py(py, value)
    }

    fn __repr__(&self) -> String {
        format!(
            "Model('{}', architecture={:?}, n_vocab={}, n_layer={:?})",
            self.filename(),
            self.architecture().unwrap_or_default(),
            self.n_vocab(),
            self.n_layer().unwrap_or(0)
        )
    }
}
