//! `lugh.autograd.Tensor`: adapter matrices, and the logits and losses of a training
//! forward that back-propagate into them.

use std::sync::{Arc, Mutex};

use numpy::{PyArrayMethods, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;

use super::convert::{array1, array2};
use super::errors::IntoPyResult;
use crate::infer::Inference;
use crate::ops::loss::{count_scored, cross_entropy_in_place};
use crate::train::optim::Param;
use crate::train::TrainGraph;

/// The logits of a training forward and the graph that can back-propagate through them.
pub(super) struct LogitsNode {
    inf: Arc<Inference>,
    graph: Mutex<Option<TrainGraph>>,
    logits: Vec<f32>,
    n_vocab: usize,
}

impl LogitsNode {
    /// Rows of logits (tokens).
    pub(super) fn n_rows(&self) -> usize {
        self.logits.len() / self.n_vocab
    }

    /// The mean cross-entropy against `targets` (one per row, `IGNORE_INDEX` to mask): a loss
    /// whose `backward()` runs through these logits.
    pub(super) fn cross_entropy(
        self: &Arc<Self>,
        py: Python<'_>,
        targets: &[i64],
    ) -> PyResult<PyTensor> {
        let n_scored = count_scored(targets, self.n_vocab).py()?;
        let (value, d_logits) = py.detach(|| {
            let mut d = self.logits.clone();
            let sum = self
                .inf
                .install(|| cross_entropy_in_place(&mut d, self.n_vocab, targets, n_scored));
            (sum / n_scored as f64, d)
        });
        Ok(PyTensor {
            kind: TensorKind::Loss(Arc::new(LossNode {
                logits: Arc::clone(self),
                value,
                d_logits: Mutex::new(Some(d_logits)),
            })),
        })
    }
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

    /// The logits of a training forward by `inf`, with the graph `backward()` will run.
    pub(super) fn logits(inf: Arc<Inference>, graph: TrainGraph, logits: Vec<f32>) -> PyTensor {
        let n_vocab = inf.config().n_vocab;
        PyTensor {
            kind: TensorKind::Logits(Arc::new(LogitsNode {
                inf,
                graph: Mutex::new(Some(graph)),
                logits,
                n_vocab,
            })),
        }
    }

    /// The logits node, where this tensor is the logits of a training forward.
    pub(super) fn as_logits(&self) -> Option<&Arc<LogitsNode>> {
        match &self.kind {
            TensorKind::Logits(l) => Some(l),
            _ => None,
        }
    }

    pub(super) fn as_param(&self) -> Option<&Param> {
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
            TensorKind::Logits(l) => vec![l.n_rows(), l.n_vocab],
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
