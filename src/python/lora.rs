//! `lugh.LoRA` and `lugh.merge`.

use std::path::PathBuf;
use std::sync::Arc;

use pyo3::exceptions::{PyKeyError, PyTypeError, PyUserWarning, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyString, PyTuple};

use super::autograd::PyTensor;
use super::convert::type_name;
use super::errors::IntoPyResult;
use super::model::{one_of, PyModel};
use crate::gguf::TensorType;
use crate::lora::{self, LoraAdapter};
use crate::model::{Model, Proj};
use crate::train::optim::Param;

/// A LoRA adapter: loaded from a llama.cpp GGUF file, a PEFT `adapter_model.safetensors` or
/// PEFT directory, or created for training. Applied as
/// `y = W x + (alpha / rank) * scale * B (A x)` (`alpha / sqrt(rank)` for rsLoRA).
#[pyclass(name = "LoRA", module = "lugh", frozen)]
pub struct PyLoRA {
    pub(crate) inner: Arc<LoraAdapter>,
    pub(crate) model: Arc<Model>,
}

fn finite(name: &str, v: f32) -> PyResult<f32> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(PyValueError::new_err(format!(
            "{name} must be a finite number, got {v}"
        )))
    }
}

/// The format an adapter's factors are held or saved in: "f32", "f16" or "bf16", or as
/// PyTorch and vLLM name them, "float32", "float16" or "bfloat16"; in any case.
fn factor_type(argument: &str, name: &str) -> PyResult<TensorType> {
    match name.to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(TensorType::F32),
        "f16" | "float16" => Ok(TensorType::F16),
        "bf16" | "bfloat16" => Ok(TensorType::BF16),
        _ => Err(PyValueError::new_err(format!(
            "invalid {argument} '{name}' (\"f32\", \"f16\" or \"bf16\")"
        ))),
    }
}

#[pymethods]
impl PyLoRA {
    /// Loads `adapter` (aliases `file=`, `path=`) for `model`. The format comes from the path:
    /// `.gguf`, `.safetensors` (with `adapter_config.json` beside it) or a PEFT directory.
    /// `dtype` `"f16"` or `"bf16"` (`"float16"`, `"bfloat16"`) rounds the factors to that
    /// format (inexact, as vLLM's `lora_dtype`; a decoded token then reads half the bytes);
    /// `None`, `"auto"` or `"f32"` keeps the file's values (an f16 or bf16 file is read in its
    /// own format either way).
    #[new]
    #[pyo3(signature = (adapter=None, model=None, scale=1.0, *, file=None, path=None, dtype=None))]
    fn new(
        py: Python<'_>,
        adapter: Option<PathBuf>,
        model: Option<Bound<'_, PyModel>>,
        scale: f32,
        file: Option<PathBuf>,
        path: Option<PathBuf>,
        dtype: Option<&str>,
    ) -> PyResult<PyLoRA> {
        let path = one_of(&["adapter", "file", "path"], vec![adapter, file, path])?;
        let model = model
            .ok_or_else(|| PyTypeError::new_err("missing argument: model (the base lugh.Model)"))?;
        let model = Arc::clone(&model.get().inner);
        let scale = finite("scale", scale)?;
        let dtype = dtype
            .filter(|&d| d != "auto")
            .map(|d| factor_type("dtype", d))
            .transpose()?;
        let loaded = py
            .detach(|| {
                let loaded = lora::load(&path, &model, scale)?;
                if let Some(dtype) = dtype {
                    loaded.adapter.round_factors(dtype)?;
                }
                Ok::<_, crate::error::Error>(loaded)
            })
            .py()?;
        for warning in &loaded.warnings {
            PyErr::warn(
                py,
                &py.get_type::<PyUserWarning>(),
                &std::ffi::CString::new(warning.as_str())?,
                1,
            )?;
        }
        Ok(PyLoRA {
            inner: Arc::new(loaded.adapter),
            model,
        })
    }

    /// A new trainable adapter on `targets` of every layer: A Kaiming-uniform (as PEFT), B
    /// zero. `rank` 1..256; targets among attn_q attn_k attn_v attn_output ffn_gate ffn_up
    /// ffn_down; `seed` makes the initialisation repeatable.
    #[staticmethod]
    #[pyo3(signature = (model, rank=16, alpha=32.0, scale=1.0, targets=None, seed=None))]
    fn create(
        py: Python<'_>,
        model: Bound<'_, PyModel>,
        rank: i64,
        alpha: f32,
        scale: f32,
        targets: Option<Bound<'_, PyAny>>,
        seed: Option<u64>,
    ) -> PyResult<PyLoRA> {
        let targets = match targets {
            None => vec![Proj::AttnQ, Proj::AttnV],
            Some(t) => parse_targets(&t)?,
        };
        let rank = usize::try_from(rank).map_err(|_| {
            PyValueError::new_err(format!(
                "invalid rank: {rank} is outside 1..={}",
                lora::MAX_RANK
            ))
        })?;
        let model = Arc::clone(&model.get().inner);
        let (alpha, scale) = (finite("alpha", alpha)?, finite("scale", scale)?);
        let adapter = py
            .detach(|| lora::create(&model, rank, alpha, scale, &targets, seed))
            .py()?;
        Ok(PyLoRA {
            inner: Arc::new(adapter),
            model,
        })
    }

    /// alpha: the numerator of the scaling (0 for llama.cpp adapters saved without one).
    #[getter]
    fn get_alpha(&self) -> f32 {
        self.inner.alpha()
    }

    #[setter]
    fn set_alpha(&self, alpha: f32) -> PyResult<()> {
        self.inner.set_alpha(finite("alpha", alpha)?);
        Ok(())
    }

    /// The user scale: 0.0 gives the base model exactly, 1.0 the adapter as trained.
    #[getter]
    fn get_scale(&self) -> f32 {
        self.inner.scale()
    }

    #[setter]
    fn set_scale(&self, scale: f32) -> PyResult<()> {
        self.inner.set_scale(finite("scale", scale)?);
        Ok(())
    }

    /// Number of A/B pairs.
    #[getter]
    fn n_weights(&self) -> usize {
        self.inner.n_pairs()
    }

    /// "gguf", "safetensors" or "trainable".
    #[getter]
    fn format(&self) -> &'static str {
        self.inner.format.name()
    }

    #[getter]
    fn trainable(&self) -> bool {
        self.inner.trainable()
    }

    #[getter]
    fn architecture(&self) -> String {
        self.inner.architecture.clone()
    }

    /// Whether the scaling is alpha / sqrt(rank) (rsLoRA).
    #[getter]
    fn use_rslora(&self) -> bool {
        self.inner.rule == lora::ScalingRule::AlphaOverSqrtRank
    }

    /// Adapted weights by their GGUF names ("blk.0.attn_q.weight", ...).
    fn weight_names(&self) -> Vec<String> {
        self.inner.weight_names()
    }

    /// The rank of the pair on weight `name`, or the rank all pairs share.
    #[pyo3(signature = (name=None))]
    fn rank(&self, name: Option<&str>) -> PyResult<usize> {
        match name {
            Some(name) => {
                let index = self.inner.pair_named(name).ok_or_else(|| {
                    PyKeyError::new_err(format!("the adapter has no pair on '{name}'"))
                })?;
                Ok(self.inner.pairs()[index].rank)
            }
            None => self.inner.common_rank().ok_or_else(|| {
                PyValueError::new_err("the pairs have different ranks: ask for one with rank(name)")
            }),
        }
    }

    /// Saves in llama.cpp's GGUF layout (the path must end with .gguf), atomically, the
    /// factors as `out_type` ("f32", "f16" or "bf16": rounded to nearest, as llama.cpp's
    /// `convert_lora_to_gguf.py --outtype`).
    #[pyo3(signature = (path, out_type="f32"))]
    fn save(&self, py: Python<'_>, path: PathBuf, out_type: &str) -> PyResult<()> {
        let out_type = factor_type("out_type", out_type)?;
        py.detach(|| self.inner.save_gguf(&path, out_type)).py()
    }

    /// Saves `adapter_model.safetensors` + `adapter_config.json` into `directory`.
    fn save_peft(&self, py: Python<'_>, directory: PathBuf) -> PyResult<()> {
        py.detach(|| self.inner.save_peft(&self.model, &directory))
            .py()
    }

    /// A trainable adapter with the same weights, alpha and scale.
    fn trainable_copy(&self, py: Python<'_>) -> PyLoRA {
        PyLoRA {
            inner: Arc::new(py.detach(|| self.inner.trainable_copy())),
            model: Arc::clone(&self.model),
        }
    }

    /// A view of one adapter matrix (`which` "a"/"A" or "b"/"B") as a
    /// `lugh.autograd.Tensor`: `set_data` changes the adapter; optimizers update it in place.
    #[pyo3(signature = (name, which="a"))]
    fn get_weight_tensor(&self, name: &str, which: &str) -> PyResult<PyTensor> {
        let half = match which {
            "a" | "A" => lora::Half::A,
            "b" | "B" => lora::Half::B,
            other => {
                return Err(PyValueError::new_err(format!(
                    "which must be \"a\" or \"b\", got {other:?}"
                )))
            }
        };
        crate::train::optim::require_trainable(&self.inner).py()?;
        let pair = self.inner.pair_named(name).ok_or_else(|| {
            PyValueError::new_err(format!(
                "the adapter has no pair on '{name}' (see weight_names())"
            ))
        })?;
        Ok(PyTensor::param(Param {
            adapter: Arc::clone(&self.inner),
            pair,
            half,
        }))
    }

    /// Every adapter matrix: A0, B0, A1, B1, ... (trainable adapters only).
    fn trainable_parameters(&self) -> PyResult<Vec<PyTensor>> {
        let params = Param::all_of(&self.inner).py()?;
        Ok(params.into_iter().map(PyTensor::param).collect())
    }

    /// Clears the accumulated gradients of every pair.
    fn zero_grad(&self) {
        self.inner.zero_grad()
    }

    fn __repr__(&self) -> String {
        format!(
            "LoRA(format={:?}, n_weights={}, alpha={}, scale={})",
            self.format(),
            self.n_weights(),
            self.get_alpha(),
            self.get_scale()
        )
    }
}

fn parse_targets(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Proj>> {
    let names: Vec<String> = if obj.is_instance_of::<PyString>() {
        vec![obj.extract()?]
    } else {
        obj.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "targets must be a sequence of names, got {}",
                type_name(obj)
            ))
        })?
    };
    names
        .iter()
        .map(|n| {
            Proj::from_name(n).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "invalid target '{n}': choose among {}",
                    lora::target_names()
                ))
            })
        })
        .collect()
}

/// Writes a GGUF whose weights include the adapters: `W + Σ scale·alpha/rank · B A`.
/// Weights keep their type (adapted ones requantized to it; Q8_0 for the codebook types, which
/// lugh cannot encode) unless `out_type` ("f32", "f16", ...) is given. Written atomically.
#[pyfunction]
#[pyo3(signature = (model, loras, path, out_type=None))]
pub fn merge(
    py: Python<'_>,
    model: Bound<'_, PyModel>,
    loras: Bound<'_, PyAny>,
    path: PathBuf,
    out_type: Option<&str>,
) -> PyResult<()> {
    let adapters = adapters(Some(&loras))?;
    let out_type = out_type
        .map(|t| {
            TensorType::from_name(t).ok_or_else(|| {
                PyValueError::new_err(format!(
                    "invalid out_type '{t}' (e.g. \"f32\", \"f16\", \"q8_0\")"
                ))
            })
        })
        .transpose()?;
    let model = Arc::clone(&model.get().inner);
    py.detach(|| {
        let refs: Vec<&LoraAdapter> = adapters.iter().map(|a| a.as_ref()).collect();
        lora::merge(&model, &refs, &path, out_type)
    })
    .py()
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
    if let Some(list) =
        obj.filter(|o| o.is_instance_of::<PyList>() || o.is_instance_of::<PyTuple>())
    {
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

/// Adapter matrices from a list of `Tensor`s (or a trainable `LoRA`).
pub fn params(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Param>> {
    if let Ok(lora) = obj.cast::<PyLoRA>() {
        return Param::all_of(&lora.get().inner).py();
    }
    obj.try_iter()
        .map_err(|_| PyTypeError::new_err("params must be a list of lugh.autograd.Tensor"))?
        .map(|item| {
            let item = item?;
            item.cast::<PyTensor>()
                .ok()
                .and_then(|t| t.get().as_param().cloned())
                .ok_or_else(|| {
                    PyTypeError::new_err(format!(
                        "params must be adapter tensors (lora.trainable_parameters()), got {}",
                        type_name(&item)
                    ))
                })
        })
        .collect()
}
