"""The `lugh` command line on the tiny fixtures: every command, and one-line errors."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import numpy as np
import pytest

import gguf
import lugh
from conftest import DEMO_F16, FIXTURES, assert_close
from lugh.cli import main

LLAMA = FIXTURES / "tiny-llama"


def run(capsys, *argv) -> tuple:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_info(capsys):
    code, out, _ = run(capsys, "info", LLAMA / "base-q4_k_m.gguf")
    assert code == 0
    assert "architecture  llama" in out
    assert "heads         4 query, 2 key/value, 64 per head" in out
    assert "blk.1.ffn_down.weight" in out and "q4_k" in out


@pytest.mark.parametrize("device", ["cpu", "candle-cpu"])
def test_generate_streams_the_greedy_continuation(capsys, device):
    code, out, _ = run(
        capsys,
        "generate",
        "--model",
        DEMO_F16,
        "--prompt",
        "Return the",
        "-n",
        "11",
        "--temperature",
        "0",
        "--device",
        device,
    )
    assert code == 0
    assert out.strip() == "Return the current size of the currently selected data."


def test_generate_with_adapters(capsys):
    args = ["generate", "-m", LLAMA / "base-f32.gguf", "-p", "x", "-n", "4", "--temperature", "0"]
    code, with_lora, _ = run(
        capsys,
        *args,
        "--lora",
        LLAMA / "lora-qv.gguf",
        "--lora-scale",
        "1.0",
        "--lora",
        LLAMA / "lora-all-peft",
        "--lora-scale",
        "0.0",
    )
    assert code == 0
    code, silent, _ = run(capsys, *args, "--lora", LLAMA / "lora-qv.gguf", "--lora-scale", "0")
    code, base, _ = run(capsys, *args)
    assert silent == base


def test_generate_with_adapters_rounded_to_a_dtype(tmp_path, capsys):
    """`--lora-dtype` loads each adapter rounded: the text of the adapter saved in that
    format; a factor the format cannot hold is a one-line error."""
    m = lugh.Model(LLAMA / "base-f32.gguf")
    lugh.LoRA(LLAMA / "lora-all.gguf", m).save(tmp_path / "bf16.gguf", out_type="bf16")
    args = ["generate", "-m", LLAMA / "base-f32.gguf", "-p", "x y", "-n", "6", "--temperature", "0"]
    code, rounded, _ = run(capsys, *args, "--lora", LLAMA / "lora-all.gguf", "--lora-dtype", "bf16")
    assert code == 0
    assert rounded == run(capsys, *args, "--lora", tmp_path / "bf16.gguf")[1]
    big = lugh.LoRA.create(m, rank=2, seed=0)
    b = big.trainable_parameters()[1]
    b.set_data(np.full(b.shape, 1e5, dtype=np.float32))
    big.save(tmp_path / "big.gguf")
    code, _, err = run(capsys, *args, "--lora", tmp_path / "big.gguf", "--lora-dtype", "f16")
    assert code == 1 and "beyond f16's range" in err and err.count("\n") == 1, err
    serve = ["serve", "-m", LLAMA / "base-f32.gguf", "--port", "0"]
    code, _, err = run(
        capsys, *serve, "--lora", f"big={tmp_path / 'big.gguf'}", "--lora-dtype", "f16"
    )
    assert code == 1 and "beyond f16's range" in err, err


def test_finetune_convert_and_merge(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"text": f"Return the value number {i} of the list."}) for i in range(12)
        )
    )
    out = tmp_path / "a.gguf"
    code, _, err = run(
        capsys,
        "finetune",
        "-m",
        DEMO_F16,
        "--data",
        data,
        "--rank",
        "4",
        "--alpha",
        "8",
        "--targets",
        "attn_q,attn_v",
        "--steps",
        "3",
        "--lr",
        "1e-3",
        "--batch",
        "2",
        "--seq-len",
        "16",
        "--eval-every",
        "2",
        "--precision",
        "bf16",
        "--out",
        out,
        "--peft-out",
        tmp_path / "peft",
    )
    assert code == 0, err
    assert "eval loss" in err and "final loss" in err
    m = lugh.Model(DEMO_F16)
    trained = lugh.LoRA(out, m)
    assert (trained.rank(), trained.n_weights) == (4, 8)

    # convert round trips PEFT -> GGUF -> PEFT with equal tensors
    st = pytest.importorskip("safetensors.numpy")
    peft = LLAMA / "lora-all-peft"
    code, _, err = run(
        capsys, "convert", peft, "-m", LLAMA / "base-f32.gguf", "--out", tmp_path / "c.gguf"
    )
    assert code == 0, err

    def convert_c(*options):
        return run(capsys, "convert", tmp_path / "c.gguf", "-m", LLAMA / "base-f32.gguf", *options)

    code, _, err = convert_c("--peft-out", tmp_path / "back")
    assert code == 0, err
    original = st.load_file(peft / "adapter_model.safetensors")
    back = st.load_file(tmp_path / "back" / "adapter_model.safetensors")
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert np.array_equal(back[name], tensor), name
    # --out-type f16 writes the factors as f16, each rounded to nearest
    half = tmp_path / "h.gguf"
    code, _, err = convert_c("--out", half, "--out-type", "f16")
    assert code == 0, err
    f32_tensors = {t.name: np.array(t.data) for t in gguf.GGUFReader(tmp_path / "c.gguf").tensors}
    for t in gguf.GGUFReader(half).tensors:
        assert t.tensor_type == gguf.GGMLQuantizationType.F16, t.name
        assert np.array_equal(np.array(t.data), f32_tensors[t.name].astype(np.float16)), t.name

    merged = tmp_path / "merged.gguf"
    code, _, err = run(
        capsys,
        "merge",
        "-m",
        LLAMA / "base-f32.gguf",
        "--lora",
        LLAMA / "lora-qv.gguf",
        "--out",
        merged,
    )
    assert code == 0, err
    ref = np.load(LLAMA / "reference_logits.npz")
    assert_close(
        lugh.Inference(lugh.Model(merged)).forward_all(ref["tokens"]),
        ref["qv_scale1.0"],
        1e-4,
        "merged by the CLI",
    )


def test_plain_text_data_and_continued_training(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("Open the file.\n\nRead the first line.\n\nClose the file again.\n")

    def finetune(*args):
        common = ("finetune", "-m", DEMO_F16, "--data", data, "--steps", "2", "--seq-len", "8")
        return run(capsys, *common, *args)

    code, _, err = finetune(
        "--lora", LLAMA.parent / "models" / "missing.gguf", "--out", tmp_path / "x.gguf"
    )
    assert code == 1 and "missing.gguf" in err
    code, _, err = finetune("--out", tmp_path / "x.gguf")
    assert code == 0, err
    code, _, err = finetune("--lora", tmp_path / "x.gguf", "--out", tmp_path / "y.gguf")
    assert code == 0, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "/no/such/model.gguf"], "No such file"),
        (
            ["generate", "-m", str(LLAMA / "lora-qv.gguf"), "-p", "x"],
            "no tensor weights|not a|token_embd",
        ),
        (
            ["convert", str(LLAMA / "lora-qv.gguf"), "-m", str(LLAMA / "base-f32.gguf")],
            "give one of",
        ),
        (
            [
                "merge",
                "-m",
                str(LLAMA / "base-f32.gguf"),
                "--lora",
                str(LLAMA / "lora-qv.gguf"),
                "--lora-scale",
                "1",
                "--lora-scale",
                "2",
                "--out",
                "/tmp/never.gguf",
            ],
            "2 --lora-scale values for 1",
        ),
    ],
)
def test_errors_are_one_line_without_traceback(capsys, argv, message):
    import re

    code, _, err = run(capsys, *argv)
    assert code == 1
    assert err.startswith("lugh: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert "Traceback" not in err


def test_demo_in_a_shortened_mode(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lugh", "demo", "--steps", "3", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Base model (greedy):" in result.stdout and "With the adapter (greedy):" in result.stdout
    assert "OK: demo finished" in result.stdout
    assert (tmp_path / "demo-adapter.gguf").exists()


def test_finetune_on_chat_records(tmp_path, capsys):
    template = FIXTURES / "chat_templates" / "phi-3.5.jinja"
    data = tmp_path / "chat.jsonl"
    record = {
        "messages": [
            {"role": "user", "content": "Ping?"},
            {"role": "assistant", "content": "Pong."},
        ]
    }
    data.write_text("\n".join(json.dumps(record) for _ in range(4)))
    common = ["finetune", "-m", DEMO_F16, "--data", data, "--steps", "2", "--batch", "2"]
    code, _, err = run(capsys, *common, "--out", tmp_path / "a.gguf")
    assert code == 1 and "no tokenizer.chat_template" in err
    code, _, err = run(capsys, *common, "--chat-template", template, "--out", tmp_path / "a.gguf")
    assert code == 0, err
    assert (tmp_path / "a.gguf").exists()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps(record) + "\n" + json.dumps({"text": "x"}))
    code, _, err = run(capsys, "finetune", "-m", DEMO_F16, "--data", mixed, "--out", tmp_path / "b")
    assert code == 1 and "mixes chat records" in err


def test_chat_answers_each_turn_until_the_end_of_turn(tmp_path, capsys, monkeypatch):
    """Two turns through `lugh chat`, and `generate --chat`, with an adapter trained to answer
    "Pong.": each answer ends at the template's end-of-turn text, which the demo vocabulary
    spells in pieces."""
    template = FIXTURES / "chat_templates" / "phi-3.5.jinja"
    m = lugh.Model(DEMO_F16)
    inf = lugh.Inference(m, n_threads=2)
    lora = lugh.LoRA.create(m, rank=8, alpha=16.0, targets=("attn_q", "attn_v", "ffn_down"), seed=0)
    trainer = lugh.train.Trainer(
        inf, lora, lr=3e-3, batch_size=2, chat_template=template.read_text(), seed=0
    )
    turn = [{"role": "user", "content": "Ping?"}, {"role": "assistant", "content": "Pong."}]
    trainer.fit([{"messages": turn}, {"messages": turn + turn}], steps=40)
    adapter = tmp_path / "pong.gguf"
    lora.save(adapter)
    monkeypatch.setattr("sys.stdin", io.StringIO("Ping?\nPing?\n/exit\n"))
    code, out, _ = run(
        capsys, "chat", "-m", DEMO_F16, "--lora", adapter, "--chat-template", template, "-n", "8"
    )
    assert code == 0
    assert out.count("Pong.") == 2, out
    code, out, _ = run(
        capsys,
        "generate",
        "--chat",
        "-m",
        DEMO_F16,
        "--lora",
        adapter,
        "--chat-template",
        template,
        "-p",
        "Ping?",
        "--temperature",
        "0",
        "-n",
        "8",
    )
    assert code == 0 and out.strip() == "Pong.", out


def test_chat_session_feeds_only_new_tokens():
    template = (FIXTURES / "chat_templates" / "phi-3.5.jinja").read_text()
    m = lugh.Model(DEMO_F16)
    inf = lugh.Inference(m)
    session = lugh.chat.ChatSession(inf, lugh.Tokenizer(m), template=template)
    messages = [{"role": "user", "content": "Hello there"}]
    first = session.reply(messages, max_tokens=4)
    n_after_first = session.cache.n_cached
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And?"}]
    prompt = session.prompt_tokens(messages)
    session.reply(messages, max_tokens=1)
    # The second turn's prompt shares the first turn's tokens: the cache kept them.
    assert session.fed[: len(prompt)] == prompt
    assert n_after_first > len(session.prompt_tokens(messages[:1])) - 1


def test_info_describes_adapters_and_vocabularies(capsys):
    code, out, _ = run(capsys, "info", LLAMA / "lora-qv.gguf")
    assert code == 0, out
    assert "lora adapter" in out and "alpha         16.0" in out
    assert "blk.0      attn_q r8, attn_v r8" in out
    code, out, _ = run(capsys, "info", FIXTURES / "vocab" / "ggml-vocab-llama-bpe.gguf")
    assert code == 0 and "128256 tokens (gpt2 tokenizer, pre llama-bpe)" in out, out
    assert "bos 128000, eos 128001" in out


def test_an_adapter_is_not_a_model():
    m = lugh.Model(LLAMA / "lora-qv.gguf")
    assert m.architecture == "llama" and m.get_kv("general.type") == "adapter"
    with pytest.raises(ValueError, match="a LoRA adapter, not a base model"):
        lugh.Inference(m)
