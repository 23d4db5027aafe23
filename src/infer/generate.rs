//! Generation: the prompt is run once into a KV cache, then each new token is decoded from
//! the cache (never re-running the sequence).

use std::sync::Arc;

use super::sample::Sampler;
use super::Inference;
use crate::error::Result;
use crate::lora::LoraAdapter;
use crate::model::KvCache;

/// A generation in progress; `next_token` yields one token at a time.
pub struct Generator {
    inf: Arc<Inference>,
    adapters: Vec<Arc<LoraAdapter>>,
    cache: KvCache,
    sampler: Sampler,
    /// Tokens that end the generation (not returned).
    stop: Vec<u32>,
    max_tokens: usize,
    produced: usize,
    /// Tokens to feed next: the prompt, then each sampled token.
    pending: Vec<u32>,
    done: bool,
}

impl Generator {
    pub fn new(
        inf: Arc<Inference>,
        prompt: Vec<u32>,
        adapters: Vec<Arc<LoraAdapter>>,
        sampler: Sampler,
        max_tokens: usize,
        stop: Vec<u32>,
    ) -> Result<Generator> {
        inf.check_tokens(&prompt)?;
        let cache = inf.create_kv_cache(None);
        cache.check_room(prompt.len())?;
        Ok(Generator {
            inf,
            adapters,
            cache,
            sampler,
            stop,
            max_tokens,
            produced: 0,
            pending: prompt,
            done: false,
        })
    }

    /// The next token, or None once `max_tokens` are out, a stop token was drawn (not returned) or
    /// the context is full.
    pub fn next_token(&mut self) -> Result<Option<u32>> {
        if self.done
            || self.produced >= self.max_tokens
            || self.cache.check_room(self.pending.len()).is_err()
        {
            self.done = true;
            return Ok(None);
        }
        let adapters: Vec<&LoraAdapter> = self.adapters.iter().map(|a| a.as_ref()).collect();
        let logits = self
            .inf
            .forward_cache(&mut self.cache, &self.pending, &adapters)?;
        let token = self.sampler.sample(&logits);
        if self.stop.contains(&token) {
            self.done = true;
            return Ok(None);
        }
        self.produced += 1;
        self.pending = vec![token];
        Ok(Some(token))
    }

    /// Stops the generation: later calls return None.
    pub fn stop(&mut self) {
        self.done = true;
    }
}
