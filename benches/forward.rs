//! Prefill and decode speed, with and without an unmerged LoRA (rank 16 on attn_q, attn_v).
//!
//! `cargo bench --bench forward` runs on the demo model shipped in the package; set
//! `LUGH_BENCH_MODEL=path.gguf` for another (e.g. a 1B-class file from
//! `benches/make_model.py`) and `LUGH_BENCH_THREADS` to fix the thread count.

use std::path::PathBuf;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use lugh::lora::{create, LoraAdapter};
use lugh::model::Proj;
use lugh::{Inference, Model};

const PREFILL: usize = 64;

fn setup() -> (Inference, LoraAdapter) {
    let path = std::env::var_os("LUGH_BENCH_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("python/lugh/data/lugh-demo-4m-f16.gguf")
        });
    let threads = std::env::var("LUGH_BENCH_THREADS")
        .ok()
        .and_then(|t| t.parse().ok());
    let model = Arc::new(Model::open(&path, true).expect("bench model"));
    let lora =
        create(&model, 16, 32.0, 1.0, &[Proj::AttnQ, Proj::AttnV], Some(0)).expect("adapter");
    // B = A-like values, so the adapter does real work.
    for pair in lora.pairs_mut().iter_mut() {
        pair.lora_b
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b = ((i % 7) as f32 - 3.0) * 1e-3);
    }
    (
        Inference::new(model, Some(512), threads).expect("inference"),
        lora,
    )
}

fn bench(c: &mut Criterion) {
    let (inf, lora) = setup();
    let n_vocab = inf.config().n_vocab as u32;
    let tokens: Vec<u32> = (0..PREFILL as u32)
        .map(|i| 1 + (i * 37) % (n_vocab - 1))
        .collect();
    for (label, adapters) in [("base", vec![]), ("lora-r16-qv", vec![&lora])] {
        let mut group = c.benchmark_group("prefill");
        group.throughput(Throughput::Elements(PREFILL as u64));
        group.sample_size(10);
        group.bench_function(BenchmarkId::new(label, PREFILL), |b| {
            b.iter(|| inf.forward(&tokens, &adapters).unwrap())
        });
        group.finish();

        let mut group = c.benchmark_group("decode");
        group.throughput(Throughput::Elements(1));
        let mut cache = inf.create_kv_cache(None);
        inf.forward_cache(&mut cache, &tokens, &adapters).unwrap();
        group.bench_function(BenchmarkId::new(label, PREFILL), |b| {
            b.iter(|| {
                cache.truncate(PREFILL);
                inf.forward_cache(&mut cache, &[42], &adapters).unwrap()
            })
        });
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
