"""`minimind chat`: a real process fed a conversation on stdin (streamed reply, thinking shown apart,
/reset, /exit), and the session's history and context policy."""

import subprocess
import sys

import pytest

from infer.chat import ChatSession
from infer.engine import Engine
from infer.sampling import SamplingParams
from tests.conftest import ROOT
from tests.test_server import scripted_checkpoint, wide_checkpoint


@pytest.fixture(scope="module")
def scripted(tokenizer_dir, tmp_path_factory):
    return scripted_checkpoint(tmp_path_factory.mktemp("chat") / "scripted", tokenizer_dir)


def test_chat_cli_conversation(scripted):
    stdin = "hello\n/reset\n\n/bogus\nhi again\n/exit\nnever read\n"
    out = subprocess.run(
        [sys.executable, "-m", "minimind.cli", "chat", "--ckpt", str(scripted), "--temperature", "0.7", "--seed", "1"],
        input=stdin, cwd=ROOT, capture_output=True, text=True, timeout=180,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    replies = [line for line in lines if "Hi there!" in line]
    assert replies == ["Hi there!", "Hi there!"], out.stdout
    assert out.stdout.count("[thinking] hm [/thinking]") == 2
    assert "(conversation reset)" in out.stdout and "unknown command /bogus" in out.stdout
    assert "never read" not in out.stdout


def test_chat_cli_bad_checkpoint_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "minimind.cli", "chat", "--ckpt", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and str(tmp_path) in out.stderr


def test_session_history_reset_and_context_policy(tokenizer_dir, tmp_path):
    engine = Engine.from_checkpoint(wide_checkpoint(tmp_path / "wide", tokenizer_dir), max_batch=1, max_len=96)
    session = ChatSession(engine, SamplingParams(max_new_tokens=8, temperature=0), system="Be brief.")
    first = "".join(c for _, c in session.send("What is two plus two?"))
    assert [m["role"] for m in session.history] == ["user", "assistant"]
    assert session.history[1]["content"] == first and first
    alone = engine.generate([engine.encode_chat([{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "And three?"}])],
                            SamplingParams(max_new_tokens=8, temperature=0))[0].text
    second = "".join(c for _, c in session.send("And three?"))
    with_history = engine.generate([engine.encode_chat(session.messages()[:-1])],
                                   SamplingParams(max_new_tokens=8, temperature=0))[0].text
    assert second == with_history  # the second reply saw the first turn...
    session.reset()
    assert session.history == []
    assert "".join(c for _, c in session.send("And three?")) == alone  # ...and after /reset it does not
    for i in range(12):  # far more than 96 tokens of history: the oldest turns give way
        assert "".join(c for _, c in session.send(f"Message number {i}, tell me more."))
    assert len(engine.encode_chat(session.messages()[:-1])) < 96  # the last prompt fit
    assert len(session.history) < 2 * 13 and session.history[-2]["content"] == "Message number 11, tell me more."
    assert session.messages()[0]["role"] == "system"
