"""Choosing a device: names, errors for devices this build or machine lacks, caches and
adapters across devices. (The reference tests run on every device in `conftest.DEVICES`.)"""

from __future__ import annotations

import numpy as np
import pytest

import lugh
from conftest import FIXTURES, assert_close, model

F32 = FIXTURES / "tiny-llama" / "base-f32.gguf"


def test_devices_lists_the_cpu_backends_first():
    found = lugh.devices()
    assert found[:2] == ["cpu", "candle-cpu"]
    assert all(d.split(":")[0] in ("cpu", "candle-cpu", "cuda", "metal") for d in found)


@pytest.mark.parametrize("name", ["gpu", "cuda:x", "cpu:1", "", "CUDA"])
def test_unknown_device_names_are_refused(name):
    with pytest.raises(ValueError, match='expected "cpu", "candle-cpu", "cuda"'):
        lugh.Inference(model(F32), device=name)


@pytest.mark.parametrize("kind", ["cuda", "metal"])
def test_a_device_this_build_or_machine_lacks_names_the_feature_or_driver(kind):
    if f"{kind}:0" in lugh.devices():
        with pytest.raises(RuntimeError, match=f"device '{kind}:99' is not available"):
            lugh.Inference(model(F32), device=f"{kind}:99")
        return
    with pytest.raises(
        RuntimeError, match=f"'{kind}:0' is not available: .*(`{kind}` feature|driver|device)"
    ):
        lugh.Inference(model(F32), device=kind)


@pytest.mark.parametrize("device", ["cpu", "candle-cpu"])
def test_the_device_is_reported(device):
    inf = lugh.Inference(model(F32), device=device)
    assert inf.device == device
    assert inf.create_memory_pool().backend == device


def test_a_cache_from_another_device_is_refused():
    cpu = lugh.Inference(model(F32), device="cpu")
    candle = lugh.Inference(model(F32), device="candle-cpu")
    cache = cpu.create_kv_cache()
    with pytest.raises(ValueError, match="lives on 'cpu', the inference runs on 'candle-cpu'"):
        candle.forward_cache(cache, [1, 2, 3])
    pool = candle.create_memory_pool()
    with pytest.raises(ValueError, match="lives on 'candle-cpu'"):
        cpu.forward_pool(pool, [1, 2, 3])


def test_one_adapter_serves_both_devices_and_follows_its_training(tmp_path):
    """Trained on candle-cpu, an adapter gives the same logits on both devices after each
    optimizer step (the device copy of its weights follows every update), and saves."""
    m = model(F32)
    cpu = lugh.Inference(m, device="cpu")
    candle = lugh.Inference(m, device="candle-cpu")
    t = lugh.LoRA.create(m, rank=4, alpha=8.0, targets=("attn_q", "attn_v", "ffn_down"), seed=0)
    opt = lugh.optim.AdamW(t.trainable_parameters(), lr=1e-2)
    tokens = list(range(1, 25))
    before = candle.forward_all(tokens, lora=t)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss_sum, n = lugh.train.train_step(candle, [tokens], t)
        losses.append(loss_sum / n)
        opt.step()
        assert_close(
            candle.forward_all(tokens, lora=t), cpu.forward_all(tokens, lora=t), 1e-5, "devices"
        )
    assert losses[-1] < losses[0]
    assert np.abs(candle.forward_all(tokens, lora=t) - before).max() > 1e-3
    path = tmp_path / "trained.gguf"
    t.save(path)
    reloaded = lugh.LoRA(path, m)
    assert_close(
        cpu.forward_all(tokens, lora=reloaded), candle.forward_all(tokens, lora=t), 1e-5, "save"
    )


def test_training_gives_the_same_gradients_on_both_devices():
    m = model(F32)
    tokens = [list(range(3, 20)), list(range(40, 49))]
    grads = {}
    for device in ("cpu", "candle-cpu"):
        t = lugh.LoRA.create(m, rank=4, alpha=8.0, seed=3)
        for p in t.trainable_parameters()[1::2]:
            p.set_data(np.full(p.shape, 0.01, np.float32))
        lugh.train.train_step(lugh.Inference(m, device=device), tokens, t, checkpoint=True)
        grads[device] = [p.grad for p in t.trainable_parameters()]
    for a, b in zip(grads["cpu"], grads["candle-cpu"]):
        assert_close(b, a, 1e-4, "candle-cpu gradient vs cpu")
