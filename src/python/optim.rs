//! `lugh.optim`: the `Optimizer` base class and its `AdamW` and `SGD` constructors.

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use super::autograd::PyTensor;
use super::convert::array1;
use super::errors::IntoPyResult;
use super::lora::params;
use crate::train::optim::{AdamState, Optimizer};
use crate::train::{AdamW, Sgd};

enum Kind {
    AdamW(AdamW),
    Sgd(Sgd),
}

impl Kind {
    fn core(&self) -> &dyn Optimizer {
        match self {
            Kind::AdamW(o) => o,
            Kind::Sgd(o) => o,
        }
    }

    fn core_mut(&mut self) -> &mut dyn Optimizer {
        match self {
            Kind::AdamW(o) => o,
            Kind::Sgd(o) => o,
        }
    }
}

/// An optimizer over adapter matrices; updates them in place with the GIL released.
#[pyclass(name = "Optimizer", module = "lugh.optim", subclass)]
pub struct PyOptimizer {
    kind: Kind,
}

#[pymethods]
impl PyOptimizer {
    /// One update of every parameter that has a gradient.
    fn step(&mut self, py: Python<'_>) {
        let core = self.kind.core_mut();
        py.detach(|| core.step())
    }

    /// Clears the gradients.
    fn zero_grad(&self) {
        self.kind.core().zero_grad()
    }

    #[getter]
    fn get_lr(&self) -> f32 {
        self.kind.core().lr()
    }

    #[setter]
    fn set_lr(&mut self, lr: f32) -> PyResult<()> {
        self.kind.core_mut().set_lr(lr).py()
    }

    #[getter]
    fn params(&self) -> Vec<PyTensor> {
        self.kind
            .core()
            .params()
            .iter()
            .cloned()
            .map(PyTensor::param)
            .collect()
    }

    /// Hyper-parameters and per-parameter state, to resume training.
    fn state_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let dict = PyDict::new(py);
        dict.set_item("lr", self.kind.core().lr())?;
        let per_param = PyList::empty(py);
        match &self.kind {
            Kind::AdamW(o) => {
                dict.set_item("betas", o.betas)?;
                dict.set_item("eps", o.eps)?;
                dict.set_item("weight_decay", o.weight_decay)?;
                for s in &o.state {
                    let entry = PyDict::new(py);
                    entry.set_item("step", s.step)?;
                    entry.set_item("exp_avg", array1(py, s.exp_avg.clone()))?;
                    entry.set_item("exp_avg_sq", array1(py, s.exp_avg_sq.clone()))?;
                    per_param.append(entry)?;
                }
            }
            Kind::Sgd(o) => {
                dict.set_item("momentum", o.momentum)?;
                dict.set_item("nesterov", o.nesterov)?;
                dict.set_item("weight_decay", o.weight_decay)?;
                for b in &o.buffers {
                    let entry = PyDict::new(py);
                    if let Some(b) = b {
                        entry.set_item("momentum_buffer", array1(py, b.clone()))?;
                    }
                    per_param.append(entry)?;
                }
            }
        }
        dict.set_item("state", per_param)?;
        Ok(dict)
    }

    /// Restores `state_dict()`'s output (for the same parameter list).
    fn load_state_dict(&mut self, state: &Bound<'_, PyDict>) -> PyResult<()> {
        let get = |k: &str| {
            state
                .get_item(k)?
                .ok_or_else(|| PyValueError::new_err(format!("state_dict has no '{k}'")))
        };
        let entries: Vec<Bound<'_, PyDict>> = get("state")?.extract()?;
        let n_params = self.kind.core().params().len();
        if entries.len() != n_params {
            return Err(PyValueError::new_err(format!(
                "state_dict is for {} parameters, this optimizer has {n_params}",
                entries.len()
            )));
        }
        let sizes: Vec<(String, usize)> = self
            .kind
            .core()
            .params()
            .iter()
            .map(|p| (p.name(), p.shape().iter().product()))
            .collect();
        let vector = |entry: &Bound<'_, PyDict>,
                      k: &str,
                      (name, n): &(String, usize)|
         -> PyResult<Option<Vec<f32>>> {
            let Some(value) = entry.get_item(k)? else {
                return Ok(None);
            };
            let v: Vec<f32> = value.extract()?;
            if v.len() != *n && !v.is_empty() {
                return Err(PyValueError::new_err(format!(
                    "{name}: '{k}' has {} values, expected {n}",
                    v.len()
                )));
            }
            Ok(Some(v))
        };
        match &mut self.kind {
            Kind::AdamW(o) => {
                let mut states = Vec::with_capacity(n_params);
                for (entry, size) in entries.iter().zip(&sizes) {
                    states.push(AdamState {
                        step: entry
                            .get_item("step")?
                            .map(|s| s.extract())
                            .transpose()?
                            .unwrap_or(0),
                        exp_avg: vector(entry, "exp_avg", size)?.unwrap_or_default(),
                        exp_avg_sq: vector(entry, "exp_avg_sq", size)?.unwrap_or_default(),
                    });
                }
                o.state = states;
                o.betas = get("betas")?.extract()?;
                o.eps = get("eps")?.extract()?;
                o.weight_decay = get("weight_decay")?.extract()?;
            }
            Kind::Sgd(o) => {
                o.buffers = entries
                    .iter()
                    .zip(&sizes)
                    .map(|(entry, size)| vector(entry, "momentum_buffer", size))
                    .collect::<PyResult<_>>()?;
                o.momentum = get("momentum")?.extract()?;
                o.nesterov = get("nesterov")?.extract()?;
                o.weight_decay = get("weight_decay")?.extract()?;
            }
        }
        self.set_lr(get("lr")?.extract()?)
    }
}

/// AdamW with PyTorch's update rule and defaults (`torch.optim.AdamW`).
#[pyclass(name = "AdamW", module = "lugh.optim", extends = PyOptimizer)]
pub struct PyAdamW;

#[pymethods]
impl PyAdamW {
    #[new]
    #[pyo3(signature = (params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01))]
    fn new(
        params: &Bound<'_, PyAny>,
        lr: f32,
        betas: (f32, f32),
        eps: f32,
        weight_decay: f32,
    ) -> PyResult<PyClassInitializer<Self>> {
        let inner = AdamW::new(self::params(params)?, lr, betas, eps, weight_decay).py()?;
        Ok(PyClassInitializer::from(PyOptimizer {
            kind: Kind::AdamW(inner),
        })
        .add_subclass(PyAdamW))
    }
}

/// SGD with momentum, Nesterov and weight decay, as `torch.optim.SGD`.
#[pyclass(name = "SGD", module = "lugh.optim", extends = PyOptimizer)]
pub struct PySgd;

#[pymethods]
impl PySgd {
    #[new]
    #[pyo3(signature = (params, lr=1e-3, momentum=0.0, nesterov=false, weight_decay=0.0))]
    fn new(
        params: &Bound<'_, PyAny>,
        lr: f32,
        momentum: f32,
        nesterov: bool,
        weight_decay: f32,
    ) -> PyResult<PyClassInitializer<Self>> {
        let inner = Sgd::new(self::params(params)?, lr, momentum, nesterov, weight_decay).py()?;
        Ok(PyClassInitializer::from(PyOptimizer {
            kind: Kind::Sgd(inner),
        })
        .add_subclass(PySgd))
    }
}
