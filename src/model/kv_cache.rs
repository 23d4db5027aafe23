//! Keys and values of past positions, per layer, for one sequence, on the device that
//! computes it.

use candle_core::Tensor;

use super::config::Config;
use crate::backend::Device;
use crate::error::{Error, Result};

/// Per layer, the keys (after RoPE) and values of positions `0 .. n_cached`, each row
/// `[n_head_kv * head_dim]`. Memory grows with use, never beyond `n_ctx` positions.
#[derive(Debug)]
pub struct KvCache {
    n_ctx: usize,
    kv_dim: usize,
    n_cached: usize,
    device: Device,
    store: Store,
}

#[derive(Debug)]
enum Store {
    /// `[n_layer][n_cached * kv_dim]` each.
    Host {
        keys: Vec<Vec<f32>>,
        values: Vec<Vec<f32>>,
    },
    /// Per layer, keys and values `[capacity, kv_dim]` on the device (None until first use).
    Tensors(Vec<Option<(Tensor, Tensor)>>),
}

impl Clone for KvCache {
    /// A copy that shares nothing (device buffers are written in place).
    fn clone(&self) -> KvCache {
        let store = match &self.store {
            Store::Host { keys, values } => Store::Host {
                keys: keys.clone(),
                values: values.clone(),
            },
            Store::Tensors(layers) => Store::Tensors(
                layers
                    .iter()
                    .map(|layer| {
                        layer
                            .as_ref()
                            .and_then(|(k, v)| Some((k.copy().ok()?, v.copy().ok()?)))
                    })
                    .collect(),
            ),
        };
        KvCache {
            store,
            device: self.device,
            ..*self
        }
    }
}

impl KvCache {
    /// A cache for the CPU backend.
    pub fn new(config: &Config, n_ctx: usize) -> KvCache {
        Self::on(config, n_ctx, Device::Cpu)
    }

    /// A cache for `device`: host memory for `Cpu`, device tensors otherwise.
    pub fn on(config: &Config, n_ctx: usize, device: Device) -> KvCache {
        let store = match device.is_candle() {
            false => Store::Host {
                keys: vec![Vec::new(); config.n_layer],
                values: vec![Vec::new(); config.n_layer],
            },
            true => Store::Tensors(vec![None; config.n_layer]),
        };
        KvCache {
            n_ctx,
            kv_dim: config.kv_dim(),
            n_cached: 0,
            device,
            store,
        }
    }

    pub fn n_ctx(&self) -> usize {
        self.n_ctx
    }

    pub fn n_cached(&self) -> usize {
        self.n_cached
    }

    pub fn n_layer(&self) -> usize {
        match &self.store {
            Store::Host { keys, .. } => keys.len(),
            Store::Tensors(layers) => layers.len(),
        }
    }

    pub fn device(&self) -> Device {
        self.device
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
        match &mut self.store {
            Store::Host { keys, values } => {
                for buf in keys.iter_mut().chain(values.iter_mut()) {
                    buf.truncate(max_len);
                    buf.shrink_to(max_len);
                }
            }
            Store::Tensors(layers) => {
                let mut lost = false;
                for layer in layers.iter_mut().filter(|l| l.is_some()) {
                    let (k, v) = layer.take().expect("filtered");
                    *layer = if k.dims()[0] <= n_ctx {
                        Some((k, v))
                    } else {
                        let shrink = |t: Tensor| t.narrow(0, 0, n_ctx)?.copy();
                        shrink(k).and_then(|k| Ok((k, shrink(v)?))).ok()
                    };
                    lost |= layer.is_none();
                }
                if lost {
                    self.n_cached = 0;
                }
            }
        }
    }

    /// Values per layer at full context. `n_ctx` may be any size the caller or the file
    /// asked for (the memory is only taken as positions are stored): saturate, never wrap.
    fn max_len(&self) -> usize {
        self.n_ctx.saturating_mul(self.kv_dim)
    }

    /// Checks that this cache was made for a model of `config`'s shape on `device`.
    pub fn check_fits(&self, config: &Config, device: Device) -> Result<()> {
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
        if self.device != device {
            return Err(Error::invalid(
                "cache",
                format!(
                    "this KV cache lives on '{}', the inference runs on '{device}': make it with that inference's create_kv_cache()",
                    self.device
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

    /// Writes keys and values for positions `pos0 ..` of layer `il` (host cache).
    pub(crate) fn store(&mut self, il: usize, pos0: usize, keys: &[f32], values: &[f32]) {
        let end = pos0 * self.kv_dim + keys.len();
        let max_len = self.max_len();
        debug_assert!(end <= max_len);
        let Store::Host {
            keys: all_keys,
            values: all_values,
        } = &mut self.store
        else {
            unreachable!("Inference checks the cache's device before a forward");
        };
        for (buf, rows) in [(&mut all_keys[il], keys), (&mut all_values[il], values)] {
            buf.truncate(pos0 * self.kv_dim);
            if buf.capacity() < end {
                // Grow geometrically, never past the context.
                let target = (2 * buf.capacity()).clamp(end, max_len);
                buf.reserve_exact(target - buf.len());
            }
            buf.extend_from_slice(rows);
        }
    }

    /// Keys of layer `il` for positions `0 .. n` (host cache).
    pub(crate) fn keys(&self, il: usize, n: usize) -> &[f32] {
        match &self.store {
            Store::Host { keys, .. } => &keys[il][..n * self.kv_dim],
            Store::Tensors(_) => unreachable!("Inference checks the cache's device"),
        }
    }

    pub(crate) fn values(&self, il: usize, n: usize) -> &[f32] {
        match &self.store {
            Store::Host { values, .. } => &values[il][..n * self.kv_dim],
            Store::Tensors(_) => unreachable!("Inference checks the cache's device"),
        }
    }

    /// Writes keys and values `[rows, kv_dim]` for positions `pos0 ..` of layer `il`
    /// (device cache), growing its buffers geometrically up to the context.
    pub(crate) fn store_tensors(
        &mut self,
        il: usize,
        pos0: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> candle_core::Result<()> {
        let end = pos0 + keys.dims()[0];
        let n_ctx = self.n_ctx;
        let Store::Tensors(layers) = &mut self.store else {
            unreachable!("Inference checks the cache's device before a forward");
        };
        let layer = &mut layers[il];
        let capacity = layer.as_ref().map_or(0, |(k, _)| k.dims()[0]);
        if capacity < end {
            let target = (2 * capacity).clamp(end, n_ctx.max(end));
            let grown = (
                Tensor::zeros((target, self.kv_dim), keys.dtype(), keys.device())?,
                Tensor::zeros((target, self.kv_dim), values.dtype(), values.device())?,
            );
            if let Some((k, v)) = layer.as_ref() {
                grown
                    .0
                    .slice_set(&k.narrow(0, 0, pos0.min(capacity))?, 0, 0)?;
                grown
                    .1
                    .slice_set(&v.narrow(0, 0, pos0.min(capacity))?, 0, 0)?;
            }
            *layer = Some(grown);
        }
        let (k, v) = layer.as_ref().expect("allocated above");
        k.slice_set(&keys.contiguous()?, 0, pos0)?;
        v.slice_set(&values.contiguous()?, 0, pos0)?;
        Ok(())
    }

    /// Keys and values of layer `il` for positions `0 .. n` (device cache).
    pub(crate) fn tensors(&self, il: usize, n: usize) -> candle_core::Result<(Tensor, Tensor)> {
        let Store::Tensors(layers) = &self.store else {
            unreachable!("Inference checks the cache's device");
        };
        let (k, v) = layers[il]
            .as_ref()
            .ok_or_else(|| candle_core::Error::Msg(format!("layer {il} has nothing cached")))?;
        Ok((k.narrow(0, 0, n)?, v.narrow(0, 0, n)?))
    }

    /// Records that positions up to `n_cached` are now stored in every layer.
    pub(crate) fn commit(&mut self, n_cached: usize) {
        self.n_cached = n_cached;
    }
}
