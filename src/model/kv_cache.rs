//! Keys and values of past positions, per layer, for one sequence, on the device that
//! computes it.

use candle_core::Tensor;
use half::f16;

use super::config::Config;
use crate::backend::Device;
use crate::error::{Error, Result};
use crate::ops::attention::{KvElem, KvRows};

/// What a host cache stores keys and values as (llama.cpp's `type_k`/`type_v`, vLLM's
/// `kv_cache_dtype`). Device caches keep their tensors' dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// Exact: the keys and values the forward computed.
    #[default]
    F32,
    /// Rounded to f16 when stored: half the memory, and half the bytes a decoded token reads.
    F16,
}

impl KvDtype {
    /// `"f32"` or `"f16"`.
    pub fn from_name(name: &str) -> Result<KvDtype> {
        match name {
            "f32" => Ok(KvDtype::F32),
            "f16" => Ok(KvDtype::F16),
            _ => Err(Error::invalid(
                "kv_cache_dtype",
                format!("'{name}' is not a KV cache type: use \"f32\" (exact) or \"f16\" (half the memory, llama.cpp's default)"),
            )),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
        }
    }
}

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
    Host(HostRows),
    /// Per layer, keys and values `[capacity, kv_dim]` on the device (None until first use).
    Tensors(Vec<Option<(Tensor, Tensor)>>),
}

/// Host memory, in the cache's `KvDtype`.
#[derive(Debug, Clone)]
enum HostRows {
    F32(Layers<f32>),
    F16(Layers<f16>),
}

/// `[n_layer][n_cached * kv_dim]` each.
#[derive(Debug, Clone)]
struct Layers<T> {
    keys: Vec<Vec<T>>,
    values: Vec<Vec<T>>,
}

impl<T: KvElem> Layers<T> {
    fn new(n_layer: usize) -> Layers<T> {
        Layers {
            keys: vec![Vec::new(); n_layer],
            values: vec![Vec::new(); n_layer],
        }
    }

    fn buffers(&mut self) -> impl Iterator<Item = &mut Vec<T>> {
        self.keys.iter_mut().chain(self.values.iter_mut())
    }

    /// Rows from `start` (a value index) on, rounded to `T`, never growing past `max_len`.
    fn store(&mut self, il: usize, start: usize, max_len: usize, keys: &[f32], values: &[f32]) {
        let end = start + keys.len();
        debug_assert!(end <= max_len);
        for (buf, rows) in [(&mut self.keys[il], keys), (&mut self.values[il], values)] {
            buf.truncate(start);
            if buf.capacity() < end {
                // Grow geometrically, never past the context.
                let target = (2 * buf.capacity()).clamp(end, max_len);
                buf.reserve_exact(target - buf.len());
            }
            buf.resize(end, T::default());
            T::round_from(&mut buf[start..], rows);
        }
    }
}

impl Clone for KvCache {
    /// A copy that shares nothing (device buffers are written in place).
    fn clone(&self) -> KvCache {
        let store = match &self.store {
            Store::Host(rows) => Store::Host(rows.clone()),
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
    /// An exact cache for the CPU backend.
    pub fn new(config: &Config, n_ctx: usize) -> KvCache {
        Self::on(config, n_ctx, Device::Cpu, KvDtype::F32)
    }

    /// A cache for `device`: host memory of `dtype` for `Cpu`, device tensors otherwise
    /// (their dtype is the forward's; `Inference` refuses other than f32 there).
    pub fn on(config: &Config, n_ctx: usize, device: Device, dtype: KvDtype) -> KvCache {
        let n_layer = config.n_layer;
        let store = match (device.is_candle(), dtype) {
            (false, KvDtype::F32) => Store::Host(HostRows::F32(Layers::new(n_layer))),
            (false, KvDtype::F16) => Store::Host(HostRows::F16(Layers::new(n_layer))),
            (true, _) => Store::Tensors(vec![None; n_layer]),
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
            Store::Host(HostRows::F32(layers)) => layers.keys.len(),
            Store::Host(HostRows::F16(layers)) => layers.keys.len(),
            Store::Tensors(layers) => layers.len(),
        }
    }

    /// What the keys and values are stored as (device caches: f32, whatever their tensors').
    pub fn dtype(&self) -> KvDtype {
        match &self.store {
            Store::Host(HostRows::F16(_)) => KvDtype::F16,
            Store::Host(HostRows::F32(_)) | Store::Tensors(_) => KvDtype::F32,
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
            Store::Host(HostRows::F32(layers)) => shrink(layers.buffers(), max_len),
            Store::Host(HostRows::F16(layers)) => shrink(layers.buffers(), max_len),
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

    /// Writes keys and values for positions `pos0 ..` of layer `il` (host cache), rounded to
    /// the cache's dtype.
    pub(crate) fn store(&mut self, il: usize, pos0: usize, keys: &[f32], values: &[f32]) {
        let (start, max_len) = (pos0 * self.kv_dim, self.max_len());
        match &mut self.store {
            Store::Host(HostRows::F32(layers)) => layers.store(il, start, max_len, keys, values),
            Store::Host(HostRows::F16(layers)) => layers.store(il, start, max_len, keys, values),
            Store::Tensors(_) => {
                unreachable!("Inference checks the cache's device before a forward")
            }
        }
    }

    /// Keys and values of layer `il` for positions `0 .. n` (host cache).
    pub(crate) fn rows(&self, il: usize, n: usize) -> KvRows<'_> {
        let len = n * self.kv_dim;
        match &self.store {
            Store::Host(HostRows::F32(layers)) => KvRows::F32 {
                keys: &layers.keys[il][..len],
                values: &layers.values[il][..len],
            },
            Store::Host(HostRows::F16(layers)) => KvRows::F16 {
                keys: &layers.keys[il][..len],
                values: &layers.values[il][..len],
            },
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

/// Drops values beyond `max_len` and the memory that held them.
fn shrink<'a, T: 'a>(buffers: impl Iterator<Item = &'a mut Vec<T>>, max_len: usize) {
    for buf in buffers {
        buf.truncate(max_len);
        buf.shrink_to(max_len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::tiny_model_with;
    use crate::gguf::GgufFile;
    use crate::model::Model;

    #[test]
    fn f16_caches_round_to_nearest_even() {
        let model = Model::from_gguf(GgufFile::from_bytes(&tiny_model_with(&[])).unwrap()).unwrap();
        let config = model.config().unwrap();
        let kv_dim = config.kv_dim();
        // 1 + 2⁻¹¹ lies halfway between the f16s 1 and 1 + 2⁻¹⁰: the even one, 1, wins;
        // 1 + 3·2⁻¹¹ lies halfway between 1 + 2⁻¹⁰ and 1 + 2⁻⁹: 1 + 2⁻⁹ wins.
        let (tie_down, tie_up) = (1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11));
        let keys: Vec<f32> = (0..kv_dim).map(|i| [tie_down, tie_up][i % 2]).collect();
        let values = vec![70000.0; kv_dim];
        for dtype in [KvDtype::F32, KvDtype::F16] {
            let mut cache = KvCache::on(config, 4, Device::Cpu, dtype);
            assert_eq!(cache.dtype(), dtype);
            cache.store(0, 0, &keys, &values);
            match cache.rows(0, 1) {
                KvRows::F32 { keys: k, values: v } => {
                    assert_eq!((k, v), (&keys[..], &values[..]), "f32 keeps every bit");
                }
                KvRows::F16 { keys: k, values: v } => {
                    let k: Vec<f32> = k.iter().map(|x| x.to_f32()).collect();
                    assert_eq!(&k[..2], &[1.0, 1.0 + 2f32.powi(-9)]);
                    assert!(
                        v.iter().all(|x| x.to_f32() == f32::INFINITY),
                        "beyond f16's range"
                    );
                }
            }
        }
    }
}
