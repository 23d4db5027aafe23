//! Inference: forwards over a model with adapters, on a thread pool of its own.

mod awake;
mod generate;
mod pool;
pub mod sample;

use std::sync::{Arc, Mutex};

pub use generate::Generator;
pub use pool::{MemoryPool, Workspace};
pub use sample::Sampler;

use crate::backend::candle::CandleModel;
use crate::backend::{AnyState, Backend};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::lora::{LoraAdapter, LoraPlan, Scaled};
use crate::model::{Config, KvCache, KvDtype, Model};
use crate::ops::rope::Rope;
use crate::transformer::{forward_logits, Batch, BuffersOf};

/// Runs `$body` with `$b` bound to the backend of inference `$inf`: the body is compiled
/// once per backend (call generic functions from it).
macro_rules! with_backend {
    ($inf:expr, $b:ident => $body:expr) => {
        match $inf.engine() {
            $crate::infer::Engine::Cpu => {
                let $b = &$crate::backend::cpu::CpuBackend::new($inf.model(), $inf.rope())?;
                $body
            }
            $crate::infer::Engine::Candle(model) => {
                let $b = model.as_ref();
                $body
            }
        }
    };
}
pub(crate) use with_backend;

/// Which logits a forward returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Logits {
    /// The last position of each sequence.
    Last,
    /// Every position.
    All,
}

/// Adapters applied to one sequence (empty: the base model).
pub type Adapters<'a> = &'a [&'a LoraAdapter];

/// `lora` with each adapter at its own scale.
fn at_own_scale<'a>(lora: Adapters<'a>) -> Vec<Scaled<'a>> {
    lora.iter().map(|&a| (a, a.scale())).collect()
}

/// Each sequence's adapters at their own scale, read once per adapter for the whole batch: an
/// adapter on several sequences applies one scale to all of them while another thread changes
/// it.
fn at_own_scales<'a>(lora: &[Adapters<'a>]) -> Vec<Vec<Scaled<'a>>> {
    let mut read: Vec<Scaled<'a>> = Vec::new();
    let mut scale = |a: &'a LoraAdapter| match read.iter().find(|(b, _)| std::ptr::eq(*b, a)) {
        Some(&(_, s)) => s,
        None => {
            let s = a.scale();
            read.push((a, s));
            s
        }
    };
    lora.iter()
        .map(|l| l.iter().map(|&a| (a, scale(a))).collect())
        .collect()
}

/// What computes an inference's forwards.
pub(crate) enum Engine {
    /// lugh's kernels on the mapped weights.
    Cpu,
    /// The weights uploaded to a candle device.
    Candle(Box<CandleModel>),
}

/// A model ready to run: device, context size and threads fixed at creation.
pub struct Inference {
    model: Arc<Model>,
    n_ctx: usize,
    /// The model's RoPE for `n_ctx` positions.
    rope: Rope,
    pool: rayon::ThreadPool,
    engine: Engine,
    /// What the caches it makes store keys and values as.
    kv_dtype: KvDtype,
    /// The activations of the last training forward, kept for the next one: a step then
    /// reuses its memory instead of faulting in (and zeroing) fresh pages, about a tenth of
    /// a step's time.
    spare_activations: SpareActivations,
}

/// A slot the activations of a finished training graph go back to.
pub(crate) type SpareActivations = Arc<Mutex<AnyState>>;

impl Inference {
    /// On the CPU backend; see `on`.
    pub fn new(
        model: Arc<Model>,
        n_ctx: Option<usize>,
        n_threads: Option<usize>,
    ) -> Result<Inference> {
        Self::on(model, n_ctx, n_threads, Device::Cpu)
    }

    /// `n_ctx` defaults to the model's training context, `n_threads` to every core. A candle
    /// `device` gets the weights uploaded here, once.
    pub fn on(
        model: Arc<Model>,
        n_ctx: Option<usize>,
        n_threads: Option<usize>,
        device: Device,
    ) -> Result<Inference> {
        let (config, _) = model.runnable()?;
        let n_ctx = n_ctx.unwrap_or(config.n_ctx_train);
        if n_ctx == 0 {
            return Err(Error::invalid("n_ctx", "must be at least 1"));
        }
        let n_threads = match n_threads {
            Some(0) => return Err(Error::invalid("n_threads", "must be at least 1")),
            Some(n) => n,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(n_threads)
            .thread_name(|i| format!("lugh-{i}"))
            .build()
            .map_err(|e| Error::invalid("n_threads", e.to_string()))?;
        let rope = model.rope()?.for_context(n_ctx);
        let engine = match device {
            Device::Cpu => Engine::Cpu,
            device => Engine::Candle(Box::new(CandleModel::new(&model, device, rope.clone())?)),
        };
        Ok(Inference {
            model,
            n_ctx,
            rope,
            pool,
            engine,
            kv_dtype: KvDtype::F32,
            spare_activations: SpareActivations::default(),
        })
    }

    /// This inference with caches of `dtype` (f16 on the CPU backend only: candle devices
    /// keep their caches in the forward's dtype).
    pub fn with_kv_cache_dtype(self, dtype: KvDtype) -> Result<Inference> {
        if dtype != KvDtype::F32 && self.device().is_candle() {
            return Err(Error::invalid(
                "kv_cache_dtype",
                format!(
                    "'{}' is for device 'cpu' only; '{}' keeps its KV cache in the forward's dtype",
                    dtype.name(),
                    self.device()
                ),
            ));
        }
        Ok(Inference {
            kv_dtype: dtype,
            ..self
        })
    }

    /// What the caches this inference makes store keys and values as.
    pub fn kv_cache_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn config(&self) -> &Config {
        self.model
            .config()
            .expect("Inference::new checked the weights")
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    /// The RoPE the forwards use (LongRoPE's factors chosen for `n_ctx`).
    pub fn rope(&self) -> &Rope {
        &self.rope
    }

    /// Where the forwards run.
    pub fn device(&self) -> Device {
        match &self.engine {
            Engine::Cpu => Device::Cpu,
            Engine::Candle(model) => model.device(),
        }
    }

    pub(crate) fn engine(&self) -> &Engine {
        &self.engine
    }

    pub fn n_threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Where training graphs of this inference take their activation memory from and
    /// return it to.
    pub(crate) fn spare_activations(&self) -> &SpareActivations {
        &self.spare_activations
    }

    /// Runs `f` on this inference's threads.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    /// A cache for `n_ctx` positions (default: this inference's context).
    pub fn create_kv_cache(&self, n_ctx: Option<usize>) -> KvCache {
        let n_ctx = n_ctx.unwrap_or(self.n_ctx);
        KvCache::on(self.config(), n_ctx, self.device(), self.kv_dtype)
    }

    pub fn create_memory_pool(&self) -> MemoryPool {
        MemoryPool::new(self.config(), self.n_ctx, self.device(), self.kv_dtype)
    }

    /// Logits `[n_vocab]` of the last position.
    pub fn forward(&self, tokens: &[u32], lora: Adapters) -> Result<Vec<f32>> {
        self.forward_pool(&mut self.create_memory_pool(), tokens, lora)
    }

    /// Logits `[n_tokens, n_vocab]` of every position.
    pub fn forward_all(&self, tokens: &[u32], lora: Adapters) -> Result<Vec<f32>> {
        let mut pool = self.create_memory_pool();
        let (ws, cache) = pool.parts();
        self.run(
            &[tokens],
            &mut [cache],
            &[&at_own_scale(lora)],
            ws,
            Logits::All,
        )
    }

    /// Continues `cache` with `tokens`: logits `[n_vocab]` of the last one.
    pub fn forward_cache(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        lora: Adapters,
    ) -> Result<Vec<f32>> {
        let mut ws = Workspace::default();
        self.run(
            &[tokens],
            &mut [cache],
            &[&at_own_scale(lora)],
            &mut ws,
            Logits::Last,
        )
    }

    /// `forward` with the buffers of `pool`: once warm, allocates only the returned logits.
    pub fn forward_pool(
        &self,
        pool: &mut MemoryPool,
        tokens: &[u32],
        lora: Adapters,
    ) -> Result<Vec<f32>> {
        pool.check_fits(self.config(), self.device())?;
        let (ws, cache) = pool.parts();
        cache.clear();
        self.run(
            &[tokens],
            &mut [cache],
            &[&at_own_scale(lora)],
            ws,
            Logits::Last,
        )
    }

    /// Several sequences in one batched computation: every projection runs once over all
    /// their tokens; attention runs per sequence. `lora` has one entry per sequence. With
    /// `caches` (one per sequence) each sequence continues its cache. Returns the logits of
    /// each sequence's last position.
    pub fn forward_batch(
        &self,
        sequences: &[&[u32]],
        lora: &[Adapters],
        caches: Option<Vec<&mut KvCache>>,
    ) -> Result<Vec<Vec<f32>>> {
        if sequences.is_empty() {
            return Err(Error::Empty { what: "the batch" });
        }
        if lora.len() != sequences.len() {
            return Err(Error::invalid(
                "lora",
                format!(
                    "{} adapter entries for {} sequences",
                    lora.len(),
                    sequences.len()
                ),
            ));
        }
        let mut own_caches;
        let mut caches: Vec<&mut KvCache> = match caches {
            Some(caches) => {
                if caches.len() != sequences.len() {
                    return Err(Error::invalid(
                        "caches",
                        format!("{} caches for {} sequences", caches.len(), sequences.len()),
                    ));
                }
                caches
            }
            None => {
                own_caches = sequences
                    .iter()
                    .map(|s| self.create_kv_cache(Some(s.len().clamp(1, self.n_ctx))))
                    .collect::<Vec<_>>();
                own_caches.iter_mut().collect()
            }
        };
        let lora = at_own_scales(lora);
        let lora: Vec<&[Scaled]> = lora.iter().map(Vec::as_slice).collect();
        self.step(sequences, &lora, &mut caches, &mut Workspace::default())
    }

    /// One step of a scheduler that serves several requests: each sequence continues its
    /// cache with its tokens (a prompt, or the last sampled token) and its own adapters, each
    /// at the scale given. Returns the logits of each sequence's last position. A sequence's
    /// logits do not depend on the rest of the batch (the kernels work row by row).
    pub fn step(
        &self,
        sequences: &[&[u32]],
        lora: &[&[Scaled]],
        caches: &mut [&mut KvCache],
        ws: &mut Workspace,
    ) -> Result<Vec<Vec<f32>>> {
        if sequences.is_empty() {
            return Err(Error::Empty { what: "the batch" });
        }
        if lora.len() != sequences.len() || caches.len() != sequences.len() {
            return Err(Error::invalid(
                "batch",
                format!(
                    "{} sequences, {} adapter entries, {} caches",
                    sequences.len(),
                    lora.len(),
                    caches.len()
                ),
            ));
        }
        let logits = self.run(sequences, caches, lora, ws, Logits::Last)?;
        let n_vocab = self.config().n_vocab;
        Ok(logits.chunks(n_vocab).map(<[f32]>::to_vec).collect())
    }

    /// Checks every input, then runs the batch.
    fn run(
        &self,
        sequences: &[&[u32]],
        caches: &mut [&mut KvCache],
        lora: &[&[Scaled]],
        ws: &mut Workspace,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        let config = self.config();
        for (tokens, cache) in sequences.iter().zip(caches.iter()) {
            self.check_tokens(tokens)?;
            cache.check_fits(config, self.device())?;
            cache.check_room(tokens.len())?;
        }
        for (adapter, _) in lora.iter().flat_map(|a| a.iter()) {
            adapter.check_fits(config)?;
        }
        ws.lay_out(sequences, caches, logits == Logits::All);
        let (batch, rows, buffers) = ws.parts();
        let forward = || {
            // Made on the pool's thread: the plan holds the adapters' read locks, which stay
            // on the thread that took them.
            let plan = LoraPlan::scaled(
                batch
                    .seqs
                    .iter()
                    .zip(lora)
                    .filter(|(_, adapters)| !adapters.is_empty())
                    .map(|(span, adapters)| (span.rows.clone(), adapters.to_vec()))
                    .collect(),
            );
            with_backend!(self, b => run_on(b, &batch, caches, plan, buffers, rows))
        };
        match self.engine {
            Engine::Cpu => awake::install_awake(&self.pool, forward),
            Engine::Candle(_) => self.pool.install(forward),
        }
    }

    /// Refuses an empty token list or ids outside the vocabulary.
    pub fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if tokens.is_empty() {
            return Err(Error::Empty {
                what: "the token list",
            });
        }
        let n_vocab = self.config().n_vocab;
        match tokens.iter().find(|&&t| t as usize >= n_vocab) {
            Some(&token) => Err(Error::TokenOutOfRange {
                token: token as i64,
                n_vocab,
            }),
            None => Ok(()),
        }
    }
}

/// The logits of `rows` of one batch on backend `b`, with buffers kept in `buffers`.
fn run_on<B: Backend>(
    b: &B,
    batch: &Batch,
    caches: &mut [&mut KvCache],
    plan: LoraPlan,
    buffers: &mut AnyState,
    rows: &[usize],
) -> Result<Vec<f32>> {
    forward_logits(b, batch, caches, plan, buffers.get::<BuffersOf<B>>(), rows)
}
