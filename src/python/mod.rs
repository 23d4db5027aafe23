//! The Python module `lugh._lugh`: PyO3 classes only. Arguments in, GIL released, core call,
//! results out; no math here.

mod autograd;
mod convert;
mod errors;
mod inference;
mod lora;
mod model;
mod optim;
mod serve;
mod tokenizer;
mod train;

use pyo3::prelude::*;

#[pymodule]
fn _lugh(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<inference::PyInference>()?;
    m.add_class::<inference::PyKVCache>()?;
    m.add_class::<inference::PyMemoryPool>()?;
    m.add_class::<inference::PyTokenStream>()?;
    m.add_class::<lora::PyLoRA>()?;
    m.add_class::<tokenizer::PyTokenizer>()?;
    m.add_class::<serve::PyServer>()?;
    m.add_function(wrap_pyfunction!(lora::merge, m)?)?;
    m.add_function(wrap_pyfunction!(inference::devices, m)?)?;
    m.add_class::<autograd::PyTensor>()?;
    m.add_class::<optim::PyOptimizer>()?;
    m.add_class::<optim::PyAdamW>()?;
    m.add_class::<optim::PySgd>()?;
    m.add_function(wrap_pyfunction!(train::forward, m)?)?;
    m.add_function(wrap_pyfunction!(train::cross_entropy_loss, m)?)?;
    m.add_function(wrap_pyfunction!(train::train_step, m)?)?;
    m.add_function(wrap_pyfunction!(train::eval_loss, m)?)?;
    m.add_function(wrap_pyfunction!(train::clip_grad_norm, m)?)?;
    m.add_function(wrap_pyfunction!(train::clip_grad_value, m)?)?;
    Ok(())
}
