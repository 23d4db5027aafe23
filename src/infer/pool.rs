//! A memory pool: the buffers of `Inference::forward_pool`, kept warm between calls.

use crate::error::Result;
use crate::model::{Config, KvCache, Workspace};

/// Activation buffers and a scratch KV cache. After the first call of a given length, a
/// forward through the pool allocates nothing but the logits it returns.
pub struct MemoryPool {
    workspace: Workspace,
    cache: KvCache,
}

impl MemoryPool {
    pub fn new(config: &Config, n_ctx: usize) -> MemoryPool {
        MemoryPool {
            workspace: Workspace::default(),
            cache: KvCache::new(config, n_ctx),
        }
    }

    pub(crate) fn check_fits(&self, config: &Config) -> Result<()> {
        self.cache.check_fits(config)
    }

    pub(crate) fn parts(&mut self) -> (&mut Workspace, &mut KvCache) {
        (&mut self.workspace, &mut self.cache)
    }

    /// Frees the buffers (they grow again on the next call).
    pub fn reset(&mut self) {
        self.workspace = Workspace::default();
        self.cache.clear();
        let n_ctx = self.cache.n_ctx();
        self.cache.resize(0);
        self.cache.resize(n_ctx);
    }

    /// Where the buffers live.
    pub fn backend(&self) -> &'static str {
        "cpu"
    }
}
