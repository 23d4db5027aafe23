//! `lugh.autograd.Tensor`, `lugh.train.forward` / `cross_entropy_loss`, and the optimizers.

use std::sync::{Arc, Mutex};

use numpy::{PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use super::convert::{array1, array2, tokens, type_name};
use super::errors::IntoPyResult;
use super::inference::PyInference;
use super::lora::adapters;
use crate::infer::Inference;
use crate::lora::LoraAdapter;
use crate::ops::loss::{count_scored, cross_entropy_in_place};
use crate::train::optim::{self, Param};
use crate::train::{Precision, TrainGraph};

/// The logits of a training forward and the graph that can back-propagate through them.
struct LogitsNode {
    inf: Arc<Inference>,
    graph: Mutex<Option<TrainGraph>>,
    logits: Vec<f32>,
    n_vocab: usize,
}

/// A loss and dL/dlogits, waiting for `backward()`.
struct LossNode {
    logits: Arc<LogitsNode>,
    value: f64,
    d_logits: Mutex<Option<Vec<f32>>>,
}

enum TensorKind {
    Param(Param),
    Logits(Arc<LogitsNode>),
    Loss(Arc<LossNode>),
}

/// A tensor of lugh's training: an adapter matrix (a view of the adapter's own weights, which
/// optimizers update in place), the logits of `lugh.train.forward`, or a loss.
#[pyclass(name = "Tensor", module = "lugh.autograd", frozen)]
pub struct PyTensor {
    kind: TensorKind,
}

impl PyTensor {
    pub fn param(param: Param) -> PyTensor {
        PyTensor {
            kind: TensorKind::Param(param),
        }
    }

    fn as_param(&self) -> Option<&Param> {
        match &self.kind {
            TensorKind::Param(p) => Some(p),
            _ => None,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[pymethods]
impl PyTensor {
    #[getter]
    fn shape(&self) -> Vec<usize> {
        match &self.kind {
            TensorKind::Param(p) => p.shape().to_vec(),
            TensorKind::Logits(l) => vec![l.logits.len() / l.n_vocab, l.n_vocab],
            TensorKind::Loss(_) => vec![],
        }
    }

    /// True for adapter matrices and for what is computed from them.
    #[getter]
    fn requires_grad(&self) -> bool {
        true
    }

    /// The accumulated gradient (adapter matrices), or None before any backward.
    #[getter]
    fn grad<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        match &self.kind {
            TensorKind::Param(p) => p.grad().map(|g| array2(py, g, p.shape()[1])).transpose(),
            _ => Ok(None),
        }
    }

    /// A copy of the values as a float32 array.
    fn numpy<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match &self.kind {
            TensorKind::Param(p) => array2(py, p.data(), p.shape()[1]),
            TensorKind::Logits(l) => array2(py, l.logits.clone(), l.n_vocab),
            TensorKind::Loss(l) => Ok(array1(py, vec![l.value as f32])
                .reshape(Vec::<usize>::new())?
                .into_any()),
        }
    }

    /// Replaces an adapter matrix's values (same shape).
    fn set_data(&self, data: PyReadonlyArrayDyn<'_, f32>) -> PyResult<()> {
        let param = self
            .as_param()
            .ok_or_else(|| PyValueError::new_err("set_data works on adapter matrices only"))?;
        if data.shape() != param.shape() {
            return Err(PyValueError::new_err(format!(
                "{}: set_data got shape {:?}, expected {:?}",
                param.name(),
                data.shape(),
                param.shape()
            )));
        }
        let values: Vec<f32> = data.as_array().iter().copied().collect();
        param.set_data(&values).py()
    }

    /// Zeroes the gradient.
    fn zero_grad(&self) {
        if let Some(p) = self.as_param() {
            p.zero_grad()
        }
    }

    /// The value of a one-element tensor (a loss).
    fn item(&self) -> PyResult<f64> {
        match &self.kind {
            TensorKind::Loss(l) => Ok(l.value),
            _ => Err(PyValueError::new_err(
                "item() needs a one-element tensor (a loss)",
            )),
        }
    }

    /// Back-propagates a loss: adds exact dL/dA and dL/dB to every trainable adapter's
    /// gradients. Runs once per loss; frees the forward's activations.
    fn backward(&self, py: Python<'_>) -> PyResult<()> {
        let TensorKind::Loss(loss) = &self.kind else {
            return Err(PyRuntimeError::new_err(
                "backward() starts from a loss (lugh.train.cross_entropy_loss)",
            ));
        };
        let d_logits = lock(&loss.d_logits)
            .take()
            .ok_or_else(|| PyRuntimeError::new_err("backward() already ran for this loss"))?;
        let graph = lock(&loss.logits.graph).take().ok_or_else(|| {
            PyRuntimeError::new_err("the forward's activations were freed by an earlier backward")
        })?;
        let inf = &loss.logits.inf;
        py.detach(|| graph.backward(inf, &d_logits)).py()
    }

    fn __repr__(&self) -> String {
        match &self.kind {
            TensorKind::Param(p) => format!("Tensor('{}', shape={:?})", p.name(), p.shape()),
            TensorKind::Logits(_) => format!("Tensor(logits, shape={:?})", self.shape()),
            TensorKind::Loss(l) => format!("Tensor(loss={})", l.value),
        }
    }
}

/// Sequences from one token list or a list of token lists.
fn sequences(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Vec<u32>>> {
    let is_batch = (obj.is_instance_of::<PyList>() || obj.is_instance_of::<PyTuple>())
        && obj.try_iter()?.next().transpose()?.is_some_and(|first| {
            !first.is_instance_of::<pyo3::types::PyInt>()
                && first.hasattr("__len__").unwrap_or(false)
        });
    if is_batch {
        obj.try_iter()?.map(|s| tokens(&s?)).collect()
    } else {
        Ok(vec![tokens(obj)?])
    }
}

/// Training forward: logits `[n_tokens, n_vocab]`, keeping what the backward needs. `tokens`
/// is one sequence, or a list of sequences whose rows are stacked (no padding). With
/// `checkpoint`, only each block's input is kept and the rest recomputed in the backward.
/// `precision`: `"f32"` (exact) or `"bf16"` (the frozen weights' products in bf16).
#[pyfunction]
#[pyo3(signature = (inference, tokens, lora=None, checkpoint=false, precision="f32"))]
pub fn forward(
    py: Python<'_>,
    inference: &Bound<'_, PyInference>,
    tokens: &Bound<'_, PyAny>,
    lora: Option<&Bound<'_, PyAny>>,
    checkpoint: bool,
    precision: &str,
) -> PyResult<PyTensor> {
    let precision: Precision = precision.parse().py()?;
    let seqs = sequences(tokens)?;
    let adapters: Vec<Arc<LoraAdapter>> = adapters(lora)?;
    let inf = Arc::clone(&inference.get().inner);
    let (graph, logits) = py
        .detach(|| {
            let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
            let graph = TrainGraph::forward(&inf, &refs, &adapters, checkpoint, precision)?;
            let logits = graph.logits(&inf)?;
            Ok((graph, logits))
        })
        .py()?;
    let n_vocab = inf.config().n_vocab;
    Ok(PyTensor {
        kind: TensorKind::Logits(Arc::new(LogitsNode {
            inf,
            graph: Mutex::new(Some(graph)),
            logits,
            n_vocab,
        })),
    })
}

/// One fused training step over a batch of sequences: forward, mean cross-entropy (logits
/// one block of rows at a time), backward; gradients accumulate in the adapters. `targets`
/// defaults to next-token prediction within each sequence (last position masked). Gradients
/// are of the summed loss divided by `normalizer` (default: the batch's scored positions).
/// Returns (summed loss, scored positions). `precision` as for `forward`.
#[pyfunction]
#[pyo3(signature = (
    inference, sequences, lora, targets=None, normalizer=None, checkpoint=false, precision="f32"
))]
#[allow(clippy::too_many_arguments)]
pub fn train_step(
    py: Python<'_>,
    inference: &Bound<'_, PyInference>,
    sequences: &Bound<'_, PyAny>,
    lora: &Bound<'_, PyAny>,
    targets: Option<Vec<Vec<i64>>>,
    normalizer: Option<usize>,
    checkpoint: bool,
    precision: &str,
) -> PyResult<(f64, usize)> {
    let precision: Precision = precision.parse().py()?;
    let seqs = self::sequences(sequences)?;
    let targets = step_targets(&seqs, targets)?;
    let adapters = adapters(Some(lora))?;
    let inf = &inference.get().inner;
    py.detach(|| {
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        TrainGraph::forward(inf, &refs, &adapters, checkpoint, precision)?
            .loss_backward(inf, &targets, normalizer)
    })
    .py()
}

/// Targets given per sequence, or next-token targets (the last position masked).
fn step_targets(seqs: &[Vec<u32>], targets: Option<Vec<Vec<i64>>>) -> PyResult<Vec<i64>> {
    match targets {
        Some(t) if t.len() != seqs.len() => Err(PyValueError::new_err(format!(
            "{} target lists for {} sequences",
            t.len(),
            seqs.len()
        ))),
        Some(t) => Ok(t.concat()),
        None => Ok(seqs
            .iter()
            .flat_map(|s| {
                s.iter()
                    .skip(1)
                    .map(|&t| t as i64)
                    .chain([crate::ops::loss::IGNORE_INDEX])
            })
            .collect()),
    }
}

/// (summed next-token loss, scored positions) of sequences with `lora`, without gradients
/// (exact f32 math, activations of one block at a time).
#[pyfunction]
#[pyo3(signature = (inference, sequences, lora=None, targets=None))]
pub fn eval_loss(
    py: Python<'_>,
    inference: &Bound<'_, PyInference>,
    sequences: &Bound<'_, PyAny>,
    lora: Option<&Bound<'_, PyAny>>,
    targets: Option<Vec<Vec<i64>>>,
) -> PyResult<(f64, usize)> {
    let seqs = self::sequences(sequences)?;
    let targets = step_targets(&seqs, targets)?;
    let adapters = adapters(lora)?;
    let inf = &inference.get().inner;
    py.detach(|| {
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        TrainGraph::forward(inf, &refs, &adapters, true, Precision::F32)?.loss(inf, &targets)
    })
    .py()
}

/// Mean cross-entropy of `logits` (from `lugh.train.forward`) against `targets`, one per
/// row; `-100` masks a row.
#[pyfunction]
pub fn cross_entropy_loss(
    py: Python<'_>,
    logits: &Bound<'_, PyTensor>,
    targets: &Bound<'_, PyAny>,
) -> PyResult<PyTensor> {
    let TensorKind::Logits(node) = &logits.get().kind else {
        return Err(PyTypeError::new_err(
            "logits must come from lugh.train.forward",
        ));
    };
    let targets: Vec<i64> = match targets.extract::<PyReadonlyArrayDyn<'_, i64>>() {
        Ok(a) => a.as_array().iter().copied().collect(),
        Err(_) => targets.extract().map_err(|_| {
            PyTypeError::new_err(format!(
                "targets must be a sequence of ints, got {}",
                type_name(targets)
            ))
        })?,
    };
    let n_rows = node.logits.len() / node.n_vocab;
    if targets.len() != n_rows {
        return Err(PyValueError::new_err(format!(
            "{} targets for {n_rows} logits rows: give one target (or -100) per row",
            targets.len()
        )));
    }
    let n_scored = count_scored(&targets, node.n_vocab).py()?;
    let (value, d_logits) = py.detach(|| {
        let mut d = node.logits.clone();
        let sum = node
            .inf
            .install(|| cross_entropy_in_place(&mut d, node.n_vocab, &targets, n_scored));
        (sum / n_scored as f64, d)
    });
    Ok(PyTensor {
        kind: TensorKind::Loss(Arc::new(LossNode {
            logits: Arc::clone(node),
            value,
            d_logits: Mutex::new(Some(d_logits)),
        })),
    })
}

/// Adapter matrices from a list of `Tensor`s (or a trainable `LoRA`).
pub fn params(obj: &Bound<'_, PyAny>) -> PyResult<Vec<Param>> {
    if let Ok(lora) = obj.cast::<super::lora::PyLoRA>() {
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

/// Scales gradients to a joint L2 norm of at most `max_norm`; returns the norm before.
#[pyfunction]
pub fn clip_grad_norm(params: &Bound<'_, PyAny>, max_norm: f32) -> PyResult<f32> {
    Ok(optim::clip_grad_norm(&self::params(params)?, max_norm))
}

/// Clamps every gradient element to `[-max_value, max_value]`.
#[pyfunction]
pub fn clip_grad_value(params: &Bound<'_, PyAny>, max_value: f32) -> PyResult<()> {
    optim::clip_grad_value(&self::params(params)?, max_value);
    Ok(())
}
