//! `lugh.Inference`, `lugh.KVCache`, `lugh.MemoryPool`.

use std::sync::{Arc, Mutex, MutexGuard};

use pyo3::exceptions::{PyTypeError, PyValueError};
use pyo3::prelude::*;

use super::convert::{array1, array2, tokens, type_name};
use super::errors::IntoPyResult;
use super::lora::{adapters, batch_adapters};
use super::model::PyModel;
use crate::device::Device;
use crate::infer::{Generator, Inference, MemoryPool, Sampler};
use crate::lora::LoraAdapter;
use crate::model::{KvCache, KvDtype};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn refs(adapters: &[Arc<LoraAdapter>]) -> Vec<&LoraAdapter> {
    adapters.iter().map(|a| a.as_ref()).collect()
}

/// Keys and values of past positions for one sequence; `forward_cache` continues it.
#[pyclass(name = "KVCache", module = "lugh", frozen)]
pub struct PyKVCache {
    inner: Mutex<KvCache>,
}

#[pymethods]
impl PyKVCache {
    /// Positions stored so far.
    #[getter]
    fn n_cached(&self) -> usize {
        lock(&self.inner).n_cached()
    }

    /// Positions the cache can hold.
    #[getter]
    fn n_ctx(&self) -> usize {
        lock(&self.inner).n_ctx()
    }

    #[getter]
    fn n_layer(&self) -> usize {
        lock(&self.inner).n_layer()
    }

    /// Forgets every position.
    fn clear(&self) {
        lock(&self.inner).clear()
    }

    /// Keeps only the first `n` positions (rewinds the sequence to them).
    fn truncate(&self, n: usize) {
        lock(&self.inner).truncate(n)
    }

    /// Changes the capacity to `n_ctx` positions (dropping positions beyond it).
    fn resize(&self, n_ctx: usize) -> PyResult<()> {
        if n_ctx == 0 {
            return Err(PyValueError::new_err("n_ctx must be at least 1"));
        }
        lock(&self.inner).resize(n_ctx);
        Ok(())
    }

    fn __repr__(&self) -> String {
        format!(
            "KVCache(n_cached={}, n_ctx={})",
            self.n_cached(),
            self.n_ctx()
        )
    }
}

/// Buffers reused across `forward_pool` calls: once warm, a forward allocates nothing but
/// its logits.
#[pyclass(name = "MemoryPool", module = "lugh", frozen)]
pub struct PyMemoryPool {
    inner: Mutex<MemoryPool>,
}

#[pymethods]
impl PyMemoryPool {
    /// Frees the buffers.
    fn reset(&self) {
        lock(&self.inner).reset()
    }

    /// Where the buffers live: the device of the inference that made the pool.
    #[getter]
    fn backend(&self) -> String {
        lock(&self.inner).device().to_string()
    }
}

fn sample(py: Python<'_>, logits: &[f32], sampler: crate::Result<Sampler>) -> PyResult<u32> {
    if logits.is_empty() {
        return Err(PyValueError::new_err("logits are empty"));
    }
    let mut sampler = sampler.py()?;
    Ok(py.detach(|| sampler.sample(logits)))
}

/// Tokens of `Inference.generate_iter`, decoded one per `next()` with the GIL released.
#[pyclass(name = "TokenStream", module = "lugh")]
pub struct PyTokenStream {
    inner: Mutex<Generator>,
}

#[pymethods]
impl PyTokenStream {
    fn __iter__(slf: PyRef<'_, Self>) -> PyRef<'_, Self> {
        slf
    }

    fn __next__(&self, py: Python<'_>) -> PyResult<Option<u32>> {
        py.detach(|| lock(&self.inner).next_token()).py()
    }

    /// Ends the generation early.
    fn close(&self) {
        lock(&self.inner).stop()
    }
}

/// Runs a model: forward passes (single, all positions, cached, pooled, batched), with
/// optional LoRA adapters. Every call releases the GIL.
#[pyclass(name = "Inference", module = "lugh", frozen)]
pub struct PyInference {
    pub(crate) inner: Arc<Inference>,
    model: Py<PyModel>,
}

impl PyInference {
    #[allow(clippy::too_many_arguments)]
    fn generator(
        &self,
        tokens: &Bound<'_, PyAny>,
        max_tokens: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        greedy: bool,
        eos_token: Option<i64>,
        lora: Option<&Bound<'_, PyAny>>,
        seed: Option<u64>,
    ) -> PyResult<Generator> {
        let prompt = super::convert::tokens(tokens)?;
        let temperature = if greedy { 0.0 } else { temperature };
        let sampler = Sampler::new(temperature, top_k, top_p, seed).py()?;
        let stop = match eos_token {
            Some(id) => u32::try_from(id).ok().into_iter().collect(),
            None => self.inner.model().end_of_generation().to_vec(),
        };
        Generator::new(
            Arc::clone(&self.inner),
            prompt,
            adapters(lora)?,
            sampler,
            max_tokens,
            stop,
        )
        .py()
    }
}

#[pymethods]
impl PyInference {
    /// `n_ctx`: context positions (default: the model's training context); `n_threads`:
    /// compute threads (default: every core); `device`: "cpu", "candle-cpu", "cuda[:N]",
    /// "metal[:N]" (the weights are uploaded once, here); `kv_cache_dtype`: what the KV
    /// caches it makes store keys and values as, "f32" (exact) or "f16" (half the memory and
    /// faster decoding at long contexts, as llama.cpp's default; CPU only).
    #[new]
    #[pyo3(signature = (model, n_ctx=None, n_threads=None, device="cpu", kv_cache_dtype="f32"))]
    fn new(
        py: Python<'_>,
        model: Bound<'_, PyModel>,
        n_ctx: Option<usize>,
        n_threads: Option<usize>,
        device: &str,
        kv_cache_dtype: &str,
    ) -> PyResult<Self> {
        let device: Device = device.parse().py()?;
        let kv_dtype = KvDtype::from_name(kv_cache_dtype).py()?;
        let weights = Arc::clone(&model.get().inner);
        let inner = py
            .detach(|| {
                Inference::on(weights, n_ctx, n_threads, device)?.with_kv_cache_dtype(kv_dtype)
            })
            .py()?;
        Ok(PyInference {
            inner: Arc::new(inner),
            model: model.unbind(),
        })
    }

    #[getter]
    fn model(&self, py: Python<'_>) -> Py<PyModel> {
        self.model.clone_ref(py)
    }

    #[getter]
    fn n_ctx(&self) -> usize {
        self.inner.n_ctx()
    }

    #[getter]
    fn n_threads(&self) -> usize {
        self.inner.n_threads()
    }

    /// Where the forwards run ("cpu", "candle-cpu", "cuda:0", ...).
    #[getter]
    fn device(&self) -> String {
        self.inner.device().to_string()
    }

    #[getter]
    fn n_vocab(&self) -> usize {
        self.inner.config().n_vocab
    }

    #[getter]
    fn n_embd(&self) -> usize {
        self.inner.config().n_embd
    }

    #[getter]
    fn n_layer(&self) -> usize {
        self.inner.config().n_layer
    }

    #[getter]
    fn n_head(&self) -> usize {
        self.inner.config().n_head
    }

    /// Logits `[n_vocab]` of the last position of `tokens`.
    #[pyo3(signature = (tokens, lora=None))]
    fn forward<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        lora: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (ids, lora) = (super::convert::tokens(tokens)?, adapters(lora)?);
        let logits = py.detach(|| self.inner.forward(&ids, &refs(&lora))).py()?;
        Ok(array1(py, logits).into_any())
    }

    /// Logits `[n_tokens, n_vocab]` of every position.
    #[pyo3(signature = (tokens, lora=None))]
    fn forward_all<'py>(
        &self,
        py: Python<'py>,
        tokens: &Bound<'py, PyAny>,
        lora: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (ids, lora) = (super::convert::tokens(tokens)?, adapters(lora)?);
        let logits = py
            .detach(|| self.inner.forward_all(&ids, &refs(&lora)))
            .py()?;
        array2(py, logits, self.inner.config().n_vocab)
    }

    /// A KV cache for `n_ctx` positions (default: this inference's `n_ctx`).
    #[pyo3(signature = (n_ctx=None))]
    fn create_kv_cache(&self, n_ctx: Option<usize>) -> PyResult<PyKVCache> {
        if n_ctx == Some(0) {
            return Err(PyValueError::new_err("n_ctx must be at least 1"));
        }
        Ok(PyKVCache {
            inner: Mutex::new(self.inner.create_kv_cache(n_ctx)),
        })
    }

    /// Continues `cache` with `tokens` (from position `cache.n_cached`): logits `[n_vocab]`
    /// of the last token. ValueError if the cache would overflow.
    #[pyo3(signature = (cache, tokens, lora=None))]
    fn forward_cache<'py>(
        &self,
        py: Python<'py>,
        cache: &Bound<'py, PyKVCache>,
        tokens: &Bound<'py, PyAny>,
        lora: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (ids, lora) = (super::convert::tokens(tokens)?, adapters(lora)?);
        let cache = cache.get();
        let logits = py
            .detach(|| {
                self.inner
                    .forward_cache(&mut lock(&cache.inner), &ids, &refs(&lora))
            })
            .py()?;
        Ok(array1(py, logits).into_any())
    }

    /// A memory pool for `forward_pool`.
    fn create_memory_pool(&self) -> PyMemoryPool {
        PyMemoryPool {
            inner: Mutex::new(self.inner.create_memory_pool()),
        }
    }

    /// `forward` with the buffers of `pool`.
    #[pyo3(signature = (pool, tokens, lora=None))]
    fn forward_pool<'py>(
        &self,
        py: Python<'py>,
        pool: &Bound<'py, PyMemoryPool>,
        tokens: &Bound<'py, PyAny>,
        lora: Option<&Bound<'py, PyAny>>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let (ids, lora) = (super::convert::tokens(tokens)?, adapters(lora)?);
        let pool = pool.get();
        let logits = py
            .detach(|| {
                self.inner
                    .forward_pool(&mut lock(&pool.inner), &ids, &refs(&lora))
            })
            .py()?;
        Ok(array1(py, logits).into_any())
    }

    /// Several sequences (of any lengths) in one batched computation; returns the last
    /// position's logits of each. `lora`: None, a LoRA or a list applied to all — or a list
    /// with exactly one entry per sequence (None, a LoRA or a list each). `caches`: one
    /// KVCache per sequence to continue.
    #[pyo3(signature = (sequences, lora=None, caches=None))]
    fn forward_batch<'py>(
        &self,
        py: Python<'py>,
        sequences: &Bound<'py, PyAny>,
        lora: Option<&Bound<'py, PyAny>>,
        caches: Option<Vec<Bound<'py, PyKVCache>>>,
    ) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let sequences: Vec<Vec<u32>> = sequences
            .try_iter()
            .map_err(|_| {
                PyTypeError::new_err(format!(
                    "sequences must be a list of token lists, got {}",
                    type_name(sequences)
                ))
            })?
            .map(|s| tokens(&s?))
            .collect::<PyResult<_>>()?;
        let lora = batch_adapters(lora, sequences.len())?;
        let caches: Option<Vec<&PyKVCache>> =
            caches.as_ref().map(|c| c.iter().map(|b| b.get()).collect());
        if let Some(caches) = &caches {
            for (i, a) in caches.iter().enumerate() {
                if caches[..i].iter().any(|b| std::ptr::eq(*a, *b)) {
                    return Err(PyValueError::new_err(
                        "the same KVCache is given for two sequences",
                    ));
                }
            }
        }
        let logits = py
            .detach(|| {
                let seq_refs: Vec<&[u32]> = sequences.iter().map(Vec::as_slice).collect();
                let lora_refs: Vec<Vec<&LoraAdapter>> = lora.iter().map(|l| refs(l)).collect();
                let lora_slices: Vec<&[&LoraAdapter]> =
                    lora_refs.iter().map(Vec::as_slice).collect();
                let mut guards: Option<Vec<MutexGuard<'_, KvCache>>> = caches
                    .as_ref()
                    .map(|c| c.iter().map(|c| lock(&c.inner)).collect());
                let cache_refs = guards
                    .as_mut()
                    .map(|g| g.iter_mut().map(|g| &mut **g).collect());
                self.inner
                    .forward_batch(&seq_refs, &lora_slices, cache_refs)
            })
            .py()?;
        Ok(logits
            .into_iter()
            .map(|l| array1(py, l).into_any())
            .collect())
    }

    /// Samples a token id: temperature, then the smallest set of tokens whose probability
    /// reaches `top_p`. Temperature 0 is greedy.
    #[pyo3(signature = (logits, temperature=0.8, top_p=0.95, seed=None))]
    fn sample_top_p(
        &self,
        py: Python<'_>,
        logits: Vec<f32>,
        temperature: f32,
        top_p: f32,
        seed: Option<u64>,
    ) -> PyResult<u32> {
        sample(py, &logits, Sampler::new(temperature, 0, top_p, seed))
    }

    /// Samples a token id among the `top_k` largest logits, after temperature. Temperature 0
    /// is greedy.
    #[pyo3(signature = (logits, temperature=0.8, top_k=40, seed=None))]
    fn sample_top_k(
        &self,
        py: Python<'_>,
        logits: Vec<f32>,
        temperature: f32,
        top_k: usize,
        seed: Option<u64>,
    ) -> PyResult<u32> {
        sample(py, &logits, Sampler::new(temperature, top_k, 1.0, seed))
    }

    /// Generates up to `max_tokens` after `tokens` (returned without the prompt): the prompt
    /// is run once into a KV cache, then each token is decoded from it. Sampling applies
    /// temperature, top-k, then top-p; `greedy` (or temperature 0) takes the argmax. Stops at
    /// `eos_token` (default: every end-of-generation token of the vocabulary, EOS and end of
    /// turn, as llama.cpp stops; a negative id: none), never returned. `callback(token, n)`
    /// runs after each token; a true return stops.
    #[pyo3(signature = (tokens, max_tokens=128, temperature=0.8, top_p=0.95, top_k=40, greedy=false, eos_token=None, callback=None, lora=None, seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate(
        &self,
        py: Python<'_>,
        tokens: &Bound<'_, PyAny>,
        max_tokens: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        greedy: bool,
        eos_token: Option<i64>,
        callback: Option<Bound<'_, PyAny>>,
        lora: Option<&Bound<'_, PyAny>>,
        seed: Option<u64>,
    ) -> PyResult<Vec<u32>> {
        let mut generator = self.generator(
            tokens,
            max_tokens,
            temperature,
            top_p,
            top_k,
            greedy,
            eos_token,
            lora,
            seed,
        )?;
        let mut out = Vec::new();
        while let Some(token) = py.detach(|| generator.next_token()).py()? {
            out.push(token);
            if let Some(callback) = &callback {
                if callback.call1((token, out.len()))?.is_truthy()? {
                    break;
                }
            }
        }
        Ok(out)
    }

    /// `generate` as an iterator that yields each token as it is decoded.
    #[pyo3(signature = (tokens, max_tokens=128, temperature=0.8, top_p=0.95, top_k=40, greedy=false, eos_token=None, lora=None, seed=None))]
    #[allow(clippy::too_many_arguments)]
    fn generate_iter(
        &self,
        tokens: &Bound<'_, PyAny>,
        max_tokens: usize,
        temperature: f32,
        top_p: f32,
        top_k: usize,
        greedy: bool,
        eos_token: Option<i64>,
        lora: Option<&Bound<'_, PyAny>>,
        seed: Option<u64>,
    ) -> PyResult<PyTokenStream> {
        let generator = self.generator(
            tokens,
            max_tokens,
            temperature,
            top_p,
            top_k,
            greedy,
            eos_token,
            lora,
            seed,
        )?;
        Ok(PyTokenStream {
            inner: Mutex::new(generator),
        })
    }

    fn __repr__(&self) -> String {
        format!(
            "Inference(n_ctx={}, n_threads={}, n_vocab={})",
            self.n_ctx(),
            self.n_threads(),
            self.n_vocab()
        )
    }
}

/// The devices this build offers on this machine: "cpu", "candle-cpu", then "cuda:N" /
/// "metal:N" for each GPU that opens.
#[pyfunction]
pub fn devices(py: Python<'_>) -> Vec<String> {
    py.detach(crate::device::devices)
        .iter()
        .map(Device::to_string)
        .collect()
}
