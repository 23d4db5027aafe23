"""lugh.Model: metadata, tensors, and the exceptions for files that are missing or broken."""

from __future__ import annotations

import shutil

import pytest

import craft
import gguf
import lugh
from conftest import FIXTURES, model


def test_hyper_parameters_come_from_the_file(fixture_dir, meta):
    m = model(fixture_dir / "base-f32.gguf")
    cfg = meta["config"]
    # GGUF names Gemma 3's text model after the family (HF: gemma3_text).
    assert m.architecture == meta["config"]["model_type"].removesuffix("_text")
    assert m.n_vocab == cfg["vocab_size"]
    assert m.n_embd == cfg["hidden_size"]
    assert m.n_layer == cfg["num_hidden_layers"]
    assert m.n_head == cfg["num_attention_heads"]
    assert m.n_head_kv == cfg["num_key_value_heads"]
    assert m.n_ff == cfg["intermediate_size"]
    assert m.n_ctx_train == cfg["max_position_embeddings"]
    rope = cfg.get("rope_parameters") or {}
    rope = rope.get("full_attention", rope)  # Gemma 3: the global layers' (sliding: their own)
    theta = cfg.get("rope_theta") or rope["rope_theta"]
    assert m.rope_freq_base == pytest.approx(theta)
    assert m.rms_eps == pytest.approx(cfg["rms_norm_eps"])
    assert m.filename.endswith("base-f32.gguf")


def test_tensor_table_and_metadata(fixture_dir, meta):
    m = model(fixture_dir / "base-q8_0.gguf")
    names = m.tensor_names()
    assert len(names) == m.n_tensors
    assert "token_embd.weight" in names
    assert ("output.weight" in names) != meta["config"]["tie_word_embeddings"]
    info = m.tensor_info("blk.0.ffn_down.weight")
    assert info["shape"] == [m.n_embd, m.n_ff]
    assert info["type"] == "q8_0"
    assert info["n_bytes"] == m.n_embd * m.n_ff // 32 * 34
    assert m.tensor_info("blk.0.attn_norm.weight")["type"] == "f32"
    assert len(m.kv_keys()) == m.n_kv
    assert m.get_kv("general.architecture") == m.architecture
    tokens = m.get_kv("tokenizer.ggml.tokens")
    assert isinstance(tokens, list) and len(tokens) == m.n_vocab
    with pytest.raises(KeyError, match="nope"):
        m.tensor_info("nope")
    with pytest.raises(KeyError, match="no.such.key"):
        m.get_kv("no.such.key")


def test_aliases_and_without_mmap_give_the_same_model():
    path = FIXTURES / "tiny-llama" / "base-q4_0.gguf"
    for m in (
        lugh.Model(model=str(path)),
        lugh.Model(file=path),
        lugh.Model(path=path, use_mmap=False),
    ):
        assert m.n_layer == 2
    a = lugh.Inference(lugh.Model(path)).forward([1, 2, 3])
    b = lugh.Inference(lugh.Model(path, use_mmap=False)).forward([1, 2, 3])
    assert (a == b).all()
    with pytest.raises(TypeError, match="one of"):
        lugh.Model()
    with pytest.raises(TypeError, match="only one"):
        lugh.Model(path, file=path)


def test_vocabulary_only_files_open_but_cannot_run():
    m = lugh.Model(FIXTURES / "vocab" / "ggml-vocab-llama-spm.gguf")
    assert m.n_tensors == 0
    assert m.n_vocab == 32000
    with pytest.raises(ValueError, match="no tensor weights"):
        lugh.Inference(m)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        lugh.Model(tmp_path / "missing.gguf")
    with pytest.raises(IsADirectoryError):
        lugh.Model(tmp_path)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "not a GGUF file"),
        (b"PK\x03\x04 this is a zip", "not a GGUF file"),
        (b"GGUF\x01\x00\x00\x00" + b"\x00" * 16, "version 1 is not supported"),
        (b"GGUF\x03\x00\x00\x00\x05", "truncated"),
    ],
)
def test_broken_files_raise_value_error(tmp_path, content, message):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        lugh.Model(path)


def test_truncated_model_names_the_file_and_tensor(tmp_path):
    src = FIXTURES / "tiny-llama" / "base-f16.gguf"
    data = src.read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match=r"cut\.gguf.*past the end of the file"):
        lugh.Model(path)


def test_unsupported_architecture_is_named(tmp_path):
    """Rewrites general.architecture in place: 'llama' -> 'llaxa' (same length)."""
    src = FIXTURES / "tiny-llama" / "base-q4_0.gguf"
    path = tmp_path / "other.gguf"
    shutil.copy(src, path)
    data = bytearray(path.read_bytes())
    key = b"general.architecture"
    at = data.index(key) + len(key) + 4 + 8
    assert data[at : at + 5] == b"llama"
    data[at : at + 5] = b"llaxa"
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="architecture 'llaxa' is not supported"):
        lugh.Model(path)


@pytest.mark.parametrize(
    "key, value",
    [
        ("gemma2.rope.freq_base", -1.0),
        ("gemma2.attn_logit_softcapping", float("nan")),
        ("gemma2.final_logit_softcapping", -30.0),
    ],
)
def test_metadata_that_would_make_logits_nan_is_refused(tmp_path, key, value):
    bad = craft.rewrite(
        FIXTURES / "tiny-gemma2" / "base-f32.gguf",
        tmp_path / "bad.gguf",
        set_kv={key: (value, gguf.GGUFValueType.FLOAT32)},
    )
    with pytest.raises(ValueError, match=f"{key}: .* must be a positive number"):
        lugh.Model(bad)
