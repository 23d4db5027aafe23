"""`lugh demo`: the whole life of an adapter on the small model shipped with lugh.

Generates from the base model, fine-tunes a new LoRA on a built-in text (with a progress
bar), generates again so that the change shows, saves the adapter, loads it back and checks
that the reloaded adapter gives the same logits.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import lugh

MODEL = Path(__file__).parent / "data" / "lugh-demo-4m-f16.gguf"
PROMPTS = ("Return the", "The adapter", "Open the")

# Docstrings for an imaginary adapter library: a style and a vocabulary the base model has
# seen little of, so that fine-tuning visibly changes its continuations.
TEXT = """
Return the adapter loaded from the GGUF file, with its scale set to one.
Return the rank of the adapter attached to this weight.
Return the scale applied to every pair of the adapter.
Return the adapter that was trained on the docstrings of this module.
Return the gradient of the loss with respect to the adapter weights.
Return the learning rate used by the optimizer at this step.
The adapter adds a low rank update to the frozen weight of the model.
The adapter is saved to a GGUF file that llama.cpp can load again.
The adapter is trained with exact gradients computed by hand.
The adapter weights are small, so the base model is never copied.
Open the adapter file and check that its rank matches the model.
Open the model file and map its weights into memory.
Return the number of adapter pairs in the file.
Return the alpha of the adapter, divided by its rank.
The adapter can be merged into the model to make a single file.
Return the logits of the model with the adapter applied.
Return the loss of the adapter on the training text.
The adapter learns to write the docstrings of this library.
Open the adapter and set its scale to one half.
Return the adapter, ready to be trained again.
"""


def say(text: str = "") -> None:
    print(text, flush=True)


def generate(inf, tokenizer, prompt: str, lora=None) -> str:
    ids = tokenizer.encode(prompt)
    return tokenizer.decode(ids + inf.generate(ids, max_tokens=16, greedy=True, lora=lora))


def run(
    steps: int | None = None,
    seconds: float = 60.0,
    out: str | None = None,
    threads: int | None = None,
    device: str = "cpu",
) -> int:
    """Runs the demo on `device`; returns the process exit code (0 when the reload check
    passes)."""
    started = time.perf_counter()
    model = lugh.Model(MODEL)
    inf = lugh.Inference(model, n_threads=threads, device=device)
    tokenizer = lugh.Tokenizer(model)
    say(
        f"lugh {lugh.__version__} demo: {MODEL.name}, {model.architecture}, "
        f"{model.n_layer} layers, width {model.n_embd}, vocabulary {model.n_vocab}, "
        f"{inf.n_threads} threads, device {inf.device}"
    )
    say()
    say("Base model (greedy):")
    before = [generate(inf, tokenizer, p) for p in PROMPTS]
    for text in before:
        say(f"  {text!r}")

    lora = lugh.LoRA.create(
        model, rank=8, alpha=16.0, targets=("attn_q", "attn_k", "attn_v", "attn_output"), seed=0
    )
    trainer = lugh.train.Trainer(inf, lora, lr=1e-3, batch_size=4, seq_len=48, max_grad_norm=1.0)
    windows = trainer.windows(TEXT.strip().splitlines())
    budget = steps if steps is not None else 10_000
    say()
    say(
        f"Fine-tuning a rank-8 LoRA ({lora.n_weights} pairs) on {len(windows)} windows of "
        "built-in text"
        + (f" for {steps} steps:" if steps is not None else f" for about {seconds:.0f} s:")
    )
    from tqdm import tqdm

    bar = tqdm(
        total=budget if steps is not None else int(seconds),
        unit="step" if steps is not None else "s",
        dynamic_ncols=True,
        mininterval=0.5,
        file=sys.stdout,
        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]",
    )
    train_started = time.perf_counter()

    def progress(report) -> bool:
        elapsed = time.perf_counter() - train_started
        bar.set_postfix(
            loss=f"{report.loss:.3f}",
            tok_s=f"{report.tokens_per_s:.0f}",
            step=report.step,
            refresh=False,
        )
        bar.update((report.step if steps is not None else min(int(elapsed), int(seconds))) - bar.n)
        return steps is None and elapsed >= seconds

    reports = trainer.fit(windows, steps=budget, callback=progress)
    bar.close()
    say(f"  loss {reports[0].loss:.3f} -> {reports[-1].loss:.3f} in {len(reports)} steps")
    say()
    say("With the adapter (greedy):")
    after = [generate(inf, tokenizer, p, lora) for p in PROMPTS]
    for text in after:
        say(f"  {text!r}")

    folder = Path(out) if out else Path(tempfile.mkdtemp(prefix="lugh-demo-"))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "demo-adapter.gguf"
    lora.save(path)
    reloaded = lugh.LoRA(path, model)
    probe = tokenizer.encode(TEXT.strip().splitlines()[0])
    diff = float(
        np.abs(inf.forward_all(probe, lora=reloaded) - inf.forward_all(probe, lora=lora)).max()
    )
    say()
    say(
        f"Saved {path} ({path.stat().st_size // 1024} KiB) and loaded it back: "
        f"max |logit difference| = {diff:.2e}"
    )
    ok = diff <= 1e-5
    say(f"{'OK' if ok else 'MISMATCH'}: demo finished in {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1
