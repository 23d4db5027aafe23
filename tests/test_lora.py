"""LoRA at inference: GGUF and PEFT adapters against transformers + PEFT (float64), on every
forward path, several adapters, merge, and one test per validation error."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

import craft
import gguf
import lugh
from conftest import (
    FIXTURES,
    QUANTS,
    adapter_weights,
    assert_close,
    assert_quantized_close,
    model,
    rel_err,
)

SCALES = [1.0, 0.5, 0.0, 2.0]
SOURCES = ["gguf", "peft-dir", "peft-file"]


def adapter_path(fixture_dir, name: str, source: str):
    return {
        "gguf": fixture_dir / f"lora-{name}.gguf",
        "peft-dir": fixture_dir / f"lora-{name}-peft",
        "peft-file": fixture_dir / f"lora-{name}-peft" / "adapter_model.safetensors",
    }[source]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("name", ["qv", "all"])
def test_adapters_match_peft_at_every_scale(f32_inference, ref, fixture_dir, meta, name, source):
    lora = lugh.LoRA(adapter_path(fixture_dir, name, source), f32_inference.model)
    spec = next(a for a in meta["adapters"] if a["name"] == name)
    assert (lora.rank(), lora.alpha) == (spec["rank"], spec["alpha"])
    assert lora.n_weights == len(spec["targets"]) * f32_inference.n_layer
    assert lora.format == ("gguf" if source == "gguf" else "safetensors")
    assert not lora.trainable
    for scale in SCALES:
        lora.scale = scale
        logits = f32_inference.forward_all(ref["tokens"], lora=lora)
        assert_close(logits, ref[f"{name}_scale{scale}"], 1e-4, f"{name} {source} scale {scale}")


def test_scale_zero_gives_the_base_exactly(f32_inference, ref, fixture_dir):
    lora = lugh.LoRA(fixture_dir / "lora-all.gguf", f32_inference.model, scale=0.0)
    assert lora.scale == 0.0
    base = f32_inference.forward_all(ref["tokens"])
    assert np.array_equal(f32_inference.forward_all(ref["tokens"], lora=lora), base)


def test_accessors(f32_inference, fixture_dir):
    lora = lugh.LoRA(
        adapter=str(fixture_dir / "lora-qv.gguf"), model=f32_inference.model, scale=0.5
    )
    assert lora.scale == 0.5
    assert lora.architecture == f32_inference.model.architecture
    names = adapter_weights(fixture_dir / "lora-qv.gguf")
    assert sorted(lora.weight_names()) == sorted(names)
    layers = [int(n.split(".")[1]) for n in lora.weight_names()]
    assert layers == sorted(layers), "pairs layer by layer"
    assert lora.rank(names[-1]) == 8
    with pytest.raises(KeyError):
        lora.rank("blk.0.ffn_down.weight")
    lora.alpha = 8.0
    assert lora.alpha == 8.0
    with pytest.raises(ValueError, match="finite"):
        lora.scale = float("nan")
    same = lugh.LoRA(file=fixture_dir / "lora-qv.gguf", model=f32_inference.model)
    assert same.n_weights == len(names)


@pytest.mark.parametrize("quant", QUANTS)
def test_adapter_on_quantized_bases_matches_llama_cpp(fixture_dir, ref, quant, device):
    """Path checked: ggml numerics (8-bit activations in the base matmuls), reference
    llama.cpp with the same adapter, tolerance 2e-2."""
    path = fixture_dir / f"base-{quant}.gguf"
    if not path.exists() or f"llamacpp_{quant}_qv_scale1.0" not in ref:
        pytest.skip(f"no {quant} base or llama.cpp logits in this fixture")
    m = model(path)
    lora = lugh.LoRA(fixture_dir / "lora-qv.gguf", m)
    logits = lugh.Inference(m, device=device).forward_all(ref["tokens"], lora=lora)
    assert_quantized_close(logits, ref, f"{quant}_qv_scale1.0", f"{quant} + qv vs llama.cpp")


def test_batch_with_one_adapter_per_sequence(f32_inference, ref, fixture_dir):
    m = f32_inference.model
    qv = lugh.LoRA(fixture_dir / "lora-qv.gguf", m)
    all_ = lugh.LoRA(fixture_dir / "lora-all-peft", m)
    seqs = [ref[f"batch_tokens_{i}"] for i in range(4)]
    for lora, key in ((qv, "qv"), (all_, "all")):
        for i, out in enumerate(f32_inference.forward_batch(seqs, lora=lora)):
            assert_close(out, ref[f"batch_{key}_{i}"][-1], 1e-4, f"batch {key} {i}")
    mixed = f32_inference.forward_batch(seqs, lora=[qv, None, [all_], all_])
    for i, key in enumerate(["qv", "base", "all", "all"]):
        assert_close(mixed[i], ref[f"batch_{key}_{i}"][-1], 1e-4, f"mixed batch {i} ({key})")


def test_cache_and_pool_paths_with_an_adapter_equal_forward_all(f32_inference, ref, fixture_dir):
    lora = lugh.LoRA(fixture_dir / "lora-all.gguf", f32_inference.model, scale=0.5)
    tokens = ref["tokens"].tolist()
    full = f32_inference.forward_all(tokens, lora=lora)
    cache = f32_inference.create_kv_cache()
    steps = np.stack([f32_inference.forward_cache(cache, [t], lora=lora) for t in tokens])
    assert_close(steps, full, 1e-5, "cache with adapter")
    pool = f32_inference.create_memory_pool()
    assert_close(
        f32_inference.forward_pool(pool, tokens, lora=lora), full[-1], 1e-5, "pool with adapter"
    )


def test_several_adapters_add_up(f32_inference, ref, fixture_dir):
    m = f32_inference.model
    qv = lugh.LoRA(fixture_dir / "lora-qv.gguf", m, scale=0.5)
    all_ = lugh.LoRA(fixture_dir / "lora-all.gguf", m, scale=0.0)
    logits = f32_inference.forward_all(ref["tokens"], lora=[qv, all_])
    assert_close(logits, ref["qv_scale0.5"], 1e-4, "qv@0.5 + all@0")


def test_merge_equals_the_unmerged_forward(tmp_path, f32_inference, ref, fixture_dir):
    m = f32_inference.model
    loras = [
        lugh.LoRA(fixture_dir / "lora-qv.gguf", m),
        lugh.LoRA(fixture_dir / "lora-all-peft", m, scale=0.5),
    ]
    unmerged = f32_inference.forward_all(ref["tokens"], lora=loras)
    for out_type, tol in ((None, 1e-5), ("f32", 1e-5), ("f16", 5e-3)):
        path = tmp_path / f"merged-{out_type}.gguf"
        lugh.merge(m, loras, path, out_type=out_type)
        merged = lugh.Model(path)
        adapted = adapter_weights(fixture_dir / "lora-qv.gguf")[0]
        assert merged.tensor_info(adapted)["type"] == (out_type or "f32")
        logits = lugh.Inference(merged).forward_all(ref["tokens"])
        assert_close(logits, unmerged, tol, f"merged ({out_type}) vs unmerged")
        reader = gguf.GGUFReader(path)
        assert [t.name for t in reader.tensors] == m.tensor_names()
    assert list(tmp_path.glob("*.tmp")) == []


def gguf_weight(file, name: str) -> np.ndarray:
    """Tensor `name` of a GGUF file, decoded by gguf-py."""
    t = next(t for t in gguf.GGUFReader(file).tensors if t.name == name)
    return gguf.quants.dequantize(t.data, t.tensor_type).reshape(t.data.shape[0], -1)


def assert_merged_to_one_q8_0_rounding(merged, base, adapter, names, scaling) -> None:
    """Merged Q8_0 weights `names` equal dequant(W) + scaling·B·A to one q8_0 rounding."""
    tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(adapter).tensors}
    for name in names:
        a, b = tensors[f"{name}.lora_a"], tensors[f"{name}.lora_b"]
        expected = gguf_weight(base, name) + scaling * b @ a
        step = np.abs(expected).reshape(-1, 32).max(axis=1) / 127  # one q8_0 step per block
        err = np.abs(gguf_weight(merged, name) - expected).reshape(-1, 32).max(axis=1)
        # Half a step, plus the f16 rounding of the block scale (127 × 2^-11 of a step).
        assert (err <= step * (0.5 + 127 / 2048)).all(), (
            f"{name}: rounding beyond one q8_0 rounding"
        )


def test_merge_requantizes_to_the_base_type(tmp_path, fixture_dir):
    """Merged q8_0 weights equal dequant(W) + s·B·A to within one q8_0 rounding."""
    base, adapter = fixture_dir / "base-q8_0.gguf", fixture_dir / "lora-qv.gguf"
    m = model(base)
    lora = lugh.LoRA(adapter, m)
    path = tmp_path / "merged.gguf"
    lugh.merge(m, lora, path)
    names = adapter_weights(adapter)
    assert lugh.Model(path).tensor_info(names[0])["type"] == "q8_0"
    assert_merged_to_one_q8_0_rounding(path, base, adapter, (names[0], names[-1]), 16.0 / 8)
    untouched = "blk.0.ffn_down.weight"
    assert np.array_equal(gguf_weight(path, untouched), gguf_weight(base, untouched))
    with pytest.raises(ValueError, match="out_type"):
        lugh.merge(m, lora, tmp_path / "x.gguf", out_type="q9_9")


def test_merge_writes_codebook_weights_it_adapts_as_q8_0(tmp_path):
    """lugh has no encoder for the codebook formats (llama.cpp's needs an importance matrix):
    adapted weights of an IQ2_S base are written as Q8_0, the others copied; an IQ2_S
    `out_type` is refused."""
    fixture_dir = FIXTURES / "tiny-qwen3"
    base, adapter = fixture_dir / "base-iq2_s.gguf", fixture_dir / "lora-qv.gguf"
    m = model(base)
    lora = lugh.LoRA(adapter, m)
    path = tmp_path / "merged.gguf"
    lugh.merge(m, lora, path)
    merged = lugh.Model(path)
    names = adapter_weights(adapter)
    assert {merged.tensor_info(n)["type"] for n in names} == {"q8_0"}
    assert_merged_to_one_q8_0_rounding(path, base, adapter, names, 16.0 / 8)
    untouched = "blk.0.ffn_down.weight"
    assert merged.tensor_info(untouched)["type"] == "iq2_s"
    assert np.array_equal(gguf_weight(path, untouched), gguf_weight(base, untouched))
    with pytest.raises(ValueError, match="cannot encode iq2_s"):
        lugh.merge(m, lora, tmp_path / "x.gguf", out_type="iq2_s")
    assert not (tmp_path / "x.gguf").exists()


def test_save_round_trips(tmp_path, f32_inference, ref, fixture_dir):
    m = f32_inference.model
    lora = lugh.LoRA(fixture_dir / "lora-all-peft", m)
    expected = f32_inference.forward_all(ref["tokens"], lora=lora)
    lora.save(tmp_path / "a.gguf")
    lora.save_peft(tmp_path / "peft")
    for path in (tmp_path / "a.gguf", tmp_path / "peft"):
        again = lugh.LoRA(path, m)
        assert_close(
            f32_inference.forward_all(ref["tokens"], lora=again),
            expected,
            1e-6,
            f"reloaded {path.name}",
        )
    fields = gguf.GGUFReader(tmp_path / "a.gguf").fields
    assert fields["general.type"].contents() == "adapter"
    assert fields["adapter.type"].contents() == "lora"
    assert fields["adapter.lora.alpha"].contents() == 8.0
    with pytest.raises(ValueError, match=r"must end with \.gguf"):
        lora.save(tmp_path / "a.bin")


def rounded(values: np.ndarray, out_type: str) -> np.ndarray:
    """f32 `values` rounded to nearest (ties to even) in `out_type`, as f32."""
    if out_type == "f16":
        return values.astype(np.float16).astype(np.float32)
    bits = values.astype(np.float32).view(np.uint32)
    top = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return (top << 16).astype(np.uint32).view(np.float32)


@pytest.mark.parametrize(("out_type", "tol"), [("f16", 3e-3), ("bf16", 2e-2)])
def test_half_precision_saves_round_each_factor_and_decode_reads_them_exactly(
    tmp_path, f32_inference, ref, fixture_dir, out_type, tol
):
    """`save(out_type=...)` writes each factor rounded to nearest, as gguf-py reads it back;
    one token at a time (`forward_cache`, which reads such an adapter in its 16-bit format)
    gives the logits of the whole-sequence forward over the same values."""
    m = f32_inference.model
    source = fixture_dir / "lora-all.gguf"
    path = tmp_path / f"{out_type}.gguf"
    lugh.LoRA(source, m).save(path, out_type=out_type)
    saved = {t.name: t for t in gguf.GGUFReader(path).tensors}
    for t in gguf.GGUFReader(source).tensors:
        values = np.array(t.data)
        written = saved[t.name]
        assert written.tensor_type == gguf.GGMLQuantizationType[out_type.upper()]
        got = gguf.quants.dequantize(written.data, written.tensor_type).reshape(values.shape)
        assert np.array_equal(got, rounded(values, out_type)), t.name
    half = lugh.LoRA(path, m)
    tokens = ref["tokens"].tolist()
    full = f32_inference.forward_all(tokens, lora=half)
    cache = f32_inference.create_kv_cache()
    steps = np.stack([f32_inference.forward_cache(cache, [t], lora=half) for t in tokens])
    assert_close(steps, full, 1e-5, f"{out_type} adapter, token by token")
    assert_close(full, ref["all_scale1.0"], tol, f"{out_type} adapter against PEFT's f64")


@pytest.mark.parametrize(("dtype", "tol"), [("f16", 3e-3), ("bf16", 2e-2)])
def test_a_dtype_rounds_the_factors_on_load_as_a_save_in_it_would(
    tmp_path, f32_inference, ref, fixture_dir, dtype, tol
):
    """`LoRA(..., dtype=...)` (the opt-in inexact mode) holds each factor rounded to
    nearest: the logits, whole-sequence and token by token, are those of the adapter saved
    in that format and loaded back, within `tol` of PEFT's f64 ones."""
    m = f32_inference.model
    source = fixture_dir / "lora-all.gguf"
    lugh.LoRA(source, m).save(tmp_path / "saved.gguf", out_type=dtype)
    saved = lugh.LoRA(tmp_path / "saved.gguf", m)
    rounded_on_load = lugh.LoRA(source, m, dtype=dtype)
    tokens = ref["tokens"].tolist()
    full = f32_inference.forward_all(tokens, lora=rounded_on_load)
    assert np.array_equal(full, f32_inference.forward_all(tokens, lora=saved))
    cache = f32_inference.create_kv_cache()
    steps = [f32_inference.forward_cache(cache, [t], lora=rounded_on_load) for t in tokens]
    cache = f32_inference.create_kv_cache()
    expected = [f32_inference.forward_cache(cache, [t], lora=saved) for t in tokens]
    assert np.array_equal(np.stack(steps), np.stack(expected))
    assert_close(full, ref["all_scale1.0"], tol, f"adapter rounded to {dtype} against PEFT's f64")
    torch_name = {"f16": "float16", "bf16": "bfloat16"}[dtype]
    same = lugh.LoRA(source, m, dtype=torch_name)
    assert np.array_equal(full, f32_inference.forward_all(tokens, lora=same))
    exact = f32_inference.forward_all(tokens, lora=lugh.LoRA(source, m))
    for kept in ("f32", "float32", "auto", None):
        again = lugh.LoRA(source, m, dtype=kept)
        assert np.array_equal(exact, f32_inference.forward_all(tokens, lora=again)), kept
    assert not np.array_equal(full, exact)


def test_a_dtype_is_a_float_format_the_factors_fit(tmp_path, f32_inference, fixture_dir):
    m = f32_inference.model
    with pytest.raises(ValueError, match="dtype"):
        lugh.LoRA(fixture_dir / "lora-all.gguf", m, dtype="q8_0")
    t = lugh.LoRA.create(m, rank=2, seed=0)
    b = t.trainable_parameters()[1]
    b.set_data(np.full(b.shape, 1e5, dtype=np.float32))
    t.save(tmp_path / "big.gguf")
    with pytest.raises(ValueError, match="beyond f16's range"):
        lugh.LoRA(tmp_path / "big.gguf", m, dtype="f16")
    big = lugh.LoRA(tmp_path / "big.gguf", m, dtype="bf16")
    assert big.n_weights == t.n_weights


def test_half_precision_saves_refuse_what_they_cannot_hold(tmp_path, f32_inference):
    t = lugh.LoRA.create(f32_inference.model, rank=2, seed=0)
    b = t.trainable_parameters()[1]
    b.set_data(np.full(b.shape, 1e5, dtype=np.float32))
    with pytest.raises(ValueError, match="range"):
        t.save(tmp_path / "big.gguf", out_type="f16")
    t.save(tmp_path / "big.gguf", out_type="bf16")
    with pytest.raises(ValueError, match="out_type"):
        t.save(tmp_path / "q.gguf", out_type="q8_0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.gguf"]


def test_save_peft_of_the_gguf_adapter_equals_the_original_peft_tensors(
    tmp_path, f32_inference, fixture_dir
):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    lora = lugh.LoRA(fixture_dir / "lora-all.gguf", f32_inference.model)
    lora.save_peft(tmp_path / "out")
    original = safetensors_numpy.load_file(
        fixture_dir / "lora-all-peft" / "adapter_model.safetensors"
    )
    saved = safetensors_numpy.load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert sorted(saved) == sorted(original)
    for name, tensor in original.items():
        assert np.allclose(saved[name], tensor, atol=1e-7), name
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")


# --- PEFT options -------------------------------------------------------------------------


def peft_copy(tmp_path, fixture_dir, name="all", **config_changes):
    dst = tmp_path / f"peft-{name}"
    shutil.copytree(fixture_dir / f"lora-{name}-peft", dst)
    config_path = dst / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(config_changes)
    config_path.write_text(json.dumps(config))
    return dst


def test_rslora_scales_by_alpha_over_sqrt_rank(tmp_path, f32_inference, ref, fixture_dir):
    # lora-all: r = 4, alpha = 8. rsLoRA: 8 / sqrt(4) = 4 = twice the 8 / 4 of plain LoRA.
    lora = lugh.LoRA(peft_copy(tmp_path, fixture_dir, use_rslora=True), f32_inference.model)
    assert lora.use_rslora
    assert_close(
        f32_inference.forward_all(ref["tokens"], lora=lora), ref["all_scale2.0"], 1e-4, "rslora"
    )
    # Saved for llama.cpp as alpha * sqrt(r), so alpha / r gives the same factor.
    lora.save(tmp_path / "rs.gguf")
    assert gguf.GGUFReader(tmp_path / "rs.gguf").fields["adapter.lora.alpha"].contents() == 16.0
    again = lugh.LoRA(tmp_path / "rs.gguf", f32_inference.model)
    assert_close(
        f32_inference.forward_all(ref["tokens"], lora=again),
        ref["all_scale2.0"],
        1e-4,
        "rslora saved",
    )


def test_alpha_pattern_sets_alpha_per_module(tmp_path, f32_inference, ref, fixture_dir):
    config = json.loads((fixture_dir / "lora-all-peft" / "adapter_config.json").read_text())
    modules = config["target_modules"]
    lora = lugh.LoRA(
        peft_copy(tmp_path, fixture_dir, alpha_pattern={m: 16.0 for m in modules}),
        f32_inference.model,
    )
    assert_close(
        f32_inference.forward_all(ref["tokens"], lora=lora),
        ref["all_scale2.0"],
        1e-4,
        "alpha_pattern",
    )
    # Per-module alphas survive a GGUF save (folded into B) and a PEFT save.
    qv = json.loads((fixture_dir / "lora-qv-peft" / "adapter_config.json").read_text())
    last = sorted(qv["target_modules"])[-1]
    half = lugh.LoRA(
        peft_copy(tmp_path, fixture_dir, name="qv", alpha_pattern={last: 32.0}),
        f32_inference.model,
    )
    expected = f32_inference.forward_all(ref["tokens"], lora=half)
    assert rel_err(expected, ref["qv_scale1.0"]) > 1e-3
    half.save(tmp_path / "half.gguf")
    half.save_peft(tmp_path / "half-peft")
    for path in (tmp_path / "half.gguf", tmp_path / "half-peft"):
        again = lugh.LoRA(path, f32_inference.model)
        assert_close(
            f32_inference.forward_all(ref["tokens"], lora=again),
            expected,
            1e-5,
            f"alpha_pattern via {path.name}",
        )


def test_missing_config_warns_and_uses_alpha_equal_to_rank(
    tmp_path, f32_inference, ref, fixture_dir
):
    dst = peft_copy(tmp_path, fixture_dir)
    (dst / "adapter_config.json").unlink()
    with pytest.warns(UserWarning, match="alpha = rank"):
        lora = lugh.LoRA(dst, f32_inference.model)
    assert lora.alpha == 4.0
    # factor alpha / r = 1 = half the fixture's 8 / 4
    assert_close(
        f32_inference.forward_all(ref["tokens"], lora=lora), ref["all_scale0.5"], 1e-4, "no config"
    )
    lora.alpha = 8.0
    assert_close(
        f32_inference.forward_all(ref["tokens"], lora=lora), ref["all_scale1.0"], 1e-4, "alpha set"
    )


@pytest.mark.parametrize(
    "change, option",
    [
        ({"use_dora": True}, "use_dora"),
        ({"lora_bias": True}, "lora_bias"),
        ({"bias": "lora_only"}, "bias"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"fan_in_fan_out": True}, "fan_in_fan_out"),
        ({"peft_type": "IA3"}, "IA3"),
    ],
)
def test_peft_options_that_change_the_math_are_refused(
    tmp_path, f32_inference, fixture_dir, change, option
):
    with pytest.raises(ValueError, match=option):
        lugh.LoRA(peft_copy(tmp_path, fixture_dir, **change), f32_inference.model)


def test_peft_lm_head_target_is_refused(tmp_path, f32_inference, fixture_dir):
    st = pytest.importorskip("safetensors.numpy")
    dst = peft_copy(tmp_path, fixture_dir)
    tensors = st.load_file(dst / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.lora_A.weight"] = np.zeros((4, 256), np.float32)
    tensors["base_model.model.lm_head.lora_B.weight"] = np.zeros((1000, 4), np.float32)
    st.save_file(tensors, dst / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="lm_head"):
        lugh.LoRA(dst, f32_inference.model)


# --- validation errors, one hand-made file each ------------------------------------------------


def test_format_comes_from_the_path(tmp_path, f32_inference, fixture_dir):
    other = tmp_path / "adapter.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="format comes from the path"):
        lugh.LoRA(other, f32_inference.model)
    with pytest.raises(FileNotFoundError):
        lugh.LoRA(tmp_path / "missing.gguf", f32_inference.model)
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        lugh.LoRA(empty_dir, f32_inference.model)


def test_a_model_file_is_not_an_adapter(f32_inference, fixture_dir):
    with pytest.raises(ValueError, match="not an adapter: general.type is 'model'"):
        lugh.LoRA(fixture_dir / "base-q8_0.gguf", f32_inference.model)


def test_adapter_type_must_be_lora(tmp_path, f32_inference, fixture_dir):
    bad = craft.rewrite(
        fixture_dir / "lora-qv.gguf",
        tmp_path / "cv.gguf",
        set_kv={"adapter.type": ("control_vector", craft.STRING)},
    )
    with pytest.raises(ValueError, match="not a LoRA adapter: adapter.type is 'control_vector'"):
        lugh.LoRA(bad, f32_inference.model)


def test_architecture_mismatch():
    llama, qwen = FIXTURES / "tiny-llama", FIXTURES / "tiny-qwen2"
    with pytest.raises(
        ValueError, match="adapter architecture 'llama' does not match the model's 'qwen2'"
    ):
        lugh.LoRA(llama / "lora-qv.gguf", model(qwen / "base-f32.gguf"))


def test_a_without_b(tmp_path, f32_inference, fixture_dir):
    last = adapter_weights(fixture_dir / "lora-qv.gguf")[-1]
    bad = craft.rewrite(
        fixture_dir / "lora-qv.gguf",
        tmp_path / "half.gguf",
        edit=craft.dropped(f"{last}.lora_b"),
    )
    with pytest.raises(ValueError, match=f"'{last}' has lora_a but no lora_b"):
        lugh.LoRA(bad, f32_inference.model)


def test_base_tensor_that_does_not_exist(tmp_path, f32_inference, fixture_dir):
    deeper = craft.renamed("blk.1.", "blk.7.")
    bad = craft.rewrite(fixture_dir / "lora-qv.gguf", tmp_path / "deep.gguf", edit=deeper)
    with pytest.raises(ValueError, match=r"'blk\.7\.\w+\.weight' has no base tensor"):
        lugh.LoRA(bad, f32_inference.model)


def test_shapes_that_do_not_fit(tmp_path, f32_inference, fixture_dir):
    names = adapter_weights(fixture_dir / "lora-qv.gguf")
    m = f32_inference.model
    n_out = [m.tensor_info(n)["shape"][0] for n in (names[0], names[-1])]
    cut_in = craft.only(f"{names[0]}.lora_a", lambda a: a[:, :128])
    bad = craft.rewrite(fixture_dir / "lora-qv.gguf", tmp_path / "in.gguf", edit=cut_in)
    with pytest.raises(
        ValueError,
        match=rf"'{names[0]}' does not fit: lora_a \[8, 128\] and lora_b \[{n_out[0]}, 8\]",
    ):
        lugh.LoRA(bad, f32_inference.model)
    cut_rank = craft.only(f"{names[-1]}.lora_b", lambda a: a[:, :4])
    bad = craft.rewrite(fixture_dir / "lora-qv.gguf", tmp_path / "rank.gguf", edit=cut_rank)
    with pytest.raises(ValueError, match=rf"lora_a \[8, 256\] and lora_b \[{n_out[1]}, 4\]"):
        lugh.LoRA(bad, f32_inference.model)
    # ffn pairs of tiny-llama (n_ff 512) do not fit the demo model (n_ff 768)
    with pytest.raises(ValueError, match="another base model"):
        lugh.LoRA(
            fixture_dir.parent / "tiny-llama" / "lora-all.gguf",
            model(FIXTURES / "models" / "lugh-demo-4m-q8_0.gguf"),
        )


def test_norm_tensors_are_ignored_and_unknown_tensors_refused(
    tmp_path, f32_inference, ref, fixture_dir
):
    norm = np.ones(256, np.float32)
    ok = craft.rewrite(
        fixture_dir / "lora-qv.gguf",
        tmp_path / "norm.gguf",
        extra=(("blk.0.attn_norm.weight", norm),),
    )
    lora = lugh.LoRA(ok, f32_inference.model)
    assert_close(
        f32_inference.forward_all(ref["tokens"], lora=lora),
        ref["qv_scale1.0"],
        1e-4,
        "norm ignored",
    )
    bad = craft.rewrite(
        fixture_dir / "lora-qv.gguf",
        tmp_path / "odd.gguf",
        extra=(("blk.0.attn_q.weight.lora_c", norm),),
    )
    with pytest.raises(ValueError, match="neither a lora_a nor a lora_b"):
        lugh.LoRA(bad, f32_inference.model)


def test_adapter_without_alpha_behaves_like_llama_cpp(tmp_path, f32_inference, ref, fixture_dir):
    """llama.cpp: no adapter.lora.alpha -> the factor is the user scale alone."""
    bare = craft.rewrite(
        fixture_dir / "lora-qv.gguf", tmp_path / "bare.gguf", drop_kv=("adapter.lora.alpha",)
    )
    lora = lugh.LoRA(bare, f32_inference.model, scale=2.0)  # 2.0 == alpha / rank = 16 / 8
    assert lora.alpha == 0.0
    assert_close(
        f32_inference.forward_all(ref["tokens"], lora=lora), ref["qv_scale1.0"], 1e-4, "no alpha"
    )


def test_an_adapter_cannot_run_on_a_model_of_another_shape(fixture_dir):
    demo = model(FIXTURES / "models" / "lugh-demo-4m-q8_0.gguf")
    lora = lugh.LoRA.create(demo, rank=2, targets=("ffn_up",))
    with pytest.raises(ValueError, match="blk.0.ffn_up.weight"):
        lugh.Inference(model(FIXTURES / "tiny-llama" / "base-f32.gguf")).forward([1, 2], lora=lora)


def test_warnings_are_not_raised_for_complete_adapters(f32_inference, fixture_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lugh.LoRA(fixture_dir / "lora-qv-peft", f32_inference.model)
