//! The Python module `lugh._lugh`: PyO3 classes only. Arguments in, GIL released, core call,
//! results out; no math here.

mod convert;
mod errors;
mod inference;
mod lora;
mod model;

use pyo3::prelude::*;

#[pymodule]
fn _lugh(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add_class::<model::PyModel>()?;
    m.add_class::<inference::PyInference>()?;
    m.add_class::<inference::PyKVCache>()?;
    m.add_class::<inference::PyMemoryPool>()?;
    m.add_class::<lora::PyLoRA>()?;
    m.add_function(wrap_pyfunction!(lora::merge, m)?)?;
    Ok(())
}
