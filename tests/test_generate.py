"""Sampling and generation: llama.cpp's greedy continuations of the demo model, the cached
decode against a plain argmax loop, callbacks, streaming and seeds."""

from __future__ import annotations

import json

import numpy as np
import pytest

import lugh
from conftest import DEMO_F16, DEMO_Q8, FIXTURES, model

GREEDY = json.loads((FIXTURES / "models" / "llamacpp_greedy.json").read_text())


@pytest.fixture(params=[DEMO_F16, DEMO_Q8], ids=["f16", "q8_0"])
def demo(request):
    return request.param


def test_greedy_generation_matches_llama_cpp(demo, device):
    inf = lugh.Inference(model(demo), device=device)
    for case in GREEDY[demo.name]:
        out = inf.generate(case["prompt_ids"], max_tokens=32, greedy=True)
        # Token for token, at least up to the first step where llama.cpp's top two logits were
        # closer than 0.05 (there another valid arithmetic may pick the other token).
        gaps = case["step_gaps"]
        exact = next((i for i, g in enumerate(gaps) if g < 0.05), len(case["greedy_ids"]))
        assert out[:exact] == case["greedy_ids"][:exact], case["prompt"]


def test_greedy_generate_equals_an_argmax_loop_over_forward(demo, device):
    inf = lugh.Inference(model(demo), device=device)
    prompt = GREEDY[demo.name][0]["prompt_ids"]
    tokens = list(prompt)
    for _ in range(8):
        tokens.append(int(np.argmax(inf.forward(tokens))))
    assert inf.generate(prompt, max_tokens=8, greedy=True, eos_token=-1) == tokens[len(prompt) :]
    assert (
        inf.generate(prompt, max_tokens=8, temperature=0.0, eos_token=-1) == tokens[len(prompt) :]
    )


def test_callback_streaming_and_eos():
    inf = lugh.Inference(model(DEMO_F16))
    case = GREEDY[DEMO_F16.name][1]
    seen = []
    out = inf.generate(
        case["prompt_ids"], max_tokens=32, greedy=True, callback=lambda t, n: seen.append((t, n))
    )
    assert out == case["greedy_ids"], "stops at EOS, which is not returned"
    assert seen == [(t, i + 1) for i, t in enumerate(out)]
    stopped = inf.generate(
        case["prompt_ids"], max_tokens=32, greedy=True, callback=lambda t, n: n == 3
    )
    assert stopped == out[:3]
    assert list(inf.generate_iter(case["prompt_ids"], max_tokens=32, greedy=True)) == out
    stream = inf.generate_iter(case["prompt_ids"], max_tokens=32, greedy=True)
    assert next(stream) == out[0]
    stream.close()
    assert list(stream) == []


def test_sampling_is_seeded_and_filtered():
    inf = lugh.Inference(model(DEMO_F16))
    prompt = GREEDY[DEMO_F16.name][0]["prompt_ids"]
    a = inf.generate(prompt, max_tokens=12, temperature=1.0, seed=11, eos_token=-1)
    b = inf.generate(prompt, max_tokens=12, temperature=1.0, seed=11, eos_token=-1)
    assert a == b and len(a) == 12
    assert any(
        inf.generate(prompt, max_tokens=12, temperature=1.0, seed=s, eos_token=-1) != a
        for s in range(12, 16)
    )
    logits = inf.forward(prompt)
    top = np.argsort(-logits)
    assert inf.sample_top_k(logits, top_k=1, seed=1) == top[0]
    assert inf.sample_top_p(logits, temperature=0.0) == top[0]
    draws = {inf.sample_top_k(logits, temperature=1.0, top_k=3, seed=s) for s in range(60)}
    assert draws <= set(top[:3].tolist()) and len(draws) > 1
    assert inf.sample_top_p(logits.tolist(), top_p=1e-6, seed=3) == top[0]


def test_sampling_arguments_are_checked():
    inf = lugh.Inference(model(DEMO_F16))
    with pytest.raises(ValueError, match="top_p"):
        inf.sample_top_p([0.0, 1.0], top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        inf.sample_top_k([0.0, 1.0], temperature=-1.0)
    with pytest.raises(ValueError, match="empty"):
        inf.sample_top_k([])
    with pytest.raises(IndexError):
        inf.generate([1, 10**6])


def test_generation_stops_at_the_end_of_the_context():
    inf = lugh.Inference(model(DEMO_F16), n_ctx=8)
    out = inf.generate([1, 393, 268], max_tokens=100, greedy=True, eos_token=-1)
    assert len(out) == 8 - 3 + 1  # the last token is sampled from the full context


@pytest.mark.parametrize("quant", ["f32", "q8_0"])
def test_greedy_generation_of_each_architecture_matches_llama_cpp(fixture_dir, ref, quant, device):
    """Every tiny architecture's greedy continuation of its reference tokens, against
    llama.cpp's (24 tokens, end-of-sequence not stopping), token for token up to the first
    step where llama.cpp's top two logits were closer than 0.05."""
    key = f"llamacpp_greedy_{quant}"
    if key not in ref:
        pytest.skip(f"no llama.cpp greedy generation in {fixture_dir.name}")
    inf = lugh.Inference(model(fixture_dir / f"base-{quant}.gguf"), device=device)
    expected, gaps = ref[key].tolist(), ref[f"llamacpp_greedy_gaps_{quant}"]
    out = inf.generate(ref["tokens"], max_tokens=len(expected), greedy=True, eos_token=-1)
    exact = next((i for i, g in enumerate(gaps) if g < 0.05), len(expected))
    assert out[:exact] == expected[:exact], f"{exact} steps compared"
