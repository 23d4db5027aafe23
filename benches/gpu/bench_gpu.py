"""lugh on a GPU, beside PyTorch + PEFT and transformers on the same GPU.

    python benches/gpu/bench_gpu.py                     # CUDA, 22 layers, full sizes
    python benches/gpu/bench_gpu.py --device candle-cpu --layers 1 --quick   # plumbing, on a CPU

Needs `benches/make_model.py --layers L --quants ''` first (the F16 GGUF and its `hf/` copy);
the Q4_K file (`lugh.merge(..., out_type="q4_k")`) and the adapters are made here when missing
(`--prepare-only` makes them and stops). Every case runs in its own child process, so each has
its own CUDA context and its own peak GPU memory:

- `lugh-infer` (F16, Q4_K): prefill `--prefill` tokens into an empty KV cache, then decode
  `--decode` tokens one at a time (`create_kv_cache` / `forward_cache`), and `generate`
  (greedy, EOS ignored) end to end; without and with a rank-16 LoRA on attn_q, attn_v
  (B ~ N(0, 0.05), so it does real work). The last-position logits after the prefill are
  compared with lugh's own CPU backend on the same file.
- `hf-generate`: transformers `generate` (bf16, greedy, `--decode` new tokens after the same
  prompt) with the same adapter attached through PEFT. Decode t/s = (decode - 1) / (time of
  `generate(decode)` - time of `generate(1)`): the prefill and first token left out.
- `lugh-train`: `lugh.train.train_step` + `lugh.optim.AdamW` on the F16 GGUF, rank 16 on q,k,v,o,
  batch `--batch` x `--seq`; `torch-bf16`, `torch-f32`: PyTorch + PEFT on the `hf/` copy (same
  values, same adapter, same tokens; `benches/bench_train.py`'s recipe).

Peak GPU memory: nvidia-smi sampled in a background thread of each child (lugh has its own CUDA
context, which `torch.cuda` statistics do not see), the same way for both engines; PyTorch's
`max_memory_allocated` too. Without nvidia-smi, torch, transformers or peft, those columns say
n/a. Tokens/s are medians over `--reps` repetitions (`--steps` steps) after a warm-up; a case
whose warm-up shows it slow runs fewer (at least one), and `--budget-s` stops starting cases,
so the whole run fits a fixed time (benches/gpu/run.sh).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchlib as bl  # noqa: E402

LORA_RANK = 16
LORA_ALPHA = 32.0
INFER_TARGETS = ("attn_q", "attn_v")
TRAIN_TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output")
QUANTS = ("f16", "q4_k")
# lugh and PyTorch f32 compute the same f32 math on the same F16 values (bench_train.py).
LOSS_RTOL = 1e-4
TORCH_DTYPES = ("bf16", "f32")
# Seconds an inference variant (weights x adapter) should take at most, about.
VARIANT_S = 20.0
# What each case needs beyond lugh and the F16 GGUF.
PEERS = ("torch", "transformers", "peft")

QUICK = {"prefill": 32, "decode": 8, "reps": 2, "batch": 1, "seq": 64, "steps": 2, "warmup": 1}
FULL = {"prefill": 128, "decode": 32, "reps": 3, "batch": 4, "seq": 256, "steps": 3, "warmup": 2}


# ------------------------------------------------------------------------------------- files


def q4k_path(n_layer: int) -> Path:
    """The Q4_K file, made from the F16 one by lugh's quantizer (not llama.cpp's Q4_K_M mix)."""
    return bl.gguf_path(n_layer, "q4_k")


def infer_adapter(n_layer: int) -> Path:
    """Rank 16 on q, v as GGUF: the same file and recipe as `bench_inference.py`'s."""
    return bl.model_dir(n_layer) / f"lora-r{LORA_RANK}-qv.gguf"


def infer_adapter_peft(n_layer: int) -> Path:
    """The same adapter as a PEFT directory, for transformers."""
    return bl.model_dir(n_layer) / f"lora-r{LORA_RANK}-qv-peft"


def train_adapter(n_layer: int) -> Path:
    """Rank 16 on q, k, v, o as a PEFT directory: the same as `bench_train.py`'s."""
    return bl.model_dir(n_layer) / f"lora-r{LORA_RANK}-qkvo-peft"


def stale(path: Path, source: Path) -> bool:
    """Missing, or older than the file it is made from (a remade model has other weights)."""
    return not path.exists() or path.stat().st_mtime < source.stat().st_mtime


# ------------------------------------------------------------------------------------ timing


def time_reps(fn: Callable[[], object], reps: int) -> list[float]:
    """Wall seconds of `reps` calls of `fn` (which must wait for the device itself)."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def stats(times: Sequence[float]) -> dict:
    return {"median_s": statistics.median(times), "best_s": min(times), "all_s": list(times)}


def compare(actual: np.ndarray, reference: np.ndarray) -> dict:
    """max |diff| / max |reference| and the correlation of two logit vectors."""
    a, r = np.asarray(actual, np.float64), np.asarray(reference, np.float64)
    return {
        "rel_err": float(np.abs(a - r).max() / np.abs(r).max()),
        "corr": float(np.corrcoef(a, r)[0, 1]),
    }


# -------------------------------------------------------------------------------- GPU memory


def gpu_index(device: str) -> int | None:
    """The CUDA ordinal of a lugh device name ("cuda" -> 0, "cuda:1" -> 1); None off CUDA."""
    if not device.startswith("cuda"):
        return None
    return int(device.split(":")[1]) if ":" in device else 0


def torch_device(device: str) -> str:
    """The torch device that matches a lugh device name."""
    if device.startswith("cuda"):
        return device
    return "mps" if device.startswith("metal") else "cpu"


def nvidia_smi(*query: str) -> list[list[str]] | None:
    """Rows of `nvidia-smi <query> --format=csv,noheader,nounits`; None if it cannot run."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, *query, "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [[f.strip() for f in line.split(",")] for line in out.splitlines() if line.strip()]


def _mib(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:  # "[N/A]", "[Not Supported]"
        return None


class GpuMemory:
    """Peak GPU memory of this process, from nvidia-smi polled in a background thread.

    lugh's CUDA context is its own (`torch.cuda` statistics do not see it), so every engine is
    measured alike: `used_memory` of this pid in `--query-compute-apps` (the CUDA context
    included). In a container nvidia-smi may list host pids, or none; then the growth of the
    GPU's `memory.used` since `start` (called before this process touches CUDA) stands in,
    which is right as long as nothing else allocates on the GPU meanwhile. Polling misses
    peaks shorter than the interval plus one nvidia-smi call (~tens of ms)."""

    def __init__(self, device: str, interval_s: float = 0.1) -> None:
        self.gpu = gpu_index(device)
        self.interval_s = interval_s
        self.pid = os.getpid()
        self.baseline: float | None = None
        self.peak_process: float | None = None
        self.peak_device: float | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        apps = nvidia_smi("--query-compute-apps=pid,used_memory")
        if apps is not None:
            mine = [_mib(row[1]) for row in apps if len(row) > 1 and row[0] == str(self.pid)]
            mine_known = [v for v in mine if v is not None]
            if mine_known:
                self.peak_process = max(self.peak_process or 0.0, sum(mine_known))
        used = self._device_used()
        if used is not None:
            self.peak_device = max(self.peak_device or 0.0, used)
        self.samples += 1

    def _device_used(self) -> float | None:
        rows = nvidia_smi("-i", str(self.gpu), "--query-gpu=memory.used")
        return _mib(rows[0][0]) if rows else None

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def start(self) -> GpuMemory:
        if self.gpu is not None and shutil.which("nvidia-smi"):
            self.baseline = self._device_used()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def stop(self) -> dict:
        """{"peak_mib", "method", ...}; peak_mib None where nothing could be measured."""
        if self._thread is None:
            why = "not a CUDA device" if self.gpu is None else "no nvidia-smi"
            return {"peak_mib": None, "method": None, "why": why}
        self._sample()
        self._stop.set()
        self._thread.join()
        out: dict[str, Any] = {
            "samples": self.samples,
            "peak_process_mib": self.peak_process,
            "peak_device_mib": self.peak_device,
            "baseline_device_mib": self.baseline,
        }
        if self.peak_process is not None:
            return out | {"peak_mib": self.peak_process, "method": "nvidia-smi pid"}
        if self.peak_device is not None and self.baseline is not None:
            delta = self.peak_device - self.baseline
            return out | {"peak_mib": delta, "method": "nvidia-smi device delta"}
        return out | {"peak_mib": None, "method": None, "why": "nvidia-smi gave no numbers"}


# ------------------------------------------------------------------------ the child processes


def child_prepare(args: argparse.Namespace) -> dict:
    """Makes what is missing or older than the F16 file: the Q4_K file and the adapters."""
    import lugh

    f16 = bl.gguf_path(args.layers, "f16")
    model = lugh.Model(str(f16))
    made = []
    q4k = q4k_path(args.layers)
    if stale(q4k, f16):
        started = time.perf_counter()
        lugh.merge(model, None, str(q4k), out_type="q4_k")
        made.append(f"{q4k.name} ({time.perf_counter() - started:.0f} s)")
    gguf, peft = infer_adapter(args.layers), infer_adapter_peft(args.layers)
    if stale(gguf, f16) or stale(peft / "adapter_config.json", f16):
        lora = lugh.LoRA.create(
            model, rank=LORA_RANK, alpha=LORA_ALPHA, targets=INFER_TARGETS, seed=0
        )
        bl.fill_lora_b(lora, seed=0)
        lora.save(str(gguf))
        lora.save_peft(str(peft))
        made += [gguf.name, peft.name]
    train = train_adapter(args.layers)
    if stale(train / "adapter_config.json", f16):
        lora = lugh.LoRA.create(
            model, rank=LORA_RANK, alpha=LORA_ALPHA, targets=TRAIN_TARGETS, seed=0
        )
        bl.fill_lora_b(lora, seed=0)
        lora.save_peft(str(train))
        made.append(train.name)
    return {"made": made, "lugh_devices": lugh.devices()}


def child_lugh_infer(args: argparse.Namespace) -> dict:
    """Prefill, decode and generate with lugh on `--device`, base and with the q,v adapter;
    the prefill logits against lugh's CPU backend."""
    import lugh

    path = bl.gguf_path(args.layers, "f16") if args.quant == "f16" else q4k_path(args.layers)
    model = lugh.Model(str(path))
    n_ctx = -(-(args.prefill + args.decode + 8) // 256) * 256
    started = time.perf_counter()
    inf = lugh.Inference(model, n_ctx=n_ctx, n_threads=args.threads, device=args.device)
    load_s = time.perf_counter() - started
    lora = lugh.LoRA(str(infer_adapter(args.layers)), model)
    prompt = bl.random_tokens(args.prefill, seed=1)
    follow = bl.random_tokens(args.decode, seed=2, bos=False)
    cache = inf.create_kv_cache()
    out: dict[str, Any] = {"device": inf.device, "load_s": load_s, "variants": {}}
    logits: dict[str, np.ndarray] = {}
    for name, adapter in (("base", None), ("lora", lora)):

        def prefill(adapter: Any = adapter) -> np.ndarray:
            cache.clear()
            return inf.forward_cache(cache, prompt, lora=adapter)

        def decode(adapter: Any = adapter) -> None:
            for t in follow:
                inf.forward_cache(cache, [t], lora=adapter)

        counts: list[int] = []  # tokens each `generate` returned

        def generate(adapter: Any = adapter, counts: list[int] = counts) -> None:
            ids = inf.generate(
                prompt, max_tokens=args.decode, greedy=True, eos_token=-1, lora=adapter
            )
            counts.append(len(ids))

        logits[name] = np.asarray(prefill(), dtype=np.float32)  # warm-up
        warm = time_reps(decode, 1)[0]
        # A slow device gets fewer repetitions: a variant stays near VARIANT_S seconds.
        reps = max(1, min(args.reps, int(VARIANT_S / 3 / max(warm, 1e-9))))
        pre = time_reps(prefill, reps)
        dec = []
        for _ in range(reps):
            prefill()
            dec += time_reps(decode, 1)
        gen = time_reps(generate, max(1, min(reps, 2)))
        out["variants"][name] = {
            "prefill": stats(pre),
            "decode": stats(dec),
            "generate": stats(gen),
            "reps": reps,
            "generated_tokens": counts[-1],
            "prefill_tok_s": args.prefill / statistics.median(pre),
            "decode_tok_s": args.decode / statistics.median(dec),
            "decode_best_tok_s": args.decode / min(dec),
            "generate_tok_s": counts[-1] / statistics.median(gen),
        }
    # The same prompt on lugh's own CPU kernels: how far the device's arithmetic moves logits.
    cpu = lugh.Inference(model, n_ctx=n_ctx, n_threads=args.threads, device="cpu")
    for name, adapter in (("base", None), ("lora", lora)):
        reference = cpu.forward(prompt, lora=adapter)
        out["variants"][name]["vs_cpu"] = compare(logits[name], reference)
    if args.logits_out:
        np.save(args.logits_out, logits["lora"])
    return out


def child_hf_generate(args: argparse.Namespace) -> dict:
    """transformers `generate` (bf16, greedy) with the q,v adapter attached through PEFT."""
    import torch
    from peft import PeftModel
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    dev = torch_device(args.device)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    base = LlamaForCausalLM.from_pretrained(bl.hf_dir(args.layers), dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base.to(dev), str(infer_adapter_peft(args.layers)))
    model.eval()
    load_s = time.perf_counter() - started
    prompt = torch.tensor([bl.random_tokens(args.prefill, seed=1)], device=dev)
    mask = torch.ones_like(prompt)

    def generate(n: int) -> int:
        with torch.no_grad():
            ids = model.generate(
                input_ids=prompt,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                num_beams=1,
                pad_token_id=0,
            )
        sync(dev)
        return ids.shape[1] - prompt.shape[1]

    with torch.no_grad():
        logits = model(input_ids=prompt).logits[0, -1].float().cpu().numpy()
    n_new = generate(args.decode)  # warm-up
    generate(1)
    full = time_reps(lambda: generate(args.decode), args.reps)
    first = time_reps(lambda: generate(1), args.reps)
    decode_s = statistics.median(full) - statistics.median(first)
    if args.logits_out:
        np.save(args.logits_out, logits)
    return {
        "load_s": load_s,
        "generated_tokens": n_new,
        "generate": stats(full),
        "generate_1": stats(first),
        "generate_tok_s": n_new / statistics.median(full),
        "decode_tok_s": (n_new - 1) / decode_s if decode_s > 0 else None,
        "attn_implementation": getattr(base.config, "_attn_implementation", None),
    } | torch_info(torch, dev)


def train_batch(args: argparse.Namespace) -> list[list[int]]:
    """`--batch` sequences of `--seq` tokens, the same in every child (bench_train.py's)."""
    return [bl.random_tokens(args.seq, seed=100 + i) for i in range(args.batch)]


def child_lugh_train(args: argparse.Namespace) -> dict:
    """`train_step` + AdamW with lugh on `--device`, the F16 base."""
    import lugh

    model = lugh.Model(str(bl.gguf_path(args.layers, "f16")))
    inf = lugh.Inference(model, n_ctx=args.seq, n_threads=args.threads, device=args.device)
    lora = lugh.LoRA(str(train_adapter(args.layers)), model).trainable_copy()
    opt = lugh.optim.AdamW(lora.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    seqs = train_batch(args)
    losses: list[float] = []

    def step() -> None:
        opt.zero_grad()
        loss_sum, n_scored = lugh.train.train_step(inf, seqs, lora)
        opt.step()
        losses.append(loss_sum / n_scored)

    return train_result(args, losses, step) | {"device": inf.device}


def child_torch_train(args: argparse.Namespace) -> dict:
    """PyTorch + PEFT in `--dtype` on the `hf/` copy: bench_train.py's recipe on the GPU."""
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    dev = torch_device(args.device)
    torch.set_num_threads(args.threads)
    if dev.startswith("cuda"):  # true f32 matmuls in the f32 run, as lugh and the CPU do
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[args.dtype]
    model = LlamaForCausalLM.from_pretrained(bl.hf_dir(args.layers), dtype=dtype).to(dev)
    adapter = str(train_adapter(args.layers))
    config = LoraConfig.from_pretrained(adapter)
    config.lora_dropout = 0.0
    config.inference_mode = False
    model = PeftModel.from_pretrained(model, adapter, config=config, is_trainable=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ids = torch.tensor(train_batch(args), device=dev)
    losses: list[float] = []

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss  # mean over batch x (seq - 1) positions
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        sync(dev)

    return (
        train_result(args, losses, step)
        | {
            "adapter_dtype": str(params[0].dtype),
            "attn_implementation": getattr(model.config, "_attn_implementation", None),
        }
        | torch_info(torch, dev)
    )


def train_result(args: argparse.Namespace, losses: list[float], step: Callable[[], None]) -> dict:
    """Runs `--warmup` then `--steps` timed steps; tokens/s from the median step.

    A slow engine gets fewer steps (at least one warm-up and one timed) so that the case stays
    near `--train-time-s`: the first warm-up step's time sets how many fit."""
    warm = time_reps(step, 1)
    fit = max(1, int(args.train_time_s / max(warm[0], 1e-9)))
    warm += time_reps(step, min(args.warmup - 1, fit - 1))
    n_steps = max(1, min(args.steps, fit - len(warm)))
    timed = time_reps(step, n_steps)
    tokens = args.batch * args.seq
    return {
        "losses": losses,
        "warmup_s": warm,
        "steps": stats(timed),
        "n_steps": n_steps,
        "step_s": statistics.median(timed),
        "tok_s": tokens / statistics.median(timed),
        "best_tok_s": tokens / min(timed),
    }


def sync(dev: str) -> None:
    import torch

    if dev.startswith("cuda"):
        torch.cuda.synchronize()
    elif dev == "mps":
        torch.mps.synchronize()


def torch_info(torch: Any, dev: str) -> dict:
    """torch's versions and, on CUDA, its own peak memory counters (MiB)."""
    info: dict[str, Any] = {"torch": torch.__version__, "torch_cuda": torch.version.cuda}
    if dev.startswith("cuda"):
        info["torch_max_allocated_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
        info["torch_max_reserved_mib"] = torch.cuda.max_memory_reserved(dev) / 2**20
        info["torch_gpu"] = torch.cuda.get_device_name(dev)
    return info


CHILDREN: dict[str, Callable[[argparse.Namespace], dict]] = {
    "prepare": child_prepare,
    "lugh-infer": child_lugh_infer,
    "hf-generate": child_hf_generate,
    "lugh-train": child_lugh_train,
    "torch-train": child_torch_train,
}


def run_child_main(args: argparse.Namespace) -> dict:
    """A child: its case, with this process's peak GPU memory and RSS."""
    bl.pin_threads(args.threads)
    memory = GpuMemory(args.device).start()  # before anything touches CUDA
    started = time.perf_counter()
    try:
        result = CHILDREN[args.child](args)
    finally:
        gpu = memory.stop()
    return result | {
        "gpu_mem": gpu,
        "peak_gpu_mib": gpu["peak_mib"],
        "peak_rss_mib": bl.peak_rss_mib(),
        "total_s": time.perf_counter() - started,
    }


# -------------------------------------------------------------------------------- the parent


class Cases:
    """Runs child cases one after another within a time budget; each result (or the reason
    it has none) lands in `results` and, after every case, in the JSON file."""

    def __init__(self, args: argparse.Namespace, result: dict) -> None:
        self.args = args
        self.result = result
        self.deadline = time.monotonic() + args.budget_s if args.budget_s else None

    def run(self, key: str, child_args: list[str], missing: str | None = None) -> dict | None:
        """The child's JSON, or None (recorded under `skipped` with the reason)."""
        if missing:
            return self._skip(key, missing)
        timeout = self.args.case_timeout
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left < 20:
                return self._skip(key, f"time budget spent ({self.args.budget_s:.0f} s)")
            timeout = min(timeout, left - 5)
        print(f"running {key} (at most {timeout:.0f} s) ...", flush=True)
        started = time.perf_counter()
        try:
            out = bl.run_child(Path(__file__), child_args, timeout_s=timeout)
        except subprocess.TimeoutExpired:
            return self._skip(key, f"timed out after {timeout:.0f} s", failed=True)
        except (RuntimeError, json.JSONDecodeError) as e:
            first = str(e).strip().splitlines()[0]  # "child failed (exit N): command"
            why = f"{first.split(': ')[0]}; its traceback is in the log above"
            return self._skip(key, why, failed=True)
        out["wall_s"] = time.perf_counter() - started
        self.result["cases"][key] = out
        print(f"  done in {out['wall_s']:.0f} s: {summary(key, out)}", flush=True)
        self.save()
        return out

    def _skip(self, key: str, why: str, failed: bool = False) -> None:
        print(f"  {'FAILED' if failed else 'skipped'} {key}: {why}", flush=True)
        self.result["skipped"][key] = why
        if failed:
            self.result["failed"].append(key)
        self.save()
        return None

    def save(self) -> None:
        if self.args.json:
            self.args.json.write_text(json.dumps(self.result, indent=1) + "\n")


def summary(key: str, out: dict) -> str:
    """One line of a case's main numbers, for the progress log."""
    mem = out.get("peak_gpu_mib")
    mem_text = f", peak GPU {mem:.0f} MiB" if mem is not None else ""
    if "variants" in out:
        parts = [
            f"{name}: prefill {v['prefill_tok_s']:.1f}, decode {v['decode_tok_s']:.1f} tok/s"
            for name, v in out["variants"].items()
        ]
        return "; ".join(parts) + mem_text
    if "losses" in out:
        return (
            f"{out['tok_s']:.1f} tok/s, losses {[round(v, 5) for v in out['losses'][:2]]}{mem_text}"
        )
    if "decode_tok_s" in out:
        decode = out["decode_tok_s"] or 0.0
        return f"decode {decode:.1f} tok/s, generate {out['generate_tok_s']:.1f}{mem_text}"
    return json.dumps(out.get("made", ""))


def missing_peers() -> str | None:
    """Why the PyTorch cases cannot run here, or None."""
    absent = [name for name in PEERS if importlib.util.find_spec(name) is None]
    return f"{', '.join(absent)} not installed" if absent else None


def gpu_description() -> str | None:
    rows = nvidia_smi("--query-gpu=name,driver_version,memory.total")
    return (
        "; ".join(f"{r[0]} (driver {r[1]}, {r[2]} MiB)" for r in rows if len(r) > 2)
        if rows
        else None
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        result = json.loads(args.report.read_text())
        print(report(result))
        return 0
    if args.child:
        bl.emit(run_child_main(args))
        return 0

    f16 = bl.gguf_path(args.layers, "f16")
    if not f16.exists():
        print(f"missing {f16}: run benches/make_model.py --layers {args.layers} --quants ''")
        return 1
    settings = {
        k: getattr(args, k)
        for k in (
            "layers",
            "device",
            "threads",
            "prefill",
            "decode",
            "reps",
            "batch",
            "seq",
            "steps",
            "warmup",
            "lr",
            "train_time_s",
            "quick",
            "budget_s",
        )
    }
    result: dict[str, Any] = {
        "versions": bl.versions() | {"gpu": gpu_description()},
        "settings": settings
        | {
            "infer_lora": f"rank {LORA_RANK}, alpha {LORA_ALPHA:g}, {'+'.join(INFER_TARGETS)}, "
            "B ~ N(0, 0.05)",
            "train_lora": f"rank {LORA_RANK}, alpha {LORA_ALPHA:g}, {'+'.join(TRAIN_TARGETS)}",
        },
        "cases": {},
        "skipped": {},
        "failed": [],
    }
    print(f"versions: {result['versions']}", flush=True)
    cases = Cases(args, result)
    common = bl.flags(layers=args.layers, device=args.device, threads=args.threads)
    prepared = cases.run("prepare", ["--child", "prepare", *common])
    if args.prepare_only:
        return 0 if prepared is not None else 1
    if prepared is None:
        print(report(result))
        return 1

    sizes = bl.flags(prefill=args.prefill, decode=args.decode, reps=args.reps)
    train = bl.flags(
        batch=args.batch,
        seq=args.seq,
        steps=args.steps,
        warmup=args.warmup,
        lr=args.lr,
        train_time_s=args.train_time_s,
    )
    wanted = set(args.cases.split(","))
    hf_missing = (
        None
        if (bl.hf_dir(args.layers) / "model.safetensors").exists()
        else (f"no {bl.hf_dir(args.layers)}: run benches/make_model.py --layers {args.layers}")
    )
    peers_missing = missing_peers() or hf_missing
    with tempfile.TemporaryDirectory() as tmp:
        lugh_logits = Path(tmp) / "lugh-f16-lora.npy"
        hf_logits = Path(tmp) / "hf-bf16-lora.npy"
        plan: list[tuple[str, str, list[str], str | None]] = [
            (
                "lugh-infer",
                "lugh-infer f16",
                ["--quant", "f16", *sizes, "--logits-out", str(lugh_logits)],
                None,
            ),
            ("lugh-train", "lugh-train", train, None),
            ("torch-bf16", "torch-train bf16", ["--dtype", "bf16", *train], peers_missing),
            ("torch-f32", "torch-train f32", ["--dtype", "f32", *train], peers_missing),
            ("hf-generate", "hf-generate", [*sizes, "--logits-out", str(hf_logits)], peers_missing),
            ("lugh-infer", "lugh-infer q4_k", ["--quant", "q4_k", *sizes], None),
        ]
        for group, key, extra, missing in plan:
            if group not in wanted:
                continue
            child = key.split()[0]
            cases.run(key, ["--child", child, *common, *extra], missing)
        if lugh_logits.exists() and hf_logits.exists():
            result["checks"] = {
                "logits_lugh_f16_vs_transformers_bf16": compare(
                    np.load(lugh_logits), np.load(hf_logits)
                )
            }
    result.setdefault("checks", {})
    ok = loss_check(result)
    text = report(result)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    cases.save()
    if args.json:
        print(f"\nwrote {args.json}")
    lugh_failed = [k for k in result["failed"] if k.startswith("lugh")]
    return 0 if ok and not lugh_failed else 1


def loss_check(result: dict) -> bool:
    """lugh's first two losses against PyTorch f32's (same math, same values): True if they
    agree to LOSS_RTOL or there is nothing to compare; recorded under `checks`."""
    lugh, torch = result["cases"].get("lugh-train"), result["cases"].get("torch-train f32")
    if not lugh or not torch:
        return True
    n = min(len(lugh["losses"]), len(torch["losses"]), 2)
    diffs = [abs(lugh["losses"][i] - torch["losses"][i]) for i in range(n)]
    ok = all(d <= LOSS_RTOL * abs(torch["losses"][i]) for i, d in enumerate(diffs))
    result["checks"]["loss_lugh_vs_torch_f32"] = {"abs_diffs": diffs, "rtol": LOSS_RTOL, "pass": ok}
    return ok


# ---------------------------------------------------------------------------------- the report


def na(rows: list[list[object]]) -> list[list[object]]:
    """None -> "n/a" (benchlib.table prints None as "-")."""
    return [["n/a" if v is None else v for v in row] for row in rows]


def sci(v: float | None) -> str | None:
    return None if v is None else f"{v:.2e}"


def fixed(v: float | None, digits: int = 6) -> str | None:
    return None if v is None else f"{v:.{digits}f}"


def report(result: dict) -> str:
    """The Markdown tables of a run."""
    s, cases = result["settings"], result["cases"]
    device, lines = s["device"], []

    def case(key: str) -> dict:
        return cases.get(key) or {}

    lines.append(
        f"\n## lugh inference on {device}: {s['layers']} layers, prefill {s['prefill']} tokens, "
        f"decode {s['decode']} tokens, median of {s['reps']} reps\n"
    )
    rows: list[list[object]] = []
    for quant in QUANTS:
        out = case(f"lugh-infer {quant}")
        for name in ("base", "lora"):
            v = out.get("variants", {}).get(name, {})
            rows.append(
                [
                    quant.upper(),
                    "r16 q,v" if name == "lora" else "-",
                    v.get("prefill_tok_s"),
                    v.get("decode_tok_s"),
                    v.get("decode_best_tok_s"),
                    v.get("generate_tok_s"),
                    out.get("peak_gpu_mib"),
                    sci(v.get("vs_cpu", {}).get("rel_err")),
                    fixed(v.get("vs_cpu", {}).get("corr")),
                ]
            )
    lines.append(
        bl.table(
            [
                "weights",
                "LoRA",
                "prefill t/s",
                "decode t/s",
                "decode best t/s",
                "generate t/s (e2e)",
                "peak GPU MiB",
                "vs lugh cpu max|d|/max",
                "vs cpu corr",
            ],
            na(rows),
        )
    )

    hf = case("hf-generate")
    lines.append(
        f"\n## Decode beside transformers + PEFT (greedy, {s['decode']} new tokens after "
        f"{s['prefill']}, LoRA r16 q,v attached)\n"
    )
    rows = [
        [
            "transformers + PEFT",
            "BF16",
            hf.get("decode_tok_s"),
            hf.get("generate_tok_s"),
            1.0 if hf.get("decode_tok_s") else None,
            hf.get("peak_gpu_mib"),
        ]
    ]
    for quant in QUANTS:
        v = case(f"lugh-infer {quant}").get("variants", {}).get("lora", {})
        rows.append(
            [
                f"lugh ({device})",
                quant.upper(),
                v.get("decode_tok_s"),
                v.get("generate_tok_s"),
                bl.ratio(v.get("decode_tok_s"), hf.get("decode_tok_s")),
                case(f"lugh-infer {quant}").get("peak_gpu_mib"),
            ]
        )
    lines.append(
        bl.table(
            [
                "engine",
                "weights",
                "decode t/s",
                "generate t/s (e2e)",
                "decode ÷ transformers",
                "peak GPU MiB",
            ],
            na(rows),
        )
    )

    lines.append(
        f"\n## LoRA training on {device}: {s['layers']} layers, batch {s['batch']} x seq "
        f"{s['seq']}, rank 16 on q,k,v,o, AdamW lr {s['lr']:g}, median of up to {s['steps']} "
        f"steps after {s['warmup']} warm-up\n"
    )
    engines = [
        ("lugh (F16 GGUF)", "lugh-train"),
        ("PyTorch + PEFT bf16", "torch-train bf16"),
        ("PyTorch + PEFT f32", "torch-train f32"),
    ]
    rows = []
    for label, key in engines:
        out = case(key)
        losses = out.get("losses") or []
        rows.append(
            [
                label,
                out.get("tok_s"),
                out.get("best_tok_s"),
                out.get("step_s"),
                out.get("n_steps"),
                out.get("peak_gpu_mib"),
                out.get("torch_max_allocated_mib"),
                *(f"{v:.6f}" if v is not None else None for v in (losses + [None, None])[:2]),
            ]
        )
    lines.append(
        bl.table(
            [
                "engine",
                "tokens/s",
                "best tokens/s",
                "s/step",
                "timed steps",
                "peak GPU MiB (nvidia-smi)",
                "torch max allocated MiB",
                "loss step 1",
                "loss step 2",
            ],
            na(rows),
        )
    )

    lugh = case("lugh-train")
    lines.append("\n## Targets (lugh ÷ peer)\n")
    rows = []
    for label, key in engines[1:]:
        peer = case(key)
        rows.append(
            [
                f"training tokens/s ÷ {label}",
                lugh.get("tok_s"),
                peer.get("tok_s"),
                bl.ratio(lugh.get("tok_s"), peer.get("tok_s")),
            ]
        )
    for label, key in engines[1:]:
        peer = case(key)
        rows.append(
            [
                f"training peak GPU memory ÷ {label}",
                lugh.get("peak_gpu_mib"),
                peer.get("peak_gpu_mib"),
                bl.ratio(lugh.get("peak_gpu_mib"), peer.get("peak_gpu_mib")),
            ]
        )
    for quant in QUANTS:
        v = case(f"lugh-infer {quant}").get("variants", {}).get("lora", {})
        rows.append(
            [
                f"decode t/s, {quant.upper()} + LoRA ÷ transformers + PEFT bf16",
                v.get("decode_tok_s"),
                hf.get("decode_tok_s"),
                bl.ratio(v.get("decode_tok_s"), hf.get("decode_tok_s")),
            ]
        )
    lines.append(bl.table(["target", "lugh", "peer", "ratio"], na(rows)))

    checks = result.get("checks", {})
    lines.append("\n## Checks\n")
    loss = checks.get("loss_lugh_vs_torch_f32")
    if loss:
        diffs = ", ".join(f"{d:.1e}" for d in loss["abs_diffs"])
        verdict = "PASS" if loss["pass"] else "FAIL"
        lines.append(
            f"- losses, lugh vs PyTorch f32 (|diff| <= {loss['rtol']:g} relative): {diffs} "
            + verdict
        )
    bf16 = case("torch-train bf16").get("losses")
    if lugh.get("losses") and bf16:
        lines.append(
            f"- loss step 1, lugh vs PyTorch bf16: |diff| {abs(lugh['losses'][0] - bf16[0]):.1e} "
            "(bf16 rounding)"
        )
    logit = checks.get("logits_lugh_f16_vs_transformers_bf16")
    if logit:
        lines.append(
            f"- prefill logits with the adapter, lugh F16 vs transformers + PEFT bf16: max|d|/max "
            f"{logit['rel_err']:.2e}, corr {logit['corr']:.6f}"
        )
    mems = {c.get("gpu_mem", {}).get("method") for c in cases.values()} - {None}
    if mems:
        lines.append(f"- peak GPU memory measured by: {', '.join(sorted(mems))}")
    for key, why in result.get("skipped", {}).items():
        lines.append(f"- {'FAILED' if key in result.get('failed', []) else 'skipped'} {key}: {why}")
    if len(lines) and lines[-1] == "\n## Checks\n":
        lines.append("- nothing to check")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=22, help="which make_model.py output (default 22)")
    p.add_argument(
        "--device", default="cuda", help='lugh device: "cuda", "cuda:N", "candle-cpu", ...'
    )
    p.add_argument("--quick", action="store_true", help="small sizes: " + json.dumps(QUICK))
    p.add_argument("--threads", type=int, default=bl.default_threads())
    p.add_argument("--prefill", type=int, help=f"prompt tokens (default {FULL['prefill']})")
    p.add_argument("--decode", type=int, help=f"tokens decoded after it (default {FULL['decode']})")
    p.add_argument("--reps", type=int, help=f"timed inference repetitions (default {FULL['reps']})")
    p.add_argument(
        "--batch", type=int, help=f"training sequences per step (default {FULL['batch']})"
    )
    p.add_argument("--seq", type=int, help=f"training tokens per sequence (default {FULL['seq']})")
    p.add_argument("--steps", type=int, help=f"timed training steps (default {FULL['steps']})")
    p.add_argument(
        "--warmup", type=int, help=f"untimed training steps first (default {FULL['warmup']})"
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--train-time-s",
        type=float,
        default=60.0,
        help="a training case whose first step is slow runs fewer steps, to stay near this",
    )
    p.add_argument(
        "--cases",
        default="lugh-infer,lugh-train,torch-bf16,torch-f32,hf-generate",
        help="comma list among lugh-infer,lugh-train,torch-bf16,torch-f32,hf-generate",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=0.0,
        help="stop starting cases after this many seconds (0: no limit); a case that would "
        "run past it is cut short",
    )
    p.add_argument("--case-timeout", type=float, default=180.0, help="seconds per case")
    p.add_argument(
        "--prepare-only", action="store_true", help="make the Q4_K file and adapters, stop"
    )
    p.add_argument("--json", type=Path, help="write every number here (after each case too)")
    p.add_argument("--markdown", type=Path, help="write the tables here")
    p.add_argument("--report", type=Path, metavar="JSON", help="print the tables of a --json file")
    # Internal: one case in a child process.
    p.add_argument("--child", choices=tuple(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--quant", choices=QUANTS, default="f16", help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=TORCH_DTYPES, default="f32", help=argparse.SUPPRESS)
    p.add_argument("--logits-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, full in FULL.items():
        if getattr(args, key) is None:
            setattr(args, key, QUICK[key] if args.quick else full)
    return args


if __name__ == "__main__":
    sys.exit(main())
