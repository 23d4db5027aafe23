"""Inference speed, lugh beside llama.cpp, on the same GGUF files with the same thread count.

    python benches/bench_inference.py                         # 22 layers, F16 + Q8_0 + Q4_K_M
    python benches/bench_inference.py --layers 4 --quants q8_0 --lora on --reps 2

For each weight type and each engine: prefill of `--prefill` tokens into an empty KV cache and
decode of `--decode` tokens one at a time after it, without and with a rank-16 LoRA on attn_q
and attn_v (made by lugh, saved as GGUF, loaded by both engines from that file). Every
(engine, file, adapter) case runs in its own child process, so each engine has the cores to
itself and the two thread pools never spin against each other.

Both engines' last-position logits after the prefill are compared: the base logits must
agree, and so must the change the adapter makes (which proves llama.cpp applied it).
Memory bandwidth is measured before and after the cases (threads summing disjoint slices of
a 1 GiB buffer; the larger result counts), and decode speed is shown as a fraction of the
bound it sets: bandwidth / weight bytes read per token (every tensor but the embedding table,
of which one row is read).

Timed repetitions disturbed by other processes are left out of the median, and a case with
too few undisturbed ones is run again (see `benchlib.timed` and `benchlib.run_case`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

import benchlib as bl

ENGINES = ("lugh", "llama.cpp")
N_BATCH = 512  # llama.cpp's n_batch and n_ubatch: the whole prompt in one micro-batch.
LORA_RANK = 16
LORA_ALPHA = 32.0
LORA_TARGETS = ("attn_q", "attn_v")
# llama.cpp's ggml_type ids for the KV cache.
KV_TYPES = {"f32": 0, "f16": 1}


# ---------------------------------------------------------------- measurements in the parent


def memory_bandwidth(n_threads: int, gib: float = 1.0, reps: int = 5) -> dict:
    """Read bandwidth in GB/s: `t` threads (numpy releases the GIL) each sum a disjoint slice
    of one `gib` GiB int64 buffer (integer adds: the sum is never the bottleneck); best of
    `reps`, for t = 1 and t = n_threads, and the larger of the two (on small VMs one thread can
    already take all the bandwidth a guest gets). Best-of, since other processes can only
    make it look lower; each rep's other load is kept."""
    buf = np.ones(int(gib * 2**30) // 8, dtype=np.int64)
    by_threads, loads = {}, {}
    for t in sorted({1, n_threads}):
        chunks = np.array_split(buf, t)
        with ThreadPoolExecutor(t) as pool:
            read = partial(_read_all, pool, chunks)
            read()  # warm-up: starts the threads
            samples = [bl.timed(read) for _ in range(reps)]
        by_threads[t] = buf.nbytes / min(s for s, _ in samples) / 1e9
        loads[t] = [load for _, load in samples]
    return {
        "method": f"numpy int64 add.reduce over {gib:g} GiB, disjoint slices per thread, "
        f"best of {reps}",
        "gb_s_by_threads": by_threads,
        "foreign_cores_by_threads": loads,
        "gb_s": max(by_threads.values()),
    }


def _read_all(pool: ThreadPoolExecutor, chunks: list) -> None:
    list(pool.map(np.add.reduce, chunks))


def measure_bandwidth(args: argparse.Namespace, when: str, attempts: int = 3) -> dict:
    """`memory_bandwidth` after waiting for idle cores, again (up to `attempts` times) while
    every repetition with all threads was disturbed; the best measurement, printed."""
    best: dict | None = None
    for _ in range(attempts):
        bl.wait_for_idle(args.wait_idle)
        bw = memory_bandwidth(args.threads)
        if best is None or bw["gb_s"] > best["gb_s"]:
            best = bw
        loads = bw["foreign_cores_by_threads"][args.threads]
        if any(v is None or v < bl.DISTURBED_CORES for v in loads):
            break
    assert best is not None
    per_thread = ", ".join(f"{t}: {v:.1f}" for t, v in best["gb_s_by_threads"].items())
    worst = max(v or 0.0 for loads in best["foreign_cores_by_threads"].values() for v in loads)
    print(
        f"memory bandwidth ({when}): {best['gb_s']:.1f} GB/s ({best['method']}; by threads "
        f"{per_thread}; other load up to {worst:.2f} cores)"
    )
    return best


def weight_bytes_per_token(path: Path) -> int:
    """Bytes of weights one decoded token reads: every tensor, but one row of token_embd."""
    import gguf

    total = 0
    for tensor in gguf.GGUFReader(path).tensors:
        n_bytes = int(tensor.n_bytes)
        if tensor.name == "token_embd.weight":
            n_bytes //= int(tensor.shape[-1])  # gguf lists [n_embd, n_vocab]: one row
        total += n_bytes
    return total


# ------------------------------------------------------------------------- the engine children


class LughRunner:
    """lugh: `Inference.forward_cache` on one KV cache, cleared between repetitions."""

    def __init__(
        self, model: Path, lora: Path | None, n_ctx: int, n_threads: int, kv_cache_dtype: str
    ) -> None:
        import lugh

        self.info: dict = {}
        self.model = lugh.Model(str(model))
        self.inf = lugh.Inference(
            self.model, n_ctx=n_ctx, n_threads=n_threads, kv_cache_dtype=kv_cache_dtype
        )
        self.lora = lugh.LoRA(str(lora), self.model) if lora else None
        self.cache = self.inf.create_kv_cache()

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.cache.clear()
        return self.inf.forward_cache(self.cache, ids, lora=self.lora)

    def decode(self, ids: list[int]) -> None:
        for t in ids:
            self.inf.forward_cache(self.cache, [t], lora=self.lora)


class LlamaCppRunner:
    """llama.cpp through llama-cpp-python: `Llama.eval`, the adapter from `lora_path`."""

    def __init__(
        self, model: Path, lora: Path | None, n_ctx: int, n_threads: int, kv_cache_dtype: str
    ) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(
            str(model),
            n_ctx=n_ctx,
            n_batch=N_BATCH,
            n_ubatch=N_BATCH,
            n_threads=n_threads,
            n_threads_batch=n_threads,
            logits_all=False,
            type_k=KV_TYPES[kv_cache_dtype],
            type_v=KV_TYPES[kv_cache_dtype],
            lora_path=str(lora) if lora else None,
            verbose=False,
        )
        if lora and self.llm._lora_adapter is None:
            raise RuntimeError(f"llama.cpp did not load the adapter {lora}")
        self.info = {"system_info": llama_cpp.llama_print_system_info().decode().strip()}

    def prefill(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()  # the next eval drops the cached positions
        self.llm.eval(ids)
        n_vocab = self.llm.n_vocab()
        return np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(n_vocab,)).copy()

    def decode(self, ids: list[int]) -> None:
        for t in ids:
            self.llm.eval([t])


def run_engine(args: argparse.Namespace) -> dict:
    """One (engine, file, adapter) case: load, warm up, time prefill and decode."""
    bl.pin_threads(args.threads)
    n_ctx = -(-(args.prefill + args.decode) // 256) * 256
    started = time.perf_counter()
    if args.child == "lugh":
        runner: Any = LughRunner(
            args.model, args.lora_path, n_ctx, args.threads, args.kv_cache_dtype
        )
    else:
        runner = LlamaCppRunner(
            args.model, args.lora_path, n_ctx, args.threads, args.kv_cache_dtype
        )
    load_s = time.perf_counter() - started
    prompt = bl.random_tokens(args.prefill, seed=1)
    follow = bl.random_tokens(args.decode, seed=2, bos=False)
    logits = runner.prefill(prompt)  # warm-up: page in the weights
    runner.decode(follow[:4])
    prefill = [bl.timed(lambda: runner.prefill(prompt)) for _ in range(args.reps)]
    decode = []
    for _ in range(args.reps):
        runner.prefill(prompt)
        decode.append(bl.timed(lambda: runner.decode(follow)))
    np.save(args.logits_out, np.asarray(logits, dtype=np.float32))
    return {
        "load_s": load_s,
        "prefill": bl.summarize(prefill),
        "decode": bl.summarize(decode),
        "peak_rss_mib": bl.peak_rss_mib(),
    } | runner.info


def make_adapter(args: argparse.Namespace) -> dict:
    """The rank-16 attn_q/attn_v adapter both engines load, B non-zero, saved as GGUF with
    its factors in `--lora-type`."""
    import lugh

    model = lugh.Model(str(args.model))
    lora = lugh.LoRA.create(
        model, rank=LORA_RANK, alpha=LORA_ALPHA, targets=LORA_TARGETS, seed=args.seed
    )
    bl.fill_lora_b(lora, seed=args.seed)
    lora.save(str(args.lora_path), out_type=args.lora_type)
    return {"path": str(args.lora_path), "n_weights": lora.n_weights}


# ------------------------------------------------------------------------------ the parent


def compare_logits(base: dict[str, np.ndarray], lora: dict[str, np.ndarray]) -> dict:
    """lugh vs llama.cpp: max |diff| / max |logit| of the base logits and of the adapted
    ones, and the correlation of the change the adapter makes (near 0 if one engine
    ignored it)."""

    def rel(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.abs(a - b).max() / np.abs(b).max())

    out: dict[str, Any] = {}
    if len(base) == 2:
        out["base_rel_err"] = rel(base["lugh"], base["llama.cpp"])
        out["base_corr"] = float(np.corrcoef(base["lugh"], base["llama.cpp"])[0, 1])
    if len(lora) == 2:
        out["lora_rel_err"] = rel(lora["lugh"], lora["llama.cpp"])
    if len(base) == 2 and len(lora) == 2:
        d_lugh = lora["lugh"] - base["lugh"]
        d_llama = lora["llama.cpp"] - base["llama.cpp"]
        out["lora_delta_corr"] = float(np.corrcoef(d_lugh, d_llama)[0, 1])
        out["lora_delta_norm_ratio"] = float(np.linalg.norm(d_lugh) / np.linalg.norm(d_llama))
    checks = [out.get("base_corr", 1.0) > 0.99]
    if "lora_delta_corr" in out:
        checks += [
            out["lora_delta_corr"] > 0.9,
            0.8 < out["lora_delta_norm_ratio"] < 1.25,
        ]
    out["pass"] = all(checks)
    return out


def child_args(args: argparse.Namespace, engine: str, model: Path) -> list[str]:
    return bl.flags(
        child=engine,
        model=model,
        threads=args.threads,
        prefill=args.prefill,
        decode=args.decode,
        reps=args.reps,
        kv_cache_dtype=args.kv_cache_dtype,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        print_report(json.loads(args.report.read_text()))
        return 0
    if args.child == "make-lora":
        bl.emit(make_adapter(args))
        return 0
    if args.child:
        bl.emit(run_engine(args))
        return 0

    script = Path(__file__)

    def disturbed(case: dict) -> bool:
        """Fewer than half the repetitions of prefill or decode ran on idle cores."""
        return min(case["prefill"]["clean_reps"], case["decode"]["clean_reps"]) * 2 < args.reps

    engines = [e for e in ENGINES if e in args.engines.split(",")]
    quants = [
        q for q in args.quants.split(",") if bl.gguf_path(args.layers, q, args.shape).exists()
    ]
    missing = set(args.quants.split(",")) - set(quants)
    if missing:
        print(
            f"skipping {sorted(missing)}: run benches/make_model.py "
            f"--shape {args.shape} --layers {args.layers} --quants ..."
        )
    if not quants:
        return 1
    variants = {"off": [False], "on": [True], "both": [False, True]}[args.lora]
    result: dict[str, Any] = {
        "versions": bl.versions(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "layers",
                "threads",
                "prefill",
                "decode",
                "reps",
                "rounds",
                "kv_cache_dtype",
                "lora",
            )
        }
        | {
            "llama_cpp": f"n_batch=n_ubatch={N_BATCH}, logits_all=False, flash_attn=False, "
            f"KV {args.kv_cache_dtype}",
            "lora": f"rank {LORA_RANK}, alpha {LORA_ALPHA:g}, {'+'.join(LORA_TARGETS)}, "
            f"B ~ N(0, 0.05), {args.lora_type} factors",
        },
        "cases": [],
        "checks": {},
    }
    print(f"versions: {result['versions']}")
    bandwidths = [] if args.no_bandwidth else [measure_bandwidth(args, "before")]

    name = f"lora-r{LORA_RANK}-qv{'' if args.lora_type == 'f32' else '-' + args.lora_type}.gguf"
    lora_path = bl.model_dir(args.layers, args.shape) / name
    if True in variants and (args.remake_lora or not lora_path.exists()):
        model = bl.gguf_path(args.layers, quants[0], args.shape)
        make = bl.flags(
            child="make-lora",
            model=model,
            lora_file=lora_path,
            lora_type=args.lora_type,
            seed=args.seed,
        )
        bl.run_child(script, make)

    cases: dict[tuple, dict] = {}
    logits: dict[tuple, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(1, args.rounds + 1):
            for quant, with_lora, engine in itertools.product(quants, variants, engines):
                key = (quant, with_lora, engine)
                out = Path(tmp) / f"{quant}-{engine}-{with_lora}.npy"
                extra = bl.flags(logits_out=out, lora_file=with_lora and lora_path)
                label = f"{quant} {'lora' if with_lora else 'base'} {engine}"
                if args.rounds > 1:
                    label += f" (round {round_}/{args.rounds})"
                print(f"running {label} ...", flush=True)
                model = bl.gguf_path(args.layers, quant, args.shape)
                case = bl.run_case(
                    script,
                    child_args(args, engine, model) + extra,
                    args.wait_idle,
                    args.retries,
                    disturbed,
                )
                print(
                    f"  prefill {args.prefill / case['prefill']['median_s']:.1f} tok/s, "
                    f"decode {args.decode / case['decode']['median_s']:.2f} tok/s",
                    flush=True,
                )
                cases[key] = bl.merge_rounds(cases.get(key), case, ("prefill", "decode"))
                logits[key] = np.load(out).astype(np.float64)
    for (quant, with_lora, engine), case in cases.items():
        case |= {
            "quant": quant,
            "engine": engine,
            "lora": with_lora,
            "weight_bytes_per_token": weight_bytes_per_token(
                bl.gguf_path(args.layers, quant, args.shape)
            ),
            "prefill_tok_s": args.prefill / case["prefill"]["median_s"],
            "decode_tok_s": args.decode / case["decode"]["median_s"],
            "prefill_best_tok_s": args.prefill / case["prefill"]["best_s"],
            "decode_best_tok_s": args.decode / case["decode"]["best_s"],
        }
        result["cases"].append(case)
    for quant in quants:
        base = {e: logits[quant, False, e] for e in engines if (quant, False, e) in logits}
        lora = {e: logits[quant, True, e] for e in engines if (quant, True, e) in logits}
        result["checks"][quant] = compare_logits(base, lora)

    if bandwidths:
        # The larger of two measurements, before and after: load from other processes only
        # ever lowers it.
        bandwidths.append(measure_bandwidth(args, "after"))
        result["bandwidth"] = max(bandwidths, key=lambda b: b["gb_s"]) | {"runs": bandwidths}
        for case in result["cases"]:
            bound = result["bandwidth"]["gb_s"] * 1e9 / case["weight_bytes_per_token"]
            case["decode_bound_tok_s"] = bound
            case["decode_frac_of_bound"] = case["decode_tok_s"] / bound
    print_report(result)
    bl.write_json(args.json, result)
    failed = [q for q, c in result["checks"].items() if not c["pass"]]
    if failed:
        print(
            f"\nLOGITS CHECK FAILED for {failed}: the engines do not run the same model",
            file=sys.stderr,
        )
        return 1
    return 0


def clean_reps(*cases: dict | None) -> str:
    """'clean/total' repetitions behind the medians of these cases (the fewest of any phase)."""
    counts = [
        (c[phase]["clean_reps"], len(c[phase]["all_s"]))
        for c in cases
        if c is not None
        for phase in ("prefill", "decode")
    ]
    clean, total = min(counts)
    return f"{clean}/{total}"


def print_report(result: dict) -> None:
    cases = {(c["quant"], c["lora"], c["engine"]): c for c in result["cases"]}
    order = list(bl.QUANTS)
    keys = sorted({(q, lo) for q, lo, _ in cases}, key=lambda k: (order.index(k[0]), k[1]))

    def get(quant: str, lora: bool, engine: str, field: str) -> float | None:
        case = cases.get((quant, lora, engine))
        return case.get(field) if case else None

    rows = []
    for quant, lora in keys:
        row: list[object] = [quant, "r16 q,v" if lora else "-"]
        for field in ("prefill_tok_s", "decode_tok_s"):
            lugh, llama = get(quant, lora, "lugh", field), get(quant, lora, "llama.cpp", field)
            row += [lugh, llama, bl.ratio(lugh, llama)]
        row += [get(quant, lora, e, "decode_frac_of_bound") for e in ENGINES]
        row.append(clean_reps(*(cases.get((quant, lora, e)) for e in ENGINES)))
        rows.append(row)
    s = result["settings"]
    rounds = s.get("rounds", 1)
    print(
        f"\n## Inference: {s['layers']} layers, {s['threads']} threads, prefill {s['prefill']} "
        f"tokens, decode {s['decode']} tokens, median of {s['reps']} reps x {rounds} rounds "
        "(undisturbed ones)\n"
    )
    print(
        bl.table(
            [
                "weights",
                "LoRA",
                "lugh prefill t/s",
                "llama.cpp prefill t/s",
                "lugh/llama.cpp",
                "lugh decode t/s",
                "llama.cpp decode t/s",
                "lugh/llama.cpp",
                "lugh decode/BW bound",
                "llama.cpp decode/BW bound",
                "undisturbed reps",
            ],
            rows,
        )
    )

    best = []
    for quant, lora in keys:
        lugh = get(quant, lora, "lugh", "decode_best_tok_s")
        llama = get(quant, lora, "llama.cpp", "decode_best_tok_s")
        best.append([quant, "r16 q,v" if lora else "-", lugh, llama, bl.ratio(lugh, llama)])
    print(
        "\nDecode, best repetition (on a VM, memory-bound decode can be bimodal, moved by up "
        "to 30 % by something /proc does not show; the best is the steadier figure):\n"
    )
    print(bl.table(["weights", "LoRA", "lugh t/s", "llama.cpp t/s", "lugh/llama.cpp"], best))

    overhead = []
    for quant in dict.fromkeys(q for q, _ in keys):
        row = [quant]
        for engine in ENGINES:
            for field in ("prefill_tok_s", "decode_tok_s"):
                row.append(
                    bl.ratio(get(quant, True, engine, field), get(quant, False, engine, field))
                )
        overhead.append(row)
    if any(v is not None for row in overhead for v in row[1:]):
        print("\nLoRA cost (speed with LoRA / without; 1.0 = free):\n")
        print(
            bl.table(
                ["weights", "lugh prefill", "lugh decode", "llama.cpp prefill", "llama.cpp decode"],
                overhead,
            )
        )

    if "bandwidth" in result:
        print(f"\nBW bound = {result['bandwidth']['gb_s']:.1f} GB/s / weight bytes per token:")
        fractions = [c.get("decode_frac_of_bound") or 0.0 for c in result["cases"]]
        if max(fractions, default=0.0) > 1.0:
            print(
                "  (a decode above the bound: the bandwidth measurement was disturbed and "
                "reads low; rerun)"
            )
        for quant in dict.fromkeys(q for q, _ in keys):
            wb = get(quant, False, ENGINES[0], "weight_bytes_per_token") or get(
                quant, True, ENGINES[0], "weight_bytes_per_token"
            )
            if wb:
                print(
                    f"  {quant}: {wb / 1e6:.0f} MB/token -> "
                    f"{result['bandwidth']['gb_s'] * 1e9 / wb:.1f} tok/s"
                )

    checks = [
        [
            q,
            c.get("base_rel_err"),
            c.get("base_corr"),
            c.get("lora_rel_err"),
            c.get("lora_delta_corr"),
            c.get("lora_delta_norm_ratio"),
            "PASS" if c["pass"] else "FAIL",
        ]
        for q, c in result["checks"].items()
    ]
    print(
        "\nSame model, same adapter? (last-position logits after the prefill, lugh vs llama.cpp):\n"
    )
    print(
        bl.table(
            [
                "weights",
                "base max|d|/max",
                "base corr",
                "lora max|d|/max",
                "LoRA-delta corr",
                "LoRA-delta norm ratio",
                "check",
            ],
            checks,
        )
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("1b", "135m"), default="1b", help="make_model.py's shape")
    p.add_argument("--layers", type=int, default=22, help="which make_model.py output")
    p.add_argument("--quants", default="f16,q8_0,q4_k_m", help="comma list of weight types")
    p.add_argument("--engines", default="lugh,llama.cpp", help="comma list among lugh,llama.cpp")
    p.add_argument("--lora", choices=("off", "on", "both"), default="both")
    p.add_argument(
        "--lora-type",
        choices=("f32", "f16", "bf16"),
        default="f32",
        help="the adapter's factors, as convert_lora_to_gguf.py --outtype",
    )
    p.add_argument("--threads", type=int, default=bl.default_threads())
    p.add_argument("--prefill", type=int, default=128, help="prompt tokens")
    p.add_argument("--decode", type=int, default=64, help="tokens decoded one at a time")
    p.add_argument("--reps", type=int, default=3, help="timed repetitions (median)")
    p.add_argument(
        "--kv-cache-dtype",
        choices=tuple(KV_TYPES),
        default="f32",
        help="both engines' KV cache type (llama.cpp's own default is f16)",
    )
    p.add_argument("--seed", type=int, default=0, help="the adapter's seed")
    p.add_argument("--remake-lora", action="store_true", help="rewrite the adapter file")
    p.add_argument("--no-bandwidth", action="store_true", help="skip the bandwidth measurement")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="only print the tables of an earlier run's --json file",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every case this many times, in turn, pooling the repetitions: slow drifts "
        "of the machine then weigh on both engines alike",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=2,
        help="rerun a case this many times while other processes disturb it",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        metavar="S",
        help="before each case, wait up to S seconds for other processes to leave "
        "the cores idle (0: don't)",
    )
    # Internal: one engine case in a child process.
    p.add_argument("--child", choices=(*ENGINES, "make-lora"), help=argparse.SUPPRESS)
    p.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--lora-file", dest="lora_path", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--logits-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    return args


if __name__ == "__main__":
    sys.exit(main())
