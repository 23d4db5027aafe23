"""`kv_cache_dtype="f16"`: keys and values rounded to f16 when cached (llama.cpp's default),
against the exact f32 cache."""

from __future__ import annotations

import numpy as np
import pytest

import lugh
from conftest import assert_close, model, rel_err

# Rounding keys and values to f16 (relative error up to 2^-11) moves the f32 bases' logits by
# 2.5e-4 to 9.9e-4 of the largest one on the fixtures.
F16_CACHE_TOL = 2e-3


def test_f16_cache_logits_are_close_to_the_f32_cache(fixture_dir, ref):
    m = model(fixture_dir / "base-f32.gguf")
    exact = lugh.Inference(m).forward_all(ref["tokens"])
    rounded = lugh.Inference(m, kv_cache_dtype="f16").forward_all(ref["tokens"])
    assert 0 < rel_err(rounded, exact), "the cache rounds"
    assert_close(rounded, exact, F16_CACHE_TOL, "f16 KV cache vs f32")
    assert_close(rounded, ref["base"], F16_CACHE_TOL, "f16 KV cache vs transformers float64")


def test_f16_cache_keeps_quantized_bases_as_close_to_exact_math(fixture_dir, ref):
    """The fixtures' llama.cpp logits were computed with an f32 cache, so the bound is
    test_inference's on the distance to exact math (8-bit activations: 3-5 %)."""
    path = fixture_dir / "base-q8_0.gguf"
    if not path.exists() or "dequant_q8_0_base" not in ref:
        pytest.skip("no q8_0 base or dequantized reference in this fixture")
    logits = lugh.Inference(model(path), kv_cache_dtype="f16").forward_all(ref["tokens"])
    assert rel_err(logits, ref["dequant_q8_0_base"]) < 0.08


@pytest.mark.parametrize("base", ["base-f32.gguf", "base-q8_0.gguf"])
def test_f16_cache_token_by_token_has_the_bits_of_the_batch(fixture_dir, ref, base):
    """Every path stores first and attends over the rounded cache, so a token decoded alone
    and the same token in a prefill see the same keys and values."""
    inf = lugh.Inference(model(fixture_dir / base), kv_cache_dtype="f16")
    tokens = ref["tokens"].tolist()
    full = inf.forward_all(tokens)
    cache = inf.create_kv_cache()
    steps = np.stack([inf.forward_cache(cache, [t]) for t in tokens])
    np.testing.assert_array_equal(steps, full)
    pool = inf.create_memory_pool()
    np.testing.assert_array_equal(inf.forward_pool(pool, tokens), full[-1])
    sequences = [ref[f"batch_tokens_{i}"] for i in range(3)]
    for seq, out in zip(sequences, inf.forward_batch(sequences)):
        np.testing.assert_array_equal(out, inf.forward(seq))


def test_bad_kv_cache_dtypes_are_refused(fixture_dir):
    m = model(fixture_dir / "base-f32.gguf")
    for bad in ("bf16", "F16", "q8_0", ""):
        with pytest.raises(ValueError, match="is not a KV cache type"):
            lugh.Inference(m, kv_cache_dtype=bad)
    with pytest.raises(ValueError, match="for device 'cpu' only"):
        lugh.Inference(m, device="candle-cpu", kv_cache_dtype="f16")
    assert lugh.Inference(m, device="candle-cpu", kv_cache_dtype="f32").device == "candle-cpu"


def trained_adapter(m) -> lugh.LoRA:
    """An adapter whose B matrices are not zero, so that every gradient is."""
    t = lugh.LoRA.create(m, rank=4, alpha=8.0, targets=("attn_q", "attn_k", "attn_v"), seed=3)
    rng = np.random.default_rng(0)
    for p in t.trainable_parameters()[1::2]:
        p.set_data(rng.normal(0, 0.05, p.shape).astype(np.float32))
    return t


def test_training_is_exact_whatever_the_cache_dtype(fixture_dir, ref):
    """Training's caches are f32 always: the same loss and gradients, bit for bit."""
    m = model(fixture_dir / "base-f32.gguf")
    tokens = ref["tokens"].tolist()
    results = []
    for dtype in ("f32", "f16"):
        inf = lugh.Inference(m, n_threads=2, kv_cache_dtype=dtype)
        t = trained_adapter(m)
        loss_sum, _ = lugh.train.train_step(inf, [tokens], t)
        logits = lugh.train.forward(inf, tokens, t)
        loss = lugh.train.cross_entropy_loss(logits, tokens[1:] + [-100])
        results.append(
            (
                loss_sum,
                logits.numpy(),
                float(loss.item()),
                [p.grad for p in t.trainable_parameters()],
            )
        )
    (loss_a, logits_a, eval_a, grads_a), (loss_b, logits_b, eval_b, grads_b) = results
    assert loss_a == loss_b and eval_a == eval_b
    np.testing.assert_array_equal(logits_a, logits_b)
    assert all(g is not None and np.abs(g).max() > 0 for g in grads_a)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_array_equal(a, b)
