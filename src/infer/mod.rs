//! Inference: forwards over a model with adapters, on a thread pool of its own.

mod generate;
mod pool;
pub mod sample;

use std::sync::{Arc, Mutex};

pub use generate::Generator;
pub use pool::{MemoryPool, Workspace};
pub use sample::Sampler;

use crate::error::{Error, Result};
use crate::lora::{LoraAdapter, LoraPlan, Numerics};
use crate::model::{Config, KvCache, Model, Saved};

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

/// A model ready to run: context size and threads fixed at creation.
pub struct Inference {
    model: Arc<Model>,
    n_ctx: usize,
    pool: rayon::ThreadPool,
    /// The activations of the last training forward, kept for the next one: a step then
    /// reuses its memory instead of faulting in (and zeroing) fresh pages, about a tenth of
    /// a step's time.
    spare_activations: SpareActivations,
}

/// A slot the activations of a finished training graph go back to.
pub(crate) type SpareActivations = Arc<Mutex<Option<Saved>>>;

impl Inference {
    /// `n_ctx` defaults to the model's training context, `n_threads` to every core.
    pub fn new(
        model: Arc<Model>,
        n_ctx: Option<usize>,
        n_threads: Option<usize>,
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
        Ok(Inference {
            model,
            n_ctx,
            pool,
            spare_activations: SpareActivations::default(),
        })
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
        KvCache::new(self.config(), n_ctx.unwrap_or(self.n_ctx))
    }

    pub fn create_memory_pool(&self) -> MemoryPool {
        MemoryPool::new(self.config(), self.n_ctx)
    }

    /// Logits `[n_vocab]` of the last position.
    pub fn forward(&self, tokens: &[u32], lora: Adapters) -> Result<Vec<f32>> {
        self.forward_pool(&mut self.create_memory_pool(), tokens, lora)
    }

    /// Logits `[n_tokens, n_vocab]` of every position.
    pub fn forward_all(&self, tokens: &[u32], lora: Adapters) -> Result<Vec<f32>> {
        let mut pool = self.create_memory_pool();
        let (ws, cache) = pool.parts();
        self.run(&[tokens], &mut [cache], &[lora], ws, Logits::All)
    }

    /// Continues `cache` with `tokens`: logits `[n_vocab]` of the last one.
    pub fn forward_cache(
        &self,
        cache: &mut KvCache,
        tokens: &[u32],
        lora: Adapters,
    ) -> Result<Vec<f32>> {
        let mut ws = Workspace::default();
        self.run(&[tokens], &mut [cache], &[lora], &mut ws, Logits::Last)
    }

    /// `forward` with the buffers of `pool`: once warm, allocates only the returned logits.
    pub fn forward_pool(
        &self,
        pool: &mut MemoryPool,
        tokens: &[u32],
        lora: Adapters,
    ) -> Result<Vec<f32>> {
        pool.check_fits(self.config())?;
        let (ws, cache) = pool.parts();
        cache.clear();
        self.run(&[tokens], &mut [cache], &[lora], ws, Logits::Last)
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
        let logits = self.run(
            sequences,
            &mut caches,
            lora,
            &mut Workspace::default(),
            Logits::Last,
        )?;
        let n_vocab = self.config().n_vocab;
        Ok(logits.chunks(n_vocab).map(<[f32]>::to_vec).collect())
    }

    /// Checks every input, then runs the batch.
    fn run(
        &self,
        sequences: &[&[u32]],
        caches: &mut [&mut KvCache],
        lora: &[Adapters],
        ws: &mut Workspace,
        logits: Logits,
    ) -> Result<Vec<f32>> {
        let config = self.config();
        for (tokens, cache) in sequences.iter().zip(caches.iter()) {
            self.check_tokens(tokens)?;
            cache.check_fits(config)?;
            cache.check_room(tokens.len())?;
        }
        for adapter in lora.iter().flat_map(|a| a.iter()) {
            adapter.check_fits(config)?;
        }
        ws.lay_out(sequences, caches, logits == Logits::All);
        let plan = LoraPlan::new(
            ws.spans()
                .iter()
                .zip(lora)
                .filter(|(_, adapters)| !adapters.is_empty())
                .map(|(span, adapters)| (span.rows.clone(), adapters.to_vec()))
                .collect(),
        );
        let (batch, rows, buffers) = ws.parts();
        self.pool.install(|| {
            self.model
                .forward_blocks(&batch, caches, &plan, Numerics::Ggml, buffers, None)?;
            self.model.head(buffers, rows)
        })
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
