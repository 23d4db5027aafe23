//! The candle backend against lugh's own kernels, on the CPU.

use std::sync::Arc;

use lugh::lora::{create, LoraAdapter};
use lugh::model::Proj;
use lugh::train::{Precision, TrainGraph};
use lugh::{Device, Inference, Model};

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let max = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / max
}

/// The candle recipe on the CPU computes what lugh's kernels compute: a batch with an
/// adapter on one sequence, a cached continuation, and a training step's gradients.
#[test]
fn candle_cpu_agrees_with_the_cpu_backend() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/tiny-qwen2/base-f32.gguf"
    );
    let model = Arc::new(Model::open(path, true).unwrap());
    let targets = [Proj::AttnQ, Proj::AttnV, Proj::FfnDown];
    let adapter = Arc::new(create(&model, 4, 8.0, 1.0, &targets, Some(1)).unwrap());
    for pair in adapter.pairs_mut().iter_mut() {
        pair.lora_b.iter_mut().for_each(|b| *b = 0.02);
    }
    let (seq_a, seq_b): (&[u32], &[u32]) = (&[1, 7, 19, 4, 88, 3], &[5, 6]);
    let run = |device| {
        let inf = Inference::on(Arc::clone(&model), Some(32), Some(2), device).unwrap();
        let with: [&LoraAdapter; 1] = [&adapter];
        let batch = inf
            .forward_batch(&[seq_a, seq_b], &[&with, &[]], None)
            .unwrap();
        let mut cache = inf.create_kv_cache(None);
        inf.forward_cache(&mut cache, &seq_a[..4], &with).unwrap();
        let cached = inf.forward_cache(&mut cache, &seq_a[4..], &with).unwrap();
        adapter.zero_grad();
        let graph = TrainGraph::forward(
            &inf,
            &[seq_a],
            &[Arc::clone(&adapter)],
            false,
            Precision::F32,
        );
        let targets: Vec<i64> = seq_a[1..].iter().map(|&t| t as i64).chain([-100]).collect();
        graph.unwrap().loss_backward(&inf, &targets, None).unwrap();
        let grads: Vec<f32> = adapter
            .pairs()
            .iter()
            .flat_map(|p| {
                let g = p.grad.as_ref().unwrap();
                g.lora_a
                    .iter()
                    .chain(&g.lora_b)
                    .copied()
                    .collect::<Vec<_>>()
            })
            .collect();
        (batch, cached, grads)
    };
    let (cpu, candle) = (run(Device::Cpu), run(Device::CandleCpu));
    for (a, b) in candle.0.iter().zip(&cpu.0) {
        assert!(max_rel_diff(a, b) < 1e-5, "batch: {}", max_rel_diff(a, b));
    }
    assert!(max_rel_diff(&candle.1, &cpu.1) < 1e-5, "cache");
    assert!(
        max_rel_diff(&candle.2, &cpu.2) < 1e-4,
        "grads: {}",
        max_rel_diff(&candle.2, &cpu.2)
    );
}
