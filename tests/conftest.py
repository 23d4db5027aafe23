"""Shared helpers: fixture paths, reference data and the error measure used by every test."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import lugh

FIXTURES = Path(__file__).parent / "fixtures"
# Every quantized base a fixture may hold (base-{q}.gguf), with its llama.cpp references.
QUANTS = [
    *("q8_0", "q4_0", "q4_1", "q5_1", "q2_k", "q3_k_m", "q4_k_m", "q6_k", "iq4_nl", "iq4_xs"),
    *("iq2_xxs", "iq2_xs", "iq2_s", "iq3_xxs", "iq3_s", "iq1_s", "iq1_m"),
]
ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3", "tiny-gemma2", "tiny-gemma3"]
# Where the reference tests run; a GPU run sets LUGH_TEST_DEVICES=cuda (benches/gpu/).
DEVICES = os.environ.get("LUGH_TEST_DEVICES", "cpu,candle-cpu").split(",")
DEMO_F16 = Path(lugh.__file__).parent / "data" / "lugh-demo-4m-f16.gguf"
DEMO_Q8 = FIXTURES / "models" / "lugh-demo-4m-q8_0.gguf"


def rel_err(actual: np.ndarray, reference: np.ndarray) -> float:
    """Largest absolute difference, relative to the largest reference magnitude."""
    actual = np.asarray(actual, dtype=np.float64)
    reference = np.asarray(reference, dtype=np.float64)
    assert actual.shape == reference.shape, f"shape {actual.shape} != {reference.shape}"
    return float(np.abs(actual - reference).max() / np.abs(reference).max())


def assert_close(actual, reference, tol: float, what: str) -> None:
    err = rel_err(actual, reference)
    assert err <= tol, f"{what}: max error {err:.3e} x max|ref| exceeds tolerance {tol:.0e}"


def assert_quantized_close(logits, ref, key: str, what: str) -> None:
    """The rule for quantized bases: within 2e-2 of llama.cpp's logits (`llamacpp_{key}`), or
    as close to exact math on the dequantized weights (`dequant_{key}`) as llama.cpp is, to
    10 % of llama.cpp's own distance (tiny-gemma2's logit cap of 5 puts both engines' 8-bit
    activation roundings near 2e-2 of a small largest logit)."""
    llamacpp = ref[f"llamacpp_{key}"]
    if rel_err(logits, llamacpp) <= 2e-2:
        return
    exact = ref[f"dequant_{key}"]
    ours, theirs = rel_err(logits, exact), rel_err(llamacpp, exact)
    assert ours <= 1.1 * theirs, (
        f"{what}: {rel_err(logits, llamacpp):.3e} from llama.cpp (tolerance 2e-2), and "
        f"{ours:.3e} from exact math where llama.cpp is {theirs:.3e}"
    )


@pytest.fixture(params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture
def fixture_dir(arch) -> Path:
    return FIXTURES / arch


@pytest.fixture
def ref(fixture_dir):
    return np.load(fixture_dir / "reference_logits.npz")


@pytest.fixture
def meta(fixture_dir) -> dict:
    return json.loads((fixture_dir / "meta.json").read_text())


def adapter_weights(path: Path) -> list:
    """The base tensors an adapter GGUF adapts ("blk.0.attn_q.weight", or the fused
    "blk.0.attn_qkv.weight" of Phi-3), in file order."""
    import gguf

    names = [t.name.removesuffix(".lora_a") for t in gguf.GGUFReader(path).tensors]
    return [n for n in names if n.endswith(".weight")]


def stored(m: lugh.Model, layer: int, proj: str) -> str:
    """The tensor of `m` that holds projection `proj` of `layer`: its own, or the fused one
    (Phi-3 keeps q, k, v in attn_qkv and gate, up in ffn_up)."""
    fused = {"attn_q": "attn_qkv", "attn_k": "attn_qkv", "attn_v": "attn_qkv", "ffn_gate": "ffn_up"}
    name = f"blk.{layer}.{proj}.weight"
    return name if name in m.tensor_names() else f"blk.{layer}.{fused[proj]}.weight"


_models: dict = {}


def model(path: Path) -> lugh.Model:
    """Models are opened once per session (opening is cheap, but tests are many)."""
    key = str(path)
    if key not in _models:
        _models[key] = lugh.Model(key)
    return _models[key]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Where reference tests run: lugh's own kernels, and the candle recipe (the path CUDA
    and Metal take) on the CPU, with the same tolerances."""
    return request.param


@pytest.fixture
def f32_inference(fixture_dir, device) -> lugh.Inference:
    return lugh.Inference(model(fixture_dir / "base-f32.gguf"), device=device)
