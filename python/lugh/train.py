"""Training with exact gradients: a forward that keeps activations, the loss, and a loop.

    logits = lugh.train.forward(inf, tokens, lora)       # Tensor [n_tokens, n_vocab]
    loss = lugh.train.cross_entropy_loss(logits, targets)
    loss.backward()                                      # exact dL/dA, dL/dB into the adapter
"""

from __future__ import annotations

from lugh._lugh import cross_entropy_loss, forward

__all__ = ["forward", "cross_entropy_loss"]
