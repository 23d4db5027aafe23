//! `lugh.Tokenizer`.

use pyo3::exceptions::PyTypeError;
use pyo3::prelude::*;
use pyo3::types::PyDict;

use super::errors::IntoPyResult;
use super::model::PyModel;
use crate::tokenizer::Tokenizer;

/// The model's tokenizer, read from its GGUF metadata (SentencePiece or byte-level BPE),
/// giving the same ids as llama.cpp.
#[pyclass(name = "Tokenizer", module = "lugh", frozen)]
pub struct PyTokenizer {
    inner: Tokenizer,
}

#[pymethods]
impl PyTokenizer {
    #[new]
    fn new(py: Python<'_>, model: Bound<'_, PyModel>) -> PyResult<Self> {
        let model = &model.get().inner;
        let inner = py.detach(|| Tokenizer::from_gguf(model.file())).py()?;
        Ok(PyTokenizer { inner })
    }

    /// Token ids of `text`. `add_bos` adds the special tokens the vocabulary asks for (BOS
    /// for LLaMA); `parse_special` turns special-token texts such as "<s>" into their ids.
    #[pyo3(signature = (text, add_bos=true, parse_special=false))]
    fn encode(&self, py: Python<'_>, text: &str, add_bos: bool, parse_special: bool) -> Vec<u32> {
        py.detach(|| self.inner.encode(text, add_bos, parse_special))
    }

    /// The text of `ids` (special tokens dropped; invalid UTF-8 becomes U+FFFD).
    fn decode(&self, py: Python<'_>, ids: Vec<u32>) -> PyResult<String> {
        py.detach(|| self.inner.decode(&ids)).py()
    }

    /// The text of one token (a byte token may be part of a character).
    fn token_to_piece(&self, id: u32) -> PyResult<String> {
        let bytes = self.inner.token_to_piece(id, true).py()?;
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    /// Whether `id` ends generation (EOS, EOT, ...).
    fn is_eog(&self, id: u32) -> bool {
        self.inner.is_eog(id)
    }

    /// `messages` (`[{"role": ..., "content": ...}, ...]`) as the prompt text the model's chat
    /// template (or `template`) renders, as transformers' `apply_chat_template(...,
    /// tokenize=False)` does. `tools` and other keyword arguments become template variables
    /// (`enable_thinking=False`, `date_string=...`).
    #[pyo3(signature = (messages, add_generation_prompt=true, template=None, tools=None, **kwargs))]
    fn apply_chat_template(
        &self,
        py: Python<'_>,
        messages: &Bound<'_, PyAny>,
        add_generation_prompt: bool,
        template: Option<&str>,
        tools: Option<&Bound<'_, PyAny>>,
        kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<String> {
        let messages = to_json(py, messages, "messages")?;
        let mut extra = serde_json::Map::new();
        if let Some(kwargs) = kwargs {
            if let serde_json::Value::Object(map) =
                to_json(py, kwargs.as_any(), "keyword arguments")?
            {
                extra = map;
            }
        }
        if let Some(tools) = tools {
            extra.insert("tools".into(), to_json(py, tools, "tools")?);
        }
        py.detach(|| {
            self.inner
                .apply_chat_template(&messages, add_generation_prompt, template, &extra)
        })
        .py()
    }

    /// The text the chat template (or `template`) closes an assistant turn with
    /// ("<|im_end|>", "<|eot_id|>"), or None.
    #[pyo3(signature = (template=None))]
    fn end_of_turn(&self, py: Python<'_>, template: Option<&str>) -> PyResult<Option<String>> {
        py.detach(|| self.inner.end_of_turn(template)).py()
    }

    /// The chat template of the model's GGUF (`tokenizer.chat_template`), or None.
    #[getter]
    fn chat_template(&self) -> Option<String> {
        self.inner.chat_template().map(str::to_string)
    }

    #[getter]
    fn n_vocab(&self) -> usize {
        self.inner.n_vocab()
    }

    #[getter]
    fn bos_id(&self) -> Option<u32> {
        self.inner.bos_id()
    }

    #[getter]
    fn eos_id(&self) -> Option<u32> {
        self.inner.eos_id()
    }
}

/// A JSON-compatible Python value (dicts, lists, strings, numbers, None) as JSON.
fn to_json(py: Python<'_>, value: &Bound<'_, PyAny>, what: &str) -> PyResult<serde_json::Value> {
    let text: String = py
        .import("json")?
        .call_method1("dumps", (value,))
        .map_err(|e| PyTypeError::new_err(format!("{what} must be JSON-compatible: {e}")))?
        .extract()?;
    serde_json::from_str(&text).map_err(|e| PyTypeError::new_err(format!("{what}: {e}")))
}
