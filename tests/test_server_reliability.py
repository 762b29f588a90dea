"""The server against hostile or unlucky clients, over real HTTP on 127.0.0.1 with the official
`openai` client: out-of-range seeds, a request that fails inside the engine, clients that hang up,
huge prompts, half-sent request heads, a wrong API key, a busy port; and the per-request log line."""

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from infer.engine import Engine
from infer.sampling import SamplingParams
from infer.server import ServerThread, create_app
from tests.conftest import ROOT, free_port
from tests.test_server import MSGS, wait_healthy, wide_checkpoint


@pytest.fixture(scope="module")
def wide_ckpt(tokenizer_dir, tmp_path_factory):
    return wide_checkpoint(tmp_path_factory.mktemp("wide") / "run" / "step-3", tokenizer_dir)


@pytest.fixture
def served(wide_ckpt):
    """A fresh server per test (these tests try to break it): (url, engine, openai client)."""
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=8, max_len=128)
    with ServerThread(create_app(engine, model_name="tiny")) as url:
        yield url, engine, openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def _healthy(url) -> dict:
    resp = httpx.get(url + "/health", timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _ask(client, **kw):
    return client.chat.completions.create(model="tiny", messages=MSGS, **{"max_tokens": 5, **kw})


def test_out_of_range_seeds_are_400_and_the_server_keeps_serving(served):
    url, _, client = served
    for seed in (2**64, 2**63, -(2**63) - 1):
        with pytest.raises(openai.BadRequestError) as e:
            _ask(client, seed=seed)
        assert e.value.body["param"] == "seed", e.value.body
    # int64 seeds are all valid, and seed + i (n > 1) wraps instead of overflowing
    for seed in (2**63 - 1, -(2**63)):
        a = _ask(client, seed=seed, n=2, temperature=1.0)
        b = _ask(client, seed=seed, n=2, temperature=1.0)
        assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert _ask(client, temperature=0).choices[0].finish_reason == "length"
    assert _healthy(url)["status"] == "ok"


def _fail_when(engine, monkeypatch, stage: str, seed: int, after_tokens: int = 0):
    """Makes a step raise for requests with `seed` (once they have `after_tokens` tokens): at "prefill"
    (the runner's, for the requests whose cache rows it fills: `engine.running[start:start + B]`) or at
    "append" (the scheduler's, for the request a token goes to). A stand-in for any bug or bad input
    that only shows inside a step."""
    owner = engine.runner if stage == "prefill" else engine.scheduler
    real = getattr(owner, stage)

    def failing(*args, **kwargs):
        if stage == "prefill":
            ids, start = args[0], kwargs.get("start", args[-1])
            reqs = engine.running[start : start + ids.shape[0]]
        else:
            reqs = [args[0]]
        if any(r.params.seed == seed and len(r.output) >= after_tokens for r in reqs):
            raise RuntimeError(f"injected failure in {stage}")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, stage, failing)


def test_a_request_failing_inside_the_engine_fails_alone(served, monkeypatch):
    url, engine, client = served
    _fail_when(engine, monkeypatch, "prefill", seed=666)  # fails as it joins the batch
    _fail_when(engine, monkeypatch, "append", seed=667, after_tokens=3)  # fails mid-generation
    bystander = {}

    def stream():  # runs through both failures
        chunks = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=100, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
        bystander["reasons"] = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]

    t = threading.Thread(target=stream)
    t.start()
    for seed in (666, 667):
        with pytest.raises(openai.InternalServerError) as e:
            _ask(client, seed=seed, max_tokens=20, extra_body={"ignore_eos": True})
        assert e.value.status_code == 500 and "injected failure" in e.value.body["message"]
    with pytest.raises(openai.APIError) as e:  # a stream gets an error event instead
        list(client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, seed=666, stream=True))
    assert "injected failure" in e.value.message
    t.join(60)
    assert bystander["reasons"] == ["length"]
    assert _ask(client, temperature=0).choices[0].finish_reason == "length"
    health = _healthy(url)
    assert health["running"] == 0 and health["waiting"] == 0


def test_a_failing_request_admitted_with_others_fails_alone(wide_ckpt, monkeypatch):
    """The engine itself: a step that fails while admitting several requests retries them one per
    step, so only the culprit fails; `generate()` re-raises its error; the engine goes on."""
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=4, max_len=64)
    _fail_when(engine, monkeypatch, "prefill", seed=666)
    ids = engine.tokenizer.encode("hello there")
    reqs = [engine.add_request(ids, SamplingParams(max_new_tokens=5, seed=s, ignore_eos=True)) for s in (1, 666, 2)]
    while engine.has_work():
        engine.step()
    assert [r.finish_reason for r in reqs] == ["length", "error", "length"]
    assert "injected" in str(reqs[1].error) and engine.running == [] and not engine.waiting
    with pytest.raises(RuntimeError, match="injected failure"):
        engine.generate([ids], SamplingParams(max_new_tokens=3, seed=666))
    assert engine.generate([ids], SamplingParams(max_new_tokens=3, ignore_eos=True))[0].finish_reason == "length"


def test_abandoned_non_streaming_requests_stop_generating(wide_ckpt, monkeypatch):
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=4, max_len=1024)
    requests, add = [], engine.add_request

    def add_and_keep(*args, **kwargs):  # to read each request's finish_reason at the end
        requests.append(add(*args, **kwargs))
        return requests[-1]

    monkeypatch.setattr(engine, "add_request", add_and_keep)
    body = {"model": "tiny", "messages": MSGS, "max_tokens": 1000, "ignore_eos": True}
    with ServerThread(create_app(engine, model_name="tiny")) as url:
        async def hang_up_early():
            async with httpx.AsyncClient(timeout=1.0) as c:  # closes each connection when it times out
                results = await asyncio.gather(*(c.post(url + "/v1/chat/completions", json=body) for _ in range(4)),
                                               return_exceptions=True)
            assert all(isinstance(r, httpx.ReadTimeout) for r in results), results

        asyncio.run(hang_up_early())
        hung_up = time.perf_counter()
        while (h := _healthy(url))["running"] + h["waiting"] and time.perf_counter() - hung_up < 10:
            time.sleep(0.05)
        assert h["running"] == h["waiting"] == 0 and time.perf_counter() - hung_up < 3
    assert len(requests) == 4 and all(r.finish_reason == "abort" for r in requests)
    assert all(len(r.output) < 1000 for r in requests)


def test_a_huge_prompt_is_refused_before_tokenizing(served):
    url, _, client = served
    huge = "word " * 700_000  # 3.5 MB: under the 4 MiB body limit
    started = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": huge}], max_tokens=1)
    err = e.value.body
    assert err["param"] == "messages" and err["code"] == "context_length_exceeded"
    assert "3500000 characters" in err["message"] and "at most" in err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=["hi", huge], max_tokens=1)
    assert e.value.body["param"] == "prompt" and "at most" in e.value.body["message"]
    assert time.perf_counter() - started < 5  # tokenizing 3.5 MB would take seconds
    assert _ask(client).usage.completion_tokens == 5


def test_health_answers_while_a_big_prompt_is_tokenized(wide_ckpt):
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=2, max_len=128)
    with ServerThread(create_app(engine, model_name="tiny", max_prompt_chars=4_000_000)) as url:
        big = {"model": "tiny", "prompt": "hello world, this is a test. " * 40_000, "max_tokens": 1}  # 1.2 MB
        result = {}

        def post_big():
            started = time.perf_counter()
            result["resp"] = httpx.post(url + "/v1/completions", json=big, timeout=120)
            result["seconds"] = time.perf_counter() - started

        t = threading.Thread(target=post_big)
        t.start()
        worst = 0.0
        while t.is_alive():
            started = time.perf_counter()
            assert httpx.get(url + "/health", timeout=60).status_code == 200
            worst = max(worst, time.perf_counter() - started)
            time.sleep(0.02)
        t.join()
    resp = result["resp"]  # tokenized in full, then found longer than the context
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "context_length_exceeded"
    assert result["seconds"] > 0.3, "the prompt was too quick to tokenize to show anything"
    assert worst < 0.5 * result["seconds"], (worst, result["seconds"])


def test_api_key_is_checked(wide_ckpt):
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=2, max_len=128)
    with ServerThread(create_app(engine, model_name="tiny", api_key="sekret")) as url:
        for header in ("Bearer sekre", "Bearer sekret2", "Bearer SEKRET", "bearer sekret", "sekret", "",
                       "Bearer sekrét"):
            resp = httpx.get(url + "/v1/models", headers={"Authorization": header.encode()})
            assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key", header
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0)
        assert good.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2).usage.completion_tokens == 2
        assert httpx.get(url + "/health").status_code == 200  # outside /v1: no key needed


def _closed_after(sock: socket.socket, limit: float) -> float:
    """Seconds until the server closes `sock` (reads only EOF); fails past `limit`."""
    started = time.perf_counter()
    sock.settimeout(limit)
    try:
        assert sock.recv(1024) == b""
    except TimeoutError:
        pytest.fail(f"the connection was still open after {limit} s")
    return time.perf_counter() - started


def test_a_half_sent_request_head_is_dropped(wide_ckpt):
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=2, max_len=128)
    with ServerThread(create_app(engine, model_name="tiny"), header_timeout=1.0) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as idle:
            idle.sendall(b"GET /health HT")
            assert 0.5 < _closed_after(idle, limit=5) < 3
        with socket.create_connection(("127.0.0.1", port)) as slow:  # a byte at a time does not reset the clock
            slow.settimeout(0.2)
            started, closed = time.perf_counter(), False
            for byte in b"GET /health HTTP/1.1\r\nHost: x\r\nUser-Agent: slowloris\r\n":  # 0.2 s a byte
                try:
                    slow.sendall(bytes([byte]))
                    closed = slow.recv(1) == b""
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                if closed:
                    break
            assert closed and time.perf_counter() - started < 3
        # a whole head stops the clock: a body that comes late is still read and answered
        body = b'{"model": "tiny", "prompt": "hi", "max_tokens": 2}'
        with socket.create_connection(("127.0.0.1", port)) as late_body:
            late_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: %d\r\n\r\n" % len(body))
            time.sleep(1.5)
            late_body.sendall(body)
            late_body.settimeout(30)
            assert late_body.recv(4096).startswith(b"HTTP/1.1 200")


def _serve(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "minimind.cli", "serve", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_serve_on_a_busy_port_exits_nonzero_naming_it(wide_ckpt):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _serve("--ckpt", wide_ckpt, "--port", port, "--max-len", 64)
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    assert f"cannot listen on 127.0.0.1:{port}" in out and "Traceback" not in out, out


def test_serve_logs_its_layout_and_each_request(wide_ckpt):
    port = free_port()
    proc = _serve("--ckpt", wide_ckpt, "--port", port, "--max-len", 64, "--threads", 1)
    try:
        url = wait_healthy(port)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = c.completions.create(model="run", prompt="hi", max_tokens=3)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "engine: device cpu, dtype " in out and ", max batch 32, context 64 tokens" in out
    assert "(torch threads 1 of " in out
    # --dtype auto (the default): the chosen dtype and the timings it was chosen by
    assert "dtype: float32, the fastest here" in out or "dtype: bfloat16, the fastest here" in out
    line = next(x for x in out.splitlines() if r.id in x)
    assert f"prompt {r.usage.prompt_tokens} tokens, completion 3 tokens" in line and "tokens/s" in line, line


def test_throughput_is_logged_while_there_is_work(wide_ckpt, caplog):
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=2, max_len=256)
    with caplog.at_level(logging.INFO, logger="infer"):
        with ServerThread(create_app(engine, model_name="tiny", log_interval=0.05)) as url:
            c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
            r = c.completions.create(model="tiny", prompt="hi", max_tokens=200, extra_body={"ignore_eos": True})
    lines = [rec.getMessage() for rec in caplog.records]
    assert any(x.startswith("engine: device cpu") for x in lines)
    assert any(x.startswith("engine: ") and "running" in x and "generation" in x and "tokens/s" in x for x in lines)
    assert any(r.id in x and "completion 200 tokens" in x for x in lines)
