"""Optimizers, learning-rate schedules and gradient clipping for adapter parameters.

`AdamW` and `SGD` follow PyTorch's update rules and defaults; their steps run in Rust with
the GIL released and update the adapter in place.
"""

from __future__ import annotations

import math

from lugh._lugh import SGD, AdamW, Optimizer, clip_grad_norm, clip_grad_value

__all__ = ["SGD", "AdamW", "LRScheduler", "Optimizer", "clip_grad_norm", "clip_grad_value"]

SCHEDULES = ("constant", "linear", "cosine", "warmup", "step", "exponential")


class LRScheduler:
    """Sets `optimizer.lr` each `step()` from the optimizer's initial learning rate.

    Schedules: ``constant``; ``linear`` and ``cosine`` decay to `min_lr` at `total_steps`;
    ``warmup`` (constant after the warm-up); ``step`` multiplies by `gamma` every
    `step_size` steps; ``exponential`` multiplies by `gamma` every step. Every schedule first
    ramps linearly over `warmup_steps`.
    """

    def __init__(
        self,
        optimizer,
        schedule: str = "cosine",
        warmup_steps: int = 0,
        total_steps: int = 1000,
        min_lr: float = 0.0,
        step_size: int = 100,
        gamma: float = 0.1,
    ) -> None:
        if schedule not in SCHEDULES:
            raise ValueError(f"invalid schedule {schedule!r}: choose among {', '.join(SCHEDULES)}")
        if warmup_steps < 0 or total_steps < 1 or step_size < 1:
            raise ValueError("warmup_steps must be >= 0, total_steps and step_size >= 1")
        if min_lr < 0 or gamma <= 0:
            raise ValueError("min_lr must be >= 0 and gamma > 0")
        self.optimizer = optimizer
        self.schedule = schedule
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr = min_lr
        self.step_size = step_size
        self.gamma = gamma
        self.base_lr = optimizer.lr
        self.last_step = 0
        optimizer.lr = self.lr_at(0)

    def lr_at(self, step: int) -> float:
        """The learning rate for update number `step` (0-based)."""
        base = self.base_lr
        if step < self.warmup_steps:
            return base * (step + 1) / self.warmup_steps
        after = step - self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, after / span)
        if self.schedule == "linear":
            return self.min_lr + (base - self.min_lr) * (1.0 - progress)
        if self.schedule == "cosine":
            return self.min_lr + (base - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.schedule == "step":
            return base * self.gamma ** (after // self.step_size)
        if self.schedule == "exponential":
            return base * self.gamma**after
        return base

    def step(self) -> float:
        """Advances one update and sets the optimizer's learning rate; returns it."""
        self.last_step += 1
        self.optimizer.lr = self.lr_at(self.last_step)
        return self.optimizer.lr

    def state_dict(self) -> dict:
        return {"base_lr": self.base_lr, "last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.base_lr = state["base_lr"]
        self.last_step = state["last_step"]
        self.optimizer.lr = self.lr_at(self.last_step)
