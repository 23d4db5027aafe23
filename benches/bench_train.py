"""LoRA training speed, lugh beside PyTorch + PEFT, on the same weights and the same adapter.

    python benches/bench_train.py                       # 22 layers, seq 256, batch 4, rank 16
    python benches/bench_train.py --layers 4 --steps 2  # a quick run
    python benches/bench_train.py --layers 4 --rounds 3 # engines in turn, steps pooled

One step = forward, mean next-token cross-entropy over the batch, backward into the adapter,
AdamW update (weight decay 0). lugh: `lugh.train.train_step` on the F16 GGUF + `lugh.optim.AdamW`
(`lugh`: exact f32, `lugh-bf16`: `precision="bf16"`). PyTorch: transformers `LlamaForCausalLM`
in float32 from the HF copy of the same F16 values, PEFT with dropout 0, `model.train()`,
`torch.optim.AdamW` (`torch`: f32, `torch-bf16`: the forward under bf16 `torch.autocast`).
All load one adapter (rank 16, alpha 32, targets q, k, v, o; B non-zero, made by lugh and saved
as a PEFT directory) and train on the same token batch. Each engine runs in its own child
process, so its peak RSS (mapped weights included) is its own.

The losses of the first step must agree (same base model and adapter); the second step's
must too (same gradients and update); the bf16 engines' within 1e-2. Tokens/s = batch × seq /
median step time; ratios are to PyTorch f32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import benchlib as bl

ENGINES = ("lugh", "lugh-bf16", "torch", "torch-bf16")
TARGETS = ("attn_q", "attn_k", "attn_v", "attn_output")
LORA_ALPHA = 32.0
# Both run f32 math on the same F16 values: their losses agree to ~1e-6 relative.
LOSS_RTOL = 1e-4
# bf16 operands move a loss by about 2^-8 of its terms' scale.
BF16_LOSS_RTOL = 1e-2


def is_bf16(engine: str) -> bool:
    return engine.endswith("-bf16")


def batch(args: argparse.Namespace) -> list[list[int]]:
    """`--batch` sequences of `--seq` tokens, BOS first, the same in every child."""
    return [bl.random_tokens(args.seq, seed=100 + i) for i in range(args.batch)]


def train_lugh(args: argparse.Namespace) -> tuple[list[float], list[bl.Sample]]:
    """(loss before each step, `timed` samples of each step) with lugh."""
    import lugh

    model = lugh.Model(str(bl.gguf_path(args.layers, "f16")))
    inf = lugh.Inference(model, n_ctx=args.seq, n_threads=args.threads)
    lora = lugh.LoRA(str(args.adapter), model).trainable_copy()
    opt = lugh.optim.AdamW(lora.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    seqs = batch(args)
    losses = []

    precision = "bf16" if is_bf16(args.child) else "f32"

    def step() -> None:
        opt.zero_grad()
        loss_sum, n_scored = lugh.train.train_step(
            inf, seqs, lora, checkpoint=args.checkpoint, precision=precision
        )
        opt.step()
        losses.append(loss_sum / n_scored)

    return losses, [bl.timed(step) for _ in range(args.warmup + args.steps)]


def train_torch(args: argparse.Namespace) -> tuple[list[float], list[bl.Sample]]:
    """(loss before each step, `timed` samples of each step) with transformers + PEFT in
    float32."""
    import torch
    from peft import LoraConfig, PeftModel
    from transformers import LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calls deprecated names
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    model = LlamaForCausalLM.from_pretrained(bl.hf_dir(args.layers), dtype=torch.float32)
    config = LoraConfig.from_pretrained(str(args.adapter))
    config.lora_dropout = 0.0
    config.inference_mode = False
    model = PeftModel.from_pretrained(model, str(args.adapter), config=config, is_trainable=True)
    if args.checkpoint:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    ids = torch.tensor(batch(args))
    losses = []

    autocast = is_bf16(args.child)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss  # mean over batch × (seq - 1) positions
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))

    return losses, [bl.timed(step) for _ in range(args.warmup + args.steps)]


def make_adapter(args: argparse.Namespace) -> dict:
    """The adapter both engines train, as a PEFT directory (lugh reads it too)."""
    import lugh

    model = lugh.Model(str(bl.gguf_path(args.layers, "f16")))
    lora = lugh.LoRA.create(model, rank=args.rank, alpha=LORA_ALPHA, targets=TARGETS, seed=0)
    bl.fill_lora_b(lora, seed=0)
    lora.save_peft(str(args.adapter))
    return {"path": str(args.adapter)}


def step_rates(args: argparse.Namespace, steps: dict) -> dict:
    """Median step time and tokens/s (median and best) of `summarize`d steps."""
    tokens = args.batch * args.seq
    return {
        "step_s": steps["median_s"],
        "tok_s": tokens / steps["median_s"],
        "best_tok_s": tokens / steps["best_s"],
    }


def run_engine(args: argparse.Namespace) -> dict:
    bl.pin_threads(args.threads)
    started = time.perf_counter()
    train = train_lugh if args.child.startswith("lugh") else train_torch
    losses, samples = train(args)
    steps = bl.summarize(samples[args.warmup :])
    return {
        "losses": losses,
        "warmup_s": [t for t, _ in samples[: args.warmup]],
        "steps": steps,
        **step_rates(args, steps),
        "total_s": time.perf_counter() - started,
        "peak_rss_mib": bl.peak_rss_mib(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        report(json.loads(args.report.read_text()))
        return 0
    if args.child == "make-lora":
        bl.emit(make_adapter(args))
        return 0
    if args.child:
        bl.emit(run_engine(args))
        return 0
    if args.steps < 1 or args.rounds < 1:
        raise SystemExit("--steps and --rounds must be at least 1")

    script = Path(__file__)
    needed = [bl.gguf_path(args.layers, "f16"), bl.hf_dir(args.layers) / "model.safetensors"]
    if any(not p.exists() for p in needed):
        print(f"missing model files: run benches/make_model.py --layers {args.layers}")
        return 1
    adapter = bl.model_dir(args.layers) / f"lora-r{args.rank}-qkvo-peft"
    common = bl.flags(layers=args.layers, rank=args.rank, adapter=adapter)
    if args.remake_lora or not (adapter / "adapter_config.json").exists():
        bl.run_child(script, ["--child", "make-lora", *common])
    engines = [e for e in ENGINES if e in args.engines.split(",")]
    result: dict[str, Any] = {
        "versions": bl.versions(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "layers",
                "threads",
                "seq",
                "batch",
                "rank",
                "steps",
                "warmup",
                "lr",
                "checkpoint",
                "rounds",
            )
        }
        | {"targets": list(TARGETS), "alpha": LORA_ALPHA},
        "engines": {},
    }
    print(f"versions: {result['versions']}")
    forwarded = common + bl.flags(
        threads=args.threads,
        seq=args.seq,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        lr=args.lr,
        checkpoint=args.checkpoint,
    )
    for round_ in range(1, args.rounds + 1):
        for engine in engines:
            label = engine + (f" (round {round_}/{args.rounds})" if args.rounds > 1 else "")
            print(f"running {label} ...", flush=True)
            out = bl.run_case(
                script,
                ["--child", engine, *forwarded],
                args.wait_idle,
                args.retries,
                lambda r: r["steps"]["clean_reps"] * 2 < args.steps,
            )
            print(
                f"  {out['tok_s']:.1f} tok/s, step {out['step_s']:.2f} s, losses "
                f"{[round(v, 4) for v in out['losses']]}",
                flush=True,
            )
            merged = bl.merge_rounds(result["engines"].get(engine), out, ("steps",))
            result["engines"][engine] = merged | step_rates(args, merged["steps"])

    ok = report(result)
    bl.write_json(args.json, result)
    return 0 if ok else 1


def report(result: dict) -> bool:
    """Prints the side-by-side table and the loss check; True if the losses agree."""
    s, engines = result["settings"], result["engines"]
    print(
        f"\n## LoRA training: {s['layers']} layers, {s['threads']} threads, batch {s['batch']} "
        f"x seq {s['seq']}, rank {s['rank']} on q,k,v,o, AdamW lr {s['lr']:g}, "
        f"checkpointing {'on' if s['checkpoint'] else 'off'}, median of {s['steps']} steps "
        f"after {s['warmup']} warm-up x {s.get('rounds', 1)} rounds\n"
    )
    rows = [
        [
            e,
            r["tok_s"],
            r["best_tok_s"],
            r["step_s"],
            r["peak_rss_mib"] / 1024,
            *(f"{r['losses'][i]:.6f}" if i < len(r["losses"]) else "-" for i in range(2)),
            r.get("foreign_load_cores"),
        ]
        for e, r in engines.items()
    ]
    print(
        bl.table(
            [
                "engine",
                "tokens/s",
                "best tokens/s",
                "s/step",
                "peak RSS GiB",
                "loss step 1",
                "loss step 2",
                "other load (cores)",
            ],
            rows,
        )
    )
    torch = engines.get("torch")
    if torch is None:
        return True
    ok = True
    result["loss_check"] = {}
    for name, r in engines.items():
        if name == "torch":
            continue
        rtol = BF16_LOSS_RTOL if is_bf16(name) else LOSS_RTOL
        n = min(len(r["losses"]), len(torch["losses"]), 2)
        diffs = [abs(r["losses"][i] - torch["losses"][i]) for i in range(n)]
        passed = all(d <= rtol * abs(torch["losses"][i]) for i, d in enumerate(diffs))
        print(
            f"\n{name} / PyTorch f32: tokens/s {r['tok_s'] / torch['tok_s']:.3f}, "
            f"peak RSS {r['peak_rss_mib'] / torch['peak_rss_mib']:.3f}; loss check "
            f"(<= {rtol:g} relative, first {n} steps) {[f'{d:.1e}' for d in diffs]} "
            f"{'PASS' if passed else 'FAIL'}"
        )
        result["loss_check"][name] = {"abs_diffs": diffs, "pass": passed}
        ok &= passed
    return ok


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", type=int, default=22, help="which make_model.py output")
    p.add_argument(
        "--engines", default=",".join(ENGINES), help=f"comma list among {','.join(ENGINES)}"
    )
    p.add_argument("--threads", type=int, default=bl.default_threads())
    p.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=4, help="sequences per step")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--checkpoint", action="store_true", help="activation checkpointing in both engines"
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every engine this many times, in turn, pooling the steps: slow drifts of "
        "the machine then weigh on all engines alike",
    )
    p.add_argument("--remake-lora", action="store_true", help="rewrite the adapter")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="only print the tables of an earlier run's --json file",
    )
    p.add_argument(
        "--retries",
        type=int,
        default=1,
        help="rerun an engine this many times while other processes disturb it",
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=60.0,
        metavar="S",
        help="before each case, wait up to S seconds for other processes to leave "
        "the cores idle (0: don't)",
    )
    # Internal: one engine in a child process.
    p.add_argument("--child", choices=(*ENGINES, "make-lora"), help=argparse.SUPPRESS)
    p.add_argument("--adapter", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(main())
