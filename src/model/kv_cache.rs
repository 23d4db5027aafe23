//! Keys and values of past positions, per layer, for one sequence, on the device that
//! computes it.

use std::ops::Range;

use candle_core::Tensor;
use half::f16;

use super::config::Config;
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ops::attention::{key_blocks_len, store_key_blocks, CachedKv, KvElem};

/// One sequence of a batch: its rows in the batch and the position of its first row.
#[derive(Debug, Clone)]
pub struct SeqSpan {
    pub rows: Range<usize>,
    pub pos0: usize,
}

impl SeqSpan {
    /// The position of every row of a batch of `seqs`, in row order.
    pub fn positions(seqs: &[SeqSpan]) -> impl Iterator<Item = usize> + Clone + '_ {
        seqs.iter()
            .flat_map(|span| span.pos0..span.pos0 + span.rows.len())
    }
}

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

/// Per layer, the keys (after RoPE) and values of positions `0 .. n_cached`, each
/// `[n_head_kv * head_dim]`. Memory grows with use, never beyond `n_ctx` positions.
#[derive(Debug)]
pub struct KvCache {
    n_ctx: usize,
    kv_dim: usize,
    n_cached: usize,
    device: Device,
    store: Store,
}

/// How a host cache lays out its keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KeyLayout {
    /// In blocks, as inference's attention reads them (`store_key_blocks`).
    Blocks,
    /// Rows `[n, kv_dim]`, as training's products read them.
    Rows,
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

/// Per layer, values `[n_cached * kv_dim]` and keys as `layout` says.
#[derive(Debug, Clone)]
struct Layers<T> {
    layout: KeyLayout,
    kv_dim: usize,
    keys: Vec<Vec<T>>,
    values: Vec<Vec<T>>,
}

impl<T: KvElem> Layers<T> {
    fn new(n_layer: usize, kv_dim: usize, layout: KeyLayout) -> Layers<T> {
        Layers {
            layout,
            kv_dim,
            keys: vec![Vec::new(); n_layer],
            values: vec![Vec::new(); n_layer],
        }
    }

    /// Values a layer's keys take for `n` positions.
    fn keys_len(&self, n: usize) -> usize {
        match self.layout {
            KeyLayout::Blocks => key_blocks_len(n, self.kv_dim),
            KeyLayout::Rows => n.saturating_mul(self.kv_dim),
        }
    }

    /// Positions `pos0 ..` of layer `il`, rounded to `T`, never growing past `n_ctx`.
    fn store(&mut self, il: usize, pos0: usize, n_ctx: usize, keys: &[f32], values: &[f32]) {
        let n = keys.len() / self.kv_dim;
        let (start, end) = (pos0 * self.kv_dim, (pos0 + n) * self.kv_dim);
        let (rows_max, keys_max) = (n_ctx.saturating_mul(self.kv_dim), self.keys_len(n_ctx));
        let buf = &mut self.values[il];
        buf.truncate(start);
        grow(buf, end, rows_max);
        T::round_from(&mut buf[start..], values);
        let buf = &mut self.keys[il];
        match self.layout {
            KeyLayout::Rows => {
                buf.truncate(start);
                grow(buf, end, rows_max);
                T::round_from(&mut buf[start..], keys);
            }
            KeyLayout::Blocks => {
                grow(buf, key_blocks_len(pos0 + n, self.kv_dim), keys_max);
                store_key_blocks(buf, self.kv_dim, pos0, keys);
            }
        }
    }

    /// Drops positions beyond `n_ctx` and the memory that held them.
    fn shrink(&mut self, n_ctx: usize) {
        let (rows_max, keys_max) = (n_ctx.saturating_mul(self.kv_dim), self.keys_len(n_ctx));
        let buffers = (self.keys.iter_mut().map(|b| (b, keys_max)))
            .chain(self.values.iter_mut().map(|b| (b, rows_max)));
        for (buf, max_len) in buffers {
            buf.truncate(max_len);
            buf.shrink_to(max_len);
        }
    }
}

/// `buf` at least `len` long (new values default), its capacity grown geometrically but
/// never past `max_len`.
fn grow<T: KvElem>(buf: &mut Vec<T>, len: usize, max_len: usize) {
    debug_assert!(len <= max_len);
    if buf.capacity() < len {
        let target = (2 * buf.capacity()).clamp(len, max_len);
        buf.reserve_exact(target - buf.len());
    }
    if buf.len() < len {
        buf.resize(len, T::default());
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

    /// An inference cache for `device`: host memory of `dtype` for `Cpu`, device tensors
    /// otherwise (their dtype is the forward's; `Inference` refuses other than f32 there).
    pub fn on(config: &Config, n_ctx: usize, device: Device, dtype: KvDtype) -> KvCache {
        Self::with_layout(config, n_ctx, device, dtype, KeyLayout::Blocks)
    }

    /// An exact cache for a training forward on `device`, read back by its backward.
    pub(crate) fn for_training(config: &Config, n_ctx: usize, device: Device) -> KvCache {
        Self::with_layout(config, n_ctx, device, KvDtype::F32, KeyLayout::Rows)
    }

    fn with_layout(
        config: &Config,
        n_ctx: usize,
        device: Device,
        dtype: KvDtype,
        layout: KeyLayout,
    ) -> KvCache {
        let (n_layer, kv_dim) = (config.n_layer, config.kv_dim());
        let store = match (device.is_candle(), dtype) {
            (false, KvDtype::F32) => {
                Store::Host(HostRows::F32(Layers::new(n_layer, kv_dim, layout)))
            }
            (false, KvDtype::F16) => {
                Store::Host(HostRows::F16(Layers::new(n_layer, kv_dim, layout)))
            }
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
        match &mut self.store {
            Store::Host(HostRows::F32(layers)) => layers.shrink(n_ctx),
            Store::Host(HostRows::F16(layers)) => layers.shrink(n_ctx),
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
        // `n_ctx` may be any size the caller or the file asked for: the memory is only taken
        // as positions are stored.
        let n_ctx = self.n_ctx;
        match &mut self.store {
            Store::Host(HostRows::F32(layers)) => layers.store(il, pos0, n_ctx, keys, values),
            Store::Host(HostRows::F16(layers)) => layers.store(il, pos0, n_ctx, keys, values),
            Store::Tensors(_) => {
                unreachable!("Inference checks the cache's device before a forward")
            }
        }
    }

    /// Keys and values of layer `il` for positions `0 .. n`, as inference's attention reads
    /// them (host inference cache).
    pub(crate) fn cached(&self, il: usize, n: usize) -> CachedKv<'_> {
        fn parts<T: KvElem>(layers: &Layers<T>, il: usize, n: usize) -> (&[T], &[T]) {
            assert_eq!(layers.layout, KeyLayout::Blocks, "an inference cache");
            let key_blocks = &layers.keys[il][..layers.keys_len(n)];
            (key_blocks, &layers.values[il][..n * layers.kv_dim])
        }
        match &self.store {
            Store::Host(HostRows::F32(layers)) => {
                let (key_blocks, values) = parts(layers, il, n);
                CachedKv::F32 { key_blocks, values }
            }
            Store::Host(HostRows::F16(layers)) => {
                let (key_blocks, values) = parts(layers, il, n);
                CachedKv::F16 { key_blocks, values }
            }
            Store::Tensors(_) => unreachable!("Inference checks the cache's device"),
        }
    }

    /// Keys and values `[n, kv_dim]` of layer `il` for positions `0 .. n` (host training
    /// cache): exact gradients need the f32 rows.
    pub(crate) fn exact_rows(&self, il: usize, n: usize) -> Result<(&[f32], &[f32])> {
        match &self.store {
            Store::Host(HostRows::F32(layers)) if layers.layout == KeyLayout::Rows => {
                let len = n * self.kv_dim;
                Ok((&layers.keys[il][..len], &layers.values[il][..len]))
            }
            _ => Err(Error::invalid(
                "cache",
                "training reads the f32 rows of a training graph's KV cache",
            )),
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
            match cache.cached(0, 1) {
                CachedKv::F32 {
                    key_blocks: k,
                    values: v,
                } => {
                    let k: Vec<f32> = k.iter().step_by(64).copied().collect();
                    assert_eq!((&k[..], v), (&keys[..], &values[..]), "f32 keeps every bit");
                }
                CachedKv::F16 {
                    key_blocks: k,
                    values: v,
                } => {
                    let k: Vec<f32> = k.iter().step_by(64).map(|x| x.to_f32()).collect();
                    assert_eq!(&k[..2], &[1.0, 1.0 + 2f32.powi(-9)]);
                    assert!(
                        v.iter().all(|x| x.to_f32() == f32::INFINITY),
                        "beyond f16's range"
                    );
                }
            }
        }
    }

    /// Keys stored a few positions at a time, over a rewound tail, and after a shrink, are
    /// the blocks of all of them stored at once.
    #[test]
    fn keys_stored_in_steps_are_the_blocks_of_all_of_them() {
        let model = Model::from_gguf(GgufFile::from_bytes(&tiny_model_with(&[])).unwrap()).unwrap();
        let config = model.config().unwrap();
        let kv_dim = config.kv_dim();
        let row = |j: usize| (0..kv_dim).map(move |i| (j * kv_dim + i) as f32);
        let rows = |r: std::ops::Range<usize>| -> Vec<f32> { r.flat_map(row).collect() };
        let mut cache = KvCache::on(config, 200, Device::Cpu, KvDtype::F32);
        cache.store(0, 0, &rows(0..50), &rows(0..50));
        cache.store(0, 50, &vec![-1.0; 30 * kv_dim], &rows(50..80));
        cache.truncate(50);
        for j in 50..130 {
            cache.store(0, j, &rows(j..j + 1), &rows(j..j + 1));
        }
        cache.resize(130);
        let mut expected = vec![0f32; key_blocks_len(130, kv_dim)];
        store_key_blocks(&mut expected, kv_dim, 0, &rows(0..130));
        let CachedKv::F32 { key_blocks, values } = cache.cached(0, 130) else {
            unreachable!("an f32 cache")
        };
        assert_eq!(key_blocks, &expected[..]);
        assert_eq!(values, &rows(0..130)[..]);
        assert!(
            cache.exact_rows(0, 130).is_err(),
            "an inference cache holds no key rows"
        );
    }
}
