"""lugh.Inference against transformers (float64) and llama.cpp references, and its paths
(cache, pool, batch) against each other."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import lugh
from conftest import FIXTURES, QUANTS, assert_close, assert_quantized_close, model, rel_err


def test_f32_base_matches_transformers(f32_inference, ref):
    logits = f32_inference.forward_all(ref["tokens"])
    assert logits.dtype == np.float32
    assert_close(logits, ref["base"], 1e-4, "f32 base vs transformers float64")


def test_f16_base_matches_transformers(fixture_dir, ref, device):
    inf = lugh.Inference(model(fixture_dir / "base-f16.gguf"), device=device)
    assert_close(inf.forward_all(ref["tokens"]), ref["base"], 5e-3, "f16 base vs transformers")


@pytest.mark.parametrize("quant", QUANTS)
def test_quantized_bases_match_llama_cpp(fixture_dir, ref, quant, device):
    """Path checked: ggml numerics (activations quantized to 8 bits inside the matmuls, as
    llama.cpp does), so the reference is llama.cpp's own logits, tolerance 2e-2."""
    path = fixture_dir / f"base-{quant}.gguf"
    if not path.exists() or f"llamacpp_{quant}_base" not in ref:
        pytest.skip(f"no {quant} base or llama.cpp logits in this fixture")
    logits = lugh.Inference(model(path), device=device).forward_all(ref["tokens"])
    assert_quantized_close(logits, ref, f"{quant}_base", f"{quant} vs llama.cpp")
    # ... and it stays as far from exact math as llama.cpp itself does (3-5 %).
    assert rel_err(logits, ref[f"dequant_{quant}_base"]) < 0.08


@pytest.mark.parametrize("quant", QUANTS)
def test_quantized_bases_decode_as_gguf_py_does(fixture_dir, ref, quant, device):
    """Path checked: the exact forward (the training one), which multiplies the decoded
    weights in f32, so the reference is transformers float64 on the weights gguf-py decodes
    from the same file."""
    path = fixture_dir / f"base-{quant}.gguf"
    if not path.exists() or f"dequant_{quant}_base" not in ref:
        pytest.skip(f"no {quant} base or dequantized reference in this fixture")
    inf = lugh.Inference(model(path), device=device)
    logits = lugh.train.forward(inf, ref["tokens"]).numpy()
    assert_close(logits, ref[f"dequant_{quant}_base"], 1e-4, f"{quant} decoded vs gguf-py")


def test_forward_is_the_last_row_of_forward_all(f32_inference, ref):
    tokens = ref["tokens"]
    all_rows = f32_inference.forward_all(tokens)
    assert_close(f32_inference.forward(tokens), all_rows[-1], 1e-6, "forward vs forward_all")
    assert f32_inference.forward(tokens).shape == (f32_inference.n_vocab,)


def test_cache_token_by_token_and_in_chunks_equals_forward_all(f32_inference, ref):
    tokens = ref["tokens"].tolist()
    full = f32_inference.forward_all(tokens)
    cache = f32_inference.create_kv_cache()
    steps = np.stack([f32_inference.forward_cache(cache, [t]) for t in tokens])
    assert cache.n_cached == len(tokens)
    assert_close(steps, full, 1e-5, "token-by-token cache vs forward_all")
    cache.clear()
    assert cache.n_cached == 0
    cuts = [0, 5, 6, 13, len(tokens)]
    for a, b in zip(cuts, cuts[1:]):
        last = f32_inference.forward_cache(cache=cache, tokens=tokens[a:b])
        assert_close(last, full[b - 1], 1e-5, f"cache chunk {a}:{b}")


def test_batch_of_different_lengths_matches_references(f32_inference, ref):
    sequences = [ref[f"batch_tokens_{i}"] for i in range(4)]
    assert sorted(len(s) for s in sequences)[0] == 2
    outs = f32_inference.forward_batch(sequences)
    assert len(outs) == 4
    for i, out in enumerate(outs):
        assert_close(out, ref[f"batch_base_{i}"][-1], 1e-4, f"batch sequence {i}")


def test_batch_continues_caches(f32_inference, ref):
    seqs = [ref[f"batch_tokens_{i}"].tolist() for i in range(3)]
    caches = [f32_inference.create_kv_cache() for _ in seqs]
    f32_inference.forward_batch([s[:1] for s in seqs], caches=caches)
    outs = f32_inference.forward_batch([s[1:] for s in seqs], caches=caches)
    for i, out in enumerate(outs):
        assert caches[i].n_cached == len(seqs[i])
        assert_close(out, ref[f"batch_base_{i}"][-1], 1e-4, f"cached batch sequence {i}")


def test_pool_equals_forward(f32_inference, ref):
    tokens = ref["tokens"]
    pool = f32_inference.create_memory_pool()
    assert pool.backend == f32_inference.device
    for n in (len(tokens), 3, len(tokens)):
        expected = f32_inference.forward(tokens[:n])
        assert_close(f32_inference.forward_pool(pool, tokens[:n]), expected, 1e-6, "pool")
    pool.reset()
    assert_close(
        f32_inference.forward_pool(pool, tokens), f32_inference.forward(tokens), 1e-6, "pool"
    )


def test_tokens_accept_lists_and_numpy_arrays(f32_inference, ref):
    tokens = ref["tokens"]
    expected = f32_inference.forward(tokens.tolist())
    for form in (tokens.astype(np.int64), tokens.astype(np.int32), tuple(tokens.tolist())):
        assert (f32_inference.forward(form) == expected).all()


def test_bad_tokens_and_arguments_raise(f32_inference):
    n_vocab = f32_inference.n_vocab
    with pytest.raises(IndexError, match=f"token id {n_vocab} is out of range"):
        f32_inference.forward([1, n_vocab])
    with pytest.raises(IndexError, match="-1"):
        f32_inference.forward([1, -1])
    with pytest.raises(ValueError, match="empty"):
        f32_inference.forward([])
    with pytest.raises(TypeError, match="not a string"):
        f32_inference.forward("hello")
    with pytest.raises(TypeError, match="sequence of ints"):
        f32_inference.forward([1.5, 2.0])
    with pytest.raises(TypeError, match="lora must be"):
        f32_inference.forward([1], lora="adapter.gguf")
    with pytest.raises(ValueError, match="empty"):
        f32_inference.forward_batch([])


def test_cache_overflow_raises_and_keeps_the_cache(f32_inference):
    cache = f32_inference.create_kv_cache(n_ctx=4)
    f32_inference.forward_cache(cache, [1, 2, 3])
    with pytest.raises(
        ValueError, match="context overflow: 5 positions needed, the context holds 4"
    ):
        f32_inference.forward_cache(cache, [4, 5])
    assert cache.n_cached == 3
    cache.resize(8)
    f32_inference.forward_cache(cache, [4, 5])
    assert cache.n_cached == 5
    small = lugh.Inference(f32_inference.model, n_ctx=4)
    with pytest.raises(ValueError, match="context overflow"):
        small.forward(list(range(1, 6)))


def test_cache_from_another_model_is_refused(f32_inference):
    demo = model(__import__("conftest").DEMO_Q8)
    if demo.n_layer == f32_inference.n_layer:
        demo = model(FIXTURES / "tiny-gemma3" / "base-q8_0.gguf")
    other = lugh.Inference(demo, device=f32_inference.device)
    with pytest.raises(ValueError, match="another model"):
        f32_inference.forward_cache(other.create_kv_cache(), [1])


def test_inference_properties(f32_inference):
    m = f32_inference.model
    assert f32_inference.n_ctx == m.n_ctx_train
    assert (f32_inference.n_layer, f32_inference.n_head, f32_inference.n_embd) == (
        m.n_layer,
        m.n_head,
        m.n_embd,
    )
    assert lugh.Inference(m, n_ctx=64, n_threads=1).n_ctx == 64
    with pytest.raises(ValueError, match="n_threads"):
        lugh.Inference(m, n_threads=0)


def test_forward_releases_the_gil(f32_inference):
    """While a forward runs in one thread, this thread keeps running Python."""
    tokens = list(range(1, 480))
    window = {}

    def work():
        window["start"] = time.perf_counter()
        f32_inference.forward_all(tokens)
        window["end"] = time.perf_counter()

    worker = threading.Thread(target=work)
    ticks = []
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
    worker.join()
    during = [t for t in ticks if window["start"] < t < window["end"]]
    assert len(during) > 10, f"only {len(during)} ticks while the forward ran: GIL held?"


def test_lugh_isa_portable_runs_the_portable_kernels():
    """`LUGH_ISA=portable` selects candle's dot products, which round as llama.cpp's Q4_0
    path does: its logits then agree with llama.cpp's to float precision (the AVX-512 kernels
    land 1e-2 away on this fixture, within the quantized tolerance)."""
    import os
    import subprocess
    import sys

    script = (
        "import sys, numpy as np, lugh; d = sys.argv[1];"
        "ref = np.load(d + '/reference_logits.npz');"
        "inf = lugh.Inference(lugh.Model(d + '/base-q4_0.gguf'));"
        "out = inf.forward_all(ref['tokens']); r = ref['llamacpp_q4_0_base'];"
        "print(float(np.abs(out - r).max() / np.abs(r).max()))"
    )
    fixture = str(FIXTURES / "tiny-llama")
    env = {**os.environ, "LUGH_ISA": "portable"}
    env.pop("LUGH_NO_AVX512", None)
    out = subprocess.run(
        [sys.executable, "-c", script, fixture], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 1e-5


def test_longrope_factors_follow_the_context(device):
    """Phi-3's LongRoPE (tiny-phi3-longrope, original context 64): an inference of at most 64
    positions uses the short factors, a longer one the long factors, both with the attention
    factor on cos and sin; against transformers (float64) and llama.cpp, tolerance 1e-4."""
    fixture = FIXTURES / "tiny-phi3-longrope"
    ref = np.load(fixture / "reference_logits.npz")
    m = model(fixture / "base-f32.gguf")
    short, long = ref["tokens_short"], ref["tokens_long"]
    within = lugh.Inference(m, n_ctx=64, device=device)
    beyond = lugh.Inference(m, n_ctx=256, device=device)
    assert_close(within.forward_all(short), ref["short"], 1e-4, "short factors")
    assert_close(beyond.forward_all(long), ref["long"], 1e-4, "long factors")
    assert_close(beyond.forward_all(short), ref["short_long_factors"], 1e-4, "long, short text")
    assert_close(beyond.forward_all(long), ref["llamacpp_long"], 1e-4, "vs llama.cpp")
    assert rel_err(within.forward_all(short), ref["short_long_factors"]) > 0.1
