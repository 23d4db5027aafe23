//! `lugh.Server`: the OpenAI-compatible server, started from Python.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::convert::type_name;
use super::errors::IntoPyResult;
use super::inference::PyInference;
use super::lora::PyLoRA;
use crate::lora;
use crate::serve::{Limits, NamedAdapter, Options, Server};

/// Serves `inference` and the adapters of `lora` (name -> lugh.LoRA or adapter path) over
/// HTTP with OpenAI's API, until `stop()`. The server runs on threads of its own; `wait()`
/// blocks until it ends (Ctrl-C stops it).
#[pyclass(name = "Server", module = "lugh", frozen)]
pub struct PyServer {
    inner: Mutex<Server>,
    addr: std::net::SocketAddr,
}

#[pymethods]
impl PyServer {
    #[new]
    #[pyo3(signature = (inference, lora=None, *, host="127.0.0.1", port=8080, max_batch=16, max_prefill_tokens=2048, api_key=None, max_tokens=None, chat_template=None, model_name=None, max_body_bytes=4194304))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        inference: &Bound<'_, PyInference>,
        lora: Option<&Bound<'_, PyDict>>,
        host: &str,
        port: u16,
        max_batch: usize,
        max_prefill_tokens: usize,
        api_key: Option<String>,
        max_tokens: Option<usize>,
        chat_template: Option<String>,
        model_name: Option<String>,
        max_body_bytes: usize,
    ) -> PyResult<PyServer> {
        let inference = Arc::clone(&inference.get().inner);
        let mut adapters = Vec::new();
        for (name, value) in lora.into_iter().flat_map(|d| d.iter()) {
            let name: String = name
                .extract()
                .map_err(|_| PyTypeError::new_err("lora: adapter names must be strings"))?;
            let (source, adapter) = if let Ok(loaded) = value.cast::<PyLoRA>() {
                (
                    format!("{name} (in memory)"),
                    Arc::clone(&loaded.get().inner),
                )
            } else if let Ok(path) = value.extract::<PathBuf>() {
                let model = Arc::clone(inference.model());
                let loaded = py.detach(|| lora::load(&path, &model, 1.0)).py()?;
                (path.display().to_string(), Arc::new(loaded.adapter))
            } else {
                return Err(PyTypeError::new_err(format!(
                    "lora['{name}'] must be a lugh.LoRA or a path, got {}",
                    type_name(&value)
                )));
            };
            adapters.push(NamedAdapter {
                name,
                source,
                adapter,
            });
        }
        let options = Options {
            host: host.to_string(),
            port,
            limits: Limits {
                max_batch,
                max_prefill_tokens,
            },
            api_key,
            max_body_bytes,
            max_tokens,
            chat_template,
            model_name,
        };
        let server = py
            .detach(|| Server::start(inference, adapters, options))
            .py()?;
        Ok(PyServer {
            addr: server.addr(),
            inner: Mutex::new(server),
        })
    }

    /// The address it listens on.
    #[getter]
    fn host(&self) -> String {
        self.addr.ip().to_string()
    }

    /// The port it listens on (the one chosen when created with port=0).
    #[getter]
    fn port(&self) -> u16 {
        self.addr.port()
    }

    /// The base URL of the OpenAI API, e.g. "http://127.0.0.1:8080/v1".
    #[getter]
    fn url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    #[getter]
    fn running(&self) -> bool {
        self.lock().is_running()
    }

    /// Stops accepting requests, ends the ones in progress (their clients get an error),
    /// closes connections still open 2 s later, and returns when it has stopped.
    fn stop(&self, py: Python<'_>) {
        py.detach(|| self.lock().stop())
    }

    /// Blocks until the server stops; Ctrl-C (KeyboardInterrupt) stops it.
    fn wait(&self, py: Python<'_>) -> PyResult<()> {
        loop {
            if !py.detach(|| {
                std::thread::sleep(Duration::from_millis(100));
                self.lock().is_running()
            }) {
                return Ok(());
            }
            if let Err(interrupt) = py.check_signals() {
                self.stop(py);
                return Err(interrupt);
            }
        }
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    fn __exit__(
        &self,
        py: Python<'_>,
        _exc_type: Option<&Bound<'_, PyAny>>,
        _exc: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) {
        self.stop(py)
    }

    fn __repr__(&self) -> String {
        format!("Server(url='{}', running={})", self.url(), self.running())
    }
}

impl PyServer {
    fn lock(&self) -> std::sync::MutexGuard<'_, Server> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}
