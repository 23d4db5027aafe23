"""What the side-by-side benchmark scripts share: the model shapes, file names, timing,
per-engine child processes, peak memory, versions and table printing.

The scripts run one engine per child process (`run_child`): each engine gets the machine's
cores to itself, its thread pool cannot spin against the other's, and its peak RSS is its own.
A child prints one JSON object on its last stdout line.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "bench-models"
VOCAB = ROOT / "tests" / "fixtures" / "vocab" / "ggml-vocab-llama-spm.gguf"

# GGUF file stem per weight type; llama.cpp's ftype ids for the quantized ones.
# Weight types and llama.cpp's ftype for each (`llama_model_quantize`; None: written directly).
QUANTS = {
    "f16": None,
    "bf16": 32,
    "q8_0": 7,
    "q4_k_m": 15,
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 8,
    "q5_1": 9,
    "q5_k_m": 17,
    "q6_k": 18,
    "q2_k": 10,
    "q3_k_m": 12,
    "iq4_nl": 25,
    "iq4_xs": 30,
    "iq3_m": 27,
    # The codebook types alone: make_model.py writes every matrix through ggml_quantize_chunk
    # (ggml type ids) with an importance matrix of ones (llama.cpp's quantizer refuses IQ2 and
    # IQ1 without one, and takes it only as a C++ map).
    "iq3_xxs": ("chunks", 18),
    "iq3_s": ("chunks", 21),
    "iq2_xxs": ("chunks", 16),
    "iq2_xs": ("chunks", 17),
    "iq2_s": ("chunks", 22),
    "iq1_s": ("chunks", 19),
    "iq1_m": ("chunks", 29),
}

PEERS = (
    "lugh",
    "llama_cpp_python",
    "torch",
    "transformers",
    "peft",
    "safetensors",
    "gguf",
    "numpy",
)


@dataclass(frozen=True)
class Shape:
    """LLaMA hyper-parameters, in GGUF's names (`n_embd`, `n_head`, ...)."""

    n_layer: int = 22
    n_embd: int = 2048
    n_head: int = 32
    n_head_kv: int = 4
    n_ff: int = 5632
    n_vocab: int = 32000
    n_ctx_train: int = 2048
    rms_eps: float = 1e-5
    rope_freq_base: float = 10000.0
    # No `output.weight`: the logits come from `token_embd.weight` (HF `tie_word_embeddings`).
    tie_embeddings: bool = False

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def as_dict(self) -> dict:
        return asdict(self)


# The model classes `make_model.py --shape` writes, by name (the default first). "1b" is
# TinyLlama's shape; "135m" SmolLM-135M's (its real vocabulary has 49152 tokens, ours 32000).
SHAPES = {
    "1b": Shape(),
    "135m": Shape(n_layer=30, n_embd=576, n_head=9, n_head_kv=3, n_ff=1536, tie_embeddings=True),
}


def model_dir(n_layer: int, shape: str = "1b") -> Path:
    """Where `make_model.py --shape shape --layers n_layer` writes its files."""
    return MODELS / f"llama-{shape}-class-{n_layer}L"


def gguf_path(n_layer: int, quant: str, shape: str = "1b") -> Path:
    return model_dir(n_layer, shape) / f"model-{quant}.gguf"


def hf_dir(n_layer: int, shape: str = "1b") -> Path:
    """The transformers copy (`config.json` + `model.safetensors`)."""
    return model_dir(n_layer, shape) / "hf"


def default_threads() -> int:
    """Every core this process may run on."""
    return len(os.sched_getaffinity(0))


def pin_threads(n_threads: int) -> None:
    """Sets the thread-count variables that OpenMP, BLAS and rayon read at start-up.

    Call before importing torch or llama_cpp: their pools are sized when they load.
    """
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(n_threads)


def peak_rss_mib() -> float:
    """Peak resident set of this process so far, file-backed pages of memory-mapped weights
    included.

    `VmHWM` of /proc/self/status, which starts afresh at exec; `ru_maxrss` would not do in a
    child: Linux carries the parent's peak across fork + exec, so every child would report at
    least the parent's. `ru_maxrss` only where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def versions() -> dict:
    """Installed versions of lugh and the peers (None where absent), and the machine."""
    found: dict[str, Any] = {}
    for name in PEERS:
        dist = name.replace("_", "-")
        try:
            found[name] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[name] = None
    found["lugh_commit"] = git_commit()
    found["python"] = platform.python_version()
    found["cpu"] = cpu_name()
    found["cores"] = os.cpu_count()
    return found


def git_commit() -> str | None:
    """The checkout's commit (`+dirty` when files differ from it), or None outside git."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return rev + ("+dirty" if dirty else "")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# Other processes keeping more than this many cores busy during a timed run disturb it.
DISTURBED_CORES = 0.1

# A timed run: (wall seconds, cores other processes kept busy meanwhile or None).
Sample = tuple[float, Optional[float]]


def timed(fn: Callable[[], object]) -> Sample:
    """(wall seconds of `fn()`, cores that other processes kept busy meanwhile).

    The second is the machine's busy time (/proc/stat) less this process's own CPU time, over
    the wall time; None where /proc is missing. /proc/stat counts in 10 ms ticks, so runs
    shorter than ~0.5 s read a few hundredths of a core of noise."""
    busy0, own0 = cpu_busy_s(), _own_cpu_s(resource.RUSAGE_SELF)
    start = time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    busy1, own1 = cpu_busy_s(), _own_cpu_s(resource.RUSAGE_SELF)
    if busy0 is None or busy1 is None:
        return wall, None
    return wall, max(0.0, (busy1 - busy0) - (own1 - own0)) / wall


def summarize(samples: Sequence[Sample]) -> dict:
    """Statistics of timed runs: the median over the undisturbed ones (all if none is), the
    best, every time and every disturbance."""
    clean = [t for t, load in samples if load is None or load < DISTURBED_CORES]
    times = [t for t, _ in samples]
    return {
        "median_s": statistics.median(clean or times),
        "best_s": min(times),
        "all_s": times,
        "foreign_cores": [load for _, load in samples],
        "clean_reps": len(clean),
    }


def merge_rounds(done: dict | None, new: dict, phases: Sequence[str]) -> dict:
    """One case's results over rounds: the timed repetitions of each of `phases` (`summarize`
    outputs) pooled across rounds, the peak RSS and other load the largest seen, each round's
    result kept under `rounds`."""
    if done is None:
        return new | {"rounds": [new]}
    rounds = [*done["rounds"], new]
    merged = new | {"rounds": rounds}
    for phase in phases:
        samples = [s for r in rounds for s in zip(r[phase]["all_s"], r[phase]["foreign_cores"])]
        merged[phase] = summarize(samples)
    for field in ("peak_rss_mib", "foreign_load_cores"):
        merged[field] = max(r.get(field) or 0.0 for r in rounds)
    return merged


def cpu_busy_s() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (every core, /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def wait_for_idle(max_wait_s: float, threshold: float = 0.1, window_s: float = 2.0) -> float:
    """Waits (at most `max_wait_s`) until other processes keep fewer than `threshold` cores
    busy over a `window_s` window; returns the last load seen. On a shared machine this keeps
    another job's build from landing in the middle of a measurement."""
    deadline = time.monotonic() + max_wait_s
    while True:
        before = cpu_busy_s()
        time.sleep(window_s)
        after = cpu_busy_s()
        load = 0.0 if before is None or after is None else (after - before) / window_s
        if load < threshold or time.monotonic() >= deadline:
            return load


def run_child(
    script: Path, args: Sequence[str], wait_idle_s: float = 0.0, timeout_s: float | None = None
) -> dict:
    """Runs `python script args...` and returns the JSON object on its last stdout line,
    with `foreign_load_cores` added: the cores that other processes kept busy meanwhile, on
    average (machine busy time less the child's own CPU time, over the wall time).

    With `wait_idle_s` > 0 it first waits up to that long for the machine to be idle.
    The child's stderr passes through; a failing child raises with its exit code."""
    if wait_idle_s > 0:
        load = wait_for_idle(wait_idle_s)
        if load >= DISTURBED_CORES:
            print(
                f"  (machine still busy after {wait_idle_s:.0f} s: {load:.2f} cores)",
                file=sys.stderr,
                flush=True,
            )
    cmd = [sys.executable, str(script), *args]
    busy0, own0 = cpu_busy_s(), _own_cpu_s(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    busy1, own1 = cpu_busy_s(), _own_cpu_s(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.splitlines()[-20:])
        raise RuntimeError(f"child failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if not lines:
        raise RuntimeError(f"child printed no result: {' '.join(cmd)}")
    result = json.loads(lines[-1])
    if busy0 is not None and busy1 is not None:
        result["foreign_load_cores"] = max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    return result


def run_case(
    script: Path,
    args: Sequence[str],
    wait_idle_s: float,
    retries: int,
    disturbed: Callable[[dict], bool],
) -> dict:
    """`run_child` again (after waiting for idle cores) while `disturbed(result)` and retries
    are left; returns the least disturbed result, with `attempts`."""
    best: dict | None = None
    for attempt in range(1, retries + 2):
        result = run_child(script, args, wait_idle_s)
        result["attempts"] = attempt
        if best is None or result.get("foreign_load_cores", 0) < best.get("foreign_load_cores", 0):
            best = result
        if not disturbed(result):
            break
        load = result.get("foreign_load_cores") or 0.0
        more = "retrying" if attempt <= retries else "keeping the least disturbed run"
        print(
            f"  WARNING: other processes kept {load:.2f} cores busy during this run; {more}",
            file=sys.stderr,
            flush=True,
        )
    assert best is not None
    return best


def _own_cpu_s(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def emit(result: dict) -> None:
    """A child's answer to `run_child`: one JSON line, last on stdout."""
    sys.stdout.flush()
    print(json.dumps(result), flush=True)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, columns padded; floats with 2 decimals (3 below 10), None as '-'."""

    def cell(v: object) -> str:
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    lines = [
        "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    return "\n".join(lines)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def write_json(path: Path | None, result: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {path}")


def random_tokens(n: int, seed: int, bos: bool = True, n_vocab: int = 32000) -> list[int]:
    """`n` repeatable ids from the ordinary tokens of the llama SPM vocabulary (3.. : no
    control token), BOS (1) first when `bos`."""
    import numpy as np

    ids = np.random.default_rng(seed).integers(3, n_vocab, n).tolist()
    return [1, *ids[1:]] if bos else ids


def fill_lora_b(lora: Any, std: float = 0.05, seed: int = 0) -> None:
    """Gives every B of a new (trainable) lugh adapter N(0, std) values, repeatable from
    `seed`: a new adapter has B = 0 and would change nothing, so an engine could skip it.
    With rank 16, alpha 32 and std 0.05 the adapter moves q and v by ~25 %."""
    import numpy as np

    rng = np.random.default_rng(seed)
    for name in lora.weight_names():
        b = lora.get_weight_tensor(name, "b")
        b.set_data((rng.standard_normal(b.shape) * std).astype(np.float32))


def flags(**options: object) -> list[str]:
    """Command-line arguments from keywords: `kv_type="f32"` -> `--kv-type f32`; True -> the
    bare flag; False and None -> nothing."""
    out: list[str] = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        out.append("--" + key.replace("_", "-"))
        if value is not True:
            out.append(str(value))
    return out
