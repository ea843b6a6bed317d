"""`ctc-drafter serve` through the official `openai` client, against servers started here on 127.0.0.1.

A tiny random Llama with SmolLM2's tokenizer stands in for a real model (its replies are gibberish, but
greedy ones are deterministic, which is what the equality checks need); one slow test uses the embedded
default. Servers run uvicorn in a thread on a socket bound to a free port; one test starts the real CLI
in a subprocess to check the drain on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from types import SimpleNamespace

import openai
import pytest
import uvicorn

from ctc_drafter.decoding import CTCDrafter
from ctc_drafter.decoding.verify import MIN_TEMPERATURE
from ctc_drafter.models.templates import build_prompt_ids
from ctc_drafter.serving import ServeSettings, create_app
from ctc_drafter.serving.stops import StopText, partial_stop_len

MODEL = "tiny"
HI = [{"role": "user", "content": "Say something."}]


# ---- servers and clients -----------------------------------------------------------------------


@contextmanager
def running_server(engine, **settings):
    """uvicorn in a thread, bound to 127.0.0.1 on a free port; stopped (and drained) on exit."""
    app = create_app(engine, ServeSettings(model_name=settings.pop("model_name", MODEL), **settings))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    sock = socket.create_server(("127.0.0.1", 0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{sock.getsockname()[1]}", app=app)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def client(server, **kw) -> openai.OpenAI:
    # max_retries=0: a 429 must reach the test, not be retried away
    return openai.OpenAI(base_url=server.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0,
                         timeout=60, **kw)


def post(server, path: str, body, headers=None) -> tuple[int, dict]:
    """A raw POST (bodies the openai client would refuse to send); returns (status, JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get_metric(server, name: str, **labels) -> float:
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$"
    m = re.search(pattern, text, re.M)
    return float(m.group(1)) if m else 0.0


def chat(c, stream: bool, **kw):
    """(text, finish_reason, the final usage/speculation carrier) for one chat request."""
    kw = {"model": MODEL, "messages": HI, **kw}
    if not stream:
        r = c.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r
    parts, finish, last = [], None, None
    for chunk in c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        for ch in chunk.choices:
            parts.append(ch.delta.content or "")
            finish = ch.finish_reason or finish
        last = chunk
    return "".join(parts), finish, last


def complete(c, stream: bool, prompt: str, **kw):
    if not stream:
        r = c.completions.create(model=MODEL, prompt=prompt, **kw)
        return r.choices[0].text, r.choices[0].finish_reason
    parts, finish = [], None
    for chunk in c.completions.create(model=MODEL, prompt=prompt, stream=True, **kw):
        for ch in chunk.choices:
            parts.append(ch.text)
            finish = ch.finish_reason or finish
    return "".join(parts), finish


@pytest.fixture(scope="module")
def engine(tiny_model_dir, first_arm):
    # The CTC draft alone: with the hybrid's n-gram memory the *step counts* of a repeated request depend on
    # the requests before it (the text never does), and these tests compare step counts with `generate`'s
    # (so every step takes the same arm, whatever the machine's timing).
    return CTCDrafter.from_pretrained(str(tiny_model_dir), "untrained", device="cpu", proposer="ctc",
                                      switch=first_arm)


@pytest.fixture(scope="module")
def server(engine):
    with running_server(engine) as s:
        yield s


def reference(engine, messages=HI, max_new_tokens=24):
    """What the engine itself answers (greedy), and the prompt's ids."""
    ids = build_prompt_ids(engine.base.tokenizer, messages)
    res = engine.generate(ids, max_new_tokens=max_new_tokens)
    return ids, res


# ---- replies -----------------------------------------------------------------------------------


def test_greedy_replies_equal_generate(engine, server):
    ids, res = reference(engine, max_new_tokens=24)
    want = engine.decode(res.tokens)
    c = client(server)
    for stream in (False, True):
        text, finish, carrier = chat(c, stream, max_tokens=24, temperature=0)
        assert text == want, f"stream={stream}"
        assert finish == "length"
        assert carrier.usage.prompt_tokens == len(ids) and carrier.usage.completion_tokens == 24
        spec = carrier.model_extra["speculation"]
        assert spec["speculative"] is True and spec["steps"] == res.steps and spec["tokens_per_s"] > 0
        assert spec["accepted_tokens_per_step"] == pytest.approx(res.mean_accept_length, abs=1e-3)
    prompt = "Once upon a time"
    raw = engine.generate(engine.base.tokenizer(prompt)["input_ids"], max_new_tokens=16)
    for stream in (False, True):
        assert complete(c, stream, prompt, max_tokens=16) == (engine.decode(raw.tokens), "length")


def test_stream_is_server_sent_events_in_openai_format(server):
    body = json.dumps({"model": MODEL, "messages": HI, "max_tokens": 5, "stream": True}).encode()
    req = urllib.request.Request(server.url + "/v1/chat/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and "speculation" in chunks[-1]


def _stop_across_tokens(engine, tokens):
    """A 4-character stop string that starts in one token's text and ends in the next one's."""
    text = engine.decode(tokens)
    for k in range(2, len(tokens) - 1):
        b = len(engine.decode(tokens[:k]))
        left, right = engine.decode(tokens[k - 1:k]), engine.decode(tokens[k:k + 1])
        stop = text[b - 2:b + 2]
        if len(left) >= 2 and len(right) >= 2 and stop.isprintable() and "\ufffd" not in stop \
                and text.startswith(engine.decode(tokens[:k])):
            return stop
    pytest.fail("no token boundary with two printable characters on each side")


def test_stop_strings_work_across_token_boundaries(engine, server):
    _, res = reference(engine, max_new_tokens=40)
    text = engine.decode(res.tokens)
    stop = _stop_across_tokens(engine, res.tokens)
    want = text[: text.index(stop)]
    c = client(server)
    for stream in (False, True):
        got, finish, _ = chat(c, stream, max_tokens=40, stop=["never appears \u2603", stop])
        assert (got, finish) == (want, "stop"), f"stream={stream}"
        assert stop not in got


def test_stop_text_holds_back_what_may_become_a_stop_string():
    s = StopText(("\n\nUser", "###"))
    assert s.update("Hello\n") == "Hello"  # "\n" may start "\n\nUser"
    assert s.update("Hello\n\nUs") == ""
    assert s.update("Hello\n\nUsual") == "\n\nUsual"  # it did not
    assert s.update("Hello\n\nUsual #") == " "
    assert s.update("Hello\n\nUsual ##") == ""
    assert s.update("Hello\n\nUsual ###, more") == "" and s.stopped
    assert s.sent == "Hello\n\nUsual " and s.update("anything", final=True) == ""
    t = StopText()
    assert t.update("caf\ufffd") == "caf"  # half of a UTF-8 character: wait for the rest
    assert t.update("café") == "é"
    assert t.update("café!", final=True) == "!"
    assert partial_stop_len("abcab", ("abc",)) == 2 and partial_stop_len("xyz", ("abc",)) == 0


# ---- errors ------------------------------------------------------------------------------------


def _bad_requests(engine):
    ok = {"model": MODEL, "messages": HI}
    long_prompt = "word " * (engine.base.max_length + 10)
    return [
        ("missing messages", {"model": MODEL}, 400, "messages"),
        ("messages not a list", {**ok, "messages": "hi"}, 400, "messages"),
        ("content a number", {**ok, "messages": [{"role": "user", "content": 3}]}, 400, "messages.0.content.str"),
        ("temperature a string", {**ok, "temperature": "hot"}, 400, "temperature"),
        ("max_tokens a string", {**ok, "max_tokens": "5"}, 400, "max_tokens"),
        ("max_tokens zero", {**ok, "max_tokens": 0}, 400, "max_tokens"),
        ("max_tokens negative", {**ok, "max_tokens": -3}, 400, "max_tokens"),
        ("n=2", {**ok, "n": 2}, 400, "n"),
        ("empty stop", {**ok, "stop": [""]}, 400, "stop"),
        ("last message not the user's", {**ok, "messages": [*HI, {"role": "assistant", "content": "x"}]}, 400,
         "messages"),
        ("unknown model", {**ok, "model": "gpt-4"}, 404, "model"),
        ("prompt over the context", {**ok, "messages": [{"role": "user", "content": long_prompt}]}, 400, "messages"),
        ("malformed JSON", b'{"model": "tiny", "messages": [', 400, None),
        ("not an object", [1, 2], 400, None),
    ]


def test_bad_requests_get_openai_style_errors(engine, server):
    before = get_metric(server, "ctc_drafter_requests_total", endpoint="/v1/chat/completions", outcome="invalid")
    cases = _bad_requests(engine)
    for name, body, status, param in cases:
        got, err = post(server, "/v1/chat/completions", body)
        assert got == status, (name, err)
        e = err["error"]
        assert set(e) == {"message", "type", "param", "code"} and e["message"], name
        assert e["param"] == param, (name, e)
    assert got_code(server, {**cases[0][1], "messages": [{"role": "user", "content": "word " * 2000}]}) == \
        "context_length_exceeded"
    after = get_metric(server, "ctc_drafter_requests_total", endpoint="/v1/chat/completions", outcome="invalid")
    assert after - before == len(cases) + 1
    for body, param, code in [({"prompt": "word " * 2000}, "prompt", "context_length_exceeded"),
                              ({"prompt": [1, 10**9]}, "prompt", None), ({"prompt": ""}, "prompt", None),
                              ({"prompt": "hi", "seed": 2**70}, "seed", None),
                              ({"prompt": "hi", "echo": True}, "echo", None)]:
        status, err = post(server, "/v1/completions", {"model": MODEL, **body})
        assert (status, err["error"]["param"], err["error"]["code"]) == (400, param, code), body
    c = client(server)
    with pytest.raises(openai.BadRequestError) as bad:
        c.completions.create(model=MODEL, prompt="hi", max_tokens=0)
    assert bad.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=HI)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", float("nan"), "temperature: Input should be a finite number"),  # JSON NaN: not "<= 2"
    ("temperature", float("inf"), "temperature: Input should be a finite number"),
    ("top_p", float("nan"), "top_p: Input should be a finite number"),
    ("top_p", -float("inf"), "top_p: Input should be a finite number"),
    ("temperature", 2.5, "temperature: Input should be less than or equal to 2"),
    ("temperature", -0.5, "temperature: Input should be greater than or equal to 0"),
    ("temperature", "hot", "temperature: Input should be a valid number"),
    ("top_p", 0, "top_p: Input should be greater than 0"),
    ("top_p", 1.5, "top_p: Input should be less than or equal to 1"),
    ("top_k", -1, "top_k: Input should be greater than or equal to 0"),
    ("max_tokens", 0, "max_tokens: Input should be greater than 0"),
    ("seed", 2**70, "seed: Input should be less than 18446744073709551616"),
    ("n", 2, "n: only n=1 is supported (requests are decoded one at a time, batch 1)"),
    ("temperature", 1e-9, f"temperature must be 0 (greedy) or a finite value >= {MIN_TEMPERATURE:g}, got 1e-09"),
])
def test_each_validation_message_names_its_rule(server, field, value, message):
    status, err = post(server, "/v1/chat/completions", {"model": MODEL, "messages": HI, field: value})
    assert status == 400 and err["error"]["message"] == message, err


def got_code(server, body) -> str | None:
    return post(server, "/v1/chat/completions", body)[1]["error"]["code"]


def test_api_key_is_required_when_set(engine):
    with running_server(engine, api_key="sesame") as s:
        status, err = post(s, "/v1/chat/completions", {"model": MODEL, "messages": HI})
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(s, api_key="wrong").models.list()
        assert [m.id for m in client(s, api_key="sesame").models.list()] == [MODEL]
        assert urllib.request.urlopen(s.url + "/health", timeout=10).status == 200  # probes need no key


def test_models_health_and_metrics(server):
    assert [m.id for m in client(server).models.list()] == [MODEL]
    health = json.loads(urllib.request.urlopen(server.url + "/health", timeout=10).read())
    assert health["status"] == "ok"
    text = urllib.request.urlopen(server.url + "/metrics", timeout=10).read().decode()
    for name in ("ctc_drafter_requests_total", "ctc_drafter_completion_tokens_total", "ctc_drafter_steps_total",
                 "ctc_drafter_accept_length_bucket", "ctc_drafter_queue_depth"):
        assert name in text


# ---- load and disconnects ----------------------------------------------------------------------


def test_load_loses_no_request(engine):
    """16 clients x 4 requests on a queue of 2: each reply complete (and the right text) or a 429."""
    clients, per_client, max_tokens = 16, 4, 6
    want = engine.decode(reference(engine, max_new_tokens=max_tokens)[1].tokens)
    outcomes: list[str] = []
    lock = threading.Lock()

    def one_client(i: int, c: openai.OpenAI) -> None:
        for j in range(per_client):
            try:
                text, finish, _ = chat(c, stream=(i + j) % 2 == 0, max_tokens=max_tokens)
                result = "ok" if (text, finish) == (want, "length") else f"wrong: {text!r} {finish}"
            except openai.RateLimitError as e:
                result = "429" if e.body and e.body.get("message") else "429 without a message"
            except Exception as e:  # anything else is a lost request
                result = f"lost: {type(e).__name__}: {e}"
            with lock:
                outcomes.append(result)

    with running_server(engine, max_queue=2) as s:
        threads = [threading.Thread(target=one_client, args=(i, client(s))) for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "load test did not finish"
        # A request is counted when the server has finished it, which can be a moment after its client
        # has read the last byte: wait (bounded) for the counters to settle.
        deadline = time.monotonic() + 10
        while True:
            served = get_metric(s, "ctc_drafter_requests_total", endpoint="/v1/chat/completions", outcome="ok")
            refused = get_metric(s, "ctc_drafter_requests_total", endpoint="/v1/chat/completions",
                                 outcome="rejected")
            depth = get_metric(s, "ctc_drafter_queue_depth")
            if served + refused >= len(outcomes) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert len(outcomes) == clients * per_client
    assert set(outcomes) <= {"ok", "429"}, sorted(set(outcomes))
    assert outcomes.count("ok") >= 1
    assert (served, refused) == (outcomes.count("ok"), outcomes.count("429")) and depth == 0


def _send_and_keep_open(server, body) -> socket.socket:
    """A raw HTTP request whose connection the test closes when it wants (a client hanging up)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
    return sock


def _wait_until(condition, what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_clients_that_hang_up_free_their_slot_at_once(engine, server):
    """A waiting client that leaves is dropped from the queue; a streaming one stops being decoded."""
    c = client(server)

    def cancelled():
        return get_metric(server, "ctc_drafter_requests_total", endpoint="/v1/chat/completions", outcome="cancelled")

    cancelled0, tokens0 = cancelled(), get_metric(server, "ctc_drafter_completion_tokens_total")
    long = 900  # several seconds of decoding if nobody stopped it
    stream = c.chat.completions.create(model=MODEL, messages=HI, max_tokens=long, stream=True)
    for _, _ in zip(range(3), stream):  # decoding has started
        pass
    waiting = _send_and_keep_open(server, {"model": MODEL, "messages": HI, "max_tokens": long})
    _wait_until(lambda: get_metric(server, "ctc_drafter_queue_depth") == 1, "the second request was not queued")
    waiting.close()
    _wait_until(lambda: get_metric(server, "ctc_drafter_queue_depth") == 0 and cancelled() == cancelled0 + 1,
                "the queued request was not dropped")
    assert get_metric(server, "ctc_drafter_busy") == 1  # while the stream still decodes
    stream.close()
    _wait_until(lambda: cancelled() == cancelled0 + 2, "the dropped stream was not cancelled")
    generated = get_metric(server, "ctc_drafter_completion_tokens_total") - tokens0
    assert generated < long / 2, f"the dropped stream went on decoding ({generated} tokens)"
    text, finish, _ = chat(c, stream=False, max_tokens=4)  # the next request is served
    assert finish == "length" and text


# ---- the command line --------------------------------------------------------------------------


def test_cli_serve_drains_on_sigterm(tiny_model_dir, engine):
    """The real `ctc-drafter serve`: SIGTERM mid-stream lets the reply finish, then the process exits 0."""
    cmd = [sys.executable, "-m", "ctc_drafter", "serve", "--base-model", str(tiny_model_dir), "--draft-model",
           "untrained", "--port", "0", "--served-model-name", MODEL, "--log-level", "warning"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = _wait_for_port(proc)
        s = SimpleNamespace(url=f"http://127.0.0.1:{port}")
        parts, finish = [], None
        stream = client(s).chat.completions.create(model=MODEL, messages=HI, max_tokens=120, stream=True,
                                                   stream_options={"include_usage": True})
        usage, signalled = None, False
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and not signalled:
                proc.send_signal(signal.SIGTERM)  # mid-stream
                signalled = True
            parts += [ch.delta.content or "" for ch in chunk.choices]
            finish = next((ch.finish_reason for ch in chunk.choices if ch.finish_reason), finish)
            usage = chunk.usage or usage
        assert finish == "length" and usage.completion_tokens == 120
        assert "".join(parts) == engine.decode(reference(engine, max_new_tokens=120)[1].tokens)
        assert proc.wait(timeout=30) == 0
        assert "drained" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _wait_for_port(proc) -> int:
    for line in proc.stderr:
        m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", line)
        if m:
            return int(m.group(1))
    pytest.fail(f"serve exited without serving (exit code {proc.wait()})")


# ---- the embedded default ----------------------------------------------------------------------


@pytest.mark.slow
def test_default_model_served_replies_equal_generate():
    engine = CTCDrafter.from_pretrained("default", "default", device="cpu")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = build_prompt_ids(engine.base.tokenizer, messages)
    res = engine.generate(ids, max_new_tokens=32)
    assert res.tokens == engine.generate(ids, max_new_tokens=32, speculative=False).tokens
    with running_server(engine, model_name="smol") as s:
        c = client(s)
        for stream in (False, True):
            text, _, carrier = chat(c, stream, model="smol", messages=messages, max_tokens=32)
            assert text == engine.decode(res.tokens) and "Paris" in text
            # the default (hybrid) proposer remembers earlier requests, so a repeat may take fewer steps
            assert 1 <= carrier.model_extra["speculation"]["steps"] <= res.new_tokens
