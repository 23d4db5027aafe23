"""Training with exact gradients: a forward that keeps activations, the loss, and a loop.

    logits = lugh.train.forward(inf, tokens, lora)       # Tensor [n_tokens, n_vocab]
    loss = lugh.train.cross_entropy_loss(logits, targets)
    loss.backward()                                      # exact dL/dA, dL/dB into the adapter

`Trainer` runs whole steps in Rust (forward, loss a block of rows at a time, backward) with
the GIL released, and reports loss, tokens/s and eval loss through a callback. It trains on
text, token sequences, or conversations (`{"messages": [...]}`) rendered with the model's chat
template, scoring the assistant's tokens only by default.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Union

from lugh._lugh import cross_entropy_loss, eval_loss, forward, train_step
from lugh.chat import common_prefix
from lugh.optim import AdamW, LRScheduler, clip_grad_norm

__all__ = [
    "StepReport",
    "Trainer",
    "Window",
    "chat_tokens",
    "cross_entropy_loss",
    "eval_loss",
    "forward",
    "train_step",
]

IGNORE_INDEX = -100

Data = Union[str, Sequence[str], Sequence[Sequence[int]], Sequence[Mapping[str, Any]]]


@dataclass
class Window:
    """One training sequence: its tokens and, per position, the token it must predict
    (`-100`: not scored); `targets=None` scores every next token."""

    tokens: list[int]
    targets: list[int] | None = None

    def next_token_targets(self) -> list[int]:
        """The targets, spelled out."""
        if self.targets is not None:
            return self.targets
        return self.tokens[1:] + [IGNORE_INDEX]

    def n_scored(self) -> int:
        return sum(t != IGNORE_INDEX for t in self.next_token_targets())


def chat_tokens(
    tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    template: str | None = None,
    assistant_only: bool = True,
) -> Window:
    """A conversation as a training sequence: rendered by the chat template and tokenized as
    transformers does (`apply_chat_template(..., tokenize=True)`: special-token texts become
    their tokens, nothing is added). With `assistant_only`, only the assistant's tokens are
    scored (its turns' content and end-of-turn tokens), as TRL's `assistant_only_loss` does:
    each assistant turn spans from the end of the conversation before it, rendered with the
    generation prompt, to the end of the conversation through it."""

    def encode(conversation: Sequence[Mapping[str, Any]], prompt: bool) -> list[int]:
        text = tokenizer.apply_chat_template(
            conversation, add_generation_prompt=prompt, template=template
        )
        return tokenizer.encode(text, add_bos=False, parse_special=True)

    tokens = encode(messages, False)
    scored = [not assistant_only] * len(tokens)
    if assistant_only:
        for k, message in enumerate(messages):
            if message.get("role") != "assistant":
                continue
            start = common_prefix(encode(messages[:k], True), tokens)
            end = common_prefix(encode(messages[: k + 1], False), tokens)
            scored[start:end] = [True] * (end - start)
    targets = [t if ok else IGNORE_INDEX for t, ok in zip(tokens[1:], scored[1:])]
    return Window(tokens, targets + [IGNORE_INDEX])


@dataclass
class StepReport:
    """What one optimizer step did."""

    step: int
    total_steps: int
    loss: float
    lr: float
    tokens: int
    tokens_per_s: float
    elapsed_s: float
    grad_norm: float | None = None
    eval_loss: float | None = None


class Trainer:
    """Fine-tunes a trainable `lugh.LoRA` on text, token sequences or conversations.

    Texts are tokenized (BOS first), joined and cut into windows of `seq_len` tokens; token
    sequences longer than `seq_len` are cut the same way. Conversations (`{"messages": [...]}`
    records) are rendered with the model's chat template (or `chat_template`), one window each
    (cut at `seq_len`), so that attention never crosses from one conversation to another; the
    loss is on the assistant's tokens unless `assistant_only_loss=False`. Each step averages
    the loss over the scored tokens of `batch_size × grad_accum` windows, clips the gradient
    norm to `max_grad_norm` (None: no clipping) and updates with AdamW under the chosen
    learning-rate schedule. `precision="bf16"` runs the frozen base's products in bf16 (as
    PyTorch's bf16 autocast), everything else in f32; `"f32"` (the default) is exact.
    """

    def __init__(
        self,
        inference,
        lora,
        *,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        batch_size: int = 4,
        seq_len: int = 256,
        grad_accum: int = 1,
        max_grad_norm: float | None = 1.0,
        schedule: str = "constant",
        warmup_steps: int = 0,
        checkpoint: bool = False,
        precision: str = "f32",
        tokenizer=None,
        optimizer=None,
        seed: int = 0,
        chat_template: str | None = None,
        assistant_only_loss: bool = True,
    ) -> None:
        if not lora.trainable:
            raise ValueError("the adapter is not trainable: use lora.trainable_copy()")
        if batch_size < 1 or grad_accum < 1 or seq_len < 2:
            raise ValueError("batch_size and grad_accum must be >= 1, seq_len >= 2")
        if precision not in ("f32", "bf16"):
            raise ValueError(f'precision {precision!r}: use "f32" (exact) or "bf16" (mixed)')
        self.inference = inference
        self.lora = lora
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.grad_accum = grad_accum
        self.max_grad_norm = max_grad_norm
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.checkpoint = checkpoint
        self.precision = precision
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.assistant_only_loss = assistant_only_loss
        self.params = lora.trainable_parameters()
        self.optimizer = optimizer or AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.rng = random.Random(seed)
        self.step = 0

    def _tokenizer(self):
        if self.tokenizer is None:
            from lugh import Tokenizer

            self.tokenizer = Tokenizer(self.inference.model)
        return self.tokenizer

    def windows(self, data: Data) -> list[Window]:
        """Training windows of at most `seq_len` tokens from texts, token sequences or chat
        records (windows pass through)."""
        if isinstance(data, str):
            data = [data]
        items = list(data)
        if items and all(isinstance(item, Window) for item in items):
            return items
        if items and isinstance(items[0], Mapping):
            windows = []
            for record in items:
                if "messages" not in record:
                    raise ValueError('a chat record needs "messages": [{"role", "content"}, ...]')
                w = chat_tokens(
                    self._tokenizer(),
                    record["messages"],
                    template=self.chat_template,
                    assistant_only=self.assistant_only_loss,
                )
                tokens = w.tokens[: self.seq_len]
                w = Window(tokens, w.targets[: len(tokens) - 1] + [IGNORE_INDEX])
                if w.n_scored() > 0:
                    windows.append(w)
            if not windows:
                raise ValueError("no conversation has an assistant token within seq_len")
            return windows
        if items and isinstance(items[0], str):
            tokenizer = self._tokenizer()
            stream = [t for text in items for t in tokenizer.encode(text, add_bos=True)]
            items = [stream]
        windows = []
        for seq in items:
            seq = [int(t) for t in seq]
            for start in range(0, len(seq), self.seq_len):
                window = seq[start : start + self.seq_len]
                if len(window) >= 2:
                    windows.append(Window(window))
        if not windows:
            raise ValueError("no training window of at least 2 tokens in the data")
        return windows

    def evaluate(self, data: Data) -> float:
        """Mean loss over the scored tokens of `data` with the adapter as it is (no gradient)."""
        windows = self.windows(data)
        total, count = 0.0, 0
        for i in range(0, len(windows), self.batch_size):
            batch = windows[i : i + self.batch_size]
            loss_sum, n = eval_loss(
                self.inference,
                [w.tokens for w in batch],
                self.lora,
                targets=[w.next_token_targets() for w in batch],
            )
            total, count = total + loss_sum, count + n
        return total / count

    def fit(
        self,
        data: Data,
        *,
        steps: int | None = None,
        epochs: int | None = None,
        eval_data: Data | None = None,
        eval_every: int = 0,
        callback: Callable[[StepReport], bool | None] | None = None,
    ) -> list:
        """Trains for `steps` optimizer steps or `epochs` passes (one of them; default one
        epoch). `callback(report)` runs after each step; a true return stops training.
        Returns the reports."""
        windows = self.windows(data)
        per_step = self.batch_size * self.grad_accum
        steps_per_epoch = max(1, len(windows) // per_step)
        if steps is not None and epochs is not None:
            raise ValueError("give steps or epochs, not both")
        total_steps = steps if steps is not None else steps_per_epoch * (epochs or 1)
        if total_steps < 1:
            raise ValueError("steps must be >= 1")
        scheduler = LRScheduler(
            self.optimizer,
            schedule=self.schedule,
            warmup_steps=self.warmup_steps,
            total_steps=total_steps,
        )
        reports = []
        started = time.perf_counter()
        tokens_seen = 0
        for step, batches in zip(range(total_steps), self._step_batches(windows)):
            step_started = time.perf_counter()
            normalizer = sum(w.n_scored() for batch in batches for w in batch)
            self.optimizer.zero_grad()
            loss_sum = 0.0
            for batch in batches:
                loss, _ = train_step(
                    self.inference,
                    [w.tokens for w in batch],
                    self.lora,
                    targets=[w.next_token_targets() for w in batch],
                    normalizer=normalizer,
                    checkpoint=self.checkpoint,
                    precision=self.precision,
                )
                loss_sum += loss
            grad_norm = None
            if self.max_grad_norm is not None:
                grad_norm = clip_grad_norm(self.params, self.max_grad_norm)
            lr = self.optimizer.lr
            self.optimizer.step()
            scheduler.step()
            self.step += 1
            n_tokens = sum(len(w.tokens) for batch in batches for w in batch)
            tokens_seen += n_tokens
            now = time.perf_counter()
            report = StepReport(
                step=step + 1,
                total_steps=total_steps,
                loss=loss_sum / normalizer,
                lr=lr,
                tokens=tokens_seen,
                tokens_per_s=n_tokens / max(now - step_started, 1e-9),
                elapsed_s=now - started,
                grad_norm=grad_norm,
            )
            if eval_data is not None and eval_every and (step + 1) % eval_every == 0:
                report.eval_loss = self.evaluate(eval_data)
            reports.append(report)
            if callback is not None and callback(report):
                break
        return reports

    def _step_batches(self, windows: list) -> Iterable[list]:
        """Endless shuffled epochs, `grad_accum` micro-batches of `batch_size` per step."""
        per_step = self.batch_size * self.grad_accum
        while True:
            order = windows[:]
            self.rng.shuffle(order)
            if len(order) < per_step:
                order = (order * (per_step // len(order) + 1))[:per_step]
            for i in range(0, len(order) - per_step + 1, per_step):
                chunk = order[i : i + per_step]
                yield [chunk[j : j + self.batch_size] for j in range(0, per_step, self.batch_size)]
