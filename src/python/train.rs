//! `lugh.train.forward` / `cross_entropy_loss` / `train_step` / `eval_loss`, and gradient
//! clipping.

use std::sync::Arc;

use numpy::PyReadonlyArrayDyn;
use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use super::autograd::PyTensor;
use super::convert::{tokens, type_name};
use super::errors::IntoPyResult;
use super::inference::PyInference;
use super::lora::{adapters, params};
use crate::lora::LoraAdapter;
use crate::ops::loss::IGNORE_INDEX;
use crate::train::optim;
use crate::train::{Precision, TrainGraph};

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
    Ok(PyTensor::logits(inf, graph, logits))
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
            .flat_map(|s| s.iter().skip(1).map(|&t| t as i64).chain([IGNORE_INDEX]))
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
    let Some(node) = logits.get().as_logits() else {
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
    let n_rows = node.n_rows();
    if targets.len() != n_rows {
        return Err(PyValueError::new_err(format!(
            "{} targets for {n_rows} logits rows: give one target (or -100) per row",
            targets.len()
        )));
    }
    node.cross_entropy(py, &targets)
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
