"""Tensors of lugh's training: adapter matrices (views of an adapter's weights), logits kept
for a backward pass, and losses. There is no generic tape: `loss.backward()` runs lugh's
hand-written backward pass through the model."""

from lugh._lugh import Tensor

__all__ = ["Tensor"]
