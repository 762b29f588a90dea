"""The server against one client that tries to take it (issue 26): a request of many long sequences
next to a short one, a hang-up in the middle of such a request, a flood of connections that send
their bodies a byte at a time, and a shutdown with streams in flight. Real HTTP on 127.0.0.1: the
official `openai` client, httpx and raw sockets; the last two against `minimind serve` itself."""

import json
import os
import resource
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
from infer.server import ServerThread, create_app
from tests.conftest import ROOT, free_port
from tests.test_server import MSGS, wait_healthy, wide_checkpoint

FIRST_TOKEN_BOUND = 2.0  # seconds: a short request's first token, next to a request that holds its share of rows
LOG_BOUND = 64 * 1024  # bytes of server log during the slow-body flood (it was 178 MB)


@pytest.fixture(scope="module")
def wide_ckpt(tokenizer_dir, tmp_path_factory):
    return wide_checkpoint(tmp_path_factory.mktemp("wide") / "run" / "step-3", tokenizer_dir)


def _health(url) -> dict:
    resp = httpx.get(url + "/health", timeout=5)
    assert resp.status_code == 200, resp.text
    return resp.json()


def _until(predicate, limit: float, every: float = 0.02):
    """Polls `predicate()` until it is truthy or `limit` seconds pass -> (its last value, seconds taken)."""
    started = time.perf_counter()
    while not (value := predicate()) and time.perf_counter() - started < limit:
        time.sleep(every)
    return value, time.perf_counter() - started


HOG = {"model": "tiny", "prompt": ["hi", "ho", "ha", "he"], "n": 16, "max_tokens": 400, "ignore_eos": True}


def test_a_request_of_many_sequences_does_not_hold_back_the_next_one(wide_ckpt):
    """4 prompts x n=16 of 400 tokens take at most half the rows; a chat sent after it starts at once."""
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=8, max_len=512, max_group_rows=4)
    with ServerThread(create_app(engine, model_name="tiny")) as url:
        hog = threading.Thread(target=lambda: httpx.post(url + "/v1/completions", json=HOG, timeout=120), daemon=True)
        hog.start()
        state, _ = _until(lambda: (h := _health(url))["running"] and h, limit=30)
        assert state["running"] == 4 and state["waiting"] == 60, state  # its share, not every row
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        sent = time.perf_counter()
        stream = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, stream=True)
        first = next(c for c in stream if c.choices and c.choices[0].delta.content)
        waited = time.perf_counter() - sent
        rest = [c.choices[0].finish_reason for c in stream if c.choices]
        assert first.choices[0].delta.content and rest[-1] == "length"
        assert waited < FIRST_TOKEN_BOUND, f"first token after {waited:.2f} s"
        assert _health(url)["waiting"] > 0  # the hog was still there all along


def test_fair_admission_alternates_between_requests(wide_ckpt):
    """In the engine: with rows free, each pick goes to the group holding fewest, within its cap."""
    from infer.sampling import SamplingParams

    engine = Engine.from_checkpoint(wide_ckpt, max_batch=6, max_len=128, max_group_rows=4)
    sp = SamplingParams(max_new_tokens=50, ignore_eos=True)
    big = [engine.add_request([5, 6], sp, group="big") for _ in range(10)]
    small = [engine.add_request([7, 8], sp, group="small") for _ in range(3)]
    engine.step()
    held = [r.group for r in engine.running]
    assert held.count("big") == 3 and held.count("small") == 3, held  # interleaved, not big's 4 first
    for r in small:
        engine.abort(r)
    engine.step()
    assert [r.group for r in engine.running].count("big") == 4 and len(engine.running) == 4  # capped at 4
    assert all(r.finish_reason is None for r in big)


@pytest.mark.parametrize("stream", [False, True])
def test_a_hang_up_aborts_every_prompt_and_every_n(wide_ckpt, stream):
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=8, max_len=512, max_group_rows=4)
    body = {**HOG, "prompt": "hi"} if stream else HOG  # a stream takes one prompt: n=16 of it
    body = json.dumps({**body, "stream": stream}).encode()
    with ServerThread(create_app(engine, model_name="tiny")) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            state, _ = _until(lambda: (h := _health(url))["running"] and h, limit=30)
            assert state["running"] == 4 and state["waiting"] > 0, state
        left, took = _until(lambda: (h := _health(url))["running"] + h["waiting"] == 0 and h, limit=5)
        assert left and took < 1.0, f"running/waiting not 0 {took:.2f} s after the hang-up: {_health(url)}"


def test_a_body_that_does_not_arrive_in_time_gets_408(wide_ckpt):
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=2, max_len=128)
    with ServerThread(create_app(engine, model_name="tiny"), body_timeout=1.0) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as slow:
            slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            slow.settimeout(0.3)
            started, reply = time.perf_counter(), b""
            while time.perf_counter() - started < 5:  # a byte every 0.3 s: more bytes do not reset the clock
                try:
                    slow.sendall(b" ")
                    chunk = slow.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not chunk:
                    break
                reply += chunk
            took = time.perf_counter() - started
        assert reply.startswith(b"HTTP/1.1 408"), reply
        assert b'"code": "request_timeout"' in reply and 0.8 < took < 3, (reply, took)
        assert _health(url)["status"] == "ok"


def _serve(ckpt, port, *flags, files: int | None = None) -> subprocess.Popen:
    def limit_files():
        resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))

    return subprocess.Popen(
        [sys.executable, "-m", "minimind.cli", "serve", "--ckpt", str(ckpt), "--port", str(port), "--dtype", "float32",
         "--threads", "1", *map(str, flags)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=limit_files if files else None)


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 60) -> tuple[int, str]:
    if sig is not None and proc.poll() is None:
        proc.send_signal(sig)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"the server did not exit {timeout} s after {sig!r}:\n{out[-3000:]}")
    return proc.returncode, out


SLOW_CLIENTS = 1100


def test_a_flood_of_slow_bodies_does_not_lock_out_health_or_fill_the_log(wide_ckpt):
    """1,100 connections, each a whole head (Content-Length 1,000,000) then a byte every 2 s, against a
    server whose file limit is 1,024: health answers within 1 s throughout, a chat is answered, the
    log stays under LOG_BOUND bytes."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = SLOW_CLIENTS + 200
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"needs {need} open files in the test process; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, need), hard))
    port = free_port()
    proc = _serve(wide_ckpt, port, "--max-len", 128, files=1024)
    socks: list[socket.socket] = []
    try:
        url = wait_healthy(port)
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 1000000\r\n\r\n{")
        worst, started, last_byte = 0.0, time.perf_counter(), 0.0
        sent_head: set[int] = set()
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=10)
        chat = None
        while time.perf_counter() - started < 12:
            if len(socks) < SLOW_CLIENTS:  # the flood arrives over ~2 s, 110 connections every 0.2 s
                for _ in range(SLOW_CLIENTS // 10):
                    s = socket.socket()
                    s.setblocking(False)
                    s.connect_ex(("127.0.0.1", port))
                    socks.append(s)
            for i, s in enumerate(socks):  # each new one sends its head; every 2 s, each sends a byte
                if i not in sent_head or time.perf_counter() - last_byte >= 2:
                    try:
                        s.send(b" " if i in sent_head else head)
                        sent_head.add(i)
                    except OSError:
                        pass  # not connected yet, or closed by the server: the flood goes on regardless
            if time.perf_counter() - last_byte >= 2:
                last_byte = time.perf_counter()
            t = time.perf_counter()
            resp = httpx.get(url + "/health", timeout=5)
            worst = max(worst, time.perf_counter() - t)
            assert resp.status_code == 200, resp.text
            if chat is None and time.perf_counter() - started > 4:
                chat = client.chat.completions.create(model="run", messages=MSGS, max_tokens=4)
            time.sleep(0.2)
        assert len(sent_head) > 900, f"only {len(sent_head)} slow clients got their head out"
        assert chat is not None and chat.choices[0].finish_reason in ("stop", "length")
        assert worst < 1.0, f"a health check took {worst:.2f} s"
    finally:
        for s in socks:
            s.close()
        code, out = _stop(proc)
    print(f"slow-body flood: worst health check {worst:.3f} s, log {len(out.encode())} bytes")
    assert code == 0, out[-3000:]
    assert len(out.encode()) < LOG_BOUND, f"{len(out.encode())} bytes of log:\n{out[-3000:]}"
    assert "Traceback" not in out and "too many open files" not in out.lower(), out[-3000:]
    assert "closed the oldest one still sending a request" in out  # the cap was reached and said so


def _read_stream(url: str, body: dict, into: list) -> None:
    """One streamed completion read as raw SSE lines -> into: (every data line, error or None)."""
    lines, error = [], None
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: "):
                    lines.append(line[6:])
    except Exception as e:  # a cut stream: what this test must not see
        error = e
    into.append((lines, error))


def test_sigterm_ends_every_stream_with_done_and_exits_0(wide_ckpt):
    """SIGTERM with 6 streams and 2 whole requests in flight, --grace 1: streams end with a
    finish_reason and [DONE], the whole requests get a JSON 503, a new request meanwhile gets 503,
    the server exits 0 with no traceback in its log."""
    port = free_port()
    proc = _serve(wide_ckpt, port, "--max-len", 1024, "--max-batch", 8, "--grace", 1)
    try:
        url = wait_healthy(port)
        body = {"model": "run", "prompt": "hi", "max_tokens": 1000, "ignore_eos": True}
        streams, whole = [], []
        threads = [threading.Thread(target=_read_stream, args=(url, {**body, "stream": True}, streams))
                   for _ in range(6)]
        threads += [threading.Thread(target=lambda: whole.append(httpx.post(url + "/v1/completions", json=body,
                                                                            timeout=60))) for _ in range(2)]
        for t in threads:
            t.start()
        state, _ = _until(lambda: (h := _health(url))["running"] == 8 and h, limit=30)
        assert state, _health(url)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = httpx.post(url + "/v1/completions", json={**body, "max_tokens": 2}, timeout=10)
        for t in threads:
            t.join(30)
        code, out = _stop(proc, sig=None)  # a second signal would hurry the drain
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert late.status_code == 503 and late.json()["error"]["message"] == "the server is shutting down", late.text
    assert len(streams) == 6 and len(whole) == 2
    for lines, error in streams:
        assert error is None and lines[-1] == "[DONE]", (error, lines[-3:])
        last = json.loads(lines[-2])
        assert last["choices"][0]["finish_reason"] == "length", last  # cut short, and it says so
    for resp in whole:
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "shutting_down", resp.text
    assert code == 0, out[-3000:]
    assert "Traceback" not in out and "ERROR" not in out, out[-3000:]


@pytest.mark.parametrize("flags, names", [
    (["--threads", "999"], "--threads: 999 threads on"),
    (["--threads", "0"], "--threads"),
    (["--header-timeout", "0"], "--header-timeout"),
    (["--header-timeout", "-1"], "--header-timeout"),
    (["--header-timeout", "nan"], "--header-timeout"),
    (["--header-timeout", "inf"], "--header-timeout"),
    (["--body-timeout", "0"], "--body-timeout"),
    (["--body-timeout", "inf"], "--body-timeout"),
    (["--grace", "-1"], "--grace"),
    (["--max-request-rows", "0"], "--max-request-rows"),
    (["--max-connections", "0"], "--max-connections"),
    (["--device", "cuda"], "--device: cuda: no CUDA device is available"),
])
def test_serve_flags_that_would_break_it_are_usage_errors(wide_ckpt, flags, names):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "minimind.cli", "serve", "--ckpt", str(wide_ckpt), *flags],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and names in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_chat_device_cuda_without_cuda_is_a_usage_error(wide_ckpt):
    proc = subprocess.run([sys.executable, "-m", "minimind.cli", "chat", "--ckpt", str(wide_ckpt), "--device", "cuda"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, input="",
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2 and "--device: cuda: no CUDA device" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_at_the_connection_cap_the_oldest_stalled_connection_makes_room(wide_ckpt):
    """--max-connections 3: a new connection closes the oldest one still sending its request; when every
    connection has a request in the app, the new one gets a JSON 503."""
    engine = Engine.from_checkpoint(wide_ckpt, max_batch=4, max_len=1024)
    with ServerThread(create_app(engine, model_name="tiny"), max_connections=3) as url:
        port = int(url.rsplit(":", 1)[1])
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        for s in stalled:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
            time.sleep(0.05)
        assert _health(url)["status"] == "ok"  # room made by closing the oldest
        stalled[0].settimeout(5)
        assert stalled[0].recv(100) == b""
        for s in stalled:
            s.close()
        body = {"model": "tiny", "prompt": "hi", "max_tokens": 1000, "ignore_eos": True}
        busy = [threading.Thread(target=httpx.post, args=(url + "/v1/completions",), daemon=True,
                                 kwargs={"json": body, "timeout": 60}) for _ in range(3)]
        for t in busy:
            t.start()
        assert _until(lambda: len(engine.running) == 3, limit=30)[0]  # each of the three is busy in the app
        refused = httpx.get(url + "/health", timeout=5)
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "too_many_connections"
