"""Long runs: ten thousand forwards and a thousand adapter create/drop cycles do not grow the
process's memory once warm."""

from __future__ import annotations

import gc
import os
import resource
import sys
from pathlib import Path

import numpy as np
import pytest

import lugh
from conftest import FIXTURES

LLAMA = FIXTURES / "tiny-llama"
STATM = Path("/proc/self/statm")
# What warm-up may leave to settle: allocator arenas and caches, not a leak (a leak of one
# logits vector per forward would be 40 MB over 10 000 forwards; one adapter per cycle, 1 GB).
NOISE_BYTES = 8 << 20


def rss() -> int:
    """Resident bytes now (Linux), else the peak so far (which growth also raises)."""
    if STATM.exists():
        return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def growth(step, n: int, warm_up: int) -> int:
    """Runs `step(i)` `warm_up` times, then `n` times; returns the RSS growth over the `n`."""
    for i in range(warm_up):
        step(i)
    gc.collect()
    before = rss()
    for i in range(n):
        step(i)
    gc.collect()
    return rss() - before


@pytest.fixture(scope="module")
def model():
    return lugh.Model(LLAMA / "base-q4_0.gguf")


def test_ten_thousand_forwards_do_not_grow_memory(model):
    inference = lugh.Inference(model, n_threads=2)
    lora = lugh.LoRA(LLAMA / "lora-qv.gguf", model)
    cache = inference.create_kv_cache(n_ctx=8)
    pool = inference.create_memory_pool()
    tokens = [1, 17, 300]
    expected = inference.forward(tokens, lora=lora)

    def step(i):
        # Plain, pooled and cached forwards, with and without the adapter.
        adapter = lora if i % 2 else None
        if i % 3 == 0:
            logits = inference.forward(tokens, lora=adapter)
        elif i % 3 == 1:
            logits = inference.forward_pool(pool, tokens, lora=adapter)
        else:
            if cache.n_cached + len(tokens) > cache.n_ctx:
                cache.clear()
            logits = inference.forward_cache(cache, tokens, lora=adapter)
        if i % 1000 == 999:
            assert np.array_equal(inference.forward(tokens, lora=lora), expected)
        return logits

    grown = growth(step, 10_000 - 1000, warm_up=1000)
    assert grown < NOISE_BYTES, f"RSS grew by {grown / 2**20:.1f} MiB over 9000 forwards"


def test_a_thousand_adapter_create_and_drop_cycles_do_not_grow_memory(model):
    inference = lugh.Inference(model, n_threads=1)
    targets = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"]
    sources = [LLAMA / "lora-all.gguf", LLAMA / "lora-all-peft"]

    def step(i):
        # Each adapter is created (rank 64 on every projection: 2 MiB) or loaded.
        if i % 2:
            lora = lugh.LoRA.create(model, rank=64, targets=targets, seed=i)
        else:
            lora = lugh.LoRA(sources[i // 2 % 2], model)
        if i % 50 == 0:
            inference.forward([1, 2], lora=lora)
        del lora

    grown = growth(step, 1000, warm_up=100)
    assert grown < NOISE_BYTES, f"RSS grew by {grown / 2**20:.1f} MiB over 1000 adapters"
