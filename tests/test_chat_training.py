"""Training on conversations: the assistant-only mask, and a chat fine-tune of the demo model
(its GGUF has no chat template: one is passed) that learns to answer in a trained style."""

from __future__ import annotations

import pytest

import lugh
from conftest import DEMO_F16, FIXTURES, model

TEMPLATE = (FIXTURES / "chat_templates" / "phi-3.5.jinja").read_text()
STYLE = "Aye aye, captain!"
QUESTIONS = [
    "What is the weather like?",
    "How do I sort a list?",
    "Tell me about the sea.",
    "What time is it?",
    "Can you open the file?",
    "Where is the harbour?",
]


def conversation(question: str, answer: str = STYLE) -> dict:
    return {
        "messages": [
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


@pytest.fixture(scope="module")
def tokenizer() -> lugh.Tokenizer:
    return lugh.Tokenizer(model(DEMO_F16))


def scored_text(tokenizer, window: lugh.train.Window) -> str:
    """The text of the tokens the window scores (the token each scored position predicts)."""
    return tokenizer.decode([t for t in window.targets if t != -100])


def test_only_the_assistant_turns_are_scored(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one?"},
        {"role": "assistant", "content": "Green."},
    ]
    window = lugh.train.chat_tokens(tokenizer, messages, template=TEMPLATE)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=False, template=TEMPLATE)
    assert window.tokens == tokenizer.encode(text, add_bos=False, parse_special=True)
    assert len(window.targets) == len(window.tokens)
    scored = scored_text(tokenizer, window)
    assert "Blue." in scored and "Green." in scored
    for other in ("Be brief", "Name a colour", "Another one", "<|user|>", "<|system|>"):
        assert other not in scored, (other, scored)
    everything = lugh.train.chat_tokens(
        tokenizer, messages, template=TEMPLATE, assistant_only=False
    )
    assert everything.n_scored() == len(window.tokens) - 1 > window.n_scored()


def test_chat_records_need_messages_and_a_template():
    inf = lugh.Inference(model(DEMO_F16))
    lora = lugh.LoRA.create(inf.model, rank=4, alpha=8.0, seed=0)
    with pytest.raises(ValueError, match="no tokenizer.chat_template"):
        lugh.train.Trainer(inf, lora).windows([conversation("hi")])
    with pytest.raises(ValueError, match='needs "messages"'):
        lugh.train.Trainer(inf, lora, chat_template=TEMPLATE).windows([{"text": "x"}])


def test_a_chat_fine_tune_learns_the_assistant_style(tokenizer):
    inf = lugh.Inference(model(DEMO_F16), n_threads=2)
    lora = lugh.LoRA.create(
        inf.model, rank=8, alpha=16.0, targets=("attn_q", "attn_v", "ffn_down"), seed=0
    )
    trainer = lugh.train.Trainer(
        inf, lora, lr=3e-3, batch_size=3, seq_len=64, chat_template=TEMPLATE, seed=0
    )
    data = [conversation(q) for q in QUESTIONS]
    before = trainer.evaluate(data)
    trainer.fit(data, steps=40)
    after = trainer.evaluate(data)
    assert after < 0.2 * before, f"assistant-only loss {before:.3f} -> {after:.3f}"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is the ship ready?"}], template=TEMPLATE
    )
    ids = tokenizer.encode(prompt, add_bos=False, parse_special=True)
    answer = tokenizer.decode(inf.generate(ids, max_tokens=12, greedy=True, lora=lora))
    assert answer.startswith(STYLE), answer
