"""Chat templates rendered as transformers' `apply_chat_template(..., tokenize=False)` renders
them: real templates of Qwen3, Gemma 2, Phi-3.5, Llama 3.2 and Mistral Nemo against strings
transformers produced (tests/fixtures/chat_templates/make_reference.py)."""

from __future__ import annotations

import json

import pytest

import lugh
from conftest import DEMO_F16, FIXTURES, model

TEMPLATES = FIXTURES / "chat_templates"
REFERENCE = json.loads((TEMPLATES / "reference.json").read_text())
CASES = [
    (name, i, case)
    for name, spec in REFERENCE["templates"].items()
    for i, case in enumerate(spec["cases"])
]


@pytest.fixture(scope="module")
def tokenizer() -> lugh.Tokenizer:
    return lugh.Tokenizer(model(DEMO_F16))


def render(name: str, case: dict, bos: str, eos: str) -> str:
    """Renders with the reference's special tokens: a model's own come from its vocabulary."""
    template = (TEMPLATES / f"{name}.jinja").read_text()
    # The template names bos/eos through variables: swap the demo vocabulary's for the family's.
    template = "{%- set bos_token = '" + bos + "' %}{%- set eos_token = '" + eos + "' %}" + template
    extra = {k: v for k, v in case.items() if k not in ("messages", "expected", "error")}
    return lugh.Tokenizer(model(DEMO_F16)).apply_chat_template(
        case["messages"], template=template, **extra
    )


@pytest.mark.parametrize("name,index,case", CASES, ids=[f"{n}-{i}" for n, i, _ in CASES])
def test_templates_render_as_transformers_does(name, index, case):
    spec = REFERENCE["templates"][name]
    if "error" in case:
        with pytest.raises(ValueError, match=case["error"].replace(".", r"\.")):
            render(name, case, spec["bos_token"], spec["eos_token"])
        return
    assert render(name, case, spec["bos_token"], spec["eos_token"]) == case["expected"]


def test_a_model_without_a_template_asks_for_one(tokenizer):
    assert tokenizer.chat_template is None
    with pytest.raises(ValueError, match="no tokenizer.chat_template: pass the template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_special_tokens_come_from_the_vocabulary(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], template="{{ bos_token }}|{{ eos_token }}"
    )
    bos, eos = (
        tokenizer.token_to_piece(tokenizer.bos_id),
        tokenizer.token_to_piece(tokenizer.eos_id),
    )
    assert text == f"{bos}|{eos}"


def test_bad_arguments_are_refused(tokenizer):
    with pytest.raises(ValueError, match="list of messages"):
        tokenizer.apply_chat_template({"role": "user"}, template="x")
    with pytest.raises(TypeError, match="JSON-compatible"):
        tokenizer.apply_chat_template([{"role": object()}], template="x")
    with pytest.raises(ValueError, match="syntax error"):
        tokenizer.apply_chat_template([], template="{% if %}")


def test_strftime_now_is_todays_date(tokenizer):
    import datetime

    text = tokenizer.apply_chat_template([], template="{{ strftime_now('%Y-%m-%d') }}")
    assert text == datetime.date.today().isoformat()
