"""Hostile input: every malformed file of the corpus (`hostile.py`) raises a Python exception
with a message that names the file and what is wrong: never a panic, an abort, a hang or an
allocation the file does not justify. Each group runs in a child process under an
address-space limit, so that a crash fails the test instead of ending pytest."""

from __future__ import annotations

import numpy as np
import pytest

import hostile
import lugh
from conftest import FIXTURES

LLAMA = FIXTURES / "tiny-llama"
BASE = LLAMA / "base-q4_0.gguf"


def build_gguf_model(corpus):
    hostile.gguf_structure_cases(corpus, BASE, "model", ["model", "model-nommap"])


def build_gguf_adapter(corpus):
    hostile.gguf_structure_cases(corpus, LLAMA / "lora-qv.gguf", "lora", ["lora"], model=BASE)


def build_model_metadata(corpus):
    hostile.model_cases(corpus, BASE)


def build_adapter_shapes(corpus):
    hostile.adapter_cases(corpus, FIXTURES)


def build_peft(corpus):
    hostile.safetensors_cases(corpus, LLAMA / "lora-qv-peft", BASE)


# (group, builder, fewest cases the group must hold)
GROUPS = [
    ("gguf-model", build_gguf_model, 300),
    ("gguf-adapter", build_gguf_adapter, 140),
    ("model-metadata", build_model_metadata, 25),
    ("adapter-shapes", build_adapter_shapes, 20),
    ("peft", build_peft, 100),
]


@pytest.mark.parametrize("group, build, at_least", GROUPS, ids=[g[0] for g in GROUPS])
def test_every_malformed_file_raises_a_clear_exception(tmp_path, group, build, at_least):
    corpus = hostile.Corpus(tmp_path / group)
    build(corpus)
    assert len(corpus) >= at_least, f"{group}: {len(corpus)} cases"
    hostile.check_results(corpus.cases, hostile.run_batch(corpus.cases, tmp_path))


def test_the_corpus_covers_what_it_claims(tmp_path):
    """Spot checks of the files themselves: a fixture parsed and written back is the same
    file, and the sections are cut where they say."""
    g = hostile.parse_gguf(BASE)
    assert g.encode() == BASE.read_bytes()
    assert len(g.tensors) == 21 and g.data_start % 32 == 0
    points = hostile.truncation_points(g)
    assert points["header-4"] == 4 and points["info0-start"] == g.tensors[0].start
    assert sum(name.startswith("kv") for name in points) == 3 * len(g.kvs)
    assert sum(name.startswith("data") for name in points) == 2 * len(g.tensors) + 1
    header, data = hostile.parse_safetensors(LLAMA / "lora-qv-peft" / "adapter_model.safetensors")
    assert hostile.encode_safetensors(header, data) != b""
    names = [n for n in header if n != "__metadata__"]
    assert len(names) == 8 and all(".lora_" in n for n in names)


@pytest.mark.parametrize(
    "how, message",
    [
        ("abort", "ended with -6 on case 'self/abort'"),
        ("hang", r"ended with timeout \(2 s\) on case 'self/hang'"),
    ],
)
def test_the_harness_reports_a_crash_or_a_hang_with_its_case(tmp_path, how, message):
    cases = [hostile.Case(f"self/{how}", how, "", None)]
    with pytest.raises(AssertionError, match=message):
        hostile.run_batch(cases, tmp_path, timeout=2)


def test_the_harness_limits_memory(tmp_path):
    case = hostile.Case("self/allocate", "allocate", "", "MemoryError")
    assert hostile.run_batch([case], tmp_path)[case.name]["error"] == "MemoryError"


def test_a_huge_context_is_a_bound_not_an_allocation(tmp_path, ref):
    """context_length = 2^60 (or n_ctx = 2^60) sizes nothing: the forward equals the
    model's own, bitwise."""
    g = hostile.parse_gguf(BASE).set("llama.context_length", hostile.U64, 1 << 60)
    path = tmp_path / "long.gguf"
    path.write_bytes(g.encode())
    long = lugh.Model(path)
    assert long.n_ctx_train == 1 << 60
    base = lugh.Inference(lugh.Model(BASE), n_threads=1)
    expected = base.forward(ref["tokens"][:5])
    assert np.array_equal(lugh.Inference(long, n_threads=1).forward(ref["tokens"][:5]), expected)
    wide = lugh.Inference(lugh.Model(BASE), n_ctx=1 << 60, n_threads=1)
    assert np.array_equal(wide.forward(ref["tokens"][:5]), expected)
    cache = wide.create_kv_cache()
    assert np.array_equal(wide.forward_cache(cache, ref["tokens"][:5]), expected)


@pytest.fixture
def ref():
    return np.load(LLAMA / "reference_logits.npz")
