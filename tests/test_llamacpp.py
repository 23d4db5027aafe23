"""llama.cpp itself (through llama-cpp-python, when installed) loads lugh's files and
computes lugh's logits: a saved adapter, and a merged model."""

from __future__ import annotations

import numpy as np
import pytest

import lugh
from conftest import FIXTURES, assert_close

llama_cpp = pytest.importorskip("llama_cpp")

LLAMA = FIXTURES / "tiny-llama"
GGML_TYPE_F32 = 0


def llama_logits(model_path, tokens, lora_path=None) -> np.ndarray:
    """Every position's logits from llama.cpp, with an F32 KV cache."""
    llm = llama_cpp.Llama(
        model_path=str(model_path),
        lora_path=str(lora_path) if lora_path else None,
        n_ctx=64,
        n_threads=2,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        verbose=False,
    )
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float64)


def trained_adapter(m) -> lugh.LoRA:
    t = lugh.LoRA.create(
        m, rank=4, alpha=8.0, targets=("attn_q", "attn_k", "attn_v", "ffn_down"), seed=3
    )
    rng = np.random.default_rng(0)
    for p in t.trainable_parameters()[1::2]:
        p.set_data(rng.normal(0, 0.05, p.shape).astype(np.float32))
    return t


# llama.cpp rounds the activations to a 16-bit adapter's format before its products (bf16
# keeps 8 bits); lugh multiplies them exactly.
@pytest.mark.parametrize(("out_type", "tol"), [("f32", 1e-3), ("f16", 1e-3), ("bf16", 5e-3)])
def test_llama_cpp_applies_a_saved_adapter_like_lugh(tmp_path, out_type, tol):
    m = lugh.Model(LLAMA / "base-f32.gguf")
    tokens = np.load(LLAMA / "reference_logits.npz")["tokens"]
    t = trained_adapter(m)
    t.save(tmp_path / "adapter.gguf", out_type=out_type)
    ours = lugh.Inference(m).forward_all(tokens, lora=lugh.LoRA(tmp_path / "adapter.gguf", m))
    theirs = llama_logits(LLAMA / "base-f32.gguf", tokens, tmp_path / "adapter.gguf")
    assert rel_change(ours, lugh.Inference(m).forward_all(tokens)) > 1e-2, "the adapter matters"
    assert_close(theirs, ours, tol, f"llama.cpp with lugh's {out_type} adapter")


def test_llama_cpp_runs_a_merged_model_like_lugh(tmp_path):
    m = lugh.Model(LLAMA / "base-f32.gguf")
    tokens = np.load(LLAMA / "reference_logits.npz")["tokens"]
    t = trained_adapter(m)
    lugh.merge(m, t, tmp_path / "merged.gguf")
    ours = lugh.Inference(m).forward_all(tokens, lora=t)
    assert_close(
        llama_logits(tmp_path / "merged.gguf", tokens), ours, 1e-3, "llama.cpp on the merged model"
    )


def rel_change(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())
