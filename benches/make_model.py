"""Writes a random-weight LLaMA of the 1B class (or the 135M class) for the side-by-side
benchmarks.

    python benches/make_model.py                 # 22 layers: ~2.2 GB F16 + Q8_0 + Q4_K_M + HF
    python benches/make_model.py --layers 4      # a quick variant
    python benches/make_model.py --shape 135m    # 30 layers of the 135M class: ~0.25 GB F16

Into `bench-models/llama-{1b,135m}-class-{L}L/`:
- `model-f16.gguf`: `--shape 1b` (default, TinyLlama's shape): hidden 2048, 32 heads, 4 KV
  heads, FFN 5632, output matrix of its own; `--shape 135m` (SmolLM-135M's): hidden 576,
  9 heads, 3 KV heads, FFN 1536, tied embeddings (no `output.weight`: the logits come from
  `token_embd.weight`). Both: context 2048, weights N(0, 0.02) in F16, norms 1 (F32); the
  tokenizer metadata (32000 tokens) of llama.cpp's `ggml-vocab-llama-spm.gguf`, so both engines
  load a complete model. (The real 135M class has 49152 tokens; its embedding is 32000 x 576
  here.) Hidden 576 is no multiple of 256, so llama.cpp's quantizer falls back from K-quants
  to Q5_0 / Q8_0 for the matrices of that input width, as for the real 135M models.
- `model-q8_0.gguf`, `model-q4_k_m.gguf`: made from the F16 file by llama.cpp's own quantizer
  (`llama_model_quantize` through llama-cpp-python), so lugh and llama.cpp read the same bytes;
  `--quants` names others (benchlib's `QUANTS`). The codebook types alone (IQ3_XXS, IQ3_S,
  IQ2_XXS, IQ2_XS, IQ2_S, IQ1_S, IQ1_M; that quantizer refuses IQ2 and IQ1 without an
  importance matrix) are written matrix by matrix through llama.cpp's `ggml_quantize_chunk`
  with one of ones; `iq3_m` is llama.cpp's mix.
- `hf/`: the same F16 values as a transformers `LlamaForCausalLM` (`config.json` +
  `model.safetensors`), q/k rows back in HF order, for the PyTorch + PEFT training comparison.

Unless `--no-verify`, the HF copy is checked against the GGUF: transformers (float32) and lugh
must give the same logits on a few tokens, which a wrong q/k permutation would break.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchlib import (
    QUANTS,
    SHAPES,
    VOCAB,
    Shape,
    default_threads,
    gguf_path,
    hf_dir,
    model_dir,
)

WEIGHT_STD = 0.02

# GGUF tensor name -> HF LlamaForCausalLM name ("{il}" is the layer index).
HF_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{il}.attn_norm.weight": "model.layers.{il}.input_layernorm.weight",
    "blk.{il}.attn_q.weight": "model.layers.{il}.self_attn.q_proj.weight",
    "blk.{il}.attn_k.weight": "model.layers.{il}.self_attn.k_proj.weight",
    "blk.{il}.attn_v.weight": "model.layers.{il}.self_attn.v_proj.weight",
    "blk.{il}.attn_output.weight": "model.layers.{il}.self_attn.o_proj.weight",
    "blk.{il}.ffn_norm.weight": "model.layers.{il}.post_attention_layernorm.weight",
    "blk.{il}.ffn_gate.weight": "model.layers.{il}.mlp.gate_proj.weight",
    "blk.{il}.ffn_up.weight": "model.layers.{il}.mlp.up_proj.weight",
    "blk.{il}.ffn_down.weight": "model.layers.{il}.mlp.down_proj.weight",
}


def shapes(s: Shape) -> dict[str, tuple[int, ...]]:
    """Every tensor's numpy shape ([n_out, n_in] for matrices), in GGUF order."""
    n_kv = s.n_head_kv * s.head_dim
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (s.n_vocab, s.n_embd)}
    for il in range(s.n_layer):
        out |= {
            f"blk.{il}.attn_norm.weight": (s.n_embd,),
            f"blk.{il}.attn_q.weight": (s.n_embd, s.n_embd),
            f"blk.{il}.attn_k.weight": (n_kv, s.n_embd),
            f"blk.{il}.attn_v.weight": (n_kv, s.n_embd),
            f"blk.{il}.attn_output.weight": (s.n_embd, s.n_embd),
            f"blk.{il}.ffn_norm.weight": (s.n_embd,),
            f"blk.{il}.ffn_gate.weight": (s.n_ff, s.n_embd),
            f"blk.{il}.ffn_up.weight": (s.n_ff, s.n_embd),
            f"blk.{il}.ffn_down.weight": (s.n_embd, s.n_ff),
        }
    out["output_norm.weight"] = (s.n_embd,)
    if not s.tie_embeddings:
        out["output.weight"] = (s.n_vocab, s.n_embd)
    return out


def weight(name: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """A tensor's values, repeatable from (seed, name): norms 1 in F32, matrices N(0, 0.02)
    rounded to F16 (the HF copy holds the same F16 values)."""
    if len(shape) == 1:
        return np.ones(shape, dtype=np.float32)
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    values = rng.standard_normal(shape, dtype=np.float32)
    values *= WEIGHT_STD
    return values.astype(np.float16)


def hf_name(name: str) -> str:
    parts = name.split(".")
    if parts[0] == "blk":
        return HF_NAMES[".".join(["blk", "{il}", *parts[2:]])].format(il=parts[1])
    return HF_NAMES[name]


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """GGUF q/k rows -> HF rows.

    llama.cpp's `convert_hf_to_gguf.py` (`LlamaModel.permute`) reorders each head's rows from
    HF's rotate-half RoPE layout (first half, second half) to interleaved pairs, i.e.
    `w.reshape(n_head, 2, head_dim // 2, n_in).swapaxes(1, 2)`; this is its inverse. `n_head`
    is the number of heads of this matrix (`n_head_kv` for k). A wrong order runs without error
    and only changes the logits at positions > 0 — `verify` checks it.
    """
    n_out, n_in = w.shape
    return w.reshape(n_head, n_out // n_head // 2, 2, n_in).swapaxes(1, 2).reshape(n_out, n_in)


def write_gguf(path: Path, s: Shape, tensors: dict[str, np.ndarray]) -> None:
    """F16 GGUF with llama.cpp's keys and the vocabulary of `VOCAB`, named after its
    directory."""
    import gguf

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name(f"lugh-bench-{path.parent.name}")
    writer.add_block_count(s.n_layer)
    writer.add_context_length(s.n_ctx_train)
    writer.add_embedding_length(s.n_embd)
    writer.add_feed_forward_length(s.n_ff)
    writer.add_head_count(s.n_head)
    writer.add_head_count_kv(s.n_head_kv)
    writer.add_rope_dimension_count(s.head_dim)
    writer.add_rope_freq_base(s.rope_freq_base)
    writer.add_layer_norm_rms_eps(s.rms_eps)
    writer.add_vocab_size(s.n_vocab)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    vocab = gguf.GGUFReader(VOCAB)
    for key, field in vocab.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub)
    n_tokens = len(vocab.fields["tokenizer.ggml.tokens"].contents())
    if n_tokens != s.n_vocab:
        raise SystemExit(f"{VOCAB} has {n_tokens} tokens, the model {s.n_vocab}")
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_hf(directory: Path, s: Shape, tensors: dict[str, np.ndarray]) -> None:
    """`LlamaForCausalLM` files: `config.json` from transformers' own `LlamaConfig`, and the
    same F16 values (F32 norms) in `model.safetensors`, q/k rows in HF order."""
    from safetensors.numpy import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=s.n_vocab,
        hidden_size=s.n_embd,
        intermediate_size=s.n_ff,
        num_hidden_layers=s.n_layer,
        num_attention_heads=s.n_head,
        num_key_value_heads=s.n_head_kv,
        max_position_embeddings=s.n_ctx_train,
        rms_norm_eps=s.rms_eps,
        rope_theta=s.rope_freq_base,
        tie_word_embeddings=s.tie_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=False,
        mlp_bias=False,
    )
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    hf = {}
    for name, array in tensors.items():
        if ".attn_q." in name:
            array = unpermute_qk(array, s.n_head)
        elif ".attn_k." in name:
            array = unpermute_qk(array, s.n_head_kv)
        hf[hf_name(name)] = np.ascontiguousarray(array)
    save_file(hf, str(directory / "model.safetensors"), metadata={"format": "pt"})


def quantize(src: Path, dst: Path, ftype: int, n_threads: int) -> None:
    """llama.cpp's quantizer, as `llama-quantize src dst TYPE` runs it; its log (per-tensor
    types chosen) goes to `dst` + `.log`."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads
    log = dst.with_suffix(".log")
    with log.open("w") as sink:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)  # llama.cpp logs to the C stderr
        try:
            rc = llama_cpp.llama_model_quantize(
                str(src).encode(), str(dst).encode(), ctypes.byref(params)
            )
        finally:
            os.dup2(saved, 2)
            os.close(saved)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {dst} failed ({rc}): see {log}")


def quantize_chunks(src: Path, dst: Path, ggml_type: int) -> None:
    """Every matrix whose rows are whole blocks of `ggml_type` through llama.cpp's
    `ggml_quantize_chunk` (from llama-cpp-python's libggml), with an importance matrix of ones;
    the other tensors as in `src` (tests/fixtures/make_tiny.py makes its codebook bases so)."""
    import llama_cpp

    import gguf

    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    ggml = ctypes.CDLL(str(lib))
    ggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    ggml.ggml_quantize_chunk.argtypes = (
        [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p]
    )
    qtype = gguf.GGMLQuantizationType(ggml_type)
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), field.types[0], sub_type=sub)
    for t in reader.tensors:
        a = np.ascontiguousarray(t.data).astype(np.float32)
        if a.ndim != 2 or a.shape[1] % block:
            writer.add_tensor(t.name, a)
            continue
        q = np.zeros((a.shape[0], a.shape[1] // block * size), dtype=np.uint8)
        ones = np.ones(a.shape[1], dtype=np.float32)
        n = ggml.ggml_quantize_chunk(
            ggml_type, a.ctypes.data, q.ctypes.data, 0, a.shape[0], a.shape[1], ones.ctypes.data
        )
        assert n == q.size, (t.name, n, q.size)
        writer.add_tensor(t.name, q, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def verify(n_layer: int, shape: str, n_threads: int, n_tokens: int = 12) -> float:
    """Largest |logit difference| / largest |logit| between lugh on the F16 GGUF and
    transformers (float32) on the HF copy, over every position of a few tokens.

    lugh's training forward is used: exact f32 math on the F16 values, as transformers does,
    so the two agree to ~1e-6, while a wrong q/k order gives ~1 (the inference path rounds
    activations and lands near 1e-3)."""
    import torch
    from transformers import LlamaForCausalLM

    import lugh

    torch.set_num_threads(n_threads)
    tokens = [1, *np.random.default_rng(0).integers(3, 32000, n_tokens - 1).tolist()]
    inf = lugh.Inference(lugh.Model(str(gguf_path(n_layer, "f16", shape))), 64, n_threads)
    ours = lugh.train.forward(inf, tokens).numpy().astype(np.float64)
    del inf
    model = LlamaForCausalLM.from_pretrained(hf_dir(n_layer, shape), dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.tensor([tokens])).logits[0].double().numpy()
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape",
        choices=list(SHAPES),
        default="1b",
        help="model class: 1b (default, 22 layers) or 135m (30 layers, tied embeddings)",
    )
    parser.add_argument(
        "--layers", type=int, help="transformer blocks (default: the shape's, 22 or 30)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quants",
        default="q8_0,q4_k_m",
        help="quantized files to make from the F16 one, among QUANTS ('' for none)",
    )
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers copy")
    parser.add_argument("--no-verify", action="store_true", help="skip the logits check")
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--force", action="store_true", help="rewrite files that exist")
    args = parser.parse_args(argv)

    s = SHAPES[args.shape]
    if args.layers is not None:
        s = replace(s, n_layer=args.layers)
    out = model_dir(s.n_layer, args.shape)
    out.mkdir(parents=True, exist_ok=True)
    f16 = gguf_path(s.n_layer, "f16", args.shape)
    hf = hf_dir(s.n_layer, args.shape)
    info = {"shape": s.as_dict(), "seed": args.seed, "weight_std": WEIGHT_STD}
    record = out / "make_model.json"
    old = json.loads(record.read_text()) if record.exists() else {}
    if "shape" in old:  # a record older than a field of Shape holds that field's default
        old["shape"] = Shape(**old["shape"]).as_dict()
    # Files made from other weights are made again.
    force = args.force or any(old.get(k, v) != v for k, v in info.items())
    need_f16 = force or not f16.exists()
    need_hf = not args.no_hf and (force or not (hf / "model.safetensors").exists())
    if need_f16 or need_hf:
        started = time.perf_counter()
        tensors = {name: weight(name, shape, args.seed) for name, shape in shapes(s).items()}
        print(f"generated {len(tensors)} tensors in {time.perf_counter() - started:.1f} s")
        if need_f16:
            write_gguf(f16, s, tensors)
            print(f"wrote {f16} ({f16.stat().st_size / 2**30:.2f} GiB)")
        if need_hf:
            write_hf(hf, s, tensors)
            print(f"wrote {hf}/")
        del tensors
    for quant in filter(None, args.quants.split(",")):
        if QUANTS.get(quant) is None:
            raise SystemExit(f"unknown quantization {quant!r}: choose among {', '.join(QUANTS)}")
        dst = gguf_path(s.n_layer, quant, args.shape)
        if need_f16 or not dst.exists():
            started = time.perf_counter()
            how = QUANTS[quant]
            if isinstance(how, tuple):
                quantize_chunks(f16, dst, how[1])
            else:
                quantize(f16, dst, how, args.threads)
            took = time.perf_counter() - started
            print(f"wrote {dst} ({dst.stat().st_size / 2**30:.2f} GiB, {took:.0f} s)")
    if not args.no_hf and not args.no_verify:
        err = verify(s.n_layer, args.shape, args.threads)
        info["verify_rel_err_lugh_f16_vs_transformers_f32"] = err
        print(f"lugh (F16 GGUF) vs transformers (HF copy, f32): max|diff|/max|logit| = {err:.2e}")
        if err > 1e-4:
            print("MISMATCH: the HF copy does not compute what the GGUF does", file=sys.stderr)
            return 1
    record.write_text(json.dumps(info, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
