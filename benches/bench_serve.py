"""Serving: aggregate decode tokens/s of `lugh serve` with 1, 4, 8 and 16 concurrent requests
spread over 4 adapters, beside the same requests one at a time, and beside llama-cpp-python's
OpenAI server (one adapter: it takes one `--lora_path` per model and runs one request at a
time). Same GGUF files, same threads, same client, in one run.

    python benches/bench_serve.py                                  # 1B class, 4 layers, Q4_K_M
    python benches/bench_serve.py --shape 135m --layers 30 --quant q4_k_m
    python benches/bench_serve.py --engines lugh --concurrency 1,8

Each server runs in a child process of its own; the client is this process (threads, plain
HTTP, server-sent events). Every request asks for `--max-tokens` tokens after a prompt of
`--prompt-tokens` random ids, with end-of-sequence banned so that every request runs its full
length. A rate is completion tokens over the wall time from the first request sent to the last
token received (so it includes the prompts' prefill); time to first token is per request.
The adapters are `adapter-{0..3}.gguf` beside the model (rank 16 on q, k, v, o; made here
with lugh when missing, B ~ N(0, 0.02)).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from benchlib import (
    cpu_name,
    default_threads,
    fill_lora_b,
    gguf_path,
    git_commit,
    random_tokens,
    table,
    versions,
    wait_for_idle,
    write_json,
)

N_ADAPTERS = 4
EOS = 2


def adapter_paths(model_path: Path) -> list[Path]:
    """The 4 adapters beside `model_path`, written with lugh if missing."""
    paths = [model_path.parent / f"adapter-{i}.gguf" for i in range(N_ADAPTERS)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        import lugh

        m = lugh.Model(model_path)
        for i, path in enumerate(paths):
            if path.exists():
                continue
            lora = lugh.LoRA.create(
                m, rank=16, alpha=32, targets=["attn_q", "attn_k", "attn_v", "attn_output"], seed=i
            )
            fill_lora_b(lora, std=0.02, seed=i)
            lora.save(path)
            print(f"  wrote {path}", file=sys.stderr)
    return paths


class ServerProcess:
    """A server in a child process, and where it listens."""

    def __init__(self, cmd: list[str], port: int | None, ready: str, env: dict | None = None):
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env
        )
        self.port = port
        deadline = time.monotonic() + 600
        lines = []
        for line in self.proc.stderr:
            lines.append(line)
            found = re.search(r"127\.0\.0\.1:(\d+)", line)
            if self.port is None and found:
                self.port = int(found.group(1))
            if ready in line:
                break
            if time.monotonic() > deadline:
                break
        if self.proc.poll() is not None or self.port is None:
            raise RuntimeError(f"server did not start: {' '.join(cmd)}\n{''.join(lines[-20:])}")
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        for _ in self.proc.stderr:
            pass

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def complete(port: int, body: dict) -> dict:
    """Streams one completion; returns its tokens, time to first token and end time. The
    events are counted, not parsed, so that the client takes little of the cores the server
    runs on (each engine sends one event per token; lugh's last event carries the usage)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=3600)
    start = time.perf_counter()
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps({**body, "stream": True}),
        headers={"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:500]!r}")
    first = None
    received = bytearray()
    while chunk := response.read1(1 << 16):
        if first is None:
            first = time.perf_counter() - start
        received += chunk
    end = time.perf_counter()
    conn.close()
    events = [e for e in received.decode().split("\n\n") if e.startswith("data: {")]
    usage = json.loads(events[-1][6:]).get("usage") if events else None
    tokens = usage["completion_tokens"] if usage else len(events)
    return {"tokens": tokens, "ttft_s": first, "end": end}


def run_wave(port: int, bodies: list[dict], concurrent: bool) -> dict:
    """All `bodies` at once (or one after another): aggregate tokens/s and time to first token."""
    results: list = [None] * len(bodies)
    start = time.perf_counter()
    if concurrent:
        barrier = threading.Barrier(len(bodies))

        def worker(i: int) -> None:
            barrier.wait()
            try:
                results[i] = complete(port, bodies[i])
            except Exception as e:  # reported below, with the others' results
                results[i] = e

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for i, body in enumerate(bodies):
            results[i] = complete(port, body)
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(bodies)} requests failed: {failed[0]}")
    wall = max(r["end"] for r in results) - start
    tokens = sum(r["tokens"] for r in results)
    ttfts = sorted(r["ttft_s"] for r in results)
    return {
        "requests": len(bodies),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "ttft_median_ms": 1000 * statistics.median(ttfts),
        "ttft_max_ms": 1000 * ttfts[-1],
    }


def prompts(model: Path, n: int, n_tokens: int) -> list[str]:
    """`n` different texts of about `n_tokens` tokens (random ids, decoded): both servers
    tokenize the same text (llama-cpp-python's server takes no token ids)."""
    import lugh

    tokenizer = lugh.Tokenizer(lugh.Model(model))
    return [tokenizer.decode(random_tokens(n_tokens, seed=100 + i, bos=False)) for i in range(n)]


def bodies(texts: list[str], args, models: list[str] | None) -> list[dict]:
    """One request per text; lugh's name adapters by `model` (round robin) and may ignore
    end-of-sequence, llama.cpp's server bans it by its logit."""
    out = []
    for i, text in enumerate(texts):
        body = {"prompt": text, "max_tokens": args.max_tokens, "temperature": 0}
        if models:
            body |= {
                "model": models[i % len(models)],
                "ignore_eos": True,
                "stream_options": {"include_usage": True},
            }
        else:
            body["logit_bias"] = {str(EOS): -100}
        out.append(body)
    return out


def wave(engine: str, port: int, texts: list[str], args, models, concurrent: bool) -> dict:
    """One timed wave, after waiting for an idle machine, as a table row."""
    wait_for_idle(args.wait_idle)
    row = {
        "engine": engine,
        "mode": "concurrent" if concurrent else "one at a time",
        "adapters": len({b.get("model") for b in bodies(texts, args, models)}),
        **run_wave(port, bodies(texts, args, models), concurrent),
    }
    print(
        f"  {engine} {row['mode']} x{len(texts)}: {row['tokens_per_s']:.1f} tok/s", file=sys.stderr
    )
    return row


def bench_lugh(model: Path, adapters: list[Path], texts: list[str], args) -> list[dict]:
    names = [f"a{i}" for i in range(len(adapters))]
    cmd = [sys.executable, "-m", "lugh", "serve", "-m", str(model), "--port", "0"]
    cmd += ["--threads", str(args.threads), "--ctx", str(args.ctx), "--max-batch", "16"]
    for name, path in zip(names, adapters):
        cmd += ["--lora", f"{name}={path}"]
    server = ServerProcess(cmd, None, "Ctrl-C stops")
    try:
        run_wave(server.port, bodies(texts[:2], args, names), concurrent=True)  # warm-up
        rows = [wave("lugh", server.port, texts[:n], args, names, True) for n in args.concurrency]
        rows.append(wave("lugh", server.port, texts[: len(names)], args, names, False))
    finally:
        server.stop()
    return rows


def bench_llamacpp(model: Path, adapter: Path, texts: list[str], args) -> list[dict]:
    """llama-cpp-python's server with one adapter, alone and under the largest load (it runs
    one request at a time, so the loads between tell nothing more)."""
    port = args.llamacpp_port
    cmd = [args.llamacpp_python, "-m", "llama_cpp.server", "--model", str(model)]
    cmd += ["--lora_path", str(adapter), "--n_threads", str(args.threads)]
    cmd += ["--n_threads_batch", str(args.threads), "--n_ctx", str(args.ctx)]
    cmd += ["--port", str(port), "--host", "127.0.0.1", "--interrupt_requests", "False"]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    server = ServerProcess(cmd, port, "Uvicorn running", env=env)
    try:
        run_wave(port, bodies(texts[:1], args, None), concurrent=False)  # warm-up
        loads = sorted({1, max(args.concurrency)})
        rows = [wave("llama.cpp server", port, texts[:n], args, None, n > 1) for n in loads]
    finally:
        server.stop()
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="1b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--quant", default="q4_k_m")
    p.add_argument(
        "--concurrency", default="1,4,8,16", type=lambda s: [int(v) for v in s.split(",")]
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--ctx", type=int, default=1024, help="context of each server")
    p.add_argument("--threads", type=int, default=default_threads())
    p.add_argument("--engines", default="lugh,llama.cpp")
    p.add_argument(
        "--llamacpp-python",
        default=sys.executable,
        help="a Python with llama-cpp-python[server] (default: this one)",
    )
    p.add_argument("--llamacpp-port", type=int, default=8197)
    p.add_argument(
        "--wait-idle",
        type=float,
        default=20.0,
        help="seconds to wait for an idle machine before each wave",
    )
    p.add_argument("--json", type=Path)
    args = p.parse_args()

    model = gguf_path(args.layers, args.quant, args.shape)
    if not model.exists():
        sys.exit(
            f"{model} is missing: python benches/make_model.py --shape {args.shape} "
            f"--layers {args.layers}"
        )
    adapters = adapter_paths(model)
    engines = args.engines.split(",")
    texts = prompts(model, max(args.concurrency + [N_ADAPTERS]), args.prompt_tokens)
    print(
        f"# serving {model.relative_to(model.parents[1])}: {args.prompt_tokens} prompt + "
        f"{args.max_tokens} generated tokens per request, {args.threads} threads, "
        f"{cpu_name()}",
        flush=True,
    )
    rows = []
    if "lugh" in engines:
        rows += bench_lugh(model, adapters, texts, args)
    if "llama.cpp" in engines:
        rows += bench_llamacpp(model, adapters[0], texts, args)
    single = next(
        (r["tokens_per_s"] for r in rows if r["engine"] == "lugh" and r["mode"] == "one at a time"),
        None,
    )
    print()
    print(
        table(
            [
                "engine",
                "requests",
                "adapters",
                "sent",
                "tokens/s",
                "x lugh one at a time",
                "TTFT median ms",
                "TTFT max ms",
            ],
            [
                [
                    r["engine"],
                    r["requests"],
                    r["adapters"],
                    r["mode"],
                    r["tokens_per_s"],
                    r["tokens_per_s"] / single if single else None,
                    r["ttft_median_ms"],
                    r["ttft_max_ms"],
                ]
                for r in rows
            ],
        )
    )
    write_json(
        args.json,
        {
            "model": str(model),
            "threads": args.threads,
            "cpu": cpu_name(),
            "lugh_commit": git_commit(),
            "versions": versions(),
            "rows": rows,
            "max_tokens": args.max_tokens,
            "prompt_tokens": args.prompt_tokens,
        },
    )


if __name__ == "__main__":
    main()
