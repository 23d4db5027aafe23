//! Keys and values of past positions, per layer, for one sequence.

use super::config::Config;
use crate::error::{Error, Result};

/// Per layer, the keys (after RoPE) and values of positions `0 .. n_cached`, each row
/// `[n_head_kv * head_dim]`. Memory grows with use, never beyond `n_ctx` positions.
#[derive(Debug, Clone)]
pub struct KvCache {
    n_ctx: usize,
    kv_dim: usize,
    n_cached: usize,
    keys: Vec<Vec<f32>>,   // [n_layer][n_cached * kv_dim]
    values: Vec<Vec<f32>>, // [n_layer][n_cached * kv_dim]
}

impl KvCache {
    pub fn new(config: &Config, n_ctx: usize) -> KvCache {
        KvCache {
            n_ctx,
            kv_dim: config.kv_dim(),
            n_cached: 0,
            keys: vec![Vec::new(); config.n_layer],
            values: vec![Vec::new(); config.n_layer],
        }
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn n_cached(&self) -> usize {
        self.n_cached
    }

    pub fn n_layer(&self) -> usize {
        self.keys.len()
    }

    /// Forgets every position; keeps the memory for reuse.
    pub fn clear(&mut self) {
        self.n_cached = 0;
    }

    /// Keeps only the first `n` positions (rewinding a sequence).
    pub fn truncate(&mut self, n: usize) {
        self.n_cached = self.n_cached.min(n);
    }

    /// Changes the capacity; positions beyond a smaller capacity are dropped.
    pub fn resize(&mut self, n_ctx: usize) {
        self.n_ctx = n_ctx;
        self.n_cached = self.n_cached.min(n_ctx);
        let max_len = self.max_len();
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            buf.truncate(max_len);
            buf.shrink_to(max_len);
        }
    }

    /// Values per layer at full context. `n_ctx` may be any size the caller or the file
    /// asked for (the memory is only taken as positions are stored): saturate, never wrap.
    fn max_len(&self) -> usize {
        self.n_ctx.saturating_mul(self.kv_dim)
    }

    /// Checks that this cache was made for a model of `config`'s shape.
    pub fn check_fits(&self, config: &Config) -> Result<()> {
        if self.n_layer() != config.n_layer || self.kv_dim != config.kv_dim() {
            return Err(Error::invalid(
                "cache",
                format!(
                    "this KV cache has {} layers of width {}, the model {} of width {}: was it made by another model's Inference?",
                    self.n_layer(),
                    self.kv_dim,
                    config.n_layer,
                    config.kv_dim()
                ),
            ));
        }
        Ok(())
    }

    /// Refuses `n_new` more positions if they would not fit.
    pub fn check_room(&self, n_new: usize) -> Result<()> {
        let needed = self.n_cached + n_new;
        if needed > self.n_ctx {
            return Err(Error::ContextOverflow {
                needed,
                n_ctx: self.n_ctx,
            });
        }
        Ok(())
    }

    /// Writes keys and values for positions `pos0 ..` of layer `il`.
    pub(crate) fn store(&mut self, il: usize, pos0: usize, keys: &[f32], values: &[f32]) {
        let end = pos0 * self.kv_dim + keys.len();
        let max_len = self.max_len();
        debug_assert!(end <= max_len);
        for (buf, rows) in [(&mut self.keys[il], keys), (&mut self.values[il], values)] {
            buf.truncate(pos0 * self.kv_dim);
            if buf.capacity() < end {
                // Grow geometrically, never past the context.
                let target = (2 * buf.capacity()).clamp(end, max_len);
                buf.reserve_exact(target - buf.len());
            }
            buf.extend_from_slice(rows);
        }
    }

    /// Keys of layer `il` for positions `0 .. n`.
    pub(crate) fn keys(&self, il: usize, n: usize) -> &[f32] {
        &self.keys[il][..n * self.kv_dim]
    }

    pub(crate) fn values(&self, il: usize, n: usize) -> &[f32] {
        &self.values[il][..n * self.kv_dim]
    }

    /// Records that positions up to `n_cached` are now stored in every layer.
    pub(crate) fn commit(&mut self, n_cached: usize) {
        self.n_cached = n_cached;
    }
}
