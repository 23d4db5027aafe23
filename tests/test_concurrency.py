"""Threads: one Model and one Inference shared by several Python threads, each with its own
caches and adapters, compute bitwise what one thread computes; an adapter's scale changed
while other threads forward is read once per forward, never mixed."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import lugh
from conftest import DEVICES, FIXTURES

LLAMA = FIXTURES / "tiny-llama"
ROUNDS = 16


@pytest.fixture(scope="module")
def ref():
    return np.load(LLAMA / "reference_logits.npz")


@pytest.fixture(scope="module", params=DEVICES)
def inference(request):
    return lugh.Inference(lugh.Model(LLAMA / "base-q4_0.gguf"), n_threads=2, device=request.param)


def work(inference, lora, tokens):
    """What each thread does: the whole sequence, then the same through its own cache in two
    chunks, then a pooled forward of its first half."""
    cache = inference.create_kv_cache()
    pool = inference.create_memory_pool()
    half = len(tokens) // 2
    return [
        inference.forward_all(tokens, lora=lora),
        inference.forward_cache(cache, tokens[:half], lora=lora),
        inference.forward_cache(cache, tokens[half:], lora=lora),
        inference.forward_pool(pool, tokens[:half], lora=lora),
    ]


def test_threads_sharing_a_model_compute_what_one_thread_computes(inference, ref):
    model = inference.model
    trained = lugh.LoRA(LLAMA / "lora-all.gguf", model).trainable_copy()
    trained.scale = 2.0
    adapters = [
        None,
        lugh.LoRA(LLAMA / "lora-qv.gguf", model),
        lugh.LoRA(LLAMA / "lora-all-peft", model),
        lugh.LoRA(LLAMA / "lora-qv-peft", model, scale=0.5),
        [lugh.LoRA(LLAMA / "lora-qv.gguf", model), trained],
    ]
    tokens = [ref["tokens"][i : i + 8 + 3 * i] for i in range(len(adapters))]
    expected = [work(inference, lora, t) for lora, t in zip(adapters, tokens)]
    # Different adapters give different logits: a thread using another's would be seen.
    lasts = [e[0][-1] for e in expected]
    assert all(not np.array_equal(a, b) for i, a in enumerate(lasts) for b in lasts[i + 1 :])

    start = threading.Barrier(len(adapters))

    def thread(i):
        start.wait()
        return [work(inference, adapters[i], tokens[i]) for _ in range(ROUNDS)]

    with ThreadPoolExecutor(len(adapters)) as pool:
        results = list(pool.map(thread, range(len(adapters))))
    for i, rounds in enumerate(results):
        for r, got in enumerate(rounds):
            for what, a, b in zip(["forward_all", "cache 1", "cache 2", "pool"], got, expected[i]):
                assert np.array_equal(a, b), f"thread {i}, round {r}: {what} differs"


def matching_scales(logits, expected: dict) -> list:
    return [s for s, e in expected.items() if np.array_equal(logits, e)]


def test_changing_the_scale_while_forwarding_never_mixes_two_scales(inference, ref):
    """Every forward's logits are exactly those of one of the scales set, and a batch that
    applies the adapter to two sequences applies one scale to both."""
    lora = lugh.LoRA(LLAMA / "lora-all.gguf", inference.model)
    tokens = ref["tokens"][:10]
    scales = [0.0, 0.5, 1.0, 2.0]
    single, batch = {}, {}
    for s in scales:
        lora.scale = s
        single[s] = inference.forward(tokens, lora=lora)
        batch[s] = inference.forward_batch([tokens, tokens[:7]], lora=lora)
    assert all(len(matching_scales(single[s], single)) == 1 for s in scales)

    stop = threading.Event()

    def flip():
        i = 0
        while not stop.is_set():
            lora.scale = scales[i % len(scales)]
            i += 1
            time.sleep(0.0002)

    def forwards():
        return [inference.forward(tokens, lora=lora) for _ in range(100)]

    def batches():
        return [inference.forward_batch([tokens, tokens[:7]], lora=lora) for _ in range(50)]

    flipper = threading.Thread(target=flip)
    flipper.start()
    try:
        with ThreadPoolExecutor(3) as pool:
            jobs = [pool.submit(forwards), pool.submit(forwards), pool.submit(batches)]
            singles = jobs[0].result() + jobs[1].result()
            batched = jobs[2].result()
    finally:
        stop.set()
        flipper.join()

    seen = set()
    for i, logits in enumerate(singles):
        match = matching_scales(logits, single)
        assert len(match) == 1, f"forward {i} matches no single scale: a torn read"
        seen.update(match)
    for i, (first, second) in enumerate(batched):
        match = [s for s in scales if np.array_equal(first, batch[s][0])]
        assert len(match) == 1, f"batch {i}: first sequence matches no scale"
        assert np.array_equal(second, batch[match[0]][1]), f"batch {i} mixes two scales"
    assert len(seen) >= 2, f"the scale never changed during the forwards (saw {seen})"
