//! A memory pool: the buffers of `Inference::forward_pool`, kept warm between calls.

use crate::backend::AnyState;
use crate::device::Device;
use crate::error::Result;
use crate::model::{Config, KvCache, KvDtype, SeqSpan};
use crate::transformer::Batch;

/// Everything a forward needs besides the model and caches: the batch laid out end to end,
/// the rows whose logits are wanted, and the activation buffers.
#[derive(Default)]
pub struct Workspace {
    tokens: Vec<u32>,
    spans: Vec<SeqSpan>,
    logit_rows: Vec<usize>,
    /// The activation buffers of the backend that used them last.
    buffers: AnyState,
}

impl Workspace {
    /// Lays out `sequences` end to end, each continuing from its cache's position, and
    /// chooses the rows whose logits are wanted: every row, or each sequence's last.
    pub(crate) fn lay_out(
        &mut self,
        sequences: &[&[u32]],
        caches: &[&mut KvCache],
        every_row: bool,
    ) {
        self.tokens.clear();
        self.spans.clear();
        self.logit_rows.clear();
        for (tokens, cache) in sequences.iter().zip(caches) {
            let start = self.tokens.len();
            self.tokens.extend_from_slice(tokens);
            self.spans.push(SeqSpan {
                rows: start..self.tokens.len(),
                pos0: cache.n_cached(),
            });
            match every_row {
                true => self.logit_rows.extend(start..self.tokens.len()),
                false => self.logit_rows.push(self.tokens.len() - 1),
            }
        }
    }

    /// The laid-out batch and the buffers, borrowed together.
    pub(crate) fn parts(&mut self) -> (Batch<'_>, &[usize], &mut AnyState) {
        let batch = Batch {
            tokens: &self.tokens,
            seqs: &self.spans,
        };
        (batch, &self.logit_rows, &mut self.buffers)
    }
}

/// Activation buffers and a scratch KV cache. After the first call of a given length, a
/// forward through the pool allocates nothing but the logits it returns.
pub struct MemoryPool {
    workspace: Workspace,
    cache: KvCache,
}

impl MemoryPool {
    pub fn new(config: &Config, n_ctx: usize, device: Device, dtype: KvDtype) -> MemoryPool {
        MemoryPool {
            workspace: Workspace::default(),
            cache: KvCache::on(config, n_ctx, device, dtype),
        }
    }

    pub(crate) fn check_fits(&self, config: &Config, device: Device) -> Result<()> {
        self.cache.check_fits(config, device)
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
    pub fn device(&self) -> Device {
        self.cache.device()
    }
}
