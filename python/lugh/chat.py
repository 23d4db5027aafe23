"""Chat: a conversation kept in one KV cache, each turn rendered by the model's chat template
and answered token by token until an end-of-turn token."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable

import numpy as np

__all__ = ["ChatSession", "common_prefix"]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """Answers a growing conversation. Each turn renders the whole conversation with the chat
    template, feeds only the tokens the cache does not hold yet (the rendered history is
    normally unchanged), and samples until an end-of-generation token (`Tokenizer.is_eog`:
    EOS, end of turn), the template's end-of-turn text, or `max_tokens`."""

    def __init__(self, inference, tokenizer, *, template: str | None = None, lora=None) -> None:
        self.inference = inference
        self.tokenizer = tokenizer
        self.template = template
        self.lora = lora
        self.cache = inference.create_kv_cache()
        self.fed: list[int] = []
        self.end_of_turn = tokenizer.end_of_turn(template)

    def prompt_tokens(self, messages: Sequence[Mapping[str, Any]]) -> list[int]:
        """The conversation with the assistant's turn opened, as tokens."""
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, template=self.template
        )
        return self.tokenizer.encode(text, add_bos=False, parse_special=True)

    def _streamable(self, text: str) -> str:
        """What of `text` can be shown: not a partial character (decoded as U+FFFD) until its
        last byte arrives, nor what may be the start of the end-of-turn text."""
        text = text.rstrip("\ufffd")
        for n in range(min(len(text), len(self.end_of_turn or "")), 0, -1):
            if self.end_of_turn.startswith(text[-n:]):
                return text[:-n]
        return text

    def reply(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 0.95,
        seed: int | None = None,
        on_text: Callable[[str], object] | None = None,
    ) -> str:
        """The assistant's answer to `messages`; `on_text` receives it piece by piece."""
        ids = self.prompt_tokens(messages)
        keep = min(
            common_prefix(self.fed, ids), len(ids) - 1
        )  # at least one token to feed: the logits come from it
        self.cache.truncate(keep)
        logits = self.inference.forward_cache(self.cache, ids[keep:], lora=self.lora)
        self.fed = list(ids)
        out: list[int] = []
        shown = ""
        for step in range(max_tokens):
            if temperature <= 0:
                token = int(np.argmax(logits))
            else:
                step_seed = None if seed is None else seed + step
                token = self.inference.sample_top_p(logits, temperature, top_p, seed=step_seed)
            if self.tokenizer.is_eog(token):
                break
            out.append(token)
            text = self.tokenizer.decode(out)
            if self.end_of_turn and self.end_of_turn in text:
                break
            ready = self._streamable(text)
            if on_text is not None and len(ready) > len(shown):
                on_text(ready[len(shown) :])
                shown = ready
            if self.cache.n_cached + 1 > self.cache.n_ctx or step + 1 == max_tokens:
                break
            logits = self.inference.forward_cache(self.cache, [token], lora=self.lora)
            self.fed.append(token)
        text = self.tokenizer.decode(out)
        if self.end_of_turn:
            text = text.split(self.end_of_turn, 1)[0]
        if on_text is not None and len(text) > len(shown):
            on_text(text[len(shown) :])
        return text
