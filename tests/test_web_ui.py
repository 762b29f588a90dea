"""The Streamlit web UI: driven headless by Streamlit's AppTest (in-process engine and `--api` against
a real server), and once for real: `streamlit run` in a subprocess, headless Chromium typing into
the page through chromedriver's WebDriver protocol, a screenshot saved under the test's tmp dir."""

import base64
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from infer.engine import Engine
from infer.server import ServerThread, create_app
from tests.conftest import ROOT, free_port
from tests.test_server import scripted_checkpoint

APP = str(ROOT / "infer" / "web_demo.py")


@pytest.fixture(scope="module")
def scripted(tokenizer_dir, tmp_path_factory):
    return scripted_checkpoint(tmp_path_factory.mktemp("web") / "scripted", tokenizer_dir)


def _assistant_turns(at):
    return [m for m in at.chat_message if m.name == "assistant"]


def test_apptest_local_engine_chat_history_and_clear(scripted, monkeypatch):
    monkeypatch.setenv("MINIMIND_WEB_CKPT", str(scripted))
    monkeypatch.delenv("MINIMIND_WEB_API", raising=False)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    assert not at.exception and at.title[0].value == "minimind chat"
    assert {s.label for s in at.sidebar.slider} >= {"temperature", "top_p", "max new tokens"}
    at.chat_input[0].set_value("hello").run()
    assert not at.exception
    (turn,) = _assistant_turns(at)
    assert turn.markdown[-1].value == "Hi there!"
    assert turn.expander[0].label == "Thinking" and turn.expander[0].markdown[0].value == "hm"
    at.sidebar.slider[0].set_value(0.0)  # greedy: the script is the same either way
    at.chat_input[0].set_value("and again").run()
    assert [m.name for m in at.chat_message] == ["user", "assistant", "user", "assistant"]
    assert at.session_state.messages[1] == {"role": "assistant", "content": "Hi there!", "reasoning": "hm"}
    at.sidebar.button[0].click().run()
    assert at.session_state.messages == [] and len(at.chat_message) == 0


def test_apptest_against_the_http_server(scripted, monkeypatch):
    engine = Engine.from_checkpoint(scripted, max_batch=2, max_len=64)
    with ServerThread(create_app(engine, model_name="scripted")) as url:
        monkeypatch.setenv("MINIMIND_WEB_API", url + "/v1")
        monkeypatch.delenv("MINIMIND_WEB_CKPT", raising=False)
        at = AppTest.from_file(APP, default_timeout=120)
        at.run()
        at.chat_input[0].set_value("hello over http").run()
        assert not at.exception
        (turn,) = _assistant_turns(at)
        assert turn.markdown[-1].value == "Hi there!" and turn.expander[0].markdown[0].value == "hm"


def test_apptest_without_a_backend_says_how_to_start(monkeypatch):
    monkeypatch.delenv("MINIMIND_WEB_CKPT", raising=False)
    monkeypatch.delenv("MINIMIND_WEB_API", raising=False)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert "--ckpt CKPT" in at.error[0].value


def test_local_stream_arrives_in_pieces(scripted):
    import importlib.util

    spec = importlib.util.spec_from_file_location("web_demo", APP)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)  # not __main__: defines the functions, renders nothing
    args = demo.parse_args(["--ckpt", str(scripted)])
    pieces = list(demo.stream_local(args, [{"role": "user", "content": "hi"}], dict(
        max_new_tokens=32, temperature=0.0, top_p=1.0, top_k=0, seed=None)))
    assert "".join(c for _, c in pieces) == "Hi there!" and "".join(r for r, _ in pieces) == "hm"
    assert sum(1 for _, c in pieces if c) > 2  # streamed token by token, not in one piece


def _browser():
    chromium = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        pytest.skip("no chromium/chromedriver found (Debian: apt-get install chromium chromium-driver)")
    return chromium, driver



def _wait(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def test_real_browser_sends_a_message_and_sees_the_streamed_reply(scripted, tmp_path):
    chromium, driver = _browser()
    app_port, driver_port = free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", APP, "--server.headless", "true", "--server.address",
             "127.0.0.1", "--server.port", str(app_port), "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none", "--", "--ckpt", str(scripted)],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([driver, f"--port={driver_port}"], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        app = f"http://127.0.0.1:{app_port}"
        _wait(lambda: httpx.get(app + "/_stcore/health", timeout=2).status_code == 200, 120, "streamlit")
        wd = f"http://127.0.0.1:{driver_port}"
        _wait(lambda: httpx.get(wd + "/status", timeout=2).json()["value"]["ready"], 60, "chromedriver")
        profile = tmp_path / "chromium-profile"
        profile.mkdir()
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={profile}", "--window-size=1280,900"]
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome",
                                                 "goog:chromeOptions": {"binary": chromium, "args": flags}}}}
        session = httpx.post(wd + "/session", json=caps, timeout=120).json()["value"]["sessionId"]
        s = f"{wd}/session/{session}"
        try:
            httpx.post(s + "/url", json={"url": app}, timeout=60)

            def find(css):
                r = httpx.post(s + "/element", json={"using": "css selector", "value": css}, timeout=10).json()
                return next(iter(r["value"].values())) if "error" not in r["value"] else None

            def page_text():
                r = httpx.post(s + "/execute/sync", json={"script": "return document.body.innerText;", "args": []},
                               timeout=10)
                return r.json()["value"]

            box = _wait(lambda: find('[data-testid="stChatInputTextArea"]'), 60, "the chat input")
            httpx.post(f"{s}/element/{box}/value", json={"text": "hello browser\ue007"}, timeout=10)
            shot = tmp_path / "web_demo.png"
            try:
                _wait(lambda: "Hi there!" in page_text(), 60, "the reply")
            finally:  # also when the reply never came: the picture says why
                shot.write_bytes(base64.b64decode(httpx.get(s + "/screenshot", timeout=30).json()["value"]))
                print(f"screenshot: {shot}")
            text = page_text()
            assert "hello browser" in text and "Thinking" in text
            assert shot.stat().st_size > 10_000 and shot.read_bytes()[:4] == b"\x89PNG"
        finally:
            httpx.delete(s, timeout=30)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert os.path.exists(tmp_path / "web_demo.png")


def test_no_thinking_box_without_reasoning(tokenizer_dir, tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("web_demo", APP)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    assert demo.visible_reasoning("") is None and demo.visible_reasoning(None) is None
    assert demo.visible_reasoning("\n\n") is None  # Qwen3's empty <think>\n\n</think> with thinking off
    assert demo.visible_reasoning(" hm\n") == "hm"
    plain = scripted_checkpoint(tmp_path / "plain", tokenizer_dir, reply="Hello there!")
    monkeypatch.setenv("MINIMIND_WEB_CKPT", str(plain))
    monkeypatch.delenv("MINIMIND_WEB_API", raising=False)
    at = AppTest.from_file(APP, default_timeout=120)
    at.run()
    at.chat_input[0].set_value("hello").run()
    at.chat_input[0].set_value("again").run()  # the first reply is now drawn from history by show()
    assert not at.exception
    turns = _assistant_turns(at)
    assert [t.markdown[-1].value for t in turns] == ["Hello there!"] * 2
    assert all(len(t.expander) == 0 for t in turns) and not any("no reasoning" in c.value for c in at.caption)
