"""`lugh serve` / `lugh.Server`: the OpenAI API through the real `openai` client, continuous
batching of requests for different adapters (token for token what each gives alone), adapters
loaded and unloaded at run time, and faults answered with OpenAI-style errors while the server
goes on."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import lugh
from conftest import DEMO_F16, FIXTURES, model

openai = pytest.importorskip("openai")

TINY = FIXTURES / "tiny-llama"
CHATML = (FIXTURES / "chat_templates" / "qwen3.jinja").read_text()
BASE = "base-f32"


@pytest.fixture(scope="module")
def tiny():
    """The tiny llama, three adapters (one loaded at scale 0.5) and a server over them."""
    m = model(TINY / f"{BASE}.gguf")
    inf = lugh.Inference(m, n_threads=2)
    adapters = {
        "qv": lugh.LoRA(TINY / "lora-qv.gguf", m),
        "all": lugh.LoRA(TINY / "lora-all.gguf", m),
        "peft-half": lugh.LoRA(TINY / "lora-all-peft", m, scale=0.5),
    }
    with lugh.Server(inf, adapters, port=0, max_batch=16, chat_template=CHATML) as server:
        yield inf, adapters, server


@pytest.fixture(scope="module")
def client(tiny):
    return openai.OpenAI(base_url=tiny[2].url, api_key="unused", max_retries=0)


def raw(server, method: str, path: str, body=None, headers=None) -> tuple:
    """(status, parsed JSON or text) of one request, without the openai client."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
    conn.request(
        method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    response = conn.getresponse()
    text = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(text)
    except json.JSONDecodeError:
        return response.status, text


def token_ids(completion) -> list:
    """The generated ids of a completion asked with logprobs and return_tokens_as_token_ids."""
    return [int(t.split(":")[1]) for t in completion.choices[0].logprobs.tokens]


def metric(server, sample: str) -> float:
    """Sum of the samples in /metrics that `sample` names: a metric's name, or its name and
    the start of its labels (`'lugh_batch_size_bucket{le="1.0"'`)."""
    status, text = raw(server, "GET", "/metrics")
    assert status == 200
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(sample) and ("{" in sample or line[len(sample)] in "{ ")
    )


# --- the API through the openai client -------------------------------------------------------


def test_models_lists_the_base_and_every_adapter(tiny, client):
    ids = [m.id for m in client.models.list().data]
    assert ids == [BASE, "qv", "all", "peft-half"]


def test_completion_is_the_greedy_generation(tiny, client):
    inf, _, _ = tiny
    tok = lugh.Tokenizer(inf.model)
    prompt = "Hello world"
    expected = inf.generate(tok.encode(prompt), max_tokens=12, greedy=True)
    out = client.completions.create(model=BASE, prompt=prompt, max_tokens=12, temperature=0)
    choice = out.choices[0]
    context = tok.encode(prompt)[-1:]
    assert choice.text == tok.decode(context + expected)[len(tok.decode(context)) :]
    assert choice.finish_reason == ("length" if len(expected) == 12 else "stop")
    assert out.usage.prompt_tokens == len(tok.encode(prompt))
    assert out.usage.completion_tokens == len(expected)


def test_streaming_gives_the_same_text_in_pieces(tiny, client):
    whole = client.completions.create(
        model="qv", prompt="Hello world", max_tokens=16, temperature=0
    )
    chunks = list(
        client.completions.create(
            model="qv",
            prompt="Hello world",
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[
        0
    ].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_adapter_by_model_name_and_by_lora_list_agree(tiny, client):
    """vLLM's `model` and llama.cpp's `lora` (by name or load position) pick the same adapter."""
    args = dict(prompt=[1, 844, 899], max_tokens=10, temperature=0, logprobs=0)
    extra = {"return_tokens_as_token_ids": True}
    by_model = token_ids(client.completions.create(model="all", extra_body=extra, **args))
    by_name = token_ids(
        client.completions.create(model=BASE, extra_body={**extra, "lora": [{"id": "all"}]}, **args)
    )
    by_index = token_ids(
        client.completions.create(
            model=BASE, extra_body={**extra, "lora": [{"id": 1, "scale": 1.0}]}, **args
        )
    )
    base = token_ids(client.completions.create(model=BASE, extra_body=extra, **args))
    assert by_model == by_name == by_index
    assert by_model != base, "the adapter changes nothing: the test would not see it ignored"


def test_logprobs_are_the_log_softmax_of_the_logits(tiny, client):
    inf, _, _ = tiny
    prompt = [1, 844, 899, 325]
    out = client.completions.create(
        model=BASE,
        prompt=prompt,
        max_tokens=1,
        temperature=0,
        logprobs=3,
        extra_body={"return_tokens_as_token_ids": True},
    )
    logits = np.asarray(inf.forward(prompt), dtype=np.float64)
    log_softmax = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
    lp = out.choices[0].logprobs
    best = int(np.argmax(logits))
    assert lp.tokens == [f"token_id:{best}"]
    assert abs(lp.token_logprobs[0] - log_softmax[best]) < 1e-4
    top = lp.top_logprobs[0]
    assert list(top) == [f"token_id:{i}" for i in np.argsort(-logits)[:3]]
    for key, value in top.items():
        assert abs(value - log_softmax[int(key.split(":")[1])]) < 1e-4


def test_stop_strings_cut_the_text(tiny, client):
    full = client.completions.create(model=BASE, prompt="Hello world", max_tokens=24, temperature=0)
    text = full.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    cut = client.completions.create(
        model=BASE, prompt="Hello world", max_tokens=24, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(tiny, client):
    args = dict(model="qv", prompt="Hello", max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    a = client.completions.create(**args).choices[0].text
    b = client.completions.create(**args).choices[0].text
    assert a == b


def test_chat_uses_the_template_and_streams(tiny, client):
    inf, _, _ = tiny
    tok = lugh.Tokenizer(inf.model)
    messages = [{"role": "user", "content": "Hello world"}]
    prompt = tok.encode(
        tok.apply_chat_template(messages, template=CHATML), add_bos=False, parse_special=True
    )
    out = client.chat.completions.create(
        model="all", messages=messages, max_tokens=8, temperature=0
    )
    assert out.usage.prompt_tokens == len(prompt)
    assert out.choices[0].message.role == "assistant"
    pieces = client.chat.completions.create(
        model="all", messages=messages, max_tokens=8, temperature=0, stream=True
    )
    chunks = list(pieces)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert (
        "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    )
    # Content given as parts is the same message.
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello world"}]}]
    same = client.chat.completions.create(model="all", messages=parts, max_tokens=8, temperature=0)
    assert same.choices[0].message.content == out.choices[0].message.content


def test_chat_logprobs(tiny, client):
    out = client.chat.completions.create(
        model=BASE,
        messages=[{"role": "user", "content": "Hi"}],
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)


# --- continuous batching ------------------------------------------------------------------------


def test_concurrent_mixed_adapters_equal_each_alone(tiny):
    """16 greedy requests over 3 adapters and the base, sent at once, give exactly the tokens
    each gives alone through Inference.generate; the server did batch them."""
    inf, adapters, server = tiny
    choices = [
        (BASE, None, None),
        ("qv", None, adapters["qv"]),
        ("all", None, adapters["all"]),
        ("peft-half", None, adapters["peft-half"]),
        (
            BASE,
            [{"id": "qv", "scale": 0.5}],
            lugh.LoRA(TINY / "lora-qv.gguf", inf.model, scale=0.5),
        ),
    ]
    rng = np.random.default_rng(3)
    requests = []
    for i in range(16):
        name, lora_list, adapter = choices[i % len(choices)]
        prompt = [1, *rng.integers(3, inf.n_vocab, size=int(rng.integers(2, 30))).tolist()]
        requests.append((name, lora_list, adapter, prompt, int(rng.integers(8, 40))))
    expected = [inf.generate(p, max_tokens=n, greedy=True, lora=a) for _, _, a, p, n in requests]
    assert len({tuple(e) for e in expected}) > 8, "the requests should differ"
    single = 'lugh_batch_size_bucket{le="1.0"'
    steps_before, single_before = metric(server, "lugh_batch_size_count"), metric(server, single)

    client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
    barrier = threading.Barrier(len(requests))

    def send(request):
        name, lora_list, _, prompt, n = request
        extra = {"return_tokens_as_token_ids": True}
        if lora_list:
            extra["lora"] = lora_list
        barrier.wait()
        out = client.completions.create(
            model=name, prompt=prompt, max_tokens=n, temperature=0, logprobs=0, extra_body=extra
        )
        return token_ids(out)

    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(send, requests))
    for i, (g, e) in enumerate(zip(got, expected)):
        assert g == e, f"request {i} ({requests[i][0]}): batched {g} != alone {e}"
    steps = metric(server, "lugh_batch_size_count") - steps_before
    assert steps - (metric(server, single) - single_before) > 0, "no step ran several sequences"


# --- adapters at run time ----------------------------------------------------------------------


def test_load_and_unload_at_run_time(tiny, client):
    _, _, server = tiny
    status, text = raw(
        server,
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "late", "lora_path": str(TINY / "lora-qv-peft")},
    )
    assert status == 200 and "late" in text
    assert "late" in [m.id for m in client.models.list().data]
    late = client.completions.create(model="late", prompt="Hello", max_tokens=6, temperature=0)
    status, body = raw(
        server,
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "late", "lora_path": str(TINY / "lora-qv.gguf")},
    )
    assert status == 400 and "already been loaded" in body["error"]["message"]
    status, _ = raw(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert status == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="Hello", max_tokens=6)
    status, body = raw(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "late"})
    assert status == 404
    assert late.choices[0].text


def test_a_bad_adapter_file_is_refused_and_the_server_goes_on(tiny, client, tmp_path):
    _, _, server = tiny
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    for path, words in (
        (bad, "bad.gguf"),
        (tmp_path / "missing.gguf", "missing.gguf"),
        (TINY / "base-f32.gguf", "not an adapter"),
    ):
        status, body = raw(
            server, "POST", "/v1/load_lora_adapter", {"lora_name": "x", "lora_path": str(path)}
        )
        assert status == 400, body
        assert words in body["error"]["message"]
    assert "x" not in [m.id for m in client.models.list().data]
    assert client.completions.create(model=BASE, prompt="Hi", max_tokens=2).choices


def test_unloading_an_adapter_in_use_lets_its_requests_finish(tiny, client):
    inf, adapters, server = tiny
    raw(
        server,
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "busy", "lora_path": str(TINY / "lora-all.gguf")},
    )
    prompt = [1, 844, 899]
    stream = client.completions.create(
        model="busy",
        prompt=prompt,
        max_tokens=60,
        temperature=0,
        stream=True,
        logprobs=0,
        extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
    )
    chunks = iter(stream)
    first = next(chunks)
    status, _ = raw(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "busy"})
    assert status == 200
    rest = list(chunks)
    tokens = [
        t
        for c in [first, *rest]
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.tokens
    ]
    assert [int(t.split(":")[1]) for t in tokens] == inf.generate(
        prompt, max_tokens=60, greedy=True, lora=adapters["all"], eos_token=-1
    )
    assert rest[-1].choices[0].finish_reason == "length"


# --- faults --------------------------------------------------------------------------------------


def test_bad_requests_get_openai_errors_and_the_server_goes_on(tiny, client):
    _, _, server = tiny
    cases = [
        (b"{not json", 400, "not valid JSON"),
        ({"prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "Hi", "max_tokens": -1}, 400, "max_tokens"),
        ({"prompt": 5}, 400, "prompt"),
        ({"prompt": "Hi", "n": 2}, 400, "n=1"),
        ({"prompt": "Hi", "temperature": 3}, 400, "temperature"),
        ({"prompt": [1, 10**6]}, 400, "out of range"),
        ({"prompt": "Hi", "model": "nope"}, 404, "nope"),
        ({"prompt": "Hi", "lora": [{"id": 99}]}, 404, "99"),
        ({"prompt": "Hi", "lora": [{"id": "qv"}, {"id": 0}]}, 400, "chosen twice"),
        ({"prompt": "Hi", "model": "qv", "lora": [{"id": "qv"}]}, 400, "chosen twice"),
        ({"prompt": [1] * 600}, 413, "maximum context length"),
        ({"prompt": "Hi", "max_tokens": 100000}, 400, "max_tokens"),
    ]
    for body, status, words in cases:
        got, answer = raw(server, "POST", "/v1/completions", body)
        assert got == status, (body if len(str(body)) < 200 else "big body", answer)
        assert words in answer["error"]["message"], answer
        assert set(answer["error"]) == {"message", "type", "param", "code"}
    got, answer = announced_too_long(server, "/v1/completions", 5 << 20)
    assert got == 413 and "length limit" in answer["error"]["message"], answer
    assert answer["error"]["code"] == "request_too_large"
    got, answer = raw(server, "POST", "/v1/chat/completions", {"messages": "hi"})
    assert got == 400 and "messages" in answer["error"]["message"]
    got, answer = raw(server, "GET", "/v1/nothing")
    assert got == 404 and answer["error"]["type"] == "not_found_error"
    assert metric(server, "lugh_http_errors_total") >= len(cases) + 1
    assert client.completions.create(model=BASE, prompt="Hi", max_tokens=3).choices[0].text


def announced_too_long(server, path: str, length: int) -> tuple:
    """(status, parsed JSON) of a POST announcing `length` bytes and sending only their start:
    the answer comes from the headers. (A client still sending when the server answers and
    closes gets a broken pipe instead of the answer.)"""
    with socket.create_connection((server.host, server.port), timeout=30) as s:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: lugh\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n"
        )
        s.sendall(head.encode() + b'{"prompt": "xxxx')
        response = http.client.HTTPResponse(s)
        response.begin()
        return response.status, json.loads(response.read())


def test_a_client_that_disconnects_mid_stream_frees_its_place(tiny, client):
    _, _, server = tiny
    before = metric(server, 'lugh_requests_finished_total{adapter="qv",reason="cancelled"')
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    body = {
        "model": "qv",
        "prompt": "Hello",
        "max_tokens": 400,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0,
    }
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps(body),
        headers={"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")
    conn.sock.shutdown(2)
    conn.close()
    deadline = time.time() + 20
    while metric(server, 'lugh_requests_finished_total{adapter="qv",reason="cancelled"') == before:
        assert time.time() < deadline, "the request kept running after its client left"
        time.sleep(0.05)
    assert client.completions.create(model="qv", prompt="Hi", max_tokens=3).choices


def test_health_and_metrics(tiny):
    _, _, server = tiny
    assert raw(server, "GET", "/health") == (200, {"status": "ok"})
    status, text = raw(server, "GET", "/metrics")
    for name in (
        "lugh_requests_total",
        "lugh_generation_tokens_total",
        "lugh_batch_size",
        "lugh_queue_seconds",
        "lugh_time_to_first_token_seconds",
    ):
        assert name in text
    assert re.search(r'lugh_generation_tokens_total\{adapter="qv"\} [1-9]', text)


def test_chat_without_a_template_is_a_clear_400():
    m = model(TINY / f"{BASE}.gguf")
    with lugh.Server(lugh.Inference(m, n_threads=1), port=0) as server:
        status, body = raw(
            server,
            "POST",
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}]},
        )
    assert status == 400 and "--chat-template" in body["error"]["message"]


def test_the_api_key_is_checked_on_every_request():
    m = model(TINY / f"{BASE}.gguf")
    with lugh.Server(lugh.Inference(m, n_threads=1), port=0, api_key="sesame") as server:
        for path in ("/v1/models", "/health", "/metrics"):
            assert raw(server, "GET", path)[0] == 401
        status, body = raw(server, "GET", "/v1/models", headers={"Authorization": "Bearer nope"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=server.url, api_key="sesame", max_retries=0)
        assert good.completions.create(model=BASE, prompt="Hi", max_tokens=2).choices
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=server.url, api_key="x", max_retries=0).models.list()


def test_bad_server_arguments_raise():
    m = model(TINY / f"{BASE}.gguf")
    inf = lugh.Inference(m, n_threads=1)
    with pytest.raises(ValueError, match="max_batch"):
        lugh.Server(inf, port=0, max_batch=0)
    with pytest.raises(FileNotFoundError):
        lugh.Server(inf, {"a": TINY / "missing.gguf"}, port=0)
    with pytest.raises(TypeError, match="lora"):
        lugh.Server(inf, {"a": 3}, port=0)
    with lugh.Server(inf, port=0) as first:
        with pytest.raises(OSError):
            lugh.Server(inf, port=first.port)


def _sigint_as_in_a_terminal() -> None:
    """A shell starts background jobs with SIGINT ignored, and Python then keeps ignoring it:
    the server gets SIGINT's default, as Ctrl-C in a terminal finds it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_cli_serves_until_interrupted(sig, code):
    """Ctrl-C and SIGTERM (`docker stop`) both stop the server and end the process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lugh",
            "serve",
            "-m",
            str(DEMO_F16),
            "--port",
            "0",
            "--threads",
            "1",
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=_sigint_as_in_a_terminal,
    )
    try:
        line = proc.stderr.readline()
        match = re.search(r"(http://[\d.]+:\d+/v1)", line)
        assert match, line
        client = openai.OpenAI(base_url=match.group(1), api_key="unused", max_retries=0)
        out = client.completions.create(
            model="lugh-demo-4m-f16", prompt="Return the", max_tokens=8, temperature=0
        )
        assert out.choices[0].text.startswith(" current size")
    finally:
        proc.send_signal(sig)
        proc.wait(timeout=30)
    assert proc.returncode == code


def test_stop_does_not_wait_for_clients_that_keep_connections_open():
    """An idle keep-alive connection and one half-way through its request headers are cut off
    after a grace period, not waited for."""
    m = model(TINY / f"{BASE}.gguf")
    server = lugh.Server(lugh.Inference(m, n_threads=1), port=0)
    idle = http.client.HTTPConnection(server.host, server.port, timeout=30)
    idle.request("GET", "/v1/models")
    assert idle.getresponse().read()
    stalled = socket.create_connection((server.host, server.port), timeout=30)
    stalled.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: lugh\r\n")
    time.sleep(0.2)
    stopping = threading.Thread(target=server.stop)
    started = time.time()
    stopping.start()
    stopping.join(timeout=30)
    assert not stopping.is_alive() and time.time() - started < 10
    assert not server.running
    try:
        assert stalled.recv(1) == b""  # closed by the server
    except ConnectionResetError:
        pass  # closed with a reset: as closed
    stalled.close()
    idle.close()


def test_stop_ends_requests_in_progress():
    """Stopping does not wait for long generations: their streams end with an error event."""
    m = model(TINY / f"{BASE}.gguf")
    server = lugh.Server(lugh.Inference(m, n_threads=1), port=0)
    conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
    body = {"prompt": "Hello", "max_tokens": 500, "stream": True, "ignore_eos": True}
    conn.request("POST", "/v1/completions", body=json.dumps(body))
    response = conn.getresponse()
    assert response.readline().startswith(b"data: ")
    started = time.time()
    server.stop()
    rest = response.read().decode()
    assert time.time() - started < 10
    assert "shutting down" in rest and rest.rstrip().endswith("data: [DONE]")
    assert not server.running


def test_the_server_runs_on_any_device(device):
    """The server batches on the device of its inference (`--device`): greedy tokens there
    equal `Inference.generate` on the same device."""
    m = model(TINY / f"{BASE}.gguf")
    inf = lugh.Inference(m, n_threads=1, device=device)
    qv = lugh.LoRA(TINY / "lora-qv.gguf", m)
    with lugh.Server(inf, {"qv": qv}, port=0) as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        for name, adapter in ((BASE, None), ("qv", qv)):
            out = client.completions.create(
                model=name,
                prompt=[1, 844, 899],
                max_tokens=10,
                temperature=0,
                logprobs=0,
                extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
            )
            expected = inf.generate(
                [1, 844, 899], max_tokens=10, greedy=True, lora=adapter, eos_token=-1
            )
            assert token_ids(out) == expected
