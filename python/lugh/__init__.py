"""lugh: run and fine-tune LLaMA-family models with LoRA adapters.

A Rust engine: GGUF base models (memory-mapped, quantized types included), LoRA adapters from
llama.cpp GGUF files or PEFT directories, inference with the GIL released, and training with a
hand-written backward pass whose gradients match PyTorch's.
"""

from lugh import autograd, chat, optim, train
from lugh._lugh import (
    Inference,
    KVCache,
    LoRA,
    MemoryPool,
    Model,
    Server,
    Tokenizer,
    TokenStream,
    __version__,
    devices,
    merge,
)

__all__ = [
    "Inference",
    "KVCache",
    "LoRA",
    "MemoryPool",
    "Model",
    "Server",
    "TokenStream",
    "Tokenizer",
    "__version__",
    "autograd",
    "chat",
    "devices",
    "merge",
    "optim",
    "train",
]
